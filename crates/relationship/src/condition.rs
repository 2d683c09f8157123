//! Which resynchronization trigger (Hyper-V Replica's table, `docs/resync-triggers.md`) a
//! `ResynchronizationRequired` reason is.
//!
//! The reason stays the one persisted fact (a `String` in the record, unchanged format); its
//! condition is derived here, in one function, from phrases that only the producers of
//! reasons put in them. Each producer builds its reason with the constant below, and the
//! tests of this module (and of the producers) pin that every reason classifies as its
//! trigger. A reason written by another version that matches none is [`ResyncCondition::Other`].

use proto::ResyncCondition;

/// The activity log (or the marking of blocks to send) could not be written.
pub const TRACKING_WRITE_FAILED: &str = "change tracking state could not be written";
/// The image's storage failed a sync (fsyncgate).
pub const STORAGE_WRITE_FAILED: &str = "storage reported a write-back error";
/// The image was replaced by another file or by an older copy while the daemon was down.
pub const REVERTED_TO_OLDER: &str = "was replaced by another file or an older copy";
/// The image was written while the daemon was down.
pub const MODIFIED_WHILE_OFF: &str = "was modified outside Understudy";
/// An unclean stop the activity log (or the heartbeat) cannot cover.
pub const UNCLEAN_STOP_UNTRACKED: &str = "was not shut down cleanly";
/// The tracking state was lost (missing or corrupt) at open.
pub const TRACKING_LOST: &str = "change tracking was lost";
/// The replica is behind a point it committed.
pub const RESTORED_OLDER: &str = "it was restored from an older copy";
/// The replica holds points this primary never sent.
pub const NEVER_SENT: &str = "holds points this primary never sent";
/// The replica belongs to another generation.
pub const OTHER_GENERATION: &str = "the replica is at generation";
/// The replica's own finding: its copy is damaged.
pub const DAMAGED: &str = "damaged";
/// A damage in a journal delta (`replica::ReplicaVm::damage` names the journal file).
pub const DAMAGED_JOURNAL: &str = "journal ";
/// A replica that mirrors the primary's state without knowing its reason.
pub const REPORTED_BY_PRIMARY: &str = "the primary requires resynchronization";

/// The trigger `reason` names.
pub fn classify(reason: &str) -> ResyncCondition {
    // The primary's own findings start with the disk they concern; checked first, so words of
    // an embedded OS error never make them a replica's condition.
    if reason.contains(TRACKING_WRITE_FAILED) {
        ResyncCondition::TrackingWriteFailed
    } else if reason.contains(STORAGE_WRITE_FAILED) {
        ResyncCondition::StorageWriteFailed
    } else if reason.contains(REVERTED_TO_OLDER) {
        ResyncCondition::RevertedToOlder
    } else if reason.contains(MODIFIED_WHILE_OFF) {
        ResyncCondition::ModifiedWhileOff
    } else if reason.contains(UNCLEAN_STOP_UNTRACKED) || reason.contains(TRACKING_LOST) {
        ResyncCondition::UncleanStopUntracked
    } else if reason.contains(RESTORED_OLDER) {
        ResyncCondition::ReplicaRestoredOlder
    } else if reason.contains(NEVER_SENT) || reason.contains(OTHER_GENERATION) {
        ResyncCondition::ReplicaOutOfSequence
    } else if reason.contains(DAMAGED) && reason.contains(DAMAGED_JOURNAL) {
        ResyncCondition::ReplicaInvalidDelta
    } else if reason.contains(DAMAGED) {
        ResyncCondition::ReplicaDamaged
    } else if reason.contains(REPORTED_BY_PRIMARY) {
        ResyncCondition::ReportedByPrimary
    } else {
        ResyncCondition::Other
    }
}

/// The condition of the resynchronization `state` requires, schedules or runs (the one its
/// `reason()` names), if any.
pub fn of_state(state: &crate::State) -> Option<ResyncCondition> {
    state.reason().map(classify)
}

