//! Trust is scoped (AUDIT §8): a trusted CA vouches only for the peer names it was paired with
//! and only for the role it was trusted as, a primary reaches only the replica identity it set
//! the relationship up with, and a replica VM answers only the primary identity that created
//! it. Certificates are minted with openssl from another trusted host's real CA key.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// Mints, from host `issuer`'s own CA (`identity/ca.crt` + `ca.key`), a leaf for `name`
/// (CN and DNS SAN, IP SAN 127.0.0.1, client and server auth). Returns (cert, key).
fn mint(issuer: &Host, name: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}-by-{}.key", issuer.name));
    let csr = dir.join(format!("{name}-by-{}.csr", issuer.name));
    let crt = dir.join(format!("{name}-by-{}.crt", issuer.name));
    let ext = dir.join(format!("{name}-by-{}.ext", issuer.name));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:{name},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
        ),
    )
    .unwrap();
    sh(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ]));
    let ca = issuer.dir.join("identity");
    sh(Command::new("openssl")
        .args(["x509", "-req", "-in", csr.to_str().unwrap()])
        .args([
            "-CA",
            ca.join("ca.crt").to_str().unwrap(),
            "-CAkey",
            ca.join("ca.key").to_str().unwrap(),
            "-CAcreateserial",
            "-CAserial",
            dir.join("serial").to_str().unwrap(),
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ]));
    (crt, key)
}

/// curl with a client certificate against `replica`'s peer port; returns (HTTP code or 0 when
/// no HTTP answer came, body). A refusal sent before the request body was read ends the
/// HTTP/2 stream early, which curl now and then reports as a transfer error with no code:
/// such an attempt is made again (at most 3 times); any HTTP answer is returned as is.
fn curl(
    replica: &Host,
    cert: &Path,
    key: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut answer = (0, String::new());
    for _ in 0..3 {
        answer = curl_once(replica, cert, key, method, path, body);
        if answer.0 != 0 {
            break;
        }
    }
    answer
}

fn curl_once(
    replica: &Host,
    cert: &Path,
    key: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let out: Output = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "20", "-X", method])
        .args(["-H", "content-type: application/json"])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--cacert")
        .arg(replica.dir.join("identity.pem"))
        .args(if body.is_empty() {
            vec![]
        } else {
            vec!["--data-binary", body]
        })
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://127.0.0.1:{}{path}", replica.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn hello_body(vm: &str, primary: &str) -> String {
    format!(
        r#"{{"vm":"{vm}","replication_id":"x","generation":1,"primary_host":"{primary}","disks":[{{"index":0,"size_bytes":4096}}]}}"#
    )
}

/// `to` trusts `from`'s CA with extra `trust add` arguments (`--as ROLE`, `--name NAME`).
fn trust_as(to: &Host, from: &Host, extra: &[&str]) {
    let f = to.dir.join(format!("{}.pem", from.name));
    std::fs::write(&f, from.ok(&["identity"])).unwrap();
    let mut args = vec!["trust", "add", f.to_str().unwrap()];
    args.extend_from_slice(extra);
    to.ok(&args);
}

fn enable_replica_server(h: &Host, allow: &[&str]) {
    let storage = h.dir.join("storage");
    let mut args = vec![
        "replica-server",
        "enable",
        "--storage",
        storage.to_str().unwrap(),
    ];
    for a in allow {
        args.extend(["--allow", a]);
    }
    h.ok(&args);
}

#[test]
fn another_trusted_hosts_ca_cannot_mint_an_allowed_primarys_name() {
    require("openssl", "openssl");
    require("curl", "curl");
    let root = tempfile::tempdir().unwrap();
    let (p, r) = pair(root.path());
    // X is trusted by the replica (it replicates there too) but not on the allow list.
    let x = Host::start(root.path(), "x");
    trust_each_other(&x, &r);
    enable_replica_server(&r, &["primary"]);

    // Control: the real primary's certificate is accepted by this very curl call.
    let real = (
        p.dir.join("identity/host.crt"),
        p.dir.join("identity/host.key"),
    );
    let (code, body) = curl(
        &r,
        &real.0,
        &real.1,
        "POST",
        "/v1/replicas/real/hello",
        &hello_body("real", "primary"),
    );
    assert_eq!(code, 200, "the real primary must be accepted: {body}");

    // X mints `CN=primary` from its own (trusted) CA: the audit's allow-list bypass.
    let (crt, key) = mint(&x, "primary", root.path());
    let (code, body) = curl(
        &r,
        &crt,
        &key,
        "POST",
        "/v1/replicas/squat/hello",
        &hello_body("squat", "primary"),
    );
    assert_ne!(
        code, 200,
        "a name minted by another trusted CA was accepted: {body}"
    );
    let (code, _) = curl(&r, &crt, &key, "GET", "/v1/replicas/real/state", "");
    assert_ne!(
        code, 200,
        "a name minted by another trusted CA read a VM's state"
    );
    let log = r.log();
    assert!(
        log.contains("pinned to"),
        "the replica logs why: {}",
        tail(&log, 20)
    );
    // Nothing was created for the impostor.
    assert!(!r.run(&["points", "list", "squat"]).status.success());
}

