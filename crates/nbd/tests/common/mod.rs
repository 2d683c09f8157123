//! Shared helpers for the integration tests: an in-process server on a temporary Unix socket
//! over sparse files, a check that a real tool is installed, and a minimal raw NBD client
//! for sending malformed traffic.

#![allow(dead_code)] // each test binary uses a different subset

pub mod raw;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use understudy_nbd::{FileBackend, NbdServer, ServerConfig, StaticRegistry};

/// A running server with its exports' files, removed on drop.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub registry: Arc<StaticRegistry>,
    pub server: Option<NbdServer>,
}

impl TestServer {
    /// Serves one sparse file per `(name, size_bytes)`; `read_only` exports end in "-ro".
    pub fn start(exports: &[(&str, u64)], cfg: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Arc::new(StaticRegistry::new());
        for (name, size) in exports {
            let path = dir.path().join(format!("{name}.img"));
            let f = std::fs::File::create(&path).expect("create image");
            f.set_len(*size).expect("size image");
            let ro = name.ends_with("-ro");
            let backend = FileBackend::open(&path, ro).expect("open image");
            registry.add(*name, Arc::new(backend));
        }
        let socket = dir.path().join("nbd.sock");
        let server = NbdServer::serve_unix(&socket, registry.clone(), cfg).expect("serve");
        TestServer {
            dir,
            socket,
            registry,
            server: Some(server),
        }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn server(&self) -> &NbdServer {
        self.server.as_ref().expect("server running")
    }
}

/// Short timeouts so the malformed-input tests finish quickly.
pub fn test_config() -> ServerConfig {
    ServerConfig {
        handshake_timeout: Duration::from_millis(700),
        ..ServerConfig::default()
    }
}

/// Fails the test (never skips it) when a tool is missing, naming the package to install.
pub fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is required by this test: install it with `apt-get install -y {package}`"
    );
}

/// Runs a tool, failing the test with its output when it fails; returns stdout.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn same_files(a: &Path, b: &Path) {
    let (x, y) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}
