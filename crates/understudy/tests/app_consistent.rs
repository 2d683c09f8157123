//! Application-consistent points (issue 9, part 2): `vm set --guest-agent / --pre-freeze-hook /
//! --post-thaw-hook` and `--app-consistent-every H`. Hours are compressed by the daemons' test
//! clock (`UNDERSTUDY_TEST_CLOCK`, `proto::time`), inherited from this process.

mod common;

use std::process::{Command, Output};

use common::*;

/// Test clock speed: one real second is six minutes of history (an hour in 10 s).
const FACTOR: u64 = 360;

fn origin() {
    static ORIGIN: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(|| {
        let o = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        std::env::set_var("UNDERSTUDY_TEST_CLOCK", format!("{o}:{FACTOR}"));
    });
}

fn one_line_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "succeeded: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

/// The newest listed point of `vm` on the replica.
fn latest_point(b: &Host, vm: &str) -> serde_json::Value {
    let pts = b.json(&["points", "list", vm]);
    pts.as_array()
        .unwrap()
        .iter()
        .max_by_key(|p| p["id"].as_u64().unwrap())
        .unwrap()
        .clone()
}

fn count_events(h: &Host, id: u64) -> usize {
    events(h).iter().filter(|e| e["id"] == id).count()
}

/// A guest agent that is absent, then a pre-freeze hook that exits 1: every cycle still
/// commits a crash-consistent point, each failure is counted and logged (event 2021), health
/// turns Warning after three in a row, and a post-thaw hook runs even after a failed
/// pre-freeze hook. Then working hooks: the point is application-consistent, the pre-freeze
/// hook's write is in it and the post-thaw hook's write is not (freeze, cut, thaw), and health
/// is Normal again. Bad `vm set` input is a one-line error that changes nothing.
#[test]
fn missing_agent_or_failing_hook_costs_a_counted_failure_not_the_point() {
    origin();
    require("qemu-io", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "4M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
        "--recovery-history",
        "2",
        "--app-consistent-every",
        "1",
    ]);

    // Bad input first: one line, nothing changed.
    let before = a.json(&["vm", "show", "web"]);
    for args in [
        vec!["vm", "set", "web"],
        vec!["vm", "set", "web", "--post-thaw-hook", "true"],
        vec!["vm", "set", "nosuchvm", "--pre-freeze-hook", "true"],
    ] {
        let e = one_line_error(&a.run(&args));
        println!("{}: {e}", args.join(" "));
    }
    assert_eq!(a.json(&["vm", "show", "web"]), before);

    // An agent socket nobody listens on.
    let sock = root.path().join("absent-qga.sock");
    a.ok(&["vm", "set", "web", "--guest-agent", sock.to_str().unwrap()]);
    assert_eq!(
        a.json(&["vm", "show", "web"])["guest_agent"],
        sock.to_str().unwrap()
    );
    a.ok(&["replication", "start", "web", "--wait"]);
    sync_until_ok(&a, "web", 3);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(
        st["health"], "Normal",
        "two failures are not yet a warning: {st}"
    );
    sync_until_ok(&a, "web", 3);
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["app_consistent_failures_total"], 3, "{m}");
    assert_eq!(m["app_consistent_points_total"], 0, "{m}");
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["health"], "Warning", "{st}");
    assert!(
        st["health_reasons"]
            .to_string()
            .contains("application-consistent"),
        "{st}"
    );
    assert_eq!(count_events(&a, 2021), 3);
    for p in b.json(&["points", "list", "web"]).as_array().unwrap() {
        assert_eq!(p["consistency"], "crash", "{p}");
    }

    // A pre-freeze hook that fails: still a crash-consistent point; the post-thaw hook ran.
    let thawed = root.path().join("thawed");
    a.ok(&[
        "vm",
        "set",
        "web",
        "--no-guest-agent",
        "--pre-freeze-hook",
        "exit 1",
        "--post-thaw-hook",
        &format!("touch {}", thawed.display()),
    ]);
    sync_until_ok(&a, "web", 3);
    assert!(
        thawed.exists(),
        "the post-thaw hook must follow a failed pre-freeze hook"
    );
    assert_eq!(latest_point(&b, "web")["consistency"], "crash");
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["app_consistent_failures_total"], 4, "{m}");
    let ev = events(&a);
    let last = ev.iter().rev().find(|e| e["id"] == 2021).unwrap();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("pre-freeze hook failed"),
        "{last}"
    );

    // Working hooks: the pre-freeze hook writes 0xAA at 0, the post-thaw hook 0xBB at 64 KiB.
    let uri = a.nbd_uri("web", 0);
    let write = |pattern: &str, at: &str| {
        format!("qemu-io -f raw -c 'write -P {pattern} {at} 64k' '{uri}' >/dev/null")
    };
    a.ok(&[
        "vm",
        "set",
        "web",
        "--pre-freeze-hook",
        &write("0xaa", "0"),
        "--post-thaw-hook",
        &write("0xbb", "64k"),
    ]);
    let r = sync_until_ok(&a, "web", 3);
    let app_seq = r["seq"].as_u64().unwrap();
    let p = latest_point(&b, "web");
    assert_eq!(p["id"], app_seq);
    assert_eq!(p["consistency"], "application", "{p}");
    let img = root.path().join("app.raw");
    export_point(&b, "web", &app_seq.to_string(), 0, &img);
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[..65536].iter().all(|&x| x == 0xaa),
        "pre-freeze write missing"
    );
    assert!(
        bytes[65536..131072].iter().all(|&x| x == 0),
        "the post-thaw write is in the point: the cut was not taken before the thaw"
    );
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["app_consistent_points_total"], 1, "{m}");
    assert_eq!(m["app_consistent_failures_total"], 4, "{m}");
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["health"], "Normal", "{st}");

    // Not due again within the hour: the next point is crash-consistent, and the
    // application-consistent one is kept and listed as such.
    let r = sync_until_ok(&a, "web", 3);
    let next = latest_point(&b, "web");
    assert_eq!(next["id"], r["seq"]);
    assert_eq!(next["consistency"], "crash", "{next}");
    let pts = b.json(&["points", "list", "web"]);
    let app = pts
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == app_seq)
        .unwrap_or_else(|| panic!("the app-consistent point was not kept: {pts}"));
    assert_eq!(app["kind"], "AppConsistent", "{app}");
    assert_eq!(app["consistency"], "application", "{app}");
}

