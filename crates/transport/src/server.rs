//! The peer-facing HTTPS server: accept TCP, mutual-TLS 1.3 handshake under a deadline, then
//! HTTP/2 only, handing each request with the verified peer's identity to the caller's handler.
//!
//! It owns connection admission (separate budgets for handshakes in progress, per source address
//! and in total, and for established connections; a first-byte deadline and a handshake
//! deadline; excess connections closed at once, never queued) and HTTP/2 tuning. It never
//! interprets requests (that is the handler's job), never lets one connection's failure touch
//! another, and logs refusals at a bounded rate (a flood of bad connections cannot flood the
//! log).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::BoxBody;
use crate::tls::TlsContext;

/// A TLS handshake must finish within this time (counted from accept). A peer on the far side of
/// a slow WAN needs two round trips; ten seconds covers that with margin while a slow-loris
/// peer that did send its ClientHello holds a handshake slot for at most this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte must arrive within this time after accept. In TLS the client speaks first:
/// a real peer sends its ClientHello one RTT after its SYN, so two seconds is generous even on
/// a satellite link, while an idle connection (port scanner, half-open peer, slot squatter)
/// gives its handshake slot back five times sooner than [`HANDSHAKE_TIMEOUT`].
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Established (authenticated) connections. Peers keep one connection per pair, so even a
/// large replica server needs tens; 256 leaves room for reconnect storms while bounding memory
/// (each connection can buffer up to [`CONNECTION_WINDOW_BYTES`]). Handshakes in progress do
/// not count: they have their own budget ([`MAX_HANDSHAKES`]), so unauthenticated clients can
/// never hold the slots of authenticated ones.
pub const MAX_CONNECTIONS: usize = 256;
/// Handshakes in progress, all sources together. A handshake costs a task and a few tens of KiB
/// of TLS buffers; 256 bounds that to a few MiB. It is the budget a distributed attack can
/// exhaust (each source is held to [`MAX_HANDSHAKES_PER_SOURCE`]); a connection arriving when
/// it is used up is closed at once, never queued.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one source address (IPv4 address, IPv6 /64: one host or site).
/// A legitimate source makes one connection per peer pair and each handshake takes
/// milliseconds; 16 covers a NATed site whose primaries all reconnect at once after an outage.
/// The excess is closed at once, so one address can take at most 16 of [`MAX_HANDSHAKES`],
/// each for at most [`FIRST_BYTE_TIMEOUT`] if it stays silent.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// At most one log line per kind of refusal (over capacity, silent, failed handshake) in this
/// interval; the lines in between are counted and the count is reported with the next line,
/// so a flood of bad connections cannot flood the log.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
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
    /// Fingerprint of the trusted CA that vouched for `name` (trusted as a primary and pinned
    /// to that name). With `name`, the peer's identity.
    pub ca: Option<String>,
}

/// Tunables of [`serve_with`]; [`Default`] gives the named constants.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// See [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// See [`FIRST_BYTE_TIMEOUT`].
    pub first_byte_timeout: Duration,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`MAX_HANDSHAKES`].
    pub max_handshakes: usize,
    /// See [`MAX_HANDSHAKES_PER_SOURCE`].
    pub max_handshakes_per_source: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            first_byte_timeout: FIRST_BYTE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_handshakes: MAX_HANDSHAKES,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
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
///
/// Admission: the accept loop never waits for a budget. A new connection takes a handshake slot
/// (global and per source address) or is closed at once; it must send its first byte within
/// the first-byte deadline and finish the TLS handshake within the handshake deadline; only
/// then does it take an established-connection slot (or is closed at once) and give its
/// handshake slot back.
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
    let max_connections = options.max_connections.max(1);
    let max_handshakes = options.max_handshakes.max(1);
    let admission = Arc::new(Admission {
        connections: Arc::new(Semaphore::new(max_connections)),
        handshakes: Arc::new(Semaphore::new(max_handshakes)),
        per_source: Mutex::new(HashMap::new()),
        per_source_max: options.max_handshakes_per_source.max(1),
        logs: RefusalLogs::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
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
        let Some(slot) = admission.handshake_slot(addr) else {
            drop(tcp); // closed at once: never queued behind slow or silent clients
            continue;
        };
        let config = tls.server_config();
        let tls = tls.clone();
        let handler = handler.clone();
        let stop = stop_rx.clone();
        let options = options.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let ctx = Ctx {
                tls: &tls,
                options: &options,
                admission: &admission,
            };
            serve_connection(tcp, addr, config, ctx, slot, handler, stop).await;
        });
    }
    // Stop: GOAWAY everywhere (handshakes in progress are abandoned), then wait for the slots.
    let _ = stop_tx.send(true);
    let all_connections = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let all_handshakes = u32::try_from(max_handshakes).unwrap_or(u32::MAX);
    let drained = async {
        let _c = admission.connections.acquire_many(all_connections).await;
        let _h = admission.handshakes.acquire_many(all_handshakes).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!("shutdown grace expired with connections still open");
    }
}

/// The budgets of the server: established connections, handshakes in progress (global and per
/// source), and the rate limits of the refusal log.
struct Admission {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// Handshakes in progress per source key (see [`source_key`]); entries at zero are removed.
    per_source: Mutex<HashMap<IpAddr, usize>>,
    per_source_max: usize,
    logs: RefusalLogs,
}

