//! The primary's calls to a replica daemon (routes in `proto::peer`): hello and delta upload.
//! Refusals come back as [`PeerRefusal`] so the replication task can tell "the replica cannot
//! follow" (resync required) from "try again later".

use anyhow::{anyhow, Context};
use http_body_util::{BodyExt, Limited};
use hyper::{Method, Request, StatusCode};
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

pub async fn hello(peer: &Peer, hello: &Hello) -> anyhow::Result<HelloReply> {
    let body = serde_json::to_vec(hello)?;
    call(
        peer,
        Method::POST,
        &format!("/v1/replicas/{}/hello", hello.vm),
        transport::full(body),
        &[],
    )
    .await
}

/// Uploads delta `seq` of `vm`. `resume`: the body holds the delta's bytes from that offset on,
/// continuing the interrupted upload the replica kept, named by its header checksum (hex).
pub async fn put_delta(
    peer: &Peer,
    vm: &str,
    seq: u64,
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

/// Asks the replica where the interrupted upload of `seq` stands (peer protocol v2).
pub async fn partial(peer: &Peer, vm: &str, seq: u64) -> anyhow::Result<PartialReply> {
    call(
        peer,
        Method::GET,
        &format!("/v1/replicas/{vm}/deltas/{seq}/partial"),
        transport::empty(),
        &[],
    )
    .await
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
