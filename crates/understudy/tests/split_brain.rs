//! Unplanned failover while the old primary is alive, or comes back: fencing by generation (the
//! old primary, once told, ships nothing more and its disks take no write, so two primaries
//! never both accept writes silently), and reverse replication that brings the old disks in
//! line by sending only the blocks that can differ, or every block when the old primary's
//! tracking cannot say, reported as such.

mod common;

use std::time::Duration;

use common::*;

/// Bytes shipped by every cycle of `vm` since its relationship began on `h`.
fn shipped(h: &Host, vm: &str) -> u64 {
    let m = h.json(&["replication", "measure", vm]);
    m["average_delta_bytes"].as_u64().unwrap() * m["successful_cycles"].as_u64().unwrap()
}

/// The exports `h` lists over NBD.
fn exports(h: &Host) -> String {
    sh(std::process::Command::new("nbdinfo")
        .arg("--list")
        .arg(format!(
            "nbd+unix://?socket={}",
            h.dir.join("nbd.sock").display()
        )))
}

fn a_copy_equals_b_disk(a: &Host, b: &Host, scratch: &std::path::Path) -> bool {
    let live = scratch.join("b-live.raw");
    let point = scratch.join("a-latest.raw");
    let _ = std::fs::remove_file(&live);
    let _ = std::fs::remove_file(&point);
    copy_out(&b.nbd_uri("web", 0), &live);
    export_point(a, "web", "latest", 0, &point);
    files_equal(&live, &point)
}

