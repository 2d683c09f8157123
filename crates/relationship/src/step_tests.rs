//! One test per transition and per refusal of [`step`].

use super::*;

const G: Generation = Generation(1);
const NOW: u64 = 1_000_000_000_000;

fn web() -> VmName {
    VmName::parse("web").unwrap()
}

fn primary(state: State, last_seq: u64) -> Relationship {
    let mut r = Relationship::new(web(), Role::Primary, G);
    r.state = state;
    r.progress.last_seq = Seq(last_seq);
    r.need_hello = false;
    r
}

fn replica(state: State, last_seq: u64) -> Relationship {
    let mut r = primary(state, last_seq);
    r.role = Role::Replica;
    r
}

fn ok(rel: &Relationship, ev: Event) -> (Relationship, Vec<Action>) {
    step(rel, ev, NOW).expect("step refused")
}

fn refused(rel: &Relationship, ev: Event) -> Refusal {
    step(rel, ev, NOW).expect_err("step accepted")
}

fn emitted(actions: &[Action]) -> Vec<EventKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

fn persist_index(actions: &[Action]) -> usize {
    actions
        .iter()
        .position(|a| *a == Action::Persist)
        .expect("no Persist")
}

fn resync(at: Option<u64>) -> Event {
    Event::Resynchronize {
        at_unix_ns: at,
        reason: None,
    }
}

fn hello(latest: u64) -> Event {
    Event::HelloAnswered {
        latest_seq: Seq(latest),
        latest_cut_unix_ns: None,
        generation: G,
        damage: None,
    }
}

fn committed(seq: u64) -> Event {
    Event::Committed {
        seq: Seq(seq),
        cut_unix_ns: NOW,
        app_consistent: false,
    }
}

/// A relationship with point `seq` in flight, cut at `NOW`.
fn in_flight(mut r: Relationship, seq: u64) -> Relationship {
    r.progress.inflight_seq = Some(Seq(seq));
    r.inflight_cut_unix_ns = Some(NOW);
    r
}

fn out_of_sequence(seq: u64, expected: u64) -> Event {
    Event::CycleFailed {
        seq: Seq(seq),
        error: "out of sequence".into(),
        refusal: Some(PeerRefusalFacts {
            expected_seq: Some(Seq(expected)),
            cut_unix_ns: Some(NOW),
            failed_over: false,
            needs_resync: true,
            error: "out of sequence".into(),
        }),
    }
}

fn required() -> State {
    State::ResynchronizationRequired {
        reason: "diverged".into(),
    }
}

fn suspended(to: Resumable) -> State {
    State::Suspended { resume_to: to }
}

#[test]
fn start_initial_scans_before_it_persists() {
    let (next, actions) = ok(
        &primary(State::ReadyForInitialReplication, 0),
        Event::StartInitial,
    );
    assert_eq!(next.state, State::InitialReplicationInProgress);
    assert_eq!(actions[0], Action::MarkAllocatedDirty);
    assert_eq!(persist_index(&actions), 1);
    assert_eq!(emitted(&actions), [EventKind::InitialStarted]);
    assert!(actions.contains(&Action::ScheduleCycleNow));
}

#[test]
fn start_initial_twice_is_a_conflict() {
    for s in [State::InitialReplicationInProgress, State::Replicating] {
        let r = refused(&primary(s, 1), Event::StartInitial);
        assert_eq!(r.kind, RefusalKind::Conflict);
        assert_eq!(r.message, "initial replication of web was already started");
    }
    let r = refused(
        &primary(suspended(Resumable::ReadyForInitialReplication), 0),
        Event::StartInitial,
    );
    assert!(
        r.message.contains("`understudy replication resume web`"),
        "{r}"
    );
    let r = refused(&primary(required(), 3), Event::StartInitial);
    assert!(r.message.contains("--resynchronize"), "{r}");
}

#[test]
fn start_from_existing_copy_marks_every_block_and_compares_as_point_2() {
    let (next, actions) = ok(
        &primary(State::ReadyForInitialReplication, 0),
        Event::StartInitialFromExisting,
    );
    assert_eq!(
        next.state,
        State::Resynchronizing {
            reason: Some(INITIAL_FROM_EXISTING_REASON.into())
        }
    );
    assert_eq!(next.progress.last_seq, EXISTING_COPY_SEQ);
    assert!(next.need_hello);
    // Every block, not only the allocated ones: the copy may hold data where the primary
    // has holes.
    assert_eq!(actions[0], Action::MarkAllDirty);
    assert_eq!(persist_index(&actions), 1);
    assert_eq!(emitted(&actions), [EventKind::InitialStarted]);
    assert!(actions.contains(&Action::ScheduleCycleNow));
    // The replica answers with the adopted copy, damaged until compared: the cycle is the
    // Full compare, point 2.
    let (after, actions) = ok(
        &next,
        Event::HelloAnswered {
            latest_seq: Seq(1),
            latest_cut_unix_ns: None,
            generation: G,
            damage: Some("an existing copy, not yet compared with the primary".into()),
        },
    );
    assert!(matches!(after.state, State::Resynchronizing { .. }));
    assert!(actions.contains(&Action::TakeCut {
        seq: Seq(2),
        kind: CycleKind::Full
    }));
    let (done, _) = ok(&in_flight(after, 2), committed(2));
    assert_eq!(done.state, State::Replicating);
    assert_eq!(done.progress.last_seq, Seq(2));
}

#[test]
fn start_from_existing_copy_is_refused_where_a_start_is() {
    for s in [State::InitialReplicationInProgress, State::Replicating] {
        let r = refused(&primary(s, 1), Event::StartInitialFromExisting);
        assert_eq!(r.message, "initial replication of web was already started");
    }
    let r = refused(
        &primary(suspended(Resumable::ReadyForInitialReplication), 0),
        Event::StartInitialFromExisting,
    );
    assert_eq!(r.kind, RefusalKind::Conflict);
    let r = refused(
        &replica(State::ReadyForInitialReplication, 0),
        Event::StartInitialFromExisting,
    );
    assert!(r.message.contains("run this on its primary"), "{r}");
}

#[test]
fn scheduled_initial_replication_waits_then_starts_by_itself() {
    let at = NOW + 30 * 1_000_000_000;
    let (next, actions) = ok(
        &primary(State::ReadyForInitialReplication, 0),
        Event::ScheduleInitial { at_unix_ns: at },
    );
    assert_eq!(
        next.state,
        State::InitialReplicationScheduled { at_unix_ns: at }
    );
    assert_eq!(
        next.state.name(),
        ReplicationState::ReadyForInitialReplication
    );
    assert_eq!(actions[0], Action::Persist);
    assert_eq!(emitted(&actions), [EventKind::InitialScheduled]);
    assert!(!next.state.cycles());
    // No cycle before the time.
    let (early, actions) = step(&next, Event::Tick, at - 1).unwrap();
    assert_eq!(early.state, next.state);
    assert!(actions.is_empty());
    let (_, actions) = ok(&next, Event::CycleDue);
    assert!(actions.is_empty());
    // At the time: as `replication start`.
    let (started, actions) = step(&next, Event::Tick, at).unwrap();
    assert_eq!(started.state, State::InitialReplicationInProgress);
    assert_eq!(actions[0], Action::MarkAllocatedDirty);
    assert_eq!(emitted(&actions), [EventKind::InitialStarted]);
    // `replication start` while scheduled starts now; a time in the past too.
    let (now, _) = ok(&next, Event::StartInitial);
    assert_eq!(now.state, State::InitialReplicationInProgress);
    let (past, _) = ok(
        &primary(State::ReadyForInitialReplication, 0),
        Event::ScheduleInitial { at_unix_ns: NOW },
    );
    assert_eq!(past.state, State::InitialReplicationInProgress);
    // Suspend and resynchronize are refused with what to run instead.
    let r = refused(&next, Event::Suspend);
    assert!(r.message.contains("replication start web"), "{r}");
    let r = refused(&next, resync(None));
    assert!(r.message.contains("has not started"), "{r}");
    // Once started it cannot be scheduled again.
    let r = refused(
        &primary(State::Replicating, 3),
        Event::ScheduleInitial { at_unix_ns: at },
    );
    assert_eq!(r.message, "initial replication of web was already started");
    // It survives a restart.
    let reloaded = Relationship::from_record(web(), next.to_record()).unwrap();
    assert_eq!(reloaded.state, next.state);
}

