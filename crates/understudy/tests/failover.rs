//! Failover on the replica host: a test failover (`NAME-test`, copy-on-write over a point,
//! replication going on) that a real guest boots from and writes to, and a failover proper
//! (writable disks as `NAME`, the replica refusing to receive until it is stopped).

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Boots, checks the file replicated before the point, writes one of its own and powers off.
/// A second boot of the same disks finds the guest's own file too.
const GUEST_SCRIPT: &str = r#"
if ! mount -t ext4 /dev/vda /mnt; then echo GUEST-MOUNT-FAILED; poweroff -f; fi
echo "GUEST-FILE $(cat /mnt/hello.txt)"
if [ -f /mnt/guest.txt ]; then echo "GUEST-OWN $(cat /mnt/guest.txt)"; fi
echo "written-by-the-test-vm" > /mnt/guest.txt
sync
umount /mnt
echo GUEST-DONE
"#;

fn blockdev_of(disk: &serde_json::Value) -> (String, String) {
    (
        disk["qemu_blockdev"].as_str().unwrap().to_string(),
        disk["qemu_node_name"].as_str().unwrap().to_string(),
    )
}

/// `failover start --test` gives `NAME-test` over a point at once; a real guest boots from it,
/// mounts the replicated file system, writes, and finds its write after a reboot; replication
/// of the VM goes on meanwhile (new points applied, the test's point never folded); `failover
/// stop --test` throws the test VM and its writes away.
#[test]
fn a_real_guest_boots_from_test_and_unplanned_failover_while_replication_goes_on() {
    require("mkfs.ext4", "e2fsprogs");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let kit = guest::build(scratch, GUEST_SCRIPT);
    let (a, b) = pair_with_args(scratch, &[], &["--retain-points", "2"]);
    replicate_ext4(scratch, &a, &b, "fs", "replicated-before-the-point");
    let point = point_ids(&b, "fs").last().copied().unwrap();

    let info = b.json(&[
        "failover",
        "start",
        "fs",
        "--test",
        "--point",
        &point.to_string(),
    ]);
    assert_eq!(info["served_as"], "fs-test", "{info}");
    assert_eq!(info["point"], point, "{info}");
    let shown = b.json(&["vm", "show", "fs-test"]);
    assert_eq!(shown["disks"][0]["nbd_uri"], info["disks"][0]["nbd_uri"]);
    assert_eq!(status(&b, "fs")["state"], "TestFailoverInProgress");
    // One test failover per VM at a time.
    let err = one_line_failure(&b.run(&["failover", "start", "fs", "--test"]));
    assert!(err.contains("test failover"), "{err}");

    // Replication goes on: the primary's disk changes and new points are applied, more than
    // the replica keeps, so retention runs past the test's point (which it must not fold).
    let uri = a.nbd_uri("fs", 0);
    for i in 0..3 {
        qemu_io_ok(&uri, &[&format!("write -P {} 30M 512k", i + 1)]);
        sync_until_ok(&a, "fs", 20);
    }
    assert!(point_ids(&b, "fs").last().copied().unwrap() >= point + 3);

    let (blockdev, node) = blockdev_of(&info["disks"][0]);
    let mut g = guest::Guest::start(&kit, &[(blockdev.clone(), node.clone())]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        console.contains("GUEST-FILE replicated-before-the-point"),
        "{console}"
    );
    assert!(console.contains("GUEST-DONE"), "{console}");
    let mut g = guest::Guest::start(&kit, &[(blockdev, node)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        console.contains("GUEST-OWN written-by-the-test-vm"),
        "the test VM's write is on its disk: {console}"
    );
    // The test VM's writes never reach the replica's points.
    let st = status(&b, "fs");
    assert_eq!(st["health"], "Normal", "{st}");

    let out = b.ok(&["failover", "stop", "fs", "--test"]);
    assert!(out.contains("fs-test"), "{out}");
    assert!(!b.run(&["vm", "show", "fs-test"]).status.success());
    assert!(
        !b.dir.join("failover").join("fs-test").exists(),
        "nothing of the test VM remains"
    );
    assert_eq!(status(&b, "fs")["state"], "Replicating");
    let err = one_line_failure(&b.run(&["failover", "stop", "fs", "--test"]));
    assert!(err.contains("no test failover"), "{err}");

    // Unplanned failover to the same point: a guest boots from it, finds the replicated file
    // and none of the test VM's writes; completed, the VM keeps its write across a boot and
    // its file system checks clean.
    let info = b.json(&["failover", "start", "fs", "--point", &point.to_string()]);
    let (blockdev, node) = blockdev_of(&info["disks"][0]);
    let mut g = guest::Guest::start(&kit, &[(blockdev, node)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        console.contains("GUEST-FILE replicated-before-the-point"),
        "{console}"
    );
    assert!(
        !console.contains("GUEST-OWN"),
        "the test VM's write is gone: {console}"
    );
    b.ok(&["failover", "complete", "fs"]);
    let disk = b.json(&["vm", "show", "fs"])["disks"][0].clone();
    let (blockdev, node) = blockdev_of(&disk);
    let mut g = guest::Guest::start(&kit, &[(blockdev, node)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        console.contains("GUEST-OWN written-by-the-test-vm"),
        "{console}"
    );
    let copy = scratch.join("completed.raw");
    copy_out(disk["nbd_uri"].as_str().unwrap(), &copy);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// A failover proper: writable disks as `NAME` at the chosen point; starting again at another
/// point discards what was written; the replica refuses the primary meanwhile; `failover stop`
/// returns it to receiving. A test failover that survives a restart is served again.
#[test]
fn failover_to_a_point_and_back_to_receiving() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 1 0 1M"]);
    let p1 = sync_until_ok(&a, "web", 20)["seq"].as_u64().unwrap();
    qemu_io_ok(&uri, &["write -P 2 0 1M"]);
    let p2 = sync_until_ok(&a, "web", 20)["seq"].as_u64().unwrap();

    // Bad input first: nothing changes.
    let err = one_line_failure(&b.run(&["failover", "start", "nope"]));
    assert!(err.contains("nope"), "{err}");
    let err = one_line_failure(&b.run(&["failover", "start", "web", "--point", "999"]));
    assert!(err.contains("999"), "{err}");
    let err = one_line_failure(&a.run(&["failover", "start", "web"]));
    assert!(err.contains("web"), "{err}");
    assert_eq!(status(&b, "web")["state"], "Replicating");

    let info = b.json(&["failover", "start", "web", "--point", &p1.to_string()]);
    assert_eq!(info["served_as"], "web");
    let fo = b.json(&["vm", "show", "web"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(&fo, &["read -P 1 0 1M"]);
    qemu_io_ok(&fo, &["write -P 9 0 64k"]);
    qemu_io_ok(&fo, &["read -P 9 0 64k"]);
    assert_eq!(status(&b, "web")["state"], "FailedOverWaitingCompletion");
    // The primary is refused meanwhile, with the reason.
    qemu_io_ok(&uri, &["write -P 3 0 4k"]);
    let out = a.run(&["replication", "sync", "web"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failover"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another point: what was written is discarded.
    b.ok(&["failover", "start", "web", "--point", &p2.to_string()]);
    qemu_io_ok(&fo, &["read -P 2 0 1M"]);

    // A restart serves the failover again, with what was flushed.
    qemu_io_ok(&fo, &["write -P 7 1M 64k", "flush"]);
    b.stop();
    b.restart();
    let fo = b.json(&["vm", "show", "web"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(&fo, &["read -P 2 0 1M", "read -P 7 1M 64k"]);
    assert_eq!(status(&b, "web")["state"], "FailedOverWaitingCompletion");

    b.ok(&["failover", "stop", "web"]);
    assert_eq!(status(&b, "web")["state"], "Replicating");
    // The primary was told of the failover and fenced itself; with the failover stopped,
    // `replication resume` ends the fence.
    assert_eq!(status(&a, "web")["state"], "FencedAfterFailover");
    a.ok(&["replication", "resume", "web"]);
    let synced = sync_until_ok(&a, "web", 20);
    assert!(synced["seq"].as_u64().unwrap() > p2, "{synced}");
    let events = events(&b);
    assert!(events.iter().any(|e| e["id"] == 3030));
    assert!(events.iter().any(|e| e["id"] == 3031));
}

/// `failover complete`: the chosen point plus what was written on the failover disks become a
/// primary VM of the replica host (state FailedOver, Warning until it is protected again); the
/// replica's copy and its other points are gone; the old primary is refused; it all survives a
/// restart.
#[test]
fn failover_complete_makes_the_vm_a_primary_vm_of_the_replica_host() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 1 0 2M"]);
    let p1 = sync_until_ok(&a, "web", 20)["seq"].as_u64().unwrap();
    qemu_io_ok(&uri, &["write -P 2 0 2M"]);
    sync_until_ok(&a, "web", 20);

    let err = one_line_failure(&b.run(&["failover", "complete", "web"]));
    assert!(err.contains("failover start"), "{err}");
    b.ok(&["failover", "start", "web", "--point", &p1.to_string()]);
    let fo = b.json(&["vm", "show", "web"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(&fo, &["write -P 9 1M 64k"]);

    b.ok(&["failover", "complete", "web"]);
    let st = status(&b, "web");
    assert_eq!(st["role"], "Primary", "{st}");
    assert_eq!(st["state"], "FailedOver", "{st}");
    assert_eq!(st["health"], "Warning", "{st}");
    let disk = b.json(&["vm", "show", "web"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(
        &disk,
        &["read -P 1 0 1M", "read -P 9 1M 64k", "read -P 1 1088k 960k"],
    );
    assert!(
        !b.run(&["points", "list", "web"]).status.success(),
        "the replica's copy is gone"
    );
    assert!(!b.dir.join("failover").join("web").exists());
    // The old primary cannot ship to it.
    qemu_io_ok(&uri, &["write -P 3 0 4k"]);
    assert!(!a.run(&["replication", "sync", "web"]).status.success());

    b.stop();
    b.restart();
    let st = status(&b, "web");
    assert_eq!(st["state"], "FailedOver", "{st}");
    let disk = b.json(&["vm", "show", "web"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(
        &disk,
        &["read -P 9 1M 64k", "write -P 5 0 4k", "read -P 5 0 4k"],
    );
    let err = one_line_failure(&b.run(&["failover", "complete", "web"]));
    assert!(err.contains("web"), "{err}");
    assert!(events(&b).iter().any(|e| e["id"] == 3032));

    // Reverse: to a host that does not trust this one, refused in one line (nothing
    // changes); to the old primary, not prepared (an unplanned failover), it sends what can
    // differ (`split_brain.rs` proves what).
    let stranger = Host::start(root.path(), "stranger");
    let err = one_line_failure(&b.run(&[
        "replication",
        "reverse",
        "web",
        "--replica",
        &stranger.addr(),
    ]));
    assert!(err.contains("reverse"), "{err}");
    assert_eq!(status(&b, "web")["state"], "FailedOver");
    enable_replica_server(&a);
    let st = b.json(&["replication", "reverse", "web", "--replica", &a.addr()]);
    assert_eq!(st["state"], "Resynchronizing", "{st}");
    assert_eq!(status(&a, "web")["role"], "Replica");
    // Reverse of a VM that was not failed over here.
    let err = one_line_failure(&a.run(&["replication", "reverse", "web", "--replica", &b.addr()]));
    assert!(err.contains("FailedOver"), "{err}");
}

/// Planned failover with zero data loss: `failover prepare` refuses while a client uses the
/// disks, then fences the VM (its disks are no longer served), ships every last change and
/// waits for the replica's commit; both hosts say PreparedForFailover; the replica's latest
/// point holds the last write; a failover there to it and `complete` lose nothing.
/// `replication resume` cancels a prepare and serves the disks again.
#[test]
fn planned_failover_ships_every_last_change_and_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    for vm in ["web", "db"] {
        a.ok(&["vm", "create", vm, "--disk", "8M"]);
        a.ok(&[
            "replication",
            "enable",
            vm,
            "--replica",
            &b.addr(),
            "--frequency",
            "3600",
        ]);
        a.ok(&["replication", "start", vm, "--wait"]);
    }
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 4 0 1M"]); // acknowledged, not shipped yet

    // A client still connected: refused (retry later), nothing changed.
    let mut holder = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint('connected', flush=True)\ntime.sleep(30)",
            &uri,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    let out = a.run(&["failover", "prepare", "web"]);
    assert_eq!(out.status.code(), Some(75), "a transient refusal");
    let err = one_line_failure(&out);
    assert!(err.contains("shut the VM down"), "{err}");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(status(&a, "web")["state"], "Replicating");
    qemu_io_ok(&uri, &["read -P 4 0 1M"]);

    // The closed client's connection may take a moment to go: the refusal is transient (75)
    // and a retry succeeds.
    wait_until("the prepare", Duration::from_secs(20), || {
        let out = a.run(&["failover", "prepare", "web"]);
        assert!(
            out.status.success() || out.status.code() == Some(75),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success()
    });
    let st = status(&a, "web");
    assert_eq!(st["state"], "PreparedForFailover", "{st}");
    assert_eq!(st["pending_bytes"], 0, "{st}");
    wait_until(
        "the replica to say prepared",
        Duration::from_secs(30),
        || status(&b, "web")["state"] == "PreparedForFailover",
    );
    // Fenced: the disks are not served any more.
    let fenced = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &uri])
        .output()
        .unwrap();
    assert!(
        !fenced.status.success(),
        "a fenced VM's disk must not be served"
    );

    let info = b.json(&["failover", "start", "web"]);
    let fo = info["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
    qemu_io_ok(&fo, &["read -P 4 0 1M"]);
    b.ok(&["failover", "complete", "web"]);
    let disk = b.json(&["vm", "show", "web"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(&disk, &["read -P 4 0 1M"]);
    assert_eq!(status(&b, "web")["state"], "FailedOver");

    // Cancel: resume unfences.
    let db = a.nbd_uri("db", 0);
    prepare_until_ok(&a, "db");
    assert!(!Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &db])
        .output()
        .unwrap()
        .status
        .success());
    a.ok(&["replication", "resume", "db"]);
    assert_eq!(status(&a, "db")["state"], "Replicating");
    qemu_io_ok(&db, &["write -P 6 0 4k", "read -P 6 0 4k"]);
    sync_until_ok(&a, "db", 20);
}

/// Planned failover and failback with nothing lost: A→B (prepare on A, failover start and
/// complete on B, `replication reverse` on B: A takes the VM back as its replica with its own
/// disks as the base, so only what the VM wrote on B crosses), then B→A the same way; the VM
/// ends on A with every write of both sides.
#[test]
fn planned_failover_and_failback_round_trip_send_only_new_writes() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    enable_replica_server(&a);
    a.ok(&["vm", "create", "web", "--disk", "64M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    let on_a = a.nbd_uri("web", 0);
    qemu_io_ok(&on_a, &["write -P 1 0 32M"]);
    a.ok(&["replication", "start", "web", "--wait"]);
    qemu_io_ok(&on_a, &["write -P 2 0 1M"]);

    // A → B.
    prepare_until_ok(&a, "web");
    b.ok(&["failover", "start", "web"]);
    b.ok(&["failover", "complete", "web"]);
    let on_b = b.nbd_uri("web", 0);
    qemu_io_ok(
        &on_b,
        &["read -P 2 0 1M", "read -P 1 1M 31M", "write -P 3 8M 1M"],
    );
    let st = b.json(&[
        "replication",
        "reverse",
        "web",
        "--replica",
        &a.addr(),
        "--frequency",
        "3600",
    ]);
    assert_eq!(st["state"], "Replicating", "{st}");
    assert_eq!(st["role"], "Primary", "{st}");
    sync_until_ok(&b, "web", 20);
    // Every cycle since the reverse, together: the 1 MiB written on B, nothing of the 32 MiB
    // both hosts already held.
    let m = b.json(&["replication", "measure", "web"]);
    let shipped =
        m["average_delta_bytes"].as_u64().unwrap() * m["successful_cycles"].as_u64().unwrap();
    println!("reverse after a planned failover shipped {shipped} bytes of a 64 MiB disk (32 MiB written)");
    assert!(
        (1 << 20..=2 << 20).contains(&shipped),
        "only the failed-over VM's writes cross: {m}"
    );
    assert_eq!(a.json(&["replication", "status", "web"])["role"], "Replica");

    // B → A (failback).
    qemu_io_ok(&on_b, &["write -P 4 16M 1M"]);
    prepare_until_ok(&b, "web");
    a.ok(&["failover", "start", "web"]);
    a.ok(&["failover", "complete", "web"]);
    let st = a.json(&[
        "replication",
        "reverse",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    assert_eq!(st["state"], "Replicating", "{st}");
    let on_a = a.nbd_uri("web", 0);
    qemu_io_ok(
        &on_a,
        &[
            "read -P 2 0 1M",
            "read -P 1 1M 7M",
            "read -P 3 8M 1M",
            "read -P 1 9M 7M",
            "read -P 4 16M 1M",
            "read -P 1 17M 15M",
            "read -P 0 32M 32M",
        ],
    );
    qemu_io_ok(&on_a, &["write -P 5 0 4k"]);
    let back = sync_until_ok(&a, "web", 20);
    assert!(back["delta_bytes"].as_u64().unwrap() <= 1 << 20, "{back}");
    assert_eq!(b.json(&["replication", "status", "web"])["role"], "Replica");
}

/// Planned failover end to end with a real guest: a guest on the primary writes a file and shuts
/// down; `failover prepare` ships it; on the replica `failover start` and `complete`, and a
/// guest booted from the replica's disks finds the file; `e2fsck -fn` is clean.
#[test]
fn a_real_guest_finds_its_last_file_after_a_planned_failover() {
    require("mkfs.ext4", "e2fsprogs");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let kit = guest::build(scratch, GUEST_SCRIPT);
    let (a, b) = pair(scratch);
    replicate_ext4(scratch, &a, &b, "fs", "replicated-before-the-point");

    // The guest runs on the primary and writes its file; nothing has shipped it yet.
    let disk = a.json(&["vm", "show", "fs"])["disks"][0].clone();
    let mut g = guest::Guest::start(&kit, &[blockdev_of(&disk)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(console.contains("GUEST-DONE"), "{console}");

    wait_until("the prepare", Duration::from_secs(30), || {
        a.run(&["failover", "prepare", "fs"]).status.success()
    });
    b.ok(&["failover", "start", "fs"]);
    b.ok(&["failover", "complete", "fs"]);
    let disk = b.json(&["vm", "show", "fs"])["disks"][0].clone();
    let mut g = guest::Guest::start(&kit, &[blockdev_of(&disk)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        console.contains("GUEST-OWN written-by-the-test-vm"),
        "the file written on the primary just before the prepare: {console}"
    );
    let copy = scratch.join("after.raw");
    copy_out(disk["nbd_uri"].as_str().unwrap(), &copy);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
