//! [`Shared`]: the single owner of this host's state (catalog, VMs, replication tasks,
//! replica store, peers). API routes and peer routes call its methods; nothing else mutates
//! host state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use parking_lot::Mutex;
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{
    DiskInfo, EnableReplication, HostInfo, ReplicaServerConfig, ReplicationStatus, SetReplication,
    VmInfo,
};
use tracker::OpenState;

use crate::catalog::{Catalog, RelationshipDoc, ReplicationRecord, VmRecord};
use crate::error::{bad_request, conflict, not_found};
use crate::events::{self, Events};
use crate::heartbeat;
use crate::primary::{self, Replication};
use crate::vms::{self, Vm};
use crate::HostConfig;
use relationship::{Event, Relationship, Role};

mod backup;
mod existing;
mod failover;
mod replica_side;
mod reverse;
mod seed;
mod served;

pub use failover::{served_name, FailoverRecord};
pub use reverse::PreparedReverse;

const REPLICA_CFG_KEY: &str = "replica-server";
/// Most cycles `replication set --lag-warning-cycles` takes.
const LAG_WARNING_CYCLES_MAX: u32 = 1000;
/// How often every disk is checked for a storage (write-back) error: the error is also seen at
/// once when status is read or a cycle starts, so this only bounds how late an unwatched VM
/// gets its event; an atomic load per disk.
const STORAGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

struct VmEntry {
    record: VmRecord,
    vm: Arc<Vm>,
}

/// The one replication relationship of a VM on this host, in the role this host plays in it:
/// one record per VM name (`relationship/<vm>` in the catalog), so a VM is never primary and
/// replica here at once, and reversing the direction changes the role of the same record.
pub enum Relation {
    /// This host ships the VM's points: its task holds the relationship.
    Primary(Arc<Replication>),
    /// This host receives them: the relationship as the replica sees it.
    Replica(Relationship),
    /// This host was the replica and a failover completed here: it runs the VM (a primary
    /// VM of this host now), with nothing replicating it until `replication reverse`.
    FailedOver(Relationship),
}

/// A primary relationship read from the catalog: its settings and the core's relationship.
type PrimaryRelation = (ReplicationRecord, Relationship);

/// A VM name reserved while its VM is created or imported (`Shared::ensure_new`).
struct NameReservation<'a> {
    shared: &'a Shared,
    name: String,
}

impl Drop for NameReservation<'_> {
    fn drop(&mut self) {
        self.shared.creating.lock().remove(&self.name);
    }
}

/// A VM that could not be opened at start: reported with the reason, never served, and never
/// in the way of the others.
struct BrokenVm {
    record: VmRecord,
    reason: String,
    /// Its relationship as recorded (shown by `replication status`, never run).
    relationship: Option<PrimaryRelation>,
}

/// NBD `reconnect-delay` (seconds) in the qemu and libvirt attachments `vm show` prints: how
/// long a guest's requests wait for the daemon to come back after a crash or an upgrade before
/// they fail. The daemon serves the NBD socket first thing at start, well within it.
pub const NBD_RECONNECT_DELAY_SECS: u32 = 30;

/// How long the daemon waits at start for the VMs' disks to open (a clean open takes
/// milliseconds; after a crash, a bitmap scan of a large disk takes seconds). Well inside
/// [`NBD_RECONNECT_DELAY_SECS`]: a VM still opening then is reported broken, the rest serve.
const VM_OPEN_DEADLINE: Duration = Duration::from_secs(15);

/// A `replication enable` whose replica already accepted the VM, waiting for the command
/// owner to commit it.
pub struct PreparedEnable {
    vm: String,
    record: ReplicationRecord,
    rel: Relationship,
}

struct ReplicaHost {
    cfg: ReplicaServerConfig,
    store: replica_side::StoreSlot,
}

pub struct Shared {
    /// Replica side: per VM, the trees of the last 1 MiB passes of a resynchronization's
    /// compare (`resync.md`), newest last, at most `REPLICA_TREE_CACHES`: their refinement
    /// requests read nothing again.
    pub(crate) resync_trees:
        parking_lot::Mutex<HashMap<String, Vec<Arc<crate::resync::TreeCache>>>>,
    pub host_name: String,
    pub data_dir: PathBuf,
    pub listen: String,
    pub nbd_socket: PathBuf,
    /// How VM disks are opened (`serve --cbw-memory`).
    pub disk_options: tracker::DiskOptions,
    /// Admission of replica uploads (per VM, per peer).
    pub uploads: crate::replica_host::UploadLimits,
    /// Progress of long API calls in flight (`points export`), read by `GET /v1/progress/ID`.
    pub progress: crate::progress::Registry,
    /// Wakes the replica's retention task after a commit.
    pub retention_wake: tokio::sync::Notify,
    /// Deadlines of calls to replicas (`serve --hello-timeout ...`).
    pub peer_timeouts: crate::peer_client::PeerTimeouts,
    pub tls: transport::TlsContext,
    pub events: Events,
    /// Prometheus metrics (`serve --metrics-listen`).
    pub metrics: crate::metrics::Metrics,
    /// Health over the monitoring interval: reasons' start times, missed cycles, changes.
    pub health: crate::health::HealthWatch,
    /// `serve --monitoring-interval` (seconds), used unless `replica-server enable` set one.
    monitoring_interval_secs: u64,
    catalog: Catalog,
    exports: Arc<nbd::StaticRegistry>,
    nbd: Mutex<Option<nbd::NbdServer>>,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    /// Every replication relationship of this host, by VM name, in its role.
    relationships: Mutex<BTreeMap<String, Relation>>,
    /// Serializes the replica side's relationship events (`replica_event`).
    replica_events: Mutex<()>,
    /// Failovers served on this host (`failover start`), by served name.
    failovers: Mutex<failover::Failovers>,
    broken: Mutex<BTreeMap<String, BrokenVm>>,
    /// Names of VMs being created or imported right now (see `ensure_new`).
    creating: Mutex<HashSet<String>>,
    replica: Mutex<Option<ReplicaHost>>,
    peers: Mutex<HashMap<String, transport::Peer>>,
    /// When the previous daemon was last alive (its heartbeat), read before this one stamps.
    last_alive_ns: Option<u64>,
    /// Replica VM name → the primary host that replicates it (for status).
    replica_primaries: Mutex<HashMap<String, String>>,
    /// (VM, disk, event id) whose storage or tracking failure was reported (one event of each
    /// per disk per daemon run).
    storage_reported: Mutex<HashSet<(String, usize, u32)>>,
    /// Interrupted uploads kept for a resume (replica side).
    pub partials: Arc<crate::replica_host::Partials>,
    /// Recovery points served over NBD (and pinned), `points serve`.
    served: Mutex<served::Served>,
    /// Points pinned by backups running now, by (VM, point): how many (`points list` shows
    /// them as pinned by `backup`).
    backups: Mutex<BTreeMap<(String, u64), usize>>,
    /// Numbers the temporary NBD exports of backups.
    backup_exports: std::sync::atomic::AtomicU64,
    /// Recovery points kept per replica VM (`serve --retain-points`, tests only).
    pub retain_points: usize,
    /// The one owner of host-level changes (`owner.rs`): every create, import, enable, set
    /// and serve goes through it.
    owner: crate::owner::Owner,
}

/// Holds an exclusive `flock` on `<data-dir>/daemon.lock` for the daemon's lifetime, so two
/// daemons never share a data directory.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("daemon.lock");
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match sysutil::try_lock_exclusive(&f) {
        Ok(true) => Ok(f),
        Ok(false) => bail!("another understudy daemon is using {}", dir.display()),
        Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// This host's TLS identity: `serve --cert/--key/--ca` when given, else the generated one in
/// `<data-dir>/identity`; `<data-dir>/identity.pem` (the CA peers trust) is rewritten from it.
fn load_identity(
    data_dir: &Path,
    args: &HostConfig,
    host_name: &str,
) -> anyhow::Result<transport::Identity> {
    let listen_host = args
        .listen
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string());
    let extra: Vec<String> = listen_host
        .into_iter()
        .filter(|h| !h.is_empty() && h != "0.0.0.0" && h != "::")
        .collect();
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => transport::Identity::from_files(cert, key, args.ca.as_deref())?,
        _ => transport::load_or_create(&data_dir.join("identity"), host_name, &extra)?,
    };
    // Rewritten at each start, atomically: a crash never leaves a torn CA file that a peer
    // admin would copy.
    let pem = data_dir.join("identity.pem");
    sysutil::replace_file(
        &pem,
        &data_dir.join("identity.pem.tmp"),
        identity.ca_pem().as_bytes(),
        sysutil::FileMode::Umask(0o644),
    )
    .with_context(|| format!("writing {}", pem.display()))?;
    Ok(identity)
}

