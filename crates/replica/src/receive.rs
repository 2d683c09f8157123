//! Receiving and committing a delta. [`Incoming`] streams bytes into `incoming/<n>.partial`
//! while a push decoder validates them (bounded memory: one frame); [`ReplicaVm::commit`]
//! checks sequence and lineage, makes the file durable, renames it into the journal, and only
//! then publishes the point in the index (see "Commit" in `docs/formats/replica-store.md`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use delta::{
    decode_payload, Compression, DeltaHeader, DeltaKind, Event, FrameInfo, FrameKind, PushDecoder,
};

use crate::index::{JournalFile, Layer};
use crate::vm::{JournalEntry, PointInfo, ReplicaVm, VmInner, INCOMING_DIR};
use crate::{durable, failpoint, fold, ReplicaError, FRAMES_PER_DELTA_MAX};

/// Write buffer of an incoming file: large enough that a 1 MiB frame costs a few syscalls.
const INCOMING_BUFFER_BYTES: usize = 256 * 1024;

/// A delta being received. Write the delta's bytes into it (`std::io::Write`), then pass it to
/// [`ReplicaVm::commit`]. The first invalid byte makes every later write fail with the reason;
/// dropping it without committing deletes the partial file.
pub struct Incoming {
    vm: Arc<VmInner>,
    path: PathBuf,
    file: Option<BufWriter<File>>,
    dec: PushDecoder,
    header: Option<DeltaHeader>,
    frames: Vec<FrameInfo>,
    error: Option<ReplicaError>,
    received_bytes: u64,
}

impl Incoming {
    /// The delta's header, once received and verified.
    pub fn header(&self) -> Option<&DeltaHeader> {
        self.header.as_ref()
    }

    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// True once the footer was received and verified.
    pub fn is_complete(&self) -> bool {
        self.dec.decoder().is_done()
    }

    fn feed(&mut self, buf: &[u8]) -> Result<(), ReplicaError> {
        let vm = &self.vm;
        let header = &mut self.header;
        let frames = &mut self.frames;
        self.dec.feed::<ReplicaError>(buf, |ev| match ev {
            Event::Header(h) => {
                check_sequence(vm, &h)?;
                *header = Some(h);
                Ok(())
            }
            Event::Frame(info, payload) => {
                if frames.len() as u64 >= FRAMES_PER_DELTA_MAX {
                    return Err(ReplicaError::TooManyFrames {
                        max: FRAMES_PER_DELTA_MAX,
                    });
                }
                // Prove now that a compressed payload decodes, so that a point never holds a
                // frame that fails only when someone reads it.
                if info.kind == FrameKind::Data && info.codec == Compression::Zstd {
                    decode_payload(payload, info.codec, info.len)?;
                }
                frames.push(info);
                Ok(())
            }
            Event::Footer(_) | Event::More => Ok(()),
        })?;
        let file = self
            .file
            .as_mut()
            .ok_or(ReplicaError::ReceiveFailed("already committed".into()))?;
        file.write_all(buf)
            .map_err(ReplicaError::io("write", &self.path))?;
        self.received_bytes += buf.len() as u64;
        Ok(())
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

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.is_some() {
            // Not committed. Not a durability matter: open deletes incoming/ anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Refuses a header whose lineage or sequence does not follow the VM's latest point.
fn check_sequence(vm: &VmInner, h: &DeltaHeader) -> Result<(), ReplicaError> {
    let st = vm.state.read();
    if st.removed {
        return Err(ReplicaError::Removed {
            vm_id: vm.vm_id.clone(),
        });
    }
    vm.check_header(h, st.generation, true)?;
    let latest = st.latest_seq();
    if h.parent_seq != latest || h.seq != latest + 1 {
        return Err(ReplicaError::OutOfSequence {
            expected: latest + 1,
            got: h.seq,
        });
    }
    Ok(())
}

impl ReplicaVm {
    /// Starts receiving a delta into `incoming/<n>.partial`.
    pub fn begin_receive(&self) -> Result<Incoming, ReplicaError> {
        let vm = self.inner.clone();
        if vm.state.read().removed {
            return Err(ReplicaError::Removed {
                vm_id: vm.vm_id.clone(),
            });
        }
        let n = vm.next_incoming.fetch_add(1, Ordering::Relaxed);
        let path = vm.dir.join(INCOMING_DIR).join(format!("{n}.partial"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(ReplicaError::io("create", &path))?;
        Ok(Incoming {
            dec: PushDecoder::new(&vm.key),
            vm,
            path,
            file: Some(BufWriter::with_capacity(INCOMING_BUFFER_BYTES, file)),
            header: None,
            frames: Vec::new(),
            error: None,
            received_bytes: 0,
        })
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
        failpoint::hit("commit.before_fsync")?;
        let writer = incoming
            .file
            .take()
            .ok_or(ReplicaError::ReceiveFailed("already committed".into()))?;
        let file = writer
            .into_inner()
            .map_err(|e| ReplicaError::io("write", &incoming.path)(e.into_error()))?;
        durable::fsync_file(&file, &incoming.path)?;
        drop(file);
        failpoint::hit("commit.before_rename")?;
        let seq = header.seq;
        let jpath = vm.journal_path(seq);
        durable::rename(&incoming.path, &jpath)?;
        failpoint::hit("commit.after_rename")?;
        let file = File::open(&jpath).map_err(ReplicaError::io("open", &jpath))?;
        let journal = Arc::new(JournalFile {
            seq,
            path: jpath,
            file,
        });
        let mut layers: BTreeMap<u32, Layer> = BTreeMap::new();
        for info in incoming.frames.drain(..) {
            layers
                .entry(info.disk)
                .or_default()
                .insert_frame(&journal, info);
        }
        let info = PointInfo::from_delta(&header, &summary);
        let entry = JournalEntry {
            info,
            layers: layers.into_iter().map(|(d, l)| (d, Arc::new(l))).collect(),
        };
        let first = {
            let mut st = vm.state.write();
            st.journal.insert(seq, entry);
            st.base_seq == 0 && st.base_point.is_none() && st.journal.len() == 1
        };
        tracing::info!(vm = %vm.vm_id, seq, kind = header.kind.as_str(), bytes = summary.stored_bytes, "recovery point committed");
        if header.kind == DeltaKind::Full && vm.state.read().damage.is_some() {
            vm.update_manifest(|st| st.damage = None)?;
        }
        if first {
            // The first point goes straight into the base: no second copy of the disks.
            if let Err(e) = fold::fold_next(vm) {
                tracing::warn!(vm = %vm.vm_id, seq, error = %e, "could not fold the first point into the base; retention will retry");
            }
        }
        Ok(info)
    }
}
