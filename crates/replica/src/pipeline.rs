//! One writer thread per delta being written, so that verifying and decompressing the next
//! frame overlaps the disk write of the previous one. The caller fills buffers from a small
//! pool ([`WRITE_BUFFERS`] × [`WRITE_BUFFER_BYTES`]) and submits [`Job`]s through a bounded
//! channel; the thread runs them in submission order with an [`Executor`] and returns each
//! buffer to the pool.
//!
//! Invariants:
//! - Jobs run one at a time, in the order submitted: a later frame overrides an earlier one
//!   exactly as if the caller had written them itself.
//! - Bounded: at most [`WRITE_BUFFERS`] buffers exist per pipeline, so at most that many
//!   bytes are in flight; a caller that outruns the disk waits for a free buffer.
//! - The first error of the thread is never lost: it is returned by the caller's next
//!   [`WritePipeline::buffer`], [`WritePipeline::submit`], [`WritePipeline::drain`] or by
//!   [`WritePipeline::finish`], and every later call fails too. After an error the thread runs
//!   no further job (it only hands buffers back).
//! - [`WritePipeline::finish`] (and dropping the pipeline) waits until every submitted job has
//!   run or been skipped: nothing is written after it returns.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::direct::AlignedBuf;
use crate::ReplicaError;

/// Buffers per pipeline: enough to keep one write in progress while the caller fills the next
/// ones, small enough that many deltas received at once stay cheap.
pub(crate) const WRITE_BUFFERS: usize = 4;

/// One buffer holds one frame of decoded data (`delta::FRAME_DATA_BYTES_MAX`), so a frame is
/// always one job; for journal files, one direct write of 1 MiB.
pub(crate) const WRITE_BUFFER_BYTES: usize = delta::FRAME_DATA_BYTES_MAX as usize;

/// Work for the writer thread. `target` names the file (a disk index for base images).
pub(crate) enum Job {
    Write {
        target: u32,
        offset: u64,
        buf: AlignedBuf,
    },
    Punch {
        target: u32,
        offset: u64,
        len: u64,
    },
    /// Answered once every earlier job ran (see [`WritePipeline::drain`]).
    Barrier(SyncSender<()>),
}

/// What the writer thread does with a `Write` or `Punch` job (never called for `Barrier`).
pub(crate) trait Executor: Send + 'static {
    fn run(&mut self, job: &Job) -> Result<(), ReplicaError>;
}

pub(crate) struct WritePipeline<E: Executor> {
    jobs: Option<SyncSender<Job>>,
    free: Receiver<AlignedBuf>,
    /// The thread's first error, until the caller takes it.
    failed: Arc<Mutex<Option<ReplicaError>>>,
    /// The caller has been given the thread's error: every later call fails.
    poisoned: bool,
    worker: Option<JoinHandle<E>>,
}

fn stopped() -> ReplicaError {
    ReplicaError::ReceiveFailed("the writer thread stopped".into())
}

