//! The peer-facing HTTPS server: accept TCP, mutual-TLS 1.3 handshake under a deadline, then
//! HTTP/2 only, handing each request with the verified peer's identity to the caller's handler.
//!
//! It owns connection admission (a bound on concurrent connections, a handshake deadline) and
//! HTTP/2 tuning. It never interprets requests (that is the handler's job), never lets one
//! connection's failure touch another, and logs each failed handshake exactly once.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::BoxBody;
use crate::tls::TlsContext;

/// A TLS handshake must finish within this time. A peer on the far side of a slow WAN needs
/// two round trips; ten seconds covers that with margin while a slow-loris or half-open peer
/// holds a connection slot for at most this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections (including handshakes in progress). Peers keep one connection per
/// pair, so even a large replica server needs tens; 256 leaves room for reconnect storms while
/// bounding memory (each connection can buffer up to [`CONNECTION_WINDOW_BYTES`]).
pub const MAX_CONNECTIONS: usize = 256;
/// HTTP/2 per-stream receive window. Deltas are streamed in one request; at 64 KiB (the
/// protocol default) a 1 ms RTT caps a stream at 64 MB/s. 8 MiB keeps a loopback or LAN
/// stream at wire speed.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// HTTP/2 per-connection receive window: room for two full-speed streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2 maximum frame size we accept. Bigger frames mean fewer headers and wakeups per MiB:
/// on this 2-core machine a 2 GiB loopback upload took ~2.3 s with 256 KiB frames and over twice
/// as long with the 16 KiB default (`examples/throughput.rs`). 1 MiB, the largest delta
/// payload, lets a payload the sender hands over as one chunk arrive as one chunk, which the
/// replica's decoder then verifies in place instead of gathering it into a frame buffer.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
/// Concurrent streams per connection: replication sends a few at a time (delta, control
/// calls); the bound stops a peer from opening thousands of handlers.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// HTTP/2 PING interval on idle connections, to detect dead peers and keep NAT state.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered for this long closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// On shutdown, in-flight requests get this long to finish after GOAWAY.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Who is calling: the TCP address and the name in their verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Remote socket address.
    pub addr: SocketAddr,
    /// Common name (or first DNS name) of the verified client certificate.
    pub name: Option<String>,
}

/// Tunables of [`serve_with`]; [`Default`] gives the named constants.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// See [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves peers on `listener` until `shutdown` completes, then sends GOAWAY on every
/// connection and waits up to [`SHUTDOWN_GRACE`] for in-flight requests.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: TlsContext,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, PeerInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<BoxBody>> + Send + 'static,
{
    serve_with(listener, tls, handler, shutdown, ServeOptions::default()).await;
}

/// [`serve`] with explicit [`ServeOptions`].
pub async fn serve_with<H, F>(
    listener: TcpListener,
    tls: TlsContext,
    handler: H,
    shutdown: impl Future<Output = ()>,
    options: ServeOptions,
) where
    H: Fn(Request<Incoming>, PeerInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let max = options.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // Take a slot before accepting: when full, connections wait in the kernel backlog
        // instead of costing us memory.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed; defensive
            },
        };
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let config = tls.server_config();
        let handler = handler.clone();
        let stop = stop_rx.clone();
        let timeout = options.handshake_timeout;
        tokio::spawn(async move {
            serve_connection(tcp, addr, config, timeout, handler, stop).await;
            drop(permit);
        });
    }
    // Stop: GOAWAY everywhere, then wait for the slots to come back.
    let _ = stop_tx.send(true);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace expired with connections still open");
    }
}

/// After refusing a handshake, how long we keep reading (and discarding) what the client
/// already sent. Closing with unread data makes the kernel send a reset that can destroy our
/// alert before the client reads it; the client would then see "broken pipe" instead of "your
/// certificate is not trusted". One second covers a LAN round trip many times over.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes discarded at most while lingering (a client mid-upload does not get to keep us busy).
const REFUSAL_DRAIN_BYTES_MAX: usize = 1 << 20;

/// Half-closes a refused connection after our alert and drains it briefly; see
/// [`REFUSAL_LINGER`].
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 16 << 10];
        let mut total = 0usize;
        while total < REFUSAL_DRAIN_BYTES_MAX {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
}

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

async fn serve_connection<H, F>(
    tcp: TcpStream,
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, PeerInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(config);
    let handshake = acceptor.accept(tcp).into_fallible();
    let tls = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, tcp))) => {
            let reason = match crate::error::find_rustls_error(&e) {
                Some(tls) => tls.to_string(),
                None => e.to_string(),
            };
            tracing::warn!(peer = %addr, %reason, "TLS handshake with peer failed");
            linger(tcp).await;
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %addr, timeout_ms = handshake_timeout.as_millis() as u64,
                "TLS handshake with peer timed out; connection dropped");
            return;
        }
    };
    let name = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::identity::peer_name);
    let peer = PeerInfo { addr, name };
    tracing::debug!(peer = %addr, name = ?peer.name, "peer connected");

    let service = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handler(req, peer).await) }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async {
            // Dropped guard before awaiting the connection again (it is not Send).
            let _ = stop.wait_for(|&s| s).await;
        } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %addr, error = %e, "peer connection ended with an error");
    }
}
