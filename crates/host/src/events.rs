//! The host's event log: stable numeric ids (documented in docs/events.md) so monitoring can
//! match on them, kept in memory (bounded) and appended to `<data-dir>/events.log` as JSON
//! lines. Events are for people and monitoring; state lives in the catalog, never here.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::Event;

pub const DAEMON_STARTED: u32 = 1000;
pub const DAEMON_STOPPED: u32 = 1001;
pub const UNCLEAN_RECOVERED: u32 = 1002;
pub const VM_BROKEN: u32 = 1003;
pub const STORAGE_FAILED: u32 = 1004;
pub const VM_SET: u32 = 1005;
/// A disk's activity log could not be written (tracking goes on in memory).
pub const TRACKING_FAILED: u32 = 1007;
/// The guest was found frozen at daemon start (the daemon died between freeze and thaw) and
/// was thawed.
pub const GUEST_THAWED_AT_START: u32 = 1006;
pub const REPLICATION_ENABLED: u32 = 2000;
pub const INITIAL_STARTED: u32 = 2001;
pub const INITIAL_DONE: u32 = 2002;
pub const CYCLE_FAILED: u32 = 2003;
pub const RESYNC_REQUIRED: u32 = 2004;
pub const SUSPENDED: u32 = 2005;
pub const RESUMED: u32 = 2006;
pub const ANSWER_LOST_ADOPTED: u32 = 2007;
pub const REPLICATION_SET: u32 = 2008;
pub const RESYNC_SCHEDULED: u32 = 2009;
pub const RESYNC_STARTED: u32 = 2010;
pub const RESYNC_DONE: u32 = 2011;
pub const PREPARED_FOR_FAILOVER: u32 = 2012;
pub const REPLICATION_REVERSED: u32 = 2013;
/// The replica host failed the VM over while this host was its primary: fenced.
pub const FENCED_AFTER_FAILOVER: u32 = 2014;
/// `replication remove`: the VM is not replicated from this host any more.
pub const REPLICATION_REMOVED: u32 = 2015;
/// A resynchronization's compare of a disk started (Hyper-V's 29242).
pub const RESYNC_COMPARE_STARTED: u32 = 2016;
/// A resynchronization's compare of a disk ended (Hyper-V's 29244).
pub const RESYNC_COMPARE_DONE: u32 = 2017;
/// `replication resync-cancel`: the resynchronization stopped; the replica's points are as
/// before it; the VM requires resynchronization again.
pub const RESYNC_CANCELLED: u32 = 2019;
pub const UPLOAD_RESUMED: u32 = 2020;
/// An application-consistent cut fell back to crash-consistent (agent or hook failure).
pub const APP_CONSISTENT_FAILED: u32 = 2021;
/// The guest could not be thawed (agent) or the post-thaw hook failed after a cut.
pub const GUEST_THAW_FAILED: u32 = 2022;
/// The replica host adopted existing images as point 1 (`replication start --use-existing`).
pub const INITIAL_FROM_EXISTING: u32 = 2030;
/// `replication start --at TIME`: the initial replication starts by itself then.
pub const INITIAL_SCHEDULED: u32 = 2031;
/// `backup`: a backup of a replica point started (point, format, destination).
pub const BACKUP_STARTED: u32 = 2032;
/// A backup completed (point, format, bytes copied, time taken).
pub const BACKUP_DONE: u32 = 2033;
/// A backup failed or was refused (reason); nothing of it is left looking complete.
pub const BACKUP_FAILED: u32 = 2034;
/// 2035-2039 are kept for backups of the replica (docs/events.md).
/// A VM's health changed (Normal, Warning, Critical), with every reason.
pub const HEALTH_CHANGED: u32 = 2040;
/// `replication reset-statistics`: `measure` counts from now; failures in a row forgotten.
pub const STATISTICS_RESET: u32 = 2041;
pub const POINT_COMMITTED: u32 = 3000;
pub const PEER_REFUSED: u32 = 3002;
pub const REPLICA_STORE_UNAVAILABLE: u32 = 3003;
pub const FAILOVER_STARTED: u32 = 3030;
pub const FAILOVER_STOPPED: u32 = 3031;
pub const FAILOVER_COMPLETED: u32 = 3032;
/// `failover start --start`: the launch command ran (exited 0), was left running, or ended
/// later.
pub const LAUNCH_STARTED: u32 = 3040;
/// `failover start --start`: the launch command failed (the failover stays).
pub const LAUNCH_FAILED: u32 = 3041;
pub const POINT_SERVED: u32 = 3020;
pub const POINT_UNSERVED: u32 = 3021;

