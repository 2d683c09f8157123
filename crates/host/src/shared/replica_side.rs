//! The replica-server side of [`Shared`]: its settings, the replica store, and what the API
//! shows of replica VMs (status, points, exports). The peer routes that receive deltas are in
//! `replica_host.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use proto::time::rfc3339_from_unix_ns;
use proto::{
    Compression, ExportPoint, Health, PointInfo, ReplicaServerConfig, ReplicationState,
    ReplicationStatus,
};
use replica::{ReplicaError, ReplicaStore};

use super::{ReplicaHost, Shared, REPLICA_CFG_KEY};
use crate::catalog::ReplicaOwner;
use crate::error::{bad_request, not_found, transient};
use crate::events;

/// The replica store as the daemon holds it.
pub(super) enum StoreSlot {
    /// Being opened in the background (the NBD server and the primary VMs do not wait).
    Opening,
    /// Open; its VMs may still be pending verification (`ReplicaStore::pending`).
    Open(Arc<ReplicaStore>),
    /// Cannot be opened, and why; retried with every retention pass.
    Unavailable(String),
}

/// Opens the storage directory of `cfg` without reading any journal (cheap). Blocking. Never
/// creates anything: a missing directory or marker is refused (a storage mount that is
/// missing), and so is the marker of another store. A store from before markers (settings
/// without `store_id`, a directory that holds replica VMs) is adopted: returns its new id.
fn open_store(
    cfg: &ReplicaServerConfig,
    host: &str,
) -> anyhow::Result<(ReplicaStore, Option<String>)> {
    let dir = PathBuf::from(&cfg.storage);
    let opened = match ReplicaStore::open_deferred(&dir) {
        Err(ReplicaError::NoStoreMarker { .. })
            if cfg.store_id.is_none() && ReplicaStore::holds_replica_vms(&dir) =>
        {
            let marker = ReplicaStore::init_storage(&dir, host)
                .with_context(|| format!("adopting replica storage {}", dir.display()))?;
            tracing::info!(storage = %dir.display(), store_id = %marker.store_id, "adopted a replica store from before store markers");
            ReplicaStore::open_deferred(&dir).map(|s| (s, Some(marker.store_id)))
        }
        other => other.map(|s| (s, None)),
    };
    let (store, adopted) =
        opened.with_context(|| format!("opening replica storage {}", dir.display()))?;
    if let Some(want) = &cfg.store_id {
        let found = &store.marker().store_id;
        if found != want {
            bail!(
                "replica storage {} holds another replica store (id {found}, set up by {:?}) than the one this host set up (id {want}); run `replica-server enable --storage {}` to use it",
                dir.display(),
                store.marker().host,
                dir.display()
            );
        }
    }
    Ok((store, adopted))
}

impl Shared {
    /// The replica-server settings, with what the store's state is now.
    pub fn replica_config(&self) -> Option<ReplicaServerConfig> {
        self.replica.lock().as_ref().map(|h| {
            let mut cfg = h.cfg.clone();
            cfg.status = Some(match &h.store {
                StoreSlot::Opening => "opening".to_string(),
                StoreSlot::Open(store) => match store.pending().len() {
                    0 => "open".to_string(),
                    n => format!("open, verifying {n} replica VMs"),
                },
                StoreSlot::Unavailable(why) => format!("unavailable: {why}"),
            });
            cfg
        })
    }

    pub fn replica_store(&self) -> Option<(Arc<ReplicaStore>, ReplicaServerConfig)> {
        let guard = self.replica.lock();
        let h = guard.as_ref().filter(|h| h.cfg.enabled)?;
        match &h.store {
            StoreSlot::Open(store) => Some((store.clone(), h.cfg.clone())),
            _ => None,
        }
    }

    /// Why an enabled replica server has no store now (being opened, or cannot be).
    pub fn replica_store_problem(&self) -> Option<String> {
        let guard = self.replica.lock();
        let h = guard.as_ref().filter(|h| h.cfg.enabled)?;
        match &h.store {
            StoreSlot::Opening => Some(format!(
                "the replica store {} is being opened; try again shortly",
                h.cfg.storage
            )),
            StoreSlot::Open(_) => None,
            StoreSlot::Unavailable(why) => Some(why.clone()),
        }
    }

