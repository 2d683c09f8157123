//! Prometheus metrics (`serve --metrics-listen`): the text passes `promtool check metrics`, a
//! real Prometheus server scrapes both daemons and answers what `replication status` says, a
//! failed cycle shows in `measure` and in `/metrics` alike, and no counter ever goes backwards
//! across a failing and recovering replica.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// `GET http://addr/metrics` with curl.
fn scrape(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scraping {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The samples of a scrape, by series (name and labels): value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The one sample of `name` whose labels contain every `labels` pair (`k="v"`).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l))
        })
        .map(|(_, v)| v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches several series");
    found.first().copied()
}

fn promtool_check(text: &str) {
    require("promtool", "prometheus");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Counter-like samples (`_total`, and a histogram's `_count`, `_sum` and `_bucket`) of
/// `after` are never below the same series in `before`.
fn assert_counters_grew(before: &str, after: &str) {
    let after = samples(after);
    for (series, was) in samples(before) {
        let name = series.split('{').next().unwrap_or("");
        let counter = name.ends_with("_total")
            || name.ends_with("_count")
            || name.ends_with("_sum")
            || name.ends_with("_bucket");
        if !counter {
            continue;
        }
        let now = after
            .get(&series)
            .unwrap_or_else(|| panic!("{series} disappeared"));
        assert!(*now >= was, "{series} went backwards: {was} -> {now}");
    }
}

struct Prometheus {
    child: Child,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server scraping `targets` every second, storing in `dir`.
fn start_prometheus(dir: &std::path::Path, targets: &[String]) -> (Prometheus, String) {
    require("prometheus", "prometheus");
    let config = dir.join("prometheus.yml");
    let list = targets
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: understudy\n    static_configs:\n      - targets: [{list}]\n"
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    (Prometheus { child }, addr)
}

/// An instant query's single value, if the result has exactly one series.
fn prom_query(prom: &str, query: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-G"])
        .arg(format!("http://{prom}/api/v1/query"))
        .args(["--data-urlencode", &format!("query={query}")])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// `serve` arguments for metrics on a port the kernel picks (no race for a free port).
const METRICS_ARGS: &[&str] = &["--metrics-listen", "127.0.0.1:0"];

/// Where `h` serves its metrics: the address its log names (the newest start's).
fn metrics_addr(h: &Host) -> String {
    const MARK: &str = "serving metrics on http://";
    let log = h.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(MARK))
        .unwrap_or_else(|| panic!("{} does not serve metrics:\n{log}", h.name));
    let rest = &line[line.find(MARK).unwrap() + MARK.len()..];
    rest.trim_end_matches("/metrics").trim().to_string()
}

/// A scrape of `addr` and `replication measure web` on `h` taken with no cycle ending between
/// them: the cycle counters of a scrape before and after the measure agree.
fn steady(h: &Host, addr: &str) -> (String, serde_json::Value) {
    let cycles = |text: &str| {
        samples(text)
            .into_iter()
            .filter(|(s, _)| s.starts_with("understudy_cycles_total{"))
            .collect::<Vec<_>>()
    };
    for _ in 0..20 {
        let before = scrape(addr);
        let m = measure(h, "web");
        let after = scrape(addr);
        if cycles(&before) == cycles(&after) {
            return (after, m);
        }
    }
    panic!("cycles kept ending between two scrapes");
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    require("qemu-io", "qemu-utils");
    require("curl", "curl");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair_with_args(root.path(), METRICS_ARGS, METRICS_ARGS);
    replicate(&a, &b, "web", &["32M"], 3600);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 0x5a 1M 2M", "read 0 64k"]);
    a.ok(&["replication", "sync", "web"]);

    let (ma, mb) = (metrics_addr(&a), metrics_addr(&b));
    let text_a = scrape(&ma);
    let text_b = scrape(&mb);
    promtool_check(&text_a);
    promtool_check(&text_b);
    // A client asking for OpenMetrics (as Prometheus does) gets it.
    let om = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "-H"])
        .arg("Accept: application/openmetrics-text; version=1.0.0")
        .arg(format!("http://{ma}/metrics"))
        .output()
        .unwrap();
    let om = String::from_utf8(om.stdout).unwrap();
    assert!(om.ends_with("# EOF\n"), "not OpenMetrics:\n{om}");
    assert!(om.contains("# TYPE understudy_cycles counter\n"), "{om}");

    // The primary's view matches status and measure.
    let st = status(&a, "web");
    let m = measure(&a, "web");
    let p = ["vm=\"web\"", "role=\"primary\""];
    assert_eq!(
        sample(&text_a, "understudy_last_point_seq", &p),
        st["last_seq"].as_f64()
    );
    assert_eq!(
        sample(
            &text_a,
            "understudy_cycles_total",
            &[p[0], p[1], "result=\"success\""]
        ),
        m["successful_cycles"].as_f64()
    );
    assert_eq!(
        sample(
            &text_a,
            "understudy_cycles_total",
            &[p[0], p[1], "result=\"failure\""]
        ),
        Some(0.0)
    );
    assert_eq!(sample(&text_a, "understudy_health", &p), Some(0.0));
    assert!(sample(&text_a, "understudy_recovery_point_age_seconds", &p).is_some());
    assert!(sample(&text_a, "understudy_shipped_bytes_total", &p).unwrap() > 0.0);
    assert!(sample(&text_a, "understudy_cycle_duration_seconds_count", &p).unwrap() >= 2.0);
    assert!(sample(&text_a, "understudy_cut_pause_seconds_count", &p).unwrap() >= 2.0);
    // qemu-io wrote and read through the daemon's NBD server.
    for op in ["write", "read"] {
        let l = ["export=\"web-0\"", &format!("op=\"{op}\"")];
        let count = sample(&text_a, "understudy_nbd_requests_total", &l[..]).unwrap_or(0.0);
        assert!(count >= 1.0, "no NBD {op} counted:\n{text_a}");
        assert_eq!(
            sample(
                &text_a,
                "understudy_nbd_request_duration_seconds_count",
                &l[..]
            ),
            Some(count)
        );
    }

    // The replica's view matches its status.
    let rs = status(&b, "web");
    let r = ["vm=\"web\"", "role=\"replica\""];
    assert_eq!(
        sample(&text_b, "understudy_points_kept", &r),
        rs["replica"]["points_kept"].as_f64()
    );
    assert_eq!(
        sample(&text_b, "understudy_last_point_seq", &r),
        rs["last_seq"].as_f64()
    );
    assert!(sample(&text_b, "understudy_apply_lag_seconds", &r).is_some());
    assert!(sample(&text_b, "understudy_points_committed_total", &r).unwrap() >= 1.0);

    // A real Prometheus scrapes both daemons; its answer is what status says.
    let prom_dir = root.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let (_prom, prom) = start_prometheus(&prom_dir, &[ma.clone(), mb.clone()]);
    let want = rs["last_seq"].as_f64().unwrap();
    let query = "understudy_last_point_seq{vm=\"web\",role=\"replica\"}";
    let mut got = None;
    wait_until(
        "prometheus to scrape the replica",
        Duration::from_secs(60),
        || {
            got = prom_query(&prom, query);
            got.is_some()
        },
    );
    assert_eq!(
        got,
        Some(want),
        "prometheus says {got:?}, status says {want}"
    );
    let up = format!("up{{instance=\"{ma}\"}}");
    wait_until(
        "prometheus to see the primary up",
        Duration::from_secs(60),
        || prom_query(&prom, &up) == Some(1.0),
    );
    let successes = "understudy_cycles_total{vm=\"web\",role=\"primary\",result=\"success\"}";
    let m = measure(&a, "web");
    assert_eq!(
        prom_query(&prom, successes),
        m["successful_cycles"].as_f64(),
        "prometheus and measure disagree on successful cycles"
    );
}

#[test]
fn a_failed_cycle_shows_in_measure_and_metrics_and_counters_never_go_backwards() {
    require("qemu-io", "qemu-utils");
    require("curl", "curl");
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair_with_args(
        root.path(),
        &[METRICS_ARGS, &["--hello-timeout", "3"]].concat(),
        &[],
    );
    let ma = metrics_addr(&a);
    replicate(&a, &b, "web", &["32M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 0x11 0 1M"]);
    a.ok(&["replication", "sync", "web"]);
    let mut previous = scrape(&ma);

    // The replica daemon stops: the sync fails, in measure and in /metrics alike.
    b.stop();
    qemu_io_ok(&uri, &["write -P 0x22 0 1M"]);
    let out = a.run(&["replication", "sync", "web"]);
    assert!(
        !out.status.success(),
        "sync with the replica down succeeded"
    );
    // The task retries on its own meanwhile: compare at a moment no cycle ended in between.
    let (text, m) = steady(&a, &ma);
    let failed = m["failed_cycles"].as_f64().unwrap();
    assert!(failed >= 1.0, "{m}");
    let f = ["vm=\"web\"", "role=\"primary\"", "result=\"failure\""];
    assert_eq!(
        sample(&text, "understudy_cycles_total", &f),
        Some(failed),
        "measure says {failed} failed cycles"
    );
    assert_counters_grew(&previous, &text);
    previous = text;

    // The replica comes back: cycles succeed again and nothing went backwards.
    b.restart();
    sync_until_ok(&a, "web", 60);
    qemu_io_ok(&uri, &["write -P 0x33 0 1M"]);
    sync_until_ok(&a, "web", 20);
    let (text, m) = steady(&a, &ma);
    promtool_check(&text);
    assert_counters_grew(&previous, &text);
    assert_eq!(
        sample(&text, "understudy_cycles_total", &f),
        m["failed_cycles"].as_f64()
    );
    assert_eq!(
        sample(
            &text,
            "understudy_cycles_total",
            &["vm=\"web\"", "role=\"primary\"", "result=\"success\""]
        ),
        m["successful_cycles"].as_f64()
    );
    assert!(
        sample(&text, "understudy_cycles_total", &f).unwrap() >= failed,
        "the failure counter went backwards"
    );
}

/// The byte counters and gauges beside the cycles: pending bytes, what compression and zero
/// detection saved, the replica's stored bytes, and a running resynchronization's progress
/// and resynchronized bytes, each equal to what `measure` and `status` say.
#[test]
fn byte_counters_pending_storage_and_a_running_resync_show_in_metrics() {
    require("qemu-io", "qemu-utils");
    require("curl", "curl");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair_with_args(scratch, METRICS_ARGS, METRICS_ARGS);
    let throttle = Throttle::start(b.addr(), 0);
    a.ok(&["vm", "create", "web", "--disk", "32M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &throttle.addr(),
        "--frequency",
        "3600",
        "--compression",
        "zstd",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    let (ma, mb) = (metrics_addr(&a), metrics_addr(&b));
    let p = ["vm=\"web\"", "role=\"primary\""];
    let uri = a.nbd_uri("web", 0);

    // Written and not shipped yet: pending, in measure and in /metrics alike.
    qemu_io_ok(&uri, &["write -P 0x5a 1M 2M", "write -z 8M 1M"]);
    let (text, m) = steady(&a, &ma);
    let pending = sample(&text, "understudy_pending_bytes", &p);
    assert_eq!(pending, m["pending_bytes"].as_f64(), "{m}");
    assert!(pending.unwrap() >= (2 << 20) as f64, "{m}");

    // Shipped: 2 MiB of one repeated byte compress to almost nothing, 1 MiB of zeros goes as
    // zero records.
    let before = scrape(&ma);
    a.ok(&["replication", "sync", "web"]);
    let after = scrape(&ma);
    let grew = |name: &str| {
        sample(&after, name, &p).unwrap_or(0.0) - sample(&before, name, &p).unwrap_or(0.0)
    };
    assert!(
        grew("understudy_compression_saved_bytes_total") >= (1 << 20) as f64,
        "{after}"
    );
    assert!(
        grew("understudy_zero_detection_saved_bytes_total") >= (1 << 20) as f64,
        "{after}"
    );
    assert_eq!(sample(&after, "understudy_pending_bytes", &p), Some(0.0));
    let (text, m) = steady(&a, &ma);
    for (metric, field) in [
        (
            "understudy_cbw_copied_bytes_total",
            "cbw_copied_bytes_total",
        ),
        (
            "understudy_cbw_spilled_bytes_total",
            "cbw_spilled_bytes_total",
        ),
    ] {
        assert_eq!(
            sample(&text, metric, &p).unwrap_or(0.0),
            m[field].as_f64().unwrap(),
            "{metric} vs measure {field}"
        );
    }

    // The replica's stored deltas, as its status says.
    let r = ["vm=\"web\"", "role=\"replica\""];
    let text_b = scrape(&mb);
    let stored = status(&b, "web")["replica"]["journal_bytes"].as_f64();
    assert_eq!(sample(&text_b, "understudy_stored_bytes", &r), stored);
    assert!(stored.unwrap() > 0.0);

    // A resynchronization held at 2 MiB/s: its progress shows while it runs.
    diverge(&a, "web", 8 << 20, 5, scratch);
    throttle.set_rate(2 << 20);
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    let mut seen = None;
    wait_until("the resync in /metrics", Duration::from_secs(30), || {
        let st = status(&a, "web");
        let text = scrape(&ma);
        let total = sample(&text, "understudy_resync_total_bytes", &p).unwrap_or(0.0);
        let done = sample(&text, "understudy_resync_done_bytes", &p).unwrap_or(0.0);
        if st["state"] == "Resynchronizing" && total > 0.0 {
            seen = Some((total, done, st["resync"]["bytes_total"].as_f64().unwrap()));
        }
        seen.is_some()
    });
    let (total, done, status_total) = seen.unwrap();
    assert_eq!(total, status_total, "resync_total_bytes vs status");
    assert!(done <= total, "done {done} of {total}");
    throttle.set_rate(0);
    wait_until("the resync to complete", Duration::from_secs(60), || {
        state(&a, "web") == "Replicating"
    });
    let (text, m) = steady(&a, &ma);
    let resynced = sample(&text, "understudy_resynchronized_bytes_total", &p);
    assert_eq!(resynced, m["resynchronized_bytes_total"].as_f64(), "{m}");
    assert!(resynced.unwrap() >= (8 << 20) as f64, "{m}");
    assert_eq!(
        sample(&text, "understudy_resync_total_bytes", &p),
        Some(0.0)
    );
    assert_eq!(sample(&text, "understudy_resync_done_bytes", &p), Some(0.0));
    promtool_check(&text);
}
