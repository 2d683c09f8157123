//! End-to-end replication between two daemons on loopback over mutual TLS: initial
//! replication, cycles, `sync`, points and exports byte-equal to the primary, status and
//! measure, suspend/resume, disk subsets and compression off.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    sh(c.arg(uri));
}

#[test]
fn replicate_two_disks_and_export_points_equal_to_the_primary() {
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "256M", "--disk", "32M"]);
    let (u0, u1) = (a.nbd_uri("web", 0), a.nbd_uri("web", 1));
    qemu_io(&u0, &["write -P 0x11 0 1M", "write -P 0x22 100M 3M"]);
    qemu_io(&u1, &["write -P 0x33 4k 8k"]);

    let out = a.run(&["replication", "status", "web"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not enabled"));
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "30",
    ]);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "ReadyForInitialReplication");
    a.ok(&["replication", "start", "web", "--wait"]);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "Replicating", "{st}");
    assert_eq!(st["health"], "Normal", "{st}");
    assert!(st["last_replication_time"].is_string());
    assert_eq!(st["last_seq"], 1);

    // Initial replication is sparse-aware: far less than 288 MiB went over the wire.
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["successful_cycles"], 1);
    assert!(
        m["sent_bytes_total"].as_u64().unwrap() < 8 << 20,
        "initial replication sent too much: {m}"
    );

    // Changes after the initial copy, then a forced cycle.
    qemu_io(
        &u0,
        &[
            "write -P 0x44 512k 64k",
            "write -z 100M 1M",
            "discard 101M 1M",
        ],
    );
    qemu_io(&u1, &["write -P 0x55 16M 1M"]);
    let sync = a.json(&["replication", "sync", "web"]);
    assert_eq!(sync["seq"], 2);

    let points = b.json(&["points", "list", "web"]);
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 2, "{points:?}");
    assert_eq!(points[0]["kind"], "Initial");
    assert_eq!(points[1]["kind"], "Latest");
    assert_eq!(points[1]["delta_kind"], "Incremental");
    assert_eq!(points[1]["consistency"], "crash");
    for disk in 0..2 {
        let exported = root.path().join(format!("p-{disk}.raw"));
        b.ok(&[
            "points",
            "export",
            "web",
            "--point",
            "latest",
            "--disk",
            &disk.to_string(),
            "--to",
            exported.to_str().unwrap(),
        ]);
        let live = root.path().join(format!("live-{disk}.raw"));
        copy_out(&a.nbd_uri("web", disk), &live);
        assert!(
            files_equal(&exported, &live),
            "disk {disk}: latest point differs from the primary"
        );
    }
    // The first point still holds the state before the changes.
    let first = root.path().join("first.raw");
    b.ok(&[
        "points",
        "export",
        "web",
        "--point",
        "1",
        "--disk",
        "0",
        "--to",
        first.to_str().unwrap(),
    ]);
    sh(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x11 512k 64k",
            "-c",
            "read -P 0x22 100M 2M",
        ])
        .arg(&first));

    // Replica-side status.
    let rs = b.json(&["replication", "status", "web"]);
    assert_eq!(rs["role"], "Replica");
    assert_eq!(rs["last_seq"], 2);

    // Suspend: cycles refuse, changes stay pending; resume: the next sync ships them.
    a.ok(&["replication", "suspend", "web"]);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "Suspended");
    assert_eq!(st["health"], "Warning");
    qemu_io(&u0, &["write -P 0x66 2M 1M"]);
    let out = a.run(&["replication", "sync", "web"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "sync while suspended must be a transient refusal"
    );
    assert!(
        a.json(&["replication", "status", "web"])["pending_bytes"]
            .as_u64()
            .unwrap()
            >= 1 << 20
    );
    a.ok(&["replication", "resume", "web"]);
    a.ok(&["replication", "sync", "web"]);
    assert_eq!(
        a.json(&["replication", "status", "web"])["pending_bytes"],
        0
    );
    let exported = root.path().join("after-resume.raw");
    b.ok(&[
        "points",
        "export",
        "web",
        "--disk",
        "0",
        "--to",
        exported.to_str().unwrap(),
    ]);
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x66 2M 1M"])
        .arg(&exported));

    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["successful_cycles"], 4, "{m}");
    assert_eq!(m["failed_cycles"], 0, "{m}");
    assert!(m["maximum_delta_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn disk_subset_uncompressed_and_periodic_cycles() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "db", "--disk", "16M", "--disk", "16M"]);
    let out = a.run(&[
        "replication",
        "enable",
        "db",
        "--replica",
        &b.addr(),
        "--frequency",
        "0",
    ]);
    assert!(!out.status.success());
    let out = a.run(&[
        "replication",
        "enable",
        "db",
        "--replica",
        &b.addr(),
        "--disks",
        "0,7",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no disk 7"));
    a.ok(&[
        "replication",
        "enable",
        "db",
        "--replica",
        &b.addr(),
        "--frequency",
        "1",
        "--compression",
        "none",
        "--disks",
        "1",
    ]);
    a.ok(&["replication", "start", "db", "--wait"]);
    qemu_io(&a.nbd_uri("db", 1), &["write -P 0x77 0 1M"]);
    // Periodic cycles every second pick the change up without a sync.
    wait_until("a periodic cycle", Duration::from_secs(20), || {
        a.json(&["replication", "status", "db"])["last_seq"]
            .as_u64()
            .unwrap()
            >= 2
    });
    let m = a.json(&["replication", "measure", "db"]);
    // Without compression the 1 MiB of 0x77 crosses the wire as is.
    assert!(m["sent_bytes_total"].as_u64().unwrap() >= 1 << 20, "{m}");
    let p = root.path().join("d1.raw");
    b.ok(&[
        "points",
        "export",
        "db",
        "--disk",
        "1",
        "--to",
        p.to_str().unwrap(),
    ]);
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x77 0 1M"])
        .arg(&p));
    let out = b.run(&[
        "points",
        "export",
        "db",
        "--disk",
        "0",
        "--to",
        p.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "disk 0 is not replicated; exporting it must fail"
    );
}

#[test]
fn import_converts_qcow2_and_replicates_it() {
    require("qemu-img", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    let q = root.path().join("src.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&q)
        .arg("32M"));
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 2M"])
        .arg(&q));
    a.ok(&["vm", "import", "imp", "--image", q.to_str().unwrap()]);
    let v = a.json(&["vm", "show", "imp"]);
    assert_eq!(v["disks"][0]["size_bytes"], 32 << 20);
    sh(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 1M 2M",
        "-c",
        "read -P 0 0 1M",
        v["disks"][0]["nbd_uri"].as_str().unwrap(),
    ]));
    a.ok(&[
        "replication",
        "enable",
        "imp",
        "--replica",
        &b.addr(),
        "--frequency",
        "30",
    ]);
    a.ok(&["replication", "start", "imp", "--wait"]);
    let p = root.path().join("imp.raw");
    b.ok(&["points", "export", "imp", "--to", p.to_str().unwrap()]);
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5a 1M 2M"])
        .arg(&p));
    // A failed import leaves nothing behind: the name can be used again.
    let odd = root.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let out = a.run(&["vm", "import", "odd", "--image", odd.to_str().unwrap()]);
    assert!(!out.status.success(), "a 1000-byte image was imported");
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 KiB"));
    a.ok(&["vm", "create", "odd", "--disk", "1M"]);
    // Refusals: duplicate name, bad name, missing image.
    assert!(!a
        .run(&["vm", "import", "imp", "--image", q.to_str().unwrap()])
        .status
        .success());
    assert!(!a
        .run(&["vm", "create", "bad/name", "--disk", "1M"])
        .status
        .success());
    assert!(!a
        .run(&["vm", "import", "x", "--image", "/nonexistent.qcow2"])
        .status
        .success());
}

