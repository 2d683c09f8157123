//! The one error type of this crate, and the translation of low-level TLS/HTTP failures into
//! messages a user can act on ("run `understudy trust add` ...").
//!
//! It owns wording and classification only; it never logs (the caller that handles an error
//! logs it once) and never retries.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in identity, trust and transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file or directory operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What we were doing ("read", "create directory", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file that should hold certificates holds none (or is not PEM at all).
    #[error(
        "{} contains no PEM certificate (expected `-----BEGIN CERTIFICATE-----`, \
         e.g. the output of `understudy identity` on the peer)",
        path.display()
    )]
    NoCertificate {
        /// The offending file.
        path: PathBuf,
    },
    /// A PEM block or certificate could not be parsed.
    #[error("{} is not a valid certificate or key file: {reason}", path.display())]
    InvalidPem {
        /// The offending file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A key file holds no private key.
    #[error("{} contains no PEM private key", path.display())]
    NoPrivateKey {
        /// The offending file.
        path: PathBuf,
    },
    /// Our own identity files are inconsistent and we refuse to guess.
    #[error("host identity in {} is damaged: {reason}", dir.display())]
    DamagedIdentity {
        /// The identity directory.
        dir: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
    /// A subject alternative name given on the command line is not a DNS name or IP address.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// Certificate generation failed (rcgen).
    #[error("cannot generate certificate: {0}")]
    CertificateGeneration(String),
    /// rustls refused our configuration (bad key, empty trust store...).
    #[error("invalid TLS configuration: {0}")]
    TlsConfig(String),
    /// A peer address is not `host:port`.
    #[error("invalid peer address {addr:?}: {reason} (expected HOST:PORT, e.g. 10.0.0.2:7443)")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TCP connection refused.
    #[error("peer {peer}: connection refused (is `understudy serve` running there on that port?)")]
    ConnectionRefused {
        /// host:port.
        peer: String,
    },
    /// TCP connect or TLS handshake did not finish in time.
    #[error("peer {peer}: {stage} timed out after {after:?}")]
    Timeout {
        /// host:port.
        peer: String,
        /// "TCP connect" or "TLS handshake".
        stage: &'static str,
        /// The deadline that expired.
        after: std::time::Duration,
    },
    /// Any other failure to open the TCP connection (DNS, unreachable, ...).
    #[error("peer {peer}: cannot connect: {source}")]
    Connect {
        /// host:port.
        peer: String,
        /// The OS error.
        source: io::Error,
    },
    /// The peer's certificate does not chain to anything in our trust store.
    #[error(
        "peer {peer} presented a certificate not trusted by this host \
         (run `understudy trust add` with the output of `understudy identity` on {peer}): {reason}"
    )]
    PeerNotTrusted {
        /// host:port.
        peer: String,
        /// The verifier's reason.
        reason: String,
    },
    /// The peer's certificate is trusted but not issued for the name we dialled.
    #[error(
        "peer {peer} presented a certificate that is not valid for that name or address \
         (dial a name listed in its certificate, or re-create its identity with that name): \
         {reason}"
    )]
    PeerNameMismatch {
        /// host:port.
        peer: String,
        /// The verifier's reason.
        reason: String,
    },
    /// The peer's certificate chains to a trusted CA, but that CA is not trusted for the
    /// peer's role or not pinned to its name, or it is not the replica this relationship was
    /// set up with.
    #[error(
        "peer {peer} presented a certificate this host does not accept from it: {reason} \
         (see `understudy trust list`)"
    )]
    PeerOutOfScope {
        /// host:port.
        peer: String,
        /// Which check failed.
        reason: String,
    },
    /// The peer refused our client certificate.
    #[error(
        "peer {peer} does not trust this host's certificate (on {peer} run `understudy trust \
         add` with the output of `understudy identity` on this host): {reason}"
    )]
    RejectedByPeer {
        /// host:port.
        peer: String,
        /// The alert received.
        reason: String,
    },
    /// Any other TLS failure (protocol version, ALPN, corrupt records...).
    #[error("peer {peer}: TLS failed: {reason}")]
    Tls {
        /// host:port.
        peer: String,
        /// rustls's description.
        reason: String,
    },
    /// The HTTP/2 connection or a request on it failed.
    #[error("peer {peer}: HTTP/2 request failed: {reason}")]
    Http {
        /// host:port.
        peer: String,
        /// hyper's description, with its causes.
        reason: String,
    },
    /// The peer answered with a non-success HTTP status.
    #[error("peer {peer} answered HTTP {status}: {body}")]
    Status {
        /// host:port.
        peer: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body (the peer's error message).
        body: String,
    },
    /// A response was not what the caller asked for (size, shape).
    #[error("peer {peer}: {reason}")]
    BadResponse {
        /// host:port.
        peer: String,
        /// What was wrong.
        reason: String,
    },
}

