//! Receiving and committing a delta. [`Incoming`] validates the bytes with a push decoder
//! (bounded memory: one frame) and, once the header says which, either streams them into
//! `incoming/<n>.partial` (every later delta; [`ReplicaVm::commit`] checks sequence and lineage,
//! makes the file durable, renames it into the journal, and only then publishes the point in the
//! index) or, for the first point of a VM, writes the frames straight into the reset base images
//! (commit: fsync them, then the manifest that lists the point). See "Receive", "Commit" and
//! "The first point, straight into the base" in `docs/formats/replica-store.md`.
//!
//! In both modes the bytes reach the disk through a writer thread per delta with `O_DIRECT`
//! (`appender`, `base_writer`): verifying the next frame overlaps writing the previous one, and
//! received data does not fill the page cache. Commit first waits for that thread (its first
//! error fails the commit), then fsyncs exactly as before.
//!
//! An interrupted upload can be kept for a resume: in memory by the daemon, and in journal mode
//! also on disk ([`Incoming::persist_prefix`], [`ReplicaVm::adopt_kept`]; "Interrupted uploads,
//! kept for a resume" in the format doc).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use delta::{DeltaHeader, DeltaKind, Event, FrameInfo, FrameKind, PushDecoder};
use proto::Seq;

use crate::appender::JournalAppender;
use crate::base_writer::BaseWriter;
use crate::index::{JournalFile, Layer};
use crate::payload::PayloadDecoder;
use crate::vm::{
    superseded, JournalEntry, PointInfo, ReplicaVm, VmInner, FIRST_POINT_POISONED, INCOMING_DIR,
};
use crate::{durable, failpoint, ReplicaError, FRAMES_PER_DELTA_MAX};

/// Where the bytes of a delta go.
enum Sink {
    /// Header not decoded yet: the bytes so far (less than one header).
    Pending(Vec<u8>),
    /// Into `incoming/<n>.partial` (`Incoming::partial`), later renamed into the journal.
    Journal(JournalAppender),
    /// The first point, frames applied to the base images by attempt `epoch`.
    Base { epoch: u64, writer: BaseWriter },
    /// Committed, or given up.
    Closed,
}

/// A delta being received. Write the delta's bytes into it (`std::io::Write`), then pass it to
/// [`ReplicaVm::commit`]. The first invalid byte makes every later write fail with the reason;
/// dropping it without committing deletes the partial file (a first point written into the
/// base is never listed, and the next attempt, or open, resets the base).
pub struct Incoming {
    vm: Arc<VmInner>,
    sink: Sink,
    /// The partial file, deleted on drop unless renamed into the journal.
    partial: Option<PathBuf>,
    dec: PushDecoder,
    payload: PayloadDecoder,
    header: Option<DeltaHeader>,
    /// Journal mode: every frame, for the index. Base mode: nothing (no index needed).
    frames: Vec<FrameInfo>,
    frame_count: u64,
    error: Option<ReplicaError>,
    received_bytes: u64,
    /// The durable copy of a prefix (`incoming/kept-…`), see [`Incoming::persist_prefix`].
    kept: Option<PathBuf>,
}

/// Names of kept prefixes: `kept-<seq, 20 digits>-<header checksum, 64 hex>-<length>`.
const KEPT_PREFIX: &str = "kept-";

fn kept_name(seq: u64, checksum: &[u8; 32], len: u64) -> String {
    let hex: String = checksum.iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEPT_PREFIX}{seq:020}-{hex}-{len}")
}

/// Parses a kept prefix's name: (seq, checksum, length).
fn parse_kept(name: &str) -> Option<(u64, [u8; 32], u64)> {
    let mut parts = name.strip_prefix(KEPT_PREFIX)?.split('-');
    let seq = parts.next()?.parse().ok()?;
    let hex = parts.next()?;
    let len = parts.next()?.parse().ok()?;
    if parts.next().is_some() || hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut sum = [0u8; 32];
    for (i, b) in sum.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some((seq, sum, len))
}

