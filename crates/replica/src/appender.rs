//! Appending a received delta to `incoming/<n>.partial` around the page cache. Bytes collect in
//! an aligned 1 MiB buffer; each full buffer goes to the delta's writer thread
//! ([`crate::pipeline`]) as one `O_DIRECT` write at a block-aligned offset, while the caller
//! fills the next one. [`JournalAppender::finish`] writes what is left: its whole blocks
//! directly, the final partial block (< 4 KiB; or all of it when it is shorter than
//! `DIRECT_WRITE_BYTES_MIN`) through the page cache, so the file is exactly the bytes
//! received — no padding ever reaches it, and no `ftruncate` is needed. The caller
//! fsyncs the file (the commit's fsync, unchanged).
//!
//! Invariant: `pos`, the file offset of the buffer's first byte, is always a multiple of
//! `DIRECT_ALIGN_BYTES`, so every buffer starts a direct write at an aligned offset. A flush
//! (tests, and whoever wants the bytes in the file now) writes the partial buffer and starts
//! the next buffer with a copy of its last partial block, which the next write rewrites —
//! identical bytes — directly.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[cfg(test)]
use crate::direct::DIRECT_WRITE_BYTES_MIN;
use crate::direct::{AlignedBuf, DirectFile, DIRECT_ALIGN_BYTES};
use crate::pipeline::{Executor, Job, WritePipeline};
use crate::ReplicaError;

/// The writer thread's side: the partial file.
struct Target(DirectFile);

impl Executor for Target {
    fn run(&mut self, job: &Job) -> Result<(), ReplicaError> {
        match job {
            Job::Write { offset, buf, .. } => self.0.write_at(buf.as_slice(), *offset),
            Job::Punch { .. } | Job::Barrier(_) => Err(ReplicaError::ReceiveFailed(
                "only writes go to a journal file".into(),
            )),
        }
    }
}

pub(crate) struct JournalAppender {
    pipeline: WritePipeline<Target>,
    buf: AlignedBuf,
    /// File offset of `buf`'s first byte (aligned, see the module doc).
    pos: u64,
}

impl JournalAppender {
    /// Creates `path` (it must not exist) and the writer thread that fills it.
    pub fn create(path: &Path) -> Result<Self, ReplicaError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::store::FILE_MODE)
            .open(path)
            .map_err(ReplicaError::io("create", path))?;
        let started = DirectFile::open(file, path, "write").and_then(|f| {
            let mut pipeline = WritePipeline::spawn("replica-journal", Target(f), path)?;
            let buf = pipeline.buffer()?;
            Ok(JournalAppender {
                pipeline,
                buf,
                pos: 0,
            })
        });
        if started.is_err() {
            // Not a durability matter (open empties incoming/), but don't leave it behind.
            let _ = std::fs::remove_file(path);
        }
        started
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), ReplicaError> {
        while !data.is_empty() {
            let n = self.buf.push(data);
            data = &data[n..];
            if self.buf.is_full() {
                let next = self.pipeline.buffer()?;
                let full = std::mem::replace(&mut self.buf, next);
                let len = full.len() as u64;
                self.pipeline.submit(Job::Write {
                    target: 0,
                    offset: self.pos,
                    buf: full,
                })?;
                self.pos += len;
            }
        }
        Ok(())
    }

    /// Writes every byte received so far into the file and waits for it.
    pub fn flush(&mut self) -> Result<(), ReplicaError> {
        if self.buf.len() > 0 {
            let keep_from = self.buf.len() / DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES;
            let mut next = self.pipeline.buffer()?;
            next.push(&self.buf.as_slice()[keep_from..]);
            let partial = std::mem::replace(&mut self.buf, next);
            self.pipeline.submit(Job::Write {
                target: 0,
                offset: self.pos,
                buf: partial,
            })?;
            self.pos += keep_from as u64;
        }
        self.pipeline.drain()
    }

    /// Writes the rest, waits for every write, and returns the file (to be fsynced).
    pub fn finish(self) -> Result<DirectFile, ReplicaError> {
        let JournalAppender {
            mut pipeline,
            buf,
            pos,
        } = self;
        if buf.len() > 0 {
            pipeline.submit(Job::Write {
                target: 0,
                offset: pos,
                buf,
            })?;
        }
        Ok(pipeline.finish()?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::test_hook::{refuse_direct, Refusal};
    use crate::direct_tests::noise;

    /// Appends `total` bytes in pieces of the given sizes (cycled), flushing after the pieces
    /// listed in `flush_after`, and returns the file's bytes, the expected bytes and the
    /// (direct, buffered) byte counts.
    fn append(
        refusal: Refusal,
        total: usize,
        pieces: &[usize],
        flush_after: &[usize],
    ) -> (Vec<u8>, Vec<u8>, (u64, u64)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.partial");
        let want = noise(total as u64, total as u64);
        refuse_direct(refusal);
        let mut a = JournalAppender::create(&path).unwrap();
        refuse_direct(Refusal::Never);
        let mut at = 0;
        let mut i = 0;
        while at < total {
            let n = pieces[i % pieces.len()].min(total - at);
            a.write_all(&want[at..at + n]).unwrap();
            at += n;
            if flush_after.contains(&i) {
                a.flush().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), want[..at], "after flush {i}");
            }
            i += 1;
        }
        let f = a.finish().unwrap();
        f.file().sync_all().unwrap();
        let stats = f.written_bytes();
        drop(f);
        (std::fs::read(&path).unwrap(), want, stats)
    }

    #[test]
    fn appended_bytes_are_exact_for_odd_lengths_and_pieces() {
        let mib = 1 << 20;
        for total in [
            0,
            1,
            4095,
            4096,
            4097,
            mib - 1,
            mib,
            mib + 1,
            3 * mib + 12345,
        ] {
            for pieces in [&[7919][..], &[mib + 3, 1, 4096], &[256 * 1024]] {
                let (got, want, (direct, buffered)) = append(Refusal::Never, total, pieces, &[]);
                assert_eq!(got.len(), want.len(), "total {total}");
                assert!(got == want, "total {total} pieces {pieces:?}: bytes differ");
                assert_eq!(direct + buffered, total as u64, "each byte written once");
                // Only the end of the last buffer goes through the page cache: its partial
                // block, or all of it when shorter than a worthwhile direct write (when the
                // file system takes O_DIRECT at all; tmpfs before Linux 6.6 does not).
                if total >= 1 << 20 {
                    assert_eq!(direct % DIRECT_ALIGN_BYTES as u64, 0);
                    assert!(direct >= 1 << 20, "total {total}: {direct} bytes direct");
                    assert!(buffered < DIRECT_WRITE_BYTES_MIN as u64, "total {total}");
                }
            }
        }
    }

    #[test]
    fn flush_writes_everything_and_later_bytes_stay_exact() {
        let total = (2 << 20) + 5000;
        let (got, want, _) = append(Refusal::Never, total, &[10_000, 300_000], &[0, 1, 2, 5]);
        assert!(got == want, "bytes differ after flushes");
    }

    #[test]
    fn refused_direct_io_falls_back_to_the_same_bytes() {
        for refusal in [Refusal::AtOpen, Refusal::AtWrite] {
            let total = (3 << 20) + 777;
            let (got, want, (direct, buffered)) = append(refusal, total, &[65_536, 9], &[3]);
            assert!(got == want, "{refusal:?}: bytes differ");
            assert_eq!(direct, 0, "{refusal:?}");
            assert!(buffered >= total as u64, "{refusal:?}");
        }
    }
}
