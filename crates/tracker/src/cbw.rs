//! Copy-before-write (CBW) and the per-disk state of the epoch being shipped.
//!
//! Coordination, per disk (`F` = frozen bitmap, `S` = `secured` bitmap):
//! - a writer whose range has a block in `F \ S` takes the stripe lock of each 1 MiB region
//!   holding such blocks, copies each one's current (= cut-time) content into
//!   `<state_dir>/disk.cbw` at the same offset, sets it in `present` and `S`, then writes;
//! - the shipper (`read_frozen`) holds the stripe lock of each region while it reads it: blocks
//!   with a CBW copy come from the CBW file, blocks not in `S` from the image (no writer can
//!   overwrite them meanwhile, since it would first have to copy them under the same lock),
//!   and fully read image blocks are then set in `S` (the shipper has them; no copy is needed
//!   any more). A block in `S` without a CBW copy was already shipped: reading it again is an
//!   error, never stale or new data. `F` itself is never modified during the epoch, so an
//!   abort can merge it back whole;
//! - freeze, commit and abort hold every stripe lock, so each stripe sees a consistent epoch.
//!
//! Writers never wait here except for a region with frozen, unsecured blocks, and never fail:
//! a failed copy poisons the epoch (the shipper gets an error and aborts).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use crate::bitmap::Bitmap;
use crate::disk::TrackedDisk;
use crate::{sys, BLOCK_BYTES};

/// Blocks per lock region: 1 MiB, the shipper's read chunk, so one shipper read holds one
/// stripe and blocks only writers to that MiB.
const STRIPE_BLOCKS: u64 = 256;
/// Locks per disk: enough that concurrent CBW copies of random writes rarely share one.
const STRIPES: usize = 64;
/// Longest run copied with one read and one write: 64 KiB, so the per-thread buffer stays
/// small (every NBD worker thread that copies keeps one).
const CBW_RUN_BLOCKS_MAX: u64 = 16;
const CBW_RUN_BYTES_MAX: usize = (CBW_RUN_BLOCKS_MAX * BLOCK_BYTES) as usize;

thread_local! {
    /// The copy buffer of this writer thread, reused across copies.
    static CBW_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Per-disk state of the epoch being shipped (`TrackedDisk::frozen`).
pub(crate) struct FrozenState {
    stripes: Box<[Mutex<()>]>,
    /// Written only with every stripe held; read with one stripe held.
    open: AtomicBool,
    epoch: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    cbw: File,
    /// Blocks with a CBW copy; each word is only modified under its stripe's lock.
    present: Bitmap,
    used: AtomicBool,
    /// Blocks copied before write, all epochs (for `replication measure`).
    copied_blocks: AtomicU64,
}

fn read_error(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl FrozenState {
    pub(crate) fn new(cbw: File, nblocks: u64) -> FrozenState {
        FrozenState {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            open: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            cbw,
            present: Bitmap::new(nblocks),
            used: AtomicBool::new(false),
            copied_blocks: AtomicU64::new(0),
        }
    }

    fn stripe(&self, block: u64) -> MutexGuard<'_, ()> {
        self.stripes[((block / STRIPE_BLOCKS) % STRIPES as u64) as usize].lock()
    }

    /// Every stripe, in index order (the only multi-lock order, so no deadlock).
    fn lock_all(&self) -> Vec<MutexGuard<'_, ()>> {
        self.stripes.iter().map(|m| m.lock()).collect()
    }

    fn poison(&self, reason: String) {
        *self.poison_reason.lock() = Some(reason);
        self.poisoned.store(true, Ordering::Release);
    }
}

/// Last block of the 1 MiB region holding `block`, clipped to `last`.
fn region_end(block: u64, last: u64) -> u64 {
    ((block / STRIPE_BLOCKS + 1) * STRIPE_BLOCKS - 1).min(last)
}

