//! The primary's calls to a replica daemon (routes in `proto::peer`): hello and delta upload.
//! Refusals come back as [`PeerRefusal`] so the replication task can tell "the replica cannot
//! follow" (resync required) from "try again later".

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, Request, StatusCode};
use proto::peer::{DeltaReply, Hello, HelloReply, PeerError};
use transport::{BodyWriter, BoxBody, Peer};

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

pub async fn hello(peer: &Peer, hello: &Hello) -> anyhow::Result<HelloReply> {
    let body = serde_json::to_vec(hello)?;
    call(
        peer,
        Method::POST,
        &format!("/v1/replicas/{}/hello", hello.vm),
        transport::full(body),
    )
    .await
}

pub async fn put_delta(
    peer: &Peer,
    vm: &str,
    seq: u64,
    body: BoxBody,
) -> anyhow::Result<DeltaReply> {
    call(
        peer,
        Method::PUT,
        &format!("/v1/replicas/{vm}/deltas/{seq}"),
        body,
    )
    .await
}

async fn call<T: serde::de::DeserializeOwned>(
    peer: &Peer,
    method: Method,
    path: &str,
    body: BoxBody,
) -> anyhow::Result<T> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body)
        .context("building peer request")?;
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

/// `std::io::Write` into a streamed request body, counting the bytes that go on the wire.
pub struct DeltaBodyWriter {
    inner: BodyWriter,
    sent: Arc<AtomicU64>,
}

impl Write for DeltaBodyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl delta::SharedWrite for DeltaBodyWriter {
    fn write_shared(&mut self, chunk: Bytes) -> io::Result<()> {
        let n = chunk.len() as u64;
        self.inner.write_shared(chunk)?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl DeltaBodyWriter {
    /// Ends the body cleanly; dropping the writer without it aborts the upload.
    pub fn finish(self) -> io::Result<()> {
        self.inner.finish()
    }
}

pub fn delta_body() -> (DeltaBodyWriter, BoxBody, Arc<AtomicU64>) {
    let (sender, body) = transport::body_channel(transport::DEFAULT_BODY_CHANNEL_CHUNKS);
    let sent = Arc::new(AtomicU64::new(0));
    (
        DeltaBodyWriter {
            inner: BodyWriter::new(sender),
            sent: sent.clone(),
        },
        body,
        sent,
    )
}
