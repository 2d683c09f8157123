//! The primary side of a replication relationship: one task per replicating VM. It holds the
//! relationship (`relationship::Relationship`, the pure core's state) and the VM's replication
//! settings, feeds every command and every fact of a cycle to `relationship::step`, and
//! executes the actions it returns: take a cut every `frequency` seconds (or on demand), stream
//! the delta to the replica, persist, log. The core decides; this module only does.
//!
//! The guest is never involved beyond the tracker's bounded pause at the cut: a slow or dead
//! replica only makes the next cut bigger (aborted cuts merge back into the live bitmap).
//! This task never touches disk files directly; it reads through the tracker's frozen view.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::peer_client::PeerRefusal;
use anyhow::{anyhow, Context};
use delta::{Compression, DeltaHeader, DeltaKind, DiskEntry};
use parking_lot::Mutex;
use proto::peer::{DeltaReply, Hello};
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{Measure, Progress, ReplicationState, ReplicationStatus, Seq, SyncResult};
use relationship::{
    Action, CycleKind, Event, EventKind, HealthFacts, PeerRefusalFacts, RefusalKind, Relationship,
    State,
};
use tokio::sync::{mpsc, oneshot};

use crate::catalog::{RelationshipDoc, ReplicationRecord};
use crate::events;
use crate::resync_cursor::{
    ResyncCursor, RESYNC_CURSOR_RANGES_MAX, RESYNC_CURSOR_SAVE_EVERY, RESYNC_WINDOW_BYTES,
};
use crate::vms::Vm;
use crate::Shared;

/// Commands a replication task accepts (the API's only way in).
pub enum Cmd {
    Start(oneshot::Sender<anyhow::Result<()>>),
    /// `replication start --use-existing`, once the replica adopted the copy as point 1
    /// ([`start_from_existing`]).
    StartFromExisting(oneshot::Sender<anyhow::Result<()>>),
    /// `replication start --at TIME`.
    StartAt {
        at_unix_ns: u64,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    Sync(oneshot::Sender<anyhow::Result<SyncResult>>),
    Suspend(oneshot::Sender<anyhow::Result<()>>),
    Resume {
        /// Resynchronize: now (`at_unix_ns` None or past) or at that time.
        resync: bool,
        at_unix_ns: Option<u64>,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    Shutdown(oneshot::Sender<()>),
    /// `replication resync-cancel`: stop the resynchronization's cycle, make sure its upload
    /// stopped on the replica (and learn whether its point had committed), then back to
    /// `ResynchronizationRequired`.
    ResyncCancel(oneshot::Sender<anyhow::Result<()>>),
    /// `failover prepare`: fence the VM (no NBD client may use its disks), ship every last
    /// change and wait until the replica committed it; then PreparedForFailover.
    Prepare(oneshot::Sender<anyhow::Result<()>>),
    /// The settings changed (`replication set`): cycle now (its hello carries a new history
    /// policy) and schedule the next ones with the new frequency.
    Reschedule,
    /// An event was fed to the core outside this task (a storage failure seen by a status
    /// read): what it asked of the loop.
    Followup {
        cancel_cycle: bool,
        say_hello: bool,
    },
}

/// Bound on queued commands per VM; API calls beyond it get a transient refusal.
const CMD_QUEUE: usize = 16;
/// A `sync` that finds the cycle in flight stalled (the replica took no data and gave no answer)
/// for this long is refused at once (transient, exit 75) rather than queued behind it: the
/// API answers within seconds even when the replica's storage hangs.
const SYNC_STALL_REFUSAL: Duration = Duration::from_secs(5);
/// Retry delays after a failed cycle: capped exponential backoff.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a task waiting for a scheduled resynchronization checks the time (the core
/// starts it at the first tick at or after its time).
const TICK: Duration = Duration::from_secs(1);
/// How long `resync-cancel` waits for the replica to say where the cancelled upload stands
/// (`partial`, then a hello), in all: a cancel is often run because the link is bad, and must
/// not wait out two hello deadlines (docs/limits.md).
const CANCEL_ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a state change the replica has not heard of yet is told again (a hello): in the
/// states without cycles nothing else would tell it.
const HELLO_RETRY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    since_ns: u64,
    ok: u64,
    failed: u64,
    consecutive_failures: u64,
    delta_bytes_total: u64,
    delta_bytes_max: u64,
    sent_bytes_total: u64,
    latency_ms_total: u64,
    latency_ms_max: u64,
    cut_pause_us_max: u64,
    resumed_uploads: u64,
    resumed_bytes: u64,
    app_ok: u64,
    app_failures: u64,
    app_consecutive_failures: u64,
    resynchronized_bytes: u64,
    resync_compared_bytes: u64,
    resync_hash_bytes: u64,
    /// When the first of `consecutive_failures` failed (unix ns).
    failing_since_ns: Option<u64>,
}

struct Runtime {
    /// What is replicated and how (`replication enable/set`).
    settings: ReplicationRecord,
    /// The relationship: one state, the points' progress (the core's).
    rel: Relationship,
    last_error: Option<String>,
    /// Why the last application-consistent cut fell back to crash-consistent.
    app_error: Option<String>,
    counters: Counters,
}

/// Shared view of one VM's replication, read by the API and driven by its task.
pub struct Replication {
    pub vm: Arc<Vm>,
    rt: Mutex<Runtime>,
    progress_done: AtomicU64,
    progress_total: AtomicU64,
    /// When the current cycle's progress started counting (unix ns): the rate shown.
    progress_since_ns: AtomicU64,
    /// Resynchronization counters for `replication status` (`resync` object): the resync
    /// engine bumps them as it goes (blocks compared with the replica's hashes, bytes put on
    /// the wire for the resynchronization); reset to 0 when a resynchronization starts.
    pub resync_compared_blocks: AtomicU64,
    pub resync_sent_bytes: AtomicU64,
    /// What the resynchronization cursor last persisted records as compared (bytes).
    pub resync_cursor_bytes: AtomicU64,
    /// When the running resynchronization started (unix ns; at spawn for one found running
    /// at daemon start); 0 when none runs.
    resync_started_ns: AtomicU64,
    /// When the cycle in flight last saw the replica take data or the cycle started (unix ns):
    /// a `sync` that arrives while it has been stalled longer than [`SYNC_STALL_REFUSAL`] is
    /// refused at once instead of waiting for the deadlines.
    last_progress_ns: Arc<AtomicU64>,
    cmd: mpsc::Sender<Cmd>,
    /// Held for a whole [`Replication::apply`]: two events are never stepped from the same
    /// relationship (the task's own and one fed from outside it).
    apply_lock: Mutex<()>,
    /// The replica has not confirmed the latest state change yet (a hello failed).
    hello_owed: Arc<std::sync::atomic::AtomicBool>,
    /// A resynchronization cursor may be in the catalog (`resync.md`, "The cursor"): deleted
    /// once the relationship leaves the resynchronization otherwise than by suspending it.
    cursor_kept: std::sync::atomic::AtomicBool,
    /// The replica refused a compared `Full` point (`damaged`: damage it found after the
    /// compare began): the next resynchronization sends every block, which repairs it.
    send_every_block: std::sync::atomic::AtomicBool,
    /// The VM's disks were recovered from their activity logs at start (an unclean stop):
    /// the first cycle compares the recovered extents with the replica instead of sending
    /// them whole. Cleared by the first committed point.
    compare_after_crash: std::sync::atomic::AtomicBool,
}

/// What the loop must do after an event (the actions the executor does not run itself).
#[derive(Default)]
struct LoopActions {
    cancel_cycle: bool,
    cycle_now: bool,
    say_hello: bool,
    start_cycle: Option<Plan>,
    take_cut: Option<Plan>,
}

/// The seq and kind of a cut the core asked for.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seq: Seq,
    kind: CycleKind,
    hello_first: bool,
}

impl Replication {
    /// `thaw_agent`: the guest agent socket of a VM opened at daemon start, asked before the
    /// first cycle to thaw a guest that a previous run left frozen. `first`: events fed to the
    /// core before anything else (what the daemon found at start).
    pub fn spawn(
        shared: Arc<Shared>,
        vm: Arc<Vm>,
        settings: ReplicationRecord,
        rel: Relationship,
        thaw_agent: Option<String>,
        first: Vec<Event>,
    ) -> Arc<Replication> {
        let (tx, rx) = mpsc::channel(CMD_QUEUE);
        let mut rel = rel;
        // A setting of the VM's replication (catalog), held by the core.
        rel.auto_resync = settings.auto_resync();
        let resyncing_at_start = matches!(rel.state, State::Resynchronizing { .. });
        let recovered = settings.disks.iter().any(|&i| {
            matches!(
                vm.open_states.get(i as usize),
                Some(tracker::OpenState::RecoveredFromActivityLog { .. })
            )
        });
        let repl = Arc::new(Replication {
            vm,
            rt: Mutex::new(Runtime {
                settings,
                rel,
                last_error: None,
                app_error: None,
                counters: Counters {
                    since_ns: now_unix_ns(),
                    ..Default::default()
                },
            }),
            progress_done: AtomicU64::new(0),
            progress_total: AtomicU64::new(0),
            progress_since_ns: AtomicU64::new(0),
            resync_compared_blocks: AtomicU64::new(0),
            resync_sent_bytes: AtomicU64::new(0),
            resync_cursor_bytes: AtomicU64::new(0),
            resync_started_ns: AtomicU64::new(if resyncing_at_start { now_unix_ns() } else { 0 }),
            last_progress_ns: Arc::new(AtomicU64::new(0)),
            cmd: tx,
            apply_lock: Mutex::new(()),
            hello_owed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            cursor_kept: std::sync::atomic::AtomicBool::new(true),
            send_every_block: std::sync::atomic::AtomicBool::new(false),
            compare_after_crash: std::sync::atomic::AtomicBool::new(recovered),
        });
        // What the daemon found at start is the relationship's state before anyone can read
        // it (a status right after the start shows a resynchronization required at once).
        for event in first {
            match repl.apply(&shared, event) {
                Ok(a) if a.say_hello => repl.hello_owed.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => tracing::error!(vm = %repl.vm.name, "at start: {e:#}"),
            }
        }
        // The replica hears this host's state once after every start (a state without cycles,
        // prepared or suspended, would otherwise never be told if the daemon stopped before
        // its hello went out).
        repl.hello_owed.store(true, Ordering::Relaxed);
        tokio::spawn(run(shared, repl.clone(), rx, thaw_agent));
        repl
    }

