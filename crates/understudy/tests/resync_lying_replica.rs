//! A replica that lies in its resync hash answers (`docs/formats/resync.md`, "The hash" and
//! "Route"). A tampering proxy sits between a real primary and a real replica daemon: it
//! terminates mutual TLS with the replica's identity (so the primary's pinned replica name
//! matches), forwards every request to the replica with the primary's identity, and rewrites
//! only the answers of `POST /v1/replicas/{vm}/resync/hashes`.
//!
//! An answer that is not exactly what was asked (one hash too many, a malformed hash, hashes of
//! another point) is refused with a one-line reason and nothing is shipped; well-formed but
//! wrong hashes cannot be refused, and only make the primary send more, never a wrong point.

mod common;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use transport::hyper::body::Incoming;
use transport::hyper::{header, Request, Response, StatusCode};

use common::*;

/// How the proxy rewrites a hash answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Lie {
    /// Pass-through: the replica's answer as it is.
    Honest,
    /// One hash more than chunks asked.
    OneMore,
    /// The first hash replaced by `"xyz"`.
    Malformed,
    /// The answer claims another point (`seq` + 1).
    OtherPoint,
    /// Every hash replaced by a random 32-hex-digit value.
    Random,
    /// Every hash replaced by `"z"` (all zeros).
    Zeros,
}

const LIES: [Lie; 6] = [
    Lie::Honest,
    Lie::OneMore,
    Lie::Malformed,
    Lie::OtherPoint,
    Lie::Random,
    Lie::Zeros,
];

struct Proxy {
    addr: String,
    mode: Arc<AtomicU8>,
    /// Hash answers rewritten so far (a lie that never happened proves nothing).
    lies: Arc<AtomicU64>,
    /// The compare key of every hash request seen, in order.
    keys: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

/// The TLS context of a daemon, loaded from the files in its data dir (read only).
fn tls_of(h: &Host) -> transport::TlsContext {
    let id = h.dir.join("identity");
    let identity = transport::Identity::from_files(
        &id.join("host.crt"),
        &id.join("host.key"),
        Some(&id.join("ca.crt")),
    )
    .unwrap();
    let trust = transport::TrustStore::open(&h.dir.join("trust")).unwrap();
    transport::TlsContext::new(identity, trust).unwrap()
}

impl Proxy {
    fn start(primary: &Host, replica: &Host) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let upstream = transport::Peer::new(replica.addr(), tls_of(primary)).unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(Lie::Honest as u8));
        let lies = Arc::new(AtomicU64::new(0));
        let keys = Arc::new(Mutex::new(Vec::new()));
        let (m, l, k) = (mode.clone(), lies.clone(), keys.clone());
        let handler = move |req: Request<Incoming>, _: transport::PeerInfo| {
            let (up, m, l, k) = (upstream.clone(), m.clone(), l.clone(), k.clone());
            async move {
                let lie = LIES[m.load(Ordering::SeqCst) as usize];
                forward(&up, lie, &l, &k, req).await
            }
        };
        rt.spawn(transport::serve(
            listener,
            tls_of(replica),
            handler,
            std::future::pending(),
        ));
        Proxy {
            addr,
            mode,
            lies,
            keys,
            _rt: rt,
        }
    }

    fn set(&self, lie: Lie) {
        self.mode.store(lie as u8, Ordering::SeqCst);
    }

    fn lies(&self) -> u64 {
        self.lies.load(Ordering::SeqCst)
    }

    fn keys(&self) -> Vec<String> {
        self.keys.lock().unwrap().clone()
    }
}

async fn forward(
    up: &transport::Peer,
    lie: Lie,
    lies: &AtomicU64,
    keys: &Mutex<Vec<String>>,
    req: Request<Incoming>,
) -> Response<transport::BoxBody> {
    let hashes = req.uri().path().ends_with("/resync/hashes");
    let (parts, body) = req.into_parts();
    let body = if hashes {
        let bytes = body.collect().await.unwrap().to_bytes();
        let asked: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let key = asked["key"].as_str().unwrap().to_string();
        keys.lock().unwrap().push(key);
        transport::full(bytes)
    } else {
        body.map_err(transport::BoxError::from).boxed()
    };
    let mut out = Request::builder()
        .method(parts.method)
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (k, v) in &parts.headers {
        out = out.header(k, v);
    }
    let out = out.body(body).unwrap();
    let resp = match up.request(out).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = Response::new(transport::full(e.to_string()));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return r;
        }
    };
    let (mut parts, body) = resp.into_parts();
    if !hashes || lie == Lie::Honest || !parts.status.is_success() {
        return Response::from_parts(parts, body.map_err(transport::BoxError::from).boxed());
    }
    let bytes = body.collect().await.unwrap().to_bytes();
    let mut answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let list = answer["hashes"].as_array_mut().unwrap();
    match lie {
        Lie::Honest => {}
        Lie::OneMore => list.push(list[0].clone()),
        Lie::Malformed => list[0] = "xyz".into(),
        Lie::OtherPoint => answer["seq"] = (answer["seq"].as_u64().unwrap() + 1).into(),
        Lie::Random => list
            .iter_mut()
            .for_each(|h| *h = format!("{:032x}", rand::random::<u128>()).into()),
        Lie::Zeros => list.iter_mut().for_each(|h| *h = "z".into()),
    }
    lies.fetch_add(1, Ordering::SeqCst);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, transport::full(serde_json::to_vec(&answer).unwrap()))
}

