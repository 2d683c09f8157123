//! The contract between the NBD server and whatever stores the bytes.
//!
//! The server validates every request before calling a backend: `offset + len <= size_bytes()`,
//! lengths within the negotiated maxima, and no write calls on a read-only backend. Backends
//! may therefore assume well-formed ranges, but must still never panic.

use std::io;
use std::sync::Arc;

/// One run of a block-status answer (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u64,
    /// NBD_STATE_HOLE: the range is unallocated.
    pub hole: bool,
    /// NBD_STATE_ZERO: the range reads as zeros.
    pub zero: bool,
}

/// A disk as the NBD server sees it. Methods are called concurrently from worker threads
/// (several connections per export: multi-conn), so implementations are `Sync` and must make
/// a completed `flush` cover every write completed before it on any connection.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the export in bytes (fixed for the life of the backend).
    fn size_bytes(&self) -> u64;

    /// True when writes, trims and write-zeroes must be refused (NBD_FLAG_READ_ONLY).
    fn read_only(&self) -> bool {
        false
    }

    /// Fill `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write `data` at `offset`; when `fua` the data must be durable on return.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Discard a range (it may read back as anything afterwards, but a backend that punches
    /// holes reads back zeros).
    fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()>;

    /// Make a range read as zeros; `may_trim` allows deallocating it.
    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_trim: bool,
        fua: bool,
    ) -> io::Result<()>;

    /// Zero a range only if that is faster than writing zeros (NBD_CMD_FLAG_FAST_ZERO);
    /// otherwise fail at once with `EOPNOTSUPP` and change nothing, so the client can fall
    /// back to plain writes. The default always declines, which the spec allows.
    fn write_zeroes_fast(
        &self,
        offset: u64,
        len_bytes: u64,
        may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        let _ = (offset, len_bytes, may_trim, fua);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Allocation status of `[offset, offset + len_bytes)`. Returns at least one extent; the
    /// extents are contiguous from `offset` and may stop short of the end of the range.
    /// The default reports everything as allocated data.
    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            len_bytes,
            hole: false,
            zero: false,
        }])
    }

    /// Metadata contexts this export answers besides `base:allocation` whose names start with
    /// `prefix` (`""`: all), for NBD_OPT_LIST_META_CONTEXT. The default: none.
    fn meta_contexts(&self, prefix: &str) -> Vec<String> {
        let _ = prefix;
        Vec::new()
    }

    /// Whether context `name` (not `base:allocation`) can be selected now
    /// (NBD_OPT_SET_META_CONTEXT). The default: no.
    fn has_meta_context(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// Status of `[offset, offset + len_bytes)` in context `name`, as `(len_bytes, flags)`
    /// runs with the same contract as [`BlockBackend::block_status`] (at least one, contiguous
    /// from `offset`, may stop short). The flags' meaning is the context's.
    fn meta_status(&self, name: &str, offset: u64, len_bytes: u64) -> io::Result<Vec<(u64, u32)>> {
        let _ = (name, offset, len_bytes);
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// Prefetch hint (NBD_CMD_CACHE). The default does nothing.
    fn cache(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let _ = (offset, len_bytes);
        Ok(())
    }
}

/// Resolves export names to backends. Looked up at every NBD_OPT_GO / EXPORT_NAME, so exports
/// can be added and removed while the server runs.
pub trait ExportRegistry: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>>;
    /// (name, description) pairs for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}
