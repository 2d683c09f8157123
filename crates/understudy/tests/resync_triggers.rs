//! One test per row of Hyper-V Replica's table of resynchronization triggers
//! (`docs/resync-triggers.md`): each condition is detected by real daemons, named in
//! `replication status` (`resync_condition` and the Hyper-V condition), with health Critical
//! and event 2004 naming it. The conditions are made with the tools an admin would use
//! (qemu-io, qemu-img, cp, a restored copy of a directory); the tracking-write failure is an
//! EIO injected with strace into the fdatasync of the activity log only.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn tools() {
    require("qemu-io", "qemu-utils");
    require("qemu-img", "qemu-utils");
}

/// Waits until `vm` on `h` requires a resynchronization, then asserts that it is named
/// `condition` (with its Hyper-V condition), that health is Critical, and that event 2004
/// names the condition. Returns the status.
fn assert_resync_named(h: &Host, vm: &str, condition: &str) -> serde_json::Value {
    wait_until(
        &format!("{vm} on {} to require resynchronization", h.name),
        Duration::from_secs(30),
        || status(h, vm)["state"] == "ResynchronizationRequired",
    );
    let st = status(h, vm);
    println!(
        "{}: {} / {} / {}",
        h.name, st["resync_condition"], st["resync_condition_hyperv"], st["resync_reason"]
    );
    assert_eq!(st["health"], "Critical", "{st}");
    assert_eq!(st["resync_condition"], condition, "{st}");
    assert!(
        st["resync_condition_hyperv"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{st}"
    );
    assert!(
        st["health_reasons"].to_string().contains(condition),
        "the health reason must name the condition: {st}"
    );
    wait_until(
        &format!("event 2004 naming {condition} on {}", h.name),
        Duration::from_secs(10),
        || {
            events(h).iter().any(|e| {
                e["id"] == 2004
                    && e["vm"] == vm
                    && e["message"].as_str().is_some_and(|m| m.contains(condition))
            })
        },
    );
    st
}

fn image_of(h: &Host, vm: &str) -> PathBuf {
    h.dir.join("vms").join(vm).join("disk-0.raw")
}

fn state_dir_of(h: &Host, vm: &str) -> PathBuf {
    h.dir.join("vms").join(vm).join("disk-0.state")
}

fn cp_preserve(from: &Path, to: &Path) {
    sh(Command::new("cp").arg("--preserve=all").arg(from).arg(to));
}

/// Row "Modify VHD when VM is turned off": a write into the image while the daemon is stopped.
#[test]
fn image_written_while_stopped_is_modified_while_off() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    a.stop();
    qemu_io_ok(
        image_of(&a, "web").to_str().unwrap(),
        &["write -q -P 0x99 1M 64k"],
    );
    a.restart();
    assert_resync_named(&a, "web", "modified_while_off");
}

/// Row "Modify VHD when VM is turned off", after an unclean stop: the activity log covers the
/// daemon's own writes; the heartbeat says the image changed after the daemon died.
#[test]
fn image_written_after_a_crash_is_modified_while_off() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x11 0 64k"]);
    a.kill9();
    // Past the heartbeat's slack (1 s interval + 2 s): the known gap is an edit within it.
    std::thread::sleep(Duration::from_secs(4));
    qemu_io_ok(
        image_of(&a, "web").to_str().unwrap(),
        &["write -q -P 0x99 8M 64k"],
    );
    a.restart();
    assert_resync_named(&a, "web", "modified_while_off");
}

/// Row "Reverting the volume to an older point in time" (volume/snapshot backup and
/// restore): an older copy of the image, taken with its timestamps, copied back over it with
/// them (`cp --preserve=all`): same inode, same size, an mtime that went back.
#[test]
fn older_copy_restored_over_the_image_is_reverted_to_older() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let image = image_of(&a, "web");
    let older = root.path().join("web-older.raw");
    a.stop();
    cp_preserve(&image, &older);
    a.restart();
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x22 0 1M"]);
    sync_until_ok(&a, "web", 10);
    a.stop();
    cp_preserve(&older, &image);
    a.restart();
    let st = assert_resync_named(&a, "web", "reverted_to_older");
    assert!(
        st["resync_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("older copy"),
        "{st}"
    );
    let _ = std::fs::remove_file(&older);
}

