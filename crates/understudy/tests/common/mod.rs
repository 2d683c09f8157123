//! Test harness: real `understudy serve` daemons on loopback in temporary directories, driven
//! through the real CLI and real tools. Missing tools fail the test with the package to
//! install; nothing is skipped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_understudy");

pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required for this test: apt-get install -y {package} (scripts/test does it)"
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Host {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    /// Extra `serve` arguments (e.g. --cert/--key/--ca).
    pub serve_args: Vec<String>,
    child: Option<Child>,
    /// Started once: peers may know its address now.
    started: bool,
}

impl Host {
    pub fn start(root: &Path, name: &str) -> Host {
        Host::start_with(root, name, &[])
    }

    pub fn start_with(root: &Path, name: &str, serve_args: &[&str]) -> Host {
        let mut h = Host {
            name: name.into(),
            dir: root.join(name),
            port: free_port(),
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            started: false,
        };
        h.restart();
        h
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        // `free_port` can race another test's daemon for the same port: pick another and
        // retry when the bind loses (only before the first start, when nobody knows the port).
        for _ in 0..5 {
            match self.try_restart() {
                Ok(()) => {
                    self.started = true;
                    return;
                }
                Err(log) if log.contains("Address already in use") && !self.started => {
                    self.port = free_port();
                }
                Err(log) => panic!("daemon {} did not start:\n{log}", self.name),
            }
        }
        panic!("daemon {} found no free port", self.name);
    }

    fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "{} already running", self.name);
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut child = Command::new(EXE)
            .args(["serve", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr(), "--name", &self.name])
            .args(&self.serve_args)
            .env(
                "UNDERSTUDY_LOG",
                std::env::var("UNDERSTUDY_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn understudy serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(self.log());
        }
        self.child = Some(child);
        self.wait_replica_store();
        Ok(())
    }

    /// A replica server opens its store in the background after "ready" (replica VMs answer
    /// "being verified" until then): wait until it is open or known unavailable.
    pub fn wait_replica_store(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.run(&["replica-server", "show", "--json"]);
            let cfg: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            let status = cfg["status"].as_str().unwrap_or("");
            let settled =
                cfg["enabled"] != true || status == "open" || status.starts_with("unavailable");
            if out.status.success() && settled {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica store of {} did not open: {status}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Clean stop (SIGTERM), waiting for exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    assert!(
                        st.success(),
                        "daemon {} exited with {st} on SIGTERM:\n{}",
                        self.name,
                        self.log()
                    );
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "daemon {} did not stop",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(EXE)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "understudy {} on {} failed ({}): {}\n--- daemon log tail ---\n{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    pub fn nbd_uri(&self, vm: &str, disk: usize) -> String {
        let v = self.json(&["vm", "show", vm]);
        v["disks"][disk]["nbd_uri"].as_str().unwrap().to_string()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Two hosts that trust each other; `replica` is a replica server.
pub fn pair(root: &Path) -> (Host, Host) {
    pair_with(root, &[])
}

/// `pair`, the primary daemon started with extra `serve` arguments.
pub fn pair_with(root: &Path, primary_args: &[&str]) -> (Host, Host) {
    pair_with_args(root, primary_args, &[])
}

/// `pair`, each daemon started with extra `serve` arguments.
pub fn pair_with_args(root: &Path, primary_args: &[&str], replica_args: &[&str]) -> (Host, Host) {
    let a = Host::start_with(root, "primary", primary_args);
    let b = Host::start_with(root, "replica", replica_args);
    trust_each_other(&a, &b);
    enable_replica_server(&b);
    (a, b)
}

/// `replica-server enable --storage <its data dir>/storage` on `b`.
pub fn enable_replica_server(b: &Host) {
    let storage = b.dir.join("storage");
    b.ok(&[
        "replica-server",
        "enable",
        "--storage",
        storage.to_str().unwrap(),
    ]);
}

pub fn trust_each_other(a: &Host, b: &Host) {
    for (from, to) in [(a, b), (b, a)] {
        let pem = from.ok(&["identity"]);
        let f = to.dir.join(format!("{}.pem", from.name));
        std::fs::write(&f, pem).unwrap();
        to.ok(&["trust", "add", f.to_str().unwrap()]);
    }
}

/// Runs a command and asserts success, returning stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads a whole export through nbdcopy into a file.
pub fn copy_out(uri: &str, to: &Path) {
    sh(Command::new("nbdcopy").arg(uri).arg(to));
}

pub fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

// ----- helpers for the fault tests (crash.rs, outage.rs, bad_input.rs) -----

/// Runs qemu-io on `target` (an NBD URI or a raw file) with the given commands; asserts success.
pub fn qemu_io_ok(target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    sh(c.arg(target))
}

/// The raw image file of disk `disk` of `vm` on the primary (`vm show --json` `disks[i].path`).
pub fn disk_path(h: &Host, vm: &str, disk: usize) -> PathBuf {
    PathBuf::from(
        h.json(&["vm", "show", vm])["disks"][disk]["path"]
            .as_str()
            .unwrap(),
    )
}

/// Point ids listed on the replica, oldest first.
pub fn point_ids(replica: &Host, vm: &str) -> Vec<u64> {
    replica
        .json(&["points", "list", vm])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

/// Exports one point (`latest` or an id) of one disk into `to`; asserts success.
pub fn export_point(replica: &Host, vm: &str, point: &str, disk: usize, to: &Path) {
    replica.ok(&[
        "points",
        "export",
        vm,
        "--point",
        point,
        "--disk",
        &disk.to_string(),
        "--to",
        to.to_str().unwrap(),
    ]);
}

/// True when the replica's newest point of `disk` is byte-equal to the primary's live disk.
pub fn latest_equals_primary(
    primary: &Host,
    replica: &Host,
    vm: &str,
    disk: usize,
    scratch: &Path,
) -> bool {
    let live = scratch.join(format!("live-{vm}-{disk}.raw"));
    let point = scratch.join(format!("latest-{vm}-{disk}.raw"));
    let _ = std::fs::remove_file(&live);
    copy_out(&primary.nbd_uri(vm, disk), &live);
    export_point(replica, vm, "latest", disk, &point);
    let same = files_equal(&live, &point);
    let _ = std::fs::remove_file(&live);
    let _ = std::fs::remove_file(&point);
    same
}

/// `replication sync`, retried while the daemon refuses transiently or the replica is still
/// coming back (each failure is printed); returns the JSON answer of the successful sync.
pub fn sync_until_ok(primary: &Host, vm: &str, attempts: usize) -> serde_json::Value {
    for i in 0..attempts {
        let out = primary.run(&["replication", "sync", vm, "--json"]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        eprintln!(
            "sync attempt {i} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "replication sync of {vm} never succeeded\n--- primary log ---\n{}",
        tail(&primary.log(), 40)
    );
}

/// `failover prepare VM` on `h`, retried while the refusal is transient (75: a client that
/// just closed is still connected to the VM's disks for a moment).
pub fn prepare_until_ok(h: &Host, vm: &str) {
    wait_until("the prepare", Duration::from_secs(30), || {
        let out = h.run(&["failover", "prepare", vm]);
        assert!(
            out.status.success() || out.status.code() == Some(75),
            "failover prepare {vm} on {}: {}",
            h.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success()
    });
}

/// The host's event log (`<data-dir>/events.log`, JSON lines).
pub fn events(h: &Host) -> Vec<serde_json::Value> {
    std::fs::read_to_string(h.dir.join("events.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A guest stand-in: a thread that keeps writing 64 KiB blocks of one random byte each at
/// 64 KiB-aligned offsets in `[0, region)` of an NBD export through qemu-io (8 writes per
/// process). Failed runs (e.g. the daemon was killed) are counted, not fatal.
pub struct PatternWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

pub const PATTERN_CHUNK: u64 = 64 << 10;

impl PatternWriter {
    pub fn start(uri: &str, region: u64, seed: u64) -> PatternWriter {
        use rand::{Rng, SeedableRng};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let uri = uri.to_string();
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let mut c = Command::new("qemu-io");
                c.args(["-f", "raw"]);
                for _ in 0..8 {
                    let chunk = rng.gen_range(0..region / PATTERN_CHUNK);
                    let pattern: u8 = rng.gen_range(1..=255);
                    c.args([
                        "-c",
                        &format!(
                            "write -q -P {pattern} {} {PATTERN_CHUNK}",
                            chunk * PATTERN_CHUNK
                        ),
                    ]);
                }
                match c.arg(&uri).output() {
                    Ok(o) if o.status.success() && o.stderr.is_empty() => ok += 8,
                    _ => {
                        failed += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            (ok, failed)
        });
        PatternWriter {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the writer; returns (acknowledged writes, failed qemu-io runs).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for PatternWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Chunks of `PATTERN_CHUNK` bytes in `[0, region)` of `image` that are not one repeated byte
/// (a torn or foreign write in a point).
pub fn torn_chunks(image: &Path, region: u64) -> Vec<u64> {
    let data = std::fs::read(image).unwrap();
    data[..region as usize]
        .chunks(PATTERN_CHUNK as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != c[0]))
        .map(|(i, _)| i as u64 * PATTERN_CHUNK)
        .collect()
}

/// `vm create VM --disk S...` on `primary`, replication to `replica` every `frequency_secs`,
/// and initial replication waited for: the common start of a replication test.
pub fn replicate(primary: &Host, replica: &Host, vm: &str, disks: &[&str], frequency_secs: u32) {
    let mut create = vec!["vm", "create", vm];
    for d in disks {
        create.extend(["--disk", d]);
    }
    primary.ok(&create);
    let freq = frequency_secs.to_string();
    primary.ok(&[
        "replication",
        "enable",
        vm,
        "--replica",
        &replica.addr(),
        "--frequency",
        &freq,
    ]);
    primary.ok(&["replication", "start", vm, "--wait"]);
}

/// Makes a 32 MiB ext4 image (`mkfs.ext4 -d`) holding `hello.txt` with `hello` and a newline,
/// imports it on `primary` as `vm` and replicates it to `replica` (hourly, started and waited
/// for): the file system real guests of the end-to-end tests mount.
pub fn replicate_ext4(scratch: &Path, primary: &Host, replica: &Host, vm: &str, hello: &str) {
    require("mkfs.ext4", "e2fsprogs");
    let files = scratch.join(format!("{vm}-files"));
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("hello.txt"), format!("{hello}\n")).unwrap();
    let image = scratch.join(format!("{vm}.raw"));
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&files)
        .arg(&image)
        .arg("32M"));
    primary.ok(&["vm", "import", vm, "--image", image.to_str().unwrap()]);
    primary.ok(&[
        "replication",
        "enable",
        vm,
        "--replica",
        &replica.addr(),
        "--frequency",
        "3600",
    ]);
    primary.ok(&["replication", "start", vm, "--wait"]);
}

/// Whether every thread of `pid` is traced (`TracerPid` set in each task's status).
fn traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .map(|s| {
                s.lines().any(|l| {
                    l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                })
            })
            .unwrap_or(true)
    })
}

/// Whether no thread of `pid` is traced any more.
fn untraced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .map(|s| s.lines().any(|l| l.trim_end() == "TracerPid:\t0"))
            .unwrap_or(true)
    })
}

/// strace attached to every thread of a daemon, injecting faults (`-e inject=...`); returns
/// once every thread is traced. Dropping it detaches (SIGINT) and waits, boundedly, until no
/// thread is traced, so later system calls run untouched.
pub struct Strace {
    child: Child,
    pid: u32,
}

impl Strace {
    pub fn attach(pid: u32, exprs: &[&str]) -> Strace {
        let args: Vec<String> = exprs
            .iter()
            .flat_map(|e| ["-e".into(), e.to_string()])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Strace::attach_args(pid, &args)
    }

    /// `attach` with strace arguments as given (e.g. `-P PATH` to trace, and so inject
    /// into, only the system calls on that file).
    pub fn attach_args(pid: u32, args: &[&str]) -> Strace {
        require("strace", "strace");
        let mut c = Command::new("strace");
        c.args(["-f", "-qq", "-o", "/dev/null"]);
        c.args(args);
        let child = c
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn strace");
        wait_until("strace to attach", Duration::from_secs(20), || traced(pid));
        Strace { child, pid }
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        // SIGINT: strace detaches from every thread (delayed calls go on) before it exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !untraced(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `replication status VM --json` on `h`.
pub fn status(h: &Host, vm: &str) -> serde_json::Value {
    h.json(&["replication", "status", vm])
}

/// `replication measure VM --json` on `h`.
pub fn measure(h: &Host, vm: &str) -> serde_json::Value {
    h.json(&["replication", "measure", vm])
}

/// The seed of a randomized test: `UNDERSTUDY_TEST_SEED`, else the clock; printed so a
/// failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("UNDERSTUDY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with UNDERSTUDY_TEST_SEED={seed})");
    seed
}

/// Asserts `out` is a refusal in one line on stderr and returns that line.
pub fn one_line_failure(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a refusal: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

/// The relationship state of `vm` on `h`, by name.
pub fn state(h: &Host, vm: &str) -> String {
    h.json(&["replication", "status", vm])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

// ----- helpers for the resynchronization tests (resync_schedule.rs, resync_during.rs) -----

/// A TCP proxy that carries the primary's bytes to the replica at most `rate` bytes per
/// second (answers unthrottled; 0: no limit): a resynchronization lasts long enough to be
/// watched, cancelled or worked beside. The rate can change while connections run
/// (`set_rate`): e.g. an initial replication at full speed, then a slow resync.
pub struct Throttle {
    port: u16,
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Throttle {
    pub fn start(to: String, rate: u64) -> Throttle {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rate = Arc::new(AtomicU64::new(rate));
        let shared = rate.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, rate: Option<Arc<AtomicU64>>| {
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 16 << 10];
                            loop {
                                match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                        // Each read's bytes take their time at the rate: an idle
                                        // connection (HTTP/2 keeps it) earns no credit for a
                                        // later burst.
                                        let rate =
                                            rate.as_ref().map_or(0, |r| r.load(Ordering::Relaxed));
                                        if rate > 0 {
                                            std::thread::sleep(Duration::from_secs_f64(
                                                n as f64 / rate as f64,
                                            ));
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
                    Some(shared.clone()),
                );
                pipe(server, client, None);
            }
        });
        Throttle { port, rate }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes per second from now on, on every connection (0: no limit).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `len` bytes of random data from `seed` (incompressible) written at offset 0 of disk 0 of
/// `vm` on `a`.
pub fn write_random(a: &Host, vm: &str, len: u64, seed: u64, scratch: &Path) {
    use rand::{Rng, SeedableRng};
    let data = scratch.join(format!("{vm}-random-{seed}"));
    let mut bytes = vec![0u8; len as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut bytes[..]);
    std::fs::write(&data, &bytes).unwrap();
    qemu_io_ok(
        &a.nbd_uri(vm, 0),
        &[&format!("write -q -s {} 0 {len}", data.display())],
    );
    std::fs::remove_file(&data).unwrap();
}

/// `vm create VM --disk SIZE`, `len` bytes of random data written at offset 0 (incompressible:
/// the resync's `Full` delta costs its size on the wire), replication through `via` (hourly),
/// the initial replication waited for, then `diverge`d: a resync has `len` bytes to send.
pub fn replicate_random(a: &Host, via: &str, vm: &str, size: &str, len: u64, scratch: &Path) {
    a.ok(&["vm", "create", vm, "--disk", size]);
    write_random(a, vm, len, len, scratch);
    a.ok(&[
        "replication",
        "enable",
        vm,
        "--replica",
        via,
        "--frequency",
        "3600",
    ]);
    a.ok(&["replication", "start", vm, "--wait"]);
    diverge(a, vm, len, len + 1, scratch);
}

/// Rewrites `[0, len)` of `vm`'s disk with other random bytes, not shipped (suspended): a
/// resync compares and finds every block of it different, so it has `len` bytes to send.
pub fn diverge(a: &Host, vm: &str, len: u64, seed: u64, scratch: &Path) {
    a.ok(&["replication", "suspend", vm]);
    write_random(a, vm, len, seed, scratch);
}

/// Every point of `vm` on the replica: its id and its disk 0 exported to `dir/<tag>-<id>.raw`.
pub fn export_points(b: &Host, vm: &str, dir: &Path, tag: &str) -> Vec<(u64, PathBuf)> {
    point_ids(b, vm)
        .into_iter()
        .map(|id| {
            let to = dir.join(format!("{tag}-{id}.raw"));
            let _ = std::fs::remove_file(&to);
            export_point(b, vm, &id.to_string(), 0, &to);
            (id, to)
        })
        .collect()
}

/// `cmp -s a b`: the two files are byte-identical.
pub fn cmp(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// The points are exactly those of `before`, each bit-identical (`cmp`).
pub fn assert_points_identical(b: &Host, vm: &str, dir: &Path, before: &[(u64, PathBuf)]) {
    let ids: Vec<u64> = before.iter().map(|(id, _)| *id).collect();
    assert_eq!(point_ids(b, vm), ids, "the replica's point ids changed");
    for (id, file) in before {
        let now = dir.join(format!("after-{id}.raw"));
        let _ = std::fs::remove_file(&now);
        export_point(b, vm, &id.to_string(), 0, &now);
        assert!(cmp(file, &now), "point {id} changed");
        std::fs::remove_file(&now).unwrap();
    }
}
