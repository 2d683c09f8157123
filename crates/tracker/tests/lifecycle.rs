//! Behaviour a daemon relies on, through the public API only: cuts and copy-before-write,
//! abort coalescing, and what open reports after clean, unclean and tampered stops.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd::BlockBackend;
use understudy_tracker::{
    cut, CutGate, OpenState, TrackedDisk, TrackerError, BLOCK_BYTES, EXTENT_BYTES,
};

const B: u64 = BLOCK_BYTES;

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    state: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let state = dir.path().join("state");
    Fixture {
        image,
        state,
        _dir: dir,
    }
}

fn create(f: &Fixture, size: u64) -> (Arc<CutGate>, Arc<TrackedDisk>) {
    let gate = CutGate::new();
    let d = TrackedDisk::create(&f.image, size, &f.state, gate.clone()).expect("create");
    (gate, d)
}

/// What a kill -9 at this instant leaves: the image and state files as they are now (the
/// page cache survives a process kill), opened by a new process (no lock held).
fn crash_copy(f: &Fixture) -> Fixture {
    let g = fixture();
    fs::copy(&f.image, &g.image).expect("copy image");
    fs::create_dir_all(&g.state).expect("state dir");
    for entry in fs::read_dir(&f.state).expect("read state") {
        let entry = entry.expect("entry");
        if entry.file_name() != "lock" {
            fs::copy(entry.path(), g.state.join(entry.file_name())).expect("copy state");
        }
    }
    g
}

fn reopen(f: &Fixture) -> (Arc<CutGate>, Arc<TrackedDisk>, OpenState) {
    let gate = CutGate::new();
    let (d, report) = TrackedDisk::open(&f.image, &f.state, gate.clone()).expect("open");
    (gate, d, report.state)
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; B as usize]
}

fn read_frozen(fd: &understudy_tracker::FrozenDisk, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    fd.read_at(&mut buf, offset).expect("frozen read");
    buf
}

#[test]
fn cut_ships_exactly_the_changed_blocks_with_cut_time_content() {
    let f = fixture();
    let (gate, d) = create(&f, 64 * B);
    d.write_at(&block(1), 3 * B, false).expect("w");
    d.write_at(&block(2), 4 * B, false).expect("w");
    d.write_at(&block(3), 10 * B, true).expect("w");
    d.write_zeroes(20 * B, 2 * B, true, false).expect("z");
    assert_eq!(d.dirty_bytes(), 5 * B);

    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert!(c.cut_time_unix_ns > 0);
    let fd = &c.disks[0];
    assert_eq!(
        fd.ranges(),
        vec![(3 * B, 2 * B), (10 * B, B), (20 * B, 2 * B)]
    );
    assert_eq!(fd.dirty_bytes(), 5 * B);

    // The guest overwrites a frozen block before it ships: CBW keeps the cut content.
    d.write_at(&block(9), 4 * B, false).expect("overwrite");
    d.write_at(&block(8), 30 * B, false)
        .expect("unfrozen write");
    let mut live = block(0);
    d.read_at(&mut live, 4 * B).expect("guest read");
    assert_eq!(live, block(9), "guest reads see the new data");
    assert_eq!(d.cbw_copied_bytes(), B);
    assert_eq!(d.cbw_spilled_bytes(), 0, "the copy is in memory");
    assert_eq!(
        fs::metadata(f.state.join("disk.cbw")).expect("cbw").len(),
        0
    );
    let shipped = read_frozen(fd, 3 * B, 2 * B);
    assert_eq!(&shipped[..B as usize], &block(1)[..]);
    assert_eq!(&shipped[B as usize..], &block(2)[..]);
    assert_eq!(read_frozen(fd, 10 * B, B), block(3));
    assert_eq!(read_frozen(fd, 20 * B, 2 * B), vec![0u8; 2 * B as usize]);

    // Out-of-cut and re-reads are errors, never wrong data.
    let mut buf = block(0);
    assert!(
        fd.read_at(&mut buf, 30 * B).is_err(),
        "block outside the cut"
    );
    assert!(
        fd.read_at(&mut buf, 10 * B).is_err(),
        "second read of a shipped live block"
    );
    assert!(
        fd.read_at(&mut buf, 4 * B).is_err(),
        "second read of a shipped copy (its memory went back to the pool)"
    );

    // Only one cut at a time per VM.
    assert!(matches!(
        cut(&gate, std::slice::from_ref(&d)),
        Err(TrackerError::CutOutstanding)
    ));
    assert_eq!(
        d.dirty_bytes(),
        6 * B,
        "frozen 5 + new block 30 (block 4 counted once)"
    );
    c.commit();
    assert_eq!(
        fs::metadata(f.state.join("disk.cbw")).expect("cbw").len(),
        0,
        "CBW truncated"
    );
    assert_eq!(d.dirty_bytes(), 2 * B);

    let c = cut(&gate, std::slice::from_ref(&d)).expect("second cut");
    assert_eq!(c.disks[0].ranges(), vec![(4 * B, B), (30 * B, B)]);
    assert_eq!(read_frozen(&c.disks[0], 4 * B, B), block(9));
    let stale = c.disks[0].ranges();
    c.commit();
    assert_eq!(d.dirty_bytes(), 0);
    let c = cut(&gate, std::slice::from_ref(&d)).expect("empty cut");
    assert!(c.disks[0].ranges().is_empty());
    let _ = stale;
}

