//! [`Shared`]: the single owner of this host's state (catalog, VMs, replication tasks,
//! replica store, peers). API routes and peer routes call its methods; nothing else mutates
//! host state.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use parking_lot::Mutex;
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{
    DiskInfo, EnableReplication, HostInfo, ReplicaServerConfig, ReplicationStatus, VmInfo,
};
use replica::ReplicaStore;
use tracker::OpenState;

use super::api::{bad_request, conflict, not_found};
use super::catalog::{Catalog, ReplicationRecord, VmRecord};
use super::events::{self, Events};
use super::heartbeat;
use super::primary::{self, Replication};
use super::vms::{self, Vm};
use crate::ServeArgs;

mod replica_side;

const REPLICA_CFG_KEY: &str = "replica-server";

struct VmEntry {
    record: VmRecord,
    vm: Arc<Vm>,
    repl: Option<Arc<Replication>>,
}

struct ReplicaHost {
    cfg: ReplicaServerConfig,
    store: Arc<ReplicaStore>,
}

pub struct Shared {
    pub host_name: String,
    pub data_dir: PathBuf,
    pub listen: String,
    pub nbd_socket: PathBuf,
    /// How VM disks are opened (`serve --cbw-memory`).
    pub disk_options: tracker::DiskOptions,
    pub tls: transport::TlsContext,
    pub events: Events,
    catalog: Catalog,
    exports: Arc<nbd::StaticRegistry>,
    nbd: Mutex<Option<nbd::NbdServer>>,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    replica: Mutex<Option<ReplicaHost>>,
    peers: Mutex<HashMap<String, transport::Peer>>,
    /// When the previous daemon was last alive (its heartbeat), read before this one stamps.
    last_alive_ns: Option<u64>,
    /// Replica VM name → the primary host that replicates it (for status).
    replica_primaries: Mutex<HashMap<String, String>>,
    /// Interrupted uploads kept for a resume (replica side).
    pub partials: Arc<crate::daemon::replica_host::Partials>,
}

