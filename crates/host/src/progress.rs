//! Progress of long local-API calls (`points export`, `failover complete`), so the CLI can show
//! a bar or plain lines while its call is in flight: the caller names the operation
//! (`progress_id` in the request; [`failover_complete_id`] for a completion), the work reports bytes done of total under that name, and
//! `GET /v1/progress/{id}` reads it. When the work ends its last numbers stay for one more read
//! (the CLI's final line says how much was done), then the entry is gone.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Operations tracked at once. Each is a CLI call in flight (or just ended and not read yet);
/// the bound keeps a client that invents ids, or never reads the last numbers, from growing
/// the table: ended entries are dropped first, and beyond it new work runs untracked.
pub const TRACKED_MAX: usize = 1024;

/// Longest operation id accepted (the CLI's are ~40 bytes).
pub const ID_MAX_BYTES: usize = 128;

/// The id under which `failover complete NAME` reports the copy of the VM's disks (the CLI
/// knows it without sending one).
pub fn failover_complete_id(vm: &str) -> String {
    format!("failover-complete-{vm}")
}

#[derive(Clone, Copy)]
struct Entry {
    done: u64,
    total: u64,
    ended: bool,
}

type Table = Arc<Mutex<HashMap<String, Entry>>>;

#[derive(Default)]
pub struct Registry {
    ops: Table,
}

/// Reports one operation's progress; marks it ended when dropped.
pub struct Tracker {
    ops: Option<(Table, String)>,
}

impl Registry {
    /// Starts tracking `id` (untracked if `None`, empty, too long, taken, or the table is full).
    pub fn track(&self, id: Option<&str>) -> Tracker {
        let Some(id) = id.filter(|i| !i.is_empty() && i.len() <= ID_MAX_BYTES) else {
            return Tracker { ops: None };
        };
        let mut ops = self.ops.lock();
        if ops.len() >= TRACKED_MAX {
            ops.retain(|_, e| !e.ended);
        }
        // A running operation keeps its id; an ended one not read yet gives it up.
        if ops.len() >= TRACKED_MAX || ops.get(id).is_some_and(|e| !e.ended) {
            return Tracker { ops: None };
        }
        ops.insert(
            id.to_owned(),
            Entry {
                done: 0,
                total: 0,
                ended: false,
            },
        );
        Tracker {
            ops: Some((self.ops.clone(), id.to_owned())),
        }
    }

    /// `(done, total)` bytes of `id`; an ended operation answers once more, then is forgotten.
    pub fn get(&self, id: &str) -> Option<(u64, u64)> {
        let mut ops = self.ops.lock();
        let e = *ops.get(id)?;
        if e.ended {
            ops.remove(id);
        }
        Some((e.done, e.total))
    }
}

impl Tracker {
    pub fn set(&self, done: u64, total: u64) {
        if let Some((ops, id)) = &self.ops {
            if let Some(e) = ops.lock().get_mut(id) {
                e.done = done;
                e.total = total;
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Some((ops, id)) = self.ops.take() {
            if let Some(e) = ops.lock().get_mut(&id) {
                e.ended = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_operation_answers_once_then_is_forgotten() {
        let r = Registry::default();
        let t = r.track(Some("x"));
        t.set(5, 10);
        assert_eq!(r.get("x"), Some((5, 10)));
        assert_eq!(
            r.get("x"),
            Some((5, 10)),
            "running: read any number of times"
        );
        t.set(10, 10);
        drop(t);
        assert_eq!(r.get("x"), Some((10, 10)));
        assert_eq!(r.get("x"), None);
        assert!(r.track(None).ops.is_none());
        // An ended entry never read gives its id to the next run.
        drop(r.track(Some("z")));
        let again = r.track(Some("z"));
        assert!(again.ops.is_some());
        assert!(r.track(Some("z")).ops.is_none(), "running: taken");
        assert_eq!(r.get("z"), Some((0, 0)));
        assert!(r.track(Some(&"y".repeat(ID_MAX_BYTES + 1))).ops.is_none());
    }

    #[test]
    fn full_table_drops_ended_entries_first() {
        let r = Registry::default();
        let mut live = Vec::new();
        for i in 0..TRACKED_MAX {
            live.push(r.track(Some(&format!("op{i}"))));
        }
        assert!(r.track(Some("more")).ops.is_none(), "full: untracked");
        live.truncate(TRACKED_MAX - 1);
        assert!(
            r.track(Some("more")).ops.is_some(),
            "an ended entry made room"
        );
    }
}
