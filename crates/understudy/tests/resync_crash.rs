//! kill -9 of either daemon at random moments during a resynchronization, 20 times: each
//! restart goes on with it (the relationship stays `Resynchronizing`; the compare runs again
//! and sends only what still differs), the final point equals the primary byte for byte, and
//! the points from before the resync are untouched. Random moments come from a seed printed
//! at the start; set UNDERSTUDY_TEST_SEED to replay.

mod common;

use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

const KILLS: usize = 20;

#[test]
fn kill_9_of_either_daemon_during_a_resync_never_loses_exactness_or_earlier_points() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (mut a, mut b) = pair(scratch);
    replicate(&a, &b, "web", &["128M"], 3600);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -P 1 0 96M"]);
    sync_until_ok(&a, "web", 20);
    qemu_io_ok(&uri, &["write -P 2 8M 8M"]);
    sync_until_ok(&a, "web", 20);
    let before = point_ids(&b, "web");
    let mut kept = Vec::new();
    for p in &before {
        let f = scratch.join(format!("before-{p}.raw"));
        export_point(&b, "web", &p.to_string(), 0, &f);
        kept.push((*p, f));
    }

    // Edits the tracking cannot know of, scattered over the disk, then the resync.
    let image = disk_path(&a, "web", 0);
    a.stop();
    let edits: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "write -P {} {} 4k",
                3 + i % 200,
                (i * 1999 + 7) % 32000 * 4096
            )
        })
        .collect();
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    qemu_io_ok(image.to_str().unwrap(), &edits);
    a.restart();
    wait_until("resync required", Duration::from_secs(20), || {
        state(&a, "web") == "ResynchronizationRequired"
    });
    // The primary's reads slowed (50 ms each) so that a compare of the disk takes longer than
    // the time between two kills: every kill lands in the resync.
    let slow = |a: &Host| Strace::attach(a.pid().unwrap(), &["inject=pread64:delay_enter=50000"]);
    let mut slowed = Some(slow(&a));
    a.ok(&["replication", "resume", "web", "--resynchronize"]);

    let mut killed = (0, 0);
    let mut during = 0;
    let mut i = 0;
    while during < KILLS {
        assert!(
            i < 3 * KILLS,
            "only {during} of {i} kills landed in a resync"
        );
        let delay = rng.gen_range(100..1000);
        std::thread::sleep(Duration::from_millis(delay));
        match state(&a, "web").as_str() {
            "Resynchronizing" => during += 1,
            // The resync finished between two kills: another one, with more to compare.
            _ => {
                a.ok(&["replication", "resume", "web", "--resynchronize"]);
                i += 1;
                continue;
            }
        }
        i += 1;
        if i % 2 == 1 {
            drop(slowed.take());
            a.kill9();
            a.restart();
            slowed = Some(slow(&a));
            killed.0 += 1;
        } else {
            b.kill9();
            b.restart();
            killed.1 += 1;
        }
        // Every restart finds the resync still to do, or done: never back to replicating
        // without its point.
        let st = state(&a, "web");
        assert!(
            st == "Resynchronizing" || st == "Replicating",
            "after kill {i}: {st}"
        );
        // A cycle now rather than at the next hourly one, in the background: the next kill
        // may land in it.
        let _ = std::process::Command::new(EXE)
            .arg("--data-dir")
            .arg(&a.dir)
            .args(["replication", "sync", "web"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    for e in events(&a) {
        if e["id"] == 2016 || e["id"] == 2017 || e["id"] == 2010 || e["id"] == 2011 {
            println!("{} {} {}", e["time"], e["id"], e["message"]);
        }
    }
    println!(
        "killed the primary {} times, the replica {}; {during} kills while resynchronizing",
        killed.0, killed.1
    );
    drop(slowed);
    b.wait_replica_store();
    sync_until_ok(&a, "web", 40);
    wait_until("replicating", Duration::from_secs(60), || {
        let _ = a.run(&["replication", "sync", "web"]);
        state(&a, "web") == "Replicating"
    });
    assert!(
        latest_equals_primary(&a, &b, "web", 0, scratch),
        "the replica differs from the primary after the resync"
    );
    let after = point_ids(&b, "web");
    for (p, f) in &kept {
        assert!(after.contains(p), "point {p} was dropped: {after:?}");
        let again = scratch.join(format!("after-{p}.raw"));
        export_point(&b, "web", &p.to_string(), 0, &again);
        assert!(files_equal(f, &again), "point {p} changed");
    }
}
