//! The tracker's error type. Every variant names the disk or file and the operation, so the
//! daemon can log it once and map it to a reason without guessing.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {} already exists", path.display())]
    ImageExists { path: PathBuf },
    #[error("state directory {} is in use by another tracker (lock held)", path.display())]
    StateLocked { path: PathBuf },
    #[error("a cut is already outstanding for this VM: commit or abort it first")]
    CutOutstanding,
    #[error("cut needs at least one disk")]
    NoDisks,
    #[error("disk {} does not belong to the cut gate passed to cut()", path.display())]
    ForeignDisk { path: PathBuf },
    #[error("disk {} is listed twice in one cut", path.display())]
    DuplicateDisk { path: PathBuf },
    #[error("disk {} was shut down; it can no longer be cut", path.display())]
    ShutDown { path: PathBuf },
    #[error("the storage of {} reported a write-back error ({reason}); the disk cannot be stopped cleanly", path.display())]
    StorageFailed { path: PathBuf, reason: String },
}

impl TrackerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        TrackerError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for mapping an `io::Result` into a `TrackerError` with context.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, TrackerError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, TrackerError> {
        self.map_err(|e| TrackerError::io(op, path, e))
    }
}
