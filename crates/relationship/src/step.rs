//! The state machine: [`step`] turns a relationship and an event into the next relationship
//! and the actions the daemon must run, in order. No I/O, no clock: time is passed in.

use proto::{Generation, ReplicationState, Seq, VmName};

use crate::reconcile::{judge_out_of_sequence, reconcile, OutOfSequence, Reconcile};
use crate::{AutoResync, Resumable, Role, State};

/// The reason shown while an initial replication from an existing copy compares
/// (`replication start --use-existing`).
pub const INITIAL_FROM_EXISTING_REASON: &str =
    "initial replication from an existing copy on the replica: only the blocks that differ are sent";

/// The point an existing copy on the replica becomes (`replication start --use-existing`):
/// the first, so the compare that follows is point 2.
pub const EXISTING_COPY_SEQ: Seq = Seq(1);

/// Where the relationship's points stand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Progress {
    pub generation: Generation,
    /// Newest point the replica is known to have committed (0: none).
    pub last_seq: Seq,
    /// The point being shipped (recorded before its upload starts): the replica may have
    /// committed it without this host hearing back.
    pub inflight_seq: Option<Seq>,
    /// History-clock time of the cut of `last_seq`.
    pub last_cut_unix_ns: Option<u64>,
    /// History-clock time of the newest application-consistent cut committed.
    pub last_app_consistent_unix_ns: Option<u64>,
}

/// One relationship as the daemon holds it in memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Relationship {
    pub vm: VmName,
    pub role: Role,
    pub state: State,
    pub progress: Progress,
    /// In memory only: where the replica stands is unknown (after a load, a failure or a
    /// cancelled cycle), so the next cycle asks (hello) before it cuts.
    pub need_hello: bool,
    /// In memory only: the cut time of the point in flight, as `CutTaken` gave it. An answer
    /// is that point's only if it names the same cut: a late answer of an older attempt at the
    /// same `seq` (before a restart of the cycle, a resynchronization) never counts.
    pub inflight_cut_unix_ns: Option<u64>,
    /// Primary role: whether a resynchronization starts by itself when the relationship
    /// becomes `ResynchronizationRequired` (`replication set --auto-resynchronize`). A setting
    /// stored with the VM's replication settings (`catalog.md`), not in the relationship's
    /// record: the host sets it after loading, and changes it with [`Event::SetAutoResync`].
    pub auto_resync: AutoResync,
}

impl Relationship {
    /// A relationship just enabled: `ReadyForInitialReplication`, no point yet.
    pub fn new(vm: VmName, role: Role, generation: Generation) -> Relationship {
        Relationship {
            vm,
            role,
            state: State::ReadyForInitialReplication,
            progress: Progress {
                generation,
                ..Progress::default()
            },
            need_hello: true,
            inflight_cut_unix_ns: None,
            auto_resync: AutoResync::Off,
        }
    }

    fn clear_inflight(&mut self) {
        self.progress.inflight_seq = None;
        self.inflight_cut_unix_ns = None;
    }
}

/// What a delta (a cycle) carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CycleKind {
    /// The first point: every allocated block.
    Initial,
    /// The blocks written since the previous point.
    Incremental,
    /// Every block (holes as zeros), on top of whatever the replica has: a resynchronization.
    Full,
}

/// What the replica said when it refused a delta (`PeerRefusal`, `peer-protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerRefusalFacts {
    /// The point the replica expects next (`out_of_sequence`).
    pub expected_seq: Option<Seq>,
    /// The refusal means the replica cannot follow as is.
    pub needs_resync: bool,
    /// The replica host failed the VM over (`failed_over`): this host is not its primary
    /// any more.
    pub failed_over: bool,
    /// The cut time of the upload refused (`None`: not an upload's refusal). Only the refusal
    /// of the upload in flight (`inflight_cut_unix_ns`) says where the replica stands; a late
    /// one of an earlier cycle may name the same point number after a resynchronization
    /// moved `last_seq` back.
    pub cut_unix_ns: Option<u64>,
    pub error: String,
}

/// Everything that can happen to a relationship. Commands (from the API) can be refused;
/// the other events are facts and never are (a fact that does not apply changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    // ---- Commands (primary).
    /// `replication start`.
    StartInitial,
    /// `replication start --use-existing PATH...`: the replica host adopted existing images
    /// as point 1 of its (new) replica VM, marked damaged until compared. The first cycle is
    /// a `Full` one, which compares every block with them and ships only those that differ.
    StartInitialFromExisting,
    /// `replication start --at TIME`: start the initial replication at `at_unix_ns` (now if
    /// it is not in the future).
    ScheduleInitial { at_unix_ns: u64 },
    /// `replication start --to-media DIR`: point 1, cut at `cut_unix_ns`, is durably on the
    /// media (and its cut committed locally). It stays in flight until the replica holds it.
    InitialMediaWritten { cut_unix_ns: u64 },
    /// `replication suspend`.
    Suspend,
    /// `replication resume`.
    Resume,
    /// `replication resume --resynchronize [--at TIME]`. `reason`: shown with the state;
    /// `None` keeps the reason the relationship required it for.
    Resynchronize {
        at_unix_ns: Option<u64>,
        reason: Option<String>,
    },
    /// `replication set NAME --auto-resynchronize on|off [--resynchronize-window W]`: stored
    /// in the relationship; a relationship already `ResynchronizationRequired` is scheduled
    /// at once when it turns on (a resynchronization already scheduled or running stays when
    /// it turns off: `ResyncCancel` stops it).
    SetAutoResync { auto: AutoResync },
    /// `replication resync-cancel NAME`: a resynchronization running, scheduled, or suspended
    /// while running goes back to `ResynchronizationRequired` with its reason. `replica`: the
    /// replica's newest point and generation as the host found them after the upload in
    /// flight stopped there (`None`: the replica could not be asked); when that is the
    /// resynchronization's point in flight, it had committed: the core adopts it (the
    /// resynchronization is complete and nothing is cancelled).
    ResyncCancel { replica: Option<(Seq, Generation)> },
    // ---- Facts (primary).
    /// Time passed: a due scheduled resynchronization starts.
    Tick,
    /// The cycle timer fired (or `sync`) and no cycle is running.
    CycleDue,
    /// The replica answered the cycle's hello.
    HelloAnswered {
        latest_seq: Seq,
        /// The cut time of the replica's point `latest_seq`, when it says.
        latest_cut_unix_ns: Option<u64>,
        generation: Generation,
        damage: Option<String>,
    },
    /// The cycle's cut of point `seq` was taken at `cut_unix_ns` (history clock; not yet
    /// uploaded).
    CutTaken { seq: Seq, cut_unix_ns: u64 },
    /// The replica committed point `seq`, cut at `cut_unix_ns` (its answer to the upload).
    Committed {
        seq: Seq,
        cut_unix_ns: u64,
        app_consistent: bool,
    },
    /// The cycle shipping point `seq` failed (transport, refusal, local error).
    CycleFailed {
        seq: Seq,
        error: String,
        refusal: Option<PeerRefusalFacts>,
    },
    /// Local change tracking of the VM is lost for good (a sticky storage error).
    StorageFailed { reason: String },
    /// The daemon restarted (the relationship was loaded from its record).
    Restarted,
    // ---- Facts (replica).
    /// The primary said hello. `primary_state`: the state it reports, when it reports one;
    /// `latest_seq`: this replica's newest point.
    HelloReceived {
        primary_state: Option<ReplicationState>,
        generation: Generation,
        latest_seq: Seq,
    },
    /// A delta started arriving.
    DeltaStarted { kind: CycleKind },
    /// A delta was committed as point `seq`.
    DeltaCommitted {
        seq: Seq,
        kind: CycleKind,
        cut_unix_ns: u64,
    },
    /// The replica cannot follow (an out-of-sequence delta, a damaged store).
    Diverged { reason: String },
    // ---- Failover commands (replica).
    /// `failover start NAME [--point ID] [--test]`: serve point `point` (the host checked that
    /// it exists in the store). `test`: as the `NAME-test` VM over copy-on-write disks while
    /// replication goes on; otherwise writable disks over the point and nothing is received
    /// until `FailoverComplete` or `FailoverStop`. Again (not a test) while failed over:
    /// discards what was written and starts over from `point`.
    FailoverStart { point: Seq, test: bool },
    /// `failover stop NAME [--test]`: ends a test failover (`test`), or cancels a failover
    /// that is not complete. On the primary, `failover stop NAME` cancels a prepare, as
    /// `Resume` does.
    FailoverStop { test: bool },
    /// `failover complete NAME`: keep the chosen point; this host becomes the VM's primary.
    FailoverComplete,
    // ---- Failover (primary).
    /// `failover prepare NAME`: the host fenced the VM (no NBD client, new connections
    /// refused) and then a cycle committed point `seq`, the VM's last change. Refused unless
    /// `Replicating` with `seq` the newest committed point and nothing in flight.
    Prepared { seq: Seq },
    /// The replica host said it failed the VM over (`failed_over`, at a hello or an upload):
    /// the primary fences the VM and ships nothing more for this generation. A primary
    /// prepared for a planned failover stays prepared (that failover is the expected one).
    ReplicaFailedOver { reason: String },
    // `Event::Reverse` (`replication reverse NAME --replica HOST:PORT`) goes here: from
    // `FailedOver` (and the old primary's side) to replicating in the other direction. Not
    // built yet; until it is, `FailedOver` refuses every replication command naming it.
}

