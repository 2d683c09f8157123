//! The NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md) as a
//! pure codec, and a blocking server on worker threads on top of the [`BlockBackend`] trait.
//!
//! This crate owns the wire protocol and nothing else: it never knows about replication,
//! tracking or journals. Every length and offset received from a client is validated against
//! the export size and the bounds in [`limits`] before any backend call.

mod backend;
pub use backend::{BlockBackend, Extent, ExportRegistry};
