//! PEM reading and writing for certificates and private keys, with errors that name the file.
//!
//! It owns text <-> DER only: no validation beyond "this is a well-formed PEM block of the
//! right kind" (chains are validated by rustls/webpki), and it never writes files.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TransportError;

/// Largest certificate or key file we read. Real ones are a few KiB; a bundle of a few hundred
/// CA certificates stays under 1 MiB. Bounds memory when handed a disk image by mistake.
pub(crate) const PEM_FILE_BYTES_MAX: u64 = 4 << 20;

/// Reads a file of at most [`PEM_FILE_BYTES_MAX`] bytes.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, TransportError> {
    read_bounded_to(path, PEM_FILE_BYTES_MAX)
}

/// Reads a file of at most `max` bytes (bounded read, even if the file grows meanwhile).
pub(crate) fn read_bounded_to(path: &Path, max: u64) -> Result<Vec<u8>, TransportError> {
    use std::io::Read;
    let too_big = |len: u64| TransportError::InvalidPem {
        path: path.to_owned(),
        reason: format!("file is {len} bytes, more than the {max} bytes such a file needs"),
    };
    let file = std::fs::File::open(path).map_err(|e| TransportError::io("read", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| TransportError::io("read", path, e))?
        .len();
    if len > max {
        return Err(too_big(len));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TransportError::io("read", path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// All certificates in a PEM file, in order. Other PEM sections are ignored; a file without
/// any certificate is an error.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = read_bounded(path)?;
    certs_from_pem(&bytes, path)
}

/// Like [`read_certs`] on bytes already read; `path` is for messages.
pub(crate) fn certs_from_pem(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| TransportError::InvalidPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TransportError::NoPrivateKey {
            path: path.to_owned(),
        },
        other => TransportError::InvalidPem {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// PEM text of one certificate (64-column base64, trailing newline).
pub(crate) fn to_pem(cert: &CertificateDer<'_>) -> String {
    let b64 = base64(cert.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input), want);
        }
    }

    #[test]
    fn pem_round_trips_through_the_reader() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let text = to_pem(cert.der());
        assert_eq!(text, cert.pem().replace("\r\n", "\n"));
        let back = certs_from_pem(text.as_bytes(), Path::new("x.pem")).unwrap();
        assert_eq!(back, vec![cert.der().clone()]);
    }

    #[test]
    fn garbage_is_no_certificate() {
        let err = certs_from_pem(b"hello world\n", Path::new("g.pem")).unwrap_err();
        assert!(matches!(err, TransportError::NoCertificate { .. }), "{err}");
    }
}
