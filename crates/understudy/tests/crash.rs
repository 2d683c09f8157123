//! Promises 2 and 3 under crashes: kill -9 of the replica during cycles (including in the
//! middle of a 32 MiB upload) never leaves a partial or torn point; kill -9 of the primary
//! under write load is either recovered from the activity log or named as a resync, and the
//! replica equals the primary after the next sync; a disk image edited while the daemon was
//! down, and a replica restored from an old copy, put the pair into Resynchronization
//! required with the reason, never into silent divergence.
//!
//! Random choices come from a seed printed at the start; set UNDERSTUDY_TEST_SEED to replay.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

fn tools() {
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
}

fn state(h: &Host, vm: &str) -> serde_json::Value {
    h.json(&["replication", "status", vm])
}

/// Regions of the 64 MiB disk in the replica kill test.
const PATTERN_REGION: u64 = 16 * MIB;
const RANDOM_AT: u64 = 16 * MIB;
const RANDOM_LEN: u64 = 32 * MIB;

/// Checks one exported point: every 64 KiB chunk of the pattern region is one repeated byte
/// (a whole write or none), every chunk of the random region is either untouched (zero) or
/// exactly the random data, and the rest of the disk was never written. Returns the faults.
fn point_faults(image: &Path, random: &[u8]) -> Vec<String> {
    let data = std::fs::read(image).unwrap();
    let mut faults = Vec::new();
    if data.len() as u64 != 64 * MIB {
        return vec![format!("size {} instead of {}", data.len(), 64 * MIB)];
    }
    for off in torn_chunks(image, PATTERN_REGION) {
        faults.push(format!("torn pattern chunk at {off}"));
    }
    let chunk = PATTERN_CHUNK as usize;
    for (i, c) in data[RANDOM_AT as usize..(RANDOM_AT + RANDOM_LEN) as usize]
        .chunks(chunk)
        .enumerate()
    {
        let want = &random[i * chunk..(i + 1) * chunk];
        if c != want && c.iter().any(|&b| b != 0) {
            faults.push(format!(
                "random-region chunk at {} is neither zero nor the written data",
                RANDOM_AT as usize + i * chunk
            ));
        }
    }
    if data[(RANDOM_AT + RANDOM_LEN) as usize..]
        .iter()
        .any(|&b| b != 0)
    {
        faults.push("data beyond the written regions".into());
    }
    faults
}

