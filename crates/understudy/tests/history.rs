//! Recovery history (issue 9, part 1): `--recovery-history`, `--keep-every-point-for`,
//! `replication set`, and retention under load. Hours of history are compressed into the test
//! by the daemons' test clock (`UNDERSTUDY_TEST_CLOCK`, `proto::time`): both daemons inherit
//! it from this process, so every test of this file runs on the compressed clock.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// Test clock speed: one real second is six minutes of history (an hour in 10 s).
const FACTOR: u64 = 360;
const HOUR_NS: u64 = 3600 * 1_000_000_000;
/// Hourly points kept by the load test: a 4 h history, 40 s of real time.
const HISTORY: u64 = 4;
/// Its any-point window: 30 minutes of history, 5 s of real time.
const WINDOW_NS: u64 = 30 * 60 * 1_000_000_000;
/// How long the load test runs, real time: 55 s is five and a half hours of history, so hourly
/// points also age out of the 4 h history.
const RUN: Duration = Duration::from_secs(55);
/// Retention follows each commit in its own task: a point may be listed this long (real time)
/// after the policy stopped wanting it.
const RETENTION_SLACK: Duration = Duration::from_secs(2);
const DISK: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;

fn real_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The clock origin every daemon of this test binary shares (set once, before any starts).
fn origin() -> u64 {
    static ORIGIN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(|| {
        let o = real_ns();
        std::env::set_var("UNDERSTUDY_TEST_CLOCK", format!("{o}:{FACTOR}"));
        o
    })
}

fn history_now() -> u64 {
    let o = origin();
    o + (real_ns() - o) * FACTOR
}

/// The policy, written again independently of the replica crate: the newest point, every
/// point of the window, and the first point of each of the last `HISTORY` clock hours.
fn wanted(points: &BTreeMap<u64, u64>, now: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    if let Some((&newest, _)) = points.iter().next_back() {
        out.insert(newest);
    }
    let first_hour = (now / HOUR_NS).saturating_sub(HISTORY - 1);
    let mut first_of_hour: BTreeMap<u64, u64> = BTreeMap::new();
    for (&seq, &cut) in points {
        if cut >= now.saturating_sub(WINDOW_NS) {
            out.insert(seq);
        }
        if cut / HOUR_NS >= first_hour {
            first_of_hour.entry(cut / HOUR_NS).or_insert(seq);
        }
    }
    out.extend(first_of_hour.values());
    out
}

