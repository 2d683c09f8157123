//! One connection in transmission: a few worker threads share the socket the nbdkit way. A
//! worker takes the reader lock, reads and validates one request (and its write payload),
//! releases the lock, calls the backend, and sends its reply under the writer lock; replies
//! may therefore leave out of order, matched by handle. A small read also takes the small reads
//! already buffered behind it and answers them all with one write (`READ_BATCH_MAX`).
//! In-flight requests are bounded by
//! the worker count, buffered bytes by workers x the 32 MiB payload bound. This module owns
//! the transmission loop; it must never validate ranges itself (the codec does).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use parking_lot::Mutex;
use tracing::{debug, warn};

use super::handshake::ConnError;
use super::observe::{ExportObserver, Op};
use super::stream::Stream;
use crate::codec::error::{NbdErrno, ProtocolError};
use crate::codec::negotiate::Session;
use crate::codec::reply::{
    allocation_runs, encode_error_chunk, encode_status_chunk, none_chunk, offset_data_prefix,
    simple_reply, OFFSET_DATA_PREFIX_LEN, SIMPLE_REPLY_LEN,
};
use crate::codec::request::{
    decide, parse_request_header, Command, Decision, ExportView, Rejection, Request,
    REQUEST_HEADER_LEN,
};
use crate::codec::wire::BASE_ALLOCATION_ID;
use crate::limits::{
    READ_BATCH_BYTES_MAX, READ_BATCH_MAX, RETAINED_BUFFER_BYTES, SOCKET_READ_BUFFER_BYTES,
    THREAD_STACK_BYTES,
};

/// State shared by the workers of one connection.
struct Transmission<'s> {
    id: u64,
    session: &'s Session,
    view: ExportView,
    reader: Mutex<BufReader<Stream>>,
    writer: Mutex<Stream>,
    /// Used to wake blocked reads and writes when the connection ends.
    control: Stream,
    /// Set once no further request may be read (disconnect, error, EOF).
    closing: AtomicBool,
    /// Told of each request answered (monitoring).
    observer: Option<Arc<dyn ExportObserver>>,
}

/// What a worker got from the socket.
enum Next {
    Run(Request),
    /// Two or more small reads, in the worker's batch.
    Reads,
    Reply(Rejection),
    Stop,
}

/// Serves requests until the client disconnects or the stream breaks. Returns the reason the
/// connection ended, for the caller's log.
pub(crate) fn transmit(
    stream: Stream,
    session: &Session,
    workers: usize,
    id: u64,
    observer: Option<Arc<dyn ExportObserver>>,
) -> Result<(), ConnError> {
    let view = ExportView {
        size_bytes: session.size_bytes,
        read_only: session.backend.read_only(),
        structured_replies: session.structured_replies,
        // BLOCK_STATUS needs a selected context, whichever.
        base_allocation: session.base_allocation || !session.contexts.is_empty(),
    };
    let t = Transmission {
        id,
        session,
        view,
        reader: Mutex::new(BufReader::with_capacity(
            SOCKET_READ_BUFFER_BYTES,
            stream.try_clone()?,
        )),
        writer: Mutex::new(stream.try_clone()?),
        control: stream,
        closing: AtomicBool::new(false),
        observer,
    };
    let end: Mutex<Result<(), ConnError>> = Mutex::new(Ok(()));
    thread::scope(|scope| {
        for n in 1..workers.max(1) {
            let spawned = thread::Builder::new()
                .name(format!("nbd-{id}-w{n}"))
                .stack_size(THREAD_STACK_BYTES)
                .spawn_scoped(scope, || t.worker(&end));
            if let Err(e) = spawned {
                // Fewer workers only means less parallelism; keep serving.
                warn!(conn = id, "could not start worker thread: {e}");
                break;
            }
        }
        t.worker(&end);
    });
    end.into_inner()
}

