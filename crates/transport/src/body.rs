//! HTTP bodies: the boxed body type used on both sides, small helpers, and a bounded channel
//! body so that a producer (async task or blocking thread with `std::io::Write`) can stream a
//! request of any size with bounded memory.
//!
//! A channel body that ends without [`BodySender::finish`] ends with an *error*, never as a
//! clean end of stream: a truncated delta must reach the peer as an aborted request (stream
//! reset), not as a shorter complete one. This module never spawns tasks or threads.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// Error type of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request we send and every response our server returns.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Buffer of [`BodyWriter`]: bytes are sent in chunks of this size. Large enough that per-chunk
/// overhead (channel hop, HTTP/2 DATA frames) vanishes next to TLS encryption, small enough that
/// [`DEFAULT_BODY_CHANNEL_CHUNKS`] of them stay a few MiB.
pub const BODY_WRITER_BUFFER_BYTES: usize = 512 << 10;
/// Default channel capacity in chunks: 8 × 512 KiB = 4 MiB in flight per streamed body, enough
/// to keep a 10 GbE link busy while the producer computes the next chunk.
pub const DEFAULT_BODY_CHANNEL_CHUNKS: usize = 8;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> BoxBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A streamed body and its sending half. At most `capacity_chunks` chunks wait in the channel
/// (memory bound = capacity × chunk size). The body ends when [`BodySender::finish`] is called;
/// if the sender is dropped first, the body fails and the request is aborted.
pub fn body_channel(capacity_chunks: usize) -> (BodySender, BoxBody) {
    let (tx, rx) = mpsc::channel(capacity_chunks.max(1));
    let finished = Arc::new(AtomicBool::new(false));
    let sender = BodySender {
        tx,
        finished: finished.clone(),
    };
    let body = ChannelBody { rx, finished };
    (sender, BodyExt::boxed(body))
}

/// Sending half of [`body_channel`].
#[derive(Debug)]
pub struct BodySender {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    finished: Arc<AtomicBool>,
}

/// The receiving side (the request) is gone: the peer or the connection failed.
fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the request body is no longer being sent (connection or request failed)",
    )
}

impl BodySender {
    /// Sends a chunk, waiting for room.
    pub async fn send(&self, chunk: Bytes) -> io::Result<()> {
        self.tx.send(Ok(chunk)).await.map_err(|_| closed())
    }

    /// Sends a chunk from a thread that is not a tokio worker (a `std::thread` or
    /// `spawn_blocking`), blocking while the channel is full. Panics if called on a runtime
    /// worker thread (tokio's rule for `blocking_send`).
    pub fn blocking_send(&self, chunk: Bytes) -> io::Result<()> {
        self.tx.blocking_send(Ok(chunk)).map_err(|_| closed())
    }

    /// Ends the body cleanly.
    pub fn finish(self) {
        self.finished.store(true, Ordering::Release);
    }

    /// Ends the body with an error, aborting the request (HTTP/2 stream reset).
    pub async fn abort(self, reason: impl Into<BoxError>) {
        let _ = self.tx.send(Err(reason.into())).await;
    }
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    finished: Arc<AtomicBool>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            // All senders are gone: clean end only if `finish` was called (it is set before
            // the sender drops, and the channel close orders it before this read).
            Poll::Ready(None) if self.finished.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(
                "request body abandoned before it was finished".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// `std::io::Write` over a [`BodySender`] for blocking producers (e.g. a delta encoder on its
/// own thread). Buffers [`BODY_WRITER_BUFFER_BYTES`] and sends whole chunks; call
/// [`BodyWriter::finish`] at the end; dropping it unfinished aborts the request.
#[derive(Debug)]
pub struct BodyWriter {
    sender: Option<BodySender>,
    buf: BytesMut,
}

impl BodyWriter {
    /// Wraps `sender`. Must be used from a non-runtime thread (see
    /// [`BodySender::blocking_send`]).
    pub fn new(sender: BodySender) -> Self {
        Self {
            sender: Some(sender),
            buf: BytesMut::with_capacity(BODY_WRITER_BUFFER_BYTES),
        }
    }

    /// Sends what is buffered and ends the body cleanly.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_buffered()?;
        if let Some(sender) = self.sender.take() {
            sender.finish();
        }
        Ok(())
    }

    /// Sends what is buffered, then `chunk` as a chunk of its own without copying it: for
    /// producers that already hold their bytes in a `Bytes` (a delta's raw payloads).
    pub fn write_shared(&mut self, chunk: Bytes) -> io::Result<()> {
        self.send_buffered()?;
        if chunk.is_empty() {
            return Ok(());
        }
        match &self.sender {
            Some(sender) => sender.blocking_send(chunk),
            None => Err(closed()),
        }
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(BODY_WRITER_BUFFER_BYTES);
        match &self.sender {
            Some(sender) => sender.blocking_send(chunk),
            None => Err(closed()),
        }
    }
}

impl io::Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= BODY_WRITER_BUFFER_BYTES {
            self.send_buffered()?;
        }
        let room = BODY_WRITER_BUFFER_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= BODY_WRITER_BUFFER_BYTES {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    async fn collect(body: BoxBody) -> Result<Bytes, BoxError> {
        body.collect().await.map(|c| c.to_bytes())
    }

    #[tokio::test]
    async fn writer_streams_all_bytes_in_bounded_chunks() {
        let (tx, body) = body_channel(2);
        let producer = std::thread::spawn(move || {
            let mut w = BodyWriter::new(tx);
            for i in 0..3000u32 {
                w.write_all(&[(i % 251) as u8; 1000]).unwrap();
            }
            w.finish().unwrap();
        });
        let bytes = collect(body).await.unwrap();
        producer.join().unwrap();
        assert_eq!(bytes.len(), 3_000_000);
        assert!(bytes
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == (i % 251) as u8)));
    }

    #[tokio::test]
    async fn shared_chunks_keep_their_place_and_are_not_copied() {
        let (tx, mut body) = body_channel(4);
        let shared = Bytes::from(vec![7u8; 100_000]);
        let at = shared.as_ptr();
        let producer = std::thread::spawn(move || {
            let mut w = BodyWriter::new(tx);
            w.write_all(b"head-1").unwrap();
            w.write_shared(shared).unwrap();
            w.write_all(b"tail").unwrap();
            w.finish().unwrap();
        });
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            chunks.push(frame.unwrap().into_data().unwrap());
        }
        producer.join().unwrap();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [6, 100_000, 4]);
        assert_eq!(&chunks[0][..], b"head-1");
        assert_eq!(
            chunks[1].as_ptr(),
            at,
            "the shared chunk is the caller's buffer"
        );
        assert_eq!(&chunks[2][..], b"tail");
    }

    #[tokio::test]
    async fn dropping_an_unfinished_writer_fails_the_body() {
        let (tx, body) = body_channel(2);
        std::thread::spawn(move || {
            let mut w = BodyWriter::new(tx);
            w.write_all(b"partial").unwrap();
            w.flush().unwrap();
            // dropped without finish()
        })
        .join()
        .unwrap();
        let err = collect(body).await.unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
    }

    #[tokio::test]
    async fn empty_finished_body_is_clean() {
        let (tx, body) = body_channel(1);
        tx.finish();
        assert!(collect(body).await.unwrap().is_empty());
    }
}
