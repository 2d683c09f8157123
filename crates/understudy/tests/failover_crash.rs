//! Crash in the middle of a failover: the replica daemon is killed (SIGKILL) at a random moment
//! during `failover start` and again during `failover complete`, for several VMs; after each
//! restart the state is one the next command (or the restart itself) finishes, and the chosen
//! point's data is never lost. The primary is killed during `failover prepare` likewise; the
//! replica during `failover stop` and during a second `failover start` at another point; either
//! host during `replication reverse`; the replica during `failover prepare`.
//! Random moments come from a seed printed at the start; set UNDERSTUDY_TEST_SEED to replay.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

/// Starts `understudy ARGS` against `h` without waiting for it.
fn spawn_cli(h: &Host, args: &[&str]) -> Child {
    Command::new(EXE)
        .arg("--data-dir")
        .arg(&h.dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `args` on `h` and kills `h`'s daemon `delay_ms` later (the command may or may not have
/// finished), then restarts the daemon.
fn kill_during(h: &mut Host, args: &[&str], delay_ms: u64) {
    let mut cli = spawn_cli(h, args);
    std::thread::sleep(Duration::from_millis(delay_ms));
    h.kill9();
    let _ = cli.wait();
    h.restart();
}

fn disk_uri(h: &Host, vm: &str) -> String {
    h.json(&["vm", "show", vm])["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn kill_9_during_failover_start_and_complete_never_loses_the_point() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    let vms = ["web0", "web1", "web2"];
    let mut points = Vec::new();
    for vm in vms {
        a.ok(&["vm", "create", vm, "--disk", "64M"]);
        a.ok(&[
            "replication",
            "enable",
            vm,
            "--replica",
            &b.addr(),
            "--frequency",
            "3600",
        ]);
        let uri = a.nbd_uri(vm, 0);
        qemu_io_ok(&uri, &["write -P 1 0 48M"]);
        a.ok(&["replication", "start", vm, "--wait"]);
        let p = point_ids(&b, vm).last().copied().unwrap();
        qemu_io_ok(&uri, &["write -P 2 0 48M"]); // a later point the failover must not show
        sync_until_ok(&a, vm, 20);
        points.push(p);
    }
    for (vm, p) in vms.iter().zip(&points) {
        let point = p.to_string();
        let delay = rng.gen_range(0..120);
        println!("{vm}: killing the replica {delay} ms into `failover start --point {point}`");
        kill_during(&mut b, &["failover", "start", vm, "--point", &point], delay);
        match state(&b, vm).as_str() {
            "FailedOverWaitingCompletion" => {}
            "Replicating" => {
                // The start never became durable: what it left is rolled back when the store
                // opens (in the background after the restart), and it runs again.
                let dir = b.dir.join("failover").join(vm);
                wait_until(
                    &format!("{vm}'s rolled-back start to leave nothing (seed {seed})"),
                    Duration::from_secs(20),
                    || !dir.exists(),
                );
                b.ok(&["failover", "start", vm, "--point", &point]);
            }
            other => panic!("{vm}: after a kill during start: {other} (seed {seed})"),
        }
        let fo = disk_uri(&b, vm);
        qemu_io_ok(&fo, &["read -P 1 0 48M", "write -P 9 0 64k", "flush"]);

        let delay = rng.gen_range(0..400);
        println!("{vm}: killing the replica {delay} ms into `failover complete`");
        kill_during(&mut b, &["failover", "complete", vm], delay);
        match state(&b, vm).as_str() {
            "FailedOver" => {}
            "FailedOverWaitingCompletion" => {
                // The next command finishes it.
                b.ok(&["failover", "complete", vm]);
            }
            other => panic!("{vm}: after a kill during complete: {other} (seed {seed})"),
        }
        assert_eq!(state(&b, vm), "FailedOver");
        let disk = disk_uri(&b, vm);
        qemu_io_ok(
            &disk,
            &[
                "read -P 9 0 64k",
                "read -P 1 64k 48960k",
                "read -P 0 48M 16M",
            ],
        );
        // A completion cut short is finished when the replica store opens (in the background
        // after the restart): the failover disks go.
        let dir = b.dir.join("failover").join(vm);
        wait_until(
            &format!("{vm}'s failover disks to go (seed {seed})"),
            Duration::from_secs(20),
            || !dir.exists(),
        );
        assert!(
            !b.run(&["points", "list", vm]).status.success(),
            "{vm}: the replica's copy must be gone"
        );
    }
}

#[test]
fn kill_9_during_failover_prepare_leaves_the_vm_replicating_or_prepared() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    for round in 0..3 {
        let vm = format!("db{round}");
        a.ok(&["vm", "create", &vm, "--disk", "64M"]);
        a.ok(&[
            "replication",
            "enable",
            &vm,
            "--replica",
            &b.addr(),
            "--frequency",
            "3600",
        ]);
        a.ok(&["replication", "start", &vm, "--wait"]);
        let uri = a.nbd_uri(&vm, 0);
        qemu_io_ok(&uri, &["write -P 7 0 32M"]); // the last changes the prepare must ship
        let delay = rng.gen_range(0..300);
        println!("{vm}: killing the primary {delay} ms into `failover prepare`");
        kill_during(&mut a, &["failover", "prepare", &vm], delay);
        match state(&a, &vm).as_str() {
            "PreparedForFailover" => {
                // Fenced across the restart, and the replica holds every change.
                let out = Command::new("qemu-io")
                    .args(["-f", "raw", "-c", "read 0 4k", &uri])
                    .output()
                    .unwrap();
                assert!(
                    !out.status.success(),
                    "{vm}: a prepared VM must stay fenced"
                );
            }
            "Replicating" => {
                // Not prepared: the disks are served, and a prepare now completes.
                qemu_io_ok(&uri, &["read -P 7 0 32M"]);
                prepare_until_ok(&a, &vm);
            }
            other => panic!("{vm}: after a kill during prepare: {other} (seed {seed})"),
        }
        wait_until(
            "the replica to hear of the prepare",
            Duration::from_secs(30),
            || b.json(&["replication", "status", &vm])["state"] == "PreparedForFailover",
        );
        let info = b.json(&["failover", "start", &vm]);
        let fo = info["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
        qemu_io_ok(&fo, &["read -P 7 0 32M"]);
        b.ok(&["failover", "stop", &vm]);
    }
}

/// Runs `args` on `cli` and kills `killed`'s daemon `delay_ms` later, then restarts it.
fn kill_other_during(cli: &Host, killed: &mut Host, args: &[&str], delay_ms: u64) {
    let mut c = spawn_cli(cli, args);
    std::thread::sleep(Duration::from_millis(delay_ms));
    killed.kill9();
    let _ = c.wait();
    killed.restart();
}

/// How long `f` took, in ms.
fn timed<T>(f: impl FnOnce() -> T) -> u64 {
    let t = std::time::Instant::now();
    let _ = f();
    t.elapsed().as_millis() as u64
}

/// A random moment for a kill, over the whole of a command like one that took `took_ms` (a
/// CLI round trip: spawning it is part of the time, and a kill after it ended is a case too).
fn kill_delay(rng: &mut rand::rngs::StdRng, took_ms: u64) -> u64 {
    rng.gen_range(0..=took_ms * 3 / 2 + 5)
}

/// Whether `h` serves failover disks as `name` (`vm show` also answers for a replica VM, with
/// role Replica and no disks).
fn failover_served(h: &Host, name: &str) -> bool {
    let out = h.run(&["vm", "show", name, "--json"]);
    out.status.success()
        && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| {
            matches!(
                v["replication_role"].as_str(),
                Some("FailedOver" | "TestFailover")
            )
        })
}

/// `vm show VM` on `h` once it serves failover disks (a failover is served again in the background after
/// a restart, when the replica store has opened).
fn served_disk(h: &Host, vm: &str, why: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !failover_served(h, vm) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {why}; {vm} is {}\n--- daemon log ---\n{}",
            state(h, vm),
            tail(&h.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    disk_uri(h, vm)
}

/// `vm create VM --disk 64M` on `a`, 48 MiB of pattern 1 replicated to `b` (point p1), then
/// 48 MiB of pattern 2 (point p2). Returns (p1, p2).
fn two_points(a: &Host, b: &Host, vm: &str) -> (u64, u64) {
    a.ok(&["vm", "create", vm, "--disk", "64M"]);
    a.ok(&[
        "replication",
        "enable",
        vm,
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    let uri = a.nbd_uri(vm, 0);
    qemu_io_ok(&uri, &["write -P 1 0 48M"]);
    a.ok(&["replication", "start", vm, "--wait"]);
    let p1 = point_ids(b, vm).last().copied().unwrap();
    qemu_io_ok(&uri, &["write -P 2 0 48M"]);
    let p2 = sync_until_ok(a, vm, 20)["seq"].as_u64().unwrap();
    (p1, p2)
}

/// Kill -9 of the replica during `failover stop` of an unplanned failover whose disk was
/// written: after the restart the VM is either still failed over (its disk served, and a
/// stop then works) or receiving again; nothing of the failover is left, and the next sync
/// commits a point equal to the primary's disk.
#[test]
fn kill_9_during_failover_stop_leaves_it_failed_over_or_receiving() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    for vm in ["stop0", "stop1", "stop2"] {
        let (p1, _) = two_points(&a, &b, vm);
        let took = timed(|| b.ok(&["failover", "start", vm, "--point", &p1.to_string()]));
        let fo = disk_uri(&b, vm);
        qemu_io_ok(&fo, &["write -P 9 0 4M", "write -P 9 50M 4M", "flush"]);
        // The primary writes on meanwhile (refused by the replica until the stop).
        qemu_io_ok(&a.nbd_uri(vm, 0), &["write -P 3 8M 1M"]);

        let delay = kill_delay(&mut rng, took);
        println!("{vm}: killing the replica {delay} ms into `failover stop`");
        kill_during(&mut b, &["failover", "stop", vm], delay);
        match state(&b, vm).as_str() {
            "FailedOverWaitingCompletion" => {
                // Still failed over: its disk is served, at the point (with or without what
                // was written on it), and a stop now works.
                let fo = served_disk(&b, vm, &format!("{vm}'s failover disk (seed {seed})"));
                qemu_io_ok(&fo, &["read -P 1 4M 44M"]);
                b.ok(&["failover", "stop", vm]);
            }
            "Replicating" => {}
            other => panic!("{vm}: after a kill during stop: {other} (seed {seed})"),
        }
        assert_eq!(state(&b, vm), "Replicating");
        assert!(
            !failover_served(&b, vm),
            "{vm}: no failover disk is served (seed {seed})"
        );
        let dir = b.dir.join("failover").join(vm);
        wait_until(
            &format!("{vm}'s failover disks to go (seed {seed})"),
            Duration::from_secs(20),
            || !dir.exists(),
        );
        sync_until_ok(&a, vm, 20);
        assert!(
            latest_equals_primary(&a, &b, vm, 0, root.path()),
            "{vm}: the point after the stop equals the primary (seed {seed})"
        );
    }
}

/// Kill -9 of the replica during a second `failover start --point OTHER` (which discards what
/// was written over the first point): after the restart the failover disk reads as one of the
/// two points, never a mix, and the first failover's writes are there only with the first
/// point.
#[test]
fn kill_9_during_a_second_failover_start_serves_one_point_never_a_mix() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    for vm in ["again0", "again1", "again2"] {
        let (p1, p2) = two_points(&a, &b, vm);
        let took = timed(|| b.ok(&["failover", "start", vm, "--point", &p1.to_string()]));
        let fo = disk_uri(&b, vm);
        // Where neither point has data: present only while the first failover is.
        qemu_io_ok(&fo, &["write -P 9 56M 1M", "flush"]);

        let delay = kill_delay(&mut rng, took);
        println!("{vm}: killing the replica {delay} ms into `failover start --point {p2}`");
        kill_during(
            &mut b,
            &["failover", "start", vm, "--point", &p2.to_string()],
            delay,
        );
        assert_eq!(
            state(&b, vm),
            "FailedOverWaitingCompletion",
            "{vm}: still failed over (seed {seed})"
        );
        let fo = served_disk(&b, vm, &format!("{vm}'s failover disk (seed {seed})"));
        let copy = root.path().join(format!("{vm}.raw"));
        copy_out(&fo, &copy);
        let data = std::fs::read(&copy).unwrap();
        std::fs::remove_file(&copy).unwrap();
        let point = data[0];
        assert!(
            (point == 1 || point == 2) && data[..48 << 20].iter().all(|&x| x == point),
            "{vm}: the first 48 MiB are all of one point (seed {seed})"
        );
        let written = &data[56 << 20..57 << 20];
        let kept = written.iter().all(|&x| x == 9);
        assert!(
            kept || written.iter().all(|&x| x == 0),
            "{vm}: the first failover's write is whole or gone (seed {seed})"
        );
        assert!(
            !kept || point == 1,
            "{vm}: the first failover's write over point {p1} appears on point {p2} (seed {seed})"
        );
        assert!(
            data[48 << 20..56 << 20].iter().all(|&x| x == 0)
                && data[57 << 20..].iter().all(|&x| x == 0),
            "{vm}: nothing else was written (seed {seed})"
        );
        let afresh = events(&b).iter().any(|e| {
            e["id"] == 3030
                && e["vm"] == vm
                && e["message"].as_str().unwrap_or("").contains("afresh")
        });
        println!(
            "{vm}: after the restart the failover is at point {} ({} the first failover's write{})",
            if point == 1 { p1 } else { p2 },
            if kept { "with" } else { "without" },
            if afresh { "; served afresh" } else { "" }
        );
        assert!(
            kept || point == 2 || afresh,
            "{vm}: the first failover, served again, lost its flushed write (seed {seed})"
        );
        b.ok(&["failover", "stop", vm]);
    }
}

/// Kill -9 of the old primary (A), and separately of the new primary (B), during `replication
/// reverse` on B after a planned failover: running the reverse again finishes it, and a sync
/// from B then commits on A a point equal to B's disk.
#[test]
fn kill_9_of_either_host_during_reverse_is_finished_by_running_it_again() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(root.path());
    enable_replica_server(&a);
    for (round, kill_a) in [(0, true), (1, false), (2, true), (3, false)] {
        let vm = format!("rev{round}");
        a.ok(&["vm", "create", &vm, "--disk", "64M"]);
        a.ok(&[
            "replication",
            "enable",
            &vm,
            "--replica",
            &b.addr(),
            "--frequency",
            "3600",
        ]);
        let uri = a.nbd_uri(&vm, 0);
        qemu_io_ok(&uri, &["write -P 1 0 32M"]);
        a.ok(&["replication", "start", &vm, "--wait"]);
        qemu_io_ok(&uri, &["write -P 2 0 1M"]);
        prepare_until_ok(&a, &vm);
        b.ok(&["failover", "start", &vm]);
        b.ok(&["failover", "complete", &vm]);
        qemu_io_ok(&disk_uri(&b, &vm), &["write -P 3 8M 1M"]);
        let took = timed(|| b.ok(&["replication", "status", &vm]));

        let args = [
            "replication",
            "reverse",
            vm.as_str(),
            "--replica",
            &a.addr(),
            "--frequency",
            "3600",
        ];
        // A reverse is a CLI round trip like `replication status`, plus a TLS hello to the
        // old primary and its adoption of its disks (links, a catalog commit or two).
        let delay = rng.gen_range(0..=took * 6 + 30);
        let who = if kill_a { "old primary" } else { "new primary" };
        println!("{vm}: killing the {who} {delay} ms into `replication reverse`");
        if kill_a {
            kill_other_during(&b, &mut a, &args, delay);
        } else {
            kill_during(&mut b, &args, delay);
        }
        let st = b.json(&["replication", "status", &vm]);
        println!(
            "{vm}: after the restart B says {} / {}",
            st["role"], st["state"]
        );
        // The old primary's disks stay refused to guests whatever the kill interrupted.
        let fenced = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k", &uri])
            .output()
            .unwrap();
        assert!(
            !fenced.status.success(),
            "{vm}: the old primary serves its disks again (seed {seed})"
        );
        if st["state"] != "Replicating" {
            // Run again (a transient refusal while a host comes back is retried).
            wait_until(
                &format!("the reverse of {vm} to finish (seed {seed})"),
                Duration::from_secs(30),
                || {
                    let out = b.run(&args);
                    if !out.status.success() {
                        eprintln!(
                            "reverse of {vm} again: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                    out.status.success()
                },
            );
        }
        let st = b.json(&["replication", "status", &vm]);
        assert_eq!(st["role"], "Primary", "{vm}: {st} (seed {seed})");
        assert_eq!(st["state"], "Replicating", "{vm}: {st} (seed {seed})");
        assert_eq!(
            a.json(&["replication", "status", &vm])["role"],
            "Replica",
            "{vm} (seed {seed})"
        );
        qemu_io_ok(&disk_uri(&b, &vm), &["write -P 4 16M 1M"]);
        sync_until_ok(&b, &vm, 20);
        assert!(
            latest_equals_primary(&b, &a, &vm, 0, root.path()),
            "{vm}: A's copy equals B's disk (seed {seed})"
        );
    }
}

/// Regression: a `failover stop`, or a `failover start` at another point, killed after it had
/// deleted the failover's record but before the relationship moved on left a relationship
/// saying `FailedOverWaitingCompletion` whose disks nobody served (`vm show` not found, no
/// event). Now the restart serves the relationship's point afresh. The kill lands in that
/// window deterministically: strace delays every unlink of the daemon (the overlays'
/// discard, which comes after the record's deletion and before the relationship's step).
#[test]
fn failover_cut_short_after_its_record_went_is_served_afresh_not_left_unserved() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    // (VM, the command cut short: a stop, a start at another point, a test failover's stop)
    for (vm, again, test) in [
        ("cut0", false, false),
        ("cut1", true, false),
        ("cut2", false, true),
    ] {
        let (p1, p2) = two_points(&a, &b, vm);
        let served_as = if test {
            format!("{vm}-test")
        } else {
            vm.to_string()
        };
        let p1s = p1.to_string();
        let mut start = vec!["failover", "start", vm, "--point", &p1s];
        if test {
            start.push("--test");
        }
        b.ok(&start);
        qemu_io_ok(&disk_uri(&b, &served_as), &["write -P 9 56M 1M", "flush"]);
        let p2s = p2.to_string();
        let args: Vec<&str> = match (again, test) {
            (true, _) => vec!["failover", "start", vm, "--point", &p2s],
            (false, true) => vec!["failover", "stop", vm, "--test"],
            (false, false) => vec!["failover", "stop", vm],
        };
        {
            let _slow = Strace::attach(
                b.pid().unwrap(),
                &["inject=unlink,unlinkat:delay_enter=3000000"],
            );
            let mut cli = spawn_cli(&b, &args);
            // The record is deleted before the failover leaves the served map (`vm show`),
            // and the discard's unlinks come next.
            wait_until(
                &format!("{served_as} to leave the served map"),
                Duration::from_secs(30),
                || !failover_served(&b, &served_as),
            );
            b.kill9();
            let _ = cli.wait();
        }
        b.restart();
        let expected = if test {
            "TestFailoverInProgress"
        } else {
            "FailedOverWaitingCompletion"
        };
        assert_eq!(state(&b, vm), expected, "{vm}");
        let fo = served_disk(&b, &served_as, &format!("{served_as}'s failover disk"));
        qemu_io_ok(&fo, &["read -P 1 0 48M", "read -P 0 48M 16M"]);
        assert!(
            events(&b).iter().any(|e| e["id"] == 3030
                && e["vm"] == vm
                && e["message"].as_str().unwrap_or("").contains("afresh")),
            "{vm}: the restart says what it did"
        );
        // The next command works as usual.
        b.ok(&args);
        if again {
            qemu_io_ok(&disk_uri(&b, vm), &["read -P 2 0 48M", "read -P 0 48M 16M"]);
            b.ok(&["failover", "stop", vm]);
        }
        assert_eq!(state(&b, vm), "Replicating");
        assert!(!b.dir.join("failover").join(&served_as).exists(), "{vm}");
    }
}

/// Kill -9 of the old primary in the middle of adopting its disks as the replica's base (a
/// window a random kill rarely hits; strace holds the daemon in it): while its images are
/// linked into the store's `.creating` directory, and once the adopted VM was renamed into
/// place (before or while the replica's relationship is recorded). The old primary's disks
/// stay refused to guests, running the reverse again finishes it, and the next sync from
/// the new primary commits a point equal to its disk.
#[test]
fn kill_9_of_the_old_primary_while_it_adopts_its_disks_is_finished_by_running_reverse_again() {
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(root.path());
    enable_replica_server(&a);
    let storage = a.dir.join("storage");
    for (vm, slow, reached) in [
        (
            "adopt0",
            "inject=link,linkat:delay_enter=3000000",
            ".adopt0.creating",
        ),
        (
            "adopt1",
            "inject=fsync,fdatasync:delay_enter=1000000",
            "adopt1",
        ),
    ] {
        a.ok(&["vm", "create", vm, "--disk", "64M"]);
        a.ok(&[
            "replication",
            "enable",
            vm,
            "--replica",
            &b.addr(),
            "--frequency",
            "3600",
        ]);
        let uri = a.nbd_uri(vm, 0);
        qemu_io_ok(&uri, &["write -P 1 0 32M"]);
        a.ok(&["replication", "start", vm, "--wait"]);
        prepare_until_ok(&a, vm);
        b.ok(&["failover", "start", vm]);
        b.ok(&["failover", "complete", vm]);
        qemu_io_ok(&disk_uri(&b, vm), &["write -P 3 8M 1M"]);

        let args = ["replication", "reverse", vm, "--replica", &a.addr()];
        {
            let _slow = Strace::attach(a.pid().unwrap(), &[slow]);
            let mut cli = spawn_cli(&b, &args);
            wait_until(
                &format!("{vm}: the adoption to reach {reached}"),
                Duration::from_secs(60),
                || storage.join(reached).exists(),
            );
            println!("{vm}: killing the old primary once {reached} exists");
            a.kill9();
            let _ = cli.wait();
        }
        a.restart();
        let fenced = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k", &uri])
            .output()
            .unwrap();
        assert!(
            !fenced.status.success(),
            "{vm}: the old primary serves its disks again"
        );
        println!(
            "{vm}: after the restart A says {} / {}",
            a.json(&["replication", "status", vm])["role"],
            a.json(&["replication", "status", vm])["state"]
        );
        if b.json(&["replication", "status", vm])["state"] != "Replicating" {
            wait_until(
                &format!("the reverse of {vm} to finish"),
                Duration::from_secs(30),
                || {
                    let out = b.run(&args);
                    if !out.status.success() {
                        println!(
                            "reverse of {vm} again: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                    out.status.success()
                },
            );
        }
        assert_eq!(a.json(&["replication", "status", vm])["role"], "Replica");
        qemu_io_ok(&disk_uri(&b, vm), &["write -P 4 16M 1M"]);
        sync_until_ok(&b, vm, 20);
        assert!(
            latest_equals_primary(&b, &a, vm, 0, root.path()),
            "{vm}: A's copy equals B's disk"
        );
    }
}

/// Kill -9 of the replica during `failover prepare` on the primary (while the last changes
/// ship): the prepare either finished (the primary PreparedForFailover, its disks fenced) or
/// failed and left the VM replicating; running it again once the replica is back finishes it,
/// and a failover on the replica then has the primary's last write.
#[test]
fn kill_9_of_the_replica_during_failover_prepare_is_finished_by_preparing_again() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    for round in 0..3 {
        let vm = format!("prep{round}");
        a.ok(&["vm", "create", &vm, "--disk", "64M"]);
        a.ok(&[
            "replication",
            "enable",
            &vm,
            "--replica",
            &b.addr(),
            "--frequency",
            "3600",
        ]);
        a.ok(&["replication", "start", &vm, "--wait"]);
        let uri = a.nbd_uri(&vm, 0);
        // A sync of the same size as what the prepare ships tells how long that takes here.
        qemu_io_ok(&uri, &["write -P 6 0 32M"]);
        let took = timed(|| sync_until_ok(&a, &vm, 20));
        qemu_io_ok(&uri, &["write -P 7 0 32M"]); // the last changes the prepare must ship

        let delay = kill_delay(&mut rng, took);
        println!("{vm}: killing the replica {delay} ms into `failover prepare` on the primary");
        let mut cli = spawn_cli(&a, &["failover", "prepare", &vm]);
        std::thread::sleep(Duration::from_millis(delay));
        b.kill9();
        let prepared = cli.wait().unwrap().success();
        b.restart();
        let st = state(&a, &vm);
        println!(
            "{vm}: the prepare {} ({st})",
            if prepared { "succeeded" } else { "failed" }
        );
        match st.as_str() {
            "PreparedForFailover" => {}
            "Replicating" => {
                assert!(
                    !prepared,
                    "{vm}: a prepare that succeeded left it {st} (seed {seed})"
                );
                // Not prepared: the disks are served again, and a prepare once the replica
                // answers completes.
                qemu_io_ok(&uri, &["read -P 7 0 32M"]);
                wait_until(
                    &format!("the prepare of {vm} again (seed {seed})"),
                    Duration::from_secs(30),
                    || {
                        let out = a.run(&["failover", "prepare", &vm]);
                        if !out.status.success() {
                            println!(
                                "prepare of {vm} again: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                        out.status.success()
                    },
                );
            }
            other => {
                panic!("{vm}: after a kill of the replica during prepare: {other} (seed {seed})")
            }
        }
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k", &uri])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{vm}: a prepared VM is fenced (seed {seed})"
        );
        wait_until(
            &format!("the replica to hear of the prepare of {vm} (seed {seed})"),
            Duration::from_secs(30),
            || b.json(&["replication", "status", &vm])["state"] == "PreparedForFailover",
        );
        let info = b.json(&["failover", "start", &vm]);
        let fo = info["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
        qemu_io_ok(&fo, &["read -P 7 0 32M", "read -P 0 32M 32M"]);
        b.ok(&["failover", "stop", &vm]);
    }
}
