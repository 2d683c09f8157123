//! Resynchronization by comparison (`docs/formats/resync.md`): both hosts hash their disks,
//! and only the blocks that differ cross; the result is a new point on top of the history
//! (the earlier points survive, byte for byte), equal to the primary at the resync's cut, also
//! while a guest writes throughout (the cut checker reads every point).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rand::SeedableRng;

/// The image of a disk edited while the daemon is stopped (its tracking cannot know what
/// changed): the relationship requires a resynchronization, and the resync ships the edits
/// only, not the 64 MiB disk with 40 MiB of data.
#[test]
fn resync_sends_only_the_blocks_that_differ_and_keeps_the_earlier_points() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (mut a, b) = pair(scratch);
    replicate(&a, &b, "web", &["64M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 1 0 40M"]);
    sync_until_ok(&a, "web", 20);
    let before = point_ids(&b, "web");
    let old_point = scratch.join("old-point.raw");
    export_point(
        &b,
        "web",
        &before.last().unwrap().to_string(),
        0,
        &old_point,
    );

    // Edited behind the daemon's back: 3 scattered 4 KiB blocks and 1 MiB.
    let image = disk_path(&a, "web", 0);
    a.stop();
    qemu_io_ok(
        image.to_str().unwrap(),
        &[
            "write -P 7 4096 4k",
            "write -P 8 20M 4k",
            "write -P 9 39M 4k",
            "write -P 10 50M 1M",
        ],
    );
    a.restart();
    wait_until("resync required", Duration::from_secs(20), || {
        status(&a, "web")["state"] == "ResynchronizationRequired"
    });
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    sync_until_ok(&a, "web", 30);
    wait_until("replicating", Duration::from_secs(30), || {
        status(&a, "web")["state"] == "Replicating"
    });
    let m = measure(&a, "web");
    let (sent, compared) = (
        m["resynchronized_bytes_total"].as_u64().unwrap(),
        m["resync_compared_bytes_total"].as_u64().unwrap(),
    );
    println!("resync compared {compared} bytes and sent {sent} (1 MiB + 12 KiB differ)");
    assert_eq!(compared, 64 << 20, "{m}");
    assert_eq!(sent, (1 << 20) + 3 * 4096, "only the edits cross: {m}");
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
    // The earlier points survive, unchanged: the resync is a new point on top.
    let after = point_ids(&b, "web");
    for p in &before {
        assert!(after.contains(p), "point {p} was dropped: {after:?}");
    }
    let again = scratch.join("old-point-again.raw");
    export_point(&b, "web", &before.last().unwrap().to_string(), 0, &again);
    assert!(files_equal(&old_point, &again), "an earlier point changed");
    // Hyper-V's 29242 / 29244: the compare's start and end, with what it found.
    let ev = events(&a);
    assert!(
        ev.iter().any(|e| e["id"] == 2016),
        "no compare-started event"
    );
    let done: Vec<String> = ev
        .iter()
        .filter(|e| e["id"] == 2017)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        done.iter().any(|m| m.contains("259 blocks differ")),
        "{done:?}"
    );
}

/// Resynchronizations started while a stamped-block workload writes to two disks: every
/// point, the resyncs' included, passes the cut checker (nothing torn or foreign, every write
/// acknowledged before the cut present, nothing after it), and the last equals the primary.
#[test]
fn resync_points_taken_while_a_guest_writes_pass_the_cut_checker() {
    require("nbdcopy", "libnbd-bin");
    let py = "/usr/bin/python3";
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M", "16M"], 1);
    let repo = repo_root();
    let log = root.path().join("workload.log");
    let blocks = "2048";
    let workload = Command::new(py)
        .arg(repo.join("tests/cutcheck/workload.py"))
        .args(["--uri", &a.nbd_uri("web", 0), "--uri", &a.nbd_uri("web", 1)])
        .args(["--connections", "2", "--qd", "8", "--blocks", blocks])
        .args(["--duration", "8", "--seed", "11"])
        .arg("--log")
        .arg(&log)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut resyncs = 0;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        if a.run(&["replication", "resume", "web", "--resynchronize"])
            .status
            .success()
        {
            resyncs += 1;
        }
        wait_until("the resync's point", Duration::from_secs(30), || {
            status(&a, "web")["state"] == "Replicating"
        });
    }
    let out = workload.wait_with_output().unwrap();
    assert!(out.status.success(), "workload failed");
    a.ok(&["replication", "sync", "web"]);
    assert_eq!(resyncs, 2);
    let m = measure(&a, "web");
    assert!(
        m["resync_compared_bytes_total"].as_u64().unwrap() >= 2 * (32 << 20),
        "{m}"
    );
    let mut args: Vec<String> = Vec::new();
    for p in b.json(&["points", "list", "web"]).as_array().unwrap() {
        let id = p["id"].as_u64().unwrap();
        let mut imgs = Vec::new();
        for disk in 0..2 {
            let f = root.path().join(format!("p{id}-d{disk}.raw"));
            export_point(&b, "web", &id.to_string(), disk, &f);
            imgs.push(f.display().to_string());
        }
        args.push("--point".into());
        args.push(format!("{}:{}", p["cut_time_unix_ns"], imgs.join(",")));
    }
    let check = Command::new(py)
        .arg(repo.join("tests/cutcheck/checker.py"))
        .arg("--log")
        .arg(&log)
        .args(["--blocks", blocks])
        .args(&args)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    println!("checker: {}", report.trim());
    assert!(
        check.status.success(),
        "cut checker found violations: {report}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for disk in 0..2 {
        assert!(latest_equals_primary(&a, &b, "web", disk, root.path()));
    }
}

/// Issue 11, "after a primary crash only the activity log's hot extents are compared, never the
/// whole disk": the first cycle after a kill -9 compares the recovered 4 MiB extents with the
/// replica and ships only the blocks that differ, not the extents whole.
#[test]
fn after_a_primary_crash_the_recovered_extents_are_compared_not_sent_whole() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (mut a, b) = pair(scratch);
    replicate(&a, &b, "web", &["64M"], 3600);
    let uri = a.nbd_uri("web", 0);
    // Incompressible data in two extents, replicated.
    let data = scratch.join("noise");
    let mut bytes = vec![0u8; 8 << 20];
    rand::Rng::fill(&mut rand::rngs::StdRng::seed_from_u64(5), &mut bytes[..]);
    std::fs::write(&data, &bytes).unwrap();
    qemu_io_ok(&uri, &[&format!("write -s {} 8M 8M", data.display())]);
    sync_until_ok(&a, "web", 20);
    // Two blocks written and never shipped, then kill -9: the activity log holds their extents.
    qemu_io_ok(&uri, &["write -P 7 8M 4k", "write -P 9 13M 4k"]);
    std::thread::sleep(Duration::from_secs(3));
    a.kill9();
    a.restart();
    assert_eq!(state(&a, "web"), "Replicating");
    let r = sync_until_ok(&a, "web", 20);
    let delta = r["delta_bytes"].as_u64().unwrap();
    assert!(
        delta <= 64 << 10,
        "the first cycle after the crash shipped {delta} bytes for two changed 4 KiB blocks in two 4 MiB extents"
    );
    let said: Vec<String> = events(&a)
        .iter()
        .filter(|e| e["id"] == 2017)
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        said.iter()
            .any(|m| m.contains("unclean stop") && m.contains("2 blocks differ")),
        "{said:?}"
    );
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
}
