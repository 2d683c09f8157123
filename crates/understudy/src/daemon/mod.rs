//! The host daemon (`understudy serve`): opens the catalog and the VMs, serves their disks
//! over NBD, runs one replication task per replicating VM, accepts replicas from peers when
//! it is a replica server, and answers the CLI on `<data-dir>/api.sock`.
//!
//! [`Shared`] is the one owner of host state; the API and the peer routes go through it.
//! The data path (NBD worker threads → tracker) never waits on anything here.

mod api;
mod catalog;
mod durable;
mod events;
mod heap;
mod heartbeat;
mod host;
mod peer_client;
mod primary;
mod qemu_img;
mod replica_host;
mod session;
mod shipper;
mod upload;
mod vms;

pub use host::Shared;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;

use crate::ServeArgs;

/// How long shutdown waits for each replication task to stop before going on.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn serve(data_dir: &Path, args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let _lock = host::lock_data_dir(&data_dir)?;
    heap::configure();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("understudy")
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(&data_dir, args))
}

async fn run(data_dir: &Path, args: ServeArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let shared = Shared::open(data_dir, &args).await?;

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
    host::set_mode(&api_path, 0o660)?;

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

    wait_for_signal().await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    shared.stop_replication(TASK_STOP_TIMEOUT).await;
    let _ = api_server.await;
    let _ = peer_server.await;
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.shutdown_disks()).await??;
    let _ = std::fs::remove_file(&api_path);
    shared
        .events
        .emit(events::DAEMON_STOPPED, None, "info", "stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