impl<E: Executor> WritePipeline<E> {
    /// Starts the writer thread `name` running `exec`. `context` names what it writes (errors).
    pub fn spawn(name: &str, exec: E, context: &Path) -> Result<Self, ReplicaError> {
        let (free_tx, free) = mpsc::sync_channel(WRITE_BUFFERS);
        for _ in 0..WRITE_BUFFERS {
            free_tx
                .send(AlignedBuf::new(WRITE_BUFFER_BYTES))
                .map_err(|_| stopped())?;
        }
        // Jobs without a buffer (punches) are bounded by the channel as well.
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(WRITE_BUFFERS);
        let failed = Arc::new(Mutex::new(None));
        let failed2 = failed.clone();
        let worker = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut exec = exec;
                let mut ok = true;
                for job in job_rx {
                    if let Job::Barrier(done) = job {
                        let _ = done.send(());
                        continue;
                    }
                    if ok {
                        if let Err(e) = exec.run(&job) {
                            *failed2.lock() = Some(e);
                            ok = false;
                        }
                    }
                    if let Job::Write { buf, .. } = job {
                        // The caller may be gone (dropped); then the buffer is freed here.
                        let _ = free_tx.send(buf);
                    }
                }
                exec
            })
            .map_err(ReplicaError::io("start the writer thread for", context))?;
        Ok(WritePipeline {
            jobs: Some(jobs),
            free,
            failed,
            poisoned: false,
            worker: Some(worker),
        })
    }

    /// Fails with the thread's first error, once it has one.
    fn check(&mut self) -> Result<(), ReplicaError> {
        if self.poisoned {
            return Err(ReplicaError::ReceiveFailed(
                "an earlier write of this delta failed".into(),
            ));
        }
        if let Some(e) = self.failed.lock().take() {
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }

    /// An empty buffer from the pool, waiting until the thread hands one back.
    pub fn buffer(&mut self) -> Result<AlignedBuf, ReplicaError> {
        self.check()?;
        let mut buf = self.free.recv().map_err(|_| stopped())?;
        buf.clear();
        Ok(buf)
    }

    pub fn submit(&mut self, job: Job) -> Result<(), ReplicaError> {
        self.check()?;
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).map_err(|_| stopped())?;
        Ok(())
    }

    /// Waits until every job submitted so far has run; fails with the thread's error if any.
    pub fn drain(&mut self) -> Result<(), ReplicaError> {
        let (done_tx, done) = mpsc::sync_channel(1);
        self.submit(Job::Barrier(done_tx))?;
        done.recv().map_err(|_| stopped())?;
        self.check()
    }

    /// Waits for every submitted job, stops the thread and returns its executor, or the
    /// thread's first error.
    pub fn finish(mut self) -> Result<E, ReplicaError> {
        drop(self.jobs.take());
        let worker = self.worker.take().ok_or_else(stopped)?;
        let exec = worker.join().map_err(|_| stopped())?;
        self.check()?;
        Ok(exec)
    }
}

impl<E: Executor> Drop for WritePipeline<E> {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has run (or skipped) what is queued;
        // waiting for it means no write of this pipeline lands after it is gone.
        drop(self.jobs.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records writes; fails the write at `fail_at`.
    struct Recorder {
        seen: Vec<(u64, usize)>,
        fail_at: Option<u64>,
    }

    impl Executor for Recorder {
        fn run(&mut self, job: &Job) -> Result<(), ReplicaError> {
            if let Job::Write { offset, buf, .. } = job {
                if Some(*offset) == self.fail_at {
                    return Err(ReplicaError::ReceiveFailed(format!(
                        "disk full at {offset}"
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                self.seen.push((*offset, buf.len()));
            }
            Ok(())
        }
    }

    fn write(p: &mut WritePipeline<Recorder>, offset: u64) -> Result<(), ReplicaError> {
        let mut buf = p.buffer()?;
        buf.push(&[1u8; 100]);
        p.submit(Job::Write {
            target: 0,
            offset,
            buf,
        })
    }

    #[test]
    fn jobs_run_in_order_and_finish_waits_for_all() {
        let exec = Recorder {
            seen: Vec::new(),
            fail_at: None,
        };
        let mut p = WritePipeline::spawn("test-writer", exec, Path::new("t")).unwrap();
        for i in 0..20 {
            write(&mut p, i).unwrap();
        }
        p.drain().unwrap();
        write(&mut p, 20).unwrap();
        let exec = p.finish().unwrap();
        let want: Vec<(u64, usize)> = (0..21).map(|i| (i, 100)).collect();
        assert_eq!(exec.seen, want);
    }

    #[test]
    fn the_first_error_surfaces_at_a_later_call_or_at_finish() {
        // Seen by a later submit.
        let exec = Recorder {
            seen: Vec::new(),
            fail_at: Some(3),
        };
        let mut p = WritePipeline::spawn("test-writer", exec, Path::new("t")).unwrap();
        let mut err = None;
        for i in 0..50 {
            if let Err(e) = write(&mut p, i) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(&err, Some(ReplicaError::ReceiveFailed(m)) if m.contains("at 3")));
        assert!(write(&mut p, 99).is_err(), "every later call fails");
        assert!(p.finish().is_err());
        // Seen only by finish: the failing write is the last one.
        let exec = Recorder {
            seen: Vec::new(),
            fail_at: Some(1),
        };
        let mut p = WritePipeline::spawn("test-writer", exec, Path::new("t")).unwrap();
        write(&mut p, 0).unwrap();
        write(&mut p, 1).unwrap();
        let r = p.finish();
        assert!(matches!(&r, Err(ReplicaError::ReceiveFailed(m)) if m.contains("at 1")));
    }
}