/// What an emitted event says; the daemon maps each to its event id (`events.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    InitialStarted,
    InitialScheduled,
    InitialDone,
    Suspended,
    Resumed,
    ResyncRequired,
    AnswerLostAdopted,
    ResyncScheduled,
    ResyncStarted,
    ResyncDone,
    ResyncCancelled,
    CycleFailed,
    TestFailoverStarted,
    TestFailoverStopped,
    FailoverStarted,
    FailoverCancelled,
    FailoverCompleted,
    PreparedForFailover,
    FencedAfterFailover,
}

impl EventKind {
    /// The event's level in the event log.
    pub fn level(self) -> &'static str {
        match self {
            EventKind::ResyncRequired | EventKind::FencedAfterFailover => "error",
            EventKind::CycleFailed => "warning",
            _ => "info",
        }
    }
}

/// What the daemon does, in order. It installs the new relationship only if every action up
/// to and including `Persist` succeeded; fallible preparation (scans) therefore comes before
/// `Persist`, and nothing after `Persist` can undo the step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Mark every allocated block of the replicated disks dirty (a scan; can fail).
    MarkAllocatedDirty,
    /// Mark every block of the replicated disks dirty (a full resynchronization).
    MarkAllDirty,
    /// Write the new relationship's record durably.
    Persist,
    /// Log an event.
    Emit { kind: EventKind, message: String },
    /// Start a cycle. With `hello_first` the daemon asks the replica first and feeds
    /// `HelloAnswered`; `seq` and `kind` are then what the cycle will ship if the answer finds
    /// the replica in sync, and the answer's step says what to cut (`TakeCut`). Without, a
    /// `TakeCut` follows at once.
    StartCycle {
        seq: Seq,
        kind: CycleKind,
        hello_first: bool,
    },
    /// Take the cut of point `seq` (then feed `CutTaken`, and upload only after its `Persist`).
    TakeCut { seq: Seq, kind: CycleKind },
    /// Abort the running cycle, if any (its blocks stay dirty).
    CancelCycle,
    /// Give back the copy-before-write memory pool (no cut until the next cycle).
    ReleaseCopyBeforeWrite,
    /// Tell the peer about the state change (a hello; best effort, failures ignored).
    SayHello,
    /// Run a cycle now instead of at the next period.
    ScheduleCycleNow,
    /// Serve point `point`'s disks writable (can fail, so it comes before `Persist`). `test`:
    /// create the `NAME-test` VM over copy-on-write disks of the point; otherwise writable
    /// disks over the point for the VM itself.
    ServeFailover { point: Seq, test: bool },
    /// Stop serving the failover's disks (the test VM, or the failed-over disks) and throw
    /// their writes away.
    DropFailover { test: bool },
    /// Keep the failed-over disks as the VM's disks and drop the other points (can fail, so
    /// it comes before `Persist`; run again after a crash before `Persist`, it must find the
    /// work done).
    CompleteFailover { point: Seq },
    /// Let NBD clients connect to the VM's disks again (the end of a prepare's fence).
    Unfence,
    /// Fence the VM's disks whatever uses them: no new NBD connection, and writes of a
    /// connection still open fail (an unplanned failover happened elsewhere).
    Fence,
}

/// Whether a refused command conflicts with the relationship's state, or makes no sense here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    Conflict,
    Invalid,
}

/// A refused event: nothing changed. `message` is one line, naming the command to run where
/// one helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

fn conflict(message: String) -> Refusal {
    Refusal {
        kind: RefusalKind::Conflict,
        message,
    }
}

fn invalid(message: String) -> Refusal {
    Refusal {
        kind: RefusalKind::Invalid,
        message,
    }
}

fn emit(kind: EventKind, message: impl Into<String>) -> Action {
    Action::Emit {
        kind,
        message: message.into(),
    }
}