#[test]
fn initial_media_waits_for_the_import_then_adopts_point_1_and_ships_point_2() {
    let (media, actions) = ok(
        &primary(State::ReadyForInitialReplication, 0),
        Event::InitialMediaWritten { cut_unix_ns: NOW },
    );
    assert_eq!(media.state, State::InitialReplicationByMedia);
    assert_eq!(
        media.state.name(),
        ReplicationState::InitialReplicationInProgress
    );
    assert_eq!(media.progress.inflight_seq, Some(Seq(1)));
    assert_eq!(actions[0], Action::Persist);
    assert_eq!(emitted(&actions), [EventKind::InitialStarted]);
    // A cycle only asks: the replica has nothing yet, so nothing is cut.
    let (_, actions) = ok(&media, Event::CycleDue);
    assert!(matches!(
        actions[0],
        Action::StartCycle {
            hello_first: true,
            ..
        }
    ));
    let (waiting, actions) = ok(&media, hello(0));
    assert_eq!(waiting.state, State::InitialReplicationByMedia);
    assert!(waiting.need_hello);
    assert!(!actions.iter().any(|a| matches!(a, Action::TakeCut { .. })));
    // The replica imported it: point 1 adopted, point 2 (the writes since the cut) is cut.
    let (done, actions) = ok(&waiting, hello(1));
    assert_eq!(done.state, State::Replicating);
    assert_eq!(done.progress.last_seq, Seq(1));
    assert_eq!(done.progress.inflight_seq, None);
    assert_eq!(emitted(&actions), [EventKind::InitialDone]);
    assert!(actions.contains(&Action::TakeCut {
        seq: Seq(2),
        kind: CycleKind::Incremental
    }));
    // Commands while waiting: `start` gives up on the media, the others are refused.
    let (network, actions) = ok(&media, Event::StartInitial);
    assert_eq!(network.state, State::InitialReplicationInProgress);
    assert_eq!(network.progress.inflight_seq, None);
    assert_eq!(actions[0], Action::MarkAllocatedDirty);
    for ev in [
        Event::Suspend,
        Event::InitialMediaWritten { cut_unix_ns: NOW },
        Event::StartInitialFromExisting,
        Event::ScheduleInitial {
            at_unix_ns: NOW * 2,
        },
    ] {
        let r = refused(&media, ev);
        assert!(r.message.contains("import-media"), "{r}");
    }
    // Across a restart the point stays in flight.
    let reloaded = Relationship::from_record(web(), media.to_record()).unwrap();
    assert_eq!(reloaded.state, State::InitialReplicationByMedia);
    assert_eq!(reloaded.progress.inflight_seq, Some(Seq(1)));
}

#[test]
fn suspend_remembers_where_to_resume_and_cancels_the_cycle() {
    for (from, to) in [
        (
            State::ReadyForInitialReplication,
            Resumable::ReadyForInitialReplication,
        ),
        (
            State::InitialReplicationInProgress,
            Resumable::InitialReplicationInProgress,
        ),
        (State::Replicating, Resumable::Replicating),
        (
            State::Resynchronizing { reason: None },
            Resumable::Resynchronizing,
        ),
    ] {
        let (next, actions) = ok(&primary(from.clone(), 2), Event::Suspend);
        assert_eq!(next.state, suspended(to));
        assert!(next.need_hello);
        assert_eq!(actions[0], Action::CancelCycle);
        assert!(actions.contains(&Action::ReleaseCopyBeforeWrite));
        assert_eq!(emitted(&actions), [EventKind::Suspended]);
        // And resume returns there.
        let (back, actions) = ok(&next, Event::Resume);
        assert_eq!(back.state.name(), from.name());
        assert_eq!(emitted(&actions), [EventKind::Resumed]);
        assert!(actions.contains(&Action::ScheduleCycleNow));
    }
    // Suspending twice changes nothing.
    let s = primary(suspended(Resumable::Replicating), 2);
    assert_eq!(ok(&s, Event::Suspend), (s.clone(), vec![]));
}

#[test]
fn suspend_is_refused_while_a_resynchronization_is_required_or_scheduled() {
    let r = refused(&primary(required(), 3), Event::Suspend);
    assert_eq!(r.kind, RefusalKind::Conflict);
    assert_eq!(
        r.message,
        "web requires resynchronization; run `understudy replication resume web --resynchronize`"
    );
    let waiting = State::WaitingForStartResynchronize {
        reason: None,
        at_unix_ns: NOW + 1,
    };
    let r = refused(&primary(waiting, 3), Event::Suspend);
    assert!(r.message.contains("scheduled"), "{r}");
}

#[test]
fn resume_without_resynchronize_is_refused_when_resync_is_required() {
    let r = refused(&primary(required(), 3), Event::Resume);
    assert_eq!(r.kind, RefusalKind::Conflict);
    assert_eq!(
        r.message,
        "web requires resynchronization; run `understudy replication resume web --resynchronize`"
    );
    // Resuming what runs changes nothing.
    let s = primary(State::Replicating, 3);
    assert_eq!(ok(&s, Event::Resume), (s.clone(), vec![]));
}

#[test]
fn resynchronize_now_marks_everything_dirty_and_forgets_the_old_inflight_point() {
    let mut r = primary(required(), 5);
    r.progress.inflight_seq = Some(Seq(6));
    r.inflight_cut_unix_ns = Some(NOW);
    let (next, actions) = ok(&r, resync(None));
    assert_eq!(
        next.state,
        State::Resynchronizing {
            reason: Some("diverged".into())
        }
    );
    assert_eq!(next.progress.inflight_seq, None);
    assert!(next.need_hello);
    let p = persist_index(&actions);
    let dirty = actions
        .iter()
        .position(|a| *a == Action::MarkAllDirty)
        .unwrap();
    assert!(dirty < p, "{actions:?}");
    assert_eq!(emitted(&actions), [EventKind::ResyncStarted]);
    // From Replicating and from a suspended relationship too; a time in the past is now.
    for s in [State::Replicating, suspended(Resumable::Replicating)] {
        let (next, _) = ok(&primary(s, 5), resync(Some(NOW - 1)));
        assert_eq!(next.state, State::Resynchronizing { reason: None });
    }
}

#[test]
fn resynchronize_at_a_future_time_waits_then_starts_on_tick() {
    let at = NOW + 30_000_000_000;
    let (waiting, actions) = ok(&primary(required(), 5), resync(Some(at)));
    assert_eq!(
        waiting.state,
        State::WaitingForStartResynchronize {
            reason: Some("diverged".into()),
            at_unix_ns: at
        }
    );
    assert_eq!(emitted(&actions), [EventKind::ResyncScheduled]);
    // Not yet due: nothing.
    assert_eq!(
        step(&waiting, Event::Tick, at - 1).unwrap(),
        (waiting.clone(), vec![])
    );
    assert_eq!(step(&waiting, Event::CycleDue, at - 1).unwrap().1, vec![]);
    let (started, actions) = step(&waiting, Event::Tick, at).unwrap();
    assert!(matches!(started.state, State::Resynchronizing { .. }));
    assert!(actions.contains(&Action::MarkAllDirty));
}

#[test]
fn resynchronize_before_the_initial_replication_is_refused() {
    for s in [
        State::ReadyForInitialReplication,
        State::InitialReplicationInProgress,
        suspended(Resumable::ReadyForInitialReplication),
        suspended(Resumable::InitialReplicationInProgress),
    ] {
        let r = refused(&primary(s, 0), resync(None));
        assert_eq!(r.kind, RefusalKind::Conflict);
        assert!(r.message.contains("initial replication of web"), "{r}");
    }
}

#[test]
fn cycle_due_starts_a_cycle_only_where_cycles_run() {
    for (s, kind) in [
        (State::InitialReplicationInProgress, CycleKind::Initial),
        (State::Replicating, CycleKind::Incremental),
        (State::Resynchronizing { reason: None }, CycleKind::Full),
    ] {
        let (next, actions) = ok(&primary(s.clone(), 4), Event::CycleDue);
        assert_eq!(next, primary(s, 4));
        assert_eq!(
            actions,
            [
                Action::StartCycle {
                    seq: Seq(5),
                    kind,
                    hello_first: false
                },
                Action::TakeCut { seq: Seq(5), kind }
            ]
        );
    }
    let mut r = primary(State::Replicating, 4);
    r.need_hello = true;
    let (_, actions) = ok(&r, Event::CycleDue);
    assert_eq!(
        actions,
        [Action::StartCycle {
            seq: Seq(5),
            kind: CycleKind::Incremental,
            hello_first: true
        }]
    );
    for s in [
        State::ReadyForInitialReplication,
        suspended(Resumable::Replicating),
        required(),
        State::WaitingForStartResynchronize {
            reason: None,
            at_unix_ns: NOW + 1,
        },
    ] {
        assert_eq!(ok(&primary(s, 4), Event::CycleDue).1, vec![]);
    }
}

