//! The client side of a peer link: one lazily opened, shared, self-healing HTTP/2 connection
//! over mutual TLS 1.3 to one peer, multiplexing every request to it.
//!
//! It owns connection lifecycle (connect deadline, reuse, reconnect) and the mapping of
//! failures to actionable [`TransportError`]s. It never retries a request that may have
//! reached the peer (only one that provably never left, on a connection found dead), and never
//! holds more than one connection per peer.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::body::{empty, full, BoxBody};
use crate::error::chain_to_string;
// Same HTTP/2 tuning on both ends of a link; keepalive also runs while idle on the client side,
// so a dead peer is noticed within interval + timeout.
use crate::server::{
    CONNECTION_WINDOW_BYTES, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_FRAME_BYTES,
    STREAM_WINDOW_BYTES,
};
use crate::tls::{TlsContext, ALPN_H2};
use crate::TransportError;

/// TCP connect + TLS handshake + HTTP/2 setup must finish within this time; longer means the
/// peer is down or unreachable and the caller should back off, not hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest body [`Peer::get_json`] / [`Peer::post_json`] read: control replies are small; the
/// cap keeps a confused or hostile peer from filling our memory.
pub const JSON_RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Bytes of an error response body quoted in [`TransportError::Status`].
const ERROR_BODY_QUOTE_BYTES_MAX: usize = 512;
/// After a request fails because its connection died, how long to wait for the connection
/// task to report why (the TLS alert or I/O error) before reporting the request error alone.
const CONNECTION_END_WAIT: Duration = Duration::from_secs(1);
/// First pause before reconnecting after the peer closed a new connection without a word (its
/// handshake budget was full); doubled on each retry up to [`REFUSED_RETRY_MAX`], all within
/// the connect deadline. The server cuts silent connections after 2 s, so a few retries reach
/// a freed slot.
const REFUSED_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between such retries.
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(1);
/// Per-stream send buffer: large enough to keep the bigger server windows full. (Part of what
/// a resumed upload may have to send again: `understudy`'s replay window.)
pub const SEND_BUFFER_BYTES: usize = 4 << 20;

/// Where a [`Peer`] gets its TLS client config for each new connection.
#[derive(Clone, Debug)]
pub enum ClientTls {
    /// A fixed config.
    Fixed(Arc<ClientConfig>),
    /// The current config of a [`TlsContext`] (trust changes apply to the next connection).
    Context(TlsContext),
}

impl From<Arc<ClientConfig>> for ClientTls {
    fn from(c: Arc<ClientConfig>) -> Self {
        Self::Fixed(c)
    }
}

impl From<TlsContext> for ClientTls {
    fn from(c: TlsContext) -> Self {
        Self::Context(c)
    }
}

impl ClientTls {
    fn config(&self, expect: Option<&str>) -> Arc<ClientConfig> {
        match self {
            Self::Fixed(c) => c.clone(),
            Self::Context(c) => c.client_config_expecting(expect),
        }
    }
}

/// A handle on one peer (`host:port`). Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Peer {
    inner: Arc<PeerInner>,
}

#[derive(Debug)]
struct PeerInner {
    addr: String,
    server_name: ServerName<'static>,
    tls: ClientTls,
    /// The replica's peer name this link must reach (see [`Peer::expecting`]).
    expect: Option<String>,
    connect_timeout: Duration,
    conn: Mutex<Option<Conn>>,
}

/// One live HTTP/2 connection.
#[derive(Clone, Debug)]
struct Conn {
    sender: SendRequest<BoxBody>,
    ended: watch::Receiver<ConnEnd>,
    /// The first TLS error seen on the socket (e.g. the alert by which the peer rejected our
    /// certificate). h2 drops error causes, so it is captured below hyper.
    tls_error: TlsErrorSlot,
    /// Peer name (CN, else first DNS name) of the verified server certificate.
    server_name: Option<String>,
}

type TlsErrorSlot = Arc<std::sync::Mutex<Option<rustls::Error>>>;

/// How the connection task finished.
#[derive(Clone, Debug)]
enum ConnEnd {
    Running,
    Clean,
    Failed(Arc<hyper::Error>),
}

impl Peer {
    /// A peer at `addr` (`host:port`, `10.0.0.2:7443`, `[fd00::2]:7443`). No I/O happens until
    /// the first request. The TLS server name is the host part (names and IPs both work).
    pub fn new(addr: impl Into<String>, tls: impl Into<ClientTls>) -> Result<Self, TransportError> {
        Self::with_connect_timeout(addr, tls, CONNECT_TIMEOUT)
    }

    /// [`Peer::new`] with a different connect deadline (tests, slow links).
    pub fn with_connect_timeout(
        addr: impl Into<String>,
        tls: impl Into<ClientTls>,
        connect_timeout: Duration,
    ) -> Result<Self, TransportError> {
        Self::build(addr.into(), tls.into(), None, connect_timeout)
    }