/// The next relationship and the actions that get there, or a refusal (nothing changes).
pub fn step(
    rel: &Relationship,
    event: Event,
    now_unix_ns: u64,
) -> Result<(Relationship, Vec<Action>), Refusal> {
    let mut s = Step {
        next: rel.clone(),
        actions: Vec::new(),
        now_unix_ns,
    };
    let vm = rel.vm.clone();
    match (&event, rel.role) {
        (
            Event::HelloReceived { .. }
            | Event::DeltaStarted { .. }
            | Event::DeltaCommitted { .. }
            | Event::Diverged { .. },
            Role::Primary,
        ) => {
            return Err(invalid(format!(
                "{vm} is replicated from this host: it is not a replica here"
            )))
        }
        (
            Event::StartInitial
            | Event::StartInitialFromExisting
            | Event::ScheduleInitial { .. }
            | Event::InitialMediaWritten { .. }
            | Event::Suspend
            | Event::Resume
            | Event::Resynchronize { .. }
            | Event::SetAutoResync { .. }
            | Event::ResyncCancel { .. }
            | Event::CycleDue
            | Event::HelloAnswered { .. }
            | Event::CutTaken { .. }
            | Event::Committed { .. }
            | Event::CycleFailed { .. }
            | Event::Prepared { .. }
            | Event::ReplicaFailedOver { .. },
            Role::Replica,
        ) => {
            return Err(invalid(format!(
                "{vm} is a replica on this host; run this on its primary"
            )))
        }
        _ => {}
    }
    match (&rel.state, rel.role) {
        (State::FailedOver, _) => match event {
            Event::StartInitial
            | Event::StartInitialFromExisting
            | Event::ScheduleInitial { .. }
            | Event::Suspend
            | Event::Resume
            | Event::Resynchronize { .. }
            | Event::Prepared { .. } => return Err(conflict(s.reverse_hint())),
            // No cycle runs and there is no replica: a late fact of the old relationship
            // changes nothing (the reverse decides what to send).
            Event::Tick
            | Event::CycleDue
            | Event::HelloAnswered { .. }
            | Event::CutTaken { .. }
            | Event::Committed { .. }
            | Event::CycleFailed { .. }
            | Event::StorageFailed { .. } => return Ok((s.next, s.actions)),
            _ => {}
        },
        (
            State::FencedAfterFailover {
                reason,
                resume_to,
                resync,
            },
            Role::Primary,
        ) => match event {
            Event::StartInitial
            | Event::StartInitialFromExisting
            | Event::ScheduleInitial { .. }
            | Event::Suspend
            | Event::Resynchronize { .. }
            | Event::Prepared { .. } => return Err(conflict(s.fenced_hint())),
            Event::ReplicaFailedOver { .. } => return Ok((s.next, s.actions)),
            // Late facts of the cancelled cycle, and local tracking lost: judged as for a
            // suspended relationship (nothing ships), and a divergence found is kept for when
            // the fence ends; the point in flight stays recorded for the next hello to adopt.
            Event::HelloAnswered { .. }
            | Event::CycleFailed { .. }
            | Event::Committed { .. }
            | Event::CutTaken { .. }
            | Event::StorageFailed { .. } => {
                let mut inner = rel.clone();
                inner.state = State::Suspended {
                    resume_to: Resumable::Replicating,
                };
                // Nothing is scheduled while fenced: `resume` does that when the fence ends.
                inner.auto_resync = AutoResync::Off;
                let (mut next, actions) = step(&inner, event, now_unix_ns)?;
                next.auto_resync = rel.auto_resync;
                let resync = match next.state {
                    State::ResynchronizationRequired { reason } => Some(reason),
                    _ => resync.clone(),
                };
                next.state = State::FencedAfterFailover {
                    reason: reason.clone(),
                    resume_to: *resume_to,
                    resync,
                };
                let mut kept: Vec<Action> = actions
                    .into_iter()
                    .filter(|a| matches!(a, Action::Emit { .. } | Action::CancelCycle))
                    .collect();
                if next.to_record() != rel.to_record() {
                    kept.insert(0, Action::Persist);
                }
                return Ok((next, kept));
            }
            _ => {}
        },
        (State::PreparedForFailover { .. }, Role::Primary) => match event {
            Event::StartInitial
            | Event::StartInitialFromExisting
            | Event::ScheduleInitial { .. }
            | Event::Suspend
            | Event::Resynchronize { .. } => return Err(conflict(s.prepared_hint())),
            _ => {}
        },
        // A test runs beside replication: the replica's facts change the state it would show
        // without the test, which the test keeps.
        (State::TestFailoverInProgress { point, underlying }, Role::Replica) => {
            if let Event::HelloReceived { .. }
            | Event::DeltaStarted { .. }
            | Event::DeltaCommitted { .. }
            | Event::Diverged { .. }
            | Event::Restarted
            | Event::Tick = event
            {
                let mut inner = rel.clone();
                inner.state = (**underlying).clone();
                let (mut next, actions) = step(&inner, event, now_unix_ns)?;
                next.state = State::TestFailoverInProgress {
                    point: *point,
                    underlying: Box::new(next.state),
                };
                return Ok((next, actions));
            }
        }
        // Writable disks are served over the chosen point: the host refuses uploads and hellos
        // (`accepts_deltas`). A delta that was already being received when the failover
        // started may still commit: the store holds it, so progress says so; the state stays.
        (State::FailedOverWaitingCompletion { .. }, Role::Replica) => match event {
            Event::HelloReceived { .. } | Event::DeltaStarted { .. } | Event::Diverged { .. } => {
                return Ok((s.next, s.actions))
            }
            Event::DeltaCommitted {
                seq, cut_unix_ns, ..
            } => {
                s.next.progress.last_seq = seq;
                s.next.progress.last_cut_unix_ns = Some(cut_unix_ns);
                s.actions.push(Action::Persist);
                return Ok((s.next, s.actions));
            }
            _ => {}
        },
        _ => {}
    }
    match event {
        Event::StartInitial => s.start_initial()?,
        Event::StartInitialFromExisting => s.start_initial_from_existing()?,
        Event::ScheduleInitial { at_unix_ns } => s.schedule_initial(at_unix_ns, now_unix_ns)?,
        Event::InitialMediaWritten { cut_unix_ns } => s.initial_media_written(cut_unix_ns)?,
        Event::Suspend => s.suspend()?,
        Event::Resume => s.resume()?,
        Event::Resynchronize { at_unix_ns, reason } => {
            s.resynchronize(at_unix_ns, reason, now_unix_ns)?
        }
        Event::SetAutoResync { auto } => s.set_auto_resync(auto),
        Event::ResyncCancel { replica } => s.resync_cancel(replica)?,
        Event::Tick => {
            if let (State::InitialReplicationScheduled { at_unix_ns }, Role::Primary) =
                (&rel.state, rel.role)
            {
                if *at_unix_ns <= now_unix_ns {
                    s.start_initial()?;
                }
            }
            // On the replica the state only mirrors the primary's: the primary starts it.
            if let (State::WaitingForStartResynchronize { reason, at_unix_ns }, Role::Primary) =
                (&rel.state, rel.role)
            {
                if *at_unix_ns <= now_unix_ns {
                    s.start_resync(reason.clone());
                }
            }
        }
        Event::CycleDue => {
            if rel.state.cycles() {
                let (seq, kind) = s.cut_plan();
                s.actions.push(Action::StartCycle {
                    seq,
                    kind,
                    hello_first: rel.need_hello,
                });
                if !rel.need_hello {
                    s.actions.push(Action::TakeCut { seq, kind });
                }
            }
        }
        Event::HelloAnswered {
            latest_seq,
            latest_cut_unix_ns,
            generation,
            damage,
        } => s.hello_answered(
            latest_seq,
            latest_cut_unix_ns,
            generation,
            damage.as_deref(),
        ),
        Event::CutTaken { seq, cut_unix_ns } => {
            if rel.state.cycles() && !rel.need_hello && seq == rel.progress.last_seq.next() {
                s.next.progress.inflight_seq = Some(seq);
                s.next.inflight_cut_unix_ns = Some(cut_unix_ns);
                s.actions.push(Action::Persist);
            } else {
                // Not the cut this relationship expects: it must not be shipped.
                s.cancel_cycle();
            }
        }
        Event::Committed {
            seq,
            cut_unix_ns,
            app_consistent,
        } => s.committed(seq, cut_unix_ns, app_consistent),
        Event::CycleFailed {
            seq,
            error,
            refusal,
        } => s.cycle_failed(seq, &error, refusal),
        Event::StorageFailed { reason } => s.require_resync(reason),
        Event::Restarted => s.next.need_hello = true,
        Event::HelloReceived {
            primary_state,
            generation,
            latest_seq,
        } => s.hello_received(primary_state, generation, latest_seq, now_unix_ns),
        Event::DeltaStarted { kind } => {
            let to = match (kind, &rel.state) {
                (CycleKind::Full, State::Resynchronizing { .. }) => None,
                (CycleKind::Full, _) => Some(State::Resynchronizing {
                    reason: rel.state.reason().map(String::from),
                }),
                (CycleKind::Initial, State::ReadyForInitialReplication) => {
                    Some(State::InitialReplicationInProgress)
                }
                _ => None,
            };
            if let Some(to) = to {
                s.next.state = to;
                s.actions.push(Action::Persist);
            }
        }
        Event::DeltaCommitted {
            seq,
            kind,
            cut_unix_ns,
        } => {
            s.next.progress.last_seq = seq;
            s.next.progress.last_cut_unix_ns = Some(cut_unix_ns);
            // A damaged or diverged replica is repaired only by a Full delta (or a new
            // first point). A state the primary chose (suspended, a resynchronization
            // scheduled) stays: a point whose upload ended just before it does not undo it.
            let repaired = kind != CycleKind::Incremental;
            let to_replicating = match &rel.state {
                State::ResynchronizationRequired { .. } => repaired,
                State::Suspended { .. } | State::WaitingForStartResynchronize { .. } => false,
                _ => true,
            };
            if to_replicating {
                s.next.state = State::Replicating;
            }
            s.actions.push(Action::Persist);
        }
        Event::Diverged { reason } => s.require_resync(reason),
        Event::FailoverStart { point, test } => s.failover_start(point, test)?,
        Event::FailoverStop { test } => s.failover_stop(test)?,
        Event::FailoverComplete => s.failover_complete()?,
        Event::Prepared { seq } => s.prepared(seq)?,
        Event::ReplicaFailedOver { reason } => s.fence_after_failover(reason),
    }
    Ok((s.next, s.actions))
}

