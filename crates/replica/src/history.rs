//! Recovery history: which points a replica VM keeps ([`kept`]) and what each listed point is
//! ([`classify`]), as pure functions of the points, the policy and the time (passed in; nothing
//! here reads a clock). See "Recovery history" in `docs/formats/replica-store.md`.

use std::collections::{BTreeMap, BTreeSet};

use delta::DeltaKind;
use proto::Seq;
use serde::{Deserialize, Serialize};

use crate::PointInfo;

/// Most hourly points: a day of them, Hyper-V's own range for `-RecoveryHistory`.
pub const RECOVERY_HISTORY_MAX: u32 = 24;
/// Range of the application-consistent cadence, in hours (Hyper-V's `-VSSSnapshotFrequencyHour`).
pub const APP_CONSISTENT_EVERY_HOURS_MAX: u32 = 12;
/// Longest any-point window: a day. At 1 s cycles that is 86,400 points, each a journal file
/// and index entries; longer windows are what the hourly history is for.
pub const KEEP_EVERY_POINT_FOR_MAX_SECS: u64 = 24 * 3600;

const HOUR_NS: u64 = 3600 * 1_000_000_000;

/// What a replica VM keeps besides its newest point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPolicy {
    /// Hourly points kept besides the newest point (0-24).
    pub recovery_history: u32,
    /// Cadence of application-consistent points in hours (1-12, needs `recovery_history > 0`).
    #[serde(default)]
    pub app_consistent_every_hours: Option<u32>,
    /// Every point whose cut is at most this old is kept (0: none but the others).
    #[serde(default)]
    pub keep_every_point_for_secs: u64,
}

impl HistoryPolicy {
    /// Checks the ranges; the error is one line naming the value.
    pub fn validate(&self) -> Result<(), String> {
        if self.recovery_history > RECOVERY_HISTORY_MAX {
            return Err(format!(
                "recovery history must be 0 to {RECOVERY_HISTORY_MAX} hourly points, got {}",
                self.recovery_history
            ));
        }
        if let Some(h) = self.app_consistent_every_hours {
            if !(1..=APP_CONSISTENT_EVERY_HOURS_MAX).contains(&h) {
                return Err(format!(
                    "app-consistent-every must be 1 to {APP_CONSISTENT_EVERY_HOURS_MAX} hours, got {h}"
                ));
            }
            if self.recovery_history == 0 {
                return Err(
                    "app-consistent-every needs a recovery history of at least 1 hourly point"
                        .into(),
                );
            }
        }
        if self.keep_every_point_for_secs > KEEP_EVERY_POINT_FOR_MAX_SECS {
            return Err(format!(
                "keep-every-point-for must be at most {} h, got {} s",
                KEEP_EVERY_POINT_FOR_MAX_SECS / 3600,
                self.keep_every_point_for_secs
            ));
        }
        Ok(())
    }
}

/// What a listed point is, for users (`points list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PointKind {
    Latest,
    Standard,
    Hourly,
    AppConsistent,
    Resynchronized,
    Initial,
}

impl PointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Latest => "Latest",
            PointKind::Standard => "Standard",
            PointKind::Hourly => "Hourly",
            PointKind::AppConsistent => "AppConsistent",
            PointKind::Resynchronized => "Resynchronized",
            PointKind::Initial => "Initial",
        }
    }
}