impl Transmission<'_> {
    fn worker(&self, end: &Mutex<Result<(), ConnError>>) {
        let mut buf: Vec<u8> = Vec::new();
        let mut scratch: Vec<u8> = Vec::new();
        let mut batch: Vec<Request> = Vec::with_capacity(READ_BATCH_MAX);
        loop {
            let next = match self.next_request(&mut buf, &mut batch) {
                Ok(next) => next,
                Err(e) => {
                    self.close(Shutdown::Both);
                    let mut end = end.lock();
                    if end.is_ok() {
                        *end = Err(e);
                    }
                    break;
                }
            };
            let started = self.observer.as_ref().map(|_| Instant::now());
            let sent = match next {
                Next::Stop => break,
                Next::Reply(rejection) => self.reject(rejection, &mut scratch),
                Next::Run(request) => {
                    let op = Op::of(&request.command);
                    let sent = self.execute(request, &mut buf, &mut scratch);
                    self.observe(op, 1, started);
                    sent
                }
                Next::Reads => {
                    let sent = self.reads(&batch, &mut buf, &mut scratch);
                    self.observe(Some(Op::Read), batch.len(), started);
                    sent
                }
            };
            if let Err(e) = sent {
                self.close(Shutdown::Both);
                let mut end = end.lock();
                if end.is_ok() {
                    *end = Err(e.into());
                }
                break;
            }
            if buf.len() > RETAINED_BUFFER_BYTES {
                buf.truncate(RETAINED_BUFFER_BYTES);
                buf.shrink_to_fit();
            }
        }
    }

    /// Tells the observer of `count` requests of `op` answered since `started` (a batch of
    /// reads shares its time).
    fn observe(&self, op: Option<Op>, count: usize, started: Option<Instant>) {
        if let (Some(o), Some(op), Some(started)) = (&self.observer, op, started) {
            let elapsed = started.elapsed();
            for _ in 0..count {
                o.request(op, elapsed);
            }
        }
    }

    fn close(&self, how: Shutdown) {
        self.closing.store(true, Ordering::SeqCst);
        self.control.shutdown(how);
    }

    /// Reads one request under the reader lock; write payloads are read into `buf`. A small
    /// read takes the small reads already buffered behind it into `batch` ([`Next::Reads`]).
    fn next_request(&self, buf: &mut Vec<u8>, batch: &mut Vec<Request>) -> Result<Next, ConnError> {
        let mut reader = self.reader.lock();
        if self.closing.load(Ordering::SeqCst) {
            return Ok(Next::Stop);
        }
        let mut header = [0u8; REQUEST_HEADER_LEN];
        if let Err(e) = reader.read_exact(&mut header) {
            // After a disconnect by the client, EOF is the normal end.
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Err(ConnError::Eof)
            } else {
                Err(e.into())
            };
        }
        let header = parse_request_header(&header)?;
        match decide(&header, &self.view) {
            Decision::Execute(request) => {
                match request.command {
                    Command::Read if batchable(&request) => {
                        batch.clear();
                        batch.push(request);
                        take_buffered_reads(&mut reader, &self.view, batch);
                        if batch.len() > 1 {
                            return Ok(Next::Reads);
                        }
                    }
                    Command::Write { .. } => {
                        let len = request.len_bytes as usize;
                        grow(buf, len);
                        reader.read_exact(&mut buf[..len])?;
                    }
                    Command::Disconnect => {
                        // No request after DISC; replies in flight still go out, so only the
                        // read side is shut.
                        drop(reader);
                        self.close(Shutdown::Read);
                        return Ok(Next::Stop);
                    }
                    _ => {}
                }
                Ok(Next::Run(request))
            }
            Decision::Reject(rejection) => {
                let want = u64::from(rejection.payload_bytes);
                let skipped = io::copy(&mut (&mut *reader).take(want), &mut io::sink())?;
                if skipped != want {
                    return Err(ConnError::Eof);
                }
                Ok(Next::Reply(rejection))
            }
            Decision::Close(e) => Err(ProtocolError::into(e)),
        }
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        self.writer.lock().write_all(bytes)
    }

    fn reject(&self, r: Rejection, scratch: &mut Vec<u8>) -> io::Result<()> {
        debug!(
            conn = self.id,
            handle = r.handle,
            "request rejected: {:?}",
            r.error
        );
        if r.structured {
            scratch.clear();
            encode_error_chunk(scratch, r.handle, r.error);
            self.send(scratch)
        } else {
            self.send(&simple_reply(Some(r.error), r.handle))
        }
    }

    fn execute(&self, req: Request, buf: &mut Vec<u8>, scratch: &mut Vec<u8>) -> io::Result<()> {
        let backend = &self.session.backend;
        let (offset, len) = (req.offset, u64::from(req.len_bytes));
        let result = match req.command {
            Command::Read => return self.read(req, buf, scratch),
            Command::BlockStatus { req_one } => return self.block_status(req, req_one, scratch),
            Command::Write { fua } => backend.write_at(&buf[..req.len_bytes as usize], offset, fua),
            Command::Flush => backend.flush(),
            // Zero-length ranges are no-ops: some system calls reject them with EINVAL.
            _ if len == 0 => Ok(()),
            Command::Trim { fua } => backend.trim(offset, len, fua),
            Command::Cache => backend.cache(offset, len),
            Command::WriteZeroes {
                may_trim,
                fua,
                fast: false,
            } => backend.write_zeroes(offset, len, may_trim, fua),
            Command::WriteZeroes {
                may_trim,
                fua,
                fast: true,
            } => backend.write_zeroes_fast(offset, len, may_trim, fua),
            // Handled in next_request; never executed.
            Command::Disconnect => Ok(()),
        };
        let error = result.err().map(|e| self.backend_error(&req, &e));
        self.send(&simple_reply(error, req.handle))
    }

    fn backend_error(&self, req: &Request, e: &io::Error) -> NbdErrno {
        let errno = NbdErrno::from_io(e);
        // A declined fast zero is the expected answer, not a failure worth a warning.
        if errno != NbdErrno::NotSup {
            warn!(
                conn = self.id,
                export = %self.session.export_name,
                command = ?req.command,
                offset = req.offset,
                len_bytes = req.len_bytes,
                "backend error: {e}"
            );
        }
        errno
    }

    fn read(&self, req: Request, buf: &mut Vec<u8>, scratch: &mut Vec<u8>) -> io::Result<()> {
        let structured = self.view.structured_replies;
        if structured && req.len_bytes == 0 {
            return self.send(&none_chunk(req.handle));
        }
        let prefix = if structured {
            OFFSET_DATA_PREFIX_LEN
        } else {
            SIMPLE_REPLY_LEN
        };
        let len = req.len_bytes as usize;
        grow(buf, prefix + len);
        // The data lands right after room for the reply header: one write, no copy.
        match self
            .session
            .backend
            .read_at(&mut buf[prefix..prefix + len], req.offset)
        {
            Ok(()) => {
                if structured {
                    buf[..prefix].copy_from_slice(&offset_data_prefix(
                        req.handle,
                        req.offset,
                        req.len_bytes,
                    ));
                } else {
                    buf[..prefix].copy_from_slice(&simple_reply(None, req.handle));
                }
                self.send(&buf[..prefix + len])
            }
            Err(e) => {
                let errno = self.backend_error(&req, &e);
                self.reject(
                    Rejection {
                        handle: req.handle,
                        error: errno,
                        payload_bytes: 0,
                        structured,
                    },
                    scratch,
                )
            }
        }
    }

    /// Serves a batch of reads in order, gathering their replies (data or error) in `buf`, and
    /// sends them with one write.
    fn reads(&self, batch: &[Request], buf: &mut Vec<u8>, scratch: &mut Vec<u8>) -> io::Result<()> {
        let structured = self.view.structured_replies;
        let mut at = 0;
        for req in batch {
            if structured && req.len_bytes == 0 {
                at = put(buf, at, &none_chunk(req.handle));
                continue;
            }
            let prefix = if structured {
                OFFSET_DATA_PREFIX_LEN
            } else {
                SIMPLE_REPLY_LEN
            };
            let len = req.len_bytes as usize;
            grow(buf, at + prefix + len);
            let data = at + prefix..at + prefix + len;
            match self.session.backend.read_at(&mut buf[data], req.offset) {
                Ok(()) => {
                    if structured {
                        put(
                            buf,
                            at,
                            &offset_data_prefix(req.handle, req.offset, req.len_bytes),
                        );
                    } else {
                        put(buf, at, &simple_reply(None, req.handle));
                    }
                    at += prefix + len;
                }
                Err(e) => {
                    let errno = self.backend_error(req, &e);
                    at = if structured {
                        scratch.clear();
                        encode_error_chunk(scratch, req.handle, errno);
                        put(buf, at, scratch)
                    } else {
                        put(buf, at, &simple_reply(Some(errno), req.handle))
                    };
                }
            }
        }
        self.send(&buf[..at])
    }

    /// One BLOCK_STATUS chunk per selected context (`base:allocation` first), the last one
    /// with DONE; any failure answers the whole request with an error chunk instead.
    fn block_status(&self, req: Request, req_one: bool, scratch: &mut Vec<u8>) -> io::Result<()> {
        scratch.clear();
        let s = self.session;
        let len = u64::from(req.len_bytes);
        let total = usize::from(s.base_allocation) + s.contexts.len();
        let mut sent = 0usize;
        let mut error = None;
        let base = s.base_allocation.then_some(BASE_ALLOCATION_ID);
        for (id, name) in base.iter().map(|&id| (id, None)).chain(
            s.contexts
                .iter()
                .map(|(id, name)| (*id, Some(name.as_str()))),
        ) {
            if error.is_some() {
                break;
            }
            sent += 1;
            let runs = match name {
                None => s
                    .backend
                    .block_status(req.offset, len)
                    .map(|e| allocation_runs(&e)),
                Some(name) => s.backend.meta_status(name, req.offset, len),
            };
            match runs {
                Ok(runs) => {
                    let n = encode_status_chunk(
                        scratch,
                        req.handle,
                        id,
                        &runs,
                        req.len_bytes,
                        req_one,
                        sent == total,
                    );
                    if n == 0 {
                        error = Some(NbdErrno::Io);
                    }
                }
                Err(e) => error = Some(self.backend_error(&req, &e)),
            }
        }
        let error = match error {
            None => return self.send(scratch),
            Some(e) => {
                if e == NbdErrno::Io {
                    warn!(conn = self.id, export = %s.export_name, "backend returned no extents or failed");
                }
                scratch.clear();
                e
            }
        };
        self.reject(
            Rejection {
                handle: req.handle,
                error,
                payload_bytes: 0,
                structured: true,
            },
            scratch,
        )
    }
}