impl TransportError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether retrying later might succeed (network trouble) as opposed to a configuration
    /// problem that needs an admin (trust, names, files).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::ConnectionRefused { .. }
                | Self::Timeout { .. }
                | Self::Connect { .. }
                | Self::Http { .. }
                | Self::Tls { .. }
        ) || matches!(self, Self::Status { status, .. } if *status == 503 || *status == 429)
    }

    /// Classifies a failure seen while talking to `peer` by walking its cause chain: a rustls
    /// error anywhere in it decides the variant, otherwise it is an HTTP/2 failure.
    pub(crate) fn from_peer_failure(peer: &str, err: &(dyn StdError + 'static)) -> Self {
        if let Some(tls) = find_rustls_error(err) {
            return Self::from_tls(peer, tls);
        }
        Self::Http {
            peer: peer.to_owned(),
            reason: chain_to_string(err),
        }
    }

    /// Maps a rustls error seen by our client while talking to `peer`.
    pub(crate) fn from_tls(peer: &str, err: &rustls::Error) -> Self {
        use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
        let peer = peer.to_owned();
        let reason = err.to_string();
        match err {
            E::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
                Self::PeerNameMismatch { peer, reason }
            }
            E::InvalidCertificate(Cert::Other(other))
                if other.0.downcast_ref::<crate::tls::ScopeRefusal>().is_some() =>
            {
                Self::PeerOutOfScope {
                    peer,
                    reason: other.0.to_string(),
                }
            }
            E::InvalidCertificate(_) => Self::PeerNotTrusted { peer, reason },
            E::AlertReceived(
                Alert::UnknownCA
                | Alert::BadCertificate
                | Alert::CertificateRequired
                | Alert::CertificateUnknown
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate
                | Alert::AccessDenied,
            ) => Self::RejectedByPeer { peer, reason },
            _ => Self::Tls { peer, reason },
        }
    }
}

/// Finds a `rustls::Error` in a cause chain. `io::Error::source()` skips the wrapped error
/// itself, so each `io::Error` is also opened with `get_ref()`.
pub(crate) fn find_rustls_error<'a>(
    mut err: &'a (dyn StdError + 'static),
) -> Option<&'a rustls::Error> {
    loop {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = find_rustls_error(inner) {
                    return Some(tls);
                }
            }
        }
        err = err.source()?;
    }
}

/// "outer: cause: root cause", skipping repeats (hyper often repeats its cause in Display).
pub(crate) fn chain_to_string(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_error_is_found_inside_io_error() {
        let inner = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        let io = io::Error::new(io::ErrorKind::InvalidData, inner);
        let err = TransportError::from_peer_failure("10.0.0.2:7443", &io);
        assert!(
            matches!(err, TransportError::RejectedByPeer { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("10.0.0.2:7443") && msg.contains("understudy trust add"));
    }

    #[test]
    fn unknown_issuer_means_peer_not_trusted() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let err = TransportError::from_tls("b:1", &inner);
        assert!(matches!(err, TransportError::PeerNotTrusted { .. }));
        assert!(err
            .to_string()
            .starts_with("peer b:1 presented a certificate not trusted by this host"));
    }
}
