//! `TrackedDisk`: one image file with its dirty bitmaps, activity log and copy-before-write
//! state; opening (with recovery and `DiskOptions`), creating, marking dirty, and clean
//! shutdown.
//!
//! Owns the image file handle and the state directory of one disk. It must never leave the
//! state directory in a shape that a later open would trust wrongly: the clean marker exists
//! only while nothing can write, and every dirty bit lies in an extent of the activity log.
//! The write path itself is in `backend.rs`, cuts in `cut.rs`, copy-before-write in `cbw.rs`.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::activity::{ActivityLog, BLOCKS_PER_EXTENT, CLEAN_NAME};
use crate::bitmap::Bitmap;
use crate::cbw::FrozenState;
use crate::cut::CutGate;
use crate::durable;
use crate::error::{IoContext, TrackerError};
use crate::formats::{self, CleanMarker, Fingerprint};
use crate::recovery::{self, Restored, BITMAP_NAME};
use crate::sys;
use crate::{OpenReport, OpenState, BLOCK_BYTES};

pub(crate) const CBW_NAME: &str = "disk.cbw";
const LOCK_NAME: &str = "lock";

/// Default memory for copy-before-write copies, per disk. A guest that rewrites its disk while
/// a cut ships (1 MiB sequential writes at ~2 GiB/s against a shipper at ~150 MiB/s) needs
/// copies of about the whole epoch; 256 MiB holds all of them for the 512 MiB–1 GiB epochs of
/// the benchmarks' random writes and most of the sequential ones, and is what a VM host can
/// lend per replicating disk. The memory is touched only while copies are made, kept for the
/// next epochs (warm pages), and released after `pool::POOL_IDLE_RELEASE` of quieter epochs;
/// an idle disk never maps it.
pub const CBW_MEMORY_BYTES_MAX_DEFAULT: u64 = 256 << 20;

/// Settings of one tracked disk, fixed at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// Memory for copy-before-write copies of this disk (rounded down to 4 KiB; 0 = none).
    /// When it is full, copies spill to `<state_dir>/disk.cbw`.
    pub cbw_memory_bytes_max: u64,
    /// Cap on the bytes one epoch may spill to `disk.cbw`; a copy that would pass it abandons
    /// the epoch instead (the cut is aborted, its blocks stay dirty). `None`: computed at each
    /// cut from the free space of the state directory's filesystem (`cbw::spill_cap`).
    pub cbw_spill_bytes_max: Option<u64>,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            cbw_memory_bytes_max: CBW_MEMORY_BYTES_MAX_DEFAULT,
            cbw_spill_bytes_max: None,
        }
    }
}

/// Test hook of `TrackedDisk::between_pieces`.
#[cfg(test)]
pub(crate) type PieceHook = Box<dyn FnMut(u64) + Send>;

/// A disk image in the replication write path. See the crate documentation.
pub struct TrackedDisk {
    pub(crate) image: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) file: File,
    pub(crate) size: u64,
    pub(crate) nblocks: u64,
    pub(crate) gate: Arc<CutGate>,
    /// The active and the frozen dirty bitmap; `active_idx` says which is active. Flipped only
    /// with the gate held exclusively; the frozen one is empty whenever no cut is outstanding.
    pub(crate) maps: [Bitmap; 2],
    pub(crate) active_idx: AtomicUsize,
    /// Frozen blocks whose cut-time content is secured: copied (to memory or the CBW file), or
    /// already read by the shipper. Writers may overwrite such blocks without taking `frozen`.
    pub(crate) secured: Bitmap,
    pub(crate) frozen: FrozenState,
    pub(crate) al: ActivityLog,
    pub(crate) shut_down: AtomicBool,
    /// Fenced (`set_fenced`): every modifying call fails (NBD `EPERM`).
    pub(crate) fenced: AtomicBool,
    /// The first failed sync of the image, as text ("fdatasync: Input/output error ..."):
    /// sticky until the disk is reopened (see `sync_image`).
    storage_error: parking_lot::Mutex<Option<String>>,
    storage_failed: AtomicBool,
    /// Test failpoint: the next sync of the image fails with EIO without syncing.
    #[cfg(test)]
    pub(crate) fail_next_sync: AtomicBool,
    /// Holds the `flock` on `<state_dir>/lock` for the life of the disk.
    _lock: File,
    /// Test hook: called after each piece of a TRIM/WRITE_ZEROES with the end of the piece,
    /// with no lock held.
    #[cfg(test)]
    pub(crate) between_pieces: parking_lot::Mutex<Option<PieceHook>>,
}

