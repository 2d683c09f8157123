//! Writing frames into the base images — the first point as it is received, and a fold of a
//! journal delta — through a writer thread ([`crate::pipeline`]) and `O_DIRECT` descriptors
//! ([`crate::direct`]). The caller verifies and decodes a frame, copies its bytes into a pool
//! buffer and goes on with the next frame while the thread writes; zeros (ZERO frames, and DATA
//! frames whose bytes are all zero) become hole punches, as before.
//!
//! Invariants:
//! - Frames reach the base in stream order (one thread, jobs in order), so a later frame
//!   overrides an earlier one exactly as in a fold.
//! - For a first point, every job runs under the `base_writer` lock with the attempt's epoch
//!   still current (`VmInner::write_first_point`): a superseded attempt writes nothing after
//!   the reset of the attempt that replaced it, however many of its jobs were queued.
//! - Nothing here makes data durable: the caller drains the writer ([`BaseWriter::finish`]),
//!   then fsyncs the base images, then writes the manifest, as the format doc says.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::direct::DirectFile;
use crate::pipeline::{Executor, Job, WritePipeline, WRITE_BUFFER_BYTES};
use crate::vm::VmInner;
use crate::ReplicaError;

/// The writer thread's side: one file per disk, and the first point's epoch if any.
struct BaseTargets {
    files: BTreeMap<u32, DirectFile>,
    /// First point: write only while this attempt's epoch is current. Fold: `None` (the
    /// caller holds `mutate`, and no first point can be attempted while a point exists).
    gate: Option<(Arc<VmInner>, u64)>,
}

impl Executor for BaseTargets {
    fn run(&mut self, job: &Job) -> Result<(), ReplicaError> {
        let files = &mut self.files;
        match &self.gate {
            Some((vm, epoch)) => vm.write_first_point(*epoch, |_| apply(files, job)),
            None => apply(files, job),
        }
    }
}

fn apply(files: &mut BTreeMap<u32, DirectFile>, job: &Job) -> Result<(), ReplicaError> {
    match *job {
        Job::Write {
            target,
            offset,
            ref buf,
        } => {
            let f = files
                .get_mut(&target)
                .ok_or(ReplicaError::NoSuchDisk { disk: target })?;
            f.write_at(buf.as_slice(), offset)
        }
        Job::Punch {
            target,
            offset,
            len,
        } => {
            let f = files
                .get(&target)
                .ok_or(ReplicaError::NoSuchDisk { disk: target })?;
            punch_hole(f.file(), offset, len)
                .map_err(ReplicaError::io("punch hole in base image", f.path()))
        }
        Job::Barrier(_) => Ok(()),
    }
}

/// Frames on their way into the base images of one VM.
pub(crate) struct BaseWriter {
    pipeline: WritePipeline<BaseTargets>,
}

/// Bytes written into the base images, directly and through the page cache.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Written {
    pub direct_bytes: u64,
    pub buffered_bytes: u64,
}

impl BaseWriter {
    /// Opens a direct descriptor of every base image of `vm` and starts the writer thread.
    /// `first_point`: the VM and the attempt's epoch (writes stop once it is superseded).
    pub fn open(
        vm: &VmInner,
        first_point: Option<(Arc<VmInner>, u64)>,
    ) -> Result<Self, ReplicaError> {
        let mut files = BTreeMap::new();
        for (&disk, b) in &vm.base {
            let file = b
                .file
                .try_clone()
                .map_err(ReplicaError::io("duplicate descriptor of", &b.path))?;
            files.insert(disk, DirectFile::open(file, &b.path, "write base image")?);
        }
        let targets = BaseTargets {
            files,
            gate: first_point,
        };
        let pipeline = WritePipeline::spawn("replica-base", targets, &vm.dir)?;
        Ok(BaseWriter { pipeline })
    }

    /// Queues the decoded bytes of a DATA frame (a hole punch if they are all zeros).
    pub fn data(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        if !data.iter().any(|&b| b != 0) {
            return self.zero(disk, offset, data.len() as u64);
        }
        // One chunk: frames carry at most one buffer of data (the decoder checks it).
        for (i, chunk) in data.chunks(WRITE_BUFFER_BYTES).enumerate() {
            let mut buf = self.pipeline.buffer()?;
            buf.push(chunk);
            self.pipeline.submit(Job::Write {
                target: disk,
                offset: offset + (i * WRITE_BUFFER_BYTES) as u64,
                buf,
            })?;
        }
        Ok(())
    }

    /// Queues a ZERO frame: `[offset, offset + len)` reads as zeros afterwards.
    pub fn zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.pipeline.submit(Job::Punch {
            target: disk,
            offset,
            len,
        })
    }

    /// Waits until everything queued so far is written.
    pub fn drain(&mut self) -> Result<(), ReplicaError> {
        self.pipeline.drain()
    }

    /// Waits for every queued write and stops the thread; the first error of any write.
    pub fn finish(self) -> Result<Written, ReplicaError> {
        let targets = self.pipeline.finish()?;
        let mut w = Written::default();
        for f in targets.files.values() {
            let (d, b) = f.written_bytes();
            w.direct_bytes += d;
            w.buffered_bytes += b;
        }
        Ok(w)
    }
}

/// Makes `[offset, offset + len)` read as zeros, deallocating it when the file system can
/// (where it cannot, `EOPNOTSUPP`, zeros are written instead).
fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    match sysutil::punch_hole(file, offset, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            sysutil::write_zeros(file, offset, len)
        }
        other => other,
    }
}