/// Holds an exclusive `flock` on `<data-dir>/daemon.lock` for the daemon's lifetime, so two
/// daemons never share a data directory.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("daemon.lock");
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("another understudy daemon is using {}", dir.display());
    }
    Ok(f)
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
    pub async fn open(data_dir: &Path, args: &ServeArgs) -> anyhow::Result<Arc<Shared>> {
        let host_name = args.name.clone().unwrap_or_else(default_host_name);
        let listen_host = args
            .listen
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string());
        let extra: Vec<String> = listen_host
            .into_iter()
            .filter(|h| !h.is_empty() && h != "0.0.0.0" && h != "::")
            .collect();
        let identity = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => {
                transport::Identity::from_files(cert, key, args.ca.as_deref())?
            }
            _ => transport::load_or_create(&data_dir.join("identity"), &host_name, &extra)?,
        };
        std::fs::write(data_dir.join("identity.pem"), identity.ca_pem())?;
        let trust = transport::TrustStore::open(&data_dir.join("trust"))?;
        let tls = transport::TlsContext::new(identity, trust)?;
        let catalog = Catalog::open(&data_dir.join("catalog.redb"))?;
        let events = Events::new(data_dir.join("events.log"));
        let exports = Arc::new(nbd::StaticRegistry::new());
        let nbd_socket = data_dir.join("nbd.sock");
        let shared = Arc::new(Shared {
            host_name,
            data_dir: data_dir.to_path_buf(),
            listen: args.listen.clone(),
            nbd_socket: nbd_socket.clone(),
            disk_options: tracker::DiskOptions {
                cbw_memory_bytes_max: args.cbw_memory,
            },
            tls,
            events,
            catalog,
            exports: exports.clone(),
            nbd: Mutex::new(None),
            vms: Mutex::new(BTreeMap::new()),
            replica: Mutex::new(None),
            peers: Mutex::new(HashMap::new()),
            replica_primaries: Mutex::new(HashMap::new()),
            partials: Default::default(),
            last_alive_ns: heartbeat::last_alive_ns(data_dir),
        });

        // Open VMs (trackers report how they were left) before serving any export.
        let records: Vec<(String, VmRecord)> = shared.catalog.scan("vm/")?;
        for (_, record) in records {
            let s = shared.clone();
            let rec2 = record.clone();
            let options = shared.disk_options.clone();
            let vm = tokio::task::spawn_blocking(move || vms::open_vm(&rec2, &options)).await??;
            let vm = Arc::new(vm);
            s.add_exports(&vm);
            let repl = match record.replication.clone() {
                Some(mut r) => {
                    s.judge_open_states(&vm, &mut r);
                    s.save_replication(&vm.name, &r)?;
                    Some(Replication::spawn(s.clone(), vm.clone(), r))
                }
                None => None,
            };
            s.vms
                .lock()
                .insert(record.name.clone(), VmEntry { record, vm, repl });
        }
        if let Some(cfg) = shared.catalog.get::<ReplicaServerConfig>(REPLICA_CFG_KEY)? {
            if cfg.enabled {
                let s = shared.clone();
                tokio::task::spawn_blocking(move || s.open_replica_store(cfg)).await??;
            }
        }
        let server = nbd::NbdServer::serve_unix(&nbd_socket, exports, nbd::ServerConfig::default())
            .with_context(|| format!("serving NBD on {}", nbd_socket.display()))?;
        // Owner and group only: anyone who can open the socket can read and write the disks.
        set_mode(&nbd_socket, 0o660)?;
        *shared.nbd.lock() = Some(server);
        heartbeat::spawn(data_dir.to_path_buf());
        Ok(shared)
    }

    /// Promise 3 at startup: decide from what the trackers found whether the replica can
    /// still follow, and say so.
    fn judge_open_states(&self, vm: &Vm, r: &mut ReplicationRecord) {
        if r.resync_reason.is_some() {
            return;
        }
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
                OpenState::FirstOpen => {
                    Some(format!("the change tracking state of disk {i} is missing"))
                }
                OpenState::TrackingLost { reason } => {
                    Some(format!("change tracking of disk {i} was lost: {reason}"))
                }
                OpenState::ModifiedOutside { reason } => Some(format!(
                    "disk {i} was modified outside Understudy: {reason}"
                )),
            };
            if let Some(reason) = reason {
                if r.initial_started && !r.initial_done {
                    // Initial replication ships everything again anyway.
                    continue;
                }
                if r.initial_done {
                    self.events.emit(
                        events::RESYNC_REQUIRED,
                        Some(&vm.name),
                        "error",
                        &format!("resynchronization required: {reason}"),
                    );
                    r.resync_reason = Some(reason);
                    return;
                }
            }
        }
        if r.initial_started && !r.initial_done {
            // An interrupted initial replication starts over (its delta never committed, or
            // reconcile adopts it and the rest goes as an ordinary delta).
            for &i in &r.disks {
                if let Some(d) = vm.disks.get(i as usize) {
                    if let Err(e) = d.mark_allocated_dirty() {
                        tracing::error!(vm = %vm.name, "rescanning disk {i}: {e}");
                    }
                }
            }
        }
    }

    /// After an unclean stop the activity log covers the daemon's own writes; an edit made
    /// while it was down is caught by comparing the image's ctime with the heartbeat.
    fn edited_while_down(&self, vm: &Vm, disk: usize) -> Option<String> {
        let image = vm.disks.get(disk)?.image_path().to_path_buf();
        let Some(alive) = self.last_alive_ns else {
            return Some(format!(
                "disk {disk} was not shut down cleanly and this host has no record of when its daemon stopped, so edits made while it was down cannot be ruled out"
            ));
        };
        match heartbeat::changed_after(&image, alive) {
            Ok(None) => None,
            Ok(Some(ctime)) => Some(format!(
                "disk {disk} was modified outside Understudy after the daemon stopped uncleanly (image changed at {}, daemon last alive at {})",
                rfc3339_from_unix_ns(ctime),
                rfc3339_from_unix_ns(alive)
            )),
            Err(e) => Some(format!("disk {disk}: cannot check {}: {e}", image.display())),
        }
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

    pub fn save_replication(&self, vm: &str, r: &ReplicationRecord) -> anyhow::Result<()> {
        let mut vms = self.vms.lock();
        let record = match vms.get_mut(vm) {
            Some(e) => {
                e.record.replication = Some(r.clone());
                e.record.clone()
            }
            None => {
                let mut rec: VmRecord = self
                    .catalog
                    .get(&vm_key(vm))?
                    .ok_or_else(|| anyhow!("VM {vm} vanished"))?;
                rec.replication = Some(r.clone());
                rec
            }
        };
        drop(vms);
        self.catalog.put(&vm_key(vm), &record)
    }

    // ----- VMs -----

    pub fn create_vm(&self, name: &str, sizes: &[u64]) -> anyhow::Result<VmInfo> {
        vms::validate_vm_name(name).map_err(|e| bad_request(e.to_string()))?;
        self.ensure_new(name)?;
        let made = vms::create_disks(
            &self.data_dir,
            name,
            sizes,
            now_unix_ns(),
            &self.disk_options,
        );
        self.install_or_clean_up(name, made)
    }

    pub fn import_vm(&self, name: &str, images: &[PathBuf]) -> anyhow::Result<VmInfo> {
        vms::validate_vm_name(name).map_err(|e| bad_request(e.to_string()))?;
        self.ensure_new(name)?;
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

    fn ensure_new(&self, name: &str) -> anyhow::Result<()> {
        if self.vms.lock().contains_key(name) || vms::vm_dir(&self.data_dir, name).exists() {
            return Err(conflict(format!("VM {name} already exists")));
        }
        Ok(())
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
        self.vms.lock().insert(
            name.clone(),
            VmEntry {
                record,
                vm,
                repl: None,
            },
        );
        self.vm_info(&name)
    }

    pub fn vm_infos(&self) -> Vec<VmInfo> {
        let names: Vec<String> = self.vms.lock().keys().cloned().collect();
        names.iter().filter_map(|n| self.vm_info(n).ok()).collect()
    }

    pub fn vm_info(&self, name: &str) -> anyhow::Result<VmInfo> {
        let vms = self.vms.lock();
        let e = vms
            .get(name)
            .ok_or_else(|| not_found(format!("no VM named {name} on this host")))?;
        let repl_disks = e
            .record
            .replication
            .as_ref()
            .map(|r| r.disks.clone())
            .unwrap_or_default();
        let socket = self.nbd_socket.display().to_string();
        Ok(VmInfo {
            name: e.record.name.clone(),
            created_at: rfc3339_from_unix_ns(e.record.created_unix_ns),
            replication_role: if e.record.replication.is_some() {
                "Primary"
            } else {
                "None"
            }
            .into(),
            disks: e
                .record
                .disks
                .iter()
                .map(|d| {
                    let export = vms::export_name(name, d.index);
                    DiskInfo {
                        index: d.index,
                        size_bytes: d.size_bytes,
                        nbd_uri: format!("nbd+unix:///{export}?socket={socket}"),
                        export_name: export,
                        path: d.file.clone(),
                        replicated: repl_disks.contains(&d.index),
                    }
                })
                .collect(),
        })
    }

    // ----- replication (primary side) -----

    pub fn replication(&self, name: &str) -> anyhow::Result<Arc<Replication>> {
        let vms = self.vms.lock();
        let e = vms
            .get(name)
            .ok_or_else(|| not_found(format!("no VM named {name} on this host")))?;
        e.repl.clone().ok_or_else(|| primary::not_enabled(name))
    }

    pub fn peer(&self, addr: &str) -> anyhow::Result<transport::Peer> {
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get(addr) {
            return Ok(p.clone());
        }
        let p = transport::Peer::new(addr.to_string(), self.tls.clone())?;
        peers.insert(addr.to_string(), p.clone());
        Ok(p)
    }

    pub async fn enable_replication(
        self: &Arc<Self>,
        req: EnableReplication,
    ) -> anyhow::Result<ReplicationStatus> {
        if !(1..=3600).contains(&req.frequency_secs) {
            return Err(bad_request(format!(
                "frequency must be 1 to 3600 seconds, got {}",
                req.frequency_secs
            )));
        }
        let vm = {
            let vms = self.vms.lock();
            let e = vms
                .get(&req.vm)
                .ok_or_else(|| not_found(format!("no VM named {} on this host", req.vm)))?;
            if e.record.replication.is_some() {
                return Err(conflict(format!(
                    "replication is already enabled for {}",
                    req.vm
                )));
            }
            e.vm.clone()
        };
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
        let record = ReplicationRecord {
            replica: req.replica.clone(),
            frequency_secs: req.frequency_secs,
            compression: req.compression,
            disks,
            replication_id: random_id()?,
            generation: 1,
            last_seq: 0,
            last_cut_unix_ns: None,
            inflight_seq: None,
            initial_done: false,
            initial_started: false,
            suspended: false,
            resync_reason: None,
            pending_full: false,
        };
        // Like Enable-VMReplication: the replica must accept us now, or nothing changes.
        let peer = self.peer(&req.replica)?;
        let reply = super::peer_client::hello(&peer, &primary::hello_of(self, &vm, &record))
            .await
            .with_context(|| format!("replica {} did not accept {}", req.replica, req.vm))?;
        if reply.latest_seq != 0 {
            return Err(conflict(format!(
                "replica {} already holds points of {} from another relationship; remove them there first",
                req.replica, req.vm
            )));
        }
        self.save_replication(&req.vm, &record)?;
        let repl = Replication::spawn(self.clone(), vm, record);
        if let Some(e) = self.vms.lock().get_mut(&req.vm) {
            e.repl = Some(repl.clone());
        }
        self.events.emit(
            events::REPLICATION_ENABLED,
            Some(&req.vm),
            "info",
            &format!("replication enabled to {}", req.replica),
        );
        Ok(repl.status())
    }

    pub fn status(&self, name: &str) -> anyhow::Result<ReplicationStatus> {
        if let Some(repl) = self.vms.lock().get(name).and_then(|e| e.repl.clone()) {
            return Ok(repl.status());
        }
        if let Some(st) = self.replica_status(name) {
            return Ok(st);
        }
        if self.vms.lock().contains_key(name) {
            return Err(primary::not_enabled(name));
        }
        Err(not_found(format!("no VM named {name} on this host")))
    }

    /// Every replication task on this host (taken out of the lock, so callers may await).
    fn replications(&self) -> Vec<Arc<Replication>> {
        self.vms
            .lock()
            .values()
            .filter_map(|e| e.repl.clone())
            .collect()
    }

    pub fn all_status(&self) -> Vec<ReplicationStatus> {
        let repls = self.replications();
        let mut out: Vec<ReplicationStatus> = repls.iter().map(|r| r.status()).collect();
        let replica_names: Vec<String> = self
            .replica
            .lock()
            .as_ref()
            .map(|h| {
                h.store
                    .vms()
                    .iter()
                    .map(|v| v.vm_id().to_string())
                    .collect()
            })
            .unwrap_or_default();
        out.extend(replica_names.iter().filter_map(|n| self.replica_status(n)));
        out
    }

    pub async fn stop_replication(&self, timeout: Duration) {
        let repls = self.replications();
        for r in repls {
            let stopped =
                tokio::time::timeout(timeout, r.command(super::primary::Cmd::Shutdown)).await;
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
        for vm in vms {
            for (i, d) in vm.disks.iter().enumerate() {
                d.shutdown_clean()
                    .with_context(|| format!("closing disk {i} of {}", vm.name))?;
            }
        }
        Ok(())
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
