//! Durability on Linux file systems: a file's content survives a crash once the file is
//! fsynced; a name created, renamed or removed in a directory survives once the directory is
//! fsynced. [`replace_file`] puts the two together so readers and crashes see the old content
//! or the new content under a name, never a mix.
//!
//! Policy stays with the callers: how temporary files are named (and cleaned up at open),
//! whether a transient failure of a directory fsync is retried, which operation an error is
//! reported as.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Permission bits of a file written by [`write_synced`] / [`replace_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMode {
    /// Create with these bits, narrowed by the process umask (what `open(2)` does). An
    /// existing file keeps its bits. `Umask(0o666)` is `std`'s default.
    Umask(u32),
    /// Exactly these bits, whatever the umask or the bits of a stale file at the path (for
    /// key material that must be `0o600`, and public files that must be readable).
    Exact(u32),
}

/// The directory holding `path`: its parent, or `.` for a bare file name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a directory, making the entries created, renamed or removed in it durable. Needs one
/// descriptor for the duration: `EMFILE`/`ENFILE` come back untouched for callers that retry
/// them. (`std` retries `EINTR` for both the open and the fsync.)
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` as the whole content of `path` (created or truncated) and fsyncs it. Not
/// atomic by itself: write a temporary file with it, then rename (see [`replace_file`]).
pub fn write_synced(path: &Path, bytes: &[u8], mode: FileMode) -> io::Result<()> {
    let bits = match mode {
        FileMode::Umask(b) | FileMode::Exact(b) => b,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(bits)
        .open(path)?;
    if let FileMode::Exact(b) = mode {
        // The umask may have narrowed the bits; a stale file at the path may have had others.
        file.set_permissions(fs::Permissions::from_mode(b))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

/// Renames `from` to `to` and fsyncs the directory of `to`, and that of `from` when it is a
/// different one: after return the rename survives a crash.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    fsync_dir(parent_dir(to))?;
    if parent_dir(from) != parent_dir(to) {
        fsync_dir(parent_dir(from))?;
    }
    Ok(())
}

/// Atomically and durably replaces `path` with `bytes`: writes and fsyncs `tmp` (which must
/// be in the same directory, and is the caller's to name), renames it over `path`, fsyncs the
/// directory. Until it returns, a crash leaves the old content or the new one; after it
/// returns, the new one. When writing or renaming fails, `tmp` is removed (best effort), so a
/// failed replace leaves no temporary file behind; the error is the one that failed.
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8], mode: FileMode) -> io::Result<()> {
    if let Err(e) = write_synced(tmp, bytes, mode).and_then(|()| fs::rename(tmp, path)) {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    fsync_dir(parent_dir(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replace_survives_reopen_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, tmp) = (dir.path().join("state"), dir.path().join("state.tmp"));
        replace_file(&path, &tmp, b"one", FileMode::Umask(0o666)).expect("first");
        replace_file(&path, &tmp, b"two", FileMode::Umask(0o666)).expect("second");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        assert_eq!(names(dir.path()), vec!["state".to_string()]);
    }

    #[test]
    fn exact_mode_ignores_umask_and_stale_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, tmp) = (dir.path().join("k.key"), dir.path().join(".k.key.tmp"));
        // A stale temporary with wider bits must not leak them into the key.
        fs::write(&tmp, b"stale").expect("stale tmp");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).expect("chmod");
        replace_file(&path, &tmp, b"secret", FileMode::Exact(0o600)).expect("replace");
        let bits = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(bits, 0o600);
        replace_file(&path, &tmp, b"public", FileMode::Exact(0o644)).expect("replace");
        let bits = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(bits, 0o644);
    }

    #[test]
    fn failed_rename_keeps_the_old_content_and_removes_the_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory at the target: rename(file, non-empty dir) fails with EISDIR.
        let path = dir.path().join("target");
        fs::create_dir(&path).expect("dir");
        fs::write(path.join("inside"), b"old").expect("inside");
        let tmp = dir.path().join("target.tmp");
        let e = replace_file(&path, &tmp, b"new", FileMode::Umask(0o666)).expect_err("fails");
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR));
        assert!(!tmp.exists(), "temporary removed");
        assert_eq!(fs::read(path.join("inside")).expect("read"), b"old");
    }

    #[test]
    fn missing_directory_is_not_found_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let e = replace_file(
            &missing.join("f"),
            &missing.join("f.tmp"),
            b"x",
            FileMode::Umask(0o666),
        )
        .expect_err("fails");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            fsync_dir(&missing).expect_err("fails").kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn rename_durable_moves_between_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("a")).expect("a");
        fs::create_dir(dir.path().join("b")).expect("b");
        let (from, to) = (dir.path().join("a/f"), dir.path().join("b/f"));
        fs::write(&from, b"x").expect("write");
        rename_durable(&from, &to).expect("rename");
        assert!(!from.exists());
        assert_eq!(fs::read(&to).expect("read"), b"x");
        assert_eq!(parent_dir(Path::new("bare")), Path::new("."));
    }
}
