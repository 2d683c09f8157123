//! The primary's calls to a replica daemon (routes in `proto::peer`): hello and delta upload.
//! Refusals come back as [`PeerRefusal`] so the replication task can tell "the replica cannot
//! follow" (resync required) from "try again later".

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Method, Request, StatusCode};
use parking_lot::Mutex;
use proto::peer::{DeltaReply, Hello, HelloReply, PartialReply, PeerError};
use transport::{BoxBody, Peer};

/// Largest control answer accepted from a peer.
const PEER_REPLY_MAX_BYTES: usize = 1 << 20;

/// A replica refused a call, with its stable code.
#[derive(Debug, thiserror::Error)]
#[error("replica refused: {} ({})", .0.error, .0.code)]
pub struct PeerRefusal(pub PeerError);

impl PeerRefusal {
    /// Codes meaning the replica can no longer follow this primary without resynchronization.
    pub fn needs_resync(&self) -> bool {
        matches!(self.0.code.as_str(), "out_of_sequence" | "damaged")
    }
}

/// Whether a failed call is worth retrying as is (a `sync` then exits 75): a deadline passed,
/// the transport failed, or the replica is busy or still opening. Refusals that need a person
/// (trust, allow list, ownership, corrupt data, resynchronization) are not.
/// The kind of a failed call to a peer, for the caller's own answer: transient (unreachable,
/// deadline, busy) → retry later; the peer's considered refusal → invalid request when the
/// peer said so, else a conflict with the peer's state. Never "unexpected": a peer saying no
/// is not a bug of this host.
pub fn typed(e: anyhow::Error) -> anyhow::Error {
    let line = crate::errfmt::one_line(&e);
    if is_transient(&e) {
        crate::error::transient(line)
    } else if let Some(r) = e.downcast_ref::<PeerRefusal>() {
        if r.0.code == "bad_request" {
            crate::error::bad_request(line)
        } else {
            crate::error::conflict(line)
        }
    } else {
        e
    }
}

pub fn is_transient(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<PeerTimeout>().is_some()
        || e.downcast_ref::<transport::TransportError>().is_some()
    {
        return true;
    }
    e.downcast_ref::<PeerRefusal>().is_some_and(|r| {
        matches!(
            r.0.code.as_str(),
            "busy" | "store_busy" | "verifying" | "store_unavailable" | "upload_interrupted"
        )
    })
}

/// Deadlines of the primary's calls (`serve --hello-timeout/--upload-idle-timeout/
/// --answer-timeout`; docs/limits.md). A replica whose storage hangs still answers HTTP/2
/// pings, so keepalive alone never ends such a call: these do, the cycle fails, the cut is
/// given back and the RPO grows; nothing else waits.
#[derive(Debug, Clone, Copy)]
pub struct PeerTimeouts {
    pub hello: Duration,
    pub upload_idle: Duration,
    pub answer: Duration,
}

/// Raised when a deadline of [`PeerTimeouts`] passes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerTimeout(String);

pub async fn hello(
    peer: &Peer,
    hello: &Hello,
    timeouts: &PeerTimeouts,
) -> anyhow::Result<HelloReply> {
    let body = serde_json::to_vec(hello)?;
    let path = format!("/v1/replicas/{}/hello", hello.vm);
    let call = call(peer, Method::POST, &path, transport::full(body), &[]);
    tokio::time::timeout(timeouts.hello, call)
        .await
        .map_err(|_| {
            PeerTimeout(format!(
                "the replica did not answer hello within {} s",
                timeouts.hello.as_secs()
            ))
        })?
}

/// Asks the replica for hashes of chunks of its newest point (`resync.md`).
pub async fn resync_hashes(
    peer: &Peer,
    vm: &str,
    req: &proto::peer::HashRequest,
) -> anyhow::Result<proto::peer::HashReply> {
    let body = serde_json::to_vec(req)?;
    let path = format!("/v1/replicas/{vm}/resync/hashes");
    call(peer, Method::POST, &path, transport::full(body), &[]).await
}

