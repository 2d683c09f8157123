//! [`FileBackend`]: a raw (usually sparse) image file or block device served with
//! `pread`/`pwrite`, `fdatasync`, `fallocate` and `SEEK_DATA`/`SEEK_HOLE`. The free functions
//! are public so crates that wrap a file (the tracker) reuse them. This module owns the
//! system calls on one file; it must never validate protocol ranges (the codec did).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::{BlockBackend, Extent};
use crate::limits::BLOCK_STATUS_EXTENTS_MAX;

/// Size of the zero buffer used when the filesystem cannot zero a range itself (1 MiB: a
/// few hundred system calls per GiB, small enough to live on the heap once per call).
const ZERO_CHUNK_BYTES: usize = 1024 * 1024;

/// A raw image file as an NBD export.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size_bytes: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens `path` (read-write unless `read_only`); its current size is the export size.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileBackend> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        FileBackend::from_file(file, read_only)
    }

    /// Serves an already opened file. Seeking to the end gives the size of block devices too.
    pub fn from_file(file: File, read_only: bool) -> io::Result<FileBackend> {
        let size_bytes = (&file).seek(SeekFrom::End(0))?;
        Ok(FileBackend {
            file,
            size_bytes,
            read_only,
        })
    }

    /// The underlying file, for wrappers that need other system calls on it.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // fdatasync covers every write completed on this file, from any connection: that is
        // what makes CAN_MULTI_CONN true.
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        match punch_hole(&self.file, offset, len_bytes) {
            // Trim is advisory: a filesystem that cannot punch holes simply keeps the data.
            Err(e) if is_unsupported(&e) => return Ok(()),
            other => other?,
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        let punched = may_trim
            && match punch_hole(&self.file, offset, len_bytes) {
                Ok(()) => true,
                Err(e) if is_unsupported(&e) => false,
                Err(e) => return Err(e),
            };
        if !punched {
            zero_range(&self.file, offset, len_bytes)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes_fast(
        &self,
        offset: u64,
        len_bytes: u64,
        may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        // Only the filesystem's own zeroing is fast; never fall back to writing zeros here.
        if may_trim {
            match punch_hole(&self.file, offset, len_bytes) {
                Err(e) if is_unsupported(&e) => {}
                other => return other.and_then(|()| sync_if(&self.file, fua)),
            }
        }
        match fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len_bytes,
        ) {
            // Some filesystems answer EINVAL for modes they lack: still "not fast", not misuse.
            Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
            other => other.and_then(|()| sync_if(&self.file, fua)),
        }
    }

    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        seek_data_extents(&self.file, offset, len_bytes, BLOCK_STATUS_EXTENTS_MAX)
    }

    fn cache(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let (off, len) = (to_off(offset)?, to_off(len_bytes)?);
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is owned by self.file
        // and stays open for the duration of the call.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED)
        };
        // A hint that fails changes nothing the client can observe; report success.
        let _ = rc;
        Ok(())
    }
}

fn sync_if(file: &File, fua: bool) -> io::Result<()> {
    if fua {
        file.sync_data()
    } else {
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len_bytes: u64) -> io::Result<()> {
    if len_bytes == 0 {
        return Ok(()); // fallocate rejects a zero length with EINVAL
    }
    let (off, len) = (to_off(offset)?, to_off(len_bytes)?);
    loop {
        // SAFETY: fallocate takes only integers; the fd is valid while `file` is borrowed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Deallocates `[offset, offset + len_bytes)` without changing the file size; the range reads
/// back as zeros. Fails with `EOPNOTSUPP` where the filesystem cannot punch holes.
pub fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len_bytes,
    )
}

/// Makes a range read as zeros while keeping it allocated: `FALLOC_FL_ZERO_RANGE`, or
/// writing zeros where the filesystem does not support it.
pub fn zero_range(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len_bytes,
    ) {
        Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
            write_zeros(file, offset, len_bytes)
        }
        other => other,
    }
}

/// Writes explicit zeros over a range, in 1 MiB system calls.
pub fn write_zeros(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let chunk = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len_bytes).unwrap_or(usize::MAX))];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(chunk.len() as u64);
        // `n <= chunk.len()`, so the cast and the slice are in bounds.
        file.write_all_at(&chunk[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = to_off(offset)?;
    // SAFETY: lseek takes only integers; the fd is valid while `file` is borrowed. The file
    // position it moves is never used: all I/O here is positional (pread/pwrite).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None) // no data (or hole) at or after `offset` before the end of the file
    } else {
        Err(err)
    }
}

/// Allocation of `[offset, offset + len_bytes)` from `SEEK_DATA`/`SEEK_HOLE`: contiguous
/// extents from `offset`, holes marked hole+zero, at most `extents_max` of them (the answer
/// may stop short of the end). Files without hole support report one data extent.
pub fn seek_data_extents(
    file: &File,
    offset: u64,
    len_bytes: u64,
    extents_max: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset.saturating_add(len_bytes);
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && extents.len() < extents_max.max(1) {
        let data = match lseek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // Block devices and some filesystems do not implement SEEK_DATA: all data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && extents.is_empty() => {
                return Ok(vec![Extent {
                    len_bytes,
                    hole: false,
                    zero: false,
                }]);
            }
            Err(e) => return Err(e),
        };
        let (run_end, hole) = match data {
            None => (end, true),
            Some(d) if d > pos => (d.min(end), true),
            Some(_) => {
                let h = lseek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end);
                (h.clamp(pos + 1, end), false)
            }
        };
        push_extent(&mut extents, run_end - pos, hole);
        pos = run_end;
    }
    Ok(extents)
}

/// Appends a run, merging it with the previous one when the status is the same.
fn push_extent(extents: &mut Vec<Extent>, len_bytes: u64, hole: bool) {
    if let Some(last) = extents.last_mut() {
        if last.hole == hole {
            last.len_bytes += len_bytes;
            return;
        }
    }
    extents.push(Extent {
        len_bytes,
        hole,
        zero: hole,
    });
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
