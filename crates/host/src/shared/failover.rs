//! Failover on the replica host (`failover start/stop`): a VM's disks at a chosen recovery
//! point, writable through copy-on-write overlays (`replica::Overlay`), served on this host's
//! NBD socket. A test failover serves them as `NAME-test` while replication goes on; a
//! failover proper serves them as `NAME` and the replica stops receiving. The relationship core
//! decides (`Event::FailoverStart/Stop`); this module executes its `ServeFailover` and
//! `DropFailover` actions and brings served failovers back after a restart.
//!
//! Crash safety: the catalog record `failover/<served name>` is written before the overlays'
//! exports appear and deleted before the overlays are discarded, so after a crash a failover is
//! either served again at start (its overlays reopened with what the guest flushed) or gone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{FailoverInfo, Seq, VmInfo};
use relationship::{Action, Event, State};

use replica::{Overlay, ReplicaVm};
use serde::{Deserialize, Serialize};

use super::Shared;
use crate::error::{bad_request, conflict, not_found};
use crate::events;
use crate::launch::{Launch, Outcome, Template, LAUNCH_WAIT};

/// How long ending a failover waits for the NBD connections it closed to let go of its disks.
const OVERLAY_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `failover/<served name>` in the catalog (`docs/formats/catalog.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub version: u32,
    /// The replica VM failed over.
    pub vm: String,
    /// The name its disks are served as: `vm`, or `vm-test` for a test failover.
    pub served_as: String,
    pub point: u64,
    pub test: bool,
    pub disks: Vec<FailoverDisk>,
    pub created_unix_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverDisk {
    pub index: u32,
    pub size_bytes: u64,
}

impl FailoverRecord {
    pub const VERSION: u32 = 1;

    pub fn key(served_as: &str) -> String {
        format!("failover/{served_as}")
    }
}

/// The failovers served on this host, by served name.
#[derive(Default)]
pub(super) struct Failovers {
    served: BTreeMap<String, Served>,
}

struct Served {
    record: FailoverRecord,
    overlays: Vec<(u32, Arc<Overlay>)>,
}

/// The name a failover of `vm` is served as.
pub fn served_name(vm: &str, test: bool) -> String {
    if test {
        format!("{vm}-test")
    } else {
        vm.to_string()
    }
}

impl Shared {
    fn failover_dir(&self, served_as: &str, disk: u32) -> PathBuf {
        self.data_dir
            .join("failover")
            .join(served_as)
            .join(format!("disk-{disk}"))
    }

    /// `failover start NAME [--point ID|latest] [--test] [--start]` (the command owner's
    /// half). With `start`, the VM's launch command is checked before anything changes and
    /// returned filled in, for [`Shared::launch`] to run once the owner is free again.
    pub(crate) fn failover_start(
        &self,
        vm: &str,
        point: &str,
        test: bool,
        start: bool,
    ) -> anyhow::Result<(FailoverInfo, Option<Launch>)> {
        let rvm = self.replica_vm(vm)?;
        let p = super::replica_side::resolve_point(&rvm, vm, point)?;
        let served_as = served_name(vm, test);
        proto::VmName::parse(&served_as)
            .map_err(|e| bad_request(format!("{e} (the test failover's name is {vm}-test)")))?;
        let template = if start {
            let command = self.launch_command(vm)?.ok_or_else(|| {
                bad_request(format!(
                    "{vm} has no launch command for --start: set one with `understudy vm set {vm} --launch 'COMMAND'`"
                ))
            })?;
            let disks: Vec<u32> = rvm.disks().iter().map(|d| d.index).collect();
            let t = Template::parse(&command, &disks).map_err(|e| {
                bad_request(format!("the launch command of {vm} cannot be used: {e}"))
            })?;
            if t.uses_seed() && self.failover_network(vm)?.is_none() {
                return Err(bad_request(format!(
                    "the launch command of {vm} names the seed disk, but {vm} has no failover network settings: set them with `understudy vm set {vm} --failover-network '...'`"
                )));
            }
            Some(t)
        } else {
            None
        };
        if test && (self.vms.lock().contains_key(&served_as) || self.role_of(&served_as).is_some())
        {
            return Err(conflict(format!(
                "a VM named {served_as} already exists on this host; a test failover of {vm} needs that name"
            )));
        }
        if !test && self.vms.lock().contains_key(vm) {
            return Err(conflict(format!(
                "a VM named {vm} already runs on this host (or a `failover complete` of it was cut short: run `understudy failover complete {vm}`): its failover disks would take its names"
            )));
        }
        let generation = rvm.generation();
        self.replica_event_with(
            rvm.vm_id(),
            generation,
            Event::FailoverStart { point: p.seq, test },
            |action| match action {
                Action::ServeFailover { point, test } => {
                    self.serve_failover(&rvm, point, test, true)
                }
                Action::DropFailover { test } => self.drop_failover(vm, test),
                _ => Ok(()),
            },
        )?;
        self.events.emit(
            events::FAILOVER_STARTED,
            Some(vm),
            "info",
            &format!(
                "{} of {vm} to point {} (cut {}): disks served as {served_as}",
                if test { "test failover" } else { "failover" },
                p.seq,
                rfc3339_from_unix_ns(p.cut_time_unix_ns)
            ),
        );
        let info = self.failover_info(&served_as)?;
        let launch = match template {
            None => None,
            Some(t) => match t.render(&served_as, &info.disks, info.seed.as_ref()) {
                Ok(command) => Some(Launch {
                    vm: vm.to_string(),
                    served_as: served_as.clone(),
                    command,
                    log: self.launch_log(&served_as),
                }),
                Err(why) => {
                    // Checked before the failover; a disk missing now is reported, the
                    // failover stays.
                    let mut info = info;
                    self.events.emit(
                        events::LAUNCH_FAILED,
                        Some(vm),
                        "error",
                        &format!("{served_as}: launch command not started: {why}"),
                    );
                    info.launched = Some(format!("not started: {why}"));
                    info.launch_failed = true;
                    return Ok((info, None));
                }
            },
        };
        Ok((info, launch))
    }

    /// Where the output of the launch command of failover `served_as` goes (rewritten at each
    /// launch).
    fn launch_log(&self, served_as: &str) -> PathBuf {
        self.data_dir
            .join("launch")
            .join(format!("{served_as}.log"))
    }

    /// Runs a launch prepared by [`Shared::failover_start`] (up to [`LAUNCH_WAIT`]) and says
    /// in `info` what became of it. A command still running then is left running, and
    /// reaped by a thread of its own that records its end as an event.
    pub(crate) fn launch(self: &Arc<Self>, mut info: FailoverInfo, launch: Launch) -> FailoverInfo {
        let vm = launch.vm.clone();
        let served_as = launch.served_as.clone();
        let log = launch.log.display().to_string();
        match crate::launch::run(&launch, LAUNCH_WAIT) {
            Outcome::Exited => {
                info.launched = Some("exited 0".into());
                self.events.emit(
                    events::LAUNCH_STARTED,
                    Some(&vm),
                    "info",
                    &format!("launch command of {served_as} ran and exited 0 (output in {log})"),
                );
            }
            Outcome::Running { pid, mut child } => {
                info.launched = Some(format!("started (pid {pid})"));
                self.events.emit(
                    events::LAUNCH_STARTED,
                    Some(&vm),
                    "info",
                    &format!("launch command of {served_as} started (pid {pid}, output in {log})"),
                );
                let shared = Arc::downgrade(self);
                let spawned = std::thread::Builder::new()
                    .name(format!("launch-{pid}"))
                    .spawn(move || {
                        let how = match child.wait() {
                            Ok(st) => crate::launch::describe(st),
                            Err(e) => format!("unknown ({e})"),
                        };
                        if let Some(s) = shared.upgrade() {
                            s.events.emit(
                                events::LAUNCH_STARTED,
                                Some(&vm),
                                "info",
                                &format!("launch command of {served_as} (pid {pid}) ended: {how}"),
                            );
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(pid, "no thread to reap the launch command: {e}");
                }
            }
            Outcome::Failed(why) => {
                let why = format!("{why} (the failover stays; output in {log})");
                self.events.emit(
                    events::LAUNCH_FAILED,
                    Some(&vm),
                    "error",
                    &format!("{served_as}: {why}"),
                );
                info.launched = Some(why);
                info.launch_failed = true;
            }
        }
        info
    }

    /// `failover stop NAME [--test]`: the failover's disks and everything written to them go;
    /// a failover proper returns the replica to receiving.
    pub(crate) fn failover_stop(&self, vm: &str, test: bool) -> anyhow::Result<String> {
        let rvm = self.replica_vm(vm)?;
        let served_as = served_name(vm, test);
        // The relationship decides whether there is a failover to stop (after a restart its
        // disks may not be served again yet; dropping them is safe to repeat).
        let generation = rvm.generation();
        self.replica_event_with(
            rvm.vm_id(),
            generation,
            Event::FailoverStop { test },
            |action| match action {
                Action::DropFailover { test } => self.drop_failover(vm, test),
                _ => Ok(()),
            },
        )?;
        self.events.emit(
            events::FAILOVER_STOPPED,
            Some(vm),
            "info",
            &format!("{served_as} stopped: its disks and what was written to them are gone"),
        );
        Ok(served_as)
    }

    /// `failover complete NAME`: the failover's disks (the chosen point and what was written
    /// since) become the disks of a primary VM of this host, tracked from the start of the
    /// failover (those blocks are marked dirty for the reverse replication); the replica's
    /// copy and its other points are dropped, as Hyper-V does. The VM must be shut down (no
    /// NBD client on its failover disks): its disks change underneath.
    pub(crate) fn failover_complete(self: &Arc<Self>, vm: &str) -> anyhow::Result<VmInfo> {
        let rvm = self.replica_vm(vm)?;
        let served: Option<Vec<(u32, Arc<Overlay>)>> = self
            .failovers
            .lock()
            .served
            .get(vm)
            .filter(|s| !s.record.test)
            .map(|s| s.overlays.clone());
        // A completion cut short after the VM's own disks were written and recorded: they are
        // served already; only the relationship and the clean-up are left.
        let resumed = served.is_none()
            && self.vms.lock().contains_key(vm)
            && self
                .catalog
                .get::<FailoverRecord>(&FailoverRecord::key(vm))?
                .is_some_and(|r| !r.test);
        if served.is_none() && !resumed {
            if self
                .catalog
                .get::<FailoverRecord>(&FailoverRecord::key(vm))?
                .is_some_and(|r| !r.test)
            {
                return Err(crate::error::transient(format!(
                    "the failover disks of {vm} are being served again after the daemon started; retry shortly"
                )));
            }
            return Err(conflict(format!(
                "no failover of {vm} is in progress; run `understudy failover start {vm}` first"
            )));
        }
        let overlays = served.unwrap_or_default();
        // Fenced first, then checked: no client may connect and write into a failover disk
        // while it is copied (an acknowledged write would be lost).
        for (i, _) in &overlays {
            self.exports.remove(&crate::vms::export_name(vm, *i));
        }
        let busy: usize = match self.nbd.lock().as_ref() {
            Some(server) => rvm
                .disks()
                .iter()
                .map(|d| server.export_connections(&crate::vms::export_name(vm, d.index)))
                .sum(),
            None => 0,
        };
        let reserve = |overlays: &[(u32, Arc<Overlay>)]| self.export_overlays(vm, overlays);
        if busy > 0 {
            reserve(&overlays);
            return Err(crate::error::transient(format!(
                "{vm} still has {busy} NBD connection(s) on its disks: shut the VM down, then run `understudy failover complete {vm}` again"
            )));
        }
        let generation = rvm.generation();
        // The new VM's disks are numbered 0..n in the order of the replica's disk indexes.
        let mut sizes: Vec<(u32, u64)> = rvm
            .disks()
            .iter()
            .map(|d| (d.index, d.size_bytes))
            .collect();
        sizes.sort_unstable();
        // The disks are written before the relationship's step, outside the lock every replica
        // hello and commit of this host takes (a copy of a large disk takes minutes). Only a
        // relationship still waiting for completion gets them; a crash in between is finished
        // by the next `failover complete` (its disks are found recorded, `resumed`).
        let point = match self.replica_relationship(vm).map(|r| r.state) {
            Some(State::FailedOverWaitingCompletion { point }) => Some(point),
            _ => None,
        };
        let mut made: Option<(crate::catalog::VmRecord, crate::vms::Vm)> = None;
        if let (Some(point), false) = (point, resumed) {
            // What the replica applied after the point: a host that holds a later point (the
            // old primary, at a reverse) differs from the kept disks there too.
            let after: Vec<(u32, Vec<(u64, u64)>)> = sizes
                .iter()
                .map(|&(i, _)| (i, rvm.changed_after(point, i)))
                .collect();
            match self.materialize_failover(vm, &sizes, &overlays, &after) {
                Ok(m) => made = Some(m),
                Err(e) => {
                    reserve(&overlays);
                    return Err(e);
                }
            }
        }
        let stepped =
            self.replica_event_with(rvm.vm_id(), generation, Event::FailoverComplete, |_| Ok(()));
        if let Err(e) = stepped {
            // Not completed: the failover disks are served again as they were, and a VM made
            // for it is taken back.
            if let Some((record, new_vm)) = made.take() {
                drop(new_vm);
                let _ = self.catalog.delete(&format!("vm/{}", record.name));
                let _ = std::fs::remove_dir_all(crate::vms::vm_dir(&self.data_dir, vm));
            }
            reserve(&overlays);
            return Err(e);
        }
        // The failover disks' views of the point go before the replica's copy does.
        drop(overlays);
        drop(rvm);
        // The relationship is FailedOver (persisted): the rest follows, each step safe to redo
        // (a start after a crash here finishes it: `reopen_failovers`).
        self.finish_complete(vm, made)?;
        self.events.emit(
            events::FAILOVER_COMPLETED,
            Some(vm),
            "info",
            &format!("failover of {vm} completed: it is a primary VM of this host now; protect it with `understudy replication reverse {vm} --replica HOST:PORT`"),
        );
        self.vm_info(vm)
    }

    /// Writes the merged disks of a failover as the raw disks of a new primary VM and records
    /// it (`vm/<name>`): the failed-over VM's writes are marked dirty in its tracking.
    fn materialize_failover(
        &self,
        vm: &str,
        sizes: &[(u32, u64)],
        overlays: &[(u32, Arc<Overlay>)],
        after: &[(u32, Vec<(u64, u64)>)],
    ) -> anyhow::Result<(crate::catalog::VmRecord, crate::vms::Vm)> {
        if self.vms.lock().contains_key(vm) {
            return Err(conflict(format!(
                "a VM named {vm} already exists on this host; remove it before completing the failover"
            )));
        }
        for (_, o) in overlays {
            nbd::BlockBackend::flush(o.as_ref()).context("flushing a failover disk")?;
        }
        let by_position: Vec<u64> = sizes.iter().map(|&(_, size)| size).collect();
        // `failover complete` shows how far the copy got (`GET /v1/progress/...`).
        let tracker = self
            .progress
            .track(Some(&crate::progress::failover_complete_id(vm)));
        let total: u64 = by_position.iter().sum();
        let (record, new_vm) = crate::vms::adopt_disks(
            &self.data_dir,
            vm,
            &by_position,
            now_unix_ns(),
            &self.disk_options,
            |position, path| {
                let index = sizes
                    .get(position as usize)
                    .map(|&(i, _)| i)
                    .ok_or_else(|| anyhow::anyhow!("{vm} has no disk at position {position}"))?;
                let o = overlays
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map(|(_, o)| o.clone())
                    .ok_or_else(|| anyhow::anyhow!("disk {index} of {vm} has no failover disk"))?;
                let before: u64 = by_position.iter().take(position as usize).sum();
                tracker.set(before, total);
                o.materialize_reporting(path, &|off| tracker.set(before + off, total))
                    .with_context(|| format!("writing disk {index} of {vm}"))?;
                Ok(())
            },
        )?;
        for (position, &(index, _)) in sizes.iter().enumerate() {
            let Some((i, o)) = overlays.iter().find(|(i, _)| *i == index) else {
                continue;
            };
            if let Some(d) = new_vm.disks.get(position) {
                d.mark_dirty_blocks(&o.written_blocks())
                    .with_context(|| format!("recording what was written to disk {i} of {vm}"))?;
                let newer = after
                    .iter()
                    .find(|(a, _)| a == i)
                    .map(|(_, r)| crate::vms::byte_ranges_to_blocks(r))
                    .unwrap_or_default();
                d.mark_dirty_blocks(&newer).with_context(|| {
                    format!("recording what the points after the failover's point changed on disk {i} of {vm}")
                })?;
            }
        }
        self.catalog
            .put(&format!("vm/{vm}"), &record)
            .context("recording the VM")?;
        Ok((record, new_vm))
    }

    /// After the relationship says FailedOver: the failover's exports and overlays go, the
    /// VM's own disks are served under the same names, and the replica's copy is dropped.
    fn finish_complete(
        self: &Arc<Self>,
        vm: &str,
        made: Option<(crate::catalog::VmRecord, crate::vms::Vm)>,
    ) -> anyhow::Result<()> {
        self.drop_failover(vm, false)?;
        if let Some((record, new_vm)) = made {
            self.install_failed_over(record, new_vm);
        }
        self.forget_replica_copy(vm)
    }

    /// Status of a VM failed over to this host (role Primary, state FailedOver).
    pub(super) fn failed_over_status(&self, vm: &str) -> Option<proto::ReplicationStatus> {
        let rel = match self.relationships.lock().get(vm) {
            Some(super::Relation::FailedOver(r)) => r.clone(),
            _ => return None,
        };
        let (health, health_reasons) = relationship::health(
            &rel,
            &relationship::HealthFacts {
                frequency_secs: u32::MAX,
                ..Default::default()
            },
            now_unix_ns(),
        );
        let disks = self
            .vms
            .lock()
            .get(vm)
            .map(|e| e.record.disks.iter().map(|d| d.index).collect())
            .unwrap_or_default();
        Some(proto::ReplicationStatus {
            vm: vm.to_string(),
            role: "Primary".into(),
            state: rel.state.name(),
            health,
            health_reasons,
            resync_reason: None,
            resync_condition: None,
            resync_condition_hyperv: None,
            peer: String::new(),
            frequency_secs: 0,
            compression: proto::Compression::None,
            disks,
            last_replication_time: rel.progress.last_cut_unix_ns.map(rfc3339_from_unix_ns),
            last_replication_unix_ns: rel.progress.last_cut_unix_ns,
            pending_bytes: 0,
            last_seq: rel.progress.last_seq.get(),
            generation: rel.progress.generation.get(),
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

    /// Makes the overlays of a failover of `rvm` at `point` and serves them. `fresh`: a new
    /// failover (its record written first); else one found in the catalog at start, whose
    /// overlays are reopened with what was flushed to them.
    fn serve_failover(
        &self,
        rvm: &ReplicaVm,
        point: Seq,
        test: bool,
        fresh: bool,
    ) -> anyhow::Result<()> {
        let vm = rvm.vm_id().to_string();
        let served_as = served_name(&vm, test);
        let record = FailoverRecord {
            version: FailoverRecord::VERSION,
            vm: vm.clone(),
            served_as: served_as.clone(),
            point: point.get(),
            test,
            disks: rvm
                .disks()
                .iter()
                .map(|d| FailoverDisk {
                    index: d.index,
                    size_bytes: d.size_bytes,
                })
                .collect(),
            created_unix_ns: now_unix_ns(),
        };
        if fresh {
            self.catalog
                .put(&FailoverRecord::key(&served_as), &record)
                .context("recording the failover")?;
        }
        let mut overlays = Vec::new();
        for d in &record.disks {
            let opened = (|| {
                let view = rvm.view(point, d.index)?;
                let dir = self.failover_dir(&served_as, d.index);
                if fresh {
                    // A directory no record names is what a failed clean-up left: discard it.
                    if dir.exists() {
                        Overlay::discard(&dir)?;
                    }
                    Overlay::create(&dir, Arc::new(view), point, d.index)
                } else {
                    Overlay::open(&dir, Arc::new(view), point, d.index)
                }
            })();
            match opened {
                Ok(o) => overlays.push((d.index, Arc::new(o))),
                Err(e) => {
                    if fresh {
                        // Nothing was served yet: leave nothing behind.
                        let _ = self.catalog.delete(&FailoverRecord::key(&served_as));
                        for (i, _) in &overlays {
                            let _ = Overlay::discard(&self.failover_dir(&served_as, *i));
                        }
                    }
                    return Err(anyhow::Error::from(e).context(format!(
                        "preparing disk {} of {served_as} over point {point}",
                        d.index
                    )));
                }
            }
        }
        // The cloud-init seed (failover network settings), made anew: a fresh failover
        // without its seed is refused; one served again after a restart goes on without it.
        if let Err(e) = self.serve_seed(&vm, &served_as, rvm.generation().get(), point.get()) {
            if fresh {
                let _ = self.catalog.delete(&FailoverRecord::key(&served_as));
                for (i, _) in &overlays {
                    let _ = Overlay::discard(&self.failover_dir(&served_as, *i));
                }
                return Err(e.context(format!("preparing the cloud-init seed of {served_as}")));
            }
            self.events.emit(
                events::FAILOVER_STOPPED,
                Some(&vm),
                "error",
                &format!(
                    "the cloud-init seed of {served_as} could not be made again after the restart: {}",
                    crate::errfmt::one_line(&e)
                ),
            );
        }
        self.export_overlays(&served_as, &overlays);
        self.failovers
            .lock()
            .served
            .insert(served_as, Served { record, overlays });
        Ok(())
    }

    /// Serves a failover's overlays as the NBD exports of `served_as` (`<served_as>-<disk>`).
    fn export_overlays(&self, served_as: &str, overlays: &[(u32, Arc<Overlay>)]) {
        for (i, o) in overlays {
            let backend: Arc<dyn nbd::BlockBackend> = o.clone();
            self.exports.add_with_description(
                crate::vms::export_name(served_as, *i),
                format!("{served_as} disk {i} (failover)"),
                backend,
            );
        }
    }

    /// Ends the failover of `vm` served as `served_name(vm, test)`: the record first, then the
    /// exports (and the connections using them), then the overlays.
    fn drop_failover(&self, vm: &str, test: bool) -> anyhow::Result<()> {
        let served_as = served_name(vm, test);
        self.catalog
            .delete(&FailoverRecord::key(&served_as))
            .context("forgetting the failover")?;
        if let Some(served) = self.failovers.lock().served.remove(&served_as) {
            for (i, _) in &served.overlays {
                let name = crate::vms::export_name(&served_as, *i);
                self.exports.remove(&name);
                if let Some(server) = self.nbd.lock().as_ref() {
                    server.close_export_connections(&name);
                }
            }
            // A closed connection's thread lets go of its disk a moment later: wait (bounded)
            // until this is the last holder, so the overlay can be discarded.
            let deadline = std::time::Instant::now() + OVERLAY_RELEASE_WAIT;
            while served
                .overlays
                .iter()
                .any(|(_, o)| Arc::strong_count(o) > 1)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        for i in 0..crate::vms::DISKS_PER_VM_MAX as u32 {
            let dir = self.failover_dir(&served_as, i);
            if dir.exists() {
                Overlay::discard(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        self.drop_seed(&served_as)?;
        let _ = std::fs::remove_dir(self.data_dir.join("failover").join(&served_as));
        Ok(())
    }

    /// After a start, when replica VM `rvm` is open: serves again the failovers the catalog
    /// records for it (before retention may fold the point under them). A failover that cannot
    /// be served again is reported, never silently dropped.
    pub(super) fn reopen_failovers(&self, rvm: &ReplicaVm) {
        // One replica event at a time: a `failover start` or `stop` arriving right after the
        // start waits for this instead of racing it.
        let _in_order = self.replica_events.lock();
        let vm = rvm.vm_id().to_string();
        let records: Vec<FailoverRecord> = match self.catalog.scan("failover/") {
            Ok(r) => r
                .into_iter()
                .map(|(_, r): (String, FailoverRecord)| r)
                .filter(|r| r.vm == vm)
                .collect(),
            Err(e) => {
                tracing::error!(%vm, "reading failover records: {e:#}");
                return;
            }
        };
        let rel = match self.relationships.lock().get(&vm) {
            Some(super::Relation::Replica(r)) | Some(super::Relation::FailedOver(r)) => {
                Some(r.clone())
            }
            _ => None,
        };
        if rel.as_ref().is_some_and(|r| r.state == State::FailedOver) {
            // A completion cut short after the relationship said FailedOver: its failover
            // disks and the replica's copy go now (the VM's own disks are served already).
            tracing::warn!(%vm, "failover completion was interrupted; finishing it");
            // Whether or not its record is still there (a crash in the middle of dropping it
            // leaves the directories alone otherwise).
            if let Err(e) = self.drop_failover(&vm, false) {
                tracing::error!(%vm, "finishing an interrupted completion: {e:#}");
            }
            if let Err(e) = self.forget_replica_copy(&vm) {
                tracing::error!(%vm, "finishing an interrupted completion: {e:#}");
            }
            return;
        }
        // The failovers the relationship says exist; a record it does not name is a start
        // cut short before it became durable, and is rolled back.
        let expected: Option<(Seq, bool)> = rel.and_then(|r| match r.state {
            State::FailedOverWaitingCompletion { point } => Some((point, false)),
            State::TestFailoverInProgress { point, .. } => Some((point, true)),
            _ => None,
        });
        let recorded = records
            .iter()
            .any(|r| expected == Some((Seq(r.point), r.test)));
        for r in records {
            if self.failovers.lock().served.contains_key(&r.served_as) {
                continue;
            }
            if expected != Some((Seq(r.point), r.test)) {
                tracing::warn!(%vm, served_as = %r.served_as, "rolling back a failover start cut short");
                if let Err(e) = self.drop_failover(&r.vm, r.test) {
                    tracing::error!(%vm, "rolling back a failover start: {e:#}");
                }
                continue;
            }
            if !r.test && self.vms.lock().contains_key(&r.vm) {
                // A completion cut short after the VM's own disks were written and recorded:
                // those are served; `failover complete` finishes it.
                tracing::warn!(%vm, "failover completion was interrupted; run `failover complete` again");
                continue;
            }
            match self.serve_failover(rvm, Seq(r.point), r.test, false) {
                Ok(()) => tracing::info!(%vm, served_as = %r.served_as, "failover served again"),
                Err(e) => self.events.emit(
                    events::FAILOVER_STOPPED,
                    Some(&vm),
                    "error",
                    &format!(
                        "{} could not be served again after the restart: {}",
                        r.served_as,
                        crate::errfmt::one_line(&e)
                    ),
                ),
            }
        }
        // The relationship names a failover whose record is gone: a `failover stop`, or a
        // `failover start` at another point, cut short after it dropped the record (and maybe
        // the overlays) and before the relationship moved on. What was written is discarded
        // already (the command's first step); the point is served afresh, so that the state
        // the relationship says is true and the next `failover start/stop/complete` works.
        if let Some((point, test)) = expected.filter(|_| !recorded) {
            let served_as = served_name(&vm, test);
            if self.failovers.lock().served.contains_key(&served_as)
                || (!test && self.vms.lock().contains_key(&vm))
            {
                return;
            }
            tracing::warn!(%vm, %served_as, "a failover stop or start was cut short; serving point {point} afresh");
            match self.serve_failover(rvm, point, test, true) {
                Ok(()) => self.events.emit(
                    events::FAILOVER_STARTED,
                    Some(&vm),
                    "warning",
                    &format!(
                        "{served_as} served afresh at point {point} after a `failover stop` or `failover start` cut short by the restart: what was written to its disks is gone"
                    ),
                ),
                Err(e) => self.events.emit(
                    events::FAILOVER_STOPPED,
                    Some(&vm),
                    "error",
                    &format!(
                        "{served_as} could not be served again after the restart: {}",
                        crate::errfmt::one_line(&e)
                    ),
                ),
            }
        }
    }

    /// Drops the replica store's copy of a VM that a completed failover made a primary VM of
    /// this host, and the record of which primary owned it.
    fn forget_replica_copy(&self, vm: &str) -> anyhow::Result<()> {
        if let (Some((store, _)), Ok(name)) = (self.replica_store(), proto::VmName::parse(vm)) {
            if store.vm(&name).is_some() || store.is_pending(&name) {
                store
                    .remove_vm(&name)
                    .with_context(|| format!("dropping the replica's copy of {vm}"))?;
            }
        }
        let _ = self.catalog.delete(&format!("replica-owner/{vm}"));
        Ok(())
    }

    /// `vm show` of a failover's disks.
    pub(super) fn failover_vm_info(&self, served_as: &str) -> Option<VmInfo> {
        let failovers = self.failovers.lock();
        let s = failovers.served.get(served_as)?;
        let r = &s.record;
        Some(VmInfo {
            name: served_as.to_string(),
            created_at: rfc3339_from_unix_ns(r.created_unix_ns),
            replication_role: if r.test { "TestFailover" } else { "FailedOver" }.into(),
            disks: r
                .disks
                .iter()
                .map(|d| {
                    let dir = self.failover_dir(served_as, d.index);
                    self.disk_info(
                        served_as,
                        d.index,
                        d.size_bytes,
                        &dir.display().to_string(),
                        false,
                    )
                })
                .collect(),
            broken: None,
            guest_agent: None,
            pre_freeze_hook: None,
            post_thaw_hook: None,
            launch: None,
            failover_network: self.failover_network(&r.vm).ok().flatten(),
            seed: self.seed_info(served_as),
        })
    }

    /// What `failover start` answers: the served name, the point, and a writable `nbd_uri`
    /// per disk.
    fn failover_info(&self, served_as: &str) -> anyhow::Result<FailoverInfo> {
        let info = self
            .failover_vm_info(served_as)
            .ok_or_else(|| not_found(format!("no failover served as {served_as}")))?;
        let failovers = self.failovers.lock();
        let r = &failovers
            .served
            .get(served_as)
            .ok_or_else(|| not_found(format!("no failover served as {served_as}")))?
            .record;
        Ok(FailoverInfo {
            vm: r.vm.clone(),
            served_as: served_as.to_string(),
            point: r.point,
            test: r.test,
            disks: info.disks,
            launched: None,
            launch_failed: false,
            seed: info.seed,
        })
    }

    /// The served names of every failover on this host.
    pub(super) fn failover_names(&self) -> Vec<String> {
        self.failovers.lock().served.keys().cloned().collect()
    }
}
