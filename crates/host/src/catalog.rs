//! The host's state catalog: one embedded redb database (`<data-dir>/catalog.redb`) holding
//! the VM records, replication relationships and replica-server settings as versioned JSON
//! documents. This module owns every write to it; it never holds disk data.
//!
//! redb commits are durable (fsync) and atomic, so a record is either the old or the new one
//! after a crash; the records here are small and change at most once per replication cycle.

use std::path::Path;

use anyhow::Context;
use redb::{Database, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

/// Version of the JSON documents stored in the catalog; bump on incompatible change.
/// Version 2 moved a VM's replication out of `vm/<name>` into `relationship/<name>` (one record
/// per VM, whatever role this host plays), its state into one enum (`relationship.md`).
pub const RECORD_VERSION: u32 = 2;

pub struct Catalog {
    db: Database,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub name: String,
    pub created_unix_ns: u64,
    pub disks: Vec<DiskRecord>,
    /// How the guest is quiesced for application-consistent points (`vm set`); absent when
    /// never set (every point crash-consistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::guest::GuestSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    pub index: u32,
    pub size_bytes: u64,
    pub file: String,
    pub state_dir: String,
}

/// `relationship/<vm>`: the one replication relationship of a VM on this host, whichever
/// role this host plays in it (`catalog.md`). The role, state and progress are the
/// relationship core's record (`relationship.md`); a primary adds the settings it ships with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelationshipDoc {
    pub relationship: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<ReplicationRecord>,
}

impl RelationshipDoc {
    pub fn key(vm: &str) -> String {
        format!("relationship/{vm}")
    }

    /// The core's record, checked (version, shape): one line when it cannot be read.
    pub fn record(
        &self,
        vm: &proto::VmName,
    ) -> Result<relationship::RelationshipRecord, relationship::RecordError> {
        relationship::RelationshipRecord::from_value(vm, self.relationship.clone())
    }

    pub fn new(rel: &relationship::Relationship, primary: Option<ReplicationRecord>) -> Self {
        RelationshipDoc {
            relationship: serde_json::to_value(rel.to_record()).unwrap_or_default(),
            primary,
        }
    }
}

/// What a primary replicates and how: the relationship's settings (`replication enable/set`).
/// Its state and progress are in the relationship record next to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicationRecord {
    pub replica: String,
    pub frequency_secs: u32,
    pub compression: proto::Compression,
    pub disks: Vec<u32>,
    pub replication_id: String,
    /// Peer name in the replica's certificate when the relationship was set up (`replication
    /// enable`): later connections must reach that same replica identity. Absent in records
    /// written before it existed; then recorded at the next successful hello.
    #[serde(default)]
    pub replica_name: Option<String>,
    /// Recovery-history policy sent to the replica in every hello (`replication enable/set`);
    /// absent when never set (the replica keeps its newest 64 points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<proto::HistoryPolicy>,
    /// `replication set --auto-resynchronize on`: a required resynchronization starts by
    /// itself (`relationship::AutoResync`). Absent (older records too): off, manual.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_resynchronize: bool,
    /// `--resynchronize-window`: `"HH:MM-HH:MM"` (UTC) auto-resynchronization starts in;
    /// absent: any time. Kept when auto is off (Hyper-V keeps its interval too). A value that
    /// does not parse makes the record damaged (the start is refused in one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynchronize_window: Option<relationship::ResyncWindow>,
    /// `replication set --lag-warning-cycles N`: health turns Warning after N cycles without a
    /// successful one; absent (older records too): the default, 3 cycles or Hyper-V's hour
    /// (`docs/health.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_warning_cycles: Option<u32>,
}

impl ReplicationRecord {
    /// What the relationship core is told about auto-resynchronization.
    pub fn auto_resync(&self) -> relationship::AutoResync {
        if self.auto_resynchronize {
            relationship::AutoResync::On {
                window: self.resynchronize_window,
            }
        } else {
            relationship::AutoResync::Off
        }
    }
}

