//! Regression tests of the hardening issue, each named after the bug it pins: a lost answer,
//! an interrupted initial replication with lost tracking, a hung replica, a broken VM at
//! start, a clock stepped back, and what the API and the files let through. Real daemons on
//! loopback, faults injected with strace and a TCP proxy.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A TCP proxy that can drop every connection it carries.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    upstream_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(to: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, b2, s2) = (conns.clone(), upstream_bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                c2.lock().unwrap().push(client.try_clone().unwrap());
                c2.lock().unwrap().push(server.try_clone().unwrap());
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>| {
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 << 10];
                            loop {
                                match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                        if let Some(c) = &count {
                                            c.fetch_add(n as u64, Ordering::Relaxed);
                                        }
                                    }
                                }
                            }
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                        });
                    };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    Some(b2.clone()),
                );
                pipe(server, client, None);
            }
        });
        Proxy {
            port,
            conns,
            upstream_bytes,
            stop,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every connection in both directions (as a reset or a NAT timeout would).
    fn drop_all(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.drop_all();
    }
}

/// Runs the CLI in a thread; the answer comes back on the channel.
fn run_async(h: &Host, args: &[&str]) -> std::sync::mpsc::Receiver<std::process::Output> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut c = Command::new(EXE);
    c.arg("--data-dir").arg(&h.dir).args(args);
    std::thread::spawn(move || {
        let _ = tx.send(c.output().unwrap());
    });
    rx
}

fn has_event(h: &Host, id: u64) -> bool {
    events(h).iter().any(|e| e["id"].as_u64() == Some(id))
}

/// Regression (AUDIT §2): the replica committed point N but the answer was lost; the retry
/// was refused out of sequence and the primary declared "resynchronization required".
#[test]
fn lost_answer_while_the_replica_commits_is_adopted_not_a_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let (primary, replica) = pair(tmp.path());
    let proxy = Proxy::start(replica.addr());
    primary.ok(&["vm", "create", "web", "--disk", "64M"]);
    primary.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &proxy.addr(),
        "--frequency",
        "3600",
    ]);
    primary.ok(&["replication", "start", "web", "--wait"]);
    let uri = primary.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 7 0 8M", "write -P 9 16M 4M"]);

    // Every fsync of the replica now takes 3 s: the commit of the next point is slow.
    let slow = Strace::attach(
        replica.pid().unwrap(),
        &[
            "trace=fsync,fdatasync",
            "inject=fsync:delay_enter=3000000",
            "inject=fdatasync:delay_enter=3000000",
        ],
    );
    let sync = run_async(&primary, &["replication", "sync", "web"]);
    // Once the whole delta went through the proxy (no more bytes for a while), the replica is
    // committing: drop the connection, so the primary never gets the answer.
    let mut last = 0;
    let mut still_since = Instant::now();
    wait_until(
        "the delta to reach the replica",
        Duration::from_secs(60),
        || {
            let now = proxy.upstream_bytes.load(Ordering::Relaxed);
            if now != last {
                last = now;
                still_since = Instant::now();
            }
            now > 0 && still_since.elapsed() > Duration::from_millis(700)
        },
    );
    proxy.drop_all();
    let out = sync.recv_timeout(Duration::from_secs(120)).unwrap();
    eprintln!(
        "sync with the answer lost: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    drop(slow);

    // The primary retries by itself; the point the replica committed is adopted.
    wait_until(
        "the lost point to be adopted",
        Duration::from_secs(120),
        || has_event(&primary, 2007),
    );
    let st = status(&primary, "web");
    assert_eq!(st["state"], "Replicating", "{st}");
    assert!(st["resync_reason"].is_null(), "{st}");
    sync_until_ok(&primary, "web", 20);
    let st = status(&primary, "web");
    assert_eq!(st["state"], "Replicating", "{st}");
    assert_eq!(st["health"], "Normal", "{st}");
    assert!(latest_equals_primary(
        &primary,
        &replica,
        "web",
        0,
        tmp.path()
    ));
}

