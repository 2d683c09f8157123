//! Merging a point into the next one: the union of two adjacent journal deltas, the newer data
//! winning, written crash-safely as a new journal file that replaces both (the "Merge" section
//! of `docs/formats/replica-store.md`). This is what lets retention drop the points between
//! two kept ones (hourly points), where folding can only retire the oldest.

use std::fs::OpenOptions;
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use delta::{Compression, DeltaHeader, DeltaWriter};
use proto::{Generation, Seq};

use crate::index::{resolve, JournalFile, Layer, SegSrc};
use crate::store::FILE_MODE;
use crate::vm::{VmInner, INCOMING_DIR};
use crate::{durable, failpoint, ReplicaError, FRAMES_PER_DELTA_MAX};

/// What a merge of point `a` into `b` starts from, taken under the state lock.
struct Plan {
    a: u64,
    b: u64,
    /// `a`'s parent: the point before it (journal or `base_seq`).
    parent: u64,
    a_file: Arc<JournalFile>,
    b_file: Arc<JournalFile>,
    header: DeltaHeader,
    /// Per disk: the layers `[b, a]` that exist.
    layers: Vec<(u32, u64, Vec<Arc<Layer>>)>,
}

/// A partial file deleted on drop unless taken.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Merges journal point `a` into the next point. Returns false, changing nothing, when it may
/// not: `a` is not a journal point, is the newest, is read by an open view, or retention or a
/// commit changed the points around it meanwhile. Takes `mutate` only to publish; the caller
/// must not hold it.
pub(crate) fn merge_into_next(inner: &VmInner, a: u64) -> Result<bool, ReplicaError> {
    let Some(plan) = plan(inner, a) else {
        return Ok(false);
    };
    let n = inner.next_incoming.fetch_add(1, Ordering::Relaxed);
    let partial_path = inner.dir.join(INCOMING_DIR).join(format!("{n}.partial"));
    let mut partial = Partial(Some(partial_path.clone()));
    if !write_merged(inner, &plan, &partial_path)? {
        return Ok(false);
    }
    failpoint::hit("merge.before_rename")?;
    let final_path = inner.journal_path_of(plan.b, plan.parent);
    // Index the new file under its final name (it is verified again as it is read).
    let generation = inner.state.read().generation;
    let entry = inner.load_journal_as(
        plan.b,
        plan.parent,
        &partial_path,
        final_path.clone(),
        generation,
    )?;
    {
        let _m = inner.mutate.lock();
        // Lock order: mutate, pins, state. Holding pins means no view of `a` opens between
        // this check and the point's retirement.
        let pins = inner.pins.lock();
        if pins.get(&a).is_some_and(|&n| n > 0) || !still_adjacent(inner, &plan) {
            return Ok(false);
        }
        durable::rename(&partial_path, &final_path)?;
        partial.0 = None;
        failpoint::hit("merge.after_rename")?;
        let mut st = inner.state.write();
        let mut released = 0;
        if let Some(old) = st.journal.remove(&plan.a) {
            released += old.frames;
        }
        // Persisted with the next manifest write; open drops seqs that are not in the journal.
        st.hidden.remove(&plan.a);
        let frames = entry.frames;
        if let Some(old) = st.journal.insert(plan.b, entry) {
            released += old.frames;
        }
        inner.budget.release(released);
        inner.budget.add(frames);
        drop(st);
        drop(pins);
    }
    failpoint::hit("merge.before_delete")?;
    for f in [&plan.a_file, &plan.b_file] {
        durable::remove_file(&f.path)?;
        inner.fds.forget(&f.path);
    }
    Ok(true)
}

fn plan(inner: &VmInner, a: u64) -> Option<Plan> {
    let st = inner.state.read();
    if st.folding.is_some() {
        return None;
    }
    let a_entry = st.journal.get(&a)?;
    let (&b, b_entry) = st.journal.range(a + 1..).next()?;
    let parent = st
        .journal
        .range(..a)
        .next_back()
        .map_or(st.base_seq, |(&s, _)| s);
    let header = DeltaHeader {
        compared: false,
        // The merged point is b's state, so it is as consistent as b.
        app_consistent: b_entry.info.app_consistent,
        vm_id: inner.vm_id.clone(),
        generation: Generation(st.generation),
        seq: Seq(b),
        parent_seq: Seq(parent),
        cut_time_unix_ns: b_entry.info.cut_time_unix_ns,
        kind: b_entry.info.kind,
        compression: Compression::Zstd,
        disks: inner.disks.clone(),
    };
    let layers = inner
        .disks
        .iter()
        .map(|d| {
            let ls: Vec<Arc<Layer>> = [b_entry.layers.get(&d.index), a_entry.layers.get(&d.index)]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            (d.index, d.size_bytes, ls)
        })
        .collect();
    Some(Plan {
        a,
        b,
        parent,
        a_file: a_entry.file.clone(),
        b_file: b_entry.file.clone(),
        header,
        layers,
    })
}

/// Whether the points around the merge are still those it was planned on.
fn still_adjacent(inner: &VmInner, plan: &Plan) -> bool {
    let st = inner.state.read();
    let same = |seq: u64, f: &Arc<JournalFile>| {
        st.journal
            .get(&seq)
            .is_some_and(|e| Arc::ptr_eq(&e.file, f))
    };
    let parent_now = st
        .journal
        .range(..plan.a)
        .next_back()
        .map_or(st.base_seq, |(&s, _)| s);
    let next_now = st.journal.range(plan.a + 1..).next().map(|(&s, _)| s);
    st.folding.is_none()
        && same(plan.a, &plan.a_file)
        && same(plan.b, &plan.b_file)
        && parent_now == plan.parent
        && next_now == Some(plan.b)
}

/// Step 2: writes the merged delta to `path` and fsyncs it. False: a file it reads was
/// retired meanwhile, or the result would exceed the per-delta frame bound.
fn write_merged(inner: &VmInner, plan: &Plan, path: &PathBuf) -> Result<bool, ReplicaError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(ReplicaError::io("create", path))?;
    let mut w = DeltaWriter::new(BufWriter::new(file), &plan.header, &inner.key)?;
    let mut frames = 0u64;
    let mut first = true;
    for (disk, size, layers) in &plan.layers {
        if layers.is_empty() {
            continue;
        }
        for seg in resolve(layers, 0, *size) {
            match &seg.src {
                SegSrc::Base => continue,
                SegSrc::Zero => w.zero(*disk, seg.start, seg.end - seg.start)?,
                SegSrc::Data(frame) => {
                    let Some(data) = crate::view::read_frame(inner, frame)? else {
                        return Ok(false);
                    };
                    let from = (seg.start - frame.info.offset) as usize;
                    let to = from + (seg.end - seg.start) as usize;
                    let bytes = data.get(from..to).ok_or_else(|| {
                        ReplicaError::Damaged(format!(
                            "frame at byte {} of {} is shorter than indexed",
                            frame.info.frame_pos,
                            frame.journal.path.display()
                        ))
                    })?;
                    w.data(*disk, seg.start, bytes)?;
                }
            }
            frames += 1;
            if frames > FRAMES_PER_DELTA_MAX {
                tracing::warn!(vm = %inner.vm_id, a = plan.a, b = plan.b, "merge skipped: the result would exceed the per-delta frame bound");
                return Ok(false);
            }
            if first {
                first = false;
                failpoint::hit("merge.mid_write")?;
            }
        }
    }
    let (buf, _) = w.finish()?;
    let file = buf
        .into_inner()
        .map_err(|e| ReplicaError::io("write", path)(e.into_error()))?;
    durable::fsync_file(&file, path)?;
    Ok(true)
}
