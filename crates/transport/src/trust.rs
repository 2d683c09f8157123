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
use crate::pem::{certs_from_pem, read_bounded, read_bounded_to, read_certs, to_pem};
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
    /// What it is trusted for.
    pub scope: Scope,
}

/// What a trusted CA may vouch for (`<fingerprint>.scope`, `docs/formats/identity.md`).
///
/// A peer is accepted only if its certificate chains to a CA trusted for the peer's role and
/// the certificate's peer name (CN, else first DNS name) is one the CA is pinned to: another
/// trusted host's CA cannot mint a certificate for this host's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Peer names the CA speaks for: exact names, `*` (any: a CA of your own that signs many
    /// hosts), or one `*` wildcard such as `*.example.com`.
    pub names: Vec<String>,
    /// Trusted to identify replicas this host ships to (servers we dial).
    pub replica: bool,
    /// Trusted to identify primaries that ship to this host (clients of our peer port).
    pub primary: bool,
}

impl Scope {
    /// Both roles, names to be derived from the CA: what a plain `trust add FILE` asks for.
    pub fn both() -> Self {
        Self {
            names: Vec::new(),
            replica: true,
            primary: true,
        }
    }

    /// Whether `name` is one of the names this scope pins.
    pub fn allows_name(&self, name: &str) -> bool {
        self.names.iter().any(|p| name_matches(p, name))
    }

    /// "replica", "primary", "replica+primary" or "none".
    pub fn roles(&self) -> &'static str {
        match (self.replica, self.primary) {
            (true, true) => "replica+primary",
            (true, false) => "replica",
            (false, true) => "primary",
            (false, false) => "none",
        }
    }

    fn merge(&mut self, other: &Scope) {
        for n in &other.names {
            if !self.names.contains(n) {
                self.names.push(n.clone());
            }
        }
        self.replica |= other.replica;
        self.primary |= other.primary;
    }

    fn encode(&self) -> String {
        let mut out = format!("{SCOPE_MAGIC}\nroles");
        if self.replica {
            out.push_str(" replica");
        }
        if self.primary {
            out.push_str(" primary");
        }
        out.push('\n');
        for n in &self.names {
            out.push_str("name ");
            out.push_str(n);
            out.push('\n');
        }
        out
    }

    fn decode(text: &str, path: &Path) -> Result<Self, TransportError> {
        let bad = |reason: String| TransportError::InvalidPem {
            path: path.to_owned(),
            reason,
        };
        let mut lines = text.lines();
        if lines.next() != Some(SCOPE_MAGIC) {
            return Err(bad(format!(
                "not a trust scope file (first line must be {SCOPE_MAGIC:?})"
            )));
        }
        let mut scope = Scope {
            names: Vec::new(),
            replica: false,
            primary: false,
        };
        for line in lines {
            let mut words = line.split_whitespace();
            match words.next() {
                None => {}
                Some("roles") => {
                    for w in words {
                        match w {
                            "replica" => scope.replica = true,
                            "primary" => scope.primary = true,
                            other => return Err(bad(format!("unknown role {other:?}"))),
                        }
                    }
                }
                Some("name") => {
                    let name = words.next().unwrap_or_default();
                    validate_name_pattern(name).map_err(bad)?;
                    if words.next().is_some() {
                        return Err(bad(format!("a name line holds one name: {line:?}")));
                    }
                    scope.names.push(name.to_owned());
                }
                Some(other) => return Err(bad(format!("unknown line {other:?}"))),
            }
        }
        Ok(scope)
    }
}

/// First line of a scope file; bump the version on incompatible change.
const SCOPE_MAGIC: &str = "understudy trust scope v1";
/// Suffix of scope files, next to `<fingerprint>.pem`.
const SCOPE_FILE_SUFFIX: &str = ".scope";
/// Largest scope file read: a few names; the bound keeps a damaged file from costing memory.
const SCOPE_FILE_BYTES_MAX: u64 = 64 << 10;
/// Longest peer name (a DNS name is at most 253 characters).
const NAME_BYTES_MAX: usize = 253;
/// Subject prefix of the CAs `identity::load_or_create` makes; the rest is the host name.
pub(crate) const GENERATED_CA_PREFIX: &str = "Understudy host CA ";