    /// [`Peer::new`] for a replica whose certificate must name `expect` (recorded when the
    /// relationship was set up, see [`Peer::connected_name`]): another host at that address
    /// is refused even if its CA is trusted as a replica. `None` accepts any replica identity
    /// the trust store scopes allow (first contact).
    pub fn expecting(
        addr: impl Into<String>,
        tls: impl Into<ClientTls>,
        expect: Option<String>,
    ) -> Result<Self, TransportError> {
        Self::build(addr.into(), tls.into(), expect, CONNECT_TIMEOUT)
    }

    /// The peer name in the verified certificate of the current connection, if connected.
    pub async fn connected_name(&self) -> Option<String> {
        self.inner
            .conn
            .lock()
            .await
            .as_ref()
            .and_then(|c| c.server_name.clone())
    }

    fn build(
        addr: String,
        tls: ClientTls,
        expect: Option<String>,
        connect_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let host = split_host(&addr)?;
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|e| TransportError::InvalidAddress {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(PeerInner {
                addr,
                server_name,
                tls,
                expect,
                connect_timeout,
                conn: Mutex::new(None),
            }),
        })
    }

    /// `host:port` as given.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Sends a request on the shared connection, opening it first if needed. A relative URI
    /// (`/v1/status`) is completed with `https://<addr>`. Any HTTP status is `Ok`.
    pub async fn request(
        &self,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, TransportError> {
        let req = self.absolute(req)?;
        let (mut conn, fresh) = self.connection().await?;
        match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // Never sent, on a reused connection that died while idle: safe to retry once.
                Some(req) if !fresh => {
                    tracing::debug!(peer = %self.inner.addr, "connection was stale; reconnecting");
                    let (mut conn, _) = self.connection().await?;
                    match conn.sender.send_request(req).await {
                        Ok(resp) => Ok(resp),
                        Err(e) => Err(self.failure(&conn, &e).await),
                    }
                }
                _ => Err(self.failure(&conn, e.error()).await),
            },
        }
    }

    /// `GET path` expecting a 2xx; returns the body (at most [`JSON_RESPONSE_BYTES_MAX`]).
    pub async fn get_json(&self, path: &str) -> Result<Bytes, TransportError> {
        self.call(Method::GET, path, empty()).await
    }

    /// `POST path` with a JSON body expecting a 2xx; returns the response body.
    pub async fn post_json(&self, path: &str, json: Bytes) -> Result<Bytes, TransportError> {
        self.call(Method::POST, path, full(json)).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: BoxBody,
    ) -> Result<Bytes, TransportError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(body)
            .map_err(|e| TransportError::InvalidAddress {
                addr: path.to_owned(),
                reason: e.to_string(),
            })?;
        let resp = self.request(req).await?;
        let status = resp.status();
        let body = read_body(&self.inner.addr, resp.into_body(), JSON_RESPONSE_BYTES_MAX).await?;
        if !status.is_success() {
            let quote = &body[..body.len().min(ERROR_BODY_QUOTE_BYTES_MAX)];
            return Err(TransportError::Status {
                peer: self.inner.addr.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(quote).into_owned(),
            });
        }
        Ok(body)
    }

    /// Rewrites `/path` into `https://addr/path` (HTTP/2 needs :scheme and :authority).
    fn absolute(&self, mut req: Request<BoxBody>) -> Result<Request<BoxBody>, TransportError> {
        if req.uri().scheme().is_none() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let uri = format!("https://{}{pq}", self.inner.addr);
            *req.uri_mut() = uri
                .parse::<Uri>()
                .map_err(|e| TransportError::InvalidAddress {
                    addr: uri.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(req)
    }

    /// The live connection, opening one if there is none. `true` if just opened. The lock is
    /// held while connecting so that concurrent callers share one new connection.
    async fn connection(&self) -> Result<(Conn, bool), TransportError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.sender.is_closed() {
                return Ok((conn.clone(), false));
            }
        }
        *slot = None;
        let conn = self.connect().await?;
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    async fn connect(&self) -> Result<Conn, TransportError> {
        let peer = &self.inner.addr;
        let limit = self.inner.connect_timeout;
        let deadline = Instant::now() + limit;
        let timeout = |stage| TransportError::Timeout {
            peer: peer.clone(),
            stage,
            after: limit,
        };
        // A server over its handshake budget closes new connections at once, before any TLS
        // byte (`server.rs`); that is worth another try within the deadline. A TLS alert (e.g.
        // our certificate refused) or a timeout is not.
        let mut pause = REFUSED_RETRY_FIRST;
        let tls = loop {
            let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(peer.as_str()))
                .await
                .map_err(|_| timeout("TCP connect"))?
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => {
                        TransportError::ConnectionRefused { peer: peer.clone() }
                    }
                    _ => TransportError::Connect {
                        peer: peer.clone(),
                        source: e,
                    },
                })?;
            let _ = tcp.set_nodelay(true);
            let connector = TlsConnector::from(self.inner.tls.config(self.inner.expect.as_deref()));
            let attempt = tokio::time::timeout_at(
                deadline,
                connector.connect(self.inner.server_name.clone(), tcp),
            )
            .await
            .map_err(|_| timeout("TLS handshake"))?;
            match attempt {
                Ok(tls) => break tls,
                Err(e) if closed_before_speaking(&e) && Instant::now() + pause < deadline => {
                    tracing::debug!(peer = %peer, error = %e, retry_in_ms = pause.as_millis() as u64,
                        "peer closed the connection before the TLS handshake; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(REFUSED_RETRY_MAX);
                }
                Err(e) => return Err(TransportError::from_peer_failure(peer, &e)),
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(TransportError::Tls {
                peer: peer.clone(),
                reason: "peer did not agree to HTTP/2 (ALPN h2); is it an Understudy daemon?"
                    .to_owned(),
            });
        }
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .max_send_buf_size(SEND_BUFFER_BYTES)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let server_name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::identity::peer_name);
        let tls_error = TlsErrorSlot::default();
        let io = TlsErrorTap {
            inner: tls,
            slot: tls_error.clone(),
        };
        let (sender, connection) =
            tokio::time::timeout_at(deadline, builder.handshake(TokioIo::new(io)))
                .await
                .map_err(|_| timeout("HTTP/2 handshake"))?
                .map_err(|e| TransportError::from_peer_failure(peer, &e))?;
        let (end_tx, ended) = watch::channel(ConnEnd::Running);
        let log_peer = peer.clone();
        tokio::spawn(async move {
            let end = match connection.await {
                Ok(()) => ConnEnd::Clean,
                Err(e) => {
                    tracing::debug!(peer = %log_peer, error = %e, "peer connection failed");
                    ConnEnd::Failed(Arc::new(e))
                }
            };
            let _ = end_tx.send(end);
        });
        tracing::debug!(peer = %peer, "connected");
        Ok(Conn {
            sender,
            ended,
            tls_error,
            server_name,
        })
    }

    /// Builds the most useful error for a failed request: a TLS cause in the request error
    /// wins; if the connection died, the connection's own failure (often the peer's TLS alert
    /// that rejected our certificate) is reported.
    async fn failure(&self, conn: &Conn, err: &hyper::Error) -> TransportError {
        let peer = &self.inner.addr;
        if crate::error::find_rustls_error(err).is_none() {
            if conn.sender.is_closed() {
                // Let the connection task finish so that its cause is known.
                let mut ended = conn.ended.clone();
                let _ = tokio::time::timeout(
                    CONNECTION_END_WAIT,
                    ended.wait_for(|e| !matches!(e, ConnEnd::Running)),
                )
                .await;
            }
            let tls = conn
                .tls_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(tls) = tls {
                return TransportError::from_tls(peer, &tls);
            }
            let end = conn.ended.borrow().clone();
            if let ConnEnd::Failed(conn_err) = end {
                return TransportError::from_peer_failure(peer, conn_err.as_ref());
            }
        }
        TransportError::from_peer_failure(peer, err)
    }
}

