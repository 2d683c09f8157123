//! Thin, safe wrappers over the few Linux calls std does not offer: `lseek(SEEK_DATA/
//! SEEK_HOLE)`, `flock`, `posix_fadvise`, `preadv` (hole punching and zeroing come from
//! `nbd::file`).
//!
//! Owns no state and makes no decisions; every function is one syscall (plus EINTR retry, and
//! for `preadv` the continuation of a short read).

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

/// Reads exactly enough bytes at `offset` to fill `bufs` in order: one `preadv` for up to
/// `IOV_BATCH` buffers (copy-before-write of a run into scattered pool slots), continuing after
/// short reads and EINTR. End of file before the buffers are full is `UnexpectedEof`.
pub(crate) fn read_exact_vectored_at(
    file: &File,
    bufs: &mut [&mut [u8]],
    mut offset: u64,
) -> io::Result<()> {
    const IOV_BATCH: usize = 16;
    // (first buffer not yet full, bytes of it already filled)
    let (mut i, mut filled) = (0usize, 0usize);
    loop {
        while i < bufs.len() && filled == bufs[i].len() {
            (i, filled) = (i + 1, 0);
        }
        if i == bufs.len() {
            return Ok(());
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; IOV_BATCH];
        let count = (bufs.len() - i).min(IOV_BATCH);
        for (j, buf) in bufs[i..i + count].iter_mut().enumerate() {
            let part = if j == 0 {
                &mut buf[filled..]
            } else {
                &mut buf[..]
            };
            iov[j] = libc::iovec {
                iov_base: part.as_mut_ptr().cast(),
                iov_len: part.len(),
            };
        }
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: each iovec points into a distinct buffer borrowed mutably for this call, with
        // its exact remaining length; `count` <= IOV_BATCH entries are initialised.
        let r = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), count as libc::c_int, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut got = r as usize;
        offset += got as u64;
        while got > 0 {
            let room = bufs[i].len() - filled;
            if got < room {
                filled += got;
                got = 0;
            } else {
                got -= room;
                (i, filled) = (i + 1, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn vectored_read_fills_every_buffer_in_order_and_reports_eof() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("open");
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&content, 0).expect("write");
        // More buffers than one preadv takes, of uneven sizes, one of them empty.
        let sizes: Vec<usize> = (0..40)
            .map(|i| if i == 7 { 0 } else { 100 + i * 37 })
            .collect();
        let mut storage: Vec<Vec<u8>> = sizes.iter().map(|n| vec![0u8; *n]).collect();
        let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|v| &mut v[..]).collect();
        read_exact_vectored_at(&file, &mut bufs, 123).expect("read");
        let total: usize = sizes.iter().sum();
        assert_eq!(storage.concat(), content[123..123 + total]);
        let mut tail = [0u8; 10];
        let mut past: Vec<&mut [u8]> = vec![&mut tail[..]];
        let e = read_exact_vectored_at(&file, &mut past, 99_995).expect_err("past the end");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
