//! The replica side under pressure: a small file-descriptor limit, a broken replica store, a
//! damaged journal. Real daemons on loopback, real tools.

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;

/// The AUDIT's reproduction limit (stands in for 1024 with ~16 VMs).
const NOFILE: &str = "256";
/// Replica VMs, and points per VM: past the 64 retained points, and enough for the old code
/// (one descriptor per retained journal file) to run out of descriptors under `NOFILE` (it
/// failed at point 59 of the first VM; 3 VMs × 63 retained files fit).
const FD_VMS: usize = 4;
const FD_POINTS: usize = 70;

fn nbd_read_ok(uri: &str) {
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(uri));
}

/// Regression (AUDIT §1): the replica held one descriptor per retained journal file, so under
/// a 256-descriptor limit commits failed for good once about 230 journal files were retained,
/// and on a host that is also a primary, NBD connections failed too. Now journal files go
/// through a bounded cache: every sync succeeds and the host's own VM stays reachable.
#[test]
fn replica_under_small_fd_limit_commits_every_cycle_and_keeps_serving_nbd() {
    require("qemu-io", "qemu-utils");
    require("prlimit", "util-linux");
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let a = Host::start(root.path(), "primary");
    let b = Host::start(root.path(), "replica");
    let pid = b.pid().unwrap().to_string();
    sh(Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={NOFILE}:{NOFILE}")]));
    trust_each_other(&a, &b);
    let storage = b.dir.join("storage");
    b.ok(&[
        "replica-server",
        "enable",
        "--storage",
        storage.to_str().unwrap(),
    ]);
    // The replica host is also a primary.
    b.ok(&["vm", "create", "local", "--disk", "4M"]);
    let local = b.nbd_uri("local", 0);
    nbd_read_ok(&local);

    let vms: Vec<String> = (0..FD_VMS).map(|i| format!("vm{i}")).collect();
    for vm in &vms {
        replicate(&a, &b, vm, &["4M"], 3600);
    }
    let uris: Vec<String> = vms.iter().map(|vm| a.nbd_uri(vm, 0)).collect();
    for p in 2..=FD_POINTS {
        for (vm, uri) in vms.iter().zip(&uris) {
            // A point with a DATA frame (the old index held a descriptor only for those).
            let write = format!("write -P {} {} 4k", p % 250, p * 4096);
            sh(Command::new("qemu-io")
                .args(["-f", "raw", "-c", &write])
                .arg(uri));
            let out = a.run(&["replication", "sync", vm]);
            assert!(
                out.status.success(),
                "sync of {vm} failed at point {p}: {}\n--- replica log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&b.log(), 20)
            );
        }
        if p % 10 == 0 {
            nbd_read_ok(&local);
        }
    }
    nbd_read_ok(&local);
    for vm in &vms {
        let st = a.json(&["replication", "status", vm]);
        assert_eq!(st["last_seq"], FD_POINTS as u64, "{st}");
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let journal = std::fs::read_dir(storage.join("vm0/journal"))
        .unwrap()
        .count();
    eprintln!(
        "took {:?}; replica has {fds} fds open, {journal} journal files of vm0; {}",
        started.elapsed(),
        limits
            .lines()
            .find(|l| l.contains("open files"))
            .unwrap_or("")
    );
}