/// The hourly points of `points` (any order) under `policy` at `now_ns`: per UTC clock hour
/// of the last `recovery_history` hours (the current one included), its first
/// application-consistent point, else its first point.
fn hourly(points: &[PointInfo], policy: &HistoryPolicy, now_ns: u64) -> BTreeSet<Seq> {
    let n = u64::from(policy.recovery_history);
    if n == 0 {
        return BTreeSet::new();
    }
    let first_hour = (now_ns / HOUR_NS).saturating_sub(n - 1);
    // Per hour: (is not application-consistent, seq), the smallest wins, so an hour's first
    // application-consistent point is its hourly point when it has one (as Hyper-V keeps its
    // VSS points), else its first point.
    let mut first_of_hour: BTreeMap<u64, (bool, Seq)> = BTreeMap::new();
    for p in points {
        let hour = p.cut_time_unix_ns / HOUR_NS;
        if hour < first_hour {
            continue;
        }
        let key = (!p.app_consistent, p.seq);
        first_of_hour
            .entry(hour)
            .and_modify(|s| *s = (*s).min(key))
            .or_insert(key);
    }
    first_of_hour.into_values().map(|(_, seq)| seq).collect()
}

/// The seqs of `points` that `policy` keeps at `now_ns`: the newest, every point of the
/// any-point window, and the hourly points. Everything else may be folded or merged away.
pub fn kept(points: &[PointInfo], policy: &HistoryPolicy, now_ns: u64) -> BTreeSet<Seq> {
    let mut out = hourly(points, policy, now_ns);
    if let Some(newest) = points.iter().map(|p| p.seq).max() {
        out.insert(newest);
    }
    if policy.keep_every_point_for_secs > 0 {
        let from = now_ns.saturating_sub(policy.keep_every_point_for_secs * 1_000_000_000);
        out.extend(
            points
                .iter()
                .filter(|p| p.cut_time_unix_ns >= from)
                .map(|p| p.seq),
        );
    }
    out
}

