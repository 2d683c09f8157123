//! Promise 1, cut consistency: a stamped-block workload writes to two disks over several NBD
//! connections each while the VM replicates every second; every recovery point is exported
//! and checked by the cut checker (tests/cutcheck): nothing torn or foreign, every write
//! acknowledged before the cut present, nothing issued after it, write order kept across disks.
//! Run twice: with the default copy-before-write memory, and with 64 KiB of it, so that copies
//! spill to the tracker's file and the shipper reads the copies held in memory first.

mod common;

use std::process::Command;

use common::*;

/// How long the workload writes while cycles run every second.
const WORKLOAD_SECS: u32 = 8;
/// Blocks per disk the workload stamps (8 MiB of each disk).
const BLOCKS: u32 = 2048;

#[test]
fn every_recovery_point_is_a_valid_cut_across_two_disks() {
    let m = check_every_point(&[]);
    println!("copied before write: {}", m["cbw_copied_bytes_total"]);
}

#[test]
fn cuts_stay_valid_when_copies_spill_out_of_a_tiny_memory_pool() {
    let m = check_every_point(&["--cbw-memory", "64K"]);
    let (copied, spilled) = (
        m["cbw_copied_bytes_total"].as_u64().unwrap(),
        m["cbw_spilled_bytes_total"].as_u64().unwrap(),
    );
    println!("copied before write: {copied}, spilled: {spilled}");
    // Both paths were exercised: copies in memory and copies in the spill file.
    assert!(spilled > 0 && copied > spilled, "{m}");
}

/// Runs the workload against a pair whose primary has `serve_args`, checks every point, and
/// returns the primary's `replication measure`.
fn check_every_point(serve_args: &[&str]) -> serde_json::Value {
    require("nbdcopy", "libnbd-bin");
    let py = "/usr/bin/python3";
    let ok = Command::new(py)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "Debian's /usr/bin/python3 with python3-libnbd is required: apt-get install -y python3-libnbd");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair_with(root.path(), serve_args);
    replicate(&a, &b, "web", &["16M", "16M"], 1);

    let repo = repo_root();
    let log = root.path().join("workload.log");
    let seed = std::env::var("CUTCHECK_SEED").unwrap_or_else(|_| format!("{}", std::process::id()));
    println!("workload seed {seed} (replay with CUTCHECK_SEED={seed})");
    let out = sh(Command::new(py)
        .arg(repo.join("tests/cutcheck/workload.py"))
        .args(["--uri", &a.nbd_uri("web", 0), "--uri", &a.nbd_uri("web", 1)])
        .args([
            "--connections",
            "2",
            "--qd",
            "8",
            "--blocks",
            &BLOCKS.to_string(),
        ])
        .args(["--duration", &WORKLOAD_SECS.to_string(), "--seed", &seed])
        .arg("--log")
        .arg(&log));
    println!("workload: {}", out.trim());
    let summary: serde_json::Value =
        serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["failed"], 0, "guest writes failed: {summary}");
    assert!(
        summary["writes"].as_u64().unwrap() > 1000,
        "workload too small to prove anything: {summary}"
    );
    // One last cut after the workload stopped: it must hold every write.
    a.ok(&["replication", "sync", "web"]);

    let points = b.json(&["points", "list", "web"]);
    let points = points.as_array().unwrap().clone();
    let m = a.json(&["replication", "measure", "web"]);
    let mut args: Vec<String> = Vec::new();
    for p in &points {
        let id = p["id"].as_u64().unwrap();
        let mut imgs = Vec::new();
        for disk in 0..2 {
            let f = root.path().join(format!("p{id}-d{disk}.raw"));
            b.ok(&[
                "points",
                "export",
                "web",
                "--point",
                &id.to_string(),
                "--disk",
                &disk.to_string(),
                "--to",
                f.to_str().unwrap(),
            ]);
            imgs.push(f.display().to_string());
        }
        args.push("--point".into());
        args.push(format!("{}:{}", p["cut_time_unix_ns"], imgs.join(",")));
    }
    let out = Command::new(py)
        .arg(repo.join("tests/cutcheck/checker.py"))
        .arg("--log")
        .arg(&log)
        .args(["--blocks", &BLOCKS.to_string()])
        .args(&args)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("checker: {}", report.trim());
    assert!(
        out.status.success(),
        "cut checker found violations: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(report.trim().lines().last().unwrap()).unwrap();
    let checked = r["points_checked"].as_u64().unwrap();
    println!(
        "checked {checked} recovery points ({} writes, {} successful cycles, longest cut pause {} us)",
        summary["writes"], m["successful_cycles"], m["maximum_cut_pause_us"]
    );
    // Cycles every second over the workload: most of them must have produced a point.
    assert!(
        checked as u32 >= WORKLOAD_SECS / 2,
        "only {checked} points were made during the workload"
    );
    assert_eq!(m["failed_cycles"], 0, "{m}");
    m
}
