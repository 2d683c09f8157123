//! Copy-before-write (CBW) and the per-disk state of the epoch being shipped.
//!
//! Coordination, per disk (`F` = frozen bitmap, `S` = `secured`, `P` = `present`):
//! - a writer whose range has a block in `F \ S` takes the stripe lock of each 1 MiB region
//!   holding such blocks, copies each one's current (= cut-time) content aside, sets it in `P`
//!   and `S`, then writes. A copy goes into memory when the disk's bounded pool (`pool.rs`) has
//!   room: one `pread`/`preadv` per run into 4 KiB slots, recorded block → slot in the map of
//!   the stripe (`Stripe::in_memory`). Otherwise it spills to `<state_dir>/disk.cbw` at the same
//!   offset (`pread` + `pwrite`), within the epoch's spill cap (set at each cut from the free
//!   space; a copy past it poisons the epoch instead, the guest's write still proceeds). So a
//!   block in `P` with a map entry has its copy in memory, a block in `P` without one has it
//!   in the file;
//! - the shipper (`read_frozen`) holds the stripe lock of each region while it reads it: blocks
//!   in `P` come from their copy (memcpy from the slot, or the file), blocks not in `S` from the
//!   image (no writer can overwrite them meanwhile, since it would first have to copy them under
//!   the same lock). Every block read whole is then shipped: an image block is set in `S` (no
//!   copy is needed any more), a copied block leaves `P` and its slot goes back to the pool at
//!   once, so the pool is recycled while the epoch ships. A block in `S \ P` was shipped (or
//!   skipped as a hole): reading it again is an error, never stale or new data. `F` itself is
//!   never modified during the epoch, so an abort can merge it back whole;
//! - freeze, commit and abort hold every stripe lock, so each stripe sees a consistent epoch;
//!   commit and abort forget every copy (maps cleared, pool reset, file truncated). The pool's
//!   pages stay mapped for the next epoch.
//!
//! Slot ownership (what makes the pool's `unsafe` sound): a slot taken by a writer belongs to
//! one block, is known only through that block's map entry, and is touched only with the
//! block's stripe lock held, until the shipper gives it back (under the same lock) or the
//! epoch ends (under every lock).
//!
//! Writers never wait here except for a region with frozen, unsecured blocks, and never fail:
//! a failed copy poisons the epoch (the shipper gets an error and aborts).

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};

use crate::bitmap::Bitmap;
use crate::disk::TrackedDisk;
use crate::pool::CbwPool;
use crate::{sys, BLOCK_BYTES};

/// Blocks per lock region: 1 MiB, the shipper's read chunk, so one shipper read holds one
/// stripe and blocks only writers to that MiB.
const STRIPE_BLOCKS: u64 = 256;
/// Locks per disk: enough that concurrent CBW copies of random writes rarely share one.
const STRIPES: usize = 64;
/// Longest run copied with one read (and, to the file, one write): 64 KiB, so the per-thread
/// buffer of the file path stays small (every NBD worker thread that spills keeps one).
const CBW_RUN_BLOCKS_MAX: u64 = 16;
const CBW_RUN_BYTES_MAX: usize = (CBW_RUN_BLOCKS_MAX * BLOCK_BYTES) as usize;
// A run is read with one vectored read of the image mapping.
const _: () = assert!(CBW_RUN_BLOCKS_MAX as usize <= sys::RANDOM_MAP_PARTS_MAX);

/// The spill of one epoch may use at most 1/`SPILL_FREE_SHARE_DIVISOR` of the free space of
/// its filesystem at the cut, and never its last `SPILL_RESERVE_BYTES`. The spill file sits
/// on the filesystem of the image (`<state_dir>` is under the VM's directory), whose guest
/// writes into holes need that space: an epoch whose copies would take more is abandoned
/// (its blocks stay dirty and ship with the next cut) long before the guest could get ENOSPC.
/// A quarter leaves the guest three quarters of what was free; the reserve keeps a nearly
/// full filesystem from spilling at all.
const SPILL_FREE_SHARE_DIVISOR: u64 = 4;
const SPILL_RESERVE_BYTES: u64 = 1 << 30;

/// The spill cap of an epoch on a filesystem with `free` bytes available.
pub(crate) fn spill_cap(free: u64) -> u64 {
    (free / SPILL_FREE_SHARE_DIVISOR).min(free.saturating_sub(SPILL_RESERVE_BYTES))
}

