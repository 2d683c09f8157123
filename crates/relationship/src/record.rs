//! The persisted form of a relationship (`docs/formats/relationship.md`, version 2), separate
//! from the in-memory types so either can change without silently changing the other, and the
//! migration from version 1's flags.

use proto::{Generation, Seq, VmName};
use serde::{Deserialize, Serialize};

use crate::{Progress, Relationship, Resumable, Role, State};

/// The record version this code writes and reads.
pub const RELATIONSHIP_RECORD_VERSION: u32 = 2;

/// One relationship's durable state: role, state, progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationshipRecord {
    pub version: u32,
    pub role: RoleRecord,
    pub state: StateRecord,
    pub generation: u64,
    pub last_seq: u64,
    pub inflight_seq: Option<u64>,
    pub last_cut_unix_ns: Option<u64>,
    pub last_app_consistent_unix_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoleRecord {
    Primary,
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResumableRecord {
    ReadyForInitialReplication,
    InitialReplicationInProgress,
    Replicating,
    Resynchronizing,
}

/// `{"name": NAME}` or `{"name": NAME, "detail": {...}}` (adjacently tagged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "detail")]
pub enum StateRecord {
    ReadyForInitialReplication,
    /// Added without a version bump (an older reader refuses the name in one line).
    InitialReplicationScheduled {
        at_unix_ns: u64,
    },
    InitialReplicationInProgress,
    /// Added without a version bump (an older reader refuses the name in one line).
    InitialReplicationByMedia,
    Replicating,
    Suspended {
        resume_to: ResumableRecord,
    },
    ResynchronizationRequired {
        reason: String,
    },
    WaitingForStartResynchronize {
        reason: Option<String>,
        at_unix_ns: u64,
    },
    Resynchronizing {
        reason: Option<String>,
    },
    // The failover states (added without a version bump: an older reader refuses an
    // unknown name in one line).
    TestFailoverInProgress {
        point: u64,
        /// Never a test or a failover (refused as damaged).
        underlying: Box<StateRecord>,
    },
    FailedOverWaitingCompletion {
        point: u64,
    },
    FailedOver,
    PreparedForFailover {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resync: Option<String>,
    },
    FencedAfterFailover {
        reason: String,
        resume_to: ResumableRecord,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resync: Option<String>,
    },
}

/// Why a record cannot be read; one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("relationship record of {vm} has version {found}; this understudy reads version {RELATIONSHIP_RECORD_VERSION}")]
    UnknownVersion { vm: String, found: String },
    #[error("relationship record of {vm} is damaged: {detail}")]
    Damaged { vm: String, detail: String },
}

impl RelationshipRecord {
    /// Reads a record from its JSON value, refusing another version before looking at the
    /// rest (whose shape may differ in that version).
    pub fn from_value(
        vm: &VmName,
        value: serde_json::Value,
    ) -> Result<RelationshipRecord, RecordError> {
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(RELATIONSHIP_RECORD_VERSION) => {}
            other => {
                return Err(RecordError::UnknownVersion {
                    vm: vm.to_string(),
                    found: other.map_or_else(|| "none".to_string(), |v| v.to_string()),
                })
            }
        }
        serde_json::from_value(value).map_err(|e| RecordError::Damaged {
            vm: vm.to_string(),
            detail: e.to_string(),
        })
    }

    /// Reads a record from JSON text (as [`RelationshipRecord::from_value`]).
    pub fn from_json(vm: &VmName, text: &str) -> Result<RelationshipRecord, RecordError> {
        let value = serde_json::from_str(text).map_err(|e| RecordError::Damaged {
            vm: vm.to_string(),
            detail: e.to_string(),
        })?;
        RelationshipRecord::from_value(vm, value)
    }

    /// A version-1 primary record's flags and progress as a version-2 record.
    #[allow(clippy::too_many_arguments)]
    pub fn from_v1(
        initial_started: bool,
        initial_done: bool,
        suspended: bool,
        resync_reason: Option<String>,
        pending_full: bool,
        generation: u64,
        last_seq: u64,
        inflight_seq: Option<u64>,
        last_cut_unix_ns: Option<u64>,
        last_app_consistent_unix_ns: Option<u64>,
    ) -> RelationshipRecord {
        let state = migrate_v1(
            initial_started,
            initial_done,
            suspended,
            resync_reason,
            pending_full,
        );
        RelationshipRecord {
            version: RELATIONSHIP_RECORD_VERSION,
            role: RoleRecord::Primary,
            state: state_record(&state),
            generation,
            last_seq,
            inflight_seq,
            last_cut_unix_ns,
            last_app_consistent_unix_ns,
        }
    }
}

