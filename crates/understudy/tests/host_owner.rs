//! The host's command owner: host-level changes are handled one at a time, so concurrent
//! requests never interleave; the API maps the host's typed errors (409 for "already exists",
//! 400 for invalid input, 404 for unknown things).

mod common;

use std::process::Command;

use common::*;

/// Regression (REVIEW-ARCHITECTURE: "two concurrent `vm create` of one name can delete the
/// first VM's images"): eight creates of one name at once give one VM, whose images are
/// intact and served, and seven one-line conflicts.
#[test]
fn concurrent_creates_of_one_name_leave_one_vm_and_its_images() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let a = Host::start(root.path(), "a");
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| a.run(&["vm", "create", "web", "--disk", "64M"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one create wins");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("already exists"), "{err}");
    }
    // The winner's image is there and takes I/O.
    assert!(disk_path(&a, "web", 0).exists());
    qemu_io_ok(
        &a.nbd_uri("web", 0),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    let list = a.json(&["vm", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// Two `replication enable` of one VM at once: one relationship, one conflict (before the
/// command owner both passed the check, both said hello, and the second overwrote the first's
/// record and key while its task kept running).
#[test]
fn concurrent_enables_of_one_vm_make_one_relationship() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "4M"]);
    let addr = b.addr();
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    a.run(&[
                        "replication",
                        "enable",
                        "web",
                        "--replica",
                        &addr,
                        "--frequency",
                        "3600",
                    ])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one enable wins");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        // Refused by this host's owner ("already enabled"), or earlier by the replica, which
        // already holds the winner's relationship ("already exists"). Never both installed.
        assert!(
            err.contains("already enabled") || err.contains("already exists"),
            "{err}"
        );
    }
    a.ok(&["replication", "start", "web", "--wait"]);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "Replicating", "{st}");
}

/// The API's status codes come from the host's error kinds, never a default 422.
#[test]
fn api_status_codes_follow_the_error_kind() {
    require("curl", "curl");
    let root = tempfile::tempdir().unwrap();
    let a = Host::start(root.path(), "a");
    a.ok(&["vm", "create", "web", "--disk", "4M"]);
    let sock = a.dir.join("api.sock");
    let call = |method: &str, path: &str, body: &str| -> u16 {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
            ])
            .arg(&sock)
            .args([
                "-X",
                method,
                "-H",
                "content-type: application/json",
                "-d",
                body,
            ])
            .arg(format!("http://localhost{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let create = |name: &str| format!(r#"{{"name":"{name}","disk_sizes_bytes":[4194304]}}"#);
    assert_eq!(
        call("POST", "/v1/vms", &create("web")),
        409,
        "already exists"
    );
    assert_eq!(
        call("POST", "/v1/vms", &create("../x")),
        400,
        "invalid name"
    );
    assert_eq!(call("POST", "/v1/vms", "{not json"), 400, "malformed body");
    assert_eq!(call("GET", "/v1/vms/nope", ""), 404, "unknown VM");
    assert_eq!(
        call("POST", "/v1/vms/web/replication/start", "{}"),
        409,
        "not enabled"
    );
    assert_eq!(call("GET", "/v1/nothing-here", ""), 404, "unknown route");
}
