//! Model tests of the relationship core: random event sequences (proptest) and a breadth-first
//! search over a finite event alphabet.
//!
//! The random sequences play the daemon honestly (a cut is taken only when the core said
//! `TakeCut`, a cycle starts only when none runs) and the replica arbitrarily (any hello
//! answer, any commit answer, any refusal, at any time). The test keeps its own record of
//! reality, the "ghost divergence": set whenever it tells the core something that means the
//! replica diverged (a divergent hello answer, a divergent refusal, damage, a storage
//! failure), cleared only when a `Full` point cut after that divergence commits.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use proptest::prelude::*;
use proto::{Generation, Health, ReplicationState, Seq, VmName};
use relationship::{
    health, step, Action, AutoResync, CycleKind, Event, HealthFacts, PeerRefusalFacts,
    Relationship, RelationshipRecord, Resumable, Role, State,
};

const T0: u64 = 1_000_000_000_000;
const SEC: u64 = 1_000_000_000;
const G: Generation = Generation(1);

fn web() -> VmName {
    VmName::parse("web").unwrap()
}

/// One random move: a command, a daemon fact, or a replica answer. Numbers are offsets from
/// where the relationship stands, so interesting answers (in sync, adoptable, off by a few)
/// are likely.
#[derive(Debug, Clone)]
enum Op {
    StartInitial,
    Suspend,
    Resume,
    Resynchronize {
        in_secs: Option<u8>,
    },
    Advance {
        secs: u8,
    },
    CycleDue,
    Hello {
        offset: i8,
        other_generation: bool,
        damaged: bool,
    },
    Cut {
        off_by: i8,
    },
    Committed {
        inflight: bool,
        offset: i8,
    },
    Failed {
        current: bool,
        refusal: Option<(Option<i8>, bool)>,
    },
    StorageFailed,
    Restarted,
    ReplicaEvent,
    /// `failover prepare`: the host says point `last_seq + offset` committed while fenced.
    Prepared {
        offset: i8,
    },
    /// A failover command on the primary (refused, except `failover stop` cancelling a
    /// prepare).
    Failover {
        which: u8,
        test: bool,
    },
    /// The replica host says it failed the VM over (`failed_over`): as a fact, or as the
    /// refusal of the running cycle.
    ReplicaFailedOver {
        via_cycle: bool,
    },
    /// `replication set --auto-resynchronize on|off [--resynchronize-window]`: `None` off;
    /// `Some(None)` on at any time; `Some(Some(h))` on in a two-hour window from hour `h` UTC.
    SetAutoResync {
        auto: Option<Option<u8>>,
    },
    /// `replication resync-cancel`: the replica's newest point after the upload stopped, as
    /// an offset from `last_seq` (`None`: not reachable).
    ResyncCancel {
        answer: Option<i8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::StartInitial),
        1 => Just(Op::Suspend),
        1 => Just(Op::Resume),
        1 => proptest::option::of(0u8..60).prop_map(|in_secs| Op::Resynchronize { in_secs }),
        1 => (0u8..60).prop_map(|secs| Op::Advance { secs }),
        4 => Just(Op::CycleDue),
        4 => (prop_oneof![4 => Just(0i8), 3 => Just(1i8), 2 => -3i8..4], prop::bool::weighted(0.05), prop::bool::weighted(0.05))
            .prop_map(|(offset, other_generation, damaged)| Op::Hello { offset, other_generation, damaged }),
        4 => prop_oneof![6 => Just(0i8), 1 => -2i8..3].prop_map(|off_by| Op::Cut { off_by }),
        4 => (prop::bool::weighted(0.8), -2i8..3).prop_map(|(inflight, offset)| Op::Committed { inflight, offset }),
        2 => (prop::bool::weighted(0.8), proptest::option::of((proptest::option::of(-3i8..4), any::<bool>())))
            .prop_map(|(current, refusal)| Op::Failed { current, refusal }),
        1 => Just(Op::StorageFailed),
        1 => Just(Op::Restarted),
        1 => Just(Op::ReplicaEvent),
        2 => prop_oneof![4 => Just(0i8), 1 => -1i8..2].prop_map(|offset| Op::Prepared { offset }),
        1 => (0u8..3, any::<bool>()).prop_map(|(which, test)| Op::Failover { which, test }),
        1 => any::<bool>().prop_map(|via_cycle| Op::ReplicaFailedOver { via_cycle }),
        1 => proptest::option::of(proptest::option::of(0u8..24)).prop_map(|auto| Op::SetAutoResync { auto }),
        2 => proptest::option::of(prop_oneof![3 => Just(0i8), 3 => Just(1i8), 1 => -1i8..3])
            .prop_map(|answer| Op::ResyncCancel { answer }),
    ]
}