/// Exact name, `*`, or one `*` wildcard (`*.example.com`, `web-*`): the allow-list syntax.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" || pattern == name {
        return true;
    }
    match pattern.split_once('*') {
        Some((pre, post)) => {
            name.len() >= pre.len() + post.len() && name.starts_with(pre) && name.ends_with(post)
        }
        None => false,
    }
}

fn validate_name_pattern(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "peer name {name:?} must be 1 to {NAME_BYTES_MAX} characters"
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("peer name {name:?} contains whitespace"));
    }
    if name.matches('*').count() > 1 {
        return Err(format!("peer name {name:?} has more than one `*`"));
    }
    Ok(())
}

/// The host name a CA made by `identity::load_or_create` speaks for, from its subject.
pub fn derived_name(cert: &CertificateDer<'_>) -> Option<String> {
    let info = der::parse_certificate(cert.as_ref())?;
    let name = info
        .subject_cn?
        .strip_prefix(GENERATED_CA_PREFIX)?
        .to_owned();
    validate_name_pattern(&name).ok()?;
    Some(name)
}

/// One trust anchor as the TLS verifiers use it: the CA and what it may vouch for.
#[derive(Debug, Clone)]
pub(crate) struct Anchor {
    pub cert: CertificateDer<'static>,
    pub fingerprint: String,
    /// `None`: any name (this host's own CA).
    pub names: Option<Vec<String>>,
    pub replica: bool,
    pub primary: bool,
}

impl Anchor {
    pub fn allows_name(&self, name: &str) -> bool {
        match &self.names {
            None => true,
            Some(list) => list.iter().any(|p| name_matches(p, name)),
        }
    }
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

    /// Trusts every certificate in `pem_file` (usually one: a peer's host CA) for both roles,
    /// pinned to the host name in its subject. See [`TrustStore::add_scoped`].
    pub fn add(&self, pem_file: &Path) -> Result<TrustedCert, TransportError> {
        self.add_scoped(pem_file, &Scope::both())
    }

    /// Trusts every certificate in `pem_file` with `scope`. Refuses files without certificates
    /// or with certificates webpki cannot use as trust anchors. Without names in `scope`, the
    /// name comes from the CA's subject (`Understudy host CA NAME`, what `understudy identity`
    /// prints); a CA that names no host needs explicit names. Adding a certificate that is
    /// already trusted widens its scope (names and roles are added, never removed) and reports
    /// `newly_added == false`. With several certificates in the file, the first is returned and
    /// all are stored.
    pub fn add_scoped(
        &self,
        pem_file: &Path,
        scope: &Scope,
    ) -> Result<TrustedCert, TransportError> {
        let bytes = read_bounded(pem_file)?;
        self.add_pem_scoped(&bytes, pem_file, scope)
    }

    /// Like [`TrustStore::add`] for PEM text received another way (e.g. through the local
    /// API); `source` names it in errors.
    pub fn add_pem(&self, pem: &[u8], source: &Path) -> Result<TrustedCert, TransportError> {
        self.add_pem_scoped(pem, source, &Scope::both())
    }

