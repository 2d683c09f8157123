//! Recovery points served read-only over the daemon's NBD socket (`points serve`), and pinned
//! while served: each exported disk is a [`replica::PointView`], which retention never folds
//! away. Served points are recorded in the catalog (`served/<vm>/<seq>`,
//! `docs/formats/catalog.md`) before their exports appear and forgotten before they go, so a
//! restart serves and pins them again (or releases them with an event: expired, point gone).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{ServePoint, ServedDisk, ServedPoint, UnservePoint};
use replica::{ReplicaError, ReplicaVm};

use super::replica_side::{point_infos_of, resolve_point};
use super::Shared;
use crate::catalog::{Catalog, ServedRecord};
use crate::error::{bad_request, not_found};
use crate::events;

/// Longest `points serve --for`: 30 days. A pin holds retention back for that VM (its journal
/// grows past the pinned point), so an expiry is meant for hours or days; longer is "until
/// unserve" (no `--for`).
pub const SERVE_FOR_MAX_SECS: u64 = 30 * 24 * 3600;
/// How often expiries are checked: `--for` is in seconds, so a pin outlives its time by at
/// most this; a pass is a lock and a comparison per served point.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

struct Entry {
    record: ServedRecord,
    /// (disk, export name) of the exports in the registry: empty until the point is pinned in
    /// this daemon run (its replica VM verified after a start).
    exports: Vec<(u32, String)>,
}

/// The served points of this host, by (VM, point).
#[derive(Default)]
pub(super) struct Served {
    points: BTreeMap<(String, u64), Entry>,
    /// Replica VMs whose served points were pinned again in this daemon run.
    pinned_vms: HashSet<String>,
}

impl Served {
    /// What the catalog records (at start: nothing is pinned yet).
    pub(super) fn load(catalog: &Catalog) -> anyhow::Result<Served> {
        let mut points = BTreeMap::new();
        for (key, record) in catalog.scan::<ServedRecord>("served/")? {
            if record.version != ServedRecord::VERSION {
                anyhow::bail!(
                    "catalog record {key} has version {}, this daemon reads version {}",
                    record.version,
                    ServedRecord::VERSION
                );
            }
            points.insert(
                (record.vm.clone(), record.seq),
                Entry {
                    record,
                    exports: Vec::new(),
                },
            );
        }
        Ok(Served {
            points,
            pinned_vms: HashSet::new(),
        })
    }