/// Empties `incoming/` at open: every partial file goes; kept prefixes stay, but once the next
/// seq is known (`Some(next)`) only those of that seq do (the others can never be resumed).
pub(crate) fn clean_incoming(dir: &Path, next: Option<u64>) -> Result<(), ReplicaError> {
    let mut removed = false;
    for entry in std::fs::read_dir(dir).map_err(ReplicaError::io("list", dir))? {
        let entry = entry.map_err(ReplicaError::io("list", dir))?;
        let name = entry.file_name();
        let keep = match name.to_str().and_then(parse_kept) {
            Some((seq, _, _)) => next.map_or(true, |n| n == seq),
            None => false,
        };
        if !keep {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A directory someone put there: not ours to keep either.
                Err(_) => {
                    std::fs::remove_dir_all(&path).map_err(ReplicaError::io("remove", &path))?
                }
            }
            removed = true;
        }
    }
    if removed {
        durable::fsync_dir(dir)?;
    }
    Ok(())
}

impl Incoming {
    /// The delta's header, once received and verified.
    pub fn header(&self) -> Option<&DeltaHeader> {
        self.header.as_ref()
    }

    /// Delta bytes consumed so far: every one of them was accepted (or [`Incoming::is_failed`]),
    /// so a resumed upload continues with the byte at this offset.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// The header checksum of the delta being received (`DeltaHeader::checksum` under the
    /// VM's key), once its header arrived: what names it when an upload is resumed.
    pub fn header_checksum(&self) -> Option<[u8; 32]> {
        self.header.as_ref()?.checksum(&self.vm.key).ok()
    }

    /// True once a byte was refused: nothing more is accepted and commit reports why.
    pub fn is_failed(&self) -> bool {
        self.error.is_some()
    }

    /// Makes the bytes received so far durable under a name that survives a restart of the
    /// daemon (`incoming/kept-<seq>-<header checksum>-<length>`, a hard link to the partial
    /// file, whose first `length` bytes are fsynced and never rewritten with other bytes), so
    /// that [`ReplicaVm::adopt_kept`] can continue the upload after a restart. Journal mode
    /// only: a first point lives in the base, which open resets (returns `false`).
    pub fn persist_prefix(&mut self) -> Result<bool, ReplicaError> {
        let (Some(header), Some(path), Sink::Journal(appender)) =
            (&self.header, &self.partial, &mut self.sink)
        else {
            return Ok(false);
        };
        if self.error.is_some() {
            return Ok(false);
        }
        appender.flush()?;
        let file = File::open(path).map_err(ReplicaError::io("open", path))?;
        durable::fsync_file(&file, path)?;
        let checksum = header.checksum(&self.vm.key)?;
        let dir = self.vm.dir.join(INCOMING_DIR);
        let link = dir.join(kept_name(header.seq.get(), &checksum, self.received_bytes));
        if self.kept.as_ref() != Some(&link) {
            let _ = std::fs::remove_file(&link);
            std::fs::hard_link(path, &link).map_err(ReplicaError::io("link", &link))?;
            durable::fsync_dir(&dir)?;
            if let Some(old) = self.kept.replace(link) {
                durable::remove_file(&old)?;
            }
        }
        Ok(true)
    }

    /// Deletes the durable prefix, if any (the upload was superseded or given up).
    pub fn discard_kept(&mut self) {
        if let Some(path) = self.kept.take() {
            let _ = durable::remove_file(&path);
        }
    }

    /// True once the footer was received and verified.
    pub fn is_complete(&self) -> bool {
        self.dec.decoder().is_done()
    }