#[test]
fn read_after_commit_is_an_error() {
    let f = fixture();
    let (gate, d) = create(&f, 16 * B);
    d.write_at(&block(1), 0, false).expect("w");
    let mut c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    let fd = c.disks.pop().expect("one disk");
    c.commit();
    let mut buf = block(0);
    assert!(fd.read_at(&mut buf, 0).is_err());
}

#[test]
fn abort_coalesces_into_the_next_cut() {
    let f = fixture();
    let (gate, d) = create(&f, 64 * B);
    d.write_at(&block(1), 0, false).expect("w");
    d.write_at(&block(2), 5 * B, false).expect("w");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    // Partially shipped, then the link fails.
    assert_eq!(read_frozen(&c.disks[0], 0, B), block(1));
    d.write_at(&block(3), 5 * B, false)
        .expect("overwrite frozen");
    d.write_at(&block(4), 6 * B, false).expect("new");
    c.abort();
    assert_eq!(d.dirty_bytes(), 3 * B);
    assert_eq!(
        fs::metadata(f.state.join("disk.cbw")).expect("cbw").len(),
        0
    );

    let c = cut(&gate, std::slice::from_ref(&d)).expect("catch-up cut");
    assert_eq!(c.disks[0].ranges(), vec![(0, B), (5 * B, 2 * B)]);
    assert_eq!(read_frozen(&c.disks[0], 0, B), block(1));
    assert_eq!(
        read_frozen(&c.disks[0], 5 * B, 2 * B),
        [block(3), block(4)].concat()
    );
    assert!(cut(&gate, std::slice::from_ref(&d)).is_err());
    let mut again = block(0);
    c.disks[0].read_at(&mut again, 0).expect_err("already read");
    // Dropping a cut aborts it.
    drop(c);
    assert_eq!(d.dirty_bytes(), 3 * B);
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut after drop");
    assert_eq!(
        read_frozen(&c.disks[0], 5 * B, 2 * B),
        [block(3), block(4)].concat()
    );
    c.commit();
}

#[test]
fn cut_rejects_foreign_duplicate_and_empty_disk_lists() {
    let f = fixture();
    let (gate, d) = create(&f, 16 * B);
    let other = CutGate::new();
    assert!(matches!(
        cut(&other, std::slice::from_ref(&d)),
        Err(TrackerError::ForeignDisk { .. })
    ));
    assert!(matches!(
        cut(&gate, &[d.clone(), d.clone()]),
        Err(TrackerError::DuplicateDisk { .. })
    ));
    assert!(matches!(cut(&gate, &[]), Err(TrackerError::NoDisks)));
    assert!(
        !gate.cut_outstanding(),
        "failed cuts leave nothing outstanding"
    );
}

