//! `understudy demo`: the whole story on loopback in a temporary directory, with no setup.
//! Two daemons (a primary and a replica host), mutual trust, a VM with two disks, a guest
//! writer, initial replication, cycles every second, and a byte-for-byte check that the
//! replica's newest point equals the primary. It drives the daemons through the same CLI a
//! user types, so it also shows what the commands print.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::nbd_client::NbdClient;

/// How long the demo lets the guest write while replication runs.
const WRITE_PHASE: Duration = Duration::from_secs(5);
/// Size of the guest's writes.
const WRITE_BYTES: usize = 64 << 10;
/// How long a daemon may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: sending SIGTERM to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_daemon(exe: &Path, dir: &Path, name: &str, port: u16) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut child = Command::new(exe)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--name", name])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting a daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready") {
                let _ = tx.send(());
            }
        }
    });
    let daemon = Daemon {
        child,
        dir: dir.to_path_buf(),
    };
    if rx.recv_timeout(READY_TIMEOUT).is_err() {
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        bail!(
            "daemon {name} did not start: {}",
            log.lines().last().unwrap_or("no output")
        );
    }
    Ok(daemon)
}

fn cli(exe: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "understudy {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn say(msg: &str) {
    println!("==> {msg}");
}

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("locating the understudy binary")?;
    let tmp = tempdir()?;
    let result = tour(&exe, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    say(&format!(
        "demo finished in {:.1} s; everything it created is gone",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("understudy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(base)
}

fn tour(exe: &Path, tmp: &Path) -> anyhow::Result<()> {
    let (pa, pb) = (free_port()?, free_port()?);
    say(&format!(
        "starting two hosts on loopback in {}: `primary` (port {pa}) and `replica` (port {pb})",
        tmp.display()
    ));
    let a = start_daemon(exe, &tmp.join("primary"), "primary", pa)?;
    let b = start_daemon(exe, &tmp.join("replica"), "replica", pb)?;

    say("exchanging certificates: each host trusts the other's CA (mutual TLS 1.3)");
    for (from, to) in [(&a, &b), (&b, &a)] {
        let pem = cli(exe, &from.dir, &["identity"])?;
        let f = from.dir.join("identity-for-peer.pem");
        std::fs::write(&f, pem)?;
        cli(exe, &to.dir, &["trust", "add", &f.display().to_string()])?;
    }
    let storage = b.dir.join("replicas");
    cli(
        exe,
        &b.dir,
        &[
            "replica-server",
            "enable",
            "--storage",
            &storage.display().to_string(),
            "--allow",
            "primary",
        ],
    )?;
    say("the replica host accepts replicas from `primary` into its storage");

    print!(
        "{}",
        cli(
            exe,
            &a.dir,
            &["vm", "create", "web", "--disk", "64M", "--disk", "16M"]
        )?
    );
    let socket = a.dir.join("nbd.sock");

    say("a guest starts writing to both disks over NBD (64 KiB writes, both disks)");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, socket) = (stop.clone(), written.clone(), socket.clone());
        std::thread::spawn(move || guest_writer(&socket, &stop, &written))
    };
    std::thread::sleep(Duration::from_millis(500));

    cli(
        exe,
        &a.dir,
        &[
            "replication",
            "enable",
            "web",
            "--replica",
            &format!("127.0.0.1:{pb}"),
            "--frequency",
            "1",
        ],
    )?;
    say("replication enabled: a crash-consistent cut of both disks every second, zstd-compressed");
    let t = Instant::now();
    cli(exe, &a.dir, &["replication", "start", "web", "--wait"])?;
    say(&format!(
        "initial replication done in {:.1} s (holes and zeros are not sent)",
        t.elapsed().as_secs_f64()
    ));

    let until = Instant::now() + WRITE_PHASE;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
        let st: serde_json::Value = serde_json::from_str(&cli(
            exe,
            &a.dir,
            &["replication", "status", "web", "--json"],
        )?)?;
        say(&format!(
            "  {} · health {} · newest point {} · pending {} KiB · guest wrote {} MiB",
            st["state"].as_str().unwrap_or("?"),
            st["health"].as_str().unwrap_or("?"),
            st["last_seq"],
            st["pending_bytes"].as_u64().unwrap_or(0) / 1024,
            written.load(Ordering::Relaxed) >> 20
        ));
    }
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("guest writer panicked"))??;
    say("the guest stops; one more cycle on demand (`replication sync`)");
    print!("{}", cli(exe, &a.dir, &["replication", "sync", "web"])?);

    let points: serde_json::Value =
        serde_json::from_str(&cli(exe, &b.dir, &["points", "list", "web", "--json"])?)?;
    let n = points.as_array().map_or(0, Vec::len);
    say(&format!("the replica holds {n} recovery point(s); exporting the newest and comparing with the primary"));
    for disk in 0..2u32 {
        let out = tmp.join(format!("web-{disk}.raw"));
        cli(
            exe,
            &b.dir,
            &[
                "points",
                "export",
                "web",
                "--point",
                "latest",
                "--disk",
                &disk.to_string(),
                "--to",
                &out.display().to_string(),
            ],
        )?;
        let exported = std::fs::read(&out)?;
        let mut client = NbdClient::connect(&socket, &format!("web-{disk}"))?;
        let mut primary = vec![0u8; client.size_bytes as usize];
        for (i, chunk) in primary.chunks_mut(1 << 20).enumerate() {
            client.read((i as u64) << 20, chunk)?;
        }
        client.disconnect();
        if exported != primary {
            bail!("disk {disk}: the replica's newest point differs from the primary");
        }
        say(&format!(
            "  disk {disk}: replica point equals the primary, byte for byte ({} MiB)",
            primary.len() >> 20
        ));
    }
    print!("{}", cli(exe, &a.dir, &["replication", "measure", "web"])?);
    say("stopping both hosts cleanly");
    drop(a);
    drop(b);
    Ok(())
}

/// Writes pseudo-random 64 KiB blocks to both disks until told to stop.
fn guest_writer(socket: &Path, stop: &AtomicBool, written: &AtomicU64) -> anyhow::Result<()> {
    let mut disks = vec![
        NbdClient::connect(socket, "web-0")?,
        NbdClient::connect(socket, "web-1")?,
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; WRITE_BYTES];
    while !stop.load(Ordering::Relaxed) {
        for d in disks.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let slots = d.size_bytes / WRITE_BYTES as u64;
            let offset = (state % slots) * WRITE_BYTES as u64;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (state >> ((i % 8) * 8)) as u8 ^ i as u8;
            }
            d.write(offset, &buf)?;
            written.fetch_add(WRITE_BYTES as u64, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for d in disks.iter_mut() {
        d.flush()?;
    }
    for d in disks {
        d.disconnect();
    }
    Ok(())
}