/// A guest agent that accepts and never answers (what qemu's chardev gives when no agent runs
/// in the guest), then a pre-freeze hook that hangs: each cycle still commits a
/// crash-consistent point within the bounds (3 s per agent step, 30 s per hook), the hung
/// hook's whole process group is killed, and each failure is counted.
#[test]
fn silent_agent_and_hanging_hook_are_bounded_and_cost_a_crash_consistent_point() {
    origin();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "4M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
        "--recovery-history",
        "1",
        "--app-consistent-every",
        "1",
    ]);
    let sock = root.path().join("silent-qga.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held2 = held.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().map_while(Result::ok) {
            held2.lock().unwrap().push(c);
        }
    });
    a.ok(&["vm", "set", "web", "--guest-agent", sock.to_str().unwrap()]);
    let t = std::time::Instant::now();
    a.ok(&["replication", "start", "web", "--wait"]);
    println!("initial cycle with a silent agent: {:?}", t.elapsed());
    assert!(
        !held.lock().unwrap().is_empty(),
        "the daemon never connected"
    );
    assert_eq!(latest_point(&b, "web")["consistency"], "crash");
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["app_consistent_failures_total"], 1, "{m}");
    let ev = events(&a);
    let last = ev.iter().rev().find(|e| e["id"] == 2021).unwrap();
    assert!(
        last["message"].as_str().unwrap().contains("in time"),
        "{last}"
    );

    // A hook that hangs (its child too): killed after 30 s, the point is still taken.
    let marker = format!("{}.{}", 600, std::process::id());
    a.ok(&[
        "vm",
        "set",
        "web",
        "--no-guest-agent",
        "--pre-freeze-hook",
        &format!("sleep {marker}; true"),
    ]);
    let t = std::time::Instant::now();
    let r = sync_until_ok(&a, "web", 1);
    println!("cycle with a hanging hook: {:?}", t.elapsed());
    assert_eq!(latest_point(&b, "web")["id"], r["seq"]);
    assert_eq!(latest_point(&b, "web")["consistency"], "crash");
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["app_consistent_failures_total"], 2, "{m}");
    let ev = events(&a);
    let last = ev.iter().rev().find(|e| e["id"] == 2021).unwrap();
    assert!(
        last["message"].as_str().unwrap().contains("killed"),
        "{last}"
    );
    let left = Command::new("pgrep")
        .args(["-f", &format!("sleep {marker}")])
        .output()
        .unwrap();
    assert!(
        !left.status.success(),
        "the hook's child outlived it: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    // A third failure in a row (the silent agent again): Warning. Removing the agent and the
    // hook ends the streak at the next cycle: Normal.
    a.ok(&[
        "vm",
        "set",
        "web",
        "--guest-agent",
        sock.to_str().unwrap(),
        "--pre-freeze-hook",
        "",
    ]);
    sync_until_ok(&a, "web", 1);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["health"], "Warning", "{st}");
    a.ok(&["vm", "set", "web", "--no-guest-agent"]);
    assert!(a.json(&["vm", "show", "web"]).get("guest_agent").is_none());
    sync_until_ok(&a, "web", 1);
    let st = a.json(&["replication", "status", "web"]);
    assert_eq!(st["health"], "Normal", "{st}");
    let m = a.json(&["replication", "measure", "web"]);
    assert_eq!(m["app_consistent_failures_total"], 3, "{m}");
}
