//! Where a resynchronization's compare got, so an interrupted one continues instead of
//! starting over (`docs/formats/resync.md`, "The cursor"). Pure data and range arithmetic; the
//! primary's cycle reads, updates and persists it (catalog key `resync-cursor/<vm>`).

use serde::{Deserialize, Serialize};

/// The compare walks each disk in windows of this size: the cursor advances (and is
/// persisted) after each. Small enough that an interruption loses little (a 64 MiB window
/// reads in well under a second at disk speed), large enough that a window's three round
/// trips (1 MiB, 64 KiB, 4 KiB passes) and one catalog commit are noise next to its reads.
pub const RESYNC_WINDOW_BYTES: u64 = 64 << 20;

/// The cursor is persisted at most this often during a compare (each save is a catalog
/// commit, an fsync), and at the end of each disk: an interruption repeats at most this much
/// compare work.
pub const RESYNC_CURSOR_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Ranges a cursor may hold in all (≈ 24 bytes of JSON each: ≈ 6 MiB). Past it the cursor
/// stops advancing: a disk whose differing blocks are that scattered is re-compared from the
/// last cursor kept, which is still correct, only slower.
pub const RESYNC_CURSOR_RANGES_MAX: usize = 262_144;

/// `ResyncCursor::version` written by this daemon.
pub const RESYNC_CURSOR_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncCursor {
    pub version: u32,
    pub replication_id: String,
    pub generation: u64,
    /// The replica's point compared against (`seq - 1` of the `Full` delta).
    pub base_seq: u64,
    pub disks: Vec<DiskCursor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCursor {
    pub index: u32,
    pub size_bytes: u64,
    /// Every block below it was compared.
    pub compared_to: u64,
    /// Byte ranges `[offset, len]` below `compared_to` still to be shipped: sorted, disjoint.
    pub pending: Vec<[u64; 2]>,
}

impl ResyncCursor {
    pub fn key(vm: &str) -> String {
        format!("resync-cursor/{vm}")
    }

    /// A cursor at the start: nothing compared.
    pub fn fresh(
        replication_id: &str,
        generation: u64,
        base_seq: u64,
        disks: &[(u32, u64)],
    ) -> Self {
        ResyncCursor {
            version: RESYNC_CURSOR_VERSION,
            replication_id: replication_id.to_string(),
            generation,
            base_seq,
            disks: disks
                .iter()
                .map(|&(index, size_bytes)| DiskCursor {
                    index,
                    size_bytes,
                    compared_to: 0,
                    pending: Vec::new(),
                })
                .collect(),
        }
    }

    /// Whether this cursor is one for the resynchronization about to cut: the same
    /// relationship and generation, the same replica point, the same disks and sizes, and
    /// well formed (a record that is not is ignored, and the compare starts over).
    pub fn continues(
        &self,
        replication_id: &str,
        generation: u64,
        base_seq: u64,
        disks: &[(u32, u64)],
    ) -> bool {
        self.version == RESYNC_CURSOR_VERSION
            && self.replication_id == replication_id
            && self.generation == generation
            && self.base_seq == base_seq
            && self.disks.len() == disks.len()
            && self.disks.iter().zip(disks).all(|(c, &(index, size))| {
                c.index == index && c.size_bytes == size && c.well_formed()
            })
    }

    /// How many bytes were compared already (for the events).
    pub fn compared_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.compared_to).sum()
    }

    pub fn ranges(&self) -> usize {
        self.disks.iter().map(|d| d.pending.len()).sum()
    }
}

impl DiskCursor {
    fn well_formed(&self) -> bool {
        if self.compared_to > self.size_bytes {
            return false;
        }
        let mut at = 0u64;
        for &[o, l] in &self.pending {
            match o.checked_add(l) {
                Some(end) if o >= at && l > 0 && end <= self.compared_to => at = end,
                _ => return false,
            }
        }
        true
    }

    /// The byte ranges to mark dirty before the cut: what is pending, and all from
    /// `compared_to` on.
    pub fn to_mark(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self.pending.iter().map(|&[o, l]| (o, l)).collect();
        if self.compared_to < self.size_bytes {
            out.push((self.compared_to, self.size_bytes - self.compared_to));
        }
        out
    }

    /// After the cut: the pending ranges are the cut's blocks below `compared_to` (what was
    /// pending, plus what the guest wrote since the previous cut).
    pub fn set_pending_from_cut(&mut self, cut_ranges: &[(u64, u64)]) {
        self.pending = clip(cut_ranges, 0, self.compared_to)
            .into_iter()
            .map(|(o, l)| [o, l])
            .collect();
    }

