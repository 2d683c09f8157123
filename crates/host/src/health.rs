//! Health over a monitoring interval, the Hyper-V Replica way (docs/health.md): the rules of
//! `relationship::health` (state, failures in a row, age of the newest point), plus the share
//! of cycles missed in the interval, each reason with the time it started, and an event when
//! a VM's health changes. Kept in memory: a daemon restart starts the interval again.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{Health, HealthReason, ReplicationState, ReplicationStatus};

use crate::events::{self, Events};

/// Hyper-V's default monitoring interval (`replica-server enable --monitoring-interval`).
pub const MONITORING_INTERVAL_DEFAULT_SECS: u64 = 12 * 3600;
/// The interval's bounds, Hyper-V's: shorter would warn on a few unlucky cycles, longer would
/// hide a week-old problem behind a good month.
pub const MONITORING_INTERVAL_MIN_SECS: u64 = 3600;
pub const MONITORING_INTERVAL_MAX_SECS: u64 = 7 * 24 * 3600;
/// Health turns Warning when more than this share of the cycles due in the interval were
/// missed (Hyper-V: 20 %).
pub const MISSED_CYCLES_WARNING_PERCENT: u64 = 20;
/// Cycles that must have been due before the missed-cycles rule judges: two missed out of the
/// first three is bad luck, not a trend.
pub const MISSED_RULE_MIN_DUE: u64 = 5;
/// Successful cycles remembered per VM (their times): a 7-day interval at a 30 s frequency
/// is 20160 cycles; a shorter frequency counts only its newest 32768 (8 bytes each, 256 KiB
/// per VM at most).
pub const SUCCESSES_REMEMBERED_MAX: usize = 32_768;

#[derive(Default)]
struct VmHealth {
    /// Health last reported, for the change event; `None` before the first look.
    level: Option<Health>,
    /// When each reason (by kind) was first seen.
    since: HashMap<String, u64>,
    /// Replica side: the primary's frequency (its hellos say it), seconds.
    frequency_secs: Option<u32>,
    /// Times of the successful cycles (primary) or commits (replica) in the interval, oldest
    /// first.
    successes: VecDeque<u64>,
    /// The first success after the daemon started or the statistics were reset: cycles are
    /// due from then on.
    window_start_ns: Option<u64>,
}

/// Per-VM health memory of this host ([`crate::Shared::health`]).
#[derive(Default)]
pub struct HealthWatch {
    vms: Mutex<HashMap<String, VmHealth>>,
}

impl HealthWatch {
    /// A cycle of `vm` (primary) committed a point now.
    pub fn note_success(&self, vm: &str, interval_secs: u64) {
        self.note(&format!("Primary|{vm}"), interval_secs);
    }

    /// This replica host committed a point of `vm` now.
    pub fn note_commit(&self, vm: &str, interval_secs: u64) {
        self.note(&format!("Replica|{vm}"), interval_secs);
    }

    /// A hello from `vm`'s primary said its frequency (ignored outside 1 s to 1 h, the range
    /// the primary accepts).
    pub fn set_frequency(&self, vm: &str, secs: u32) {
        if (1..=3600).contains(&secs) {
            let mut vms = self.vms.lock();
            vms.entry(format!("Replica|{vm}"))
                .or_default()
                .frequency_secs = Some(secs);
        }
    }

    fn note(&self, key: &str, interval_secs: u64) {
        let now = now_unix_ns();
        let mut vms = self.vms.lock();
        let h = vms.entry(key.to_string()).or_default();
        h.window_start_ns.get_or_insert(now);
        h.successes.push_back(now);
        let oldest = now.saturating_sub(interval_secs.saturating_mul(1_000_000_000));
        while h.successes.len() > SUCCESSES_REMEMBERED_MAX
            || h.successes.front().is_some_and(|&t| t < oldest)
        {
            h.successes.pop_front();
        }
    }

    /// `replication reset-statistics`: the interval starts again and every reason's start
    /// is forgotten.
    pub fn reset(&self, vm: &str) {
        let mut vms = self.vms.lock();
        for role in ["Primary", "Replica"] {
            if let Some(h) = vms.get_mut(&format!("{role}|{vm}")) {
                h.since.clear();
                h.successes.clear();
                h.window_start_ns = None;
            }
        }
    }

