//! This host's TLS identity: a per-host CA and a leaf certificate signed by it, created on
//! first start and loaded afterwards, or an admin's own PKI (`--cert/--key/--ca`).
//!
//! It owns the files described in `docs/formats/identity.md` and nothing else. It never
//! replaces an existing CA (peers trust it; a new one would silently break every pairing), and
//! it never writes a file except through the crate's `crashsafe` module. The leaf may be
//! re-issued by the same CA when it no longer matches the requested names; peers keep trusting
//! it because they trust the CA.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::crashsafe::{self, MODE_PUBLIC, MODE_SECRET};
use crate::der;
use crate::pem::{read_certs, read_key, to_pem};
use crate::TransportError;

/// CA certificate, PEM. What `understudy identity` prints and peers trust.
pub const CA_CERT_FILE: &str = "ca.crt";
/// CA private key, PKCS#8 PEM, mode 0600.
pub const CA_KEY_FILE: &str = "ca.key";
/// Leaf certificate presented on every connection (server and client side), PEM.
pub const HOST_CERT_FILE: &str = "host.crt";
/// Leaf private key, PKCS#8 PEM, mode 0600.
pub const HOST_KEY_FILE: &str = "host.key";

/// Validity of generated certificates. Replication pairs live for years and an expired
/// certificate would stop replication silently at 3 a.m.; the trust decision is the pinned
/// per-host CA, not expiry.
const VALIDITY_YEARS: i32 = 100;
/// Certificates start being valid this many years before creation, so that a peer whose clock
/// is behind ours still accepts a freshly created identity.
const BACKDATE_YEARS: i32 = 1;
/// Names every leaf carries so that a host can always reach itself over loopback.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// This host's TLS identity.
pub struct Identity {
    /// Common name of our leaf certificate (the host name).
    pub name: String,
    /// PEM of the certificate(s) peers must trust to accept us (our CA).
    pub ca_cert_pem: String,
    /// DER of the same certificate(s); added to our own trust roots so a host can talk to
    /// itself.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Our leaf first, then any intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            ca_cert_pem: self.ca_cert_pem.clone(),
            ca_certs: self.ca_certs.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("ca_certs", &self.ca_certs.len())
            .field("cert_chain", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Identity {
    /// The PEM text a peer feeds to `understudy trust add` (printed by `understudy identity`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// Loads an admin-provided identity. `cert` holds the leaf first, then intermediates;
    /// `key` its private key (PKCS#8, PKCS#1 or SEC1 PEM); `ca` the certificate(s) peers
    /// should trust. Without `ca`, the last certificate of `cert` is what peers trust (for a
    /// self-signed leaf that is the leaf itself).
    pub fn from_files(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<Self, TransportError> {
        let cert_chain = read_certs(cert)?;
        let key_der = read_key(key)?;
        check_key_matches(&cert_chain, &key_der, cert)?;
        let (ca_certs, ca_cert_pem) = match ca {
            Some(ca) => {
                let certs = read_certs(ca)?;
                let pem = certs.iter().map(|c| to_pem(c)).collect();
                (certs, pem)
            }
            None => {
                let top = cert_chain.last().cloned().into_iter().collect::<Vec<_>>();
                let pem = top.iter().map(|c| to_pem(c)).collect();
                (top, pem)
            }
        };
        let name = peer_name(&cert_chain[0]).ok_or_else(|| TransportError::InvalidPem {
            path: cert.to_owned(),
            reason: "the certificate has neither a common name nor a DNS name".to_owned(),
        })?;
        Ok(Self {
            name,
            ca_cert_pem,
            ca_certs,
            cert_chain,
            key: key_der,
        })
    }
}

/// The name a peer's certificate is issued to: its subject common name, else its first DNS
/// subject alternative name. For allow-lists and logs; only meaningful on a verified chain.
pub fn peer_name(cert: &CertificateDer<'_>) -> Option<String> {
    let info = der::parse_certificate(cert.as_ref())?;
    info.subject_cn
        .filter(|cn| !cn.is_empty())
        .or_else(|| info.dns_sans.into_iter().next())
}

/// Loads this host's identity from `dir`, creating what is missing.
///
/// First start: a CA "Understudy host CA `host_name`" and a leaf for `host_name` signed by it,
/// with SANs `host_name`, `localhost`, `127.0.0.1`, `::1` and `extra_sans` (IP literals become
/// IP SANs). Later starts load the files; if the leaf no longer covers the requested names (or
/// is missing or damaged), a new leaf is issued by the existing CA. The CA is never replaced.
pub fn load_or_create(
    dir: &Path,
    host_name: &str,
    extra_sans: &[String],
) -> Result<Identity, TransportError> {
    let wanted = wanted_names(host_name, extra_sans)?;
    crashsafe::create_dir(dir)?;
    let ca = load_or_create_ca(dir, host_name)?;

    let cert_path = dir.join(HOST_CERT_FILE);
    let key_path = dir.join(HOST_KEY_FILE);
    let (cert_chain, key) = match load_leaf(&cert_path, &key_path, &ca, host_name, &wanted) {
        Ok(leaf) => leaf,
        Err(reason) => {
            if cert_path.exists() {
                tracing::info!(dir = %dir.display(), %reason, "issuing a new host certificate");
            }
            issue_leaf(dir, &ca, host_name, &wanted)?
        }
    };
    Ok(Identity {
        name: host_name.to_owned(),
        ca_cert_pem: to_pem(&ca.cert),
        ca_certs: vec![ca.cert],
        cert_chain,
        key,
    })
}

/// The per-host CA as loaded from disk.
struct Ca {
    cert: CertificateDer<'static>,
    info: der::CertInfo,
    key: KeyPair,
}

fn load_or_create_ca(dir: &Path, host_name: &str) -> Result<Ca, TransportError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !cert_path.exists() {
        // The key is written before the certificate, so a CA without certificate was never
        // shown to anyone: (re)creating it loses nothing.
        let key = new_key()?;
        let cert = ca_params(&format!("Understudy host CA {host_name}"))
            .self_signed(&key)
            .map_err(gen_err)?;
        crashsafe::write_file(&key_path, key.serialize_pem().as_bytes(), MODE_SECRET)?;
        crashsafe::write_file(&cert_path, cert.pem().as_bytes(), MODE_PUBLIC)?;
        tracing::info!(dir = %dir.display(), "created host CA");
    }
    let damaged = |reason: String| TransportError::DamagedIdentity {
        dir: dir.to_owned(),
        reason,
    };
    let certs = read_certs(&cert_path)?;
    let cert = certs
        .into_iter()
        .next()
        .ok_or_else(|| TransportError::NoCertificate {
            path: cert_path.clone(),
        })?;
    let info = der::parse_certificate(cert.as_ref())
        .ok_or_else(|| damaged(format!("{CA_CERT_FILE} is not a readable certificate")))?;
    if !key_path.exists() {
        return Err(damaged(format!(
            "{CA_CERT_FILE} exists but {CA_KEY_FILE} is missing; restore it from backup \
             (creating a new CA would break every peer that trusts this host)"
        )));
    }
    let key_pem =
        std::fs::read_to_string(&key_path).map_err(|e| TransportError::io("read", &key_path, e))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TransportError::InvalidPem {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    check_key_matches(
        std::slice::from_ref(&cert),
        &PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| damaged(e.to_owned()))?,
        &cert_path,
    )
    .map_err(|_| damaged(format!("{CA_KEY_FILE} does not belong to {CA_CERT_FILE}")))?;
    Ok(Ca { cert, info, key })
}

/// Loads the leaf if it is usable as is; `Err` says why it must be re-issued.
fn load_leaf(
    cert_path: &Path,
    key_path: &Path,
    ca: &Ca,
    host_name: &str,
    wanted: &[SanType],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    if !cert_path.exists() || !key_path.exists() {
        return Err("host certificate or key missing".to_owned());
    }
    let chain = read_certs(cert_path).map_err(|e| e.to_string())?;
    let key = read_key(key_path).map_err(|e| e.to_string())?;
    check_key_matches(&chain, &key, cert_path).map_err(|e| e.to_string())?;
    let info = der::parse_certificate(chain[0].as_ref())
        .ok_or_else(|| "host certificate is not readable".to_owned())?;
    if info.issuer_raw != ca.info.subject_raw {
        return Err("host certificate was not issued by this host's CA".to_owned());
    }
    if info.subject_cn.as_deref() != Some(host_name) {
        return Err(format!(
            "host name changed from {:?} to {host_name:?}",
            info.subject_cn.unwrap_or_default()
        ));
    }
    for name in wanted {
        let covered = match name {
            SanType::DnsName(dns) => info
                .dns_sans
                .iter()
                .any(|d| d.eq_ignore_ascii_case(dns.as_str())),
            SanType::IpAddress(ip) => info.ip_sans.contains(ip),
            _ => true,
        };
        if !covered {
            return Err(format!("host certificate does not cover {name:?}"));
        }
    }
    Ok((chain, key))
}

fn issue_leaf(
    dir: &Path,
    ca: &Ca,
    host_name: &str,
    wanted: &[SanType],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TransportError> {
    let damaged = |reason: String| TransportError::DamagedIdentity {
        dir: dir.to_owned(),
        reason,
    };
    // rcgen signs with the issuer's name and key; rebuild the CA's parameters from the stored
    // certificate's common name so the leaf's issuer matches the stored CA byte for byte.
    let ca_cn = ca
        .info
        .subject_cn
        .clone()
        .ok_or_else(|| damaged(format!("{CA_CERT_FILE} has no common name")))?;
    let issuer = ca_params(&ca_cn).self_signed(&ca.key).map_err(gen_err)?;

    let mut params = CertificateParams::default();
    set_validity(&mut params);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, host_name);
    params.subject_alt_names = wanted.to_vec();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = new_key()?;
    let cert = params.signed_by(&key, &issuer, &ca.key).map_err(gen_err)?;
    let info = der::parse_certificate(cert.der().as_ref())
        .ok_or_else(|| damaged("generated certificate is unreadable".to_owned()))?;
    if info.issuer_raw != ca.info.subject_raw {
        return Err(damaged(format!(
            "{CA_CERT_FILE} was not created by Understudy; cannot issue a host certificate \
             from it (use --cert/--key instead)"
        )));
    }
    // Key before certificate: a crash in between leaves a pair that fails the key check at
    // the next start and is simply re-issued.
    crashsafe::write_file(
        &dir.join(HOST_KEY_FILE),
        key.serialize_pem().as_bytes(),
        MODE_SECRET,
    )?;
    crashsafe::write_file(
        &dir.join(HOST_CERT_FILE),
        cert.pem().as_bytes(),
        MODE_PUBLIC,
    )?;
    let key_der =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| damaged(e.to_owned()))?;
    Ok((vec![cert.der().clone()], key_der))
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    set_validity(&mut params);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    // pathlen 0: this CA signs host certificates only, never other CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Sets a validity window of [`VALIDITY_YEARS`] starting [`BACKDATE_YEARS`] ago.
fn set_validity(params: &mut CertificateParams) {
    // Calendar precision is irrelevant here: the window is a century wide.
    const SECS_PER_YEAR: u64 = 31_556_952;
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let year = 1970 + i32::try_from(now_secs / SECS_PER_YEAR).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year - BACKDATE_YEARS, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALIDITY_YEARS, 1, 1);
}

fn new_key() -> Result<KeyPair, TransportError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)
}

