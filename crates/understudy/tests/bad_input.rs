//! Promise 5, bad input gets a clear error and loses nothing: untrusted and unlisted primaries
//! are refused with a reason; hostile delta uploads (out of sequence, replayed, garbage,
//! truncated, bit-flipped) made with curl and a real client certificate are refused with their
//! code and change no point; malformed NBD traffic on the daemon's own socket is cut off or
//! answered with an error while qemu-io keeps working; bad CLI input is one `error:` line.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Asserts the command failed with exactly one line on stderr starting `error:`; returns it.
fn one_line_error(what: &str, out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(!out.status.success(), "{what}: succeeded but must fail");
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "{what}: not a one-line `error:` message:\n{err}"
    );
    err
}

fn alive(h: &Host) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    h.pid()
        .is_some_and(|p| unsafe { libc::kill(p as i32, 0) } == 0)
        && h.run(&["vm", "list"]).status.success()
}

// ----- (a0) unauthenticated clients on the peer port -----

/// Idle TCP connections to `port`, sent from local address `from`: `hold` connections opened
/// once and kept open; `churn` connections each reopened (after a short pause) whenever the
/// server closes it, like an attacker keeping the port busy. Runs until `stop` is set.
fn idle_flood(
    from: &'static str,
    port: u16,
    hold: usize,
    churn: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let connect = move || async move {
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind(format!("{from}:0").parse().ok()?).ok()?;
                socket.connect(to).await.ok()
            };
            let mut held = Vec::new();
            for _ in 0..hold {
                if let Some(c) = connect().await {
                    held.push(c);
                }
            }
            let mut tasks = Vec::new();
            for _ in 0..churn {
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    let mut opened = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(mut c) = connect().await {
                            opened += 1;
                            let mut buf = [0u8; 64];
                            // Until the server closes it (or we stop).
                            while !stop.load(Ordering::Relaxed) {
                                let wait = Duration::from_millis(200);
                                let read = tokio::time::timeout(wait, c.read(&mut buf)).await;
                                if let Ok(Ok(0) | Err(_)) = read {
                                    break;
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    opened
                }));
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut opened = held.len();
            for t in tasks {
                opened += t.await.unwrap_or(0);
            }
            opened
        })
    })
}

