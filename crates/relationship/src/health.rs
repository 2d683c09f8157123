//! Health (Hyper-V Replica's Normal / Warning / Critical) from a relationship's state and the
//! facts the daemon counts (failures in a row, application-consistent fallbacks). Time is
//! passed in.

use proto::{Health, HealthReason};

use crate::{Relationship, Role, State};

/// What the daemon counts about a relationship besides its state.
#[derive(Debug, Clone, Default)]
pub struct HealthFacts<'a> {
    pub frequency_secs: u32,
    pub consecutive_failures: u64,
    pub last_error: Option<&'a str>,
    /// Application-consistent cuts that fell back to crash-consistent in a row, and the last
    /// reason.
    pub app_consistent_failures: u64,
    pub app_consistent_error: Option<&'a str>,
    /// When the first of the `consecutive_failures` failed (unix ns).
    pub failing_since_unix_ns: Option<u64>,
    /// The admin's threshold: Warning after this many cycles without a successful one
    /// (`replication set --lag-warning-cycles`); `None`: [`lag_thresholds_secs`]'s default.
    pub lag_warning_cycles: Option<u32>,
}

/// Application-consistent cuts failed in a row after which health turns Warning: one failure
/// can be a guest busy at that moment (the point is still taken, crash-consistent); three in a
/// row mean the agent or hook is broken and the recovery history has no application-consistent
/// point.
pub const APP_CONSISTENT_WARNING_FAILURES: u64 = 3;

/// Cycles of lag after which health turns Warning by default (capped at Hyper-V's hour, below),
/// and how many times that threshold turns it Critical.
pub const LAG_WARNING_CYCLES: u64 = 3;
pub const LAG_CRITICAL_FACTOR: u64 = 4;
/// Hyper-V's rule: Warning when no cycle succeeded for more than an hour.
pub const LAG_WARNING_SECS_MAX: u64 = 3600;

/// Seconds without a successful cycle after which health turns Warning, and Critical. By
/// default Warning after 3 cycles of the frequency, or Hyper-V's hour when that is sooner, but
/// never before 2 cycles (a point is up to one cycle old by design); an admin's threshold in
/// cycles replaces it. Critical at 4 times the Warning threshold.
pub fn lag_thresholds_secs(frequency_secs: u32, warning_cycles: Option<u32>) -> (u64, u64) {
    let f = u64::from(frequency_secs.max(1));
    let warning = match warning_cycles {
        Some(n) => f * u64::from(n.max(1)),
        None => (f * LAG_WARNING_CYCLES)
            .min(LAG_WARNING_SECS_MAX)
            .max(2 * f),
    };
    (warning, warning * LAG_CRITICAL_FACTOR)
}