/// Regression (AUDIT §3): an interrupted initial replication whose point 1 the replica had
/// committed, with tracking lost, re-sent only allocated blocks: a hole punched since stayed
/// old data on the replica (silent divergence).
#[test]
fn interrupted_initial_replication_with_lost_tracking_sends_holes_as_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut primary, replica) = pair(tmp.path());
    primary.ok(&["vm", "create", "web", "--disk", "16M"]);
    let uri = primary.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 0xaa 0 1M", "write -P 0x55 4M 1M"]);
    primary.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &replica.addr(),
        "--frequency",
        "3600",
    ]);
    // The primary's own commits (catalog, activity log) take 3 s: it cannot record point 1
    // before it is killed, right after the replica committed it.
    let slow = Strace::attach(
        primary.pid().unwrap(),
        &[
            "trace=fsync,fdatasync",
            "inject=fsync:delay_enter=3000000",
            "inject=fdatasync:delay_enter=3000000",
        ],
    );
    let _start = run_async(&primary, &["replication", "start", "web"]);
    wait_until("point 1 on the replica", Duration::from_secs(120), || {
        has_event(&replica, 3000)
    });
    primary.kill9();
    drop(slow);

    // What a degraded activity log leaves behind, and a hole where point 1 has data.
    let image = primary.dir.join("vms/web/disk-0.raw");
    assert!(image.exists(), "{}", image.display());
    for e in std::fs::read_dir(primary.dir.join("vms/web"))
        .unwrap()
        .flatten()
    {
        let al = e.path().join("activity.log");
        if al.exists() {
            std::fs::remove_file(al).unwrap();
        }
    }
    sh(Command::new("fallocate")
        .args(["-p", "-o", "0", "-l", "1M"])
        .arg(&image));

    primary.restart();
    wait_until(
        "point 1 adopted and point 2 shipped",
        Duration::from_secs(120),
        || status(&primary, "web")["last_seq"].as_u64() >= Some(2),
    );
    assert!(
        has_event(&primary, 2007),
        "the test did not reproduce the lost answer of point 1 (the primary recorded it before the kill)"
    );
    assert!(
        latest_equals_primary(&primary, &replica, "web", 0, tmp.path()),
        "the replica kept data the primary punched out after point 1"
    );
}

/// Regression (AUDIT §6): no deadline on the answer; a replica whose storage hangs froze the
/// VM's task, its cut and every API call queued behind it.
#[test]
fn replica_with_hung_storage_makes_cycles_fail_but_never_freezes_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let (primary, replica) = pair_with(
        tmp.path(),
        &[
            "--answer-timeout",
            "15",
            "--upload-idle-timeout",
            "15",
            "--hello-timeout",
            "4",
        ],
    );
    replicate(&primary, &replica, "web", &["64M"], 3600);
    let uri = primary.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 3 0 4M"]);

    // The replica's storage hangs: every fsync takes 5 minutes.
    let hung = Strace::attach(
        replica.pid().unwrap(),
        &[
            "trace=fsync,fdatasync",
            "inject=fsync:delay_enter=300000000",
            "inject=fdatasync:delay_enter=300000000",
        ],
    );
    let sync = run_async(&primary, &["replication", "sync", "web"]);
    // A second sync while that cycle is stalled is refused at once (retry later), not queued
    // behind the deadlines.
    std::thread::sleep(Duration::from_secs(6));
    let again = run_async(&primary, &["replication", "sync", "web"]);
    let out = again
        .recv_timeout(Duration::from_secs(20))
        .expect("sync must answer while a cycle is stalled on the replica");
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The stalled cycle fails on its deadline.
    let out = sync
        .recv_timeout(Duration::from_secs(90))
        .expect("sync must fail on its deadline, not hang");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not answer within"), "{err}");

    // The guest goes on; while the replica still hangs in that commit, a new upload of this VM
    // is refused there (one upload per VM) and the sync says to retry later.
    qemu_io_ok(&uri, &["write -P 4 8M 1M"]);
    let out = primary.run(&["replication", "sync", "web"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Suspend answers at once, whatever the cycle in flight is doing.
    let sync = run_async(&primary, &["replication", "sync", "web"]);
    std::thread::sleep(Duration::from_millis(300));
    let suspend = run_async(&primary, &["replication", "suspend", "web"]);
    let out = suspend
        .recv_timeout(Duration::from_secs(20))
        .expect("suspend must answer while a cycle waits on the replica");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sync.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(!out.status.success(), "the suspended cycle was cancelled");
    assert_eq!(status(&primary, "web")["state"], "Suspended");

    drop(hung);
    primary.ok(&["replication", "resume", "web"]);
    sync_until_ok(&primary, "web", 40);
    let st = status(&primary, "web");
    assert_eq!(st["state"], "Replicating", "{st}");
    assert!(latest_equals_primary(
        &primary,
        &replica,
        "web",
        0,
        tmp.path()
    ));
}

/// Regression (AUDIT §5): one VM that failed to open made the daemon exit, taking every
/// other guest's disk offline.
#[test]
fn one_vm_that_cannot_open_never_takes_the_host_down() {
    let tmp = tempfile::tempdir().unwrap();
    let mut host = Host::start(tmp.path(), "host");
    host.ok(&["vm", "create", "a", "--disk", "16M"]);
    host.ok(&["vm", "create", "b", "--disk", "16M"]);
    host.ok(&["vm", "create", "c", "--disk", "16M"]);
    qemu_io_ok(&host.nbd_uri("a", 0), &["write -P 1 0 64k"]);
    let b_image = disk_path(&host, "b", 0);
    let c_image = disk_path(&host, "c", 0);
    host.stop();
    // Resized outside Understudy while the daemon was down, and deleted.
    sh(Command::new("truncate").args(["-s", "+1M"]).arg(&b_image));
    std::fs::remove_file(&c_image).unwrap();
    host.restart();

    // a is served; b is reported broken with the reason.
    let out = qemu_io_ok(&host.nbd_uri("a", 0), &["read -P 1 0 64k"]);
    assert!(out.contains("read 65536/65536"), "{out}");
    let b = host.json(&["vm", "show", "b"]);
    let why = b["broken"].as_str().unwrap_or_default();
    assert!(why.contains("resized"), "{b}");
    let c = host.json(&["vm", "show", "c"]);
    assert!(c["broken"].as_str().is_some_and(|w| !w.is_empty()), "{c}");
    let list = host.json(&["vm", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    assert!(has_event(&host, 1003));
    let human = host.ok(&["vm", "show", "b"]);
    assert!(human.contains("BROKEN"), "{human}");
}

/// Regression (AUDIT §10): with the clock stepped back after a crash, an edit made while the
/// daemon was down looked older than the last heartbeat and went unnoticed.
#[test]
fn clock_behind_the_last_heartbeat_cannot_rule_out_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut primary, replica) = pair(tmp.path());
    replicate(&primary, &replica, "web", &["16M"], 3600);
    qemu_io_ok(&primary.nbd_uri("web", 0), &["write -P 5 0 64k"]);
    primary.kill9();
    // The previous daemon's last stamp is an hour ahead of this start's clock (an RTC that
    // was ahead, stepped back by NTP after the reboot).
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        + 3_600_000_000_000;
    std::fs::write(primary.dir.join("heartbeat"), ahead.to_string()).unwrap();
    primary.restart();
    let st = status(&primary, "web");
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert!(
        st["resync_reason"].as_str().unwrap().contains("clock"),
        "{st}"
    );
    // The seed's "tracking log file is not closed gracefully" row (docs/resync-triggers.md).
    assert_eq!(st["resync_condition"], "unclean_stop_untracked", "{st}");
}

fn api_post(h: &Host, path: &str, body: &str) -> (u16, String) {
    let out = sh(Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(h.dir.join("api.sock"))
        .args(["-H", "content-type: application/json", "-d", body])
        .arg(format!("http://localhost{path}")));
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// Regression (AUDIT §14): the API took any disk size (failing later with a misleading 409),
/// and images and the catalog (replication keys) were readable by every local user.
#[test]
fn api_refuses_bad_disk_sizes_with_400_and_files_are_not_world_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let host = Host::start(tmp.path(), "host");
    for sizes in ["[1000]", "[0]", "[1152921504606846976]", "[]"] {
        let (code, body) = api_post(
            &host,
            "/v1/vms",
            &format!(r#"{{"name":"x","disk_sizes_bytes":{sizes}}}"#),
        );
        assert_eq!(code, 400, "sizes {sizes}: {body}");
    }
    assert!(host.json(&["vm", "list"]).as_array().unwrap().is_empty());

    host.ok(&["vm", "create", "web", "--disk", "16M"]);
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&host.dir) & 0o007, 0, "data dir");
    assert_eq!(mode(&host.dir.join("catalog.redb")), 0o600, "catalog");
    let image = disk_path(&host, "web", 0);
    assert_eq!(mode(&image) & 0o007, 0, "image {}", image.display());
    assert_eq!(mode(image.parent().unwrap()) & 0o007, 0, "VM directory");
}