/// A version-1 `vm/<name>` record: the replication with its flags inside. Read only to
/// migrate it (`Catalog::migrate`).
#[derive(Debug, Clone, Deserialize)]
struct VmRecordV1 {
    name: String,
    created_unix_ns: u64,
    disks: Vec<DiskRecord>,
    replication: Option<ReplicationRecordV1>,
    #[serde(default)]
    guest: Option<crate::guest::GuestSettings>,
}

#[derive(Debug, Clone, Deserialize)]
struct ReplicationRecordV1 {
    replica: String,
    frequency_secs: u32,
    compression: proto::Compression,
    disks: Vec<u32>,
    replication_id: String,
    generation: u64,
    last_seq: u64,
    last_cut_unix_ns: Option<u64>,
    inflight_seq: Option<u64>,
    initial_done: bool,
    initial_started: bool,
    suspended: bool,
    resync_reason: Option<String>,
    #[serde(default)]
    pending_full: bool,
    #[serde(default)]
    replica_name: Option<String>,
    #[serde(default)]
    history: Option<proto::HistoryPolicy>,
    #[serde(default)]
    last_app_consistent_unix_ns: Option<u64>,
}

/// Replica side: the primary identity that created a replica VM (`replica-owner/<vm>`). Only
/// that identity may say hello for the VM, read its state or send it deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaOwner {
    pub version: u32,
    /// Peer name (CN, else first DNS name) of the creator's client certificate.
    pub peer_name: String,
    /// SHA-256 fingerprint (hex) of the trusted CA that vouched for that name.
    pub ca_fingerprint: String,
}

impl ReplicaOwner {
    /// Its format has not changed since version 1 of the catalog.
    pub const VERSION: u32 = 1;
}

/// Replica side: a recovery point served over NBD, and so pinned (`served/<vm>/<seq>`,
/// `docs/formats/catalog.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub version: u32,
    pub vm: String,
    pub seq: u64,
    /// Disks exported, ascending.
    pub disks: Vec<u32>,
    pub created_unix_ns: u64,
    /// When `points serve --for` releases it; `None`: until `points unserve`.
    pub expires_unix_ns: Option<u64>,
}

impl ServedRecord {
    pub const VERSION: u32 = 1;

    pub fn key(vm: &str, seq: u64) -> String {
        format!("served/{vm}/{seq:020}")
    }
}

