//! The activity log: the persistent set of 4 MiB extents that may hold writes the replica has
//! not committed (`<state_dir>/activity.log`, layout in `docs/formats/tracker-state.md`).
//!
//! Owns the in-memory hot set (an atomic bitmap of extents, checked lock-free on the write
//! path), the group commit that makes new extents durable before a write proceeds, and
//! compaction. It must never let an extent into the in-memory hot set before that extent is
//! durable in the file, and never fail a guest write: on an I/O error it deletes the log (so
//! a crash is reported as lost tracking) and stops recording (`degraded`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::bitmap::Bitmap;
use crate::durable;
use crate::error::{IoContext, TrackerError};
use crate::formats::{self, AL_HEADER_BYTES, EXTENT_BYTES};
use crate::BLOCK_BYTES;

pub(crate) const AL_NAME: &str = "activity.log";
pub(crate) const CLEAN_NAME: &str = "clean";
pub(crate) const BLOCKS_PER_EXTENT: u64 = EXTENT_BYTES / BLOCK_BYTES;

struct GroupState {
    /// Extents requested by writers and not yet taken by a leader (may hold duplicates).
    pending: Vec<u64>,
    leader_active: bool,
    /// Number of the batch that is collecting `pending`.
    open_batch: u64,
    /// Every batch numbered below this is durable (or the log is degraded).
    done_batches: u64,
}

struct LogFile {
    file: File,
    len_bytes: u64,
    records: u64,
    /// Set by `shutdown_clean`: the clean marker must go before anything new is recorded,
    /// and compaction must not shrink the log below the shut-down bitmap.
    shut_down: bool,
}

/// Extents logged ahead of a write that needs an fsync anyway (see `ensure`): 7 × 4 MiB, so a
/// sequential writer pays one activity-log fsync per 32 MiB; after a crash at most that much
/// extra is re-sent.
const AL_LOOKAHEAD_EXTENTS: u64 = 7;

pub(crate) struct ActivityLog {
    dir: PathBuf,
    header: [u8; AL_HEADER_BYTES],
    hot: Bitmap,
    group: Mutex<GroupState>,
    group_done: Condvar,
    file: Mutex<LogFile>,
    degraded: AtomicBool,
    /// Why the log degraded (the first error), for the daemon to report.
    degraded_reason: Mutex<Option<String>>,
    /// The in-memory hot set shrank since the file was last rewritten.
    pruned: AtomicBool,
}

impl ActivityLog {
    /// Replaces the log with exactly `extents` (durably) and returns it ready for appends.
    pub(crate) fn create(
        dir: &Path,
        disk_size_bytes: u64,
        extents: &[u64],
    ) -> Result<Self, TrackerError> {
        let header = formats::encode_al_header(disk_size_bytes);
        let mut buf = header.to_vec();
        formats::encode_al_groups(&header, extents, &mut buf);
        durable::write_atomic(dir, AL_NAME, &buf)?;
        let path = dir.join(AL_NAME);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .ctx("open activity log", &path)?;
        let hot = Bitmap::new(formats::extent_count(disk_size_bytes));
        for e in extents {
            hot.set(*e);
        }
        Ok(ActivityLog {
            dir: dir.to_path_buf(),
            header,
            hot,
            group: Mutex::new(GroupState {
                pending: Vec::new(),
                leader_active: false,
                open_batch: 0,
                done_batches: 0,
            }),
            group_done: Condvar::new(),
            file: Mutex::new(LogFile {
                file,
                len_bytes: buf.len() as u64,
                records: extents.len() as u64,
                shut_down: false,
            }),
            degraded: AtomicBool::new(false),
            degraded_reason: Mutex::new(None),
            pruned: AtomicBool::new(false),
        })
    }

    /// Extents covering blocks `first..=last`.
    pub(crate) fn extents_of(first_block: u64, last_block: u64) -> (u64, u64) {
        (
            first_block / BLOCKS_PER_EXTENT,
            last_block / BLOCKS_PER_EXTENT,
        )
    }

    /// Hot-path check: may a write to these extents proceed without recording anything?
    pub(crate) fn all_hot(&self, first: u64, last: u64) -> bool {
        self.hot.all_in(first, last) || self.degraded.load(Ordering::Acquire)
    }