fn auto_of(auto: Option<Option<u8>>) -> AutoResync {
    match auto {
        None => AutoResync::Off,
        Some(hour) => AutoResync::On {
            window: hour.map(|h| {
                let start = u16::from(h) * 60;
                relationship::ResyncWindow::new(start, (start + 120) % (24 * 60)).unwrap()
            }),
        },
    }
}

fn failover_event(which: u8, test: bool, point: Seq) -> Event {
    match which {
        0 => Event::FailoverStart { point, test },
        1 => Event::FailoverStop { test },
        _ => Event::FailoverComplete,
    }
}

/// Commands (refusable): from the API. The other events are facts.
fn is_command(event: &Event) -> bool {
    matches!(
        event,
        Event::StartInitial
            | Event::StartInitialFromExisting
            | Event::ScheduleInitial { .. }
            | Event::InitialMediaWritten { .. }
            | Event::Suspend
            | Event::Resume
            | Event::Resynchronize { .. }
            | Event::FailoverStart { .. }
            | Event::FailoverStop { .. }
            | Event::FailoverComplete
            | Event::Prepared { .. }
            | Event::SetAutoResync { .. }
            | Event::ResyncCancel { .. }
    )
}

/// A relationship's state as a test asserts on it: `accepts_deltas` is false exactly in the
/// two states of a failover that is not a test, and a test never runs over a failover state.
fn check_state(rel: &Relationship) -> Result<(), TestCaseError> {
    let failed_over = matches!(
        rel.state,
        State::FailedOverWaitingCompletion { .. } | State::FailedOver
    );
    prop_assert_eq!(rel.state.accepts_deltas(), !failed_over, "{:?}", rel.state);
    if let State::TestFailoverInProgress { underlying, .. } = &rel.state {
        prop_assert!(
            !matches!(
                **underlying,
                State::TestFailoverInProgress { .. }
                    | State::FailedOverWaitingCompletion { .. }
                    | State::FailedOver
            ),
            "{:?}",
            rel.state
        );
    }
    Ok(())
}

/// The record of `rel` round-trips through JSON.
fn check_round_trip(rel: &Relationship) -> Result<(), TestCaseError> {
    let json = serde_json::to_string(&rel.to_record()).unwrap();
    let back =
        Relationship::from_record(web(), RelationshipRecord::from_json(&web(), &json).unwrap())
            .unwrap();
    let mut expect = rel.clone();
    expect.need_hello = true;
    expect.inflight_cut_unix_ns = None;
    // A setting of the VM's replication, not of the record: the host restores it.
    expect.auto_resync = AutoResync::Off;
    prop_assert_eq!(back, expect);
    Ok(())
}

fn add(seq: Seq, offset: i8) -> Seq {
    Seq(seq.get().saturating_add_signed(i64::from(offset)))
}

