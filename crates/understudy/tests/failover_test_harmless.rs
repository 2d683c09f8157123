//! Promise "test failover is harmless": while a test failover VM (`NAME-test`) writes to its
//! disks, the primary runs the stamped-block workload of the cut checker (tests/cutcheck) and
//! new points keep arriving on the replica; every new point, served read-only (`points serve`),
//! passes the cut checker, and none holds a write of the test VM. After `failover stop --test`
//! nothing of the test VM remains: no VM, no export, no overlay file, and the replica is back
//! to replicating.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// How long the workload writes while cycles run every second.
const WORKLOAD_SECS: u32 = 8;
/// Blocks per disk the workload stamps (the first 8 MiB of each 16 MiB disk); the rest of
/// each disk is never written by the primary, so it must stay zeros in every point.
const BLOCKS: u32 = 2048;
const DISK: u64 = 16 << 20;
const STAMPED: u64 = BLOCKS as u64 * 4096;
const PY: &str = "/usr/bin/python3";

/// Exports `nbdinfo --list` shows on the host's NBD socket.
fn listed_exports(h: &Host) -> Vec<String> {
    let uri = format!("nbd+unix:///?socket={}", h.dir.join("nbd.sock").display());
    let out = sh(Command::new("nbdinfo").args(["--list", "--json"]).arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["export-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

#[test]
fn test_failover_is_harmless_points_keep_passing_the_cut_checker() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let ok = Command::new(PY)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "Debian's /usr/bin/python3 with python3-libnbd is required: apt-get install -y python3-libnbd");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    let size = format!("{}M", DISK >> 20);
    replicate(&a, &b, "web", &[&size, &size], 1);

    let base = point_ids(&b, "web").last().copied().unwrap();
    let info = b.json(&[
        "failover",
        "start",
        "web",
        "--test",
        "--point",
        &base.to_string(),
    ]);
    assert_eq!(info["served_as"], "web-test", "{info}");
    let test_vm = b.json(&["vm", "show", "web-test"]);
    let test_uris: Vec<String> = (0..2)
        .map(|i| test_vm["disks"][i]["nbd_uri"].as_str().unwrap().to_string())
        .collect();

    // The test VM writes 64 KiB blocks of one non-zero byte all over both its disks (stamped
    // region included: such a block in a point is foreign to the checker), while the primary
    // runs the stamped workload and cycles run every second.
    let writers: Vec<PatternWriter> = test_uris
        .iter()
        .enumerate()
        .map(|(i, u)| PatternWriter::start(u, DISK, 100 + i as u64))
        .collect();
    let log = root.path().join("workload.log");
    let seed = std::env::var("CUTCHECK_SEED").unwrap_or_else(|_| format!("{}", std::process::id()));
    println!("workload seed {seed} (replay with CUTCHECK_SEED={seed})");
    let repo = repo_root();
    let out = sh(Command::new(PY)
        .arg(repo.join("tests/cutcheck/workload.py"))
        .args(["--uri", &a.nbd_uri("web", 0), "--uri", &a.nbd_uri("web", 1)])
        .args(["--connections", "2", "--qd", "8"])
        .args(["--blocks", &BLOCKS.to_string()])
        .args(["--duration", &WORKLOAD_SECS.to_string(), "--seed", &seed])
        .arg("--log")
        .arg(&log));
    let summary: serde_json::Value =
        serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    println!("workload: {summary}");
    assert_eq!(summary["failed"], 0, "guest writes failed: {summary}");
    a.ok(&["replication", "sync", "web"]);
    for (i, w) in writers.into_iter().enumerate() {
        let (written, failed) = w.stop();
        println!("test VM disk {i}: {written} writes acknowledged, {failed} qemu-io runs failed");
        assert!(
            written > 0 && failed == 0,
            "the test VM wrote: {written}/{failed}"
        );
    }
    // The test VM's writes are on its disks (none of its blocks beyond the stamped region is
    // zeros any more, most likely; at least one is not).
    for u in &test_uris {
        let copy = root.path().join("test-vm.raw");
        let _ = std::fs::remove_file(&copy);
        copy_out(u, &copy);
        let data = std::fs::read(&copy).unwrap();
        assert!(
            data[STAMPED as usize..].iter().any(|&x| x != 0),
            "the test VM's writes are on its disk {u}"
        );
        let _ = std::fs::remove_file(&copy);
    }

    // Every point made during the test failover, served read-only: a valid cut of the
    // primary's workload, with nothing of the test VM.
    let points: Vec<serde_json::Value> = b.json(&["points", "list", "web"]).as_array().unwrap()[..]
        .iter()
        .filter(|p| p["id"].as_u64().unwrap() > base)
        .cloned()
        .collect();
    assert!(
        points.len() as u32 >= WORKLOAD_SECS / 2,
        "points kept arriving during the test failover: {} new",
        points.len()
    );
    let mut args: Vec<String> = Vec::new();
    for p in &points {
        let id = p["id"].as_u64().unwrap().to_string();
        let served = b.json(&["points", "serve", "web", "--point", &id]);
        let uris: Vec<String> = (0..2)
            .map(|i| served["disks"][i]["nbd_uri"].as_str().unwrap().to_string())
            .collect();
        for u in &uris {
            // Beyond the stamped region the primary never wrote: zeros, whatever the test VM
            // wrote there.
            sh(Command::new("qemu-io")
                .args(["-r", "-f", "raw", "-c"])
                .arg(format!("read -q -P 0 {STAMPED} {}", DISK - STAMPED))
                .arg(u));
        }
        args.push("--point".into());
        args.push(format!("{}:{}", p["cut_time_unix_ns"], uris.join(",")));
    }
    let out = Command::new(PY)
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
    assert_eq!(r["points_checked"].as_u64().unwrap(), points.len() as u64);
    for p in &points {
        b.ok(&["points", "unserve", "web", "--point", &p["id"].to_string()]);
    }

    // Stop: nothing of the test VM remains, and the replica is back to replicating.
    b.ok(&["failover", "stop", "web", "--test"]);
    let out = b.run(&["vm", "show", "web-test"]);
    assert!(!out.status.success(), "web-test is gone");
    let exports = listed_exports(&b);
    assert!(
        !exports.iter().any(|e| e.starts_with("web-test")),
        "no export of the test VM: {exports:?}"
    );
    for u in &test_uris {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k", u])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{u} is not served any more");
    }
    let left = files_under(&b.dir.join("failover"));
    assert!(left.is_empty(), "no overlay file remains: {left:?}");
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "Replicating", "{st}");
    assert_eq!(st["health"], "Normal", "{st}");
    let before = point_ids(&b, "web").last().copied().unwrap();
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 7 12M 64k"]);
    let after = sync_until_ok(&a, "web", 20)["seq"].as_u64().unwrap();
    assert!(after > before, "the replica still takes points");
}