/// Passes I/O through, recording the first rustls error it sees.
struct TlsErrorTap<S> {
    inner: S,
    slot: TlsErrorSlot,
}

impl<S> TlsErrorTap<S> {
    fn record<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            if let Some(tls) = crate::error::find_rustls_error(e) {
                let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
                slot.get_or_insert_with(|| tls.clone());
            }
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsErrorTap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.record(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsErrorTap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        self.record(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.record(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.record(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.record(result)
    }
}

/// The peer closed or reset the connection during our TLS handshake without sending an alert:
/// what a server over its admission budget does (not what a server refusing our certificate
/// does: that one sends an alert, seen as a rustls error).
fn closed_before_speaking(e: &io::Error) -> bool {
    crate::error::find_rustls_error(e).is_none()
        && matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        )
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_body(peer: &str, body: Incoming, limit: usize) -> Result<Bytes, TransportError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(TransportError::BadResponse {
                    peer: peer.to_owned(),
                    reason: format!("response body larger than {limit} bytes"),
                });
            }
            Err(TransportError::Http {
                peer: peer.to_owned(),
                reason: chain_to_string(e.as_ref()),
            })
        }
    }
}

/// The host part of `host:port` / `[v6]:port`, validating the port.
fn split_host(addr: &str) -> Result<&str, TransportError> {
    let bad = |reason: &str| TransportError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    port.parse::<u16>()
        .map_err(|_| bad("port is not a number 0-65535"))?;
    let host = match host.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or_else(|| bad("unbalanced ["))?,
        None if host.contains(':') => return Err(bad("IPv6 addresses need brackets: [::1]:7443")),
        None => host,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_hosts() {
        assert_eq!(split_host("a.example:7443").unwrap(), "a.example");
        assert_eq!(split_host("10.0.0.2:1").unwrap(), "10.0.0.2");
        assert_eq!(split_host("[::1]:7443").unwrap(), "::1");
        for bad in [
            "nohost",
            ":7443",
            "::1:7443",
            "a:port",
            "[::1:7443",
            "a:70000",
        ] {
            assert!(split_host(bad).is_err(), "{bad}");
        }
    }
}
