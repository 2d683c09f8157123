//! The trust store: a directory of PEM files, one per trusted certificate (normally a peer's
//! host CA as printed by `understudy identity`), named by SHA-256 fingerprint.
//!
//! It owns `<data-dir>/trust/` (format in `docs/formats/identity.md`). It stores only
//! certificates it could parse and that webpki accepts as trust anchors, re-encoded as clean
//! PEM (never the caller's file verbatim, which might also hold a private key). It never
//! decides anything about connections itself; [`crate::tls`] turns it into rustls configs.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::crashsafe::{self, MODE_PUBLIC};
use crate::identity::Identity;
use crate::pem::{certs_from_pem, read_bounded, read_certs, to_pem};
use crate::{der, TransportError};

/// Suffix of trusted certificate files. Anything else in the directory (temporary files of an
/// interrupted write, an admin's README) is ignored.
const TRUST_FILE_SUFFIX: &str = ".pem";
/// Length of a hex SHA-256 fingerprint, i.e. of a trust file's stem.
const FINGERPRINT_HEX_LEN: usize = 64;

/// A directory of trusted certificates.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

/// One trusted certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedCert {
    /// Lowercase hex SHA-256 of the certificate's DER (what `openssl x509 -fingerprint
    /// -sha256` prints, without colons).
    pub fingerprint: String,
    /// Subject common name (or first DNS name), if any.
    pub subject: Option<String>,
    /// Where it is stored.
    pub path: PathBuf,
    /// `false` when [`TrustStore::add`] found it already trusted.
    pub newly_added: bool,
}

