//! `serve --cert/--key/--ca`: an admin's own PKI replaces the generated identities. Two hosts
//! with leaf certificates from one CA (made here with openssl) replicate without `trust add`;
//! a host with a certificate from another CA is refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    sh(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA, and a leaf for `name` (CN and DNS SAN, IP SAN 127.0.0.1, server+client auth).
fn issue(dir: &Path, ca: &str, name: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName=DNS:{name},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn make_ca(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{ca}.key"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{ca}.key"),
            "-subj",
            &format!("/CN={ca}"),
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &format!("{ca}.crt"),
        ],
    );
}

#[test]
fn hosts_with_certificates_from_the_admins_ca_replicate() {
    require("openssl", "openssl");
    let root = tempfile::tempdir().unwrap();
    let pki = root.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_ca(&pki, "corp-ca");
    make_ca(&pki, "other-ca");
    issue(&pki, "corp-ca", "alpha");
    issue(&pki, "corp-ca", "beta");
    issue(&pki, "other-ca", "mallory");
    let args = |n: &str, ca: &str| {
        [
            "--cert".to_string(),
            pki.join(format!("{n}.crt")).display().to_string(),
            "--key".to_string(),
            pki.join(format!("{n}.key")).display().to_string(),
            "--ca".to_string(),
            pki.join(format!("{ca}.crt")).display().to_string(),
        ]
    };
    let a_args = args("alpha", "corp-ca");
    let b_args = args("beta", "corp-ca");
    let m_args = args("mallory", "other-ca");
    fn strs(v: &[String; 6]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let a = Host::start_with(root.path(), "alpha", &strs(&a_args));
    let b = Host::start_with(root.path(), "beta", &strs(&b_args));
    let m = Host::start_with(root.path(), "mallory", &strs(&m_args));
    // `identity` prints the admin's CA, not a generated one.
    let ca_pem = std::fs::read_to_string(pki.join("corp-ca.crt")).unwrap();
    assert_eq!(a.ok(&["identity"]).trim(), ca_pem.trim());

    let storage = b.dir.join("storage");
    b.ok(&[
        "replica-server",
        "enable",
        "--storage",
        storage.to_str().unwrap(),
        "--allow",
        "alpha",
        "--allow",
        "mallory",
    ]);
    // Same CA on both sides: no `trust add` needed.
    replicate(&a, &b, "web", &["8M"], 30);
    assert_eq!(
        b.json(&["points", "list", "web"]).as_array().unwrap().len(),
        1
    );

    // Another CA's certificate is refused even though its name is on the allow list.
    m.ok(&["vm", "create", "web2", "--disk", "8M"]);
    let out = m.run(&["replication", "enable", "web2", "--replica", &b.addr()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an untrusted CA was accepted");
    assert!(
        err.contains("trust") || err.contains("certificate"),
        "unclear refusal: {err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "error must be one line: {err}"
    );
}
