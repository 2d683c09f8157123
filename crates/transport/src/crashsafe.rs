//! Durable file replacement for this crate's small files (keys, certificates, trusted PEMs).
//!
//! This is the only place in the crate that renames files. A file written here is either the
//! old complete version or the new complete version after a crash, never a mix: write a
//! temporary file in the same directory, fsync it, rename it over the target, fsync the
//! directory. It must never be used for large data (it rewrites whole files).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use sysutil::FileMode;

use crate::TransportError;

/// Mode of private key files: readable by the daemon's user only.
pub(crate) const MODE_SECRET: u32 = 0o600;
/// Mode of certificate files: public material.
pub(crate) const MODE_PUBLIC: u32 = 0o644;
/// Mode of directories we create: they hold private keys, so others may not even list them.
pub(crate) const MODE_DIR: u32 = 0o700;

/// Creates `dir` (and parents) if missing, with [`MODE_DIR`] for the directories we create.
pub(crate) fn create_dir(dir: &Path) -> Result<(), TransportError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(MODE_DIR)
        .create(dir)
        .map_err(|e| TransportError::io("create directory", dir, e))
}

/// Atomically replaces `path` with `contents`, with permission bits exactly `mode` (whatever
/// the umask). The temporary file is `.<name>.tmp.<pid>` in the same directory, removed when
/// the replace fails.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TransportError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = sysutil::parent_dir(path).join(format!(".{name}.tmp.{}", std::process::id()));
    sysutil::replace_file(path, &tmp, contents, FileMode::Exact(mode))
        .map_err(|e| TransportError::io("replace atomically", path, e))
}

/// Fsyncs a directory so that renames, creations and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), TransportError> {
    sysutil::fsync_dir(dir).map_err(|e| TransportError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_contents_with_requested_mode_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_file(&path, b"one", MODE_PUBLIC).unwrap();
        write_file(&path, b"two", MODE_SECRET).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE_SECRET);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
