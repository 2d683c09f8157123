//! The replication session's decisions, without I/O: how a primary reconciles its record with
//! what the replica reports, and how health follows from state and history. Time is passed in.

use proto::{Generation, Health, ReplicationState, Seq};

/// What the primary does after asking the replica where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconcile {
    /// Both sides agree on the newest point.
    InSync,
    /// The replica committed the point this host was shipping when it last lost track (crash,
    /// lost answer). Adopting it is safe: the blocks of that point are still marked dirty here
    /// (an aborted cut merges back, a crash re-marks the hot extents), so the next point
    /// re-ships them on top.
    AdoptInflight(Seq),
    /// The replica cannot follow from here; the reason is shown to the user.
    Diverged(String),
}

pub fn reconcile(
    last_seq: Seq,
    inflight: Option<Seq>,
    generation: Generation,
    replica_latest: Seq,
    replica_generation: Generation,
    replica_damage: Option<&str>,
) -> Reconcile {
    if let Some(d) = replica_damage {
        return Reconcile::Diverged(format!("the replica's copy is damaged: {d}"));
    }
    if replica_generation != generation {
        return Reconcile::Diverged(format!(
            "the replica is at generation {replica_generation} but this primary is at {generation}"
        ));
    }
    if replica_latest == last_seq {
        return Reconcile::InSync;
    }
    if inflight == Some(replica_latest) && replica_latest == last_seq.next() {
        return Reconcile::AdoptInflight(replica_latest);
    }
    if replica_latest < last_seq {
        return Reconcile::Diverged(format!(
            "the replica has point {replica_latest} but already committed point {last_seq}: it was restored from an older copy"
        ));
    }
    Reconcile::Diverged(format!(
        "the replica has point {replica_latest} which this primary never shipped (it shipped up to {last_seq})"
    ))
}

/// What an `out_of_sequence` refusal of delta `sent` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutOfSequence {
    /// The replica already holds `sent`: an earlier attempt at the same sequence number
    /// committed there but its answer was lost (connection dropped while the replica was still
    /// committing). Nothing diverged; the next hello adopts it (`AdoptInflight`), exactly as
    /// docs/formats/replica-store.md promises ("already delivered").
    AlreadyDelivered,
    /// The replica cannot follow; the reason is shown to the user.
    Diverged(String),
}

/// Judges a refusal of delta `sent` (this primary's in-flight point is `inflight`) by a
/// replica that expects `expected` next.
pub fn judge_out_of_sequence(sent: Seq, inflight: Option<Seq>, expected: Seq) -> OutOfSequence {
    if inflight == Some(sent) && expected == sent.next() {
        OutOfSequence::AlreadyDelivered
    } else {
        OutOfSequence::Diverged(out_of_sequence_reason(sent, expected))
    }
}

/// Why the replica refused delta `sent` because it expects `expected` instead.
pub fn out_of_sequence_reason(sent: Seq, expected: Seq) -> String {
    let (sent, expected) = (sent.get(), expected.get());
    if expected < sent {
        format!(
            "the replica expects point {expected} but this primary already committed point {}: it was restored from an older copy",
            sent - 1
        )
    } else {
        format!("the replica expects point {expected} but this primary only shipped up to {}: it holds points this primary never sent", sent - 1)
    }
}

/// Inputs to the health rules (Hyper-V Replica's Normal / Warning / Critical).
pub struct HealthInput<'a> {
    pub state: ReplicationState,
    pub now_ns: u64,
    pub last_cut_ns: Option<u64>,
    pub frequency_secs: u32,
    pub consecutive_failures: u64,
    pub last_error: Option<&'a str>,
    pub resync_reason: Option<&'a str>,
    /// Application-consistent cuts that fell back to crash-consistent in a row, and the last
    /// reason.
    pub app_consistent_failures: u64,
    pub app_consistent_error: Option<&'a str>,
}

/// Application-consistent cuts failed in a row after which health turns Warning: one failure
/// can be a guest busy at that moment (the point is still taken, crash-consistent); three in a
/// row mean the agent or hook is broken and the recovery history has no application-consistent
/// point.
pub const APP_CONSISTENT_WARNING_FAILURES: u64 = 3;

/// Cycles of lag after which health turns Warning, and then Critical.
pub const LAG_WARNING_CYCLES: u64 = 3;
pub const LAG_CRITICAL_CYCLES: u64 = 12;

pub fn health(h: &HealthInput<'_>) -> (Health, Vec<String>) {
    let mut reasons = Vec::new();
    let mut level = Health::Normal;
    let mut raise = |to: Health, why: String, reasons: &mut Vec<String>| {
        if to as u8 > level as u8 {
            level = to;
        }
        reasons.push(why);
    };
    match h.state {
        ReplicationState::ResynchronizationRequired => raise(
            Health::Critical,
            format!(
                "resynchronization required: {}",
                h.resync_reason
                    .unwrap_or("the replica can no longer follow the primary")
            ),
            &mut reasons,
        ),
        ReplicationState::Suspended => raise(
            Health::Warning,
            "replication is suspended".into(),
            &mut reasons,
        ),
        ReplicationState::ReadyForInitialReplication => raise(
            Health::Warning,
            "initial replication has not started".into(),
            &mut reasons,
        ),
        _ => {}
    }
    if h.consecutive_failures > 0 {
        raise(
            Health::Warning,
            format!(
                "{} cycle(s) failed in a row; last error: {}",
                h.consecutive_failures,
                h.last_error.unwrap_or("unknown")
            ),
            &mut reasons,
        );
    }
    if h.app_consistent_failures >= APP_CONSISTENT_WARNING_FAILURES {
        raise(
            Health::Warning,
            format!(
                "{} application-consistent cut(s) in a row fell back to crash-consistent; last error: {}",
                h.app_consistent_failures,
                h.app_consistent_error.unwrap_or("unknown")
            ),
            &mut reasons,
        );
    }
    if let (Some(last), ReplicationState::Replicating) = (h.last_cut_ns, h.state) {
        let lag_s = h.now_ns.saturating_sub(last) / 1_000_000_000;
        let f = u64::from(h.frequency_secs.max(1));
        if lag_s > f * LAG_CRITICAL_CYCLES {
            raise(
                Health::Critical,
                format!("the newest point is {lag_s} s old ({} cycles)", lag_s / f),
                &mut reasons,
            );
        } else if lag_s > f * LAG_WARNING_CYCLES {
            raise(
                Health::Warning,
                format!("the newest point is {lag_s} s old ({} cycles)", lag_s / f),
                &mut reasons,
            );
        }
    }
    (level, reasons)
}

// The unit tests of these rules moved with them to the `relationship` crate.