impl TrackedDisk {
    /// Slow path of a write: secure the cut-time content of every block of `first..=last`
    /// that is frozen and not yet secured. The caller holds the gate (shared).
    pub(crate) fn copy_before_write(&self, frozen: &Bitmap, first: u64, last: u64) {
        let st = &self.frozen;
        let mut b = first;
        while b <= last {
            let end = region_end(b, last);
            if frozen.any_in_and_not(&self.secured, b, end) {
                let _stripe = st.stripe(b);
                if !st.open.load(Ordering::Acquire) || st.poisoned.load(Ordering::Acquire) {
                    return;
                }
                let mut blk = b;
                while blk <= end {
                    if !frozen.test(blk) || self.secured.test(blk) {
                        blk += 1;
                        continue;
                    }
                    // One read and one write per run of frozen, unsecured blocks (a 1 MiB
                    // guest write over a frozen region costs 32 syscalls, not 512).
                    let mut run_end = blk;
                    while run_end < end
                        && run_end + 1 - blk < CBW_RUN_BLOCKS_MAX
                        && frozen.test(run_end + 1)
                        && !self.secured.test(run_end + 1)
                    {
                        run_end += 1;
                    }
                    let off = blk * BLOCK_BYTES;
                    let n = ((run_end - blk + 1) * BLOCK_BYTES).min(self.size - off) as usize;
                    let copied = CBW_BUF.with(|buf| {
                        let mut buf = buf.borrow_mut();
                        buf.resize(CBW_RUN_BYTES_MAX, 0);
                        self.file
                            .read_exact_at(&mut buf[..n], off)
                            .and_then(|()| st.cbw.write_all_at(&buf[..n], off))
                    });
                    if let Err(e) = copied {
                        let reason =
                            format!("copy-before-write of {n} bytes at offset {off} failed: {e}");
                        tracing::error!(image = %self.image.display(), "{reason}; this cut will be aborted");
                        st.poison(reason);
                        return;
                    }
                    st.used.store(true, Ordering::Release);
                    st.present.set_range(blk, run_end);
                    // Release: a writer that sees these bits also sees the copy complete.
                    self.secured.set_range(blk, run_end);
                    st.copied_blocks
                        .fetch_add(run_end - blk + 1, Ordering::Relaxed);
                    blk = run_end + 1;
                }
            }
            b = end + 1;
        }
    }

    /// Bytes copied before write since the disk was opened (all epochs): what keeping cuts
    /// consistent has cost the guest's writes.
    pub fn cbw_copied_bytes(&self) -> u64 {
        self.frozen.copied_blocks.load(Ordering::Relaxed) * BLOCK_BYTES
    }

    /// Starts a frozen epoch and returns its number. The caller holds the gate exclusively.
    pub(crate) fn freeze(&self) -> u64 {
        let idx = self.active_idx.load(Ordering::Acquire) & 1;
        // No write is in flight and the previous epoch is closed: extents without active bits
        // hold nothing the replica lacks (rule 3 of the activity log).
        self.al.prune(&self.maps[idx]);
        let st = &self.frozen;
        let _all = st.lock_all();
        let epoch = st.epoch.load(Ordering::Acquire) + 1;
        st.epoch.store(epoch, Ordering::Release);
        st.poisoned.store(false, Ordering::Release);
        st.open.store(true, Ordering::Release);
        self.active_idx.store(idx ^ 1, Ordering::Release);
        epoch
    }

    /// Ends epoch `epoch`: on abort the frozen blocks go back into the active bitmap.
    pub(crate) fn end_epoch(&self, epoch: u64, committed: bool) {
        let st = &self.frozen;
        let _all = st.lock_all();
        if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        st.open.store(false, Ordering::Release);
        let frozen = self.frozen_map();
        if !committed {
            self.active().or_from(frozen);
        }
        frozen.clear_all();
        self.secured.clear_all();
        if st.used.swap(false, Ordering::AcqRel) {
            st.present.clear_all();
            if let Err(e) = st.cbw.set_len(0) {
                // Harmless for correctness: no block is marked present any more.
                tracing::warn!(image = %self.image.display(), error = %e, "cannot truncate the CBW file");
            }
        }
        st.poisoned.store(false, Ordering::Release);
        *st.poison_reason.lock() = None;
    }