/// A primary replicating `web` (one 16 MiB disk, 8 MiB of data, hourly) to a replica through
/// a proxy, in pass-through mode, synced once.
fn setup(root: &std::path::Path) -> (Host, Host, Proxy) {
    let (a, b) = pair(root);
    let proxy = Proxy::start(&a, &b);
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &proxy.addr,
        "--frequency",
        "3600",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 3 0 8M"]);
    sync_until_ok(&a, "web", 20);
    (a, b, proxy)
}

fn resynchronized_bytes(a: &Host) -> u64 {
    measure(a, "web")["resynchronized_bytes_total"]
        .as_u64()
        .unwrap()
}

/// A resync whose hash answers are rewritten by `lie` is refused with `reason` in one line
/// (`replication sync` and `status`'s last error), ships nothing, and leaves the primary
/// serving; once the proxy passes answers through, the retry completes exactly.
fn refused(lie: Lie, reason: impl Fn(u64) -> String) {
    let root = tempfile::tempdir().unwrap();
    let (a, b, proxy) = setup(root.path());
    // The point the resync compares against (the `seq` its hash requests name).
    let reason = reason(*point_ids(&b, "web").last().unwrap());
    let reason = reason.as_str();
    let uri = a.nbd_uri("web", 0);
    // Written after the last point: the resync's compare must find and ship it.
    qemu_io_ok(&uri, &["write -P 5 1M 64k", "write -P 6 12M 4k"]);
    let before = b.ok(&["points", "list", "web", "--json"]);
    proxy.set(lie);
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    let err = one_line_failure(&a.run(&["replication", "sync", "web"]));
    println!("{lie:?}: {err}");
    assert!(err.contains(reason), "{lie:?}: {err}");
    assert!(proxy.lies() > 0, "the proxy never lied");
    let st = status(&a, "web");
    let last = st["last_error"].as_str().unwrap_or_default();
    assert!(last.contains(reason) && last.lines().count() == 1, "{st}");
    // Nothing shipped: the replica's points are exactly as before.
    assert_eq!(b.ok(&["points", "list", "web", "--json"]), before);
    // The primary keeps serving its guest.
    qemu_io_ok(&uri, &["read -P 5 1M 64k", "write -P 7 2M 4k"]);

    proxy.set(Lie::Honest);
    sync_until_ok(&a, "web", 30);
    wait_until("replicating", Duration::from_secs(30), || {
        state(&a, "web") == "Replicating"
    });
    assert!(latest_equals_primary(&a, &b, "web", 0, root.path()));
}

#[test]
fn replica_answering_more_hashes_than_chunks_is_refused() {
    // A 16 MiB disk: the first pass asks for 16 chunks of 1 MiB in one request.
    refused(Lie::OneMore, |_| {
        "the replica answered 17 hashes for 16 chunks".into()
    });
}

#[test]
fn replica_answering_a_malformed_hash_is_refused() {
    refused(Lie::Malformed, |_| {
        "the replica answered a malformed hash \"xyz\"".into()
    });
}

#[test]
fn replica_answering_for_another_point_is_refused() {
    refused(Lie::OtherPoint, |seq| {
        format!(
            "the replica answered hashes of point {} disk 0 for point {seq} disk 0",
            seq + 1
        )
    });
}

/// Runs a resync of `web` with `lie` and returns the bytes it shipped; the result must equal
/// the primary, and its compare key must be new (never one of an earlier resync).
fn resync_with(a: &Host, b: &Host, proxy: &Proxy, lie: Lie, scratch: &std::path::Path) -> u64 {
    let sent = resynchronized_bytes(a);
    proxy.set(lie);
    let lies = proxy.lies();
    let earlier = proxy.keys();
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    sync_until_ok(a, "web", 30);
    wait_until("replicating", Duration::from_secs(30), || {
        state(a, "web") == "Replicating"
    });
    assert!(lie == Lie::Honest || proxy.lies() > lies, "no lie told");
    let keys = proxy.keys().split_off(earlier.len());
    assert!(!keys.is_empty(), "the resync asked for no hashes");
    assert!(
        keys.iter().all(|k| k.len() == 64 && !earlier.contains(k)),
        "a compare key was reused: {keys:?} after {earlier:?}"
    );
    proxy.set(Lie::Honest);
    assert!(
        latest_equals_primary(a, b, "web", 0, scratch),
        "{lie:?}: the resync's point differs from the primary"
    );
    resynchronized_bytes(a) - sent
}

/// Well-formed but wrong hashes cannot be told from right ones, and cannot make the primary
/// skip a block: every chunk looks different, the primary sends it, and the point is exact.
/// `"z"` for chunks that hold data is no better: those blocks are sent too.
#[test]
fn wrong_hashes_make_the_primary_send_more_never_a_wrong_point() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, proxy) = setup(root.path());
    let honest = resync_with(&a, &b, &proxy, Lie::Honest, root.path());
    assert_eq!(honest, 0, "an honest resync of a synced disk ships nothing");
    let random = resync_with(&a, &b, &proxy, Lie::Random, root.path());
    println!("random hashes: {random} bytes shipped (8 MiB of data on a 16 MiB disk)");
    assert_eq!(random, 16 << 20, "every block of the disk is sent");
    let zeros = resync_with(&a, &b, &proxy, Lie::Zeros, root.path());
    println!("\"z\" for every chunk: {zeros} bytes shipped");
    assert_eq!(
        zeros,
        8 << 20,
        "the data blocks are sent, the zero blocks are not"
    );
}
