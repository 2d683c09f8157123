//! Crash-consistent cuts: the per-VM `CutGate`, `cut()`, and the shipped epoch (`Cut`,
//! `FrozenDisk`). Copy-before-write and the per-disk frozen state live in `cbw.rs`.
//!
//! This module must never hold the gate longer than the drain and the bitmap swap of every
//! disk (the guest's pause), and never let two cuts of one VM be outstanding.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::disk::TrackedDisk;
use crate::error::TrackerError;
use crate::BLOCK_BYTES;

/// The gate shared by all disks of one VM. Every guest write holds the shared side for its
/// whole duration; a cut holds the exclusive side, which drains in-flight writes.
/// `parking_lot`'s lock is fair: a waiting cut stops new writers, so the drain is bounded.
pub struct CutGate {
    lock: RwLock<()>,
    outstanding: AtomicBool,
}

impl CutGate {
    pub fn new() -> Arc<CutGate> {
        Arc::new(CutGate {
            lock: RwLock::new(()),
            outstanding: AtomicBool::new(false),
        })
    }

    /// True while a `Cut` of this VM has been neither committed nor aborted.
    pub fn cut_outstanding(&self) -> bool {
        self.outstanding.load(Ordering::Acquire)
    }

    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read()
    }

    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write()
    }
}

/// Takes a crash-consistent cut of `disks` (all disks of one VM, sharing `gate`).
/// Fails when a cut of this VM is outstanding.
pub fn cut(gate: &CutGate, disks: &[Arc<TrackedDisk>]) -> Result<Cut, TrackerError> {
    if disks.is_empty() {
        return Err(TrackerError::NoDisks);
    }
    for (i, d) in disks.iter().enumerate() {
        if !std::ptr::eq(Arc::as_ptr(&d.gate), gate) {
            return Err(TrackerError::ForeignDisk {
                path: d.image.clone(),
            });
        }
        if disks[..i].iter().any(|o| Arc::ptr_eq(o, d)) {
            return Err(TrackerError::DuplicateDisk {
                path: d.image.clone(),
            });
        }
        if d.shut_down.load(Ordering::Acquire) {
            return Err(TrackerError::ShutDown {
                path: d.image.clone(),
            });
        }
    }
    if gate
        .outstanding
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(TrackerError::CutOutstanding);
    }
    // Out of the gate: a `statvfs` per disk.
    let spill_caps: Vec<u64> = disks.iter().map(|d| d.spill_cap()).collect();
    let started = Instant::now();
    let exclusive = gate.exclusive();
    // Taken while no write is in flight on any disk of the VM: the instant of the cut.
    let cut_time_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut frozen = Vec::with_capacity(disks.len());
    for (d, spill_cap) in disks.iter().zip(spill_caps) {
        let epoch = d.freeze(spill_cap);
        frozen.push(FrozenDisk {
            disk: Arc::clone(d),
            epoch,
        });
    }
    drop(exclusive);
    let pause = started.elapsed();
    let members = frozen
        .iter()
        .map(|f| (Arc::clone(&f.disk), f.epoch))
        .collect();
    Ok(Cut {
        cut_time_unix_ns,
        pause,
        disks: frozen,
        members,
        gate_owner: Arc::clone(&disks[0]),
        done: false,
    })
}

/// One shipped epoch of all disks of a VM. Send it to the shipping thread; end it with
/// `commit` once the replica has the point durably, or `abort`. Dropping it aborts.
pub struct Cut {
    /// Wall-clock instant of the cut (taken with every write drained).
    pub cut_time_unix_ns: u64,
    /// How long guest writes of this VM were held: drain + swap.
    pub pause: Duration,
    pub disks: Vec<FrozenDisk>,
    members: Vec<(Arc<TrackedDisk>, u64)>,
    gate_owner: Arc<TrackedDisk>,
    done: bool,
}

impl Cut {
    /// The replica committed this point: forget the frozen blocks and the CBW data.
    pub fn commit(mut self) {
        self.finish(true);
    }

    /// The caller has durably recorded which blocks of this cut still need shipping (a
    /// resynchronization's cursor): from now on the activity log covers only what the guest
    /// writes after the cut, so a crash recovers those writes alone, and `abort` drops the
    /// frozen blocks (the caller ships them again from its record). Call it once the record
    /// is durable, never before: until then the log still covers the frozen blocks.
    pub fn cover(&self) {
        for (disk, epoch) in &self.members {
            disk.cover_epoch(*epoch);
        }
    }

