//! Fsyncgate on the primary: after the image's storage reports a write-back error (an
//! fdatasync fails), every later FLUSH fails too, the VM needs resynchronization with the
//! reason, an event is recorded (also for a VM that does not replicate), and no clean-stop
//! marker is written. The error is injected with strace into the real daemon.
//!
//! And the space the guest's disk lives on: a cut whose copy-before-write would spill past
//! its cap is abandoned (the guest's writes succeed), and its blocks ship with the next one.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Flushes an export twice from one libnbd client (after a write to a hot extent), printing
/// "ok" or "err: <message>" per flush.
const FLUSH_TWICE: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x02" * 4096, 0)
for i in range(2):
    try:
        h.flush()
        print("ok")
    except nbd.Error as e:
        print("err:", e)
"#;

/// strace on the daemon so that the first fdatasync from now on fails with EIO.
fn inject_eio_on_next_fdatasync(pid: u32) -> Strace {
    Strace::attach(
        pid,
        &["trace=fdatasync", "inject=fdatasync:error=EIO:when=1"],
    )
}

fn flush_twice(uri: &str) -> Vec<String> {
    let out = sh(Command::new("/usr/bin/python3")
        .args(["-c", FLUSH_TWICE])
        .arg(uri));
    out.lines().map(str::to_string).collect()
}

fn storage_events(h: &Host, vm: &str) -> Vec<String> {
    events(h)
        .iter()
        .filter(|e| e["id"] == 1004 && e["vm"] == vm)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn failed_fdatasync_is_sticky_recorded_and_blocks_the_clean_marker() {
    require("strace", "strace");
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (mut p, r) = pair(root.path());
    replicate(&p, &r, "web", &["16M"], 3600);
    p.ok(&["vm", "create", "solo", "--disk", "4M"]);
    let pid = p.pid().unwrap();

    // Make extent 0 hot first: its activity-log fdatasync happens now, not under strace.
    let uri = p.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 1 0 4k"]);
    let strace = inject_eio_on_next_fdatasync(pid);
    let flushes = flush_twice(&uri);
    drop(strace);
    assert_eq!(flushes.len(), 2, "{flushes:?}");
    assert!(flushes[0].starts_with("err"), "first flush: {flushes:?}");
    assert!(
        flushes[1].starts_with("err"),
        "the second flush must fail too (fsyncgate): {flushes:?}"
    );
    // Sticky: a flush well after the injection still fails.
    assert!(flush_twice(&uri).iter().all(|f| f.starts_with("err")));

    let st = p.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert_eq!(st["health"], "Critical", "{st}");
    // The seed's "Write failure to tracking log file" row, named (docs/resync-triggers.md).
    assert_eq!(st["resync_condition"], "storage_write_failed", "{st}");
    assert_eq!(
        st["resync_condition_hyperv"], "Write failure to tracking log file",
        "{st}"
    );
    let reason = st["resync_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("disk 0: the primary's storage reported a write-back error (fdatasync: ")
            && reason.contains("may not be"),
        "{reason}"
    );
    let evs = storage_events(&p, "web");
    assert_eq!(evs.len(), 1, "one storage event per disk: {evs:?}");
    assert_eq!(evs[0], reason);

    // A VM that does not replicate gets the event.
    let solo = p.nbd_uri("solo", 0);
    qemu_io_ok(&solo, &["write -P 1 0 4k"]);
    let strace = inject_eio_on_next_fdatasync(pid);
    let flushes = flush_twice(&solo);
    drop(strace);
    assert!(flushes.iter().all(|f| f.starts_with("err")), "{flushes:?}");
    wait_until("the storage event of solo", Duration::from_secs(20), || {
        !storage_events(&p, "solo").is_empty()
    });

    // A clean daemon stop writes no clean-stop marker for the failed disks.
    let vms_dir = p.dir.join("vms");
    p.stop();
    for vm in ["web", "solo"] {
        let state_dir = vms_dir.join(vm).join("disk-0.state");
        assert!(
            Path::new(&state_dir).exists() && !state_dir.join("clean").exists(),
            "{vm}: clean marker written after a storage error"
        );
    }
    // The next start still says why the replica must be resynchronized.
    p.restart();
    let st = p.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    drop(r);
}

/// Rewrites the last block of an export until stdin closes; prints "ready" after the first
/// write.
const REWRITE_LAST_BLOCK: &str = r#"
import sys, nbd, threading
h = nbd.NBD()
h.connect_uri(sys.argv[1])
off = h.get_size() - 4096
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
i = 0
while not stop.is_set():
    h.pwrite(bytes([i % 251 + 1]) * 4096, off)
    if i == 0:
        print("ready", flush=True)
    i += 1
h.flush()
"#;

#[test]
fn spill_cap_abandons_the_cycle_and_the_next_one_ships_its_blocks() {
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    // No copy-before-write memory and no spill at all: the first copy abandons the epoch.
    let (p, r) = pair_with(root.path(), &["--cbw-memory", "0", "--cbw-spill-max", "0"]);
    replicate(&p, &r, "web", &["64M"], 3600);
    let uri = p.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 7 0 64M"]);

    // A guest that keeps rewriting the last block while the cut of the 64 MiB ships: its
    // first write after the cut needs a copy of a frozen block, which may not spill.
    let mut writer = Command::new("/usr/bin/python3")
        .args(["-c", REWRITE_LAST_BLOCK])
        .arg(&uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(writer.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    let out = p.run(&["replication", "sync", "web"]);
    drop(writer.stdin.take());
    let status = writer.wait().unwrap();
    assert!(status.success(), "every guest write succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the cycle was abandoned");
    assert!(
        stderr.contains("copy-before-write spill cap reached"),
        "{stderr}"
    );
    let st = p.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "Replicating", "{st}");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("copy-before-write spill cap reached"),
        "{st}"
    );
    assert!(
        st["pending_bytes"].as_u64().unwrap() >= 64 << 20,
        "the blocks stay dirty: {st}"
    );

    // Without the concurrent writer the next cycle ships them.
    sync_until_ok(&p, "web", 5);
    assert!(latest_equals_primary(&p, &r, "web", 0, root.path()));
}
