//! The Understudy delta format: one recovery point of one VM, used both on the wire (primary →
//! replica) and as the replica's journal file. The byte layout is specified in
//! `docs/formats/delta.md`; this crate is its only encoder and decoder.
//!
//! - [`DeltaWriter`] encodes a delta onto any `Write`, frame by frame.
//! - [`DeltaReader`] decodes from any `Read`, validating everything and verifying the keyed
//!   footer before it ever reports the end of the stream.
//! - [`Decoder`] / [`PushDecoder`] are the same validation as a state machine without I/O, for
//!   callers that receive bytes pushed to them (the replica's incoming stream).
//! - [`decode_stored_frame`] / [`decode_payload`] re-read one frame at random from a stored
//!   delta (the replica's point reads); [`PayloadDecoder`] does the same reusing one zstd
//!   context, for callers that decode many frames.
//!
//! Nothing in this crate panics or allocates more than one frame on hostile bytes: every length
//! is checked against a named bound before it is trusted.

mod decoder;
mod error;
mod frame;
mod header;
mod reader;
mod writer;

pub use decoder::{Decoder, Event, PushDecoder};
pub use error::DeltaError;
pub use frame::{
    decode_payload, decode_stored_frame, FrameInfo, FrameKind, PayloadDecoder, StoredFrame,
};
pub use header::{validate_disks, Compression, DeltaHeader, DeltaKind, DiskEntry};
/// The identifier types and bounds a header shares with the primary (`crates/proto`).
pub use proto::{Generation, Seq, VmName, DISKS_PER_VM_MAX, VM_NAME_MAX};
pub use reader::{DeltaReader, Frame, FrameBody};
pub use writer::{DeltaWriter, SharedWrite};

/// Granularity of every offset and length on a disk. Matches the tracker's dirty-bitmap block
/// and the page size, so frames map onto whole blocks.
pub const BLOCK_BYTES: u64 = 4096;

/// Largest uncompressed DATA frame. Bounds the decoder's memory per frame (one frame is held at
/// a time) and the read amplification of a random 4 KiB read served from a stored frame.
pub const FRAME_DATA_BYTES_MAX: u64 = 1 << 20;

/// Largest header. A header with `DISKS_PER_VM_MAX` = 16 disks and a `VM_NAME_MAX` = 64-byte
/// VM id is 344 bytes; 4096 leaves room to grow without a reader allocating much on a lie.
pub const HEADER_BYTES_MAX: u32 = 4096;

/// Largest disk: 1 PiB. Keeps `offset + len` far away from `u64` overflow.
pub const DISK_BYTES_MAX: u64 = 1 << 50;

/// zstd level used by the writer: a "fast" (negative) level. On blocks a `fio` run wrote,
/// level -3 encodes (with hashing) at ~840 MiB/s per core against ~530 at level 1, for 25 %
/// of the input instead of 18 %, and decodes 1.5× faster (`examples/throughput.rs`). A
/// replicating host spends that CPU beside its guests, so speed wins over the last few
/// percent of ratio; the level is the writer's choice and not part of the format.
pub const ZSTD_LEVEL: i32 = -3;

/// The writer keeps a zstd frame only if it saves at least `len / ZSTD_MIN_SAVING_DIVISOR`
/// bytes (1/32, ~3 %): below that the wire gain is noise, while every reader of the stored
/// frame pays a decompression for it.
pub const ZSTD_MIN_SAVING_DIVISOR: u64 = 32;

/// Consecutive frames that zstd failed to shrink (see [`ZSTD_MIN_SAVING_DIVISOR`]) before the
/// writer stops trying. More than one, so that a single incompressible frame (one JPEG among
/// text) does not switch compression off; few enough that an incompressible workload (random
/// or already-compressed data) wastes at most 4 attempts before backing off.
pub const ZSTD_BACKOFF_AFTER: u32 = 4;

/// Frames stored raw without trying zstd once the writer backed off; then one frame is probed
/// again (a failed probe backs off again at once, a success resumes compressing every frame).
/// Trying one frame in 33 bounds the wasted work on incompressible data to ~3 % of always
/// compressing, while data that becomes compressible again is stored raw for at most 32
/// frames (≤ 32 MiB) before compression resumes.
pub const ZSTD_BACKOFF_SKIP: u32 = 32;

/// Totals of one delta, as recorded in its footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaSummary {
    /// Number of DATA and ZERO frames.
    pub frames: u64,
    /// Sum of the uncompressed lengths of DATA frames.
    pub data_bytes: u64,
    /// Sum of the lengths of ZERO frames.
    pub zero_bytes: u64,
    /// Total length of the encoded delta, header and footer included.
    pub stored_bytes: u64,
    /// The footer's keyed MAC (identifies this exact delta).
    pub mac: [u8; 32],
}