#[test]
fn hello_in_sync_clears_need_hello_and_says_what_to_cut() {
    let mut r = primary(State::Replicating, 4);
    r.need_hello = true;
    let (next, actions) = ok(&r, hello(4));
    assert!(!next.need_hello);
    assert_eq!(
        actions,
        [Action::TakeCut {
            seq: Seq(5),
            kind: CycleKind::Incremental
        }]
    );
}

#[test]
fn lost_answer_of_the_first_point_is_adopted_and_ends_the_initial_replication() {
    let mut r = primary(State::InitialReplicationInProgress, 0);
    r.progress.inflight_seq = Some(Seq(1));
    r.inflight_cut_unix_ns = Some(NOW);
    r.need_hello = true;
    let (next, actions) = ok(&r, hello(1));
    assert_eq!(next.state, State::Replicating);
    assert_eq!(next.progress.last_seq, Seq(1));
    assert_eq!(next.progress.inflight_seq, None);
    assert_eq!(persist_index(&actions), 0);
    assert_eq!(
        emitted(&actions),
        [EventKind::InitialDone, EventKind::AnswerLostAdopted]
    );
    assert_eq!(
        actions.last(),
        Some(&Action::TakeCut {
            seq: Seq(2),
            kind: CycleKind::Incremental
        })
    );
}

#[test]
fn divergent_hello_requires_resynchronization_and_cancels_the_cycle() {
    let mut r = primary(State::Replicating, 7);
    r.need_hello = true;
    let (next, actions) = ok(&r, hello(3));
    assert!(
        matches!(&next.state, State::ResynchronizationRequired { reason } if reason.contains("older copy"))
    );
    assert_eq!(actions[0], Action::CancelCycle);
    assert_eq!(emitted(&actions), [EventKind::ResyncRequired]);
    // Damage and another generation too.
    let damaged = Event::HelloAnswered {
        latest_seq: Seq(7),
        latest_cut_unix_ns: None,
        generation: G,
        damage: Some("journal checksum".into()),
    };
    assert!(matches!(
        ok(&r, damaged).0.state,
        State::ResynchronizationRequired { .. }
    ));
    let other = Event::HelloAnswered {
        latest_seq: Seq(7),
        latest_cut_unix_ns: None,
        generation: Generation(2),
        damage: None,
    };
    assert!(matches!(
        ok(&r, other).0.state,
        State::ResynchronizationRequired { .. }
    ));
}

#[test]
fn divergent_hello_while_resynchronizing_adopts_the_replicas_latest() {
    let mut r = primary(State::Resynchronizing { reason: None }, 7);
    r.need_hello = true;
    let (next, actions) = ok(&r, hello(3));
    assert_eq!(next.progress.last_seq, Seq(3));
    assert!(matches!(next.state, State::Resynchronizing { .. }));
    assert!(!next.need_hello);
    assert_eq!(
        actions,
        [
            Action::Persist,
            Action::TakeCut {
                seq: Seq(4),
                kind: CycleKind::Full
            }
        ]
    );
}

#[test]
fn cut_is_recorded_in_flight_before_upload() {
    let (next, actions) = ok(
        &primary(State::Replicating, 4),
        Event::CutTaken {
            seq: Seq(5),
            cut_unix_ns: NOW,
        },
    );
    assert_eq!(next.progress.inflight_seq, Some(Seq(5)));
    assert_eq!(actions, [Action::Persist]);
}

#[test]
fn unexpected_cut_is_cancelled_not_shipped() {
    // Wrong seq, hello pending, or not a cycling state.
    let mut pending = primary(State::Replicating, 4);
    pending.need_hello = true;
    for (r, seq) in [
        (primary(State::Replicating, 4), 7),
        (pending, 5),
        (primary(suspended(Resumable::Replicating), 4), 5),
    ] {
        let (next, actions) = ok(
            &r,
            Event::CutTaken {
                seq: Seq(seq),
                cut_unix_ns: NOW,
            },
        );
        assert_eq!(actions, [Action::CancelCycle]);
        assert_eq!(next.progress, r.progress);
        assert!(next.need_hello);
    }
}

#[test]
fn commit_of_the_inflight_point_advances_and_ends_initial_and_resync() {
    for (from, done) in [
        (
            State::InitialReplicationInProgress,
            Some(EventKind::InitialDone),
        ),
        (
            State::Resynchronizing { reason: None },
            Some(EventKind::ResyncDone),
        ),
        (State::Replicating, None),
    ] {
        let r = in_flight(primary(from, 4), 5);
        let (next, actions) = ok(
            &r,
            Event::Committed {
                seq: Seq(5),
                cut_unix_ns: NOW,
                app_consistent: true,
            },
        );
        assert_eq!(next.state, State::Replicating);
        assert_eq!(next.progress.last_seq, Seq(5));
        assert_eq!(next.progress.inflight_seq, None);
        assert_eq!(next.progress.last_cut_unix_ns, Some(NOW));
        assert_eq!(next.progress.last_app_consistent_unix_ns, Some(NOW));
        assert_eq!(next.inflight_cut_unix_ns, None);
        assert_eq!(persist_index(&actions), 0);
        assert_eq!(emitted(&actions), done.into_iter().collect::<Vec<_>>());
    }
}

#[test]
fn late_answer_of_an_older_cycle_changes_nothing() {
    let r = in_flight(primary(State::Replicating, 6), 7);
    for seq in [5, 6, 8] {
        assert_eq!(ok(&r, committed(seq)), (r.clone(), vec![]));
    }
    // The answer of an earlier attempt at the same point (another cut) does not count either.
    let earlier = Event::Committed {
        seq: Seq(7),
        cut_unix_ns: NOW - 1,
        app_consistent: false,
    };
    assert_eq!(ok(&r, earlier), (r.clone(), vec![]));
    // After a restart the cut time is unknown: only the next hello can adopt the point.
    let reloaded = Relationship::from_record(web(), r.to_record()).unwrap();
    assert_eq!(ok(&reloaded, committed(7)), (reloaded.clone(), vec![]));
    // And an answer after the cycle was cancelled by a suspend.
    let mut s = r.clone();
    s.state = suspended(Resumable::Replicating);
    assert_eq!(ok(&s, committed(7)), (s.clone(), vec![]));
}

#[test]
fn failed_cycle_asks_again_next_time() {
    let r = primary(State::Replicating, 6);
    let (next, actions) = ok(
        &r,
        Event::CycleFailed {
            seq: Seq(7),
            error: "connection reset".into(),
            refusal: None,
        },
    );
    assert!(next.need_hello);
    assert_eq!(next.state, State::Replicating);
    assert_eq!(emitted(&actions), [EventKind::CycleFailed]);
}

#[test]
fn already_delivered_refusal_is_not_a_divergence() {
    let mut r = primary(State::Replicating, 6);
    r.progress.inflight_seq = Some(Seq(7));
    r.inflight_cut_unix_ns = Some(NOW);
    let (next, _) = ok(&r, out_of_sequence(7, 8));
    assert_eq!(next.state, State::Replicating);
    assert!(next.need_hello);
    // The next hello adopts it.
    let (next, _) = ok(&next, hello(7));
    assert_eq!(next.progress.last_seq, Seq(7));
}

#[test]
fn divergent_refusal_requires_resynchronization() {
    let mut r = primary(State::Replicating, 6);
    r.progress.inflight_seq = Some(Seq(7));
    r.inflight_cut_unix_ns = Some(NOW);
    let (next, actions) = ok(&r, out_of_sequence(7, 4));
    assert!(
        matches!(&next.state, State::ResynchronizationRequired { reason } if reason.contains("older copy"))
    );
    assert_eq!(
        emitted(&actions),
        [EventKind::CycleFailed, EventKind::ResyncRequired]
    );
    // A refusal without an expected point (wrong generation, bad key) too.
    let other = Event::CycleFailed {
        seq: Seq(7),
        error: "refused".into(),
        refusal: Some(PeerRefusalFacts {
            expected_seq: None,
            cut_unix_ns: Some(NOW),
            failed_over: false,
            needs_resync: true,
            error: "wrong generation".into(),
        }),
    };
    assert!(
        matches!(ok(&r, other).0.state, State::ResynchronizationRequired { reason } if reason == "wrong generation")
    );
}