fn gen_err(e: rcgen::Error) -> TransportError {
    TransportError::CertificateGeneration(e.to_string())
}

/// The SANs of our leaf: host name, loopback names, extra names; IP literals as IP SANs.
fn wanted_names(host_name: &str, extra_sans: &[String]) -> Result<Vec<SanType>, TransportError> {
    if host_name.is_empty() {
        return Err(TransportError::InvalidName {
            name: String::new(),
            reason: "the host name is empty".to_owned(),
        });
    }
    let all = std::iter::once(host_name)
        .chain(LOOPBACK_NAMES)
        .chain(extra_sans.iter().map(String::as_str));
    let mut out: Vec<SanType> = Vec::new();
    for name in all {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(TransportError::InvalidName {
                        name: name.to_owned(),
                        reason: "not a DNS name or IP address".to_owned(),
                    });
                }
                let ia5 = rcgen::Ia5String::try_from(name.to_ascii_lowercase()).map_err(|e| {
                    TransportError::InvalidName {
                        name: name.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
                SanType::DnsName(ia5)
            }
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

/// Fails unless `key` is the private key of the first certificate of `chain`.
fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_path: &Path,
) -> Result<(), TransportError> {
    let provider = crate::tls::provider();
    CertifiedKey::from_der(chain.to_vec(), key.clone_key(), &provider)
        .map(|_| ())
        .map_err(|e| TransportError::InvalidPem {
            path: cert_path.to_owned(),
            reason: format!("the private key does not match this certificate ({e})"),
        })
}

#[cfg(test)]
mod tests;