#[test]
fn idle_connections_cannot_hold_the_peer_port() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 300 idle connections from another address, each reopened as soon as the replica closes
    // it, then 300 from the primary's own address, kept open: without admission control all
    // connection slots are taken and the primary queues behind 300+ idle peers.
    let other = idle_flood("127.0.0.2", b.port, 0, 300, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let same = idle_flood("127.0.0.1", b.port, 300, 0, stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    // The primary needs new connections now: enable's hello, then the initial copy.
    replicate(&a, &b, "web", &["16M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 7 0 1M"]);
    a.ok(&["replication", "sync", "web"]);
    assert!(latest_equals_primary(&a, &b, "web", 0, root.path()));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(same.join().unwrap() >= 300);
    assert!(other.join().unwrap() >= 300, "the flood kept reconnecting");
    // Refusals are logged at a bounded rate, not once per connection.
    let refusals = b
        .log()
        .lines()
        .filter(|l| l.contains("peer port") || l.contains("sent nothing"))
        .count();
    assert!(
        refusals < 100,
        "{refusals} refusal lines: the log is flooded"
    );
}

// ----- (a) untrusted and unlisted primaries -----

#[test]
fn untrusted_and_unlisted_primaries_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let b = Host::start(root.path(), "replica");
    let a = Host::start(root.path(), "primary");
    let stranger = Host::start(root.path(), "stranger");
    let other = Host::start(root.path(), "other");
    trust_each_other(&a, &b);
    trust_each_other(&other, &b);
    // The stranger trusts the replica, but the replica does not trust the stranger.
    let pem = root.path().join("replica-id.pem");
    std::fs::write(&pem, b.ok(&["identity"])).unwrap();
    stranger.ok(&["trust", "add", pem.to_str().unwrap()]);
    let storage = b.dir.join("storage");
    b.ok(&[
        "replica-server",
        "enable",
        "--storage",
        storage.to_str().unwrap(),
        "--allow",
        "primary",
    ]);
    for h in [&a, &stranger, &other] {
        h.ok(&["vm", "create", "web", "--disk", "16M"]);
    }

    let err = one_line_error(
        "enable from an untrusted primary",
        &stranger.run(&["replication", "enable", "web", "--replica", &b.addr()]),
    );
    println!("untrusted primary: {err}");
    assert!(
        err.contains("trust"),
        "the error must say it is about trust: {err}"
    );
    one_line_error(
        "status after a refused enable",
        &stranger.run(&["replication", "status", "web"]),
    );
    assert_eq!(
        stranger.json(&["vm", "show", "web"])["replication_role"],
        "None"
    );

    let err = one_line_error(
        "enable from a trusted host outside the allow list",
        &other.run(&["replication", "enable", "web", "--replica", &b.addr()]),
    );
    println!("unlisted primary: {err}");
    assert!(
        err.contains("not in this replica server's allow list"),
        "{err}"
    );
    assert_eq!(
        other.json(&["vm", "show", "web"])["replication_role"],
        "None"
    );

    // The replica holds nothing from either of them; the listed primary is served.
    let out = b.run(&["points", "list", "web"]);
    assert!(
        !out.status.success(),
        "the replica created web for a refused primary: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    assert_eq!(point_ids(&b, "web"), vec![1]);
    let refused_events = events(&b).iter().filter(|e| e["id"] == 3002).count();
    println!("hostile primaries: 2 attempts, 0 admitted; the replica logged {refused_events} peer refusal event(s)");
    assert!(
        refused_events >= 1,
        "the allow-list refusal was not logged (event 3002)"
    );
}

// ----- (b) hostile delta uploads with curl -----

struct Curl {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    url: String,
}

impl Curl {
    fn new(primary: &Host, replica: &Host) -> Curl {
        Curl {
            cert: primary.dir.join("identity/host.crt"),
            key: primary.dir.join("identity/host.key"),
            ca: replica.dir.join("identity.pem"),
            url: format!("https://127.0.0.1:{}/v1/replicas/web/deltas", replica.port),
        }
    }

    /// PUTs `body` as delta `seq`; returns the HTTP status and the JSON answer.
    ///
    /// Bodies the replica refuses before reading them whole are kept small (a few KiB, sent
    /// in one go): the replica answers early and then resets the rest of the stream with
    /// NO_ERROR, which HTTP/2 allows (RFC 9113 §8.1) and the primary's client handles, but
    /// curl 7.88 reports as error 92 instead of showing the answer if it is still uploading.
    fn put(&self, seq: u64, body: &Path) -> (u16, serde_json::Value) {
        let out = self.run(seq, body);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "curl failed: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, tail) = text.rsplit_once('\n').unwrap();
        let (code, version) = tail.split_once(' ').unwrap();
        assert_eq!(version, "2", "curl did not speak HTTP/2");
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string())),
        )
    }

    fn run(&self, seq: u64, body: &Path) -> Output {
        Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "--max-time",
                "20",
                "-X",
                "PUT",
                "-H",
                "content-type: application/octet-stream",
            ])
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .arg("--cacert")
            .arg(&self.ca)
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .args(["-w", "\n%{http_code} %{http_version}"])
            .arg(format!("{}/{seq}", self.url))
            .output()
            .unwrap()
    }
}

/// After a refusal: a real change and a real `replication sync` succeed, and the newest
/// point equals the primary. Returns the new point's id.
fn sync_after_refusal(a: &Host, b: &Host, uri: &str, scratch: &Path, what: &str, step: u32) -> u64 {
    qemu_io_ok(
        uri,
        &[&format!("write -q -P {} {}M 64k", 0x30 + step, 4 + step)],
    );
    let s = sync_until_ok(a, "web", 1);
    assert!(
        latest_equals_primary(a, b, "web", 0, scratch),
        "after {what}: newest point differs from the primary"
    );
    s["seq"].as_u64().unwrap()
}

