//! Health over a monitoring interval, the Hyper-V Replica way: every reason in words with the
//! time it started, missed cycles in the interval, health changes as events (2040), and
//! `replication reset-statistics` (event 2041) clearing the Warning of failed cycles.

mod common;

use std::time::Duration;

use common::*;

fn reasons(st: &serde_json::Value) -> Vec<serde_json::Value> {
    st["health_reasons"].as_array().cloned().unwrap_or_default()
}

fn reason_of<'a>(st: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    st["health_reasons"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind)
}

fn health_events(h: &Host) -> Vec<String> {
    events(h)
        .into_iter()
        .filter(|e| e["id"] == 2040)
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn health_reasons_say_when_they_started_and_reset_statistics_restarts_measure() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 3600);
    let st = status(&a, "web");
    assert_eq!(st["health"], "Normal", "{st}");
    assert!(reasons(&st).is_empty(), "{st}");
    let before = proto_now();

    // The replica daemon stops: a sync fails; health says why, and since when.
    b.stop();
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 0x42 0 64k"]);
    assert!(!a.run(&["replication", "sync", "web"]).status.success());
    let st = status(&a, "web");
    assert_eq!(st["health"], "Warning", "{st}");
    let failing = reason_of(&st, "cycles_failing").unwrap_or_else(|| panic!("{st}"));
    assert!(
        failing["reason"]
            .as_str()
            .unwrap()
            .contains("failed in a row"),
        "{st}"
    );
    let since = failing["since"].as_str().expect("a start time");
    assert!(
        since >= before.as_str(),
        "since {since} before the failure ({before})"
    );
    // The text output names it too.
    let text = a.ok(&["replication", "status", "web"]);
    assert!(text.contains("(since "), "{text}");
    assert!(
        health_events(&a)
            .iter()
            .any(|m| m.contains("Normal -> Warning")),
        "no health change event: {:?}",
        events(&a)
    );
    let m = measure(&a, "web");
    assert!(m["failed_cycles"].as_u64().unwrap() >= 1, "{m}");

    // The replica is back (no retry of the task can fail any more), then reset-statistics:
    // measure counts from now.
    b.restart();
    sync_until_ok(&a, "web", 60);
    a.ok(&["replication", "reset-statistics", "web"]);
    let m = measure(&a, "web");
    assert_eq!(m["failed_cycles"], 0, "{m}");
    assert_eq!(m["successful_cycles"], 0, "{m}");
    assert_eq!(m["health"], "Normal", "{m}");
    let st = status(&a, "web");
    assert_eq!(st["health"], "Normal", "{st}");
    assert!(reasons(&st).is_empty(), "{st}");
    assert!(events(&a).iter().any(|e| e["id"] == 2041));
    assert!(
        health_events(&a)
            .iter()
            .any(|m| m.contains("Warning -> Normal")),
        "{:?}",
        health_events(&a)
    );
    // The replica goes away again: the next failure brings the Warning back.
    b.stop();
    assert!(!a.run(&["replication", "sync", "web"]).status.success());
    assert_eq!(status(&a, "web")["health"], "Warning");
    let out = a.run(&["replication", "reset-statistics", "nosuchvm"]);
    assert!(one_line_failure(&out).contains("nosuchvm"));
}

#[test]
fn missed_cycles_in_the_monitoring_interval_turn_health_warning_until_reset() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    // Every second: the cycles due in the interval pile up within seconds.
    replicate(&a, &b, "web", &["8M"], 1);
    std::thread::sleep(Duration::from_secs(3));
    b.stop();
    let mut st = serde_json::Value::Null;
    wait_until(
        "missed cycles to turn health Warning",
        Duration::from_secs(60),
        || {
            st = status(&a, "web");
            reason_of(&st, "cycles_missed").is_some()
        },
    );
    assert_eq!(st["health"], "Warning", "{st}");
    let missed = reason_of(&st, "cycles_missed").unwrap();
    let words = missed["reason"].as_str().unwrap();
    assert!(
        words.contains("monitoring interval (12h)") && words.contains("more than 20 %"),
        "{words}"
    );
    assert!(missed["since"].is_string(), "{st}");

    // The replica is back and the statistics reset: the interval starts again, Normal.
    b.restart();
    a.ok(&["replication", "reset-statistics", "web"]);
    wait_until("health back to Normal", Duration::from_secs(60), || {
        st = status(&a, "web");
        st["health"] == "Normal"
    });
    assert!(reason_of(&st, "cycles_missed").is_none(), "{st}");
}

