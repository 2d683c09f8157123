//! A minimal, read-only X.509 reader: just enough DER to pull the subject common name, the
//! issuer and subject names (raw) and the subject alternative names out of a certificate.
//!
//! It owns nothing but parsing. It never verifies signatures or validity (rustls/webpki does
//! that during the handshake) and it must never panic or allocate unboundedly on hostile bytes:
//! every length is checked against the remaining input, and anything it does not understand
//! yields `None` rather than a guess.

use std::net::IpAddr;

/// DER tags used below (universal class unless noted).
const TAG_BOOLEAN: u8 = 0x01;
const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
/// `[0] EXPLICIT Version` in TBSCertificate.
const TAG_VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const TAG_EXTENSIONS: u8 = 0xa3;
/// GeneralName `dNSName [2] IMPLICIT IA5String`.
const TAG_SAN_DNS: u8 = 0x82;
/// GeneralName `iPAddress [7] IMPLICIT OCTET STRING`.
const TAG_SAN_IP: u8 = 0x87;

/// OID 2.5.4.3 (id-at-commonName), content bytes only.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// OID 2.5.29.17 (id-ce-subjectAltName), content bytes only.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Longest DER length field we accept: 4 bytes covers any certificate we could meet.
const LENGTH_BYTES_MAX: usize = 4;

/// What [`parse_certificate`] extracts from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CertInfo {
    /// Raw DER of the issuer `Name` (to compare with a CA's subject byte for byte).
    pub issuer_raw: Vec<u8>,
    /// Raw DER of the subject `Name`.
    pub subject_raw: Vec<u8>,
    /// The first common name of the subject, if it is a string type we can read.
    pub subject_cn: Option<String>,
    /// `dNSName` entries of the subject alternative name extension, in order.
    pub dns_sans: Vec<String>,
    /// `iPAddress` entries of the subject alternative name extension, in order.
    pub ip_sans: Vec<IpAddr>,
}

/// One DER element: tag, content, and the whole encoding (header + content).
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    raw: &'a [u8],
}

/// Reads one element from the front of `input`, returning it and the rest.
fn read_tlv(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, after_tag) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        // High tag numbers never occur in the structures we read.
        return None;
    }
    let (&first, mut rest) = after_tag.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > LENGTH_BYTES_MAX || rest.len() < count {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..count] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[count..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let header_len = input.len() - rest.len();
    let tlv = Tlv {
        tag,
        content: &rest[..len],
        raw: &input[..header_len + len],
    };
    Some((tlv, &rest[len..]))
}

/// Reads one element that must carry `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(Tlv<'_>, &[u8])> {
    let (tlv, rest) = read_tlv(input)?;
    (tlv.tag == tag).then_some((tlv, rest))
}

/// Parses a DER certificate. `None` means "not a certificate we can read".
pub(crate) fn parse_certificate(der: &[u8]) -> Option<CertInfo> {
    let (cert, _) = expect(der, TAG_SEQUENCE)?;
    let (tbs, _) = expect(cert.content, TAG_SEQUENCE)?;
    let mut rest = tbs.content;
    if let Some((tlv, after)) = read_tlv(rest) {
        if tlv.tag == TAG_VERSION {
            rest = after;
        }
    }
    let (_serial, rest) = expect(rest, TAG_INTEGER)?;
    let (_sig_alg, rest) = expect(rest, TAG_SEQUENCE)?;
    let (issuer, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_validity, rest) = expect(rest, TAG_SEQUENCE)?;
    let (subject, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_spki, mut rest) = expect(rest, TAG_SEQUENCE)?;

    let mut info = CertInfo {
        issuer_raw: issuer.raw.to_vec(),
        subject_raw: subject.raw.to_vec(),
        subject_cn: common_name(subject.content),
        ..CertInfo::default()
    };
    // Optional issuerUniqueID [1], subjectUniqueID [2], then extensions [3].
    while let Some((tlv, after)) = read_tlv(rest) {
        rest = after;
        if tlv.tag == TAG_EXTENSIONS {
            read_extensions(tlv.content, &mut info)?;
        }
    }
    Some(info)
}

/// The first readable common name in a `Name` (SEQUENCE OF SET OF AttributeTypeAndValue).
fn common_name(mut rdns: &[u8]) -> Option<String> {
    while let Some((set, after)) = expect(rdns, TAG_SET) {
        rdns = after;
        let mut attrs = set.content;
        while let Some((attr, after_attr)) = expect(attrs, TAG_SEQUENCE) {
            attrs = after_attr;
            let Some((oid, value)) = expect(attr.content, TAG_OID) else {
                continue;
            };
            if oid.content != OID_COMMON_NAME {
                continue;
            }
            let (value, _) = read_tlv(value)?;
            return match value.tag {
                TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING => {
                    std::str::from_utf8(value.content).ok().map(str::to_owned)
                }
                _ => None,
            };
        }
    }
    None
}

/// Walks `Extensions ::= SEQUENCE OF Extension` and fills in the SANs.
fn read_extensions(content: &[u8], info: &mut CertInfo) -> Option<()> {
    let (list, _) = expect(content, TAG_SEQUENCE)?;
    let mut rest = list.content;
    while let Some((ext, after)) = expect(rest, TAG_SEQUENCE) {
        rest = after;
        let (oid, mut fields) = expect(ext.content, TAG_OID)?;
        if let Some((critical, after_critical)) = expect(fields, TAG_BOOLEAN) {
            let _ = critical;
            fields = after_critical;
        }
        let (value, _) = expect(fields, TAG_OCTET_STRING)?;
        if oid.content == OID_SUBJECT_ALT_NAME {
            read_sans(value.content, info)?;
        }
    }
    Some(())
}

/// Reads `GeneralNames ::= SEQUENCE OF GeneralName`, keeping DNS names and IP addresses.
fn read_sans(content: &[u8], info: &mut CertInfo) -> Option<()> {
    let (names, _) = expect(content, TAG_SEQUENCE)?;
    let mut rest = names.content;
    while let Some((name, after)) = read_tlv(rest) {
        rest = after;
        match name.tag {
            TAG_SAN_DNS => {
                if let Ok(dns) = std::str::from_utf8(name.content) {
                    info.dns_sans.push(dns.to_owned());
                }
            }
            TAG_SAN_IP => {
                if let Ok(v4) = <[u8; 4]>::try_from(name.content) {
                    info.ip_sans.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(name.content) {
                    info.ip_sans.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["node-a".to_owned(), "10.0.0.7".to_owned()])
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-a");
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_cn_and_sans_of_an_rcgen_certificate() {
        let info = parse_certificate(&sample()).unwrap();
        assert_eq!(info.subject_cn.as_deref(), Some("node-a"));
        assert_eq!(info.dns_sans, vec!["node-a".to_owned()]);
        assert_eq!(info.ip_sans, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.issuer_raw, info.subject_raw, "self-signed");
    }

    #[test]
    fn every_truncation_and_garbage_is_rejected_without_panicking() {
        let der = sample();
        for len in 0..der.len() {
            assert!(parse_certificate(&der[..len]).is_none(), "prefix {len}");
        }
        assert!(parse_certificate(b"\x30\x84\xff\xff\xff\xff").is_none());
        assert!(parse_certificate(b"\x30\x89\x01\x02\x03\x04\x05\x06\x07\x08\x09").is_none());
        assert!(parse_certificate(b"hello").is_none());
    }
}