#[test]
fn stale_refusal_of_an_older_cycle_is_not_a_divergence() {
    // Point 7 was adopted; the refusal of the first attempt at 7 arrives late.
    let r = primary(State::Replicating, 7);
    let (next, _) = ok(&r, out_of_sequence(7, 8));
    assert_eq!(next.state, State::Replicating);
}

#[test]
fn refused_full_delta_is_resolved_by_the_next_hello_not_adopted() {
    let mut r = primary(State::Resynchronizing { reason: None }, 5);
    r.progress.inflight_seq = Some(Seq(6));
    r.inflight_cut_unix_ns = Some(NOW);
    let (next, actions) = ok(&r, out_of_sequence(6, 9));
    assert!(matches!(next.state, State::Resynchronizing { .. }));
    assert_eq!(next.progress.inflight_seq, None);
    assert!(actions.contains(&Action::Persist));
    // The replica holds 8: adopted as the base of the next Full delta, not as its end.
    let (next, _) = ok(&next, hello(8));
    assert!(matches!(next.state, State::Resynchronizing { .. }));
    assert_eq!(next.progress.last_seq, Seq(8));
}

#[test]
fn storage_failure_requires_resynchronization_once() {
    let (next, actions) = ok(
        &primary(State::Replicating, 3),
        Event::StorageFailed {
            reason: "the tracker's bitmap cannot be written".into(),
        },
    );
    assert!(matches!(
        next.state,
        State::ResynchronizationRequired { .. }
    ));
    assert_eq!(emitted(&actions), [EventKind::ResyncRequired]);
    // The first reason stays.
    let (again, actions) = ok(
        &next,
        Event::StorageFailed {
            reason: "other".into(),
        },
    );
    assert_eq!(again, next);
    assert_eq!(actions, vec![]);
}

#[test]
fn restart_asks_the_replica_first() {
    let (next, actions) = ok(&primary(State::Replicating, 3), Event::Restarted);
    assert!(next.need_hello);
    assert_eq!(actions, vec![]);
}

#[test]
fn replica_events_are_invalid_on_the_primary_and_commands_on_the_replica() {
    let r = refused(
        &primary(State::Replicating, 3),
        Event::Diverged { reason: "x".into() },
    );
    assert_eq!(r.kind, RefusalKind::Invalid);
    assert_eq!(
        r.message,
        "web is replicated from this host: it is not a replica here"
    );
    for ev in [
        Event::StartInitial,
        Event::Suspend,
        Event::Resume,
        resync(None),
        Event::CycleDue,
    ] {
        let r = refused(&replica(State::Replicating, 3), ev);
        assert_eq!(r.kind, RefusalKind::Invalid);
        assert_eq!(
            r.message,
            "web is a replica on this host; run this on its primary"
        );
    }
}

#[test]
fn replica_mirrors_the_primarys_state_or_derives_it() {
    let r = replica(State::ReadyForInitialReplication, 0);
    let hello = |state, latest| Event::HelloReceived {
        primary_state: state,
        generation: G,
        latest_seq: Seq(latest),
    };
    let (next, actions) = ok(&r, hello(None, 0));
    assert_eq!(next.state, State::InitialReplicationInProgress);
    assert_eq!(actions, [Action::Persist]);
    assert_eq!(ok(&r, hello(None, 4)).0.state, State::Replicating);
    assert_eq!(
        ok(&r, hello(Some(ReplicationState::Suspended), 4)).0.state,
        suspended(Resumable::Replicating)
    );
    assert_eq!(
        ok(&r, hello(Some(ReplicationState::Resynchronizing), 4))
            .0
            .state,
        State::Resynchronizing { reason: None }
    );
    // Unchanged: nothing to persist.
    let same = replica(State::Replicating, 4);
    assert_eq!(ok(&same, hello(None, 4)), (same.clone(), vec![]));
    // The replica's own divergence stays until the primary acts on it.
    let diverged = replica(required(), 4);
    assert_eq!(
        ok(&diverged, hello(Some(ReplicationState::Replicating), 4))
            .0
            .state,
        required()
    );
    // A new generation starts over.
    let (next, _) = ok(
        &diverged,
        Event::HelloReceived {
            primary_state: None,
            generation: Generation(2),
            latest_seq: Seq(0),
        },
    );
    assert_eq!(next.state, State::InitialReplicationInProgress);
    assert_eq!(next.progress.generation, Generation(2));
}

#[test]
fn replica_follows_deltas_and_divergence() {
    let r = replica(State::Replicating, 4);
    let (next, _) = ok(
        &r,
        Event::DeltaStarted {
            kind: CycleKind::Full,
        },
    );
    assert_eq!(next.state, State::Resynchronizing { reason: None });
    assert_eq!(
        ok(
            &r,
            Event::DeltaStarted {
                kind: CycleKind::Incremental
            }
        ),
        (r.clone(), vec![])
    );
    let commit = |kind| Event::DeltaCommitted {
        seq: Seq(5),
        kind,
        cut_unix_ns: 9,
    };
    let (done, actions) = ok(&next, commit(CycleKind::Full));
    assert_eq!(done.state, State::Replicating);
    assert_eq!(done.progress.last_seq, Seq(5));
    assert_eq!(actions, [Action::Persist]);
    let (diverged, actions) = ok(
        &r,
        Event::Diverged {
            reason: "out of sequence".into(),
        },
    );
    assert!(matches!(
        diverged.state,
        State::ResynchronizationRequired { .. }
    ));
    assert_eq!(emitted(&actions), [EventKind::ResyncRequired]);
    // Only a Full delta repairs it.
    assert!(matches!(
        ok(&diverged, commit(CycleKind::Incremental)).0.state,
        State::ResynchronizationRequired { .. }
    ));
    assert_eq!(
        ok(&diverged, commit(CycleKind::Full)).0.state,
        State::Replicating
    );
}

#[test]
fn state_names_are_the_hyper_v_ones() {
    assert_eq!(
        State::WaitingForStartResynchronize {
            reason: None,
            at_unix_ns: 0
        }
        .name(),
        ReplicationState::WaitingForStartResynchronize
    );
    assert_eq!(
        required().name(),
        ReplicationState::ResynchronizationRequired
    );
    assert_eq!(
        suspended(Resumable::Resynchronizing).name(),
        ReplicationState::Suspended
    );
}

#[test]
fn replica_waiting_for_resync_does_not_start_one_on_tick() {
    let waiting = State::WaitingForStartResynchronize {
        reason: None,
        at_unix_ns: NOW - 1,
    };
    let r = replica(waiting, 4);
    assert_eq!(ok(&r, Event::Tick), (r.clone(), vec![]));
}

/// Regression (review): a point whose upload ended just before the primary suspended (or
/// scheduled a resynchronization) committed after the replica mirrored that state, and the
/// replica then showed Replicating while the primary stayed Suspended.
#[test]
fn late_commit_does_not_undo_a_state_the_primary_chose() {
    let commit = Event::DeltaCommitted {
        seq: Seq(5),
        kind: CycleKind::Incremental,
        cut_unix_ns: 9,
    };
    for state in [
        State::Suspended {
            resume_to: Resumable::Replicating,
        },
        State::WaitingForStartResynchronize {
            reason: None,
            at_unix_ns: 100,
        },
    ] {
        let r = replica(state.clone(), 4);
        let (next, actions) = ok(&r, commit.clone());
        assert_eq!(next.state, state);
        assert_eq!(next.progress.last_seq, Seq(5), "progress still follows");
        assert_eq!(actions, [Action::Persist]);
    }
    // A replica that missed the hello starting the initial replication still follows it.
    let r = replica(State::ReadyForInitialReplication, 0);
    let initial = Event::DeltaCommitted {
        seq: Seq(1),
        kind: CycleKind::Initial,
        cut_unix_ns: 9,
    };
    assert_eq!(ok(&r, initial).0.state, State::Replicating);
}

// ---- Failover (issue 10).

fn start(point: u64, test: bool) -> Event {
    Event::FailoverStart {
        point: Seq(point),
        test,
    }
}

fn testing(point: u64, underlying: State) -> State {
    State::TestFailoverInProgress {
        point: Seq(point),
        underlying: Box::new(underlying),
    }
}

fn failed_over(point: u64) -> State {
    State::FailedOverWaitingCompletion { point: Seq(point) }
}

fn delta_committed(seq: u64) -> Event {
    Event::DeltaCommitted {
        seq: Seq(seq),
        kind: CycleKind::Incremental,
        cut_unix_ns: NOW,
    }
}