#[test]
fn a_replica_impersonator_is_refused_by_the_primary() {
    require("openssl", "openssl");
    let root = tempfile::tempdir().unwrap();
    let p = Host::start(root.path(), "primary");
    let mut r = Host::start(root.path(), "replica");
    let x = Host::start(root.path(), "x");
    trust_as(&p, &r, &["--as", "replica"]);
    trust_as(&r, &p, &["--as", "primary"]);
    // X replicates to P: P trusts X's CA, but only as a primary.
    trust_as(&p, &x, &["--as", "primary"]);
    enable_replica_server(&r, &["*"]);

    // X mints a server certificate for the replica's name and runs a real replica daemon
    // with it (own-PKI mode), trusting P so it would accept P's deltas.
    let (crt, key) = mint(&x, "replica", root.path());
    let x_ca = x.dir.join("identity/ca.crt");
    let args = [
        "--cert",
        crt.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--ca",
        x_ca.to_str().unwrap(),
    ];
    let impostor = Host::start_with(root.path(), "impostor", &args);
    trust_as(&impostor, &p, &[]);
    enable_replica_server(&impostor, &["*"]);

    p.ok(&["vm", "create", "bait", "--disk", "8M"]);
    let out = p.run(&[
        "replication",
        "enable",
        "bait",
        "--replica",
        &impostor.addr(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "the primary accepted an impersonated replica"
    );
    assert!(err.contains("not trusted to identify a replica"), "{err}");

    // Trusted for both roles, X's CA is still pinned to X's own name.
    trust_as(&p, &x, &["--as", "both"]);
    let out = p.run(&[
        "replication",
        "enable",
        "bait",
        "--replica",
        &impostor.addr(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "the primary accepted an impersonated replica"
    );
    assert!(err.contains("pinned to"), "{err}");
    drop(impostor);

    // The real relationship, then X's own, correctly named certificate (valid for 127.0.0.1,
    // from a CA trusted as a replica) at the replica's address: still not *this* relationship's
    // replica.
    replicate(&p, &r, "web", &["8M"], 3600);
    r.stop();
    let (x_crt, x_key) = (
        x.dir.join("identity/host.crt"),
        x.dir.join("identity/host.key"),
    );
    let x_args = [
        "--cert",
        x_crt.to_str().unwrap(),
        "--key",
        x_key.to_str().unwrap(),
        "--ca",
        x_ca.to_str().unwrap(),
    ];
    let mut squatter = Host::start_with(root.path(), "squatter", &x_args);
    // Moved to the replica's port (a throwaway daemon: no clean stop needed).
    squatter.kill9();
    squatter.port = r.port;
    squatter.restart();
    trust_as(&squatter, &p, &[]);
    enable_replica_server(&squatter, &["*"]);
    let out = p.run(&["replication", "sync", "web"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "the primary synced to another replica"
    );
    assert!(
        err.contains("this relationship's replica is \"replica\""),
        "{err}"
    );
    assert!(!squatter.run(&["points", "list", "web"]).status.success());
    squatter.kill9();
    drop(squatter);
    // The real replica back: replication resumes.
    r.restart();
    sync_until_ok(&p, "web", 20);
}

#[test]
fn another_allowed_primary_cannot_touch_a_replica_it_did_not_create() {
    require("curl", "curl");
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (p, r) = pair(root.path());
    let q = Host::start(root.path(), "q");
    trust_each_other(&q, &r);
    replicate(&p, &r, "web", &["8M"], 3600);

    // Q is trusted and allowed (`*`), and has a VM of the same name.
    q.ok(&["vm", "create", "web", "--disk", "8M"]);
    let out = q.run(&["replication", "enable", "web", "--replica", &r.addr()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "another primary took over web");
    assert!(err.contains("not_owner"), "{err}");

    let (cert, key) = (
        q.dir.join("identity/host.crt"),
        q.dir.join("identity/host.key"),
    );
    let (code, body) = curl(&r, &cert, &key, "GET", "/v1/replicas/web/state", "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not_owner"), "{body}");
    let (code, body) = curl(
        &r,
        &cert,
        &key,
        "PUT",
        "/v1/replicas/web/deltas/2",
        "garbage",
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not_owner"), "{body}");
    let (code, body) = curl(
        &r,
        &cert,
        &key,
        "POST",
        "/v1/replicas/web/hello",
        &hello_body("web", "q"),
    );
    assert_eq!(code, 403, "{body}");

    // The owner is unaffected.
    qemu_io_ok(&p.nbd_uri("web", 0), &["write -q -P 9 0 64k"]);
    p.ok(&["replication", "sync", "web"]);
    assert!(latest_equals_primary(&p, &r, "web", 0, root.path()));
    let (code, body) = curl(
        &r,
        &p.dir.join("identity/host.crt"),
        &p.dir.join("identity/host.key"),
        "GET",
        "/v1/replicas/web/state",
        "",
    );
    assert_eq!(code, 200, "{body}");
}
