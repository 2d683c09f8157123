//! Change tracking for replicated disks: which 4 KiB blocks changed, crash-consistent cuts of
//! all disks of a VM at one instant, copy-before-write while a cut ships, and the persistent
//! activity log that makes crash recovery cost O(hot extents) instead of a full resync.
//!
//! `TrackedDisk` implements `nbd::BlockBackend` over a raw sparse image and sits in the write
//! path. Each write holds the shared side of its VM's `CutGate`, records its extent in the
//! activity log if it is not hot yet, copies frozen blocks it is about to overwrite (into a
//! bounded per-disk memory pool, spilling to a file when it is full), writes, and sets its
//! dirty bits. `cut()` takes the gate exclusively for all disks of the VM, which drains
//! in-flight writes, and swaps each disk's active bitmap into a frozen one. The shipper reads
//! the frozen content through `FrozenDisk::read_at`, then calls `Cut::commit` (the replica has
//! the point) or `Cut::abort` (the frozen blocks go back into the active bitmap).
//!
//! This crate never talks to the network, never fails a guest write because of replication, and
//! never reads or writes the image outside the calls it is given. Persisted formats are in
//! `docs/formats/tracker-state.md`.

mod activity;
mod backend;
mod bitmap;
mod cbw;
mod cut;
mod disk;
mod durable;
mod error;
mod formats;
mod pool;
mod recovery;
mod sys;

pub use cut::{cut, Cut, CutGate, FrozenDisk};
pub use disk::{DiskOptions, TrackedDisk, CBW_MEMORY_BYTES_MAX_DEFAULT};
pub use error::TrackerError;
pub use formats::EXTENT_BYTES;

/// Tracking granularity: one dirty bit per 4 KiB block, the page size and the usual guest
/// filesystem block, so a 4 KiB random write dirties exactly one block.
pub const BLOCK_BYTES: u64 = 4096;

/// What `TrackedDisk::open` found in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenState {
    /// No state files: tracking starts now; the daemon decides whether to seed the replica.
    FirstOpen,
    /// Clean stop: the dirty bitmap was restored exactly.
    Clean,
    /// Unclean stop: every block of every hot extent is marked dirty, so the next cut re-ships
    /// them and the replica converges without a resync.
    RecoveredFromActivityLog { hot_extents: u64, hot_bytes: u64 },
    /// Unclean stop without a usable activity log (or a corrupt clean state): the set of
    /// changed blocks is unknown; the daemon must resync. Tracking restarts empty.
    TrackingLost { reason: String },
    /// The image changed while the daemon was stopped (fingerprint or size mismatch): the
    /// daemon must resync. Tracking restarts empty. `replaced`: the image file was replaced
    /// by another one (another inode), or its content by an older copy (its mtime went back,
    /// as `cp --preserve=timestamps` of an older copy does): a restore or snapshot revert.
    ModifiedOutside { reason: String, replaced: bool },
}

impl OpenState {
    /// True when the replica can no longer be trusted to follow by deltas alone.
    pub fn requires_resync(&self) -> bool {
        matches!(
            self,
            OpenState::TrackingLost { .. } | OpenState::ModifiedOutside { .. }
        )
    }
}

/// The result of opening a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub state: OpenState,
}