    pub(crate) fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Why the log degraded, once it has.
    pub(crate) fn degraded_reason(&self) -> Option<String> {
        if !self.degraded() {
            return None;
        }
        Some(
            self.degraded_reason
                .lock()
                .clone()
                .unwrap_or_else(|| "the activity log failed".into()),
        )
    }

    pub(crate) fn hot_count(&self) -> u64 {
        self.hot.count()
    }

    /// Makes extents `first..=last` durable in the log (group commit) and hot. Never fails:
    /// on an I/O error the log is degraded and the write may proceed.
    pub(crate) fn ensure(&self, first: u64, last: u64, look_ahead: bool) {
        let mut st = self.group.lock();
        let before = st.pending.len();
        let max = self.hot.nbits().saturating_sub(1);
        for e in first..=last.min(max) {
            if !self.hot.test(e) {
                st.pending.push(e);
            }
        }
        if st.pending.len() == before {
            return;
        }
        // An fsync is due anyway: for a bulk writer (large requests: import, initial fill) log
        // the next extents too, so it pays one fsync per LOOKAHEAD+1 extents instead of one
        // each. Small random writes do not look ahead, keeping crash re-sends tight. Extents
        // logged but never written leave the log at the next cut.
        let ahead = if look_ahead { AL_LOOKAHEAD_EXTENTS } else { 0 };
        for e in last.saturating_add(1)..=last.saturating_add(ahead).min(max) {
            if !self.hot.test(e) {
                st.pending.push(e);
            }
        }
        let mine = st.open_batch;
        while st.done_batches <= mine && !self.degraded() {
            if st.leader_active {
                self.group_done.wait(&mut st);
                continue;
            }
            st.leader_active = true;
            let batch = st.open_batch;
            st.open_batch += 1;
            let mut work = std::mem::take(&mut st.pending);
            MutexGuard::unlocked(&mut st, || {
                work.sort_unstable();
                work.dedup();
                if let Err(e) = self.append(&work) {
                    self.degrade(&e);
                }
            });
            st.leader_active = false;
            st.done_batches = batch + 1;
            self.group_done.notify_all();
        }
    }

    fn append(&self, extents: &[u64]) -> Result<(), TrackerError> {
        let mut lf = self.file.lock();
        self.drop_clean_marker(&mut lf)?;
        let fresh: Vec<u64> = extents
            .iter()
            .copied()
            .filter(|e| !self.hot.test(*e))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        formats::encode_al_groups(&self.header, &fresh, &mut buf);
        let path = self.dir.join(AL_NAME);
        lf.file
            .write_all_at(&buf, lf.len_bytes)
            .ctx("append to activity log", &path)?;
        lf.file.sync_data().ctx("fdatasync activity log", &path)?;
        lf.len_bytes += buf.len() as u64;
        lf.records += fresh.len() as u64;
        // Only now, with the records durable, may writers see the extents as hot.
        for e in fresh {
            self.hot.set(e);
        }
        Ok(())
    }

    /// Records many extents at once (`mark_all_dirty`, `mark_allocated_dirty`) by rewriting
    /// the log; the extents are hot when this returns `Ok`.
    pub(crate) fn add_many(&self, extents: &[u64]) -> Result<(), TrackerError> {
        if self.degraded() {
            return Ok(());
        }
        let mut lf = self.file.lock();
        let mut all = self.hot.ones();
        all.extend_from_slice(extents);
        all.sort_unstable();
        all.dedup();
        all.retain(|e| *e < self.hot.nbits());
        let result = self
            .drop_clean_marker(&mut lf)
            .and_then(|()| self.rewrite(&mut lf, &all));
        match result {
            Ok(()) => {
                for e in all {
                    self.hot.set(e);
                }
                Ok(())
            }
            Err(e) => {
                drop(lf);
                self.degrade(&e);
                Err(e)
            }
        }
    }