fn journal_file(replica: &Host, seq: u64) -> PathBuf {
    replica
        .dir
        .join(format!("storage/web/journal/{seq:020}.delta"))
}

#[test]
fn hostile_delta_uploads_are_refused_and_change_nothing() {
    require("curl", "curl");
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["16M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -q -P 0x21 0 2M"]);
    sync_until_ok(&a, "web", 5);
    let curl = Curl::new(&a, &b);

    let garbage = root.path().join("garbage.bin");
    let mut bytes = vec![0u8; 4 << 10];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
    std::fs::write(&garbage, &bytes).unwrap();
    let mut refused = 0;
    // Out of sequence (ahead) and a replay of a delta already committed.
    let latest = *point_ids(&b, "web").last().unwrap();
    // Refused from the URL alone, so sent without a body (see `Curl::put`).
    let empty = Path::new("/dev/null");
    let (code, ans) = curl.put(latest + 5, empty);
    println!("out-of-sequence PUT: {code} {ans}");
    assert_eq!(
        (code, ans["code"].as_str()),
        (409, Some("out_of_sequence")),
        "{ans}"
    );
    assert_eq!(ans["expected_seq"], latest + 1);
    refused += 1;
    let (code, ans) = curl.put(latest, empty);
    println!("PUT to the seq of the newest point: {code} {ans}");
    assert_eq!(
        (code, ans["code"].as_str()),
        (409, Some("out_of_sequence")),
        "{ans}"
    );
    refused += 1;
    // A replay: the bytes of the newest point's delta, sent as the next one.
    let (code, ans) = curl.put(latest + 1, &journal_file(&b, latest));
    println!("replayed delta {latest} as {}: {code} {ans}", latest + 1);
    assert_eq!(
        (code, ans["code"].as_str()),
        (409, Some("out_of_sequence")),
        "{ans}"
    );
    refused += 1;
    assert_eq!(*point_ids(&b, "web").last().unwrap(), latest);
    let latest = sync_after_refusal(
        &a,
        &b,
        &uri,
        root.path(),
        "out-of-sequence and replayed deltas",
        0,
    );

    // The right sequence number with garbage bytes.
    let (code, ans) = curl.put(latest + 1, &garbage);
    println!("garbage delta: {code} {ans}");
    assert_eq!(
        (code, ans["code"].as_str()),
        (400, Some("corrupt_delta")),
        "{ans}"
    );
    refused += 1;
    assert_eq!(*point_ids(&b, "web").last().unwrap(), latest);
    // A large garbage upload is refused too: the answer comes while curl is still sending
    // (see `Curl::put`), so either curl shows the 400 or it reports the reset stream.
    let big = root.path().join("big-garbage.bin");
    let mut bytes = vec![0u8; 8 << 20];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
    std::fs::write(&big, &bytes).unwrap();
    let out = curl.run(latest + 1, &big);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!(
        "8 MiB garbage delta: curl exit {:?}: {}",
        out.status.code(),
        text.trim().replace('\n', " ")
    );
    assert!(
        text.contains("corrupt_delta") || out.status.code() == Some(92),
        "an 8 MiB garbage delta was not refused: {text}"
    );
    refused += 1;
    assert_eq!(*point_ids(&b, "web").last().unwrap(), latest);
    let latest = sync_after_refusal(&a, &b, &uri, root.path(), "a garbage delta", 1);

    // A real next delta: take a copy of the replica, let the primary ship one more point,
    // keep that delta from the journal and put the replica back one point, so it expects
    // exactly this delta again. Truncated or bit-flipped copies of it must be refused.
    b.stop();
    let storage = b.dir.join("storage");
    let saved = root.path().join("storage.saved");
    sh(Command::new("cp").arg("-a").arg(&storage).arg(&saved));
    b.restart();
    qemu_io_ok(&uri, &["write -q -P 0x44 8M 1M"]);
    let real_seq = sync_until_ok(&a, "web", 5)["seq"].as_u64().unwrap();
    assert_eq!(real_seq, latest + 1);
    b.stop();
    let real = root.path().join("real.delta");
    std::fs::copy(journal_file(&b, real_seq), &real).unwrap();
    std::fs::remove_dir_all(&storage).unwrap();
    sh(Command::new("cp").arg("-a").arg(&saved).arg(&storage));
    b.restart();
    assert_eq!(*point_ids(&b, "web").last().unwrap(), latest);
    let real_bytes = std::fs::read(&real).unwrap();
    println!("captured delta {real_seq}: {} bytes", real_bytes.len());
    let variants: Vec<(String, Vec<u8>)> = vec![
        (
            "truncated to half".into(),
            real_bytes[..real_bytes.len() / 2].to_vec(),
        ),
        (
            "missing its last byte".into(),
            real_bytes[..real_bytes.len() - 1].to_vec(),
        ),
        ("with one byte flipped in the middle".into(), {
            let mut v = real_bytes.clone();
            let i = v.len() / 2;
            v[i] ^= 0x40;
            v
        }),
        ("with trailing bytes".into(), {
            let mut v = real_bytes.clone();
            v.extend_from_slice(b"trailing");
            v
        }),
    ];
    for (what, body) in &variants {
        let f = root.path().join("variant.delta");
        std::fs::write(&f, body).unwrap();
        let (code, ans) = curl.put(real_seq, &f);
        println!("real delta {what}: {code} {ans}");
        // Regression: a truncated delta was answered 500 store_error, as if the replica's
        // storage had failed (see `truncated_delta_is_refused_as_corrupt_not_as_a_store_error`).
        assert_eq!(
            (code, ans["code"].as_str()),
            (400, Some("corrupt_delta")),
            "a delta {what} was not refused as corrupt: {ans}"
        );
        assert!(
            ans["error"].as_str().is_some_and(|e| !e.is_empty()),
            "refusal without a reason: {ans}"
        );
        refused += 1;
        assert_eq!(
            *point_ids(&b, "web").last().unwrap(),
            latest,
            "a refused delta ({what}) became a point"
        );
        let p = root.path().join("p.raw");
        export_point(&b, "web", "latest", 0, &p);
        std::fs::remove_file(&p).unwrap();
    }
    // The intact copy is the delta the primary really sent: accepted, and the primary goes on.
    let (code, ans) = curl.put(real_seq, &real);
    assert_eq!(code, 200, "the intact real delta was refused: {ans}");
    let next = sync_after_refusal(
        &a,
        &b,
        &uri,
        root.path(),
        "truncated and corrupted copies of a real delta",
        2,
    );
    assert_eq!(next, real_seq + 1);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(
        (st["state"].as_str(), st["health"].as_str()),
        (Some("Replicating"), Some("Normal")),
        "{st}"
    );
    let ids = point_ids(&b, "web");
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    println!("hostile deltas: {refused} sent, {refused} refused with a named code, 0 applied; points {ids:?}; primary {} {}", st["state"], st["health"]);
}

