//! The peer protocol between a primary daemon and a replica daemon (JSON control calls over
//! HTTPS/HTTP/2 with mutual TLS; delta bodies use the format in docs/formats/delta.md).
//!
//! Routes (all under `/v1/replicas/{vm}`):
//! - `POST .../hello` [`Hello`] → [`HelloReply`]: create or find the replica VM.
//! - `PUT  .../deltas/{seq}` delta bytes → [`DeltaReply`] once the point is durable.
//! - `GET  .../state` → [`HelloReply`].
//! - `GET  .../deltas/{seq}/partial` → [`PartialReply`]: an interrupted upload the replica kept
//!   (v2); resumed by a `PUT .../deltas/{seq}` with [`RESUME_FROM_HEADER`] and
//!   [`HEADER_CHECKSUM_HEADER`].

use serde::{Deserialize, Serialize};

use crate::ids::{Generation, Seq, VmName};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerDisk {
    pub index: u32,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub vm: VmName,
    /// Random id of this replication relationship (hex); both sides derive the delta key
    /// from it, so a delta of another relationship never verifies.
    pub replication_id: String,
    pub generation: Generation,
    pub primary_host: String,
    pub disks: Vec<PeerDisk>,
    /// The relationship's recovery-history policy (absent from older primaries, and when
    /// none was set: the replica then keeps what it has). See `peer-protocol.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<crate::HistoryPolicy>,
    /// The primary's relationship state (absent from older primaries): the replica shows the
    /// same state. See `peer-protocol.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::ReplicationState>,
    /// Reverse replication (`replication reverse`): this hello comes from the host a VM was
    /// failed over to, and asks the old primary, prepared for that failover at point `seq` of
    /// generation `generation`, to become the replica of the new relationship (`generation`
    /// + 1) with its own disks as the base: no initial replication. See `peer-protocol.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseOf>,
    /// The primary's `vm set --failover-network` value, normalized (absent: none, or an older
    /// primary): the addresses a failover on the replica host gives the VM. See
    /// `peer-protocol.md` and `failover-seed.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_network: Option<String>,
    /// `replication start --use-existing PATH...`: raw images on the replica host, one per
    /// disk in the order of `disks`, that the replica adopts as point 1 of a new replica VM
    /// (marked damaged until the primary's compare arrives). See `peer-protocol.md`, "An
    /// existing copy in the hello".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_existing: Option<Vec<String>>,
    /// The relationship's frequency, seconds (absent from older primaries): the replica host
    /// judges missed cycles with it (`docs/health.md`). See `peer-protocol.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_secs: Option<u32>,
}

/// The relationship a reverse hello turns around, and the point both hosts hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseOf {
    pub generation: Generation,
    pub seq: Seq,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloReply {
    pub vm: String,
    pub latest_seq: Seq,
    /// The history-clock cut time of the point `latest_seq` (`peer-protocol.md`, "Sequencing
    /// and the key"): the primary adopts the point it had in flight only if the cut matches.
    /// Absent when the replica has no point, and from an older host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_cut_unix_ns: Option<u64>,
    pub generation: Generation,
    /// Set when the replica found its copy damaged (a corrupt journal file, ...).
    #[serde(default)]
    pub damage: Option<String>,
    /// The old primary's answer to a reverse hello (`peer-protocol.md`, "Reverse
    /// replication in the hello"); absent otherwise, and from an older host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseAnswer>,
}

/// Most byte ranges a reverse answer lists (in all disks); beyond, the old primary asks for
/// every block instead. A range is at most ~30 bytes of JSON, so the answer stays well inside
/// the 1 MiB a peer's answer may take (`PEER_REPLY_MAX_BYTES`), and a disk written in that
/// many separate places since its last point is better sent whole.
pub const REVERSE_RANGES_MAX: usize = 16_384;

/// How the old primary's disks stand against the new primary's point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseAnswer {
    /// Prepared for that failover: the disks hold the point exactly.
    pub planned: bool,
    /// Unplanned: the blocks this host had not shipped, per disk, as `[offset, len]`.
    #[serde(default)]
    pub differs: Vec<DiskRanges>,
    /// Unplanned, and this host's tracking cannot say what differs: every block must be sent.
    #[serde(default)]
    pub full_send: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRanges {
    pub index: u32,
    pub ranges: Vec<[u64; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeltaReply {
    pub seq: Seq,
    pub cut_time_unix_ns: u64,
    pub stored_bytes: u64,
}

/// Request header of a resumed upload: the delta offset its body starts at (decimal).
pub const RESUME_FROM_HEADER: &str = "understudy-resume-from";
/// Request header of a resumed upload: the delta's header checksum (64 hex digits).
pub const HEADER_CHECKSUM_HEADER: &str = "understudy-header-checksum";

/// An interrupted upload the replica kept: the delta whose header checksum is
/// `header_checksum` (64 hex), of which it consumed the first `received_bytes` bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartialReply {
    pub seq: Seq,
    pub header_checksum: String,
    pub received_bytes: u64,
}

/// Error body of a refused peer call. `code` is stable and machine-readable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerError {
    /// e.g. "out_of_sequence", "corrupt_delta", "not_allowed", "unknown_vm", "replica_disabled".
    pub code: String,
    pub error: String,
    #[serde(default)]
    pub expected_seq: Option<Seq>,
}

/// Most chunks one resync hash request names (`resync.md`): 4 GiB of 1 MiB chunks, and an
/// answer (~35 bytes of JSON per hash) far inside the 1 MiB a peer's answer may take.
pub const HASH_CHUNKS_MAX: usize = 4096;

/// `POST /v1/replicas/{vm}/resync/hashes` (`docs/formats/resync.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashRequest {
    /// The replica's point to hash: its newest.
    pub seq: Seq,
    pub disk: u32,
    /// The compare key, 64 hex digits.
    pub key: String,
    /// 1048576 or 4096.
    pub chunk_bytes: u64,
    pub offsets: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashReply {
    pub seq: Seq,
    pub disk: u32,
    /// One per offset, in order: `"z"` (all zeros) or 32 hex digits.
    pub hashes: Vec<String>,
}