/// A read that may join a batch.
fn batchable(r: &Request) -> bool {
    matches!(r.command, Command::Read) && r.len_bytes <= READ_BATCH_BYTES_MAX
}

/// Moves the small reads whose headers are already in the reader's buffer (no system call)
/// into `batch`, up to [`READ_BATCH_MAX`]. Stops at anything else, even an invalid header,
/// and leaves it in the buffer for the next reader, which handles it as usual.
fn take_buffered_reads(
    reader: &mut BufReader<Stream>,
    view: &ExportView,
    batch: &mut Vec<Request>,
) {
    while batch.len() < READ_BATCH_MAX {
        let Some(bytes) = reader.buffer().first_chunk::<REQUEST_HEADER_LEN>() else {
            break;
        };
        let Ok(header) = parse_request_header(bytes) else {
            break;
        };
        match decide(&header, view) {
            Decision::Execute(r) if batchable(&r) => {
                reader.consume(REQUEST_HEADER_LEN);
                batch.push(r);
            }
            _ => break,
        }
    }
}

/// Writes `bytes` into `buf` at `at` (growing it) and returns the position after them.
fn put(buf: &mut Vec<u8>, at: usize, bytes: &[u8]) -> usize {
    grow(buf, at + bytes.len());
    buf[at..at + bytes.len()].copy_from_slice(bytes);
    at + bytes.len()
}

/// Makes `buf` at least `len` long; zero-fills only the growth, so a reused buffer costs
/// nothing.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}
