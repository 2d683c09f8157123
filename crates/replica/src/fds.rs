//! The store's bounded cache of open journal files. The index names each journal file by path
//! only; a read opens the file through this cache (or finds it open), and the cache keeps at
//! most [`JournalFds::capacity`] descriptors, closing the least recently used one to make room.
//! So a replica holding thousands of points for hundreds of VMs uses a bounded number of file
//! descriptors, whatever it retains (see "File descriptors" in `docs/formats/replica-store.md`).
//!
//! A reader gets an `Arc<File>` and does its `pread` without the cache's lock; an evicted
//! descriptor is closed when its last reader is done. A file deleted by retention is forgotten
//! here ([`JournalFds::forget`]), so a later file at the same path is never read through a
//! stale descriptor.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ReplicaError;

/// Most journal files one store keeps open at once. Reads of a point touch a few recent
/// journal files at a time (NBD exports and exports read one point sequentially), so 256 open
/// files serve them from the cache, while 256 stays far below the usual soft limit of 1024
/// that also has to cover base images, receives, NBD connections and sockets.
pub const JOURNAL_FDS_MAX: usize = 256;

/// The cache never takes more than 1/`JOURNAL_FDS_LIMIT_SHARE` of the process's soft
/// `RLIMIT_NOFILE` (a daemon started with a small limit keeps most of it for the rest).
pub const JOURNAL_FDS_LIMIT_SHARE: u64 = 4;

/// Smallest cache: enough for a read that crosses a few journal files.
pub const JOURNAL_FDS_MIN: usize = 8;

/// Whether an I/O error says "out of a resource, try again" rather than anything about the
/// file: too many open files (process or system), no memory, interrupted.
pub fn is_transient_io(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EINTR)
    )
}

/// The cache size for this process: [`JOURNAL_FDS_MAX`], or less under a small fd limit.
pub fn default_capacity() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return JOURNAL_FDS_MAX;
    }
    let share = lim.rlim_cur / JOURNAL_FDS_LIMIT_SHARE;
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(JOURNAL_FDS_MIN, JOURNAL_FDS_MAX)
}

struct Lru {
    files: HashMap<PathBuf, (Arc<File>, u64)>,
    tick: u64,
}

/// Open journal files by path, at most `capacity` of them.
pub struct JournalFds {
    capacity: usize,
    lru: Mutex<Lru>,
}

impl JournalFds {
    pub fn new(capacity: usize) -> Self {
        JournalFds {
            capacity: capacity.max(1),
            lru: Mutex::new(Lru {
                files: HashMap::new(),
                tick: 0,
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Descriptors held by the cache now.
    pub fn open_count(&self) -> usize {
        self.lru.lock().files.len()
    }

    /// The open file at `path`, opened now if it is not in the cache. Out of descriptors
    /// (EMFILE/ENFILE), the cache closes half of its own and tries once more; the error that
    /// remains is transient ([`ReplicaError::is_transient`]).
    pub fn get(&self, path: &Path) -> Result<Arc<File>, ReplicaError> {
        {
            let mut lru = self.lru.lock();
            lru.tick += 1;
            let tick = lru.tick;
            if let Some((f, used)) = lru.files.get_mut(path) {
                *used = tick;
                return Ok(f.clone());
            }
        }
        // Opened without the lock: a slow open never holds up reads of other files.
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                self.shrink(self.capacity / 2);
                File::open(path).map_err(ReplicaError::io("open", path))?
            }
            Err(e) => return Err(ReplicaError::io("open", path)(e)),
        };
        let file = Arc::new(file);
        let mut lru = self.lru.lock();
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((f, used)) = lru.files.get_mut(path) {
            // Another reader opened it meanwhile: keep one.
            *used = tick;
            return Ok(f.clone());
        }
        while lru.files.len() >= self.capacity {
            evict_oldest(&mut lru);
        }
        lru.files.insert(path.to_owned(), (file.clone(), tick));
        Ok(file)
    }

    /// Closes cached descriptors until at most `keep` remain.
    fn shrink(&self, keep: usize) {
        let mut lru = self.lru.lock();
        while lru.files.len() > keep {
            evict_oldest(&mut lru);
        }
    }

    /// Drops the descriptor of `path` (the file was deleted or renamed away).
    pub fn forget(&self, path: &Path) {
        self.lru.lock().files.remove(path);
    }

    /// Drops every descriptor of a file under `dir` (a VM directory going away).
    pub fn forget_under(&self, dir: &Path) {
        self.lru.lock().files.retain(|p, _| !p.starts_with(dir));
    }
}

fn evict_oldest(lru: &mut Lru) {
    let oldest = lru
        .files
        .iter()
        .min_by_key(|(_, (_, used))| *used)
        .map(|(p, _)| p.clone());
    if let Some(p) = oldest {
        lru.files.remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_at_most_capacity_and_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..5)
            .map(|i| {
                let p = dir.path().join(format!("{i}"));
                std::fs::write(&p, [i as u8]).unwrap();
                p
            })
            .collect();
        let fds = JournalFds::new(3);
        for p in &paths[..3] {
            fds.get(p).unwrap();
        }
        fds.get(&paths[0]).unwrap(); // 0 is now the most recent
        fds.get(&paths[3]).unwrap(); // evicts 1
        assert_eq!(fds.open_count(), 3);
        let held: Vec<PathBuf> = fds.lru.lock().files.keys().cloned().collect();
        assert!(held.contains(&paths[0]) && !held.contains(&paths[1]));
        fds.forget(&paths[0]);
        assert_eq!(fds.open_count(), 2);
        fds.forget_under(dir.path());
        assert_eq!(fds.open_count(), 0);
        let missing = fds.get(&dir.path().join("nope")).unwrap_err();
        assert!(!missing.is_transient());
    }
}