/// Row "Reverting the volume to an older point in time", the whole VM directory (image and
/// its tracker state, clean-stop marker included) restored from a backup with `cp -a`: the
/// restored marker matches the restored image's size and mtime, but not its ctime.
#[test]
fn vm_directory_restored_with_its_tracker_state_is_reverted_to_older() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let dir = a.dir.join("vms/web");
    let backup = root.path().join("web-backup");
    a.stop();
    sh(Command::new("cp").arg("-a").arg(&dir).arg(&backup));
    a.restart();
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x21 0 1M"]);
    sync_until_ok(&a, "web", 10);
    a.stop();
    // Restored in place (`cp -a backup/. dir/`): same inodes, the backup's timestamps.
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", backup.display()))
        .arg(&dir));
    a.restart();
    assert_resync_named(&a, "web", "reverted_to_older");
    let _ = std::fs::remove_dir_all(&backup);
}

/// Row "Reverting the VM to an older snapshot": the snapshot's bytes written back into the
/// raw image (`qemu-img convert -n`, what reverting a raw file to a saved copy is). The
/// image's mtime moves forward, so this reads as a modification, named as such.
#[test]
fn snapshot_bytes_copied_back_into_the_image_are_modified_while_off() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let image = image_of(&a, "web");
    let snapshot = root.path().join("web-snapshot.raw");
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x33 0 1M"]);
    sync_until_ok(&a, "web", 10);
    a.stop();
    std::fs::copy(&image, &snapshot).unwrap();
    a.restart();
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x44 0 1M"]);
    sync_until_ok(&a, "web", 10);
    a.stop();
    sh(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&snapshot)
        .arg(&image));
    a.restart();
    assert_resync_named(&a, "web", "modified_while_off");
    let _ = std::fs::remove_file(&snapshot);
}

/// Row "Reverting the volume to an older point in time": another file (a restored copy)
/// renamed over the image: another inode.
#[test]
fn image_file_replaced_by_a_restored_copy_is_reverted_to_older() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let image = image_of(&a, "web");
    a.stop();
    let restored = image.with_extension("restored");
    std::fs::copy(&image, &restored).unwrap();
    std::fs::rename(&restored, &image).unwrap();
    a.restart();
    let st = assert_resync_named(&a, "web", "reverted_to_older");
    assert!(
        st["resync_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("replaced"),
        "{st}"
    );
}

/// Row "Write failure to tracking log file": the activity log's fdatasync fails (EIO,
/// injected into that file only). The guest's write succeeds and later ones too (tracking
/// goes on in memory), and the daemon asks for a resynchronization at once instead of
/// dropping tracking silently (before, it only logged a line and the next crash was the
/// first anyone heard of it).
#[test]
fn activity_log_write_failure_requires_resync_and_keeps_serving() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "web", &["64M"], 3600);
    // Two cuts after the initial one: the extents it made hot have left the log.
    sync_until_ok(&a, "web", 10);
    sync_until_ok(&a, "web", 10);
    let uri = a.nbd_uri("web", 0);
    let al = state_dir_of(&a, "web").join("activity.log");
    assert!(al.exists(), "{}", al.display());
    let strace = Strace::attach_args(
        a.pid().unwrap(),
        &[
            "-e",
            "trace=fdatasync",
            "-e",
            "inject=fdatasync:error=EIO:when=1",
            "-P",
            al.to_str().unwrap(),
        ],
    );
    // A write to a cold extent: its activity-log append is the injected failure.
    qemu_io_ok(&uri, &["write -q -P 0x55 40M 64k"]);
    drop(strace);
    let st = assert_resync_named(&a, "web", "tracking_write_failed");
    assert_eq!(
        st["resync_condition_hyperv"], "Write failure to tracking log file",
        "{st}"
    );
    assert!(
        events(&a)
            .iter()
            .any(|e| e["id"] == 1007 && e["vm"] == "web"),
        "no tracking-failure event 1007"
    );
    // The guest is still served: writes and reads go on.
    qemu_io_ok(
        &uri,
        &["write -q -P 0x66 48M 64k", "read -q -P 0x66 48M 64k"],
    );
    qemu_io_ok(&uri, &["read -q -P 0x55 40M 64k"]);
    resync_rearms_tracking(&a, &b, root.path());
}