/// The test's side: the daemon's cycle and the reality behind the answers.
struct Harness {
    rel: Relationship,
    now: u64,
    cycle_running: bool,
    /// What the core said to cut in the running cycle.
    plan: Option<(Seq, CycleKind)>,
    /// Cuts the core accepted, with the divergence epoch they were taken in.
    cuts: HashMap<Seq, (CycleKind, u64)>,
    ghost: bool,
    epoch: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            rel: Relationship::new(web(), Role::Primary, G),
            now: T0,
            cycle_running: false,
            plan: None,
            cuts: HashMap::new(),
            ghost: false,
            epoch: 0,
        }
    }

    fn diverge(&mut self) {
        self.ghost = true;
        self.epoch += 1;
    }

    /// The replica holds `seq`: if it is a Full point cut after the divergence, it repaired it.
    fn replica_holds(&mut self, seq: Seq) {
        if self.cuts.get(&seq) == Some(&(CycleKind::Full, self.epoch)) {
            self.ghost = false;
        }
    }

    fn event_of(&mut self, op: &Op) -> Option<Event> {
        let p = self.rel.progress.clone();
        Some(match *op {
            Op::StartInitial => Event::StartInitial,
            Op::Suspend => Event::Suspend,
            Op::Resume => Event::Resume,
            Op::Resynchronize { in_secs } => Event::Resynchronize {
                at_unix_ns: in_secs.map(|s| self.now + u64::from(s) * SEC),
                reason: None,
            },
            Op::Advance { secs } => {
                self.now += u64::from(secs) * SEC;
                Event::Tick
            }
            Op::CycleDue if self.cycle_running => return None,
            Op::CycleDue => Event::CycleDue,
            Op::Hello {
                offset,
                other_generation,
                damaged,
            } => {
                let latest = add(p.last_seq, offset);
                let generation = if other_generation { Generation(2) } else { G };
                let in_sync = latest == p.last_seq
                    || (p.inflight_seq == Some(latest) && latest == p.last_seq.next());
                if damaged || other_generation || !in_sync {
                    self.diverge();
                } else {
                    self.replica_holds(latest);
                }
                Event::HelloAnswered {
                    latest_seq: latest,
                    latest_cut_unix_ns: None,
                    generation,
                    damage: damaged.then(|| "a journal block fails its checksum".to_string()),
                }
            }
            Op::Cut { off_by } => {
                let (seq, _) = self.plan?;
                self.now += 1;
                Event::CutTaken {
                    seq: add(seq, off_by),
                    cut_unix_ns: self.now,
                }
            }
            Op::Committed { inflight, offset } => {
                let (seq, cut_unix_ns) = match (inflight, p.inflight_seq) {
                    (true, Some(s)) => (s, self.rel.inflight_cut_unix_ns.unwrap_or(self.now)),
                    _ => (add(p.last_seq, offset), self.now),
                };
                self.replica_holds(seq);
                self.cycle_running = false;
                self.plan = None;
                Event::Committed {
                    seq,
                    cut_unix_ns,
                    app_consistent: false,
                }
            }
            Op::Failed { current, refusal } => {
                let seq = if current {
                    p.last_seq.next()
                } else {
                    p.last_seq
                };
                // An upload's refusal names its cut: the one in flight when `current`.
                let cut = if current {
                    self.rel.inflight_cut_unix_ns
                } else {
                    None
                };
                let refusal = refusal.map(|(expected, needs_resync)| PeerRefusalFacts {
                    expected_seq: expected.map(|o| add(seq, o)),
                    cut_unix_ns: cut,
                    failed_over: false,
                    needs_resync,
                    error: "refused".into(),
                });
                if let Some(r) = &refusal {
                    let delivered =
                        r.expected_seq == Some(seq.next()) && p.inflight_seq == Some(seq);
                    // Only an upload's refusal says where the replica stands: its point is in
                    // flight (a refusal of a point not in flight is a late one).
                    if r.needs_resync
                        && seq == p.last_seq.next()
                        && p.inflight_seq == Some(seq)
                        && r.cut_unix_ns.is_some()
                        && !delivered
                    {
                        self.diverge();
                    }
                }
                self.cycle_running = false;
                self.plan = None;
                Event::CycleFailed {
                    seq,
                    error: "refused".into(),
                    refusal,
                }
            }
            Op::StorageFailed => {
                self.diverge();
                Event::StorageFailed {
                    reason: "the tracker's state file cannot be written".into(),
                }
            }
            Op::Restarted => {
                // The daemon restarts: the cycle is gone, the relationship is reloaded.
                self.cycle_running = false;
                self.plan = None;
                let rec = self.rel.to_record();
                let auto = self.rel.auto_resync;
                self.rel = Relationship::from_record(web(), rec).unwrap();
                // The host sets it again from the VM's replication settings.
                self.rel.auto_resync = auto;
                Event::Restarted
            }
            Op::ReplicaEvent => Event::DeltaStarted {
                kind: CycleKind::Full,
            },
            Op::Prepared { offset } => Event::Prepared {
                seq: add(p.last_seq, offset),
            },
            Op::Failover { which, test } => failover_event(which, test, p.last_seq),
            Op::ReplicaFailedOver { via_cycle: false } => Event::ReplicaFailedOver {
                reason: "web is FailedOver on its replica host".into(),
            },
            Op::SetAutoResync { auto } => Event::SetAutoResync {
                auto: auto_of(auto),
            },
            Op::ResyncCancel { answer } => {
                // The host stopped the upload in flight before asking: the cycle is gone.
                let replica = answer.map(|o| (add(p.last_seq, o), G));
                let resyncing = matches!(
                    self.rel.state,
                    State::Resynchronizing { .. }
                        | State::WaitingForStartResynchronize { .. }
                        | State::Suspended {
                            resume_to: Resumable::Resynchronizing
                        }
                );
                // What the answer says of the replica counts only if the cancel is taken.
                if let (Some((latest, _)), true) = (replica, resyncing) {
                    if p.inflight_seq == Some(latest) && latest == p.last_seq.next() {
                        self.replica_holds(latest);
                    } else if latest != p.last_seq {
                        self.diverge();
                    }
                }
                Event::ResyncCancel { replica }
            }
            Op::ReplicaFailedOver { via_cycle: true } => Event::CycleFailed {
                seq: p.last_seq.next(),
                error: "web is FailedOver on its replica host".into(),
                refusal: Some(PeerRefusalFacts {
                    expected_seq: None,
                    cut_unix_ns: None,
                    failed_over: true,
                    needs_resync: false,
                    error: "web is FailedOver on its replica host".into(),
                }),
            },
        })
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let Some(event) = self.event_of(op) else {
            return Ok(());
        };
        let command = is_command(&event) || matches!(event, Event::DeltaStarted { .. });
        let before = self.rel.clone();
        match step(&before, event.clone(), self.now) {
            Err(refusal) => {
                // (a) Only commands are refused, in one line, and the same again: a refused
                // command changes nothing (the daemon keeps `before`).
                prop_assert!(command, "fact {event:?} refused: {refusal}");
                prop_assert!(!refusal.message.is_empty() && !refusal.message.contains('\n'));
                prop_assert_eq!(step(&before, event, self.now).unwrap_err(), refusal);
            }
            Ok((next, actions)) => {
                // Every change of the durable record is persisted.
                if next.to_record() != before.to_record() {
                    prop_assert!(
                        actions.contains(&Action::Persist),
                        "{event:?}: {before:?} -> {next:?} without Persist: {actions:?}"
                    );
                }
                // (c) last_seq goes back only by the documented resync adoption.
                if next.progress.last_seq < before.progress.last_seq {
                    prop_assert!(
                        matches!(before.state, State::Resynchronizing { .. })
                            && matches!(event, Event::HelloAnswered { .. }),
                        "last_seq went back on {event:?}: {before:?} -> {next:?}"
                    );
                }
                // (e) Fenced after a failover elsewhere: nothing ships for this generation,
                // and only `resume` (which the host runs after the replica answered again)
                // leaves it, lifting the fence.
                if matches!(before.state, State::FencedAfterFailover { .. }) {
                    prop_assert!(
                        !actions.iter().any(|a| matches!(
                            a,
                            Action::StartCycle { .. } | Action::TakeCut { .. }
                        )),
                        "{event:?} shipped while fenced: {actions:?}"
                    );
                    if !matches!(next.state, State::FencedAfterFailover { .. }) {
                        prop_assert_eq!(&event, &Event::Resume);
                        prop_assert!(actions.contains(&Action::Unfence));
                    }
                }
                if matches!(next.state, State::FencedAfterFailover { .. })
                    && !matches!(before.state, State::FencedAfterFailover { .. })
                {
                    prop_assert!(actions.contains(&Action::Fence), "{actions:?}");
                }
                // (f) A cancel leaves the resynchronization required, unless the replica
                // said its point had committed (then adopted: nothing to cancel).
                if let Event::ResyncCancel { replica } = &event {
                    let adopted = replica
                        .is_some_and(|(latest, _)| before.progress.inflight_seq == Some(latest));
                    match &next.state {
                        State::ResynchronizationRequired { .. } => {}
                        State::Replicating
                        | State::Suspended {
                            resume_to: Resumable::Replicating,
                        } if adopted => {}
                        other => prop_assert!(false, "cancel led to {other:?} from {before:?}"),
                    }
                    prop_assert!(actions.contains(&Action::CancelCycle));
                }
                // (g) With auto-resynchronize on, a primary never waits for an admin: a fact
                // that makes the resynchronization required schedules it in the same step.
                if before.role == Role::Primary
                    && next.auto_resync != AutoResync::Off
                    && !matches!(event, Event::ResyncCancel { .. })
                    && matches!(next.state, State::ResynchronizationRequired { .. })
                    && !matches!(before.state, State::ResynchronizationRequired { .. })
                {
                    prop_assert!(
                        false,
                        "{event:?} left {before:?} waiting for an admin: {next:?}"
                    );
                }
                if let State::WaitingForStartResynchronize { at_unix_ns, .. } = next.state {
                    if !matches!(before.state, State::WaitingForStartResynchronize { .. }) {
                        // Scheduled in the future only by `--at` or a window.
                        prop_assert!(at_unix_ns >= self.now, "scheduled in the past: {next:?}");
                    }
                }
                for a in &actions {
                    match a {
                        Action::StartCycle { .. } => {
                            self.cycle_running = true;
                            self.plan = None;
                        }
                        Action::TakeCut { seq, kind } => {
                            prop_assert_eq!(*seq, next.progress.last_seq.next());
                            self.plan = Some((*seq, *kind));
                        }
                        Action::CancelCycle => {
                            self.cycle_running = false;
                            self.plan = None;
                        }
                        _ => {}
                    }
                }
                if let Event::CutTaken { seq, .. } = event {
                    if next.progress.inflight_seq == Some(seq) && actions == [Action::Persist] {
                        let (_, kind) = self.plan.expect("a cut is only taken with a plan");
                        self.cuts.insert(seq, (kind, self.epoch));
                    }
                }
                self.rel = next;
            }
        }
        // (b) Never Normal while the replica may have diverged.
        let (h, why) = health(
            &self.rel,
            &HealthFacts {
                frequency_secs: 30,
                ..HealthFacts::default()
            },
            self.now,
        );
        if matches!(self.rel.state, State::FencedAfterFailover { .. }) {
            prop_assert_eq!(h, Health::Critical);
        }
        if self.ghost {
            prop_assert!(
                h != Health::Normal,
                "Normal health after a divergence: {:?} ({why:?})",
                self.rel
            );
        }
        // (d) The record round-trips through JSON.
        check_round_trip(&self.rel)?;
        check_state(&self.rel)?;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_keep_the_invariants(ops in prop::collection::vec(op(), 1..120)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op)?;
        }
    }
}