    fn feed(&mut self, buf: &[u8]) -> Result<(), ReplicaError> {
        let vm = &self.vm;
        let header = &mut self.header;
        let frames = &mut self.frames;
        let frame_count = &mut self.frame_count;
        let sink = &mut self.sink;
        let partial = &mut self.partial;
        let payload = &mut self.payload;
        self.dec.feed::<ReplicaError>(buf, |ev| match ev {
            Event::Header(h) => {
                check_sequence(vm, &h)?;
                *sink = open_sink(vm, &h, std::mem::replace(sink, Sink::Closed), partial)?;
                *header = Some(h);
                Ok(())
            }
            Event::Frame(info, stored) => {
                if *frame_count >= FRAMES_PER_DELTA_MAX {
                    return Err(ReplicaError::TooManyFrames {
                        max: FRAMES_PER_DELTA_MAX,
                    });
                }
                *frame_count += 1;
                match sink {
                    Sink::Base { epoch, writer } => {
                        apply_frame(vm, *epoch, writer, payload, &info, stored)?;
                        if *frame_count == 1 {
                            failpoint::hit("first.mid_receive")?;
                        }
                    }
                    _ => {
                        // Prove now that a compressed payload decodes, so that a point never
                        // holds a frame that fails only when someone reads it.
                        if info.kind == FrameKind::Data {
                            payload.decode(stored, &info)?;
                        }
                        frames.push(info);
                    }
                }
                Ok(())
            }
            Event::Footer(_) | Event::More => Ok(()),
        })?;
        match &mut self.sink {
            Sink::Pending(bytes) => bytes.extend_from_slice(buf),
            Sink::Journal(appender) => appender.write_all(buf)?,
            Sink::Base { .. } => {}
            Sink::Closed => return Err(ReplicaError::ReceiveFailed("already committed".into())),
        }
        self.received_bytes += buf.len() as u64;
        Ok(())
    }
}

/// Chooses the mode once the header is verified: the first point of a VM goes into the base,
/// everything else into a new partial file (which gets the bytes received so far).
fn open_sink(
    vm: &Arc<VmInner>,
    h: &DeltaHeader,
    previous: Sink,
    partial: &mut Option<PathBuf>,
) -> Result<Sink, ReplicaError> {
    let Sink::Pending(pending) = previous else {
        return Err(ReplicaError::ReceiveFailed("header received twice".into()));
    };
    // check_sequence passed, so parent_seq == latest_seq(): 0 means no point exists.
    if h.parent_seq == Seq(0) {
        let epoch = vm.begin_first_point()?;
        let writer = BaseWriter::open(vm, Some((vm.clone(), epoch)))?;
        tracing::info!(vm = %vm.vm_id, seq = h.seq.get(), kind = h.kind.as_str(), "receiving the first point straight into the base images");
        return Ok(Sink::Base { epoch, writer });
    }
    let n = vm.next_incoming.fetch_add(1, Ordering::Relaxed);
    let path = vm.dir.join(INCOMING_DIR).join(format!("{n}.partial"));
    let mut appender = JournalAppender::create(&path)?;
    *partial = Some(path);
    appender.write_all(&pending)?;
    Ok(Sink::Journal(appender))
}

/// Queues one verified frame of a first point for the base images (stream order: a later
/// frame overrides an earlier one, as in a fold). A superseded attempt fails here, at its next
/// frame; the writer thread checks the epoch again, under the lock, before every write.
fn apply_frame(
    vm: &VmInner,
    epoch: u64,
    writer: &mut BaseWriter,
    payload: &mut PayloadDecoder,
    info: &FrameInfo,
    stored: &[u8],
) -> Result<(), ReplicaError> {
    if !vm.first_point_current(epoch) {
        return Err(superseded());
    }
    vm.disk(info.disk)?;
    match info.kind {
        FrameKind::Data => writer.data(info.disk, info.offset, payload.decode(stored, info)?),
        FrameKind::Zero => writer.zero(info.disk, info.offset, info.len),
    }
}

