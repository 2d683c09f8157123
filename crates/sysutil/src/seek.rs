//! `lseek(SEEK_DATA / SEEK_HOLE)`: where a sparse file's data and holes are.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::{retry_eintr, to_off};

/// `lseek(fd, offset, whence)`; `Ok(None)` for `ENXIO`, which both whences answer when no
/// data (or no hole) exists at or after `offset` before the end of the file.
fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = to_off(offset)?;
    retry_eintr(|| {
        // SAFETY: lseek reads only its integer arguments; the fd is owned by `file`, which is
        // borrowed for the call. The file position it moves is never used by this project:
        // every data access is positional (pread/pwrite).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r >= 0 {
            // Non-negative `off_t` always fits in u64.
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    })
}

/// Start of the first data byte at or after `offset`, or `None` when only a hole (or the end
/// of the file) follows. `EINVAL` means the file (a block device, some file systems) cannot
/// answer; callers treat the whole file as data then.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(file, offset, libc::SEEK_DATA)
}

/// Start of the first hole at or after `offset`; the end of the file counts as a hole, so
/// this is `None` only when `offset` is at or past the end.
pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(file, offset, libc::SEEK_HOLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn walks_data_and_holes_of_a_sparse_file() {
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(8 * MIB).expect("size");
        // Data at [1 MiB, 2 MiB) and [5 MiB, 5 MiB + 64 KiB); holes elsewhere. Runs this far
        // apart are separate on every file system that reports holes (ext4, xfs, tmpfs).
        file.write_all_at(&vec![1u8; MIB as usize], MIB)
            .expect("write");
        file.write_all_at(&[2u8; 65536], 5 * MIB).expect("write");

        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < 8 * MIB {
            let data = seek_data(&file, pos).expect("SEEK_DATA").unwrap_or(8 * MIB);
            if data > pos {
                runs.push((pos, data, "hole"));
                pos = data;
                continue;
            }
            let hole = seek_hole(&file, pos)
                .expect("SEEK_HOLE")
                .expect("EOF is a hole");
            runs.push((pos, hole, "data"));
            pos = hole;
        }
        assert_eq!(
            runs,
            vec![
                (0, MIB, "hole"),
                (MIB, 2 * MIB, "data"),
                (2 * MIB, 5 * MIB, "hole"),
                (5 * MIB, 5 * MIB + 65536, "data"),
                (5 * MIB + 65536, 8 * MIB, "hole"),
            ]
        );
    }

    #[test]
    fn enxio_past_the_last_data_and_at_the_end_is_none() {
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(4 * MIB).expect("size");
        file.write_all_at(&[3u8; 4096], 0).expect("write");
        assert_eq!(seek_data(&file, MIB).expect("SEEK_DATA"), None);
        assert_eq!(seek_data(&file, 4 * MIB).expect("at EOF"), None);
        assert_eq!(seek_hole(&file, 4 * MIB).expect("at EOF"), None);
        // Inside a hole, the hole starts where we are; inside data, where the data ends.
        assert_eq!(seek_hole(&file, MIB).expect("in a hole"), Some(MIB));
        assert_eq!(seek_hole(&file, 0).expect("in data"), Some(4096));
    }

    #[test]
    fn offset_beyond_off_t_is_einval_not_a_panic() {
        let file = tempfile::tempfile().expect("temp file");
        let e = seek_data(&file, u64::MAX).expect_err("too large");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
}