#[test]
fn partial_last_block_and_sub_block_writes() {
    let f = fixture();
    let size = 10 * B + 512;
    let (gate, d) = create(&f, size);
    d.write_at(&[7u8; 512], 10 * B, false).expect("tail write");
    d.write_at(&[5u8; 100], 2 * B + 17, false)
        .expect("sub-block write");
    assert_eq!(d.dirty_bytes(), B + 512);
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert_eq!(c.disks[0].ranges(), vec![(2 * B, B), (10 * B, 512)]);
    d.write_at(&[9u8; 512], 10 * B, false)
        .expect("overwrite tail");
    d.write_at(&[6u8; 10], 2 * B + 20, false)
        .expect("overwrite middle");
    assert_eq!(read_frozen(&c.disks[0], 10 * B, 512), vec![7u8; 512]);
    let got = read_frozen(&c.disks[0], 2 * B, B);
    assert_eq!(&got[17..117], &[5u8; 100][..]);
    assert!(got[..17].iter().all(|b| *b == 0));
    c.commit();
    assert!(
        d.write_at(&[0u8; 1024], 10 * B, false).is_err(),
        "beyond the end"
    );
}

#[test]
fn multi_disk_cut_freezes_all_disks_at_once() {
    let f = fixture();
    let dir2 = f.image.with_file_name("disk2.img");
    let (gate, a) = create(&f, 32 * B);
    let b = TrackedDisk::create(
        &dir2,
        32 * B,
        &f.state.with_file_name("state2"),
        gate.clone(),
    )
    .expect("create b");
    a.write_at(&block(1), 0, false).expect("w");
    b.write_at(&block(2), B, false).expect("w");
    let c = cut(&gate, &[a.clone(), b.clone()]).expect("cut");
    a.write_at(&block(3), 0, false).expect("w");
    b.write_at(&block(4), B, false).expect("w");
    assert_eq!(read_frozen(&c.disks[0], 0, B), block(1));
    assert_eq!(read_frozen(&c.disks[1], B, B), block(2));
    assert!(matches!(
        cut(&gate, std::slice::from_ref(&b)),
        Err(TrackerError::CutOutstanding)
    ));
    c.commit();
    assert_eq!(a.dirty_bytes() + b.dirty_bytes(), 2 * B);
}

#[test]
fn clean_reopen_restores_the_bitmap_including_an_uncommitted_cut() {
    let f = fixture();
    let (gate, d) = create(&f, 64 * B);
    assert_eq!(
        TrackedDisk::open(&f.image, &f.state, CutGate::new())
            .err()
            .map(|e| matches!(e, TrackerError::StateLocked { .. })),
        Some(true)
    );
    d.write_at(&block(1), 2 * B, false).expect("w");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    d.write_at(&block(2), 40 * B, false).expect("w");
    d.shutdown_clean().expect("shutdown");
    drop(c);
    drop(d);
    let (gate, d, state) = reopen(&f);
    assert_eq!(state, OpenState::Clean);
    assert_eq!(d.dirty_bytes(), 2 * B);
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert_eq!(c.disks[0].ranges(), vec![(2 * B, B), (40 * B, B)]);
    c.commit();
    drop(d);
    // The marker was removed at open: this stop is unclean and uses the activity log.
    let (_g, _d, state) = reopen(&f);
    assert!(
        matches!(state, OpenState::RecoveredFromActivityLog { .. }),
        "{state:?}"
    );
}

#[test]
fn unclean_reopen_marks_every_block_written_since_the_last_commit() {
    let f = fixture();
    let size = 12 * EXTENT_BYTES;
    let (gate, d) = create(&f, size);
    // Committed writes in extent 0 and 5.
    d.write_at(&block(1), 0, false).expect("w");
    d.write_at(&block(1), 5 * EXTENT_BYTES, false).expect("w");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    c.commit();
    // Written since: extents 2, 3 (one write across the boundary) and 11, plus a frozen,
    // uncommitted epoch in extent 7.
    d.write_at(&block(2), 7 * EXTENT_BYTES + 8 * B, false)
        .expect("w");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    d.write_at(&[3u8; 2 * B as usize], 3 * EXTENT_BYTES - B, false)
        .expect("w");
    d.trim(11 * EXTENT_BYTES, B, false).expect("trim");
    // kill -9 with the cut outstanding: what is on disk now is all a restart sees.
    let crashed = crash_copy(&f);
    drop(c);
    drop(d);

    let (gate, d, state) = reopen(&crashed);
    let hot = match state {
        OpenState::RecoveredFromActivityLog {
            hot_extents,
            hot_bytes,
        } => {
            assert_eq!(hot_bytes, hot_extents * EXTENT_BYTES);
            hot_extents
        }
        other => panic!("expected recovery, got {other:?}"),
    };
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    let ranges = c.disks[0].ranges();
    let covered = |off: u64| ranges.iter().any(|(o, l)| *o <= off && off < o + l);
    for off in [
        7 * EXTENT_BYTES + 8 * B,
        3 * EXTENT_BYTES - B,
        3 * EXTENT_BYTES,
        11 * EXTENT_BYTES,
    ] {
        assert!(
            covered(off),
            "block at {off} written since the last commit must be re-shipped"
        );
    }
    // Extents are shipped whole, and only hot ones: 0 and 5 were committed before any later
    // cut pruned them, so at most they remain; never the whole disk.
    assert!(hot <= 6, "hot extents {hot}");
    assert_eq!(c.disks[0].dirty_bytes(), hot * EXTENT_BYTES);
    assert!(ranges
        .iter()
        .all(|(o, l)| o % EXTENT_BYTES == 0 && l % EXTENT_BYTES == 0));
    c.commit();
}

