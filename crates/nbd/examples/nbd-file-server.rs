//! `nbd-file-server SOCKET NAME=FILE [NAME=FILE...] [--read-only] [--workers N]`
//!
//! Serves raw image files over NBD on a Unix socket until SIGINT/SIGTERM or stdin closes
//! (whichever the caller finds easier), for interop tests and benchmarks. Prints
//! `listening on SOCKET` on stdout once the socket accepts connections.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use understudy_nbd::{FileBackend, NbdServer, ServerConfig, StaticRegistry};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-file-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut socket: Option<PathBuf> = None;
    let mut exports = Vec::new();
    let mut read_only = false;
    let mut cfg = ServerConfig::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--read-only" => read_only = true,
            "--workers" => {
                let n = args.next().ok_or("--workers needs a number")?;
                cfg.workers_per_connection = n.parse().map_err(|_| format!("bad --workers {n}"))?;
            }
            _ if socket.is_none() => socket = Some(PathBuf::from(arg)),
            _ => {
                let (name, file) = arg
                    .split_once('=')
                    .ok_or(format!("expected NAME=FILE, got {arg}"))?;
                exports.push((name.to_owned(), PathBuf::from(file)));
            }
        }
    }
    let socket = socket.ok_or(
        "usage: nbd-file-server SOCKET NAME=FILE [NAME=FILE...] [--read-only] [--workers N]",
    )?;
    if exports.is_empty() {
        return Err("at least one NAME=FILE export is needed".into());
    }
    let registry = Arc::new(StaticRegistry::new());
    for (name, file) in exports {
        let backend =
            FileBackend::open(&file, read_only).map_err(|e| format!("{}: {e}", file.display()))?;
        registry.add_with_description(name, file.display().to_string(), Arc::new(backend));
    }
    let server = NbdServer::serve_unix(&socket, registry, cfg)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    println!("listening on {}", socket.display());
    let _ = io::stdout().flush();
    // Run until stdin reaches EOF (or a signal kills us: the socket file is then stale and
    // the next start replaces it).
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        if line.is_err() {
            break;
        }
    }
    server.shutdown();
    Ok(())
}