/// Points listed on the replica: id → (cut time, kind).
fn listed(b: &Host) -> BTreeMap<u64, (u64, String)> {
    b.json(&["points", "list", "web"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["consistency"], "crash", "{p}");
            assert!(p["pinned_by"].is_array(), "{p}");
            (
                p["id"].as_u64().unwrap(),
                (
                    p["cut_time_unix_ns"].as_u64().unwrap(),
                    p["kind"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// The disk's content after the first `n` writes of `writes` (chunk index, pattern byte).
fn image_after(writes: &[(u64, u8)], n: usize) -> Vec<u8> {
    let mut img = vec![0u8; DISK as usize];
    for &(chunk, pattern) in &writes[..n] {
        let at = (chunk * CHUNK) as usize;
        img[at..at + CHUNK as usize].fill(pattern);
    }
    img
}

fn one_line_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "succeeded: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

/// Retention under load: 1 s cycles for five and a half hours of (compressed) history with the
/// latest point, 4 hourly points and a 30-minute any-point window. At every sample the replica lists
/// every point the policy wants, and nothing it stopped wanting more than one retention pass
/// ago; after a kill -9 of the replica in the middle (retention merges points every second,
/// so it is likely mid-merge; the crate's crash tests stop a merge at every step) every point
/// reads back; at the end every listed point exports byte-equal to the primary at its cut.
#[test]
fn retention_under_load_keeps_exactly_the_policy_and_every_point_exports_exactly() {
    origin();
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "1",
        "--recovery-history",
        &HISTORY.to_string(),
        "--keep-every-point-for",
        "30m",
    ]);
    a.ok(&["replication", "start", "web", "--wait"]);
    let uri = a.nbd_uri("web", 0);

    // Writes made so far (chunk, pattern); synced seq → how many writes it holds.
    let mut writes: Vec<(u64, u8)> = Vec::new();
    let mut synced: BTreeMap<u64, usize> = BTreeMap::new();
    // Every point ever seen listed: seq → cut time.
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let start = Instant::now();
    let mut killed = false;
    let mut samples = 0;
    let mut last_good_list: Option<(Instant, BTreeSet<u64>)> = None;
    while start.elapsed() < RUN {
        let i = writes.len() as u64;
        let chunk = (i * 37) % (DISK / CHUNK);
        let pattern = (i % 254 + 1) as u8;
        qemu_io_ok(
            &uri,
            &[&format!("write -q -P {pattern} {} {CHUNK}", chunk * CHUNK)],
        );
        writes.push((chunk, pattern));
        let sync = sync_until_ok(&a, "web", 40);
        synced.insert(sync["seq"].as_u64().unwrap(), writes.len());
        // About one sync between two periodic cycles: a few points a second in all.
        std::thread::sleep(Duration::from_millis(300));

        if !killed && start.elapsed() > RUN / 2 {
            // kill -9 while retention merges every second, then every point must read.
            b.kill9();
            b.restart();
            killed = true;
            sync_until_ok(&a, "web", 40);
            // Every point reads (the window moves 6 minutes a second: a point may be retired
            // between the listing and its export, then it is no longer listed).
            let f = root.path().join("after-kill.raw");
            for id in listed(&b).keys() {
                let out = b.run(&[
                    "points",
                    "export",
                    "web",
                    "--point",
                    &id.to_string(),
                    "--to",
                    f.to_str().unwrap(),
                ]);
                assert!(
                    out.status.success() || !listed(&b).contains_key(id),
                    "point {id} unreadable after kill -9: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let _ = std::fs::remove_file(&f);
            last_good_list = None;
            continue;
        }

        let before = history_now();
        let list = listed(&b);
        let after = history_now();
        samples += 1;
        for (&id, &(cut, _)) in &list {
            seen.insert(id, cut);
        }
        let ids: BTreeSet<u64> = list.keys().copied().collect();
        // Nothing the policy wants (of every point ever seen) is missing.
        for w in wanted(&seen, before) {
            assert!(
                ids.contains(&w),
                "point {w} is wanted at {before} but not listed: {ids:?}\n{}",
                tail(&b.log(), 30)
            );
        }
        // Nothing is kept that the policy stopped wanting before the last retention pass.
        let slack = RETENTION_SLACK.as_nanos() as u64 * FACTOR;
        let still = wanted(&seen, after.saturating_sub(slack));
        let newest = *ids.iter().next_back().unwrap();
        for id in &ids {
            assert!(
                *id == newest || still.contains(id) || wanted(&seen, after).contains(id),
                "point {id} listed although the policy stopped wanting it: {list:?}"
            );
        }
        // The kinds say what the policy keeps each point for.
        assert_eq!(list[&newest].1, "Latest");
        last_good_list = Some((Instant::now(), ids));
    }
    assert!(killed && samples > 10, "too few samples: {samples}");
    let (_, ids) = last_good_list.unwrap();
    let list = listed(&b);
    let kinds: Vec<&str> = list.values().map(|(_, k)| k.as_str()).collect();
    println!(
        "{samples} samples over {} hours of history; kept at the end {ids:?} with kinds {kinds:?}; {} points seen",
        RUN.as_secs() * FACTOR / 3600,
        seen.len()
    );
    let hourly = kinds.iter().filter(|k| **k == "Hourly").count();
    assert!(
        (HISTORY as usize - 1..=HISTORY as usize).contains(&hourly),
        "{hourly} hourly points kept after hours of history: {list:?}"
    );
    // Hourly points aged out of the history (the first ones seen are gone).
    let first_seen = *seen.keys().next().unwrap();
    assert!(!list.contains_key(&first_seen), "{list:?}");
    // Bounded: the window (5 s of cycles and syncs) plus the hourly points and the newest; far
    // below what hours of cycles made.
    assert!(
        list.len() < seen.len() / 2,
        "{} of {}",
        list.len(),
        seen.len()
    );

    // Freeze what is kept (the compressed clock slides the window 6 minutes a second): a day
    // of window keeps every point listed now, and reaches the replica with the next hello.
    a.ok(&["replication", "set", "web", "--keep-every-point-for", "24h"]);
    sync_until_ok(&a, "web", 40);
    wait_until(
        "the replica records the wider window",
        Duration::from_secs(20),
        || {
            b.json(&["replication", "status", "web"])["history"]["keep_every_point_for_secs"]
                == 86_400
        },
    );
    let list = listed(&b);
    // Every kept point exports byte-equal to the primary at its cut: the points this test
    // synced hold exactly the writes made before their sync; a point of a periodic cycle in
    // between holds the writes of the sync before it or the one after.
    let scratch = root.path().join("point.raw");
    for &id in list.keys() {
        export_point(&b, "web", &id.to_string(), 0, &scratch);
        let got = std::fs::read(&scratch).unwrap();
        let before = synced.range(..=id).next_back().map(|(_, &n)| n);
        let ok = match synced.get(&id) {
            Some(&n) => got == image_after(&writes, n),
            None => {
                let after = synced.range(id..).next().map_or(writes.len(), |(_, &n)| n);
                let lo = before.unwrap_or(0);
                (lo..=after).any(|n| got == image_after(&writes, n))
            }
        };
        assert!(ok, "point {id} does not hold the primary's disk at its cut");
    }
    let _ = std::fs::remove_file(&scratch);
}

/// `replication set` changes the frequency, compression and history in place; values out of
/// range are one-line errors that change nothing.
#[test]
fn replication_set_changes_settings_in_place_and_refuses_bad_values() {
    origin();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "web", &["4M"], 300);
    let before = a.json(&["replication", "status", "web"]);
    assert!(before.get("history").is_none(), "{before}");

    for bad in [
        vec!["--recovery-history", "25"],
        vec!["--app-consistent-every", "13", "--recovery-history", "1"],
        vec!["--app-consistent-every", "2"],
        vec!["--keep-every-point-for", "25h"],
        vec!["--keep-every-point-for", "4x"],
        vec!["--frequency", "0"],
        vec![],
    ] {
        let mut args = vec!["replication", "set", "web"];
        args.extend(bad.iter());
        let err = one_line_error(&a.run(&args));
        println!("{bad:?}: {err}");
        let now = a.json(&["replication", "status", "web"]);
        assert_eq!(now["frequency_secs"], before["frequency_secs"]);
        assert!(now.get("history").is_none(), "{bad:?} changed it: {now}");
    }
    // Enable refuses an out-of-range history too, before contacting the replica.
    a.ok(&["vm", "create", "db", "--disk", "4M"]);
    let err = one_line_error(&a.run(&[
        "replication",
        "enable",
        "db",
        "--replica",
        &b.addr(),
        "--recovery-history",
        "30",
    ]));
    assert!(err.contains("recovery history"), "{err}");

    a.ok(&[
        "replication",
        "set",
        "web",
        "--frequency",
        "2",
        "--compression",
        "none",
        "--recovery-history",
        "4",
        "--keep-every-point-for",
        "1h30m",
    ]);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["frequency_secs"], 2);
    assert_eq!(st["compression"], "none");
    assert_eq!(st["history"]["recovery_history"], 4);
    assert_eq!(st["history"]["keep_every_point_for_secs"], 5400);
    assert_eq!(
        st["state"], "Replicating",
        "no new initial replication: {st}"
    );
    // `set` cycles at once (the 300 s wait is not sat out): its hello brings the policy to the
    // replica, and the 2 s frequency takes over.
    wait_until(
        "the replica records the policy",
        Duration::from_secs(20),
        || b.json(&["replication", "status", "web"])["history"]["recovery_history"] == 4,
    );
    // Only the history fields given change.
    a.ok(&["replication", "set", "web", "--app-consistent-every", "2"]);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["history"]["recovery_history"], 4);
    assert_eq!(st["history"]["app_consistent_every_hours"], 2);
    assert_eq!(st["history"]["keep_every_point_for_secs"], 5400);
    let human = a.ok(&["replication", "status", "web"]);
    assert!(human.contains("4 hourly point"), "{human}");
    let points = b.ok(&["points", "list", "web"]);
    assert!(
        points.contains("CONSISTENCY") && points.contains("Latest"),
        "{points}"
    );
}

/// A served point is held against the history policy: with only the latest point kept, the
/// served one stays listed (`pinned_by` says why) and reads the same bytes while newer points
/// come and go; once unserved, the next retention pass retires it.
#[test]
fn a_served_point_outlives_the_policy_until_unserved() {
    origin();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "web", &["4M"], 300);
    let uri = a.nbd_uri("web", 0);
    qemu_io_ok(&uri, &["write -q -P 7 0 64k"]);
    let served = sync_until_ok(&a, "web", 10)["seq"].as_u64().unwrap();
    b.ok(&["points", "serve", "web", "--point", &served.to_string()]);
    let before = root.path().join("before.raw");
    export_point(&b, "web", &served.to_string(), 0, &before);
    // Only the latest point from now on.
    a.ok(&["replication", "set", "web", "--recovery-history", "0"]);
    for i in 0..4 {
        qemu_io_ok(&uri, &[&format!("write -q -P {} 0 64k", 20 + i)]);
        sync_until_ok(&a, "web", 10);
    }
    let newest = sync_until_ok(&a, "web", 10)["seq"].as_u64().unwrap();
    wait_until(
        "only the served and the newest point",
        Duration::from_secs(20),
        || listed(&b).keys().copied().collect::<Vec<_>>() == vec![served, newest],
    );
    let points = b.json(&["points", "list", "web"]);
    let p = points
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == served)
        .unwrap()
        .clone();
    assert_eq!(p["pinned_by"][0], "points serve", "{p}");
    let after = root.path().join("after.raw");
    export_point(&b, "web", &served.to_string(), 0, &after);
    assert!(files_equal(&before, &after), "the served point changed");
    b.ok(&["points", "unserve", "web", "--point", &served.to_string()]);
    let last = sync_until_ok(&a, "web", 10)["seq"].as_u64().unwrap();
    wait_until(
        "the unserved point retired",
        Duration::from_secs(20),
        || listed(&b).keys().copied().collect::<Vec<_>>() == vec![last],
    );
}