// ----- (c) malformed NBD traffic on the daemon's socket -----

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;

fn nbd_connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Reads the greeting and sends client flags (fixed newstyle, no zeroes).
fn nbd_greet(s: &mut UnixStream) {
    let g = read_exact(s, 18);
    assert_eq!(
        (be64(&g), be64(&g[8..])),
        (NBDMAGIC, IHAVEOPT),
        "bad greeting"
    );
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// Waits for the server to close the connection (EOF or reset); returns how long it took.
fn wait_closed(s: &mut UnixStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!(
                    "the server did not close the connection within {:?}",
                    start.elapsed()
                )
            }
            Err(_) => return start.elapsed(),
        }
    }
}

/// Full handshake with NBD_OPT_GO; returns the export size.
fn nbd_go(s: &mut UnixStream, export: &str) -> u64 {
    nbd_greet(s);
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut size = None;
    loop {
        let h = read_exact(s, 20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        let (typ, len) = (be32(&h[12..]), be32(&h[16..]) as usize);
        let data = read_exact(s, len);
        match typ {
            1 => break, // NBD_REP_ACK
            3 if u16::from_be_bytes([data[0], data[1]]) == 0 => size = Some(be64(&data[2..])),
            3 => {}
            other => panic!("NBD_OPT_GO answered {other:#x}"),
        }
    }
    size.expect("no NBD_INFO_EXPORT")
}

fn nbd_request(s: &mut UnixStream, typ: u16, cookie: u64, offset: u64, len: u32) {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&typ.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).unwrap();
}

