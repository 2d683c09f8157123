//! Reading points: [`PointView`], a read-only `nbd::BlockBackend` over one disk at one point,
//! and [`ReplicaVm::export_raw`]. Reads resolve ranges through the index, re-read stored frames
//! whole with their checksum verified (a small cache of decoded frames serves sequential
//! reads), and never return bytes from a frame that fails verification.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use delta::{decode_stored_frame, FrameKind};
use nbd::BlockBackend;
use nbd::Extent;
use proto::Seq;

use crate::index::{resolve, FrameRef, SegSrc};
use crate::vm::{ReplicaVm, VmInner};
use crate::{durable, payload, ReplicaError, FRAME_CACHE_ENTRIES};

/// Most extents one block-status answer carries; the NBD client asks again for the rest.
const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;
/// Export reads and writes in pieces of this size (bounded memory).
const EXPORT_CHUNK_BYTES: u64 = 4 << 20;
const BLOCK: usize = delta::BLOCK_BYTES as usize;
/// Times one read resolves its ranges again because retention retired a journal file under
/// it. Each retry follows a fold, which a VM does at most once per retained point per
/// retention pass, so reaching this means the files vanish for another reason.
const RETIRED_RETRIES_MAX: usize = 1024;

/// The NBD metadata context of a point's blocks changed since an older point `<ID>`:
/// `qemu:dirty-bitmap:since-<ID>` (flag 1: changed), the interface QEMU-based backup tools
/// read with NBD_CMD_BLOCK_STATUS (`docs/formats/nbd.md`).
pub const CHANGED_SINCE_CONTEXT_PREFIX: &str = "qemu:dirty-bitmap:since-";
/// The dirty flag of a `qemu:dirty-bitmap:` context.
const DIRTY: u32 = 1;

/// A read-only view of one disk at one recovery point. Retention never folds away what it
/// reads while it exists.
pub struct PointView {
    vm: Arc<VmInner>,
    seq: u64,
    disk: u32,
    size_bytes: u64,
}

impl ReplicaVm {
    /// A read-only view of `disk` at point `seq`, for NBD export or backup.
    pub fn point_disk(&self, seq: Seq, disk: u32) -> Result<Arc<dyn BlockBackend>, ReplicaError> {
        Ok(Arc::new(self.view(seq, disk)?))
    }

    /// Same as [`ReplicaVm::point_disk`], with the concrete type.
    pub fn view(&self, seq: Seq, disk: u32) -> Result<PointView, ReplicaError> {
        let seq = seq.get();
        let vm = &self.inner;
        let size_bytes = vm.disk(disk)?.size_bytes;
        // Lock order: pins, then state (as in fold).
        let mut pins = vm.pins.lock();
        if !vm.state.read().has_point(seq) {
            return Err(ReplicaError::NoSuchPoint { seq });
        }
        *pins.entry(seq).or_insert(0) += 1;
        Ok(PointView {
            vm: vm.clone(),
            seq,
            disk,
            size_bytes,
        })
    }

    /// Writes `disk` at point `seq` to `to` as a sparse raw image (zero ranges left as holes),
    /// through a temporary file that is fsynced and renamed into place.
    pub fn export_raw(&self, seq: Seq, disk: u32, to: &Path) -> Result<(), ReplicaError> {
        self.export_raw_reporting(seq, disk, to, &|_, _| {})
    }

