//! The memory of copy-before-write: a bounded pool of 4 KiB slots in one anonymous mapping per
//! disk, each holding the cut-time content of one frozen block until the shipper has read it.
//!
//! Owns the mapping and the free list, nothing else: which block a slot holds, and who may touch
//! it, is decided in `cbw.rs` (a slot taken by a writer belongs to one block, and is accessed
//! only under that block's stripe lock until it is given back). This module never does file
//! I/O, never blocks on anything but its own short mutex, and never holds more than
//! `slots_max` slots of memory.
//!
//! Why a private mapping rather than the heap: the pool must stay resident between epochs (on
//! this kind of VM the first touch of a freshly allocated page costs about 5× a warm one:
//! virtio-balloon free page reporting), and must really return its pages when it shrinks
//! (`madvise(MADV_DONTNEED)`, `munmap`), which `malloc` does not promise. The mapping is made
//! at the first copy, so a disk that is never copied from costs nothing (the idle-RSS target).
//!
//! Reuse across epochs: every epoch hands out slots from the bottom of the mapping (`next`
//! counts up from 0 after each `reset`; freed slots are reused last-in first-out), so the same
//! warm pages serve epoch after epoch. The pool shrinks only when the epochs of the last
//! [`POOL_IDLE_RELEASE`] all needed less than half of what is resident.

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::BLOCK_BYTES;

/// One slot holds one block.
pub(crate) const SLOT_BYTES: usize = BLOCK_BYTES as usize;

/// Resident memory above what recent epochs used is released after this long: long enough
/// that a workload pausing for a few cycles (cuts every 2–300 s) finds its pages still warm,
/// short enough that a burst does not pin memory for the life of the disk.
pub(crate) const POOL_IDLE_RELEASE: Duration = Duration::from_secs(60);

/// Memory is released in steps of 1 MiB (256 slots): no `madvise` for a few pages.
const RELEASE_GRANULE_SLOTS: u32 = 256;

struct PoolState {
    /// Slots given back during this epoch, reused first (their pages are the warmest).
    free: Vec<u32>,
    /// Slots `next..` have not been handed out in this epoch. Slots are handed out from here
    /// only when `free` is empty, so `next` is also the most slots in use at once (the peak).
    next: u32,
    /// Slots `..warm` may be resident (touched in some epoch and not released since).
    warm: u32,
    /// Last `reset` whose epoch needed at least half of `warm`.
    last_busy: Option<Instant>,
    /// The mapping could not be made; retried at the next epoch, copies go to the file.
    map_failed: bool,
}

/// A bounded pool of block-sized slots. See the module documentation.
pub(crate) struct CbwPool {
    slots_max: u32,
    /// Start of the mapping of `slots_max` slots, or null while there is none. Changed only
    /// under `state` with no slot taken (first `take`, or `reset`/drop releasing everything).
    base: AtomicPtr<u8>,
    state: Mutex<PoolState>,
}

impl CbwPool {
    /// A pool of at most `bytes_max` bytes (rounded down to whole slots). Allocates nothing.
    pub(crate) fn new(bytes_max: u64) -> CbwPool {
        let slots_max = u32::try_from(bytes_max / SLOT_BYTES as u64).unwrap_or(u32::MAX);
        CbwPool {
            slots_max,
            base: AtomicPtr::new(ptr::null_mut()),
            state: Mutex::new(PoolState {
                free: Vec::new(),
                next: 0,
                warm: 0,
                last_busy: None,
                map_failed: false,
            }),
        }
    }

    fn mapping_bytes(&self) -> usize {
        self.slots_max as usize * SLOT_BYTES
    }

    /// Fills `out` with slots for the caller's exclusive use and returns true, or returns false
    /// and takes nothing when fewer than `out.len()` slots are free (the caller then copies to
    /// the file instead).
    pub(crate) fn take(&self, out: &mut [u32]) -> bool {
        let n = out.len();
        if n == 0 || self.slots_max == 0 {
            return n == 0;
        }
        let mut st = self.state.lock();
        if st.free.len() + ((self.slots_max - st.next) as usize) < n {
            return false;
        }
        if self.base.load(Ordering::Acquire).is_null() {
            if st.map_failed {
                return false;
            }
            match map_anonymous(self.mapping_bytes()) {
                Ok(p) => self.base.store(p, Ordering::Release),
                Err(e) => {
                    st.map_failed = true;
                    tracing::warn!(bytes = self.mapping_bytes(), error = %e,
                        "cannot map the copy-before-write pool; copies go to the file this epoch");
                    return false;
                }
            }
        }
        for slot in out.iter_mut() {
            *slot = match st.free.pop() {
                Some(s) => s,
                None => {
                    st.next += 1;
                    st.next - 1
                }
            };
        }
        st.warm = st.warm.max(st.next);
        true
    }

    /// Returns slots taken with `take`; the caller no longer touches them.
    pub(crate) fn give_back(&self, slots: &[u32]) {
        if !slots.is_empty() {
            self.state.lock().free.extend_from_slice(slots);
        }
    }

