//! The one state of a relationship (Hyper-V names) and the role this host plays in it.

use proto::{ReplicationState, Seq};

/// Which side of the relationship this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Ships the VM's points.
    Primary,
    /// Receives them.
    Replica,
}

/// Where `replication resume` returns a suspended relationship to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resumable {
    ReadyForInitialReplication,
    InitialReplicationInProgress,
    Replicating,
    Resynchronizing,
}

/// The relationship's state: one value, no flags. Persisted as `relationship.md` says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum State {
    /// Enabled; the initial replication has not started.
    ReadyForInitialReplication,
    /// `replication start --at TIME`: the initial replication starts by itself at
    /// `at_unix_ns`; until then as `ReadyForInitialReplication` (the name shown).
    InitialReplicationScheduled { at_unix_ns: u64 },
    /// The first point (an `Initial` delta) is being shipped.
    InitialReplicationInProgress,
    /// `replication start --to-media DIR` wrote point 1 (in flight) to external media; shown
    /// as `InitialReplicationInProgress`. Cycles only say hello until the replica holds point
    /// 1 (`replication import-media`), which is then adopted and point 2 ships.
    InitialReplicationByMedia,
    /// Incremental points every cycle.
    Replicating,
    /// No cycles until `replication resume`, which returns to `resume_to`.
    Suspended { resume_to: Resumable },
    /// The replica can no longer follow; only a resynchronization leaves this state.
    ResynchronizationRequired { reason: String },
    /// A resynchronization is scheduled at `at_unix_ns`; no cycles until then.
    WaitingForStartResynchronize {
        reason: Option<String>,
        at_unix_ns: u64,
    },
    /// A `Full` delta (every block) is being shipped on top of the replica's newest point.
    Resynchronizing { reason: Option<String> },
    /// Replica role: a test failover serves `NAME-test` over copy-on-write disks of `point`.
    /// Replication goes on: hellos and points update `underlying`, the state the replica
    /// would show without the test (never a state that serves a failover), which `failover stop --test`
    /// returns to.
    TestFailoverInProgress { point: Seq, underlying: Box<State> },
    /// Replica role: `failover start` serves writable disks over `point`; the replica
    /// receives nothing until `failover complete` or `failover stop`.
    FailedOverWaitingCompletion { point: Seq },
    /// Primary role, after `failover complete`: the VM runs on this host; no cycles until
    /// reverse replication is set up.
    FailedOver,
    /// Primary role: the VM is fenced and point `seq`, its last change, committed on the
    /// replica (planned failover); no cycles until `replication resume` cancels it. Replica
    /// role: the primary reported it at a hello (`seq`: this replica's newest point).
    /// `resync` (primary role): the replica was found unable to follow, or local tracking
    /// was lost, while prepared; the fence stays (the replica may have failed over), and
    /// cancelling the prepare leads to `ResynchronizationRequired`.
    PreparedForFailover { seq: Seq, resync: Option<String> },
    /// Primary role: the replica host failed the VM over (it said so, `failed_over`) while
    /// this host still took itself for the primary: an unplanned failover. No cycle runs for
    /// this generation again, and the VM's disks are fenced (no new NBD client, writes of an
    /// open one fail) until `replication resume` finds the failover stopped there, the new
    /// primary reverses replication to this host, or `replication remove` forces them back.
    /// `resume_to`: where `resume` returns (the state before the fence). `resync`: the
    /// replica could not follow before the fence, or was found to have diverged meanwhile (a
    /// late refusal, local tracking lost); `resume` then leads to `ResynchronizationRequired`.
    FencedAfterFailover {
        reason: String,
        resume_to: Resumable,
        resync: Option<String>,
    },
    // Adding a state means: a variant here, its name in `State::name` (and
    // `proto::ReplicationState`), its record form in `record.rs` (`StateRecord` and the two
    // conversions), its health in `health.rs`, and the events that enter and leave it in
    // `step.rs`; the compiler points at every `match`.
}

impl State {
    /// The name shown by `replication status` (the same on both hosts).
    pub fn name(&self) -> ReplicationState {
        match self {
            State::ReadyForInitialReplication | State::InitialReplicationScheduled { .. } => {
                ReplicationState::ReadyForInitialReplication
            }
            State::InitialReplicationInProgress | State::InitialReplicationByMedia => {
                ReplicationState::InitialReplicationInProgress
            }
            State::Replicating => ReplicationState::Replicating,
            State::Suspended { .. } => ReplicationState::Suspended,
            State::ResynchronizationRequired { .. } => ReplicationState::ResynchronizationRequired,
            State::WaitingForStartResynchronize { .. } => {
                ReplicationState::WaitingForStartResynchronize
            }
            State::Resynchronizing { .. } => ReplicationState::Resynchronizing,
            State::TestFailoverInProgress { .. } => ReplicationState::TestFailoverInProgress,
            State::FailedOverWaitingCompletion { .. } => {
                ReplicationState::FailedOverWaitingCompletion
            }
            State::FailedOver => ReplicationState::FailedOver,
            State::PreparedForFailover { .. } => ReplicationState::PreparedForFailover,
            State::FencedAfterFailover { .. } => ReplicationState::FencedAfterFailover,
        }
    }

    /// Whether the replica accepts deltas and hellos in this state: not while a failover
    /// (not a test) serves writable disks, nor once it completed. The host refuses uploads and
    /// hellos with a named reason when this is false.
    pub fn accepts_deltas(&self) -> bool {
        !matches!(
            self,
            State::FailedOverWaitingCompletion { .. } | State::FailedOver
        )
    }

    /// A state a test failover cannot run over: one that serves a failover itself (a test,
    /// an unplanned failover, a completed one). `PreparedForFailover` (mirrored from the
    /// primary) is not one.
    pub(crate) fn serves_failover(&self) -> bool {
        matches!(
            self,
            State::TestFailoverInProgress { .. }
                | State::FailedOverWaitingCompletion { .. }
                | State::FailedOver
        )
    }

    /// States in which the primary runs replication cycles.
    pub fn cycles(&self) -> bool {
        matches!(
            self,
            State::InitialReplicationInProgress
                | State::InitialReplicationByMedia
                | State::Replicating
                | State::Resynchronizing { .. }
        )
    }

    /// The reason shown with `ResynchronizationRequired` (and a resynchronization's reason).
    pub fn reason(&self) -> Option<&str> {
        match self {
            State::ResynchronizationRequired { reason } => Some(reason),
            State::WaitingForStartResynchronize { reason, .. }
            | State::Resynchronizing { reason } => reason.as_deref(),
            State::TestFailoverInProgress { underlying, .. } => underlying.reason(),
            _ => None,
        }
    }

    /// Whether the initial replication has completed (a point exists on the replica), as far
    /// as the state tells.
    pub fn initial_done(&self) -> bool {
        match self {
            State::ReadyForInitialReplication
            | State::InitialReplicationScheduled { .. }
            | State::InitialReplicationInProgress
            | State::InitialReplicationByMedia => false,
            State::Suspended { resume_to } => !matches!(
                resume_to,
                Resumable::ReadyForInitialReplication | Resumable::InitialReplicationInProgress
            ),
            _ => true,
        }
    }
}

impl Resumable {
    /// The state `replication resume` returns to.
    pub fn state(self) -> State {
        match self {
            Resumable::ReadyForInitialReplication => State::ReadyForInitialReplication,
            Resumable::InitialReplicationInProgress => State::InitialReplicationInProgress,
            Resumable::Replicating => State::Replicating,
            Resumable::Resynchronizing => State::Resynchronizing { reason: None },
        }
    }
}