/// Uploads delta `seq` with two deadlines: the body must make progress (bytes taken by the
/// connection) at least every `upload_idle`, and once it has all been sent the answer must
/// come within `answer`. When either passes, or this future is dropped, the body is cancelled:
/// the shipper's next write fails, so its thread ends and the cut is given back.
pub async fn put_delta_watched(
    peer: &Peer,
    vm: &str,
    seq: proto::Seq,
    body: BoxBody,
    resume: Option<(u64, &str)>,
    timeouts: &PeerTimeouts,
    last_progress_ns: &AtomicU64,
) -> anyhow::Result<DeltaReply> {
    let watched = WatchedBody::new(body);
    let progress = watched.progress.clone();
    let _cancel_on_drop = CancelOnDrop(progress.clone());
    let call = put_delta(peer, vm, seq, BodyExt::boxed(watched), resume);
    tokio::pin!(call);
    let mut tick = tokio::time::interval(WATCH_TICK);
    let mut last_bytes = 0;
    let mut last_change = Instant::now();
    let mut ended_at: Option<Instant> = None;
    loop {
        tokio::select! {
            r = &mut call => return r,
            _ = tick.tick() => {
                let now = Instant::now();
                if progress.ended.load(Ordering::Acquire) {
                    let since = *ended_at.get_or_insert(now);
                    if now.duration_since(since) > timeouts.answer {
                        progress.cancel();
                        return Err(PeerTimeout(format!(
                            "the replica did not answer within {} s after the whole delta {seq} was sent",
                            timeouts.answer.as_secs()
                        )).into());
                    }
                } else {
                    let bytes = progress.bytes.load(Ordering::Relaxed);
                    if bytes != last_bytes {
                        last_bytes = bytes;
                        last_change = now;
                        last_progress_ns.store(proto::time::now_unix_ns(), Ordering::Relaxed);
                    } else if now.duration_since(last_change) > timeouts.upload_idle {
                        progress.cancel();
                        return Err(PeerTimeout(format!(
                            "the upload of delta {seq} made no progress for {} s ({bytes} bytes sent)",
                            timeouts.upload_idle.as_secs()
                        )).into());
                    }
                }
            }
        }
    }
}

/// How often [`put_delta_watched`] looks at the upload's progress.
const WATCH_TICK: Duration = Duration::from_millis(500);

/// What [`WatchedBody`] shares with its watcher.
#[derive(Default)]
struct UploadProgress {
    /// The body itself, taken out (and dropped) on cancel: dropping its channel's receiver is
    /// what wakes a shipper blocked on a full channel, whether or not the connection still
    /// polls the body.
    slot: Mutex<Option<BoxBody>>,
    bytes: AtomicU64,
    ended: AtomicBool,
}

impl UploadProgress {
    fn cancel(&self) {
        let body = self.slot.lock().take();
        drop(body);
    }
}

struct CancelOnDrop(Arc<UploadProgress>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A request body that counts the bytes the connection takes and can be cancelled from
/// outside.
struct WatchedBody {
    progress: Arc<UploadProgress>,
}

impl WatchedBody {
    fn new(body: BoxBody) -> WatchedBody {
        let progress = Arc::new(UploadProgress::default());
        *progress.slot.lock() = Some(body);
        WatchedBody { progress }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = transport::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut slot = self.progress.slot.lock();
        let Some(body) = slot.as_mut() else {
            return Poll::Ready(Some(Err("the upload was cancelled".into())));
        };
        let polled = Pin::new(body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.progress
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.progress.ended.store(true, Ordering::Release),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.progress.ended.load(Ordering::Acquire)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Uploads delta `seq` of `vm`. `resume`: the body holds the delta's bytes from that offset on,
/// continuing the interrupted upload the replica kept, named by its header checksum (hex).
pub async fn put_delta(
    peer: &Peer,
    vm: &str,
    seq: proto::Seq,
    body: BoxBody,
    resume: Option<(u64, &str)>,
) -> anyhow::Result<DeltaReply> {
    let from;
    let mut headers = Vec::new();
    if let Some((offset, checksum)) = resume {
        from = offset.to_string();
        headers.push((proto::peer::RESUME_FROM_HEADER, from.as_str()));
        headers.push((proto::peer::HEADER_CHECKSUM_HEADER, checksum));
    }
    call(
        peer,
        Method::PUT,
        &format!("/v1/replicas/{vm}/deltas/{seq}"),
        body,
        &headers,
    )
    .await
}

/// Asks the replica where the interrupted upload of `seq` stands (peer protocol v2), within
/// the hello deadline (it is as small a call).
pub async fn partial(
    peer: &Peer,
    vm: &str,
    seq: proto::Seq,
    timeouts: &PeerTimeouts,
) -> anyhow::Result<PartialReply> {
    let path = format!("/v1/replicas/{vm}/deltas/{seq}/partial");
    let call = call(peer, Method::GET, &path, transport::empty(), &[]);
    tokio::time::timeout(timeouts.hello, call)
        .await
        .map_err(|_| {
            PeerTimeout(format!(
                "the replica did not say where upload {seq} stands within {} s",
                timeouts.hello.as_secs()
            ))
        })?
}

async fn call<T: serde::de::DeserializeOwned>(
    peer: &Peer,
    method: Method,
    path: &str,
    body: BoxBody,
    headers: &[(&str, &str)],
) -> anyhow::Result<T> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(body).context("building peer request")?;
    let resp = peer.request(req).await?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), PEER_REPLY_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the replica's answer: {e}"))?
        .to_bytes();
    if status == StatusCode::OK {
        return serde_json::from_slice(&bytes).context("the replica's answer is not valid JSON");
    }
    match serde_json::from_slice::<PeerError>(&bytes) {
        Ok(pe) => Err(PeerRefusal(pe).into()),
        Err(_) => Err(anyhow!(
            "replica answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        )),
    }
}
