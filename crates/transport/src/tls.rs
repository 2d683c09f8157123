//! rustls configurations for peer links, and [`TlsContext`], the handle that keeps them in
//! step with the trust store while the daemon runs.
//!
//! Policy, stated once here: TLS 1.3 only, the ring provider passed explicitly (never a
//! process-default provider), ALPN `h2`, client certificates required; a peer's chain must end at
//! a CA trusted for its role (primary for clients of our peer port, replica for servers we
//! dial) and pinned to the peer's name, and servers also pass normal name/IP checks; no session resumption (every
//! connection is fully authenticated against the current trust; links are long-lived so the
//! cost is nil). This module never opens sockets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::identity::Identity;
use crate::trust::{Anchor, Scope, TrustStore, TrustedCert};
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

/// Why a certificate that chains to a trusted CA is still refused: the CA is not trusted for
/// the peer's role, or not pinned to the peer's name, or the replica is not the one this
/// relationship was set up with. Carried inside `rustls::Error` so that the client's error
/// says it (see [`crate::TransportError::PeerOutOfScope`]).
#[derive(Debug)]
pub struct ScopeRefusal(pub String);

impl std::fmt::Display for ScopeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScopeRefusal {}

fn scope_refusal(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(ScopeRefusal(
        msg,
    )))))
}

/// Which side of a link a peer is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A replica we dial (server certificate).
    Replica,
    /// A primary dialling our peer port (client certificate).
    Primary,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Self::Replica => "replica",
            Self::Primary => "primary",
        }
    }

    fn granted(self, a: &Anchor) -> bool {
        match self {
            Self::Replica => a.replica,
            Self::Primary => a.primary,
        }
    }
}

/// The scope checks that follow a chain verified against anchor `a`: role, then name pin,
/// then (replicas only) the name this relationship expects.
fn check_scope(
    a: &Anchor,
    role: Role,
    name: Option<&str>,
    expect: Option<&str>,
) -> Result<(), rustls::Error> {
    let fp = &a.fingerprint[..16.min(a.fingerprint.len())];
    if !role.granted(a) {
        return Err(scope_refusal(format!(
            "its CA ({fp}…) is not trusted to identify a {} (`understudy trust add FILE --as {}` \
             if it should be)",
            role.word(),
            role.word()
        )));
    }
    let Some(name) = name else {
        return Err(scope_refusal(
            "the certificate names no host (no CN, no DNS name)".to_owned(),
        ));
    };
    if !a.allows_name(name) {
        return Err(scope_refusal(format!(
            "it is issued for {name:?} by a CA ({fp}…) that is pinned to {:?}, not to that name",
            a.names.as_deref().unwrap_or_default()
        )));
    }
    if let Some(expected) = expect {
        if expected != name {
            return Err(scope_refusal(format!(
                "it identifies {name:?}, but this relationship's replica is {expected:?}"
            )));
        }
    }
    Ok(())
}

