//! One frame: its fixed 44-byte head (28 bytes of fields + 16-byte checksum), the checks that
//! make its lengths trustworthy before any payload is read, and payload decoding. Used by the
//! streaming decoder and, frame by frame, by the replica when it reads a stored delta at random.

use crate::header::Cursor;
use crate::{Compression, DeltaError, DiskEntry, BLOCK_BYTES, FRAME_DATA_BYTES_MAX};

pub(crate) const TAG_DATA: u8 = 1;
pub(crate) const TAG_ZERO: u8 = 2;
pub(crate) const TAG_FOOTER: u8 = 0xF0;
/// Fields covered by the frame checksum, tag included.
pub(crate) const FRAME_FIELDS_BYTES: usize = 28;
pub(crate) const FRAME_CHECKSUM_BYTES: usize = 16;
/// Bytes before the payload.
pub const FRAME_HEAD_BYTES: usize = FRAME_FIELDS_BYTES + FRAME_CHECKSUM_BYTES;

/// DATA or ZERO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Data,
    Zero,
}

/// Everything about a frame but its payload, including where it sits in the stream so that a
/// stored delta can be indexed and the frame re-read later with [`decode_stored_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub kind: FrameKind,
    pub disk: u32,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes on the disk (uncompressed length for DATA).
    pub len: u64,
    /// Payload codec (always `None` for ZERO).
    pub codec: Compression,
    /// Payload bytes as stored (0 for ZERO).
    pub stored_len: u32,
    /// Position of the frame's first byte (its tag) in the delta stream.
    pub frame_pos: u64,
}

impl FrameInfo {
    /// Total encoded length of the frame: head plus stored payload.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEAD_BYTES as u64 + u64::from(self.stored_len)
    }

    /// Position of the payload in the delta stream.
    pub fn payload_pos(&self) -> u64 {
        self.frame_pos + FRAME_HEAD_BYTES as u64
    }
}

/// A frame re-read from stored bytes, checksum verified.
#[derive(Debug, Clone, Copy)]
pub struct StoredFrame<'a> {
    pub info: FrameInfo,
    pub payload: &'a [u8],
}

impl StoredFrame<'_> {
    /// The frame's bytes on the disk (empty for ZERO).
    pub fn data(&self) -> Result<Vec<u8>, DeltaError> {
        match self.info.kind {
            FrameKind::Zero => Ok(Vec::new()),
            FrameKind::Data => decode_payload(self.payload, self.info.codec, self.info.len),
        }
    }
}

/// Decodes a DATA payload into exactly `uncompressed_len` bytes. `uncompressed_len` is capped
/// at [`FRAME_DATA_BYTES_MAX`] before anything is allocated. Creates a zstd context per call;
/// callers decoding many frames should keep a [`PayloadDecoder`].
pub fn decode_payload(
    stored: &[u8],
    compression: Compression,
    uncompressed_len: u64,
) -> Result<Vec<u8>, DeltaError> {
    PayloadDecoder::new().decode(stored, compression, uncompressed_len)
}

/// Decodes DATA payloads reusing one zstd decompression context (creating one per frame was
/// 1.6 % of a replica's CPU in a random-write benchmark).
#[derive(Default)]
pub struct PayloadDecoder {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl PayloadDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Like [`decode_payload`].
    pub fn decode(
        &mut self,
        stored: &[u8],
        compression: Compression,
        uncompressed_len: u64,
    ) -> Result<Vec<u8>, DeltaError> {
        let mut out = Vec::new();
        self.decode_into(stored, compression, uncompressed_len, &mut out)?;
        Ok(out)
    }

