//! A backup pins its point: retention (every point older than 3 s retired here) hides and
//! merges the points around it while 1 s cycles commit, the point stays listed, pinned by `backup`, and the backup
//! equals it; once the backup ends, retention retires it. Its own test binary: the replica
//! daemon runs with the test-only `UNDERSTUDY_TEST_BACKUP_PAUSE_SECS`, which holds a backup
//! after it pinned its point.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn pinned_by(replica: &Host, vm: &str, point: u64) -> Option<Vec<String>> {
    replica
        .json(&["points", "list", vm])
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == point)
        .map(|p| {
            p["pinned_by"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        })
}

#[test]
fn a_point_retention_is_about_to_fold_is_pinned_by_its_backup_and_backed_up_exactly() {
    require("qemu-img", "qemu-utils");
    // The replica daemon inherits it (this binary has this one test).
    std::env::set_var("UNDERSTUDY_TEST_BACKUP_PAUSE_SECS", "8");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    // Every point older than 3 s is retired at the next retention pass (hidden, merged or
    // folded), but the newest.
    a.ok(&["vm", "create", "web", "--disk", "8M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "1",
        "--recovery-history",
        "0",
        "--keep-every-point-for",
        "3s",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    let writer = PatternWriter::start(&a.nbd_uri("web", 0), 8 << 20, seed());
    wait_until("3 points", Duration::from_secs(30), || {
        point_ids(&b, "web").len() >= 3
    });
    // The oldest point: the next retention pass folds it.
    let oldest = point_ids(&b, "web")[0];
    let dir = scratch.join("backup");
    let exe = env!("CARGO_BIN_EXE_understudy");
    let child = Command::new(exe)
        .arg("--data-dir")
        .arg(&b.dir)
        .args(["backup", "web", "--point", &oldest.to_string(), "--to"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the backup's pin", Duration::from_secs(10), || {
        pinned_by(&b, "web", oldest).is_some_and(|p| p == ["backup"])
    });
    let want = scratch.join("want.raw");
    export_point(&b, "web", &oldest.to_string(), 0, &want);
    // Retention goes on around the pinned point: newer points come and go, it stays.
    let start = *point_ids(&b, "web").last().unwrap();
    wait_until("5 more points", Duration::from_secs(30), || {
        *point_ids(&b, "web").last().unwrap() >= start + 5
    });
    let ids = point_ids(&b, "web");
    assert_eq!(ids[0], oldest, "the pinned point was retired: {ids:?}");
    let committed = (ids.last().unwrap() - oldest + 1) as usize;
    assert!(
        ids.len() + 3 <= committed,
        "retention stopped around the pin: {ids:?}"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = dir.join("disk-0.raw");
    assert!(
        files_equal(&got, &want),
        "the backup differs from point {oldest}"
    );
    // Released: retention retires it.
    wait_until("the point retired", Duration::from_secs(30), || {
        !point_ids(&b, "web").contains(&oldest)
    });
    writer.stop();
}
