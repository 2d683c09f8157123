//! Thin, safe wrappers over the Linux calls only the tracker needs: `fstatvfs`, `preadv`, and
//! [`RandomMap`] (a read-only mapping read with `process_vm_readv`). The ones shared with
//! other crates (`SEEK_DATA`/`SEEK_HOLE`, `flock`, `posix_fadvise`, hole punching and
//! zeroing) are `sysutil`'s.
//!
//! Owns no state and makes no decisions; every function is one syscall (plus EINTR retry, and
//! for `preadv` the continuation of a short read).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// True when the error means "this filesystem cannot do that fallocate mode" (some answer
/// `EINVAL` for a mode they lack).
pub(crate) fn unsupported(e: &io::Error) -> bool {
    sysutil::is_unsupported(e) || e.raw_os_error() == Some(libc::EINVAL)
}

/// Bytes available to unprivileged users on the filesystem holding `file` (`fstatvfs`:
/// `f_bavail * f_frsize`).
pub(crate) fn free_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs writes only into `st`, which lives for the call; the fd is owned by
    // `file`.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
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

/// Largest file [`RandomMap`] maps (16 TiB): beyond it the address space of a process with
/// several such disks gets tight, and callers read with `pread` instead.
const RANDOM_MAP_BYTES_MAX: u64 = 16 << 40;

/// A read-only shared mapping of a file with read-ahead off (`MADV_RANDOM`), for reading
/// scattered blocks without the page cache's read-ahead: a fault on a mapping marked random
/// reads only its page, where `pread` may start an asynchronous read-ahead of up to
/// `read_ahead_kb` around a cached block (and zero-fill page-cache pages for every hole in
/// it). Reads go through `process_vm_readv` on our own process, so a page that cannot be
/// faulted in (I/O error, file shorter than the mapping) is an `EFAULT` error, never SIGBUS.
pub(crate) struct RandomMap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and only ever read through a system call; the pointer is
// never dereferenced in user space, so sharing it between threads is sound.
unsafe impl Send for RandomMap {}
// SAFETY: as above.
unsafe impl Sync for RandomMap {}