/// The same failure during the initial replication: the initial replication sends every
/// block whatever the tracking says, so it completes (point 1 on the replica), and the
/// resynchronization is required once it has (the tracking, in memory only, would not
/// survive a crash); `resume --resynchronize` then brings the replica back in line.
#[test]
fn activity_log_write_failure_during_initial_replication_requires_resync_after_it() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -q -P 0x31 0 1M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    // The start marks every block dirty, which rewrites the activity log with every extent
    // (a temporary file, fsynced, renamed): that fsync fails.
    let tmp = state_dir_of(&a, "web").join("activity.log.tmp");
    let strace = Strace::attach_args(
        a.pid().unwrap(),
        &[
            "-e",
            "trace=fsync",
            "-e",
            "inject=fsync:error=EIO:when=1",
            "-P",
            tmp.to_str().unwrap(),
        ],
    );
    let first = a.run(&["replication", "start", "web"]);
    println!(
        "start with the failing activity log: {} {}",
        first.status,
        String::from_utf8_lossy(&first.stderr).trim()
    );
    drop(strace);
    wait_until("event 1007", Duration::from_secs(30), || {
        events(&a)
            .iter()
            .any(|e| e["id"] == 1007 && e["vm"] == "web")
    });
    if !first.status.success() {
        a.ok(&["replication", "start", "web"]);
    }
    wait_until("point 1 on the replica", Duration::from_secs(60), || {
        !point_ids(&b, "web").is_empty()
    });
    assert_resync_named(&a, "web", "tracking_write_failed");
    resync_rearms_tracking(&a, &b, root.path());
}

/// `resume --resynchronize` after a tracking-write failure: the resync marks every block and
/// re-arms the activity log, so the replica catches up and the VM stays `Replicating` (the
/// storage check, every second, no longer finds the failure).
fn resync_rearms_tracking(a: &Host, b: &Host, scratch: &Path) {
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    sync_until_ok(a, "web", 20);
    assert!(latest_equals_primary(a, b, "web", 0, scratch));
    std::thread::sleep(Duration::from_secs(2));
    let st = status(a, "web");
    assert_eq!(st["state"], "Replicating", "{st}");
}

/// Row "Tracking log file is not closed gracefully" when the activity log cannot cover it:
/// a crash, and an activity log that is corrupt afterwards.
#[test]
fn crash_with_a_corrupt_activity_log_is_unclean_stop_untracked() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x11 0 64k"]);
    a.kill9();
    let al = state_dir_of(&a, "web").join("activity.log");
    let mut bytes = std::fs::read(&al).unwrap();
    // A byte of the header's disk size: its checksum fails.
    bytes[24] ^= 0xff;
    std::fs::write(&al, &bytes).unwrap();
    a.restart();
    assert_resync_named(&a, "web", "unclean_stop_untracked");
}

/// Row "Out-of-sequence or Invalid log file is applied" (restoring a backed-up copy of the
/// replica VM): the replica's directory of the VM restored from a copy two points older.
#[test]
fn replica_restored_from_an_older_copy_is_replica_restored_older() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let vm_dir = b.dir.join("storage/web");
    let backup = root.path().join("web-replica-backup");
    b.stop();
    sh(Command::new("cp").arg("-a").arg(&vm_dir).arg(&backup));
    b.restart();
    let uri = a.nbd_uri("web", 0);
    for p in [1u8, 2] {
        qemu_io_ok(&uri, &[&format!("write -q -P {p} 0 64k")]);
        sync_until_ok(&a, "web", 10);
    }
    b.stop();
    std::fs::remove_dir_all(&vm_dir).unwrap();
    sh(Command::new("cp").arg("-a").arg(&backup).arg(&vm_dir));
    b.restart();
    // The replica finds it itself at start (its record says it committed point 3), before
    // any hello.
    assert_resync_named(&b, "web", "replica_restored_older");
    qemu_io_ok(&uri, &["write -q -P 3 0 64k"]);
    let out = a.run(&["replication", "sync", "web"]);
    assert!(
        !out.status.success(),
        "a sync onto an older replica succeeded"
    );
    assert_resync_named(&a, "web", "replica_restored_older");
    let _ = std::fs::remove_dir_all(&backup);
}