fn replica_hello(state: ReplicationState, latest: u64) -> Event {
    Event::HelloReceived {
        primary_state: Some(state),
        generation: G,
        latest_seq: Seq(latest),
    }
}

#[test]
fn test_failover_starts_from_any_replica_state_with_a_point() {
    for from in [
        State::Replicating,
        suspended(Resumable::Replicating),
        required(),
        State::Resynchronizing { reason: None },
        State::PreparedForFailover {
            seq: Seq(5),
            resync: None,
        },
    ] {
        let (next, actions) = ok(&replica(from.clone(), 5), start(3, true));
        assert_eq!(next.state, testing(3, from));
        assert_eq!(
            actions[0],
            Action::ServeFailover {
                point: Seq(3),
                test: true
            }
        );
        assert_eq!(persist_index(&actions), 1);
        assert_eq!(emitted(&actions), [EventKind::TestFailoverStarted]);
        assert!(next.state.accepts_deltas());
    }
}

#[test]
fn failover_without_a_committed_point_is_refused() {
    for test in [true, false] {
        let r = refused(
            &replica(State::InitialReplicationInProgress, 0),
            start(1, test),
        );
        assert_eq!(r.kind, RefusalKind::Conflict);
        assert!(r.message.contains("no committed point"), "{r}");
        // A point newer than the newest committed one cannot exist.
        let r = refused(&replica(State::Replicating, 4), start(5, test));
        assert_eq!(r.kind, RefusalKind::Invalid);
        assert!(r.message.contains("newest is 4"), "{r}");
        let r = refused(&replica(State::Replicating, 4), start(0, test));
        assert_eq!(r.kind, RefusalKind::Invalid);
    }
}

#[test]
fn second_test_failover_is_refused_in_one_line() {
    let r = refused(&replica(testing(3, State::Replicating), 5), start(4, true));
    assert_eq!(r.kind, RefusalKind::Conflict);
    assert_eq!(
        r.message,
        "a test failover of web is already running (point 3); run `understudy failover stop web --test` first"
    );
}

#[test]
fn replication_goes_on_during_a_test_failover() {
    let r = replica(testing(3, State::Replicating), 5);
    let (next, actions) = ok(&r, delta_committed(6));
    assert_eq!(next.state, testing(3, State::Replicating));
    assert_eq!(next.progress.last_seq, Seq(6));
    assert_eq!(actions, [Action::Persist]);
    // The primary's state is remembered, not shown, while the test runs.
    let (next, actions) = ok(&r, replica_hello(ReplicationState::Suspended, 5));
    assert_eq!(
        next.state,
        testing(3, suspended(Resumable::Replicating)),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::Persist));
    // A damaged store shows through the test: the underlying state requires a resync.
    let (next, _) = ok(
        &r,
        Event::Diverged {
            reason: "damaged".into(),
        },
    );
    assert_eq!(
        next.state,
        testing(
            3,
            State::ResynchronizationRequired {
                reason: "damaged".into()
            }
        )
    );
    assert_eq!(next.state.reason(), Some("damaged"));
    let (next, _) = ok(
        &r,
        Event::DeltaStarted {
            kind: CycleKind::Full,
        },
    );
    assert_eq!(
        next.state,
        testing(3, State::Resynchronizing { reason: None })
    );
}

#[test]
fn test_failover_stop_returns_to_the_state_without_the_test() {
    let underlying = suspended(Resumable::Replicating);
    let (next, actions) = ok(
        &replica(testing(3, underlying.clone()), 5),
        Event::FailoverStop { test: true },
    );
    assert_eq!(next.state, underlying);
    assert_eq!(actions[0], Action::DropFailover { test: true });
    assert_eq!(persist_index(&actions), 1);
    assert_eq!(emitted(&actions), [EventKind::TestFailoverStopped]);
}

#[test]
fn test_failover_stop_without_a_test_is_refused() {
    for s in [State::Replicating, failed_over(3)] {
        let r = refused(&replica(s, 5), Event::FailoverStop { test: true });
        assert_eq!(r.kind, RefusalKind::Conflict);
        assert!(r.message.starts_with("no test failover of web"), "{r}");
    }
    // `failover stop` (not --test) during a test names the right command.
    let r = refused(
        &replica(testing(3, State::Replicating), 5),
        Event::FailoverStop { test: false },
    );
    assert!(
        r.message.contains("`understudy failover stop web --test`"),
        "{r}"
    );
}

#[test]
fn failover_start_serves_the_point_and_stops_receiving() {
    let (next, actions) = ok(&replica(State::Replicating, 5), start(4, false));
    assert_eq!(next.state, failed_over(4));
    assert_eq!(next.role, Role::Replica);
    assert_eq!(
        actions[0],
        Action::ServeFailover {
            point: Seq(4),
            test: false
        }
    );
    assert_eq!(persist_index(&actions), 1);
    assert_eq!(emitted(&actions), [EventKind::FailoverStarted]);
    assert!(!next.state.accepts_deltas());
}

#[test]
fn failover_during_a_test_failover_is_refused() {
    let r = refused(&replica(testing(3, State::Replicating), 5), start(4, false));
    assert_eq!(r.kind, RefusalKind::Conflict);
    assert!(
        r.message
            .contains("stop the test failover first: `understudy failover stop web --test`"),
        "{r}"
    );
    // And a test while failed over.
    let r = refused(&replica(failed_over(3), 5), start(4, true));
    assert!(r.message.contains("failed over to point 3"), "{r}");
}

#[test]
fn failover_start_again_starts_over_from_another_point() {
    let (next, actions) = ok(&replica(failed_over(4), 5), start(2, false));
    assert_eq!(next.state, failed_over(2));
    assert_eq!(
        actions[..3],
        [
            Action::DropFailover { test: false },
            Action::ServeFailover {
                point: Seq(2),
                test: false
            },
            Action::Persist,
        ]
    );
    assert_eq!(emitted(&actions), [EventKind::FailoverStarted]);
}

#[test]
fn failover_stop_cancels_and_the_replica_receives_again() {
    let (next, actions) = ok(
        &replica(failed_over(4), 5),
        Event::FailoverStop { test: false },
    );
    assert_eq!(next.state, State::Replicating);
    assert_eq!(next.role, Role::Replica);
    assert!(next.state.accepts_deltas());
    assert_eq!(actions[0], Action::DropFailover { test: false });
    assert_eq!(persist_index(&actions), 1);
    assert_eq!(emitted(&actions), [EventKind::FailoverCancelled]);
    let r = refused(
        &replica(State::Replicating, 5),
        Event::FailoverStop { test: false },
    );
    assert_eq!(
        r.message,
        "no failover of web is in progress; run `understudy failover start web` first"
    );
}

#[test]
fn failed_over_replica_ignores_hellos_but_records_a_late_commit() {
    let r = replica(failed_over(4), 5);
    for ev in [
        replica_hello(ReplicationState::Replicating, 5),
        Event::DeltaStarted {
            kind: CycleKind::Full,
        },
        Event::Diverged { reason: "x".into() },
    ] {
        let (next, actions) = ok(&r, ev);
        assert_eq!(next, r);
        assert!(actions.is_empty());
    }
    let (next, actions) = ok(&r, delta_committed(6));
    assert_eq!(next.state, failed_over(4));
    assert_eq!(next.progress.last_seq, Seq(6));
    assert_eq!(actions, [Action::Persist]);
}

#[test]
fn failover_complete_makes_this_host_the_primary() {
    let mut r = replica(failed_over(4), 5);
    r.progress.last_cut_unix_ns = Some(NOW);
    let (next, actions) = ok(&r, Event::FailoverComplete);
    assert_eq!(next.role, Role::Primary);
    assert_eq!(next.state, State::FailedOver);
    assert_eq!(next.progress.last_seq, Seq(4));
    assert_eq!(next.progress.last_cut_unix_ns, None);
    // The host's work (can fail) comes before Persist.
    assert_eq!(actions[0], Action::CompleteFailover { point: Seq(4) });
    assert_eq!(persist_index(&actions), 1);
    assert_eq!(emitted(&actions), [EventKind::FailoverCompleted]);
    assert!(!next.state.accepts_deltas());
    assert!(!next.state.cycles());
    // A retry after a lost answer finds it done.
    let (again, actions) = ok(&next, Event::FailoverComplete);
    assert_eq!(again, next);
    assert!(actions.is_empty());
}

