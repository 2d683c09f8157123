//! What the host needs from `understudy serve`'s command line, without the command line: the
//! binary fills it in from its arguments.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Address for peer (replication) traffic, HOST:PORT.
    pub listen: String,
    /// This host's name (certificate subject); the machine's host name when absent.
    pub name: Option<String>,
    /// Certificate, key and issuing CA (PEM) to use instead of the generated identity.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// Memory per disk for copy-before-write copies.
    pub cbw_memory: u64,
    /// Tests only: cap on each epoch's copy-before-write spill file.
    pub cbw_spill_max: Option<u64>,
    /// Seconds the primary waits for a replica's answer to hello, for upload progress, and for
    /// the answer once a delta was sent (docs/limits.md).
    pub hello_timeout: u64,
    pub upload_idle_timeout: u64,
    pub answer_timeout: u64,
    /// Tests only: recovery points kept per replica VM instead of 64.
    pub retain_points: Option<u64>,
    /// HOST:PORT to serve Prometheus metrics on (`GET /metrics`, plain HTTP); `None`: off.
    pub metrics_listen: Option<String>,
    /// Health's monitoring interval when the replica-server settings give none (seconds).
    pub monitoring_interval_secs: u64,
    /// Tests only: rotate `events.log` at this size instead of 16 MiB.
    pub events_file_max: Option<u64>,
}