/// B fails over to an older point while A still runs. A's next cycle is refused with a named
/// reason; A fences the VM (a client already connected gets EPERM on every write, a new one
/// cannot connect), reports Critical, and stays so across a restart. After `failover complete`
/// on B, `replication reverse` sends only the blocks that can differ: the point B applied after
/// the chosen one, what the failed-over VM wrote, and what A had not shipped. A's copy then
/// equals B's disk.
#[test]
fn unplanned_failover_fences_the_old_primary_and_reverse_sends_only_what_differs() {
    require("nbdinfo", "libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (mut a, b) = pair(scratch);
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
    let first = *point_ids(&b, "web").last().unwrap();
    // A point B applies after the one it fails over to (1 MiB), and 1 MiB A never ships.
    qemu_io_ok(&on_a, &["write -P 2 0 1M"]);
    sync_until_ok(&a, "web", 20);
    qemu_io_ok(&on_a, &["write -P 3 40M 1M"]);

    // The "latest data is bad" story: B fails over to the older point, A still running.
    b.ok(&["failover", "start", "web", "--point", &first.to_string()]);
    let err = one_line_failure(&a.run(&["replication", "sync", "web"]));
    assert!(err.contains("FailedOverWaitingCompletion"), "{err}");
    let st = status(&a, "web");
    assert_eq!(st["state"], "FencedAfterFailover", "{st}");
    assert_eq!(st["health"], "Critical", "{st}");
    assert!(
        st["health_reasons"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("failed this VM over"),
        "{st}"
    );
    // No guest on A may write any more: no new connection, and nothing listed.
    let refused = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 9 0 4k", &on_a])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a write reached the fenced disk");
    assert!(!exports(&a).contains("web-0"), "{}", exports(&a));
    // Replication commands say how to get out.
    let err = one_line_failure(&a.run(&["replication", "suspend", "web"]));
    assert!(err.contains("replication reverse"), "{err}");
    // Cancelling is refused while B is failed over: the fence stays.
    one_line_failure(&a.run(&["replication", "resume", "web"]));
    assert_eq!(status(&a, "web")["state"], "FencedAfterFailover");
    // The fence survives a restart of A.
    a.stop();
    a.restart();
    let st = status(&a, "web");
    assert_eq!(st["state"], "FencedAfterFailover", "{st}");
    assert_ne!(st["health"], "Normal", "{st}");
    assert!(!exports(&a).contains("web-0"));

    // B's VM writes, completes, and reverses to A.
    qemu_io_ok(&b.nbd_uri("web", 0), &["write -P 4 8M 1M"]);
    b.ok(&["failover", "complete", "web"]);
    let st = b.json(&[
        "replication",
        "reverse",
        "web",
        "--replica",
        &a.addr(),
        "--frequency",
        "3600",
    ]);
    assert_eq!(st["role"], "Primary", "{st}");
    sync_until_ok(&b, "web", 20);
    wait_until("B replicating", Duration::from_secs(20), || {
        status(&b, "web")["state"] == "Replicating"
    });
    let sent = shipped(&b, "web");
    println!("reverse after an unplanned failover shipped {sent} bytes of a 64 MiB disk (3 MiB can differ)");
    assert!(
        (3 << 20..=4 << 20).contains(&sent),
        "only the blocks that can differ cross ({sent} bytes)"
    );
    assert_eq!(status(&a, "web")["role"], "Replica");
    assert!(
        a_copy_equals_b_disk(&a, &b, scratch),
        "A's copy differs from B's disk"
    );
    qemu_io_ok(
        &b.nbd_uri("web", 0),
        &[
            "read -P 1 0 8M",
            "read -P 4 8M 1M",
            "read -P 1 9M 23M",
            "read -P 0 32M 32M",
        ],
    );
    let reversed = events(&a)
        .into_iter()
        .chain(events(&b))
        .filter(|e| e["id"] == 2013)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    assert!(
        reversed
            .iter()
            .any(|m| m.contains("only the blocks that can differ")),
        "{reversed:?}"
    );
}

/// The old primary is down while B fails over and completes; when it comes back its first
/// cycle is refused and it is fenced, never Normal. `replication remove` is the admin forcing
/// the disks back into service there (the replica's copy is untouched).
#[test]
fn an_old_primary_back_after_a_failover_is_fenced_until_removed() {
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let on_a = a.nbd_uri("web", 0);
    qemu_io_ok(&on_a, &["write -P 1 0 1M"]);
    sync_until_ok(&a, "web", 20);
    a.stop();
    b.ok(&["failover", "start", "web"]);
    b.ok(&["failover", "complete", "web"]);
    a.restart();
    // Whatever A says first (a hello of its start or a cycle), it learns and fences.
    let _ = a.run(&["replication", "sync", "web"]);
    wait_until("A fenced", Duration::from_secs(20), || {
        status(&a, "web")["state"] == "FencedAfterFailover"
    });
    let st = status(&a, "web");
    assert_eq!(st["health"], "Critical", "{st}");
    let err = one_line_failure(&a.run(&["replication", "sync", "web"]));
    assert!(err.contains("FencedAfterFailover"), "{err}");
    let removed = a.ok(&["replication", "remove", "web"]);
    assert!(removed.contains("fence is lifted"), "{removed}");
    qemu_io_ok(&on_a, &["write -P 2 0 4k", "read -P 1 4k 1020k"]);
    one_line_failure(&a.run(&["replication", "status", "web"]));
    // B is untouched: its VM still reads the failover's data.
    qemu_io_ok(&b.nbd_uri("web", 0), &["read -P 1 0 1M"]);
    // A replica host refuses to remove what it does not replicate.
    let err = one_line_failure(&b.run(&["replication", "remove", "nosuch"]));
    assert!(err.contains("nosuch"), "{err}");
}

/// An old primary whose tracking cannot say what differs (a resynchronization is pending
/// there: what it holds may differ anywhere) has every block compared at a reverse (the
/// resync engine: only what differs is sent), and the reverse says so.
#[test]
fn reverse_to_an_old_primary_without_trusted_tracking_compares_every_block() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    enable_replica_server(&a);
    replicate(&a, &b, "web", &["16M"], 3600);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 1 0 8M"]);
    sync_until_ok(&a, "web", 20);
    a.ok(&[
        "replication",
        "resume",
        "web",
        "--resynchronize",
        "--at",
        "2099-01-01T00:00:00Z",
    ]);
    assert_eq!(status(&a, "web")["state"], "WaitingForStartResynchronize");
    b.ok(&["failover", "start", "web"]);
    b.ok(&["failover", "complete", "web"]);
    let st = b.json(&[
        "replication",
        "reverse",
        "web",
        "--replica",
        &a.addr(),
        "--frequency",
        "3600",
    ]);
    assert_eq!(st["state"], "Resynchronizing", "{st}");
    assert!(
        st["resync_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("every block"),
        "{st}"
    );
    sync_until_ok(&b, "web", 20);
    wait_until("B replicating", Duration::from_secs(20), || {
        status(&b, "web")["state"] == "Replicating"
    });
    // Both hold the same data: all 16 MiB compared, next to nothing sent.
    let m = b.json(&["replication", "measure", "web"]);
    assert_eq!(m["resync_compared_bytes_total"], 16 << 20, "{m}");
    assert!(
        m["resynchronized_bytes_total"].as_u64().unwrap() < 1 << 20,
        "{m}"
    );
    assert!(
        a_copy_equals_b_disk(&a, &b, scratch),
        "A's copy differs from B's disk"
    );
    qemu_io_ok(&b.nbd_uri("web", 0), &["read -P 1 0 8M", "read -P 0 8M 8M"]);
}