struct Step {
    next: Relationship,
    actions: Vec<Action>,
    now_unix_ns: u64,
}

impl Step {
    fn vm(&self) -> &VmName {
        &self.next.vm
    }

    fn resync_hint(&self) -> String {
        let vm = self.vm();
        format!("{vm} requires resynchronization; run `understudy replication resume {vm} --resynchronize`")
    }

    fn reverse_hint(&self) -> String {
        let vm = self.vm();
        format!("the failover of {vm} is complete and the VM runs on this host; set up reverse replication: `understudy replication reverse {vm} --replica HOST:PORT`")
    }

    fn fenced_hint(&self) -> String {
        let vm = self.vm();
        format!("the replica host failed {vm} over, so its disks are fenced here; make this host its replica with `understudy replication reverse {vm} --replica THIS_HOST:PORT` on the new primary, run `understudy replication resume {vm}` if that failover was stopped, or `understudy replication remove {vm}` to use the disks here without replication")
    }

    fn prepared_hint(&self) -> String {
        let vm = self.vm();
        format!("{vm} is prepared for a planned failover; run `understudy failover start {vm}` on the replica, or `understudy replication resume {vm}` to cancel the prepare")
    }

    /// The seq and kind of the next cut in the current state.
    fn cut_plan(&self) -> (Seq, CycleKind) {
        let kind = match self.next.state {
            State::InitialReplicationInProgress => CycleKind::Initial,
            State::Resynchronizing { .. } => CycleKind::Full,
            _ => CycleKind::Incremental,
        };
        (self.next.progress.last_seq.next(), kind)
    }

    fn cancel_cycle(&mut self) {
        self.actions.push(Action::CancelCycle);
        self.next.need_hello = true;
    }

