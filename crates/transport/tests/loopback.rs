//! Real mutual TLS 1.3 + HTTP/2 between daemons' transport layers on loopback: identities on
//! disk, trust stores, the server's admission rules and the client's connection handling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use transport::{
    body_channel, full, BodyWriter, BoxBody, ClientTls, Peer, PeerInfo, ServeOptions, TlsContext,
    TransportError, TrustStore, DEFAULT_BODY_CHANNEL_CHUNKS,
};
use understudy_transport as transport;

/// One simulated host: identity and trust store in its own data directory.
struct Host {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    ctx: TlsContext,
}

fn host(name: &str) -> Host {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_owned();
    let identity = transport::load_or_create(&data.join("identity"), name, &[]).unwrap();
    let trust = TrustStore::open(&data.join("trust")).unwrap();
    let ctx = TlsContext::new(identity, trust).unwrap();
    Host {
        _tmp: tmp,
        data,
        ctx,
    }
}

/// Writes `other`'s `understudy identity` output to a file in `me`'s data dir.
fn identity_file(me: &Host, other: &Host) -> PathBuf {
    let path = me.data.join(format!("{}.pem", other.ctx.identity().name));
    std::fs::write(&path, other.ctx.identity().ca_pem()).unwrap();
    path
}

/// `me` runs `understudy trust add` with `other`'s identity.
fn trust(me: &Host, other: &Host) {
    me.ctx.add_trust(&identity_file(me, other)).unwrap();
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn start(ctx: &TlsContext, options: ServeOptions) -> Server {
    start_on(ctx, options, "127.0.0.1:0").await
}

async fn start_on(ctx: &TlsContext, options: ServeOptions, at: &str) -> Server {
    let listener = TcpListener::bind(at).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(transport::serve_with(
        listener,
        ctx.clone(),
        handler,
        async move {
            let _ = stopped.await;
        },
        options,
    ));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

/// Byte `i` of the streamed test body: depends on high bits too, so reordered or repeated
/// chunks are detected, not just lost bytes.
fn pattern(i: u64) -> u8 {
    (i ^ (i >> 8) ^ (i >> 16) ^ (i >> 24)) as u8
}

/// Uploads whose body ended in an error as seen by the server (not a clean, shorter body).
static UPLOADS_ABORTED: AtomicUsize = AtomicUsize::new(0);

async fn handler(req: Request<Incoming>, peer: PeerInfo) -> Response<BoxBody> {
    let name = peer.name.clone().unwrap_or_default();
    match req.uri().path() {
        "/echo" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::builder()
                .header("x-peer-name", name)
                .header("x-peer-addr", peer.addr.to_string())
                .body(full(body))
                .unwrap()
        }
        "/upload" => {
            let mut body = req.into_body();
            let (mut len, mut intact) = (0u64, true);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    UPLOADS_ABORTED.fetch_add(1, Ordering::SeqCst);
                    intact = false;
                    break;
                };
                if let Ok(data) = frame.into_data() {
                    intact &= data
                        .iter()
                        .enumerate()
                        .all(|(k, &b)| b == pattern(len + k as u64));
                    len += data.len() as u64;
                }
            }
            let json = format!(r#"{{"len":{len},"intact":{intact},"peer":"{name}"}}"#);
            Response::new(full(json))
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("no such endpoint"))
            .unwrap(),
    }
}

fn peer(client: &Host, server: &Server) -> Peer {
    Peer::new(server.addr.to_string(), client.ctx.clone()).unwrap()
}

async fn echo(peer: &Peer, text: &str) -> Result<(String, String, String), TransportError> {
    let req = Request::post("/echo").body(full(text.to_owned())).unwrap();
    let resp = peer.request(req).await?;
    let header = |n: &str| resp.headers()[n].to_str().unwrap().to_owned();
    let (name, addr) = (header("x-peer-name"), header("x-peer-addr"));
    let body = transport::read_body(peer.addr(), resp.into_body(), 1 << 20).await?;
    Ok((String::from_utf8(body.to_vec()).unwrap(), name, addr))
}

