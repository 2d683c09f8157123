//! The local API between the CLI and its daemon (JSON over HTTP/1.1 on `<data-dir>/api.sock`).
//! These structs are also what `--json` prints, so their field names are a public contract.

use serde::{Deserialize, Serialize};

/// Error body of every non-2xx API answer. `transient` means "retry later" (CLI exit 75).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default)]
    pub transient: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: String,
    pub disk_sizes_bytes: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportVm {
    pub name: String,
    /// Absolute paths of images in any format `qemu-img` reads.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    pub index: u32,
    pub size_bytes: u64,
    pub export_name: String,
    /// Accepted as is by qemu-io, qemu-img, nbdinfo, nbdcopy and fio --ioengine=nbd.
    pub nbd_uri: String,
    pub path: String,
    /// Whether this disk is part of the VM's replication set.
    #[serde(default)]
    pub replicated: bool,
    /// A ready qemu `-blockdev` argument for this disk with NBD `reconnect-delay`, so that a
    /// daemon restart (crash or upgrade) never reaches the guest as an I/O error. Attach it
    /// with `-device virtio-blk-pci,drive=<node-name>`.
    #[serde(default)]
    pub qemu_blockdev: String,
    /// The node name in `qemu_blockdev` (`-device virtio-blk-pci,drive=<it>`).
    #[serde(default)]
    pub qemu_node_name: String,
    /// The same for libvirt: a `<disk type='network'>` element with `<reconnect delay='N'/>`.
    #[serde(default)]
    pub libvirt_xml: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub disks: Vec<DiskInfo>,
    pub created_at: String,
    /// "Primary", "Replica" or "None".
    pub replication_role: String,
    /// Why the VM could not be opened at the daemon's start (image missing or resized, state
    /// locked, I/O error); its disks are not served until that is repaired and the daemon
    /// restarted. Every other VM keeps serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
    /// Unix socket of the VM's QEMU guest agent channel (`vm set --guest-agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_freeze_hook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_thaw_hook: Option<String>,
    /// The command template `failover start NAME --start` runs (`vm set --launch`). `vm set`
    /// of a replica VM (which has no `vm show` on its replica host) answers with the name,
    /// role `Replica`, no disks and this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<String>,
    /// The addresses a failover of this VM gives it (`vm set --failover-network`), normalized;
    /// on the replica host the one in force (set there, else the primary's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_network: Option<String>,
    /// A failover's cloud-init NoCloud seed disk (`failover-seed.md`), served read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<SeedInfo>,
}

/// The seed disk of a failover (`NAME-seed`, `NAME-test-seed`): read-only, attach it next to
/// the failover's disks and cloud-init in the guest applies the failover network settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedInfo {
    pub export_name: String,
    pub nbd_uri: String,
    pub size_bytes: u64,
    pub path: String,
    /// A ready qemu `-blockdev` argument (read-only, with `reconnect-delay`).
    pub qemu_blockdev: String,
    pub qemu_node_name: String,
    /// A libvirt `<disk type='network'>` element with `<readonly/>`.
    pub libvirt_xml: String,
}

/// `vm set`: how the guest is quiesced for application-consistent points. Each field given
/// changes that setting; an empty hook string removes the hook.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetVm {
    pub vm: String,
    #[serde(default)]
    pub guest_agent: Option<String>,
    #[serde(default)]
    pub no_guest_agent: bool,
    #[serde(default)]
    pub pre_freeze_hook: Option<String>,
    #[serde(default)]
    pub post_thaw_hook: Option<String>,
    /// The command template `failover start --start` runs (`docs/formats/catalog.md`,
    /// `launch/<vm>`); also for a replica VM.
    #[serde(default)]
    pub launch: Option<String>,
    #[serde(default)]
    pub no_launch: bool,
    /// The addresses a failover gives the VM (`failover-seed.md`); also for a replica VM,
    /// where it overrides the primary's.
    #[serde(default)]
    pub failover_network: Option<String>,
    #[serde(default)]
    pub no_failover_network: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    #[serde(rename = "zstd")]
    Zstd,
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnableReplication {
    pub vm: String,
    /// `HOST:PORT` of the replica host's daemon.
    pub replica: String,
    pub frequency_secs: u32,
    pub compression: Compression,
    /// Disk indexes to replicate; `None` means all.
    pub disks: Option<Vec<u32>>,
    /// Recovery history (`--recovery-history`, `--app-consistent-every`,
    /// `--keep-every-point-for`); `None`: the replica keeps its newest 64 points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryPolicy>,
}

