//! Initial replication by every route the seed names besides the network: from an existing
//! copy on the replica (`replication start --use-existing`: the resync engine compares it and
//! sends only the blocks that differ), scheduled (`replication start --at`), and from external
//! media (`replication start --to-media` / `replication import-media`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Where the replica host's admin puts existing copies: `+existing` in its storage directory
/// (created here).
fn existing_dir(b: &Host) -> std::path::PathBuf {
    let d = b.dir.join("storage").join("+existing");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A VM with 40 MiB of data on a 64 MiB disk, enabled for replication to `b`, not started.
fn vm_with_data(a: &Host, b: &Host) {
    a.ok(&["vm", "create", "web", "--disk", "64M"]);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 1 0 40M", "flush"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
}

/// The seed's "use an existing virtual machine on the replica server as the initial copy": a
/// copy of the disk taken earlier (the primary changed since) is adopted on the replica, and
/// only the blocks that differ cross the network, not the 40 MiB of data.
#[test]
fn start_from_an_existing_copy_sends_only_the_blocks_that_differ() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    vm_with_data(&a, &b);
    // The copy on the replica host (both daemons share this machine), where its admin puts
    // existing copies.
    let copy = existing_dir(&b).join("web-0.raw");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(disk_path(&a, "web", 0))
        .arg(&copy));
    // The primary goes on after the copy: 3 scattered blocks and 1 MiB.
    qemu_io_ok(
        &a.nbd_uri("web", 0),
        &[
            "write -P 7 4096 4k",
            "write -P 8 20M 4k",
            "write -P 9 39M 4k",
            "write -P 10 50M 1M",
            "flush",
        ],
    );
    let out = a.ok(&[
        "replication",
        "start",
        "web",
        "--use-existing",
        copy.to_str().unwrap(),
        "--wait",
    ]);
    println!("{out}");
    wait_until("replicating", Duration::from_secs(30), || {
        status(&a, "web")["state"] == "Replicating"
    });
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
    let m = measure(&a, "web");
    let sent = m["resynchronized_bytes_total"].as_u64().unwrap();
    println!("the compare sent {sent} bytes (1 MiB + 12 KiB differ; 40 MiB of data)");
    assert_eq!(sent, (1 << 20) + 3 * 4096, "only the changes cross: {m}");
    // Point 1 is the copy, point 2 the compare's result.
    assert_eq!(point_ids(&b, "web"), [1, 2]);
    assert!(
        events(&b).iter().any(|e| e["id"] == 2030),
        "no adoption event on the replica host"
    );
    // Replication goes on from there as usual.
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 11 1M 64k"]);
    sync_until_ok(&a, "web", 20);
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
}

/// The seed's "size mismatch" exception, and images the replica cannot adopt: refused in one
/// line that says why, and nothing changes on either host (the network start still works).
#[test]
fn an_existing_copy_of_another_size_or_format_is_refused_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    vm_with_data(&a, &b);
    let existing = existing_dir(&b);
    let small = existing.join("small.raw");
    sh(Command::new("truncate").arg("-s").arg("32M").arg(&small));
    let refused = |path: &str| -> String {
        let out = a.run(&["replication", "start", "web", "--use-existing", path]);
        assert!(!out.status.success(), "accepted {path}");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert_eq!(status(&a, "web")["state"], "ReadyForInitialReplication");
        err
    };
    let err = refused(small.to_str().unwrap());
    assert!(
        err.contains("size mismatch") && err.contains("33554432") && err.contains("67108864"),
        "{err}"
    );
    let qcow = existing.join("copy.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("64M"));
    let err = refused(qcow.to_str().unwrap());
    assert!(
        err.contains("qcow2") && err.contains("qemu-img convert -O raw"),
        "{err}"
    );
    let err = refused(existing.join("missing.raw").to_str().unwrap());
    assert!(err.contains("missing.raw"), "{err}");
    // A file the replica host's admin did not put in `+existing` (here: the primary's own
    // image, of the right size) is never adopted: the replica would write into it.
    let outside = disk_path(&a, "web", 0);
    let err = refused(outside.to_str().unwrap());
    assert!(
        err.contains("is not in") && err.contains("+existing"),
        "{err}"
    );
    // Nor through `..` out of it.
    let mut escape = existing.clone();
    for _ in 1..existing.components().count() {
        escape.push("..");
    }
    let escape = escape.join(outside.strip_prefix("/").unwrap());
    assert!(escape.exists(), "{}", escape.display());
    let err = refused(escape.to_str().unwrap());
    assert!(err.contains("is not in"), "{err}");
    assert!(point_ids(&b, "web").is_empty());
    // Nothing changed: the ordinary start still works.
    a.ok(&["replication", "start", "web", "--wait"]);
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
}

