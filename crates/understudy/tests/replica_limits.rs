//! The replica side under pressure: a small file-descriptor limit, a broken replica store, a
//! damaged journal. Real daemons on loopback, real tools.

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;

/// The AUDIT's reproduction limit (stands in for 1024 with ~16 VMs).
const NOFILE: &str = "256";
/// Replica VMs, and points per VM: past the 64 retained points, and enough for the old code
/// (one descriptor per retained journal file) to run out of descriptors under `NOFILE` (it
/// failed at point 59 of the first VM; 3 VMs × 63 retained files fit).
const FD_VMS: usize = 4;
const FD_POINTS: usize = 70;

fn nbd_read_ok(uri: &str) {
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(uri));
}

/// Regression (AUDIT §1): the replica held one descriptor per retained journal file, so under
/// a 256-descriptor limit commits failed for good once about 230 journal files were retained,
/// and on a host that is also a primary, NBD connections failed too. Now journal files go
/// through a bounded cache: every sync succeeds and the host's own VM stays reachable.
#[test]
fn replica_under_small_fd_limit_commits_every_cycle_and_keeps_serving_nbd() {
    require("qemu-io", "qemu-utils");
    require("prlimit", "util-linux");
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let a = Host::start(root.path(), "primary");
    let b = Host::start(root.path(), "replica");
    let pid = b.pid().unwrap().to_string();
    sh(Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={NOFILE}:{NOFILE}")]));
    trust_each_other(&a, &b);
    enable_replica_server(&b);
    // The replica host is also a primary.
    b.ok(&["vm", "create", "local", "--disk", "4M"]);
    let local = b.nbd_uri("local", 0);
    nbd_read_ok(&local);

    let vms: Vec<String> = (0..FD_VMS).map(|i| format!("vm{i}")).collect();
    for vm in &vms {
        replicate(&a, &b, vm, &["4M"], 3600);
    }
    let uris: Vec<String> = vms.iter().map(|vm| a.nbd_uri(vm, 0)).collect();
    for p in 2..=FD_POINTS {
        for (vm, uri) in vms.iter().zip(&uris) {
            // A point with a DATA frame (the old index held a descriptor only for those).
            let write = format!("write -P {} {} 4k", p % 250, p * 4096);
            sh(Command::new("qemu-io")
                .args(["-f", "raw", "-c", &write])
                .arg(uri));
            let out = a.run(&["replication", "sync", vm]);
            assert!(
                out.status.success(),
                "sync of {vm} failed at point {p}: {}\n--- replica log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&b.log(), 20)
            );
        }
        if p % 10 == 0 {
            nbd_read_ok(&local);
        }
    }
    nbd_read_ok(&local);
    for vm in &vms {
        let st = a.json(&["replication", "status", vm]);
        assert_eq!(st["last_seq"], FD_POINTS as u64, "{st}");
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let journal = std::fs::read_dir(b.dir.join("storage/vm0/journal"))
        .unwrap()
        .count();
    eprintln!(
        "took {:?}; replica has {fds} fds open, {journal} journal files of vm0; {}",
        started.elapsed(),
        limits
            .lines()
            .find(|l| l.contains("open files"))
            .unwrap_or("")
    );
}

/// Regression (AUDIT §11): a journal frame found damaged at runtime (an export of that point
/// fails its checksum) made the replica Critical, but the primary kept shipping increments,
/// the replica kept committing them on the damaged chain, and the primary showed Normal. Now
/// the next cycle is refused `damaged`, the primary requires a resynchronization naming the
/// damage, and `replication resume --resynchronize` repairs it.
#[test]
fn damage_found_on_the_replica_reaches_the_primary_on_the_next_cycle() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
        "--compression",
        "none",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 5 0 1M"]);
    let point = a.json(&["replication", "sync", "web"])["seq"]
        .as_u64()
        .unwrap();
    // Flip a payload byte of that point's 1 MiB DATA frame.
    let jfile = b
        .dir
        .join("storage/web/journal")
        .join(format!("{point:020}.delta"));
    let mut bytes = std::fs::read(&jfile).unwrap();
    assert!(bytes.len() > 1 << 20, "{} bytes", bytes.len());
    bytes[4096] ^= 0xff;
    std::fs::write(&jfile, &bytes).unwrap();
    let out = b.run(&[
        "points",
        "export",
        "web",
        "--point",
        &point.to_string(),
        "--to",
        root.path().join("x.raw").to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "export of a damaged point succeeded");
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(st["health"], "Critical", "{st}");

    qemu_io_ok(&uri, &["write -P 6 1M 4k"]);
    let out = a.run(&["replication", "sync", "web"]);
    assert!(
        !out.status.success(),
        "sync committed on a damaged chain: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    let reason = st["resync_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("damaged"), "{st}");
    assert_eq!(point_ids(&b, "web").last().copied(), Some(point));

    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    sync_until_ok(&a, "web", 10);
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(st["health"], "Normal", "{st}");
    assert!(
        latest_equals_primary(&a, &b, "web", 0, root.path()),
        "after the resync the newest point differs from the primary"
    );
}

/// Regression (AUDIT §5, replica half): the daemon opened and fully verified the replica store
/// before its NBD server started, and a store-level error stopped the daemon, so a failing
/// replica disk took the host's primary VMs offline. Now the store opens in the background;
/// one that cannot be opened is reported, and the primary VM is served.
#[test]
fn broken_replica_storage_never_takes_the_primary_vms_offline() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let mut h = Host::start(root.path(), "both");
    let storage = h.dir.join("storage");
    h.ok(&[
        "replica-server",
        "enable",
        "--storage",
        storage.to_str().unwrap(),
    ]);
    h.ok(&["vm", "create", "local", "--disk", "4M"]);
    qemu_io_ok(&h.nbd_uri("local", 0), &["write -P 7 0 4k"]);
    h.stop();
    // The storage is gone and something else is at its path.
    std::fs::remove_dir_all(&storage).unwrap();
    std::fs::write(&storage, b"not a directory").unwrap();
    h.restart();
    qemu_io_ok(&h.nbd_uri("local", 0), &["read -P 7 0 4k"]);
    wait_until(
        "the store to be reported unavailable",
        std::time::Duration::from_secs(20),
        || {
            let cfg = h.json(&["replica-server", "show"]);
            cfg["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("unavailable"))
        },
    );
    let cfg = h.json(&["replica-server", "show"]);
    let status = cfg["status"].as_str().unwrap();
    assert!(status.contains(storage.to_str().unwrap()), "{status}");
    assert!(
        events(&h).iter().any(|e| e["id"] == 3003),
        "no replica-store-unavailable event"
    );
}

fn store_status(h: &Host) -> String {
    h.json(&["replica-server", "show"])["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Regression (AUDIT §14): at start the daemon ran `create_dir_all(storage)`, so a storage
/// mount that was missing silently became an empty store on the root file system, and the
/// primaries went to "resync required". Now the store carries a marker: a missing directory,
/// or one without the marker (an empty mount point), is refused with the reason and nothing is
/// created in it; the host's primary VM keeps serving; the store opens again once mounted.
#[test]
fn unmounted_replica_storage_is_refused_never_recreated() {
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["4M"], 3600);
    b.ok(&["vm", "create", "local", "--disk", "4M"]);
    let storage = b.dir.join("storage");
    let marker = storage.join("understudy-store.json");
    assert!(marker.is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&storage.join("web")), 0o700);
    assert_eq!(mode(&storage.join("web/base/disk-0.raw")), 0o600);

    // "Unmount": the file system is away and its mount point is an empty directory.
    b.stop();
    let away = root.path().join("storage-away");
    std::fs::rename(&storage, &away).unwrap();
    std::fs::create_dir(&storage).unwrap();
    b.restart();
    qemu_io_ok(&b.nbd_uri("local", 0), &["read 0 4k"]);
    wait_until(
        "the store to be refused",
        std::time::Duration::from_secs(20),
        || store_status(&b).starts_with("unavailable"),
    );
    assert!(
        store_status(&b).contains("no store marker"),
        "{}",
        store_status(&b)
    );
    assert_eq!(
        std::fs::read_dir(&storage).unwrap().count(),
        0,
        "the empty mount point was written to"
    );
    let out = a.run(&["replication", "sync", "web"]);
    assert!(!out.status.success());
    let st = a.json(&["replication", "status", "web"]);
    assert_ne!(st["state"], "ResynchronizationRequired", "{st}");

    // The directory itself is missing: refused too, and not created.
    b.stop();
    std::fs::remove_dir(&storage).unwrap();
    b.restart();
    wait_until(
        "the store to be refused",
        std::time::Duration::from_secs(20),
        || store_status(&b).contains("does not exist"),
    );
    assert!(
        !storage.exists(),
        "the missing storage directory was recreated"
    );

    // "Mounted" again: the store opens with its points, and replication goes on.
    b.stop();
    std::fs::rename(&away, &storage).unwrap();
    b.restart();
    wait_until(
        "the store to open",
        std::time::Duration::from_secs(20),
        || store_status(&b) == "open",
    );
    sync_until_ok(&a, "web", 10);
    assert_eq!(
        a.json(&["replication", "status", "web"])["state"],
        "Replicating"
    );
}