#[test]
fn committed_extents_leave_the_activity_log() {
    let f = fixture();
    let (gate, d) = create(&f, 8 * EXTENT_BYTES);
    d.write_at(&block(1), 0, false).expect("w");
    d.write_at(&block(1), 4 * EXTENT_BYTES, false).expect("w");
    assert_eq!(d.hot_extents(), 2);
    cut(&gate, std::slice::from_ref(&d)).expect("cut").commit();
    d.write_at(&block(1), 4 * EXTENT_BYTES + B, false)
        .expect("w");
    // Extent 0 has nothing unreplicated: it leaves at the next cut, and the file after commit.
    cut(&gate, std::slice::from_ref(&d)).expect("cut").commit();
    assert_eq!(d.hot_extents(), 1);
    drop(d);
    let (_g, d, state) = reopen(&f);
    assert_eq!(
        state,
        OpenState::RecoveredFromActivityLog {
            hot_extents: 1,
            hot_bytes: EXTENT_BYTES
        }
    );
    assert_eq!(d.dirty_bytes(), EXTENT_BYTES);
}

#[test]
fn image_modified_while_stopped_is_detected() {
    let f = fixture();
    let (_gate, d) = create(&f, 32 * B);
    d.write_at(&block(1), 0, false).expect("w");
    d.shutdown_clean().expect("shutdown");
    drop(d);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&f.image)
        .expect("open image");
    file.write_all_at(&[0xAAu8; 16], 5 * B)
        .expect("outside write");
    drop(file);
    let (_g, d, state) = reopen(&f);
    assert!(
        matches!(&state, OpenState::ModifiedOutside { reason, replaced: false } if reason.contains("modified")),
        "{state:?}"
    );
    assert!(state.requires_resync());
    assert_eq!(
        d.dirty_bytes(),
        0,
        "tracking restarts empty; the daemon resyncs"
    );
}

/// A copy of the image taken earlier, copied back over it with its timestamps
/// (`cp --preserve=all`, a restore from backup): same inode and size, an older mtime.
#[test]
fn older_copy_restored_over_the_image_is_a_revert() {
    let f = fixture();
    let (_gate, d) = create(&f, 32 * B);
    d.write_at(&block(1), 0, true).expect("w");
    let older = f.image.with_extension("older");
    let cp = std::process::Command::new("cp")
        .arg("--preserve=all")
        .arg(&f.image)
        .arg(&older)
        .status()
        .expect("cp");
    assert!(cp.success());
    std::thread::sleep(std::time::Duration::from_millis(20));
    d.write_at(&block(2), 0, true).expect("w");
    d.shutdown_clean().expect("shutdown");
    drop(d);
    let cp = std::process::Command::new("cp")
        .arg("--preserve=all")
        .arg(&older)
        .arg(&f.image)
        .status()
        .expect("cp");
    assert!(cp.success());
    let (_g, _d, state) = reopen(&f);
    assert!(
        matches!(&state, OpenState::ModifiedOutside { replaced: true, reason } if reason.contains("older copy")),
        "{state:?}"
    );
}

/// Another file renamed over the image (a restored snapshot file): another inode.
#[test]
fn image_file_replaced_is_a_revert() {
    let f = fixture();
    let (_gate, d) = create(&f, 32 * B);
    d.write_at(&block(1), 0, true).expect("w");
    d.shutdown_clean().expect("shutdown");
    drop(d);
    let other = f.image.with_extension("other");
    fs::copy(&f.image, &other).expect("copy");
    fs::rename(&other, &f.image).expect("rename");
    let (_g, _d, state) = reopen(&f);
    assert!(
        matches!(&state, OpenState::ModifiedOutside { replaced: true, reason } if reason.contains("replaced")),
        "{state:?}"
    );
}