/// One random move on the replica host: a hello, a delta, a failover command, and after a
/// completed failover (this host is the primary) a replication command or fact.
#[derive(Debug, Clone)]
enum ReplicaOp {
    Hello {
        state: usize,
        offset: i8,
        other_generation: bool,
    },
    DeltaStarted {
        kind: usize,
    },
    DeltaCommitted {
        kind: usize,
    },
    Diverged,
    Restarted,
    FailoverStart {
        back: u8,
        test: bool,
    },
    FailoverStop {
        test: bool,
    },
    FailoverComplete,
    Primary {
        which: u8,
    },
}

const KINDS: [CycleKind; 3] = [CycleKind::Initial, CycleKind::Incremental, CycleKind::Full];

const PRIMARY_STATES: [Option<ReplicationState>; 14] = [
    None,
    Some(ReplicationState::ReadyForInitialReplication),
    Some(ReplicationState::InitialReplicationInProgress),
    Some(ReplicationState::Replicating),
    Some(ReplicationState::Suspended),
    Some(ReplicationState::ResynchronizationRequired),
    Some(ReplicationState::WaitingForStartResynchronize),
    Some(ReplicationState::Resynchronizing),
    Some(ReplicationState::Replica),
    Some(ReplicationState::TestFailoverInProgress),
    Some(ReplicationState::FailedOverWaitingCompletion),
    Some(ReplicationState::FailedOver),
    Some(ReplicationState::PreparedForFailover),
    Some(ReplicationState::Replicating),
];