    /// At daemon start: opens the replica store in the background (listing, then verifying
    /// every VM's journal). Until then peer calls are answered "try again"; a store that
    /// cannot be opened is logged and reported, and the primary VMs are not affected.
    pub(super) fn start_replica_store(self: &Arc<Self>, cfg: ReplicaServerConfig) {
        if !cfg.enabled {
            return;
        }
        let storage = cfg.storage.clone();
        *self.replica.lock() = Some(ReplicaHost {
            cfg,
            store: StoreSlot::Opening,
        });
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.open_store_in_background(&storage, None));
    }

    /// With every retention pass: tries again to open a store that was unavailable (a storage
    /// mount that came back).
    pub fn retry_replica_store(self: &Arc<Self>) {
        let (storage, previous) = {
            let mut guard = self.replica.lock();
            let Some(h) = guard.as_mut().filter(|h| h.cfg.enabled) else {
                return;
            };
            let StoreSlot::Unavailable(why) = &h.store else {
                return;
            };
            let previous = why.clone();
            h.store = StoreSlot::Opening;
            (h.cfg.storage.clone(), previous)
        };
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.open_store_in_background(&storage, Some(previous)));
    }

    /// Opens the store at `storage`, publishes it, then verifies its VMs one by one (each is
    /// served as soon as it is verified). Blocking. A failure is logged and an event emitted
    /// unless it is the `previous` attempt's failure again (retries do not flood the log).
    fn open_store_in_background(&self, storage: &str, previous: Option<String>) {
        let Some(cfg) = self.replica_config().filter(|c| c.storage == storage) else {
            return;
        };
        let store = match open_store(&cfg, &self.host_name) {
            Ok((store, adopted)) => {
                if let Some(id) = adopted {
                    self.record_store_id(storage, id);
                }
                Arc::new(store)
            }
            Err(e) => {
                let why = format!("{e:#}");
                if previous.as_deref() == Some(why.as_str()) {
                    tracing::debug!("replica store still unavailable: {why}");
                } else {
                    tracing::error!(
                        "replica store unavailable (the primary VMs keep serving): {why}"
                    );
                    self.events.emit(
                        events::REPLICA_STORE_UNAVAILABLE,
                        None,
                        "error",
                        &format!("replica store unavailable: {why}"),
                    );
                }
                self.set_store_slot(storage, StoreSlot::Unavailable(why));
                return;
            }
        };
        if !self.set_store_slot(storage, StoreSlot::Open(store.clone())) {
            return;
        }
        let pending = store.open_pending();
        for rvm in store.vms() {
            // False: retried by retention and by the next commit, which wait for it.
            let _ = self.ensure_pins(&rvm);
        }
        self.report_replica_store(&store);
        tracing::info!(
            vms = store.vms().len(),
            broken = store.broken().len(),
            pending,
            "replica store verified"
        );
    }

    /// Records the marker id of an adopted store in the replica-server settings.
    fn record_store_id(&self, storage: &str, id: String) {
        let cfg = {
            let mut guard = self.replica.lock();
            let Some(h) = guard.as_mut().filter(|h| h.cfg.storage == storage) else {
                return;
            };
            h.cfg.store_id = Some(id);
            h.cfg.clone()
        };
        if let Err(e) = self.catalog.put(REPLICA_CFG_KEY, &cfg) {
            tracing::error!("recording the replica store id: {e:#}");
        }
    }

    /// Sets the store of the replica server if its storage is still `storage` (an `enable`
    /// may have changed it meanwhile). Returns whether it did.
    fn set_store_slot(&self, storage: &str, slot: StoreSlot) -> bool {
        let mut guard = self.replica.lock();
        match guard.as_mut() {
            Some(h) if h.cfg.storage == storage => {
                h.store = slot;
                true
            }
            _ => false,
        }
    }

    /// What opening the store found: damaged and unopenable VMs (events), and VMs whose
    /// copy is older than what their relationship recorded as committed. A damaged or older
    /// copy requires a resynchronization at once (the core records it and logs event 2004
    /// naming the condition), not only at the primary's next hello.
    fn report_replica_store(&self, store: &ReplicaStore) {
        use relationship::condition::{DAMAGED, RESTORED_OLDER};
        for rvm in store.vms() {
            let vm = rvm.vm_id();
            let reason = if let Some(d) = rvm.damage() {
                format!("the replica's copy is {DAMAGED}: {d}")
            } else {
                // Checked before any hello: a hello records the store's newest point as the
                // relationship's progress. A commit records its point only after the store
                // made it durable, so the record is never ahead of an intact store.
                let Some(rel) = self.replica_relationship(vm) else {
                    continue;
                };
                if rel.progress.generation != rvm.generation()
                    || !rel.state.accepts_deltas()
                    || rvm.latest_seq() >= rel.progress.last_seq
                {
                    continue;
                }
                format!(
                    "the replica has point {} but had committed point {}: {RESTORED_OLDER}",
                    rvm.latest_seq(),
                    rel.progress.last_seq
                )
            };
            let event = relationship::Event::Diverged {
                reason: reason.clone(),
            };
            if let Err(e) = self.replica_event(vm, rvm.generation(), event) {
                tracing::error!(vm = %vm, "recording that the replica needs resynchronization: {e:#}");
                self.events.emit(
                    events::RESYNC_REQUIRED,
                    Some(vm),
                    "error",
                    &format!(
                        "resynchronization required ({}): {reason}",
                        relationship::condition::label(&reason)
                    ),
                );
            }
        }
        for (vm, why) in store.broken() {
            self.events.emit(
                events::RESYNC_REQUIRED,
                Some(&vm),
                "error",
                &format!("replica copy cannot be opened: {why}"),
            );
        }
    }

    pub(crate) fn enable_replica_server(
        &self,
        cfg: ReplicaServerConfig,
    ) -> anyhow::Result<ReplicaServerConfig> {
        if !Path::new(&cfg.storage).is_absolute() {
            return Err(bad_request(format!(
                "storage {} must be an absolute path",
                cfg.storage
            )));
        }
        if let Some(secs) = cfg.monitoring_interval_secs {
            use crate::health::{MONITORING_INTERVAL_MAX_SECS, MONITORING_INTERVAL_MIN_SECS};
            if !(MONITORING_INTERVAL_MIN_SECS..=MONITORING_INTERVAL_MAX_SECS).contains(&secs) {
                return Err(bad_request(format!(
                    "monitoring interval {} is out of range: 1h to 7d",
                    crate::health::interval_words(secs)
                )));
            }
        }
        let mut cfg = cfg;
        cfg.enabled = true;
        cfg.status = None;
        let reuse = self.replica.lock().as_ref().and_then(|h| {
            let open = h.cfg.storage == cfg.storage && matches!(h.store, StoreSlot::Open(_));
            open.then(|| h.cfg.store_id.clone())
        });
        if let Some(store_id) = reuse {
            cfg.store_id = store_id;
            if let Some(h) = self.replica.lock().as_mut() {
                h.cfg = cfg.clone();
            }
        } else {
            // In the foreground: whoever enables learns at once what is wrong with the storage.
            // This is the one place a store is set up (directory and marker created).
            let dir = PathBuf::from(&cfg.storage);
            let marker = ReplicaStore::init_storage(&dir, &self.host_name).map_err(|e| {
                // A directory the daemon cannot use is the admin's to fix (400).
                let user = matches!(&e, ReplicaError::Io { source, .. } if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::PermissionDenied
                        | std::io::ErrorKind::ReadOnlyFilesystem
                        | std::io::ErrorKind::NotADirectory
                        | std::io::ErrorKind::StorageFull
                        | std::io::ErrorKind::AlreadyExists
                ));
                let e = anyhow::Error::from(e)
                    .context(format!("setting up replica storage {}", dir.display()));
                if user {
                    bad_request(crate::errfmt::one_line(&e))
                } else {
                    e
                }
            })?;
            cfg.store_id = Some(marker.store_id);
            let (store, _) = open_store(&cfg, &self.host_name)?;
            let store = Arc::new(store);
            store.open_pending();
            for rvm in store.vms() {
                let _ = self.ensure_pins(&rvm);
            }
            self.report_replica_store(&store);
            *self.replica.lock() = Some(ReplicaHost {
                cfg: cfg.clone(),
                store: StoreSlot::Open(store),
            });
        }
        self.catalog.put(REPLICA_CFG_KEY, &cfg)?;
        Ok(cfg)
    }

    pub(crate) fn disable_replica_server(&self) -> anyhow::Result<ReplicaServerConfig> {
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

    /// Feeds a fact about replica VM `vm` to its relationship (role `Replica`; created at the
    /// first hello), persists what changed and logs what the core reports (blocking: a catalog
    /// commit). A VM this host replicates from here is refused: one relationship per VM.
    pub fn replica_event(
        &self,
        vm: &proto::VmName,
        generation: proto::Generation,
        event: relationship::Event,
    ) -> anyhow::Result<()> {
        self.replica_event_with(vm, generation, event, |_| Ok(()))
    }

    /// [`Shared::replica_event`] with the actions that concern this host beyond persisting and
    /// logging (serving or dropping a failover) run by `act`, in the core's order; the new
    /// relationship is installed only if every action succeeded. A refusal changes nothing.
    pub(crate) fn replica_event_with(
        &self,
        vm: &proto::VmName,
        generation: proto::Generation,
        event: relationship::Event,
        mut act: impl FnMut(relationship::Action) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        use relationship::{Action, Relationship, Role};
        // One replica event at a time (step, persist, install in order); the relationships
        // map itself is locked only to read and to install, never across the catalog's sync,
        // so status reads and the primary side never wait for a replica's commit.
        let _in_order = self.replica_events.lock();
        let current = match self.relationships.lock().get(vm.as_str()) {
            Some(super::Relation::Primary(_)) => {
                return Err(crate::error::conflict(format!(
                    "{vm} is replicated from this host; it cannot also be a replica here"
                )))
            }
            Some(super::Relation::Replica(r)) | Some(super::Relation::FailedOver(r)) => r.clone(),
            None => Relationship::new(vm.clone(), Role::Replica, generation),
        };
        let (next, actions) = relationship::step(&current, event, proto::time::now_unix_ns())
            .map_err(|r| match r.kind {
                relationship::RefusalKind::Conflict => crate::error::conflict(r.message),
                relationship::RefusalKind::Invalid => crate::error::bad_request(r.message),
            })?;
        for action in actions {
            match action {
                Action::Persist => {
                    self.save_relationship(vm, &crate::catalog::RelationshipDoc::new(&next, None))?
                }
                // The replica's own finding that it cannot follow is an event here too; the
                // other transitions are the primary's to report.
                Action::Emit {
                    kind: relationship::EventKind::ResyncRequired,
                    message,
                } => {
                    tracing::error!(vm = %vm, "{message}");
                    self.events
                        .emit(events::RESYNC_REQUIRED, Some(vm), "error", &message);
                }
                Action::Emit { kind, message } => {
                    tracing::info!(vm = %vm, ?kind, "{message}");
                }
                other => act(other)?,
            }
        }
        let installed = if next.role == Role::Replica {
            super::Relation::Replica(next)
        } else {
            // A completed failover: this host runs the VM now.
            super::Relation::FailedOver(next)
        };
        self.relationships.lock().insert(vm.to_string(), installed);
        Ok(())
    }

    /// The primary of replica VM `name`: its host name from its last hello, else (after a
    /// restart, before its next hello) the identity the VM is bound to, in the catalog.
    fn primary_name_of(&self, name: &str) -> String {
        self.replica_primaries
            .lock()
            .get(name)
            .cloned()
            .or_else(|| self.replica_owner(name).ok().flatten().map(|o| o.peer_name))
            .unwrap_or_default()
    }

    /// Why replica VM `vm` takes no hello and no delta now (a failover to one of its points is
    /// in progress or complete), if so.
    pub fn replica_refuses(&self, vm: &str) -> Option<String> {
        let rel = match self.relationships.lock().get(vm) {
            Some(super::Relation::Replica(r)) | Some(super::Relation::FailedOver(r)) => r.clone(),
            _ => return None,
        };
        (!rel.state.accepts_deltas()).then(|| {
            format!(
                "{vm} is {:?} on its replica host: it receives nothing from this primary (a failover there is stopped with `understudy failover stop {vm}` on that host)",
                rel.state.name()
            )
        })
    }

    /// Why a hello of generation `generation` for `vm` is from a primary this host replaced:
    /// the VM runs here as the primary of a newer generation (failed over, then reversed).
    pub fn failed_over_here(&self, vm: &str, generation: proto::Generation) -> Option<String> {
        let rel = match self.relationships.lock().get(vm) {
            Some(super::Relation::Primary(r)) => r.relationship(),
            _ => return None,
        };
        (rel.progress.generation > generation).then(|| {
            format!(
                "{vm} was failed over to {} and runs there as the primary of generation {} (this hello is of generation {generation}); make the old primary its replica with `understudy replication reverse {vm} --replica HOST:PORT` on {}",
                self.host_name, rel.progress.generation, self.host_name
            )
        })
    }

    /// The replica role's relationship of `vm`, if one is recorded.
    pub(super) fn replica_relationship(&self, vm: &str) -> Option<relationship::Relationship> {
        match self.relationships.lock().get(vm) {
            Some(super::Relation::Replica(r)) => Some(r.clone()),
            _ => None,
        }
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
        let store = match &h.store {
            StoreSlot::Open(store) => store,
            StoreSlot::Opening => {
                return Err(transient(format!(
                    "the replica store {} is being opened; try again shortly",
                    h.cfg.storage
                )))
            }
            StoreSlot::Unavailable(why) => {
                return Err(transient(format!(
                    "the replica store is unavailable: {why}"
                )))
            }
        };
        let Ok(vm_name) = proto::VmName::parse(name) else {
            return Err(not_found(format!("no replica of {name:?} on this host")));
        };
        if store.is_pending(&vm_name) {
            return Err(transient(format!(
                "the replica of {name} is being verified after the daemon started; try again shortly"
            )));
        }
        store
            .vm(&vm_name)
            .ok_or_else(|| not_found(format!("no replica of {name} on this host")))
    }

    /// Names of the replica VMs this host lists: open ones, and pending ones (being verified).
    pub(super) fn replica_vm_names(&self) -> Vec<String> {
        match self.replica.lock().as_ref().map(|h| &h.store) {
            Some(StoreSlot::Open(store)) => store
                .vms()
                .iter()
                .map(|v| v.vm_id().to_string())
                .chain(
                    store
                        .pending()
                        .into_iter()
                        .map(|(name, _)| name.to_string()),
                )
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Status of a replica VM whose journal is still being verified after a start.
    fn pending_replica_status(&self, name: &str) -> Option<ReplicationStatus> {
        let (_, why) = match self.replica.lock().as_ref().map(|h| &h.store) {
            Some(StoreSlot::Open(store)) => store.pending().into_iter().find(|(n, _)| n == name),
            _ => None,
        }?;
        let mut reasons = vec![proto::HealthReason::new(
            "replica_opening",
            "opening: verifying the replica's journal after a start",
        )];
        reasons.extend(why.map(|w| {
            proto::HealthReason::new(
                "replica_opening",
                format!("last attempt failed (will retry): {w}"),
            )
        }));
        Some(ReplicationStatus {
            vm: name.to_string(),
            role: "Replica".into(),
            state: self
                .replica_relationship(name)
                .map_or(ReplicationState::Replicating, |r| r.state.name()),
            health: Health::Warning,
            health_reasons: reasons,
            resync_reason: None,
            resync_condition: None,
            resync_condition_hyperv: None,
            peer: self.primary_name_of(name),
            frequency_secs: 0,
            compression: Compression::None,
            disks: Vec::new(),
            last_replication_time: None,
            last_replication_unix_ns: None,
            pending_bytes: 0,
            last_seq: 0,
            generation: 0,
            progress: None,
            last_error: None,
            history: None,
            replica: None,
            auto_resynchronize: false,
            resynchronize_window: None,
            lag_warning_cycles: None,
            resync_start_time: None,
            resync: None,
        })
    }

    pub(super) fn replica_status(&self, name: &str) -> Option<ReplicationStatus> {
        if let Some(st) = self.pending_replica_status(name) {
            return Some(st);
        }
        let rvm = self.replica_vm(name).ok()?;
        let points = rvm.points();
        let last = points.last();
        let damage = rvm.damage();
        // The relationship as this replica knows it (the state its primary reported, what it
        // committed); a replica from before relationship records: what it holds says.
        let rel = self.replica_relationship(name).unwrap_or_else(|| {
            let mut r = relationship::Relationship::new(
                rvm.vm_id().clone(),
                relationship::Role::Replica,
                rvm.generation(),
            );
            r.state = if points.is_empty() {
                relationship::State::InitialReplicationInProgress
            } else {
                relationship::State::Replicating
            };
            r
        });
        let mut state = rel.state.name();
        let mut resync_reason = match &rel.state {
            relationship::State::ResynchronizationRequired { reason } => Some(reason.clone()),
            _ => None,
        };
        // The replica's own finding outranks what the primary said last.
        if let Some(d) = &damage {
            state = ReplicationState::ResynchronizationRequired;
            resync_reason = Some(format!(
                "replica copy {}: {d}",
                relationship::condition::DAMAGED
            ));
        }
        let resync_condition = resync_reason
            .as_deref()
            .map(relationship::condition::classify);
        let (mut health, mut health_reasons) = relationship::health(
            &rel,
            &relationship::HealthFacts {
                // The primary's frequency is not known here: no lag rule on this side.
                frequency_secs: u32::MAX,
                ..Default::default()
            },
            proto::time::now_unix_ns(),
        );
        if let Some(why) = &resync_reason {
            if damage.is_some() {
                health = Health::Critical;
                // One reason per rule: the recorded state's (after a hello it is this same
                // damage, worded by the hello) gives way to the replica's own finding, as
                // `resync_reason` does.
                health_reasons.retain(|r| r.kind != "resync_required");
                health_reasons.push(proto::HealthReason::new(
                    "resync_required",
                    format!(
                        "resynchronization required ({}): {why}",
                        relationship::condition::label(why)
                    ),
                ));
            }
        }
        Some(ReplicationStatus {
            vm: name.to_string(),
            role: "Replica".into(),
            state,
            health,
            health_reasons,
            resync_reason,
            resync_condition,
            resync_condition_hyperv: resync_condition.map(|c| c.hyperv_condition().to_string()),
            peer: self.primary_name_of(name),
            frequency_secs: 0,
            compression: Compression::None,
            disks: rvm.disks().iter().map(|d| d.index).collect(),
            last_replication_time: last.map(|p| rfc3339_from_unix_ns(p.cut_time_unix_ns)),
            last_replication_unix_ns: last.map(|p| p.cut_time_unix_ns),
            pending_bytes: 0,
            last_seq: rvm.latest_seq().get(),
            generation: rvm.generation().get(),
            progress: None,
            last_error: None,
            history: rvm
                .history()
                .as_ref()
                .map(crate::shared::history_from_store),
            replica: Some(proto::ReplicaFacts {
                points_kept: points.len() as u64,
                journal_bytes: points.iter().map(|p| p.stored_bytes).sum(),
                newest_point_age_secs: last.map(|p| {
                    proto::time::now_unix_ns().saturating_sub(p.cut_time_unix_ns) / 1_000_000_000
                }),
            }),
            auto_resynchronize: false,
            resynchronize_window: None,
            lag_warning_cycles: None,
            resync_start_time: None,
            resync: None,
        })
    }

    pub fn points(&self, name: &str) -> anyhow::Result<Vec<PointInfo>> {
        let rvm = self.replica_vm(name)?;
        Ok(self.point_infos(&rvm))
    }

    /// The points of `rvm` as `points list` shows them ([`point_infos_of`]).
    pub(super) fn point_infos(&self, rvm: &replica::ReplicaVm) -> Vec<PointInfo> {
        let served = self.served_seqs(rvm.vm_id());
        let backups = self.backup_pins(rvm.vm_id());
        let mut infos = point_infos_of(rvm, &served);
        for p in &mut infos {
            if let Some(&n) = backups.get(&p.id) {
                // The backup's views are among the open views: name them instead.
                p.pinned_by
                    .retain(|b| !b.ends_with("open view") && !b.ends_with("open views"));
                p.pinned_by.push(if n == 1 {
                    "backup".to_string()
                } else {
                    format!("{n} backups")
                });
            }
        }
        infos
    }

    pub fn export_point(&self, req: &ExportPoint) -> anyhow::Result<PointInfo> {
        let rvm = self.replica_vm(&req.vm)?;
        let point = resolve_point(&rvm, &req.vm, &req.point)?;
        if !rvm.disks().iter().any(|d| d.index == req.disk) {
            return Err(bad_request(format!(
                "{} replicates no disk {}",
                req.vm, req.disk
            )));
        }
        let tracker = self.progress.track(req.progress_id.as_deref());
        rvm.export_raw_reporting(point.seq, req.disk, Path::new(&req.to), &|done, total| {
            tracker.set(done, total)
        })
        .map_err(|e| {
            // A destination the daemon cannot create (missing directory, no permission,
            // full file system) is the user's to fix: 400, not an internal error.
            let dest = Path::new(&req.to);
            let user = matches!(&e, ReplicaError::Io { source, path, .. }
                if path.starts_with(dest.parent().unwrap_or(dest)) && matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::IsADirectory
            ));
            let e = anyhow::Error::from(e).context(format!(
                "exporting {} point {} disk {}",
                req.vm, point.seq, req.disk
            ));
            if user {
                bad_request(crate::errfmt::one_line(&e))
            } else {
                e
            }
        })?;
        let seq = point.seq;
        self.point_infos(&rvm)
            .into_iter()
            .find(|p| p.id == seq.get())
            .ok_or_else(|| not_found(format!("{} has no point {seq} any more", req.vm)))
    }
}

/// The point `point` names (`latest` or an id) among the points of `rvm`.
pub(super) fn resolve_point(
    rvm: &replica::ReplicaVm,
    vm: &str,
    point: &str,
) -> anyhow::Result<replica::PointInfo> {
    let points = rvm.points();
    if point == "latest" {
        return points
            .last()
            .copied()
            .ok_or_else(|| not_found(format!("{vm} has no recovery point yet")));
    }
    let id: u64 = point.parse().map_err(|_| {
        bad_request(format!(
            "--point must be `latest` or a point id, got {point:?}"
        ))
    })?;
    points
        .iter()
        .find(|p| p.seq.get() == id)
        .copied()
        .ok_or_else(|| not_found(format!("{vm} has no point {id}")))
}

fn replica_owner_key(vm: &str) -> String {
    format!("replica-owner/{vm}")
}

/// `p` as `points list` shows it: its kind by the VM's history policy at the history clock's
/// now, and what holds it (served over NBD by `points serve`, other open views).
pub(super) fn point_infos_of(rvm: &replica::ReplicaVm, served: &BTreeSet<u64>) -> Vec<PointInfo> {
    let pins = rvm.pinned_points();
    rvm.points_with_kinds(proto::time::history_now_ns())
        .into_iter()
        .map(|(p, kind)| {
            let mut pinned_by = Vec::new();
            if served.contains(&p.seq.get()) {
                pinned_by.push("points serve".to_string());
            }
            if pins.contains_key(&p.seq) && pinned_by.is_empty() {
                let n = pins[&p.seq];
                pinned_by.push(if n == 1 {
                    "1 open view".to_string()
                } else {
                    format!("{n} open views")
                });
            }
            PointInfo {
                id: p.seq.get(),
                cut_time: rfc3339_from_unix_ns(p.cut_time_unix_ns),
                created_at: rfc3339_from_unix_ns(p.cut_time_unix_ns),
                cut_time_unix_ns: p.cut_time_unix_ns,
                kind: kind.as_str().into(),
                // The delta header's flag, whatever the point's kind (Latest too).
                consistency: if p.app_consistent {
                    "application".into()
                } else {
                    "crash".into()
                },
                delta_kind: format!("{:?}", p.kind),
                data_bytes: p.data_bytes,
                zero_bytes: p.zero_bytes,
                stored_bytes: p.stored_bytes,
                pinned_by,
            }
        })
        .collect()
}