#[test]
fn start_wait_timeout_gives_up_transiently_and_replication_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    a.ok(&["vm", "create", "slow", "--disk", "8M"]);
    a.ok(&[
        "replication",
        "enable",
        "slow",
        "--replica",
        &b.addr(),
        "--frequency",
        "1",
    ]);
    b.kill9();
    let out = a.run(&["replication", "start", "slow", "--wait", "--timeout", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("not complete after 2 s"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    b.restart();
    wait_until(
        "initial replication after the replica returned",
        Duration::from_secs(60),
        || a.json(&["replication", "status", "slow"])["state"] == "Replicating",
    );
}

/// The replica's status names its primary, also after the replica daemon restarted and before
/// the primary's next hello (it used to be empty then).
#[test]
fn replica_status_names_its_primary_and_its_own_facts_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(tmp.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(
        (st["role"].as_str(), st["peer"].as_str()),
        (Some("Replica"), Some("primary")),
        "{st}"
    );
    b.stop();
    b.restart();
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(st["peer"], "primary", "{st}");
    assert_eq!(st["last_seq"], 1, "{st}");
    // Its own facts, not zeros.
    assert_eq!(st["replica"]["points_kept"], 1, "{st}");
    assert!(st["replica"]["newest_point_age_secs"].is_u64(), "{st}");
    let p = a.json(&["replication", "status", "web"]);
    assert!(p["replica"].is_null(), "{p}");
}
