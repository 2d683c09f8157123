use std::os::unix::fs::PermissionsExt;

use super::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn first_start_creates_ca_and_leaf_with_requested_names_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let id_dir = dir.path().join("identity");
    let extra = vec!["10.1.2.3".to_owned(), "Replica.Example.COM".to_owned()];
    let id = load_or_create(&id_dir, "host-a", &extra).unwrap();

    assert_eq!(id.name, "host-a");
    assert!(id.ca_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert_eq!(mode(&id_dir.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&id_dir.join(HOST_KEY_FILE)), 0o600);
    assert_eq!(mode(&id_dir.join(CA_CERT_FILE)), 0o644);
    assert_eq!(mode(&id_dir.join(HOST_CERT_FILE)), 0o644);

    let ca = der::parse_certificate(id.ca_certs[0].as_ref()).unwrap();
    assert_eq!(ca.subject_cn.as_deref(), Some("Understudy host CA host-a"));
    let leaf = der::parse_certificate(id.cert_chain[0].as_ref()).unwrap();
    assert_eq!(leaf.subject_cn.as_deref(), Some("host-a"));
    assert_eq!(leaf.issuer_raw, ca.subject_raw);
    assert_eq!(
        leaf.dns_sans,
        vec!["host-a", "localhost", "replica.example.com"]
    );
    let ips: Vec<IpAddr> = ["127.0.0.1", "::1", "10.1.2.3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(leaf.ip_sans, ips);
    assert_eq!(peer_name(&id.cert_chain[0]).as_deref(), Some("host-a"));
}

#[test]
fn second_start_loads_the_same_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let first = load_or_create(dir.path(), "host-a", &[]).unwrap();
    let second = load_or_create(dir.path(), "host-a", &[]).unwrap();
    assert_eq!(first.ca_cert_pem, second.ca_cert_pem);
    assert_eq!(first.cert_chain, second.cert_chain);
    assert_eq!(first.key.secret_der(), second.key.secret_der());
}

#[test]
fn new_names_reissue_the_leaf_but_keep_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = load_or_create(dir.path(), "host-a", &[]).unwrap();
    let second = load_or_create(dir.path(), "host-a", &["10.9.9.9".to_owned()]).unwrap();
    assert_eq!(
        first.ca_cert_pem, second.ca_cert_pem,
        "CA must never change"
    );
    assert_ne!(first.cert_chain, second.cert_chain);
    let leaf = der::parse_certificate(second.cert_chain[0].as_ref()).unwrap();
    assert!(leaf.ip_sans.contains(&"10.9.9.9".parse().unwrap()));
    // Removing the extra name again does not churn: the leaf still covers what is asked.
    let third = load_or_create(dir.path(), "host-a", &[]).unwrap();
    assert_eq!(second.cert_chain, third.cert_chain);
}

#[test]
fn crash_between_leaf_key_and_cert_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let first = load_or_create(dir.path(), "host-a", &[]).unwrap();
    // Simulate a crash after a re-issue wrote host.key but not host.crt.
    let other_key = KeyPair::generate().unwrap();
    std::fs::write(dir.path().join(HOST_KEY_FILE), other_key.serialize_pem()).unwrap();
    let second = load_or_create(dir.path(), "host-a", &[]).unwrap();
    assert_eq!(first.ca_cert_pem, second.ca_cert_pem);
    check_key_matches(&second.cert_chain, &second.key, Path::new("x")).unwrap();
}

#[test]
fn missing_ca_key_is_an_error_not_a_new_ca() {
    let dir = tempfile::tempdir().unwrap();
    load_or_create(dir.path(), "host-a", &[]).unwrap();
    std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
    let err = load_or_create(dir.path(), "host-a", &[]).unwrap_err();
    assert!(
        matches!(err, TransportError::DamagedIdentity { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ca.key is missing"), "{err}");
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load_or_create(dir.path(), "", &[]).is_err());
    let err = load_or_create(dir.path(), "host-a", &["has space".to_owned()]).unwrap_err();
    assert!(matches!(err, TransportError::InvalidName { .. }), "{err}");
}

#[test]
fn from_files_loads_an_admin_pki_and_rejects_a_foreign_key() {
    let dir = tempfile::tempdir().unwrap();
    let made = load_or_create(&dir.path().join("id"), "host-b", &[]).unwrap();
    let cert = dir.path().join("id").join(HOST_CERT_FILE);
    let key = dir.path().join("id").join(HOST_KEY_FILE);
    let ca = dir.path().join("id").join(CA_CERT_FILE);

    let id = Identity::from_files(&cert, &key, Some(&ca)).unwrap();
    assert_eq!(id.name, "host-b");
    assert_eq!(id.ca_cert_pem, made.ca_cert_pem);
    assert_eq!(id.cert_chain, made.cert_chain);

    let without_ca = Identity::from_files(&cert, &key, None).unwrap();
    assert_eq!(
        without_ca.ca_certs, made.cert_chain,
        "top of the chain is trusted"
    );

    let foreign = dir.path().join("foreign.key");
    std::fs::write(&foreign, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let err = Identity::from_files(&cert, &foreign, None).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    let err = Identity::from_files(&cert, &cert, None).unwrap_err();
    assert!(matches!(err, TransportError::NoPrivateKey { .. }), "{err}");
}