#[test]
fn resized_image_is_detected() {
    let f = fixture();
    let (_gate, d) = create(&f, 32 * B);
    d.shutdown_clean().expect("shutdown");
    drop(d);
    fs::OpenOptions::new()
        .write(true)
        .open(&f.image)
        .expect("open")
        .set_len(64 * B)
        .expect("grow");
    let (_g, _d, state) = reopen(&f);
    assert!(
        matches!(&state, OpenState::ModifiedOutside { reason, .. } if reason.contains("size")),
        "{state:?}"
    );
}

#[test]
fn write_after_clean_shutdown_makes_the_stop_unclean() {
    let f = fixture();
    let (_gate, d) = create(&f, 4 * EXTENT_BYTES);
    d.write_at(&block(1), 0, false).expect("w");
    d.shutdown_clean().expect("shutdown");
    d.write_at(&block(2), 2 * EXTENT_BYTES, false)
        .expect("late write");
    assert!(!f.state.join("clean").exists());
    drop(d);
    let (_g, d, state) = reopen(&f);
    assert_eq!(
        state,
        OpenState::RecoveredFromActivityLog {
            hot_extents: 2,
            hot_bytes: 2 * EXTENT_BYTES
        }
    );
    assert_eq!(d.dirty_bytes(), 2 * EXTENT_BYTES);
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("read");
    let i = (at as usize).min(bytes.len() - 1);
    bytes[i] ^= 0x5A;
    fs::write(path, bytes).expect("write");
}

fn assert_lost(f: &Fixture, needle: &str) {
    let (_g, d, state) = reopen(f);
    match &state {
        OpenState::TrackingLost { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected TrackingLost({needle}), got {other:?}"),
    }
    assert!(state.requires_resync());
    drop(d);
}

#[test]
fn corrupt_or_missing_state_is_reported_never_trusted() {
    let f = fixture();
    let (_gate, d) = create(&f, 4 * EXTENT_BYTES);
    d.write_at(&block(1), 0, false).expect("w");
    drop(d);
    // Unclean stop with a corrupt header.
    flip_byte(&f.state.join("activity.log"), 20);
    assert_lost(&f, "activity.log");
    // That open rewrote the state; now lose the log outright after an unclean stop.
    fs::remove_file(f.state.join("activity.log")).expect("rm");
    fs::write(f.state.join("bitmap"), b"leftover").expect("leftover bitmap");
    assert_lost(&f, "missing");

    // Clean stop, then a corrupt bitmap / marker / missing bitmap.
    let (_g, d, _) = reopen(&f);
    d.shutdown_clean().expect("shutdown");
    drop(d);
    let saved_bitmap = fs::read(f.state.join("bitmap")).expect("bitmap");
    let saved_clean = fs::read(f.state.join("clean")).expect("clean");
    flip_byte(&f.state.join("bitmap"), 60);
    assert_lost(&f, "bitmap");

    for (name, mutate) in [("clean", 0u8), ("bitmap", 1), ("clean", 2)] {
        fs::write(f.state.join("bitmap"), &saved_bitmap).expect("restore");
        fs::write(f.state.join("clean"), &saved_clean).expect("restore");
        match mutate {
            0 => flip_byte(&f.state.join("clean"), 90),
            1 => fs::remove_file(f.state.join("bitmap")).expect("rm"),
            _ => fs::write(f.state.join("clean"), vec![0u8; 1 << 20]).expect("huge"),
        }
        let _ = name;
        let (_g, _d, state) = reopen(&f);
        assert!(matches!(state, OpenState::TrackingLost { .. }), "{state:?}");
    }
}

#[test]
fn torn_activity_log_tail_is_recovered() {
    let f = fixture();
    let (_gate, d) = create(&f, 8 * EXTENT_BYTES);
    d.write_at(&block(1), 0, false).expect("w");
    d.write_at(&block(1), 3 * EXTENT_BYTES, false).expect("w");
    drop(d);
    let log = f.state.join("activity.log");
    let len = fs::metadata(&log).expect("log").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open")
        .set_len(len - 5)
        .expect("tear");
    let (_g, _d, state) = reopen(&f);
    assert_eq!(
        state,
        OpenState::RecoveredFromActivityLog {
            hot_extents: 1,
            hot_bytes: EXTENT_BYTES
        }
    );
}

#[test]
fn corrupt_last_activity_log_group_is_tracking_lost_not_a_torn_tail() {
    let f = fixture();
    let (_gate, d) = create(&f, 8 * EXTENT_BYTES);
    d.write_at(&block(1), 0, false).expect("w");
    // The last append: a complete, fsynced group whose writer proceeded.
    d.write_at(&block(1), 5 * EXTENT_BYTES, false).expect("w");
    drop(d);
    let log = f.state.join("activity.log");
    let len = fs::metadata(&log).expect("log").len();
    // Bit rot in its checksum, the last 16 bytes: the write to extent 5 must not be forgotten.
    flip_byte(&log, len - 3);
    assert_lost(&f, "corrupt group");
}

#[test]
fn mark_allocated_dirty_is_sparse_aware_and_mark_all_covers_the_disk() {
    let f = fixture();
    let size = 4 * EXTENT_BYTES;
    let (gate, d) = create(&f, size);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&f.image)
        .expect("open");
    file.write_all_at(&block(1), EXTENT_BYTES + 3 * B)
        .expect("seed");
    file.sync_all().expect("sync");
    drop(file);
    let marked = d.mark_allocated_dirty().expect("mark");
    assert!((B..EXTENT_BYTES).contains(&marked), "marked {marked}");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert!(c.disks[0]
        .ranges()
        .iter()
        .all(|(o, l)| *o <= EXTENT_BYTES + 3 * B && EXTENT_BYTES + 4 * B <= o + l));
    c.commit();
    d.mark_all_dirty().unwrap();
    assert_eq!(d.dirty_bytes(), size);
    assert_eq!(d.hot_extents(), 4);
    drop(d);
    // An unclean stop during initial replication re-ships everything still pending.
    let (_g, d, _) = reopen(&f);
    assert_eq!(d.dirty_bytes(), size);
}