impl Shared {
    /// Re-reads this host's certificate, key and CA (SIGHUP, systemd's `ExecReload=`): new
    /// handshakes use them, established links keep theirs. The trust directory is re-read too.
    /// On error the previous identity stays in force. The host name cannot change this way.
    pub fn reload_tls(&self, args: &HostConfig) -> anyhow::Result<()> {
        let identity = load_identity(&self.data_dir, args, &self.host_name)?;
        self.tls.reload_identity(identity)?;
        Ok(())
    }
}

fn default_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn vm_key(name: &str) -> String {
    format!("vm/{name}")
}

impl Shared {
    pub async fn open(data_dir: &Path, args: &HostConfig) -> anyhow::Result<Arc<Shared>> {
        let host_name = args.name.clone().unwrap_or_else(default_host_name);
        let identity = load_identity(data_dir, args, &host_name)?;
        let trust = transport::TrustStore::open(&data_dir.join("trust"))?;
        let tls = transport::TlsContext::new(identity, trust)?;
        let catalog = Catalog::open(&data_dir.join("catalog.redb"))?;
        let events = Events::with_limit(
            data_dir.join("events.log"),
            args.events_file_max
                .unwrap_or(crate::events::EVENTS_FILE_MAX_BYTES),
        );
        let served = served::Served::load(&catalog)?;
        let exports = Arc::new(nbd::StaticRegistry::new());
        let nbd_socket = match crate::activation::nbd_socket_path()? {
            Some(p) => p,
            None => data_dir.join("nbd.sock"),
        };
        let (owner, owner_rx, owner_view) = crate::owner::Owner::new();
        let shared = Arc::new(Shared {
            resync_trees: parking_lot::Mutex::new(HashMap::new()),
            owner,
            host_name,
            data_dir: data_dir.to_path_buf(),
            listen: args.listen.clone(),
            nbd_socket: nbd_socket.clone(),
            disk_options: tracker::DiskOptions {
                cbw_memory_bytes_max: args.cbw_memory,
                cbw_spill_bytes_max: args.cbw_spill_max,
            },
            uploads: Default::default(),
            progress: Default::default(),
            retention_wake: tokio::sync::Notify::new(),
            peer_timeouts: crate::peer_client::PeerTimeouts {
                hello: Duration::from_secs(args.hello_timeout.max(1)),
                upload_idle: Duration::from_secs(args.upload_idle_timeout.max(1)),
                answer: Duration::from_secs(args.answer_timeout.max(1)),
            },
            tls,
            events,
            metrics: crate::metrics::Metrics::new(),
            health: Default::default(),
            monitoring_interval_secs: args.monitoring_interval_secs,
            catalog,
            exports: exports.clone(),
            nbd: Mutex::new(None),
            vms: Mutex::new(BTreeMap::new()),
            relationships: Mutex::new(BTreeMap::new()),
            replica_events: Mutex::new(()),
            failovers: Mutex::new(Default::default()),
            broken: Mutex::new(BTreeMap::new()),
            creating: Mutex::new(HashSet::new()),
            replica: Mutex::new(None),
            peers: Mutex::new(HashMap::new()),
            replica_primaries: Mutex::new(HashMap::new()),
            storage_reported: Mutex::new(HashSet::new()),
            partials: Default::default(),
            served: Mutex::new(served),
            backups: Mutex::new(BTreeMap::new()),
            backup_exports: std::sync::atomic::AtomicU64::new(0),
            retain_points: args
                .retain_points
                .map_or(crate::replica_host::RETAIN_POINTS, |n| n as usize),
            last_alive_ns: heartbeat::last_alive_ns(data_dir),
        });

        // The NBD socket comes first, before anything slow: a guest whose connection broke
        // when the previous daemon stopped (qemu `reconnect-delay`) connects at once and
        // waits in the socket's backlog; it is accepted as soon as the VMs are open, so it
        // never meets a missing export.
        let (listener, owned_socket) = match crate::activation::nbd_listener()? {
            // systemd socket activation: the unit owns the socket, its path and its mode.
            Some(listener) => (listener, None),
            None => {
                let listener = nbd::NbdServer::bind_unix(&nbd_socket)
                    .with_context(|| format!("serving NBD on {}", nbd_socket.display()))?;
                // Owner and group only: anyone who can open the socket can read and write
                // the disks.
                set_mode(&nbd_socket, 0o660)?;
                (listener, Some(nbd_socket.clone()))
            }
        };
        heartbeat::spawn(data_dir.to_path_buf()).context("starting the heartbeat thread")?;

        // Open VMs one by one (trackers report how they were left); one that cannot be opened
        // is reported broken with the reason, and every other VM is served.
        // All at once, under one deadline: a VM whose storage hangs is reported broken and
        // never keeps the others (whose guests wait in the socket's backlog) off the air.
        // A catalog of the previous version is brought to this one first (one commit per VM);
        // one of a version this daemon does not know is refused with one line.
        for vm in shared.catalog.migrate()? {
            tracing::info!(vm = %vm, "catalog record moved to version {}", crate::catalog::RECORD_VERSION);
        }
        let mut primaries = shared.load_relationships()?;
        let mut records: Vec<(String, VmRecord)> = shared.catalog.scan("vm/")?;
        // A VM whose relationship says this host is its replica was handed to the replica
        // store by a reverse cut short before the VM was forgotten: finish it, never serve it
        // (its images are the replica's base now).
        records.retain(|(_, r)| {
            if shared.role_of(&r.name) != Some(Role::Replica) {
                return true;
            }
            tracing::warn!(vm = %r.name, "finishing a reverse cut short: forgetting the old primary VM");
            if let Err(e) = shared.forget_vm(&r.name) {
                tracing::error!(vm = %r.name, "finishing a reverse: {e:#}");
            }
            false
        });
        let opening: Vec<_> = records
            .into_iter()
            .map(|(_, record)| {
                let rel = primaries.remove(&record.name);
                let rec2 = record.clone();
                let options = shared.disk_options.clone();
                let task = tokio::task::spawn_blocking(move || vms::open_vm(&rec2, &options));
                (record, rel, task)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + VM_OPEN_DEADLINE;
        for (record, rel, task) in opening {
            let opened = match tokio::time::timeout_at(deadline, task).await {
                Ok(joined) => joined.map_err(anyhow::Error::from).and_then(|r| r),
                Err(_) => Err(anyhow!(
                    "opening its disks did not finish within {} s (is its storage hanging?); restart the daemon once it answers",
                    VM_OPEN_DEADLINE.as_secs()
                )),
            };
            match opened {
                Ok(vm) => shared.install_opened(record, vm, rel),
                Err(e) => shared.mark_broken(record, &e, rel),
            }
        }
        let server = nbd::NbdServer::serve_unix_listener(
            listener,
            owned_socket.as_deref(),
            exports,
            nbd::ServerConfig {
                observer: Some(shared.metrics.nbd.clone()),
                ..nbd::ServerConfig::default()
            },
        )
        .context("serving NBD")?;
        *shared.nbd.lock() = Some(server);
        if let Some(cfg) = shared.catalog.get::<ReplicaServerConfig>(REPLICA_CFG_KEY)? {
            // In the background: the NBD server never waits for the replica's journals, and
            // a failing replica store never keeps the primary VMs offline.
            shared.start_replica_store(cfg);
        }
        tokio::spawn(watch_storage(Arc::downgrade(&shared)));
        tokio::spawn(watch_health(Arc::downgrade(&shared)));
        tokio::spawn(served::watch_expiries(Arc::downgrade(&shared)));
        tokio::spawn(crate::owner::run(shared.clone(), owner_rx, owner_view));
        Ok(shared)
    }

    /// Reads every relationship record (`relationship/<vm>`): replica ones go to the map at
    /// once, primary ones are returned to be started with their VM. A record this daemon
    /// cannot read (another version, damaged) stops the start with one line.
    fn load_relationships(&self) -> anyhow::Result<BTreeMap<String, PrimaryRelation>> {
        let mut primaries = BTreeMap::new();
        for (key, doc) in self.catalog.scan::<RelationshipDoc>("relationship/")? {
            let name = key.trim_start_matches("relationship/");
            let vm = proto::VmName::parse(name)
                .with_context(|| format!("catalog record {key} names an invalid VM"))?;
            let rel = Relationship::from_record(vm, doc.record(&proto::VmName::parse(name)?)?)?;
            match (rel.role, doc.primary) {
                (Role::Primary, Some(settings)) => {
                    primaries.insert(name.to_string(), (settings, rel));
                }
                (Role::Primary, None) if rel.state == relationship::State::FailedOver => {
                    self.relationships
                        .lock()
                        .insert(name.to_string(), Relation::FailedOver(rel));
                }
                (Role::Primary, None) => {
                    bail!("catalog record {key} is damaged: a primary relationship without its settings")
                }
                (Role::Replica, _) => {
                    self.relationships
                        .lock()
                        .insert(name.to_string(), Relation::Replica(rel));
                }
            }
        }
        Ok(primaries)
    }

    /// Serves a VM that a completed failover made a primary VM of this host.
    pub(super) fn install_failed_over(&self, record: VmRecord, vm: Vm) {
        let vm = Arc::new(vm);
        self.add_exports(&vm);
        self.vms
            .lock()
            .insert(record.name.clone(), VmEntry { record, vm });
    }

    /// Serves a VM opened at start and resumes its replication.
    fn install_opened(self: &Arc<Self>, record: VmRecord, vm: Vm, rel: Option<PrimaryRelation>) {
        let vm = Arc::new(vm);
        // A VM prepared for a planned failover, or failed over elsewhere, stays fenced
        // across a restart.
        let fenced = rel.as_ref().is_some_and(|(_, r)| {
            matches!(
                r.state,
                relationship::State::PreparedForFailover { .. }
                    | relationship::State::FencedAfterFailover { .. }
            )
        });
        if fenced {
            self.fence_vm_now(&vm);
        } else {
            self.add_exports(&vm);
        }
        if let Some((settings, rel)) = rel {
            let mut first = vec![Event::Restarted];
            if let Some(reason) = self.judge_open_states(&vm, &settings, &rel) {
                first.push(Event::StorageFailed { reason });
            }
            let agent = record.guest.as_ref().and_then(|g| g.agent_socket.clone());
            let repl = Replication::spawn(self.clone(), vm.clone(), settings, rel, agent, first);
            self.relationships
                .lock()
                .insert(record.name.clone(), Relation::Primary(repl));
        }
        self.vms
            .lock()
            .insert(record.name.clone(), VmEntry { record, vm });
    }

    fn mark_broken(
        &self,
        record: VmRecord,
        e: &anyhow::Error,
        relationship: Option<PrimaryRelation>,
    ) {
        let reason = crate::errfmt::one_line(e);
        tracing::error!(vm = %record.name, "cannot open: {reason}");
        self.events.emit(
            events::VM_BROKEN,
            Some(&record.name),
            "error",
            &format!("VM cannot be opened and is not served: {reason}"),
        );
        self.broken.lock().insert(
            record.name.clone(),
            BrokenVm {
                record,
                reason,
                relationship,
            },
        );
    }

    /// Fsyncgate: reports every disk of `name` whose image storage failed a sync (the tracker
    /// keeps the first error and fails every later FLUSH/FUA): one event per disk, and, for a
    /// replicated disk, resynchronization required (the replica may hold data the primary's
    /// disk lost, or the reverse). Likewise a disk whose activity log could not be written
    /// (event 1007). Returns the reason of the first failed replicated disk.
    pub fn check_storage(&self, name: &str) -> Option<String> {
        let vm = self.vms.lock().get(name)?.vm.clone();
        let repl = self.primary_of(name);
        let mut first = None;
        // An initial replication sends every block whatever the tracking says (and one
        // interrupted by a crash with lost tracking is sent whole): a tracking failure during
        // it requires the resynchronization only once it completed (a later check).
        let initial_done = repl
            .as_ref()
            .is_some_and(|r| r.relationship().state.initial_done());
        for (i, d) in vm.disks.iter().enumerate() {
            use relationship::condition::{STORAGE_WRITE_FAILED, TRACKING_WRITE_FAILED};
            let (event, reason) = if let Some(error) = d.storage_error() {
                (
                    events::STORAGE_FAILED,
                    format!(
                        "disk {i}: the primary's {STORAGE_WRITE_FAILED} ({error}); data the guest was told is durable may not be"
                    ),
                )
            } else if let Some(error) = d.tracking_error() {
                // Tracking goes on in memory and the guest is served, but a crash from now on
                // could not say what changed: never dropped silently.
                (
                    events::TRACKING_FAILED,
                    format!(
                        "disk {i}: its {TRACKING_WRITE_FAILED} ({error}); the guest is still served, but a crash would leave the changes untracked"
                    ),
                )
            } else {
                // A re-armed activity log (a resynchronization) reports its next failure again.
                self.storage_reported.lock().remove(&(
                    name.to_string(),
                    i,
                    events::TRACKING_FAILED,
                ));
                continue;
            };
            if self
                .storage_reported
                .lock()
                .insert((name.to_string(), i, event))
            {
                self.events.emit(event, Some(name), "error", &reason);
            }
            if event == events::TRACKING_FAILED && !initial_done {
                continue;
            }
            if let Some(repl) = &repl {
                if repl.record().disks.contains(&(i as u32)) {
                    repl.require_resync(self, reason.clone());
                    first.get_or_insert(reason);
                }
            }
        }
        first
    }

    /// Promise 3 at startup: decide from what the trackers found whether the replica can
    /// still follow. Returns why a resynchronization is required (the core makes it so);
    /// prepares the dirty bits of an interrupted initial replication.
    fn judge_open_states(
        &self,
        vm: &Vm,
        r: &ReplicationRecord,
        rel: &Relationship,
    ) -> Option<String> {
        use relationship::condition::{
            MODIFIED_WHILE_OFF, REVERTED_TO_OLDER, TRACKING_LOST, TRACKING_WRITE_FAILED,
        };
        use relationship::{Resumable, State};
        let initial_in_progress = matches!(
            rel.state,
            State::InitialReplicationInProgress
                | State::Suspended {
                    resume_to: Resumable::InitialReplicationInProgress
                }
        );
        let initial_done = rel.state.initial_done();
        if matches!(rel.state, State::ResynchronizationRequired { .. }) {
            return None;
        }
        // Disks of an interrupted initial replication whose tracking cannot say what changed.
        let mut untracked: Vec<u32> = Vec::new();
        for (i, state) in vm.open_states.iter().enumerate() {
            if !r.disks.contains(&(i as u32)) {
                continue;
            }
            let reason = match state {
                OpenState::Clean => None,
                OpenState::RecoveredFromActivityLog {
                    hot_extents,
                    hot_bytes,
                } => {
                    if let Some(reason) = self.edited_while_down(vm, i) {
                        Some(reason)
                    } else {
                        self.events.emit(
                        events::UNCLEAN_RECOVERED,
                        Some(&vm.name),
                        "warning",
                        &format!("disk {i} was not shut down cleanly; re-sending its {hot_extents} recently written extents ({hot_bytes} bytes) instead of a full resynchronization"),
                    );
                        None
                    }
                }
                OpenState::FirstOpen => Some(format!(
                    "disk {i}: {TRACKING_LOST}: its state directory is empty"
                )),
                OpenState::TrackingLost { reason } => {
                    Some(format!("disk {i}: {TRACKING_LOST}: {reason}"))
                }
                OpenState::ModifiedOutside {
                    reason,
                    replaced: true,
                } => Some(format!(
                    "disk {i} {REVERTED_TO_OLDER} while the daemon was stopped: {reason}"
                )),
                OpenState::ModifiedOutside {
                    reason,
                    replaced: false,
                } => Some(format!("disk {i} {MODIFIED_WHILE_OFF}: {reason}")),
            };
            if let Some(reason) = reason {
                if initial_in_progress {
                    // The replica may hold point 1 already (committed, answer lost), and
                    // reconcile then adopts it: re-sending only what is allocated now would
                    // leave whatever became a hole since on the replica (silent divergence).
                    // Every block goes again, holes as ZERO frames.
                    tracing::warn!(vm = %vm.name, "interrupted initial replication: {reason}; disk {i} is sent whole");
                    untracked.push(i as u32);
                    continue;
                }
                if initial_done {
                    return Some(reason);
                }
            }
        }
        if initial_in_progress {
            // An interrupted initial replication starts over (its delta never committed, or
            // reconcile adopts it and the rest goes as an ordinary delta).
            for &i in &r.disks {
                if let Some(d) = vm.disks.get(i as usize) {
                    let marked = if untracked.contains(&i) {
                        d.mark_all_dirty()
                    } else {
                        d.mark_allocated_dirty().map(|_| ()).or_else(|e| {
                            tracing::error!(vm = %vm.name, "rescanning disk {i}: {e}; sending it whole");
                            d.mark_all_dirty()
                        })
                    };
                    if let Err(e) = marked {
                        // What must be re-sent cannot be recorded: only a resynchronization
                        // can bring the replica back in line.
                        return Some(format!(
                            "disk {i}: {TRACKING_WRITE_FAILED} (the blocks of the interrupted initial replication cannot be marked for sending: {e})"
                        ));
                    }
                }
            }
        }
        None
    }

    /// After an unclean stop the activity log covers the daemon's own writes; an edit made
    /// while it was down is caught by comparing the image's ctime with the heartbeat.
    fn edited_while_down(&self, vm: &Vm, disk: usize) -> Option<String> {
        use relationship::condition::{MODIFIED_WHILE_OFF, UNCLEAN_STOP_UNTRACKED};
        let image = vm.disks.get(disk)?.image_path().to_path_buf();
        let Some(alive) = self.last_alive_ns else {
            return Some(format!(
                "disk {disk} {UNCLEAN_STOP_UNTRACKED} and this host has no record of when its daemon stopped, so edits made while it was down cannot be ruled out"
            ));
        };
        let now = now_unix_ns();
        if heartbeat::clock_behind(alive, now) {
            return Some(format!(
                "disk {disk} {UNCLEAN_STOP_UNTRACKED} and this host's clock ({}) is behind the daemon's last heartbeat ({}): the clock was stepped back, so edits made while the daemon was down cannot be ruled out",
                rfc3339_from_unix_ns(now),
                rfc3339_from_unix_ns(alive)
            ));
        }
        match heartbeat::changed_after(&image, alive) {
            Ok(None) => None,
            Ok(Some(ctime)) => Some(format!(
                "disk {disk} {MODIFIED_WHILE_OFF} after the daemon stopped uncleanly (image changed at {}, daemon last alive at {})",
                rfc3339_from_unix_ns(ctime),
                rfc3339_from_unix_ns(alive)
            )),
            Err(e) => Some(format!(
                "disk {disk} {UNCLEAN_STOP_UNTRACKED} and whether it was edited since cannot be checked ({}: {e})",
                image.display()
            )),
        }
    }

    /// Fences a VM for a planned failover: its disks are no longer served (new NBD
    /// connections are refused). Refused, and nothing changed, while a client still uses them.
    pub(crate) fn fence_vm(&self, vm: &Vm) -> anyhow::Result<()> {
        for i in 0..vm.disks.len() as u32 {
            self.exports.remove(&vms::export_name(&vm.name, i));
        }
        let busy: usize = match self.nbd.lock().as_ref() {
            Some(server) => (0..vm.disks.len() as u32)
                .map(|i| server.export_connections(&vms::export_name(&vm.name, i)))
                .sum(),
            None => 0,
        };
        if busy > 0 {
            self.add_exports(vm);
            return Err(crate::error::transient(format!(
                "{} still has {busy} NBD connection(s) on its disks: shut the VM down first, then run `understudy failover prepare {}` again",
                vm.name, vm.name
            )));
        }
        for d in &vm.disks {
            d.set_fenced(true);
        }
        Ok(())
    }

    /// Fences a VM whatever uses it (another host failed it over): its disks are no longer
    /// served, and every write of a connection still open fails.
    pub(crate) fn fence_vm_now(&self, vm: &Vm) {
        for (i, d) in vm.disks.iter().enumerate() {
            d.set_fenced(true);
            self.exports.remove(&vms::export_name(&vm.name, i as u32));
        }
    }

    /// Serves a fenced VM's disks again (a prepare cancelled or failed, a fence lifted).
    pub(crate) fn unfence_vm(&self, vm: &Vm) {
        for d in &vm.disks {
            d.set_fenced(false);
        }
        self.add_exports(vm);
    }

    fn add_exports(&self, vm: &Vm) {
        for (i, d) in vm.disks.iter().enumerate() {
            let backend: Arc<dyn nbd::BlockBackend> = d.clone();
            self.exports.add_with_description(
                vms::export_name(&vm.name, i as u32),
                format!("{} disk {i}", vm.name),
                backend,
            );
        }
    }

    pub fn host_info(&self) -> HostInfo {
        HostInfo {
            name: self.host_name.clone(),
            listen: self.listen.clone(),
            data_dir: self.data_dir.display().to_string(),
            nbd_socket: self.nbd_socket.display().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Writes a VM's relationship record (`relationship/<vm>`), durably.
    pub fn save_relationship(&self, vm: &str, doc: &RelationshipDoc) -> anyhow::Result<()> {
        self.catalog.put(&RelationshipDoc::key(vm), doc)
    }

    /// The resynchronization cursor of `vm` (`resync.md`, "The cursor"). A record that does
    /// not parse is treated as none (the compare starts over) and logged.
    pub(crate) fn load_resync_cursor(
        &self,
        vm: &str,
    ) -> Option<crate::resync_cursor::ResyncCursor> {
        match self
            .catalog
            .get::<crate::resync_cursor::ResyncCursor>(&crate::resync_cursor::ResyncCursor::key(vm))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vm, "the resynchronization cursor is ignored: {e:#}");
                None
            }
        }
    }

    pub(crate) fn save_resync_cursor(
        &self,
        vm: &str,
        cursor: &crate::resync_cursor::ResyncCursor,
    ) -> anyhow::Result<()> {
        self.catalog
            .put(&crate::resync_cursor::ResyncCursor::key(vm), cursor)
    }

    pub(crate) fn delete_resync_cursor(&self, vm: &str) -> anyhow::Result<()> {
        self.catalog
            .delete(&crate::resync_cursor::ResyncCursor::key(vm))
    }

    /// The primary relationship of `name`, if this host ships its points.
    fn primary_of(&self, name: &str) -> Option<Arc<Replication>> {
        match self.relationships.lock().get(name) {
            Some(Relation::Primary(r)) => Some(r.clone()),
            _ => None,
        }
    }

    /// The role this host plays for VM `name`, if it has a relationship for it.
    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.relationships.lock().get(name).map(|r| match r {
            Relation::Primary(_) => Role::Primary,
            Relation::Replica(_) => Role::Replica,
            Relation::FailedOver(_) => Role::Primary,
        })
    }

