//! One replicated VM: its immutable identity (id, key, disks, base images), its mutable state
//! (generation, base point, journal and index, damage) behind one lock, and recovery at open
//! (finish an interrupted fold, verify every journal file, quarantine what fails). Receiving,
//! folding and reading live in `receive`, `fold` and `view`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use delta::{DeltaHeader, DeltaKind, DeltaReader, DeltaSummary, DiskEntry};
use parking_lot::{Mutex, RwLock};
use proto::{Generation, Seq, VmName};

use crate::budget::IndexBudget;
use crate::fds::JournalFds;
use crate::index::{JournalFile, Layer};
use crate::manifest::{hex, key_from_hex, DiskRecord, Manifest, PointRecord};
use crate::{durable, fold, ReplicaError};

pub(crate) const BASE_DIR: &str = "base";
pub(crate) const JOURNAL_DIR: &str = "journal";
pub(crate) const INCOMING_DIR: &str = "incoming";
pub(crate) const QUARANTINE_DIR: &str = "quarantine";
const JOURNAL_SUFFIX: &str = ".delta";

/// A recovery point as listed to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointInfo {
    pub seq: Seq,
    pub cut_time_unix_ns: u64,
    pub kind: DeltaKind,
    /// Uncompressed bytes of DATA frames in the delta that made this point.
    pub data_bytes: u64,
    /// Bytes of ZERO frames in that delta.
    pub zero_bytes: u64,
    /// Encoded size of that delta.
    pub stored_bytes: u64,
    /// The cut was taken with the guest's filesystems frozen (an application-consistent point).
    pub app_consistent: bool,
}

impl PointInfo {
    pub(crate) fn from_delta(h: &DeltaHeader, s: &DeltaSummary) -> Self {
        PointInfo {
            seq: h.seq,
            cut_time_unix_ns: h.cut_time_unix_ns,
            kind: h.kind,
            data_bytes: s.data_bytes,
            zero_bytes: s.zero_bytes,
            stored_bytes: s.stored_bytes,
            app_consistent: h.app_consistent,
        }
    }

    fn to_record(self) -> PointRecord {
        PointRecord {
            seq: self.seq.get(),
            cut_time_unix_ns: self.cut_time_unix_ns,
            kind: self.kind.as_str().into(),
            data_bytes: self.data_bytes,
            zero_bytes: self.zero_bytes,
            stored_bytes: self.stored_bytes,
            app_consistent: self.app_consistent,
        }
    }

    fn from_record(r: &PointRecord) -> Option<Self> {
        Some(PointInfo {
            seq: Seq(r.seq),
            cut_time_unix_ns: r.cut_time_unix_ns,
            kind: DeltaKind::from_name(&r.kind)?,
            data_bytes: r.data_bytes,
            zero_bytes: r.zero_bytes,
            stored_bytes: r.stored_bytes,
            app_consistent: r.app_consistent,
        })
    }
}

/// A committed journal delta and its index layers (one per disk it touches).
pub(crate) struct JournalEntry {
    pub info: PointInfo,
    /// The file that holds this point's delta (replaced by a merge).
    pub file: Arc<JournalFile>,
    /// Frames of the delta, each an entry of the index (counted in the store's budget).
    pub frames: u64,
    pub layers: BTreeMap<u32, Arc<Layer>>,
}

/// Everything that changes, under one lock.
pub(crate) struct VmState {
    pub generation: u64,
    /// The base images' point while it is listed.
    pub base_point: Option<PointInfo>,
    /// The point whose content the base images hold (0: zeros).
    pub base_seq: u64,
    /// A fold of this journal seq into the base has started and not finished.
    pub folding: Option<u64>,
    pub journal: BTreeMap<u64, JournalEntry>,
    pub damage: Option<String>,
    /// The recovery-history policy (persisted; `None`: the newest 64 points are kept).
    pub history: Option<crate::HistoryPolicy>,
    /// Journal deltas that are no longer recovery points (retired by the policy), kept as
    /// layers of the points above them until a merge or a fold absorbs them (persisted).
    pub hidden: BTreeSet<u64>,
    pub removed: bool,
}

