//! The CLI's client for the local daemon API: JSON over HTTP/1.1 on `<data-dir>/api.sock`.
//! One short-lived connection per call; the CLI has no other way to change host state.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A refusal by the daemon, carried through `anyhow` so `main` can pick the exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    pub message: String,
    pub transient: bool,
}

pub struct Api {
    socket: PathBuf,
    data_dir: PathBuf,
}

impl Api {
    pub fn new(data_dir: &Path) -> Api {
        Api {
            socket: data_dir.join("api.sock"),
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn get<R: DeserializeOwned>(&self, path: &str) -> anyhow::Result<R> {
        self.call("GET", path, None)
    }

    pub fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<R> {
        let body = serde_json::to_vec(body).context("encoding request")?;
        self.call("POST", path, Some(body))
    }

    fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<R> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the CLI runtime")?;
        let bytes = rt.block_on(self.call_async(method, path, body))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the daemon's answer to {method} {path} is not valid JSON"))
    }

    async fn call_async(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Bytes> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow!(
                "cannot reach the understudy daemon at {} ({e}); is `understudy serve --data-dir {}` running?",
                self.socket.display(),
                self.data_dir.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the daemon")?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "understudy")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building request")?;
        let resp = sender
            .send_request(req)
            .await
            .context("talking to the daemon")?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the daemon's answer")?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let failure = match serde_json::from_slice::<proto::ApiError>(&bytes) {
            Ok(e) => ApiFailure {
                message: e.error,
                transient: e.transient,
            },
            Err(_) => ApiFailure {
                message: format!(
                    "daemon answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
                transient: status == hyper::StatusCode::SERVICE_UNAVAILABLE,
            },
        };
        Err(failure.into())
    }
}