/// Starts `understudy serve` the way systemd socket activation does: the listening NBD
/// socket as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = the daemon's pid. Returns once it is ready.
fn serve_activated(dir: &Path, port: u16, listener: &std::os::unix::net::UnixListener) -> Child {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
        .arg(EXE)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--name", "host"])
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
    unsafe {
        c.pre_exec(move || {
            if fd != 3 {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else {
                libc::fcntl(3, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "activated daemon did not start");
        match lines.next() {
            Some(Ok(l)) if l.starts_with("ready") => break,
            Some(_) => {}
            None => panic!(
                "activated daemon exited:\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            ),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Issue 8 item 14: a daemon restart never reaches a client: with socket activation it waits
/// in the backlog instead of being refused.
#[test]
fn nbd_clients_queue_across_a_restart_with_socket_activation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("host");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = tmp.path().join("activated-nbd.sock");
    // What systemd's .socket unit holds for the daemon across restarts.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let port = free_port();
    let mut daemon = serve_activated(&dir, port, &listener);
    let cli = |args: &[&str]| {
        let out = Command::new(EXE)
            .arg("--data-dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["vm", "create", "web", "--disk", "16M"]);
    let show: serde_json::Value =
        serde_json::from_str(&cli(&["vm", "show", "web", "--json"])).unwrap();
    let uri = show["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
    assert!(uri.contains(sock.to_str().unwrap()), "{uri}");
    qemu_io_ok(&uri, &["write -P 6 0 64k"]);

    // The daemon dies; a client connects while it is down and waits in the backlog.
    let _ = daemon.kill();
    let _ = daemon.wait();
    let (tx, rx) = std::sync::mpsc::channel();
    let uri2 = uri.clone();
    std::thread::spawn(move || {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 6 0 64k"])
            .arg(&uri2)
            .output()
            .unwrap();
        let _ = tx.send(out);
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        rx.try_recv().is_err(),
        "the client must wait, not fail, while the daemon is down"
    );
    let mut daemon = serve_activated(&dir, port, &listener);
    let out = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("read 65536/65536"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}