impl Catalog {
    pub fn open(path: &Path) -> anyhow::Result<Catalog> {
        let db = Database::create(path)
            .with_context(|| format!("opening the state catalog {}", path.display()))?;
        // It holds every relationship's replication id, i.e. its delta key: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
        let tx = db.begin_write()?;
        tx.open_table(KV)?;
        tx.commit()?;
        Ok(Catalog { db })
    }

    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(KV)?;
            t.insert(key, bytes.as_slice())?;
        }
        tx.commit()
            .with_context(|| format!("committing {key} to the catalog"))?;
        Ok(())
    }

    /// Writes several records in one commit: all of them or none after a crash.
    pub fn put_many(&self, items: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(KV)?;
            for (key, bytes) in items {
                t.insert(key.as_str(), bytes.as_slice())?;
            }
        }
        tx.commit().context("committing to the catalog")?;
        Ok(())
    }

    /// Brings `vm/<name>` records of version 1 to version 2: the replication moves to
    /// `relationship/<name>` with its flags turned into one state (`relationship::migrate_v1`),
    /// both written in one commit per VM. A record of a version this daemon does not know is
    /// refused with one line, and nothing is changed. Returns the VMs migrated.
    pub fn migrate(&self) -> anyhow::Result<Vec<String>> {
        let mut migrated = Vec::new();
        for (key, value) in self.scan::<serde_json::Value>("vm/")? {
            let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
            match version {
                2 => continue,
                1 => {}
                v => anyhow::bail!(
                    "catalog record {key} has version {v}; this understudy reads versions 1 and 2 (was it written by a newer understudy?)"
                ),
            }
            let old: VmRecordV1 = serde_json::from_value(value)
                .with_context(|| format!("catalog record {key} is damaged"))?;
            let mut items = Vec::new();
            let new = VmRecord {
                version: RECORD_VERSION,
                name: old.name.clone(),
                created_unix_ns: old.created_unix_ns,
                disks: old.disks,
                guest: old.guest,
            };
            items.push((key.clone(), serde_json::to_vec(&new)?));
            if let Some(r) = old.replication {
                let record = relationship::RelationshipRecord::from_v1(
                    r.initial_started,
                    r.initial_done,
                    r.suspended,
                    r.resync_reason,
                    r.pending_full,
                    r.generation,
                    r.last_seq,
                    r.inflight_seq,
                    r.last_cut_unix_ns,
                    r.last_app_consistent_unix_ns,
                );
                let doc = RelationshipDoc {
                    relationship: serde_json::to_value(record)?,
                    primary: Some(ReplicationRecord {
                        replica: r.replica,
                        frequency_secs: r.frequency_secs,
                        compression: r.compression,
                        disks: r.disks,
                        replication_id: r.replication_id,
                        replica_name: r.replica_name,
                        history: r.history,
                        auto_resynchronize: false,
                        resynchronize_window: None,
                        lag_warning_cycles: None,
                    }),
                };
                items.push((RelationshipDoc::key(&old.name), serde_json::to_vec(&doc)?));
            }
            self.put_many(&items)?;
            migrated.push(old.name);
        }
        Ok(migrated)
    }

    /// Removes `key` (nothing to remove is fine), durably.
    pub fn delete(&self, key: &str) -> anyhow::Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(KV)?;
            t.remove(key)?;
        }
        tx.commit()
            .with_context(|| format!("removing {key} from the catalog"))?;
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(KV)?;
        match t.get(key)? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value())
                    .with_context(|| format!("catalog record {key} is damaged"))?,
            )),
            None => Ok(None),
        }
    }

    /// All records whose key starts with `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> anyhow::Result<Vec<(String, T)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(KV)?;
        let mut out = Vec::new();
        for item in t.range(prefix..)? {
            let (k, v) = item?;
            let key = k.value().to_string();
            if !key.starts_with(prefix) {
                break;
            }
            let value = serde_json::from_slice(v.value())
                .with_context(|| format!("catalog record {key} is damaged"))?;
            out.push((key, value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_scan_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let c = Catalog::open(&path).unwrap();
            c.put("vm/a", &1u32).unwrap();
            c.put("vm/b", &2u32).unwrap();
            c.put("x", &3u32).unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        let vms: Vec<(String, u32)> = c.scan("vm/").unwrap();
        assert_eq!(vms, vec![("vm/a".into(), 1), ("vm/b".into(), 2)]);
        assert_eq!(c.get::<u32>("vm/none").unwrap(), None);
        assert_eq!(c.get::<u32>("x").unwrap(), Some(3));
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    fn v1_vm(replication: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "version": 1, "name": "web", "created_unix_ns": 5,
            "disks": [{"index": 0, "size_bytes": 4096, "file": "/x/disk-0.raw", "state_dir": "/x/disk-0.state"}],
            "replication": replication,
        })
    }

    fn v1_replication(flags: serde_json::Value) -> serde_json::Value {
        let mut r = serde_json::json!({
            "replica": "b:1", "frequency_secs": 30, "compression": "zstd", "disks": [0],
            "replication_id": "abcd", "generation": 3, "last_seq": 7, "last_cut_unix_ns": 9,
            "inflight_seq": 8, "initial_done": true, "initial_started": true, "suspended": false,
            "resync_reason": null, "replica_name": "b",
        });
        for (k, v) in flags.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    }

    #[test]
    fn version_1_catalog_is_migrated_to_one_relationship_record_per_vm() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.redb")).unwrap();
        c.put(
            "vm/web",
            &v1_vm(v1_replication(serde_json::json!({"suspended": true}))),
        )
        .unwrap();
        c.put("vm/plain", &{
            let mut v = v1_vm(serde_json::Value::Null);
            v["name"] = "plain".into();
            v
        })
        .unwrap();
        assert_eq!(
            c.migrate().unwrap(),
            vec!["plain".to_string(), "web".to_string()]
        );
        // Idempotent: a second start finds nothing to do.
        assert!(c.migrate().unwrap().is_empty());

        let vm: VmRecord = c.get("vm/web").unwrap().unwrap();
        assert_eq!(vm.version, 2);
        let doc: RelationshipDoc = c.get("relationship/web").unwrap().unwrap();
        let name = proto::VmName::parse("web").unwrap();
        let rel = relationship::Relationship::from_record(name.clone(), doc.record(&name).unwrap())
            .unwrap();
        assert_eq!(rel.role, relationship::Role::Primary);
        assert_eq!(
            rel.state,
            relationship::State::Suspended {
                resume_to: relationship::Resumable::Replicating
            }
        );
        assert_eq!(rel.progress.last_seq, proto::Seq(7));
        assert_eq!(rel.progress.inflight_seq, Some(proto::Seq(8)));
        assert_eq!(rel.progress.generation, proto::Generation(3));
        let settings = doc.primary.unwrap();
        assert_eq!(settings.replica, "b:1");
        assert_eq!(settings.replication_id, "abcd");
        assert!(c
            .get::<RelationshipDoc>("relationship/plain")
            .unwrap()
            .is_none());
    }

    #[test]
    fn catalog_of_an_unknown_version_is_refused_in_one_line_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let mut v = v1_vm(serde_json::Value::Null);
        v["version"] = 9.into();
        c.put("vm/web", &v).unwrap();
        let e = c.migrate().unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("version 9"), "{e}");
        let kept: serde_json::Value = c.get("vm/web").unwrap().unwrap();
        assert_eq!(kept, v);
    }

    #[test]
    fn auto_resynchronize_settings_are_optional_and_a_bad_window_is_damaged() {
        let older = serde_json::json!({
            "replica": "r:1", "frequency_secs": 30, "compression": "zstd", "disks": [0],
            "replication_id": "x"
        });
        let r: ReplicationRecord = serde_json::from_value(older.clone()).unwrap();
        assert_eq!(r.auto_resync(), relationship::AutoResync::Off);
        // Off and no window: nothing new is written (an older reader sees the same record).
        let back = serde_json::to_value(&r).unwrap();
        assert!(
            back.get("auto_resynchronize").is_none() && back.get("resynchronize_window").is_none()
        );

        let mut on = older.clone();
        on["auto_resynchronize"] = true.into();
        on["resynchronize_window"] = "18:30-06:00".into();
        let r: ReplicationRecord = serde_json::from_value(on).unwrap();
        assert_eq!(
            r.auto_resync(),
            relationship::AutoResync::On {
                window: Some(relationship::ResyncWindow::parse("18:30-06:00").unwrap())
            }
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap()["resynchronize_window"],
            "18:30-06:00"
        );
        // The window is kept when auto is off.
        let mut off = older.clone();
        off["resynchronize_window"] = "01:00-02:00".into();
        let r: ReplicationRecord = serde_json::from_value(off).unwrap();
        assert_eq!(r.auto_resync(), relationship::AutoResync::Off);
        assert!(r.resynchronize_window.is_some());

        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let mut bad = older;
        bad["resynchronize_window"] = "25:00-01:00".into();
        c.put("reverse/web", &bad).unwrap();
        let e = format!(
            "{:#}",
            c.get::<ReplicationRecord>("reverse/web").unwrap_err()
        );
        assert!(e.contains("damaged") && e.lines().count() == 1, "{e}");
    }

    #[test]
    fn relationship_record_of_an_unknown_version_is_refused_in_one_line() {
        let doc = RelationshipDoc {
            relationship: serde_json::json!({"version": 3, "role": "Primary"}),
            primary: None,
        };
        let name = proto::VmName::parse("web").unwrap();
        let e = doc.record(&name).unwrap_err().to_string();
        assert!(e.contains("version 3") && e.lines().count() == 1, "{e}");
    }
}
