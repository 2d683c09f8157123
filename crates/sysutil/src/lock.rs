//! `flock`: one process at a time in a directory (the tracker's state directory, the daemon's
//! data directory).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::retry_eintr;

/// Takes an exclusive, non-blocking advisory lock on `file` (`flock(LOCK_EX | LOCK_NB)`):
/// `Ok(true)` when taken, `Ok(false)` when another open file description holds it (another
/// process, or another `open` of the same file in this one). The lock lasts until every
/// descriptor of this open file description is closed.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    retry_eintr(|| {
        // SAFETY: flock reads only its integer arguments; the fd is owned by `file`, which is
        // borrowed for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(false),
            _ => Err(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_cannot_lock_until_the_first_is_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let first = File::create(&path).expect("create");
        let second = File::open(&path).expect("open again");
        assert!(try_lock_exclusive(&first).expect("lock"));
        assert!(!try_lock_exclusive(&second).expect("held elsewhere"));
        // Taking it again through the holder is fine (flock converts in place).
        assert!(try_lock_exclusive(&first).expect("relock"));
        drop(first);
        assert!(try_lock_exclusive(&second).expect("free after close"));
    }
}
