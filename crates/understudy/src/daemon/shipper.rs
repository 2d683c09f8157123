//! Turns a crash-consistent cut into a delta stream: read the frozen blocks, detect zeros,
//! and encode DATA/ZERO frames (the delta crate compresses and hashes). Runs on a blocking
//! thread; memory is bounded by one read chunk plus the transport's body buffer.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use delta::{DeltaHeader, DeltaWriter};
use tracker::{FrozenDisk, BLOCK_BYTES};

/// Bytes read from a frozen disk at a time: large enough for sequential throughput, small
/// enough to keep a shipper's memory flat.
pub const READ_CHUNK_BYTES: usize = 1 << 20;

/// Nice value of shipper threads: below the NBD workers (0), so a busy guest keeps its CPU
/// and a cycle only takes longer (the RPO grows, the guest does not slow down).
pub const SHIPPER_NICE: i32 = 5;

/// Lowers the calling thread's CPU priority to [`SHIPPER_NICE`] (Linux: per thread).
pub fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes
    // that thread's scheduling priority.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, SHIPPER_NICE)
    };
    if rc != 0 {
        tracing::debug!(
            "could not lower the shipper's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ShipSummary {
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Encodes every dirty range of `disks` (paired with their disk index) into `out`.
/// `progress` counts bytes read so far, for the progress bar.
pub fn encode_cut<W: Write>(
    out: W,
    header: &DeltaHeader,
    key: &[u8; 32],
    disks: &[(u32, &FrozenDisk)],
    progress: &AtomicU64,
) -> anyhow::Result<(W, ShipSummary)> {
    let mut writer = DeltaWriter::new(out, header, key)?;
    let mut summary = ShipSummary::default();
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    for &(index, disk) in disks {
        for (offset, len) in disk.ranges() {
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let n = ((end - pos) as usize).min(READ_CHUNK_BYTES);
                let chunk = &mut buf[..n];
                disk.read_at(chunk, pos)?;
                emit_chunk(&mut writer, index, pos, chunk, &mut summary)?;
                progress.fetch_add(n as u64, Ordering::Relaxed);
                pos += n as u64;
            }
        }
    }
    let (out, _) = writer.finish()?;
    Ok((out, summary))
}

/// Splits a chunk into runs of all-zero and non-zero 4 KiB blocks and emits one frame per run.
fn emit_chunk<W: Write>(
    writer: &mut DeltaWriter<W>,
    disk: u32,
    offset: u64,
    chunk: &[u8],
    summary: &mut ShipSummary,
) -> anyhow::Result<()> {
    let bs = BLOCK_BYTES as usize;
    let mut run_start = 0usize;
    let mut run_zero = None::<bool>;
    for (i, block) in chunk.chunks(bs).enumerate() {
        let z = is_zero(block);
        match run_zero {
            Some(rz) if rz == z => {}
            Some(rz) => {
                flush_run(writer, disk, offset, chunk, run_start, i * bs, rz, summary)?;
                run_start = i * bs;
                run_zero = Some(z);
            }
            None => run_zero = Some(z),
        }
    }
    if let Some(rz) = run_zero {
        flush_run(
            writer,
            disk,
            offset,
            chunk,
            run_start,
            chunk.len(),
            rz,
            summary,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn flush_run<W: Write>(
    writer: &mut DeltaWriter<W>,
    disk: u32,
    offset: u64,
    chunk: &[u8],
    start: usize,
    end: usize,
    zero: bool,
    summary: &mut ShipSummary,
) -> anyhow::Result<()> {
    let len = (end - start) as u64;
    if zero {
        writer.zero(disk, offset + start as u64, len)?;
        summary.zero_bytes += len;
    } else {
        writer.data(disk, offset + start as u64, &chunk[start..end])?;
        summary.data_bytes += len;
    }
    Ok(())
}

/// True when every byte is zero; compares 16 bytes at a time so it vectorises.
pub fn is_zero(block: &[u8]) -> bool {
    let mut chunks = block.chunks_exact(16);
    let wide = chunks.by_ref().all(|c| {
        u128::from_ne_bytes(
            c.try_into()
                .expect("chunks_exact(16) yields 16-byte slices"),
        ) == 0
    });
    wide && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        assert!(!is_zero(&[0, 0, 3]));
        assert!(is_zero(&[]));
    }
}