/// Verifies primaries (client certificates on our peer port): the chain must end at a CA
/// trusted as a primary and pinned to the certificate's name.
#[derive(Debug)]
struct PinnedClientVerifier {
    anchors: Vec<(Anchor, Arc<dyn ClientCertVerifier>)>,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedClientVerifier {
    fn new(anchors: &[Anchor], provider: &Arc<CryptoProvider>) -> Result<Self, TransportError> {
        let mut all = RootCertStore::empty();
        let mut out = Vec::new();
        for a in anchors {
            let mut one = RootCertStore::empty();
            one.add(a.cert.clone())
                .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
            if a.primary {
                all.add(a.cert.clone())
                    .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(one), provider.clone())
                .build()
                .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
            out.push((a.clone(), v));
        }
        Ok(Self {
            anchors: out,
            hints: all.subjects(),
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// The anchor a client chain verifies against within scope, or the most telling error.
    fn anchor_of(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<&Anchor, rustls::Error> {
        let name = crate::identity::peer_name(end_entity);
        let mut unscoped = None;
        let mut other = None;
        for (a, v) in &self.anchors {
            match v.verify_client_cert(end_entity, intermediates, now) {
                Ok(_) => match check_scope(a, Role::Primary, name.as_deref(), None) {
                    Ok(()) => return Ok(a),
                    Err(e) => {
                        unscoped.get_or_insert(e);
                    }
                },
                Err(e) => {
                    other.get_or_insert(e);
                }
            }
        }
        Err(unscoped
            .or(other)
            .unwrap_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )))
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.anchor_of(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Every anchor with a server verifier of its own (hostname/IP checks included).
#[derive(Debug)]
struct ServerAnchors {
    anchors: Vec<(Anchor, Arc<WebPkiServerVerifier>)>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerAnchors {
    fn new(anchors: &[Anchor], provider: &Arc<CryptoProvider>) -> Result<Self, TransportError> {
        let mut out = Vec::new();
        for a in anchors {
            let mut one = RootCertStore::empty();
            one.add(a.cert.clone())
                .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(one), provider.clone())
                .build()
                .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
            out.push((a.clone(), v));
        }
        Ok(Self {
            anchors: out,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

/// Verifies replicas (server certificates of peers we dial): normal name/IP checks against the
/// dialled address, then the chain must end at a CA trusted as a replica and pinned to the
/// certificate's name, and that name must be the replica `expect`ed (when known).
#[derive(Debug)]
struct PinnedServerVerifier {
    anchors: Arc<ServerAnchors>,
    expect: Option<String>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = crate::identity::peer_name(end_entity);
        let mut unscoped = None;
        let mut other = None;
        for (a, v) in &self.anchors.anchors {
            match v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
                Ok(ok) => {
                    match check_scope(a, Role::Replica, name.as_deref(), self.expect.as_deref()) {
                        Ok(()) => return Ok(ok),
                        Err(e) => {
                            unscoped.get_or_insert(e);
                        }
                    }
                }
                Err(e) => {
                    // A name mismatch says more than "unknown issuer" from the other anchors.
                    let name_error = matches!(
                        e,
                        rustls::Error::InvalidCertificate(
                            CertificateError::NotValidForName
                                | CertificateError::NotValidForNameContext { .. }
                        )
                    );
                    if name_error || other.is_none() {
                        other = Some(e);
                    }
                }
            }
        }
        Err(unscoped
            .or(other)
            .unwrap_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.anchors.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.anchors.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.anchors.algorithms.supported_schemes()
    }
}

/// Server config: TLS 1.3 only, client certificate required, verified against the CAs trusted
/// as primaries (plus our own CA) and their name pins, ALPN `h2`.
pub fn server_config(
    identity: &Identity,
    trust: &TrustStore,
) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = Arc::new(provider());
    let anchors = trust.anchors(identity)?;
    let verifier = Arc::new(PinnedClientVerifier::new(&anchors, &provider)?);
    build_server_config(identity, provider, verifier)
}

fn build_server_config(
    identity: &Identity,
    provider: Arc<CryptoProvider>,
    verifier: Arc<PinnedClientVerifier>,
) -> Result<Arc<ServerConfig>, TransportError> {
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

/// Client config: TLS 1.3 only, presents our leaf, verifies servers with hostname/IP checks
/// against the CAs trusted as replicas (plus our own CA) and their name pins, ALPN `h2`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustStore,
) -> Result<Arc<ClientConfig>, TransportError> {
    let provider = Arc::new(provider());
    let anchors = Arc::new(ServerAnchors::new(&trust.anchors(identity)?, &provider)?);
    build_client_config(identity, provider, anchors, None)
}

fn build_client_config(
    identity: &Identity,
    provider: Arc<CryptoProvider>,
    anchors: Arc<ServerAnchors>,
    expect: Option<&str>,
) -> Result<Arc<ClientConfig>, TransportError> {
    let verifier = Arc::new(PinnedServerVerifier {
        anchors,
        expect: expect.map(str::to_owned),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
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
    trust: TrustStore,
    /// Held while a rebuild reads the identity and replaces `current`: a trust refresh and an
    /// identity reload never undo each other.
    rebuild: Mutex<()>,
    current: Mutex<Built>,
}

struct Built {
    /// The identity the configs present (replaced by [`TlsContext::reload_identity`]).
    identity: Identity,
    /// Trust files the configs were built from.
    snapshot: Vec<(PathBuf, Vec<u8>)>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    client_verifier: Arc<PinnedClientVerifier>,
    server_anchors: Arc<ServerAnchors>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("identity", &self.lock().identity.name)
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
                trust,
                rebuild: Mutex::new(()),
                current: Mutex::new(built),
            }),
        })
    }

    /// This host's identity, as new connections present it.
    pub fn identity(&self) -> Identity {
        self.lock().identity.clone()
    }

    /// Presents `identity` on new connections from now on (established ones keep theirs),
    /// with the trust directory as it is now. Refused, keeping the current identity, if it
    /// does not build or names another host (a host's name changes only with a restart:
    /// peers pinned it).
    pub fn reload_identity(&self, identity: Identity) -> Result<(), TransportError> {
        let _rebuild = self.rebuild_lock();
        let current = self.lock().identity.name.clone();
        if identity.name != current {
            return Err(TransportError::TlsConfig(format!(
                "the new certificate names {:?}, this host runs as {current:?}; restart the \
                 daemon to change its name",
                identity.name
            )));
        }
        let built = build(&identity, &self.inner.trust)?;
        *self.lock() = built;
        tracing::info!(host = %identity.name, "certificate reloaded; new connections use it");
        Ok(())
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

    /// Client config for a new connection to the replica named `expect` (its certificate's
    /// peer name, recorded when the relationship was set up): any other replica identity is
    /// refused even if its CA is trusted as a replica and pinned to that other name.
    pub fn client_config_expecting(&self, expect: Option<&str>) -> Arc<ClientConfig> {
        self.refresh_quietly();
        let (client, anchors, identity) = {
            let built = self.lock();
            (
                built.client.clone(),
                built.server_anchors.clone(),
                built.identity.clone(),
            )
        };
        let Some(expect) = expect else {
            return client;
        };
        match build_client_config(&identity, Arc::new(provider()), anchors, Some(expect)) {
            Ok(c) => c,
            Err(e) => {
                // Cannot happen with an identity that already built `client`; refuse to
                // connect rather than fall back to the unpinned config.
                tracing::error!(error = %e, "cannot build a pinned client TLS config");
                Arc::new(unusable_client_config(&client))
            }
        }
    }

    /// Fingerprint of the CA (trusted as a primary, pinned to the certificate's name) that a
    /// verified client chain ends at: who vouched for the peer. `None` if the chain is no
    /// longer accepted (trust changed since the handshake).
    pub fn primary_ca_of(&self, chain: &[CertificateDer<'static>]) -> Option<String> {
        let (end_entity, intermediates) = chain.split_first()?;
        let verifier = self.lock().client_verifier.clone();
        verifier
            .anchor_of(end_entity, intermediates, UnixTime::now())
            .ok()
            .map(|a| a.fingerprint.clone())
    }

    /// Trusts the certificate(s) in `pem_file` (both roles, name from the CA) and rebuilds.
    pub fn add_trust(&self, pem_file: &Path) -> Result<TrustedCert, TransportError> {
        self.add_trust_scoped(pem_file, &Scope::both())
    }

    /// Trusts the certificate(s) in `pem_file` with `scope` and rebuilds the configs.
    pub fn add_trust_scoped(
        &self,
        pem_file: &Path,
        scope: &Scope,
    ) -> Result<TrustedCert, TransportError> {
        let added = self.inner.trust.add_scoped(pem_file, scope)?;
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
        let _rebuild = self.rebuild_lock();
        let identity = self.lock().identity.clone();
        let built = build(&identity, &self.inner.trust)?;
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

    fn rebuild_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .rebuild
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let provider = Arc::new(provider());
    let anchors = trust.anchors(identity)?;
    let client_verifier = Arc::new(PinnedClientVerifier::new(&anchors, &provider)?);
    let server_anchors = Arc::new(ServerAnchors::new(&anchors, &provider)?);
    Ok(Built {
        identity: identity.clone(),
        snapshot,
        server: build_server_config(identity, provider.clone(), client_verifier.clone())?,
        client: build_client_config(identity, provider, server_anchors.clone(), None)?,
        client_verifier,
        server_anchors,
    })
}

/// A copy of `template` whose verifier refuses every server (never used to connect anywhere
/// successfully).
fn unusable_client_config(template: &ClientConfig) -> ClientConfig {
    let mut c = template.clone();
    c.dangerous()
        .set_certificate_verifier(Arc::new(RefuseAll(template.crypto_provider().clone())));
    c
}

#[derive(Debug)]
struct RefuseAll(Arc<CryptoProvider>);

impl ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(scope_refusal(
            "this host could not build its pinned TLS configuration".to_owned(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
