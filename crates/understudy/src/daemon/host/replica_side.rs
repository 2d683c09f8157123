//! The replica-server side of [`Shared`]: its settings, the replica store, and what the API
//! shows of replica VMs (status, points, exports). The peer routes that receive deltas are in
//! `daemon/replica_host.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use proto::time::rfc3339_from_unix_ns;
use proto::{
    Compression, ExportPoint, Health, PointInfo, ReplicaServerConfig, ReplicationState,
    ReplicationStatus,
};
use replica::ReplicaStore;

use super::{ReplicaHost, Shared, REPLICA_CFG_KEY};
use crate::daemon::api::{bad_request, not_found};
use crate::daemon::catalog::ReplicaOwner;
use crate::daemon::events;

impl Shared {
    pub fn replica_config(&self) -> Option<ReplicaServerConfig> {
        self.replica.lock().as_ref().map(|h| h.cfg.clone())
    }

    pub fn replica_store(&self) -> Option<(Arc<ReplicaStore>, ReplicaServerConfig)> {
        self.replica
            .lock()
            .as_ref()
            .filter(|h| h.cfg.enabled)
            .map(|h| (h.store.clone(), h.cfg.clone()))
    }

    pub(super) fn open_replica_store(&self, cfg: ReplicaServerConfig) -> anyhow::Result<()> {
        let dir = PathBuf::from(&cfg.storage);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating replica storage {}", dir.display()))?;
        let store = ReplicaStore::open(&dir)
            .with_context(|| format!("opening replica storage {}", dir.display()))?;
        for rvm in store.vms() {
            if let Some(d) = rvm.damage() {
                self.events.emit(
                    events::RESYNC_REQUIRED,
                    Some(rvm.vm_id()),
                    "error",
                    &format!("replica copy damaged: {d}"),
                );
            }
        }
        *self.replica.lock() = Some(ReplicaHost {
            cfg,
            store: Arc::new(store),
        });
        Ok(())
    }

    pub fn enable_replica_server(
        &self,
        cfg: ReplicaServerConfig,
    ) -> anyhow::Result<ReplicaServerConfig> {
        if !Path::new(&cfg.storage).is_absolute() {
            return Err(bad_request(format!(
                "storage {} must be an absolute path",
                cfg.storage
            )));
        }
        let mut cfg = cfg;
        cfg.enabled = true;
        let same_storage = self
            .replica
            .lock()
            .as_ref()
            .is_some_and(|h| h.cfg.storage == cfg.storage);
        if same_storage {
            if let Some(h) = self.replica.lock().as_mut() {
                h.cfg = cfg.clone();
            }
        } else {
            self.open_replica_store(cfg.clone())?;
        }
        self.catalog.put(REPLICA_CFG_KEY, &cfg)?;
        Ok(cfg)
    }

    pub fn disable_replica_server(&self) -> anyhow::Result<ReplicaServerConfig> {
        let mut guard = self.replica.lock();
        let h = guard
            .as_mut()
            .ok_or_else(|| bad_request("this host is not a replica server"))?;
        h.cfg.enabled = false;
        let cfg = h.cfg.clone();
        drop(guard);
        self.catalog.put(REPLICA_CFG_KEY, &cfg)?;
        Ok(cfg)
    }

    /// The primary identity bound to replica VM `vm` (see `catalog::ReplicaOwner`).
    pub fn replica_owner(&self, vm: &str) -> anyhow::Result<Option<ReplicaOwner>> {
        self.catalog.get(&replica_owner_key(vm))
    }

    /// Binds replica VM `vm` to the primary identity that created it.
    pub fn set_replica_owner(&self, vm: &str, owner: &ReplicaOwner) -> anyhow::Result<()> {
        self.catalog.put(&replica_owner_key(vm), owner)
    }

    pub fn note_replica_primary(&self, vm: &str, primary: &str) {
        self.replica_primaries
            .lock()
            .insert(vm.to_string(), primary.to_string());
    }

    pub(super) fn replica_vm(&self, name: &str) -> anyhow::Result<Arc<replica::ReplicaVm>> {
        let guard = self.replica.lock();
        let h = guard.as_ref().ok_or_else(|| {
            not_found(format!(
                "this host is not a replica server, so it has no points of {name}"
            ))
        })?;
        h.store
            .vm(name)
            .ok_or_else(|| not_found(format!("no replica of {name} on this host")))
    }

    pub(super) fn replica_status(&self, name: &str) -> Option<ReplicationStatus> {
        let rvm = self.replica_vm(name).ok()?;
        let points = rvm.points();
        let last = points.last();
        let damage = rvm.damage();
        Some(ReplicationStatus {
            vm: name.to_string(),
            role: "Replica".into(),
            state: if damage.is_some() {
                ReplicationState::ResynchronizationRequired
            } else {
                ReplicationState::Replica
            },
            health: if damage.is_some() {
                Health::Critical
            } else {
                Health::Normal
            },
            health_reasons: damage
                .iter()
                .map(|d| format!("replica copy damaged: {d}"))
                .collect(),
            resync_reason: damage,
            peer: self
                .replica_primaries
                .lock()
                .get(name)
                .cloned()
                .unwrap_or_default(),
            frequency_secs: 0,
            compression: Compression::None,
            disks: rvm.disks().iter().map(|d| d.index).collect(),
            last_replication_time: last.map(|p| rfc3339_from_unix_ns(p.cut_time_unix_ns)),
            last_replication_unix_ns: last.map(|p| p.cut_time_unix_ns),
            pending_bytes: 0,
            last_seq: rvm.latest_seq(),
            generation: rvm.generation(),
            progress: None,
            last_error: None,
        })
    }

    pub fn points(&self, name: &str) -> anyhow::Result<Vec<PointInfo>> {
        let rvm = self.replica_vm(name)?;
        Ok(rvm.points().iter().map(point_info).collect())
    }

    pub fn export_point(&self, req: &ExportPoint) -> anyhow::Result<PointInfo> {
        let rvm = self.replica_vm(&req.vm)?;
        let points = rvm.points();
        let point = if req.point == "latest" {
            points
                .last()
                .ok_or_else(|| not_found(format!("{} has no recovery point yet", req.vm)))?
        } else {
            let id: u64 = req.point.parse().map_err(|_| {
                bad_request(format!(
                    "--point must be `latest` or a point id, got {:?}",
                    req.point
                ))
            })?;
            points
                .iter()
                .find(|p| p.seq == id)
                .ok_or_else(|| not_found(format!("{} has no point {id}", req.vm)))?
        };
        if !rvm.disks().iter().any(|d| d.index == req.disk) {
            return Err(bad_request(format!(
                "{} replicates no disk {}",
                req.vm, req.disk
            )));
        }
        rvm.export_raw(point.seq, req.disk, Path::new(&req.to))
            .with_context(|| {
                format!("exporting {} point {} disk {}", req.vm, point.seq, req.disk)
            })?;
        Ok(point_info(point))
    }
}

fn replica_owner_key(vm: &str) -> String {
    format!("replica-owner/{vm}")
}

fn point_info(p: &replica::PointInfo) -> PointInfo {
    PointInfo {
        id: p.seq,
        created_at: rfc3339_from_unix_ns(p.cut_time_unix_ns),
        cut_time_unix_ns: p.cut_time_unix_ns,
        kind: format!("{:?}", p.kind),
        data_bytes: p.data_bytes,
        zero_bytes: p.zero_bytes,
        stored_bytes: p.stored_bytes,
    }
}
