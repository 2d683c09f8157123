//! Prometheus metrics (`serve --metrics-listen`, `GET /metrics`), every name documented in
//! docs/metrics.md. Two kinds:
//!
//! - Counters and histograms are bumped where the thing happens (a cycle ends, a cut pauses
//!   the guest, an NBD request is answered) and live for the whole process: they never go
//!   backwards, whatever `replication reset-statistics` or a failing replica does. Counters
//!   kept elsewhere (the trackers' copy-before-write totals) are followed by their increase at
//!   each scrape, so they cannot go backwards either.
//! - Gauges are what `replication status` says at the moment of the scrape: rebuilt from the
//!   statuses at every scrape, so a removed VM disappears from them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use proto::{Health, ReplicationStatus};

/// Cycle durations: 50 ms doubling to ~7 min (14 buckets): a 30 s frequency's cycles and a
/// long initial replication both land inside.
fn cycle_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// Guest-write pauses at a cut and NBD request latencies: 10 µs, ×4, up to ~2.6 s (10
/// buckets): a cut pause is sub-millisecond when healthy, an NBD request micro- to
/// milliseconds.
fn fast_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmRole {
    pub vm: String,
    pub role: String,
}

impl VmRole {
    fn primary(vm: &str) -> VmRole {
        VmRole {
            vm: vm.to_string(),
            role: "primary".to_string(),
        }
    }
    fn replica(vm: &str) -> VmRole {
        VmRole {
            vm: vm.to_string(),
            role: "replica".to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CycleResult {
    pub vm: String,
    pub role: String,
    /// `success` or `failure`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmRoleState {
    pub vm: String,
    pub role: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportOp {
    pub export: String,
    pub op: String,
}

/// What one successful cycle did, for [`Metrics::cycle_succeeded`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CycleFacts {
    pub duration: Duration,
    /// Bytes put on the wire (after compression).
    pub sent_bytes: u64,
    /// Bytes of changed blocks shipped as data, before compression.
    pub data_bytes: u64,
    /// Bytes of changed blocks found all-zero and shipped as zero records.
    pub zero_bytes: u64,
    /// A resynchronization's cycle: its changed bytes are resynchronized bytes.
    pub resync: bool,
}

/// The NBD server's per-request counters (see [`nbd::RequestObserver`]).
pub struct NbdMetrics {
    requests: Family<ExportOp, Counter>,
    latency: HistFamily<ExportOp>,
}

impl nbd::RequestObserver for NbdMetrics {
    fn export(&self, name: &str) -> Arc<dyn nbd::ExportObserver> {
        // Resolved once per connection: a request only bumps an atomic and a histogram.
        let per_op = nbd::Op::ALL.map(|op| {
            let labels = ExportOp {
                export: name.to_string(),
                op: op.name().to_string(),
            };
            (
                self.requests.get_or_create(&labels).clone(),
                self.latency.get_or_create(&labels).clone(),
            )
        });
        Arc::new(ExportMetrics { per_op })
    }
}

struct ExportMetrics {
    per_op: [(Counter, Histogram); nbd::Op::COUNT],
}

impl nbd::ExportObserver for ExportMetrics {
    fn request(&self, op: nbd::Op, elapsed: Duration) {
        if let Some((count, latency)) = self.per_op.get(op as usize) {
            count.inc();
            latency.observe(elapsed.as_secs_f64());
        }
    }
}

/// The host's metrics: one per daemon ([`crate::Shared::metrics`]).
pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: gauges are cleared and rebuilt by each.
    scrape: Mutex<()>,
    // Counters and histograms (process lifetime).
    cycles: Family<CycleResult, Counter>,
    cycle_duration: HistFamily<VmRole>,
    cut_pause: HistFamily<VmRole>,
    shipped_bytes: Family<VmRole, Counter>,
    changed_bytes: Family<VmRole, Counter>,
    compression_saved: Family<VmRole, Counter>,
    zero_saved: Family<VmRole, Counter>,
    resynchronized_bytes: Family<VmRole, Counter>,
    cbw_copied: Family<VmRole, Counter>,
    cbw_spilled: Family<VmRole, Counter>,
    points_committed: Family<VmRole, Counter>,
    /// The trackers' totals seen at the previous scrape (copied, spilled), by VM.
    cbw_seen: Mutex<HashMap<String, (u64, u64)>>,
    pub nbd: Arc<NbdMetrics>,
    // Gauges (rebuilt at each scrape, except the apply lag set at each commit).
    point_age: Family<VmRole, Gauge<f64, std::sync::atomic::AtomicU64>>,
    last_seq: Family<VmRole, Gauge>,
    pending_bytes: Family<VmRole, Gauge>,
    health: Family<VmRole, Gauge>,
    state: Family<VmRoleState, Gauge>,
    points_kept: Family<VmRole, Gauge>,
    stored_bytes: Family<VmRole, Gauge>,
    apply_lag: Family<VmRole, Gauge<f64, std::sync::atomic::AtomicU64>>,
    resync_total: Family<VmRole, Gauge>,
    resync_done: Family<VmRole, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("understudy");
        let cycles = Family::<CycleResult, Counter>::default();
        registry.register(
            "cycles",
            "Replication cycles that ended, by result (success or failure)",
            cycles.clone(),
        );
        let cycle_duration = HistFamily::<VmRole>::new_with_constructor(cycle_buckets);
        registry.register_with_unit(
            "cycle_duration",
            "Duration of successful cycles, from the cut to the replica's commit",
            Unit::Seconds,
            cycle_duration.clone(),
        );
        let cut_pause = HistFamily::<VmRole>::new_with_constructor(fast_buckets);
        registry.register_with_unit(
            "cut_pause",
            "How long guest writes were held at each cut",
            Unit::Seconds,
            cut_pause.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<VmRole, Counter>::default();
            registry.register_with_unit(name, help, Unit::Bytes, f.clone());
            f
        };
        let shipped_bytes = counter(
            &mut registry,
            "shipped",
            "Bytes put on the wire to the replica by successful cycles (after compression)",
        );
        let changed_bytes = counter(
            &mut registry,
            "changed",
            "Bytes of changed blocks shipped by successful cycles (before compression and zero detection)",
        );
        let compression_saved = counter(
            &mut registry,
            "compression_saved",
            "Bytes of data not sent thanks to compression (data bytes minus wire bytes)",
        );
        let zero_saved = counter(
            &mut registry,
            "zero_detection_saved",
            "Bytes of changed blocks found all-zero and sent as zero records instead of data",
        );
        let resynchronized_bytes = counter(
            &mut registry,
            "resynchronized",
            "Bytes that differed from the replica and were shipped by resynchronizations",
        );
        let cbw_copied = counter(
            &mut registry,
            "cbw_copied",
            "Old data copied aside by copy-before-write (the guest overwrote a cut's blocks before they were shipped)",
        );
        let cbw_spilled = counter(
            &mut registry,
            "cbw_spilled",
            "Of the copy-before-write bytes, those that went to the spill file (memory pool full)",
        );
        let points_committed = Family::<VmRole, Counter>::default();
        registry.register(
            "points_committed",
            "Recovery points committed by this replica host",
            points_committed.clone(),
        );
        let nbd = Arc::new(NbdMetrics {
            requests: Family::default(),
            latency: HistFamily::<ExportOp>::new_with_constructor(fast_buckets),
        });
        registry.register(
            "nbd_requests",
            "NBD requests answered, by export and operation",
            nbd.requests.clone(),
        );
        registry.register_with_unit(
            "nbd_request_duration",
            "Time from reading an NBD request to sending its reply, by export and operation",
            Unit::Seconds,
            nbd.latency.clone(),
        );
        let point_age = Family::<VmRole, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "recovery_point_age",
            "Age of the newest committed recovery point (the real RPO)",
            Unit::Seconds,
            point_age.clone(),
        );
        let last_seq = Family::<VmRole, Gauge>::default();
        registry.register(
            "last_point_seq",
            "Sequence number of the newest committed recovery point (replication status last_seq)",
            last_seq.clone(),
        );
        let pending_bytes = Family::<VmRole, Gauge>::default();
        registry.register_with_unit(
            "pending",
            "Bytes changed on the primary and not yet committed on the replica",
            Unit::Bytes,
            pending_bytes.clone(),
        );
        let health = Family::<VmRole, Gauge>::default();
        registry.register(
            "health",
            "Replication health: 0 Normal, 1 Warning, 2 Critical",
            health.clone(),
        );
        let state = Family::<VmRoleState, Gauge>::default();
        registry.register(
            "replication_state",
            "1 for the replication's current state (label state)",
            state.clone(),
        );
        let points_kept = Family::<VmRole, Gauge>::default();
        registry.register(
            "points_kept",
            "Recovery points kept on the replica",
            points_kept.clone(),
        );
        let stored_bytes = Family::<VmRole, Gauge>::default();
        registry.register_with_unit(
            "stored",
            "Bytes of the retained deltas in the replica's journal (base images not counted)",
            Unit::Bytes,
            stored_bytes.clone(),
        );
        let apply_lag = Family::<VmRole, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "apply_lag",
            "On the replica: time from the cut of the newest committed point to its commit",
            Unit::Seconds,
            apply_lag.clone(),
        );
        let resync_total = Family::<VmRole, Gauge>::default();
        registry.register_with_unit(
            "resync_total",
            "Bytes the running resynchronization covers",
            Unit::Bytes,
            resync_total.clone(),
        );
        let resync_done = Family::<VmRole, Gauge>::default();
        registry.register_with_unit(
            "resync_done",
            "Bytes of the running resynchronization done so far",
            Unit::Bytes,
            resync_done.clone(),
        );
        Metrics {
            registry,
            scrape: Mutex::new(()),
            cycles,
            cycle_duration,
            cut_pause,
            shipped_bytes,
            changed_bytes,
            compression_saved,
            zero_saved,
            resynchronized_bytes,
            cbw_copied,
            cbw_spilled,
            points_committed,
            cbw_seen: Mutex::new(HashMap::new()),
            nbd,
            point_age,
            last_seq,
            pending_bytes,
            health,
            state,
            points_kept,
            stored_bytes,
            apply_lag,
            resync_total,
            resync_done,
        }
    }

    fn cycle_result(vm: &str, result: &str) -> CycleResult {
        CycleResult {
            vm: vm.to_string(),
            role: "primary".to_string(),
            result: result.to_string(),
        }
    }

    /// A primary cycle failed (counted where `replication measure` counts it).
    pub fn cycle_failed(&self, vm: &str) {
        self.cycles
            .get_or_create(&Self::cycle_result(vm, "failure"))
            .inc();
    }

    /// A primary cycle committed a point.
    pub fn cycle_succeeded(&self, vm: &str, f: &CycleFacts) {
        let l = VmRole::primary(vm);
        self.cycles
            .get_or_create(&Self::cycle_result(vm, "success"))
            .inc();
        self.cycle_duration
            .get_or_create(&l)
            .observe(f.duration.as_secs_f64());
        self.shipped_bytes.get_or_create(&l).inc_by(f.sent_bytes);
        let changed = f.data_bytes.saturating_add(f.zero_bytes);
        self.changed_bytes.get_or_create(&l).inc_by(changed);
        self.compression_saved
            .get_or_create(&l)
            .inc_by(f.data_bytes.saturating_sub(f.sent_bytes));
        self.zero_saved.get_or_create(&l).inc_by(f.zero_bytes);
        if f.resync {
            self.resynchronized_bytes.get_or_create(&l).inc_by(changed);
        }
    }

    /// A cut held guest writes for `pause`.
    pub fn cut_paused(&self, vm: &str, pause: Duration) {
        self.cut_pause
            .get_or_create(&VmRole::primary(vm))
            .observe(pause.as_secs_f64());
    }

    /// The replica committed a point whose cut was `lag` ago.
    pub fn point_committed(&self, vm: &str, lag: Duration) {
        let l = VmRole::replica(vm);
        self.points_committed.get_or_create(&l).inc();
        self.apply_lag.get_or_create(&l).set(lag.as_secs_f64());
    }

    /// The OpenMetrics text of every metric, gauges taken from `statuses` (what `replication
    /// status` says now) and `cbw` (each primary VM's copy-before-write totals: copied,
    /// spilled), `now_ns` on the history clock (the clock of the points' cut times).
    pub fn encode(
        &self,
        statuses: &[ReplicationStatus],
        cbw: &[(String, u64, u64)],
        now_ns: u64,
    ) -> String {
        let _one = self.scrape.lock();
        self.follow_cbw(cbw);
        for g in [
            &self.last_seq,
            &self.pending_bytes,
            &self.health,
            &self.points_kept,
            &self.stored_bytes,
            &self.resync_total,
            &self.resync_done,
        ] {
            g.clear();
        }
        self.point_age.clear();
        self.state.clear();
        for st in statuses {
            let role = st.role.to_ascii_lowercase();
            let l = VmRole {
                vm: st.vm.clone(),
                role: role.clone(),
            };
            if role == "primary" {
                // Both results exist from the first scrape: a query for failures finds 0,
                // not nothing.
                for r in ["success", "failure"] {
                    let _ = self.cycles.get_or_create(&Self::cycle_result(&st.vm, r));
                }
                self.pending_bytes
                    .get_or_create(&l)
                    .set(gauge_i64(st.pending_bytes));
            }
            self.health.get_or_create(&l).set(match st.health {
                Health::Normal => 0,
                Health::Warning => 1,
                Health::Critical => 2,
            });
            self.state
                .get_or_create(&VmRoleState {
                    vm: st.vm.clone(),
                    role: role.clone(),
                    state: format!("{:?}", st.state),
                })
                .set(1);
            self.last_seq.get_or_create(&l).set(gauge_i64(st.last_seq));
            let age_secs = match &st.replica {
                Some(r) => r.newest_point_age_secs.map(|s| s as f64),
                None => st
                    .last_replication_unix_ns
                    .map(|t| now_ns.saturating_sub(t) as f64 / 1e9),
            };
            if let Some(age) = age_secs {
                self.point_age.get_or_create(&l).set(age);
            }
            if let Some(r) = &st.replica {
                self.points_kept
                    .get_or_create(&l)
                    .set(gauge_i64(r.points_kept));
                self.stored_bytes
                    .get_or_create(&l)
                    .set(gauge_i64(r.journal_bytes));
            }
            // 0 when none runs (a finished one must not linger as its last value).
            if role == "primary" {
                let (total, done) = st
                    .resync
                    .as_ref()
                    .map_or((0, 0), |r| (r.bytes_total, r.bytes_done));
                self.resync_total.get_or_create(&l).set(gauge_i64(total));
                self.resync_done.get_or_create(&l).set(gauge_i64(done));
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding the metrics: {e}");
        }
        out
    }

    /// Adds to the copy-before-write counters what the trackers counted since the previous
    /// scrape. A total lower than last seen (the VM's disks were opened again) starts over
    /// from it: the counter only ever grows.
    fn follow_cbw(&self, cbw: &[(String, u64, u64)]) {
        let mut seen = self.cbw_seen.lock();
        for (vm, copied, spilled) in cbw {
            let l = VmRole::primary(vm);
            let (was_copied, was_spilled) = seen.get(vm).copied().unwrap_or((0, 0));
            let grow = |now: u64, was: u64| if now >= was { now - was } else { now };
            self.cbw_copied
                .get_or_create(&l)
                .inc_by(grow(*copied, was_copied));
            self.cbw_spilled
                .get_or_create(&l)
                .inc_by(grow(*spilled, was_spilled));
            seen.insert(vm.clone(), (*copied, *spilled));
        }
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics text: what a scraper that does not
/// ask for OpenMetrics (curl, `promtool check metrics`, older servers) reads. The two differ
/// only in a counter's family name (OpenMetrics names it without `_total`, its samples with),
/// `# UNIT` lines and the closing `# EOF`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbw_counters_never_go_backwards_when_a_tracker_starts_over() {
        let m = Metrics::new();
        m.follow_cbw(&[("vm".into(), 100, 10)]);
        m.follow_cbw(&[("vm".into(), 150, 10)]);
        // The disks were opened again: their totals restart from 0.
        m.follow_cbw(&[("vm".into(), 20, 0)]);
        let l = VmRole::primary("vm");
        assert_eq!(m.cbw_copied.get_or_create(&l).get(), 170);
        assert_eq!(m.cbw_spilled.get_or_create(&l).get(), 10);
    }

    #[test]
    fn every_primary_shows_zero_failures_before_its_first_failure() {
        let m = Metrics::new();
        let text = m.encode(&[], &[], 0);
        assert!(text.ends_with("# EOF\n"));
        m.cycle_failed("vm");
        let text = m.encode(&[], &[], 0);
        assert!(text
            .contains("understudy_cycles_total{vm=\"vm\",role=\"primary\",result=\"failure\"} 1"));
    }

    #[test]
    fn prometheus_text_names_counter_families_with_total_and_drops_openmetrics_lines() {
        let m = Metrics::new();
        m.cycle_failed("vm");
        let text = prometheus_text(&m.encode(&[], &[], 0));
        assert!(text.contains("# TYPE understudy_cycles_total counter\n"));
        assert!(text.contains("# HELP understudy_cycles_total Replication cycles"));
        assert!(text.contains("# TYPE understudy_cycle_duration_seconds histogram\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }
}