fn replica_op() -> impl Strategy<Value = ReplicaOp> {
    prop_oneof![
        4 => (0..PRIMARY_STATES.len(), prop_oneof![4 => Just(0i8), 1 => -1i8..2], prop::bool::weighted(0.05))
            .prop_map(|(state, offset, other_generation)| ReplicaOp::Hello { state, offset, other_generation }),
        1 => (0..KINDS.len()).prop_map(|kind| ReplicaOp::DeltaStarted { kind }),
        4 => prop_oneof![4 => Just(1usize), 1 => 0..KINDS.len()].prop_map(|kind| ReplicaOp::DeltaCommitted { kind }),
        1 => Just(ReplicaOp::Diverged),
        1 => Just(ReplicaOp::Restarted),
        3 => (0u8..3, any::<bool>()).prop_map(|(back, test)| ReplicaOp::FailoverStart { back, test }),
        2 => any::<bool>().prop_map(|test| ReplicaOp::FailoverStop { test }),
        1 => Just(ReplicaOp::FailoverComplete),
        1 => (0u8..8).prop_map(|which| ReplicaOp::Primary { which }),
    ]
}

/// The replica host's side: its relationship, and the same replica's relationship as it
/// would be without the test failover that is running (fed the same facts, no failover).
struct ReplicaHarness {
    rel: Relationship,
    now: u64,
    without_test: Option<Relationship>,
}