impl VmState {
    pub fn latest_seq(&self) -> u64 {
        self.journal
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.base_seq)
    }

    pub fn has_point(&self, seq: u64) -> bool {
        self.base_point.is_some_and(|b| b.seq == Seq(seq))
            || (self.journal.contains_key(&seq) && !self.hidden.contains(&seq))
    }

    /// Layers for point `seq` on `disk`, newest first.
    pub fn layers(&self, seq: u64, disk: u32) -> Vec<Arc<Layer>> {
        self.journal
            .range(..=seq)
            .rev()
            .filter_map(|(_, e)| e.layers.get(&disk).cloned())
            .collect()
    }
}

/// Decoded frames, most recent last, keyed by (journal seq, frame position).
pub(crate) type FrameCache = VecDeque<((u64, u64), Arc<Vec<u8>>)>;

/// A base image file.
pub(crate) struct BaseImage {
    pub path: PathBuf,
    pub file: File,
}

/// The shared body of a VM (views hold it by `Arc`).
pub(crate) struct VmInner {
    pub dir: PathBuf,
    pub vm_id: VmName,
    pub key: [u8; 32],
    pub disks: Vec<DiskEntry>,
    pub base: BTreeMap<u32, BaseImage>,
    pub state: RwLock<VmState>,
    /// Serializes commits, folds and manifest writes. Lock order: `mutate`, then `pins`, then
    /// `state`.
    pub mutate: Mutex<()>,
    /// Open views per point seq.
    pub pins: Mutex<BTreeMap<u64, usize>>,
    pub cache: Mutex<FrameCache>,
    pub next_incoming: AtomicU64,
    /// Epoch of the attempt allowed to write a first point straight into the base images (see
    /// "The first point, straight into the base" in the format doc). Every reset and every
    /// commit of a first point takes a new one; base writes and that commit hold this lock.
    /// Lock order: `mutate`, then `base_writer`, then `state`. Change it only through
    /// [`VmInner::set_first_point_epoch`].
    pub base_writer: Mutex<u64>,
    /// A copy of `base_writer`'s value, readable without the lock: the receiving thread checks
    /// it at every frame while the writer thread holds the lock for its writes.
    pub base_epoch: AtomicU64,
    /// Set when a journal commit failed after its file was renamed into place (e.g. the
    /// directory fsync failed): the journal on disk may hold a point the index does not, so
    /// every further commit is refused until the store is reopened and reads the journal
    /// again. In memory only: reopening is the cure.
    pub wedged: Mutex<Option<String>>,
    /// The compare of a resynchronization began against point `.0` while the VM's damage was
    /// `.1` (this process only): a compared `Full` delta on that point may clear that damage,
    /// never damage found since (`check_sequence`).
    pub compare_began: Mutex<Option<(u64, Option<String>)>>,
    /// The store's open journal files (shared by all its VMs, bounded).
    pub fds: Arc<JournalFds>,
    /// The store's count of indexed frames (shared by all its VMs, bounded).
    pub budget: Arc<IndexBudget>,
}

/// One replicated VM on the replica host.
pub struct ReplicaVm {
    pub(crate) inner: Arc<VmInner>,
}

impl ReplicaVm {
    pub fn vm_id(&self) -> &VmName {
        &self.inner.vm_id
    }

    /// Seq of the newest point; 0 when nothing was committed yet.
    pub fn latest_seq(&self) -> Seq {
        Seq(self.inner.state.read().latest_seq())
    }

    /// The cut time of the newest point (`latest_seq`), if there is one.
    pub fn latest_cut_unix_ns(&self) -> Option<u64> {
        let st = self.inner.state.read();
        match st.journal.values().next_back() {
            Some(e) if e.info.seq.get() >= st.base_seq => Some(e.info.cut_time_unix_ns),
            _ => st
                .base_point
                .filter(|b| b.seq.get() == st.latest_seq())
                .map(|b| b.cut_time_unix_ns),
        }
    }

    pub fn generation(&self) -> Generation {
        Generation(self.inner.state.read().generation)
    }

    pub fn disks(&self) -> Vec<DiskEntry> {
        self.inner.disks.clone()
    }