impl TrackedDisk {
    /// Creates a new sparse image of `size_bytes` (refusing to overwrite one) and opens it
    /// with the default options. Stale state files in `state_dir` are removed first: they
    /// describe another image.
    pub fn create(
        image: &Path,
        size_bytes: u64,
        state_dir: &Path,
        gate: Arc<CutGate>,
    ) -> Result<Arc<TrackedDisk>, TrackerError> {
        TrackedDisk::create_with(image, size_bytes, state_dir, gate, &DiskOptions::default())
    }

    /// `create` with explicit options.
    pub fn create_with(
        image: &Path,
        size_bytes: u64,
        state_dir: &Path,
        gate: Arc<CutGate>,
        options: &DiskOptions,
    ) -> Result<Arc<TrackedDisk>, TrackerError> {
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(image)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(TrackerError::ImageExists {
                    path: image.to_path_buf(),
                })
            }
            Err(e) => return Err(TrackerError::io("create image", image, e)),
        };
        f.set_len(size_bytes).ctx("size image", image)?;
        f.sync_all().ctx("fsync image", image)?;
        if let Some(parent) = image.parent().filter(|p| !p.as_os_str().is_empty()) {
            durable::fsync_dir(parent)?;
        }
        fs::create_dir_all(state_dir).ctx("create state directory", state_dir)?;
        // Also the lock file: its presence tells a later open that this directory had state.
        for name in [CLEAN_NAME, BITMAP_NAME, crate::activity::AL_NAME, LOCK_NAME] {
            durable::remove(state_dir, name)?;
        }
        let (disk, _report) = TrackedDisk::open_with(image, state_dir, gate, options)?;
        Ok(disk)
    }

    /// Opens an existing image with its state directory (created if missing) and reports what
    /// the state proved, with the default options. Corrupt state is a finding, not an error;
    /// errors are failing I/O, a missing image, or a state directory locked by another tracker.
    pub fn open(
        image: &Path,
        state_dir: &Path,
        gate: Arc<CutGate>,
    ) -> Result<(Arc<TrackedDisk>, OpenReport), TrackerError> {
        TrackedDisk::open_with(image, state_dir, gate, &DiskOptions::default())
    }

    /// `open` with explicit options.
    pub fn open_with(
        image: &Path,
        state_dir: &Path,
        gate: Arc<CutGate>,
        options: &DiskOptions,
    ) -> Result<(Arc<TrackedDisk>, OpenReport), TrackerError> {
        fs::create_dir_all(state_dir).ctx("create state directory", state_dir)?;
        let lock_path = state_dir.join(LOCK_NAME);
        // A tracker had this directory before: missing state files then mean lost state.
        let had_tracker = lock_path.exists();
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .ctx("open lock file", &lock_path)?;
        if !sysutil::try_lock_exclusive(&lock).ctx("lock state directory", &lock_path)? {
            return Err(TrackerError::StateLocked {
                path: state_dir.to_path_buf(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
            .ctx("open image", image)?;
        let meta = file.metadata().ctx("stat image", image)?;
        let size = meta.len();
        let nblocks = size.div_ceil(BLOCK_BYTES);

        let (state, restored) =
            recovery::load(state_dir, size, &Fingerprint::of(&meta), had_tracker)?;
        let active = Bitmap::new(nblocks);
        match restored {
            Restored::Nothing => {}
            Restored::Words(words) => active.or_words(&words),
            Restored::Extents(extents) => {
                for e in extents {
                    active.set_range(e * BLOCKS_PER_EXTENT, (e + 1) * BLOCKS_PER_EXTENT - 1);
                }
            }
        }
        match &state {
            OpenState::FirstOpen | OpenState::Clean => {}
            other => {
                tracing::warn!(image = %image.display(), state = ?other, "tracker state at open")
            }
        }

        // Every dirty bit must lie in a logged extent before anything can write (rule 2).
        let hot: Vec<u64> = (0..formats::extent_count(size))
            .filter(|e| active.any_in(e * BLOCKS_PER_EXTENT, (e + 1) * BLOCKS_PER_EXTENT - 1))
            .collect();
        let al = ActivityLog::create(state_dir, size, &hot)?;
        // From here a kill -9 must be seen as unclean.
        durable::remove(state_dir, CLEAN_NAME)?;
        durable::remove(state_dir, BITMAP_NAME)?;

        let cbw_path = state_dir.join(CBW_NAME);
        let cbw = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&cbw_path)
            .ctx("open copy-before-write file", &cbw_path)?;

        let disk = TrackedDisk {
            image: image.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            file,
            size,
            nblocks,
            gate,
            maps: [active, Bitmap::new(nblocks)],
            active_idx: AtomicUsize::new(0),
            secured: Bitmap::new(nblocks),
            frozen: FrozenState::new(
                cbw,
                nblocks,
                options.cbw_memory_bytes_max,
                options.cbw_spill_bytes_max,
            ),
            al,
            shut_down: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            storage_error: parking_lot::Mutex::new(None),
            storage_failed: AtomicBool::new(false),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            _lock: lock,
            #[cfg(test)]
            between_pieces: parking_lot::Mutex::new(None),
        };
        Ok((Arc::new(disk), OpenReport { state }))
    }

    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Fences the disk (`true`): from now on every write, trim and write-zeroes fails with
    /// a permission error (NBD `EPERM`) and changes nothing, whoever sends it (an NBD connection opened before the
    /// fence included); reads go on. Another host took over the VM, and a write here would
    /// be one the replica never sees.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::Release);
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Blocks not on the replica (active ∪ the frozen map of a cut not committed) as byte
    /// ranges `(offset, len)`: coalesced, block aligned, clipped to the size.
    pub fn unshipped_ranges(&self) -> Vec<(u64, u64)> {
        let (a, f) = (self.active(), self.frozen_map());
        let union = crate::bitmap::Bitmap::new(self.nblocks);
        union.or_from(a);
        union.or_from(f);
        union
            .runs()
            .into_iter()
            .map(|(b, n)| {
                let off = b * BLOCK_BYTES;
                (off, ((b + n) * BLOCK_BYTES).min(self.size) - off)
            })
            .collect()
    }

    pub fn image_path(&self) -> &Path {
        &self.image
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// True when the activity log failed: tracking continues in memory, but a crash from now
    /// on will be reported as `TrackingLost` (the daemon should raise a warning).
    pub fn tracking_degraded(&self) -> bool {
        self.al.degraded()
    }

    /// Why the activity log degraded (its first I/O error, or the image's failed sync), once
    /// it has: the daemon reports it and requires a resynchronization, since a crash from
    /// now on could not say what changed.
    pub fn tracking_error(&self) -> Option<String> {
        self.al.degraded_reason()
    }

    /// The first error a sync (`fdatasync`/`fsync`) of the image reported since the disk was
    /// opened, or `None`. Once set, every FLUSH and FUA write fails with EIO and
    /// `shutdown_clean` writes no clean marker: the pages of some write the guest was told is
    /// durable (or will be at its next flush) may never have reached the disk, and the kernel
    /// reports that only once per open file. The daemon must treat it as a replica that may
    /// differ from the primary's disk (resynchronization).
    pub fn storage_error(&self) -> Option<String> {
        if !self.storage_failed.load(Ordering::Acquire) {
            return None;
        }
        self.storage_error.lock().clone()
    }

    /// Syncs the image (`fdatasync`, or `fsync` when `all`), sticky on failure: after the
    /// first error every later call fails with EIO without syncing (fsyncgate: a later sync
    /// would succeed although the failed pages are gone). The first error also degrades the
    /// activity log (deleted durably), so a crash from now on cannot be taken for a
    /// recoverable unclean stop.
    pub(crate) fn sync_image(&self, all: bool) -> std::io::Result<()> {
        if self.storage_failed.load(Ordering::Acquire) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        #[cfg(test)]
        let injected = self.fail_next_sync.swap(false, Ordering::AcqRel);
        #[cfg(not(test))]
        let injected = false;
        let result = if injected {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else if all {
            self.file.sync_all()
        } else {
            self.file.sync_data()
        };
        if let Err(e) = &result {
            let op = if all { "fsync" } else { "fdatasync" };
            let text = format!("{op}: {e}");
            self.storage_error
                .lock()
                .get_or_insert_with(|| text.clone());
            self.storage_failed.store(true, Ordering::Release);
            tracing::error!(image = %self.image.display(), error = %text,
                "the image's storage reported a write-back error; every later flush fails until the disk is reopened");
            self.al.degrade(&format!(
                "{} of the image failed: {text}",
                self.image.display()
            ));
        }
        result
    }

    /// Number of extents in the in-memory hot set (for metrics and tests).
    pub fn hot_extents(&self) -> u64 {
        self.al.hot_count()
    }

    pub(crate) fn active(&self) -> &Bitmap {
        &self.maps[self.active_idx.load(Ordering::Acquire) & 1]
    }

    pub(crate) fn frozen_map(&self) -> &Bitmap {
        &self.maps[(self.active_idx.load(Ordering::Acquire) & 1) ^ 1]
    }

    /// Bytes covered by `count` blocks of a map whose last block is set or not.
    pub(crate) fn blocks_bytes(&self, count: u64, last_set: bool) -> u64 {
        let tail = self.nblocks * BLOCK_BYTES - self.size;
        count * BLOCK_BYTES - if last_set { tail } else { 0 }
    }

    /// Bytes not yet on the replica: active ∪ frozen-not-committed.
    pub fn dirty_bytes(&self) -> u64 {
        let (a, f) = (self.active(), self.frozen_map());
        let last = self.nblocks.checked_sub(1);
        let last_set = last.is_some_and(|l| a.test(l) || f.test(l));
        self.blocks_bytes(a.count_union(f), last_set)
    }

    fn set_dirty_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), TrackerError> {
        let mut extents: Vec<u64> = Vec::new();
        for (first, last) in ranges {
            extents.extend(first / BLOCKS_PER_EXTENT..=last / BLOCKS_PER_EXTENT);
        }
        extents.dedup();
        // Persist first (rule 2); on failure the log is degraded and says so at the next open.
        let persisted = self.al.add_many(&extents);
        let _shared = self.gate.shared();
        for (first, last) in ranges {
            self.active().set_range(*first, *last);
        }
        persisted
    }

    /// Marks every block dirty: the next cut ships the whole disk. An error means the marks
    /// could not be made durable (a crash would lose them): the caller must not rely on them.
    /// A degraded activity log (its own I/O error, not the image's storage) is rewritten
    /// with every extent and records again: a full resynchronization re-establishes the
    /// tracking after `tracking_error()`.
    pub fn mark_all_dirty(&self) -> Result<(), TrackerError> {
        if self.nblocks == 0 {
            return Ok(());
        }
        if self.storage_error().is_none() {
            // On failure the log stays degraded (and says so); the marks are still made.
            if let Err(e) = self.al.rearm_all() {
                tracing::error!(image = %self.image.display(), error = %e, "the activity log cannot be rewritten; it stays degraded");
            }
        }
        self.set_dirty_ranges(&[(0, self.nblocks - 1)])
    }

    /// Marks the 4 KiB blocks in `ranges` (block indexes, end exclusive) dirty, durably: the
    /// next cut ships them (a failed-over VM's writes, for the reverse replication).
    pub fn mark_dirty_blocks(&self, ranges: &[std::ops::Range<u64>]) -> Result<(), TrackerError> {
        let inclusive: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|r| r.start < r.end && r.start < self.nblocks)
            .map(|r| (r.start, r.end.min(self.nblocks) - 1))
            .collect();
        if inclusive.is_empty() {
            return Ok(());
        }
        self.set_dirty_ranges(&inclusive)
    }

    /// Marks every allocated block dirty (SEEK_DATA/SEEK_HOLE): the next cut ships the disk
    /// sparse-aware. Returns the bytes marked.
    pub fn mark_allocated_dirty(&self) -> Result<u64, TrackerError> {
        let mut ranges = Vec::new();
        let mut bytes = 0;
        let mut pos = 0;
        while pos < self.size {
            let data = match sysutil::seek_data(&self.file, pos).ctx("SEEK_DATA", &self.image)? {
                Some(d) if d < self.size => d,
                _ => break,
            };
            let hole = sysutil::seek_hole(&self.file, data)
                .ctx("SEEK_HOLE", &self.image)?
                .unwrap_or(self.size)
                .min(self.size);
            let (first, last) = (data / BLOCK_BYTES, (hole.max(data + 1) - 1) / BLOCK_BYTES);
            ranges.push((first, last));
            bytes += ((last + 1) * BLOCK_BYTES).min(self.size) - first * BLOCK_BYTES;
            pos = hole.max(data + 1);
        }
        self.set_dirty_ranges(&ranges)?;
        Ok(bytes)
    }

    /// Clean stop; call after the NBD server stopped. Flushes the image, persists the dirty
    /// bitmap (active ∪ uncommitted frozen), then the clean marker with the image fingerprint.
    /// A write after this (there should be none) makes the stop unclean again.
    ///
    /// After a storage error (`storage_error`) nothing is written and the call fails with
    /// `TrackerError::StorageFailed`: the next open must not see a clean stop.
    pub fn shutdown_clean(&self) -> Result<(), TrackerError> {
        if let Err(e) = self.sync_image(true) {
            return Err(match self.storage_error() {
                Some(reason) => TrackerError::StorageFailed {
                    path: self.image.clone(),
                    reason,
                },
                None => TrackerError::io("flush image", &self.image, e),
            });
        }
        let _exclusive = self.gate.exclusive();
        // A covered epoch's frozen blocks are recorded by the caller (`Cut::cover`).
        let words = if self.epoch_covered() {
            self.active()
                .union_words(&crate::bitmap::Bitmap::new(self.nblocks))
        } else {
            self.active().union_words(self.frozen_map())
        };
        let bitmap = formats::encode_bitmap(self.size, BLOCK_BYTES, &words);
        durable::write_atomic(&self.state_dir, BITMAP_NAME, &bitmap)?;
        let meta = self.file.metadata().ctx("stat image", &self.image)?;
        // Racy clean marker (git's "racily clean" index): an edit stamped in the same clock
        // tick as the image's last change would leave the fingerprint equal. Let the clock
        // pass that tick first, then take the fingerprint.
        let meta = if sys::wait_past_change_time(Fingerprint::of(&meta).ctime_ns) {
            self.file.metadata().ctx("stat image", &self.image)?
        } else {
            meta
        };
        let marker = CleanMarker {
            fingerprint: Fingerprint::of(&meta),
            bitmap_hash: *blake3::hash(&bitmap).as_bytes(),
        };
        durable::write_atomic(&self.state_dir, CLEAN_NAME, &formats::encode_clean(&marker))?;
        self.al.mark_shut_down();
        self.shut_down.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd::BlockBackend;

    fn is_eio(r: std::io::Result<()>) -> bool {
        matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
    }

    #[test]
    fn failed_image_sync_is_sticky_and_blocks_the_clean_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (image, state) = (dir.path().join("img"), dir.path().join("state"));
        let gate = CutGate::new();
        let d = TrackedDisk::create(&image, 1 << 20, &state, gate).expect("create");
        d.write_at(&[1u8; 4096], 0, false).expect("write");
        d.flush().expect("a healthy flush");
        assert_eq!(d.storage_error(), None);

        d.fail_next_sync.store(true, Ordering::Release);
        assert!(is_eio(d.flush()), "the failing flush reports EIO");
        let first = d.storage_error().expect("recorded");
        assert!(first.starts_with("fdatasync: "), "{first}");
        // The kernel would report the error once; later syncs must not pretend all is well.
        assert!(is_eio(d.flush()), "second flush");
        assert!(is_eio(d.write_at(&[2u8; 4096], 0, true)), "FUA write");
        assert!(is_eio(d.trim(0, 4096, true)), "FUA trim");
        assert!(
            is_eio(d.write_zeroes(0, 4096, false, true)),
            "FUA write zeroes"
        );
        d.write_at(&[3u8; 4096], 4096, false)
            .expect("plain writes still go to the page cache");
        assert_eq!(
            d.storage_error(),
            Some(first.clone()),
            "the first error is kept"
        );
        assert!(d.tracking_degraded());

        match d.shutdown_clean() {
            Err(TrackerError::StorageFailed { reason, .. }) => assert_eq!(reason, first),
            other => panic!("expected StorageFailed, got {other:?}"),
        }
        assert!(!state.join(CLEAN_NAME).exists(), "no clean marker");
        drop(d);
        let (d, report) = TrackedDisk::open(&image, &state, CutGate::new()).expect("reopen");
        assert!(
            matches!(report.state, OpenState::TrackingLost { .. }),
            "{:?}",
            report.state
        );
        // Reopened: a new open file description, the error is no longer held.
        assert_eq!(d.storage_error(), None);
        d.flush().expect("flush after reopen");
    }
}
