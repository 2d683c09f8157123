//! Resumable delta uploads, primary side (docs/formats/peer-protocol.md, "Resuming an
//! interrupted upload").
//!
//! A cut cannot be read twice (the tracker hands each frozen block out once and recycles its
//! copy-before-write copy), so an upload broken by the transport cannot be re-encoded. Instead
//! the encoder writes through a [`RelayWriter`], which keeps the last [`REPLAY_WINDOW_BYTES`] of
//! the delta stream (reference-counted chunks, no copy) while sending it. When the request
//! fails in the transport, the encoder waits; [`upload`] asks the replica how many bytes it
//! kept, opens a new request, and the writer replays the window from that offset into it
//! before it goes on encoding. The encoder never starts over, so progress keeps counting.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex};
use proto::peer::DeltaReply;
use transport::{BodySender, BoxBody, Peer};

use crate::peer_client::{self, PeerRefusal};

/// Bytes of the delta stream kept for a replay. Everything sent and not yet consumed by the
/// replica is in flight in at most: the replica's HTTP/2 stream window (8 MiB,
/// `transport::STREAM_WINDOW_BYTES`), the client's per-stream send buffer (4 MiB), the body
/// channel (8 chunks of at most 1 MiB) and the chunk being filled (512 KiB): 21 MiB. The rest is
/// margin. It costs this much memory per VM while a delta ships.
pub const REPLAY_WINDOW_BYTES: u64 = 32 << 20;
const _: () = assert!(
    REPLAY_WINDOW_BYTES
        >= transport::STREAM_WINDOW_BYTES as u64
            + transport::SEND_BUFFER_BYTES as u64
            + transport::DEFAULT_BODY_CHANNEL_CHUNKS as u64
                * crate::shipper::READ_CHUNK_BYTES as u64
            + CHUNK_BYTES as u64,
    "the replay window must hold everything that can be in flight"
);
/// Resume attempts in a row that do not move the replica's offset forward before the cut is
/// given up (aborted, as on any other failure): a link that makes progress is followed as
/// long as it does, a dead one costs about a minute of backoff (below) before the usual retry.
pub const RESUME_ATTEMPTS_MAX: u32 = 8;
/// Connection-refused answers in a row tolerated while resuming: a restarting proxy (or replica
/// daemon) refuses for a moment, but a dead replica should fail the cycle (health Warning)
/// within seconds (250 ms + 500 ms + 1 s + 2 s of backoff), as it did before resumes.
pub const RESUME_REFUSED_MAX: u32 = 3;
/// First wait before a resume; doubled per attempt up to [`RESUME_BACKOFF_MAX`], and back to
/// this after an attempt that made progress. Short: a connection reset is usually transient.
pub const RESUME_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between resume attempts.
pub const RESUME_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Size of the chunks the writer sends (as `transport::BodyWriter`).
const CHUNK_BYTES: usize = transport::BODY_WRITER_BUFFER_BYTES;

enum Cmd {
    /// Replay the window from `from` into `sender`'s request, then go on with it.
    Resume { sender: BodySender, from: u64 },
    /// The replica has the point: the writer may end.
    Done,
    /// The upload failed for good: the encoder stops with an error.
    GiveUp,
}

#[derive(Default)]
struct State {
    /// The last chunks of the stream; the first starts at `window_start`.
    window: VecDeque<Bytes>,
    window_bytes: u64,
    window_start: u64,
    /// Stream offset after the last chunk.
    produced: u64,
    cmd: Option<Cmd>,
    /// The writer is gone without having been told `Done` (the encoder failed, or gave up).
    gone: bool,
}

/// Shared by the encoder's [`RelayWriter`] and the [`upload`] task of one delta.
#[derive(Default)]
pub struct Relay {
    state: Mutex<State>,
    cv: Condvar,
    sent: AtomicU64,
}

impl Relay {
    /// A relay and the writer the encoder writes the delta into, sending into `sender`'s
    /// request first.
    pub fn new(sender: BodySender) -> (Arc<Relay>, RelayWriter) {
        let relay = Arc::new(Relay::default());
        let writer = RelayWriter {
            relay: relay.clone(),
            sender: Some(sender),
            buf: BytesMut::with_capacity(CHUNK_BYTES),
        };
        (relay, writer)
    }

