//! The systemd notification protocol (`sd_notify(3)`), without libsystemd: one datagram per
//! message to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket). `READY=1` once the daemon serves, `STOPPING=1` when it stops, and `WATCHDOG=1`
//! every half `$WATCHDOG_USEC` from a task of the daemon's runtime, so a wedged runtime stops
//! the pings and systemd restarts the daemon (`WatchdogSec=` in packaging/understudy.service).
//!
//! The variables are taken out of the environment when read: the commands the daemon runs
//! (qemu-img, launch commands) must not talk to systemd in its name.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Shortest watchdog ping interval honoured: a `WatchdogSec=` below 2 s would have the daemon
/// ping more often than a loaded 2-core host can promise to schedule it.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(500);

/// Where to send notifications, and how often to ping the watchdog; empty when not run by
/// systemd with `Type=notify`.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads (and removes) `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Call before
    /// any thread is started.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            use std::os::unix::ffi::OsStrExt;
            let bytes = s.as_bytes();
            match bytes.first() {
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(PathBuf::from(&s))),
                _ => {
                    tracing::warn!("NOTIFY_SOCKET={s:?} is neither a path nor @abstract; ignored");
                    None
                }
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .map(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()))
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(|u| (Duration::from_micros(u) / 2).max(MIN_PING_INTERVAL));
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        Notifier { socket, watchdog }
    }

    /// Sends `msg` (e.g. `READY=1`); failures are logged, never fatal.
    pub fn send(&self, msg: &str) {
        let Some(target) = &self.socket else { return };
        if let Err(e) = send_to(target, msg.as_bytes()) {
            tracing::warn!("cannot notify systemd ({msg}): {e}");
        }
    }

    /// Pings the watchdog from a task of the current runtime until the process ends, when
    /// systemd asked for it.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>) {
        let Some(every) = self.watchdog else { return };
        let me = self.clone();
        tracing::info!(
            interval_ms = every.as_millis() as u64,
            "pinging the systemd watchdog"
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.send("WATCHDOG=1");
            }
        });
    }
}

fn send_to(target: &Target, msg: &[u8]) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target {
        Target::Path(p) => sock.send_to(msg, p).map(|_| ()),
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr).map(|_| ())
        }
    }
}