/// What a replica keeps (`replication enable/set`): the newest point, `recovery_history`
/// hourly points, and every point of the last `keep_every_point_for_secs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPolicy {
    /// Hourly points besides the newest one, 0-24.
    pub recovery_history: u32,
    /// Hours between application-consistent points, 1-12 (needs `recovery_history > 0`).
    #[serde(default)]
    pub app_consistent_every_hours: Option<u32>,
    /// Every point of this many last seconds is kept (0: none), at most 24 h.
    #[serde(default)]
    pub keep_every_point_for_secs: u64,
}

/// `replication set`: each field given changes that setting; the others stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetReplication {
    pub vm: String,
    #[serde(default)]
    pub frequency_secs: Option<u32>,
    #[serde(default)]
    pub compression: Option<Compression>,
    #[serde(default)]
    pub recovery_history: Option<u32>,
    #[serde(default)]
    pub app_consistent_every_hours: Option<u32>,
    #[serde(default)]
    pub keep_every_point_for_secs: Option<u64>,
    /// `--auto-resynchronize on|off`: whether a required resynchronization starts by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resynchronize: Option<bool>,
    /// `--resynchronize-window HH:MM-HH:MM` (UTC; it may wrap midnight), or `none` to remove it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynchronize_window: Option<String>,
    /// `--lag-warning-cycles N`: health turns Warning after N cycles without a successful one
    /// (`docs/health.md`); 0 goes back to the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_warning_cycles: Option<u32>,
}

/// `POST /v1/vms/{vm}/replication/resynchronize`: now, or at `at_unix_ns`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resynchronize {
    #[serde(default)]
    pub at_unix_ns: Option<u64>,
}

/// `POST /v1/vms/{vm}/replication/start` (an empty body: over the network, now).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartReplication {
    /// Raw images on the replica host to start from (`--use-existing`), one per replicated
    /// disk in disk order; empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub use_existing: Vec<String>,
    /// Start at this time instead of now (`--at`); not with `use_existing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_unix_ns: Option<u64>,
    /// Write point 1 to this directory (`--to-media`, `initial-media.md`) instead of sending
    /// it; alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_media: Option<String>,
}

/// `POST /v1/vms/{vm}/replication/import-media` on the replica host (`initial-media.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportMedia {
    /// The media directory, absolute.
    pub from: String,
}

/// Replication state names follow Hyper-V Replica's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    ReadyForInitialReplication,
    InitialReplicationInProgress,
    Replicating,
    Suspended,
    ResynchronizationRequired,
    /// A resynchronization was scheduled (`replication resume --resynchronize --at TIME`) and
    /// has not started yet.
    WaitingForStartResynchronize,
    /// A resynchronization is running: the replica's newest point is being brought back in
    /// line with the primary.
    Resynchronizing,
    /// Replica side: receiving points.
    Replica,
    /// Replica side: a test failover (`failover start --test`) serves `NAME-test` over a
    /// point; replication goes on.
    TestFailoverInProgress,
    /// Replica side: `failover start` serves writable disks over a point; nothing is received
    /// until `failover complete` or `failover stop`.
    FailedOverWaitingCompletion,
    /// The failover completed: the VM runs on this host (now its primary); no replication
    /// until `replication reverse`.
    FailedOver,
    /// Primary side: `failover prepare` fenced the VM and its last change committed on the
    /// replica; the replica may fail over with no data loss.
    PreparedForFailover,
    /// Primary side: the replica host failed the VM over without this host (an unplanned
    /// failover); no cycle runs and the VM's disks are fenced here.
    FencedAfterFailover,
}