/// The state a version-1 record's flags meant (first rule that applies wins, as the previous
/// version derived its state): resync reason, suspended, not started, pending full, not done,
/// replicating.
pub fn migrate_v1(
    initial_started: bool,
    initial_done: bool,
    suspended: bool,
    resync_reason: Option<String>,
    pending_full: bool,
) -> State {
    if let Some(reason) = resync_reason {
        return State::ResynchronizationRequired { reason };
    }
    let running = if !initial_started {
        Resumable::ReadyForInitialReplication
    } else if pending_full {
        Resumable::Resynchronizing
    } else if !initial_done {
        Resumable::InitialReplicationInProgress
    } else {
        Resumable::Replicating
    };
    if suspended {
        State::Suspended { resume_to: running }
    } else {
        running.state()
    }
}

fn resumable_record(r: Resumable) -> ResumableRecord {
    match r {
        Resumable::ReadyForInitialReplication => ResumableRecord::ReadyForInitialReplication,
        Resumable::InitialReplicationInProgress => ResumableRecord::InitialReplicationInProgress,
        Resumable::Replicating => ResumableRecord::Replicating,
        Resumable::Resynchronizing => ResumableRecord::Resynchronizing,
    }
}

fn resumable(r: ResumableRecord) -> Resumable {
    match r {
        ResumableRecord::ReadyForInitialReplication => Resumable::ReadyForInitialReplication,
        ResumableRecord::InitialReplicationInProgress => Resumable::InitialReplicationInProgress,
        ResumableRecord::Replicating => Resumable::Replicating,
        ResumableRecord::Resynchronizing => Resumable::Resynchronizing,
    }
}

fn state_record(s: &State) -> StateRecord {
    match s.clone() {
        State::ReadyForInitialReplication => StateRecord::ReadyForInitialReplication,
        State::InitialReplicationScheduled { at_unix_ns } => {
            StateRecord::InitialReplicationScheduled { at_unix_ns }
        }
        State::InitialReplicationInProgress => StateRecord::InitialReplicationInProgress,
        State::InitialReplicationByMedia => StateRecord::InitialReplicationByMedia,
        State::Replicating => StateRecord::Replicating,
        State::Suspended { resume_to } => StateRecord::Suspended {
            resume_to: resumable_record(resume_to),
        },
        State::ResynchronizationRequired { reason } => {
            StateRecord::ResynchronizationRequired { reason }
        }
        State::WaitingForStartResynchronize { reason, at_unix_ns } => {
            StateRecord::WaitingForStartResynchronize { reason, at_unix_ns }
        }
        State::Resynchronizing { reason } => StateRecord::Resynchronizing { reason },
        State::TestFailoverInProgress { point, underlying } => {
            StateRecord::TestFailoverInProgress {
                point: point.get(),
                underlying: Box::new(state_record(&underlying)),
            }
        }
        State::FailedOverWaitingCompletion { point } => {
            StateRecord::FailedOverWaitingCompletion { point: point.get() }
        }
        State::FailedOver => StateRecord::FailedOver,
        State::PreparedForFailover { seq, resync } => StateRecord::PreparedForFailover {
            seq: seq.get(),
            resync,
        },
        State::FencedAfterFailover {
            reason,
            resume_to,
            resync,
        } => StateRecord::FencedAfterFailover {
            reason,
            resume_to: resumable_record(resume_to),
            resync,
        },
    }
}

/// The state a record holds, or why it cannot be one (a test failover over a failover).
fn state(s: StateRecord) -> Result<State, String> {
    Ok(match s {
        StateRecord::ReadyForInitialReplication => State::ReadyForInitialReplication,
        StateRecord::InitialReplicationScheduled { at_unix_ns } => {
            State::InitialReplicationScheduled { at_unix_ns }
        }
        StateRecord::InitialReplicationInProgress => State::InitialReplicationInProgress,
        StateRecord::InitialReplicationByMedia => State::InitialReplicationByMedia,
        StateRecord::Replicating => State::Replicating,
        StateRecord::Suspended { resume_to } => State::Suspended {
            resume_to: resumable(resume_to),
        },
        StateRecord::ResynchronizationRequired { reason } => {
            State::ResynchronizationRequired { reason }
        }
        StateRecord::WaitingForStartResynchronize { reason, at_unix_ns } => {
            State::WaitingForStartResynchronize { reason, at_unix_ns }
        }
        StateRecord::Resynchronizing { reason } => State::Resynchronizing { reason },
        StateRecord::TestFailoverInProgress { point, underlying } => {
            let underlying = state(*underlying)?;
            if underlying.serves_failover() {
                return Err(format!(
                    "a test failover's underlying state cannot be {:?}",
                    underlying.name()
                ));
            }
            State::TestFailoverInProgress {
                point: Seq(point),
                underlying: Box::new(underlying),
            }
        }
        StateRecord::FailedOverWaitingCompletion { point } => {
            State::FailedOverWaitingCompletion { point: Seq(point) }
        }
        StateRecord::FailedOver => State::FailedOver,
        StateRecord::PreparedForFailover { seq, resync } => State::PreparedForFailover {
            seq: Seq(seq),
            resync,
        },
        StateRecord::FencedAfterFailover {
            reason,
            resume_to,
            resync,
        } => State::FencedAfterFailover {
            reason,
            resume_to: resumable(resume_to),
            resync,
        },
    })
}