/// The kind of each point (same order as `points`). `policy` `None`: no hourly points.
pub fn classify(
    points: &[PointInfo],
    policy: Option<&HistoryPolicy>,
    now_ns: u64,
) -> Vec<PointKind> {
    let newest = points.iter().map(|p| p.seq).max();
    let hourly = policy
        .map(|pol| hourly(points, pol, now_ns))
        .unwrap_or_default();
    points
        .iter()
        .map(|p| {
            if Some(p.seq) == newest {
                PointKind::Latest
            } else if p.kind == DeltaKind::Initial {
                PointKind::Initial
            } else if p.kind == DeltaKind::Full {
                PointKind::Resynchronized
            } else if p.app_consistent {
                PointKind::AppConsistent
            } else if hourly.contains(&p.seq) {
                PointKind::Hourly
            } else {
                PointKind::Standard
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: u64 = 60 * 1_000_000_000;

    fn point(seq: u64, cut: u64) -> PointInfo {
        PointInfo {
            seq: Seq(seq),
            cut_time_unix_ns: cut,
            kind: if seq == 1 {
                DeltaKind::Initial
            } else {
                DeltaKind::Incremental
            },
            data_bytes: 0,
            zero_bytes: 0,
            stored_bytes: 0,
            app_consistent: false,
        }
    }

    fn policy(n: u32, window_secs: u64) -> HistoryPolicy {
        HistoryPolicy {
            recovery_history: n,
            app_consistent_every_hours: None,
            keep_every_point_for_secs: window_secs,
        }
    }

    #[test]
    fn hourly_points_are_the_first_of_each_recent_hour() {
        // One point every 20 minutes from 00:00 to 04:00.
        let pts: Vec<PointInfo> = (0..=12).map(|i| point(i + 1, i * 20 * MIN)).collect();
        let now = 4 * 60 * MIN + 5 * MIN; // 04:05
        let k = kept(&pts, &policy(2, 0), now);
        // Hours 03 and 04: their first points (03:00 = seq 10, 04:00 = seq 13, the newest).
        assert_eq!(
            k.into_iter().map(Seq::get).collect::<Vec<_>>(),
            vec![10, 13]
        );
        let kinds = classify(&pts, Some(&policy(2, 0)), now);
        assert_eq!(kinds[0], PointKind::Initial);
        assert_eq!(kinds[9], PointKind::Hourly);
        assert_eq!(kinds[10], PointKind::Standard);
        assert_eq!(kinds[12], PointKind::Latest);
    }

    #[test]
    fn app_consistent_point_is_its_hours_hourly_point_and_listed_as_such() {
        // Points every 20 minutes; 03:40 (seq 12) was cut with the guest frozen.
        let mut pts: Vec<PointInfo> = (0..=13).map(|i| point(i + 1, i * 20 * MIN)).collect();
        pts[11].app_consistent = true;
        let now = 4 * 60 * MIN + 25 * MIN;
        let k = kept(&pts, &policy(2, 0), now);
        assert_eq!(
            k.into_iter().map(Seq::get).collect::<Vec<_>>(),
            vec![12, 13, 14]
        );
        let kinds = classify(&pts, Some(&policy(2, 0)), now);
        assert_eq!(kinds[11], PointKind::AppConsistent);
        assert_eq!(kinds[9], PointKind::Standard);
        assert_eq!(kinds[12], PointKind::Hourly);
    }

    #[test]
    fn the_window_keeps_every_point_and_zero_history_keeps_the_newest_only() {
        let pts: Vec<PointInfo> = (1..=10).map(|i| point(i, i * MIN)).collect();
        let now = 10 * MIN;
        assert_eq!(
            kept(&pts, &policy(0, 0), now)
                .into_iter()
                .map(Seq::get)
                .collect::<Vec<_>>(),
            vec![10]
        );
        assert_eq!(
            kept(&pts, &policy(0, 180), now)
                .into_iter()
                .map(Seq::get)
                .collect::<Vec<_>>(),
            vec![7, 8, 9, 10]
        );
    }

    #[test]
    fn out_of_range_values_are_refused_in_one_line() {
        for (p, what) in [
            (policy(25, 0), "recovery history"),
            (
                HistoryPolicy {
                    app_consistent_every_hours: Some(13),
                    ..policy(1, 0)
                },
                "app-consistent",
            ),
            (
                HistoryPolicy {
                    app_consistent_every_hours: Some(1),
                    ..policy(0, 0)
                },
                "needs a recovery history",
            ),
            (policy(1, 25 * 3600), "keep-every-point-for"),
        ] {
            let e = p.validate().unwrap_err();
            assert!(e.contains(what) && !e.contains('\n'), "{e}");
        }
        policy(24, 24 * 3600).validate().unwrap();
    }

    proptest! {
        /// Retention applies `kept` to what remains, at later and later times. Whatever the
        /// points and times: the newest point always stays; a point the policy wants at some
        /// time was never removed before (a removed point is never wanted again); and what
        /// remains after a pass is exactly what the policy keeps (a fixpoint).
        #[test]
        fn kept_is_stable_under_repeated_retention(
            gaps in prop::collection::vec(1u64..(90 * 60), 1..120),
            steps in prop::collection::vec(0u64..(3 * 3600), 1..6),
            n in 0u32..5, window in 0u64..(3 * 3600),
        ) {
            let pol = policy(n, window);
            let mut cut = 1_700_000_000u64 * 1_000_000_000;
            let all: Vec<PointInfo> = gaps.iter().enumerate().map(|(i, g)| {
                cut += g * 1_000_000_000;
                point(i as u64 + 1, cut)
            }).collect();
            let mut now = cut;
            let mut remaining = all.clone();
            let mut removed: BTreeSet<Seq> = BTreeSet::new();
            for s in steps {
                now += s * 1_000_000_000;
                let k = kept(&remaining, &pol, now);
                // What the policy would want of the full history: never a removed point.
                let want_all = kept(&all, &pol, now);
                for seq in &want_all {
                    prop_assert!(!removed.contains(seq), "point {} wanted after removal", seq);
                }
                prop_assert!(k.contains(&all.last().unwrap().seq));
                removed.extend(remaining.iter().map(|p| p.seq).filter(|s| !k.contains(s)));
                remaining.retain(|p| k.contains(&p.seq));
                prop_assert_eq!(kept(&remaining, &pol, now), k);
            }
        }
    }
}