    /// A window `[start, end)` was compared: `differs` (inside it) is what still must be
    /// shipped there.
    pub fn window_done(&mut self, start: u64, end: u64, differs: &[(u64, u64)]) {
        let mut out: Vec<[u64; 2]> = Vec::with_capacity(self.pending.len() + differs.len());
        let before = clip(&as_pairs(&self.pending), 0, start);
        let after = clip(&as_pairs(&self.pending), end, u64::MAX);
        out.extend(before.iter().map(|&(o, l)| [o, l]));
        out.extend(clip(differs, start, end).iter().map(|&(o, l)| [o, l]));
        out.extend(after.iter().map(|&(o, l)| [o, l]));
        self.pending = out;
        self.compared_to = self.compared_to.max(end.min(self.size_bytes));
    }
}

fn as_pairs(r: &[[u64; 2]]) -> Vec<(u64, u64)> {
    r.iter().map(|&[o, l]| (o, l)).collect()
}

/// The parts of sorted, disjoint `ranges` inside `[from, to)`.
pub fn clip(ranges: &[(u64, u64)], from: u64, to: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .filter_map(|&(o, l)| {
            let (s, e) = (o.max(from), o.saturating_add(l).min(to));
            (s < e).then(|| (s, e - s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = RESYNC_WINDOW_BYTES;

    #[test]
    fn a_continuation_marks_what_is_pending_and_everything_past_the_cursor() {
        let mut c = ResyncCursor::fresh("id", 1, 7, &[(0, 3 * W)]);
        let d = &mut c.disks[0];
        assert_eq!(d.to_mark(), vec![(0, 3 * W)]);
        d.window_done(0, W, &[(4096, 4096), (W - 4096, 4096)]);
        assert_eq!(d.compared_to, W);
        assert_eq!(
            d.to_mark(),
            vec![(4096, 4096), (W - 4096, 4096), (W, 2 * W)]
        );
        // The next cut also holds a block the guest wrote since (8192) and the rest of the disk.
        d.set_pending_from_cut(&[(4096, 8192), (W - 4096, 2 * W + 4096)]);
        assert_eq!(d.pending, vec![[4096, 8192], [W - 4096, 4096]]);
        // The first window compared again: only 8192 still differs there.
        d.window_done(0, W, &[(8192, 4096)]);
        assert_eq!(d.pending, vec![[8192, 4096]]);
        assert_eq!(d.compared_to, W, "the cursor never goes back");
        assert!(c.continues("id", 1, 7, &[(0, 3 * W)]));
        assert!(
            !c.continues("id", 1, 8, &[(0, 3 * W)]),
            "another replica point"
        );
        assert!(
            !c.continues("id", 2, 7, &[(0, 3 * W)]),
            "another generation"
        );
        assert!(!c.continues("id", 1, 7, &[(0, 4 * W)]), "another disk size");
        assert!(!c.continues("other", 1, 7, &[(0, 3 * W)]));
    }

    #[test]
    fn a_damaged_cursor_is_not_continued() {
        let mut c = ResyncCursor::fresh("id", 1, 7, &[(0, 2 * W)]);
        c.disks[0].compared_to = W;
        c.disks[0].pending = vec![[8192, 4096], [4096, 4096]];
        assert!(!c.continues("id", 1, 7, &[(0, 2 * W)]), "unsorted");
        c.disks[0].pending = vec![[W, 4096]];
        assert!(!c.continues("id", 1, 7, &[(0, 2 * W)]), "past compared_to");
        c.disks[0].pending = vec![[u64::MAX, 2]];
        assert!(!c.continues("id", 1, 7, &[(0, 2 * W)]), "overflow");
        c.disks[0].pending = vec![];
        c.disks[0].compared_to = 3 * W;
        assert!(!c.continues("id", 1, 7, &[(0, 2 * W)]), "past the disk");
    }

    #[test]
    fn a_short_last_window_ends_the_disk() {
        let size = W + 12288;
        let mut c = ResyncCursor::fresh("id", 1, 7, &[(3, size)]);
        c.disks[0].window_done(W, 2 * W, &[(W + 4096, 4096)]);
        assert_eq!(c.disks[0].compared_to, size);
        assert_eq!(c.disks[0].to_mark(), vec![(W + 4096, 4096)]);
    }
}