impl Relationship {
    /// The relationship a record describes, as loaded at start: where the replica stands is
    /// not known yet (`need_hello`).
    pub fn from_record(vm: VmName, rec: RelationshipRecord) -> Result<Relationship, RecordError> {
        if rec.version != RELATIONSHIP_RECORD_VERSION {
            return Err(RecordError::UnknownVersion {
                vm: vm.to_string(),
                found: rec.version.to_string(),
            });
        }
        let state = state(rec.state).map_err(|detail| RecordError::Damaged {
            vm: vm.to_string(),
            detail,
        })?;
        Ok(Relationship {
            vm,
            role: match rec.role {
                RoleRecord::Primary => Role::Primary,
                RoleRecord::Replica => Role::Replica,
            },
            state,
            progress: Progress {
                generation: Generation(rec.generation),
                last_seq: Seq(rec.last_seq),
                inflight_seq: rec.inflight_seq.map(Seq),
                last_cut_unix_ns: rec.last_cut_unix_ns,
                last_app_consistent_unix_ns: rec.last_app_consistent_unix_ns,
            },
            need_hello: true,
            inflight_cut_unix_ns: None,
            // A setting of the VM's replication (`catalog.md`): the host sets it.
            auto_resync: crate::AutoResync::Off,
        })
    }