    pub async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd.try_send(make(tx)).map_err(|_| {
            crate::error::transient(format!("replication of {} is busy; retry", self.vm.name))
        })?;
        rx.await
            .map_err(|_| anyhow!("replication of {} stopped", self.vm.name))
    }

    /// The settings (what is replicated and how).
    pub fn record(&self) -> ReplicationRecord {
        self.rt.lock().settings.clone()
    }

    /// The relationship as the core holds it.
    pub fn relationship(&self) -> Relationship {
        self.rt.lock().rel.clone()
    }

    pub fn state(&self) -> ReplicationState {
        self.rt.lock().rel.state.name()
    }

    pub fn pending_bytes(&self, disks: &[u32]) -> u64 {
        disks
            .iter()
            .filter_map(|&i| self.vm.disks.get(i as usize))
            .map(|d| d.dirty_bytes())
            .sum()
    }

    pub fn status(&self) -> ReplicationStatus {
        let rt = self.rt.lock();
        let (r, rel) = (&rt.settings, &rt.rel);
        let (health, health_reasons) = relationship::health(
            rel,
            &HealthFacts {
                frequency_secs: r.frequency_secs,
                consecutive_failures: rt.counters.consecutive_failures,
                last_error: rt.last_error.as_deref(),
                app_consistent_failures: rt.counters.app_consecutive_failures,
                app_consistent_error: rt.app_error.as_deref(),
                failing_since_unix_ns: rt.counters.failing_since_ns,
                lag_warning_cycles: r.lag_warning_cycles,
            },
            now_unix_ns(),
        );
        let total = self.progress_total.load(Ordering::Relaxed);
        let done = self.progress_done.load(Ordering::Relaxed).min(total);
        let mut st = status_of(
            &self.vm.name,
            r,
            rel,
            health,
            health_reasons,
            self.pending_bytes(&r.disks),
            (total > 0).then_some(Progress {
                done_bytes: done,
                total_bytes: total,
            }),
            rt.last_error.clone(),
        );
        if matches!(rel.state, State::Resynchronizing { .. }) {
            st.resync = Some(resync_progress(
                total,
                done,
                self.resync_compared_blocks.load(Ordering::Relaxed),
                self.resync_sent_bytes.load(Ordering::Relaxed),
                self.progress_since_ns.load(Ordering::Relaxed),
                self.resync_started_ns.load(Ordering::Relaxed),
                now_unix_ns(),
            ));
            if let Some(r) = st.resync.as_mut() {
                r.cursor_bytes = self.resync_cursor_bytes.load(Ordering::Relaxed);
            }
        }
        st
    }

    /// `replication set`: applies settings already checked by the caller, persists them, and
    /// says hello so the replica learns a new history policy. The
    /// next cycle uses the new frequency and compression; nothing else changes (no new initial
    /// replication). A new auto-resynchronize setting goes to the core, which schedules a
    /// resynchronization already required when it turns on.
    pub fn set(
        &self,
        shared: &Shared,
        frequency_secs: Option<u32>,
        compression: Option<proto::Compression>,
        history: Option<proto::HistoryPolicy>,
        auto: Option<(Option<bool>, Option<Option<relationship::ResyncWindow>>)>,
        lag_warning_cycles: Option<u32>,
    ) -> anyhow::Result<()> {
        {
            // Under the apply lock: a step in progress persists the settings it read.
            let _one_at_a_time = self.apply_lock.lock();
            {
                let mut rt = self.rt.lock();
                if let Some(f) = frequency_secs {
                    rt.settings.frequency_secs = f;
                }
                if let Some(c) = compression {
                    rt.settings.compression = c;
                }
                if history.is_some() {
                    rt.settings.history = history;
                }
                if let Some(n) = lag_warning_cycles {
                    rt.settings.lag_warning_cycles = (n > 0).then_some(n);
                }
                if let Some((on, window)) = auto {
                    if let Some(on) = on {
                        rt.settings.auto_resynchronize = on;
                    }
                    if let Some(window) = window {
                        rt.settings.resynchronize_window = window;
                    }
                }
            }
            self.persist_current(shared)?;
        }
        if auto.is_some() {
            let auto = self.rt.lock().settings.auto_resync();
            if let Err(e) = self.apply(shared, Event::SetAutoResync { auto }) {
                // The setting is saved; only scheduling a required resynchronization failed
                // (it could not be persisted): the core still holds the new setting.
                let _one_at_a_time = self.apply_lock.lock();
                self.rt.lock().rel.auto_resync = auto;
                return Err(e);
            }
        }
        // The task says hello (the replica learns a new history policy at once) and cycles
        // with the new frequency. A full queue means commands are pending; the hello owed
        // and the next cycle still carry the new values.
        if self.cmd.try_send(Cmd::Reschedule).is_err() {
            self.hello_owed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `replication reset-statistics`: `measure` counts from now, and the failures in a row
    /// (and the Warning they raise) are forgotten, like Hyper-V's
    /// `Reset-VMReplicationStatistics`. The Prometheus counters are not touched (they never
    /// go backwards).
    pub fn reset_statistics(&self) {
        self.rt.lock().counters = Counters {
            since_ns: now_unix_ns(),
            ..Default::default()
        };
    }

    pub fn measure(&self) -> Measure {
        let st = self.status();
        let rt = self.rt.lock();
        let c = &rt.counters;
        Measure {
            vm: st.vm,
            state: st.state,
            health: st.health,
            measuring_since: rfc3339_from_unix_ns(c.since_ns),
            successful_cycles: c.ok,
            failed_cycles: c.failed,
            average_delta_bytes: c.delta_bytes_total.checked_div(c.ok).unwrap_or(0),
            maximum_delta_bytes: c.delta_bytes_max,
            sent_bytes_total: c.sent_bytes_total,
            resynchronized_bytes_total: c.resynchronized_bytes,
            resync_compared_bytes_total: c.resync_compared_bytes,
            resync_hash_bytes_total: c.resync_hash_bytes,
            average_latency_ms: c.latency_ms_total.checked_div(c.ok).unwrap_or(0),
            maximum_latency_ms: c.latency_ms_max,
            maximum_cut_pause_us: c.cut_pause_us_max,
            cbw_copied_bytes_total: self.vm.disks.iter().map(|d| d.cbw_copied_bytes()).sum(),
            cbw_spilled_bytes_total: self.vm.disks.iter().map(|d| d.cbw_spilled_bytes()).sum(),
            resumed_uploads_total: c.resumed_uploads,
            resumed_bytes_total: c.resumed_bytes,
            app_consistent_points_total: c.app_ok,
            app_consistent_failures_total: c.app_failures,
            last_replication_time: st.last_replication_time,
            pending_bytes: st.pending_bytes,
        }
    }

    fn persist_current(&self, shared: &Shared) -> anyhow::Result<()> {
        let (rel, settings) = {
            let rt = self.rt.lock();
            (rt.rel.clone(), rt.settings.clone())
        };
        let doc = RelationshipDoc::new(&rel, Some(settings));
        off_runtime(|| shared.save_relationship(&self.vm.name, &doc))
    }

    /// A resynchronization started (its counters start from 0) or ended (none runs).
    fn note_resync(&self, before: &State, after: &State) {
        let was = matches!(before, State::Resynchronizing { .. });
        let is = matches!(after, State::Resynchronizing { .. });
        if is && !was {
            self.resync_compared_blocks.store(0, Ordering::Relaxed);
            self.resync_sent_bytes.store(0, Ordering::Relaxed);
            self.resync_started_ns
                .store(now_unix_ns(), Ordering::Relaxed);
        } else if was && !is {
            self.resync_started_ns.store(0, Ordering::Relaxed);
        }
    }

    /// Where the replica stands is unknown (a cycle failed or was cancelled): the next cycle
    /// asks first. An in-memory fact, set under the apply lock so no step in progress
    /// overwrites it.
    fn mark_need_hello(&self) {
        let _one_at_a_time = self.apply_lock.lock();
        self.rt.lock().rel.need_hello = true;
    }

    /// The replica host said it failed the VM over (`failed_over` to a hello outside a
    /// cycle): the core fences the VM; the task then cancels a cycle in flight.
    pub(crate) fn replica_failed_over(&self, shared: &Shared, reason: String) {
        match self.apply(shared, Event::ReplicaFailedOver { reason }) {
            Ok(a) if a.cancel_cycle => {
                let _ = self.cmd.try_send(Cmd::Followup {
                    cancel_cycle: true,
                    say_hello: false,
                });
            }
            Ok(_) => {}
            Err(e) => tracing::error!(vm = %self.vm.name, "recording a failover elsewhere: {e:#}"),
        }
    }

    /// The VM's storage failed for good: the core makes the relationship require a
    /// resynchronization at once (a status read right after shows it); the task then cancels
    /// a cycle in flight and tells the replica.
    pub(crate) fn require_resync(&self, shared: &Shared, reason: String) {
        if matches!(
            self.rt.lock().rel.state,
            State::ResynchronizationRequired { .. }
        ) {
            return;
        }
        match self.apply(shared, Event::StorageFailed { reason }) {
            Ok(a) if a.cancel_cycle || a.say_hello => {
                let sent = self.cmd.try_send(Cmd::Followup {
                    cancel_cycle: a.cancel_cycle,
                    say_hello: a.say_hello,
                });
                if sent.is_err() {
                    // The queue is full: the cycle in flight finds the core refusing its cut
                    // or commit; the replica is told at the next retry.
                    self.hello_owed.store(true, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(vm = %self.vm.name, "recording a storage failure: {e:#}"),
        }
    }

    /// Feeds one event to the core and executes what it says: scans, persisting, events and
    /// giving memory back here; what concerns the cycle and the schedule is returned to the
    /// loop. The new relationship is installed only if every action up to and including
    /// `Persist` succeeded; a refusal changes nothing and comes back as a typed error.
    fn apply(&self, shared: &Shared, event: Event) -> anyhow::Result<LoopActions> {
        let _one_at_a_time = self.apply_lock.lock();
        let (current, settings) = {
            let rt = self.rt.lock();
            (rt.rel.clone(), rt.settings.clone())
        };
        let (next, actions) =
            relationship::step(&current, event, now_unix_ns()).map_err(|r| match r.kind {
                RefusalKind::Conflict => crate::error::conflict(r.message),
                RefusalKind::Invalid => crate::error::bad_request(r.message),
            })?;
        let mut out = LoopActions::default();
        let mut installed = false;
        for action in actions {
            match action {
                Action::MarkAllocatedDirty => {
                    for &i in &settings.disks {
                        if let Some(d) = self.vm.disks.get(i as usize) {
                            off_runtime(|| d.mark_allocated_dirty()).with_context(|| {
                                format!("scanning disk {i} of {}", self.vm.name)
                            })?;
                        }
                    }
                }
                Action::MarkAllDirty => {
                    for &i in &settings.disks {
                        if let Some(d) = self.vm.disks.get(i as usize) {
                            d.mark_all_dirty().with_context(|| {
                                format!(
                                    "marking disk {i} of {} for a full resynchronization",
                                    self.vm.name
                                )
                            })?;
                        }
                    }
                }
                Action::Persist => {
                    let doc = RelationshipDoc::new(&next, Some(settings.clone()));
                    off_runtime(|| shared.save_relationship(&self.vm.name, &doc))?;
                    self.rt.lock().rel = next.clone();
                    installed = true;
                    self.note_resync(&current.state, &next.state);
                }
                Action::Emit { kind, message } => {
                    shared
                        .events
                        .emit(event_id(kind), Some(&self.vm.name), kind.level(), &message);
                }
                Action::ReleaseCopyBeforeWrite => {
                    for d in &self.vm.disks {
                        d.release_cbw_memory();
                    }
                }
                // A prepare was cancelled (or lost to a divergence): the VM's disks are
                // served again.
                Action::Unfence => shared.unfence_vm(&self.vm),
                // The replica host failed the VM over: nothing here may take writes.
                Action::Fence => shared.fence_vm_now(&self.vm),
                Action::ServeFailover { .. }
                | Action::DropFailover { .. }
                | Action::CompleteFailover { .. } => {
                    return Err(anyhow!(
                        "{}: a failover action reached the primary's task (a replica-side step)",
                        self.vm.name
                    ))
                }
                Action::CancelCycle => out.cancel_cycle = true,
                Action::ScheduleCycleNow => out.cycle_now = true,
                Action::SayHello => out.say_hello = true,
                Action::StartCycle {
                    seq,
                    kind,
                    hello_first,
                } => {
                    out.start_cycle = Some(Plan {
                        seq,
                        kind,
                        hello_first,
                    })
                }
                Action::TakeCut { seq, kind } => {
                    out.take_cut = Some(Plan {
                        seq,
                        kind,
                        hello_first: false,
                    })
                }
            }
        }
        if !installed {
            // In-memory changes only (where the replica stands is unknown, ...).
            self.rt.lock().rel = next;
        } else if !keeps_resync_cursor(&next.state)
            && self.cursor_kept.swap(false, Ordering::AcqRel)
        {
            // The resynchronization committed, was cancelled, or is required again: the
            // next one starts over. A cursor left behind is harmless (every block is marked
            // dirty when a resynchronization starts), so a failure is only logged.
            if let Err(e) = off_runtime(|| shared.delete_resync_cursor(&self.vm.name)) {
                tracing::warn!(vm = %self.vm.name, "removing the resynchronization cursor: {e:#}");
            }
        }
        Ok(out)
    }
}

/// States in which a resynchronization may continue from its cursor: running, or suspended
/// to resume it.
fn keeps_resync_cursor(state: &State) -> bool {
    matches!(
        state,
        State::Resynchronizing { .. }
            | State::Suspended {
                resume_to: relationship::Resumable::Resynchronizing
            }
    )
}

/// Before a resynchronization's cut: marks dirty what its compare still has to cover (from
/// the cursor when it continues one, else every block) and returns the cursor the cycle goes
/// on with. Blocking (the marks are made durable).
fn resync_marks(
    shared: &Shared,
    repl: &Replication,
    record: &ReplicationRecord,
    generation: u64,
    seq: Seq,
) -> anyhow::Result<ResyncCursor> {
    let vm = &repl.vm.name;
    let base = seq.get().saturating_sub(1);
    let disks: Vec<(u32, u64)> = record
        .disks
        .iter()
        .filter_map(|&i| repl.vm.disks.get(i as usize).map(|d| (i, d.size_bytes())))
        .collect();
    let found = shared.load_resync_cursor(vm);
    let continues = found
        .as_ref()
        .is_some_and(|c| c.continues(&record.replication_id, generation, base, &disks));
    let cursor = match found {
        Some(c) if continues => c,
        _ => ResyncCursor::fresh(&record.replication_id, generation, base, &disks),
    };
    for d in &cursor.disks {
        let Some(disk) = repl.vm.disks.get(d.index as usize) else {
            continue;
        };
        if continues {
            let blocks: Vec<std::ops::Range<u64>> = d
                .to_mark()
                .iter()
                .map(|&(o, l)| o / tracker::BLOCK_BYTES..(o + l).div_ceil(tracker::BLOCK_BYTES))
                .collect();
            disk.mark_dirty_blocks(&blocks)
        } else {
            disk.mark_all_dirty()
        }
        .with_context(|| format!("marking disk {} of {vm} for the resynchronization", d.index))?;
    }
    repl.cursor_kept.store(true, Ordering::Release);
    repl.resync_cursor_bytes
        .store(cursor.compared_bytes(), Ordering::Relaxed);
    Ok(cursor)
}

/// Whether `resync-cancel` has something to cancel (the core refuses it otherwise).
fn resync_may_cancel(state: &State) -> bool {
    matches!(
        state,
        State::Resynchronizing { .. }
            | State::WaitingForStartResynchronize { .. }
            | State::Suspended {
                resume_to: relationship::Resumable::Resynchronizing
            }
    )
}

/// After the primary dropped the upload of `seq`: makes sure the replica's side of it stopped
/// too (the `partial` call cuts a running upload off and waits until it was kept or
/// committed, `peer-protocol.md`), then asks where the replica stands (a hello). `None` when
/// it cannot be asked: the cancel goes on (the link being down is a reason to cancel).
async fn replica_after_upload(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    seq: Seq,
) -> Option<(Seq, proto::Generation)> {
    let (settings, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    let peer = shared
        .peer(&settings.replica, settings.replica_name.as_deref())
        .ok()?;
    // Its answer (kept or not) does not matter: only that the upload ended there.
    let _ = crate::peer_client::partial(&peer, &repl.vm.name, seq, &shared.peer_timeouts).await;
    let hello = hello_of(shared, &repl.vm, &settings, &rel);
    match crate::peer_client::hello(&peer, &hello, &shared.peer_timeouts).await {
        Ok(reply) => Some((reply.latest_seq, reply.generation)),
        Err(e) => {
            tracing::info!(vm = %repl.vm.name, "resync-cancel could not ask the replica where it stands: {e:#}");
            None
        }
    }
}

/// The `resync` object of `replication status`: from the current cycle's progress and the
/// engine's counters. The rate is over the current pass (`since_ns`: when its progress
/// started counting); the ETA follows from it.
pub fn resync_progress(
    total: u64,
    done: u64,
    compared_blocks: u64,
    sent_bytes: u64,
    since_ns: u64,
    started_ns: u64,
    now_ns: u64,
) -> proto::ResyncProgress {
    let elapsed_ms = now_ns.saturating_sub(since_ns) / 1_000_000;
    let rate = if since_ns > 0 && total > 0 && elapsed_ms > 0 {
        u64::try_from(u128::from(done) * 1000 / u128::from(elapsed_ms)).unwrap_or(u64::MAX)
    } else {
        0
    };
    proto::ResyncProgress {
        bytes_total: total,
        bytes_done: done,
        blocks_compared: compared_blocks,
        bytes_sent: sent_bytes,
        rate_bytes_per_sec: rate,
        eta_secs: (rate > 0).then(|| total.saturating_sub(done).div_ceil(rate)),
        started_at: rfc3339_from_unix_ns(if started_ns > 0 { started_ns } else { now_ns }),
        cursor_bytes: 0,
    }
}

/// The event id of what the core reports (`docs/events.md`).
fn event_id(kind: EventKind) -> u32 {
    match kind {
        EventKind::InitialStarted => events::INITIAL_STARTED,
        EventKind::InitialScheduled => events::INITIAL_SCHEDULED,
        EventKind::InitialDone => events::INITIAL_DONE,
        EventKind::Suspended => events::SUSPENDED,
        EventKind::Resumed => events::RESUMED,
        EventKind::ResyncRequired => events::RESYNC_REQUIRED,
        EventKind::AnswerLostAdopted => events::ANSWER_LOST_ADOPTED,
        EventKind::ResyncScheduled => events::RESYNC_SCHEDULED,
        EventKind::ResyncStarted => events::RESYNC_STARTED,
        EventKind::ResyncDone => events::RESYNC_DONE,
        EventKind::ResyncCancelled => events::RESYNC_CANCELLED,
        EventKind::CycleFailed => events::CYCLE_FAILED,
        EventKind::TestFailoverStarted | EventKind::FailoverStarted => events::FAILOVER_STARTED,
        EventKind::TestFailoverStopped | EventKind::FailoverCancelled => events::FAILOVER_STOPPED,
        EventKind::FailoverCompleted => events::FAILOVER_COMPLETED,
        EventKind::PreparedForFailover => events::PREPARED_FOR_FAILOVER,
        EventKind::FencedAfterFailover => events::FENCED_AFTER_FAILOVER,
    }
}

/// The status of a primary relationship from its settings and its relationship (also for a
/// VM that could not be opened, with the health given).
#[allow(clippy::too_many_arguments)]
pub fn status_of(
    vm: &str,
    r: &ReplicationRecord,
    rel: &Relationship,
    health: proto::Health,
    health_reasons: Vec<proto::HealthReason>,
    pending_bytes: u64,
    progress: Option<Progress>,
    last_error: Option<String>,
) -> ReplicationStatus {
    let p = &rel.progress;
    ReplicationStatus {
        vm: vm.to_string(),
        role: "Primary".into(),
        state: rel.state.name(),
        health,
        health_reasons,
        // Why a resynchronization is required, scheduled or running (a reverse after an
        // unplanned failover says what it sends), or why the VM is fenced.
        resync_reason: match &rel.state {
            State::FencedAfterFailover { reason, .. } => Some(reason.clone()),
            other => other.reason().map(String::from),
        },
        resync_condition: relationship::condition::of_state(&rel.state),
        resync_condition_hyperv: relationship::condition::of_state(&rel.state)
            .map(|c| c.hyperv_condition().to_string()),
        peer: r.replica.clone(),
        frequency_secs: r.frequency_secs,
        compression: r.compression,
        disks: r.disks.clone(),
        last_replication_time: p.last_cut_unix_ns.map(rfc3339_from_unix_ns),
        last_replication_unix_ns: p.last_cut_unix_ns,
        pending_bytes,
        last_seq: p.last_seq.get(),
        generation: p.generation.get(),
        progress,
        last_error,
        history: r.history,
        replica: None,
        auto_resynchronize: r.auto_resynchronize,
        resynchronize_window: r.resynchronize_window.map(|w| format!("{w} UTC")),
        lag_warning_cycles: r.lag_warning_cycles,
        resync_start_time: match rel.state {
            State::WaitingForStartResynchronize { at_unix_ns, .. } => {
                Some(rfc3339_from_unix_ns(at_unix_ns))
            }
            _ => None,
        },
        resync: None,
    }
}

/// Derives the key that authenticates deltas of one relationship (see docs/formats/delta.md).
pub fn delta_key(replication_id: &str) -> [u8; 32] {
    blake3::derive_key("understudy delta key v1", replication_id.as_bytes())
}

pub fn hello_of(shared: &Shared, vm: &Vm, r: &ReplicationRecord, rel: &Relationship) -> Hello {
    Hello {
        vm: vm.name.clone(),
        replication_id: r.replication_id.clone(),
        generation: rel.progress.generation,
        primary_host: shared.host_name.clone(),
        disks: r
            .disks
            .iter()
            .filter_map(|&i| {
                vm.disks.get(i as usize).map(|d| proto::peer::PeerDisk {
                    index: i,
                    size_bytes: d.size_bytes(),
                })
            })
            .collect(),
        history: r.history,
        state: Some(rel.state.name()),
        reverse: None,
        use_existing: None,
        failover_network: shared.failover_network_for_hello(&vm.name),
        frequency_secs: Some(r.frequency_secs),
    }
}

/// `replication start NAME --use-existing PATH...`: the replica host adopts `paths` (raw
/// images there, one per replicated disk) as point 1 of the replica VM, marked damaged, then
/// the relationship starts as a resynchronization whose compare sends only the blocks that
/// differ (`peer-protocol.md`, "An existing copy in the hello"). A refusal of either host
/// changes nothing here.
pub async fn start_from_existing(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    paths: Vec<String>,
) -> anyhow::Result<()> {
    let (settings, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    // Refused here exactly when the core would refuse it, before the replica is asked.
    let (started, _) = relationship::step(&rel, Event::StartInitialFromExisting, now_unix_ns())
        .map_err(|r| match r.kind {
            RefusalKind::Conflict => crate::error::conflict(r.message),
            RefusalKind::Invalid => crate::error::bad_request(r.message),
        })?;
    let mut hello = hello_of(shared, &repl.vm, &settings, &started);
    hello.use_existing = Some(paths);
    let peer = shared.peer(&settings.replica, settings.replica_name.as_deref())?;
    let reply = crate::peer_client::hello(&peer, &hello, &shared.peer_timeouts)
        .await
        .with_context(|| {
            format!(
                "the replica {} did not adopt the existing copy of {}",
                settings.replica, repl.vm.name
            )
        })
        .map_err(crate::peer_client::typed)?;
    if reply.latest_seq != relationship::EXISTING_COPY_SEQ
        || reply.generation != rel.progress.generation
    {
        return Err(crate::error::conflict(format!(
            "the replica {} answered point {} of generation {} instead of adopting the existing copy of {} as point 1 (an older version?)",
            settings.replica, reply.latest_seq, reply.generation, repl.vm.name
        )));
    }
    repl.command(Cmd::StartFromExisting).await?
}

/// `replication start NAME --to-media DIR` (`docs/formats/initial-media.md`): cuts point 1,
/// writes it with its manifest into `dir` (durably), then records the relationship as
/// waiting for the replica to import it; the cut is committed only then (what the guest
/// writes after it stays dirty and ships as point 2). Any failure aborts the cut and leaves
/// the relationship `ReadyForInitialReplication`.
pub async fn start_to_media(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    dir: String,
) -> anyhow::Result<crate::media::Manifest> {
    let dir = std::path::PathBuf::from(dir);
    let (record, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    // Refused here exactly when the core would refuse it, before anything is written.
    relationship::step(
        &rel,
        Event::InitialMediaWritten { cut_unix_ns: 0 },
        now_unix_ns(),
    )
    .map_err(|r| match r.kind {
        RefusalKind::Conflict => crate::error::conflict(r.message),
        RefusalKind::Invalid => crate::error::bad_request(r.message),
    })?;
    if let Some(reason) = shared.check_storage(&repl.vm.name) {
        return Err(anyhow!(reason));
    }
    let dir2 = dir.clone();
    tokio::task::spawn_blocking(move || crate::media::prepare_dir(&dir2))
        .await
        .context("media task")??;
    let selected: Vec<Arc<tracker::TrackedDisk>> = record
        .disks
        .iter()
        .filter_map(|&i| repl.vm.disks.get(i as usize).cloned())
        .collect();
    // Point 1 holds every allocated block, as a network initial replication's does.
    for (i, d) in record.disks.iter().zip(&selected) {
        off_runtime(|| d.mark_allocated_dirty())
            .with_context(|| format!("scanning disk {i} of {}", repl.vm.name))?;
    }
    let gate = repl.vm.gate.clone();
    let cut = tokio::task::spawn_blocking(move || tracker::cut(&gate, &selected))
        .await
        .context("cut task")??;
    let cut_ns = proto::time::history_clock_ns(cut.cut_time_unix_ns);
    let header = delta_header(
        repl,
        &record,
        &rel,
        Seq(1),
        DeltaKind::Initial,
        cut_ns,
        false,
    );
    let key = delta_key(&record.replication_id);
    let indexes = record.disks.clone();
    let (repl2, dir2) = (repl.clone(), dir.clone());
    let (cut, written) = tokio::task::spawn_blocking(move || {
        let pairs: Vec<(u32, &tracker::FrozenDisk)> =
            indexes.iter().copied().zip(cut.disks.iter()).collect();
        let w = crate::media::write_media(&dir2, &header, &key, &pairs, &repl2.progress_done);
        (cut, w)
    })
    .await
    .context("media task")?;
    let manifest = match written {
        Ok(m) => m,
        Err(e) => {
            tokio::task::spawn_blocking(move || cut.abort())
                .await
                .context("abort task")?;
            return Err(e.context(format!(
                "writing the media of {} to {}",
                repl.vm.name,
                dir.display()
            )));
        }
    };
    match repl.apply(
        shared,
        Event::InitialMediaWritten {
            cut_unix_ns: cut_ns,
        },
    ) {
        Ok(a) => {
            tokio::task::spawn_blocking(move || {
                cut.commit();
                crate::heap::give_back();
            })
            .await
            .context("commit task")?;
            if a.say_hello {
                say_hello(shared, repl);
            }
            Ok(manifest)
        }
        Err(e) => {
            tokio::task::spawn_blocking(move || cut.abort())
                .await
                .context("abort task")?;
            crate::media::remove_media(&dir);
            Err(e)
        }
    }
}

/// A cycle in progress, polled by the task's loop next to its commands so that `suspend`,
/// `resume` and shutdown are answered at once: they cancel it (dropping it aborts the cut and
/// the upload; the blocks stay dirty).
struct InFlight {
    fut: Pin<Box<dyn Future<Output = anyhow::Result<SyncResult>> + Send>>,
    repl: Arc<Replication>,
    started: Instant,
    /// `sync` calls this cycle answers.
    waiters: Vec<oneshot::Sender<anyhow::Result<SyncResult>>>,
}

impl InFlight {
    fn start(
        shared: &Arc<Shared>,
        repl: &Arc<Replication>,
        plan: Plan,
        waiters: Vec<oneshot::Sender<anyhow::Result<SyncResult>>>,
    ) -> InFlight {
        let (s, r) = (shared.clone(), repl.clone());
        repl.last_progress_ns
            .store(now_unix_ns(), Ordering::Relaxed);
        InFlight {
            fut: Box::pin(async move { cycle(&s, &r, plan).await }),
            repl: repl.clone(),
            started: Instant::now(),
            waiters,
        }
    }

    /// Cancels the cycle; its `sync` callers are told why.
    fn cancel(self, why: &str) {
        drop(self.fut);
        // Where the replica stands is unknown now (the point may have committed there).
        self.repl.mark_need_hello();
        for w in self.waiters {
            let _ = w.send(Err(crate::error::transient(why.to_string())));
        }
    }
}

/// Polls the cycle in flight, or never completes when there is none.
async fn poll_inflight(inflight: &mut Option<InFlight>) -> anyhow::Result<SyncResult> {
    match inflight.as_mut() {
        Some(f) => f.fut.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Tells the replica about a state change (a hello), in the background and best effort: a
/// replica that cannot be reached learns it at the next cycle's hello.
fn say_hello(shared: &Arc<Shared>, repl: &Arc<Replication>) {
    let (settings, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    let hello = hello_of(shared, &repl.vm, &settings, &rel);
    repl.hello_owed.store(true, Ordering::Relaxed);
    let (s, r) = (shared.clone(), repl.clone());
    tokio::spawn(async move {
        let Ok(peer) = s.peer(&settings.replica, settings.replica_name.as_deref()) else {
            return;
        };
        match crate::peer_client::hello(&peer, &hello, &s.peer_timeouts).await {
            // Told, unless the state changed again meanwhile (that change owes its own).
            Ok(_) if hello.state == Some(r.state()) => r.hello_owed.store(false, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => match e.downcast_ref::<PeerRefusal>() {
                Some(refusal) if refusal.0.code == "failed_over" => {
                    r.replica_failed_over(&s, refusal.0.error.clone())
                }
                _ => {
                    tracing::debug!(vm = %hello.vm, "telling the replica about a state change: {e:#}")
                }
            },
        }
    });
}

/// Starts a cycle when the core asks for one (`CycleDue` → `StartCycle`).
fn due_cycle(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    waiters: Vec<oneshot::Sender<anyhow::Result<SyncResult>>>,
) -> Result<InFlight, Vec<oneshot::Sender<anyhow::Result<SyncResult>>>> {
    match repl.apply(shared, Event::CycleDue) {
        Ok(LoopActions {
            start_cycle: Some(plan),
            ..
        }) => Ok(InFlight::start(shared, repl, plan, waiters)),
        _ => Err(waiters),
    }
}

async fn run(
    shared: Arc<Shared>,
    repl: Arc<Replication>,
    mut rx: mpsc::Receiver<Cmd>,
    thaw_agent: Option<String>,
) {
    if let Some(sock) = thaw_agent {
        thaw_at_start(&shared, &repl.vm.name, sock).await;
    }
    if repl.hello_owed.load(Ordering::Relaxed) {
        say_hello(&shared, &repl);
    }
    let mut next_at = Instant::now();
    let mut retry = RETRY_MIN;
    let mut inflight: Option<InFlight> = None;
    // `sync` calls that arrived while a cycle was running: a fresh cycle (a new cut, so it
    // holds every write acknowledged before the call) answers them when that one ends.
    let mut queued_syncs: Vec<oneshot::Sender<anyhow::Result<SyncResult>>> = Vec::new();
    let mut hello_retry_at: Option<Instant> = None;
    // A `failover prepare` in progress: the VM is fenced; it is answered when a cycle that
    // started after the fence commits (then every change is on the replica).
    let mut preparing: Option<Preparing> = None;
    loop {
        if inflight.is_none() && preparing.as_ref().is_some_and(|p| p.cycle_started) {
            // The prepare's cycle was cancelled (suspend, a resync, a divergence).
            let p = preparing.take().expect("checked above");
            shared.unfence_vm(&repl.vm);
            let _ = p.reply.send(Err(crate::error::conflict(format!(
                "the prepare of {} was cancelled: replication is {:?}; the VM is unfenced",
                repl.vm.name,
                repl.state()
            ))));
        }
        if inflight.is_none() {
            if let Some(p) = preparing.as_mut() {
                if !p.cycle_started {
                    match due_cycle(&shared, &repl, Vec::new()) {
                        Ok(f) => {
                            inflight = Some(f);
                            p.cycle_started = true;
                        }
                        Err(_) => {
                            let p = preparing.take().expect("checked above");
                            shared.unfence_vm(&repl.vm);
                            let _ = p.reply.send(Err(crate::error::conflict(format!(
                                "{} cannot be prepared: replication is {:?}",
                                repl.vm.name,
                                repl.state()
                            ))));
                        }
                    }
                }
            }
        }
        let (state, freq) = {
            let rt = repl.rt.lock();
            (rt.rel.state.clone(), rt.settings.frequency_secs)
        };
        let period = Duration::from_secs(u64::from(freq));
        if inflight.is_none() && !queued_syncs.is_empty() {
            let waiters = std::mem::take(&mut queued_syncs);
            match due_cycle(&shared, &repl, waiters) {
                Ok(f) => inflight = Some(f),
                Err(waiters) => {
                    for w in waiters {
                        let _ = w.send(Err(cannot_sync(&repl.vm.name, &state)));
                    }
                }
            }
        }
        let periodic = state.cycles();
        let waiting = matches!(
            state,
            State::WaitingForStartResynchronize { .. } | State::InitialReplicationScheduled { .. }
        );
        let sleep = tokio::time::sleep_until(next_at.into());
        let tick = tokio::time::sleep(TICK);
        // A hello owed is told again HELLO_RETRY after it became owed (a deadline kept across
        // iterations: other arms firing never push it back).
        if !repl.hello_owed.load(Ordering::Relaxed) {
            hello_retry_at = None;
        } else if hello_retry_at.is_none() {
            hello_retry_at = Some(Instant::now() + HELLO_RETRY);
        }
        let hello_retry = tokio::time::sleep_until(
            hello_retry_at
                .unwrap_or_else(|| Instant::now() + HELLO_RETRY)
                .into(),
        );
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else {
                    if let Some(f) = inflight.take() { f.cancel("the daemon is stopping"); }
                    return;
                };
                let (reply, result) = match cmd {
                    Cmd::Shutdown(done) => {
                        if let Some(f) = inflight.take() { f.cancel("the daemon is stopping"); }
                        for w in queued_syncs.drain(..) {
                            let _ = w.send(Err(crate::error::transient("the daemon is stopping")));
                        }
                        let _ = done.send(());
                        return;
                    }
                    Cmd::Reschedule => {
                        next_at = Instant::now();
                        say_hello(&shared, &repl);
                        continue;
                    }
                    Cmd::Sync(reply) => {
                        let stalled_ns = now_unix_ns()
                            .saturating_sub(repl.last_progress_ns.load(Ordering::Relaxed));
                        if inflight.is_some() && stalled_ns > SYNC_STALL_REFUSAL.as_nanos() as u64 {
                            let _ = reply.send(Err(crate::error::transient(format!(
                                "a cycle of {} is in progress and the replica has taken no data and given no answer for {} s; retry later",
                                repl.vm.name,
                                stalled_ns / 1_000_000_000
                            ))));
                        } else if inflight.is_some() {
                            if queued_syncs.len() < CMD_QUEUE {
                                queued_syncs.push(reply);
                            } else {
                                let _ = reply.send(Err(crate::error::transient(format!(
                                    "replication of {} is busy; retry", repl.vm.name))));
                            }
                        } else {
                            match due_cycle(&shared, &repl, vec![reply]) {
                                Ok(f) => inflight = Some(f),
                                Err(waiters) => {
                                    for w in waiters {
                                        let _ = w.send(Err(cannot_sync(&repl.vm.name, &state)));
                                    }
                                }
                            }
                        }
                        continue;
                    }
                    Cmd::Prepare(reply) => {
                        if preparing.is_some() {
                            let _ = reply.send(Err(crate::error::transient(format!(
                                "a prepare of {} is already in progress", repl.vm.name))));
                        } else if !matches!(repl.relationship().state, State::Replicating) {
                            let _ = reply.send(Err(crate::error::conflict(format!(
                                "{} cannot be prepared for a planned failover: replication is {:?} (it must be Replicating)",
                                repl.vm.name, repl.state()))));
                        } else {
                            match shared.fence_vm(&repl.vm) {
                                Ok(()) => {
                                    // A cycle already running may have cut before the last
                                    // writes: the prepare waits for one that starts after.
                                    preparing = Some(Preparing { reply, cycle_started: false });
                                }
                                Err(e) => { let _ = reply.send(Err(e)); }
                            }
                        }
                        continue;
                    }
                    Cmd::Start(reply) => (Some(reply), repl.apply(&shared, Event::StartInitial)),
                    Cmd::StartAt { at_unix_ns, reply } => (
                        Some(reply),
                        repl.apply(&shared, Event::ScheduleInitial { at_unix_ns }),
                    ),
                    Cmd::StartFromExisting(reply) => (
                        Some(reply),
                        repl.apply(&shared, Event::StartInitialFromExisting),
                    ),
                    Cmd::Suspend(reply) => (Some(reply), repl.apply(&shared, Event::Suspend)),
                    Cmd::Resume { resync: false, reply, .. } => {
                        // Cancelling a prepare serves the disks again: only once the replica
                        // confirms it has not failed over (else both hosts would take writes).
                        if matches!(
                            repl.relationship().state,
                            State::PreparedForFailover { .. } | State::FencedAfterFailover { .. }
                        ) {
                            if let Err(e) = replica_not_failed_over(&shared, &repl).await {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                        }
                        (Some(reply), repl.apply(&shared, Event::Resume))
                    }
                    Cmd::Resume { resync: true, at_unix_ns, reply } => (
                        Some(reply),
                        repl.apply(&shared, Event::Resynchronize { at_unix_ns, reason: None }),
                    ),
                    Cmd::ResyncCancel(reply) => {
                        let rel = repl.relationship();
                        let replica = if resync_may_cancel(&rel.state) {
                            // Nothing more of the resynchronization is sent; then the replica
                            // says where it stands once its side of the upload stopped.
                            if let Some(f) = inflight.take() {
                                f.cancel("the resynchronization was cancelled");
                            }
                            match rel.progress.inflight_seq {
                                Some(seq) => tokio::time::timeout(
                                    CANCEL_ASK_TIMEOUT,
                                    replica_after_upload(&shared, &repl, seq),
                                )
                                .await
                                .ok()
                                .flatten(),
                                None => None,
                            }
                        } else {
                            None
                        };
                        let result = repl.apply(&shared, Event::ResyncCancel { replica }).and_then(|a| {
                            match repl.relationship().state {
                                State::ResynchronizationRequired { .. } => Ok(a),
                                _ => {
                                    if a.say_hello { say_hello(&shared, &repl); }
                                    Err(crate::error::conflict(format!(
                                        "the resynchronization of {} had already completed on the replica (point {}); nothing was cancelled",
                                        repl.vm.name,
                                        repl.relationship().progress.last_seq
                                    )))
                                }
                            }
                        });
                        (Some(reply), result)
                    }
                    Cmd::Followup { cancel_cycle, say_hello } => (
                        None,
                        Ok(LoopActions { cancel_cycle, say_hello, ..Default::default() }),
                    ),
                };
                let result = result.map(|a| {
                    if a.cancel_cycle {
                        if let Some(f) = inflight.take() {
                            f.cancel(&format!(
                                "the cycle was cancelled: replication is now {:?}",
                                repl.state()
                            ));
                        }
                    }
                    if a.cycle_now {
                        next_at = Instant::now();
                    }
                    if a.say_hello {
                        say_hello(&shared, &repl);
                    }
                });
                match reply {
                    Some(reply) => { let _ = reply.send(result); }
                    None => if let Err(e) = result {
                        tracing::error!(vm = %repl.vm.name, "{e:#}");
                    },
                }
            }
            r = poll_inflight(&mut inflight) => {
                let done = inflight.take().expect("poll_inflight completes only with a cycle in flight");
                // The next cut is due one period after this one *started*, so a cycle that
                // takes long does not push the schedule back: lag stays ≤ frequency + one
                // cycle (a late cycle starts at once).
                match &r {
                    Ok(_) => {
                        retry = RETRY_MIN;
                        next_at = done.started + period;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %repl.vm.name, "replication cycle failed: {e:#}");
                        let cap = RETRY_MAX.min(period);
                        next_at = Instant::now() + jitter(retry.min(cap));
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
                if let Some(p) = preparing.take() {
                    if !p.cycle_started {
                        preparing = Some(p);
                    } else {
                        finish_prepare(&shared, &repl, p, &r);
                    }
                }
                // Every caller gets the outcome; the first keeps the error's type (transient,
                // refusal) for the API's status code.
                let mut waiters = done.waiters.into_iter();
                let first = waiters.next();
                for w in waiters {
                    let _ = w.send(match &r {
                        Ok(v) => Ok(v.clone()),
                        Err(e) => Err(anyhow!("{}", crate::errfmt::one_line(e))),
                    });
                }
                if let Some(first) = first {
                    let _ = first.send(r.map_err(crate::peer_client::typed));
                }
            }
            _ = sleep, if periodic && inflight.is_none() => {
                if let Ok(f) = due_cycle(&shared, &repl, Vec::new()) {
                    inflight = Some(f);
                }
            }
            _ = hello_retry, if hello_retry_at.is_some() => {
                hello_retry_at = None;
                say_hello(&shared, &repl);
            }
            _ = tick, if waiting => {
                match repl.apply(&shared, Event::Tick) {
                    Ok(a) => {
                        if a.cycle_now { next_at = Instant::now(); }
                        if a.say_hello { say_hello(&shared, &repl); }
                    }
                    Err(e) => tracing::error!(vm = %repl.vm.name, "{e:#}"),
                }
            }
        }
    }
}

/// A `failover prepare` waiting for its cycle.
struct Preparing {
    reply: oneshot::Sender<anyhow::Result<()>>,
    /// The cycle that ships the last changes (started after the fence) is running.
    cycle_started: bool,
}

/// The prepare's cycle ended: on success, with nothing left to ship, the relationship is
/// PreparedForFailover at the point just committed; otherwise the VM is unfenced and the
/// prepare fails with why.
fn finish_prepare(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    p: Preparing,
    cycle: &anyhow::Result<SyncResult>,
) {
    let outcome = match cycle {
        Err(e) => Err(crate::error::transient(format!(
            "the last changes of {} could not be shipped: {}; the VM is unfenced, run `understudy failover prepare` again",
            repl.vm.name,
            crate::errfmt::one_line(e)
        ))),
        Ok(_) => {
            let pending = repl.pending_bytes(&repl.record().disks);
            if pending > 0 {
                Err(crate::error::transient(format!(
                    "{} still has {pending} bytes to ship (was it written to after the fence?); the VM is unfenced, run `understudy failover prepare` again",
                    repl.vm.name
                )))
            } else {
                let seq = repl.relationship().progress.last_seq;
                repl.apply(shared, Event::Prepared { seq }).map(|a| {
                    if a.say_hello {
                        say_hello(shared, repl);
                    }
                })
            }
        }
    };
    if outcome.is_err() {
        shared.unfence_vm(&repl.vm);
    }
    let _ = p.reply.send(outcome);
}

/// The header of the delta shipping point `seq` of a cut taken at `cut_ns` (history clock).
fn delta_header(
    repl: &Replication,
    record: &ReplicationRecord,
    rel: &Relationship,
    seq: Seq,
    kind: DeltaKind,
    cut_ns: u64,
    app_consistent: bool,
) -> DeltaHeader {
    DeltaHeader {
        compared: false,
        app_consistent,
        vm_id: repl.vm.name.clone(),
        generation: rel.progress.generation,
        seq,
        parent_seq: Seq(seq.get().saturating_sub(1)),
        cut_time_unix_ns: cut_ns,
        kind,
        compression: match record.compression {
            proto::Compression::Zstd => Compression::Zstd,
            proto::Compression::None => Compression::None,
        },
        disks: record
            .disks
            .iter()
            .filter_map(|&i| {
                repl.vm.disks.get(i as usize).map(|d| DiskEntry {
                    index: i,
                    size_bytes: d.size_bytes(),
                })
            })
            .collect(),
    }
}

/// What the core needs of the replica's refusal of the upload of the cut taken at `cut_ns`.
fn refusal_facts(e: &anyhow::Error, cut_ns: u64) -> Option<PeerRefusalFacts> {
    e.downcast_ref::<PeerRefusal>().map(|r| PeerRefusalFacts {
        expected_seq: r.0.expected_seq,
        needs_resync: r.needs_resync(),
        failed_over: r.0.code == "failed_over",
        error: r.0.error.clone(),
        cut_unix_ns: Some(cut_ns),
    })
}

/// A disk of a cut shared with the compare's hashing threads.
struct CutDisk {
    cut: Arc<tracker::Cut>,
    position: usize,
}

impl crate::resync::ChunkSource for CutDisk {
    fn size_bytes(&self) -> u64 {
        self.cut.disks[self.position].size_bytes()
    }

    fn known_zero(&self, offset: u64, len: u64) -> anyhow::Result<bool> {
        crate::resync::ChunkSource::known_zero(&self.cut.disks[self.position], offset, len)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        crate::resync::ChunkSource::read(&self.cut.disks[self.position], buf, offset)
    }

    fn will_need(&self, offset: u64, len: u64) {
        crate::resync::ChunkSource::will_need(&self.cut.disks[self.position], offset, len)
    }
}

/// Persists the resynchronization cursor; false (logged) when it cannot be, or holds more
/// ranges than a cursor may: the resynchronization then goes on from the last one kept.
fn save_cursor(shared: &Shared, repl: &Replication, cursor: &ResyncCursor) -> bool {
    let vm = &repl.vm.name;
    if cursor.ranges() > RESYNC_CURSOR_RANGES_MAX {
        tracing::info!(%vm, "the resynchronization cursor would hold {} ranges (at most {RESYNC_CURSOR_RANGES_MAX}): not advanced", cursor.ranges());
        return false;
    }
    match off_runtime(|| shared.save_resync_cursor(vm, cursor)) {
        Ok(()) => {
            repl.resync_cursor_bytes
                .store(cursor.compared_bytes(), Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::warn!(%vm, "saving the resynchronization cursor: {e:#}");
            false
        }
    }
}

/// The compare's cursor, and whether windows compared since its last save are unsaved (the
/// once-a-second limit skipped them): they are saved when the compare is dropped unfinished
/// (its cycle cancelled).
struct CursorGuard<'a> {
    shared: &'a Shared,
    repl: &'a Replication,
    cursor: Option<&'a mut ResyncCursor>,
    unsaved: bool,
}

impl CursorGuard<'_> {
    fn save(&mut self) {
        if let Some(c) = self.cursor.as_deref() {
            save_cursor(self.shared, self.repl, c);
        }
        self.unsaved = false;
    }
}

impl Drop for CursorGuard<'_> {
    fn drop(&mut self) {
        // Only while the resynchronization may still continue: a command that ended it
        // (remove, a failover) deleted the cursor before it cancelled this cycle.
        if self.unsaved && keeps_resync_cursor(&self.repl.relationship().state) {
            self.save();
        }
    }
}

/// Windows of one disk compared at once (see [`compare_with_replica`]).
const COMPARE_WINDOWS_IN_FLIGHT: usize = 2;

/// What one window's compare gives back: what it did, and the byte ranges that differ.
type WindowResult = (crate::resync::CompareStats, anyhow::Result<Vec<(u64, u64)>>);

/// The compare of one window, run as its own task; dropped unfinished (the resync itself
/// dropped), it is aborted.
struct WindowCompare(Option<tokio::task::JoinHandle<WindowResult>>);

impl WindowCompare {
    async fn finish(&mut self) -> Result<WindowResult, tokio::task::JoinError> {
        match self.0.take() {
            Some(h) => h.await,
            None => Ok((
                crate::resync::CompareStats::default(),
                Err(anyhow!("the window's compare was taken already")),
            )),
        }
    }
}

impl Drop for WindowCompare {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// The compare of a resynchronization: each disk of the cut against the replica's newest
/// point, window by window (`RESYNC_WINDOW_BYTES`), the cursor advanced and persisted after
/// each; the blocks found equal are marked shipped (never read again), so the shipper reads
/// only those that differ. `None` when the replica cannot compare (an older version): every
/// block is shipped, as before.
#[allow(clippy::too_many_arguments)]
async fn compare_with_replica(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    peer: &transport::Peer,
    seq: Seq,
    indexes: &[u32],
    cut: tracker::Cut,
    cursor: Option<&mut ResyncCursor>,
) -> Result<
    (tracker::Cut, Option<crate::resync::CompareStats>),
    (Option<tracker::Cut>, anyhow::Error),
> {
    let vm = repl.vm.name.to_string();
    let base = Seq(seq.get().saturating_sub(1));
    // A replica with no point (its store was lost and made again): nothing to compare with,
    // every block is sent.
    if base == Seq(0) {
        return Ok((cut, None));
    }
    // The replica refused a compared point for damage found after its compare: only every
    // block repairs it.
    let resync = cursor.is_some();
    if resync && repl.send_every_block.load(Ordering::Acquire) {
        shared.events.emit(
            events::RESYNC_COMPARE_DONE,
            Some(&vm),
            "warning",
            "the replica found damage after the last compare: every block is sent",
        );
        return Ok((cut, None));
    }
    let key = match crate::resync::new_key() {
        Ok(k) => k,
        Err(e) => return Err((Some(cut), e)),
    };
    let cut = Arc::new(cut);
    let unshare = |cut: Arc<tracker::Cut>| Arc::try_unwrap(cut).ok();
    let mut stats = crate::resync::CompareStats::default();
    // The first window compared is saved at once (an attempt interrupted early keeps it),
    // then at most once a second.
    let mut last_saved = Instant::now()
        .checked_sub(RESYNC_CURSOR_SAVE_EVERY)
        .unwrap_or_else(Instant::now);
    // A cycle cancelled in the middle (suspend, resync-cancel, a state change) drops this
    // future: the windows compared since the last save are saved then.
    let mut cursor = CursorGuard {
        shared,
        repl,
        cursor,
        unsaved: false,
    };
    // Progress shown in status: what earlier attempts compared counts as compared.
    if let Some(c) = cursor.cursor.as_deref() {
        repl.resync_compared_blocks
            .store(c.compared_bytes() / tracker::BLOCK_BYTES, Ordering::Relaxed);
    }
    for (position, &index) in indexes.iter().enumerate() {
        let disk: Arc<dyn crate::resync::ChunkSource + Send + Sync> = Arc::new(CutDisk {
            cut: cut.clone(),
            position,
        });
        let size = disk.size_bytes();
        let ranges = cut.disks[position].ranges();
        let resumed_at = cursor
            .cursor
            .as_deref()
            .and_then(|c| c.disks.get(position))
            .map_or(0, |d| d.compared_to);
        let continues = if resumed_at > 0 {
            format!(
                "; it continues at byte {resumed_at}, where an earlier attempt got: below it only {} bytes are compared again (blocks that differed, or were written since)",
                crate::resync_cursor::clip(&ranges, 0, resumed_at)
                    .iter()
                    .map(|r| r.1)
                    .sum::<u64>()
            )
        } else {
            String::new()
        };
        let what = if resync {
            format!(
                "resynchronization compares disk {index} with the replica's point {base}: blocks 0 to {} ({size} bytes){continues}",
                size.div_ceil(tracker::BLOCK_BYTES).saturating_sub(1)
            )
        } else {
            format!(
                "after an unclean stop, the recently written extents of disk {index} ({} bytes) are compared with the replica's point {base} instead of being sent whole",
                ranges.iter().map(|r| r.1).sum::<u64>()
            )
        };
        shared
            .events
            .emit(events::RESYNC_COMPARE_STARTED, Some(&vm), "info", &what);
        let started = Instant::now();
        let before = stats;
        // Windows in order, up to COMPARE_WINDOWS_IN_FLIGHT compared at once: the next one's
        // disks are read and hashed on both sides while this one's refinements go back and
        // forth. Results are taken (discard, cursor) strictly in window order.
        let windows: Vec<(u64, u64)> = (0..size)
            .step_by(RESYNC_WINDOW_BYTES as usize)
            .map(|w| (w, (w + RESYNC_WINDOW_BYTES).min(size)))
            .collect();
        let mut next = 0usize;
        let mut inflight: std::collections::VecDeque<(u64, u64, Option<WindowCompare>)> =
            std::collections::VecDeque::new();
        let mut failed: Option<anyhow::Error> = None;
        loop {
            while next < windows.len()
                && inflight.iter().filter(|w| w.2.is_some()).count() < COMPARE_WINDOWS_IN_FLIGHT
            {
                let (window, end) = windows[next];
                next += 1;
                let in_window = crate::resync_cursor::clip(&ranges, window, end);
                if in_window.is_empty() {
                    inflight.push_back((window, end, None));
                    continue;
                }
                // Blocks below where earlier attempts got were counted as compared already.
                let counts = resync && window >= resumed_at;
                let (peer, vm, disk, repl) = (peer.clone(), vm.clone(), disk.clone(), repl.clone());
                let timeout = shared.peer_timeouts.answer;
                let task = tokio::spawn(async move {
                    let mut st = crate::resync::CompareStats::default();
                    let recount = AtomicU64::new(0);
                    let counter = if counts {
                        &repl.resync_compared_blocks
                    } else {
                        &recount
                    };
                    let r = crate::resync::compare_disk(
                        &peer, &vm, base, index, disk, &in_window, &key, timeout, &mut st, counter,
                    )
                    .await;
                    (st, r)
                });
                inflight.push_back((window, end, Some(WindowCompare(Some(task)))));
            }
            let Some((window, end, task)) = inflight.pop_front() else {
                break;
            };
            let differs = match task {
                None => Vec::new(),
                Some(mut t) => match t.finish().await {
                    Ok((st, Ok(r))) => {
                        stats += st;
                        r
                    }
                    Ok((_, Err(e))) => {
                        failed = Some(e);
                        break;
                    }
                    Err(e) => {
                        failed = Some(anyhow!("the compare task: {e}"));
                        break;
                    }
                },
            };
            // What is equal is shipped without a read, window by window: its copies go back
            // to the pool now rather than after the last disk's compare.
            let c = cut.clone();
            let d2 = differs.clone();
            let discarded = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let disk = &c.disks[position];
                let mut at = window;
                for &(o, l) in d2.iter().chain(std::iter::once(&(end, 0))) {
                    if o > at {
                        disk.discard(at, o - at)?;
                    }
                    at = o + l;
                }
                Ok(())
            })
            .await
            .map_err(|e| anyhow!("the discard task: {e}"))
            .and_then(|r| r);
            if let Err(e) = discarded {
                failed = Some(e);
                break;
            }
            if let Some(c) = cursor.cursor.as_deref_mut() {
                if let Some(d) = c.disks.get_mut(position) {
                    d.window_done(window, end, &differs);
                }
                // At most once a second (a catalog commit is an fsync), and at each disk's end.
                if end == size || last_saved.elapsed() >= RESYNC_CURSOR_SAVE_EVERY {
                    cursor.save();
                    last_saved = Instant::now();
                } else {
                    cursor.unsaved = true;
                }
            }
        }
        if let Some(e) = failed {
            // The windows still in flight hold the cut: they finish (or fail) before it is
            // handed back.
            for (_, _, t) in inflight.drain(..) {
                if let Some(mut t) = t {
                    let _ = t.finish().await;
                }
            }
            // What the windows before the failure compared is kept: the next attempt goes on
            // from there (a save skipped by the once-a-second limit is made now).
            if cursor.unsaved {
                cursor.save();
            }
            drop(disk);
            // An older replica (no such route), or a damaged copy that cannot be read: every
            // block left is sent, as a resynchronization did before it compared. Windows
            // compared already had their equal blocks marked shipped: those are equal on the
            // replica.
            if e.downcast_ref::<PeerRefusal>()
                .is_some_and(|r| r.0.code == "not_found" || r.0.code == "damaged")
            {
                shared.events.emit(
                    events::RESYNC_COMPARE_DONE,
                    Some(&vm),
                    "warning",
                    &format!(
                        "the replica cannot compare ({}): every block is sent",
                        crate::errfmt::one_line(&e)
                    ),
                );
                return match unshare(cut) {
                    Some(cut) => Ok((cut, None)),
                    None => Err((None, anyhow!("the compare of {vm} still holds its cut"))),
                };
            }
            return Err((unshare(cut), e));
        }
        shared.events.emit(
            events::RESYNC_COMPARE_DONE,
            Some(&vm),
            "info",
            &format!(
                "{} disk {index}: {} bytes in {} chunks, {} blocks refined, {} blocks differ ({} bytes to send), in {:.1} s",
                if resync { "resynchronization compared" } else { "after an unclean stop, compared the recently written extents of" },
                stats.compared_bytes - before.compared_bytes,
                stats.chunks - before.chunks,
                stats.blocks_refined - before.blocks_refined,
                stats.differing_blocks - before.differing_blocks,
                stats.differing_bytes - before.differing_bytes,
                crate::resync::secs_since(started)
            ),
        );
    }
    match unshare(cut) {
        Some(cut) => Ok((cut, Some(stats))),
        None => Err((None, anyhow!("the compare of {vm} still holds its cut"))),
    }
}

/// Asks the replica (a hello) whether it has failed over to this VM; Ok only if it answers and
/// has not.
async fn replica_not_failed_over(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
) -> anyhow::Result<()> {
    let (settings, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    let vm = &repl.vm.name;
    let peer = shared.peer(&settings.replica, settings.replica_name.as_deref())?;
    let hello = hello_of(shared, &repl.vm, &settings, &rel);
    match crate::peer_client::hello(&peer, &hello, &shared.peer_timeouts).await {
        Ok(_) => Ok(()),
        Err(e) if e.downcast_ref::<PeerRefusal>().is_some_and(|r| r.0.code == "failed_over") => {
            Err(crate::error::conflict(format!(
                "the replica host has failed over {vm}: the prepare cannot be cancelled and its disks stay fenced here ({})",
                crate::errfmt::one_line(&e)
            )))
        }
        Err(e) => Err(crate::error::transient(format!(
            "cannot confirm with the replica that {vm} was not failed over there, so its disks stay fenced; retry when it answers ({})",
            crate::errfmt::one_line(&e)
        ))),
    }
}

fn cannot_sync(vm: &str, state: &State) -> anyhow::Error {
    crate::error::transient(format!(
        "{vm} cannot sync now: replication is {:?}",
        state.name()
    ))
}

/// Runs blocking work (catalog commits, bitmap scans) from the replication task without
/// stalling the runtime's other tasks: the worker hands its queue to another thread first.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Up to +25% random jitter so many VMs retrying against one replica spread out.
fn jitter(d: Duration) -> Duration {
    let r = (now_unix_ns() % 1000) as u32;
    d + d * r / 4000
}

/// One replication cycle: ask the replica where it stands if needed, cut, ship, and tell the
/// core what happened (it commits or aborts).
async fn cycle(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    plan: Plan,
) -> anyhow::Result<SyncResult> {
    let result = cycle_inner(shared, repl, plan).await;
    if result.is_err() {
        repl.mark_need_hello();
    }
    let mut rt = repl.rt.lock();
    match &result {
        Ok(_) => {
            rt.last_error = None;
            rt.counters.consecutive_failures = 0;
            rt.counters.failing_since_ns = None;
        }
        // Waiting for the media's import is not a failure (the state says it is waiting).
        Err(e) if e.downcast_ref::<WaitingForMedia>().is_some() => {
            rt.last_error = Some(crate::errfmt::one_line(e));
        }
        Err(e) => {
            rt.last_error = Some(crate::errfmt::one_line(e));
            rt.counters.failed += 1;
            rt.counters.consecutive_failures += 1;
            rt.counters.failing_since_ns.get_or_insert_with(now_unix_ns);
            shared.metrics.cycle_failed(&repl.vm.name);
        }
    }
    result
}

/// A cycle of `InitialReplicationByMedia` whose hello found the replica without point 1: it
/// asked, and ships nothing until the media is imported there.
#[derive(Debug)]
struct WaitingForMedia(String);

impl std::fmt::Display for WaitingForMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WaitingForMedia {}

async fn cycle_inner(
    shared: &Arc<Shared>,
    repl: &Arc<Replication>,
    plan: Plan,
) -> anyhow::Result<SyncResult> {
    if let Some(reason) = shared.check_storage(&repl.vm.name) {
        return Err(anyhow!(reason));
    }
    let (record, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    let peer = shared.peer(&record.replica, record.replica_name.as_deref())?;
    let vm_name = repl.vm.name.clone();

    let mut plan = plan;
    if plan.hello_first {
        let hello = hello_of(shared, &repl.vm, &record, &rel);
        let reply = crate::peer_client::hello(&peer, &hello, &shared.peer_timeouts).await?;
        let next = repl.apply(
            shared,
            Event::HelloAnswered {
                latest_seq: reply.latest_seq,
                latest_cut_unix_ns: reply.latest_cut_unix_ns,
                generation: reply.generation,
                damage: reply.damage.clone(),
            },
        )?;
        match next.take_cut {
            Some(p) => plan = p,
            None if repl.relationship().state == State::InitialReplicationByMedia => {
                return Err(anyhow!(WaitingForMedia(format!(
                    "{vm_name}: the replica does not hold point 1 yet: import the media there with `understudy replication import-media {vm_name} --from DIR`"
                ))));
            }
            None => {
                return Err(anyhow!(
                    "{} does not cut now: replication is {:?}{}",
                    vm_name,
                    repl.state(),
                    repl.relationship()
                        .state
                        .reason()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ))
            }
        }
        if record.replica_name.is_none() {
            // A relationship set up before replica names were pinned: pin the one met now.
            if let Some(name) = peer.connected_name().await {
                let _one_at_a_time = repl.apply_lock.lock();
                repl.rt.lock().settings.replica_name = Some(name);
                repl.persist_current(shared)?;
            }
        }
    }

    let (record, rel) = {
        let rt = repl.rt.lock();
        (rt.settings.clone(), rt.rel.clone())
    };
    let kind = match plan.kind {
        CycleKind::Full => DeltaKind::Full,
        CycleKind::Initial => DeltaKind::Initial,
        CycleKind::Incremental => DeltaKind::Incremental,
    };
    let seq = plan.seq;
    let selected: Vec<Arc<tracker::TrackedDisk>> = record
        .disks
        .iter()
        .filter_map(|&i| repl.vm.disks.get(i as usize).cloned())
        .collect();
    let gate = repl.vm.gate.clone();
    // A resynchronization marks what its compare still covers: from its cursor when it
    // continues one (after a failure, a suspend, a restart), else every block.
    let cursor = if plan.kind == CycleKind::Full {
        let (sh, r, rec, generation) = (
            shared.clone(),
            repl.clone(),
            record.clone(),
            rel.progress.generation.0,
        );
        Some(
            tokio::task::spawn_blocking(move || resync_marks(&sh, &r, &rec, generation, seq))
                .await
                .context("marking task")??,
        )
    } else {
        None
    };
    // Application-consistent when due: freeze, cut, thaw on the blocking thread, every step
    // bounded (`guest.rs`); any failure leaves a crash-consistent cut.
    let quiesce = app_consistent_due(shared, &vm_name, &record, &rel);
    let vm_for_hooks = vm_name.clone();
    let (cut, quiesced) = tokio::task::spawn_blocking(move || match quiesce {
        Some(settings) => {
            let (cut, q) =
                crate::guest::quiesced(&vm_for_hooks, &settings, || tracker::cut(&gate, &selected));
            (cut, Some(q))
        }
        None => (tracker::cut(&gate, &selected), None),
    })
    .await
    .context("cut task")?;
    let app_consistent = quiesced.as_ref().is_some_and(|q| q.app_consistent());
    match &quiesced {
        Some(q) => note_quiesce(shared, repl, q),
        None => {
            // Not due, or nothing to quiesce with any more (`vm set --no-guest-agent`, the
            // cadence removed): no failure streak stands.
            let mut rt = repl.rt.lock();
            rt.counters.app_consecutive_failures = 0;
            rt.app_error = None;
        }
    }
    let cut = cut?;
    let started = Instant::now();
    // The history's clock (real time unless a test compressed it: `proto::time`).
    let cut_ns = proto::time::history_clock_ns(cut.cut_time_unix_ns);
    let pause_us = cut.pause.as_micros() as u64;
    shared.metrics.cut_paused(&vm_name, cut.pause);

    // The core records the point in flight (persisted before the upload starts), or says the
    // cut is not one to ship (the relationship changed meanwhile).
    let taken = repl.apply(
        shared,
        Event::CutTaken {
            seq,
            cut_unix_ns: cut_ns,
        },
    );
    match taken {
        Ok(a) if !a.cancel_cycle => {}
        other => {
            tokio::task::spawn_blocking(move || cut.abort())
                .await
                .context("abort task")?;
            other?;
            return Err(anyhow!(
                "the cut of point {seq} was not shipped: replication is now {:?}",
                repl.state()
            ));
        }
    }

    let total: u64 = cut.disks.iter().map(|d| d.dirty_bytes()).sum();
    repl.progress_done.store(0, Ordering::Relaxed);
    repl.progress_since_ns
        .store(now_unix_ns(), Ordering::Relaxed);
    repl.progress_total.store(total, Ordering::Relaxed);
    // A resynchronization ships only the blocks that differ from the replica's newest point
    // (`docs/formats/resync.md`): the others are marked shipped without being read.
    // After an unclean stop the first cycle compares the recovered extents (the activity
    // log's, whole 4 MiB extents) with the replica instead of sending them whole.
    let compare_crash =
        plan.kind == CycleKind::Incremental && repl.compare_after_crash.load(Ordering::Acquire);
    let (cut, compared) = if cursor.is_some() || compare_crash {
        let mut cursor = cursor;
        let cut = if let Some(cursor) = cursor.as_mut() {
            // The cursor now names the cut's blocks below where the compare got; once that
            // is durable the cut is covered: the activity log keeps only what is written from
            // now on, and an abort leaves the cut's blocks to the cursor (`tracker-state.md`).
            for (position, d) in cursor.disks.iter_mut().enumerate() {
                if let Some(f) = cut.disks.get(position) {
                    d.set_pending_from_cut(&f.ranges());
                }
            }
            if save_cursor(shared, repl, cursor) {
                tokio::task::spawn_blocking(move || {
                    cut.cover();
                    cut
                })
                .await
                .context("cover task")?
            } else {
                cut
            }
        } else {
            cut
        };
        match compare_with_replica(
            shared,
            repl,
            &peer,
            seq,
            &record.disks,
            cut,
            cursor.as_mut(),
        )
        .await
        {
            Ok(r) => r,
            Err((cut, e)) => {
                // As a failed upload: the cut goes back (its blocks stay dirty) and the core
                // judges the refusal (a failover there fences, out of sequence reconciles).
                if let Some(cut) = cut {
                    tokio::task::spawn_blocking(move || cut.abort())
                        .await
                        .context("abort task")?;
                }
                repl.progress_total.store(0, Ordering::Relaxed);
                let e = e.context("comparing with the replica");
                let refusal = refusal_facts(&e, cut_ns);
                if let Err(fed) = repl.apply(
                    shared,
                    Event::CycleFailed {
                        seq,
                        error: crate::errfmt::one_line(&e),
                        refusal,
                    },
                ) {
                    tracing::error!(vm = %vm_name, "recording a failed cycle: {fed:#}");
                }
                return Err(e);
            }
        }
    } else {
        (cut, None)
    };
    if let Some(c) = &compared {
        repl.progress_total
            .store(c.differing_bytes, Ordering::Relaxed);
    }

    let mut header = delta_header(repl, &record, &rel, seq, kind, cut_ns, app_consistent);
    // Only the blocks that differed: the replica must not let it clear damage found after
    // the compare began (it refuses it, and the next attempt sends every block).
    header.compared = compared.is_some() && kind == DeltaKind::Full;
    let header_compared = header.compared;
    let key = delta_key(&record.replication_id);
    let checksum = header.checksum(&key)?;
    let indexes = record.disks.clone();
    let (sender, body) = transport::body_channel(transport::DEFAULT_BODY_CHANNEL_CHUNKS);
    let (relay, writer) = crate::upload::Relay::new(sender);
    let repl2 = repl.clone();
    // The encoder runs on its own thread at normal priority. Lowering it (nice 5) was
    // measured to cost the guest more, not less: a slower shipper keeps the frozen epoch open
    // longer, so more guest writes pay copy-before-write (T1 0.64× vs 0.78–1.06× nbdkit,
    // docs/PERFORMANCE.md).
    let (enc_tx, enc_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("ship-{vm_name}"))
        .spawn(move || {
            let pairs: Vec<(u32, &tracker::FrozenDisk)> =
                indexes.iter().copied().zip(cut.disks.iter()).collect();
            let r = crate::shipper::encode_cut(writer, &header, &key, &pairs, &repl2.progress_done)
                .and_then(|(w, s)| w.finish().map(|_| s).map_err(anyhow::Error::from));
            let _ = enc_tx.send((cut, r));
        })
        .context("starting the shipper thread")?;
    let put = upload_delta(shared, repl, &peer, seq, &checksum, &relay, body).await;
    let (cut, encoded) = enc_rx.await.context("the shipper thread stopped")?;
    // Copy-before-write abandoned (spill cap): the reason, whatever the upload reports.
    let abandoned = cut.disks.iter().find_map(|d| d.abandoned());

    let outcome: anyhow::Result<(DeltaReply, crate::shipper::ShipSummary)> = match (put, encoded) {
        (Ok(reply), Ok(summary)) => Ok((reply, summary)),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.context("reading the cut")),
    };
    match outcome {
        Ok((reply, summary)) => {
            tokio::task::spawn_blocking(move || {
                cut.commit();
                crate::heap::give_back();
            })
            .await
            .context("commit task")?;
            let latency_ms = started.elapsed().as_millis() as u64;
            let sent_bytes = relay.sent_bytes();
            let delta_bytes = summary.data_bytes + summary.zero_bytes;
            {
                let mut rt = repl.rt.lock();
                let c = &mut rt.counters;
                if let Some(cmp) = compared.as_ref().filter(|_| kind == DeltaKind::Full) {
                    repl.resync_sent_bytes
                        .fetch_add(sent_bytes, Ordering::Relaxed);
                    c.resynchronized_bytes += delta_bytes;
                    c.resync_compared_bytes += cmp.compared_bytes;
                    c.resync_hash_bytes += cmp.hash_bytes;
                }
                c.ok += 1;
                c.delta_bytes_total += delta_bytes;
                c.delta_bytes_max = c.delta_bytes_max.max(delta_bytes);
                c.sent_bytes_total += sent_bytes;
                c.latency_ms_total += latency_ms;
                c.latency_ms_max = c.latency_ms_max.max(latency_ms);
                c.cut_pause_us_max = c.cut_pause_us_max.max(pause_us);
                if app_consistent {
                    c.app_ok += 1;
                }
            }
            shared
                .health
                .note_success(&vm_name, shared.monitoring_interval_secs());
            shared.metrics.cycle_succeeded(
                &vm_name,
                &crate::metrics::CycleFacts {
                    duration: started.elapsed(),
                    sent_bytes,
                    data_bytes: summary.data_bytes,
                    zero_bytes: summary.zero_bytes,
                    resync: compared.is_some(),
                },
            );
            repl.progress_total.store(0, Ordering::Relaxed);
            if kind == DeltaKind::Full {
                repl.send_every_block.store(false, Ordering::Release);
            }
            // The recovered extents are on the replica now.
            repl.compare_after_crash.store(false, Ordering::Release);
            // The core installs the point (persisted) and leaves the initial replication or
            // a resynchronization when that was its point.
            repl.apply(
                shared,
                Event::Committed {
                    seq: reply.seq,
                    cut_unix_ns: cut_ns,
                    app_consistent,
                },
            )?;
            Ok(SyncResult {
                vm: vm_name.to_string(),
                seq: reply.seq.get(),
                cut_time_unix_ns: cut_ns,
                delta_bytes,
                sent_bytes,
                latency_ms,
            })
        }
        Err(e) => {
            tokio::task::spawn_blocking(move || {
                cut.abort();
                crate::heap::give_back();
            })
            .await
            .context("abort task")?;
            repl.progress_total.store(0, Ordering::Relaxed);
            let e = match abandoned {
                Some(why) => e.context(why),
                None => e,
            };
            if header_compared
                && e.downcast_ref::<PeerRefusal>()
                    .is_some_and(|r| r.0.code == "damaged")
            {
                repl.send_every_block.store(true, Ordering::Release);
            }
            let refusal = refusal_facts(&e, cut_ns);
            // The core judges a refusal (a lost answer is "already delivered", anything else
            // that cannot follow requires a resynchronization) and logs the failure.
            if let Err(fed) = repl.apply(
                shared,
                Event::CycleFailed {
                    seq,
                    error: crate::errfmt::one_line(&e),
                    refusal,
                },
            ) {
                tracing::error!(vm = %vm_name, "recording a failed cycle: {fed:#}");
            }
            Err(e)
        }
    }
}

/// The VM's guest settings when this cycle's cut should be application-consistent: the VM can
/// be quiesced (agent or hook), the history policy has a cadence, and no application-consistent
/// point was committed within it (history clock, so tests can compress hours). A failed attempt
/// leaves it due: the next cycle tries again.
fn app_consistent_due(
    shared: &Shared,
    vm: &str,
    record: &ReplicationRecord,
    rel: &Relationship,
) -> Option<crate::guest::GuestSettings> {
    let every_h = record.history.as_ref()?.app_consistent_every_hours?;
    let settings = shared.guest_settings(vm).filter(|g| g.can_quiesce())?;
    let every_ns = u64::from(every_h) * 3600 * 1_000_000_000;
    let due = match rel.progress.last_app_consistent_unix_ns {
        None => true,
        Some(last) => proto::time::history_now_ns() >= last.saturating_add(every_ns),
    };
    due.then_some(settings)
}

/// The "thaw on restart": a daemon killed between freeze and thaw leaves the guest frozen
/// (qemu-ga has no timeout of its own on Linux); before its first cycle the VM's task asks the
/// agent and thaws a frozen guest. Bounded like every agent call; an absent agent is logged only.
async fn thaw_at_start(shared: &Shared, vm: &str, sock: String) {
    match tokio::task::spawn_blocking(move || crate::guest::thaw_if_frozen(&sock)).await {
        Ok(Ok(true)) => shared.events.emit(
            events::GUEST_THAWED_AT_START,
            Some(vm),
            "warning",
            "the guest was frozen at daemon start (the daemon stopped between freeze and thaw); thawed it",
        ),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::info!(vm, "guest agent not checked at start: {e}"),
        Err(e) => tracing::warn!(vm, "guest agent check at start: {e}"),
    }
}

/// Counts and reports the outcome of an application-consistent attempt.
fn note_quiesce(shared: &Shared, repl: &Replication, q: &crate::guest::Quiesced) {
    let vm = &repl.vm.name;
    match &q.freeze_error {
        None => {
            let mut rt = repl.rt.lock();
            rt.counters.app_consecutive_failures = 0;
            rt.app_error = None;
        }
        Some(why) => {
            {
                let mut rt = repl.rt.lock();
                rt.counters.app_failures += 1;
                rt.counters.app_consecutive_failures += 1;
                rt.app_error = Some(why.clone());
            }
            shared.events.emit(
                events::APP_CONSISTENT_FAILED,
                Some(vm),
                "warning",
                &format!("application-consistent cut failed, taking it crash-consistent: {why}"),
            );
        }
    }
    if let Some(why) = &q.thaw_error {
        shared.events.emit(
            events::GUEST_THAW_FAILED,
            Some(vm),
            "error",
            &format!("after the cut: {why}"),
        );
    }
}

/// Uploads a delta whose encoder writes through `relay`, resuming it after transport errors
/// from where the replica stands (`upload.rs`); counts the resumes.
async fn upload_delta(
    shared: &Shared,
    repl: &Replication,
    peer: &transport::Peer,
    seq: proto::Seq,
    checksum: &[u8; 32],
    relay: &crate::upload::Relay,
    body: transport::BoxBody,
) -> anyhow::Result<DeltaReply> {
    let vm = &repl.vm.name;
    let watch = crate::upload::Watch {
        timeouts: &shared.peer_timeouts,
        last_progress_ns: &repl.last_progress_ns,
    };
    crate::upload::upload(peer, vm, seq, checksum, relay, body, watch, |at| {
        {
            let mut rt = repl.rt.lock();
            rt.counters.resumed_uploads += 1;
            rt.counters.resumed_bytes += at;
        }
        shared.events.emit(
            events::UPLOAD_RESUMED,
            Some(vm),
            "info",
            &format!("upload of point {seq} interrupted; resumed at byte {at}"),
        );
    })
    .await
}

/// Health and status of a VM with no replication task (e.g. not enabled).
pub fn not_enabled(vm: &str) -> anyhow::Error {
    crate::error::conflict(format!("replication is not enabled for {vm}; run `understudy replication enable {vm} --replica HOST:PORT`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_progress_has_a_rate_and_an_eta_once_it_moved() {
        const S: u64 = 1_000_000_000;
        let p = resync_progress(1000, 0, 0, 0, 10 * S, 5 * S, 10 * S);
        assert_eq!((p.rate_bytes_per_sec, p.eta_secs), (0, None));
        assert_eq!(p.started_at, "1970-01-01T00:00:05.000Z");
        let p = resync_progress(1000, 400, 7, 300, 10 * S, 5 * S, 12 * S);
        assert_eq!(p.rate_bytes_per_sec, 200);
        assert_eq!(p.eta_secs, Some(3));
        assert_eq!((p.blocks_compared, p.bytes_sent), (7, 300));
        // No cycle has counted yet.
        let p = resync_progress(0, 0, 0, 0, 0, 0, 12 * S);
        assert_eq!((p.rate_bytes_per_sec, p.eta_secs), (0, None));
    }
}
