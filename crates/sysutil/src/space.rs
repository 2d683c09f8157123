//! Space management on a file: `fallocate` (punch a hole, zero a range) with the write-zeros
//! fallback, and the `posix_fadvise` read-ahead hint.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::{retry_eintr, to_off};

/// Largest zero buffer [`write_zeros`] allocates (1 MiB: a few hundred system calls per GiB,
/// small enough to allocate once per call).
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Whether an error means "this file system (or kernel) cannot do that `fallocate` mode":
/// `EOPNOTSUPP` or `ENOSYS`. Some file systems answer `EINVAL` for a mode they lack; callers
/// that want to treat that as unsupported too check it themselves (it also means misuse).
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// `fallocate(fd, mode, offset, len)`, retried on `EINTR`. A zero length is a no-op (the
/// kernel would answer `EINVAL`).
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len_bytes: u64) -> io::Result<()> {
    if len_bytes == 0 {
        return Ok(());
    }
    let (off, len) = (to_off(offset)?, to_off(len_bytes)?);
    retry_eintr(|| {
        // SAFETY: fallocate reads only its integer arguments; the fd is owned by `file`, which
        // is borrowed for the call.
        match unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    })
}

/// Deallocates `[offset, offset + len_bytes)` without changing the file size; the range then
/// reads back as zeros. Fails with `EOPNOTSUPP` (see [`is_unsupported`]) where the file
/// system cannot punch holes: whether to write zeros instead is the caller's choice.
pub fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len_bytes,
    )
}

/// Makes a range read as zeros while keeping it allocated, by the file system alone
/// (`FALLOC_FL_ZERO_RANGE`, size kept). Fails where the file system cannot (`EOPNOTSUPP`,
/// `ENOSYS`, or `EINVAL` on some); never writes zeros itself. See [`zero_range`] for the
/// version that always succeeds on a writable file.
pub fn zero_range_in_place(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len_bytes,
    )
}

/// Makes a range read as zeros while keeping it allocated: [`zero_range_in_place`], or
/// [`write_zeros`] where the file system cannot (unsupported or `EINVAL`).
pub fn zero_range(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    match zero_range_in_place(file, offset, len_bytes) {
        Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
            write_zeros(file, offset, len_bytes)
        }
        other => other,
    }
}

/// Writes explicit zeros over `[offset, offset + len_bytes)`, in writes of at most 1 MiB
/// (`write_all_at` retries `EINTR` and short writes).
pub fn write_zeros(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let chunk = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len_bytes).unwrap_or(usize::MAX))];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(chunk.len() as u64);
        let at = offset
            .checked_add(done)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // `n <= chunk.len()`, so the cast and the slice are in bounds.
        file.write_all_at(&chunk[..n as usize], at)?;
        done += n;
    }
    Ok(())
}

/// Read-ahead hint (`posix_fadvise(POSIX_FADV_WILLNEED)`) for `[offset, offset + len)`.
/// Errors are reported; they change nothing but speed, so callers may ignore them.
pub fn will_need(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len_bytes)?);
    // SAFETY: posix_fadvise reads only its integer arguments; the fd is owned by `file`, which
    // is borrowed for the call. It returns the error number instead of setting errno, and
    // never fails with EINTR.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) } {
        0 => Ok(()),
        r => Err(io::Error::from_raw_os_error(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn filled(len: u64, byte: u8) -> File {
        let file = tempfile::tempfile().expect("temp file");
        file.write_all_at(&vec![byte; len as usize], 0)
            .expect("fill");
        file.sync_all().expect("sync");
        file
    }

    fn read(file: &File, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0xEEu8; len as usize];
        file.read_exact_at(&mut buf, offset).expect("read");
        buf
    }

    /// Bytes allocated to the file (st_blocks is in 512-byte units).
    fn allocated(file: &File) -> u64 {
        file.metadata().expect("stat").blocks() * 512
    }

    #[test]
    fn punched_hole_reads_zeros_and_frees_its_blocks() {
        let file = filled(4 * MIB, 7);
        let before = allocated(&file);
        assert!(
            before >= 4 * MIB,
            "fully written file is allocated: {before}"
        );
        punch_hole(&file, MIB, 2 * MIB).expect("punch (ext4, xfs and tmpfs all can)");
        assert!(read(&file, MIB, 2 * MIB).iter().all(|&b| b == 0));
        assert!(read(&file, 0, MIB).iter().all(|&b| b == 7));
        assert!(read(&file, 3 * MIB, MIB).iter().all(|&b| b == 7));
        assert_eq!(file.metadata().expect("stat").len(), 4 * MIB, "size kept");
        let after = allocated(&file);
        assert!(
            after <= before - 2 * MIB,
            "allocation shrank by the hole: {before} -> {after}"
        );
        // The punched range is a hole to SEEK_DATA too.
        assert_eq!(crate::seek_data(&file, MIB).expect("seek"), Some(3 * MIB));
    }

    #[test]
    fn zero_length_and_out_of_range_requests_do_not_panic() {
        let file = filled(MIB, 1);
        punch_hole(&file, 0, 0).expect("empty punch is a no-op");
        zero_range(&file, 0, 0).expect("empty zero is a no-op");
        let e = punch_hole(&file, u64::MAX, 4096).expect_err("offset beyond off_t");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(read(&file, 0, MIB).iter().all(|&b| b == 1));
    }

    #[test]
    fn zero_range_keeps_size_and_reads_zeros() {
        let file = filled(3 * MIB, 9);
        zero_range(&file, 1000, MIB + 5).expect("zero");
        let all = read(&file, 0, 3 * MIB);
        assert!(all[..1000].iter().all(|&b| b == 9));
        assert!(all[1000..1000 + MIB as usize + 5].iter().all(|&b| b == 0));
        assert!(all[1000 + MIB as usize + 5..].iter().all(|&b| b == 9));
        assert_eq!(file.metadata().expect("stat").len(), 3 * MIB);
    }

    #[test]
    fn write_zeros_covers_more_than_one_chunk_exactly() {
        let file = filled(3 * MIB, 5);
        write_zeros(&file, 1000, 2 * MIB + 5).expect("zeros");
        let all = read(&file, 0, 3 * MIB);
        assert!(all[..1000].iter().all(|&b| b == 5));
        assert!(all[1000..1000 + 2 * MIB as usize + 5]
            .iter()
            .all(|&b| b == 0));
        assert!(all[1000 + 2 * MIB as usize + 5..].iter().all(|&b| b == 5));
    }

    #[test]
    fn will_need_accepts_a_range_and_rejects_an_impossible_one() {
        let file = filled(MIB, 1);
        will_need(&file, 0, MIB).expect("hint");
        assert!(will_need(&file, u64::MAX, 1).is_err());
    }
}