    /// [`Self::export_raw`], calling `progress(done, total)` bytes after each chunk.
    pub fn export_raw_reporting(
        &self,
        seq: Seq,
        disk: u32,
        to: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<(), ReplicaError> {
        let view = self.view(seq, disk)?;
        let mut tmp = to.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = Path::new(&tmp);
        let result = export_to(&view, tmp, progress).and_then(|()| durable::rename(tmp, to));
        if result.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        result
    }
}

fn export_to(
    view: &PointView,
    tmp: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<(), ReplicaError> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(ReplicaError::io("create", tmp))?;
    f.set_len(view.size_bytes)
        .map_err(ReplicaError::io("resize", tmp))?;
    let mut buf = Vec::new();
    let mut off = 0u64;
    while off < view.size_bytes {
        let n = EXPORT_CHUNK_BYTES.min(view.size_bytes - off);
        let extents = view.status(off, n)?;
        for e in extents {
            if !e.zero {
                buf.resize(e.len_bytes as usize, 0);
                view.read_range(&mut buf, off)?;
                write_nonzero_blocks(&f, &buf, off).map_err(ReplicaError::io("write", tmp))?;
            }
            off += e.len_bytes;
        }
        progress(off, view.size_bytes);
    }
    durable::fsync_file(&f, tmp)
}

/// Writes the runs of non-zero 4 KiB blocks of `buf` (at `offset`), leaving zero blocks as holes.
fn write_nonzero_blocks(f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let is_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        let block = |i: usize| &buf[i..(i + BLOCK).min(buf.len())];
        if is_zero(block(i)) {
            i += BLOCK;
            continue;
        }
        let start = i;
        while i < buf.len() && !is_zero(block(i)) {
            i += BLOCK;
        }
        let end = i.min(buf.len());
        f.write_all_at(&buf[start..end], offset + start as u64)?;
    }
    Ok(())
}

impl PointView {
    pub fn seq(&self) -> Seq {
        Seq(self.seq)
    }

    pub fn disk(&self) -> u32 {
        self.disk
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ReplicaError::Io {
                op: "read beyond the end of the disk",
                path: self.vm.dir.clone(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            }),
        }
    }

    /// Read-ahead hint for the base image's `offset..offset+len` (speed only; errors ignored):
    /// a resync's compare reads a point sequentially.
    pub fn will_need(&self, offset: u64, len: u64) {
        if let Some(base) = self.vm.base.get(&self.disk) {
            let _ = sysutil::will_need(&base.file, offset, len);
        }
    }

    /// Fills `buf` with the point's bytes at `offset`.
    pub fn read_range(&self, buf: &mut [u8], offset: u64) -> Result<(), ReplicaError> {
        self.check_range(offset, buf.len() as u64)?;
        let base = self
            .vm
            .base
            .get(&self.disk)
            .ok_or(ReplicaError::NoSuchDisk { disk: self.disk })?;
        // A fold may retire a journal file between taking the layers and opening it; its
        // bytes are then in the base, and reading again through the current layers finds
        // them. Every retry follows a fold, and folds only shorten the layer list.
        'attempt: for _ in 0..RETIRED_RETRIES_MAX {
            let layers = self.vm.state.read().layers(self.seq, self.disk);
            for seg in resolve(&layers, offset, offset + buf.len() as u64) {
                let out = &mut buf[(seg.start - offset) as usize..(seg.end - offset) as usize];
                match seg.src {
                    SegSrc::Zero => out.fill(0),
                    SegSrc::Base => base
                        .file
                        .read_exact_at(out, seg.start)
                        .map_err(ReplicaError::io("read base image", &base.path))?,
                    SegSrc::Data(frame) => {
                        let Some(data) = read_frame(&self.vm, &frame)? else {
                            continue 'attempt;
                        };
                        let from = (seg.start - frame.info.offset) as usize;
                        out.copy_from_slice(&data[from..from + out.len()]);
                    }
                }
            }
            return Ok(());
        }
        Err(ReplicaError::Damaged(format!(
            "point {} of {}: its journal files kept disappearing while being read",
            self.seq, self.vm.vm_id
        )))
    }

    /// Allocation status from `offset`: ZERO frames and holes of the base image read as
    /// zero/hole, everything else as data. Adjacent runs with equal flags are merged.
    pub fn status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ReplicaError> {
        self.check_range(offset, len)?;
        let layers = self.vm.state.read().layers(self.seq, self.disk);
        let base = self
            .vm
            .base
            .get(&self.disk)
            .ok_or(ReplicaError::NoSuchDisk { disk: self.disk })?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |len_bytes: u64, zero: bool| match out.last_mut() {
            Some(last) if last.zero == zero => last.len_bytes += len_bytes,
            _ => out.push(Extent {
                len_bytes,
                hole: zero,
                zero,
            }),
        };
        for seg in resolve(&layers, offset, offset + len) {
            match seg.src {
                SegSrc::Zero => push(seg.end - seg.start, true),
                SegSrc::Data(_) => push(seg.end - seg.start, false),
                SegSrc::Base => {
                    for (len, hole) in base_runs(&base.file, seg.start, seg.end) {
                        push(len, hole);
                    }
                }
            }
        }
        out.truncate(BLOCK_STATUS_EXTENTS_MAX);
        if out.is_empty() {
            out.push(Extent {
                len_bytes: len,
                hole: false,
                zero: false,
            });
        }
        Ok(out)
    }
}

