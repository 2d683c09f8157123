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
pub const RECORD_VERSION: u32 = 1;

pub struct Catalog {
    db: Database,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub name: String,
    pub created_unix_ns: u64,
    pub disks: Vec<DiskRecord>,
    pub replication: Option<ReplicationRecord>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicationRecord {
    pub replica: String,
    pub frequency_secs: u32,
    pub compression: proto::Compression,
    pub disks: Vec<u32>,
    pub replication_id: String,
    pub generation: proto::Generation,
    /// Newest point the replica is known to have committed.
    pub last_seq: proto::Seq,
    pub last_cut_unix_ns: Option<u64>,
    /// A point that was being shipped when this record was written: the replica may have
    /// committed it without this host hearing back (crash, lost answer).
    pub inflight_seq: Option<proto::Seq>,
    pub initial_done: bool,
    pub initial_started: bool,
    pub suspended: bool,
    pub resync_reason: Option<String>,
    /// A full resynchronization was requested and has not committed yet.
    #[serde(default)]
    pub pending_full: bool,
    /// Peer name in the replica's certificate when the relationship was set up (`replication
    /// enable`): later connections must reach that same replica identity. Absent in records
    /// written before it existed; then recorded at the next successful hello.
    #[serde(default)]
    pub replica_name: Option<String>,
    /// Recovery-history policy sent to the replica in every hello (`replication enable/set`);
    /// absent in older records and when never set (the replica keeps its newest 64 points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<proto::HistoryPolicy>,
    /// History-clock time (`proto::time`) of the newest application-consistent cut that the
    /// replica committed: the next one is due `app_consistent_every_hours` after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_app_consistent_unix_ns: Option<u64>,
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
