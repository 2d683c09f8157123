//! The replica store: for every replicated VM, base images plus a journal of committed deltas,
//! an in-memory index of which frame holds which block at each recovery point, read-only views
//! of a point (served over NBD), raw export, and retention that folds old deltas into the base.
//! The on-disk layout and the crash argument are in `docs/formats/replica-store.md`.
//!
//! Architecture invariant: a point is listed only when every byte it reads is durable, and a
//! journal file that fails validation is reported ([`ReplicaVm::damage`]), never served.

mod adopt;
mod appender;
mod base_writer;
mod budget;
mod direct;
mod durable;
mod error;
mod failpoint;
mod fds;
mod fold;
mod history;
mod index;
mod manifest;
mod marker;
mod merge;
mod overlay;
mod payload;
mod pipeline;
mod receive;
mod store;
mod view;
mod vm;

#[cfg(test)]
mod adopt_tests;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod direct_tests;

pub use adopt::{AdoptedBase, ADOPT_COPY_CHUNK_BYTES};
pub use budget::INDEX_FRAMES_MAX;
pub use delta::{DeltaKind, DiskEntry};
pub use error::ReplicaError;
pub use fds::{JOURNAL_FDS_LIMIT_SHARE, JOURNAL_FDS_MAX};
pub use fold::HIDDEN_DELTAS_MAX;
pub use history::{
    classify, kept, HistoryPolicy, PointKind, APP_CONSISTENT_EVERY_HOURS_MAX,
    KEEP_EVERY_POINT_FOR_MAX_SECS, RECOVERY_HISTORY_MAX,
};
pub use marker::StoreMarker;
pub use overlay::{Overlay, MATERIALIZE_CHUNK_BYTES, OVERLAY_BLOCK_BYTES, OVERLAY_DISK_BYTES_MAX};
pub use receive::Incoming;
pub use store::ReplicaStore;
pub use view::{PointView, CHANGED_SINCE_CONTEXT_PREFIX};
pub use vm::{PointInfo, ReplicaVm};

/// Decoded frames kept per VM for sequential reads (each ≤ 1 MiB, so ≤ 32 MiB per VM).
pub const FRAME_CACHE_ENTRIES: usize = 32;

/// Most frames one delta may carry. The index holds one entry per frame in memory (~100 bytes),
/// so this caps one delta's index at ~1.6 GiB; the shipper coalesces adjacent dirty blocks into
/// frames of up to 1 MiB, which keeps real deltas orders of magnitude below it.
pub const FRAMES_PER_DELTA_MAX: u64 = 16 << 20;
