//! The one module that makes things durable: atomic file replacement (tmp + fsync + rename +
//! fsync dir), durable renames and removals, directory fsync. No other module calls
//! `fs::rename` or removes a file that matters for recovery. The file-system calls are
//! `sysutil`'s; this module adds the replica's policy: temporary names, the retry of a
//! directory fsync that ran out of descriptors, failpoints, errors naming the path.

use std::fs::{self, File};
use std::path::Path;

use sysutil::{parent_dir as parent, FileMode};

use crate::ReplicaError;

/// Suffix of the temporary file `write_atomic` writes first (deleted at open if left over).
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// fsync a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), ReplicaError> {
    // Opening the directory needs a descriptor: out of them (EMFILE, ENFILE, ENOMEM) is
    // transient and, right after a rename, must not turn into "renamed but not known durable"
    // (a wedged VM). Wait a little for descriptors to come back before giving up.
    let mut attempt = 0;
    loop {
        match sysutil::fsync_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if crate::fds::is_transient_io(&e) && attempt < FSYNC_DIR_TRANSIENT_RETRIES => {
                attempt += 1;
                std::thread::sleep(FSYNC_DIR_RETRY_PAUSE);
            }
            Err(e) => return Err(ReplicaError::io("fsync directory", dir)(e)),
        }
    }
}

/// Retries of a directory fsync that failed for want of a descriptor or memory, and the pause
/// between them: 50 × 100 ms = 5 s, long enough for an upload or a reader to give its
/// descriptors back, short enough that a commit does not hang on a host that is truly full.
const FSYNC_DIR_TRANSIENT_RETRIES: u32 = 50;
const FSYNC_DIR_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// fsync a file's data and size.
pub(crate) fn fsync_file(file: &File, path: &Path) -> Result<(), ReplicaError> {
    file.sync_all().map_err(ReplicaError::io("fsync", path))
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new content, never a
/// mix, and after return the new content survives a crash. The file gets mode `mode`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReplicaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = Path::new(&tmp);
    sysutil::write_synced(tmp, bytes, FileMode::Umask(mode))
        .map_err(ReplicaError::io("write", tmp))?;
    crate::failpoint::hit("write_atomic.before_rename")?;
    rename(tmp, path)
}

/// Renames `from` to `to` and fsyncs both parent directories.
pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), ReplicaError> {
    fs::rename(from, to).map_err(ReplicaError::io("rename", from))?;
    fsync_dir(parent(to))?;
    if parent(from) != parent(to) {
        fsync_dir(parent(from))?;
    }
    Ok(())
}

/// Removes a file (missing is fine) and fsyncs its directory.
pub(crate) fn remove_file(path: &Path) -> Result<(), ReplicaError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ReplicaError::io("remove", path)(e)),
    }
    fsync_dir(parent(path))
}

/// Removes a directory tree (missing is fine) and fsyncs its parent.
pub(crate) fn remove_dir_all(path: &Path) -> Result<(), ReplicaError> {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ReplicaError::io("remove directory", path)(e)),
    }
    fsync_dir(parent(path))
}

/// Creates a directory if missing (its parent is fsynced by the caller's later rename or
/// `fsync_dir`).
pub(crate) fn create_dir(path: &Path) -> Result<(), ReplicaError> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .mode(crate::store::DIR_MODE)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ReplicaError::io("create directory", path)(e)),
    }
}
