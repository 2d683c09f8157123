//! The one state of a relationship (Hyper-V names) and the role this host plays in it.

use proto::ReplicationState;

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
    /// The first point (an `Initial` delta) is being shipped.
    InitialReplicationInProgress,
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
    // Issue 10 adds the failover states here: PreparedForFailover, FailedOver,
    // FailedOverWaitingCompletion, TestFailoverInProgress. Adding one means: a variant here,
    // its name in `State::name` (and `proto::ReplicationState`), its record form in
    // `record.rs` (`StateRecord` and the two conversions), its health in `health.rs`, and the
    // events that enter and leave it in `step.rs`; the compiler points at every `match`.
}

impl State {
    /// The name shown by `replication status` (the same on both hosts).
    pub fn name(&self) -> ReplicationState {
        match self {
            State::ReadyForInitialReplication => ReplicationState::ReadyForInitialReplication,
            State::InitialReplicationInProgress => ReplicationState::InitialReplicationInProgress,
            State::Replicating => ReplicationState::Replicating,
            State::Suspended { .. } => ReplicationState::Suspended,
            State::ResynchronizationRequired { .. } => ReplicationState::ResynchronizationRequired,
            State::WaitingForStartResynchronize { .. } => {
                ReplicationState::WaitingForStartResynchronize
            }
            State::Resynchronizing { .. } => ReplicationState::Resynchronizing,
        }
    }

    /// States in which the primary runs replication cycles.
    pub fn cycles(&self) -> bool {
        matches!(
            self,
            State::InitialReplicationInProgress
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
            _ => None,
        }
    }

    /// Whether the initial replication has completed (a point exists on the replica), as far
    /// as the state tells.
    pub fn initial_done(&self) -> bool {
        match self {
            State::ReadyForInitialReplication | State::InitialReplicationInProgress => false,
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
