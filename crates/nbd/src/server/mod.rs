//! The NBD server: an accept thread per listening socket, a thread per connection for the
//! handshake (under a deadline), then a few worker threads per connection for transmission
//! (see `conn`). Connections are bounded; shutdown stops accepting, wakes every blocked
//! socket call and joins every thread. This module owns threads and sockets; it must never
//! interpret protocol bytes (the codec does) nor touch export data (backends do).

mod conn;
mod handshake;
mod observe;
mod stream;

pub use observe::{ExportObserver, Op, RequestObserver};

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{debug, info, warn};

use self::handshake::ConnError;
use self::stream::{wait_readable, Listener, Stream};
use crate::backend::ExportRegistry;
use crate::limits::{
    CONNECTIONS_MAX_DEFAULT, HANDSHAKE_TIMEOUT_DEFAULT, THREAD_STACK_BYTES,
    WORKERS_PER_CONNECTION_DEFAULT, WORKERS_PER_CONNECTION_MAX,
};

/// Pause after an accept error other than "nothing pending" (EMFILE, ENOBUFS), so a full
/// descriptor table does not turn the accept loop into a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Server tuning. The defaults suit the daemon; tests shorten the handshake timeout.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Time a client has to complete the whole handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once (handshaking or transmitting); more are closed at accept.
    pub max_connections: usize,
    /// Worker threads per connection = requests in flight per connection (clamped to 1..=64).
    pub workers_per_connection: usize,
    /// Told of every request answered (monitoring); `None`: nothing is measured.
    pub observer: Option<Arc<dyn RequestObserver>>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            workers_per_connection: WORKERS_PER_CONNECTION_DEFAULT,
            observer: None,
        }
    }
}

struct ConnEntry {
    /// A clone of the client socket, to wake the connection's threads at shutdown.
    control: Stream,
    thread: Option<JoinHandle<()>>,
    /// The export being served, once the handshake has chosen one.
    export: Arc<Mutex<Option<String>>>,
}

struct Inner {
    registry: Arc<dyn ExportRegistry>,
    cfg: ServerConfig,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
}

/// A running server. Dropping it shuts it down like [`NbdServer::shutdown`].
pub struct NbdServer {
    inner: Arc<Inner>,
    wake: UnixStream,
    accept_thread: Option<JoinHandle<()>>,
    /// The Unix socket we created, with its inode, removed at shutdown if still ours.
    unix_socket: Option<(PathBuf, u64, u64)>,
    local_addr: Option<SocketAddr>,
}

impl NbdServer {
    /// Listens on a Unix socket at `path` (replacing a stale socket file left by a dead
    /// server, refusing if a live server answers there or the path is not a socket) and
    /// starts accepting.
    pub fn serve_unix(
        path: &Path,
        registry: Arc<dyn ExportRegistry>,
        cfg: ServerConfig,
    ) -> io::Result<NbdServer> {
        let listener = NbdServer::bind_unix(path)?;
        NbdServer::serve_unix_listener(listener, Some(path), registry, cfg)
    }