#[test]
fn failover_complete_without_start_is_refused() {
    for s in [State::Replicating, required()] {
        let r = refused(&replica(s, 5), Event::FailoverComplete);
        assert_eq!(r.kind, RefusalKind::Conflict);
        assert_eq!(
            r.message,
            "no failover of web is in progress; run `understudy failover start web` first"
        );
    }
    let r = refused(
        &replica(testing(3, State::Replicating), 5),
        Event::FailoverComplete,
    );
    assert!(
        r.message.contains("a test failover cannot be completed"),
        "{r}"
    );
    let r = refused(&primary(State::Replicating, 5), Event::FailoverComplete);
    assert_eq!(r.kind, RefusalKind::Invalid);
}

#[test]
fn failed_over_refuses_replication_commands_naming_reverse() {
    let r = primary(State::FailedOver, 4);
    for ev in [
        Event::StartInitial,
        Event::Suspend,
        Event::Resume,
        resync(None),
        Event::Prepared { seq: Seq(4) },
        start(4, false),
        Event::FailoverStop { test: false },
    ] {
        let e = refused(&r, ev.clone());
        assert_eq!(e.kind, RefusalKind::Conflict, "{ev:?}");
        assert!(
            e.message
                .contains("`understudy replication reverse web --replica HOST:PORT`"),
            "{e}"
        );
        assert!(!e.message.contains('\n'));
    }
    // No cycle, and a late fact of the old relationship changes nothing.
    for ev in [
        Event::CycleDue,
        hello(9),
        committed(5),
        out_of_sequence(5, 2),
        Event::StorageFailed {
            reason: "lost".into(),
        },
    ] {
        let (next, actions) = ok(&r, ev);
        assert_eq!(next, r);
        assert!(actions.is_empty());
    }
}

#[test]
fn prepared_is_accepted_only_when_the_last_change_committed() {
    let (next, actions) = ok(
        &primary(State::Replicating, 7),
        Event::Prepared { seq: Seq(7) },
    );
    assert_eq!(
        next.state,
        State::PreparedForFailover {
            seq: Seq(7),
            resync: None,
        }
    );
    assert!(!next.state.cycles());
    assert!(actions.contains(&Action::CancelCycle));
    assert!(actions.contains(&Action::Persist));
    assert_eq!(emitted(&actions), [EventKind::PreparedForFailover]);
    // Again with the same point: nothing to do.
    let (again, actions) = ok(&next, Event::Prepared { seq: Seq(7) });
    assert_eq!(again, next);
    assert!(actions.is_empty());
    // No cycle in this state.
    let (_, actions) = ok(&next, Event::CycleDue);
    assert!(actions.is_empty());
}

#[test]
fn prepared_is_refused_unless_replicating_in_sync() {
    let stale = refused(
        &primary(State::Replicating, 7),
        Event::Prepared { seq: Seq(6) },
    );
    assert!(stale.message.contains("not the newest point"), "{stale}");
    let flying = refused(
        &in_flight(primary(State::Replicating, 7), 8),
        Event::Prepared { seq: Seq(7) },
    );
    assert!(flying.message.contains("still being shipped"), "{flying}");
    for s in [
        suspended(Resumable::Replicating),
        required(),
        State::InitialReplicationInProgress,
    ] {
        let r = refused(&primary(s, 7), Event::Prepared { seq: Seq(7) });
        assert_eq!(r.kind, RefusalKind::Conflict);
        assert!(r.message.contains("needs it Replicating"), "{r}");
    }
    let r = refused(
        &replica(State::Replicating, 7),
        Event::Prepared { seq: Seq(7) },
    );
    assert_eq!(r.kind, RefusalKind::Invalid);
}

#[test]
fn resume_cancels_a_prepare_and_unfences_after_persist() {
    let p = primary(
        State::PreparedForFailover {
            seq: Seq(7),
            resync: None,
        },
        7,
    );
    for ev in [Event::Resume, Event::FailoverStop { test: false }] {
        let (next, actions) = ok(&p, ev);
        assert_eq!(next.state, State::Replicating);
        let unfence = actions.iter().position(|a| *a == Action::Unfence).unwrap();
        assert!(persist_index(&actions) < unfence, "{actions:?}");
        assert_eq!(emitted(&actions), [EventKind::FailoverCancelled]);
        assert!(actions.contains(&Action::ScheduleCycleNow));
    }
    for ev in [Event::StartInitial, Event::Suspend, resync(None)] {
        let r = refused(&p, ev);
        assert!(r.message.contains("prepared for a planned failover"), "{r}");
        assert!(!r.message.contains('\n'));
    }
}

/// A divergence learned while prepared does not lift the fence (the replica may have failed
/// over to the prepared point: serving the disks here would make two primaries); cancelling
/// the prepare leads to the resynchronization, unfenced only after `Persist`.
#[test]
fn divergence_while_prepared_keeps_the_fence_and_cancel_leads_to_resync() {
    let p = primary(
        State::PreparedForFailover {
            seq: Seq(7),
            resync: None,
        },
        7,
    );
    let (next, actions) = ok(
        &p,
        Event::StorageFailed {
            reason: "lost".into(),
        },
    );
    assert!(matches!(
        &next.state,
        State::PreparedForFailover { seq: Seq(7), resync: Some(r) } if r == "lost"
    ));
    assert!(!actions.contains(&Action::Unfence), "{actions:?}");
    assert!(actions.contains(&Action::Persist));
    let (cancelled, actions) = ok(&next, Event::Resume);
    assert!(matches!(
        cancelled.state,
        State::ResynchronizationRequired { .. }
    ));
    let unfence = actions.iter().position(|a| *a == Action::Unfence).unwrap();
    assert!(persist_index(&actions) < unfence);
}

#[test]
fn replica_mirrors_a_prepared_primary_and_may_fail_over_from_it() {
    let (next, _) = ok(
        &replica(State::Replicating, 7),
        replica_hello(ReplicationState::PreparedForFailover, 7),
    );
    assert_eq!(
        next.state,
        State::PreparedForFailover {
            seq: Seq(7),
            resync: None,
        }
    );
    let (next, _) = ok(&next, start(7, false));
    assert_eq!(next.state, failed_over(7));
    // A primary never reports a replica's failover states: not mirrored.
    for s in [
        ReplicationState::TestFailoverInProgress,
        ReplicationState::FailedOverWaitingCompletion,
        ReplicationState::FailedOver,
    ] {
        let (next, _) = ok(&replica(State::Replicating, 7), replica_hello(s, 7));
        assert_eq!(next.state, State::Replicating);
    }
}

#[test]
fn accepts_deltas_is_false_exactly_while_failed_over() {
    for (s, accepts) in [
        (State::Replicating, true),
        (testing(1, State::Replicating), true),
        (
            State::PreparedForFailover {
                seq: Seq(1),
                resync: None,
            },
            true,
        ),
        (failed_over(1), false),
        (State::FailedOver, false),
    ] {
        assert_eq!(s.accepts_deltas(), accepts, "{s:?}");
    }
}

fn told_failed_over() -> Event {
    Event::ReplicaFailedOver {
        reason: "web is FailedOver on its replica host".into(),
    }
}

#[test]
fn old_primary_told_of_a_failover_fences_and_never_ships_again() {
    let mut p = primary(State::Replicating, 7);
    p.progress.inflight_seq = Some(Seq(8));
    p.inflight_cut_unix_ns = Some(NOW);
    let (next, actions) = ok(&p, told_failed_over());
    assert!(matches!(
        next.state,
        State::FencedAfterFailover {
            resume_to: Resumable::Replicating,
            resync: None,
            ..
        }
    ));
    // Fenced before anything else, the cycle cancelled, the point in flight kept for the
    // hello that may end the fence.
    assert_eq!(actions.first(), Some(&Action::Fence));
    assert!(actions.contains(&Action::CancelCycle));
    assert!(actions.contains(&Action::Persist));
    assert_eq!(next.progress.inflight_seq, Some(Seq(8)));
    assert_eq!(emitted(&actions), [EventKind::FencedAfterFailover]);
    // The same news as the refusal of an upload.
    let refusal = Event::CycleFailed {
        seq: Seq(8),
        error: "failed over".into(),
        refusal: Some(PeerRefusalFacts {
            expected_seq: None,
            cut_unix_ns: None,
            failed_over: true,
            needs_resync: false,
            error: "failed over".into(),
        }),
    };
    let (by_refusal, _) = ok(&p, refusal);
    assert!(matches!(
        by_refusal.state,
        State::FencedAfterFailover { .. }
    ));
    // Nothing ships any more; replication commands are refused naming the ways out.
    let (after, actions) = ok(&next, Event::CycleDue);
    assert_eq!(after, next);
    assert!(actions.is_empty());
    for ev in [Event::StartInitial, Event::Suspend, resync(None)] {
        let r = refused(&next, ev);
        assert!(r.message.contains("replication reverse"), "{r}");
        assert!(r.message.contains("replication remove"), "{r}");
    }
}