impl Write for Incoming {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(e) = &self.error {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        match self.feed(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                let err = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
                self.error = Some(e);
                Err(err)
            }
        }
    }

    /// Waits until every byte received so far is in the partial file or the base images (not
    /// durable: only commit fsyncs).
    fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = &self.error {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        let flushed = match &mut self.sink {
            Sink::Journal(appender) => appender.flush(),
            Sink::Base { writer, .. } => writer.drain(),
            _ => Ok(()),
        };
        flushed.map_err(|e| {
            // Kept, like a failed write's, for commit to report.
            let err = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
            self.error = Some(e);
            err
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(path) = &self.partial {
            // Not committed. Not a durability matter: open deletes incoming/ anyway.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Refuses a header whose lineage or sequence does not follow the VM's latest point, and any
/// delta but a Full one while the VM is damaged.
fn check_sequence(vm: &VmInner, h: &DeltaHeader) -> Result<(), ReplicaError> {
    if let Some(reason) = vm.wedged.lock().clone() {
        return Err(ReplicaError::ReceiveFailed(reason));
    }
    let st = vm.state.read();
    if st.removed {
        return Err(ReplicaError::Removed {
            vm_id: vm.vm_id.to_string(),
        });
    }
    vm.check_header(h, st.generation, true)?;
    // A damaged chain takes no more increments: they would be committed on top of data the
    // replica cannot read. Only a Full delta (every block) follows, and it clears the damage.
    if let Some(damage) = &st.damage {
        if h.kind != DeltaKind::Full {
            return Err(ReplicaError::VmDamaged {
                vm_id: vm.vm_id.to_string(),
                damage: damage.clone(),
            });
        }
        // A compared Full holds only the blocks that differed when its compare read this
        // copy: damage found since (or in another process: unknown) may lie under blocks it
        // did not send, so it cannot clear it. The primary then sends every block.
        let began = vm.compare_began.lock().clone();
        if h.compared && began != Some((h.parent_seq.get(), Some(damage.clone()))) {
            return Err(ReplicaError::VmDamaged {
                vm_id: vm.vm_id.to_string(),
                damage: format!(
                    "{damage} (found after the resynchronization compared this copy: a compared point cannot repair it; every block must be sent)"
                ),
            });
        }
    }
    let latest = st.latest_seq();
    if h.parent_seq.get() != latest || h.seq.get() != latest + 1 {
        return Err(ReplicaError::OutOfSequence {
            expected: latest + 1,
            got: h.seq.get(),
        });
    }
    Ok(())
}

impl ReplicaVm {
    /// Starts receiving a delta. Where its bytes go is decided when its header arrives.
    pub fn begin_receive(&self) -> Result<Incoming, ReplicaError> {
        let vm = self.inner.clone();
        if vm.state.read().removed {
            return Err(ReplicaError::Removed {
                vm_id: vm.vm_id.to_string(),
            });
        }
        Ok(Incoming {
            dec: PushDecoder::new(&vm.key),
            vm,
            sink: Sink::Pending(Vec::new()),
            partial: None,
            payload: PayloadDecoder::default(),
            header: None,
            frames: Vec::new(),
            frame_count: 0,
            error: None,
            received_bytes: 0,
            kept: None,
        })
    }

    /// The durably kept prefix of an interrupted upload of `seq` (see
    /// [`Incoming::persist_prefix`]), if any: its header checksum and length.
    pub fn kept_prefix(&self, seq: Seq) -> Option<([u8; 32], u64)> {
        let seq = seq.get();
        let dir = self.inner.dir.join(INCOMING_DIR);
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str().and_then(parse_kept))
            .filter(|(s, _, _)| *s == seq)
            .map(|(_, sum, len)| (sum, len))
            .max_by_key(|(_, len)| *len)
    }

    /// Deletes every kept prefix of this VM (a new upload starts from byte 0).
    pub fn discard_kept_prefixes(&self) {
        let dir = self.inner.dir.join(INCOMING_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_str().and_then(parse_kept).is_some() {
                let _ = durable::remove_file(&e.path());
            }
        }
    }

    /// Continues the kept prefix of `seq` with header checksum `checksum` after a restart: a
    /// new receiver is fed the prefix (verified again from its first byte, written into a new
    /// partial file) and is returned ready for the byte at the prefix's length. `None` (and the
    /// prefix deleted) if it is missing or does not verify.
    pub fn adopt_kept(
        &self,
        seq: Seq,
        checksum: &[u8; 32],
    ) -> Result<Option<Incoming>, ReplicaError> {
        use std::io::Read;
        let dir = self.inner.dir.join(INCOMING_DIR);
        let Some((sum, len)) = self.kept_prefix(seq).filter(|(s, _)| s == checksum) else {
            return Ok(None);
        };
        let path = dir.join(kept_name(seq.get(), &sum, len));
        let mut file = File::open(&path).map_err(ReplicaError::io("open", &path))?;
        let mut incoming = self.begin_receive()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        let mut ok = true;
        while left > 0 {
            let n = (buf.len() as u64).min(left) as usize;
            if file.read_exact(&mut buf[..n]).is_err() || incoming.write_all(&buf[..n]).is_err() {
                ok = false;
                break;
            }
            left -= n as u64;
        }
        if !ok || incoming.header_checksum() != Some(*checksum) {
            tracing::warn!(vm = %self.inner.vm_id, seq = seq.get(), "kept prefix of an interrupted upload does not verify: deleted");
            durable::remove_file(&path)?;
            return Ok(None);
        }
        incoming.kept = Some(path);
        tracing::info!(vm = %self.inner.vm_id, seq = seq.get(), len, "continuing an upload kept across a restart");
        Ok(Some(incoming))
    }

    /// Commits a fully received delta as the next recovery point. Refused, with nothing
    /// changed, unless the footer was verified, the delta is for this VM and generation, and
    /// `parent_seq == latest_seq()` and `seq == parent_seq + 1`.
    pub fn commit(&self, mut incoming: Incoming) -> Result<PointInfo, ReplicaError> {
        if let Some(e) = incoming.error.take() {
            return Err(e);
        }
        let summary = incoming
            .dec
            .finish()
            .map_err(|_| ReplicaError::Incomplete {
                received_bytes: incoming.received_bytes,
            })?;
        let header = incoming.header.clone().ok_or(ReplicaError::Incomplete {
            received_bytes: incoming.received_bytes,
        })?;
        let vm = &self.inner;
        let _m = vm.mutate.lock();
        check_sequence(vm, &header)?;
        let info = PointInfo::from_delta(&header, &summary);
        match std::mem::replace(&mut incoming.sink, Sink::Closed) {
            Sink::Base { epoch, writer } => commit_first_point(vm, epoch, writer, &header, info)?,
            Sink::Journal(appender) => commit_journal(vm, &mut incoming, appender, &header, info)?,
            Sink::Pending(_) | Sink::Closed => {
                return Err(ReplicaError::ReceiveFailed("already committed".into()))
            }
        }
        tracing::info!(vm = %vm.vm_id, seq = info.seq.get(), kind = header.kind.as_str(), bytes = summary.stored_bytes, "recovery point committed");
        Ok(info)
    }
}

/// Commit of the first point (caller holds `mutate` and checked the sequence): wait for the
/// writer thread, fsync the base images, then the manifest that lists the point — the only
/// step that makes it exist.
fn commit_first_point(
    vm: &VmInner,
    epoch: u64,
    writer: BaseWriter,
    header: &DeltaHeader,
    info: PointInfo,
) -> Result<(), ReplicaError> {
    // Before taking the lock: the writer thread takes it for every write.
    let written = writer.finish()?;
    tracing::debug!(vm = %vm.vm_id, direct_bytes = written.direct_bytes, buffered_bytes = written.buffered_bytes, "first point written into the base images");
    let mut current = vm.base_writer.lock();
    if *current != epoch {
        return Err(superseded());
    }
    // This attempt is consumed whatever happens next; no base write may follow it.
    vm.set_first_point_epoch(&mut current, epoch + 1);
    failpoint::hit("first.before_fsync")?;
    for b in vm.base.values() {
        durable::fsync_file(&b.file, &b.path)?;
    }
    failpoint::hit("first.before_manifest")?;
    let full = header.kind == DeltaKind::Full;
    let written = vm.update_manifest(|st| {
        st.base_seq = info.seq.get();
        st.base_point = Some(info);
        st.folding = None;
        if full {
            st.damage = None;
        }
    });
    if let Err(e) = written {
        // The rename may have happened (a failed directory fsync): the manifest on disk may
        // list the point. Resetting the base for another attempt could then destroy it, so no
        // attempt is allowed until the store is reopened and the manifest read again.
        vm.set_first_point_epoch(&mut current, FIRST_POINT_POISONED);
        return Err(e);
    }
    failpoint::hit("first.after_manifest")
}

fn wedge(vm: &VmInner, seq: u64, e: &ReplicaError) {
    let reason = format!(
        "point {seq} of {} reached the journal but its commit failed ({e}); refusing further deltas until the replica daemon restarts and re-reads its store",
        vm.vm_id
    );
    tracing::error!("{reason}");
    *vm.wedged.lock() = Some(reason);
}

/// Commit into the journal (caller holds `mutate` and checked the sequence): fsync the partial
/// file, rename it into the journal, then publish its layers in the index.
fn commit_journal(
    vm: &VmInner,
    incoming: &mut Incoming,
    appender: JournalAppender,
    header: &DeltaHeader,
    info: PointInfo,
) -> Result<(), ReplicaError> {
    // Until the rename, a failure leaves the partial file to Drop (deleted).
    let frames = incoming.frames.len() as u64;
    reserve_index(vm, frames)?;
    // From here until the point is published, a failure gives the frames back.
    let published = write_journal(vm, incoming, appender, header, info, frames);
    if published.is_err() {
        vm.budget.release(frames);
    }
    published?;
    let damage = vm.state.read().damage.clone();
    if header.kind == DeltaKind::Full && damage.is_some() {
        // Damage found while a compared Full was received stays (see `check_sequence`).
        let began = vm.compare_began.lock().clone();
        if !header.compared || began == Some((header.parent_seq.get(), damage)) {
            vm.update_manifest(|st| st.damage = None)?;
        }
    }
    Ok(())
}

/// Makes room for `frames` more index entries in the store's budget: when they do not fit,
/// folds this VM's oldest points first (retention sooner; the newest point stays), and refuses
/// with the transient `IndexFull` when that is not enough (other VMs hold the index; the
/// daemon's retention relieves it). Caller holds `mutate`.
fn reserve_index(vm: &VmInner, frames: u64) -> Result<(), ReplicaError> {
    loop {
        if vm.budget.try_reserve(frames) {
            return Ok(());
        }
        let points = {
            let st = vm.state.read();
            st.journal.len() + usize::from(st.base_point.is_some())
        };
        if points <= 1 || !crate::fold::fold_next(vm)? {
            return Err(ReplicaError::IndexFull {
                indexed: vm.budget.indexed(),
                max: vm.budget.max(),
                frames,
            });
        }
        tracing::info!(vm = %vm.vm_id, "folded the oldest point early: the store's index is at its bound");
    }
}

/// The durable part of a journal commit and the index update; the frames are reserved.
fn write_journal(
    vm: &VmInner,
    incoming: &mut Incoming,
    appender: JournalAppender,
    header: &DeltaHeader,
    info: PointInfo,
    frames: u64,
) -> Result<(), ReplicaError> {
    let partial = incoming
        .partial
        .clone()
        .ok_or(ReplicaError::ReceiveFailed("no partial file".into()))?;
    failpoint::hit("commit.before_fsync")?;
    let file = appender.finish()?;
    durable::fsync_file(file.file(), &partial)?;
    drop(file);
    failpoint::hit("commit.before_rename")?;
    let seq = header.seq.get();
    let jpath = vm.journal_path(seq);
    if let Err(e) = durable::rename(&partial, &jpath) {
        if jpath.exists() {
            // Renamed but not known durable: the point may exist on disk and not here. Never
            // let a later delta of this seq be renamed over it.
            incoming.partial = None;
            wedge(vm, seq, &e);
        }
        return Err(e);
    }
    incoming.partial = None;
    // The point exists: the kept prefix of its upload, if any, is useless now.
    incoming.discard_kept();
    // Nothing is opened from here on: the index names the journal file, and reads open it
    // through the store's descriptor cache. (The directory fsyncs of the rename wait out a
    // transient lack of descriptors, `durable::fsync_dir`.)
    if let Err(e) = failpoint::hit("commit.after_rename") {
        wedge(vm, seq, &e);
        return Err(e);
    }
    let journal = JournalFile::new(seq, jpath);
    let mut layers: BTreeMap<u32, Layer> = BTreeMap::new();
    for f in incoming.frames.drain(..) {
        layers.entry(f.disk).or_default().insert_frame(&journal, f);
    }
    let entry = JournalEntry {
        info,
        file: journal,
        frames,
        layers: layers.into_iter().map(|(d, l)| (d, Arc::new(l))).collect(),
    };
    vm.state.write().journal.insert(seq, entry);
    Ok(())
}