/// Why a VM needs resynchronization, named once for `replication status` and events: each
/// value is one row of Hyper-V Replica's table of resynchronization triggers (see
/// `docs/resync-triggers.md`). The id (`snake_case`) is stable; monitoring may match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncCondition {
    /// A disk image was written while the daemon (and so the VM) was stopped.
    ModifiedWhileOff,
    /// A disk image was replaced by another file, or by an older copy of itself (its mtime
    /// went back), while the daemon was stopped: a restore or a snapshot revert.
    RevertedToOlder,
    /// The change tracking state (activity log) could not be written: tracking goes on in
    /// memory but would not survive a crash.
    TrackingWriteFailed,
    /// The image's storage reported a write-back error (a failed fsync of the image).
    StorageWriteFailed,
    /// The daemon stopped uncleanly and its activity log (or its heartbeat) cannot say what
    /// changed since.
    UncleanStopUntracked,
    /// The replica holds points this primary never shipped, or another generation's.
    ReplicaOutOfSequence,
    /// The replica is behind what it already committed: restored from an older copy.
    ReplicaRestoredOlder,
    /// A delta stored on the replica failed verification (an invalid delta in its journal).
    ReplicaInvalidDelta,
    /// The replica's copy is damaged otherwise (an interrupted fold, a base not yet repaired).
    ReplicaDamaged,
    /// The replica mirrors the primary's state; the primary's status names the condition.
    ReportedByPrimary,
    /// A reason this daemon does not classify (a record written by another version).
    Other,
}