    /// End of an epoch: every slot is free again (the caller guarantees that no slot is in
    /// use: it holds every stripe lock and has forgotten every slot). Releases resident memory
    /// that the epochs of the last `POOL_IDLE_RELEASE` did not need; returns true if it did.
    pub(crate) fn reset(&self, now: Instant) -> bool {
        let mut st = self.state.lock();
        let peak = st.next;
        st.next = 0;
        st.free.clear();
        st.map_failed = false;
        let busy = u64::from(peak) * 2 >= u64::from(st.warm);
        let last_busy = *st.last_busy.get_or_insert(now);
        if busy {
            st.last_busy = Some(now);
            return false;
        }
        if now.saturating_duration_since(last_busy) < POOL_IDLE_RELEASE {
            return false;
        }
        st.last_busy = Some(now);
        let keep = peak
            .div_ceil(RELEASE_GRANULE_SLOTS)
            .saturating_mul(RELEASE_GRANULE_SLOTS)
            .min(st.warm);
        let base = self.base.load(Ordering::Acquire);
        if base.is_null() {
            st.warm = 0;
            return false;
        }
        if keep == 0 {
            self.base.store(ptr::null_mut(), Ordering::Release);
            unmap(base, self.mapping_bytes());
            st.free = Vec::new();
        } else {
            let from = keep as usize * SLOT_BYTES;
            let len = (st.warm - keep) as usize * SLOT_BYTES;
            // SAFETY: `from..from + len` lies inside the mapping (warm <= slots_max), and no
            // slot is in use (caller's guarantee), so no reference into it exists.
            let r = unsafe { libc::madvise(base.add(from).cast(), len, libc::MADV_DONTNEED) };
            if r != 0 {
                tracing::warn!(error = %io::Error::last_os_error(), "cannot release copy-before-write pool memory");
                return false;
            }
            st.free.shrink_to(keep as usize);
        }
        st.warm = keep;
        true
    }

    /// Returns all memory to the system now; returns the bytes that were resident. The caller
    /// guarantees that no slot is in use (no epoch is open and it holds every stripe lock).
    pub(crate) fn release_all(&self) -> u64 {
        let mut st = self.state.lock();
        let resident = u64::from(st.warm) * SLOT_BYTES as u64;
        let base = self.base.swap(ptr::null_mut(), Ordering::AcqRel);
        if !base.is_null() {
            unmap(base, self.mapping_bytes());
        }
        st.free = Vec::new();
        st.next = 0;
        st.warm = 0;
        st.last_busy = None;
        resident
    }

    /// Bytes of the slots taken and not given back: copies waiting for the shipper.
    pub(crate) fn in_use_bytes(&self) -> u64 {
        let st = self.state.lock();
        u64::from(st.next).saturating_sub(st.free.len() as u64) * SLOT_BYTES as u64
    }

    /// Bytes of the pool that may be resident (touched and not released).
    pub(crate) fn resident_bytes(&self) -> u64 {
        u64::from(self.state.lock().warm) * SLOT_BYTES as u64
    }

    /// Upper bound of the pool, in bytes.
    pub(crate) fn bytes_max(&self) -> u64 {
        self.mapping_bytes() as u64
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots_max, "slot {slot} beyond the pool");
        let base = self.base.load(Ordering::Acquire);
        assert!(!base.is_null(), "slot of an unmapped pool");
        // SAFETY: slot < slots_max, so the offset lies inside the mapping.
        unsafe { base.add(slot as usize * SLOT_BYTES) }
    }

    /// The memory of `slot`.
    ///
    /// # Safety
    /// `slot` was returned by `take` and has not been given back (nor the pool reset) since,
    /// and the caller holds the only access to it while the returned slice lives (in
    /// `cbw.rs`: the stripe lock of the block the slot holds).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slot_mut(&self, slot: u32) -> &mut [u8] {
        // SAFETY: the slot is mapped, readable and writable, SLOT_BYTES long, and exclusively
        // the caller's (this function's contract).
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), SLOT_BYTES) }
    }

    /// The memory of `slot`, to read.
    ///
    /// # Safety
    /// As for [`CbwPool::slot_mut`].
    pub(crate) unsafe fn slot(&self, slot: u32) -> &[u8] {
        // SAFETY: as in slot_mut; nobody writes the slot while the caller reads it.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), SLOT_BYTES) }
    }
}

impl Drop for CbwPool {
    fn drop(&mut self) {
        let base = *self.base.get_mut();
        if !base.is_null() {
            unmap(base, self.mapping_bytes());
        }
    }
}