impl RandomMap {
    /// Maps the first `len` bytes of `file`. `None` when `len` is 0 or too large to map.
    pub(crate) fn new(file: &File, len: u64) -> io::Result<Option<RandomMap>> {
        if len == 0 || len > RANDOM_MAP_BYTES_MAX {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a new read-only shared mapping chosen by the kernel; it aliases no Rust
        // object, and is only read through process_vm_readv.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = RandomMap { addr, len };
        // SAFETY: advice on the mapping made above, of exactly its length.
        if unsafe { libc::madvise(addr, len, libc::MADV_RANDOM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(map))
    }

    /// Fills `buf` from offset `offset` of the mapping. Any failure (including a partial read)
    /// is an error; the caller may retry the range with `pread` to learn the real cause.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_vectored_at(&mut [buf], offset)
    }

    /// Fills `parts` in order from offset `offset` of the mapping with one system call (at
    /// most [`RANDOM_MAP_PARTS_MAX`] parts). Anything short of all of it is an error: a short
    /// transfer from our own mapping only happens when a page cannot be faulted in (EFAULT
    /// on the rest), and the caller then retries with `pread` to learn why.
    pub(crate) fn read_exact_vectored_at(
        &self,
        parts: &mut [&mut [u8]],
        offset: u64,
    ) -> io::Result<()> {
        if parts.len() > RANDOM_MAP_PARTS_MAX {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match start.checked_add(total) {
            Some(end) if end <= self.len => {}
            _ => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
        let mut local = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; RANDOM_MAP_PARTS_MAX];
        for (iov, part) in local.iter_mut().zip(parts.iter_mut()) {
            *iov = libc::iovec {
                iov_base: part.as_mut_ptr().cast(),
                iov_len: part.len(),
            };
        }
        let remote = libc::iovec {
            // In bounds: checked above. Only the kernel reads through it.
            iov_base: self.addr.cast::<u8>().wrapping_add(start).cast(),
            iov_len: total,
        };
        loop {
            // SAFETY: each local iovec is one of `parts`, borrowed mutably for the call;
            // `remote` lies inside our own read-only mapping, which the kernel reads with
            // fault handling (errors come back as EFAULT, never SIGBUS).
            let r = unsafe {
                libc::process_vm_readv(
                    libc::getpid(),
                    local.as_ptr(),
                    parts.len() as libc::c_ulong,
                    &remote,
                    1,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return match r as usize == total {
                true => Ok(()),
                false => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            };
        }
    }
}

/// Most parts one [`RandomMap::read_exact_vectored_at`] fills (a copy-before-write run).
pub(crate) const RANDOM_MAP_PARTS_MAX: usize = 16;

impl Drop for RandomMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; nothing refers to it any more.
        unsafe {
            libc::munmap(self.addr, self.len);
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

    #[test]
    fn random_map_reads_exact_bytes_and_fails_cleanly_past_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        // Sparse: data at 0 and at 1 MiB + 4 KiB, holes elsewhere.
        file.set_len(4 << 20).expect("size");
        let a: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        file.write_all_at(&a, 0).expect("write");
        file.write_all_at(&a[..4096], (1 << 20) + 4096)
            .expect("write");
        let map = RandomMap::new(&file, 4 << 20)
            .expect("map")
            .expect("mapped");
        let mut buf = vec![0xEEu8; 8192];
        map.read_exact_at(&mut buf, 0).expect("read");
        assert_eq!(buf, a);
        let mut buf = vec![0xEEu8; 12288];
        map.read_exact_at(&mut buf, 1 << 20)
            .expect("read across a hole");
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert_eq!(&buf[4096..8192], &a[..4096]);
        assert!(buf[8192..].iter().all(|&b| b == 0));
        // Past the mapping: an error, not a fault.
        let e = map
            .read_exact_at(&mut buf, (4 << 20) - 4096)
            .expect_err("past the end");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // The file shrank under the mapping (an outside edit): EFAULT, never SIGBUS.
        file.set_len(1 << 20).expect("shrink");
        let mut buf = vec![0u8; 4096];
        assert!(map.read_exact_at(&mut buf, 2 << 20).is_err());
        // Nothing to map.
        assert!(RandomMap::new(&file, 0).expect("empty").is_none());
    }

    #[test]
    fn random_map_vectored_reads_fill_parts_in_order_or_fail_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .expect("open");
        file.set_len(1 << 20).expect("size");
        let a: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&a, 8192).expect("write");
        let map = RandomMap::new(&file, 1 << 20)
            .expect("map")
            .expect("mapped");
        // Three parts across data and the hole after it.
        let (mut p0, mut p1, mut p2) = (vec![0xEEu8; 4096], vec![0xEEu8; 8192], vec![0xEEu8; 4096]);
        map.read_exact_vectored_at(&mut [&mut p0[..], &mut p1[..], &mut p2[..]], 8192)
            .expect("read");
        assert_eq!(p0, a[..4096]);
        assert_eq!(p1, a[4096..]);
        assert!(p2.iter().all(|&b| b == 0));
        // Past the end, or more parts than allowed: errors, and the caller falls back.
        let e = map
            .read_exact_vectored_at(&mut [&mut p0[..], &mut p1[..]], (1 << 20) - 8192)
            .expect_err("past the end");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut many: Vec<Vec<u8>> = vec![vec![0u8; 8]; RANDOM_MAP_PARTS_MAX + 1];
        let mut parts: Vec<&mut [u8]> = many.iter_mut().map(|v| &mut v[..]).collect();
        assert!(map.read_exact_vectored_at(&mut parts, 0).is_err());
        // Shrunk under the mapping: an error, never SIGBUS.
        file.set_len(4096).expect("shrink");
        assert!(map
            .read_exact_vectored_at(&mut [&mut p0[..], &mut p2[..]], 8192)
            .is_err());
    }
}

/// The longest a clean stop waits for the clock to pass the image's last change time: a
/// filesystem with 1 s timestamps needs up to 1 s; a change time further ahead than this is
/// a clock that was stepped back, which no wait fixes.
const CHANGE_TIME_WAIT_MAX_NS: i64 = 2_000_000_000;

/// The kernel's coarse wall clock, the one it stamps inode times with.
fn coarse_now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME_COARSE always exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } != 0 {
        return i64::MAX;
    }
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

/// Waits until any change made from now on gets a change time later than `ctime_ns`: the
/// kernel's coarse clock has passed it (by one second when the time has no nanoseconds, a
/// filesystem with 1 s timestamps). Without it, an edit made just after a clean stop, in the
/// same tick as the disk's last write, leaves size, inode, mtime and ctime all equal to the
/// clean marker's (kernels before 6.13 stamp with the coarse clock, one tick is 1-10 ms).
/// Returns whether it waited (then the caller takes the fingerprint again).
pub(crate) fn wait_past_change_time(ctime_ns: i64) -> bool {
    let granularity = if ctime_ns % 1_000_000_000 == 0 {
        1_000_000_000
    } else {
        1
    };
    let deadline = ctime_ns.saturating_add(granularity);
    let mut waited = false;
    loop {
        let now = coarse_now_ns();
        if now >= deadline || deadline - now > CHANGE_TIME_WAIT_MAX_NS {
            return waited;
        }
        waited = true;
        let nap = (deadline - now).clamp(1_000_000, 10_000_000);
        std::thread::sleep(std::time::Duration::from_nanos(nap as u64));
    }
}

#[cfg(test)]
mod change_time_tests {
    use super::*;

    #[test]
    fn waits_until_the_coarse_clock_passes_the_change_time() {
        let now = coarse_now_ns();
        wait_past_change_time(now);
        assert!(
            coarse_now_ns() > now,
            "a change in this tick must be waited past"
        );
        // A 1 s filesystem: the next second.
        let second = now - now % 1_000_000_000;
        wait_past_change_time(second);
        assert!(coarse_now_ns() >= second + 1_000_000_000);
        // Long past: no wait. Far ahead (clock stepped back): no endless wait.
        assert!(!wait_past_change_time(now - 60_000_000_000));
        assert!(!wait_past_change_time(now + 3_600_000_000_000));
    }
}
