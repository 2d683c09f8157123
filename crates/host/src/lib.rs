//! The host: everything `understudy serve` does except parsing its command line and answering
//! the local API. It opens the catalog and the VMs, serves their disks over NBD, runs one
//! replication task per replicating VM, accepts replicas from peers when it is a replica
//! server, and owns every change of host state ([`Shared`]).
//!
//! Imports point one way: the binary's API → this crate → `relationship` (the pure state
//! machine of a replication relationship) and the storage crates. Errors leave this crate
//! typed ([`error::HostError`]); only the API layer maps them to HTTP statuses.

pub mod activation;
pub mod backup;
pub mod catalog;
pub mod config;
mod durable;
pub mod errfmt;
pub mod error;
pub mod events;
pub mod guest;
pub mod health;
pub mod heap;
pub mod heartbeat;
pub mod launch;
pub mod media;
pub mod metrics;
pub mod owner;
pub mod peer_client;
pub mod primary;
pub mod progress;
pub mod qemu_img;
pub mod replica_host;
pub mod resync;
pub mod resync_cursor;
pub mod seed;
pub mod shared;
pub mod shipper;
pub mod upload;
pub mod vms;

pub use config::HostConfig;
pub use shared::Shared;
