//! Wire and API types shared by the Understudy daemon and its CLI, and by the two daemons of a
//! replication pair. Plain serde data: no I/O, no tokio, no server code.
//!
//! Field names are part of the command-line contract (`--json` output) and of the peer
//! protocol: add fields freely (with `#[serde(default)]` on anything a peer may not send),
//! never rename one.

pub mod api;
pub mod ids;
pub mod peer;
pub mod time;

pub use api::*;
pub use ids::{DiskIndex, Generation, Seq, VmName, DISKS_PER_VM_MAX, VM_NAME_MAX};
