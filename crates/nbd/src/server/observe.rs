//! Monitoring hooks: the server tells an observer of every request it answers (the daemon's
//! Prometheus metrics). Cheap by design: the observer is asked once per connection for the
//! export's handle, then each request costs one call with its operation and its time.

use std::sync::Arc;
use std::time::Duration;

use crate::codec::request::Command;

/// An NBD operation as counted by an observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Trim = 3,
    Cache = 4,
    WriteZeroes = 5,
    BlockStatus = 6,
}

impl Op {
    pub const COUNT: usize = 7;
    pub const ALL: [Op; Op::COUNT] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::Cache,
        Op::WriteZeroes,
        Op::BlockStatus,
    ];

    /// The name used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Cache => "cache",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
        }
    }

    pub(crate) fn of(command: &Command) -> Option<Op> {
        Some(match command {
            Command::Read => Op::Read,
            Command::Write { .. } => Op::Write,
            Command::Flush => Op::Flush,
            Command::Trim { .. } => Op::Trim,
            Command::Cache => Op::Cache,
            Command::WriteZeroes { .. } => Op::WriteZeroes,
            Command::BlockStatus { .. } => Op::BlockStatus,
            Command::Disconnect => return None,
        })
    }
}

/// Told of the requests of every connection ([`crate::ServerConfig::observer`]).
pub trait RequestObserver: Send + Sync {
    /// Called once per connection when the handshake chose `export`.
    fn export(&self, export: &str) -> Arc<dyn ExportObserver>;
}

/// Told of each request of one connection: its operation and the time from reading it to
/// sending its reply (errors included).
pub trait ExportObserver: Send + Sync {
    fn request(&self, op: Op, elapsed: Duration);
}

impl std::fmt::Debug for dyn RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestObserver")
    }
}
