//! Host identity, trust store and the mutual-TLS 1.3 HTTP/2 links between Understudy daemons.
//!
//! Every host has a per-host CA and a leaf certificate ([`identity`]); peers trust each other's
//! CA through a directory of PEM files ([`trust`]); [`tls`] turns both into rustls configs
//! (TLS 1.3 only, client certificates required, ring provider pinned); [`server`] accepts
//! peers over HTTP/2 and [`client`] keeps one multiplexed HTTP/2 connection per peer;
//! [`body`] streams large request bodies with bounded memory.
//!
//! This crate never interprets request contents (deltas, control calls) and never touches VM
//! disks: it moves authenticated bytes and says clearly why it could not.

pub mod body;
pub mod client;
mod crashsafe;
mod der;
pub mod error;
pub mod identity;
mod pem;
pub mod server;
pub mod tls;
pub mod trust;

pub use body::{
    body_channel, empty, full, BodySender, BodyWriter, BoxBody, BoxError, BODY_WRITER_BUFFER_BYTES,
    DEFAULT_BODY_CHANNEL_CHUNKS,
};
pub use client::{read_body, ClientTls, Peer, CONNECT_TIMEOUT, SEND_BUFFER_BYTES};
pub use error::TransportError;
pub use identity::{load_or_create, peer_name, Identity};
pub use server::{
    serve, serve_with, PeerInfo, ServeOptions, FIRST_BYTE_TIMEOUT, HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, STREAM_WINDOW_BYTES,
};
pub use tls::{client_config, server_config, ScopeRefusal, TlsContext};
pub use trust::{derived_name, fingerprint, name_matches, Scope, TrustStore, TrustedCert};

/// Re-exported so callers name the same versions we use.
pub use hyper;
pub use rustls;
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