    /// [`TrustStore::add_scoped`] for PEM text.
    pub fn add_pem_scoped(
        &self,
        pem: &[u8],
        source: &Path,
        scope: &Scope,
    ) -> Result<TrustedCert, TransportError> {
        let certs = certs_from_pem(pem, source)?;
        if !scope.replica && !scope.primary {
            return Err(TransportError::InvalidName {
                name: source.display().to_string(),
                reason: "trust for no role: say replica, primary or both".to_owned(),
            });
        }
        for n in &scope.names {
            validate_name_pattern(n).map_err(|reason| TransportError::InvalidName {
                name: n.clone(),
                reason,
            })?;
        }
        // Validate everything before storing anything: all or nothing.
        let mut scopes = Vec::new();
        for cert in &certs {
            validate_anchor(cert, source)?;
            let mut wanted = scope.clone();
            if wanted.names.is_empty() {
                let name = derived_name(cert).ok_or_else(|| TransportError::InvalidName {
                    name: source.display().to_string(),
                    reason: format!(
                        "cannot tell which host the CA {:?} speaks for; give the peer's name \
                         with --name NAME (repeatable)",
                        crate::peer_name(cert).unwrap_or_default()
                    ),
                })?;
                wanted.names.push(name);
            }
            scopes.push(wanted);
        }
        let mut first = None;
        for (cert, wanted) in certs.iter().zip(scopes) {
            let fp = fingerprint(cert);
            let path = self.dir.join(format!("{fp}{TRUST_FILE_SUFFIX}"));
            let scope_path = self.scope_path(&fp);
            let newly_added = !path.exists();
            let mut stored = if newly_added {
                wanted.clone()
            } else {
                self.scope_of(cert, &fp)?
            };
            stored.merge(&wanted);
            // Scope first: a crash in between leaves a scope without a certificate (ignored)
            // rather than a certificate without its scope.
            crashsafe::write_file(&scope_path, stored.encode().as_bytes(), MODE_PUBLIC)?;
            if newly_added {
                crashsafe::write_file(&path, to_pem(cert).as_bytes(), MODE_PUBLIC)?;
            }
            tracing::info!(fingerprint = %fp, subject = ?crate::peer_name(cert),
                names = ?stored.names, roles = stored.roles(), "certificate trusted");
            first.get_or_insert(TrustedCert {
                fingerprint: fp,
                subject: crate::peer_name(cert),
                path,
                newly_added,
                scope: stored,
            });
        }
        first.ok_or_else(|| TransportError::NoCertificate {
            path: source.to_owned(),
        })
    }

    fn scope_path(&self, fp: &str) -> PathBuf {
        self.dir.join(format!("{fp}{SCOPE_FILE_SUFFIX}"))
    }