    /// Brings a degraded log back: rewrites it with every extent of the disk and, once that
    /// is durable, records again. Every extent is hot from then on, so every write made while
    /// the log was degraded (or racing with this) is covered (rule 2) whatever its bitmap
    /// says. Used when every block is marked dirty anyway (a full resynchronization), which
    /// re-establishes what the tracking covers. Returns whether the log records again.
    pub(crate) fn rearm_all(&self) -> Result<bool, TrackerError> {
        if !self.degraded() {
            return Ok(false);
        }
        let mut lf = self.file.lock();
        let all: Vec<u64> = (0..self.hot.nbits()).collect();
        self.drop_clean_marker(&mut lf)?;
        self.rewrite(&mut lf, &all)?;
        for e in all {
            self.hot.set(e);
        }
        let mut reason = self.degraded_reason.lock();
        *reason = None;
        self.degraded.store(false, Ordering::Release);
        tracing::warn!(dir = %self.dir.display(), "activity log rewritten with every extent; tracking survives a crash again");
        Ok(true)
    }

    fn drop_clean_marker(&self, lf: &mut LogFile) -> Result<(), TrackerError> {
        if lf.shut_down {
            durable::remove(&self.dir, CLEAN_NAME)?;
            lf.shut_down = false;
            tracing::warn!(dir = %self.dir.display(), "write after clean shutdown; stop is unclean again");
        }
        Ok(())
    }

    fn rewrite(&self, lf: &mut LogFile, extents: &[u64]) -> Result<(), TrackerError> {
        let mut buf = self.header.to_vec();
        formats::encode_al_groups(&self.header, extents, &mut buf);
        durable::write_atomic(&self.dir, AL_NAME, &buf)?;
        let path = self.dir.join(AL_NAME);
        lf.file = OpenOptions::new()
            .write(true)
            .open(&path)
            .ctx("reopen activity log", &path)?;
        lf.len_bytes = buf.len() as u64;
        lf.records = extents.len() as u64;
        Ok(())
    }

    /// Drops from the in-memory hot set every extent without a bit in `active`. The caller
    /// holds the cut gate exclusively (no write is between its hot check and its bitmap
    /// update) and no frozen epoch is outstanding.
    pub(crate) fn prune(&self, active: &Bitmap) {
        for e in self.hot.ones() {
            let first = e * BLOCKS_PER_EXTENT;
            if !active.any_in(first, first + BLOCKS_PER_EXTENT - 1) {
                self.hot.clear_range(e, e);
                self.pruned.store(true, Ordering::Release);
            }
        }
    }

    /// Rewrites the file to the in-memory hot set when it shrank or the file grew long.
    /// Called after commit/abort, off the write path.
    pub(crate) fn compact_if_needed(&self) {
        if self.degraded() {
            return;
        }
        let mut lf = self.file.lock();
        if lf.shut_down {
            return;
        }
        let hot = self.hot.count();
        let long = lf.records > 2 * hot + formats::AL_GROUP_EXTENTS_MAX as u64;
        if !self.pruned.swap(false, Ordering::AcqRel) && !long {
            return;
        }
        let extents = self.hot.ones();
        if let Err(e) = self.rewrite(&mut lf, &extents) {
            drop(lf);
            self.degrade(&e);
        }
    }

    /// Called by `shutdown_clean` with the gate held exclusively, after the clean marker is
    /// written: any later write must first remove the marker.
    pub(crate) fn mark_shut_down(&self) {
        self.file.lock().shut_down = true;
        self.hot.clear_all();
    }

