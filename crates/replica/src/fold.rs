//! Retention: folding the oldest journal delta into the base images, crash-safely (intent in
//! the manifest, apply, fsync, advance the manifest, delete the journal file — see the "Fold"
//! section of `docs/formats/replica-store.md`). Applying a delta to the base is idempotent, so
//! an interrupted fold is simply redone at open. Never folds past a point an open view reads.

use std::fs::File;
use std::io::BufReader;

use delta::{DeltaReader, FrameBody};
use proto::Seq;

use std::collections::{BTreeMap, BTreeSet};

use crate::base_writer::BaseWriter;
use crate::vm::{JournalEntry, ReplicaVm, VmInner};
use crate::{
    classify, durable, failpoint, kept, merge, HistoryPolicy, PointInfo, PointKind, ReplicaError,
};

impl ReplicaVm {
    /// Folds the oldest deltas into the base images until at most `keep_points` points remain
    /// (at least one is always kept). Stops early, without error, when the next fold would
    /// retire a point that an open view is reading; a later call continues.
    pub fn retain(&self, keep_points: usize) -> Result<(), ReplicaError> {
        let keep = keep_points.max(1);
        let _m = self.inner.mutate.lock();
        while self.points().len() > keep {
            if !fold_next(&self.inner)? {
                tracing::info!(vm = %self.inner.vm_id, "retention paused: the oldest point is in use");
                break;
            }
        }
        Ok(())
    }
}

impl ReplicaVm {
    /// The recovery-history policy recorded for this VM (`None`: the newest points are kept
    /// by count, [`ReplicaVm::retain`]).
    pub fn history(&self) -> Option<HistoryPolicy> {
        self.inner.state.read().history
    }

    /// Records `policy` durably (in the manifest) when it differs from the recorded one. An
    /// out-of-range policy is refused and nothing changes.
    pub fn set_history(&self, policy: HistoryPolicy) -> Result<(), ReplicaError> {
        policy.validate().map_err(ReplicaError::InvalidHistory)?;
        let _m = self.inner.mutate.lock();
        if self.inner.state.read().history == Some(policy) {
            return Ok(());
        }
        self.inner.update_manifest(|st| st.history = Some(policy))
    }

    /// Points with their kind at `now_ns` (oldest first).
    pub fn points_with_kinds(&self, now_ns: u64) -> Vec<(PointInfo, PointKind)> {
        let points = self.points();
        let kinds = classify(&points, self.history().as_ref(), now_ns);
        points.into_iter().zip(kinds).collect()
    }

    /// Open views per point seq (what holds a point against retention today).
    pub fn pinned_points(&self) -> BTreeMap<Seq, usize> {
        self.inner
            .pins
            .lock()
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(&s, &n)| (Seq(s), n))
            .collect()
    }

    /// Retention by the recorded policy at `now_ns` ([`kept`]); without a policy, keeps the
    /// newest `default_keep` points. A point the policy does not keep is retired: the base
    /// point by folding the next delta into the base; a journal point by *hiding* it (one
    /// manifest write: it is no recovery point any more, its delta stays a layer of the points
    /// above it). Hidden deltas are then compacted: the oldest hidden delta that is no larger
    /// than the delta after it is merged into that one, and hidden deltas right above a base
    /// that is not listed are folded into it. So a byte is rewritten O(log n) times over n
    /// retirements, never once per cycle. A point an open view reads is never retired.
    /// Commits are held up only while a fold runs or a merge publishes, never while a merge
    /// writes.
    pub fn apply_history(&self, now_ns: u64, default_keep: usize) -> Result<(), ReplicaError> {
        let Some(policy) = self.history() else {
            return self.retain(default_keep);
        };
        let mut skip: BTreeSet<u64> = BTreeSet::new();
        let mut fold_blocked = false;
        loop {
            let points = self.points();
            let keep = kept(&points, &policy, now_ns);
            let fold_wanted = {
                let st = self.inner.state.read();
                match (st.base_point, st.journal.keys().next()) {
                    (_, None) => false,
                    (Some(b), Some(_)) => !keep.contains(&b.seq),
                    (None, Some(first)) => st.hidden.contains(first),
                }
            };
            if fold_wanted && !fold_blocked {
                let folded = {
                    let _m = self.inner.mutate.lock();
                    fold_next(&self.inner)?
                };
                if folded {
                    continue;
                }
                fold_blocked = true;
            }
            let retire: Vec<u64> = points
                .iter()
                .map(|p| p.seq)
                .filter(|s| !keep.contains(s))
                .map(Seq::get)
                .collect();
            if !retire.is_empty() && hide(&self.inner, &retire)? {
                continue;
            }
            let candidate = {
                let st = self.inner.state.read();
                st.hidden.iter().copied().find(|h| {
                    let (Some(this), Some((_, next))) =
                        (st.journal.get(h), st.journal.range(h + 1..).next())
                    else {
                        return false;
                    };
                    !skip.contains(h) && this.info.stored_bytes <= next.info.stored_bytes
                })
            };
            let Some(h) = candidate else {
                return Ok(());
            };
            if !merge::merge_into_next(&self.inner, h)? {
                skip.insert(h);
            }
        }
    }

    /// Hidden journal deltas (retired points not yet absorbed), for tests and reports.
    pub fn hidden_deltas(&self) -> usize {
        self.inner.state.read().hidden.len()
    }
}