/// `(id: Hyper-V condition)`, as events and health reasons show it.
pub fn label(reason: &str) -> String {
    let c = classify(reason);
    format!("{}: {}", c.id(), c.hyperv_condition())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{out_of_sequence_reason, reconcile, Reconcile};
    use proto::{Generation, Seq};

    fn diverged(r: Reconcile) -> String {
        match r {
            Reconcile::Diverged(reason) => reason,
            other => panic!("not diverged: {other:?}"),
        }
    }

    #[test]
    fn replica_reasons_classify_as_their_trigger() {
        let g = Generation(1);
        let older = diverged(reconcile(Seq(5), None, g, Seq(3), g, None));
        assert_eq!(classify(&older), ResyncCondition::ReplicaRestoredOlder);
        let ahead = diverged(reconcile(Seq(5), None, g, Seq(7), g, None));
        assert_eq!(classify(&ahead), ResyncCondition::ReplicaOutOfSequence);
        let other_gen = diverged(reconcile(Seq(5), None, g, Seq(5), Generation(2), None));
        assert_eq!(classify(&other_gen), ResyncCondition::ReplicaOutOfSequence);
        let journal = diverged(reconcile(
            Seq(5),
            None,
            g,
            Seq(5),
            g,
            Some("journal /s/vm/journal/0000000006.delta: footer MAC mismatch"),
        ));
        assert_eq!(classify(&journal), ResyncCondition::ReplicaInvalidDelta);
        let base = diverged(reconcile(
            Seq(5),
            None,
            g,
            Seq(5),
            g,
            Some("adopted after an unplanned failover"),
        ));
        assert_eq!(classify(&base), ResyncCondition::ReplicaDamaged);
        assert_eq!(
            classify(&out_of_sequence_reason(Seq(6), Seq(3))),
            ResyncCondition::ReplicaRestoredOlder
        );
        assert_eq!(
            classify(&out_of_sequence_reason(Seq(6), Seq(9))),
            ResyncCondition::ReplicaOutOfSequence
        );
        // The replica's refusal of an upload (`damaged`), and its own status line.
        assert_eq!(
            classify("the replica of web is damaged (journal /s/j/7.delta: bad frame): only a full resynchronization can follow"),
            ResyncCondition::ReplicaInvalidDelta
        );
        assert_eq!(
            classify("replica copy damaged: journal /s/j/7.delta: bad frame"),
            ResyncCondition::ReplicaInvalidDelta
        );
        assert_eq!(
            classify(REPORTED_BY_PRIMARY),
            ResyncCondition::ReportedByPrimary
        );
        assert_eq!(classify("wrong generation"), ResyncCondition::Other);
    }

    /// A replica that mirrored the primary's `ResynchronizationRequired` (reason unknown to
    /// it) and then finds its own damage names the damage, and logs it; a known first
    /// reason stays.
    #[test]
    fn replica_finding_replaces_the_mirrored_placeholder() {
        use crate::{step, Action, Event, EventKind, Relationship, Role, State};
        let vm = proto::VmName::parse("web").unwrap();
        let mut r = Relationship::new(vm, Role::Replica, Generation(1));
        r.state = State::ResynchronizationRequired {
            reason: REPORTED_BY_PRIMARY.into(),
        };
        let found = "the replica's copy is damaged: journal /s/j/7.delta: bad frame";
        let (next, actions) = step(
            &r,
            Event::Diverged {
                reason: found.into(),
            },
            1,
        )
        .unwrap();
        assert_eq!(
            of_state(&next.state),
            Some(ResyncCondition::ReplicaInvalidDelta)
        );
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Emit { kind: EventKind::ResyncRequired, message } if message.contains("replica_invalid_delta")
        )));
        let (again, actions) = step(
            &next,
            Event::Diverged {
                reason: "the replica's copy is damaged: something else".into(),
            },
            2,
        )
        .unwrap();
        assert_eq!(again.state, next.state, "the first known reason stays");
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn every_condition_has_a_distinct_id_and_a_hyperv_row() {
        use ResyncCondition::*;
        let all = [
            ModifiedWhileOff,
            RevertedToOlder,
            TrackingWriteFailed,
            StorageWriteFailed,
            UncleanStopUntracked,
            ReplicaOutOfSequence,
            ReplicaRestoredOlder,
            ReplicaInvalidDelta,
            ReplicaDamaged,
            ReportedByPrimary,
            Other,
        ];
        let ids: std::collections::BTreeSet<&str> = all.iter().map(|c| c.id()).collect();
        assert_eq!(ids.len(), all.len());
        for c in all {
            // The id is what serde writes.
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.id())
            );
            assert!(!c.hyperv_condition().is_empty());
        }
    }
}