/// Data/hole runs of `[start, end)` of a sparse file (SEEK_DATA / SEEK_HOLE). When the file
/// system cannot say, everything is data (always correct, merely less sparse).
fn base_runs(file: &File, start: u64, end: u64) -> Vec<(u64, bool)> {
    let mut runs = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match sysutil::seek_data(file, pos) {
            Ok(Some(d)) => d.min(end),
            // ENXIO: only a hole follows.
            Ok(None) => end,
            Err(_) => {
                runs.push((end - pos, false));
                break;
            }
        };
        if data > pos {
            runs.push((data - pos, true));
            pos = data;
            continue;
        }
        let hole = sysutil::seek_hole(file, pos)
            .ok()
            .flatten()
            .unwrap_or(end)
            .min(end)
            .max(pos + 1);
        runs.push((hole - pos, false));
        pos = hole;
    }
    runs
}

/// The decoded bytes of a stored frame, from the cache or re-read and verified. `None`: the
/// journal file was folded into the base or merged into a newer file, and deleted, since the
/// caller took its layers (read again). Running out of descriptors or memory is a transient error, never damage.
pub(crate) fn read_frame(
    vm: &VmInner,
    frame: &FrameRef,
) -> Result<Option<Arc<Vec<u8>>>, ReplicaError> {
    let key = (frame.journal.id, frame.info.frame_pos);
    if let Some((_, data)) = vm.cache.lock().iter().find(|(k, _)| *k == key) {
        return Ok(Some(data.clone()));
    }
    let damaged = |reason: String| {
        let msg = format!("journal {}: {reason}", frame.journal.path.display());
        tracing::error!(vm = %vm.vm_id, "{msg}");
        vm.state.write().damage.get_or_insert_with(|| msg.clone());
        ReplicaError::Damaged(msg)
    };
    let file = match vm.fds.get(&frame.journal.path) {
        Ok(f) => f,
        Err(e) if e.is_transient() => return Err(e),
        Err(e) => {
            let st = vm.state.read();
            if st.removed {
                return Err(ReplicaError::Removed {
                    vm_id: vm.vm_id.to_string(),
                });
            }
            // Folded into the base, or merged into a newer file of the same point: the
            // caller's layers are stale, read again through the current ones.
            let current = st
                .journal
                .get(&frame.journal.seq)
                .is_some_and(|e| Arc::ptr_eq(&e.file, &frame.journal));
            if !current {
                return Ok(None);
            }
            drop(st);
            return Err(damaged(e.to_string()));
        }
    };
    let mut stored = vec![0u8; frame.info.frame_len() as usize];
    if let Err(e) = file.read_exact_at(&mut stored, frame.info.frame_pos) {
        if crate::fds::is_transient_io(&e) {
            return Err(ReplicaError::io("read", &frame.journal.path)(e));
        }
        return Err(damaged(format!(
            "reading frame at byte {}: {e}",
            frame.info.frame_pos
        )));
    }
    let parsed =
        decode_stored_frame(&stored, frame.info.frame_pos).map_err(|e| damaged(e.to_string()))?;
    if parsed.info != frame.info {
        return Err(damaged(format!(
            "frame at byte {} is not the indexed one",
            frame.info.frame_pos
        )));
    }
    let data = match parsed.info.kind {
        FrameKind::Zero => Vec::new(),
        FrameKind::Data => payload::decode_owned(parsed.payload, &parsed.info)
            .map_err(|e| damaged(e.to_string()))?,
    };
    let data = Arc::new(data);
    let mut cache = vm.cache.lock();
    if cache.len() >= FRAME_CACHE_ENTRIES {
        cache.pop_front();
    }
    cache.push_back((key, data.clone()));
    Ok(Some(data))
}

