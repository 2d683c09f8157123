//! What a replica host can do while a resynchronization runs (issue 11, item 4: "backups and
//! failover to existing points keep working during a resync") and while its VM waits for its
//! first one (issue 12: `backup` refuses with exit 75, "resynchronization not done").
//!
//! Real daemons on loopback; the primary reaches the replica through a throttling proxy
//! (`common::Throttle`) that runs at full speed for the initial replication and slowly for the
//! resync, so the resync is still running, provably, while the replica works beside it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Random data written on the primary (and, rewritten, what the resync has to send).
const DATA: u64 = 32 << 20;
/// The proxy's rate during the resync: `DATA` takes 16 s, far more than the work beside it.
const SLOW: u64 = 2 << 20;

/// `vm create web --disk 64M` on `a` with `DATA` random bytes, replicated to `b` through
/// `throttle` (full speed), a second point on top (a 64 KiB change), then `DATA` rewritten
/// with other random bytes, unshipped (`diverge`): a resync has `DATA` bytes to send.
/// Returns the replica's points, each exported (disk 0) into `scratch`.
fn two_points_then_diverge(
    a: &Host,
    b: &Host,
    throttle: &Throttle,
    scratch: &Path,
) -> Vec<(u64, PathBuf)> {
    a.ok(&["vm", "create", "web", "--disk", "64M"]);
    write_random(a, "web", DATA, 1, scratch);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &throttle.addr(),
        "--frequency",
        "3600",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x42 40M 64k"]);
    sync_until_ok(a, "web", 5);
    diverge(a, "web", DATA, 2, scratch);
    let before = export_points(b, "web", scratch, "before");
    assert_eq!(before.len(), 2, "two points before the resync");
    before
}

/// Starts the resync at `SLOW` and returns once it moved (`bytes_done`: compared or sent;
/// `bytes_sent` counts an upload only once it ended), with the resync still running.
fn start_slow_resync(a: &Host, throttle: &Throttle) -> Instant {
    throttle.set_rate(SLOW);
    let started = Instant::now();
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    wait_until("the resync to move", Duration::from_secs(30), || {
        let st = status(a, "web");
        assert_eq!(st["state"], "Resynchronizing", "{st}");
        st["resync"]["bytes_done"].as_u64().unwrap_or(0) > 0
    });
    println!(
        "resync moving after {:?}: {}",
        started.elapsed(),
        status(a, "web")["resync"]
    );
    started
}

/// Asserts the resync is still running: the primary says Resynchronizing and the replica
/// holds exactly the points `ids` (the resync's point is not committed).
fn assert_still_resynchronizing(a: &Host, b: &Host, ids: &[u64], what: &str) {
    let st = status(a, "web");
    assert_eq!(
        st["state"], "Resynchronizing",
        "the resync ended before {what}: the test proves nothing: {st}"
    );
    assert_eq!(point_ids(b, "web"), ids, "a point landed before {what}");
    println!("after {what}: still Resynchronizing: {}", st["resync"]);
}

fn ids(points: &[(u64, PathBuf)]) -> Vec<u64> {
    points.iter().map(|(id, _)| *id).collect()
}

/// Lets the resync run at full speed to its end; its new point equals the primary and the
/// earlier points are bit-identical to `before`.
fn finish_resync(
    a: &Host,
    b: &Host,
    throttle: &Throttle,
    before: &[(u64, PathBuf)],
    scratch: &Path,
) {
    throttle.set_rate(0);
    wait_until("the resync to complete", Duration::from_secs(60), || {
        state(a, "web") == "Replicating"
    });
    assert!(
        latest_equals_primary(a, b, "web", 0, scratch),
        "the resync's point differs from the primary"
    );
    let old = ids(before);
    let ids = point_ids(b, "web");
    assert_eq!(
        ids.len(),
        old.len() + 1,
        "the resync is one new point: {ids:?}"
    );
    assert_eq!(
        ids[..old.len()],
        old[..],
        "the earlier points stay: {ids:?}"
    );
    for (id, file) in before {
        let now = scratch.join(format!("after-{id}.raw"));
        export_point(b, "web", &id.to_string(), 0, &now);
        assert!(cmp(file, &now), "point {id} changed during the resync");
        std::fs::remove_file(&now).unwrap();
    }
}