impl ReplicaHarness {
    fn event_of(&mut self, op: &ReplicaOp) -> Event {
        let last = self.rel.progress.last_seq;
        match *op {
            ReplicaOp::Hello {
                state,
                offset,
                other_generation,
            } => Event::HelloReceived {
                primary_state: PRIMARY_STATES[state],
                generation: if other_generation { Generation(2) } else { G },
                latest_seq: add(last, offset),
            },
            ReplicaOp::DeltaStarted { kind } => Event::DeltaStarted { kind: KINDS[kind] },
            ReplicaOp::DeltaCommitted { kind } => {
                self.now += SEC;
                Event::DeltaCommitted {
                    seq: last.next(),
                    kind: KINDS[kind],
                    cut_unix_ns: self.now,
                }
            }
            ReplicaOp::Diverged => Event::Diverged {
                reason: "a journal block fails its checksum".into(),
            },
            ReplicaOp::Restarted => {
                fn reload(r: &Relationship) -> Relationship {
                    Relationship::from_record(web(), r.to_record()).unwrap()
                }
                self.rel = reload(&self.rel);
                self.without_test = self.without_test.as_ref().map(reload);
                Event::Restarted
            }
            ReplicaOp::FailoverStart { back, test } => Event::FailoverStart {
                point: Seq(last.get().saturating_sub(u64::from(back))),
                test,
            },
            ReplicaOp::FailoverStop { test } => Event::FailoverStop { test },
            ReplicaOp::FailoverComplete => Event::FailoverComplete,
            ReplicaOp::Primary { which } => match which {
                0 => Event::StartInitial,
                1 => Event::Suspend,
                2 => Event::Resume,
                3 => Event::Resynchronize {
                    at_unix_ns: None,
                    reason: None,
                },
                4 => Event::Prepared { seq: last },
                5 => Event::CycleDue,
                6 => Event::HelloAnswered {
                    latest_seq: last,
                    latest_cut_unix_ns: None,
                    generation: G,
                    damage: None,
                },
                _ => Event::StorageFailed {
                    reason: "lost".into(),
                },
            },
        }
    }