#[test]
fn replica_killed_during_cycles_leaves_every_point_whole() {
    tools();
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["64M"], 1);
    let uri = a.nbd_uri("web", 0);

    let mut random = vec![0u8; RANDOM_LEN as usize];
    rng.fill_bytes(&mut random);
    let random_file = root.path().join("random.bin");
    std::fs::write(&random_file, &random).unwrap();

    let writer = PatternWriter::start(&uri, PATTERN_REGION, seed);
    let started = Instant::now();
    let (mut kills, mut mid_upload) = (0, 0);
    for round in 0..6 {
        if round % 2 == 1 {
            // A large delta: 32 MiB of random data, then a sync in the background; kill the
            // replica once the upload is under way.
            qemu_io_ok(
                &uri,
                &[&format!(
                    "write -q -s {} {RANDOM_AT} {RANDOM_LEN}",
                    random_file.display()
                )],
            );
            let mut sync = Command::new(EXE)
                .arg("--data-dir")
                .arg(&a.dir)
                .args(["replication", "sync", "web"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut seen = None;
            while Instant::now() < deadline {
                let st = state(&a, "web");
                let (done, total) = (
                    st["progress"]["done_bytes"].as_u64().unwrap_or(0),
                    st["progress"]["total_bytes"].as_u64().unwrap_or(0),
                );
                if total >= RANDOM_LEN && done > 0 && done < total {
                    seen = Some((done, total));
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            b.kill9();
            kills += 1;
            match seen {
                Some((done, total)) => {
                    mid_upload += 1;
                    println!(
                        "round {round}: killed the replica mid-upload at {done}/{total} bytes"
                    );
                }
                None => println!(
                    "round {round}: the upload was not caught in flight; killed the replica anyway"
                ),
            }
            let _ = sync.wait();
        } else {
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
            b.kill9();
            kills += 1;
            println!(
                "round {round}: killed the replica at a random moment ({} ms into the run)",
                started.elapsed().as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
        b.restart();
    }
    // Cycles continue after the last restart with the writer running.
    std::thread::sleep(Duration::from_millis(1500));
    let (writes, failed_runs) = writer.stop();
    assert_eq!(
        failed_runs, 0,
        "guest writes failed while the replica was being killed"
    );

    let sync = sync_until_ok(&a, "web", 20);
    let st = state(&a, "web");
    assert_eq!(
        st["state"], "Replicating",
        "killing the replica must never require a resync: {st}"
    );
    assert_eq!(st["last_seq"], sync["seq"]);

    let ids = point_ids(&b, "web");
    let gaps: Vec<_> = ids.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(gaps.is_empty(), "point ids are not continuous: {ids:?}");
    assert_eq!(
        ids.last().copied(),
        sync["seq"].as_u64(),
        "the newest point is not the last sync: {ids:?}"
    );

    let mut corrupt = 0;
    let image = root.path().join("point.raw");
    for id in &ids {
        let _ = std::fs::remove_file(&image);
        export_point(&b, "web", &id.to_string(), 0, &image);
        let faults = point_faults(&image, &random);
        if !faults.is_empty() {
            corrupt += 1;
            eprintln!("point {id}: {}", faults[..faults.len().min(5)].join("; "));
        }
    }
    let equal = latest_equals_primary(&a, &b, "web", 0, root.path());
    println!(
        "killed the replica {kills} times ({mid_upload} mid-upload of a 32 MiB delta) under {writes} guest writes; \
         {} points {}..{} checked, {corrupt} corrupt; newest point equals the primary: {equal}",
        ids.len(),
        ids.first().unwrap(),
        ids.last().unwrap()
    );
    assert!(
        mid_upload > 0,
        "no kill landed in the middle of an upload; the test did not test that"
    );
    assert_eq!(corrupt, 0, "corrupt points after replica crashes");
    assert!(
        equal,
        "the newest point differs from the primary after a final sync"
    );
}

#[test]
fn primary_killed_under_load_recovers_or_says_resync() {
    tools();
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["64M"], 1);
    let uri = a.nbd_uri("web", 0);

    let (mut recovered, mut resyncs) = (0, 0);
    let rounds = 3;
    for round in 0..rounds {
        let unclean_before = events(&a).iter().filter(|e| e["id"] == 1002).count();
        let writer = PatternWriter::start(&uri, 48 * MIB, seed + round);
        std::thread::sleep(Duration::from_millis(rng.gen_range(700..2500)));
        if round == 1 {
            // This time the primary dies in the middle of shipping a 32 MiB delta.
            let mut random = vec![0u8; 32 << 20];
            rng.fill_bytes(&mut random);
            let f = root.path().join("random.bin");
            std::fs::write(&f, &random).unwrap();
            qemu_io_ok(&uri, &[&format!("write -q -s {} 16M 32M", f.display())]);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let st = state(&a, "web");
                let (done, total) = (
                    st["progress"]["done_bytes"].as_u64().unwrap_or(0),
                    st["progress"]["total_bytes"].as_u64().unwrap_or(0),
                );
                if total >= 32 * MIB && done > 0 && done < total {
                    println!(
                        "round {round}: killing the primary mid-upload at {done}/{total} bytes"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        a.kill9();
        let (writes, _) = writer.stop();
        a.restart();
        let st = state(&a, "web");
        match st["state"].as_str().unwrap() {
            "Replicating" => {
                let unclean_after = events(&a).iter().filter(|e| e["id"] == 1002).count();
                assert!(
                    unclean_after > unclean_before,
                    "Replicating after kill -9 without the unclean-recovery event 1002: {st}"
                );
                recovered += 1;
            }
            "ResynchronizationRequired" => {
                let reason = st["resync_reason"].as_str().unwrap_or_default();
                assert!(!reason.is_empty(), "resync required without a reason: {st}");
                assert_eq!(st["health"], "Critical", "{st}");
                println!("round {round}: resynchronization required: {reason}");
                a.ok(&["replication", "resume", "web", "--resynchronize"]);
                resyncs += 1;
            }
            other => panic!("after kill -9 of the primary the state is {other}: {st}"),
        }
        sync_until_ok(&a, "web", 20);
        let equal = latest_equals_primary(&a, &b, "web", 0, root.path());
        println!("round {round}: killed the primary after {writes} acknowledged writes; state {}; replica equals primary after sync: {equal}", st["state"]);
        assert!(equal, "round {round}: the replica diverged from the primary after a primary crash and a sync (state was {})", st["state"]);
        let st = state(&a, "web");
        assert_eq!(st["state"], "Replicating", "{st}");
    }
    println!("killed the primary {rounds} times under load: {recovered} recovered from the activity log, {resyncs} full resyncs, 0 silent divergences");
}

#[test]
fn disk_modified_while_down_requires_resync_and_keeps_points() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["32M"], 30);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -q -P 0x11 0 1M"]);
    assert_eq!(a.json(&["replication", "sync", "web"])["seq"], 2);
    let path = disk_path(&a, "web", 0);

    a.stop();
    qemu_io_ok(path.to_str().unwrap(), &["write -q -P 0x99 0 64k"]);
    a.restart();

    let st = state(&a, "web");
    println!(
        "after editing the image while down: state {}, health {}, reason {}",
        st["state"], st["health"], st["resync_reason"]
    );
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert_eq!(st["health"], "Critical", "{st}");
    let reason = st["resync_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("modified"),
        "the reason must name the modification: {st}"
    );
    assert!(
        st["health_reasons"].to_string().contains("modified"),
        "{st}"
    );
    assert!(
        events(&a).iter().any(|e| e["id"] == 2004),
        "no resync-required event 2004"
    );

    let out = a.run(&["replication", "sync", "web"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "sync must refuse transiently while resync is required: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = a.run(&["replication", "resume", "web"]);
    assert!(
        !out.status.success(),
        "plain resume must not clear a resync requirement"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resynchronize"));

    let before = point_ids(&b, "web");
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    // A resynchronization is a state of its own until its Full point commits (both hosts).
    assert_eq!(state(&a, "web")["state"], "Resynchronizing");
    let sync = sync_until_ok(&a, "web", 10);
    assert_eq!(state(&a, "web")["state"], "Replicating");
    let after = point_ids(&b, "web");
    assert!(
        before.iter().all(|p| after.contains(p)),
        "recovery points were lost by the resync: {before:?} → {after:?}"
    );
    assert_eq!(after.last().copied(), sync["seq"].as_u64());
    assert!(
        latest_equals_primary(&a, &b, "web", 0, root.path()),
        "after resync the newest point differs from the primary"
    );
    let latest = root.path().join("latest.raw");
    export_point(&b, "web", "latest", 0, &latest);
    qemu_io_ok(
        latest.to_str().unwrap(),
        &["read -q -P 0x99 0 64k", "read -q -P 0x11 64k 960k"],
    );
    // The point taken before the edit still holds what the primary had then.
    let old = root.path().join("old.raw");
    export_point(&b, "web", "2", 0, &old);
    qemu_io_ok(old.to_str().unwrap(), &["read -q -P 0x11 0 1M"]);
    let st = state(&a, "web");
    assert_eq!(st["health"], "Normal", "{st}");
    println!("resync done: points {before:?} kept, now {after:?}; newest equals the primary including the 0x99 block");
}

#[test]
fn replica_restored_from_an_old_copy_requires_resync() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    // `web` only ships on demand (the first thing it does after the restore is a sync);
    // `db` cycles every second (it meets the restored replica through a failed cycle + hello).
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    a.ok(&["vm", "create", "db", "--disk", "16M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    a.ok(&[
        "replication",
        "enable",
        "db",
        "--replica",
        &b.addr(),
        "--frequency",
        "1",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    a.ok(&["replication", "start", "db", "--wait"]);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x21 0 1M"]);
    qemu_io_ok(&a.nbd_uri("db", 0), &["write -q -P 0x31 0 1M"]);
    sync_until_ok(&a, "web", 5);
    sync_until_ok(&a, "db", 5);

    b.stop();
    let storage = b.dir.join("storage");
    let old = root.path().join("storage.old");
    sh(Command::new("cp").arg("-a").arg(&storage).arg(&old));
    b.restart();
    let old_web = point_ids(&b, "web");
    for i in 0..3 {
        qemu_io_ok(
            &a.nbd_uri("web", 0),
            &[&format!("write -q -P {} 2M 1M", 0x40 + i)],
        );
        qemu_io_ok(
            &a.nbd_uri("db", 0),
            &[&format!("write -q -P {} 2M 1M", 0x50 + i)],
        );
        sync_until_ok(&a, "web", 5);
        sync_until_ok(&a, "db", 5);
    }
    let committed_web = state(&a, "web")["last_seq"].as_u64().unwrap();
    let committed_db = state(&a, "db")["last_seq"].as_u64().unwrap();
    b.stop();
    std::fs::remove_dir_all(&storage).unwrap();
    sh(Command::new("cp").arg("-a").arg(&old).arg(&storage));
    // Let db fail a cycle against the stopped replica, so it asks where the replica stands
    // (hello) before shipping again.
    let failed = a.json(&["replication", "measure", "db"])["failed_cycles"]
        .as_u64()
        .unwrap();
    wait_until(
        "a failed db cycle while the replica is down",
        Duration::from_secs(20),
        || {
            a.json(&["replication", "measure", "db"])["failed_cycles"]
                .as_u64()
                .unwrap()
                > failed
        },
    );
    b.restart();
    assert_eq!(
        point_ids(&b, "web"),
        old_web,
        "the old copy was not restored"
    );

    // web: the next cycle is an explicit sync straight after the restore.
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -q -P 0x77 4M 64k"]);
    let out = a.run(&["replication", "sync", "web"]);
    assert!(
        !out.status.success(),
        "a sync onto a replica restored from an old copy succeeded silently"
    );
    let st = state(&a, "web");
    println!(
        "web (sync right after restore, primary committed {committed_web}): {} — {}",
        st["state"], st["resync_reason"]
    );
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert_eq!(st["health"], "Critical", "{st}");
    assert!(
        st["resync_reason"]
            .as_str()
            .is_some_and(|r| r.contains("older copy")),
        "{st}"
    );

    // db: periodic cycles failed while the replica was down; the next one meets the old copy.
    wait_until(
        "db to notice the restored replica",
        Duration::from_secs(20),
        || state(&a, "db")["state"] != "Replicating",
    );
    let st = state(&a, "db");
    println!(
        "db (periodic cycles, primary committed {committed_db}): {} — {}",
        st["state"], st["resync_reason"]
    );
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert!(
        st["resync_reason"]
            .as_str()
            .is_some_and(|r| r.contains("older copy")),
        "{st}"
    );

    // Both recover by resync on top of the old copy, whose points survive.
    for vm in ["web", "db"] {
        let before = point_ids(&b, vm);
        a.ok(&["replication", "resume", vm, "--resynchronize"]);
        sync_until_ok(&a, vm, 10);
        let after = point_ids(&b, vm);
        assert!(
            before.iter().all(|p| after.contains(p)),
            "{vm}: points lost by resync: {before:?} → {after:?}"
        );
        assert!(
            latest_equals_primary(&a, &b, vm, 0, root.path()),
            "{vm}: replica differs from the primary after resync"
        );
        println!("{vm}: resynchronized; points {before:?} → {after:?}");
    }
}

/// Regression (found by the crash tests' author): after a kill -9 of the primary the activity
/// log covers the daemon's own writes, but an edit of the image while the daemon was down
/// went unnoticed and the replica silently diverged. The heartbeat check catches it; a
/// restart without an edit must still recover from the activity log, without resync.
#[test]
fn image_edited_after_a_primary_crash_is_not_silent() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    replicate(&a, &b, "web", &["64M"], 30);
    let uri = a.nbd_uri("web", 0);
    let image = disk_path(&a, "web", 0);

    // Crash without an edit, restart after the heartbeat slack: recovered, not resync.
    qemu_io_ok(&uri, &["write -P 0x11 0 64k"]);
    a.kill9();
    std::thread::sleep(Duration::from_secs(4));
    a.restart();
    let st = state(&a, "web");
    assert_eq!(
        st["state"], "Replicating",
        "a crash alone must not force a resync: {st}"
    );
    sync_until_ok(&a, "web", 20);
    assert!(latest_equals_primary(&a, &b, "web", 0, root.path()));

    // Crash, then an edit far from anything the guest wrote, then restart.
    qemu_io_ok(&uri, &["write -P 0x22 0 64k"]);
    a.kill9();
    std::thread::sleep(Duration::from_secs(4));
    qemu_io_ok(image.to_str().unwrap(), &["write -P 0x99 40M 64k"]);
    a.restart();
    let st = state(&a, "web");
    assert_eq!(st["state"], "ResynchronizationRequired", "{st}");
    assert_eq!(st["health"], "Critical", "{st}");
    let reason = st["resync_reason"].as_str().unwrap();
    assert!(reason.contains("modified outside"), "{reason}");
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    sync_until_ok(&a, "web", 20);
    assert!(latest_equals_primary(&a, &b, "web", 0, root.path()));
    println!("crash without edit: recovered from the activity log; crash + edit: {reason}");
}