/// A private anonymous read-write mapping of `len` bytes. `MAP_NORESERVE`: pages cost memory
/// only once touched, and only up to the pool's bound.
fn map_anonymous(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping aliases nothing; arguments are plain integers.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

fn unmap(base: *mut u8, len: usize) {
    // SAFETY: `base..base+len` is a mapping made by `map_anonymous` that nothing references
    // any more (callers: drop, or reset with no slot in use).
    if unsafe { libc::munmap(base.cast(), len) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot unmap the copy-before-write pool");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_all_or_nothing_within_the_bound() {
        let pool = CbwPool::new(10 * SLOT_BYTES as u64 + 100);
        assert_eq!(pool.bytes_max(), 10 * SLOT_BYTES as u64);
        assert_eq!(
            pool.resident_bytes(),
            0,
            "nothing mapped before the first take"
        );
        let mut a = [0u32; 6];
        assert!(pool.take(&mut a));
        let mut b = [0u32; 5];
        assert!(!pool.take(&mut b), "only 4 left");
        let mut c = [0u32; 4];
        assert!(pool.take(&mut c));
        let mut all: Vec<u32> = a.iter().chain(c.iter()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "distinct slots");
        assert!(!pool.take(&mut [0u32; 1]));
        pool.give_back(&a[..2]);
        let mut d = [0u32; 2];
        assert!(pool.take(&mut d));
        assert_eq!(
            d,
            [a[1], a[0]],
            "given-back slots are reused last in, first out"
        );
        assert_eq!(pool.resident_bytes(), 10 * SLOT_BYTES as u64);
    }

    #[test]
    fn slots_hold_their_bytes_and_epochs_reuse_the_same_slots() {
        let pool = CbwPool::new(64 * SLOT_BYTES as u64);
        let mut s = [0u32; 3];
        assert!(pool.take(&mut s));
        for (i, slot) in s.iter().enumerate() {
            // SAFETY: taken above, used by this thread only.
            unsafe { pool.slot_mut(*slot) }.fill(i as u8 + 1);
        }
        for (i, slot) in s.iter().enumerate() {
            // SAFETY: as above.
            assert!(unsafe { pool.slot(*slot) }
                .iter()
                .all(|b| *b == i as u8 + 1));
        }
        let t0 = Instant::now();
        assert!(!pool.reset(t0));
        let mut again = [0u32; 3];
        assert!(pool.take(&mut again));
        assert_eq!(again, s, "the next epoch starts from the same (warm) slots");
        assert_eq!(pool.resident_bytes(), 3 * SLOT_BYTES as u64);
    }

    #[test]
    fn memory_is_released_only_after_an_idle_period() {
        let pool = CbwPool::new(2048 * SLOT_BYTES as u64);
        let t0 = Instant::now();
        let mut big = vec![0u32; 1000];
        assert!(pool.take(&mut big));
        assert!(!pool.reset(t0));
        // Small epochs: nothing released before POOL_IDLE_RELEASE has passed.
        let mut small = [0u32; 10];
        assert!(pool.take(&mut small));
        assert!(!pool.reset(t0 + POOL_IDLE_RELEASE / 2));
        assert_eq!(pool.resident_bytes(), 1000 * SLOT_BYTES as u64);
        assert!(pool.take(&mut small));
        assert!(pool.reset(t0 + POOL_IDLE_RELEASE + Duration::from_secs(1)));
        assert_eq!(
            pool.resident_bytes(),
            u64::from(RELEASE_GRANULE_SLOTS) * SLOT_BYTES as u64,
            "kept what recent epochs used, in whole granules"
        );
        // An idle epoch after another idle period unmaps everything; the pool still works.
        assert!(pool.reset(t0 + 3 * POOL_IDLE_RELEASE));
        assert_eq!(pool.resident_bytes(), 0);
        assert!(pool.base.load(Ordering::Acquire).is_null());
        let mut one = [0u32; 1];
        assert!(pool.take(&mut one));
        // SAFETY: taken above.
        assert!(unsafe { pool.slot(one[0]) }.iter().all(|b| *b == 0));
    }

    #[test]
    fn release_all_unmaps_and_the_pool_starts_over() {
        let pool = CbwPool::new(64 * SLOT_BYTES as u64);
        let mut s = [0u32; 5];
        assert!(pool.take(&mut s));
        pool.reset(Instant::now());
        assert_eq!(pool.release_all(), 5 * SLOT_BYTES as u64);
        assert_eq!(pool.resident_bytes(), 0);
        assert!(pool.base.load(Ordering::Acquire).is_null());
        assert_eq!(pool.release_all(), 0);
        assert!(pool.take(&mut s));
        assert_eq!(pool.in_use_bytes(), 5 * SLOT_BYTES as u64);
    }

    #[test]
    fn a_busy_epoch_keeps_the_memory() {
        let pool = CbwPool::new(1024 * SLOT_BYTES as u64);
        let t0 = Instant::now();
        let mut big = vec![0u32; 600];
        assert!(pool.take(&mut big));
        assert!(!pool.reset(t0));
        for k in 1..5u32 {
            let mut half = vec![0u32; 300];
            assert!(pool.take(&mut half));
            assert!(!pool.reset(t0 + POOL_IDLE_RELEASE * k));
        }
        assert_eq!(pool.resident_bytes(), 600 * SLOT_BYTES as u64);
    }

    #[test]
    fn an_empty_pool_never_maps() {
        let pool = CbwPool::new(SLOT_BYTES as u64 - 1);
        assert!(!pool.take(&mut [0u32; 1]));
        assert!(pool.take(&mut []));
        assert_eq!(pool.resident_bytes(), 0);
        assert!(!pool.reset(Instant::now()));
    }
}
