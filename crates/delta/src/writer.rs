//! [`DeltaWriter`]: encodes a delta onto any `Write`. Validates every frame with the same rules
//! the decoder applies, so it cannot produce a delta the reader refuses. It does not buffer:
//! callers writing to a socket or file should pass a `BufWriter`.
//!
//! Per payload byte the writer does one BLAKE3 pass (the frame checksum; the footer MAC covers
//! only the heads, format version 2) and at most one zstd pass, none while it is backed off
//! after incompressible frames ([`ZSTD_BACKOFF_AFTER`], [`ZSTD_BACKOFF_SKIP`]). Raw payloads
//! are written from the caller's slice without a copy; with [`DeltaWriter::data_shared`] and a
//! [`SharedWrite`] output they are not copied at all: the output keeps a reference to the
//! caller's buffer (the shipper hands its read buffers to the HTTP body this way).

use std::io::Write;

use bytes::Bytes;

use crate::frame::{encode_frame_head, FrameInfo, FrameKind, FRAME_HEAD_BYTES, TAG_FOOTER};
use crate::header::Keys;
use crate::{
    Compression, DeltaError, DeltaHeader, DeltaSummary, BLOCK_BYTES, FRAME_DATA_BYTES_MAX,
    ZSTD_BACKOFF_AFTER, ZSTD_BACKOFF_SKIP, ZSTD_LEVEL, ZSTD_MIN_SAVING_DIVISOR,
};

/// An output that can take bytes by reference: [`SharedWrite::write_shared`] appends `bytes`
/// after everything written so far, like `write_all`, but may keep the `Bytes` (a reference
/// count) instead of copying them.
pub trait SharedWrite: Write {
    fn write_shared(&mut self, bytes: Bytes) -> std::io::Result<()>;
}

impl SharedWrite for Vec<u8> {
    fn write_shared(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.extend_from_slice(&bytes);
        Ok(())
    }
}

/// Streaming delta encoder.
pub struct DeltaWriter<W: Write> {
    out: W,
    header: DeltaHeader,
    mac: blake3::Hasher,
    pos: u64,
    frames: u64,
    data_bytes: u64,
    zero_bytes: u64,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Compressed payload of the current frame; sized once to the bound of a full frame (so no
    /// per-frame reallocation or zero-filling).
    scratch: Vec<u8>,
    /// Consecutive frames zstd failed to shrink enough.
    incompressible_streak: u32,
    /// Frames still to store raw without trying zstd.
    backoff_left: u32,
}

impl<W: Write> DeltaWriter<W> {
    /// Validates and writes the header.
    pub fn new(out: W, header: &DeltaHeader, key: &[u8; 32]) -> Result<Self, DeltaError> {
        header.validate()?;
        let keys = Keys::derive(key);
        let (compressor, scratch) = match header.compression {
            Compression::None => (None, Vec::new()),
            Compression::Zstd => (
                Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
                vec![0u8; zstd::zstd_safe::compress_bound(FRAME_DATA_BYTES_MAX as usize)],
            ),
        };
        let mut w = DeltaWriter {
            out,
            header: header.clone(),
            mac: blake3::Hasher::new_keyed(&keys.mac),
            pos: 0,
            frames: 0,
            data_bytes: 0,
            zero_bytes: 0,
            compressor,
            scratch,
            incompressible_streak: 0,
            backoff_left: 0,
        };
        let bytes = header.encode(&keys);
        w.emit(&bytes)?;
        Ok(w)
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Records that `bytes` are at `offset` on `disk`. Splits into frames of at most 1 MiB and
    /// compresses each one when the header enables it and it gets smaller. Empty is a no-op.
    pub fn data(&mut self, disk: u32, offset: u64, bytes: &[u8]) -> Result<(), DeltaError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.check_range(disk, offset, bytes.len() as u64)?;
        for (i, chunk) in bytes.chunks(FRAME_DATA_BYTES_MAX as usize).enumerate() {
            let chunk_offset = offset + i as u64 * FRAME_DATA_BYTES_MAX;
            self.data_frame(disk, chunk_offset, chunk)?;
        }
        Ok(())
    }