/// The seed's scheduled initial replication: `replication start --at TIME` leaves the VM
/// `ReadyForInitialReplication` (its status shows the time, nothing ships), and it starts by
/// itself at that time.
#[test]
fn scheduled_initial_replication_starts_by_itself_at_its_time() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    vm_with_data(&a, &b);
    let at = sh(Command::new("date").args(["-u", "-d", "+6 seconds", "+%Y-%m-%dT%H:%M:%SZ"]))
        .trim()
        .to_string();
    let out = a.ok(&["replication", "start", "web", "--at", &at]);
    assert!(out.contains("scheduled"), "{out}");
    let st = status(&a, "web");
    assert_eq!(st["state"], "ReadyForInitialReplication", "{st}");
    let reasons = st["health_reasons"].to_string();
    assert!(
        reasons.contains("initial replication is scheduled at"),
        "{st}"
    );
    assert!(
        events(&a).iter().any(|e| e["id"] == 2031),
        "no scheduled event"
    );
    // An invalid time is refused in one line, nothing changed.
    let bad = a.run(&["replication", "start", "web", "--at", "tomorrow"]);
    assert!(!bad.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );
    // Then by itself, with nobody running `start`.
    wait_until("replicating", Duration::from_secs(60), || {
        status(&a, "web")["state"] == "Replicating"
    });
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
}

/// The seed's "send initial copy using external media": point 1 goes to a directory that is
/// carried to the replica host and imported there (verified completely: a flipped byte is
/// refused in one line and the replica stays without a point); the primary adopts it at its
/// next hello, and only what the guest wrote after the cut crosses the network, as point 2.
#[test]
fn initial_copy_by_external_media_is_verified_and_only_later_writes_cross() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    vm_with_data(&a, &b);
    let media = scratch.join("usb-disk");
    let out = a.ok(&[
        "replication",
        "start",
        "web",
        "--to-media",
        media.to_str().unwrap(),
    ]);
    println!("{out}");
    assert_eq!(status(&a, "web")["state"], "InitialReplicationInProgress");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(media.join("understudy-media.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["seq"], 1, "{manifest}");
    assert_eq!(manifest["vm"], "web", "{manifest}");
    // The guest goes on writing after the cut.
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 5 30M 64k", "flush"]);
    // Nothing ships over the network meanwhile.
    let refused = a.run(&["replication", "sync", "web"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("import-media"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(point_ids(&b, "web").is_empty());
    // Waiting for the import is not a failed cycle.
    assert_eq!(measure(&a, "web")["failed_cycles"], 0);

    // Carried to the replica host: once intact, once with one byte flipped.
    let carried = scratch.join("carried");
    let damaged = scratch.join("damaged");
    for to in [&carried, &damaged] {
        sh(Command::new("cp").arg("-r").arg(&media).arg(to));
    }
    let delta = damaged.join("point-1.delta");
    let mut bytes = std::fs::read(&delta).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&delta, bytes).unwrap();
    let bad = b.run(&[
        "replication",
        "import-media",
        "web",
        "--from",
        damaged.to_str().unwrap(),
    ]);
    assert!(!bad.status.success(), "a damaged media was imported");
    let err = String::from_utf8_lossy(&bad.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    println!("refused: {err}");
    assert!(err.contains("point-1.delta"), "{err}");
    assert!(point_ids(&b, "web").is_empty(), "the replica took a point");

    let out = b.ok(&[
        "replication",
        "import-media",
        "web",
        "--from",
        carried.to_str().unwrap(),
    ]);
    println!("{out}");
    assert_eq!(point_ids(&b, "web"), [1]);
    // The primary adopts point 1 at its next hello and ships the writes since the cut.
    let r = sync_until_ok(&a, "web", 20);
    assert_eq!(r["seq"], 2, "{r}");
    let shipped = r["delta_bytes"].as_u64().unwrap();
    assert!(
        shipped < 1 << 20,
        "point 2 carried {shipped} bytes, not the 64 KiB written: {r}"
    );
    assert_eq!(status(&a, "web")["state"], "Replicating");
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
    // Point 1 is the media's cut: without the write made after it.
    let p1 = scratch.join("p1.raw");
    export_point(&b, "web", "1", 0, &p1);
    let p1 = std::fs::read(&p1).unwrap();
    assert!(p1[30 << 20..(30 << 20) + 65536].iter().all(|&x| x == 1));
}