impl ResyncCondition {
    /// The condition of Hyper-V Replica's table it corresponds to.
    pub fn hyperv_condition(self) -> &'static str {
        match self {
            ResyncCondition::ModifiedWhileOff => "Modify VHD when VM is turned off",
            ResyncCondition::RevertedToOlder => "Reverting the volume to an older point in time",
            ResyncCondition::TrackingWriteFailed | ResyncCondition::StorageWriteFailed => {
                "Write failure to tracking log file"
            }
            ResyncCondition::UncleanStopUntracked => "Tracking log file is not closed gracefully",
            ResyncCondition::ReplicaOutOfSequence
            | ResyncCondition::ReplicaRestoredOlder
            | ResyncCondition::ReplicaInvalidDelta
            | ResyncCondition::ReplicaDamaged => "Out-of-sequence or Invalid log file is applied",
            ResyncCondition::ReportedByPrimary => "Resynchronization required on the primary",
            ResyncCondition::Other => "Resynchronization required",
        }
    }

    /// The stable id, as serialized.
    pub fn id(self) -> &'static str {
        match self {
            ResyncCondition::ModifiedWhileOff => "modified_while_off",
            ResyncCondition::RevertedToOlder => "reverted_to_older",
            ResyncCondition::TrackingWriteFailed => "tracking_write_failed",
            ResyncCondition::StorageWriteFailed => "storage_write_failed",
            ResyncCondition::UncleanStopUntracked => "unclean_stop_untracked",
            ResyncCondition::ReplicaOutOfSequence => "replica_out_of_sequence",
            ResyncCondition::ReplicaRestoredOlder => "replica_restored_older",
            ResyncCondition::ReplicaInvalidDelta => "replica_invalid_delta",
            ResyncCondition::ReplicaDamaged => "replica_damaged",
            ResyncCondition::ReportedByPrimary => "reported_by_primary",
            ResyncCondition::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

/// One reason health is not Normal (docs/health.md lists the kinds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReason {
    /// Stable id of the rule (`suspended`, `cycles_missed`, `resync_required`, ...).
    pub kind: String,
    /// The reason in words.
    pub reason: String,
    /// RFC 3339 UTC time the reason started (when the daemon first saw it if it cannot know
    /// better, e.g. a state entered before the daemon started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl HealthReason {
    pub fn new(kind: &str, reason: impl Into<String>) -> HealthReason {
        HealthReason {
            kind: kind.to_string(),
            reason: reason.into(),
            since: None,
        }
    }

    pub fn since_unix_ns(mut self, ns: u64) -> HealthReason {
        self.since = Some(crate::time::rfc3339_from_unix_ns(ns));
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// `replication status` while `Resynchronizing`: how far the resynchronization got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Bytes the resynchronization covers (its cut's disks).
    pub bytes_total: u64,
    /// Bytes of it done (read, compared or sent) so far.
    pub bytes_done: u64,
    /// Blocks compared with the replica so far (0 for an engine that sends every block).
    pub blocks_compared: u64,
    /// Bytes put on the wire for it so far (after compression).
    pub bytes_sent: u64,
    /// `bytes_done` per second since the current pass began (0 until it moved).
    pub rate_bytes_per_sec: u64,
    /// Seconds left at that rate (`None` until there is a rate).
    pub eta_secs: Option<u64>,
    /// RFC 3339 UTC time it started (on this daemon run, when it restarted since).
    pub started_at: String,
    /// Bytes of the disks the persisted cursor records as compared: a restart, a suspend or
    /// a failed attempt goes on from there (`docs/formats/resync.md`, "The cursor").
    #[serde(default)]
    pub cursor_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicationStatus {
    pub vm: String,
    /// "Primary" or "Replica".
    pub role: String,
    pub state: ReplicationState,
    pub health: Health,
    /// Why health is not Normal: each reason in words, with its stable kind and the time it
    /// started.
    pub health_reasons: Vec<HealthReason>,
    /// Why a resynchronization is required, scheduled or running (its reason, when it has one),
    /// or why the VM is fenced (`FencedAfterFailover`).
    pub resync_reason: Option<String>,
    /// Which resynchronization trigger `resync_reason` is (a stable id), and the Hyper-V
    /// Replica condition it corresponds to; both present exactly when `resync_reason` names
    /// a resynchronization (not a fence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_condition: Option<ResyncCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_condition_hyperv: Option<String>,
    /// The other host (`HOST:PORT` on the primary, the primary's name on the replica).
    pub peer: String,
    pub frequency_secs: u32,
    pub compression: Compression,
    pub disks: Vec<u32>,
    /// RFC 3339 time of the cut of the newest point the replica has committed.
    pub last_replication_time: Option<String>,
    pub last_replication_unix_ns: Option<u64>,
    /// Bytes changed on the primary and not yet committed on the replica.
    pub pending_bytes: u64,
    /// Sequence number of the newest committed point.
    pub last_seq: u64,
    pub generation: u64,
    /// Initial replication (or current cycle) progress.
    pub progress: Option<Progress>,
    pub last_error: Option<String>,
    /// The recovery-history policy (`None`: the newest 64 points are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryPolicy>,
    /// On the replica host: what it holds of this VM (`None` on the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaFacts>,
    /// Primary: whether a required resynchronization starts by itself
    /// (`replication set --auto-resynchronize`).
    #[serde(default)]
    pub auto_resynchronize: bool,
    /// Primary: the window auto-resynchronization starts in, `HH:MM-HH:MM UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynchronize_window: Option<String>,
    /// Primary: the admin's lag threshold in cycles (`replication set --lag-warning-cycles`);
    /// absent: the default (`docs/health.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_warning_cycles: Option<u32>,
    /// `WaitingForStartResynchronize`: when it starts (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_start_time: Option<String>,
    /// `Resynchronizing` (primary): its progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncProgress>,
}

/// What a replica host holds of one VM, reported by `replication status` there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaFacts {
    /// Recovery points listed (`points list`).
    pub points_kept: u64,
    /// Bytes of the retained deltas as stored in the journal (base images not counted).
    pub journal_bytes: u64,
    /// Seconds since the newest point's cut: how far behind the primary this copy is now.
    pub newest_point_age_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measure {
    pub vm: String,
    pub state: ReplicationState,
    pub health: Health,
    pub measuring_since: String,
    pub successful_cycles: u64,
    pub failed_cycles: u64,
    pub average_delta_bytes: u64,
    pub maximum_delta_bytes: u64,
    /// Bytes sent on the wire (after compression).
    pub sent_bytes_total: u64,
    /// Bytes of the blocks that differed from the replica and were shipped by
    /// resynchronizations (Hyper-V's "Resynchronized Bytes"), since the daemon started.
    #[serde(default)]
    pub resynchronized_bytes_total: u64,
    /// Bytes compared with the replica by resynchronizations, since the daemon started.
    #[serde(default)]
    pub resync_compared_bytes_total: u64,
    /// JSON bytes of the resynchronizations' hash requests and answers, since the daemon
    /// started (with `sent_bytes_total`, what a resync costs on the wire).
    #[serde(default)]
    pub resync_hash_bytes_total: u64,
    pub average_latency_ms: u64,
    pub maximum_latency_ms: u64,
    /// Longest guest-write pause at a cut.
    pub maximum_cut_pause_us: u64,
    /// Old data copied aside because the guest overwrote blocks of a cut before they were
    /// shipped (copy-before-write), since the daemon started: the cost of consistent cuts.
    #[serde(default)]
    pub cbw_copied_bytes_total: u64,
    /// Of those, bytes that did not fit the tracker's bounded memory pool and went to its
    /// spill file (`<state>/disk.cbw`): a sign the guest outruns the shipper.
    #[serde(default)]
    pub cbw_spilled_bytes_total: u64,
    /// Uploads continued from where the replica stood after the transport broke, instead of
    /// starting the cut over (docs/formats/peer-protocol.md, "Resuming an interrupted upload").
    #[serde(default)]
    pub resumed_uploads_total: u64,
    /// Bytes the replica already held at those resumes: not sent again.
    #[serde(default)]
    pub resumed_bytes_total: u64,
    /// Application-consistent points committed since the daemon started.
    #[serde(default)]
    pub app_consistent_points_total: u64,
    /// Application-consistent cuts that fell back to crash-consistent (agent absent, slow or
    /// refusing; hook failed or timed out), since the daemon started.
    #[serde(default)]
    pub app_consistent_failures_total: u64,
    pub last_replication_time: Option<String>,
    pub pending_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointInfo {
    /// The point's sequence number; `points export --point ID` takes it.
    pub id: u64,
    /// RFC 3339 time of the point's cut on the primary.
    pub cut_time: String,
    /// The same as `cut_time` (kept for scripts written before `cut_time`).
    pub created_at: String,
    pub cut_time_unix_ns: u64,
    /// "Latest", "Standard", "Hourly", "AppConsistent", "Resynchronized" or "Initial"
    /// (`docs/formats/replica-store.md`, "Recovery history").
    pub kind: String,
    /// "crash" or "application".
    pub consistency: String,
    /// The delta that made the point: "Initial", "Incremental" or "Full".
    pub delta_kind: String,
    /// Uncompressed bytes of DATA frames in the point's delta (after merges: of the merged
    /// delta).
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Bytes the point's delta takes on the replica's storage.
    pub stored_bytes: u64,
    /// What holds the point against retention (e.g. "2 open views"); empty when nothing.
    #[serde(default)]
    pub pinned_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportPoint {
    pub vm: String,
    /// "latest" or a point id.
    pub point: String,
    pub disk: u32,
    /// Absolute destination path; written as a sparse raw image.
    pub to: String,
    /// A name the caller chose to follow the export with `GET /v1/progress/{id}` while this
    /// call runs (absent from older clients: untracked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_id: Option<String>,
}

/// `backup NAME`: write every disk of a replica point into a directory, with a manifest
/// (`docs/formats/backup.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupPoint {
    pub vm: String,
    /// "latest" or a point id.
    pub point: String,
    /// Absolute destination directory.
    pub to: String,
    /// raw, qcow2, vmdk or vhdx.
    pub format: String,
    /// Copy only the blocks changed since this point (qcow2 over the backup of that point).
    #[serde(default)]
    pub incremental_from: Option<u64>,
    /// A name the caller chose to follow the backup with `GET /v1/progress/{id}`.
    #[serde(default)]
    pub progress_id: Option<String>,
}

/// `points serve`: serve a recovery point read-only over the daemon's NBD socket (pinned).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServePoint {
    pub vm: String,
    /// "latest" or a point id.
    pub point: String,
    /// One disk; `None` serves every disk of the point.
    #[serde(default)]
    pub disk: Option<u32>,
    /// Served for this many seconds, then released; `None` until `points unserve`.
    #[serde(default)]
    pub for_secs: Option<u64>,
}

/// One disk of a served point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedDisk {
    pub index: u32,
    pub size_bytes: u64,
    /// `<vm>@<point>-<disk>`: never the name of a primary VM's export (`<vm>-<disk>`).
    pub export_name: String,
    /// Read-only; what `qemu-img`, `nbdcopy`, `nbdinfo` and `qemu-io` take as is.
    pub nbd_uri: String,
    /// A `qemu-system-x86_64 -drive` value that attaches it read-only.
    pub qemu_drive: String,
    /// A `qemu-system-x86_64 -blockdev` value that attaches it read-only.
    pub qemu_blockdev: String,
}

/// A served (and therefore pinned) point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedPoint {
    pub vm: String,
    pub point: PointInfo,
    pub disks: Vec<ServedDisk>,
    pub served_since: String,
    /// When `--for` releases it; `None`: until `points unserve`.
    pub expires_at: Option<String>,
    pub expires_unix_ns: Option<u64>,
}