/// Most hidden deltas at once. Each is a seq in the manifest (at most ~21 bytes of its 64 KiB
/// cap: 1024 take ~21 KiB); compaction keeps far fewer (a few per gap between kept points).
/// Past it, retired points stay listed until compaction makes room: the safe direction.
pub const HIDDEN_DELTAS_MAX: usize = 1024;

/// Retires journal points `seqs` as recovery points (they stay as layers): never the newest
/// point, never one an open view reads, never more than [`HIDDEN_DELTAS_MAX`] hidden at once.
/// Returns whether anything changed.
fn hide(inner: &VmInner, seqs: &[u64]) -> Result<bool, ReplicaError> {
    let _m = inner.mutate.lock();
    // Lock order: mutate, pins, state. Holding pins: no view of these opens meanwhile.
    let pins = inner.pins.lock();
    let new: Vec<u64> = {
        let st = inner.state.read();
        let newest = st.latest_seq();
        let room = HIDDEN_DELTAS_MAX.saturating_sub(st.hidden.len());
        seqs.iter()
            .copied()
            .filter(|s| {
                *s != newest
                    && st.journal.contains_key(s)
                    && !st.hidden.contains(s)
                    && !pins.get(s).is_some_and(|&n| n > 0)
            })
            .take(room)
            .collect()
    };
    if new.is_empty() {
        return Ok(false);
    }
    inner.update_manifest(|st| st.hidden.extend(new.iter().copied()))?;
    drop(pins);
    Ok(true)
}

/// Folds the first journal point (`base_seq`'s child) into the base. Returns false when it may not (no such
/// delta, or the base point is being read). Caller holds `mutate`.
pub(crate) fn fold_next(inner: &VmInner) -> Result<bool, ReplicaError> {
    let (s, already_started) = {
        // Lock order: pins, then state. Holding pins across the intent write means no view of
        // the base point can open between the check and the point's retirement.
        let pins = inner.pins.lock();
        let st = inner.state.read();
        // The first journal point: its parent is `base_seq` (a merge result may have a seq
        // above `base_seq + 1`).
        let Some(s) = st.folding.or_else(|| st.journal.keys().next().copied()) else {
            return Ok(false);
        };
        if !st.journal.contains_key(&s) {
            return Ok(false);
        }
        let started = st.folding == Some(s);
        if !started && st.base_point.is_some() && pins.get(&st.base_seq).is_some_and(|&n| n > 0) {
            return Ok(false);
        }
        drop(st);
        if !started {
            inner.update_manifest(|st| {
                st.folding = Some(s);
                st.base_point = None;
            })?;
        }
        (s, started)
    };
    if already_started {
        tracing::info!(vm = %inner.vm_id, seq = s, "resuming an interrupted fold");
    }
    failpoint::hit("fold.after_intent")?;
    let (info, path) = inner
        .state
        .read()
        .journal
        .get(&s)
        .map(|e| (e.info, e.file.path.clone()))
        .ok_or(ReplicaError::NoSuchPoint { seq: s })?;
    apply_to_base(inner, &path)?;
    advance_base(inner, s, info, &path)?;
    Ok(true)
}

/// Finishes a fold found interrupted at open (`entry` was verified but is not in the index).
pub(crate) fn finish_fold(inner: &VmInner, entry: JournalEntry) -> Result<(), ReplicaError> {
    let s = entry.info.seq.get();
    tracing::warn!(vm = %inner.vm_id, seq = s, "finishing a fold interrupted by a crash");
    let path = entry.file.path.clone();
    apply_to_base(inner, &path)?;
    advance_base(inner, s, entry.info, &path)
}

/// Steps 4 and 5: the manifest says the base holds `s`, then the journal file goes.
fn advance_base(
    inner: &VmInner,
    s: u64,
    info: crate::PointInfo,
    path: &std::path::Path,
) -> Result<(), ReplicaError> {
    inner.update_manifest(|st| {
        st.base_seq = s;
        // A hidden delta is no recovery point: the base then holds no listed point.
        st.base_point = (!st.hidden.contains(&s)).then_some(info);
        st.hidden.remove(&s);
        st.folding = None;
    })?;
    failpoint::hit("fold.after_manifest")?;
    if let Some(e) = inner.state.write().journal.remove(&s) {
        inner.budget.release(e.frames);
    }
    let removed = durable::remove_file(path);
    inner.fds.forget(path);
    removed
}

/// Step 3: writes every frame of the journal file at `path` into the base images in stream order, verifying
/// the file again as it goes, then fsyncs the base images. The writes go through a writer
/// thread with `O_DIRECT` (`base_writer`), so reading and verifying the next frame overlaps
/// writing the previous one; all of them are done before the fsync.
fn apply_to_base(inner: &VmInner, path: &std::path::Path) -> Result<(), ReplicaError> {
    let file = File::open(path).map_err(ReplicaError::io("open", path))?;
    let mut r = DeltaReader::new(BufReader::new(file), &inner.key)?;
    let mut writer = BaseWriter::open(inner, None)?;
    let mut applied = 0u64;
    while let Some(frame) = r.next_frame()? {
        let (disk, offset, len) = (frame.info.disk, frame.info.offset, frame.info.len);
        inner.disk(disk)?;
        match frame.body {
            FrameBody::Data(data) => writer.data(disk, offset, &data)?,
            FrameBody::Zero => writer.zero(disk, offset, len)?,
        }
        applied += 1;
        if applied == 1 {
            failpoint::hit("fold.mid_apply")?;
        }
    }
    writer.finish()?;
    for b in inner.base.values() {
        durable::fsync_file(&b.file, &b.path)?;
    }
    failpoint::hit("fold.after_apply")
}
