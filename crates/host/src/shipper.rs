//! Turns a crash-consistent cut into a delta stream: read the frozen blocks, detect zeros,
//! and encode DATA/ZERO frames (the delta crate compresses and hashes). Runs on a blocking
//! thread; memory is bounded by one read chunk plus the transport's body buffer.
//!
//! **Holes are skipped when that is safe.** The cut-time content of a block is in the image
//! only if no guest write touched it since the cut; otherwise the tracker copied it aside first
//! and `FrozenDisk::read_at` returns that copy. So a hole in the live image may still hide
//! cut-time data (the guest punched it after the cut). For each chunk the shipper first asks
//! `FrozenDisk::skip_if_hole`, which answers under the tracker's stripe lock: a hole with no
//! copy and not read before reads as zeros at the cut, and becomes a ZERO frame without being
//! read (a full resynchronization of a mostly empty disk then costs one `SEEK_DATA` per MiB of
//! holes). Everything else is read and zero runs are found by [`is_zero`].
//!
//! **Order.** The shipper walks each disk with `FrozenDisk::next_unshipped` (each block is
//! shipped once, frames may come in any order since they never overlap). When the tracker's
//! in-memory pool of copy-before-write copies is half full, the ranges held there go first:
//! shipping them gives their memory back, so later copies need not spill to the tracker's file.
//!
//! **Buffers.** Runs of at least [`SHARED_RUN_BYTES_MIN`] go to the delta writer as slices of
//! the read buffer they were read into ([`DeltaWriter::data_shared`]): a payload stored raw
//! reaches the HTTP body, and TLS, without being copied. Shorter runs are copied into the
//! body's buffer as before: a slice pins its whole buffer until the transport sends it, and
//! thousands of 4 KiB slices queued for sending would pin a MiB each. The buffer returns to a small per-cut pool ([`ReadBuffers`]) when the
//! transport drops the last slice of it, so a cut reuses a few buffers instead of allocating
//! one per read. Consecutive zero blocks become one ZERO frame even across read chunks (the
//! replica then punches one range, not one per MiB). Reads are aligned to
//! [`READ_CHUNK_BYTES`], the tracker's copy-before-write stripe, so one read holds one stripe
//! lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use delta::{DeltaHeader, DeltaWriter, SharedWrite};
use parking_lot::Mutex;
use tracker::{FrozenDisk, BLOCK_BYTES};

/// Bytes read from a frozen disk at a time: large enough for sequential throughput, small
/// enough to keep a shipper's memory flat.
pub const READ_CHUNK_BYTES: usize = 1 << 20;

/// Chunks smaller than this are read rather than probed for holes: scattered 4 KiB dirty
/// blocks (random guest writes) would otherwise pay an extra `lseek` and stripe lock each,
/// while reading them costs about the same.
const HOLE_PROBE_BYTES_MIN: usize = 64 << 10;

/// Shortest data run handed to the transport as a slice of its read buffer rather than copied:
/// half a buffer, so the memory pinned by slices in flight is at most twice their bytes (the
/// transport holds a few MiB in flight).
const SHARED_RUN_BYTES_MIN: usize = READ_CHUNK_BYTES / 2;

/// Read buffers a cut keeps for reuse. Buffers in flight are bounded by the transport (its body
/// channel and HTTP/2 send buffer hold a few MiB), not by this; more than this many coming
/// back at once are freed.
const SPARE_READ_BUFFERS: usize = 16;

