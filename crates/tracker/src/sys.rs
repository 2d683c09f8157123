//! Thin, safe wrappers over the few Linux calls std does not offer: `lseek(SEEK_DATA/
//! SEEK_HOLE)`, `flock`, `posix_fadvise` (hole punching and zeroing come from `nbd::file`).
//!
//! Owns no state and makes no decisions; every function is one syscall (plus EINTR retry).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// True when the error means "this filesystem cannot do that fallocate mode".
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only reads integer arguments. Moving the shared file position is harmless:
    // every data access in the tracker is positional (pread/pwrite).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Start of the first data byte at or after `offset`, or `None` when only a hole follows.
pub(crate) fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// Start of the first hole at or after `offset` (EOF counts as a hole).
pub(crate) fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

/// Takes an exclusive, non-blocking advisory lock; `Ok(false)` when someone else holds it.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock only reads its integer arguments on an fd owned by `file`.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Read-ahead hint; errors are reported but harmless.
pub(crate) fn will_need(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    // SAFETY: posix_fadvise only reads integer arguments on an fd owned by `file`.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}
