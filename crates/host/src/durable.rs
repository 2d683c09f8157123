//! The host's one place that makes a file durable under its final name (the catalog relies on
//! redb commits; the crates own their formats' durability, all through `sysutil`).

use std::fs::File;
use std::path::Path;

use anyhow::Context;

/// Publishes a fully written temporary file `tmp` as `dest`, atomically and durably: fsync the
/// file, rename it over the destination, fsync the directories (`sysutil::rename_durable`).
pub fn publish(tmp: &Path, dest: &Path) -> anyhow::Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    sysutil::rename_durable(tmp, dest).with_context(|| format!("renaming into {}", dest.display()))
}