/// `points unserve`: one point, or (`point: None`) every served point of the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnservePoint {
    pub vm: String,
    #[serde(default)]
    pub point: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaServerConfig {
    pub enabled: bool,
    pub storage: String,
    /// Peer certificate names allowed to replicate here; `*` allows every trusted peer.
    pub allow: Vec<String>,
    pub trust_group: Option<String>,
    /// The id in the store's marker (`docs/formats/replica-store.md`), recorded at enable:
    /// a later start refuses a storage directory without that marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
    /// Health's monitoring interval on this host, seconds (`--monitoring-interval`, 1 h to
    /// 7 d); `None`: `serve --monitoring-interval`, 12 h by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring_interval_secs: Option<u64>,
    /// What the daemon says of the store now ("open", "opening", or why it is unavailable).
    /// Reported by `GET /v1/replica-server`; never stored, ignored when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub listen: String,
    pub data_dir: String,
    pub nbd_socket: String,
    pub version: String,
}

/// Answer of `replication sync`: the point the replica committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncResult {
    pub vm: String,
    pub seq: u64,
    pub cut_time_unix_ns: u64,
    pub delta_bytes: u64,
    pub sent_bytes: u64,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Stable event id, documented in docs/events.md.
    pub id: u32,
    pub time: String,
    pub vm: Option<String>,
    pub level: String,
    pub message: String,
}