    /// Shipping failed: the frozen blocks return to the active bitmap (coalescing with later
    /// writes), so the next cut ships them again.
    pub fn abort(mut self) {
        self.finish(false);
    }

    fn finish(&mut self, committed: bool) {
        if self.done {
            return;
        }
        self.done = true;
        for (disk, epoch) in &self.members {
            disk.end_epoch(*epoch, committed);
        }
        for (disk, _) in &self.members {
            disk.al.compact_if_needed();
        }
        self.gate_owner
            .gate
            .outstanding
            .store(false, Ordering::Release);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!("cut dropped without commit or abort; aborting it");
            self.finish(false);
        }
    }
}

/// The frozen view of one disk at the cut.
pub struct FrozenDisk {
    disk: Arc<TrackedDisk>,
    epoch: u64,
}

impl FrozenDisk {
    pub fn image_path(&self) -> &Path {
        &self.disk.image
    }

    pub fn size_bytes(&self) -> u64 {
        self.disk.size
    }

    /// Dirty ranges of the cut as `(offset, len)`: coalesced, block aligned, clipped to size.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let size = self.disk.size;
        self.disk
            .frozen_map()
            .runs()
            .into_iter()
            .map(|(b, n)| {
                let off = b * BLOCK_BYTES;
                (off, ((b + n) * BLOCK_BYTES).min(size) - off)
            })
            .collect()
    }

    /// Bytes in the cut.
    pub fn dirty_bytes(&self) -> u64 {
        let f = self.disk.frozen_map();
        let last_set = self.disk.nblocks.checked_sub(1).is_some_and(|l| f.test(l));
        self.disk.blocks_bytes(f.count(), last_set)
    }

    /// Reads content as of the cut. Every block touched must be in `ranges()`; each block is
    /// read whole once: it then counts as shipped, and the memory of its copy-before-write
    /// copy, if any, is recycled (a second read of it is an error, as is any read after
    /// commit/abort or after a failed copy-before-write). Parts of a block may be read first.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.read_frozen(self.epoch, buf, offset)
    }

    /// Reads content as of the cut like `read_at`, but ships nothing: the blocks stay in the
    /// cut (their copies held) and can be read again. A resynchronization compares with it.
    pub fn peek_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.peek_frozen(self.epoch, buf, offset)
    }

    /// Ships the whole blocks of `offset..offset+len_bytes` without reading them (a resync
    /// found them equal on the replica): they count as read, and their copies are given back.
    pub fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        self.disk.discard_frozen(self.epoch, offset, len_bytes)
    }

    /// Read-ahead hint for the image's `offset..offset+len_bytes` (speed only; errors ignored).
    pub fn will_need(&self, offset: u64, len_bytes: u64) {
        let _ = sysutil::will_need(&self.disk.file, offset, len_bytes);
    }

    /// `skip_if_hole` that marks nothing as read (for a compare).
    pub fn peek_hole(&self, offset: u64, len_bytes: u64) -> io::Result<bool> {
        self.disk.peek_frozen_hole(self.epoch, offset, len_bytes)
    }

    /// The first range at or after `from` (a block boundary) that this cut has not shipped
    /// yet (neither read whole by `read_at` nor skipped by `skip_if_hole`), at most
    /// `len_bytes_max` long (a multiple of the block size) and never crossing a 1 MiB boundary,
    /// so that one `read_at` of it holds one stripe lock. `None` when nothing is left after
    /// `from`. A shipper that reads other ranges first (`ranges_in_memory`) iterates with
    /// this instead of `ranges()`, so that no block is read twice.
    pub fn next_unshipped(&self, from: u64, len_bytes_max: u64) -> Option<(u64, u64)> {
        self.disk
            .frozen_next_unshipped(self.epoch, from, len_bytes_max)
    }

    /// Ranges (block aligned, coalesced, in disk order) whose copy-before-write copies are in
    /// memory now and not read yet. A snapshot: writers may add copies, and only reads of this
    /// cut remove them, so every range can be read once as it is. Reading them before the
    /// rest gives their memory back to the pool sooner, so fewer later copies spill to the
    /// file. Frames of a delta may come in any order (they do not overlap).
    pub fn ranges_in_memory(&self) -> Vec<(u64, u64)> {
        self.disk.frozen_in_memory(self.epoch)
    }

    /// Bytes of copy-before-write copies held in memory and not read yet, and the bound of
    /// that memory (`DiskOptions::cbw_memory_bytes_max`): when the first nears the second,
    /// copies start spilling to the file.
    pub fn in_memory_bytes(&self) -> (u64, u64) {
        self.disk.frozen_in_memory_bytes()
    }

    /// Why this cut can no longer be read, when its copy-before-write was abandoned (the spill
    /// cap was reached, or a copy failed): the reason the shipper's read failed, to report
    /// whatever else the failed upload says. `None` while the cut is readable.
    pub fn abandoned(&self) -> Option<String> {
        self.disk.frozen_abandoned(self.epoch)
    }

    /// True when `offset..offset+len_bytes` (block aligned, within one 1 MiB region) reads as
    /// zeros at the cut without reading it: a hole in the image with no copy-before-write data
    /// and not read before. The range then counts as read. False: read it with `read_at`.
    pub fn skip_if_hole(&self, offset: u64, len_bytes: u64) -> io::Result<bool> {
        self.disk.frozen_hole(self.epoch, offset, len_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd::BlockBackend;
    use std::sync::atomic::AtomicBool;

    /// A compare peeks at the cut (the guest overwriting a peeked block still gets its cut
    /// content copied aside), the blocks found equal are discarded unread, and the shipper
    /// then finds exactly the others, reading them as of the cut.
    #[test]
    fn peeked_blocks_stay_in_the_cut_and_discarded_ones_are_not_shipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gate = CutGate::new();
        let disk = TrackedDisk::create(
            &dir.path().join("img"),
            64 * BLOCK_BYTES,
            &dir.path().join("state"),
            gate.clone(),
        )
        .expect("create");
        disk.write_at(&[1u8; 8 * BLOCK_BYTES as usize], 0, false)
            .expect("write");
        disk.mark_all_dirty().expect("mark");
        let c = cut(&gate, std::slice::from_ref(&disk)).expect("cut");
        let f = &c.disks[0];
        let mut buf = vec![0u8; 8 * BLOCK_BYTES as usize];
        f.peek_at(&mut buf, 0).expect("peek");
        assert!(buf.iter().all(|&b| b == 1));
        // The guest overwrites block 2 after the peek: its cut content is kept.
        disk.write_at(&[9u8; BLOCK_BYTES as usize], 2 * BLOCK_BYTES, false)
            .expect("guest write");
        assert!(f
            .peek_hole(32 * BLOCK_BYTES, 4 * BLOCK_BYTES)
            .expect("hole"));
        // Blocks 0-1 and 3-63 were equal; blocks 2 differs.
        f.discard(0, 2 * BLOCK_BYTES).expect("discard");
        f.discard(3 * BLOCK_BYTES, 61 * BLOCK_BYTES)
            .expect("discard");
        assert_eq!(
            f.next_unshipped(0, 1 << 20),
            Some((2 * BLOCK_BYTES, BLOCK_BYTES))
        );
        let mut block = vec![0u8; BLOCK_BYTES as usize];
        f.read_at(&mut block, 2 * BLOCK_BYTES).expect("read");
        assert!(
            block.iter().all(|&b| b == 1),
            "cut content, not the guest's"
        );
        assert_eq!(f.next_unshipped(3 * BLOCK_BYTES, 1 << 20), None);
        c.commit();
    }

    #[test]
    fn abort_merge_takes_the_gate_so_it_cannot_race_shutdown_union() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gate = CutGate::new();
        let disk = TrackedDisk::create(
            &dir.path().join("img"),
            64 * BLOCK_BYTES,
            &dir.path().join("state"),
            gate.clone(),
        )
        .expect("create");
        disk.write_at(&[1u8; BLOCK_BYTES as usize], 5 * BLOCK_BYTES, false)
            .expect("write");
        let c = cut(&gate, std::slice::from_ref(&disk)).expect("cut");
        // What `shutdown_clean` holds while it computes `union_words`.
        let exclusive = gate.exclusive();
        let done = Arc::new(AtomicBool::new(false));
        let aborter = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                c.abort();
                done.store(true, Ordering::Release);
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !done.load(Ordering::Acquire),
            "abort merged the frozen map while the gate was held exclusively"
        );
        assert!(disk.frozen_map().test(5) && !disk.active().test(5));
        drop(exclusive);
        aborter.join().expect("abort thread");
        assert!(disk.active().test(5) && !disk.frozen_map().test(5));
    }
}