#[test]
fn block_status_reports_holes_and_data() {
    let f = fixture();
    let (_gate, d) = create(&f, 4 * EXTENT_BYTES);
    d.write_at(&block(1), EXTENT_BYTES, false).expect("w");
    let ext = d.block_status(0, 4 * EXTENT_BYTES).expect("status");
    assert_eq!(
        ext.iter().map(|e| e.len_bytes).sum::<u64>(),
        4 * EXTENT_BYTES
    );
    assert!(ext[0].hole);
    assert!(ext.iter().any(|e| !e.hole));
    d.write_zeroes(EXTENT_BYTES, B, true, true).expect("punch");
    d.flush().expect("flush");
}

#[test]
fn holes_are_skipped_only_when_no_cut_time_data_hides_in_them() {
    const MIB: u64 = 1 << 20;
    let f = fixture();
    let (gate, d) = create(&f, 4 * MIB);
    // MiB 0: data; MiB 1: data the guest will punch after the cut; MiB 2..4: holes.
    d.write_at(&vec![7u8; MIB as usize], 0, false).expect("w0");
    d.write_at(&vec![9u8; MIB as usize], MIB, false)
        .expect("w1");
    d.mark_all_dirty().unwrap();
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    let fd = &c.disks[0];
    // After the cut the guest punches MiB 1: copy-before-write keeps its 9s aside.
    d.trim(MIB, MIB, false).expect("trim");
    assert!(
        !fd.skip_if_hole(0, MIB).expect("probe 0"),
        "data is not a hole"
    );
    assert!(
        !fd.skip_if_hole(MIB, MIB).expect("probe 1"),
        "a hole that hides cut-time data must be read"
    );
    assert_eq!(read_frozen(fd, MIB, MIB), vec![9u8; MIB as usize]);
    assert!(fd.skip_if_hole(2 * MIB, MIB).expect("probe 2"));
    // Skipped counts as read: reading it again is refused, like any second read.
    let mut buf = vec![0u8; MIB as usize];
    assert!(fd.read_at(&mut buf, 2 * MIB).is_err());
    // Unaligned or region-crossing probes are declined, never guessed.
    assert!(!fd.skip_if_hole(3 * MIB - B, 2 * B).expect("crossing"));
    assert!(!fd.skip_if_hole(3 * MIB + 1, B).expect("unaligned"));
    assert!(fd.skip_if_hole(3 * MIB, MIB).expect("probe 3"));
    assert_eq!(read_frozen(fd, 0, MIB), vec![7u8; MIB as usize]);
    c.commit();
}

