//! `understudy events`: filtering by VM and time, JSON lines, `--follow` printing new events
//! until terminated, the event log bounded by rotation, and the daemon's log fit for the
//! journal when systemd runs it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn ids(events: &[serde_json::Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["id"].as_u64()).collect()
}

#[test]
fn events_filter_by_vm_and_since_and_print_json_lines() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 3600);
    // Event times have millisecond precision: the next events are strictly later.
    std::thread::sleep(Duration::from_millis(20));
    let since = rfc3339_now();
    std::thread::sleep(Duration::from_millis(20));
    replicate(&a, &b, "db", &["8M"], 3600);

    let all = json_lines(&a.ok(&["events", "--json"]));
    assert!(ids(&all).contains(&1000), "daemon start missing: {all:?}");
    assert!(all.iter().any(|e| e["vm"] == "web") && all.iter().any(|e| e["vm"] == "db"));

    let web = json_lines(&a.ok(&["events", "--vm", "web", "--json"]));
    assert!(
        !web.is_empty() && web.iter().all(|e| e["vm"] == "web"),
        "{web:?}"
    );
    assert!(
        ids(&web).contains(&2000) && ids(&web).contains(&2002),
        "{web:?}"
    );

    let recent = json_lines(&a.ok(&["events", "--since", &since, "--json"]));
    assert!(!recent.is_empty(), "nothing since {since}");
    assert!(
        recent.iter().all(|e| e["vm"] == "db"),
        "events before {since} listed: {recent:?}"
    );
    assert!(recent
        .iter()
        .all(|e| e["time"].as_str().unwrap() >= since.as_str()));
    // A duration back from now, and the text output.
    let text = a.ok(&["events", "--since", "1h", "--vm", "db"]);
    assert!(text.lines().count() >= 2, "{text}");
    assert!(text.lines().all(|l| l.contains(" db ")), "{text}");
    let out = a.run(&["events", "--since", "yesterday-ish"]);
    assert!(one_line_failure(&out).contains("--since"));
}

#[test]
fn events_follow_prints_new_events_until_terminated() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "web", &["8M"], 3600);
    let mut follow = Command::new(EXE)
        .arg("--data-dir")
        .arg(&a.dir)
        .args(["events", "--follow", "--json", "--vm", "web"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // What is already there comes first, then the new event.
    let first: serde_json::Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap();
    assert_eq!(first["vm"], "web");
    a.ok(&["replication", "suspend", "web"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut suspended = false;
    while Instant::now() < deadline && !suspended {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let e: serde_json::Value = serde_json::from_str(&line).unwrap();
            suspended = e["id"] == 2005;
        }
    }
    assert!(suspended, "--follow did not print the suspend event (2005)");
    unsafe { libc::kill(follow.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if follow.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "events --follow ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn event_log_rotates_and_stays_bounded() {
    const LIMIT: u64 = 4096;
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = pair_with(root.path(), &["--events-file-max", "4K"]);
    replicate(&a, &b, "web", &["8M"], 3600);
    // Each suspend and resume is one event of ~150 bytes: several rotations.
    for _ in 0..30 {
        a.ok(&["replication", "suspend", "web"]);
        a.ok(&["replication", "resume", "web"]);
    }
    // Stopped: nothing is logged while the files are compared with the listing (`events`
    // reads the files, daemon or not).
    a.stop();
    let log = a.dir.join("events.log");
    let old = a.dir.join("events.log.1");
    for f in [&log, &old] {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= LIMIT, "{} is {len} bytes, over {LIMIT}", f.display());
    }
    assert!(!a.dir.join("events.log.2").exists());
    // `events` reads the rotated file and the current one, oldest first, none lost between.
    let listed = json_lines(&a.ok(&["events", "--vm", "web", "--json"]));
    let on_disk: usize = [&old, &log]
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| l.contains("\"vm\":\"web\""))
                .count()
        })
        .sum();
    assert_eq!(listed.len(), on_disk);
    let times: Vec<&str> = listed.iter().map(|e| e["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not oldest first");
    // The newest suspend-or-resume listed is the last resume (the daemon may log other
    // events after it, e.g. its next cycle's).
    let last = listed
        .iter()
        .rev()
        .find(|e| e["id"] == 2005 || e["id"] == 2006)
        .unwrap();
    assert_eq!(last["id"], 2006, "{last}");
}

#[test]
fn daemon_logs_for_the_journal_when_systemd_runs_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("h");
    let port = free_port();
    let mut child = Command::new(EXE)
        .args(["serve", "--data-dir"])
        .arg(&dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--name", "h"])
        .env("JOURNAL_STREAM", "8:12345")
        .env("UNDERSTUDY_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready).unwrap();
    assert!(ready.starts_with("ready"), "{ready}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI colors in the journal: {log}");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        // The journal stamps lines itself: each starts with its level, not a timestamp.
        let first = line.split_whitespace().next().unwrap_or("");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&first),
            "line not fit for the journal: {line}"
        );
    }
}

/// Now as RFC 3339 UTC with milliseconds, like the daemon's event times.
fn rfc3339_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