impl Drop for PointView {
    fn drop(&mut self) {
        let mut pins = self.vm.pins.lock();
        if let Some(n) = pins.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.seq);
            }
        }
    }
}

fn to_io(e: ReplicaError) -> io::Error {
    match e {
        ReplicaError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl BlockBackend for PointView {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_range(buf, offset).map_err(to_io)
    }

    fn write_at(&self, _data: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len_bytes: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len_bytes: u64,
        _may_trim: bool,
        _fua: bool,
    ) -> io::Result<()> {
        Err(read_only())
    }

    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        self.status(offset, len_bytes).map_err(to_io)
    }

    /// `qemu:dirty-bitmap:since-<ID>` for every older point whose changes up to this one are
    /// known (not folded into the base).
    fn meta_contexts(&self, prefix: &str) -> Vec<String> {
        let st = self.vm.state.read();
        let base = st.base_point.map(|p| p.seq.get());
        base.into_iter()
            .chain(st.journal.keys().copied())
            .filter(|&p| p < self.seq && p >= st.base_seq && st.has_point(p))
            .map(|p| format!("{CHANGED_SINCE_CONTEXT_PREFIX}{p}"))
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    fn has_meta_context(&self, name: &str) -> bool {
        self.changed_since(name).is_ok()
    }

    /// Changed (1) and unchanged (0) runs of the range since the context's point, from the
    /// index (computed per request: O(L · F) for the L deltas in between). The older point
    /// is not pinned: once retention retired it, the context's requests fail (serve the
    /// older point too to keep it).
    fn meta_status(&self, name: &str, offset: u64, len_bytes: u64) -> io::Result<Vec<(u64, u32)>> {
        let changed = self.changed_since(name).map_err(to_io)?;
        let end = offset.saturating_add(len_bytes);
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut push = |len: u64, flags: u32| match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => out.push((len, flags)),
        };
        let mut pos = offset;
        let first = changed.partition_point(|&(o, l)| o + l <= offset);
        for &(o, l) in &changed[first..] {
            if pos >= end || o >= end {
                break;
            }
            if o > pos {
                push(o - pos, 0);
                pos = o;
            }
            let stop = (o + l).min(end);
            if stop > pos {
                push(stop - pos, DIRTY);
                pos = stop;
            }
        }
        if pos < end {
            push(end - pos, 0);
        }
        out.truncate(BLOCK_STATUS_EXTENTS_MAX);
        Ok(out)
    }
}

impl PointView {
    /// The ranges changed since the point a `qemu:dirty-bitmap:since-<ID>` context names.
    fn changed_since(&self, context: &str) -> Result<Vec<(u64, u64)>, ReplicaError> {
        let from = context
            .strip_prefix(CHANGED_SINCE_CONTEXT_PREFIX)
            .and_then(|id| id.parse::<u64>().ok())
            .filter(|&id| id < self.seq)
            .ok_or(ReplicaError::ChangesUnknown {
                from: 0,
                to: self.seq,
            })?;
        self.vm.changed_between(Seq(from), Seq(self.seq), self.disk)
    }
}
