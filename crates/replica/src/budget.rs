//! The store's bound on index memory: every frame of every retained journal delta has an
//! entry in the in-memory index (about 120 bytes with its extent), so the store counts indexed
//! frames across all its VMs and keeps them under [`INDEX_FRAMES_MAX`]. What happens at the
//! bound is in `docs/formats/replica-store.md` ("Index memory"): a commit first folds its own
//! VM's oldest points (retention sooner), and is refused with a transient error
//! (`IndexFull`) only when that cannot make room; `ReplicaStore::relieve_index_pressure`
//! folds the VMs holding the most frames when the store is past three quarters of the bound.

use std::sync::atomic::{AtomicU64, Ordering};

/// Most frames indexed at once per store: at ~120 bytes each, about 2 GiB of index. Random
/// writes of a busy VM make one frame per dirty 4 KiB run, so 64 retained deltas of such a
/// VM alone could otherwise take gigabytes (coalesced sequential writes take one frame per
/// MiB and stay far below).
pub const INDEX_FRAMES_MAX: u64 = 16 << 20;

/// Indexed frames of one store, and its bound.
#[derive(Debug)]
pub(crate) struct IndexBudget {
    indexed: AtomicU64,
    max: AtomicU64,
}

impl IndexBudget {
    pub fn new(max: u64) -> Self {
        IndexBudget {
            indexed: AtomicU64::new(0),
            max: AtomicU64::new(max),
        }
    }

    pub fn indexed(&self) -> u64 {
        self.indexed.load(Ordering::Acquire)
    }

    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes `n` frames of the budget if they fit.
    pub fn try_reserve(&self, n: u64) -> bool {
        let max = self.max();
        self.indexed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|&t| t <= max)
            })
            .is_ok()
    }

    /// Counts `n` frames indexed without a check (what open finds on disk is indexed anyway:
    /// refusing to open a VM would be worse than the memory).
    pub fn add(&self, n: u64) {
        self.indexed.fetch_add(n, Ordering::AcqRel);
    }

    pub fn release(&self, n: u64) {
        let _ = self
            .indexed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(n))
            });
    }
}