    /// Recovery points, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        let st = self.inner.state.read();
        st.base_point
            .into_iter()
            .chain(
                st.journal
                    .values()
                    .map(|e| e.info)
                    .filter(|p| !st.hidden.contains(&p.seq.get())),
            )
            .collect()
    }

    /// Why this VM's replica cannot be trusted past some point (a journal file failed
    /// validation), if so. Points before the damage stay readable. Cleared by a Full delta or
    /// [`ReplicaVm::clear_damage`].
    pub fn damage(&self) -> Option<String> {
        self.inner.state.read().damage.clone()
    }

    /// The byte ranges `(offset, len)` of `disk` that the points after `seq` wrote (coalesced,
    /// in order): where the newest point may differ from point `seq`. A failover to `seq`
    /// that is completed keeps point `seq`, and a reverse replication must send these ranges
    /// to a host that holds a later point.
    pub fn changed_after(&self, seq: Seq, disk: u32) -> Vec<(u64, u64)> {
        let st = self.inner.state.read();
        let all: Vec<(u64, u64)> = st
            .journal
            .range(seq.get().saturating_add(1)..)
            .filter_map(|(_, e)| e.layers.get(&disk))
            .flat_map(|l| l.ranges().collect::<Vec<_>>())
            .collect();
        drop(st);
        coalesce(all)
    }

    /// The byte ranges `(offset, len)` of `disk` that the points after `from` up to and
    /// including `to` wrote (coalesced, in order): where point `to` may differ from point
    /// `from`, from the journal's layers alone (nothing is read). Both must be points; the
    /// caller holds views of both (pins), so no retention can fold or merge across them while
    /// it uses the answer. `from` older than the base (its changes were folded into the base
    /// image, which keeps no history) cannot be answered: `ChangesUnknown`.
    pub fn changed_between(
        &self,
        from: Seq,
        to: Seq,
        disk: u32,
    ) -> Result<Vec<(u64, u64)>, ReplicaError> {
        self.inner.changed_between(from, to, disk)
    }

    /// A resynchronization's compare reads point `seq` (the primary asked for its hashes):
    /// remembers the damage known now, the only damage its compared `Full` delta may clear.
    /// The first request of a compare counts; a later one for the same point keeps it.
    pub fn note_compare(&self, seq: u64) {
        let damage = self.damage();
        let mut began = self.inner.compare_began.lock();
        if began.as_ref().map(|b| b.0) != Some(seq) {
            *began = Some((seq, damage));
        }
    }

    /// Forgets the recorded damage (the daemon resynchronized by other means).
    pub fn clear_damage(&self) -> Result<(), ReplicaError> {
        let _m = self.inner.mutate.lock();
        self.inner.update_manifest(|st| st.damage = None)
    }

    /// Raises the lineage generation (fencing after failover); deltas must then carry it.
    pub fn set_generation(&self, generation: Generation) -> Result<(), ReplicaError> {
        let generation = generation.get();
        let _m = self.inner.mutate.lock();
        let current = self.inner.state.read().generation;
        if generation < current {
            return Err(ReplicaError::GenerationRegression {
                current,
                requested: generation,
            });
        }
        self.inner.update_manifest(|st| st.generation = generation)
    }
}