    // ----- VMs -----

    pub(crate) fn create_vm(&self, name: &str, sizes: &[u64]) -> anyhow::Result<VmInfo> {
        vms::validate_vm_name(name).map_err(|e| bad_request(e.to_string()))?;
        vms::validate_sizes(sizes).map_err(|e| bad_request(e.to_string()))?;
        let _reserved = self.ensure_new(name)?;
        let made = vms::create_disks(
            &self.data_dir,
            name,
            sizes,
            now_unix_ns(),
            &self.disk_options,
        );
        self.install_or_clean_up(name, made)
    }

    pub(crate) fn import_vm(&self, name: &str, images: &[PathBuf]) -> anyhow::Result<VmInfo> {
        vms::validate_vm_name(name).map_err(|e| bad_request(e.to_string()))?;
        let _reserved = self.ensure_new(name)?;
        for img in images {
            if !img.exists() {
                return Err(bad_request(format!(
                    "image {} does not exist",
                    img.display()
                )));
            }
        }
        let made = vms::import_disks(
            &self.data_dir,
            name,
            images,
            now_unix_ns(),
            &self.disk_options,
        );
        self.install_or_clean_up(name, made)
    }

    /// Reserves `name` for a VM being created or imported: a second request for the same name
    /// gets a conflict at once instead of racing the first one (which would then remove the
    /// first VM's files while cleaning up after itself). Released when the guard drops.
    fn ensure_new(&self, name: &str) -> anyhow::Result<NameReservation<'_>> {
        let mut creating = self.creating.lock();
        if creating.contains(name) {
            return Err(conflict(format!(
                "VM {name} is being created by another request"
            )));
        }
        if self.vms.lock().contains_key(name)
            || self.broken.lock().contains_key(name)
            || vms::vm_dir(&self.data_dir, name).exists()
        {
            return Err(conflict(format!("VM {name} already exists")));
        }
        creating.insert(name.to_string());
        Ok(NameReservation {
            shared: self,
            name: name.to_string(),
        })
    }

    /// Installs a new VM, or removes what a failed create or import left behind so that the
    /// same name can be used again.
    fn install_or_clean_up(
        &self,
        name: &str,
        made: anyhow::Result<(VmRecord, Vm)>,
    ) -> anyhow::Result<VmInfo> {
        let installed = made.and_then(|(record, vm)| self.install_vm(record, vm));
        if installed.is_err() {
            let _ = std::fs::remove_dir_all(vms::vm_dir(&self.data_dir, name));
        }
        installed
    }

    fn install_vm(&self, record: VmRecord, vm: Vm) -> anyhow::Result<VmInfo> {
        self.catalog.put(&vm_key(&record.name), &record)?;
        let vm = Arc::new(vm);
        self.add_exports(&vm);
        let name = record.name.clone();
        self.vms.lock().insert(name.clone(), VmEntry { record, vm });
        self.vm_info(&name)
    }

    /// Every VM of this host, from the command owner's latest snapshot.
    pub fn vm_infos(&self) -> Vec<VmInfo> {
        let mut names = self.owner.view().vms.clone();
        for f in self.failover_names() {
            if !names.contains(&f) {
                names.push(f);
            }
        }
        names.sort();
        names.iter().filter_map(|n| self.vm_info(n).ok()).collect()
    }

    pub fn vm_info(&self, name: &str) -> anyhow::Result<VmInfo> {
        if let Some(info) = self.failover_vm_info(name) {
            return Ok(info);
        }
        let (record, broken) = {
            let vms = self.vms.lock();
            match vms.get(name) {
                Some(e) => (e.record.clone(), None),
                None => {
                    let broken = self.broken.lock();
                    let Some(b) = broken.get(name) else {
                        drop(broken);
                        drop(vms);
                        return self
                            .replica_vm_info(name)
                            .ok_or_else(|| not_found(format!("no VM named {name} on this host")));
                    };
                    (b.record.clone(), Some(b.reason.clone()))
                }
            }
        };
        let broken_rel = self
            .broken
            .lock()
            .get(name)
            .and_then(|b| b.relationship.as_ref().map(|(s, _)| s.disks.clone()));
        let repl_disks = self
            .primary_of(name)
            .map(|r| r.record().disks)
            .or(broken_rel)
            .unwrap_or_default();
        let role = match self.role_of(name) {
            Some(Role::Primary) => "Primary",
            Some(Role::Replica) => "Replica",
            None if !repl_disks.is_empty() => "Primary",
            None => "None",
        };
        Ok(VmInfo {
            name: record.name.clone(),
            created_at: rfc3339_from_unix_ns(record.created_unix_ns),
            replication_role: role.into(),
            disks: record
                .disks
                .iter()
                .map(|d| {
                    self.disk_info(
                        name,
                        d.index,
                        d.size_bytes,
                        &d.file,
                        repl_disks.contains(&d.index),
                    )
                })
                .collect(),
            broken,
            guest_agent: record.guest.as_ref().and_then(|g| g.agent_socket.clone()),
            pre_freeze_hook: record
                .guest
                .as_ref()
                .and_then(|g| g.pre_freeze_hook.clone()),
            post_thaw_hook: record.guest.as_ref().and_then(|g| g.post_thaw_hook.clone()),
            launch: self.launch_command(name).unwrap_or_else(|e| {
                tracing::warn!(vm = %name, "reading its launch command: {e:#}");
                None
            }),
            failover_network: self.failover_network(name).unwrap_or_else(|e| {
                tracing::warn!(vm = %name, "reading its failover network settings: {e:#}");
                None
            }),
            seed: None,
        })
    }

    /// How a disk served on this host's NBD socket is shown (`vm show`): its URI and the
    /// qemu and libvirt attachments with `reconnect-delay`.
    pub(crate) fn disk_info(
        &self,
        vm: &str,
        index: u32,
        size_bytes: u64,
        path: &str,
        replicated: bool,
    ) -> DiskInfo {
        let socket = self.nbd_socket.display().to_string();
        let export = vms::export_name(vm, index);
        DiskInfo {
            index,
            size_bytes,
            nbd_uri: format!("nbd+unix:///{export}?socket={socket}"),
            qemu_blockdev: vms::qemu_blockdev(
                &export,
                &vms::qemu_node_name(vm, index),
                &socket,
                NBD_RECONNECT_DELAY_SECS,
            ),
            qemu_node_name: vms::qemu_node_name(vm, index),
            libvirt_xml: vms::libvirt_disk_xml(&export, &socket, index, NBD_RECONNECT_DELAY_SECS),
            export_name: export,
            path: path.to_string(),
            replicated,
        }
    }

    /// How `vm`'s guest is quiesced (`vm set`), read at each application-consistent cut.
    pub fn guest_settings(&self, vm: &str) -> Option<crate::guest::GuestSettings> {
        self.vms.lock().get(vm).and_then(|e| e.record.guest.clone())
    }

    /// `vm set`: the guest agent socket, the freeze/thaw hooks (primary VMs) and the launch
    /// command (primary or replica VMs). Every value is checked first; a refusal changes
    /// nothing.
    pub(crate) fn set_vm(&self, req: &proto::SetVm) -> anyhow::Result<VmInfo> {
        let guest_change = req.guest_agent.is_some()
            || req.no_guest_agent
            || req.pre_freeze_hook.is_some()
            || req.post_thaw_hook.is_some();
        let launch_change = req.launch.is_some() || req.no_launch;
        let network_change = req.failover_network.is_some() || req.no_failover_network;
        if !guest_change && !launch_change && !network_change {
            return Err(bad_request(
                "nothing to change: give --launch, --no-launch, --failover-network, --no-failover-network, --guest-agent, --no-guest-agent, --pre-freeze-hook or --post-thaw-hook",
            ));
        }
        if req.failover_network.is_some() && req.no_failover_network {
            return Err(bad_request(
                "--failover-network and --no-failover-network contradict each other",
            ));
        }
        let network = req
            .failover_network
            .as_deref()
            .map(Self::check_failover_network)
            .transpose()?;
        if req.guest_agent.is_some() && req.no_guest_agent {
            return Err(bad_request(
                "--guest-agent and --no-guest-agent contradict each other",
            ));
        }
        if req.launch.is_some() && req.no_launch {
            return Err(bad_request(
                "--launch and --no-launch contradict each other",
            ));
        }
        if let Some(sock) = &req.guest_agent {
            if !Path::new(sock).is_absolute() {
                return Err(bad_request(format!(
                    "guest agent socket {sock} must be an absolute path"
                )));
            }
        }
        for hook in [&req.pre_freeze_hook, &req.post_thaw_hook]
            .into_iter()
            .flatten()
        {
            if hook.contains('\n') || hook.contains('\0') {
                return Err(bad_request("a hook must be one line of shell"));
            }
        }
        // A primary VM of this host, or else a replica VM (the launch command only).
        let primary_disks: Option<Vec<u32>> = self
            .vms
            .lock()
            .get(&req.vm)
            .map(|e| e.record.disks.iter().map(|d| d.index).collect());
        let disks = match &primary_disks {
            Some(d) => d.clone(),
            None => {
                let rvm = match self.replica_vm(&req.vm) {
                    Ok(rvm) => rvm,
                    Err(e)
                        if crate::error::kind_of(&e)
                            == Some(crate::error::ErrorKind::Transient) =>
                    {
                        return Err(e)
                    }
                    Err(_) => {
                        return Err(not_found(format!(
                            "no VM named {} on this host (neither a primary nor a replica VM)",
                            req.vm
                        )))
                    }
                };
                if guest_change {
                    return Err(bad_request(format!(
                        "{} is a replica VM on this host: only --launch, --no-launch, --failover-network and --no-failover-network apply to it (set the guest agent and hooks on its primary host)",
                        req.vm
                    )));
                }
                rvm.disks().iter().map(|d| d.index).collect()
            }
        };
        if let Some(cmd) = &req.launch {
            crate::launch::Template::parse(cmd, &disks).map_err(bad_request)?;
        }
        if guest_change {
            self.set_guest(req)?;
        }
        if let Some(cmd) = &req.launch {
            let record = crate::launch::LaunchRecord {
                version: crate::launch::LaunchRecord::VERSION,
                vm: req.vm.clone(),
                command: cmd.clone(),
            };
            self.catalog
                .put(&crate::launch::LaunchRecord::key(&req.vm), &record)
                .context("recording the launch command")?;
        }
        if req.no_launch {
            self.catalog
                .delete(&crate::launch::LaunchRecord::key(&req.vm))
                .context("forgetting the launch command")?;
        }
        if launch_change {
            self.events.emit(
                events::VM_SET,
                Some(&req.vm),
                "info",
                if req.no_launch {
                    "launch command removed (vm set)"
                } else {
                    "launch command set (vm set)"
                },
            );
        }
        if network_change {
            self.set_failover_network(&req.vm, network)?;
        }
        if primary_disks.is_some() {
            return self.vm_info(&req.vm);
        }
        self.replica_vm_info(&req.vm)
            .ok_or_else(|| not_found(format!("no VM named {} on this host", req.vm)))
    }

    /// What `vm show` and `vm set` answer for a replica VM of this host (it has no `vm/<name>`
    /// here): the name, role `Replica`, no disks, and its launch and failover network settings.
    fn replica_vm_info(&self, name: &str) -> Option<VmInfo> {
        self.replica_vm(name).ok()?;
        Some(VmInfo {
            name: name.to_string(),
            disks: Vec::new(),
            created_at: String::new(),
            replication_role: "Replica".into(),
            broken: None,
            guest_agent: None,
            pre_freeze_hook: None,
            post_thaw_hook: None,
            launch: self.launch_command(name).unwrap_or_else(|e| {
                tracing::warn!(vm = %name, "reading its launch command: {e:#}");
                None
            }),
            failover_network: self.failover_network(name).unwrap_or_else(|e| {
                tracing::warn!(vm = %name, "reading its failover network settings: {e:#}");
                None
            }),
            seed: None,
        })
    }

    /// The guest quiescing half of `vm set` (checked by the caller), on a primary VM.
    fn set_guest(&self, req: &proto::SetVm) -> anyhow::Result<()> {
        let mut vms = self.vms.lock();
        let entry = vms
            .get_mut(&req.vm)
            .ok_or_else(|| not_found(format!("no VM named {} on this host", req.vm)))?;
        let mut g = entry.record.guest.clone().unwrap_or_default();
        if req.no_guest_agent {
            g.agent_socket = None;
        }
        if let Some(sock) = &req.guest_agent {
            g.agent_socket = Some(sock.clone());
        }
        let nonempty = |h: &String| (!h.trim().is_empty()).then(|| h.clone());
        if let Some(h) = &req.pre_freeze_hook {
            g.pre_freeze_hook = nonempty(h);
        }
        if let Some(h) = &req.post_thaw_hook {
            g.post_thaw_hook = nonempty(h);
        }
        if g.post_thaw_hook.is_some() && g.pre_freeze_hook.is_none() {
            return Err(bad_request(
                "--post-thaw-hook needs a --pre-freeze-hook (it runs only after one)",
            ));
        }
        let mut record = entry.record.clone();
        record.guest = (g != crate::guest::GuestSettings::default()).then_some(g);
        self.catalog.put(&vm_key(&req.vm), &record)?;
        entry.record = record;
        drop(vms);
        self.events.emit(
            events::VM_SET,
            Some(&req.vm),
            "info",
            "guest quiescing settings changed (vm set)",
        );
        Ok(())
    }

    /// The launch command recorded for `vm` (`launch/<vm>`), if any.
    pub(crate) fn launch_command(&self, vm: &str) -> anyhow::Result<Option<String>> {
        let record: Option<crate::launch::LaunchRecord> =
            self.catalog.get(&crate::launch::LaunchRecord::key(vm))?;
        match record {
            None => Ok(None),
            Some(r) if r.version == crate::launch::LaunchRecord::VERSION => Ok(Some(r.command)),
            Some(r) => Err(anyhow::anyhow!(
                "catalog record launch/{vm} has version {}; this understudy reads version {}",
                r.version,
                crate::launch::LaunchRecord::VERSION
            )),
        }
    }

    /// Replication status of a VM that could not be opened: its recorded state, Critical.
    fn broken_status(&self, name: &str) -> Option<ReplicationStatus> {
        let broken = self.broken.lock();
        let b = broken.get(name)?;
        let (r, rel) = b.relationship.as_ref()?;
        let why = format!("the VM could not be opened: {}", b.reason);
        Some(primary::status_of(
            name,
            r,
            rel,
            proto::Health::Critical,
            vec![proto::HealthReason::new("vm_broken", why.clone())],
            0,
            None,
            Some(why),
        ))
    }

    // ----- replication (primary side) -----

    pub fn replication(&self, name: &str) -> anyhow::Result<Arc<Replication>> {
        if let Some(r) = self.primary_of(name) {
            return Ok(r);
        }
        if self.role_of(name) == Some(Role::Replica) {
            return Err(conflict(format!(
                "{name} is a replica on this host; run this on its primary"
            )));
        }
        if !self.vms.lock().contains_key(name) && !self.broken.lock().contains_key(name) {
            return Err(not_found(format!("no VM named {name} on this host")));
        }
        Err(primary::not_enabled(name))
    }

    /// The shared link to the replica at `addr` whose certificate names `expect` (the name
    /// recorded at `replication enable`); one per (address, name).
    pub fn peer(&self, addr: &str, expect: Option<&str>) -> anyhow::Result<transport::Peer> {
        let key = format!("{addr}\n{}", expect.unwrap_or_default());
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get(&key) {
            return Ok(p.clone());
        }
        let p = transport::Peer::expecting(
            addr.to_string(),
            self.tls.clone(),
            expect.map(str::to_owned),
        )?;
        peers.insert(key, p.clone());
        Ok(p)
    }

    /// `replication enable`: checks the request and says hello to the replica (which must
    /// accept the VM now, like Enable-VMReplication), then hands the result to the host's
    /// command owner, which checks again and commits ([`Shared::install_replication`]).
    pub async fn enable_replication(
        self: &Arc<Self>,
        req: EnableReplication,
    ) -> anyhow::Result<ReplicationStatus> {
        let prepared = self.prepare_enable(req).await?;
        self.owner
            .call(|reply| crate::owner::HostCommand::EnableReplication(Box::new(prepared), reply))
            .await
    }

    async fn prepare_enable(
        self: &Arc<Self>,
        req: EnableReplication,
    ) -> anyhow::Result<PreparedEnable> {
        check_frequency(req.frequency_secs)?;
        if let Some(h) = &req.history {
            check_history(h)?;
        }
        let vm = self.vm_without_relationship(&req.vm)?;
        let all: Vec<u32> = (0..vm.disks.len() as u32).collect();
        let mut disks = req.disks.clone().unwrap_or(all);
        disks.sort_unstable();
        disks.dedup();
        if disks.is_empty() {
            return Err(bad_request("--disks selects no disk"));
        }
        if let Some(bad) = disks.iter().find(|&&d| d as usize >= vm.disks.len()) {
            return Err(bad_request(format!(
                "{} has no disk {bad} (it has {})",
                req.vm,
                vm.disks.len()
            )));
        }
        let mut record = ReplicationRecord {
            replica: req.replica.clone(),
            frequency_secs: req.frequency_secs,
            compression: req.compression,
            disks,
            replication_id: random_id()?,
            replica_name: None,
            history: req.history,
            auto_resynchronize: false,
            resynchronize_window: None,
            lag_warning_cycles: None,
        };
        let rel = Relationship::new(vm.name.clone(), Role::Primary, proto::Generation(1));
        // Like Enable-VMReplication: the replica must accept us now, or nothing changes. First
        // contact: any replica identity the trust scopes allow; the one met is pinned below.
        let peer = transport::Peer::expecting(req.replica.clone(), self.tls.clone(), None)?;
        let reply = crate::peer_client::hello(
            &peer,
            &primary::hello_of(self, &vm, &record, &rel),
            &self.peer_timeouts,
        )
        .await
        .with_context(|| format!("replica {} did not accept {}", req.replica, req.vm))
        .map_err(crate::peer_client::typed)?;
        if reply.latest_seq != proto::Seq(0) {
            return Err(conflict(format!(
                "replica {} already holds points of {} from another relationship; remove them there first",
                req.replica, req.vm
            )));
        }
        record.replica_name = peer.connected_name().await;
        Ok(PreparedEnable {
            vm: req.vm,
            record,
            rel,
        })
    }

    /// Commits a prepared enable (the command owner's half): the VM must still exist and not
    /// be replicating already (another request may have enabled it meanwhile).
    pub(crate) fn install_replication(
        self: &Arc<Self>,
        p: PreparedEnable,
    ) -> anyhow::Result<ReplicationStatus> {
        // A replica event for the same name (a peer's hello) cannot slip in between the check
        // and the record: one relationship per VM.
        let _no_replica_event = self.replica_events.lock();
        let vm = self.vm_without_relationship(&p.vm)?;
        self.save_relationship(&p.vm, &RelationshipDoc::new(&p.rel, Some(p.record.clone())))?;
        let repl = Replication::spawn(self.clone(), vm, p.record.clone(), p.rel, None, Vec::new());
        self.relationships
            .lock()
            .insert(p.vm.clone(), Relation::Primary(repl.clone()));
        self.events.emit(
            events::REPLICATION_ENABLED,
            Some(&p.vm),
            "info",
            &format!("replication enabled to {}", p.record.replica),
        );
        Ok(repl.status())
    }

    /// The VM `name`, which must have no relationship yet (`replication enable`).
    fn vm_without_relationship(&self, name: &str) -> anyhow::Result<Arc<Vm>> {
        let vm = self
            .vms
            .lock()
            .get(name)
            .map(|e| e.vm.clone())
            .ok_or_else(|| not_found(format!("no VM named {name} on this host")))?;
        self.check_no_relationship(name)?;
        Ok(vm)
    }

    /// Refuses a second relationship for a VM: one per VM name, in one role.
    fn check_no_relationship(&self, vm: &str) -> anyhow::Result<()> {
        match self.role_of(vm) {
            None => Ok(()),
            Some(Role::Primary) if self.primary_of(vm).is_none() => Err(conflict(format!(
                "{vm} was failed over to this host; protect it with `understudy replication reverse {vm} --replica HOST:PORT`"
            ))),
            Some(Role::Primary) => {
                Err(conflict(format!("replication is already enabled for {vm}")))
            }
            Some(Role::Replica) => Err(conflict(format!(
                "{vm} is a replica on this host; it cannot also be replicated from here"
            ))),
        }
    }

    /// The host's command owner: the only way to change host-level state.
    pub fn owner(&self) -> &crate::owner::Owner {
        &self.owner
    }

    /// What the owner publishes after each command.
    pub(crate) fn snapshot(&self, commands: u64) -> crate::owner::HostView {
        let mut vms: Vec<String> = self.vms.lock().keys().cloned().collect();
        vms.extend(self.broken.lock().keys().cloned());
        vms.sort();
        crate::owner::HostView {
            commands,
            vms,
            replica_server: self.replica.lock().as_ref().is_some_and(|h| h.cfg.enabled),
        }
    }

    /// `replication set`: changes the frequency, compression and recovery history of a
    /// replicating VM in place. Every value is checked first; a refusal changes nothing.
    pub(crate) fn set_replication(
        &self,
        req: &SetReplication,
    ) -> anyhow::Result<ReplicationStatus> {
        let repl = self.replication(&req.vm)?;
        if let Some(f) = req.frequency_secs {
            check_frequency(f)?;
        }
        let history_given = req.recovery_history.is_some()
            || req.app_consistent_every_hours.is_some()
            || req.keep_every_point_for_secs.is_some();
        let history = if history_given {
            let mut h = repl.record().history.unwrap_or_default();
            if let Some(n) = req.recovery_history {
                h.recovery_history = n;
            }
            if let Some(a) = req.app_consistent_every_hours {
                h.app_consistent_every_hours = Some(a);
            }
            if let Some(w) = req.keep_every_point_for_secs {
                h.keep_every_point_for_secs = w;
            }
            check_history(&h)?;
            Some(h)
        } else {
            None
        };
        // `none` removes the window (any time); anything else must be HH:MM-HH:MM (UTC).
        let window = match req.resynchronize_window.as_deref().map(str::trim) {
            None => None,
            Some(w) if w.eq_ignore_ascii_case("none") => Some(None),
            Some(w) => {
                Some(Some(relationship::ResyncWindow::parse(w).map_err(|e| {
                    bad_request(format!("--resynchronize-window: {e}"))
                })?))
            }
        };
        let auto = (req.auto_resynchronize.is_some() || window.is_some())
            .then_some((req.auto_resynchronize, window));
        if let Some(n) = req.lag_warning_cycles {
            if n > LAG_WARNING_CYCLES_MAX {
                return Err(bad_request(format!(
                    "--lag-warning-cycles {n}: give 1 to {LAG_WARNING_CYCLES_MAX} cycles, or 0 for the default"
                )));
            }
        }
        if req.frequency_secs.is_none()
            && req.compression.is_none()
            && !history_given
            && auto.is_none()
            && req.lag_warning_cycles.is_none()
        {
            return Err(bad_request(
                "nothing to change: give --frequency, --compression, --recovery-history, --app-consistent-every, --keep-every-point-for, --auto-resynchronize, --resynchronize-window or --lag-warning-cycles",
            ));
        }
        repl.set(
            self,
            req.frequency_secs,
            req.compression,
            history,
            auto,
            req.lag_warning_cycles,
        )?;
        let r = repl.record();
        self.events.emit(
            events::REPLICATION_SET,
            Some(&req.vm),
            "info",
            &format!(
                "replication settings changed: frequency {} s, compression {:?}, history {:?}, auto-resynchronize {}{}, lag warning after {}",
                r.frequency_secs,
                r.compression,
                r.history,
                if r.auto_resynchronize { "on" } else { "off" },
                r.resynchronize_window
                    .map(|w| format!(" (window {w} UTC)"))
                    .unwrap_or_default(),
                match r.lag_warning_cycles {
                    Some(n) => format!("{n} cycles"),
                    None => "3 cycles or 1 h (default)".into(),
                }
            ),
        );
        Ok(repl.status())
    }

    /// The monitoring interval health is judged over (seconds): `replica-server enable
    /// --monitoring-interval`, else `serve --monitoring-interval` (12 h by default).
    pub fn monitoring_interval_secs(&self) -> u64 {
        self.replica_config()
            .and_then(|c| c.monitoring_interval_secs)
            .unwrap_or(self.monitoring_interval_secs)
    }

    /// `replication status NAME`, health judged over the monitoring interval.
    pub fn status(&self, name: &str) -> anyhow::Result<ReplicationStatus> {
        let mut st = self.status_now(name)?;
        self.health
            .apply(&mut st, self.monitoring_interval_secs(), &self.events);
        Ok(st)
    }

    /// `replication reset-statistics NAME`: `measure` counts from now and health forgets the
    /// failures in a row and the missed cycles (the Prometheus counters go on).
    pub fn reset_statistics(&self, name: &str) -> anyhow::Result<()> {
        let _ = self.status_now(name)?;
        if let Some(repl) = self.primary_of(name) {
            repl.reset_statistics();
        }
        self.health.reset(name);
        self.events.emit(
            crate::events::STATISTICS_RESET,
            Some(name),
            "info",
            "replication statistics reset: measure counts from now; failures in a row and missed cycles are forgotten",
        );
        Ok(())
    }

    fn status_now(&self, name: &str) -> anyhow::Result<ReplicationStatus> {
        self.check_storage(name);
        if let Some(repl) = self.primary_of(name) {
            return Ok(repl.status());
        }
        if let Some(st) = self.failed_over_status(name) {
            return Ok(st);
        }
        if let Some(st) = self.broken_status(name) {
            return Ok(st);
        }
        if let Some(st) = self.replica_status(name) {
            return Ok(st);
        }
        if self.vms.lock().contains_key(name) || self.broken.lock().contains_key(name) {
            return Err(primary::not_enabled(name));
        }
        Err(not_found(format!("no VM named {name} on this host")))
    }

    /// Every replication task on this host (taken out of the lock, so callers may await).
    fn replications(&self) -> Vec<Arc<Replication>> {
        self.relationships
            .lock()
            .values()
            .filter_map(|r| match r {
                Relation::Primary(r) => Some(r.clone()),
                Relation::Replica(_) | Relation::FailedOver(_) => None,
            })
            .collect()
    }

    pub fn all_status(&self) -> Vec<ReplicationStatus> {
        let names: Vec<String> = self.vms.lock().keys().cloned().collect();
        for name in &names {
            self.check_storage(name);
        }
        let repls = self.replications();
        let mut out: Vec<ReplicationStatus> = repls.iter().map(|r| r.status()).collect();
        let failed_over: Vec<String> = self
            .relationships
            .lock()
            .iter()
            .filter(|(_, r)| matches!(r, Relation::FailedOver(_)))
            .map(|(n, _)| n.clone())
            .collect();
        out.extend(
            failed_over
                .iter()
                .filter_map(|n| self.failed_over_status(n)),
        );
        let broken: Vec<String> = self.broken.lock().keys().cloned().collect();
        out.extend(broken.iter().filter_map(|n| self.broken_status(n)));
        out.extend(
            self.replica_vm_names()
                .iter()
                .filter_map(|n| self.replica_status(n)),
        );
        let interval = self.monitoring_interval_secs();
        for st in &mut out {
            self.health.apply(st, interval, &self.events);
        }
        out
    }

    /// The Prometheus text for `GET /metrics`: the counters, and the gauges from what
    /// `replication status` says now.
    pub fn metrics_text(&self) -> String {
        let statuses = self.all_status();
        let cbw: Vec<(String, u64, u64)> = self
            .replications()
            .iter()
            .map(|r| {
                let disks = &r.vm.disks;
                (
                    r.vm.name.to_string(),
                    disks.iter().map(|d| d.cbw_copied_bytes()).sum(),
                    disks.iter().map(|d| d.cbw_spilled_bytes()).sum(),
                )
            })
            .collect();
        self.metrics
            .encode(&statuses, &cbw, proto::time::history_now_ns())
    }

    pub async fn stop_replication(&self, timeout: Duration) {
        let repls = self.replications();
        for r in repls {
            let stopped =
                tokio::time::timeout(timeout, r.command(crate::primary::Cmd::Shutdown)).await;
            if stopped.is_err() {
                tracing::warn!(vm = %r.vm.name, "replication task did not stop in time");
            }
        }
    }

    /// Stops the NBD server and leaves every tracker in its clean state (bitmap persisted).
    pub fn shutdown_disks(&self) -> anyhow::Result<()> {
        if let Some(server) = self.nbd.lock().take() {
            server.shutdown();
        }
        let vms: Vec<Arc<Vm>> = self.vms.lock().values().map(|e| e.vm.clone()).collect();
        let mut first_error: Option<anyhow::Error> = None;
        for vm in vms {
            // Recorded before the stop: such a disk gets no clean marker.
            self.check_storage(&vm.name);
            for (i, d) in vm.disks.iter().enumerate() {
                match d.shutdown_clean() {
                    Ok(()) => {}
                    Err(e @ tracker::TrackerError::StorageFailed { .. }) => {
                        tracing::error!(vm = %vm.name, "disk {i} left without a clean-stop marker: {e}");
                    }
                    // One disk that cannot be closed cleanly never keeps the others from
                    // their clean stop; the first failure is reported at the end.
                    Err(e) => {
                        tracing::error!(vm = %vm.name, "closing disk {i}: {e}");
                        first_error.get_or_insert_with(|| {
                            anyhow::Error::from(e)
                                .context(format!("closing disk {i} of {}", vm.name))
                        });
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How often health is judged without anyone asking: a change is an event (2040) within this
/// time, and each reason's start time is at most this late.
const HEALTH_WATCH_PERIOD: Duration = Duration::from_secs(10);

/// Judges every VM's health every [`HEALTH_WATCH_PERIOD`] (events on changes), until the host
/// is dropped.
async fn watch_health(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(HEALTH_WATCH_PERIOD).await;
        let Some(s) = shared.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || s.all_status()).await;
    }
}

/// Checks every VM's disks for storage errors every [`STORAGE_CHECK_INTERVAL`], so a VM that
/// nobody asks about (or that does not replicate) still gets its event.
async fn watch_storage(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(STORAGE_CHECK_INTERVAL).await;
        let Some(s) = shared.upgrade() else { return };
        let names: Vec<String> = s.vms.lock().keys().cloned().collect();
        for name in names {
            s.check_storage(&name);
        }
    }
}

/// Restricts a socket or file to `mode`.
pub fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions of {}", path.display()))
}

/// 128 random bits as hex, from the kernel's CSPRNG.
fn random_id() -> anyhow::Result<String> {
    let mut buf = [0u8; 16];
    let mut f = File::open("/dev/urandom").context("opening /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut buf).context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn check_frequency(secs: u32) -> anyhow::Result<()> {
    if !(1..=3600).contains(&secs) {
        return Err(bad_request(format!(
            "frequency must be 1 to 3600 seconds, got {secs}"
        )));
    }
    Ok(())
}

/// The replica store's own range checks (`replica::HistoryPolicy::validate`), as a 400.
pub(crate) fn check_history(h: &proto::HistoryPolicy) -> anyhow::Result<()> {
    history_to_store(h).validate().map_err(bad_request)
}

pub(crate) fn history_to_store(h: &proto::HistoryPolicy) -> replica::HistoryPolicy {
    replica::HistoryPolicy {
        recovery_history: h.recovery_history,
        app_consistent_every_hours: h.app_consistent_every_hours,
        keep_every_point_for_secs: h.keep_every_point_for_secs,
    }
}

pub(crate) fn history_from_store(h: &replica::HistoryPolicy) -> proto::HistoryPolicy {
    proto::HistoryPolicy {
        recovery_history: h.recovery_history,
        app_consistent_every_hours: h.app_consistent_every_hours,
        keep_every_point_for_secs: h.keep_every_point_for_secs,
    }
}