    /// Decodes into `out` (cleared first, its allocation reused): on success `out` holds
    /// exactly `uncompressed_len` bytes.
    pub fn decode_into(
        &mut self,
        stored: &[u8],
        compression: Compression,
        uncompressed_len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), DeltaError> {
        out.clear();
        if uncompressed_len > FRAME_DATA_BYTES_MAX {
            return Err(DeltaError::Decompress(format!(
                "declared length {uncompressed_len} exceeds the 1 MiB frame cap"
            )));
        }
        let want = uncompressed_len as usize;
        match compression {
            Compression::None => {
                if stored.len() != want {
                    return Err(DeltaError::Decompress(format!(
                        "raw payload is {} bytes, declared {want}",
                        stored.len()
                    )));
                }
                out.extend_from_slice(stored);
            }
            Compression::Zstd => {
                let dctx = match &mut self.dctx {
                    Some(d) => d,
                    None => self.dctx.insert(zstd::bulk::Decompressor::new()?),
                };
                // Writes into out's spare capacity, at most `want` bytes: a payload that
                // would decompress to more fails instead of growing the buffer.
                out.reserve_exact(want);
                let n = dctx
                    .decompress_to_buffer(stored, out)
                    .map_err(|e| DeltaError::Decompress(e.to_string()))?;
                if n != want || out.len() != want {
                    let got = out.len();
                    out.clear();
                    return Err(DeltaError::Decompress(format!(
                        "zstd payload decompressed to {got} bytes, declared {want}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Re-reads one frame from `bytes` (head and payload, exactly as stored), verifying its
/// checksum and structure. `frame_pos` is only reported back. The caller compares the result
/// with what it expected (its index) since the disk table is not known here.
pub fn decode_stored_frame(bytes: &[u8], frame_pos: u64) -> Result<StoredFrame<'_>, DeltaError> {
    if bytes.len() < FRAME_HEAD_BYTES {
        return Err(DeltaError::Truncated {
            pos: frame_pos + bytes.len() as u64,
        });
    }
    let (head, payload) = bytes.split_at(FRAME_HEAD_BYTES);
    let info = parse_frame_head(head, frame_pos, None, Compression::Zstd)?;
    if payload.len() as u64 != u64::from(info.stored_len) {
        return Err(DeltaError::BadFrame {
            pos: frame_pos,
            reason: "stored length mismatch",
        });
    }
    verify_checksum(head, payload, frame_pos)?;
    Ok(StoredFrame { info, payload })
}

/// Parses and validates a frame head. `disks` is the delta's disk table (None when re-reading a
/// stored frame, whose placement the caller checks); `allowed` is the header's compression.
pub(crate) fn parse_frame_head(
    head: &[u8],
    pos: u64,
    disks: Option<&[DiskEntry]>,
    allowed: Compression,
) -> Result<FrameInfo, DeltaError> {
    let bad = |reason| DeltaError::BadFrame { pos, reason };
    let mut c = Cursor::new(head);
    let fields = |_| bad("frame head too short");
    let tag = c.u8().map_err(fields)?;
    let codec = c.u8().map_err(fields)?;
    let reserved = c.u16().map_err(fields)?;
    let disk = c.u32().map_err(fields)?;
    let offset = c.u64().map_err(fields)?;
    let len = c.u64().map_err(fields)?;
    let stored_len = c.u32().map_err(fields)?;
    let kind = match tag {
        TAG_DATA => FrameKind::Data,
        TAG_ZERO => FrameKind::Zero,
        other => return Err(DeltaError::BadFrameTag { pos, tag: other }),
    };
    if reserved != 0 {
        return Err(bad("reserved bytes must be zero"));
    }
    let codec = Compression::from_code(codec)?;
    if len == 0 {
        return Err(bad("empty frame"));
    }
    if offset % BLOCK_BYTES != 0 || len % BLOCK_BYTES != 0 {
        return Err(DeltaError::Misaligned { disk, offset, len });
    }
    if let Some(disks) = disks {
        let entry = disks
            .iter()
            .find(|d| d.index == disk)
            .ok_or(DeltaError::UnknownDisk { disk })?;
        match offset.checked_add(len) {
            Some(end) if end <= entry.size_bytes => {}
            _ => return Err(DeltaError::FrameOutOfRange { disk, offset, len }),
        }
    }
    match kind {
        FrameKind::Zero => {
            if codec != Compression::None || stored_len != 0 {
                return Err(bad("zero frame with a payload"));
            }
        }
        FrameKind::Data => {
            if len > FRAME_DATA_BYTES_MAX {
                return Err(bad("data frame longer than 1 MiB"));
            }
            let stored = u64::from(stored_len);
            match codec {
                Compression::None if stored != len => {
                    return Err(bad("raw payload length differs from frame length"))
                }
                Compression::Zstd if allowed == Compression::None => {
                    return Err(bad("zstd frame in an uncompressed delta"))
                }
                Compression::Zstd if stored == 0 || stored >= len => {
                    return Err(bad("zstd payload not smaller than the frame"))
                }
                _ => {}
            }
        }
    }
    Ok(FrameInfo {
        kind,
        disk,
        offset,
        len,
        codec,
        stored_len,
        frame_pos: pos,
    })
}

/// Checks the 16-byte checksum in `head` against its fields and the stored payload.
pub(crate) fn verify_checksum(head: &[u8], payload: &[u8], pos: u64) -> Result<(), DeltaError> {
    let (fields, sum) = head.split_at(FRAME_FIELDS_BYTES);
    if frame_checksum(fields, payload) != sum {
        return Err(DeltaError::FrameChecksum { pos });
    }
    Ok(())
}

pub(crate) fn frame_checksum(fields: &[u8], payload: &[u8]) -> [u8; FRAME_CHECKSUM_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(fields);
    h.update(payload);
    let mut out = [0u8; FRAME_CHECKSUM_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..FRAME_CHECKSUM_BYTES]);
    out
}

/// Encodes a frame head (fields + checksum over fields and stored payload). This checksum is
/// the only hash of the payload bytes: the footer MAC covers the head, not the payload.
pub(crate) fn encode_frame_head(info: &FrameInfo, payload: &[u8]) -> [u8; FRAME_HEAD_BYTES] {
    let mut head = [0u8; FRAME_HEAD_BYTES];
    head[0] = match info.kind {
        FrameKind::Data => TAG_DATA,
        FrameKind::Zero => TAG_ZERO,
    };
    head[1] = info.codec.code();
    head[4..8].copy_from_slice(&info.disk.to_le_bytes());
    head[8..16].copy_from_slice(&info.offset.to_le_bytes());
    head[16..24].copy_from_slice(&info.len.to_le_bytes());
    head[24..28].copy_from_slice(&info.stored_len.to_le_bytes());
    let sum = frame_checksum(&head[..FRAME_FIELDS_BYTES], payload);
    head[FRAME_FIELDS_BYTES..].copy_from_slice(&sum);
    head
}
