//! Running under systemd (packaging/understudy.service): `systemd-analyze verify` accepts the
//! units, the daemon speaks the notify protocol (READY=1, WATCHDOG=1 pings, STOPPING=1) to the
//! socket in `$NOTIFY_SOCKET`, and SIGHUP (`ExecReload=`) makes new handshakes present the
//! certificate re-read from disk.

mod common;

use common::*;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `systemd-analyze verify` of the shipped units, ExecStart pointed at the binary under test
/// (the man page check is off: the page exists only once the package is installed, where
/// scripts/test-package verifies the installed unit with it). Warnings count as failures.
#[test]
fn packaged_units_pass_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    let root = repo_root().join("packaging");
    let unit = std::fs::read_to_string(root.join("understudy.service")).unwrap();
    assert!(unit
        .contains("ExecStart=/usr/bin/understudy serve --config /etc/understudy/understudy.toml"));
    std::fs::write(
        tmp.path().join("understudy.service"),
        unit.replace("/usr/bin/understudy", EXE),
    )
    .unwrap();
    std::fs::copy(
        root.join("understudy-nbd.socket"),
        tmp.path().join("understudy-nbd.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(tmp.path().join("understudy.service"))
        .arg(tmp.path().join("understudy-nbd.socket"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "verify: {err}"
    );
}

fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = Command::new(EXE);
    c.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn wait_ready_line(child: &mut Child) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("daemon ready line");
}

fn sigterm(child: &mut Child) {
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[test]
fn notify_socket_gets_ready_then_watchdog_pings_then_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let data = tmp.path().join("data");
    // WatchdogSec=1s: a ping every 500 ms.
    let mut child = spawn(
        &data,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut buf = [0u8; 256];
    let recv = |buf: &mut [u8]| -> String {
        let n = sock.recv(buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv(&mut buf);
    assert_eq!(first, "READY=1", "the first message is READY=1");
    // Ready means served: the API answers at once.
    let out = Command::new(EXE)
        .arg("--data-dir")
        .arg(&data)
        .args(["vm", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let m = recv(&mut buf);
        assert_eq!(m, "WATCHDOG=1");
        pings += 1;
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    sigterm(&mut child);
    // Pings may still be in flight; STOPPING=1 comes before the exit.
    let mut stopping = false;
    for _ in 0..10 {
        let m = recv(&mut buf);
        if m == "STOPPING=1" {
            stopping = true;
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert!(child.wait().unwrap().success());

    // Without WATCHDOG_USEC there are no pings: READY=1, then nothing until STOPPING=1.
    let mut child = spawn(
        &data,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    assert_eq!(recv(&mut buf), "READY=1");
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(&mut child);
    assert_eq!(recv(&mut buf), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

fn openssl(dir: &Path, script: &str) -> String {
    sh(Command::new("sh").current_dir(dir).arg("-c").arg(script))
}

/// Issues `leaf.crt`/`leaf.key` for CN `cn` from the CA in `dir` (a new key each time).
fn issue_leaf(dir: &Path, cn: &str) {
    openssl(
        dir,
        &format!(
            "set -e
             openssl ecparam -name prime256v1 -genkey -noout -out new.key
             openssl req -new -key new.key -subj /CN={cn} -out new.csr
             printf 'subjectAltName=DNS:{cn},IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\nbasicConstraints=CA:FALSE\\n' > leaf.ext
             openssl x509 -req -in new.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile leaf.ext -out new.crt 2>/dev/null
             mv new.key leaf.key
             mv new.crt leaf.crt"
        ),
    );
}

fn fingerprint_of_file(dir: &Path, file: &str) -> String {
    openssl(
        dir,
        &format!("openssl x509 -in {file} -noout -fingerprint -sha256"),
    )
    .trim()
    .to_string()
}

/// The certificate a new TLS handshake with `port` presents.
fn served_fingerprint(dir: &Path, port: u16) -> String {
    openssl(
        dir,
        &format!(
            "openssl s_client -connect 127.0.0.1:{port} -tls1_3 -alpn h2 </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ),
    )
    .trim()
    .to_string()
}

#[test]
fn sighup_reloads_the_certificate_for_new_handshakes() {
    require("openssl", "openssl");
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path();
    openssl(
        pki,
        "openssl ecparam -name prime256v1 -genkey -noout -out ca.key && \
         openssl req -x509 -new -key ca.key -subj /CN=test-ca -days 30 -out ca.crt \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    );
    issue_leaf(pki, "h1");
    let first = fingerprint_of_file(pki, "leaf.crt");
    let data = pki.join("data");
    let port = free_port();
    std::fs::create_dir_all(&data).unwrap();
    let mut child = Command::new(EXE)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--name", "h1"])
        .arg("--cert")
        .arg(pki.join("leaf.crt"))
        .arg("--key")
        .arg(pki.join("leaf.key"))
        .arg("--ca")
        .arg(pki.join("ca.crt"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(data.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    wait_ready_line(&mut child);
    assert_eq!(served_fingerprint(pki, port), first);

    // Renewed on disk: served only after SIGHUP.
    issue_leaf(pki, "h1");
    let second = fingerprint_of_file(pki, "leaf.crt");
    assert_ne!(first, second);
    assert_eq!(
        served_fingerprint(pki, port),
        first,
        "no reload without SIGHUP"
    );
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_until(
        "the renewed certificate is served",
        Duration::from_secs(20),
        || served_fingerprint(pki, port) == second,
    );

    // A certificate for another host name is refused; the renewed one stays in force and the
    // daemon keeps running.
    issue_leaf(pki, "someone-else");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_until("the refusal is logged", Duration::from_secs(20), || {
        std::fs::read_to_string(data.join("daemon.log"))
            .unwrap_or_default()
            .contains("reload refused")
    });
    assert_eq!(served_fingerprint(pki, port), second);
    assert!(child.try_wait().unwrap().is_none(), "still running");
    sigterm(&mut child);
    assert!(child.wait().unwrap().success());
}
