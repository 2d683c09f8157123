//! rustls configurations for peer links, and [`TlsContext`], the handle that keeps them in
//! step with the trust store while the daemon runs.
//!
//! Policy, stated once here: TLS 1.3 only, the ring provider passed explicitly (never a
//! process-default provider), ALPN `h2`, client certificates required and verified against the
//! trust store, servers verified with normal name/IP checks, no session resumption (every
//! connection is fully authenticated against the current trust; links are long-lived so the
//! cost is nil). This module never opens sockets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ServerConfig};

use crate::identity::Identity;
use crate::trust::{TrustStore, TrustedCert};
use crate::TransportError;

/// The only application protocol we speak.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider for everything in this crate: ring, chosen explicitly.
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// SHA-256 via the ring provider's TLS 1.3 suite (keeps this crate free of extra hash deps).
pub(crate) fn sha256(data: &[u8]) -> Vec<u8> {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    match suite.tls13() {
        Some(s) => s.common.hash_provider.hash(data).as_ref().to_vec(),
        // TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite by definition.
        None => unreachable!("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite"),
    }
}

/// Server config: TLS 1.3 only, client certificate required and verified against `trust` (plus
/// our own CA), ALPN `h2`.
pub fn server_config(
    identity: &Identity,
    trust: &TrustStore,
) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = Arc::new(provider());
    let roots = Arc::new(trust.root_store(identity)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client config: TLS 1.3 only, presents our leaf, verifies servers against `trust` (plus our
/// own CA) with hostname/IP checks, ALPN `h2`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustStore,
) -> Result<Arc<ClientConfig>, TransportError> {
    let roots = trust.root_store(identity)?;
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Identity + trust store + the configs built from them, rebuilt when trust changes.
///
/// Trust changes take effect for *new* connections without a restart: [`TlsContext::add_trust`]
/// rebuilds at once, and every call to [`TlsContext::server_config`] /
/// [`TlsContext::client_config`] (made once per new connection) notices files added or removed
/// in the trust directory by another process (e.g. the CLI) and rebuilds. Established
/// connections keep the trust they were authenticated with.
#[derive(Clone)]
pub struct TlsContext {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Identity,
    trust: TrustStore,
    current: Mutex<Built>,
}

struct Built {
    /// Trust files the configs were built from.
    snapshot: Vec<PathBuf>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("identity", &self.inner.identity.name)
            .field("trust", &self.inner.trust.dir())
            .finish()
    }
}

impl TlsContext {
    /// Builds both configs; fails on an unusable identity or a damaged trust file.
    pub fn new(identity: Identity, trust: TrustStore) -> Result<Self, TransportError> {
        let built = build(&identity, &trust)?;
        Ok(Self {
            inner: Arc::new(Inner {
                identity,
                trust,
                current: Mutex::new(built),
            }),
        })
    }

    /// This host's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The trust store.
    pub fn trust(&self) -> &TrustStore {
        &self.inner.trust
    }

    /// Server config for a new connection, reflecting the trust directory as it is now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.refresh_quietly();
        self.lock().server.clone()
    }

    /// Client config for a new connection, reflecting the trust directory as it is now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.refresh_quietly();
        self.lock().client.clone()
    }

    /// Trusts the certificate(s) in `pem_file` and rebuilds the configs.
    pub fn add_trust(&self, pem_file: &Path) -> Result<TrustedCert, TransportError> {
        let added = self.inner.trust.add(pem_file)?;
        self.refresh()?;
        Ok(added)
    }

    /// Rebuilds the configs if the trust directory changed. `Ok(true)` if it rebuilt. On error
    /// the previous configs stay in force.
    pub fn refresh(&self) -> Result<bool, TransportError> {
        let snapshot = self.inner.trust.snapshot()?;
        if self.lock().snapshot == snapshot {
            return Ok(false);
        }
        let built = build(&self.inner.identity, &self.inner.trust)?;
        *self.lock() = built;
        tracing::info!(
            trusted = snapshot.len(),
            "trust store changed; TLS configs rebuilt"
        );
        Ok(true)
    }

    fn refresh_quietly(&self) {
        if let Err(e) = self.refresh() {
            // Keep serving with the last good trust; the damaged file is named in `e`.
            tracing::warn!(error = %e, "trust store unreadable; keeping the previous trust");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Built> {
        // A panic while holding this lock cannot leave `Built` half-written (it is replaced
        // whole), so a poisoned lock is still consistent.
        self.inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn build(identity: &Identity, trust: &TrustStore) -> Result<Built, TransportError> {
    // Snapshot first: a file added while we build makes the next call rebuild again.
    let snapshot = trust.snapshot()?;
    Ok(Built {
        snapshot,
        server: server_config(identity, trust)?,
        client: client_config(identity, trust)?,
    })
}
