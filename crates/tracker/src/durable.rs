//! The one place that makes state files durable: write a temporary file, fsync it, rename it
//! over the target, fsync the directory; and durable removal (unlink, fsync the directory).
//!
//! Nothing else in the tracker may rename or remove state files. This module never decides
//! what is written; it only guarantees that after `write_atomic` returns, a crash leaves the
//! new content, and before it returns, the old content or the new one, never a mix.

use std::fs;
use std::io;
use std::path::Path;

use sysutil::FileMode;

use crate::error::{IoContext, TrackerError};

/// Fsyncs a directory so that renames, creations and unlinks in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), TrackerError> {
    sysutil::fsync_dir(dir).ctx("fsync directory", dir)
}

/// Atomically replaces `dir/name` with `bytes` (through `dir/name.tmp`, removed if the
/// replace fails before the rename).
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), TrackerError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let target = dir.join(name);
    // 0o666 narrowed by the umask: what `File::create` gives.
    sysutil::replace_file(&target, &tmp, bytes, FileMode::Umask(0o666))
        .ctx("replace atomically", &target)
}

/// Removes `dir/name` durably. A missing file is not an error.
pub(crate) fn remove(dir: &Path, name: &str) -> Result<(), TrackerError> {
    let target = dir.join(name);
    match fs::remove_file(&target) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrackerError::io("remove", target, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_atomic(dir.path(), "f", b"one").expect("write one");
        write_atomic(dir.path(), "f", b"two").expect("write two");
        assert_eq!(fs::read(dir.path().join("f")).expect("read"), b"two");
        assert!(!dir.path().join("f.tmp").exists());
        remove(dir.path(), "f").expect("remove");
        remove(dir.path(), "f").expect("remove missing is fine");
        assert!(!dir.path().join("f").exists());
    }

    #[test]
    fn write_atomic_into_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let err = write_atomic(&missing, "f", b"x").expect_err("must fail");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