    fn apply(&mut self, op: &ReplicaOp) -> Result<(), TestCaseError> {
        let event = self.event_of(op);
        let before = self.rel.clone();
        let replica_fact = matches!(
            event,
            Event::HelloReceived { .. }
                | Event::DeltaStarted { .. }
                | Event::DeltaCommitted { .. }
                | Event::Diverged { .. }
        );
        let primary_fact = matches!(
            event,
            Event::CycleDue
                | Event::HelloAnswered { .. }
                | Event::CutTaken { .. }
                | Event::Committed { .. }
                | Event::CycleFailed { .. }
        );
        let may_refuse = is_command(&event)
            || (replica_fact && before.role == Role::Primary)
            || (primary_fact && before.role == Role::Replica);
        match step(&before, event.clone(), self.now) {
            Err(refusal) => {
                prop_assert!(may_refuse, "{event:?} refused in {before:?}: {refusal}");
                prop_assert!(!refusal.message.is_empty() && !refusal.message.contains('\n'));
                prop_assert_eq!(step(&before, event, self.now).unwrap_err(), refusal);
            }
            Ok((next, actions)) => {
                if next.to_record() != before.to_record() {
                    prop_assert!(
                        actions.contains(&Action::Persist),
                        "{event:?}: {before:?} -> {next:?} without Persist: {actions:?}"
                    );
                }
                if let Event::FailoverStop { .. } = event {
                    prop_assert!(next.state.accepts_deltas(), "{before:?} -> {next:?}");
                }
                match (&event, &next.state) {
                    (Event::FailoverStart { test: true, .. }, _) => {
                        // A test failover changes nothing of the replica's points.
                        prop_assert_eq!(&next.progress, &before.progress);
                        self.without_test = Some(before.clone());
                    }
                    (Event::FailoverStop { test: true }, _) => {
                        prop_assert_eq!(&next.progress, &before.progress);
                        let without = self.without_test.take().expect("a test was running");
                        prop_assert_eq!(&next.state, &without.state);
                        prop_assert_eq!(&next.progress, &without.progress);
                    }
                    (_, State::TestFailoverInProgress { underlying, .. }) => {
                        // Replication goes on beside the test exactly as without it.
                        let mut without = self.without_test.take().expect("a test was running");
                        if !is_command(&event) {
                            if let Ok((w, _)) = step(&without, event.clone(), self.now) {
                                without = w;
                            }
                        }
                        prop_assert_eq!(&**underlying, &without.state);
                        prop_assert_eq!(&next.progress, &without.progress);
                        self.without_test = Some(without);
                    }
                    _ => self.without_test = None,
                }
                self.rel = next;
            }
        }
        check_state(&self.rel)?;
        check_round_trip(&self.rel)?;
        if matches!(
            self.rel.state,
            State::FailedOverWaitingCompletion { .. }
                | State::FailedOver
                | State::PreparedForFailover { .. }
        ) {
            let (h, _) = health(&self.rel, &HealthFacts::default(), self.now);
            prop_assert!(h != Health::Normal, "{:?}", self.rel.state);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_failover_sequences_on_the_replica_keep_the_invariants(
        ops in prop::collection::vec(replica_op(), 1..120)
    ) {
        let mut h = ReplicaHarness {
            rel: Relationship::new(web(), Role::Replica, G),
            now: T0,
            without_test: None,
        };
        for op in &ops {
            h.apply(op)?;
        }
    }
}

fn name_of(s: &State) -> String {
    match s {
        State::Suspended { resume_to } => format!("Suspended({resume_to:?})"),
        other => format!("{:?}", other.name()),
    }
}

/// Every state, each `Suspended` with each place to resume to.
fn every_state_name() -> BTreeSet<String> {
    let mut all: BTreeSet<String> = [
        State::ReadyForInitialReplication,
        State::InitialReplicationInProgress,
        State::Replicating,
        State::ResynchronizationRequired {
            reason: String::new(),
        },
        State::WaitingForStartResynchronize {
            reason: None,
            at_unix_ns: 0,
        },
        State::Resynchronizing { reason: None },
        State::TestFailoverInProgress {
            point: Seq(1),
            underlying: Box::new(State::Replicating),
        },
        State::FailedOverWaitingCompletion { point: Seq(1) },
        State::FailedOver,
        State::PreparedForFailover {
            seq: Seq(1),
            resync: None,
        },
        State::FencedAfterFailover {
            reason: String::new(),
            resume_to: Resumable::Replicating,
            resync: None,
        },
    ]
    .iter()
    .map(name_of)
    .collect();
    for r in [
        Resumable::ReadyForInitialReplication,
        Resumable::InitialReplicationInProgress,
        Resumable::Replicating,
        Resumable::Resynchronizing,
    ] {
        all.insert(name_of(&State::Suspended { resume_to: r }));
    }
    all
}

fn bfs(start: Relationship, alphabet: &[(Event, u64)]) -> BTreeSet<String> {
    let mut seen = HashSet::new();
    let mut names = BTreeSet::new();
    let mut queue = VecDeque::from([start.clone()]);
    seen.insert(start);
    while let Some(rel) = queue.pop_front() {
        names.insert(name_of(&rel.state));
        for (event, now) in alphabet {
            if let Ok((next, _)) = step(&rel, event.clone(), *now) {
                if seen.insert(next.clone()) {
                    queue.push_back(next);
                }
            }
        }
    }
    names
}

#[test]
fn every_state_is_reachable_from_ready_for_initial_replication() {
    let mut alphabet = vec![
        (Event::StartInitial, T0),
        (Event::Suspend, T0),
        (Event::Resume, T0),
        (
            Event::Resynchronize {
                at_unix_ns: None,
                reason: None,
            },
            T0,
        ),
        (
            Event::Resynchronize {
                at_unix_ns: Some(T0 + 50 * SEC),
                reason: None,
            },
            T0,
        ),
        (Event::Tick, T0 + 100 * SEC),
        (Event::ResyncCancel { replica: None }, T0),
        (
            Event::SetAutoResync {
                auto: AutoResync::On { window: None },
            },
            T0,
        ),
        (
            Event::SetAutoResync {
                auto: AutoResync::Off,
            },
            T0,
        ),
        (Event::CycleDue, T0),
        (Event::Restarted, T0),
        (Event::FailoverStop { test: false }, T0),
        (
            Event::ReplicaFailedOver {
                reason: "failed over there".into(),
            },
            T0,
        ),
        (
            Event::StorageFailed {
                reason: "lost".into(),
            },
            T0,
        ),
        (
            Event::HelloAnswered {
                latest_seq: Seq(1),
                latest_cut_unix_ns: None,
                generation: G,
                damage: Some("bad".into()),
            },
            T0,
        ),
    ];
    for s in 0..=3 {
        alphabet.push((
            Event::HelloAnswered {
                latest_seq: Seq(s),
                latest_cut_unix_ns: None,
                generation: G,
                damage: None,
            },
            T0,
        ));
        alphabet.push((
            Event::CutTaken {
                seq: Seq(s),
                cut_unix_ns: T0,
            },
            T0,
        ));
        alphabet.push((
            Event::Committed {
                seq: Seq(s),
                cut_unix_ns: T0,
                app_consistent: false,
            },
            T0,
        ));
        alphabet.push((Event::Prepared { seq: Seq(s) }, T0));
        alphabet.push((
            Event::CycleFailed {
                seq: Seq(s),
                error: "refused".into(),
                refusal: Some(PeerRefusalFacts {
                    expected_seq: Some(Seq(s + 1)),
                    cut_unix_ns: None,
                    failed_over: false,
                    needs_resync: true,
                    error: "x".into(),
                }),
            },
            T0,
        ));
    }
    let primary = bfs(Relationship::new(web(), Role::Primary, G), &alphabet);
    let replica_only: BTreeSet<String> = [
        "TestFailoverInProgress",
        "FailedOverWaitingCompletion",
        "FailedOver",
    ]
    .map(String::from)
    .into();
    assert_eq!(
        primary,
        &every_state_name() - &replica_only,
        "primary (the failovers start on the replica)"
    );

    // The replica's view reaches every state too.
    let mut alphabet = vec![
        (
            Event::Diverged {
                reason: "out of sequence".into(),
            },
            T0,
        ),
        (Event::Restarted, T0),
        (Event::FailoverStop { test: true }, T0),
        (Event::FailoverStop { test: false }, T0),
        (Event::FailoverComplete, T0),
    ];
    for test in [true, false] {
        alphabet.push((
            Event::FailoverStart {
                point: Seq(1),
                test,
            },
            T0,
        ));
    }
    for kind in [CycleKind::Initial, CycleKind::Incremental, CycleKind::Full] {
        alphabet.push((Event::DeltaStarted { kind }, T0));
        alphabet.push((
            Event::DeltaCommitted {
                seq: Seq(1),
                kind,
                cut_unix_ns: T0,
            },
            T0,
        ));
    }
    let states = [
        None,
        Some(ReplicationState::ReadyForInitialReplication),
        Some(ReplicationState::InitialReplicationInProgress),
        Some(ReplicationState::Replicating),
        Some(ReplicationState::Suspended),
        Some(ReplicationState::ResynchronizationRequired),
        Some(ReplicationState::WaitingForStartResynchronize),
        Some(ReplicationState::Resynchronizing),
        Some(ReplicationState::Replica),
        Some(ReplicationState::PreparedForFailover),
    ];
    for primary_state in states {
        for latest in 0..=1 {
            alphabet.push((
                Event::HelloReceived {
                    primary_state,
                    generation: G,
                    latest_seq: Seq(latest),
                },
                T0,
            ));
        }
    }
    let reached = bfs(Relationship::new(web(), Role::Replica, G), &alphabet);
    for name in [
        "ReadyForInitialReplication",
        "InitialReplicationInProgress",
        "Replicating",
        "ResynchronizationRequired",
        "WaitingForStartResynchronize",
        "Resynchronizing",
        "Suspended(InitialReplicationInProgress)",
        "Suspended(Replicating)",
        "TestFailoverInProgress",
        "FailedOverWaitingCompletion",
        "FailedOver",
        "PreparedForFailover",
    ] {
        assert!(
            reached.contains(name),
            "replica never reaches {name}: {reached:?}"
        );
    }
    assert_eq!(&primary | &reached, every_state_name(), "every state");
}