#[test]
fn backups_of_an_existing_point_work_during_a_resync() {
    require("cmp", "diffutils");
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let t0 = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    let throttle = Throttle::start(b.addr(), 0);
    let before = two_points_then_diverge(&a, &b, &throttle, scratch);
    let (point, exported) = &before[0];
    let point_s = point.to_string();
    // The point is not what the primary holds now (the resync has everything to send): a
    // backup of the resync's half-received blocks could not equal it.
    let live = scratch.join("live.raw");
    copy_out(&a.nbd_uri("web", 0), &live);
    assert!(
        !cmp(exported, &live),
        "the primary diverged from point {point}"
    );

    start_slow_resync(&a, &throttle);

    // Raw: the disk equals `points export` of the point, and `backup verify` passes.
    let raw = scratch.join("backup-raw");
    let out = b.json(&[
        "backup",
        "web",
        "--point",
        &point_s,
        "--to",
        raw.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    println!("raw backup: {out}");
    assert!(
        cmp(&raw.join("disk-0.raw"), exported),
        "the raw backup of point {point} differs from its export"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(raw.join("backup.json")).unwrap()).unwrap();
    assert_eq!(m["backup"]["point"], *point, "{m}");
    let verified = b.ok(&["backup", "verify", raw.to_str().unwrap()]);
    println!("verify: {}", verified.trim());

    // qcow2: read back as raw by qemu-img, the same bytes.
    let qcow2 = scratch.join("backup-qcow2");
    b.ok(&[
        "backup",
        "web",
        "--point",
        &point_s,
        "--to",
        qcow2.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    let back = scratch.join("qcow2-as-raw.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow2.join("disk-0.qcow2"))
        .arg(&back));
    assert!(
        cmp(&back, exported),
        "the qcow2 backup of point {point}, read back, differs from its export"
    );
    b.ok(&["backup", "verify", qcow2.to_str().unwrap()]);

    // Both backups finished while the resync ran, its blocks not yet visible in any point.
    assert_still_resynchronizing(&a, &b, &ids(&before), "the backups finished");

    finish_resync(&a, &b, &throttle, &before, scratch);
    // The backups are still those of the point.
    b.ok(&["backup", "verify", raw.to_str().unwrap()]);
    println!("took {:?}", t0.elapsed());
}

#[test]
fn a_test_failover_to_an_existing_point_works_during_a_resync() {
    require("cmp", "diffutils");
    require("nbdcopy", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let t0 = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    let throttle = Throttle::start(b.addr(), 0);
    let before = two_points_then_diverge(&a, &b, &throttle, scratch);
    // The older point: not the newest, so a failover that served `latest` would show.
    let (point, exported) = &before[0];

    start_slow_resync(&a, &throttle);

    let info = b.json(&[
        "failover",
        "start",
        "web",
        "--test",
        "--point",
        &point.to_string(),
    ]);
    println!("test failover: {info}");
    assert_eq!(info["served_as"], "web-test", "{info}");
    let uri = b.json(&["vm", "show", "web-test"])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = scratch.join("test-vm.raw");
    copy_out(&uri, &seen);
    assert!(
        cmp(&seen, exported),
        "the test VM's disk differs from point {point}"
    );
    // The test VM is writable; its write lands on its own overlay, nowhere else.
    qemu_io_ok(&uri, &["write -q -P 0x5a 0 64k", "read -q -P 0x5a 0 64k"]);
    assert_still_resynchronizing(&a, &b, &ids(&before), "the test VM was read");

    b.ok(&["failover", "stop", "web", "--test"]);
    assert!(
        !b.run(&["vm", "show", "web-test"]).status.success(),
        "web-test is gone"
    );
    assert_still_resynchronizing(&a, &b, &ids(&before), "the test failover stopped");

    finish_resync(&a, &b, &throttle, &before, scratch);
    println!("took {:?}", t0.elapsed());
}

/// The replica refuses a backup for "resynchronization not done" exactly while its replica
/// VM carries damage (`ReplicaVm::damage`, `backup_refusal` in `host/src/shared/backup.rs`):
/// an existing copy adopted by `replication start --use-existing` until the first compare's
/// `Full` delta lands, a journal file that failed validation, or an unplanned failover's
/// reverse. A resync the primary alone requires (an image edited while its daemon was down)
/// marks nothing on the replica: its points stay consistent and back up as usual.
#[test]
fn backup_refuses_with_75_while_an_existing_copy_waits_for_its_first_resync() {
    require("cmp", "diffutils");
    let t0 = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let (a, b) = pair(scratch);
    let throttle = Throttle::start(b.addr(), 0);
    a.ok(&["vm", "create", "web", "--disk", "64M"]);
    write_random(&a, "web", DATA, 1, scratch);
    qemu_io_ok(&a.nbd_uri("web", 0), &["flush"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &throttle.addr(),
        "--frequency",
        "3600",
    ]);
    // An earlier copy of the disk, where the replica host's admin puts existing copies; the
    // primary goes on after it (every block of `DATA` differs).
    let existing = b.dir.join("storage").join("+existing");
    std::fs::create_dir_all(&existing).unwrap();
    let copy = existing.join("web-0.raw");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(disk_path(&a, "web", 0))
        .arg(&copy));
    write_random(&a, "web", DATA, 2, scratch);
    qemu_io_ok(&a.nbd_uri("web", 0), &["flush"]);

    // The replica adopts the copy as point 1, marked damaged until the primary's first
    // compare (a resync) lands: it waits for its first resynchronization.
    throttle.set_rate(SLOW);
    a.ok(&[
        "replication",
        "start",
        "web",
        "--use-existing",
        copy.to_str().unwrap(),
    ]);
    wait_until(
        "the adoption on the replica",
        Duration::from_secs(30),
        || {
            let out = b.run(&["points", "list", "web", "--json"]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .map(|v| v.as_array().map_or(0, |a| a.len()) == 1)
                    .unwrap_or(false)
        },
    );
    let st = status(&b, "web");
    println!("replica status: {st}");
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    let reasons: Vec<&serde_json::Value> = st["health_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "resync_required")
        .collect();
    assert_eq!(reasons.len(), 1, "one reason per rule: {st}");
    assert!(
        reasons[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not yet compared"),
        "{st}"
    );

    for point in ["latest", "1"] {
        let dir = scratch.join(format!("backup-{point}"));
        let out = b.run(&[
            "backup",
            "web",
            "--point",
            point,
            "--to",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(75),
            "backup --point {point} while the first resync is not done: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = one_line_failure(&out);
        println!("backup --point {point}: {err}");
        assert!(err.contains("resynchronization not done"), "{err}");
        assert!(err.contains("retry when"), "says when to retry: {err}");
        let left: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !left
                .iter()
                .any(|n| n == "backup.json" || n.starts_with("disk-")),
            "a refused backup left files that look like a backup: {left:?}"
        );
    }
    // The refusals came while the first resync ran, not after it.
    assert_still_resynchronizing(&a, &b, &[1], "the refusals");
    assert_eq!(state(&b, "web"), "ResynchronizationRequired");

    // Once it completed, the same backup succeeds and holds the primary's disk.
    throttle.set_rate(0);
    wait_until(
        "the first resync to complete",
        Duration::from_secs(60),
        || state(&a, "web") == "Replicating",
    );
    let dir = scratch.join("backup-after");
    b.ok(&["backup", "web", "--to", dir.to_str().unwrap()]);
    b.ok(&["backup", "verify", dir.to_str().unwrap()]);
    let live = scratch.join("live.raw");
    copy_out(&a.nbd_uri("web", 0), &live);
    assert!(
        cmp(&dir.join("disk-0.raw"), &live),
        "the backup after the first resync differs from the primary"
    );
    println!("took {:?}", t0.elapsed());
}
