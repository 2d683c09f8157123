//! The one error type of the delta crate. Every variant names the reason a delta was refused,
//! with enough context (disk, offset, stream position) to say where.

use std::io;

/// Why a delta could not be encoded or was refused while decoding.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("I/O error on the delta stream: {0}")]
    Io(#[from] io::Error),
    #[error("not a delta: bad magic")]
    BadMagic,
    #[error("unsupported delta format version {0}")]
    UnsupportedVersion(u16),
    #[error("unsupported delta flags {0:#06x}")]
    UnsupportedFlags(u16),
    #[error("invalid delta header: {0}")]
    BadHeader(&'static str),
    #[error("unknown delta kind {0}")]
    UnknownKind(u8),
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    #[error("delta header checksum mismatch (corrupt header or wrong key)")]
    HeaderChecksum,
    #[error("unknown frame tag {tag:#04x} at byte {pos}")]
    BadFrameTag { pos: u64, tag: u8 },
    #[error("invalid frame at byte {pos}: {reason}")]
    BadFrame { pos: u64, reason: &'static str },
    #[error("frame for unknown disk {disk}")]
    UnknownDisk { disk: u32 },
    #[error("frame not aligned to 4096 bytes: disk {disk} offset {offset} len {len}")]
    Misaligned { disk: u32, offset: u64, len: u64 },
    #[error("frame beyond the end of the disk: disk {disk} offset {offset} len {len}")]
    FrameOutOfRange { disk: u32, offset: u64, len: u64 },
    #[error("frame checksum mismatch at byte {pos}")]
    FrameChecksum { pos: u64 },
    #[error("frame payload does not decompress to its declared length: {0}")]
    Decompress(String),
    #[error("delta truncated at byte {pos}")]
    Truncated { pos: u64 },
    #[error("delta footer mismatch: {0}")]
    FooterMismatch(&'static str),
    #[error("bytes after the delta footer at byte {pos}")]
    TrailingBytes { pos: u64 },
    #[error("the decoder already failed; the stream cannot be resumed")]
    Failed,
}