/// `(start, end)` ranges sorted and merged where they touch or overlap, as `(offset, len)`.
fn coalesce(mut all: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some((_, last_end)) if s <= *last_end => *last_end = (*last_end).max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

impl VmInner {
    /// [`ReplicaVm::changed_between`].
    pub fn changed_between(
        &self,
        from: Seq,
        to: Seq,
        disk: u32,
    ) -> Result<Vec<(u64, u64)>, ReplicaError> {
        self.disk(disk)?;
        let st = self.state.read();
        for seq in [from, to] {
            if !st.has_point(seq.get()) {
                return Err(ReplicaError::NoSuchPoint { seq: seq.get() });
            }
        }
        if from > to || from.get() < st.base_seq {
            return Err(ReplicaError::ChangesUnknown {
                from: from.get(),
                to: to.get(),
            });
        }
        if from == to {
            return Ok(Vec::new());
        }
        let all: Vec<(u64, u64)> = st
            .journal
            .range(from.get() + 1..=to.get())
            .filter_map(|(_, e)| e.layers.get(&disk))
            .flat_map(|l| l.ranges().collect::<Vec<_>>())
            .collect();
        drop(st);
        Ok(coalesce(all))
    }

    /// Frames this VM has in the index now.
    pub fn indexed_frames(&self) -> u64 {
        self.state.read().journal.values().map(|e| e.frames).sum()
    }

    /// The file of a received delta `seq` (its parent is `seq - 1`).
    pub fn journal_path(&self, seq: u64) -> PathBuf {
        self.dir
            .join(JOURNAL_DIR)
            .join(format!("{seq:020}{JOURNAL_SUFFIX}"))
    }

    /// The file of point `seq` on parent `parent`: a merge result when `parent < seq - 1`.
    pub fn journal_path_of(&self, seq: u64, parent: u64) -> PathBuf {
        if parent.checked_add(1) == Some(seq) {
            return self.journal_path(seq);
        }
        self.dir
            .join(JOURNAL_DIR)
            .join(format!("{seq:020}-{parent:020}{JOURNAL_SUFFIX}"))
    }

    pub fn disk(&self, index: u32) -> Result<&DiskEntry, ReplicaError> {
        self.disks
            .iter()
            .find(|d| d.index == index)
            .ok_or(ReplicaError::NoSuchDisk { disk: index })
    }

    pub fn manifest_of(&self, st: &VmState) -> Manifest {
        Manifest {
            vm_id: self.vm_id.clone(),
            generation: st.generation,
            key: hex(&self.key),
            disks: self
                .disks
                .iter()
                .map(|d| DiskRecord {
                    index: d.index,
                    size_bytes: d.size_bytes,
                })
                .collect(),
            base_point: st.base_point.map(PointInfo::to_record),
            base_seq: st.base_seq,
            folding: st.folding,
            damage: st.damage.clone(),
            history: st.history,
            hidden: st.hidden.iter().copied().collect(),
        }
    }

    /// Applies `change` to a copy of the state's persisted part, writes the manifest durably,
    /// and only then changes the in-memory state. Caller holds `mutate`.
    pub fn update_manifest(&self, change: impl FnOnce(&mut VmState)) -> Result<(), ReplicaError> {
        let mut st = self.state.write();
        let mut next = VmState {
            generation: st.generation,
            base_point: st.base_point,
            base_seq: st.base_seq,
            folding: st.folding,
            journal: BTreeMap::new(),
            damage: st.damage.clone(),
            history: st.history,
            hidden: st.hidden.clone(),
            removed: st.removed,
        };
        change(&mut next);
        // Folded seqs are no journal deltas any more.
        let base = next.base_seq;
        next.hidden.retain(|&s| s > base);
        self.manifest_of(&next).store(&self.dir)?;
        st.generation = next.generation;
        st.base_point = next.base_point;
        st.base_seq = next.base_seq;
        st.folding = next.folding;
        st.damage = next.damage;
        st.history = next.history;
        st.hidden = next.hidden;
        Ok(())
    }

    /// Makes every base image an all-zero sparse file of its disk's size. Only while no point
    /// exists (the base's content is then visible to no one); caller holds `base_writer` or
    /// has the VM to itself (open).
    pub fn reset_base(&self) -> Result<(), ReplicaError> {
        for d in &self.disks {
            let b = self
                .base
                .get(&d.index)
                .ok_or(ReplicaError::NoSuchDisk { disk: d.index })?;
            b.file
                .set_len(0)
                .and_then(|()| b.file.set_len(d.size_bytes))
                .map_err(ReplicaError::io("reset base image", &b.path))?;
        }
        Ok(())
    }

    /// Starts an attempt at the first point: supersedes any earlier attempt, resets the base
    /// images to zeros, and returns the attempt's epoch. Refused once a point exists.
    pub fn begin_first_point(&self) -> Result<u64, ReplicaError> {
        let mut epoch = self.base_writer.lock();
        {
            let st = self.state.read();
            if st.removed {
                return Err(ReplicaError::Removed {
                    vm_id: self.vm_id.to_string(),
                });
            }
            let latest = st.latest_seq();
            if latest != 0 || st.folding.is_some() {
                return Err(ReplicaError::OutOfSequence {
                    expected: latest + 1,
                    got: 1,
                });
            }
        }
        if *epoch == FIRST_POINT_POISONED {
            return Err(ReplicaError::Damaged(
                "the manifest write of the first point failed; reopen the store before another attempt".into(),
            ));
        }
        let next = *epoch + 1;
        self.set_first_point_epoch(&mut epoch, next);
        self.reset_base()?;
        Ok(next)
    }

    /// Sets the current first-point epoch (the caller holds `base_writer`: `current`).
    pub fn set_first_point_epoch(&self, current: &mut u64, epoch: u64) {
        *current = epoch;
        self.base_epoch.store(epoch, Ordering::Release);
    }

    /// Whether attempt `epoch` is still the current one (a hint without the lock: a write
    /// itself goes through [`VmInner::write_first_point`], which decides under the lock).
    pub fn first_point_current(&self, epoch: u64) -> bool {
        self.base_epoch.load(Ordering::Acquire) == epoch
    }

    /// Runs `write` on the base images if attempt `epoch` is still the current one.
    pub fn write_first_point<T>(
        &self,
        epoch: u64,
        write: impl FnOnce(&BTreeMap<u32, BaseImage>) -> Result<T, ReplicaError>,
    ) -> Result<T, ReplicaError> {
        let current = self.base_writer.lock();
        if *current != epoch {
            return Err(superseded());
        }
        write(&self.base)
    }

    /// Refuses a delta header that does not belong to this VM. `exact_generation`: at commit
    /// the generation must equal the VM's; at open an older one is fine (raised since).
    pub fn check_header(
        &self,
        h: &DeltaHeader,
        generation: u64,
        exact_generation: bool,
    ) -> Result<(), ReplicaError> {
        if h.vm_id != self.vm_id {
            return Err(ReplicaError::WrongVm {
                expected: self.vm_id.to_string(),
                got: h.vm_id.to_string(),
            });
        }
        let got = h.generation.get();
        let ok = if exact_generation {
            got == generation
        } else {
            got <= generation
        };
        if !ok {
            return Err(ReplicaError::WrongGeneration {
                expected: generation,
                got,
            });
        }
        let mut a = h.disks.clone();
        let mut b = self.disks.clone();
        a.sort_by_key(|d| d.index);
        b.sort_by_key(|d| d.index);
        if a != b {
            return Err(ReplicaError::DiskMismatch);
        }
        Ok(())
    }

    /// Opens a journal file, verifies it completely and builds its index layers. The file is
    /// closed again when done: the index refers to it by name (reads go through `fds`).
    pub(crate) fn load_journal(
        &self,
        seq: u64,
        parent: u64,
        path: &Path,
        generation: u64,
    ) -> Result<JournalEntry, ReplicaError> {
        self.load_journal_as(seq, parent, path, path.to_owned(), generation)
    }

    /// [`VmInner::load_journal`] of the file at `read`, indexed under the name `name` (a merge
    /// indexes its result before renaming it into place).
    pub(crate) fn load_journal_as(
        &self,
        seq: u64,
        parent: u64,
        read: &Path,
        name: PathBuf,
        generation: u64,
    ) -> Result<JournalEntry, ReplicaError> {
        let file = crate::failpoint::hit_os("journal.open", libc::EMFILE)
            .and_then(|()| File::open(read))
            .map_err(ReplicaError::io("open", read))?;
        let journal = JournalFile::new(seq, name);
        let mut r = DeltaReader::new(BufReader::new(file), &self.key)?;
        let h = r.header().clone();
        self.check_header(&h, generation, false)?;
        if h.seq != Seq(seq) || h.parent_seq != Seq(parent) {
            return Err(ReplicaError::OutOfSequence {
                expected: seq,
                got: h.seq.get(),
            });
        }
        let mut layers: BTreeMap<u32, Layer> = BTreeMap::new();
        let mut frames = 0u64;
        while let Some(info) = r.next_frame_info()? {
            frames += 1;
            layers
                .entry(info.disk)
                .or_default()
                .insert_frame(&journal, info);
        }
        let summary = *r.summary().ok_or(ReplicaError::Incomplete {
            received_bytes: r.position(),
        })?;
        Ok(JournalEntry {
            info: PointInfo::from_delta(&h, &summary),
            file: journal,
            frames,
            layers: layers.into_iter().map(|(d, l)| (d, Arc::new(l))).collect(),
        })
    }
}

/// Opens a VM directory, recovering from any crash (see the "Open" section of the format doc).
/// A transient failure (out of file descriptors or memory: [`ReplicaError::is_transient`])
/// fails the open and changes nothing: it is never taken for damage.
pub(crate) fn open_vm(
    dir: &Path,
    fds: Arc<JournalFds>,
    budget: Arc<IndexBudget>,
) -> Result<ReplicaVm, ReplicaError> {
    let m = Manifest::load(dir)?;
    let bad = |reason: &str| ReplicaError::Manifest {
        path: dir.join(crate::manifest::MANIFEST_FILE),
        reason: reason.into(),
    };
    let key = key_from_hex(&m.key).ok_or_else(|| bad("bad key"))?;
    let base_point = match &m.base_point {
        Some(r) => Some(PointInfo::from_record(r).ok_or_else(|| bad("unknown point kind"))?),
        None => None,
    };
    // Leftovers of interrupted receives and manifest writes; kept prefixes of interrupted
    // uploads stay (the stale ones go once the latest point is known, below).
    let incoming = dir.join(INCOMING_DIR);
    durable::create_dir(&incoming)?;
    crate::receive::clean_incoming(&incoming, None)?;
    durable::remove_file(&dir.join(format!(
        "{}{}",
        crate::manifest::MANIFEST_FILE,
        durable::TMP_SUFFIX
    )))?;
    let disks: Vec<DiskEntry> = m
        .disks
        .iter()
        .map(|d| DiskEntry {
            index: d.index,
            size_bytes: d.size_bytes,
        })
        .collect();
    let mut base = BTreeMap::new();
    for d in &disks {
        let path = base_path(dir, d.index);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(ReplicaError::io("open base image", &path))?;
        let len = file
            .metadata()
            .map_err(ReplicaError::io("stat", &path))?
            .len();
        if len != d.size_bytes {
            return Err(ReplicaError::Damaged(format!(
                "base image {} is {len} bytes, disk {} is {}",
                path.display(),
                d.index,
                d.size_bytes
            )));
        }
        base.insert(d.index, BaseImage { path, file });
    }
    let inner = Arc::new(VmInner {
        dir: dir.to_owned(),
        vm_id: m.vm_id.clone(),
        key,
        disks,
        base,
        state: RwLock::new(VmState {
            generation: m.generation,
            base_point,
            base_seq: m.base_seq,
            folding: m.folding,
            journal: BTreeMap::new(),
            damage: m.damage.clone(),
            history: m.history,
            hidden: m.hidden.iter().copied().collect(),
            removed: false,
        }),
        mutate: Mutex::new(()),
        pins: Mutex::new(BTreeMap::new()),
        cache: Mutex::new(VecDeque::new()),
        next_incoming: AtomicU64::new(1),
        base_writer: Mutex::new(0),
        base_epoch: AtomicU64::new(0),
        wedged: Mutex::new(None),
        compare_began: Mutex::new(None),
        fds,
        budget,
    });
    recover_journal(&inner, &m)?;
    let no_point = {
        let st = inner.state.read();
        st.latest_seq() == 0 && st.folding.is_none()
    };
    if no_point {
        // Frees what an interrupted first point left in the base; never visible (no point).
        inner.reset_base()?;
    }
    let next = inner.state.read().latest_seq() + 1;
    crate::receive::clean_incoming(&incoming, Some(next))?;
    // Only now, when the VM is kept: a failed open's index is dropped with it.
    inner.budget.add(inner.indexed_frames());
    Ok(ReplicaVm { inner })
}

/// A journal file by name: point `seq` on parent `parent`.
#[derive(Debug, Clone)]
struct JournalName {
    seq: u64,
    parent: u64,
    path: PathBuf,
}

/// Parses `<seq>.delta` (parent `seq - 1`) and `<seq>-<parent>.delta` (a merge result).
fn parse_journal_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(JOURNAL_SUFFIX)?;
    let digits = |t: &str| {
        (t.len() == 20 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u64>().ok())
            .flatten()
    };
    match stem.split_once('-') {
        None => {
            let seq = digits(stem)?;
            Some((seq, seq.checked_sub(1)?))
        }
        Some((a, b)) => {
            let (seq, parent) = (digits(a)?, digits(b)?);
            (parent < seq).then_some((seq, parent))
        }
    }
}