/// Reads a simple reply; returns (error, cookie).
fn nbd_simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let r = read_exact(s, 16);
    assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC);
    (be32(&r[4..]), be64(&r[8..]))
}

#[test]
fn malformed_nbd_traffic_is_cut_off_and_the_export_keeps_working() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let a = Host::start(root.path(), "solo");
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -q -P 0x5a 0 1M"]);
    let socket = a.dir.join("nbd.sock");
    let still_serving = |what: &str| {
        qemu_io_ok(&uri, &["read -q -P 0x5a 0 1M", "write -q -P 0x5a 512k 4k"]);
        assert!(alive(&a), "the daemon died after {what}");
    };

    // A client that never finishes the handshake: others are served meanwhile, and it is
    // dropped at the handshake deadline.
    let hang_start = Instant::now();
    let mut hanging = nbd_connect(&socket);
    let _greeting = read_exact(&mut hanging, 18);
    let hang_thread = std::thread::spawn(move || wait_closed(&mut hanging));

    // Garbage instead of an option during option haggling.
    let mut s = nbd_connect(&socket);
    nbd_greet(&mut s);
    s.write_all(b"this is not an NBD option header, just garbage bytes....")
        .unwrap();
    let t = wait_closed(&mut s);
    println!("garbage during option haggling: disconnected after {t:?}");
    assert!(
        t < Duration::from_secs(5),
        "garbage was not cut off promptly"
    );
    still_serving("garbage options");

    // An option announcing 4 GiB of payload.
    let mut s = nbd_connect(&socket);
    nbd_greet(&mut s);
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&opt).unwrap();
    let t = wait_closed(&mut s);
    println!("option with a 4 GiB payload: disconnected after {t:?}");
    assert!(t < Duration::from_secs(5));
    still_serving("an oversized option");

    // A bad client flag word (unknown bits): refused.
    let mut s = nbd_connect(&socket);
    let _ = read_exact(&mut s, 18);
    s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    let t = wait_closed(&mut s);
    println!("unknown client flags: disconnected after {t:?}");
    still_serving("unknown client flags");

    // In transmission: a read past the end gets an error reply, the connection goes on.
    let mut s = nbd_connect(&socket);
    let size = nbd_go(&mut s, "web-0");
    assert_eq!(size, 16 << 20);
    nbd_request(&mut s, 0, 1, size, 4096);
    let (err, cookie) = nbd_simple_reply(&mut s);
    println!("read past the end: error {err}");
    assert_eq!(cookie, 1);
    assert_ne!(err, 0, "a read past the end was answered without an error");
    nbd_request(&mut s, 0, 2, size - 4096 + 1, 4096);
    let (err, _) = nbd_simple_reply(&mut s);
    assert_ne!(
        err, 0,
        "a read straddling the end was answered without an error"
    );
    nbd_request(&mut s, 0, 3, 0, 4096);
    let (err, cookie) = nbd_simple_reply(&mut s);
    assert_eq!(
        (err, cookie),
        (0, 3),
        "a valid read after the bad ones failed"
    );
    assert!(read_exact(&mut s, 4096).iter().all(|&b| b == 0x5a));
    // An unknown command type: an error reply (EINVAL), not a crash.
    nbd_request(&mut s, 0x77, 4, 0, 4096);
    let (err, cookie) = nbd_simple_reply(&mut s);
    println!("unknown command: error {err}");
    assert_eq!(cookie, 4);
    assert_ne!(err, 0);
    still_serving("reads past the end and an unknown command");
    // A write announcing 2 GiB of payload cannot be skipped: the connection is closed.
    nbd_request(&mut s, 1, 5, 0, 0x8000_0000);
    let t = wait_closed(&mut s);
    println!("write announcing 2 GiB: disconnected after {t:?}");
    still_serving("an oversized write");
    // A bad request magic.
    let mut s = nbd_connect(&socket);
    nbd_go(&mut s, "web-0");
    s.write_all(&[0xde; 28]).unwrap();
    wait_closed(&mut s);
    still_serving("a bad request magic");

    let hung = hang_thread.join().unwrap();
    let since_connect = hang_start.elapsed();
    println!("silent client: dropped {hung:?} after it got the greeting ({since_connect:?} after connecting)");
    assert!(
        hung >= Duration::from_secs(5) && hung <= Duration::from_secs(15),
        "the handshake deadline did not apply: {hung:?}"
    );
    still_serving("a silent client");
    // The data written before all this is intact.
    qemu_io_ok(&uri, &["read -q -P 0x5a 0 1M", "read -q -P 0 1M 15M"]);
}