/// Events kept in memory for `events` queries; older ones remain in the file.
const EVENTS_IN_MEMORY_MAX: usize = 1000;

/// Size at which `events.log` is rotated to `events.log.1` (the previous `.1` is dropped): the
/// log takes at most twice this on disk. 16 MiB holds ~100 000 events, months of a busy
/// host's history, while a flapping link cannot fill the data directory's file system.
pub const EVENTS_FILE_MAX_BYTES: u64 = 16 << 20;

/// The rotated file beside `path` (`events.log.1`).
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

pub struct Events {
    path: PathBuf,
    recent: Mutex<VecDeque<Event>>,
    /// Bytes in the current file (`None`: not known yet, read at the next append); under
    /// this lock appends and rotations happen one at a time.
    file_bytes: Mutex<Option<u64>>,
    max_bytes: u64,
}

impl Events {
    pub fn new(path: PathBuf) -> Events {
        Events::with_limit(path, EVENTS_FILE_MAX_BYTES)
    }

    /// `max_bytes`: rotate at this size instead of [`EVENTS_FILE_MAX_BYTES`] (tests).
    pub fn with_limit(path: PathBuf, max_bytes: u64) -> Events {
        Events {
            path,
            recent: Mutex::new(VecDeque::new()),
            file_bytes: Mutex::new(None),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Appends one line, rotating first when it would take the file past the limit.
    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut size = self.file_bytes.lock();
        let current = match *size {
            Some(n) => n,
            None => match std::fs::metadata(&self.path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            },
        };
        let len = line.len() as u64 + 1;
        let current = if current > 0 && current + len > self.max_bytes {
            std::fs::rename(&self.path, rotated_path(&self.path))?;
            0
        } else {
            current
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        // After a failed write the size is unknown: read it again next time.
        *size = written.as_ref().ok().map(|_| current + len);
        written
    }

    pub fn emit(&self, id: u32, vm: Option<&str>, level: &str, message: &str) {
        let ev = Event {
            id,
            time: rfc3339_from_unix_ns(now_unix_ns()),
            vm: vm.map(str::to_string),
            level: level.to_string(),
            message: message.to_string(),
        };
        match level {
            "error" => tracing::error!(event = id, vm = vm.unwrap_or("-"), "{message}"),
            "warning" => tracing::warn!(event = id, vm = vm.unwrap_or("-"), "{message}"),
            _ => tracing::info!(event = id, vm = vm.unwrap_or("-"), "{message}"),
        }
        if let Ok(line) = serde_json::to_string(&ev) {
            if let Err(e) = self.append(&line) {
                tracing::warn!("cannot append to {}: {e}", self.path.display());
            }
        }
        let mut recent = self.recent.lock();
        if recent.len() == EVENTS_IN_MEMORY_MAX {
            recent.pop_front();
        }
        recent.push_back(ev);
    }

    pub fn recent(&self, vm: Option<&str>) -> Vec<Event> {
        self.recent
            .lock()
            .iter()
            .filter(|e| vm.is_none() || e.vm.as_deref() == vm)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_log_rotates_at_its_limit_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let events = Events::with_limit(path.clone(), 1000);
        for i in 0..100 {
            events.emit(VM_SET, Some("web"), "info", &format!("event number {i}"));
        }
        let now = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(now <= 1000 && old <= 1000, "{now} {old}");
        assert!(!dir.path().join("events.log.2").exists());
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.trim_end().ends_with("event number 99\"}"), "{last}");
    }
}