/// Lists `journal/` by name, ignoring names that are not ours, in (seq, parent) order.
fn list_journal(dir: &Path) -> Result<Vec<JournalName>, ReplicaError> {
    let jdir = dir.join(JOURNAL_DIR);
    let mut out = Vec::new();
    for entry in fs::read_dir(&jdir).map_err(ReplicaError::io("list", &jdir))? {
        let entry = entry.map_err(ReplicaError::io("list", &jdir))?;
        let name = entry.file_name();
        let Some((seq, parent)) = name.to_str().and_then(parse_journal_name) else {
            tracing::warn!(file = ?entry.path(), "ignoring unexpected file in the journal");
            continue;
        };
        out.push(JournalName {
            seq,
            parent,
            path: entry.path(),
        });
    }
    out.sort_by_key(|n| (n.seq, n.parent));
    Ok(out)
}

/// What the names of the journal files say (the "Merge" section of the format doc): the chain
/// of points from `base_seq`, the files superseded by a merge that a crash interrupted before
/// its deletions, and where the chain breaks (that file and every later one).
struct Resolved {
    chain: Vec<JournalName>,
    superseded: Vec<JournalName>,
    broken: Vec<JournalName>,
}

fn resolve_names(files: Vec<JournalName>, base_seq: u64) -> Resolved {
    let mut superseded = Vec::new();
    // Per seq, the file with the smallest parent wins (a merge only ever lowers a parent).
    let mut winners: BTreeMap<u64, JournalName> = BTreeMap::new();
    for f in files {
        match winners.get(&f.seq) {
            Some(w) if w.parent <= f.parent => superseded.push(f),
            _ => {
                if let Some(old) = winners.insert(f.seq, f) {
                    superseded.push(old);
                }
            }
        }
    }
    let mut chain: Vec<JournalName> = Vec::new();
    let mut broken = Vec::new();
    for f in winners.into_values() {
        if !broken.is_empty() {
            broken.push(f);
            continue;
        }
        let prev = chain.last().map_or(base_seq, |c| c.seq);
        if f.parent < prev {
            // A merge into `f` whose deletions a crash interrupted: it replaces the points
            // above its parent.
            while chain.last().is_some_and(|c| c.seq > f.parent) {
                if let Some(c) = chain.pop() {
                    superseded.push(c);
                }
            }
        }
        let prev = chain.last().map_or(base_seq, |c| c.seq);
        if f.parent == prev {
            chain.push(f);
        } else {
            broken.push(f);
        }
    }
    Resolved {
        chain,
        superseded,
        broken,
    }
}

