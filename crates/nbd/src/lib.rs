//! The NBD protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) as a
//! pure codec, and a blocking server on worker threads on top of the [`BlockBackend`] trait.
//!
//! This crate owns the wire protocol and nothing else: it never knows about replication,
//! tracking or journals. Every length and offset received from a client is validated against
//! the export size and the bounds in [`limits`] before any backend call.
//!
//! Layout: [`codec`] (bytes in, typed requests out, no I/O), [`NbdServer`] (sockets and
//! threads), [`file`](mod@file) and [`memory`] (backends), [`registry`] (export names).

mod backend;
pub mod codec;
pub mod file;
pub mod limits;
pub mod memory;
pub mod registry;
mod server;

pub use backend::{BlockBackend, ExportRegistry, Extent};
pub use codec::error::{NbdErrno, ProtocolError};
pub use file::FileBackend;
pub use memory::MemoryBackend;
pub use registry::StaticRegistry;
pub use server::{ExportObserver, NbdServer, Op, RequestObserver, ServerConfig};