    /// The record to persist (`Action::Persist`).
    pub fn to_record(&self) -> RelationshipRecord {
        let p = &self.progress;
        RelationshipRecord {
            version: RELATIONSHIP_RECORD_VERSION,
            role: match self.role {
                Role::Primary => RoleRecord::Primary,
                Role::Replica => RoleRecord::Replica,
            },
            state: state_record(&self.state),
            generation: p.generation.get(),
            last_seq: p.last_seq.get(),
            inflight_seq: p.inflight_seq.map(Seq::get),
            last_cut_unix_ns: p.last_cut_unix_ns,
            last_app_consistent_unix_ns: p.last_app_consistent_unix_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> VmName {
        VmName::parse("web").unwrap()
    }

    #[test]
    fn record_json_is_what_relationship_md_shows() {
        let text = r#"{
          "version": 2,
          "role": "Primary",
          "state": { "name": "ResynchronizationRequired",
                     "detail": { "reason": "the replica has point 3 but already committed point 7: it was restored from an older copy" } },
          "generation": 1,
          "last_seq": 7,
          "inflight_seq": 8,
          "last_cut_unix_ns": 1767225600000000000,
          "last_app_consistent_unix_ns": null
        }"#;
        let rec = RelationshipRecord::from_json(&web(), text).unwrap();
        let rel = Relationship::from_record(web(), rec.clone()).unwrap();
        assert!(rel.need_hello);
        assert_eq!(rel.progress.inflight_seq, Some(Seq(8)));
        assert!(
            matches!(rel.state, State::ResynchronizationRequired { ref reason } if reason.contains("older copy"))
        );
        assert_eq!(rel.to_record(), rec);
        let unit = serde_json::to_value(StateRecord::Replicating).unwrap();
        assert_eq!(unit, serde_json::json!({"name": "Replicating"}));
        let s = serde_json::to_value(StateRecord::Suspended {
            resume_to: ResumableRecord::Replicating,
        })
        .unwrap();
        assert_eq!(
            s,
            serde_json::json!({"name": "Suspended", "detail": {"resume_to": "Replicating"}})
        );
    }

    #[test]
    fn record_of_unknown_version_is_refused_in_one_line() {
        let v3 = r#"{"version": 3, "role": "Primary", "state": {"name": "Teleported"}}"#;
        let e = RelationshipRecord::from_json(&web(), v3)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "relationship record of web has version 3; this understudy reads version 2"
        );
        let none = RelationshipRecord::from_json(&web(), "{}")
            .unwrap_err()
            .to_string();
        assert!(none.contains("has version none"), "{none}");
        let unknown_state = r#"{"version": 2, "role": "Primary", "state": {"name": "Teleported"},
            "generation": 1, "last_seq": 0, "inflight_seq": null, "last_cut_unix_ns": null,
            "last_app_consistent_unix_ns": null}"#;
        let e = RelationshipRecord::from_json(&web(), unknown_state)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("relationship record of web is damaged"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn v1_flags_map_to_one_state() {
        use Resumable as R;
        let m = |s, d, su, r: Option<&str>, f| migrate_v1(s, d, su, r.map(String::from), f);
        assert_eq!(
            m(false, false, false, None, false),
            State::ReadyForInitialReplication
        );
        assert_eq!(
            m(true, false, false, None, false),
            State::InitialReplicationInProgress
        );
        assert_eq!(m(true, true, false, None, false), State::Replicating);
        assert_eq!(
            m(true, true, false, None, true),
            State::Resynchronizing { reason: None }
        );
        assert_eq!(
            m(true, true, true, None, false),
            State::Suspended {
                resume_to: R::Replicating
            }
        );
        assert_eq!(
            m(false, false, true, None, false),
            State::Suspended {
                resume_to: R::ReadyForInitialReplication
            }
        );
        assert_eq!(
            m(true, false, true, None, true),
            State::Suspended {
                resume_to: R::Resynchronizing
            }
        );
        // The resync reason wins over everything, as `state_of` had it.
        assert_eq!(
            m(true, true, true, Some("diverged"), true),
            State::ResynchronizationRequired {
                reason: "diverged".into()
            }
        );
        let rec = RelationshipRecord::from_v1(
            true,
            true,
            false,
            None,
            false,
            3,
            9,
            Some(10),
            Some(5),
            None,
        );
        let rel = Relationship::from_record(web(), rec).unwrap();
        assert_eq!(rel.role, Role::Primary);
        assert_eq!(rel.progress.last_seq, Seq(9));
        assert_eq!(rel.progress.inflight_seq, Some(Seq(10)));
        assert_eq!(rel.progress.generation, Generation(3));
    }

    #[test]
    fn failover_states_round_trip_as_relationship_md_shows() {
        let text = r#"{"version": 2, "role": "Replica",
            "state": { "name": "TestFailoverInProgress",
                       "detail": { "point": 12, "underlying": { "name": "Replicating" } } },
            "generation": 1, "last_seq": 14, "inflight_seq": null, "last_cut_unix_ns": null,
            "last_app_consistent_unix_ns": null}"#;
        let rel =
            Relationship::from_record(web(), RelationshipRecord::from_json(&web(), text).unwrap())
                .unwrap();
        assert_eq!(
            rel.state,
            State::TestFailoverInProgress {
                point: Seq(12),
                underlying: Box::new(State::Replicating)
            }
        );
        let states = [
            State::TestFailoverInProgress {
                point: Seq(3),
                underlying: Box::new(State::ResynchronizationRequired {
                    reason: "damaged".into(),
                }),
            },
            State::TestFailoverInProgress {
                point: Seq(3),
                underlying: Box::new(State::Suspended {
                    resume_to: Resumable::Replicating,
                }),
            },
            State::FailedOverWaitingCompletion { point: Seq(4) },
            State::FailedOver,
            State::PreparedForFailover {
                seq: Seq(7),
                resync: None,
            },
        ];
        for s in states {
            let mut r = Relationship::new(web(), Role::Replica, Generation(2));
            r.state = s;
            r.progress.last_seq = Seq(9);
            let json = serde_json::to_string(&r.to_record()).unwrap();
            let back = Relationship::from_record(
                web(),
                RelationshipRecord::from_json(&web(), &json).unwrap(),
            )
            .unwrap();
            assert_eq!(back, r, "{json}");
        }
        assert_eq!(
            serde_json::to_value(StateRecord::FailedOverWaitingCompletion { point: 4 }).unwrap(),
            serde_json::json!({"name": "FailedOverWaitingCompletion", "detail": {"point": 4}})
        );
        assert_eq!(
            serde_json::to_value(StateRecord::PreparedForFailover {
                seq: 7,
                resync: None
            })
            .unwrap(),
            serde_json::json!({"name": "PreparedForFailover", "detail": {"seq": 7}})
        );
    }

    #[test]
    fn test_failover_over_a_failover_state_is_refused_in_one_line() {
        let text = r#"{"version": 2, "role": "Replica",
            "state": { "name": "TestFailoverInProgress",
                       "detail": { "point": 12, "underlying": { "name": "FailedOver" } } },
            "generation": 1, "last_seq": 14, "inflight_seq": null, "last_cut_unix_ns": null,
            "last_app_consistent_unix_ns": null}"#;
        let rec = RelationshipRecord::from_json(&web(), text).unwrap();
        let e = Relationship::from_record(web(), rec)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("relationship record of web is damaged"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}