/// Lowercase hex SHA-256 of a certificate's DER encoding.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    // SHA-256 through the pinned ring provider rather than a process default: this crate
    // never relies on process-wide crypto state.
    let hash = crate::tls::sha256(cert.as_ref());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl TrustStore {
    /// Opens (creating if needed) the trust directory.
    pub fn open(dir: &Path) -> Result<Self, TransportError> {
        crashsafe::create_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Trusts every certificate in `pem_file` (usually one: a peer's host CA). Refuses files
    /// without certificates or with certificates webpki cannot use as trust anchors; adding a
    /// certificate that is already trusted is a no-op (`newly_added == false`). With several
    /// certificates in the file, the first is returned and all are stored.
    pub fn add(&self, pem_file: &Path) -> Result<TrustedCert, TransportError> {
        let bytes = read_bounded(pem_file)?;
        self.add_pem(&bytes, pem_file)
    }

    /// Like [`TrustStore::add`] for PEM text received another way (e.g. through the local
    /// API); `source` names it in errors.
    pub fn add_pem(&self, pem: &[u8], source: &Path) -> Result<TrustedCert, TransportError> {
        let certs = certs_from_pem(pem, source)?;
        // Validate everything before storing anything: all or nothing.
        for cert in &certs {
            validate_anchor(cert, source)?;
        }
        let mut first = None;
        for cert in &certs {
            let fp = fingerprint(cert);
            let path = self.dir.join(format!("{fp}{TRUST_FILE_SUFFIX}"));
            let newly_added = !path.exists();
            if newly_added {
                crashsafe::write_file(&path, to_pem(cert).as_bytes(), MODE_PUBLIC)?;
                tracing::info!(fingerprint = %fp, subject = ?crate::peer_name(cert),
                    "certificate trusted");
            }
            first.get_or_insert(TrustedCert {
                fingerprint: fp,
                subject: crate::peer_name(cert),
                path,
                newly_added,
            });
        }
        first.ok_or_else(|| TransportError::NoCertificate {
            path: source.to_owned(),
        })
    }

    /// Stops trusting the certificate whose fingerprint starts with `fingerprint_prefix`
    /// (at least 8 hex digits). Returns what was removed; an ambiguous prefix is an error.
    pub fn remove(&self, fingerprint_prefix: &str) -> Result<Option<TrustedCert>, TransportError> {
        const PREFIX_HEX_MIN: usize = 8;
        let prefix = fingerprint_prefix.to_ascii_lowercase().replace(':', "");
        if prefix.len() < PREFIX_HEX_MIN {
            return Err(TransportError::InvalidName {
                name: fingerprint_prefix.to_owned(),
                reason: format!("give at least {PREFIX_HEX_MIN} hex digits of the fingerprint"),
            });
        }
        let matches: Vec<TrustedCert> = self
            .list()?
            .into_iter()
            .filter(|t| t.fingerprint.starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [] => Ok(None),
            [one] => {
                std::fs::remove_file(&one.path)
                    .map_err(|e| TransportError::io("remove", &one.path, e))?;
                crashsafe::sync_dir(&self.dir)?;
                Ok(Some(one.clone()))
            }
            _ => Err(TransportError::InvalidName {
                name: fingerprint_prefix.to_owned(),
                reason: format!("matches {} trusted certificates", matches.len()),
            }),
        }
    }

    /// Every trusted certificate, sorted by fingerprint. A damaged file is an error naming it.
    pub fn list(&self) -> Result<Vec<TrustedCert>, TransportError> {
        let mut out = Vec::new();
        for path in self.files()? {
            for cert in read_certs(&path)? {
                out.push(TrustedCert {
                    fingerprint: fingerprint(&cert),
                    subject: crate::peer_name(&cert),
                    path: path.clone(),
                    newly_added: false,
                });
            }
        }
        Ok(out)
    }

    /// Trust roots for TLS: every trusted certificate plus this host's own CA, so that a host
    /// can talk to itself.
    pub fn root_store(&self, identity: &Identity) -> Result<RootCertStore, TransportError> {
        let mut roots = RootCertStore::empty();
        for cert in &identity.ca_certs {
            roots
                .add(cert.clone())
                .map_err(|e| TransportError::TlsConfig(format!("our own CA is unusable: {e}")))?;
        }
        for path in self.files()? {
            for cert in read_certs(&path)? {
                roots.add(cert).map_err(|e| TransportError::InvalidPem {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(roots)
    }

    /// Sorted names of the trust files: since names are content fingerprints, equal lists mean
    /// equal trust. Used to notice changes made by another process.
    pub(crate) fn snapshot(&self) -> Result<Vec<PathBuf>, TransportError> {
        self.files()
    }

    fn files(&self) -> Result<Vec<PathBuf>, TransportError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| TransportError::io("list", &self.dir, e))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| TransportError::io("list", &self.dir, e))?;
            let name = entry.file_name();
            let Some(stem) = name
                .to_str()
                .and_then(|n| n.strip_suffix(TRUST_FILE_SUFFIX))
            else {
                continue;
            };
            if stem.len() == FINGERPRINT_HEX_LEN && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
                files.push(entry.path());
            }
        }
        files.sort();
        Ok(files)
    }
}

/// Refuses certificates that could not serve as trust anchors (webpki's own check), with a
/// message naming the file.
fn validate_anchor(cert: &CertificateDer<'static>, source: &Path) -> Result<(), TransportError> {
    if der::parse_certificate(cert.as_ref()).is_none() {
        return Err(TransportError::InvalidPem {
            path: source.to_owned(),
            reason: "a CERTIFICATE block does not contain an X.509 certificate".to_owned(),
        });
    }
    RootCertStore::empty()
        .add(cert.clone())
        .map_err(|e| TransportError::InvalidPem {
            path: source.to_owned(),
            reason: format!("certificate unusable as a trust anchor: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, TrustStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::open(&dir.path().join("trust")).unwrap();
        (dir, store)
    }

    fn peer_ca(dir: &Path, name: &str) -> PathBuf {
        let id = crate::load_or_create(&dir.join(name), name, &[]).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, id.ca_pem()).unwrap();
        path
    }

    #[test]
    fn add_is_idempotent_and_listed() {
        let (dir, store) = store();
        let pem = peer_ca(dir.path(), "peer-b");
        let first = store.add(&pem).unwrap();
        assert!(first.newly_added);
        assert_eq!(first.subject.as_deref(), Some("Understudy host CA peer-b"));
        let again = store.add(&pem).unwrap();
        assert!(!again.newly_added);
        assert_eq!(again.fingerprint, first.fingerprint);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].fingerprint, first.fingerprint);
        assert_eq!(
            first.path.file_name().unwrap().to_str().unwrap(),
            format!("{}.pem", first.fingerprint)
        );
    }

    #[test]
    fn garbage_file_is_refused_with_a_clear_error_and_stores_nothing() {
        let (dir, store) = store();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"this is not a certificate\n\x00\x01\x02").unwrap();
        let err = store.add(&garbage).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("garbage.pem"), "{msg}");
        assert!(msg.contains("no PEM certificate"), "{msg}");

        let bad_block = dir.path().join("bad-block.pem");
        std::fs::write(
            &bad_block,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = store.add(&bad_block).unwrap_err();
        assert!(
            matches!(err, TransportError::InvalidPem { .. }),
            "{err}: want InvalidPem"
        );
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn remove_by_prefix() {
        let (dir, store) = store();
        let added = store.add(&peer_ca(dir.path(), "peer-c")).unwrap();
        assert!(store.remove("abc").is_err(), "too short a prefix");
        let removed = store.remove(&added.fingerprint[..12]).unwrap().unwrap();
        assert_eq!(removed.fingerprint, added.fingerprint);
        assert!(store.list().unwrap().is_empty());
    }
}