fn recover_journal(inner: &Arc<VmInner>, m: &Manifest) -> Result<(), ReplicaError> {
    let _m = inner.mutate.lock();
    let mut files = list_journal(&inner.dir)?;
    let generation = m.generation;
    let mut new_damage: Option<String> = None;
    if let Some(s) = m.folding {
        // A fold was interrupted: point base_seq is already gone; finish it. Its file is the
        // one of seq s with the smallest parent (a merge result, if any).
        let path = files
            .iter()
            .find(|f| f.seq == s)
            .map_or_else(|| inner.journal_path(s), |f| f.path.clone());
        match inner.load_journal(s, m.base_seq, &path, generation) {
            Ok(entry) => fold::finish_fold(inner, entry)?,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                new_damage = Some(format!(
                    "interrupted fold of journal seq {s} cannot complete: {e}"
                ));
                inner.update_manifest(|st| st.folding = None)?;
            }
        }
        files = list_journal(&inner.dir)?;
    }
    let base_seq = inner.state.read().base_seq;
    let mut live = Vec::new();
    for f in files {
        if f.seq <= base_seq {
            // Folded already; the crash came before its deletion.
            durable::remove_file(&f.path)?;
        } else {
            live.push(f);
        }
    }
    let Resolved {
        chain,
        superseded,
        mut broken,
    } = resolve_names(live, base_seq);
    if let Some(b) = broken.first() {
        new_damage.get_or_insert(format!(
            "journal {}: point {} on parent {} does not continue the chain",
            b.path.display(),
            b.seq,
            b.parent
        ));
    }
    let mut loaded = Vec::new();
    let mut failed: Vec<JournalName> = Vec::new();
    for f in chain {
        if !failed.is_empty() {
            failed.push(f);
            continue;
        }
        match inner.load_journal(f.seq, f.parent, &f.path, generation) {
            Ok(entry) => loaded.push(entry),
            // Out of descriptors or memory says nothing about the file: nothing is
            // quarantined or recorded, and the VM opens once the resource is back.
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::error!(vm = %inner.vm_id, seq = f.seq, error = %e, "journal file failed validation");
                new_damage = Some(format!("journal {}: {e}", f.path.display()));
                failed.push(f);
            }
        }
    }
    {
        let mut st = inner.state.write();
        for entry in loaded {
            st.journal.insert(entry.info.seq.get(), entry);
        }
        // Seqs a merge absorbed are gone (written back with the next manifest).
        let VmState {
            hidden, journal, ..
        } = &mut *st;
        hidden.retain(|s| journal.contains_key(s));
    }
    failed.append(&mut broken);
    if failed.is_empty() {
        for f in &superseded {
            durable::remove_file(&f.path)?;
        }
    } else {
        // Keep what a merge superseded next to what failed: it may be what an admin needs.
        failed.extend(superseded);
        let qdir = inner.dir.join(QUARANTINE_DIR);
        durable::create_dir(&qdir)?;
        for f in &failed {
            if let Some(name) = f.path.file_name() {
                // Never overwrite an earlier quarantined copy.
                let mut target = qdir.join(name);
                let mut n = 1;
                while target.exists() {
                    target = qdir.join(format!("{}.{n}", name.to_string_lossy()));
                    n += 1;
                }
                durable::rename(&f.path, &target)?;
            }
        }
    }
    if let Some(d) = new_damage {
        inner.update_manifest(|st| st.damage = Some(d))?;
    }
    Ok(())
}