#[test]
fn fenced_primary_learns_a_divergence_and_resume_leads_to_resync() {
    let p = primary(State::Replicating, 7);
    let (fenced, _) = ok(&p, told_failed_over());
    let (still, actions) = ok(
        &fenced,
        Event::StorageFailed {
            reason: "tracking lost".into(),
        },
    );
    assert!(matches!(
        &still.state,
        State::FencedAfterFailover { resync: Some(r), .. } if r.contains("tracking lost")
    ));
    assert!(!actions.contains(&Action::Unfence));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::StartCycle { .. } | Action::TakeCut { .. })));
    let (resumed, actions) = ok(&still, Event::Resume);
    assert!(matches!(
        resumed.state,
        State::ResynchronizationRequired { .. }
    ));
    let unfence = actions.iter().position(|a| *a == Action::Unfence).unwrap();
    assert!(persist_index(&actions) < unfence);
    // Without one, resume returns to the state before the fence.
    let (resumed, _) = ok(&fenced, Event::Resume);
    assert_eq!(resumed.state, State::Replicating);
    assert!(resumed.need_hello);
    let ready = primary(State::ReadyForInitialReplication, 0);
    let (fenced, _) = ok(&ready, told_failed_over());
    assert_eq!(
        ok(&fenced, Event::Resume).0.state,
        State::ReadyForInitialReplication
    );
}

#[test]
fn prepared_primary_stays_prepared_when_the_replica_fails_over() {
    let p = primary(
        State::PreparedForFailover {
            seq: Seq(7),
            resync: None,
        },
        7,
    );
    let (next, actions) = ok(&p, told_failed_over());
    assert_eq!(next, p);
    assert!(actions.is_empty());
}

// ---- Auto resynchronization and resync-cancel (issue 11, item 2).

/// 2026-12-03T00:00:00Z plus `h` hours `m` minutes: window tests need a time of day.
fn day_at(h: u64, m: u64) -> u64 {
    (1_796_256_000 + h * 3600 + m * 60) * 1_000_000_000
}

fn auto(window: Option<&str>) -> AutoResync {
    AutoResync::On {
        window: window.map(|w| crate::ResyncWindow::parse(w).unwrap()),
    }
}

fn storage_failed() -> Event {
    Event::StorageFailed {
        reason: "the tracker's state cannot be written".into(),
    }
}

fn with_auto(mut r: Relationship, a: AutoResync) -> Relationship {
    r.auto_resync = a;
    r
}

fn cancel(replica: Option<(u64, Generation)>) -> Event {
    Event::ResyncCancel {
        replica: replica.map(|(s, g)| (Seq(s), g)),
    }
}

#[test]
fn auto_resync_off_leaves_a_divergence_to_the_admin() {
    let (next, actions) = ok(&primary(State::Replicating, 3), storage_failed());
    assert!(matches!(
        next.state,
        State::ResynchronizationRequired { .. }
    ));
    assert_eq!(emitted(&actions), [EventKind::ResyncRequired]);
}

#[test]
fn auto_resync_on_without_a_window_schedules_now_and_the_next_tick_starts_it() {
    let rel = with_auto(primary(State::Replicating, 3), auto(None));
    let (next, actions) = ok(&rel, storage_failed());
    assert_eq!(
        next.state,
        State::WaitingForStartResynchronize {
            reason: Some("the tracker's state cannot be written".into()),
            at_unix_ns: NOW,
        }
    );
    // Logged why first, then that it is scheduled; no scan in this step (a failing scan must
    // not undo the state entered).
    assert_eq!(
        emitted(&actions),
        [EventKind::ResyncRequired, EventKind::ResyncScheduled]
    );
    assert!(!actions.contains(&Action::MarkAllDirty));
    assert!(actions.contains(&Action::CancelCycle));
    let (started, actions) = ok(&next, Event::Tick);
    assert_eq!(
        started.state,
        State::Resynchronizing {
            reason: Some("the tracker's state cannot be written".into())
        }
    );
    assert!(actions.contains(&Action::MarkAllDirty));
}

#[test]
fn auto_resync_with_a_window_outside_it_waits_for_its_next_start() {
    let rel = with_auto(primary(State::Replicating, 3), auto(Some("18:30-06:00")));
    let now = day_at(12, 0);
    let (next, _) = step(&rel, storage_failed(), now).unwrap();
    assert_eq!(
        next.state,
        State::WaitingForStartResynchronize {
            reason: Some("the tracker's state cannot be written".into()),
            at_unix_ns: day_at(18, 30),
        }
    );
    // A tick before then changes nothing; one at the start starts it.
    let (same, actions) = step(&next, Event::Tick, day_at(18, 29)).unwrap();
    assert_eq!(same, next);
    assert!(actions.is_empty());
    let (started, _) = step(&next, Event::Tick, day_at(18, 30)).unwrap();
    assert!(matches!(started.state, State::Resynchronizing { .. }));
}

#[test]
fn auto_resync_with_a_window_inside_it_starts_now() {
    let rel = with_auto(primary(State::Replicating, 3), auto(Some("09:00-17:00")));
    let (next, _) = step(&rel, storage_failed(), day_at(10, 15)).unwrap();
    assert!(matches!(
        next.state,
        State::WaitingForStartResynchronize { at_unix_ns, .. } if at_unix_ns == day_at(10, 15)
    ));
}

#[test]
fn auto_resync_with_a_window_that_wraps_midnight() {
    let rel = with_auto(primary(State::Replicating, 3), auto(Some("22:00-02:00")));
    for (now, at) in [
        (day_at(23, 0), day_at(23, 0)),
        (day_at(1, 59), day_at(1, 59)),
        (day_at(2, 0), day_at(22, 0)),
        (day_at(21, 59), day_at(22, 0)),
    ] {
        let (next, _) = step(&rel, storage_failed(), now).unwrap();
        assert!(
            matches!(next.state, State::WaitingForStartResynchronize { at_unix_ns, .. } if at_unix_ns == at),
            "{now}: {:?}",
            next.state
        );
    }
}

#[test]
fn auto_resync_applies_to_a_divergent_hello_and_a_refusal() {
    let rel = with_auto(primary(State::Replicating, 3), auto(None));
    let (next, _) = ok(&rel, hello(7));
    assert!(matches!(
        next.state,
        State::WaitingForStartResynchronize { .. }
    ));
    let (next, _) = ok(&in_flight(rel, 4), out_of_sequence(4, 2));
    assert!(matches!(
        next.state,
        State::WaitingForStartResynchronize { .. }
    ));
}

#[test]
fn turning_auto_resync_on_schedules_a_required_resync_and_off_keeps_a_scheduled_one() {
    let rel = primary(required(), 3);
    let (next, actions) = ok(&rel, Event::SetAutoResync { auto: auto(None) });
    assert_eq!(next.auto_resync, auto(None));
    assert_eq!(
        next.state,
        State::WaitingForStartResynchronize {
            reason: Some("diverged".into()),
            at_unix_ns: NOW
        }
    );
    assert!(actions.contains(&Action::Persist));
    assert_eq!(emitted(&actions), [EventKind::ResyncScheduled]);
    // Off: stored; what is scheduled stays (resync-cancel stops it).
    let (off, actions) = ok(
        &next,
        Event::SetAutoResync {
            auto: AutoResync::Off,
        },
    );
    assert_eq!(off.auto_resync, AutoResync::Off);
    assert_eq!(off.state, next.state);
    assert!(actions.is_empty());
    // In any other state: only stored.
    let (rep, actions) = ok(
        &primary(State::Replicating, 3),
        Event::SetAutoResync { auto: auto(None) },
    );
    assert_eq!(rep.state, State::Replicating);
    assert!(actions.is_empty());
    // A replica has no say.
    refused(
        &replica(State::Replicating, 3),
        Event::SetAutoResync { auto: auto(None) },
    );
}