/// Row "Out-of-sequence or Invalid log file is applied": the replica holds points this
/// primary never shipped (the primary's catalog was restored from an older backup).
#[test]
fn replica_ahead_of_a_restored_primary_is_replica_out_of_sequence() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let catalog = a.dir.join("catalog.redb");
    let backup = root.path().join("catalog-backup.redb");
    a.stop();
    std::fs::copy(&catalog, &backup).unwrap();
    a.restart();
    let uri = a.nbd_uri("web", 0);
    for p in [1u8, 2] {
        qemu_io_ok(&uri, &[&format!("write -q -P {p} 0 64k")]);
        sync_until_ok(&a, "web", 10);
    }
    a.stop();
    std::fs::copy(&backup, &catalog).unwrap();
    a.restart();
    let _ = a.run(&["replication", "sync", "web"]);
    assert_resync_named(&a, "web", "replica_out_of_sequence");
}

/// Row "Out-of-sequence or Invalid log file is applied": a delta stored in the replica's
/// journal is found invalid (a flipped payload byte): the replica names it, and the
/// primary's next cycle does too. The invalid delta is never applied to a point.
#[test]
fn invalid_delta_in_the_replica_journal_is_replica_invalid_delta() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
        "--compression",
        "none",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -q -P 5 0 1M"]);
    let point = a.json(&["replication", "sync", "web"])["seq"]
        .as_u64()
        .unwrap();
    let jfile = b
        .dir
        .join("storage/web/journal")
        .join(format!("{point:020}.delta"));
    let mut bytes = std::fs::read(&jfile).unwrap();
    assert!(bytes.len() > 1 << 20, "{} bytes", bytes.len());
    bytes[4096] ^= 0xff;
    std::fs::write(&jfile, &bytes).unwrap();
    // Reading the point finds it.
    let out = b.run(&[
        "points",
        "export",
        "web",
        "--point",
        &point.to_string(),
        "--to",
        root.path().join("x.raw").to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "export of an invalid delta succeeded"
    );
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert_eq!(st["health"], "Critical", "{st}");
    assert_eq!(st["resync_condition"], "replica_invalid_delta", "{st}");
    qemu_io_ok(&uri, &["write -q -P 6 1M 4k"]);
    let _ = a.run(&["replication", "sync", "web"]);
    assert_resync_named(&a, "web", "replica_invalid_delta");
    assert_resync_named(&b, "web", "replica_invalid_delta");
    let _ = std::fs::remove_file(root.path().join("x.raw"));
}

/// Row "Write failure to tracking log file", for the bitmap written at a clean stop (its
/// fsync fails): the stop is then unclean (no clean-stop marker, the daemon exits non-zero),
/// and the next start recovers from the activity log, which still covers every dirty block.
/// Nothing is dropped silently and no resynchronization is needed: the replica converges.
#[test]
fn bitmap_write_failure_at_stop_recovers_from_the_activity_log() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    // Pending at the stop: only the bitmap (or the activity log) can say so.
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x77 2M 64k"]);
    let state = state_dir_of(&a, "web");
    let pid = a.pid().unwrap();
    let tmp = state.join("bitmap.tmp");
    let strace = Strace::attach_args(
        pid,
        &[
            "-e",
            "trace=fsync",
            "-e",
            "inject=fsync:error=EIO:when=1",
            "-P",
            tmp.to_str().unwrap(),
        ],
    );
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
            .unwrap_or(true)
    });
    drop(strace);
    a.kill9();
    assert!(
        !state.join("clean").exists(),
        "a clean-stop marker was written although the bitmap failed"
    );
    assert!(
        a.log().contains("closing disk 0"),
        "the failed stop is not logged:\n{}",
        tail(&a.log(), 20)
    );
    a.restart();
    let st = status(&a, "web");
    assert_eq!(st["state"], "Replicating", "{st}");
    assert!(
        events(&a)
            .iter()
            .any(|e| e["id"] == 1002 && e["vm"] == "web"),
        "no unclean-recovery event 1002"
    );
    sync_until_ok(&a, "web", 10);
    assert!(latest_equals_primary(&a, &b, "web", 0, root.path()));
}
