//! A resynchronization continues from its cursor (`docs/formats/resync.md`, "The cursor"):
//! after `suspend` / `resume`, and after a kill -9 of the primary or of the replica and a
//! restart, the compare
//! goes on where it got and never reads the compared part of the disk again, except the blocks
//! that differ or that the guest wrote meanwhile; those writes are in the final point, which
//! equals the primary byte for byte, and the points from before are untouched.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 256 * MIB;

/// The primary's reads slowed (20 ms each: a 1 MiB hash read) so that comparing the disk takes
/// several seconds: the interruption lands in the middle of it.
fn slow(a: &Host) -> Strace {
    Strace::attach(a.pid().unwrap(), &["inject=pread64:delay_enter=20000"])
}

/// A replicated 256 MiB disk full of data, a point before the resync (kept as a file), and
/// edits made while the daemon was stopped: the resynchronization they require is started.
fn resync_under_way(scratch: &std::path::Path) -> (Host, Host, Vec<(u64, std::path::PathBuf)>) {
    let (mut a, b) = pair(scratch);
    replicate(&a, &b, "web", &["256M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 1 0 256M"]);
    sync_until_ok(&a, "web", 20);
    let mut kept = Vec::new();
    for p in point_ids(&b, "web") {
        let f = scratch.join(format!("before-{p}.raw"));
        export_point(&b, "web", &p.to_string(), 0, &f);
        kept.push((p, f));
    }
    let image = disk_path(&a, "web", 0);
    a.stop();
    // One edit early (below where the compare will be interrupted) and one late.
    qemu_io_ok(
        image.to_str().unwrap(),
        &["write -P 5 3M 4k", "write -P 6 250M 8k"],
    );
    a.restart();
    wait_until("resync required", Duration::from_secs(20), || {
        state(&a, "web") == "ResynchronizationRequired"
    });
    (a, b, kept)
}

/// Waits until the compare got past half the disk and its cursor (`resync.cursor_bytes`,
/// what a restart continues from) records at least a quarter; returns the blocks compared.
fn wait_half_compared(a: &Host) -> u64 {
    let mut compared = 0;
    wait_until("half the disk compared", Duration::from_secs(120), || {
        let st = status(a, "web");
        compared = st["resync"]["blocks_compared"].as_u64().unwrap_or(0);
        let saved = st["resync"]["cursor_bytes"].as_u64().unwrap_or(0);
        compared * 4096 >= DISK / 2 && saved >= DISK / 4
    });
    compared
}

/// The 2016 / 2017 events of the last compare: where it started, and how many bytes it
/// compared.
fn last_compare(a: &Host) -> (String, u64) {
    let evs = events(a);
    let start = evs
        .iter()
        .rev()
        .find(|e| e["id"] == 2016)
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .expect("a compare started");
    let done = evs
        .iter()
        .rev()
        .find(|e| e["id"] == 2017)
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .expect("a compare ended");
    let bytes = done
        .split("compared disk 0: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no compared bytes in {done:?}"));
    (start, bytes)
}

/// Byte offset a continuation says it continues at.
fn continues_at(message: &str) -> u64 {
    message
        .split("continues at byte ")
        .nth(1)
        .map(|s| {
            s.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the compare did not continue from a cursor: {message:?}"))
}

/// The last compare continued from a cursor at a quarter of the disk or more, and compared
/// only the rest, the block that differed below it and what the guest wrote meanwhile.
fn assert_continued(a: &Host) {
    let (start, compared) = last_compare(a);
    let at = continues_at(&start);
    println!("{start}; compared {compared} bytes");
    assert!(at >= DISK / 4, "continued at {at}: {start}");
    assert!(
        compared <= DISK - at + 8 * MIB,
        "the continuation compared {compared} bytes from byte {at} on a {DISK}-byte disk"
    );
}

fn finish_and_check(
    a: &Host,
    b: &Host,
    kept: &[(u64, std::path::PathBuf)],
    scratch: &std::path::Path,
) {
    wait_until("the resync to complete", Duration::from_secs(180), || {
        state(a, "web") == "Replicating"
    });
    assert!(
        latest_equals_primary(a, b, "web", 0, scratch),
        "the replica differs from the primary after the continued resync"
    );
    let after = point_ids(b, "web");
    for (p, f) in kept {
        assert!(after.contains(p), "point {p} was dropped: {after:?}");
        let again = scratch.join(format!("after-{p}.raw"));
        export_point(b, "web", &p.to_string(), 0, &again);
        assert!(files_equal(f, &again), "point {p} changed");
    }
}

#[test]
fn suspended_resync_resumes_from_its_cursor_and_ships_what_was_written_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b, kept) = resync_under_way(scratch);
    let slowed = slow(&a);
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    wait_half_compared(&a);
    a.ok(&["replication", "suspend", "web"]);
    assert_eq!(state(&a, "web"), "Suspended");
    drop(slowed);
    // The guest writes into the part already compared while the resync is suspended.
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 9 1M 4k"]);
    a.ok(&["replication", "resume", "web"]);
    finish_and_check(&a, &b, &kept, scratch);
    // The continuation compares the rest of the disk, the block that differed below the
    // cursor (3M) and the extent the guest wrote (4 MiB): never the compared part again.
    assert_continued(&a);
}

#[test]
fn resync_continues_from_its_cursor_after_kill_9_of_the_primary() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (mut a, b, kept) = resync_under_way(scratch);
    let slowed = slow(&a);
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    wait_half_compared(&a);
    // The guest writes into the compared part, then the primary dies: its activity log holds
    // that write alone, the cursor the rest.
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 8 2M 4k"]);
    drop(slowed);
    a.kill9();
    a.restart();
    assert_eq!(state(&a, "web"), "Resynchronizing");
    let _ = a.run(&["replication", "sync", "web"]);
    finish_and_check(&a, &b, &kept, scratch);
    assert_continued(&a);
}

#[test]
fn resync_continues_from_its_cursor_after_kill_9_of_the_replica() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, mut b, kept) = resync_under_way(scratch);
    let slowed = slow(&a);
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    wait_half_compared(&a);
    // The replica dies in the middle of the compare: the primary's attempt fails, keeps what
    // it compared, and the next one goes on from there once the replica is back.
    b.kill9();
    b.restart();
    drop(slowed);
    b.wait_replica_store();
    assert_eq!(state(&a, "web"), "Resynchronizing");
    let _ = a.run(&["replication", "sync", "web"]);
    finish_and_check(&a, &b, &kept, scratch);
    assert_continued(&a);
}
