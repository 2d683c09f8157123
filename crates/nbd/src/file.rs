//! [`FileBackend`]: a raw (usually sparse) image file or block device served with
//! `pread`/`pwrite`, `fdatasync`, `fallocate` and `SEEK_DATA`/`SEEK_HOLE` (the system calls
//! themselves are `sysutil`'s). [`seek_data_extents`] is public so crates that wrap a file
//! reuse it. This module must never validate protocol ranges (the codec did).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::{BlockBackend, Extent};
use crate::limits::BLOCK_STATUS_EXTENTS_MAX;
use sysutil::{is_unsupported, punch_hole, zero_range};

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
        match sysutil::zero_range_in_place(&self.file, offset, len_bytes) {
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
        // A hint that fails changes nothing the client can observe; report success.
        let _ = sysutil::will_need(&self.file, offset, len_bytes);
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
        let data = match sysutil::seek_data(file, pos) {
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
                let h = sysutil::seek_hole(file, pos)?.unwrap_or(end);
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