#[test]
fn the_replica_host_judges_missed_cycles_with_the_primarys_frequency() {
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 1);
    // Cycles that keep up are not missed: more than the 5 due cycles the rule waits for.
    std::thread::sleep(Duration::from_secs(7));
    for (h, st) in [(&a, status(&a, "web")), (&b, status(&b, "web"))] {
        assert_eq!(st["health"], "Normal", "{}: {st}", h.name);
    }
    // The primary stops: no point commits on the replica host any more.
    a.stop();
    let mut st = serde_json::Value::Null;
    wait_until(
        "the replica to see missed cycles",
        Duration::from_secs(60),
        || {
            st = status(&b, "web");
            reason_of(&st, "cycles_missed").is_some()
        },
    );
    assert_eq!(st["role"], "Replica");
    assert_eq!(st["health"], "Warning", "{st}");
    a.restart();
}

#[test]
fn monitoring_interval_is_one_hour_to_seven_days() {
    let root = tempfile::tempdir().unwrap();
    let b = Host::start(root.path(), "replica");
    let storage = b.dir.join("storage");
    let storage = storage.to_str().unwrap();
    for bad in ["30m", "8d"] {
        let out = b.run(&[
            "replica-server",
            "enable",
            "--storage",
            storage,
            "--monitoring-interval",
            bad,
        ]);
        let err = one_line_failure(&out);
        assert!(err.contains("1h to 7d"), "{bad}: {err}");
    }
    b.ok(&[
        "replica-server",
        "enable",
        "--storage",
        storage,
        "--monitoring-interval",
        "2h",
    ]);
    let cfg = b.json(&["replica-server", "show"]);
    assert_eq!(cfg["monitoring_interval_secs"], 7200, "{cfg}");
}

/// Now as RFC 3339 UTC with milliseconds, like the daemon's times (comparable as strings).
fn proto_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// "No successful cycle" turns Warning after 3 cycles (or Hyper-V's hour) by default, and after
/// the admin's number of cycles when set (`replication set --lag-warning-cycles`).
#[test]
fn the_lag_warning_threshold_is_the_admins_when_set() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 1);
    a.ok(&["replication", "set", "web", "--lag-warning-cycles", "60"]);
    assert_eq!(status(&a, "web")["lag_warning_cycles"], 60);
    let out = a.run(&["replication", "set", "web", "--lag-warning-cycles", "5000"]);
    assert!(
        one_line_failure(&out).contains("give 1 to 1000 cycles"),
        "{out:?}"
    );
    b.stop();
    std::thread::sleep(Duration::from_secs(6));
    // 6 s without a point at 1 s cycles: under the admin's 60 cycles, no lag reason (the
    // failing cycles are a reason of their own).
    let st = status(&a, "web");
    assert!(reason_of(&st, "no_successful_cycle").is_none(), "{st}");
    assert!(reason_of(&st, "cycles_failing").is_some(), "{st}");
    // Back to the default: 3 cycles, so it is Warning now, since the threshold was crossed.
    a.ok(&["replication", "set", "web", "--lag-warning-cycles", "0"]);
    let st = status(&a, "web");
    assert!(st["lag_warning_cycles"].is_null(), "{st}");
    let lag = reason_of(&st, "no_successful_cycle").unwrap_or_else(|| panic!("{st}"));
    assert!(lag["reason"].as_str().unwrap().contains("s old"), "{st}");
    assert!(lag["since"].as_str().is_some(), "{st}");
}