    /// Bytes put on the wire so far, replays included.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn command(&self, cmd: Cmd) {
        let mut st = self.state.lock();
        if !st.gone {
            st.cmd = Some(cmd);
            self.cv.notify_all();
        }
    }

    /// Asks the writer to continue into a new request from stream offset `from`. Fails when the
    /// writer is gone or `from` is not in the window (then nothing is sent).
    fn resume(&self, sender: BodySender, from: u64) -> Result<(), String> {
        let mut st = self.state.lock();
        if st.gone {
            return Err("the encoder stopped".into());
        }
        if from < st.window_start || from > st.produced {
            return Err(format!(
                "the replica holds {from} bytes, outside the replay window ({}..={})",
                st.window_start, st.produced
            ));
        }
        st.cmd = Some(Cmd::Resume { sender, from });
        self.cv.notify_all();
        Ok(())
    }

    fn is_gone(&self) -> bool {
        self.state.lock().gone
    }

    /// Appends a chunk to the window, dropping the oldest chunks beyond the bound.
    fn record(&self, chunk: &Bytes) {
        let mut st = self.state.lock();
        st.window.push_back(chunk.clone());
        st.window_bytes += chunk.len() as u64;
        st.produced += chunk.len() as u64;
        while let Some(front) = st.window.front() {
            let n = front.len() as u64;
            if st.window_bytes - n < REPLAY_WINDOW_BYTES {
                break;
            }
            st.window.pop_front();
            st.window_bytes -= n;
            st.window_start += n;
        }
    }

    /// The stream's bytes from `from` to the end of the window (slices, no copy).
    fn replay_from(&self, from: u64) -> io::Result<Vec<Bytes>> {
        let st = self.state.lock();
        if from < st.window_start || from > st.produced {
            return Err(io::Error::other("resume offset left the replay window"));
        }
        let mut at = st.window_start;
        let mut out = Vec::new();
        for chunk in &st.window {
            let end = at + chunk.len() as u64;
            if end > from {
                let skip = from.saturating_sub(at) as usize;
                out.push(chunk.slice(skip..));
            }
            at = end;
        }
        Ok(out)
    }

    fn wait_cmd(&self) -> Cmd {
        let mut st = self.state.lock();
        loop {
            if let Some(cmd) = st.cmd.take() {
                return cmd;
            }
            self.cv.wait(&mut st);
        }
    }
}

/// The encoder's output (`std::io::Write` and `delta::SharedWrite`): sends the delta in chunks
/// and keeps the last ones for a replay. When the request fails it blocks until [`upload`]
/// resumes (or gives up). Must be used from a non-runtime thread. Call [`RelayWriter::finish`]
/// at the end: it returns once the replica answered.
pub struct RelayWriter {
    relay: Arc<Relay>,
    sender: Option<BodySender>,
    buf: BytesMut,
}

fn given_up() -> io::Error {
    io::Error::other("the upload of this delta was given up")
}

impl RelayWriter {
    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK_BYTES);
        self.send_chunk(chunk)
    }

    fn send_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.relay.record(&chunk);
        let n = chunk.len() as u64;
        if let Some(sender) = &self.sender {
            if sender.blocking_send(chunk).is_ok() {
                self.relay.sent.fetch_add(n, Ordering::Relaxed);
                return Ok(());
            }
        }
        // The request failed. The chunk is in the window: a resume replays it.
        self.sender = None;
        self.await_resume(false).map(|_| ())
    }

    /// Waits for the uploader: on a resume, replays the window into the new request (then
    /// `Ok(false)`); `Ok(true)` when the upload is done (only expected while finishing).
    fn await_resume(&mut self, finishing: bool) -> io::Result<bool> {
        loop {
            match self.relay.wait_cmd() {
                Cmd::Resume { sender, from } => {
                    let mut ok = true;
                    for chunk in self.relay.replay_from(from)? {
                        let n = chunk.len() as u64;
                        if sender.blocking_send(chunk).is_err() {
                            ok = false;
                            break;
                        }
                        self.relay.sent.fetch_add(n, Ordering::Relaxed);
                    }
                    if ok {
                        self.sender = Some(sender);
                        return Ok(false);
                    }
                    // That request failed too: wait for the next command.
                }
                Cmd::Done if finishing => return Ok(true),
                Cmd::Done | Cmd::GiveUp => return Err(given_up()),
            }
        }
    }

    /// Ends the delta: sends what is buffered, ends the request cleanly, and waits for the
    /// replica's answer, replaying the end of the stream as often as the upload resumes.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_buffered()?;
        loop {
            if let Some(sender) = self.sender.take() {
                sender.finish();
            }
            if self.await_resume(true)? {
                return Ok(());
            }
        }
    }
}