    /// [`DeltaWriter::data`] for a shared buffer: the same bytes on the output, but payloads
    /// stored raw reach it as slices of `bytes` ([`SharedWrite::write_shared`]), not copies.
    pub fn data_shared(&mut self, disk: u32, offset: u64, bytes: Bytes) -> Result<(), DeltaError>
    where
        W: SharedWrite,
    {
        if bytes.is_empty() {
            return Ok(());
        }
        self.check_range(disk, offset, bytes.len() as u64)?;
        let frame = FRAME_DATA_BYTES_MAX as usize;
        for start in (0..bytes.len()).step_by(frame) {
            let chunk = bytes.slice(start..bytes.len().min(start + frame));
            let chunk_offset = offset + start as u64;
            let len = chunk.len();
            let (head, compressed) = self.frame_head(disk, chunk_offset, &chunk)?;
            self.out.write_all(&head)?;
            let stored = match compressed {
                Some(n) => {
                    self.out.write_all(&self.scratch[..n])?;
                    n
                }
                None => {
                    self.out.write_shared(chunk)?;
                    len
                }
            };
            self.count_frame(head.len() + stored, len as u64);
        }
        Ok(())
    }

    /// Records that `[offset, offset + len)` on `disk` reads as zeros (one frame, no payload).
    /// Zero length is a no-op.
    pub fn zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<(), DeltaError> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(disk, offset, len)?;
        let info = FrameInfo {
            kind: FrameKind::Zero,
            disk,
            offset,
            len,
            codec: Compression::None,
            stored_len: 0,
            frame_pos: self.pos,
        };
        let head = encode_frame_head(&info, &[]);
        self.emit(&head)?;
        self.frames += 1;
        self.zero_bytes += len;
        Ok(())
    }

