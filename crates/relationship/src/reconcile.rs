//! How a primary reconciles its progress with what the replica reports (hello), and how it
//! judges an `out_of_sequence` refusal (`docs/formats/peer-protocol.md`).

use proto::{Generation, Seq};

use crate::condition::{DAMAGED, NEVER_SENT, OTHER_GENERATION, RESTORED_OLDER};

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
        return Reconcile::Diverged(format!("the replica's copy is {DAMAGED}: {d}"));
    }
    if replica_generation != generation {
        return Reconcile::Diverged(format!(
            "{OTHER_GENERATION} {replica_generation} but this primary is at {generation}"
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
            "the replica has point {replica_latest} but already committed point {last_seq}: {RESTORED_OLDER}"
        ));
    }
    Reconcile::Diverged(format!(
        "the replica has point {replica_latest}: it {NEVER_SENT} (it shipped up to {last_seq})"
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
    let shipped = sent.get().saturating_sub(1);
    if expected < sent {
        format!(
            "the replica expects point {expected} but this primary already committed point {shipped}: {RESTORED_OLDER}"
        )
    } else {
        format!("the replica expects point {expected} but this primary only shipped up to {shipped}: it {NEVER_SENT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: Generation = Generation(1);

    #[test]
    fn reconcile_covers_every_case() {
        assert_eq!(
            reconcile(Seq(5), None, G1, Seq(5), G1, None),
            Reconcile::InSync
        );
        assert_eq!(
            reconcile(Seq(5), Some(Seq(6)), G1, Seq(6), G1, None),
            Reconcile::AdoptInflight(Seq(6))
        );
        assert!(matches!(
            reconcile(Seq(5), None, G1, Seq(6), G1, None),
            Reconcile::Diverged(_)
        ));
        assert!(
            matches!(reconcile(Seq(5), Some(Seq(6)), G1, Seq(3), G1, None), Reconcile::Diverged(r) if r.contains("older copy"))
        );
        assert!(matches!(
            reconcile(Seq(5), None, G1, Seq(5), Generation(2), None),
            Reconcile::Diverged(_)
        ));
        assert!(
            matches!(reconcile(Seq(5), None, G1, Seq(5), G1, Some("bad")), Reconcile::Diverged(r) if r.contains("damaged"))
        );
    }

    #[test]
    fn out_of_sequence_reasons_name_the_cause() {
        assert!(out_of_sequence_reason(Seq(6), Seq(3)).contains("older copy"));
        assert!(out_of_sequence_reason(Seq(6), Seq(9)).contains("never sent"));
        // A refusal of point 0 (never sent by a primary) must not underflow.
        assert!(out_of_sequence_reason(Seq(0), Seq(3)).contains("never sent"));
    }

    #[test]
    fn lost_answer_is_adopted_not_a_divergence() {
        // Point 7 committed on the replica, its answer was lost, the retry (7 again) is refused
        // because the replica expects 8: already delivered.
        assert_eq!(
            judge_out_of_sequence(Seq(7), Some(Seq(7)), Seq(8)),
            OutOfSequence::AlreadyDelivered
        );
        // Expects something else, or 7 was never in flight here: a real divergence.
        assert!(matches!(
            judge_out_of_sequence(Seq(7), Some(Seq(7)), Seq(9)),
            OutOfSequence::Diverged(r) if r.contains("never sent")
        ));
        assert!(matches!(
            judge_out_of_sequence(Seq(7), Some(Seq(7)), Seq(5)),
            OutOfSequence::Diverged(r) if r.contains("older copy")
        ));
        assert!(matches!(
            judge_out_of_sequence(Seq(7), None, Seq(8)),
            OutOfSequence::Diverged(_)
        ));
    }
}