#[test]
fn auto_resync_after_a_cancelled_prepare_and_a_fence_that_ends() {
    let rel = with_auto(
        primary(
            State::PreparedForFailover {
                seq: Seq(3),
                resync: Some("diverged".into()),
            },
            3,
        ),
        auto(None),
    );
    let (next, _) = ok(&rel, Event::Resume);
    assert!(matches!(
        next.state,
        State::WaitingForStartResynchronize { .. }
    ));
    let rel = with_auto(
        primary(
            State::FencedAfterFailover {
                reason: "failed over".into(),
                resume_to: Resumable::Replicating,
                resync: Some("diverged".into()),
            },
            3,
        ),
        auto(None),
    );
    let (next, actions) = ok(&rel, Event::Resume);
    assert!(matches!(
        next.state,
        State::WaitingForStartResynchronize { .. }
    ));
    assert!(actions.contains(&Action::Unfence));
}

#[test]
fn resync_cancel_from_resynchronizing_goes_back_to_required_with_the_reason() {
    let rel = in_flight(
        primary(
            State::Resynchronizing {
                reason: Some("diverged".into()),
            },
            3,
        ),
        4,
    );
    let (next, actions) = ok(&rel, cancel(Some((3, G))));
    assert_eq!(next.state, required());
    assert_eq!(next.progress.inflight_seq, None);
    assert_eq!(next.progress.last_seq, Seq(3));
    assert!(actions.contains(&Action::CancelCycle));
    assert!(persist_index(&actions) < actions.len());
    assert_eq!(emitted(&actions), [EventKind::ResyncCancelled]);
    // The replica could not be asked: cancelled all the same.
    let (next, _) = ok(&rel, cancel(None));
    assert_eq!(next.state, required());
}

#[test]
fn resync_cancel_from_waiting_and_from_suspended_while_resynchronizing() {
    let waiting = primary(
        State::WaitingForStartResynchronize {
            reason: Some("diverged".into()),
            at_unix_ns: NOW + 100,
        },
        3,
    );
    assert_eq!(ok(&waiting, cancel(None)).0.state, required());
    let suspended = primary(suspended(Resumable::Resynchronizing), 3);
    let (next, _) = ok(&suspended, cancel(Some((3, G))));
    assert!(matches!(
        next.state,
        State::ResynchronizationRequired { ref reason } if reason.contains("cancelled")
    ));
    // A resync the admin forced (no reason) is still required after a cancel, with why.
    let forced = primary(State::Resynchronizing { reason: None }, 3);
    assert!(matches!(
        ok(&forced, cancel(None)).0.state,
        State::ResynchronizationRequired { .. }
    ));
}

#[test]
fn resync_cancel_with_auto_on_does_not_start_it_again() {
    let rel = with_auto(
        primary(
            State::Resynchronizing {
                reason: Some("diverged".into()),
            },
            3,
        ),
        auto(None),
    );
    let (next, actions) = ok(&rel, cancel(None));
    assert_eq!(next.state, required());
    assert!(!emitted(&actions).contains(&EventKind::ResyncScheduled));
    let (same, _) = ok(&next, Event::Tick);
    assert_eq!(same.state, required());
}

#[test]
fn resync_cancel_after_the_full_point_committed_adopts_it() {
    let rel = in_flight(
        primary(
            State::Resynchronizing {
                reason: Some("diverged".into()),
            },
            3,
        ),
        4,
    );
    let (next, actions) = ok(&rel, cancel(Some((4, G))));
    assert_eq!(next.state, State::Replicating);
    assert_eq!(next.progress.last_seq, Seq(4));
    assert_eq!(next.progress.last_cut_unix_ns, Some(NOW));
    assert!(emitted(&actions).contains(&EventKind::ResyncDone));
    // Another generation's point 4 is not this resynchronization's.
    let (next, _) = ok(&rel, cancel(Some((4, Generation(2)))));
    assert_eq!(next.state, required());
    // Suspended while its last upload committed: adopted, and still suspended.
    let mut suspended_rel = rel.clone();
    suspended_rel.state = suspended(Resumable::Resynchronizing);
    let (next, _) = ok(&suspended_rel, cancel(Some((4, G))));
    assert_eq!(next.state, suspended(Resumable::Replicating));
    assert_eq!(next.progress.last_seq, Seq(4));
}

#[test]
fn resync_cancel_is_refused_in_one_line_when_no_resync_runs() {
    for state in [
        State::Replicating,
        required(),
        State::ReadyForInitialReplication,
        State::InitialReplicationInProgress,
        suspended(Resumable::Replicating),
        State::PreparedForFailover {
            seq: Seq(3),
            resync: None,
        },
        State::FailedOver,
    ] {
        let r = refused(&primary(state.clone(), 3), cancel(None));
        assert_eq!(r.kind, RefusalKind::Conflict, "{state:?}");
        assert!(
            r.message
                .contains("no resynchronization of web is running or scheduled")
                && !r.message.contains('\n'),
            "{state:?}: {}",
            r.message
        );
    }
    let r = refused(
        &replica(State::Resynchronizing { reason: None }, 3),
        cancel(None),
    );
    assert_eq!(r.kind, RefusalKind::Invalid);
}

#[test]
fn fenced_primary_with_auto_resync_keeps_the_divergence_for_when_the_fence_ends() {
    let rel = with_auto(
        primary(
            State::FencedAfterFailover {
                reason: "failed over".into(),
                resume_to: Resumable::Replicating,
                resync: None,
            },
            3,
        ),
        auto(None),
    );
    let (next, _) = ok(&rel, storage_failed());
    assert!(matches!(
        next.state,
        State::FencedAfterFailover {
            resync: Some(_),
            ..
        }
    ));
    let (resumed, _) = ok(&next, Event::Resume);
    assert!(matches!(
        resumed.state,
        State::WaitingForStartResynchronize { .. }
    ));
}

/// A refusal of an earlier cycle arriving late, naming the same point number as the upload in
/// flight (numbers come round again after a resynchronization moved `last_seq` back), says
/// nothing about where the replica stands: only the refusal of the cut in flight is judged.
#[test]
fn late_refusal_of_an_earlier_cycle_with_the_same_point_number_is_not_judged() {
    let r = in_flight(primary(State::Replicating, 19), 20);
    let late = Event::CycleFailed {
        seq: Seq(20),
        error: "out of sequence: expected 15, got 20".into(),
        refusal: Some(PeerRefusalFacts {
            expected_seq: Some(Seq(15)),
            cut_unix_ns: Some(NOW - 1),
            failed_over: false,
            needs_resync: true,
            error: "out of sequence: expected 15, got 20".into(),
        }),
    };
    let (next, _) = ok(&r, late);
    assert_eq!(next.state, State::Replicating);
    assert!(
        next.need_hello,
        "the next hello asks where the replica stands"
    );
    // The same refusal of the cut in flight is judged.
    let (next, _) = ok(&r, out_of_sequence(20, 15));
    assert!(matches!(
        next.state,
        State::ResynchronizationRequired { .. }
    ));
}

fn hello_cut(latest: u64, cut: u64) -> Event {
    Event::HelloAnswered {
        latest_seq: Seq(latest),
        latest_cut_unix_ns: Some(cut),
        generation: G,
        damage: None,
    }
}

/// An ordinary cycle's upload of point 6 lands on the replica just after a resynchronization
/// started and cut its own point 6: the replica's point 6 is not the Full one, so it never
/// ends the resynchronization; it becomes the base of the Full point 7.
#[test]
fn a_point_of_an_earlier_cut_never_ends_a_resynchronization() {
    let reason = State::Resynchronizing { reason: None };
    let r = in_flight(primary(reason.clone(), 5), 6);
    let (next, actions) = ok(&r, hello_cut(6, NOW - 1_000_000));
    assert_eq!(next.state, reason, "{actions:?}");
    assert_eq!(next.progress.last_seq, Seq(6));
    assert_eq!(next.progress.last_cut_unix_ns, Some(NOW - 1_000_000));
    assert_eq!(next.progress.inflight_seq, None);
    assert!(
        !emitted(&actions).contains(&EventKind::ResyncDone),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::TakeCut {
        seq: Seq(7),
        kind: CycleKind::Full
    }));
    // The same cut: it is the Full point, whose answer was lost; the resynchronization is
    // done.
    let (next, actions) = ok(&r, hello_cut(6, NOW));
    assert_eq!(next.state, State::Replicating);
    assert!(emitted(&actions).contains(&EventKind::ResyncDone));
    // An ordinary cycle: the earlier attempt's point is taken as the base, the next point
    // follows it.
    let r = in_flight(primary(State::Replicating, 5), 6);
    let (next, actions) = ok(&r, hello_cut(6, NOW - 1));
    assert_eq!(next.state, State::Replicating);
    assert_eq!(next.progress.last_seq, Seq(6));
    assert!(actions.contains(&Action::TakeCut {
        seq: Seq(7),
        kind: CycleKind::Incremental
    }));
}