    /// The stored scope of a trusted certificate. A certificate trusted before scopes existed
    /// (no scope file) is trusted for both roles and pinned to the name in its subject, or to
    /// no name at all if it names no host (then it vouches for nobody until re-added with
    /// `--name`).
    fn scope_of(&self, cert: &CertificateDer<'_>, fp: &str) -> Result<Scope, TransportError> {
        let path = self.scope_path(fp);
        match std::fs::metadata(&path) {
            Ok(_) => {
                let bytes = read_bounded_to(&path, SCOPE_FILE_BYTES_MAX)?;
                let text = String::from_utf8(bytes).map_err(|_| TransportError::InvalidPem {
                    path: path.clone(),
                    reason: "not UTF-8".to_owned(),
                })?;
                Scope::decode(&text, &path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Scope {
                names: derived_name(cert).into_iter().collect(),
                replica: true,
                primary: true,
            }),
            Err(e) => Err(TransportError::io("read", &path, e)),
        }
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
                let scope = self.scope_path(&one.fingerprint);
                match std::fs::remove_file(&scope) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(TransportError::io("remove", &scope, e)),
                }
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
                let fp = fingerprint(&cert);
                let scope = self.scope_of(&cert, &fp)?;
                out.push(TrustedCert {
                    fingerprint: fp,
                    subject: crate::peer_name(&cert),
                    path: path.clone(),
                    newly_added: false,
                    scope,
                });
            }
        }
        Ok(out)
    }

    /// Trust anchors for TLS: this host's own CA (any name, both roles: in generated mode it
    /// signs only our own leaf; with `--ca` it is the admin's PKI, which legitimately signs
    /// many hosts), then every trusted certificate with its scope.
    pub(crate) fn anchors(&self, identity: &Identity) -> Result<Vec<Anchor>, TransportError> {
        let mut out = Vec::new();
        for cert in &identity.ca_certs {
            RootCertStore::empty()
                .add(cert.clone())
                .map_err(|e| TransportError::TlsConfig(format!("our own CA is unusable: {e}")))?;
            out.push(Anchor {
                cert: cert.clone(),
                fingerprint: fingerprint(cert),
                names: None,
                replica: true,
                primary: true,
            });
        }
        for path in self.files()? {
            for cert in read_certs(&path)? {
                validate_anchor(&cert, &path)?;
                let fp = fingerprint(&cert);
                let scope = self.scope_of(&cert, &fp)?;
                if scope.names.is_empty() {
                    tracing::warn!(fingerprint = %fp, "trusted CA is pinned to no peer name and \
                        vouches for nobody; add it again with `understudy trust add FILE --name NAME`");
                }
                out.push(Anchor {
                    cert,
                    fingerprint: fp,
                    names: Some(scope.names),
                    replica: scope.replica,
                    primary: scope.primary,
                });
            }
        }
        Ok(out)
    }

    /// What the TLS configs are built from: the sorted names of the trust files (content
    /// fingerprints, so equal names mean equal certificates) and the content of every scope
    /// file. Used to notice changes made by another process.
    pub(crate) fn snapshot(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, TransportError> {
        let mut out: Vec<(PathBuf, Vec<u8>)> =
            self.files()?.into_iter().map(|p| (p, Vec::new())).collect();
        for path in self.files_with(SCOPE_FILE_SUFFIX)? {
            let bytes = read_bounded_to(&path, SCOPE_FILE_BYTES_MAX)?;
            out.push((path, bytes));
        }
        Ok(out)
    }

    fn files(&self) -> Result<Vec<PathBuf>, TransportError> {
        self.files_with(TRUST_FILE_SUFFIX)
    }

    fn files_with(&self, suffix: &str) -> Result<Vec<PathBuf>, TransportError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| TransportError::io("list", &self.dir, e))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| TransportError::io("list", &self.dir, e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(suffix)) else {
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
    fn scope_is_pinned_to_the_ca_subject_name_and_widens_on_re_add() {
        let (dir, store) = store();
        let pem = peer_ca(dir.path(), "peer-d");
        let primary_only = Scope {
            names: vec![],
            replica: false,
            primary: true,
        };
        let added = store.add_scoped(&pem, &primary_only).unwrap();
        assert_eq!(added.scope.names, vec!["peer-d".to_owned()]);
        assert!(added.scope.primary && !added.scope.replica);
        let widened = Scope {
            names: vec!["*.example.com".to_owned()],
            replica: true,
            primary: false,
        };
        let again = store.add_scoped(&pem, &widened).unwrap();
        assert!(!again.newly_added);
        assert_eq!(again.scope.names, vec!["peer-d", "*.example.com"]);
        assert!(again.scope.primary && again.scope.replica);
        let listed = store.list().unwrap();
        assert_eq!(listed[0].scope, again.scope, "the scope survives on disk");
        assert!(again.scope.allows_name("db.example.com"));
        assert!(!again.scope.allows_name("example.com"));
        assert!(!again.scope.allows_name("peer-e"));
        // Removing the certificate removes its scope.
        store.remove(&added.fingerprint).unwrap().unwrap();
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
    }

    #[test]
    fn trust_file_from_before_scopes_is_pinned_to_its_subject_name() {
        let (dir, store) = store();
        let added = store.add(&peer_ca(dir.path(), "peer-f")).unwrap();
        std::fs::remove_file(store.scope_path(&added.fingerprint)).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed[0].scope.names, vec!["peer-f".to_owned()]);
        assert!(listed[0].scope.primary && listed[0].scope.replica);
    }

    #[test]
    fn a_ca_that_names_no_host_needs_explicit_names() {
        let (dir, store) = store();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Corp Root CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let pem = dir.path().join("corp.pem");
        std::fs::write(&pem, ca.pem()).unwrap();
        let err = store.add(&pem).unwrap_err();
        assert!(err.to_string().contains("--name"), "{err}");
        assert!(store.list().unwrap().is_empty());
        let named = Scope {
            names: vec!["alpha".to_owned(), "beta".to_owned()],
            ..Scope::both()
        };
        let added = store.add_scoped(&pem, &named).unwrap();
        assert_eq!(added.scope.names, vec!["alpha", "beta"]);
        let bad = Scope {
            names: vec!["two words".to_owned()],
            ..Scope::both()
        };
        assert!(store.add_scoped(&pem, &bad).is_err());
    }

    #[test]
    fn damaged_scope_file_is_an_error_naming_it() {
        let (dir, store) = store();
        let added = store.add(&peer_ca(dir.path(), "peer-g")).unwrap();
        let path = store.scope_path(&added.fingerprint);
        std::fs::write(&path, "understudy trust scope v1\nroles admin\n").unwrap();
        let err = store.list().unwrap_err().to_string();
        assert!(err.contains(".scope") && err.contains("admin"), "{err}");
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