/// A handshake in progress: gives its global and per-source slots back when dropped.
struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut map = self.admission.lock_sources();
        if let Some(n) = map.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

impl Admission {
    /// A handshake slot for a connection from `addr`, or `None` (connection to be closed at
    /// once, refusal counted and logged at a bounded rate).
    fn handshake_slot(self: &Arc<Self>, addr: SocketAddr) -> Option<HandshakeSlot> {
        let source = source_key(addr.ip());
        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
            self.logs.over_capacity.note(|suppressed| {
                tracing::warn!(peer = %addr, suppressed,
                    "peer port: too many TLS handshakes in progress; connection closed")
            });
            return None;
        };
        {
            let mut map = self.lock_sources();
            let n = map.entry(source).or_insert(0);
            if *n >= self.per_source_max {
                drop(map);
                self.logs.over_source_cap.note(|suppressed| {
                    tracing::warn!(peer = %addr, suppressed,
                        "peer port: too many TLS handshakes in progress from this address; connection closed")
                });
                return None;
            }
            *n += 1;
        }
        Some(HandshakeSlot {
            _permit: permit,
            source,
            admission: self.clone(),
        })
    }

    fn lock_sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counters are updated in single statements; a poisoned map is still consistent.
        self.per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The key a per-source limit applies to: the IPv4 address, or the /64 of an IPv6 address
/// (one host or site gets a whole /64, so a per-address limit would be no limit).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
        },
    }
}

/// One rate-limited log line per kind of refusal.
#[derive(Default)]
struct RefusalLogs {
    over_capacity: RateLimitedLog,
    over_source_cap: RateLimitedLog,
    silent: RateLimitedLog,
    failed: RateLimitedLog,
    timed_out: RateLimitedLog,
    no_connection_slot: RateLimitedLog,
}

/// Logs at most once per [`REFUSAL_LOG_INTERVAL`]; counts what it suppressed in between.
#[derive(Default)]
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    /// Calls `log(suppressed since the last line)` if the interval has passed, else counts.
    fn note(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(at) if now.duration_since(at) < REFUSAL_LOG_INTERVAL => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                *last = Some(now);
                drop(last);
                log(self.suppressed.swap(0, Ordering::Relaxed));
            }
        }
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

/// What every connection task shares with the server.
struct Ctx<'a> {
    tls: &'a TlsContext,
    options: &'a ServeOptions,
    admission: &'a Admission,
}

/// One connection from accept to close: first byte, TLS handshake (holding `slot`), then
/// HTTP/2 (holding an established-connection slot).
async fn serve_connection<H, F>(
    tcp: TcpStream,
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    ctx: Ctx<'_>,
    slot: HandshakeSlot,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, PeerInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let Ctx {
        tls: tls_ctx,
        options,
        admission,
    } = ctx;
    let _ = tcp.set_nodelay(true);
    let accepted = Instant::now();
    // The client speaks first in TLS: a connection that stays silent gives its slot back soon.
    let mut first = [0u8; 1];
    let first_byte_timeout = options.first_byte_timeout.min(options.handshake_timeout);
    let spoke = tokio::select! {
        r = tokio::time::timeout(first_byte_timeout, tcp.peek(&mut first)) => r,
        _ = stop.wait_for(|&s| s) => return,
    };
    match spoke {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) | Ok(Err(_)) => {
            tracing::debug!(peer = %addr, "peer closed the connection before speaking");
            return;
        }
        Err(_) => {
            let ms = first_byte_timeout.as_millis() as u64;
            admission.logs.silent.note(|suppressed| {
                tracing::warn!(peer = %addr, first_byte_timeout_ms = ms, suppressed,
                    "peer sent nothing after connecting; connection dropped")
            });
            return;
        }
    }
    let acceptor = TlsAcceptor::from(config);
    let handshake = acceptor.accept(tcp).into_fallible();
    let remaining = options.handshake_timeout.saturating_sub(accepted.elapsed());
    let outcome = tokio::select! {
        r = tokio::time::timeout(remaining, handshake) => r,
        _ = stop.wait_for(|&s| s) => return,
    };
    let tls = match outcome {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, tcp))) => {
            let reason = match crate::error::find_rustls_error(&e) {
                Some(tls) => tls.to_string(),
                None => e.to_string(),
            };
            admission.logs.failed.note(|suppressed| {
                tracing::warn!(peer = %addr, %reason, suppressed, "TLS handshake with peer failed")
            });
            linger(tcp).await;
            return;
        }
        Err(_) => {
            let ms = options.handshake_timeout.as_millis() as u64;
            admission.logs.timed_out.note(|suppressed| {
                tracing::warn!(peer = %addr, timeout_ms = ms, suppressed,
                    "TLS handshake with peer timed out; connection dropped")
            });
            return;
        }
    };
    drop(slot);
    let Ok(_permit) = admission.connections.clone().try_acquire_owned() else {
        admission.logs.no_connection_slot.note(|suppressed| {
            tracing::warn!(peer = %addr, max = options.max_connections, suppressed,
                "peer port: too many established connections; authenticated connection closed")
        });
        return;
    };
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let name = chain.first().and_then(crate::identity::peer_name);
    let ca = tls_ctx.primary_ca_of(chain);
    let peer = PeerInfo { addr, name, ca };
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