    /// Writes the footer and returns the writer and the totals.
    pub fn finish(mut self) -> Result<(W, DeltaSummary), DeltaError> {
        let mut footer = [0u8; 32];
        footer[0] = TAG_FOOTER;
        footer[8..16].copy_from_slice(&self.frames.to_le_bytes());
        footer[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        footer[24..32].copy_from_slice(&self.zero_bytes.to_le_bytes());
        self.emit(&footer)?;
        let mac = *self.mac.finalize().as_bytes();
        self.out.write_all(&mac)?;
        self.out.flush()?;
        let summary = DeltaSummary {
            frames: self.frames,
            data_bytes: self.data_bytes,
            zero_bytes: self.zero_bytes,
            stored_bytes: self.pos + mac.len() as u64,
            mac,
        };
        Ok((self.out, summary))
    }

    fn data_frame(&mut self, disk: u32, offset: u64, chunk: &[u8]) -> Result<(), DeltaError> {
        let (head, compressed) = self.frame_head(disk, offset, chunk)?;
        let payload = match compressed {
            Some(n) => &self.scratch[..n],
            None => chunk,
        };
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        self.count_frame(head.len() + payload.len(), chunk.len() as u64);
        Ok(())
    }

    /// Compresses `chunk` when that pays (into `scratch`: `Some(stored length)`, else `None`:
    /// stored raw) and returns the frame's head, already added to the MAC.
    fn frame_head(
        &mut self,
        disk: u32,
        offset: u64,
        chunk: &[u8],
    ) -> Result<([u8; FRAME_HEAD_BYTES], Option<usize>), DeltaError> {
        let compressed = self.try_compress(chunk)?;
        let (codec, payload): (_, &[u8]) = match compressed {
            Some(n) => (Compression::Zstd, &self.scratch[..n]),
            None => (Compression::None, chunk),
        };
        let info = FrameInfo {
            kind: FrameKind::Data,
            disk,
            offset,
            len: chunk.len() as u64,
            codec,
            // ≤ FRAME_DATA_BYTES_MAX, so it fits.
            stored_len: payload.len() as u32,
            frame_pos: self.pos,
        };
        let head = encode_frame_head(&info, payload);
        // Version 2: the MAC covers the head (which carries the payload's checksum), not the
        // payload itself.
        self.mac.update(&head);
        Ok((head, compressed))
    }

    /// Accounts for a DATA frame of `len` disk bytes that took `written` bytes of output.
    fn count_frame(&mut self, written: usize, len: u64) {
        self.pos += written as u64;
        self.frames += 1;
        self.data_bytes += len;
    }

    /// Compresses `chunk` into `scratch` when compression is on, not backed off, and saves
    /// enough; returns the compressed length, or None to store the frame raw.
    fn try_compress(&mut self, chunk: &[u8]) -> Result<Option<usize>, DeltaError> {
        let Some(c) = self.compressor.as_mut() else {
            return Ok(None);
        };
        if self.backoff_left > 0 {
            self.backoff_left -= 1;
            return Ok(None);
        }
        let len = chunk.len();
        let n = c.compress_to_buffer(chunk, &mut self.scratch[..])?;
        let saving_min = (len as u64 / ZSTD_MIN_SAVING_DIVISOR).max(1) as usize;
        if n + saving_min <= len {
            self.incompressible_streak = 0;
            return Ok(Some(n));
        }
        self.incompressible_streak += 1;
        if self.incompressible_streak >= ZSTD_BACKOFF_AFTER {
            self.backoff_left = ZSTD_BACKOFF_SKIP;
            // The probe after the back-off decides alone: a failure backs off again.
            self.incompressible_streak = ZSTD_BACKOFF_AFTER - 1;
        }
        Ok(None)
    }

    fn check_range(&self, disk: u32, offset: u64, len: u64) -> Result<(), DeltaError> {
        let entry = self
            .header
            .disk(disk)
            .ok_or(DeltaError::UnknownDisk { disk })?;
        if offset % BLOCK_BYTES != 0 || len % BLOCK_BYTES != 0 {
            return Err(DeltaError::Misaligned { disk, offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= entry.size_bytes => Ok(()),
            _ => Err(DeltaError::FrameOutOfRange { disk, offset, len }),
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), DeltaError> {
        self.mac.update(bytes);
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeltaKind, DiskEntry};

    const KEY: [u8; 32] = [9u8; 32];

    /// Records where shared payloads came from, and writes every byte like a `Vec`.
    #[derive(Default)]
    struct Recorder {
        out: Vec<u8>,
        shared: Vec<(*const u8, usize)>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl SharedWrite for Recorder {
        fn write_shared(&mut self, bytes: Bytes) -> std::io::Result<()> {
            self.shared.push((bytes.as_ptr(), bytes.len()));
            self.out.extend_from_slice(&bytes);
            Ok(())
        }
    }

    fn header() -> DeltaHeader {
        DeltaHeader {
            compared: false,
            app_consistent: false,
            vm_id: proto::VmName::parse("shared").unwrap(),
            generation: proto::Generation(1),
            seq: proto::Seq(1),
            parent_seq: proto::Seq(0),
            cut_time_unix_ns: 0,
            kind: DeltaKind::Initial,
            compression: Compression::Zstd,
            disks: vec![DiskEntry {
                index: 0,
                size_bytes: 8 << 20,
            }],
        }
    }

    #[test]
    fn data_shared_writes_the_same_bytes_and_passes_raw_payloads_by_reference() {
        // 2.5 MiB of incompressible bytes (three frames, stored raw), then 1 MiB that zstd
        // shrinks (stored compressed, so written from the scratch buffer).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut data: Vec<u8> = (0..(5 << 19))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        data.extend(std::iter::repeat_n(0x5A, 1 << 20));
        let source = Bytes::from(data.clone());

        let split = 5 << 19;
        let mut copied = DeltaWriter::new(Vec::new(), &header(), &KEY).unwrap();
        copied.data(0, 4096, &data[..split]).unwrap();
        copied.data(0, 4096 + split as u64, &data[split..]).unwrap();
        let (expected, expected_summary) = copied.finish().unwrap();

        let mut shared = DeltaWriter::new(Recorder::default(), &header(), &KEY).unwrap();
        shared.data_shared(0, 4096, source.slice(..split)).unwrap();
        shared
            .data_shared(0, 4096 + split as u64, source.slice(split..))
            .unwrap();
        let (recorder, summary) = shared.finish().unwrap();

        assert!(recorder.out == expected, "same bytes either way");
        assert_eq!(summary, expected_summary);
        assert_eq!(summary.frames, 4);
        let base = source.as_ptr() as usize;
        let lens: Vec<usize> = recorder.shared.iter().map(|&(_, n)| n).collect();
        assert_eq!(
            lens,
            [1 << 20, 1 << 20, 1 << 19],
            "raw frames shared, compressed one not"
        );
        for (i, &(ptr, _)) in recorder.shared.iter().enumerate() {
            assert_eq!(
                ptr as usize,
                base + (i << 20),
                "frame {i} is a slice of the source"
            );
        }
    }

    /// A resumed upload is matched by the header checksum the primary computes without
    /// writing the delta: it must be the one in the stream, and change with the cut.
    #[test]
    fn header_checksum_is_the_one_written_and_names_the_cut() {
        let w = DeltaWriter::new(Vec::new(), &header(), &KEY).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let sum = header().checksum(&KEY).unwrap();
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        assert_eq!(&bytes[header_len - 32..header_len], &sum[..]);
        let mut later = header();
        later.cut_time_unix_ns = 1;
        assert_ne!(later.checksum(&KEY).unwrap(), sum);
        assert_ne!(header().checksum(&[8u8; 32]).unwrap(), sum);
    }
}
