//! Resumable uploads (AUDIT §9, docs/formats/peer-protocol.md "Resuming an interrupted
//! upload"): a TCP proxy between primary and replica resets every connection after a number
//! of bytes; a long transfer must still complete, continuing from what the replica holds.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;

const MIB: u64 = 1 << 20;

/// A TCP proxy that kills every connection (linger 0: a reset) once it carried
/// `reset_after` bytes from the client, which is the primary. `reset_after` 0: pass everything
/// (bytes are counted against the limit only while it is set).
struct ResetProxy {
    port: u16,
    reset_after: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    /// Bytes forwarded from the primary to the replica while a limit was set, all connections.
    forwarded: Arc<AtomicU64>,
    /// While set, new connections wait before they are forwarded (the primary sees a link
    /// that does not answer).
    hold: Arc<AtomicBool>,
    /// Set `hold` at the next reset.
    hold_on_reset: Arc<AtomicBool>,
}

impl ResetProxy {
    fn start(target: SocketAddr, reset_after: u64) -> ResetProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = ResetProxy {
            port,
            reset_after: Arc::new(AtomicU64::new(reset_after)),
            resets: Arc::new(AtomicU64::new(0)),
            forwarded: Arc::new(AtomicU64::new(0)),
            hold: Arc::new(AtomicBool::new(false)),
            hold_on_reset: Arc::new(AtomicBool::new(false)),
        };
        let counters = Counters {
            limit: p.reset_after.clone(),
            resets: p.resets.clone(),
            forwarded: p.forwarded.clone(),
            hold: p.hold.clone(),
            hold_on_reset: p.hold_on_reset.clone(),
        };
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                while counters.hold.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(s2, c2, None));
                let counters = counters.clone();
                std::thread::spawn(move || pipe(client, server, Some(counters)));
            }
        });
        p
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

#[derive(Clone)]
struct Counters {
    limit: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    hold: Arc<AtomicBool>,
    hold_on_reset: Arc<AtomicBool>,
}