    /// Reads content as of cut `epoch` (see `FrozenDisk::read_at`).
    pub(crate) fn read_frozen(&self, epoch: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: frozen read at {offset}+{} beyond {}",
                        self.image.display(),
                        buf.len(),
                        self.size
                    ),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let st = &self.frozen;
        let frozen = self.frozen_map();
        let name = self.image.display();
        let (first, last) = (offset / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
        let mut region = first;
        while region <= last {
            let rend = region_end(region, last);
            let _stripe = st.stripe(region);
            if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
                return Err(read_error(format!(
                    "{name}: cut already committed or aborted"
                )));
            }
            if st.poisoned.load(Ordering::Acquire) {
                let reason = st.poison_reason.lock().clone().unwrap_or_default();
                return Err(read_error(format!("{name}: {reason}")));
            }
            // Classify each block: Some(true) = CBW copy, Some(false) = image.
            let source = |b: u64| -> io::Result<bool> {
                if !frozen.test(b) {
                    Err(read_error(format!(
                        "{name}: block at {} is not in the cut",
                        b * BLOCK_BYTES
                    )))
                } else if st.present.test(b) {
                    Ok(true)
                } else if self.secured.test(b) {
                    Err(read_error(format!(
                        "{name}: block at {} was already read; its cut content is no longer held",
                        b * BLOCK_BYTES
                    )))
                } else {
                    Ok(false)
                }
            };
            let mut b = region;
            while b <= rend {
                let from_cbw = source(b)?;
                let mut e = b;
                while e < rend && source(e + 1)? == from_cbw {
                    e += 1;
                }
                let lo = offset.max(b * BLOCK_BYTES);
                let hi = end.min((e + 1) * BLOCK_BYTES);
                let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
                if from_cbw {
                    st.cbw.read_exact_at(out, lo)?;
                } else {
                    self.file.read_exact_at(out, lo)?;
                    for blk in b..=e {
                        if lo <= blk * BLOCK_BYTES && ((blk + 1) * BLOCK_BYTES).min(self.size) <= hi
                        {
                            self.secured.set(blk);
                        }
                    }
                }
                b = e + 1;
            }
            region = rend + 1;
        }
        Ok(())
    }

    /// If `offset..offset+len` (block aligned, inside one 1 MiB region) is a hole in the image
    /// and none of its blocks has a CBW copy or was read already, its cut-time content is all
    /// zeros: mark the blocks read (secured) and return true without reading anything.
    /// Decided under the region's stripe lock, where no block can gain a copy. Anything else
    /// returns false and changes nothing (the caller reads normally).
    pub(crate) fn frozen_hole(&self, epoch: u64, offset: u64, len: u64) -> io::Result<bool> {
        let Some(end) = offset.checked_add(len).filter(|e| *e <= self.size) else {
            return Ok(false);
        };
        if len == 0
            || !offset.is_multiple_of(BLOCK_BYTES)
            || (!end.is_multiple_of(BLOCK_BYTES) && end != self.size)
        {
            return Ok(false);
        }
        let (first, last) = (offset / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
        if region_end(first, last) != last {
            return Ok(false);
        }
        let st = &self.frozen;
        let frozen = self.frozen_map();
        let _stripe = st.stripe(first);
        if !st.open.load(Ordering::Acquire)
            || st.epoch.load(Ordering::Acquire) != epoch
            || st.poisoned.load(Ordering::Acquire)
        {
            return Ok(false);
        }
        let untouched =
            (first..=last).all(|b| frozen.test(b) && !st.present.test(b) && !self.secured.test(b));
        if !untouched {
            return Ok(false);
        }
        let hole = match sys::seek_data(&self.file, offset)? {
            None => true,
            Some(data) => data >= end,
        };
        if hole {
            self.secured.set_range(first, last);
        }
        Ok(hole)
    }
}