    fn keys_of(&self, vm: &str) -> Vec<(String, u64)> {
        self.points
            .range((vm.to_string(), 0)..=(vm.to_string(), u64::MAX))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The export name of `disk` of point `seq`: `<vm>@<seq>-<disk>`. '@' is never in a VM name,
/// so it cannot collide with a primary VM's export (`<vm>-<disk>`), and it is a plain path
/// character in an NBD URI.
pub fn export_name(vm: &str, seq: u64, disk: u32) -> String {
    format!("{vm}@{seq}-{disk}")
}

/// Longest qemu node name: qemu keeps them in 32 bytes with the NUL.
const QEMU_NODE_NAME_MAX: usize = 31;

/// A qemu node name for the served disk: starts with a letter, no '@' (qemu's rules), at most
/// [`QEMU_NODE_NAME_MAX`] bytes (VM names are ASCII, so cutting bytes is safe).
fn node_name(vm: &str, seq: u64, disk: u32) -> String {
    let mut n = format!("point{seq}-{disk}-{vm}");
    n.truncate(QEMU_NODE_NAME_MAX);
    n
}

fn expiry_of(req: &ServePoint, now: u64) -> anyhow::Result<Option<u64>> {
    match req.for_secs {
        None => Ok(None),
        Some(s) if (1..=SERVE_FOR_MAX_SECS).contains(&s) => {
            Ok(Some(now.saturating_add(s.saturating_mul(1_000_000_000))))
        }
        Some(s) => Err(bad_request(format!(
            "--for must be 1 second to {} days, got {s} seconds",
            SERVE_FOR_MAX_SECS / 86400
        ))),
    }
}

impl Shared {
    /// Seqs of the points of `vm` served over NBD (held by `points serve`).
    pub(super) fn served_seqs(&self, vm: &str) -> std::collections::BTreeSet<u64> {
        self.served
            .lock()
            .keys_of(vm)
            .into_iter()
            .map(|(_, seq)| seq)
            .collect()
    }

    /// `points serve`: pins the point, records it, then exports its disks (all, or `disk`).
    /// Serving a served point again adds disks and replaces its expiry.
    pub(crate) fn serve_point(&self, req: &ServePoint) -> anyhow::Result<ServedPoint> {
        let rvm = self.replica_vm(&req.vm)?;
        let point = resolve_point(&rvm, &req.vm, &req.point)?;
        let all: Vec<u32> = rvm.disks().iter().map(|d| d.index).collect();
        let disks = match req.disk {
            Some(d) if all.contains(&d) => vec![d],
            Some(d) => {
                return Err(bad_request(format!(
                    "{} replicates no disk {d} (it has {})",
                    req.vm,
                    all.len()
                )))
            }
            None => all,
        };
        let now = now_unix_ns();
        let expires = expiry_of(req, now)?;
        self.ensure_pins(&rvm);
        let seq = point.seq.get();
        let key = (req.vm.clone(), seq);
        let mut served = self.served.lock();
        let (mut record, mut exports) = match served.points.get(&key) {
            Some(e) => (e.record.clone(), e.exports.clone()),
            None => (
                ServedRecord {
                    version: ServedRecord::VERSION,
                    vm: req.vm.clone(),
                    seq,
                    disks: Vec::new(),
                    created_unix_ns: now,
                    expires_unix_ns: None,
                },
                Vec::new(),
            ),
        };
        // Pin first: retention may have folded the point since it was resolved.
        let mut views = Vec::new();
        for &d in &disks {
            if exports.iter().any(|(x, _)| *x == d) {
                continue;
            }
            let view = rvm.view(proto::Seq(seq), d).map_err(|e| match e {
                ReplicaError::NoSuchPoint { .. } => {
                    not_found(format!("{} has no point {seq} any more", req.vm))
                }
                other => anyhow::Error::from(other),
            })?;
            views.push((d, view));
        }
        record.disks.extend(disks.iter().copied());
        record.disks.sort_unstable();
        record.disks.dedup();
        record.expires_unix_ns = expires;
        self.catalog
            .put(&ServedRecord::key(&req.vm, seq), &record)
            .context("recording the served point")?;
        for (d, view) in views {
            let name = export_name(&req.vm, seq, d);
            self.exports.add_with_description(
                name.clone(),
                format!("{} point {seq} disk {d} (read-only)", req.vm),
                Arc::new(view),
            );
            exports.push((d, name));
        }
        exports.sort();
        served.points.insert(
            key,
            Entry {
                record: record.clone(),
                exports,
            },
        );
        drop(served);
        let until = match expires {
            Some(t) => format!(" until {}", rfc3339_from_unix_ns(t)),
            None => " until unserved".to_string(),
        };
        self.events.emit(
            events::POINT_SERVED,
            Some(&req.vm),
            "info",
            &format!(
                "point {seq} served read-only over NBD (disks {:?}){until}",
                record.disks
            ),
        );
        Ok(self.served_point(&rvm, &record))
    }

    /// `points unserve`: one point, or every served point of the VM.
    pub(crate) fn unserve_point(&self, req: &UnservePoint) -> anyhow::Result<Vec<u64>> {
        let mut served = self.served.lock();
        let keys: Vec<(String, u64)> = match req.point {
            Some(seq) => {
                let key = (req.vm.clone(), seq);
                if !served.points.contains_key(&key) {
                    return Err(not_found(format!(
                        "point {seq} of {} is not served on this host",
                        req.vm
                    )));
                }
                vec![key]
            }
            None => served.keys_of(&req.vm),
        };
        if keys.is_empty() {
            return Err(not_found(format!(
                "no point of {} is served on this host",
                req.vm
            )));
        }
        let mut done = Vec::new();
        for key in keys {
            let seq = key.1;
            self.release(&mut served, key, "unserved")?;
            done.push(seq);
        }
        Ok(done)
    }

    /// The served points of `vm` (only pinned ones have exports).
    pub fn served_points(&self, vm: &str) -> anyhow::Result<Vec<ServedPoint>> {
        let rvm = self.replica_vm(vm)?;
        self.ensure_pins(&rvm);
        let served = self.served.lock();
        Ok(served
            .keys_of(vm)
            .iter()
            .filter_map(|k| served.points.get(k))
            .map(|e| self.served_point(&rvm, &e.record))
            .collect())
    }

    fn served_point(&self, rvm: &ReplicaVm, record: &ServedRecord) -> ServedPoint {
        let socket = self.nbd_socket.display().to_string();
        let served: std::collections::BTreeSet<u64> = [record.seq].into();
        let point = point_infos_of(rvm, &served)
            .into_iter()
            .find(|p| p.id == record.seq)
            .unwrap_or_else(|| proto::PointInfo {
                id: record.seq,
                cut_time: String::new(),
                created_at: String::new(),
                cut_time_unix_ns: 0,
                kind: String::new(),
                consistency: String::new(),
                delta_kind: String::new(),
                data_bytes: 0,
                zero_bytes: 0,
                stored_bytes: 0,
                pinned_by: Vec::new(),
            });
        let disks = rvm
            .disks()
            .iter()
            .filter(|d| record.disks.contains(&d.index))
            .map(|d| {
                let export = export_name(&record.vm, record.seq, d.index);
                let nbd_uri = format!("nbd+unix:///{export}?socket={socket}");
                ServedDisk {
                    index: d.index,
                    size_bytes: d.size_bytes,
                    qemu_drive: format!("file={nbd_uri},format=raw,readonly=on,if=virtio"),
                    qemu_blockdev: format!(
                        "driver=nbd,server.type=unix,server.path={socket},export={export},node-name={},read-only=on",
                        node_name(&record.vm, record.seq, d.index)
                    ),
                    nbd_uri,
                    export_name: export,
                }
            })
            .collect();
        ServedPoint {
            vm: record.vm.clone(),
            point,
            disks,
            served_since: rfc3339_from_unix_ns(record.created_unix_ns),
            expires_at: record.expires_unix_ns.map(rfc3339_from_unix_ns),
            expires_unix_ns: record.expires_unix_ns,
        }
    }

    /// Pins and exports again the served points of `rvm` recorded before this daemon run,
    /// once per run. Called before anything can fold `rvm` (retention, a commit) and when the
    /// store has verified it. A point whose expiry passed, or that no longer exists, is
    /// released with an event.
    ///
    /// Returns false when a point could not be pinned for a transient reason (out of file
    /// descriptors or memory): its pin is kept (never released for that), nothing may fold
    /// `rvm` until a later call succeeds, and the caller retries.
    pub fn ensure_pins(&self, rvm: &ReplicaVm) -> bool {
        let vm = rvm.vm_id().to_string();
        let mut served = self.served.lock();
        if served.pinned_vms.contains(&vm) {
            return true;
        }
        let mut transient = false;
        let now = now_unix_ns();
        for key in served.keys_of(&vm) {
            let Some(record) = served.points.get(&key).map(|e| e.record.clone()) else {
                continue;
            };
            if record.expires_unix_ns.is_some_and(|t| t <= now) {
                if let Err(e) = self.release(
                    &mut served,
                    key,
                    "its --for time ended while the daemon was down",
                ) {
                    tracing::error!(%vm, seq = record.seq, "releasing a served point: {e:#}");
                }
                continue;
            }
            let mut views = Vec::new();
            let mut failed = None;
            for &d in &record.disks {
                match rvm.view(proto::Seq(record.seq), d) {
                    Ok(v) => views.push((d, v)),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                drop(views);
                if e.is_transient() {
                    tracing::warn!(%vm, seq = record.seq, "served point not pinned yet ({e}); retrying later");
                    transient = true;
                    continue;
                }
                let why = format!("it can no longer be read after the restart ({e})");
                if let Err(e) = self.release(&mut served, key, &why) {
                    tracing::error!(%vm, seq = record.seq, "releasing a served point: {e:#}");
                }
                continue;
            }
            let mut exports = Vec::new();
            for (d, view) in views {
                let name = export_name(&vm, record.seq, d);
                self.exports.add_with_description(
                    name.clone(),
                    format!("{vm} point {} disk {d} (read-only)", record.seq),
                    Arc::new(view),
                );
                exports.push((d, name));
            }
            tracing::info!(%vm, seq = record.seq, "served point pinned and exported again");
            if let Some(e) = served.points.get_mut(&key) {
                e.exports = exports;
            }
        }
        if transient {
            return false;
        }
        served.pinned_vms.insert(vm);
        drop(served);
        // Failovers over this VM's points are pinned by their overlays' views.
        self.reopen_failovers(rvm);
        true
    }

    /// Forgets a served point: the catalog first, then its exports (and every connection
    /// reading them, which drops the pin), then an event with `why`.
    fn release(&self, served: &mut Served, key: (String, u64), why: &str) -> anyhow::Result<()> {
        self.catalog
            .delete(&ServedRecord::key(&key.0, key.1))
            .context("forgetting the served point")?;
        let Some(entry) = served.points.remove(&key) else {
            return Ok(());
        };
        for (_, name) in &entry.exports {
            self.exports.remove(name);
            if let Some(server) = self.nbd.lock().as_ref() {
                server.close_export_connections(name);
            }
        }
        self.events.emit(
            events::POINT_UNSERVED,
            Some(&key.0),
            "info",
            &format!("point {} no longer served (pin released): {why}", key.1),
        );
        Ok(())
    }

    /// Releases every served point whose `--for` time has ended.
    fn expire_served(&self) {
        let now = now_unix_ns();
        let mut served = self.served.lock();
        let due: Vec<(String, u64)> = served
            .points
            .iter()
            .filter(|(_, e)| e.record.expires_unix_ns.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let (vm, seq) = key.clone();
            if let Err(e) = self.release(&mut served, key, "its --for time ended") {
                tracing::error!(%vm, seq, "releasing an expired served point: {e:#}");
            }
        }
    }
}

/// Releases served points when their `--for` time ends ([`EXPIRY_CHECK_INTERVAL`]).
pub(super) async fn watch_expiries(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(EXPIRY_CHECK_INTERVAL).await;
        let Some(s) = shared.upgrade() else { return };
        s.expire_served();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_never_collide_with_primary_exports() {
        assert_eq!(export_name("web", 12, 0), "web@12-0");
        // A primary VM's export is `<vm>-<disk>` and VM names have no '@'.
        assert!(crate::vms::validate_vm_name("web@12").is_err());
    }

    #[test]
    fn node_names_fit_qemu() {
        let n = node_name(&"v".repeat(64), 123_456, 15);
        assert_eq!(n.len(), QEMU_NODE_NAME_MAX);
        assert!(n.starts_with("point123456-15-"));
        assert_eq!(node_name("db", 3, 1), "point3-1-db");
    }

    #[test]
    fn for_is_bounded() {
        let req = |for_secs| ServePoint {
            vm: "v".into(),
            point: "latest".into(),
            disk: None,
            for_secs,
        };
        assert_eq!(expiry_of(&req(None), 5).unwrap(), None);
        assert_eq!(expiry_of(&req(Some(2)), 5).unwrap(), Some(2_000_000_005));
        assert!(expiry_of(&req(Some(0)), 5).is_err());
        assert!(expiry_of(&req(Some(SERVE_FOR_MAX_SECS + 1)), 5).is_err());
    }

    #[test]
    fn a_served_record_of_an_unknown_version_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let mut r = ServedRecord {
            version: ServedRecord::VERSION,
            vm: "web".into(),
            seq: 4,
            disks: vec![0],
            created_unix_ns: 1,
            expires_unix_ns: None,
        };
        catalog.put(&ServedRecord::key("web", 4), &r).unwrap();
        let served = Served::load(&catalog).unwrap();
        assert_eq!(served.keys_of("web"), vec![("web".to_string(), 4)]);
        assert!(served.keys_of("we").is_empty());
        r.version = 2;
        catalog.put(&ServedRecord::key("web", 4), &r).unwrap();
        let err = Served::load(&catalog).err().unwrap().to_string();
        assert!(err.contains("version 2"), "{err}");
    }
}