// ----- (d) CLI input -----

#[test]
fn bad_cli_input_is_one_error_line_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    let replica = b.addr();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "size with an unknown unit",
            vec!["vm", "create", "x", "--disk", "12Q"],
            "invalid size",
        ),
        (
            "size zero",
            vec!["vm", "create", "x", "--disk", "0"],
            "size",
        ),
        (
            "negative size",
            vec!["vm", "create", "x", "--disk=-5M"],
            "invalid size",
        ),
        (
            "fractional size",
            vec!["vm", "create", "x", "--disk", "1.5G"],
            "invalid size",
        ),
        (
            "empty size",
            vec!["vm", "create", "x", "--disk="],
            "invalid size",
        ),
        (
            "size that overflows",
            vec!["vm", "create", "x", "--disk", "99999999T"],
            "too large",
        ),
        (
            "size not a multiple of 4 KiB",
            vec!["vm", "create", "x", "--disk", "1000"],
            "4 KiB",
        ),
        (
            "unknown VM: show",
            vec!["vm", "show", "nope"],
            "no VM named nope",
        ),
        (
            "unknown VM: status",
            vec!["replication", "status", "nope"],
            "no VM named nope",
        ),
        (
            "unknown VM: sync",
            vec!["replication", "sync", "nope"],
            "no VM named nope",
        ),
        (
            "unknown VM: enable",
            vec!["replication", "enable", "nope", "--replica", &replica],
            "no VM named nope",
        ),
        (
            "unknown VM: resume",
            vec!["replication", "resume", "nope"],
            "no VM named nope",
        ),
        (
            "unknown VM: points on the replica",
            vec!["points", "list", "nope"],
            "nope",
        ),
        (
            "frequency 0",
            vec![
                "replication",
                "enable",
                "web",
                "--replica",
                &replica,
                "--frequency",
                "0",
            ],
            "frequency",
        ),
        (
            "frequency 4000",
            vec![
                "replication",
                "enable",
                "web",
                "--replica",
                &replica,
                "--frequency",
                "4000",
            ],
            "frequency",
        ),
        (
            "replica address without port",
            vec!["replication", "enable", "web", "--replica", "nonsense"],
            "nonsense",
        ),
        (
            "no such disk",
            vec![
                "replication",
                "enable",
                "web",
                "--replica",
                &replica,
                "--disks",
                "3",
            ],
            "disk 3",
        ),
        (
            "sync before enable",
            vec!["replication", "sync", "web"],
            "not enabled",
        ),
    ];
    for (what, args, needle) in &cases {
        // points are asked of the replica, everything else of the primary.
        let host = if args[0] == "points" { &b } else { &a };
        let err = one_line_error(what, &host.run(args));
        assert!(
            err.contains(needle),
            "{what}: the error does not say {needle:?}: {err}"
        );
        println!("{what:32} → {err}");
    }
    // Nothing was created or enabled by any of it.
    let vms = a.json(&["vm", "list"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(a.json(&["vm", "show", "web"])["replication_role"], "None");
    assert!(!b.run(&["points", "list", "web"]).status.success());
    println!(
        "{} bad CLI inputs: {} one-line errors, 0 changes",
        cases.len(),
        cases.len()
    );
}