/// The relationship's health and why it is not Normal, one sentence each. Never Normal while
/// the replica may have diverged: `ResynchronizationRequired` is Critical,
/// `WaitingForStartResynchronize` and `Resynchronizing` are Warning until the `Full` delta
/// commits. A test failover is as healthy as the replication beside it (its `underlying`
/// state); the other failover states are Warning.
pub fn health(
    rel: &Relationship,
    facts: &HealthFacts<'_>,
    now_unix_ns: u64,
) -> (Health, Vec<HealthReason>) {
    if let State::TestFailoverInProgress { underlying, .. } = &rel.state {
        let mut beside = rel.clone();
        beside.state = (**underlying).clone();
        return health(&beside, facts, now_unix_ns);
    }
    let mut reasons = Vec::new();
    let mut level = Health::Normal;
    let mut raise = |to: Health, why: HealthReason, reasons: &mut Vec<HealthReason>| {
        if to as u8 > level as u8 {
            level = to;
        }
        reasons.push(why);
    };
    let r = HealthReason::new;
    match &rel.state {
        State::ResynchronizationRequired { reason } => raise(
            Health::Critical,
            r(
                "resync_required",
                format!(
                    "resynchronization required ({}): {reason}",
                    crate::condition::label(reason)
                ),
            ),
            &mut reasons,
        ),
        State::Suspended { .. } => raise(
            Health::Warning,
            r("suspended", "replication is suspended".into()),
            &mut reasons,
        ),
        State::ReadyForInitialReplication => raise(
            Health::Warning,
            r("initial_not_done", "initial replication has not started".into()),
            &mut reasons,
        ),
        State::InitialReplicationByMedia => raise(
            Health::Warning,
            r("initial_not_done", "the initial replication was written to media and waits for `replication import-media` on the replica host".into()),
            &mut reasons,
        ),
        State::InitialReplicationScheduled { at_unix_ns } => raise(
            Health::Warning,
            r(
                "initial_not_done",
                format!(
                    "initial replication is scheduled at {} (in {} s)",
                    proto::time::rfc3339_from_unix_ns(*at_unix_ns),
                    at_unix_ns.saturating_sub(now_unix_ns) / 1_000_000_000
                ),
            ),
            &mut reasons,
        ),
        State::WaitingForStartResynchronize { at_unix_ns, .. } => raise(
            Health::Warning,
            r(
                "resync_scheduled",
                format!(
                    "a resynchronization is scheduled in {} s; until it completes the replica may not match the primary",
                    at_unix_ns.saturating_sub(now_unix_ns) / 1_000_000_000
                ),
            ),
            &mut reasons,
        ),
        State::Resynchronizing { .. } => raise(
            Health::Warning,
            r("resynchronizing", "a resynchronization is in progress; until it completes the replica may not match the primary".into()),
            &mut reasons,
        ),
        State::FailedOverWaitingCompletion { point } => raise(
            Health::Warning,
            r(
                "failover_in_progress",
                format!(
                    "failed over to point {point}; run `understudy failover complete {vm}` or `understudy failover stop {vm}`",
                    vm = rel.vm
                ),
            ),
            &mut reasons,
        ),
        State::FailedOver => raise(
            Health::Warning,
            r("not_protected", "reverse replication is not set up: the VM is not protected".into()),
            &mut reasons,
        ),
        State::PreparedForFailover { seq, .. } => raise(
            Health::Warning,
            r(
                "prepared_for_failover",
                match rel.role {
                    Role::Primary => {
                        "prepared for a planned failover; the VM must not run here".into()
                    }
                    Role::Replica => format!(
                        "the primary is prepared for a planned failover to point {seq}; run `understudy failover start {vm}` here",
                        vm = rel.vm
                    ),
                },
            ),
            &mut reasons,
        ),
        State::FencedAfterFailover { reason, .. } => raise(
            Health::Critical,
            r("fenced", format!("the replica host failed this VM over; its disks are fenced here and nothing is replicated: {reason}")),
            &mut reasons,
        ),
        // Handled above.
        State::TestFailoverInProgress { .. } => {}
        State::InitialReplicationInProgress | State::Replicating => {}
    }
    if facts.consecutive_failures > 0 {
        let mut why = r(
            "cycles_failing",
            format!(
                "{} cycle(s) failed in a row; last error: {}",
                facts.consecutive_failures,
                facts.last_error.unwrap_or("unknown")
            ),
        );
        if let Some(t) = facts.failing_since_unix_ns {
            why = why.since_unix_ns(t);
        }
        raise(Health::Warning, why, &mut reasons);
    }
    if facts.app_consistent_failures >= APP_CONSISTENT_WARNING_FAILURES {
        raise(
            Health::Warning,
            r(
                "app_consistent_failing",
                format!(
                    "{} application-consistent cut(s) in a row fell back to crash-consistent; last error: {}",
                    facts.app_consistent_failures,
                    facts.app_consistent_error.unwrap_or("unknown")
                ),
            ),
            &mut reasons,
        );
    }
    if let (Some(last), State::Replicating) = (rel.progress.last_cut_unix_ns, &rel.state) {
        let lag_s = now_unix_ns.saturating_sub(last) / 1_000_000_000;
        let f = u64::from(facts.frequency_secs.max(1));
        let (warning_s, critical_s) =
            lag_thresholds_secs(facts.frequency_secs, facts.lag_warning_cycles);
        if lag_s > critical_s {
            raise(
                Health::Critical,
                r(
                    "no_successful_cycle",
                    format!("the newest point is {lag_s} s old ({} cycles)", lag_s / f),
                )
                .since_unix_ns(last.saturating_add(critical_s * 1_000_000_000)),
                &mut reasons,
            );
        } else if lag_s > warning_s {
            raise(
                Health::Warning,
                r(
                    "no_successful_cycle",
                    format!("the newest point is {lag_s} s old ({} cycles)", lag_s / f),
                )
                .since_unix_ns(last.saturating_add(warning_s * 1_000_000_000)),
                &mut reasons,
            );
        }
    }
    (level, reasons)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Resumable, Role};
    use proto::{Generation, VmName};

    const NOW: u64 = 10_000_000_000_000;

    fn rel(state: State, lag_s: u64) -> Relationship {
        let mut r = Relationship::new(VmName::parse("web").unwrap(), Role::Primary, Generation(1));
        r.state = state;
        r.progress.last_cut_unix_ns = Some(NOW - lag_s * 1_000_000_000);
        r
    }

    fn facts(failures: u64) -> HealthFacts<'static> {
        HealthFacts {
            frequency_secs: 30,
            consecutive_failures: failures,
            last_error: Some("connection refused"),
            app_consistent_failures: 0,
            app_consistent_error: None,
            failing_since_unix_ns: None,
            lag_warning_cycles: None,
        }
    }

    #[test]
    fn the_lag_threshold_is_three_cycles_at_most_an_hour_or_the_admins() {
        // 30 s: 90 s, Critical at 6 min; 15 min (Hyper-V's longest): 45 min.
        assert_eq!(lag_thresholds_secs(30, None), (90, 360));
        assert_eq!(lag_thresholds_secs(900, None), (2700, 10800));
        // 30 min: Hyper-V's hour; 1 h: two cycles, a point is up to one cycle old.
        assert_eq!(lag_thresholds_secs(1800, None), (3600, 14400));
        assert_eq!(lag_thresholds_secs(3600, None), (7200, 28800));
        // The admin's threshold, in cycles of the frequency.
        assert_eq!(lag_thresholds_secs(30, Some(10)), (300, 1200));
        let r = rel(State::Replicating, 200);
        let mut f = facts(0);
        assert_eq!(health(&r, &f, NOW).0, Health::Warning);
        f.lag_warning_cycles = Some(10);
        assert_eq!(health(&r, &f, NOW).0, Health::Normal);
        let (level, why) = health(&rel(State::Replicating, 301), &f, NOW);
        assert_eq!(level, Health::Warning);
        assert_eq!(
            why[0].since,
            Some(proto::time::rfc3339_from_unix_ns(NOW - 1_000_000_000)),
            "{why:?}"
        );
    }

    #[test]
    fn repeated_app_consistent_failures_turn_health_warning() {
        let r = rel(State::Replicating, 10);
        let mut f = facts(0);
        f.app_consistent_failures = APP_CONSISTENT_WARNING_FAILURES - 1;
        assert_eq!(health(&r, &f, NOW).0, Health::Normal);
        f.app_consistent_failures = APP_CONSISTENT_WARNING_FAILURES;
        f.app_consistent_error = Some("the guest agent did not answer in time");
        let (level, reasons) = health(&r, &f, NOW);
        assert_eq!(level, Health::Warning);
        assert!(reasons[0].reason.contains("guest agent"), "{reasons:?}");
    }

    #[test]
    fn health_follows_state_lag_and_failures() {
        let h = |s: State, lag, fail| health(&rel(s, lag), &facts(fail), NOW);
        assert_eq!(h(State::Replicating, 10, 0).0, Health::Normal);
        assert_eq!(h(State::Replicating, 10, 1).0, Health::Warning);
        assert_eq!(h(State::Replicating, 100, 0).0, Health::Warning);
        assert_eq!(h(State::Replicating, 400, 0).0, Health::Critical);
        let (level, why) = h(
            State::ResynchronizationRequired {
                reason: "primary crashed".into(),
            },
            0,
            0,
        );
        assert_eq!(level, Health::Critical);
        assert!(why[0].reason.contains("primary crashed"));
        assert_eq!(
            h(
                State::Suspended {
                    resume_to: Resumable::Replicating
                },
                0,
                0
            )
            .0,
            Health::Warning
        );
        assert_eq!(
            h(State::InitialReplicationInProgress, 0, 0).0,
            Health::Normal
        );
    }

    #[test]
    fn resynchronization_is_never_normal_health() {
        let waiting = State::WaitingForStartResynchronize {
            reason: None,
            at_unix_ns: NOW + 60_000_000_000,
        };
        let (level, why) = health(&rel(waiting, 0), &facts(0), NOW);
        assert_eq!(level, Health::Warning);
        assert!(why[0].reason.contains("scheduled in 60 s"), "{why:?}");
        let running = State::Resynchronizing { reason: None };
        assert_eq!(health(&rel(running, 0), &facts(0), NOW).0, Health::Warning);
    }

    #[test]
    fn failover_states_health() {
        use proto::Seq;
        let test = |under: State| State::TestFailoverInProgress {
            point: Seq(3),
            underlying: Box::new(under),
        };
        // A test failover is as healthy as the replication beside it.
        assert_eq!(
            health(&rel(test(State::Replicating), 10), &facts(0), NOW).0,
            Health::Normal
        );
        assert_eq!(
            health(&rel(test(State::Replicating), 400), &facts(0), NOW).0,
            Health::Critical
        );
        assert_eq!(
            health(&rel(test(State::Replicating), 10), &facts(1), NOW).0,
            Health::Warning
        );
        let diverged = test(State::ResynchronizationRequired {
            reason: "damaged".into(),
        });
        assert_eq!(
            health(&rel(diverged, 0), &facts(0), NOW).0,
            Health::Critical
        );
        let (level, why) = health(
            &rel(State::FailedOverWaitingCompletion { point: Seq(4) }, 0),
            &facts(0),
            NOW,
        );
        assert_eq!(level, Health::Warning);
        assert!(
            why[0]
                .reason
                .starts_with("failed over to point 4; run `understudy failover complete web`"),
            "{why:?}"
        );
        let (level, why) = health(&rel(State::FailedOver, 0), &facts(0), NOW);
        assert_eq!(level, Health::Warning);
        assert_eq!(
            why[0].reason,
            "reverse replication is not set up: the VM is not protected"
        );
        let prepared = rel(
            State::PreparedForFailover {
                seq: Seq(7),
                resync: None,
            },
            0,
        );
        let (level, why) = health(&prepared, &facts(0), NOW);
        assert_eq!(level, Health::Warning);
        assert_eq!(
            why[0].reason,
            "prepared for a planned failover; the VM must not run here"
        );
        let mut on_replica = prepared;
        on_replica.role = Role::Replica;
        let (level, why) = health(&on_replica, &facts(0), NOW);
        assert_eq!(level, Health::Warning);
        assert!(why[0].reason.contains("failover start web"), "{why:?}");
    }
}