    /// Binds the Unix socket at `path` (as [`NbdServer::serve_unix`]) without accepting yet:
    /// clients that connect queue in its backlog until a server starts on it.
    pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
        remove_stale_socket(path)?;
        UnixListener::bind(path)
    }

    /// Accepts on a Unix socket that is already bound and listening: one from
    /// [`NbdServer::bind_unix`] (`owned_path`: removed on stop) or one handed over by systemd
    /// socket activation (`None`: left in place, so clients keep queueing in its backlog
    /// while the daemon restarts).
    pub fn serve_unix_listener(
        listener: UnixListener,
        owned_path: Option<&Path>,
        registry: Arc<dyn ExportRegistry>,
        cfg: ServerConfig,
    ) -> io::Result<NbdServer> {
        listener.set_nonblocking(true)?;
        let mut server = NbdServer::start(Listener::Unix(listener), registry, cfg, None)?;
        match owned_path {
            Some(path) => {
                let meta = std::fs::metadata(path)?;
                server.unix_socket = Some((path.to_owned(), meta.dev(), meta.ino()));
                info!(socket = %path.display(), "NBD server listening");
            }
            None => info!("NBD server accepting on an inherited socket"),
        }
        Ok(server)
    }

    /// Listens on TCP at `addr` (port 0 picks a free port; see [`NbdServer::local_addr`]).
    pub fn serve_tcp(
        addr: SocketAddr,
        registry: Arc<dyn ExportRegistry>,
        cfg: ServerConfig,
    ) -> io::Result<NbdServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let server = NbdServer::start(Listener::Tcp(listener), registry, cfg, Some(local))?;
        info!(addr = %local, "NBD server listening");
        Ok(server)
    }

    /// The bound TCP address (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Connections currently open (handshaking or transmitting).
    pub fn connection_count(&self) -> usize {
        self.inner.conns.lock().len()
    }

    /// Connections currently using export `name` (a VM still running on its disks).
    pub fn export_connections(&self, name: &str) -> usize {
        let conns = self.inner.conns.lock();
        conns
            .values()
            .filter(|c| c.export.lock().as_deref() == Some(name))
            .count()
    }

    /// Closes every connection serving export `name` (for example before the export is
    /// fenced or replaced); returns how many were closed. Requests in flight finish their
    /// backend call. Remove the export from the registry first: then no client, even one in
    /// the middle of its handshake, keeps or gains access to the old backend.
    pub fn close_export_connections(&self, name: &str) -> usize {
        let conns = self.inner.conns.lock();
        let mut closed = 0;
        for c in conns.values() {
            if c.export.lock().as_deref() == Some(name) {
                c.control.shutdown(Shutdown::Both);
                closed += 1;
            }
        }
        closed
    }

    /// Stops accepting, closes every connection (requests in flight finish their backend
    /// call, their replies may be lost) and joins all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn start(
        listener: Listener,
        registry: Arc<dyn ExportRegistry>,
        mut cfg: ServerConfig,
        local_addr: Option<SocketAddr>,
    ) -> io::Result<NbdServer> {
        cfg.workers_per_connection = cfg
            .workers_per_connection
            .clamp(1, WORKERS_PER_CONNECTION_MAX);
        let inner = Arc::new(Inner {
            registry,
            cfg,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let (wake, wake_rx) = UnixStream::pair()?;
        let accept_inner = Arc::clone(&inner);
        let accept_thread = thread::Builder::new()
            .name("nbd-accept".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || accept_loop(&listener, &wake_rx, &accept_inner))?;
        Ok(NbdServer {
            inner,
            wake,
            accept_thread: Some(accept_thread),
            unix_socket: None,
            local_addr,
        })
    }

    fn stop(&mut self) {
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // If the write fails the accept thread is already gone; joining returns at once.
        let _ = (&self.wake).write_all(&[1]);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let conns: Vec<ConnEntry> = self.inner.conns.lock().drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.control.shutdown(Shutdown::Both);
        }
        for mut c in conns {
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
        if let Some((path, dev, ino)) = self.unix_socket.take() {
            // Only remove the file if it is still the socket we bound (not a successor's).
            if std::fs::metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
        info!("NBD server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a socket file nobody listens on; refuses a live socket or a non-socket file.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server is already listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

fn accept_loop(listener: &Listener, wake: &UnixStream, inner: &Arc<Inner>) {
    loop {
        match wait_readable(listener, wake) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!("poll on the NBD listener failed: {e}");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
            }
        }
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        // Drain every pending connection before polling again.
        loop {
            match listener.accept() {
                Ok((stream, peer)) => admit(inner, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    warn!("accepting an NBD connection failed: {e}");
                    thread::sleep(ACCEPT_ERROR_BACKOFF);
                    break;
                }
            }
        }
    }
}

fn admit(inner: &Arc<Inner>, stream: Stream, peer: String) {
    // The lock is held until the entry is inserted, so the thread's own removal (which takes
    // the lock) can never run before the insertion.
    let mut conns = inner.conns.lock();
    if conns.len() >= inner.cfg.max_connections {
        warn!(
            peer,
            max = inner.cfg.max_connections,
            "NBD connection refused: too many connections"
        );
        return;
    }
    let control = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            warn!(peer, "NBD connection dropped: {e}");
            return;
        }
    };
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let thread_inner = Arc::clone(inner);
    let export = Arc::new(Mutex::new(None));
    let thread_export = Arc::clone(&export);
    let spawned = thread::Builder::new()
        .name(format!("nbd-{id}"))
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || {
            serve_connection(stream, &thread_inner, id, &peer, &thread_export);
            thread_inner.conns.lock().remove(&id);
        });
    match spawned {
        Ok(t) => {
            conns.insert(
                id,
                ConnEntry {
                    control,
                    thread: Some(t),
                    export,
                },
            );
        }
        Err(e) => warn!(
            conn = id,
            "NBD connection dropped: cannot start its thread: {e}"
        ),
    }
}

fn serve_connection(
    mut stream: Stream,
    inner: &Inner,
    id: u64,
    peer: &str,
    export: &Mutex<Option<String>>,
) {
    let deadline = Instant::now() + inner.cfg.handshake_timeout;
    let registry = inner.registry.as_ref();
    let session = match handshake::handshake(&mut stream, registry, deadline, export) {
        Ok(Some(session)) => session,
        Ok(None) | Err(ConnError::Eof) => {
            debug!(conn = id, peer, "NBD client left during the handshake");
            return;
        }
        Err(e) => {
            warn!(conn = id, peer, "NBD handshake failed: {e}");
            return;
        }
    };
    debug!(conn = id, peer, ?session, "NBD transmission started");
    let observer = inner
        .cfg
        .observer
        .as_ref()
        .map(|o| o.export(&session.export_name));
    match conn::transmit(
        stream,
        &session,
        inner.cfg.workers_per_connection,
        id,
        observer,
    ) {
        Ok(()) | Err(ConnError::Eof) => debug!(conn = id, "NBD client disconnected"),
        Err(e) if inner.stopping.load(Ordering::SeqCst) => {
            debug!(conn = id, "NBD connection closed at shutdown: {e}")
        }
        Err(e) => warn!(conn = id, export = %session.export_name, "NBD connection closed: {e}"),
    }
}