    /// Stops recording after an I/O error, of the log itself or of the image's storage: the
    /// log is deleted (durably) so that a crash from now on is never taken as recoverable.
    pub(crate) fn degrade(&self, err: &dyn std::fmt::Display) {
        // The reason goes first: whoever sees `degraded` finds it.
        {
            let mut reason = self.degraded_reason.lock();
            if self.degraded() {
                return;
            }
            *reason = Some(err.to_string());
            self.degraded.store(true, Ordering::Release);
        }
        tracing::error!(dir = %self.dir.display(), error = %err,
            "activity log failed; tracking continues in memory but a crash now means resync");
        if let Err(e) = durable::remove(&self.dir, AL_NAME) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot remove the activity log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn read(dir: &Path) -> formats::AlContents {
        formats::decode_al(&std::fs::read(dir.join(AL_NAME)).expect("read log")).expect("valid log")
    }

    #[test]
    fn ensure_persists_before_hot_and_groups_concurrent_writers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 64 * EXTENT_BYTES;
        let log = Arc::new(ActivityLog::create(dir.path(), size, &[3]).expect("create"));
        assert!(log.all_hot(3, 3));
        assert!(!log.all_hot(0, 3));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..8 {
                        let e = (t * 8 + i) % 64;
                        log.ensure(e, (e + 1).min(63), false);
                        assert!(log.all_hot(e, (e + 1).min(63)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(read(dir.path()).extents, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn prune_then_compact_shrinks_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 8 * EXTENT_BYTES;
        let log = ActivityLog::create(dir.path(), size, &[]).expect("create");
        log.ensure(0, 3, false);
        let active = Bitmap::new(size / BLOCK_BYTES);
        active.set(2 * BLOCKS_PER_EXTENT + 5);
        log.prune(&active);
        assert!(log.all_hot(2, 2) && !log.all_hot(0, 0));
        // Staying in the file until compaction is the conservative direction.
        assert_eq!(read(dir.path()).extents, vec![0, 1, 2, 3]);
        log.compact_if_needed();
        assert_eq!(read(dir.path()).extents, vec![2]);
    }

    #[test]
    fn write_after_shutdown_removes_the_clean_marker_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ActivityLog::create(dir.path(), 4 * EXTENT_BYTES, &[1]).expect("create");
        std::fs::write(dir.path().join(CLEAN_NAME), b"x").expect("marker");
        log.mark_shut_down();
        log.compact_if_needed();
        assert_eq!(
            read(dir.path()).extents,
            vec![1],
            "no compaction after shutdown"
        );
        log.ensure(0, 0, false);
        assert!(!dir.path().join(CLEAN_NAME).exists());
        assert_eq!(read(dir.path()).extents, vec![0, 1]);
    }

    #[test]
    fn one_fsync_logs_the_extents_ahead_of_a_sequential_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ActivityLog::create(dir.path(), 64 * EXTENT_BYTES, &[]).expect("create");
        log.ensure(10, 10, true);
        let ahead = 10 + AL_LOOKAHEAD_EXTENTS;
        assert!(log.all_hot(10, ahead), "look-ahead extents are hot");
        assert!(!log.all_hot(ahead + 1, ahead + 1));
        // Small writes do not look ahead.
        log.ensure(30, 30, false);
        assert!(log.all_hot(30, 30) && !log.all_hot(31, 31));
        let mut expected: Vec<u64> = (10..=ahead).collect();
        expected.push(30);
        assert_eq!(read(dir.path()).extents, expected);
        // Clamped at the end of the disk.
        log.ensure(62, 63, true);
        assert!(log.all_hot(62, 63));
    }

    #[test]
    fn io_failure_degrades_and_removes_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ActivityLog::create(dir.path(), 4 * EXTENT_BYTES, &[]).expect("create");
        // Make the append fail: swap the file handle for a read-only one.
        {
            let path = dir.path().join(AL_NAME);
            log.file.lock().file = File::open(&path).expect("ro");
        }
        log.ensure(0, 0, false);
        assert!(log.degraded());
        assert!(log.all_hot(0, 3), "writes proceed when degraded");
        assert!(!dir.path().join(AL_NAME).exists());
    }

    /// A degraded log stayed degraded for the life of the disk: a resynchronization required
    /// for it could never complete (the daemon found the failure again at once). Marking
    /// every block dirty re-arms it with every extent.
    #[test]
    fn degraded_log_is_rearmed_with_every_extent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ActivityLog::create(dir.path(), 4 * EXTENT_BYTES, &[]).expect("create");
        assert!(!log.rearm_all().expect("healthy"), "nothing to re-arm");
        {
            let path = dir.path().join(AL_NAME);
            log.file.lock().file = File::open(&path).expect("ro");
        }
        log.ensure(0, 0, false);
        assert!(log.degraded_reason().is_some());
        assert!(log.rearm_all().expect("rearm"));
        assert!(!log.degraded());
        assert_eq!(log.degraded_reason(), None);
        assert_eq!(read(dir.path()).extents, vec![0, 1, 2, 3]);
        // It records again: a later failure degrades it again.
        log.file.lock().file = File::open(dir.path().join(AL_NAME)).expect("ro");
        log.prune(&Bitmap::new(4 * BLOCKS_PER_EXTENT));
        log.ensure(1, 1, false);
        assert!(log.degraded());
    }
}