/// `POST /v1/vms/{vm}/failover/start`: the point (`latest` or an id) and whether it is a test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverStart {
    #[serde(default = "latest")]
    pub point: String,
    #[serde(default)]
    pub test: bool,
    /// Run the VM's launch command (`vm set --launch`) once the disks are served.
    #[serde(default)]
    pub start: bool,
}

fn latest() -> String {
    "latest".into()
}

/// `POST /v1/vms/{vm}/failover/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailoverStop {
    #[serde(default)]
    pub test: bool,
}

/// A failover served on the replica host: the VM's disks at `point`, writable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverInfo {
    /// The replica VM failed over.
    pub vm: String,
    /// The name its disks are served as (`vm show` takes it): the VM's own name, or
    /// `NAME-test` for a test failover.
    pub served_as: String,
    pub point: u64,
    pub test: bool,
    /// One writable `nbd_uri` per disk.
    pub disks: Vec<DiskInfo>,
    /// With `--start`: what became of the launch command (`exited 0`, `started (pid N)`, or
    /// why it failed, with the end of its output). The failover stays either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched: Option<String>,
    /// The launch command failed (`launched` says why); the CLI exits 1.
    #[serde(default)]
    pub launch_failed: bool,
    /// The cloud-init seed disk, when the VM has failover network settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<SeedInfo>,
}

/// `POST /v1/vms/{vm}/replication/reverse`: after a planned failover to this host, replicate the
/// VM back to its old primary (which becomes the replica, its disks the base).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReverseReplication {
    pub vm: String,
    pub replica: String,
    pub frequency_secs: u32,
    #[serde(default = "zstd")]
    pub compression: Compression,
}

fn zstd() -> Compression {
    Compression::Zstd
}
