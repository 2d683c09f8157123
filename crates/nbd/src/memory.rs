//! [`MemoryBackend`]: a disk held in memory, for tests of this crate and of the crates built
//! on it. It must never be used for real data: nothing it holds survives the process.

use std::io;

use parking_lot::RwLock;

use crate::backend::{BlockBackend, Extent};

/// An in-memory disk. Every byte reads as written; trims and zeroes write zeros and block
/// status reports all data, which is what a model of "a disk" needs.
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemoryBackend {
    /// A zero-filled writable disk of `size_bytes` (bounded by the caller's memory).
    pub fn new(size_bytes: usize) -> MemoryBackend {
        MemoryBackend {
            data: RwLock::new(vec![0; size_bytes]),
            read_only: false,
        }
    }

    /// A read-only disk with the given content.
    pub fn read_only(content: Vec<u8>) -> MemoryBackend {
        MemoryBackend {
            data: RwLock::new(content),
            read_only: true,
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.data.read().len();
        let start = usize::try_from(offset).map_err(|_| invalid())?;
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| invalid())?)
            .ok_or_else(invalid)?;
        if end > size {
            return Err(invalid());
        }
        Ok(start..end)
    }
}

fn invalid() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl BlockBackend for MemoryBackend {
    fn size_bytes(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.read()[r]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        self.data.write()[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len_bytes: u64, _fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len_bytes, true, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        _may_trim: bool,
        _fua: bool,
    ) -> io::Result<()> {
        let r = self.range(offset, len_bytes)?;
        self.data.write()[r].fill(0);
        Ok(())
    }

    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        self.range(offset, len_bytes)?;
        Ok(vec![Extent {
            len_bytes,
            hole: false,
            zero: false,
        }])
    }
}
