//! Crash-consistent cuts: the per-VM `CutGate`, `cut()`, the shipped epoch (`Cut`,
//! `FrozenDisk`), and copy-before-write (CBW) that keeps frozen content readable while the
//! guest keeps writing.
//!
//! Coordination, per disk (`F` = frozen bitmap, `S` = `secured` bitmap, `frozen` = mutex):
//! - a writer whose range has a block in `F \ S` takes `frozen`, copies each such block's
//!   current (= cut-time) content into `<state_dir>/disk.cbw`, sets it in `S`, then writes;
//! - `FrozenDisk::read_at` holds `frozen` for the whole call: blocks with a CBW copy are read
//!   from the CBW file, blocks not in `S` from the image (no writer can overwrite them while
//!   `frozen` is held, since it would have to copy them first), and fully read image blocks are
//!   then set in `S` (the shipper has them; no copy is needed anymore). A block in `S` without
//!   a CBW copy was already shipped: reading it again is an error, never stale or new data;
//! - commit/abort take `frozen`, close the epoch, and clear `F`, `S` and the CBW file.
//!
//! This module must never block a writer on anything but the gate (bounded by the cut) and
//! `frozen` (only for frozen blocks not yet secured), and never fail a guest write: a failed
//! CBW copy poisons the epoch (the shipper gets an error and aborts).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bitmap::Bitmap;
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

/// Per-disk state of the epoch being shipped, behind `TrackedDisk::frozen`.
pub(crate) struct FrozenState {
    open: bool,
    epoch: u64,
    cbw: File,
    /// Blocks with a CBW copy (plain words: only touched under the mutex).
    cbw_present: Vec<u64>,
    cbw_blocks: u64,
    poisoned: Option<String>,
}

impl FrozenState {
    pub(crate) fn new(cbw: File, nblocks: u64) -> FrozenState {
        FrozenState {
            open: false,
            epoch: 0,
            cbw,
            cbw_present: vec![0; nblocks.div_ceil(64) as usize],
            cbw_blocks: 0,
            poisoned: None,
        }
    }

    fn present(&self, block: u64) -> bool {
        self.cbw_present
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    fn set_present(&mut self, block: u64) {
        if let Some(w) = self.cbw_present.get_mut((block / 64) as usize) {
            *w |= 1 << (block % 64);
            self.cbw_blocks += 1;
        }
    }
}

impl TrackedDisk {
    /// Slow path of a write: secure the cut-time content of every block of `first..=last`
    /// that is frozen and not yet secured. The caller holds the gate (shared).
    pub(crate) fn copy_before_write(&self, frozen: &Bitmap, first: u64, last: u64) {
        let mut st = self.frozen.lock();
        if !st.open || st.poisoned.is_some() {
            return;
        }
        let mut buf = [0u8; BLOCK_BYTES as usize];
        for b in first..=last {
            if !frozen.test(b) || self.secured.test(b) {
                continue;
            }
            let off = b * BLOCK_BYTES;
            let n = BLOCK_BYTES.min(self.size - off) as usize;
            let copied = self
                .file
                .read_exact_at(&mut buf[..n], off)
                .and_then(|()| st.cbw.write_all_at(&buf[..n], off));
            if let Err(e) = copied {
                let reason = format!("copy-before-write of block at offset {off} failed: {e}");
                tracing::error!(image = %self.image.display(), "{reason}; this cut will be aborted");
                st.poisoned = Some(reason);
                return;
            }
            st.set_present(b);
            // Release: a writer that sees this bit also sees the copy complete.
            self.secured.set(b);
        }
    }

    /// Starts a frozen epoch. The caller holds the gate exclusively.
    fn freeze(&self) {
        let idx = self.active_idx.load(Ordering::Acquire) & 1;
        // No write is in flight and the previous epoch is closed: extents without active bits
        // hold nothing the replica lacks (rule 3 of the activity log).
        self.al.prune(&self.maps[idx]);
        let mut st = self.frozen.lock();
        st.epoch += 1;
        st.open = true;
        st.poisoned = None;
        self.active_idx.store(idx ^ 1, Ordering::Release);
    }

    /// Ends epoch `epoch`: on abort the frozen blocks go back into the active bitmap.
    fn end_epoch(&self, epoch: u64, committed: bool) {
        let mut st = self.frozen.lock();
        if !st.open || st.epoch != epoch {
            return;
        }
        st.open = false;
        let frozen = self.frozen_map();
        if !committed {
            self.active().or_from(frozen);
        }
        frozen.clear_all();
        self.secured.clear_all();
        if st.cbw_blocks > 0 {
            st.cbw_present.iter_mut().for_each(|w| *w = 0);
            st.cbw_blocks = 0;
        }
        if let Err(e) = st.cbw.set_len(0) {
            // Harmless for correctness: no block is marked present any more.
            tracing::warn!(image = %self.image.display(), error = %e, "cannot truncate the CBW file");
        }
        st.poisoned = None;
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
    let started = Instant::now();
    let exclusive = gate.exclusive();
    // Taken while no write is in flight on any disk of the VM: the instant of the cut.
    let cut_time_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut frozen = Vec::with_capacity(disks.len());
    for d in disks {
        d.freeze();
        frozen.push(FrozenDisk {
            disk: Arc::clone(d),
            epoch: d.frozen.lock().epoch,
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Cbw,
    Live,
}

fn read_error(msg: String) -> io::Error {
    io::Error::other(msg)
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

    /// Reads content as of the cut. Every block touched must be in `ranges()`; each whole
    /// block read from the image is read once (a second read of it is an error, as is any read
    /// after commit/abort or after a failed copy-before-write).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = &self.disk;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= d.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("frozen read at {offset}+{} beyond {}", buf.len(), d.size),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let st = d.frozen.lock();
        if !st.open || st.epoch != self.epoch {
            return Err(read_error(format!(
                "{}: cut already committed or aborted",
                d.image.display()
            )));
        }
        if let Some(reason) = &st.poisoned {
            return Err(read_error(format!("{}: {reason}", d.image.display())));
        }
        let frozen = d.frozen_map();
        let source = |b: u64| -> io::Result<Source> {
            if !frozen.test(b) {
                Err(read_error(format!(
                    "{}: block at {} is not in the cut",
                    d.image.display(),
                    b * BLOCK_BYTES
                )))
            } else if st.present(b) {
                Ok(Source::Cbw)
            } else if d.secured.test(b) {
                Err(read_error(format!(
                    "{}: block at {} was already read; its cut content is no longer held",
                    d.image.display(),
                    b * BLOCK_BYTES
                )))
            } else {
                Ok(Source::Live)
            }
        };
        let (first, last) = (offset / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
        let mut b = first;
        while b <= last {
            let src = source(b)?;
            let mut e = b;
            while e < last && source(e + 1)? == src {
                e += 1;
            }
            let lo = offset.max(b * BLOCK_BYTES);
            let hi = end.min((e + 1) * BLOCK_BYTES);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match src {
                Source::Cbw => st.cbw.read_exact_at(out, lo)?,
                Source::Live => {
                    d.file.read_exact_at(out, lo)?;
                    for blk in b..=e {
                        let whole =
                            lo <= blk * BLOCK_BYTES && ((blk + 1) * BLOCK_BYTES).min(d.size) <= hi;
                        if whole {
                            d.secured.set(blk);
                        }
                    }
                }
            }
            b = e + 1;
        }
        Ok(())
    }
}
