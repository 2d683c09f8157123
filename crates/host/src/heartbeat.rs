//! The daemon's liveness stamp, `<data-dir>/heartbeat`: the wall-clock time (unix ns) it was
//! last known alive, rewritten every [`INTERVAL`]. After an unclean stop the trackers know
//! which extents were being written, but not whether someone edited an image while the daemon
//! was down. An image whose inode change time (ctime) is later than the last stamp plus
//! [`INTERVAL`] and [`SLACK`] was changed by someone else after the daemon died: that VM needs
//! resynchronization (`modified_while_off`; no stamp, or a clock behind it:
//! `unclean_stop_untracked`, `docs/resync-triggers.md`). Edits within that short window after a
//! crash are not seen; that limit is written in ARCHITECTURE.md and docs/resync-triggers.md. A
//! stamp lost to a power failure only makes the check stricter.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::time::now_unix_ns;

/// How often the stamp is rewritten.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Allowance for a guest write that landed just before the daemon died, after its last stamp.
pub const SLACK: Duration = Duration::from_secs(2);

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("heartbeat")
}

/// The last stamp, if any (read before [`spawn`] overwrites it).
pub fn last_alive_ns(data_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(path(data_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Rewrites the stamp every [`INTERVAL`] for the life of the process. Atomic against a process
/// crash (rename); deliberately not fsynced: losing it makes the check stricter, not weaker.
///
/// It runs on its own OS thread, not on the async runtime: a runtime worker busy with
/// blocking work (a catalog commit, a bitmap scan) must never make the stamp lag behind guest
/// writes, or an ordinary crash would look like an edit made while the daemon was down.
pub fn spawn(data_dir: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let file = path(&data_dir);
            let tmp = data_dir.join("heartbeat.tmp");
            loop {
                let stamped = std::fs::write(&tmp, now_unix_ns().to_string())
                    .and_then(|()| std::fs::rename(&tmp, &file));
                if let Err(e) = stamped {
                    tracing::warn!("cannot write {}: {e}", file.display());
                }
                std::thread::sleep(INTERVAL);
            }
        })
        .map(|_| ())
}

/// Whether this start's clock is behind the previous daemon's last stamp: the wall clock was
/// stepped back (RTC ahead, NTP correction) or the stamp came from another clock. Then image
/// change times cannot be compared with the stamp, and edits made while the daemon was down
/// cannot be ruled out.
pub fn clock_behind(last_alive_ns: u64, now_ns: u64) -> bool {
    now_ns < last_alive_ns
}

/// When `image` changed after the daemon was last alive (beyond the slack), the change time.
pub fn changed_after(image: &Path, last_alive_ns: u64) -> std::io::Result<Option<u64>> {
    let m = std::fs::metadata(image)?;
    let ctime_ns = (m.ctime() as u64).saturating_mul(1_000_000_000) + m.ctime_nsec() as u64;
    let limit = last_alive_ns + (INTERVAL + SLACK).as_nanos() as u64;
    Ok((ctime_ns > limit).then_some(ctime_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_changed_after_the_last_stamp_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, b"x").unwrap();
        let now = now_unix_ns();
        // Stamped just now: the image changed within the slack.
        assert_eq!(changed_after(&img, now).unwrap(), None);
        // Last alive a minute ago: the image changed after the daemon died.
        assert!(changed_after(&img, now - 60_000_000_000).unwrap().is_some());
        assert_eq!(last_alive_ns(dir.path()), None);
        std::fs::write(dir.path().join("heartbeat"), "12345").unwrap();
        assert_eq!(last_alive_ns(dir.path()), Some(12345));
    }

    #[test]
    fn a_clock_behind_the_last_stamp_cannot_rule_out_edits() {
        let now = now_unix_ns();
        assert!(clock_behind(now + 3_600_000_000_000, now));
        assert!(!clock_behind(now - 1, now));
    }
}