    /// Completes `st` (computed by `relationship::health`): adds the missed-cycles rule, fills
    /// in when each reason started, and emits a health-change event when the level changed
    /// since the last look.
    pub fn apply(&self, st: &mut ReplicationStatus, interval_secs: u64, events: &Events) {
        let now = now_unix_ns();
        let key = format!("{}|{}", st.role, st.vm);
        let mut vms = self.vms.lock();
        let h = vms.entry(key).or_default();
        // The primary schedules the cycles; the replica host knows their frequency from the
        // primary's hellos.
        let frequency = match st.role.as_str() {
            "Primary" => Some(st.frequency_secs),
            _ => h.frequency_secs,
        };
        if let (Some(f), ReplicationState::Replicating) = (frequency, st.state) {
            if let Some(missed) = missed_cycles(h, f, interval_secs, now) {
                if st.health == Health::Normal {
                    st.health = Health::Warning;
                }
                st.health_reasons.push(missed);
            }
        }
        h.since
            .retain(|kind, _| st.health_reasons.iter().any(|r| &r.kind == kind));
        for r in &mut st.health_reasons {
            let first = *h.since.entry(r.kind.clone()).or_insert(now);
            if r.since.is_none() {
                r.since = Some(rfc3339_from_unix_ns(first));
            }
        }
        let before = h.level.replace(st.health);
        if let Some(before) = before.filter(|b| *b != st.health) {
            let why: Vec<&str> = st
                .health_reasons
                .iter()
                .map(|r| r.reason.as_str())
                .collect();
            let level = match st.health {
                Health::Normal => "info",
                Health::Warning => "warning",
                Health::Critical => "error",
            };
            let message = if why.is_empty() {
                format!("health {before:?} -> {:?}", st.health)
            } else {
                format!("health {before:?} -> {:?}: {}", st.health, why.join("; "))
            };
            drop(vms);
            events.emit(events::HEALTH_CHANGED, Some(&st.vm), level, &message);
        }
    }
}

/// The missed-cycles reason, when more than [`MISSED_CYCLES_WARNING_PERCENT`] % of the cycles
/// due in the interval (since the window started) did not commit a point.
fn missed_cycles(
    h: &VmHealth,
    frequency_secs: u32,
    interval_secs: u64,
    now: u64,
) -> Option<HealthReason> {
    let start = h.window_start_ns?;
    let f_ns = u64::from(frequency_secs.max(1)) * 1_000_000_000;
    let from = start.max(now.saturating_sub(interval_secs.saturating_mul(1_000_000_000)));
    let due = now.saturating_sub(from) / f_ns;
    let done = h.successes.iter().filter(|&&t| t > from).count() as u64;
    let missed = due.saturating_sub(done);
    if due < MISSED_RULE_MIN_DUE || missed * 100 <= due * MISSED_CYCLES_WARNING_PERCENT {
        return None;
    }
    Some(HealthReason::new(
        "cycles_missed",
        format!(
            "{missed} of the {due} cycles due in the monitoring interval ({}) were missed (more than {MISSED_CYCLES_WARNING_PERCENT} %)",
            interval_words(interval_secs)
        ),
    ))
}

/// `12h`, `7d`, `90m` as the CLI takes it.
pub fn interval_words(secs: u64) -> String {
    if secs % 86_400 == 0 {
        format!("{}d", secs / 86_400)
    } else if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn with_successes(start: u64, times: &[u64]) -> VmHealth {
        VmHealth {
            window_start_ns: Some(start),
            successes: times.iter().copied().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn more_than_a_fifth_of_due_cycles_missed_is_a_warning() {
        let start = 1000 * S;
        // 10 cycles due (10 s at 1 s), 8 done: 20 %, not more.
        let h = with_successes(start, &(1..=8).map(|i| start + i * S).collect::<Vec<_>>());
        assert!(missed_cycles(&h, 1, 3600, start + 10 * S).is_none());
        // 7 done: 30 % missed.
        let h = with_successes(start, &(1..=7).map(|i| start + i * S).collect::<Vec<_>>());
        let why = missed_cycles(&h, 1, 3600, start + 10 * S).unwrap();
        assert_eq!(why.kind, "cycles_missed");
        assert!(
            why.reason.starts_with("3 of the 10 cycles"),
            "{}",
            why.reason
        );
    }

    #[test]
    fn missed_cycles_wait_for_enough_due_cycles_and_stay_in_the_interval() {
        let start = 1000 * S;
        let h = with_successes(start, &[]);
        // 4 due, none done: too early to judge.
        assert!(missed_cycles(&h, 1, 3600, start + 4 * S).is_none());
        // Successes long ago fall out of a 1 h interval: everything due in it was missed.
        let h = with_successes(start, &[start + S]);
        assert!(missed_cycles(&h, 60, 3600, start + 10 * 3600 * S).is_some());
        // No window yet (no success since start or reset): no judgement.
        let h = VmHealth::default();
        assert!(missed_cycles(&h, 1, 3600, start + 100 * S).is_none());
    }
}