fn paired() -> (Host, Host) {
    let (a, b) = (host("host-a"), host("host-b"));
    trust(&a, &b);
    trust(&b, &a);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_echo_and_streamed_64_mib_body_between_trusting_hosts() {
    let (a, b) = paired();
    let server = start(&a.ctx, ServeOptions::default()).await;
    let to_a = peer(&b, &server);

    let reply = to_a
        .post_json("/echo", Bytes::from_static(br#"{"hello":1}"#))
        .await
        .unwrap();
    assert_eq!(&reply[..], br#"{"hello":1}"#);
    let (_, name, _) = echo(&to_a, "x").await.unwrap();
    assert_eq!(name, "host-b", "server sees the client's certificate name");

    const TOTAL: u64 = 64 << 20;
    let (tx, body) = body_channel(DEFAULT_BODY_CHANNEL_CHUNKS);
    let producer = std::thread::spawn(move || {
        use std::io::Write;
        let mut w = BodyWriter::new(tx);
        let mut block = vec![0u8; 1_000_003]; // odd size: chunk boundaries move around
        let mut off = 0u64;
        while off < TOTAL {
            let n = block.len().min((TOTAL - off) as usize);
            for (k, b) in block[..n].iter_mut().enumerate() {
                *b = pattern(off + k as u64);
            }
            w.write_all(&block[..n]).unwrap();
            off += n as u64;
        }
        w.finish().unwrap();
    });
    let resp = to_a
        .request(Request::post("/upload").body(body).unwrap())
        .await
        .unwrap();
    let json = transport::read_body(to_a.addr(), resp.into_body(), 1 << 10)
        .await
        .unwrap();
    producer.join().unwrap();
    assert_eq!(
        std::str::from_utf8(&json).unwrap(),
        format!(r#"{{"len":{TOTAL},"intact":true,"peer":"host-b"}}"#)
    );

    let err = to_a.get_json("/nope").await.unwrap_err();
    assert!(
        matches!(err, TransportError::Status { status: 404, .. }),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_connection() {
    let (a, b) = paired();
    let server = start(&a.ctx, ServeOptions::default()).await;
    let to_a = peer(&b, &server);
    let calls = (0..16).map(|i| {
        let p = to_a.clone();
        tokio::spawn(async move { echo(&p, &format!("call {i}")).await.unwrap() })
    });
    let mut addrs = Vec::new();
    for (i, call) in calls.enumerate() {
        let (text, _, addr) = call.await.unwrap();
        assert_eq!(text, format!("call {i}"));
        addrs.push(addr);
    }
    addrs.dedup();
    assert_eq!(
        addrs.len(),
        1,
        "one TCP connection for all requests: {addrs:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_is_refused_and_trusted_clients_keep_working() {
    let (a, b) = paired();
    let c = host("host-c");
    trust(&c, &a); // c trusts a, but a does not trust c
    let server = start(&a.ctx, ServeOptions::default()).await;

    let from_b = peer(&b, &server);
    echo(&from_b, "before").await.unwrap();

    let err = echo(&peer(&c, &server), "let me in").await.unwrap_err();
    assert!(
        matches!(err, TransportError::RejectedByPeer { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("does not trust this host's certificate"),
        "{msg}"
    );
    assert!(msg.contains("understudy trust add"), "{msg}");

    // The other direction: d does not trust a's certificate.
    let d = host("host-d");
    trust(&a, &d);
    let err = echo(&peer(&d, &server), "hi").await.unwrap_err();
    assert!(
        matches!(err, TransportError::PeerNotTrusted { .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("presented a certificate not trusted by this host"));

    // Existing and new connections of trusted peers are unaffected.
    assert_eq!(echo(&from_b, "after").await.unwrap().0, "after");
    assert_eq!(echo(&peer(&b, &server), "new").await.unwrap().0, "new");
    server.stop().await;
}

/// A rustls client config outside our policy, to play a misbehaving peer.
fn raw_client_config(
    server_ca: &Host,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &server_ca.ctx.identity().ca_certs {
        roots.add(ca.clone()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(transport::tls::provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_certificate_or_with_tls12_are_refused() {
    let (a, b) = paired();
    let server = start(&a.ctx, ServeOptions::default()).await;

    let no_cert = raw_client_config(&a, &[&rustls::version::TLS13]);
    let p = Peer::new(server.addr.to_string(), ClientTls::Fixed(no_cert)).unwrap();
    let err = echo(&p, "anonymous").await.unwrap_err();
    assert!(
        matches!(err, TransportError::RejectedByPeer { .. }),
        "{err}"
    );

    let tls12 = raw_client_config(&a, &[&rustls::version::TLS12]);
    let p = Peer::new(server.addr.to_string(), ClientTls::Fixed(tls12)).unwrap();
    let err = echo(&p, "old").await.unwrap_err();
    assert!(matches!(err, TransportError::Tls { .. }), "{err}");

    assert_eq!(echo(&peer(&b, &server), "ok").await.unwrap().0, "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_at_the_handshake_deadline_while_others_are_served() {
    let (a, b) = paired();
    let deadline = Duration::from_secs(1);
    let options = ServeOptions {
        handshake_timeout: deadline,
        ..ServeOptions::default()
    };
    let server = start(&a.ctx, options).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // While the silent connection is pending, a real peer is served promptly.
    assert_eq!(
        echo(&peer(&b, &server), "meanwhile").await.unwrap().0,
        "meanwhile"
    );
    assert!(
        started.elapsed() < deadline,
        "served without waiting for the silent peer"
    );

    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("server must drop the silent connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "connection closed: {read:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= deadline - Duration::from_millis(100) && waited < Duration::from_secs(4),
        "dropped after {waited:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_added_by_another_process_takes_effect_without_restart() {
    let a = host("host-a");
    let c = host("host-c");
    trust(&c, &a);
    let server = start(&a.ctx, ServeOptions::default()).await;
    let from_c = peer(&c, &server);
    assert!(matches!(
        echo(&from_c, "1").await.unwrap_err(),
        TransportError::RejectedByPeer { .. }
    ));

    // `understudy trust add` run by the CLI: a separate TrustStore on the same directory.
    let cli_view = TrustStore::open(&a.data.join("trust")).unwrap();
    let added = cli_view.add(&identity_file(&a, &c)).unwrap();
    assert!(added.newly_added);
    assert_eq!(
        added.fingerprint,
        transport::fingerprint(&c.ctx.identity().ca_certs[0])
    );

    // Same Peer handle: it reconnects, and the running server now accepts it.
    assert_eq!(echo(&from_c, "2").await.unwrap().0, "2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_reconnects_after_server_restart_and_reports_refused_when_down() {
    let (a, b) = paired();
    let server = start(&a.ctx, ServeOptions::default()).await;
    let addr = server.addr;
    let to_a = peer(&b, &server);
    echo(&to_a, "one").await.unwrap();
    server.stop().await;

    let err = echo(&to_a, "down").await.unwrap_err();
    assert!(
        matches!(err, TransportError::ConnectionRefused { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("connection refused"));
    assert!(err.is_transient());

    let server = start_on(&a.ctx, ServeOptions::default(), &addr.to_string()).await;
    assert_eq!(echo(&to_a, "two").await.unwrap().0, "two");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reloaded_from_disk_is_still_trusted_by_peers() {
    let (a, b) = paired();
    // Restart of host a: load the identity again from its data dir.
    let reloaded = transport::load_or_create(&a.data.join("identity"), "host-a", &[]).unwrap();
    assert_eq!(reloaded.cert_chain, a.ctx.identity().cert_chain);
    let trust = TrustStore::open(&a.data.join("trust")).unwrap();
    let restarted = TlsContext::new(reloaded, trust).unwrap();
    let server = start(&restarted, ServeOptions::default()).await;
    assert_eq!(echo(&peer(&b, &server), "hi").await.unwrap().1, "host-b");
    server.stop().await;
}

#[test]
fn dialling_a_name_missing_from_the_certificate_is_a_name_mismatch() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b) = paired();
        let server = start_on(&a.ctx, ServeOptions::default(), "0.0.0.0:0").await;
        // host-a's certificate covers 127.0.0.1 and localhost, not 127.0.0.2.
        let port = server.addr.port();
        let wrong = Peer::new(format!("127.0.0.2:{port}"), b.ctx.clone()).unwrap();
        let err = echo(&wrong, "x").await.unwrap_err();
        assert!(
            matches!(err, TransportError::PeerNameMismatch { .. }),
            "{err}"
        );
        let by_name = Peer::new(format!("localhost:{port}"), b.ctx.clone()).unwrap();
        echo(&by_name, "x").await.unwrap();
        server.stop().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_stream_reaches_the_server_as_an_abort_not_a_short_body() {
    let (a, b) = paired();
    let server = start(&a.ctx, ServeOptions::default()).await;
    let to_a = peer(&b, &server);
    let (tx, body) = body_channel(2);
    let producer = std::thread::spawn(move || {
        use std::io::Write;
        let mut w = BodyWriter::new(tx);
        let block: Vec<u8> = (0..(3 << 20)).map(pattern).collect();
        w.write_all(&block).unwrap();
        w.flush().unwrap();
        // The encoder fails here: the writer is dropped without finish().
    });
    let result = to_a
        .request(Request::post("/upload").body(body).unwrap())
        .await;
    producer.join().unwrap();
    // Either the request fails, or the server answered before noticing; never "intact".
    if let Ok(resp) = result {
        let json = transport::read_body(to_a.addr(), resp.into_body(), 1 << 10).await;
        if let Ok(json) = json {
            assert!(!String::from_utf8_lossy(&json).contains("\"intact\":true"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while UPLOADS_ABORTED.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "server never saw the abort");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The connection survives a reset stream.
    assert_eq!(echo(&to_a, "still here").await.unwrap().0, "still here");
    server.stop().await;
}

/// Opens a TCP connection to `to` from the local address `from` and sends nothing.
async fn silent_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closed `conn` (EOF or reset) within `wait`.
async fn closed_within(conn: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(wait, conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_address_cannot_hold_the_peer_port() {
    let (a, b) = paired();
    // Silent connections would be cut only after the test: what frees the port here is the
    // per-address cap (excess closed at once) and the separate handshake budget.
    let options = ServeOptions {
        first_byte_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        max_handshakes_per_source: 4,
        max_handshakes: 8,
        ..ServeOptions::default()
    };
    let server = start(&a.ctx, options).await;
    let mut squatters = Vec::new();
    for _ in 0..20 {
        squatters.push(silent_from("127.0.0.2", server.addr).await);
    }
    // The 16 over the per-address cap are closed at once, never queued; 4 stay.
    let mut closed = 0;
    for conn in &mut squatters {
        if closed_within(conn, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 16,
        "excess connections from one address closed at once"
    );
    // Another address is served at once although 127.0.0.2 holds its whole share.
    let from_b = peer(&b, &server);
    assert_eq!(echo(&from_b, "served").await.unwrap().0, "served");
    // Established connections do not hold handshake slots: with 4 more silent connections
    // from a third address the handshake budget (8) is full, yet the established link works.
    let mut more = Vec::new();
    for _ in 0..4 {
        more.push(silent_from("127.0.0.3", server.addr).await);
    }
    assert_eq!(echo(&from_b, "one").await.unwrap().0, "one");
    // ...and a new connection while the budget is full is closed at once, not queued.
    let mut over = silent_from("127.0.0.4", server.addr).await;
    assert!(closed_within(&mut over, Duration::from_secs(5)).await);
    assert_eq!(echo(&from_b, "two").await.unwrap().0, "two");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_cut_at_the_first_byte_deadline_and_the_client_retries() {
    let (a, b) = paired();
    let first_byte = Duration::from_millis(500);
    let options = ServeOptions {
        first_byte_timeout: first_byte,
        max_handshakes_per_source: 4,
        ..ServeOptions::default()
    };
    let server = start(&a.ctx, options).await;
    // 300 idle connections from the client's own address, kept open on our side: the first 4
    // hold that address's handshake share, the rest are closed at once.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(silent_from("127.0.0.1", server.addr).await);
    }
    // The real client's first attempts are closed unanswered; it retries within its connect
    // deadline and gets in once the first-byte deadline has cut the idle ones.
    assert_eq!(echo(&peer(&b, &server), "in").await.unwrap().0, "in");
    let mut cut = 0;
    for conn in &mut idle {
        if closed_within(conn, Duration::from_secs(5)).await {
            cut += 1;
        }
    }
    assert_eq!(cut, 300, "every idle connection is closed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_never_answers_the_handshake_times_out() {
    let b = host("host-b");
    // Accepts TCP, never speaks TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
        }
    });
    let p = Peer::with_connect_timeout(addr.to_string(), b.ctx.clone(), Duration::from_millis(500))
        .unwrap();
    let started = Instant::now();
    let err = echo(&p, "hello?").await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Timeout {
                stage: "TLS handshake",
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        err.to_string()
            .ends_with("TLS handshake timed out after 500ms"),
        "{err}"
    );
    assert!(err.is_transient());
    hold.abort();
}