/// `base_writer` value after a first point's manifest write failed (see `commit_first_point`).
pub(crate) const FIRST_POINT_POISONED: u64 = u64::MAX;

pub(crate) fn superseded() -> ReplicaError {
    ReplicaError::ReceiveFailed("superseded by a newer attempt at the first point".into())
}

pub(crate) fn base_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(BASE_DIR).join(format!("disk-{index}.raw"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(seq: u64, parent: u64) -> JournalName {
        JournalName {
            seq,
            parent,
            path: PathBuf::from(format!("{seq}-{parent}")),
        }
    }

    fn seqs(v: &[JournalName]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = v.iter().map(|f| (f.seq, f.parent)).collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn journal_names_parse_both_forms_and_nothing_else() {
        assert_eq!(
            parse_journal_name("00000000000000000003.delta"),
            Some((3, 2))
        );
        assert_eq!(
            parse_journal_name("00000000000000000009-00000000000000000004.delta"),
            Some((9, 4))
        );
        for bad in [
            "3.delta",
            "00000000000000000000.delta",
            "00000000000000000004-00000000000000000009.delta",
            "00000000000000000004-0000000000000000000x.delta",
            "00000000000000000004.delta.tmp",
        ] {
            assert_eq!(parse_journal_name(bad), None, "{bad}");
        }
    }

    /// What open concludes from the names a merge interrupted at each step leaves behind.
    #[test]
    fn merge_leftovers_resolve_to_the_merge_result() {
        // Crash after the rename, before any deletion: 2 merged into 3.
        let r = resolve_names(vec![n(2, 1), n(3, 2), n(3, 1), n(4, 3)], 1);
        assert_eq!(seqs(&r.chain), vec![(3, 1), (4, 3)]);
        assert_eq!(seqs(&r.superseded), vec![(2, 1), (3, 2)]);
        assert!(r.broken.is_empty());
        // After a's file was deleted, before b's old one was.
        let r = resolve_names(vec![n(3, 2), n(3, 1)], 1);
        assert_eq!(seqs(&r.chain), vec![(3, 1)]);
        assert_eq!(seqs(&r.superseded), vec![(3, 2)]);
        // A merge into a later point: 3 merged into 4 (4's new parent is 2).
        let r = resolve_names(vec![n(2, 1), n(3, 2), n(4, 3), n(4, 2)], 1);
        assert_eq!(seqs(&r.chain), vec![(2, 1), (4, 2)]);
        assert_eq!(seqs(&r.superseded), vec![(3, 2), (4, 3)]);
    }

    #[test]
    fn a_gap_in_the_chain_is_broken_from_there() {
        let r = resolve_names(vec![n(2, 1), n(4, 3), n(5, 4)], 1);
        assert_eq!(seqs(&r.chain), vec![(2, 1)]);
        assert_eq!(seqs(&r.broken), vec![(4, 3), (5, 4)]);
        // A parent below the base cannot be resolved either.
        let r = resolve_names(vec![n(6, 2)], 4);
        assert!(r.chain.is_empty());
        assert_eq!(seqs(&r.broken), vec![(6, 2)]);
    }
}