/// Copies `from` to `to` until either fails; with counters, resets both once the limit is
/// reached on this connection.
fn pipe(mut from: TcpStream, mut to: TcpStream, counters: Option<Counters>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut carried = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let limit = counters
            .as_ref()
            .map_or(0, |c| c.limit.load(Ordering::Relaxed));
        let Some(c) = counters.as_ref().filter(|_| limit > 0) else {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        };
        let n = n.min(limit.saturating_sub(carried) as usize);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        carried += n as u64;
        c.forwarded.fetch_add(n as u64, Ordering::Relaxed);
        if carried >= limit {
            if c.hold_on_reset.swap(false, Ordering::Relaxed) {
                c.hold.store(true, Ordering::Relaxed);
            }
            c.resets.fetch_add(1, Ordering::Relaxed);
            for s in [&from, &to] {
                reset_on_close(s);
            }
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// SO_LINGER 0: the last close of the socket sends a reset, not a FIN.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// 64 MiB from /dev/urandom: incompressible (zstd compresses each 1 MiB frame on its own, so
/// repeating the block does not help it).
fn random_block() -> Vec<u8> {
    let mut b = vec![0u8; (64 * MIB) as usize];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}

/// Writes `block` at every offset in `offsets` of the VM's disk through NBD: nbdcopy from a
/// sparse source file the size of the disk, `<dir>/src.raw`, which is then the disk's content.
fn write_through_nbd(h: &Host, vm: &str, dir: &Path, size: u64, block: &[u8], offsets: &[u64]) {
    let src = dir.join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    for &o in offsets {
        f.write_all_at(block, o).unwrap();
    }
    drop(f);
    sh(Command::new("nbdcopy")
        .arg("--destination-is-zero")
        .arg(&src)
        .arg(h.nbd_uri(vm, 0)));
}

fn same_content(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// The scenario: a 2 GiB disk with 1 GiB of incompressible data, replicated through a
/// link reset every 192 MiB. Before resumable uploads every reset aborted the cut and the next
/// attempt started from byte 0, so the initial replication never completed.
#[test]
fn initial_replication_through_a_resetting_link_resumes_and_completes() {
    require("nbdcopy", "nbdkit libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let (primary, replica) = pair(root.path());
    let size = 2048 * MIB;
    primary.ok(&["vm", "create", "big", "--disk", "2G"]);
    let block = random_block();
    // Data in every other 64 MiB: 1 GiB of data, 1 GiB of holes.
    let offsets: Vec<u64> = (0..16).map(|i| i * 128 * MIB).collect();
    let t = Instant::now();
    write_through_nbd(&primary, "big", root.path(), size, &block, &offsets);
    eprintln!("wrote 1 GiB through NBD in {:?}", t.elapsed());
    let data_bytes = 16 * 64 * MIB;

    let target: SocketAddr = replica.addr().parse().unwrap();
    let proxy = ResetProxy::start(target, 192 * MIB);
    primary.ok(&[
        "replication",
        "enable",
        "big",
        "--replica",
        &proxy.addr(),
        "--frequency",
        "3600",
    ]);
    let t = Instant::now();
    primary.ok(&["replication", "start", "big", "--wait", "--timeout", "300"]);
    eprintln!(
        "initial replication in {:?}, {} resets",
        t.elapsed(),
        proxy.resets.load(Ordering::Relaxed)
    );

    let m = measure(&primary, "big");
    eprintln!("{m}");
    let resumes = m["resumed_uploads_total"].as_u64().unwrap();
    let sent = m["sent_bytes_total"].as_u64().unwrap();
    assert!(
        proxy.resets.load(Ordering::Relaxed) >= 4,
        "the link was reset during the transfer"
    );
    assert!(resumes >= 4, "the upload was resumed: {m}");
    assert_eq!(
        m["failed_cycles"].as_u64(),
        Some(0),
        "no cut was given up: {m}"
    );
    assert_eq!(m["successful_cycles"].as_u64(), Some(1), "{m}");
    assert!(
        m["resumed_bytes_total"].as_u64().unwrap() > data_bytes,
        "resumes started past what was already sent: {m}"
    );
    // Starting over at each reset would have sent about resumes × 192 MiB more; a resume
    // re-sends at most the replay window (32 MiB).
    assert!(
        sent < data_bytes + resumes * 32 * MIB + 64 * MIB,
        "sent {sent} bytes for {data_bytes} bytes of data"
    );
    assert!(proxy.forwarded.load(Ordering::Relaxed) < data_bytes * 3 / 2);
    let resumed_events = events(&primary)
        .iter()
        .filter(|e| e["id"].as_u64() == Some(2020))
        .count() as u64;
    assert_eq!(resumed_events, resumes);

    let point = root.path().join("point.raw");
    export_point(&replica, "big", "latest", 0, &point);
    assert!(
        same_content(&root.path().join("src.raw"), &point),
        "the replica's point equals the primary's disk"
    );
    let _ = std::fs::remove_file(&point);
}

/// An incremental delta (received into the journal) resumes too, mid-frame: the point it makes
/// is whole and the journal holds it.
#[test]
fn incremental_delta_resumes_after_resets_and_its_point_is_whole() {
    require("nbdcopy", "nbdkit libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let (primary, replica) = pair(root.path());
    let size = 512 * MIB;
    primary.ok(&["vm", "create", "inc", "--disk", "512M"]);
    let block = random_block();
    write_through_nbd(&primary, "inc", root.path(), size, &block, &[0]);
    let target: SocketAddr = replica.addr().parse().unwrap();
    // No resets during the initial replication.
    let proxy = ResetProxy::start(target, 0);
    primary.ok(&[
        "replication",
        "enable",
        "inc",
        "--replica",
        &proxy.addr(),
        "--frequency",
        "3600",
    ]);
    primary.ok(&["replication", "start", "inc", "--wait", "--timeout", "300"]);

    // 320 MiB written (the first 64 MiB again, so that src.raw is the whole disk), shipped
    // through a link reset every 48 MiB.
    let offsets: Vec<u64> = (0..5).map(|i| i * 96 * MIB).collect();
    write_through_nbd(&primary, "inc", root.path(), size, &block, &offsets);
    proxy.reset_after.store(48 * MIB, Ordering::Relaxed);
    let sync = primary.json(&["replication", "sync", "inc"]);
    proxy.reset_after.store(0, Ordering::Relaxed);
    eprintln!("{sync}");
    assert_eq!(sync["seq"].as_u64(), Some(2), "{sync}");

    let m = measure(&primary, "inc");
    eprintln!("{m}");
    let resumes = m["resumed_uploads_total"].as_u64().unwrap();
    assert!(proxy.resets.load(Ordering::Relaxed) >= 3);
    assert!(resumes >= 3, "the incremental upload was resumed: {m}");
    assert_eq!(m["failed_cycles"].as_u64(), Some(0), "{m}");
    let delta = 5 * 64 * MIB;
    assert!(
        sync["sent_bytes"].as_u64().unwrap() < delta + resumes * 32 * MIB + 16 * MIB,
        "{sync}"
    );
    assert_eq!(point_ids(&replica, "inc"), vec![1, 2]);
    let point = root.path().join("point.raw");
    export_point(&replica, "inc", "latest", 0, &point);
    assert!(
        same_content(&root.path().join("src.raw"), &point),
        "the resumed point equals the primary's disk"
    );
}

/// A resumed upload keeps the cut it started with: the epoch stays frozen while the link is
/// down and copy-before-write keeps serving the cut-time content of blocks the guest overwrites
/// meanwhile. The stamped-block workload writes while cycles run every second through a link
/// reset every 4 MiB; every recovery point is checked by the cut checker (tests/cutcheck).
#[test]
fn cuts_stay_valid_when_uploads_are_resumed_mid_delta() {
    require("nbdcopy", "libnbd-bin");
    let py = "/usr/bin/python3";
    let blocks = "8192";
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "64M"]);
    let target: SocketAddr = b.addr().parse().unwrap();
    let proxy = ResetProxy::start(target, 0);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &proxy.addr(),
        "--frequency",
        "1",
        // Stamped blocks compress to almost nothing: uncompressed, a delta is big enough that
        // resets land after its header reached the replica (a reset also discards what sits
        // unread in the replica's socket buffer, so a tiny delta is lost whole, not resumed).
        "--compression",
        "none",
    ]);
    a.ok(&["replication", "start", "web", "--wait", "--timeout", "300"]);
    proxy.reset_after.store(4 * MIB, Ordering::Relaxed);

    let repo = repo_root();
    let log = root.path().join("workload.log");
    let seed = format!("{}", std::process::id());
    let out = sh(Command::new(py)
        .arg(repo.join("tests/cutcheck/workload.py"))
        .args(["--uri", &a.nbd_uri("web", 0)])
        .args(["--connections", "2", "--qd", "8", "--blocks", blocks])
        .args(["--duration", "8", "--seed", &seed])
        .arg("--log")
        .arg(&log));
    let summary: serde_json::Value =
        serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["failed"], 0, "guest writes failed: {summary}");
    proxy.reset_after.store(0, Ordering::Relaxed);
    sync_until_ok(&a, "web", 5);

    let m = measure(&a, "web");
    println!("{m}");
    assert!(
        m["resumed_uploads_total"].as_u64().unwrap() >= 2,
        "uploads were resumed: {m}"
    );
    assert!(m["cbw_copied_bytes_total"].as_u64().unwrap() > 0, "{m}");
    // A reset before the replica consumed a delta's header sends it again from byte 0.
    assert_eq!(
        m["failed_cycles"].as_u64(),
        Some(0),
        "no cut was given up: {m}"
    );
    let points = b.json(&["points", "list", "web"]);
    let mut args: Vec<String> = Vec::new();
    for p in points.as_array().unwrap() {
        let id = p["id"].as_u64().unwrap();
        let f = root.path().join(format!("p{id}.raw"));
        export_point(&b, "web", &id.to_string(), 0, &f);
        args.push("--point".into());
        args.push(format!("{}:{}", p["cut_time_unix_ns"], f.display()));
    }
    let out = Command::new(py)
        .arg(repo.join("tests/cutcheck/checker.py"))
        .arg("--log")
        .arg(&log)
        .args(["--blocks", blocks])
        .args(&args)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("checker: {}", report.trim());
    assert!(
        out.status.success(),
        "cut checker found violations: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(report.trim().lines().last().unwrap()).unwrap();
    assert!(r["points_checked"].as_u64().unwrap() >= 3, "{r}");
}

/// The replica keeps an interrupted incremental upload on disk: its daemon restarts between
/// the reset and the resume, and the upload still continues from where it stood.
#[test]
fn an_interrupted_incremental_upload_survives_a_replica_restart() {
    require("nbdcopy", "nbdkit libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let (primary, mut replica) = pair(root.path());
    let size = 512 * MIB;
    primary.ok(&["vm", "create", "inc", "--disk", "512M"]);
    let block = random_block();
    write_through_nbd(&primary, "inc", root.path(), size, &block, &[0]);
    let target: SocketAddr = replica.addr().parse().unwrap();
    let proxy = ResetProxy::start(target, 0);
    primary.ok(&[
        "replication",
        "enable",
        "inc",
        "--replica",
        &proxy.addr(),
        "--frequency",
        "3600",
    ]);
    primary.ok(&["replication", "start", "inc", "--wait", "--timeout", "300"]);

    let offsets: Vec<u64> = (0..4).map(|i| i * 96 * MIB).collect();
    write_through_nbd(&primary, "inc", root.path(), size, &block, &offsets);
    // One reset after 96 MiB of the upload; then the link holds new connections while the
    // replica daemon restarts.
    proxy.hold_on_reset.store(true, Ordering::Relaxed);
    proxy.reset_after.store(96 * MIB, Ordering::Relaxed);
    let exe = EXE.to_string();
    let dir = primary.dir.clone();
    let sync = std::thread::spawn(move || {
        Command::new(exe)
            .arg("--data-dir")
            .arg(dir)
            .args(["replication", "sync", "inc", "--json"])
            .output()
            .unwrap()
    });
    let incoming = replica.dir.join("storage/inc/incoming");
    wait_until(
        "the interrupted upload kept on disk",
        std::time::Duration::from_secs(120),
        || {
            std::fs::read_dir(&incoming)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("kept-"))
                })
                .unwrap_or(false)
        },
    );
    proxy.reset_after.store(0, Ordering::Relaxed);
    replica.stop();
    replica.restart();
    proxy.hold.store(false, Ordering::Relaxed);
    let out = sync.join().unwrap();
    assert!(
        out.status.success(),
        "sync failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&primary.log(), 30)
    );
    let m = measure(&primary, "inc");
    eprintln!("{m}");
    assert_eq!(m["failed_cycles"].as_u64(), Some(0), "{m}");
    assert!(
        m["resumed_bytes_total"].as_u64().unwrap() > 32 * MIB,
        "resumed from what the replica kept before it restarted: {m}"
    );
    assert!(
        replica
            .log()
            .contains("continuing an upload kept across a restart"),
        "{}",
        tail(&replica.log(), 30)
    );
    assert_eq!(point_ids(&replica, "inc"), vec![1, 2]);
    let point = root.path().join("point.raw");
    export_point(&replica, "inc", "latest", 0, &point);
    assert!(same_content(&root.path().join("src.raw"), &point));
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "kept prefix deleted"
    );
}
