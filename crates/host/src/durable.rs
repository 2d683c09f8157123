//! The binary's one place that makes a file durable under its final name: fsync the file,
//! rename it over the destination, fsync the directory. (The catalog relies on redb commits;
//! the crates own their formats' durability in their own `durable` modules.)

use std::fs::File;
use std::path::Path;

use anyhow::Context;

/// Publishes a fully written temporary file `tmp` as `dest`, atomically and durably.
pub fn publish(tmp: &Path, dest: &Path) -> anyhow::Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
    if let Some(dir) = dest.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))?;
    }
    Ok(())
}