#[derive(Debug, Default, Clone, Copy)]
pub struct ShipSummary {
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Encodes every dirty range of `disks` (paired with their disk index) into `out`.
/// `progress` counts bytes read so far, for the progress bar.
pub fn encode_cut<W: SharedWrite>(
    out: W,
    header: &DeltaHeader,
    key: &[u8; 32],
    disks: &[(u32, &FrozenDisk)],
    progress: &AtomicU64,
) -> anyhow::Result<(W, ShipSummary)> {
    let mut frames = Frames {
        writer: DeltaWriter::new(out, header, key)?,
        summary: ShipSummary::default(),
        zeros: None,
        buffers: ReadBuffers::default(),
    };
    for &(index, disk) in disks {
        let mut pos = 0u64;
        loop {
            // Copies the guest forced aside fill a bounded memory pool; past half of it, ship
            // them first so their memory is reused before later copies spill to a file.
            let (held, max) = disk.in_memory_bytes();
            if held > 0 && held >= max / 2 {
                for (offset, len) in disk.ranges_in_memory() {
                    let end = offset + len;
                    let mut at = offset;
                    while at < end {
                        let n = chunk_len(at, end);
                        frames.read(index, disk, n, at, progress)?;
                        at += n as u64;
                    }
                }
            }
            let Some((offset, n)) = disk.next_unshipped(pos, READ_CHUNK_BYTES as u64) else {
                break;
            };
            let n = n as usize;
            if n >= HOLE_PROBE_BYTES_MIN && disk.skip_if_hole(offset, n as u64)? {
                frames.zero(index, offset, n as u64)?;
                progress.fetch_add(n as u64, Ordering::Relaxed);
            } else {
                frames.read(index, disk, n, offset, progress)?;
            }
            pos = offset + n as u64;
        }
    }
    frames.finish()
}

/// Bytes to read at `pos` (before `end`): up to the next multiple of [`READ_CHUNK_BYTES`].
fn chunk_len(pos: u64, end: u64) -> usize {
    let chunk = READ_CHUNK_BYTES as u64;
    (chunk - pos % chunk).min(end - pos) as usize
}

/// Turns chunks of a disk into frames: one DATA call per run of non-zero blocks, and one ZERO
/// frame per run of zero blocks, held back until the run ends so that it spans chunks.
struct Frames<W: SharedWrite> {
    writer: DeltaWriter<W>,
    summary: ShipSummary,
    /// Pending zero run: (disk, offset, len).
    zeros: Option<(u32, u64, u64)>,
    buffers: ReadBuffers,
}

impl<W: SharedWrite> Frames<W> {
    /// Reads `len` bytes of `disk` at `offset` as of the cut and emits them.
    fn read(
        &mut self,
        index: u32,
        disk: &FrozenDisk,
        len: usize,
        offset: u64,
        progress: &AtomicU64,
    ) -> anyhow::Result<()> {
        let mut buf = self.buffers.take();
        disk.read_at(&mut buf[..len], offset)?;
        let chunk = self.buffers.share(buf).slice(..len);
        self.chunk(index, offset, chunk)?;
        progress.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Emits `chunk`, the content of `disk` at `offset` (a multiple of the block size).
    fn chunk(&mut self, disk: u32, offset: u64, chunk: Bytes) -> anyhow::Result<()> {
        let mut blocks = chunk.chunks(BLOCK_BYTES as usize);
        let Some(first) = blocks.next() else {
            return Ok(());
        };
        let (mut start, mut zero) = (0usize, is_zero(first));
        let mut at = first.len();
        for block in blocks {
            let z = is_zero(block);
            if z != zero {
                self.run(disk, offset, chunk.slice(start..at), start, zero)?;
                (start, zero) = (at, z);
            }
            at += block.len();
        }
        self.run(disk, offset, chunk.slice(start..), start, zero)
    }

    /// One run of `chunk` (at `start` in it): all zero blocks, or all non-zero ones.
    fn run(
        &mut self,
        disk: u32,
        offset: u64,
        bytes: Bytes,
        start: usize,
        zero: bool,
    ) -> anyhow::Result<()> {
        let (at, len) = (offset + start as u64, bytes.len() as u64);
        if zero {
            return self.zero(disk, at, len);
        }
        self.flush_zeros()?;
        if bytes.len() >= SHARED_RUN_BYTES_MIN {
            self.writer.data_shared(disk, at, bytes)?;
        } else {
            self.writer.data(disk, at, &bytes)?;
        }
        self.summary.data_bytes += len;
        Ok(())
    }

    fn zero(&mut self, disk: u32, offset: u64, len: u64) -> anyhow::Result<()> {
        match &mut self.zeros {
            Some((d, o, l)) if *d == disk && *o + *l == offset => *l += len,
            _ => {
                self.flush_zeros()?;
                self.zeros = Some((disk, offset, len));
            }
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> anyhow::Result<()> {
        if let Some((disk, offset, len)) = self.zeros.take() {
            self.writer.zero(disk, offset, len)?;
            self.summary.zero_bytes += len;
        }
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<(W, ShipSummary)> {
        self.flush_zeros()?;
        let (out, _) = self.writer.finish()?;
        Ok((out, self.summary))
    }
}

/// The read buffers of one cut: [`ReadBuffers::share`] turns a filled buffer into `Bytes`
/// whose last drop (on whichever thread the transport frees it) puts it back for
/// [`ReadBuffers::take`], so reads reuse warm memory instead of a new zeroed MiB each time.
#[derive(Default, Clone)]
struct ReadBuffers {
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl ReadBuffers {
    /// A buffer of [`READ_CHUNK_BYTES`]: a spare one if any (its old bytes are overwritten by
    /// the read), else a new one.
    fn take(&self) -> Vec<u8> {
        self.spare
            .lock()
            .pop()
            .unwrap_or_else(|| vec![0u8; READ_CHUNK_BYTES])
    }

    fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Recycled {
            buf,
            home: self.clone(),
        })
    }
}

/// A read buffer lent out as `Bytes`; goes back to its [`ReadBuffers`] when dropped.
struct Recycled {
    buf: Vec<u8>,
    home: ReadBuffers,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut spare = self.home.spare.lock();
        if spare.len() < SPARE_READ_BUFFERS {
            spare.push(std::mem::take(&mut self.buf));
        }
    }
}

/// True when every byte is zero. ORs 256 bytes at a time (the compiler vectorises the inner
/// loop) and stops at the first non-zero stretch, so data blocks cost a few instructions.
pub fn is_zero(block: &[u8]) -> bool {
    const STRIDE: usize = 256;
    let mut strides = block.chunks_exact(STRIDE);
    for s in strides.by_ref() {
        let acc = s.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().expect("chunks_exact(8) yields 8-byte slices"))
        });
        if acc != 0 {
            return false;
        }
    }
    strides.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta::{Compression, DeltaKind, DeltaReader, DiskEntry, FrameBody, FrameKind};

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        for at in [0, 255, 256, 4000, 4095] {
            let mut b = [0u8; 4096];
            b[at] = 1;
            assert!(!is_zero(&b), "non-zero byte at {at}");
        }
        assert!(!is_zero(&[0, 0, 3]));
        let mut odd = vec![0u8; 300];
        assert!(is_zero(&odd));
        odd[299] = 7;
        assert!(!is_zero(&odd));
        assert!(is_zero(&[]));
    }

    #[test]
    fn reads_are_aligned_to_the_chunk() {
        let c = READ_CHUNK_BYTES as u64;
        assert_eq!(chunk_len(0, 10 * c), READ_CHUNK_BYTES);
        assert_eq!(chunk_len(4096, 10 * c), READ_CHUNK_BYTES - 4096);
        assert_eq!(chunk_len(c - 8192, c + 4096), 8192);
        assert_eq!(chunk_len(c, c + 4096), 4096);
    }

    const KEY: [u8; 32] = [1u8; 32];

    fn header(disk_bytes: u64) -> DeltaHeader {
        DeltaHeader {
            compared: false,
            app_consistent: false,
            vm_id: proto::VmName::parse("t").unwrap(),
            generation: proto::Generation(1),
            seq: proto::Seq(1),
            parent_seq: proto::Seq(0),
            cut_time_unix_ns: 0,
            kind: DeltaKind::Initial,
            compression: Compression::Zstd,
            disks: vec![DiskEntry {
                index: 3,
                size_bytes: disk_bytes,
            }],
        }
    }

    /// Keeps every shared slice, as a transport that has not sent anything yet would.
    #[derive(Default)]
    struct SlowTransport {
        copied: Vec<u8>,
        held: Vec<Bytes>,
    }

    impl std::io::Write for SlowTransport {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.copied.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl SharedWrite for SlowTransport {
        fn write_shared(&mut self, bytes: Bytes) -> std::io::Result<()> {
            self.held.push(bytes);
            Ok(())
        }
    }

    /// Long raw runs travel as slices of the read buffer; short ones are copied, so that a
    /// transport holding many scattered 4 KiB frames does not pin a 1 MiB buffer for each.
    #[test]
    fn only_long_raw_runs_are_shared() {
        let mib = READ_CHUNK_BYTES;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..mib)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // Chunk 0: random 4 KiB blocks between zero blocks; chunk 1: random throughout.
        let mut scattered = random.clone();
        for block in scattered.chunks_mut(2 * BLOCK_BYTES as usize) {
            block[BLOCK_BYTES as usize..].fill(0);
        }
        let mut frames = Frames {
            writer: DeltaWriter::new(SlowTransport::default(), &header(2 * mib as u64), &KEY)
                .unwrap(),
            summary: ShipSummary::default(),
            zeros: None,
            buffers: ReadBuffers::default(),
        };
        frames.chunk(3, 0, Bytes::from(scattered)).unwrap();
        frames.chunk(3, mib as u64, Bytes::from(random)).unwrap();
        let (transport, summary) = frames.finish().unwrap();
        assert_eq!(summary.data_bytes, (mib + mib / 2) as u64);
        let held: Vec<usize> = transport.held.iter().map(|b| b.len()).collect();
        assert_eq!(held, [mib], "only the 1 MiB run is shared");
    }

    #[test]
    fn frames_merge_zero_runs_across_chunks_and_round_trip() {
        let mib = READ_CHUNK_BYTES;
        let header = header(4 * mib as u64);
        // Chunk 0: data, zeros to its end; chunk 1: all zeros; chunk 2: zeros, then data.
        let mut image = vec![0u8; 3 * mib];
        image[..8192].fill(0xC3);
        image[2 * mib + 4096..2 * mib + 12288].fill(0x11);
        let mut frames = Frames {
            writer: DeltaWriter::new(Vec::new(), &header, &KEY).unwrap(),
            summary: ShipSummary::default(),
            zeros: None,
            buffers: ReadBuffers::default(),
        };
        for c in 0..3 {
            let chunk = Bytes::copy_from_slice(&image[c * mib..(c + 1) * mib]);
            frames.chunk(3, (c * mib) as u64, chunk).unwrap();
        }
        let (bytes, summary) = frames.finish().unwrap();
        assert_eq!(summary.data_bytes, 16384);
        assert_eq!(summary.zero_bytes, 3 * mib as u64 - 16384);
        let mut r = DeltaReader::new(&bytes[..], &KEY).unwrap();
        let mut seen = Vec::new();
        let mut rebuilt = vec![0xFFu8; 3 * mib];
        while let Some(f) = r.next_frame().unwrap() {
            seen.push((f.info.kind, f.info.offset, f.info.len));
            let range = f.info.offset as usize..(f.info.offset + f.info.len) as usize;
            match f.body {
                FrameBody::Data(d) => rebuilt[range].copy_from_slice(&d),
                FrameBody::Zero => rebuilt[range].fill(0),
            }
        }
        assert_eq!(
            seen,
            vec![
                (FrameKind::Data, 0, 8192),
                (FrameKind::Zero, 8192, 2 * mib as u64 - 8192 + 4096),
                (FrameKind::Data, 2 * mib as u64 + 4096, 8192),
                (FrameKind::Zero, 2 * mib as u64 + 12288, mib as u64 - 12288),
            ]
        );
        assert!(rebuilt == image);
    }
}