/// Blocks spilled by every open epoch of this process on one filesystem (by device number):
/// the cap holds for all disks and VMs whose spill files share it, not per disk, so several
/// cuts at once can never take more than the share between them. Disks given an explicit cap
/// (`DiskOptions::cbw_spill_bytes_max`) share a budget with the disks given the same cap.
fn filesystem_spill_counter(file: &File, explicit_cap: Option<u64>) -> Arc<AtomicU64> {
    type Key = (u64, Option<u64>);
    static COUNTERS: std::sync::OnceLock<Mutex<HashMap<Key, Arc<AtomicU64>>>> =
        std::sync::OnceLock::new();
    let dev = std::os::unix::fs::MetadataExt::dev(&match file.metadata() {
        Ok(m) => m,
        // Unknown: a counter of its own (the per-epoch cap still holds).
        Err(_) => return Arc::new(AtomicU64::new(0)),
    });
    COUNTERS
        .get_or_init(Default::default)
        .lock()
        .entry((dev, explicit_cap))
        .or_default()
        .clone()
}

/// Reads of at least this many bytes bypass the no-read-ahead mapping (see `read_image`).
const MAPPED_READ_BYTES_MAX: usize = 256 * 1024;

thread_local! {
    /// The copy buffer of this writer thread for spills to the file, reused across copies.
    static CBW_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hash of a block number for the stripe maps: the splitmix64 finalizer. (The identity would
/// collide: the blocks of one stripe share bits 8..14, and the map indexes by the low bits.)
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// What one stripe lock protects besides the bits of its regions.
#[derive(Default)]
struct Stripe {
    /// Block → pool slot, for the blocks of this stripe whose copy is in memory.
    in_memory: HashMap<u64, u32, BuildHasherDefault<BlockHasher>>,
}

/// The outcome of copying one run.
enum Copied {
    Yes,
    /// The pool was full and spilling the run would pass the epoch's spill cap (bytes).
    SpillCapReached {
        spilled: u64,
        cap: u64,
    },
}

/// Where the cut-time content of a frozen block is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Image,
    File,
    Memory(u32),
}

/// Per-disk state of the epoch being shipped (`TrackedDisk::frozen`).
pub(crate) struct FrozenState {
    stripes: Box<[Mutex<Stripe>]>,
    /// Written only with every stripe held; read with one stripe held.
    open: AtomicBool,
    epoch: AtomicU64,
    /// The open epoch's frozen blocks are recorded by the caller (`Cut::cover`): the activity
    /// log no longer covers them, abort drops them, and a clean stop does not persist them.
    covered: AtomicBool,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    cbw: File,
    pool: CbwPool,
    /// The image mapped for this epoch's shipper reads (`sys::RandomMap`: no read-ahead),
    /// made at the first read of the epoch, dropped at its end. `None` also when mapping is
    /// not possible: reads then use `pread`.
    image_map: Mutex<Option<Arc<sys::RandomMap>>>,
    /// Blocks with a copy not yet shipped; each word is only modified under its stripe's lock.
    present: Bitmap,
    /// Some block was copied this epoch (`present` may hold bits).
    copied: AtomicBool,
    /// Some copy went to the file this epoch (truncate it at the end).
    spilled: AtomicBool,
    /// Blocks copied before write, all epochs (for `replication measure`).
    copied_blocks: AtomicU64,
    /// Of those, blocks copied to the file because the pool was full.
    spilled_blocks: AtomicU64,
    /// `DiskOptions::cbw_spill_bytes_max` (`None`: from the free space at each cut).
    spill_bytes_max: Option<u64>,
    /// Blocks this epoch may spill to the file (set at freeze), and blocks it has spilled.
    epoch_spill_blocks_max: AtomicU64,
    epoch_spilled_blocks: AtomicU64,
    /// Blocks spilled by all open epochs on this spill file's filesystem (shared), and this
    /// epoch's part of them (given back when it ends).
    fs_spilled_blocks: Arc<AtomicU64>,
    epoch_fs_blocks: AtomicU64,
}

fn read_error(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl FrozenState {
    /// `pool_bytes_max`: memory for copies (0: every copy goes to the file);
    /// `spill_bytes_max`: see `DiskOptions::cbw_spill_bytes_max`.
    pub(crate) fn new(
        cbw: File,
        nblocks: u64,
        pool_bytes_max: u64,
        spill_bytes_max: Option<u64>,
    ) -> FrozenState {
        FrozenState {
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Stripe::default()))
                .collect(),
            open: AtomicBool::new(false),
            covered: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            pool: CbwPool::new(pool_bytes_max.min(nblocks.saturating_mul(BLOCK_BYTES))),
            image_map: Mutex::new(None),
            present: Bitmap::new(nblocks),
            copied: AtomicBool::new(false),
            spilled: AtomicBool::new(false),
            copied_blocks: AtomicU64::new(0),
            spilled_blocks: AtomicU64::new(0),
            spill_bytes_max,
            epoch_spill_blocks_max: AtomicU64::new(0),
            epoch_spilled_blocks: AtomicU64::new(0),
            fs_spilled_blocks: filesystem_spill_counter(&cbw, spill_bytes_max),
            epoch_fs_blocks: AtomicU64::new(0),
            cbw,
        }
    }

    fn stripe(&self, block: u64) -> MutexGuard<'_, Stripe> {
        self.stripes[((block / STRIPE_BLOCKS) % STRIPES as u64) as usize].lock()
    }

    /// Every stripe, in index order (the only multi-lock order, so no deadlock).
    fn lock_all(&self) -> Vec<MutexGuard<'_, Stripe>> {
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
                let mut stripe = st.stripe(b);
                if !st.open.load(Ordering::Acquire) || st.poisoned.load(Ordering::Acquire) {
                    return;
                }
                let mut blk = b;
                while blk <= end {
                    if !frozen.test(blk) || self.secured.test(blk) {
                        blk += 1;
                        continue;
                    }
                    // One read (and at most one write) per run of frozen, unsecured blocks (a
                    // 1 MiB guest write over a frozen region costs 16 copies, not 256).
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
                    let failure = match self.copy_run(&mut stripe, blk, run_end, n) {
                        Ok(Copied::Yes) => None,
                        Ok(Copied::SpillCapReached { spilled, cap }) => Some(format!(
                            "copy-before-write spill cap reached ({cap} bytes in {}, {spilled} used): the cut is abandoned, its blocks stay dirty for the next one",
                            self.state_dir.display()
                        )),
                        Err(e) => Some(format!(
                            "copy-before-write of {n} bytes at offset {off} failed: {e}"
                        )),
                    };
                    if let Some(reason) = failure {
                        tracing::error!(image = %self.image.display(), "{reason}; this cut will be aborted");
                        st.poison(reason);
                        return;
                    }
                    st.copied.store(true, Ordering::Release);
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

    /// Copies the current content of blocks `first..=last` (`len` bytes, clipped to the disk)
    /// into pool slots recorded in `stripe` (whose lock the caller holds), or into the file
    /// when the pool has no room for the whole run and the epoch's spill cap allows it.
    fn copy_run(
        &self,
        stripe: &mut Stripe,
        first: u64,
        last: u64,
        len: usize,
    ) -> io::Result<Copied> {
        let st = &self.frozen;
        let off = first * BLOCK_BYTES;
        let count = (last - first + 1) as usize;
        let mut taken = [0u32; CBW_RUN_BLOCKS_MAX as usize];
        let slots = &mut taken[..count];
        if st.pool.take(slots) {
            let mut parts: [&mut [u8]; CBW_RUN_BLOCKS_MAX as usize] = Default::default();
            for (i, (part, slot)) in parts.iter_mut().zip(slots.iter()).enumerate() {
                let bytes = (len - i * BLOCK_BYTES as usize).min(BLOCK_BYTES as usize);
                // SAFETY: the slot was just taken for this run: no map entry names it yet, so
                // nobody else can reach it, and it will only be touched under this stripe's
                // lock, which we hold.
                *part = &mut unsafe { st.pool.slot_mut(*slot) }[..bytes];
            }
            // Through the no-read-ahead mapping, like the shipper's small reads (`read_image`):
            // a `preadv` of a cached block could start read-ahead that zero-fills megabytes of
            // page cache over the image's holes, while the guest's write waits for this copy.
            let mapped = self
                .image_map()
                .is_some_and(|m| m.read_exact_vectored_at(&mut parts[..count], off).is_ok());
            let read = match mapped {
                true => Ok(()),
                false => sys::read_exact_vectored_at(&self.file, &mut parts[..count], off),
            };
            if let Err(e) = read {
                st.pool.give_back(slots);
                return Err(e);
            }
            for (i, slot) in slots.iter().enumerate() {
                // A block is copied once per epoch (it is in `S` afterwards), so there is no
                // earlier entry; should there be one, its slot must not leak.
                if let Some(old) = stripe.in_memory.insert(first + i as u64, *slot) {
                    st.pool.give_back(&[old]);
                }
            }
            return Ok(Copied::Yes);
        }
        let spilled = st
            .epoch_spilled_blocks
            .fetch_add(count as u64, Ordering::AcqRel)
            + count as u64;
        let cap = st.epoch_spill_blocks_max.load(Ordering::Acquire);
        if spilled > cap {
            return Ok(Copied::SpillCapReached {
                spilled: (spilled - count as u64) * BLOCK_BYTES,
                cap: cap * BLOCK_BYTES,
            });
        }
        // The same cap for everything spilled on this filesystem at once (other disks, VMs).
        let fs_spilled = st
            .fs_spilled_blocks
            .fetch_add(count as u64, Ordering::AcqRel)
            + count as u64;
        if fs_spilled > cap {
            st.fs_spilled_blocks
                .fetch_sub(count as u64, Ordering::AcqRel);
            return Ok(Copied::SpillCapReached {
                spilled: (fs_spilled - count as u64) * BLOCK_BYTES,
                cap: cap * BLOCK_BYTES,
            });
        }
        st.epoch_fs_blocks.fetch_add(count as u64, Ordering::AcqRel);
        CBW_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(CBW_RUN_BYTES_MAX, 0);
            self.file
                .read_exact_at(&mut buf[..len], off)
                .and_then(|()| st.cbw.write_all_at(&buf[..len], off))
        })?;
        st.spilled.store(true, Ordering::Release);
        st.spilled_blocks.fetch_add(count as u64, Ordering::Relaxed);
        Ok(Copied::Yes)
    }

    /// The spill cap for the next epoch, in bytes: `DiskOptions::cbw_spill_bytes_max`, or
    /// `spill_cap` of the free space of the spill file's filesystem now (0 when it cannot be
    /// known: copies then stay in memory or abandon the epoch, never risk the guest's space).
    pub(crate) fn spill_cap(&self) -> u64 {
        if let Some(cap) = self.frozen.spill_bytes_max {
            return cap;
        }
        // Free space as if no spill were there: the cap is a share of it for all spills on
        // this filesystem together (`fs_spilled_blocks`).
        let spilled = self.frozen.fs_spilled_blocks.load(Ordering::Acquire) * BLOCK_BYTES;
        match sys::free_bytes(&self.frozen.cbw) {
            Ok(free) => spill_cap(free.saturating_add(spilled)),
            Err(e) => {
                tracing::warn!(dir = %self.state_dir.display(), error = %e,
                    "cannot read the free space for the copy-before-write spill; not spilling this cut");
                0
            }
        }
    }

    /// Reads cut-time image content for the shipper. Small reads (scattered dirty blocks) go
    /// through the epoch's `RandomMap` (made on first use), so they start no read-ahead: with a
    /// large `read_ahead_kb` each `pread` of a cached block could zero-fill megabytes of
    /// page cache over the holes around it (bench T10: cycles of 5–12 s instead of ≤ 2 s).
    /// Large reads use `pread`, whose read-ahead helps when the data is not cached (a fault
    /// per page would not). `pread` also when the image cannot be mapped, and to learn the
    /// real error when a mapped read fails.
    fn read_image(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.len() >= MAPPED_READ_BYTES_MAX {
            return self.file.read_exact_at(buf, offset);
        }
        match self.image_map() {
            Some(m) if m.read_exact_at(buf, offset).is_ok() => Ok(()),
            _ => self.file.read_exact_at(buf, offset),
        }
    }

    /// The image mapped for this epoch (`sys::RandomMap`), made on first use; `None` when it
    /// cannot be mapped (reads then use `pread`).
    fn image_map(&self) -> Option<Arc<sys::RandomMap>> {
        let mut slot = self.frozen.image_map.lock();
        if slot.is_none() {
            match sys::RandomMap::new(&self.file, self.size) {
                Ok(m) => *slot = m.map(Arc::new),
                Err(e) => {
                    tracing::debug!(image = %self.image.display(), "reading with pread: {e}")
                }
            }
        }
        slot.clone()
    }

    /// Bytes copied before write since the disk was opened (all epochs, memory and file):
    /// what keeping cuts consistent has cost the guest's writes.
    pub fn cbw_copied_bytes(&self) -> u64 {
        self.frozen.copied_blocks.load(Ordering::Relaxed) * BLOCK_BYTES
    }

    /// Of `cbw_copied_bytes`, the bytes that went to the file `disk.cbw` because the memory
    /// pool was full (each costs a write into the page cache and, later, writeback).
    pub fn cbw_spilled_bytes(&self) -> u64 {
        self.frozen.spilled_blocks.load(Ordering::Relaxed) * BLOCK_BYTES
    }

    /// Memory the copy-before-write pool holds now: pages touched by some epoch and not yet
    /// released (at most the pool's bound; see `DiskOptions::cbw_memory_bytes_max`).
    pub fn cbw_memory_bytes(&self) -> u64 {
        self.frozen.pool.resident_bytes()
    }

    /// Returns the memory of the copy-before-write pool to the system now, unless a cut is
    /// outstanding (then nothing happens): for a daemon that stops replicating the disk, since
    /// the pool otherwise shrinks only at the end of quiet epochs. Returns the bytes released.
    pub fn release_cbw_memory(&self) -> u64 {
        let st = &self.frozen;
        let mut all = st.lock_all();
        if st.open.load(Ordering::Acquire) {
            return 0;
        }
        for stripe in all.iter_mut() {
            stripe.in_memory = HashMap::default();
        }
        st.pool.release_all()
    }

    /// Starts a frozen epoch that may spill at most `spill_cap` bytes, and returns its number.
    /// The caller holds the gate exclusively.
    pub(crate) fn freeze(&self, spill_cap: u64) -> u64 {
        let idx = self.active_idx.load(Ordering::Acquire) & 1;
        // No write is in flight and the previous epoch is closed: extents without active bits
        // hold nothing the replica lacks (rule 3 of the activity log).
        self.al.prune(&self.maps[idx]);
        let st = &self.frozen;
        let _all = st.lock_all();
        let epoch = st.epoch.load(Ordering::Acquire) + 1;
        st.epoch.store(epoch, Ordering::Release);
        st.poisoned.store(false, Ordering::Release);
        st.epoch_spill_blocks_max
            .store(spill_cap / BLOCK_BYTES, Ordering::Release);
        st.epoch_spilled_blocks.store(0, Ordering::Release);
        st.open.store(true, Ordering::Release);
        self.active_idx.store(idx ^ 1, Ordering::Release);
        epoch
    }

    /// Epoch `epoch`'s frozen blocks are recorded durably by the caller (a resynchronization's
    /// cursor): from now on the activity log covers only what the guest wrote after the cut
    /// (extents without an active bit leave it, and the file is rewritten), an abort drops the
    /// frozen blocks instead of returning them to the active bitmap, and a clean stop does not
    /// persist them. Holds the gate exclusively for the prune (rule 3 of the activity log: no
    /// write is between its hot check and its bitmap update).
    pub(crate) fn cover_epoch(&self, epoch: u64) -> bool {
        {
            let _exclusive = self.gate.exclusive();
            let st = &self.frozen;
            let _all = st.lock_all();
            if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
                return false;
            }
            st.covered.store(true, Ordering::Release);
            self.al.prune(self.active());
        }
        self.al.compact_if_needed();
        true
    }

    /// Whether the open epoch is covered (`cover_epoch`).
    pub(crate) fn epoch_covered(&self) -> bool {
        self.frozen.open.load(Ordering::Acquire) && self.frozen.covered.load(Ordering::Acquire)
    }

    /// Ends epoch `epoch`: on abort the frozen blocks go back into the active bitmap. Every
    /// copy is forgotten; the pool keeps its pages for the next epoch (unless idle, see
    /// `CbwPool::reset`).
    ///
    /// Holds the gate (shared) throughout: the merge and the clear of the frozen map must not
    /// interleave with `shutdown_clean`'s `union_words` (exclusive), which could otherwise load
    /// a word of the active map before the merge and the same word of the frozen map after the
    /// clear, and persist a bitmap without that block.
    pub(crate) fn end_epoch(&self, epoch: u64, committed: bool) {
        let _shared = self.gate.shared();
        let st = &self.frozen;
        let mut all = st.lock_all();
        if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        st.open.store(false, Ordering::Release);
        // Unmapped once the shipper's last read of the epoch has returned.
        *st.image_map.lock() = None;
        let frozen = self.frozen_map();
        // A covered epoch's blocks are recorded by the caller, which ships them again.
        if !committed && !st.covered.swap(false, Ordering::AcqRel) {
            self.active().or_from(frozen);
        }
        st.covered.store(false, Ordering::Release);
        frozen.clear_all();
        self.secured.clear_all();
        // Each map keeps at most its share of the pool's capacity between epochs, so the
        // index costs O(pool), not the sum of every stripe's busiest epoch.
        let share = (st.pool.bytes_max() / BLOCK_BYTES) as usize / STRIPES;
        for stripe in all.iter_mut() {
            stripe.in_memory.clear();
            stripe.in_memory.shrink_to(share);
        }
        st.pool.reset(Instant::now());
        if st.copied.swap(false, Ordering::AcqRel) {
            st.present.clear_all();
        }
        let held = st.epoch_fs_blocks.swap(0, Ordering::AcqRel);
        st.fs_spilled_blocks.fetch_sub(held, Ordering::AcqRel);
        if st.spilled.swap(false, Ordering::AcqRel) {
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
        self.read_frozen_as(epoch, buf, offset, true)
    }

    /// `read_frozen` without shipping anything (`consume` false): the blocks stay in the cut,
    /// their copies held, so they can be read (or peeked) again. A resync's compare peeks.
    pub(crate) fn peek_frozen(&self, epoch: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_frozen_as(epoch, buf, offset, false)
    }

    fn read_frozen_as(
        &self,
        epoch: u64,
        buf: &mut [u8],
        offset: u64,
        consume: bool,
    ) -> io::Result<()> {
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
        let source = |stripe: &Stripe, b: u64| -> io::Result<Source> {
            if !frozen.test(b) {
                Err(read_error(format!(
                    "{name}: block at {} is not in the cut",
                    b * BLOCK_BYTES
                )))
            } else if st.present.test(b) {
                Ok(stripe
                    .in_memory
                    .get(&b)
                    .map_or(Source::File, |slot| Source::Memory(*slot)))
            } else if self.secured.test(b) {
                Err(read_error(format!(
                    "{name}: block at {} was already read; its cut content is no longer held",
                    b * BLOCK_BYTES
                )))
            } else {
                Ok(Source::Image)
            }
        };
        let mut region = first;
        while region <= last {
            let rend = region_end(region, last);
            let mut stripe = st.stripe(region);
            if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
                return Err(read_error(format!(
                    "{name}: cut already committed or aborted"
                )));
            }
            if st.poisoned.load(Ordering::Acquire) {
                let reason = st.poison_reason.lock().clone().unwrap_or_default();
                return Err(read_error(format!("{name}: {reason}")));
            }
            let mut b = region;
            while b <= rend {
                // One read per run of image or file blocks; for a run of blocks in memory, one
                // memcpy per block and one trip to the pool's lock for the run.
                let from = source(&stripe, b)?;
                let mut slots = [0u32; STRIPE_BLOCKS as usize];
                if let Source::Memory(slot) = from {
                    slots[0] = slot;
                }
                let mut e = b;
                while e < rend {
                    match (from, source(&stripe, e + 1)?) {
                        (Source::Memory(_), Source::Memory(slot)) => {
                            slots[(e + 1 - b) as usize] = slot;
                        }
                        (a, n) if a == n => {}
                        _ => break,
                    }
                    e += 1;
                }
                let lo = offset.max(b * BLOCK_BYTES);
                let hi = end.min((e + 1) * BLOCK_BYTES);
                let whole = |blk: u64| {
                    lo <= blk * BLOCK_BYTES && ((blk + 1) * BLOCK_BYTES).min(self.size) <= hi
                };
                match from {
                    Source::Image => {
                        self.read_image(
                            &mut buf[(lo - offset) as usize..(hi - offset) as usize],
                            lo,
                        )?;
                        // Read whole, an image block is shipped: no copy is needed any more.
                        for blk in (b..=e).filter(|blk| consume && whole(*blk)) {
                            self.secured.set(blk);
                        }
                    }
                    Source::File => {
                        st.cbw.read_exact_at(
                            &mut buf[(lo - offset) as usize..(hi - offset) as usize],
                            lo,
                        )?;
                        for blk in (b..=e).filter(|blk| consume && whole(*blk)) {
                            st.present.clear_range(blk, blk);
                        }
                    }
                    Source::Memory(_) => {
                        let mut freed = 0;
                        for blk in b..=e {
                            let slot = slots[(blk - b) as usize];
                            let (from_lo, from_hi) =
                                (lo.max(blk * BLOCK_BYTES), hi.min((blk + 1) * BLOCK_BYTES));
                            // SAFETY: the slot belongs to block `blk` (its map entry) and is
                            // touched only under this stripe's lock, which we hold.
                            let copy = unsafe { st.pool.slot(slot) };
                            let at = (from_lo - blk * BLOCK_BYTES) as usize;
                            buf[(from_lo - offset) as usize..(from_hi - offset) as usize]
                                .copy_from_slice(&copy[at..at + (from_hi - from_lo) as usize]);
                            if consume && whole(blk) {
                                // Shipped: forget the copy, its slot serves the next one.
                                stripe.in_memory.remove(&blk);
                                st.present.clear_range(blk, blk);
                                slots[freed] = slot;
                                freed += 1;
                            }
                        }
                        st.pool.give_back(&slots[..freed]);
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
        self.frozen_hole_as(epoch, offset, len, true)
    }

    /// Marks the whole blocks of `offset..offset+len` in the cut as shipped without reading
    /// them, and gives their copies back (a resync found them equal on the replica, so they
    /// are never read: their copies must not hold the pool until the commit).
    pub(crate) fn discard_frozen(&self, epoch: u64, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        // Nothing whole to discard: an empty range, or a part of one block (the disk's short
        // last block is whole at the disk's end).
        if end <= offset || (end - offset < BLOCK_BYTES && end != self.size) {
            return Ok(());
        }
        let st = &self.frozen;
        let frozen = self.frozen_map();
        let (first, last) = (
            offset.div_ceil(BLOCK_BYTES),
            (end / BLOCK_BYTES).saturating_sub(1),
        );
        // The last block of a disk whose size is not a multiple of a block is whole at `size`.
        let last = if end == self.size && !end.is_multiple_of(BLOCK_BYTES) {
            end / BLOCK_BYTES
        } else {
            last
        };
        if first > last || first * BLOCK_BYTES >= end {
            return Ok(());
        }
        let mut region = first;
        while region <= last {
            let rend = region_end(region, last);
            let mut stripe = st.stripe(region);
            if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
                return Err(read_error(format!(
                    "{}: cut already committed or aborted",
                    self.image.display()
                )));
            }
            let mut freed = Vec::new();
            for b in region..=rend {
                if !frozen.test(b) {
                    continue;
                }
                if let Some(slot) = stripe.in_memory.remove(&b) {
                    freed.push(slot);
                }
                st.present.clear_range(b, b);
                self.secured.set(b);
            }
            st.pool.give_back(&freed);
            region = rend + 1;
        }
        Ok(())
    }

    /// `frozen_hole` that marks nothing (`consume` false): a resync's compare asks it.
    pub(crate) fn peek_frozen_hole(&self, epoch: u64, offset: u64, len: u64) -> io::Result<bool> {
        self.frozen_hole_as(epoch, offset, len, false)
    }

    fn frozen_hole_as(&self, epoch: u64, offset: u64, len: u64, consume: bool) -> io::Result<bool> {
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
        let hole = match sysutil::seek_data(&self.file, offset)? {
            None => true,
            Some(data) => data >= end,
        };
        if hole && consume {
            self.secured.set_range(first, last);
        }
        Ok(hole)
    }

    /// The poison reason of cut `epoch` (see `FrozenDisk::abandoned`).
    pub(crate) fn frozen_abandoned(&self, epoch: u64) -> Option<String> {
        let st = &self.frozen;
        let _stripe = st.stripe(0);
        if !st.open.load(Ordering::Acquire)
            || st.epoch.load(Ordering::Acquire) != epoch
            || !st.poisoned.load(Ordering::Acquire)
        {
            return None;
        }
        st.poison_reason.lock().clone()
    }

    /// Block-aligned ranges of cut `epoch` whose copies are in memory now, coalesced, in disk
    /// order (see `FrozenDisk::ranges_in_memory`). Empty once the epoch has ended.
    pub(crate) fn frozen_in_memory(&self, epoch: u64) -> Vec<(u64, u64)> {
        let st = &self.frozen;
        let mut blocks = Vec::new();
        for m in st.stripes.iter() {
            let stripe = m.lock();
            if !st.open.load(Ordering::Acquire) || st.epoch.load(Ordering::Acquire) != epoch {
                return Vec::new();
            }
            blocks.extend(stripe.in_memory.keys().copied());
        }
        blocks.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in blocks {
            let (off, end) = (b * BLOCK_BYTES, ((b + 1) * BLOCK_BYTES).min(self.size));
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l = end - *o,
                _ => out.push((off, end - off)),
            }
        }
        out
    }

    /// Bytes of copy-before-write copies in memory that the shipper has not read yet, and
    /// the bound of that memory.
    pub(crate) fn frozen_in_memory_bytes(&self) -> (u64, u64) {
        (
            self.frozen.pool.in_use_bytes(),
            self.frozen.pool.bytes_max(),
        )
    }

    /// The first run of blocks at or after byte `from` (rounded up to a block) that cut `epoch`
    /// has not shipped yet (in `F`, and not read nor skipped: `F ∧ (¬S ∨ P)`), as
    /// `(offset, len)`, at most `len_max` bytes long (rounded down to blocks; the last block
    /// of the disk may be partial) and never crossing a 1 MiB boundary (see
    /// `FrozenDisk::next_unshipped`). `None` when nothing is left after `from`.
    ///
    /// Lock-free and exact for the shipper: writers only move blocks from `¬S` to `S ∧ P`
    /// (both unshipped; `P` is set before `S`, and `S` is loaded first here), and only the
    /// shipper itself ships blocks.
    pub(crate) fn frozen_next_unshipped(
        &self,
        epoch: u64,
        from: u64,
        len_max: u64,
    ) -> Option<(u64, u64)> {
        let st = &self.frozen;
        let len_max = len_max - len_max % BLOCK_BYTES;
        if len_max == 0
            || from >= self.size
            || !st.open.load(Ordering::Acquire)
            || st.epoch.load(Ordering::Acquire) != epoch
        {
            return None;
        }
        let frozen = self.frozen_map();
        let unshipped = |w: usize| {
            let s = self.secured.word(w);
            frozen.word(w) & (!s | st.present.word(w))
        };
        let first_block = from.div_ceil(BLOCK_BYTES);
        let mut w = (first_block / 64) as usize;
        let mut bits = unshipped(w) & (u64::MAX << (first_block % 64));
        while bits == 0 {
            w += 1;
            if w >= frozen.nwords() {
                return None;
            }
            bits = unshipped(w);
        }
        let start = w as u64 * 64 + u64::from(bits.trailing_zeros());
        let off = start * BLOCK_BYTES;
        let stop = (off + len_max)
            .min((start / STRIPE_BLOCKS + 1) * STRIPE_BLOCKS * BLOCK_BYTES)
            .min(self.size);
        let mut end = start + 1;
        while end * BLOCK_BYTES < stop {
            let w = (end / 64) as usize;
            if unshipped(w) & (1u64 << (end % 64)) == 0 {
                break;
            }
            end += 1;
        }
        Some((off, (end * BLOCK_BYTES).min(stop) - off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_cap_is_a_quarter_of_the_free_space_minus_nothing_below_the_reserve() {
        const GIB: u64 = 1 << 30;
        assert_eq!(spill_cap(0), 0);
        assert_eq!(spill_cap(GIB), 0, "the last GiB is never spilled into");
        assert_eq!(spill_cap(GIB + GIB / 10), GIB / 10);
        assert_eq!(spill_cap(2 * GIB), GIB / 2);
        assert_eq!(spill_cap(100 * GIB), 25 * GIB);
        assert_eq!(spill_cap(u64::MAX), u64::MAX / 4);
    }
}