/// An edit right after a clean stop, within the same tick of the kernel's coarse clock as
/// the disk's last write, would leave size, inode, mtime and ctime all equal to the clean
/// marker's (kernels before 6.13 stamp inode times with the coarse clock): the clean stop
/// waits for the clock to pass that tick (`sys::wait_past_change_time`). On a kernel with
/// fine-grained change times (6.13+) this passes without the wait too.
#[test]
fn edit_in_the_same_clock_tick_as_the_clean_stop_is_detected() {
    let mut missed = 0;
    for _ in 0..20 {
        let f = fixture();
        let (_gate, d) = create(&f, 32 * B);
        d.write_at(&block(1), 0, false).expect("w");
        d.shutdown_clean().expect("shutdown");
        drop(d);
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&f.image)
            .expect("open image");
        file.write_all_at(&[0xAAu8; 16], 5 * B)
            .expect("outside write");
        drop(file);
        // The disk's last reference may still be going away on another thread (its state
        // lock is released with it): open again once it is.
        let state = (0..200)
            .find_map(
                |_| match TrackedDisk::open(&f.image, &f.state, CutGate::new()) {
                    Ok((_d, report)) => Some(report.state),
                    Err(e) if format!("{e:?}").contains("StateLocked") => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        None
                    }
                    Err(e) => panic!("open: {e:?}"),
                },
            )
            .expect("the state lock was never released");
        if !state.requires_resync() {
            missed += 1;
        }
    }
    assert_eq!(missed, 0, "edits right after a clean stop went unseen");
}

/// A resynchronization records its cut's blocks itself (its cursor) and covers the cut: a
/// crash must then recover only what the guest wrote after the cut, not every block the
/// resynchronization marked (which made every continuation compare the whole disk again).
#[test]
fn covered_cut_crash_recovers_only_the_writes_made_after_it() {
    let f = fixture();
    let size = 16 * EXTENT_BYTES;
    let (gate, d) = create(&f, size);
    d.mark_all_dirty().expect("mark all");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert_eq!(c.disks[0].dirty_bytes(), size);
    // Before `cover`, a crash recovers every extent (the log still covers the cut).
    let (_g, _d, state) = reopen(&crash_copy(&f));
    assert_eq!(
        state,
        OpenState::RecoveredFromActivityLog {
            hot_extents: 16,
            hot_bytes: size
        }
    );
    c.cover();
    d.write_at(&block(7), 9 * EXTENT_BYTES + 3 * B, false)
        .expect("w");
    let crashed = crash_copy(&f);
    drop(c);
    drop(d);
    let (gate, d, state) = reopen(&crashed);
    assert_eq!(
        state,
        OpenState::RecoveredFromActivityLog {
            hot_extents: 1,
            hot_bytes: EXTENT_BYTES
        }
    );
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert_eq!(c.disks[0].ranges(), vec![(9 * EXTENT_BYTES, EXTENT_BYTES)]);
    c.commit();
}

/// An aborted covered cut drops its blocks (the caller ships them from its own record), keeps
/// what the guest wrote since, and a clean stop persists only that.
#[test]
fn covered_cut_abort_and_clean_stop_keep_only_later_writes() {
    let f = fixture();
    let (gate, d) = create(&f, 4 * EXTENT_BYTES);
    d.mark_all_dirty().expect("mark all");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    c.cover();
    d.write_at(&block(1), 5 * B, false).expect("w");
    // A clean stop while the covered cut is outstanding: only the later write is persisted.
    d.shutdown_clean().expect("shutdown");
    c.abort();
    drop(d);
    let (gate, d, state) = reopen(&f);
    assert_eq!(state, OpenState::Clean);
    assert_eq!(d.dirty_bytes(), B);
    // An abort of a covered cut: its blocks are not returned to the active bitmap.
    d.mark_all_dirty().expect("mark all");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    c.cover();
    d.write_at(&block(2), 70 * B, false).expect("w");
    c.abort();
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert_eq!(c.disks[0].ranges(), vec![(70 * B, B)]);
    // An uncovered abort still returns its blocks.
    c.abort();
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    assert_eq!(c.disks[0].ranges(), vec![(70 * B, B)]);
    c.commit();
}
