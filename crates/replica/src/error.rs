//! The replica store's error type: every refusal has a named variant with its context (VM,
//! path, seq) so that the daemon can map it to a status and to "Resynchronization required".

use std::io;
use std::path::PathBuf;

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid delta: {0}")]
    Delta(#[from] delta::DeltaError),
    #[error("delta incomplete: no verified footer after {received_bytes} bytes")]
    Incomplete { received_bytes: u64 },
    #[error("invalid disk table: {0}")]
    InvalidDisks(&'static str),
    /// `why`: how the VM here differs from what was asked (sizes named).
    #[error("VM {vm_id} already exists {why}")]
    AlreadyExists { vm_id: String, why: String },
    #[error("no VM {vm_id}")]
    NotFound { vm_id: String },
    #[error("VM {vm_id} was removed")]
    Removed { vm_id: String },
    #[error("delta is for VM {got}, this is VM {expected}")]
    WrongVm { expected: String, got: String },
    #[error("delta has generation {got}, the VM is at generation {expected}")]
    WrongGeneration { expected: u64, got: u64 },
    #[error("generation may only grow: at {current}, asked {requested}")]
    GenerationRegression { current: u64, requested: u64 },
    #[error("delta's disk table differs from the VM's")]
    DiskMismatch,
    #[error("out of sequence: expected seq {expected}, got {got}")]
    OutOfSequence { expected: u64, got: u64 },
    #[error("delta has more than {max} frames")]
    TooManyFrames { max: u64 },
    #[error("no recovery point {seq}")]
    NoSuchPoint { seq: u64 },
    #[error("the blocks changed between points {from} and {to} are not known: point {from} is older than the base image (retention folded its changes), or newer than {to}")]
    ChangesUnknown { from: u64, to: u64 },
    #[error("no disk {disk}")]
    NoSuchDisk { disk: u32 },
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("invalid recovery history: {0}")]
    InvalidHistory(String),
    #[error("replica data damaged: {0}")]
    Damaged(String),
    #[error(
        "the replica of {vm_id} is damaged ({damage}): only a full resynchronization can follow"
    )]
    VmDamaged { vm_id: String, damage: String },
    #[error("a previous write to this incoming delta failed: {0}")]
    ReceiveFailed(String),
    #[error("the replica of {vm_id} is being verified (opening the store); try again shortly")]
    Verifying { vm_id: String },
    #[error("replica storage {dir} does not exist (is its file system mounted?)")]
    StorageMissing { dir: PathBuf },
    #[error("{dir} is not a replica store: it has no store marker (is the right file system mounted there? `replica-server enable --storage` sets a store up)")]
    NoStoreMarker { dir: PathBuf },
    #[error("store marker {path}: {reason}")]
    BadStoreMarker { path: PathBuf, reason: String },
    #[error("the replica's index is full ({indexed} of {max} frames indexed, this delta has {frames}); retention folds older points, try again")]
    IndexFull { indexed: u64, max: u64, frames: u64 },
    #[error("failover overlay {dir}: {reason}")]
    Overlay { dir: PathBuf, reason: String },
    #[error("cannot adopt the disk images of {vm_id}: {reason}")]
    Adopt { vm_id: String, reason: String },
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

impl ReplicaError {
    /// True when the operation failed for lack of a resource (file descriptors, memory) or
    /// was interrupted, not because of anything wrong with the data: worth retrying later,
    /// never a reason to record damage, quarantine a file or refuse further deltas.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicaError::Io { source, .. } => crate::fds::is_transient_io(source),
            ReplicaError::Delta(delta::DeltaError::Io(source)) => {
                crate::fds::is_transient_io(source)
            }
            ReplicaError::Verifying { .. } | ReplicaError::IndexFull { .. } => true,
            _ => false,
        }
    }

    /// Wraps an I/O error with the operation and path it concerns.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| ReplicaError::Io { op, path, source }
    }
}
