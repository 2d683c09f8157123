//! The host daemon (`understudy serve`): opens the catalog and the VMs, serves their disks
//! over NBD, runs one replication task per replicating VM, accepts replicas from peers when
//! it is a replica server, and answers the CLI on `<data-dir>/api.sock`.
//!
//! This module is only the wiring: the runtime, the sockets, the signals. The host itself is
//! the `host` crate ([`Shared`]); the local API is `api.rs`.

use host::{events, heap, replica_host, shared as host_state, HostConfig, Shared};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;

use crate::api;
use crate::notify::Notifier;

/// How long shutdown waits for each replication task to stop before going on.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn serve(data_dir: &Path, args: HostConfig) -> anyhow::Result<()> {
    init_logging();
    // Before any thread starts: it takes systemd's variables out of the environment.
    let notifier = Arc::new(Notifier::from_env());
    // Images, journals, the catalog (it holds the replication keys) and identity keys are for
    // the daemon's user (and group, to reach the sockets): files 0640 at most, directories
    // 0750; the catalog is tightened to 0600 when opened.
    // SAFETY: umask only changes this process's file-creation mask; no memory is involved.
    unsafe { libc::umask(0o027) };
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    restrict_data_dir(&data_dir)?;
    let _lock = host_state::lock_data_dir(&data_dir)?;
    heap::configure();
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("understudy")
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(run(&data_dir, args, notifier));
    // Blocking work stuck on hung storage (a replica fsync) must not keep the process from
    // exiting: the clean-stop work above is done, give such threads a moment and go.
    rt.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    result
}

/// Logs through `tracing` to stderr. Run by systemd (`JOURNAL_STREAM` set: stderr is the
/// journal), without colors and timestamps: the journal stamps each line itself.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).without_time().init();
    } else {
        builder.init();
    }
}

/// How long a stopping daemon waits for blocking tasks still running after its clean stop.
const RUNTIME_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A data directory made by an older version (or by hand) may be open to every local user:
/// close it to others. The catalog holds the replication keys: owner only.
fn restrict_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data_dir)?.permissions().mode();
    if mode & 0o007 != 0 {
        host_state::set_mode(data_dir, mode & 0o750)?;
    }
    let catalog = data_dir.join("catalog.redb");
    if catalog.exists() {
        host_state::set_mode(&catalog, 0o600)?;
    }
    Ok(())
}

async fn run(data_dir: &Path, args: HostConfig, notifier: Arc<Notifier>) -> anyhow::Result<()> {
    let stop_signal = watch_stop_signals();
    let mut reload_signal = watch_reload_signal();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    // Bound before anything else starts: a taken port fails the start with one line.
    let metrics_listener = match &args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?,
        ),
        None => None,
    };
    let shared = Shared::open(data_dir, &args).await?;
    replica_host::spawn_retention(shared.clone());

    // Local API on a Unix socket; refuse to steal it from a live daemon.
    let api_path = data_dir.join("api.sock");
    if tokio::net::UnixStream::connect(&api_path).await.is_ok() {
        bail!(
            "another understudy daemon is serving {}",
            api_path.display()
        );
    }
    let _ = std::fs::remove_file(&api_path);
    let api_listener = tokio::net::UnixListener::bind(&api_path)
        .with_context(|| format!("binding {}", api_path.display()))?;
    // The API controls the host: owner and group only.
    host_state::set_mode(&api_path, 0o660)?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let peer_shared = shared.clone();
    let mut peer_stop = stop_rx.clone();
    let peer_server = tokio::spawn(transport::serve(
        listener,
        shared.tls.clone(),
        move |req, peer| replica_host::handle(peer_shared.clone(), req, peer),
        async move {
            let _ = peer_stop.wait_for(|s| *s).await;
        },
    ));
    let api_shared = shared.clone();
    let mut api_stop = stop_rx.clone();
    let api_server = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = api_stop.wait_for(|s| *s) => break,
                accepted = api_listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let s = api_shared.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let s = s.clone();
                            async move { Ok::<_, std::convert::Infallible>(api::handle(s, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }
        }
    });

    let metrics_server = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            // Tests bind port 0 and read the port from this line.
            tracing::info!("serving metrics on http://{addr}/metrics");
        }
        tokio::spawn(crate::metrics::serve(
            listener,
            shared.clone(),
            stop_rx.clone(),
        ))
    });

    shared.events.emit(
        events::DAEMON_STARTED,
        None,
        "info",
        &format!(
            "understudy {} serving as {} on {} (NBD {})",
            env!("CARGO_PKG_VERSION"),
            shared.host_name,
            args.listen,
            shared.nbd_socket.display()
        ),
    );
    // Tell whoever started us that we are ready (tests and the demo wait for this line).
    println!(
        "ready: api {} nbd {}",
        api_path.display(),
        shared.nbd_socket.display()
    );
    // systemd (Type=notify): the NBD socket, the API and the peer port are bound and every VM
    // is open or marked broken. The watchdog pings come from this runtime: if it wedges they
    // stop and systemd restarts the daemon.
    notifier.send("READY=1");
    notifier.spawn_watchdog();
    let reload_shared = shared.clone();
    let reload_args = args.clone();
    tokio::spawn(async move {
        while reload_signal.recv().await.is_some() {
            tracing::info!("SIGHUP: re-reading the TLS certificate, key and trust");
            let s = reload_shared.clone();
            let a = reload_args.clone();
            match tokio::task::spawn_blocking(move || s.reload_tls(&a)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(
                    "reload refused, the previous certificate stays in force: {}",
                    host::errfmt::one_line(&e)
                ),
                Err(e) => tracing::error!("reload task failed: {e}"),
            }
        }
    });

    stop_signal.await;
    notifier.send("STOPPING=1");
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    shared.stop_replication(TASK_STOP_TIMEOUT).await;
    let _ = api_server.await;
    let _ = peer_server.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.shutdown_disks()).await??;
    let _ = std::fs::remove_file(&api_path);
    shared
        .events
        .emit(events::DAEMON_STOPPED, None, "info", "stopped cleanly");
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd starts services at 1024 soft, a
/// replica with many VMs and a host serving many NBD connections need more). Capped at
/// `/proc/sys/fs/nr_open`, the most the kernel accepts when the hard limit is unlimited.
/// Failure is logged, never fatal: the daemon works within whatever it has (the replica's
/// journal descriptor cache sizes itself from the soft limit).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            "cannot read RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let before = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        if let Some(nr_open) = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        {
            target = nr_open;
        }
    }
    if target <= before {
        tracing::info!(
            soft = before,
            hard = lim.rlim_max,
            "open file limit (RLIMIT_NOFILE) already at its hard limit"
        );
        return;
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard one
    // needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::info!(
            soft_before = before,
            soft = target,
            hard = lim.rlim_max,
            "raised the open file limit (RLIMIT_NOFILE) to the hard limit"
        );
    } else {
        tracing::warn!(
            soft = before,
            hard = lim.rlim_max,
            "cannot raise the open file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// SIGHUP (`systemctl reload`, `ExecReload=`): one item per signal received. Watching starts
/// before the daemon says it is ready, so an early reload is never the default action (death).
fn watch_reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    // Several SIGHUPs while one reload runs make one more reload.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => tracing::error!("cannot watch SIGHUP (reload): {e}"),
    }
    rx
}

/// Watches SIGTERM and SIGINT from the moment it is called: a stop that arrives right after
/// the daemon said it is ready is a clean stop, never the default action (death).
fn watch_stop_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot watch stop signals: {e}");
                std::future::pending::<()>().await;
            }
        }
    }
}