impl Write for RelayWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= CHUNK_BYTES {
            self.send_buffered()?;
        }
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_BYTES {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

impl delta::SharedWrite for RelayWriter {
    fn write_shared(&mut self, chunk: Bytes) -> io::Result<()> {
        self.send_buffered()?;
        self.send_chunk(chunk)
    }
}

impl Drop for RelayWriter {
    fn drop(&mut self) {
        let mut st = self.relay.state.lock();
        st.gone = true;
        // A resume nobody will serve: dropping its sender fails that request.
        st.cmd = None;
        st.window.clear();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uploads delta `seq` of `vm` (header checksum `checksum`) whose encoder writes through
/// `relay`, first as `body`; resumes after transport errors as documented above. Ends the
/// writer either way (`Done` on success, else it gives up and the encoder fails).
/// `on_resume(offset)` is called before each resumed request, with the bytes the replica
/// already held (not sent again).
/// The deadlines every request of an upload runs under, and where its progress is reported
/// (`docs/limits.md`).
pub struct Watch<'a> {
    pub timeouts: &'a peer_client::PeerTimeouts,
    pub last_progress_ns: &'a std::sync::atomic::AtomicU64,
}

#[allow(clippy::too_many_arguments)]
pub async fn upload(
    peer: &Peer,
    vm: &str,
    seq: proto::Seq,
    checksum: &[u8; 32],
    relay: &Relay,
    body: BoxBody,
    watch: Watch<'_>,
    mut on_resume: impl FnMut(u64),
) -> anyhow::Result<DeltaReply> {
    let checksum_hex = hex(checksum);
    // Whatever ends this upload other than the replica's answer (an error, or this future
    // dropped at shutdown), the encoder must stop instead of waiting for a resume.
    let mut outcome = EndWriter { relay, done: false };
    let mut result = peer_client::put_delta_watched(
        peer,
        vm,
        seq,
        body,
        None,
        watch.timeouts,
        watch.last_progress_ns,
    )
    .await;
    let mut backoff = RESUME_BACKOFF_MIN;
    let mut stalled = 0u32;
    let mut offset = 0u64;
    let mut resumed = false;
    let mut refused = 0u32;
    loop {
        let err = match result {
            Ok(reply) => {
                outcome.done = true;
                return Ok(reply);
            }
            Err(e) => e,
        };
        // The first request never reached the replica: nothing to resume.
        let first = stalled == 0 && !resumed;
        let give_up = match failure(&err) {
            Failure::Final => true,
            Failure::Refused => {
                refused += 1;
                first || refused > RESUME_REFUSED_MAX
            }
            Failure::Unreachable => first,
            Failure::Broken => false,
        };
        if failure(&err) != Failure::Refused {
            refused = 0;
        }
        // A failed encoder has nothing to resume with.
        if give_up || relay.is_gone() || stalled >= RESUME_ATTEMPTS_MAX {
            return Err(err);
        }
        stalled += 1;
        tracing::info!(%vm, %seq, attempt = stalled, "upload interrupted ({err:#}); resuming in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESUME_BACKOFF_MAX);
        let from = match peer_client::partial(peer, vm, seq, watch.timeouts).await {
            Ok(p) if p.seq == seq && p.header_checksum == checksum_hex => p.received_bytes,
            Ok(_) => return Err(err.context("cannot resume: the replica kept another delta")),
            // The replica kept nothing (it had not received the header when the transport
            // broke: a reset also discards what sits unread in its socket) and still expects
            // this seq: send the delta again from byte 0, if the window still starts there.
            Err(e) if starts_over(&e, seq) => 0,
            Err(e) if failure(&e) == Failure::Final => {
                // Nothing kept (or a version-1 replica, or its daemon is down and so has lost
                // what it kept, or it committed this point and the answer was lost): the cut
                // cannot be resumed.
                return Err(err.context(format!("cannot resume: {e:#}")));
            }
            Err(e) => {
                result = Err(e);
                continue;
            }
        };
        if from > offset {
            // Progress since the last attempt: the link works, if intermittently.
            stalled = 0;
            backoff = RESUME_BACKOFF_MIN;
        }
        offset = from;
        let (sender, body) = transport::body_channel(transport::DEFAULT_BODY_CHANNEL_CHUNKS);
        if let Err(why) = relay.resume(sender, from) {
            return Err(err.context(format!("cannot resume: {why}")));
        }
        on_resume(from);
        resumed = true;
        // From byte 0 it is a plain upload (which also drops anything the replica kept).
        let resume = (from > 0).then_some((from, checksum_hex.as_str()));
        result = peer_client::put_delta_watched(
            peer,
            vm,
            seq,
            body,
            resume,
            watch.timeouts,
            watch.last_progress_ns,
        )
        .await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Refused by the replica, or a configuration or trust error: resuming cannot help.
    Final,
    /// Nobody listens there: a proxy, NAT or replica daemon being restarted, or a dead one.
    Refused,
    /// No connection could be opened (timeout, network unreachable): may pass.
    Unreachable,
    /// The request failed under way (reset, end of stream): the replica may hold a prefix.
    Broken,
}

/// True when the replica answered that it keeps nothing of `seq` and expects exactly `seq`
/// next (so it did not commit it with the answer lost: sending it again is not a replay).
fn starts_over(err: &anyhow::Error, seq: proto::Seq) -> bool {
    err.downcast_ref::<PeerRefusal>()
        .is_some_and(|r| r.0.code == "no_partial" && r.0.expected_seq == Some(seq))
}

fn failure(err: &anyhow::Error) -> Failure {
    use transport::TransportError as T;
    // A deadline passed: the replica is stuck (hung storage), not the link; resuming would
    // only wait on it again. The cycle fails and the RPO grows.
    if err.is::<PeerRefusal>() || err.is::<peer_client::PeerTimeout>() {
        return Failure::Final;
    }
    match err.downcast_ref::<T>() {
        None | Some(T::Http { .. } | T::Tls { .. } | T::BadResponse { .. }) => Failure::Broken,
        Some(T::Timeout { .. } | T::Connect { .. }) => Failure::Unreachable,
        Some(T::ConnectionRefused { .. }) => Failure::Refused,
        Some(_) => Failure::Final,
    }
}

/// Ends the writer when an upload ends: `Done` after the replica's answer, else `GiveUp`.
struct EndWriter<'a> {
    relay: &'a Relay,
    done: bool,
}

impl Drop for EndWriter<'_> {
    fn drop(&mut self) {
        self.relay
            .command(if self.done { Cmd::Done } else { Cmd::GiveUp });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta::SharedWrite;
    use http_body_util::BodyExt;

    async fn drain(body: BoxBody) -> Result<Vec<u8>, transport::BoxError> {
        body.collect().await.map(|c| c.to_bytes().to_vec())
    }

    /// The encoder's bytes survive a failed request: a resume from any offset in the window
    /// gets exactly the stream from there, whether the writer was mid-stream or finishing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_request_is_continued_from_the_replicas_offset() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (sender, body) = transport::body_channel(2);
        let (relay, mut writer) = Relay::new(sender);
        let data2 = data.clone();
        let encoder = std::thread::spawn(move || {
            writer.write_all(&data2[..1_000_000]).unwrap();
            writer
                .write_shared(Bytes::copy_from_slice(&data2[1_000_000..2_000_000]))
                .unwrap();
            writer.write_all(&data2[2_000_000..]).unwrap();
            writer.finish()
        });
        // First request: read 700 000 bytes, then fail (drop the body).
        let mut body = body;
        let mut got = Vec::new();
        while got.len() < 700_000 {
            let f = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(&f.into_data().unwrap());
        }
        drop(body);
        // The replica says it holds 600 000 bytes.
        let (sender, body) = transport::body_channel(2);
        relay.resume(sender, 600_000).unwrap();
        let rest = drain(body).await.unwrap();
        assert!(rest == data[600_000..], "the stream from the offset");
        relay.command(Cmd::Done);
        encoder.join().unwrap().unwrap();
        assert!(relay.sent_bytes() >= data.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offset_outside_the_window_is_refused_and_giving_up_fails_the_encoder() {
        let (sender, body) = transport::body_channel(2);
        let (relay, mut writer) = Relay::new(sender);
        let encoder = std::thread::spawn(move || {
            let chunk = vec![1u8; 1 << 20];
            for _ in 0..40 {
                writer.write_all(&chunk)?;
            }
            writer.finish()
        });
        drain(body).await.unwrap();
        // The request ended cleanly but the answer was lost: the writer waits in finish.
        let (sender, _body) = transport::body_channel(2);
        let err = relay.resume(sender, 0).unwrap_err();
        assert!(err.contains("outside the replay window"), "{err}");
        relay.command(Cmd::GiveUp);
        assert!(encoder.join().unwrap().is_err());
        let (sender, _body) = transport::body_channel(2);
        assert!(relay.resume(sender, 40 << 20).is_err(), "writer gone");
    }

    /// A replica that refuses the delta ends the upload at once, so health turns Warning as
    /// before; only a request broken under way is resumed, and a link that does not connect
    /// (refused: briefly) is retried only once an upload was under way.
    #[test]
    fn a_dead_replica_fails_the_cycle_at_once_instead_of_resuming() {
        use transport::TransportError as T;
        let peer = || "r:1".to_string();
        let refusal = anyhow::Error::from(PeerRefusal(proto::peer::PeerError {
            code: "corrupt_delta".into(),
            error: "x".into(),
            expected_seq: None,
        }));
        assert_eq!(failure(&refusal), Failure::Final);
        let refused = anyhow::Error::from(T::ConnectionRefused { peer: peer() });
        assert_eq!(failure(&refused), Failure::Refused);
        let reset = anyhow::Error::from(T::Http {
            peer: peer(),
            reason: "connection reset".into(),
        });
        assert_eq!(failure(&reset), Failure::Broken);
        let unreachable = anyhow::Error::from(T::Connect {
            peer: peer(),
            source: std::io::Error::other("network unreachable"),
        });
        assert_eq!(failure(&unreachable), Failure::Unreachable);
        let answer_lost = anyhow::anyhow!("reading the replica's answer: stream reset");
        assert_eq!(failure(&answer_lost), Failure::Broken);
    }

    /// `no_partial` from a replica that still expects this seq lets the delta go again from
    /// byte 0; from one that already committed it (the answer was lost) it does not: sending it
    /// again would be refused as out of sequence, which means "resynchronize".
    #[test]
    fn a_point_committed_with_its_answer_lost_is_not_sent_again() {
        let no_partial = |expected| {
            anyhow::Error::from(PeerRefusal(proto::peer::PeerError {
                code: "no_partial".into(),
                error: "x".into(),
                expected_seq: Some(proto::Seq(expected)),
            }))
        };
        assert!(starts_over(&no_partial(5), proto::Seq(5)));
        assert!(!starts_over(&no_partial(6), proto::Seq(5)));
        let other = anyhow::Error::from(PeerRefusal(proto::peer::PeerError {
            code: "not_found".into(),
            error: "x".into(),
            expected_seq: Some(proto::Seq(5)),
        }));
        assert!(!starts_over(&other, proto::Seq(5)), "a version-1 replica");
    }
}