    fn start_initial(&mut self) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        match self.next.state {
            // From media too: `replication start` gives up on the media.
            State::ReadyForInitialReplication
            | State::InitialReplicationScheduled { .. }
            | State::InitialReplicationByMedia => {
                self.next.state = State::InitialReplicationInProgress;
                self.next.clear_inflight();
                self.actions.extend([
                    Action::MarkAllocatedDirty,
                    Action::Persist,
                    emit(EventKind::InitialStarted, "initial replication started"),
                    Action::SayHello,
                    Action::ScheduleCycleNow,
                ]);
                Ok(())
            }
            State::Suspended {
                resume_to: Resumable::ReadyForInitialReplication,
            } => Err(conflict(format!(
                "replication of {vm} is suspended; run `understudy replication resume {vm}` first"
            ))),
            State::ResynchronizationRequired { .. } => Err(conflict(self.resync_hint())),
            _ => Err(conflict(format!(
                "initial replication of {vm} was already started"
            ))),
        }
    }

    fn media_hint(&self) -> String {
        let vm = self.vm();
        format!("the initial replication of {vm} was written to media; run `understudy replication import-media {vm} --from DIR` on the replica host, or `understudy replication start {vm}` to send it over the network instead")
    }

    /// `replication start --to-media`: point 1 is on the media and stays in flight until the
    /// replica holds it; the cycles only ask (hello) meanwhile.
    fn initial_media_written(&mut self, cut_unix_ns: u64) -> Result<(), Refusal> {
        match self.next.state {
            State::ReadyForInitialReplication | State::InitialReplicationScheduled { .. } => {}
            State::InitialReplicationByMedia => return Err(conflict(self.media_hint())),
            _ => return self.start_initial(),
        }
        self.next.state = State::InitialReplicationByMedia;
        self.next.progress.inflight_seq = Some(Seq(1));
        self.next.inflight_cut_unix_ns = Some(cut_unix_ns);
        self.next.need_hello = true;
        self.actions.extend([
            Action::Persist,
            emit(
                EventKind::InitialStarted,
                "initial replication written to media: it completes when the replica imports it (`replication import-media`)",
            ),
            Action::SayHello,
        ]);
        Ok(())
    }

    /// The replica adopted existing images as point 1 (damaged until compared): every block
    /// is marked and the first cycle is the compare of a resynchronization (`Full`, seq 2).
    fn start_initial_from_existing(&mut self) -> Result<(), Refusal> {
        if self.next.state == State::InitialReplicationByMedia {
            return Err(conflict(self.media_hint()));
        }
        if !matches!(
            self.next.state,
            State::ReadyForInitialReplication | State::InitialReplicationScheduled { .. }
        ) {
            // The same refusals as a network start.
            return self.start_initial();
        }
        self.next.state = State::Resynchronizing {
            reason: Some(INITIAL_FROM_EXISTING_REASON.into()),
        };
        self.next.progress.last_seq = EXISTING_COPY_SEQ;
        self.next.clear_inflight();
        self.next.need_hello = true;
        self.actions.extend([
            Action::MarkAllDirty,
            Action::Persist,
            emit(
                EventKind::InitialStarted,
                "initial replication started from an existing copy on the replica",
            ),
            Action::SayHello,
            Action::ScheduleCycleNow,
        ]);
        Ok(())
    }

    /// `replication start --at TIME`: waits (no cycle) until `at_unix_ns`, when a `Tick`
    /// starts it; a time not in the future starts it now. Again while scheduled: the new time.
    fn schedule_initial(&mut self, at_unix_ns: u64, now_unix_ns: u64) -> Result<(), Refusal> {
        if self.next.state == State::InitialReplicationByMedia {
            return Err(conflict(self.media_hint()));
        }
        if !matches!(
            self.next.state,
            State::ReadyForInitialReplication | State::InitialReplicationScheduled { .. }
        ) {
            return self.start_initial();
        }
        if at_unix_ns <= now_unix_ns {
            return self.start_initial();
        }
        self.next.state = State::InitialReplicationScheduled { at_unix_ns };
        self.actions.extend([
            Action::Persist,
            emit(
                EventKind::InitialScheduled,
                format!(
                    "initial replication scheduled at {} (in {} s)",
                    proto::time::rfc3339_from_unix_ns(at_unix_ns),
                    (at_unix_ns - now_unix_ns) / 1_000_000_000
                ),
            ),
        ]);
        Ok(())
    }

    fn suspend(&mut self) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        let resume_to = match self.next.state {
            State::Suspended { .. } => return Ok(()),
            State::ReadyForInitialReplication => Resumable::ReadyForInitialReplication,
            State::InitialReplicationInProgress => Resumable::InitialReplicationInProgress,
            State::Replicating => Resumable::Replicating,
            State::Resynchronizing { .. } => Resumable::Resynchronizing,
            State::ResynchronizationRequired { .. } => return Err(conflict(self.resync_hint())),
            State::WaitingForStartResynchronize { .. } => {
                return Err(conflict(format!(
                    "a resynchronization of {vm} is scheduled; run `understudy replication resume {vm} --resynchronize` to start it now"
                )))
            }
            State::InitialReplicationScheduled { .. } => {
                return Err(conflict(format!(
                    "the initial replication of {vm} is scheduled; run `understudy replication start {vm}` to start it now"
                )))
            }
            State::InitialReplicationByMedia => return Err(conflict(self.media_hint())),
            // Refused before `step` gets here (primary-role states) or by the role check
            // (replica-role states); kept total for the compiler.
            State::FailedOver => return Err(conflict(self.reverse_hint())),
            State::PreparedForFailover { .. } => return Err(conflict(self.prepared_hint())),
            State::FencedAfterFailover { .. } => return Err(conflict(self.fenced_hint())),
            State::TestFailoverInProgress { .. } | State::FailedOverWaitingCompletion { .. } => {
                return Err(invalid(format!(
                    "{vm} is a replica on this host; run this on its primary"
                )))
            }
        };
        self.next.state = State::Suspended { resume_to };
        self.cancel_cycle();
        self.actions.extend([
            Action::Persist,
            Action::ReleaseCopyBeforeWrite,
            emit(EventKind::Suspended, "replication suspended"),
            Action::SayHello,
        ]);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Refusal> {
        match self.next.state {
            State::Suspended { resume_to } => {
                self.next.state = resume_to.state();
                self.actions.extend([
                    Action::Persist,
                    emit(EventKind::Resumed, "replication resumed"),
                    Action::SayHello,
                    Action::ScheduleCycleNow,
                ]);
                Ok(())
            }
            State::ResynchronizationRequired { .. } => Err(conflict(self.resync_hint())),
            State::PreparedForFailover { .. } => {
                self.cancel_prepare("planned failover cancelled (replication resumed)");
                Ok(())
            }
            // The host resumes only after the replica answered a hello again (its failover
            // was stopped): where it stands is reconciled by the next cycle's hello.
            State::FencedAfterFailover {
                ref resync,
                resume_to,
                ..
            } => {
                self.next.state = match resync {
                    Some(reason) => State::ResynchronizationRequired {
                        reason: reason.clone(),
                    },
                    None => resume_to.state(),
                };
                self.next.need_hello = true;
                let scheduled = self.auto_schedule();
                self.actions.extend([
                    Action::Persist,
                    Action::Unfence,
                    emit(
                        EventKind::Resumed,
                        "replication resumed: the replica host's failover was stopped; the VM's disks are served again",
                    ),
                ]);
                self.actions.extend(scheduled);
                self.actions
                    .extend([Action::SayHello, Action::ScheduleCycleNow]);
                Ok(())
            }
            // Not suspended: nothing to resume.
            _ => Ok(()),
        }
    }

    fn resynchronize(
        &mut self,
        at_unix_ns: Option<u64>,
        reason: Option<String>,
        now_unix_ns: u64,
    ) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        if !self.next.state.initial_done() {
            return Err(conflict(match self.next.state {
                State::ReadyForInitialReplication
                | State::InitialReplicationScheduled { .. }
                | State::Suspended {
                    resume_to: Resumable::ReadyForInitialReplication,
                } => format!(
                    "the initial replication of {vm} has not started, so there is nothing to resynchronize; run `understudy replication start {vm}`"
                ),
                _ => format!(
                    "the initial replication of {vm} has not completed; a resynchronization is possible once it has"
                ),
            }));
        }
        let reason = reason.or_else(|| self.next.state.reason().map(String::from));
        match at_unix_ns {
            Some(at) if at > now_unix_ns => {
                self.next.state = State::WaitingForStartResynchronize {
                    reason,
                    at_unix_ns: at,
                };
                self.cancel_cycle();
                self.actions.extend([
                    Action::Persist,
                    emit(
                        EventKind::ResyncScheduled,
                        format!(
                            "resynchronization scheduled in {} s",
                            (at - now_unix_ns) / 1_000_000_000
                        ),
                    ),
                    Action::SayHello,
                ]);
            }
            _ => self.start_resync(reason),
        }
        Ok(())
    }

    /// Starts a full resynchronization: every block is shipped as one `Full` delta on top of
    /// whatever the replica has.
    fn start_resync(&mut self, reason: Option<String>) {
        self.next.state = State::Resynchronizing { reason };
        // A point cut before now is not the Full one: its answer must not end the
        // resynchronization. The next hello adopts whatever the replica has instead.
        self.next.clear_inflight();
        self.cancel_cycle();
        self.actions.extend([
            Action::MarkAllDirty,
            Action::Persist,
            emit(EventKind::ResyncStarted, "resynchronization started"),
            Action::SayHello,
            Action::ScheduleCycleNow,
        ]);
    }

    /// The replica can no longer follow: only a resynchronization leaves this state. The
    /// first reason stays, except the placeholder of a replica that mirrored the primary's
    /// state without knowing why: its own finding replaces it (and is logged).
    fn require_resync(&mut self, reason: String) {
        if let State::ResynchronizationRequired { reason: first } = &self.next.state {
            if first != crate::condition::REPORTED_BY_PRIMARY {
                return;
            }
        }
        // A primary prepared for a planned failover stays prepared, and fenced: the replica
        // may already have failed over to the prepared point, so serving the disks here could
        // make two primaries. Cancelling the prepare (after the replica confirms it did not
        // fail over) then leads to the resynchronization.
        if let (State::PreparedForFailover { seq, resync }, Role::Primary) =
            (&self.next.state, self.next.role)
        {
            if resync.is_none() {
                self.next.state = State::PreparedForFailover {
                    seq: *seq,
                    resync: Some(reason.clone()),
                };
                self.actions.extend([
                    Action::Persist,
                    emit(
                        EventKind::ResyncRequired,
                        format!("resynchronization required once the prepare is cancelled (the VM stays fenced: the replica may have failed over): {reason}"),
                    ),
                ]);
            }
            return;
        }
        let message = format!(
            "resynchronization required ({}): {reason}",
            crate::condition::label(&reason)
        );
        self.next.state = State::ResynchronizationRequired { reason };
        self.cancel_cycle();
        let scheduled = self.auto_schedule();
        self.actions.push(Action::Persist);
        self.actions.push(emit(EventKind::ResyncRequired, message));
        self.actions.extend(scheduled);
        self.actions.push(Action::SayHello);
    }

    /// A primary that just became `ResynchronizationRequired` with `auto_resync` on: the
    /// resynchronization is scheduled (`WaitingForStartResynchronize`) at once, or at the
    /// window's next start. A `Tick` starts it (within a second when due now): the start's
    /// scan of the disks can fail, and that must never undo the state just entered. Returns
    /// the event to log after `Persist`.
    fn auto_schedule(&mut self) -> Option<Action> {
        let State::ResynchronizationRequired { reason } = &self.next.state else {
            return None;
        };
        if self.next.role != Role::Primary {
            return None;
        }
        let now = self.now_unix_ns;
        let at = self.next.auto_resync.start_at(now)?;
        let reason = reason.clone();
        self.next.state = State::WaitingForStartResynchronize {
            reason: Some(reason),
            at_unix_ns: at,
        };
        let when = match self.next.auto_resync {
            AutoResync::On { window: Some(w) } if at > now => format!(
                "at the next start of its window {w} UTC, in {} s",
                (at - now) / 1_000_000_000
            ),
            AutoResync::On { window: Some(w) } => format!("now (inside its window {w} UTC)"),
            _ => "now".to_string(),
        };
        Some(emit(
            EventKind::ResyncScheduled,
            format!(
                "resynchronization scheduled automatically (auto-resynchronize on): starts {when}"
            ),
        ))
    }

    /// `replication set --auto-resynchronize`: kept; a relationship waiting for an admin is
    /// scheduled now that it need not.
    fn set_auto_resync(&mut self, auto: AutoResync) {
        self.next.auto_resync = auto;
        if let Some(scheduled) = self.auto_schedule() {
            self.actions
                .extend([Action::Persist, scheduled, Action::SayHello]);
        }
    }

    /// `replication resync-cancel`: back to `ResynchronizationRequired` with the reason the
    /// resynchronization ran for. The cycle in flight is cancelled (its `Full` delta is never
    /// committed: the host stopped its upload before asking the replica, `replica`). Auto
    /// resynchronization does not start it again: the admin chose to stop it.
    fn resync_cancel(&mut self, replica: Option<(Seq, Generation)>) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        let reason = match &self.next.state {
            State::Resynchronizing { reason }
            | State::WaitingForStartResynchronize { reason, .. } => reason.clone(),
            State::Suspended {
                resume_to: Resumable::Resynchronizing,
            } => None,
            other => {
                return Err(conflict(format!(
                    "no resynchronization of {vm} is running or scheduled (it is {:?})",
                    other.name()
                )))
            }
        };
        // The resynchronization's point committed before its upload stopped (the answer was
        // lost or not read yet): it is complete, and there is nothing to cancel.
        let p = &self.next.progress;
        let suspended = matches!(self.next.state, State::Suspended { .. });
        if let (Some((latest, generation)), Some(inflight), true) = (
            replica,
            p.inflight_seq,
            suspended || matches!(self.next.state, State::Resynchronizing { .. }),
        ) {
            if latest == inflight && generation == p.generation && latest == p.last_seq.next() {
                self.next.progress.last_seq = latest;
                if let Some(cut) = self.next.inflight_cut_unix_ns {
                    self.next.progress.last_cut_unix_ns = Some(cut);
                }
                self.next.clear_inflight();
                self.cancel_cycle();
                self.point_committed();
                if suspended {
                    // Still suspended: `resume` goes on replicating.
                    self.next.state = State::Suspended {
                        resume_to: Resumable::Replicating,
                    };
                }
                self.actions.push(emit(
                    EventKind::AnswerLostAdopted,
                    format!("the replica holds point {latest}, the resynchronization's, whose answer this primary never got; adopting it (nothing was cancelled)"),
                ));
                return Ok(());
            }
        }
        let reason = reason.unwrap_or_else(|| {
            "a resynchronization started by the admin was cancelled before it completed".into()
        });
        self.next.state = State::ResynchronizationRequired {
            reason: reason.clone(),
        };
        // Whatever was cut for the resynchronization is given up: its answer, if one comes
        // late, never ends a later resynchronization (the next hello reconciles).
        self.next.clear_inflight();
        self.cancel_cycle();
        self.actions.extend([
            Action::Persist,
            Action::ReleaseCopyBeforeWrite,
            emit(
                EventKind::ResyncCancelled,
                format!("resynchronization cancelled; the replica keeps its points as they were, and {vm} still requires resynchronization: {reason}"),
            ),
            Action::SayHello,
        ]);
        Ok(())
    }

    /// Leaves `InitialReplicationInProgress` / `Resynchronizing` when their point committed.
    fn point_committed(&mut self) {
        let done = match self.next.state {
            State::InitialReplicationInProgress | State::InitialReplicationByMedia => Some((
                EventKind::InitialDone,
                format!(
                    "initial replication complete (point {})",
                    self.next.progress.last_seq
                ),
            )),
            State::Resynchronizing { .. } => Some((
                EventKind::ResyncDone,
                format!(
                    "resynchronization complete (point {})",
                    self.next.progress.last_seq
                ),
            )),
            _ => None,
        };
        self.next.state = State::Replicating;
        self.actions.push(Action::Persist);
        if let Some((kind, message)) = done {
            self.actions.push(emit(kind, message));
        }
    }

    fn hello_answered(
        &mut self,
        latest_seq: Seq,
        latest_cut: Option<u64>,
        generation: Generation,
        damage: Option<&str>,
    ) {
        let p = &self.next.progress;
        let judged = reconcile(
            p.last_seq,
            p.inflight_seq,
            p.generation,
            latest_seq,
            generation,
            damage,
        );
        if self.next.state == State::InitialReplicationByMedia {
            match judged {
                // The media is not imported yet: nothing ships; the next cycle asks again.
                Reconcile::InSync => {
                    self.next.need_hello = true;
                    return;
                }
                Reconcile::AdoptInflight(seq) => {
                    self.next.progress.last_seq = seq;
                    self.next.progress.last_cut_unix_ns = self.next.inflight_cut_unix_ns;
                    self.next.clear_inflight();
                    self.next.need_hello = false;
                    // Replicating, persisted, with "initial replication complete".
                    self.point_committed();
                }
                Reconcile::Diverged(reason) => {
                    self.require_resync(reason);
                    return;
                }
            }
            let (seq, kind) = self.cut_plan();
            self.actions.push(Action::TakeCut { seq, kind });
            return;
        }
        let cycling = self.next.state.cycles();
        // The replica's point has the seq in flight but another cut: an earlier attempt at
        // that seq committed (an ordinary cycle's upload still landing as a resynchronization
        // started). It is the base of the next point, never the point in flight: a
        // resynchronization goes on to its Full point. Its blocks are still marked dirty here
        // (the attempt's cut was given back), so nothing of it is lost.
        if let (Reconcile::AdoptInflight(seq), Some(ours), Some(theirs)) =
            (&judged, self.next.inflight_cut_unix_ns, latest_cut)
        {
            if ours != theirs {
                if !cycling {
                    return;
                }
                let seq = *seq;
                self.next.progress.last_seq = seq;
                self.next.progress.last_cut_unix_ns = Some(theirs);
                self.next.clear_inflight();
                self.next.need_hello = false;
                self.actions.push(Action::Persist);
                self.actions.push(emit(
                    EventKind::AnswerLostAdopted,
                    format!("the replica holds point {seq} from an earlier attempt (another cut than the one in flight); the next point follows it"),
                ));
                let (seq, kind) = self.cut_plan();
                self.actions.push(Action::TakeCut { seq, kind });
                return;
            }
        }
        match judged {
            Reconcile::InSync if cycling => self.next.need_hello = false,
            Reconcile::AdoptInflight(seq) if cycling => {
                self.next.progress.last_seq = seq;
                self.next.clear_inflight();
                self.next.need_hello = false;
                self.point_committed();
                self.actions.push(emit(
                    EventKind::AnswerLostAdopted,
                    format!("the replica holds point {seq}, whose answer this primary never got; adopting it"),
                ));
            }
            // A hello answered after its cycle was cancelled: the next cycle asks again.
            Reconcile::InSync | Reconcile::AdoptInflight(_) => return,
            // A full resynchronization writes every block, so it may follow any point, and it
            // repairs a damaged replica (the store clears its damage on a Full delta). This is
            // the one place `last_seq` may go back.
            Reconcile::Diverged(_) if matches!(self.next.state, State::Resynchronizing { .. }) => {
                self.next.progress.last_seq = latest_seq;
                self.next.clear_inflight();
                self.next.need_hello = false;
                self.actions.push(Action::Persist);
            }
            Reconcile::Diverged(reason) => {
                self.require_resync(reason);
                return;
            }
        }
        let (seq, kind) = self.cut_plan();
        self.actions.push(Action::TakeCut { seq, kind });
    }

    fn committed(&mut self, seq: Seq, cut_unix_ns: u64, app_consistent: bool) {
        let p = &self.next.progress;
        // Only the answer for the point in flight counts: a late answer of an older cycle,
        // or one that arrives after a cancel, changes nothing (the next hello reconciles).
        if !self.next.state.cycles()
            || p.inflight_seq != Some(seq)
            || seq != p.last_seq.next()
            || self.next.inflight_cut_unix_ns != Some(cut_unix_ns)
        {
            return;
        }
        self.next.clear_inflight();
        let p = &mut self.next.progress;
        p.last_seq = seq;
        p.last_cut_unix_ns = Some(cut_unix_ns);
        if app_consistent {
            p.last_app_consistent_unix_ns = Some(cut_unix_ns);
        }
        self.point_committed();
    }

    fn cycle_failed(&mut self, seq: Seq, error: &str, refusal: Option<PeerRefusalFacts>) {
        self.next.need_hello = true;
        self.actions.push(emit(
            EventKind::CycleFailed,
            format!("replication cycle failed: {error}"),
        ));
        if refusal.as_ref().is_some_and(|r| r.failed_over) {
            let reason = refusal.map(|r| r.error).unwrap_or_default();
            self.fence_after_failover(reason);
            return;
        }
        let Some(refusal) = refusal.filter(|r| r.needs_resync) else {
            return;
        };
        // A refusal of an older cycle's point says nothing about where the replica stands
        // now; the next hello asks. Only an upload is refused so (its point is in flight: the
        // cut was recorded before it started), so a refusal of a point not in flight is a late
        // one of an earlier cycle, even when its number came round again after a
        // resynchronization moved `last_seq` back.
        if seq != self.next.progress.last_seq.next()
            || self.next.progress.inflight_seq != Some(seq)
            || refusal.cut_unix_ns.is_none()
            || refusal.cut_unix_ns != self.next.inflight_cut_unix_ns
        {
            return;
        }
        let judged = match refusal.expected_seq {
            Some(expected) => judge_out_of_sequence(seq, self.next.progress.inflight_seq, expected),
            None => OutOfSequence::Diverged(refusal.error.clone()),
        };
        match judged {
            // The next hello adopts it (the failure set need_hello) and says so.
            OutOfSequence::AlreadyDelivered => {}
            // A Full delta refused out of sequence: the next hello adopts whatever the replica
            // has and a new Full delta follows it; the one in flight is not the one to adopt.
            OutOfSequence::Diverged(_)
                if refusal.expected_seq.is_some()
                    && matches!(self.next.state, State::Resynchronizing { .. }) =>
            {
                if self.next.progress.inflight_seq.is_some() {
                    self.actions.push(Action::Persist);
                }
                self.next.clear_inflight();
            }
            OutOfSequence::Diverged(reason) => self.require_resync(reason),
        }
    }

    fn no_failover(&self) -> Refusal {
        let vm = self.vm();
        conflict(format!(
            "no failover of {vm} is in progress; run `understudy failover start {vm}` first"
        ))
    }

    /// `failover start` (replica role; the host checked that `point` exists in the store).
    fn failover_start(&mut self, point: Seq, test: bool) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        if self.next.role == Role::Primary {
            return Err(match self.next.state {
                State::FailedOver => conflict(self.reverse_hint()),
                _ => invalid(format!(
                    "{vm} is replicated from this host: it is not a replica here; run `understudy failover start {vm}` on its replica host"
                )),
            });
        }
        let newest = self.next.progress.last_seq;
        if newest == Seq(0) {
            return Err(conflict(format!(
                "{vm} has no committed point yet; a failover needs one (the initial replication must complete first)"
            )));
        }
        if point == Seq(0) || point > newest {
            return Err(invalid(format!(
                "point {point} of {vm} does not exist here (the newest is {newest})"
            )));
        }
        match (&self.next.state, test) {
            (State::TestFailoverInProgress { point: running, .. }, true) => Err(conflict(format!(
                "a test failover of {vm} is already running (point {running}); run `understudy failover stop {vm} --test` first"
            ))),
            (State::TestFailoverInProgress { .. }, false) => Err(conflict(format!(
                "a test failover of {vm} is running; stop the test failover first: `understudy failover stop {vm} --test`"
            ))),
            (State::FailedOverWaitingCompletion { point: running }, true) => Err(conflict(format!(
                "{vm} is failed over to point {running}; run `understudy failover complete {vm}` or `understudy failover stop {vm}` first"
            ))),
            (State::FailedOverWaitingCompletion { point: running }, false) => {
                let running = *running;
                self.next.state = State::FailedOverWaitingCompletion { point };
                self.actions.extend([
                    Action::DropFailover { test: false },
                    Action::ServeFailover { point, test: false },
                    Action::Persist,
                    emit(
                        EventKind::FailoverStarted,
                        format!("failover started again at point {point} (what was written over point {running} is discarded)"),
                    ),
                ]);
                Ok(())
            }
            (_, true) => {
                let underlying = Box::new(self.next.state.clone());
                self.next.state = State::TestFailoverInProgress { point, underlying };
                self.actions.extend([
                    Action::ServeFailover { point, test: true },
                    Action::Persist,
                    emit(
                        EventKind::TestFailoverStarted,
                        format!("test failover started at point {point} ({vm}-test); replication goes on"),
                    ),
                ]);
                Ok(())
            }
            (_, false) => {
                self.next.state = State::FailedOverWaitingCompletion { point };
                self.actions.extend([
                    Action::ServeFailover { point, test: false },
                    Action::Persist,
                    emit(
                        EventKind::FailoverStarted,
                        format!("failover started at point {point}; the replica receives nothing until `failover complete` or `failover stop`"),
                    ),
                ]);
                Ok(())
            }
        }
    }

    /// `failover stop [--test]`.
    fn failover_stop(&mut self, test: bool) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        match (&self.next.state, self.next.role, test) {
            (State::PreparedForFailover { .. }, Role::Primary, false) => {
                self.cancel_prepare("planned failover cancelled");
                Ok(())
            }
            (State::FailedOver, _, _) => Err(conflict(self.reverse_hint())),
            (_, Role::Primary, _) => Err(invalid(format!(
                "{vm} is replicated from this host: it is not a replica here; run `understudy failover stop {vm}` on its replica host"
            ))),
            (State::TestFailoverInProgress { underlying, .. }, _, true) => {
                self.next.state = (**underlying).clone();
                self.actions.extend([
                    Action::DropFailover { test: true },
                    Action::Persist,
                    emit(
                        EventKind::TestFailoverStopped,
                        format!("test failover stopped; {vm}-test and its writes are gone"),
                    ),
                ]);
                Ok(())
            }
            (State::TestFailoverInProgress { .. }, _, false) => Err(conflict(format!(
                "the failover of {vm} in progress is a test; run `understudy failover stop {vm} --test`"
            ))),
            (State::FailedOverWaitingCompletion { .. }, _, false) => {
                self.next.state = if self.next.progress.last_seq == Seq(0) {
                    State::InitialReplicationInProgress
                } else {
                    State::Replicating
                };
                // Where the primary stands is not known here any more: its next hello says.
                self.actions.extend([
                    Action::DropFailover { test: false },
                    Action::Persist,
                    emit(
                        EventKind::FailoverCancelled,
                        "failover cancelled; what was written is discarded and the replica receives again",
                    ),
                ]);
                Ok(())
            }
            (State::FailedOverWaitingCompletion { .. }, _, true) => Err(conflict(format!(
                "no test failover of {vm} is in progress ({vm} is failed over); run `understudy failover stop {vm}` to cancel the failover"
            ))),
            (_, _, true) => Err(conflict(format!(
                "no test failover of {vm} is in progress"
            ))),
            (_, _, false) => Err(self.no_failover()),
        }
    }

    /// `failover complete`: this host becomes the VM's primary, at the chosen point.
    fn failover_complete(&mut self) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        match (&self.next.state, self.next.role) {
            // Already complete (a retry after a lost answer): nothing to do.
            (State::FailedOver, _) => Ok(()),
            (_, Role::Primary) => Err(invalid(format!(
                "{vm} is replicated from this host: it is not a replica here; run `understudy failover complete {vm}` on its replica host"
            ))),
            (State::FailedOverWaitingCompletion { point }, Role::Replica) => {
                let point = *point;
                self.next.role = Role::Primary;
                self.next.state = State::FailedOver;
                let p = &mut self.next.progress;
                // The VM starts from `point`; the newer points are dropped with the older.
                if p.last_seq != point {
                    p.last_cut_unix_ns = None;
                    p.last_app_consistent_unix_ns = None;
                }
                p.last_seq = point;
                self.next.clear_inflight();
                self.next.need_hello = true;
                self.actions.extend([
                    Action::CompleteFailover { point },
                    Action::Persist,
                    emit(
                        EventKind::FailoverCompleted,
                        format!("failover complete at point {point}: {vm} runs on this host; set up reverse replication: `understudy replication reverse {vm} --replica HOST:PORT`"),
                    ),
                ]);
                Ok(())
            }
            (State::TestFailoverInProgress { .. }, Role::Replica) => Err(conflict(format!(
                "a test failover cannot be completed; run `understudy failover stop {vm} --test`, then `understudy failover start {vm}`"
            ))),
            (_, Role::Replica) => Err(self.no_failover()),
        }
    }

    /// `failover prepare` (primary role): the host fenced the VM and a cycle committed `seq`.
    fn prepared(&mut self, seq: Seq) -> Result<(), Refusal> {
        let vm = self.vm().clone();
        let p = &self.next.progress;
        match self.next.state {
            State::PreparedForFailover { seq: prepared, .. } if prepared == seq => return Ok(()),
            State::PreparedForFailover { seq: prepared, .. } => {
                return Err(conflict(format!(
                    "{vm} is already prepared for a planned failover at point {prepared}"
                )))
            }
            State::Replicating => {}
            ref other => {
                return Err(conflict(format!(
                    "{vm} is {:?}; a planned failover needs it Replicating",
                    other.name()
                )))
            }
        }
        if let Some(inflight) = p.inflight_seq {
            return Err(conflict(format!(
                "point {inflight} of {vm} is still being shipped; a planned failover waits until it commits"
            )));
        }
        if seq != p.last_seq {
            return Err(conflict(format!(
                "point {seq} is not the newest point of {vm} the replica committed ({}); a planned failover needs the last change committed",
                p.last_seq
            )));
        }
        self.next.state = State::PreparedForFailover { seq, resync: None };
        self.cancel_cycle();
        self.actions.extend([
            Action::Persist,
            Action::ReleaseCopyBeforeWrite,
            emit(
                EventKind::PreparedForFailover,
                format!("prepared for a planned failover at point {seq}; the VM is fenced: run `understudy failover start {vm}` on the replica"),
            ),
            Action::SayHello,
        ]);
        Ok(())
    }

    /// The replica host failed the VM over: fence first (it cannot fail, and must hold even
    /// if the record cannot be written), then never ship for this generation again.
    fn fence_after_failover(&mut self, reason: String) {
        let (resume_to, resync) = match &self.next.state {
            // The planned failover going on (the VM is fenced already), or already known.
            State::PreparedForFailover { .. }
            | State::FencedAfterFailover { .. }
            | State::FailedOver
            | State::TestFailoverInProgress { .. }
            | State::FailedOverWaitingCompletion { .. } => return,
            State::ReadyForInitialReplication | State::InitialReplicationScheduled { .. } => {
                (Resumable::ReadyForInitialReplication, None)
            }
            State::InitialReplicationInProgress | State::InitialReplicationByMedia => {
                (Resumable::InitialReplicationInProgress, None)
            }
            State::Replicating => (Resumable::Replicating, None),
            State::Resynchronizing { .. } => (Resumable::Resynchronizing, None),
            State::Suspended { resume_to } => (*resume_to, None),
            State::ResynchronizationRequired { reason } => {
                (Resumable::Replicating, Some(reason.clone()))
            }
            State::WaitingForStartResynchronize { reason, .. } => (
                Resumable::Replicating,
                Some(
                    reason
                        .clone()
                        .unwrap_or_else(|| "a resynchronization was scheduled".into()),
                ),
            ),
        };
        self.next.state = State::FencedAfterFailover {
            reason: reason.clone(),
            resume_to,
            resync,
        };
        self.actions.push(Action::Fence);
        self.cancel_cycle();
        self.actions.extend([
            Action::Persist,
            Action::ReleaseCopyBeforeWrite,
            emit(
                EventKind::FencedAfterFailover,
                format!("the replica host failed this VM over while this host was its primary (split brain avoided): nothing more is shipped and its disks are fenced here: {reason}"),
            ),
        ]);
    }

    /// Ends a prepare: replicating again, the fence lifted. `Persist` comes before `Unfence`:
    /// a record that says prepared never outlives the fence it claims.
    fn cancel_prepare(&mut self, message: &str) {
        self.next.state = match &self.next.state {
            State::PreparedForFailover {
                resync: Some(reason),
                ..
            } => State::ResynchronizationRequired {
                reason: reason.clone(),
            },
            _ => State::Replicating,
        };
        self.next.need_hello = true;
        let scheduled = self.auto_schedule();
        self.actions.extend([
            Action::Persist,
            Action::Unfence,
            emit(EventKind::FailoverCancelled, message),
        ]);
        self.actions.extend(scheduled);
        self.actions
            .extend([Action::SayHello, Action::ScheduleCycleNow]);
    }

    fn hello_received(
        &mut self,
        primary_state: Option<ReplicationState>,
        generation: Generation,
        latest_seq: Seq,
        now_unix_ns: u64,
    ) {
        let before = self.next.clone();
        let new_life = generation != before.progress.generation;
        if new_life {
            self.next.progress = Progress {
                generation,
                ..Progress::default()
            };
        }
        self.next.progress.last_seq = latest_seq;
        let derived = if latest_seq == Seq(0) {
            Resumable::InitialReplicationInProgress
        } else {
            Resumable::Replicating
        };
        let kept_reason = before.state.reason().map(String::from);
        let mirrored = match primary_state {
            Some(ReplicationState::ReadyForInitialReplication) => State::ReadyForInitialReplication,
            Some(ReplicationState::InitialReplicationInProgress) => {
                State::InitialReplicationInProgress
            }
            Some(ReplicationState::Replicating) => State::Replicating,
            Some(ReplicationState::Suspended) => State::Suspended {
                resume_to: match before.state {
                    State::Suspended { resume_to } => resume_to,
                    _ => derived,
                },
            },
            Some(ReplicationState::ResynchronizationRequired) => State::ResynchronizationRequired {
                reason: kept_reason
                    .unwrap_or_else(|| crate::condition::REPORTED_BY_PRIMARY.to_string()),
            },
            Some(ReplicationState::WaitingForStartResynchronize) => {
                State::WaitingForStartResynchronize {
                    reason: kept_reason,
                    at_unix_ns: match before.state {
                        State::WaitingForStartResynchronize { at_unix_ns, .. } => at_unix_ns,
                        _ => now_unix_ns,
                    },
                }
            }
            Some(ReplicationState::Resynchronizing) => State::Resynchronizing {
                reason: kept_reason,
            },
            Some(ReplicationState::PreparedForFailover) => State::PreparedForFailover {
                seq: latest_seq,
                resync: None,
            },
            // A replica's own states (and a completed failover's): never a primary's to
            // report, so not mirrored.
            Some(
                ReplicationState::Replica
                | ReplicationState::TestFailoverInProgress
                | ReplicationState::FailedOverWaitingCompletion
                | ReplicationState::FailedOver
                | ReplicationState::FencedAfterFailover,
            )
            | None => derived.state(),
        };
        // What this replica knows about its own divergence stays until the primary acts on it
        // (or starts a new generation).
        let keeps_divergence = !new_life
            && matches!(before.state, State::ResynchronizationRequired { .. })
            && !matches!(
                mirrored,
                State::ResynchronizationRequired { .. }
                    | State::WaitingForStartResynchronize { .. }
                    | State::Resynchronizing { .. }
            );
        if !keeps_divergence {
            self.next.state = mirrored;
        }
        if self.next != before {
            self.actions.push(Action::Persist);
        }
    }
}

#[cfg(test)]
#[path = "step_tests.rs"]
mod tests;
