//! One state machine per relationship, seen from both hosts: `replication status` on the
//! primary and on the replica report the same Hyper-V state names through every transition,
//! and the replica knows its relationship (state, primary, generation) across a restart.

mod common;

use std::time::Duration;

use common::*;

/// Waits until both hosts report `want` for `vm` (the replica learns a change from the
/// primary's hello, sent right after it).
fn both_say(a: &Host, b: &Host, vm: &str, want: &str) {
    wait_until(
        &format!("both hosts to report {want}"),
        Duration::from_secs(30),
        || status(a, vm)["state"] == want && status(b, vm)["state"] == want,
    );
    let (sa, sb) = (status(a, vm), status(b, vm));
    assert_eq!(sa["role"], "Primary", "{sa}");
    assert_eq!(sb["role"], "Replica", "{sb}");
    assert_eq!(sa["generation"], sb["generation"], "{sa}\n{sb}");
}

#[test]
fn both_hosts_report_the_same_state_through_every_transition() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "8M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
    ]);
    both_say(&a, &b, "web", "ReadyForInitialReplication");
    assert_eq!(status(&a, "web")["health"], "Warning");

    a.ok(&["replication", "start", "web", "--wait"]);
    both_say(&a, &b, "web", "Replicating");

    a.ok(&["replication", "suspend", "web"]);
    both_say(&a, &b, "web", "Suspended");
    // Refusals change nothing, in one line.
    let out = a.run(&["replication", "start", "web"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    a.ok(&["replication", "resume", "web"]);
    both_say(&a, &b, "web", "Replicating");

    // A resynchronization scheduled for later: both wait for it, no cycle runs.
    a.ok(&[
        "replication",
        "resume",
        "web",
        "--resynchronize",
        "--at",
        "2099-01-01T00:00:00Z",
    ]);
    both_say(&a, &b, "web", "WaitingForStartResynchronize");
    let st = status(&a, "web");
    assert_ne!(st["health"], "Normal", "{st}");
    let out = a.run(&["replication", "sync", "web"]);
    assert_eq!(out.status.code(), Some(75), "no cycle while waiting");
    let out = a.run(&[
        "replication",
        "resume",
        "web",
        "--resynchronize",
        "--at",
        "soon",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));

    // Rescheduled 3 s from now: it starts by itself at that time and completes.
    let soon = proto::time::rfc3339_from_unix_ns(proto::time::now_unix_ns() + 3_000_000_000);
    let before = point_ids(&b, "web").len();
    a.ok(&[
        "replication",
        "resume",
        "web",
        "--resynchronize",
        "--at",
        &soon,
    ]);
    assert_eq!(status(&a, "web")["state"], "WaitingForStartResynchronize");
    wait_until(
        "the scheduled resync to run",
        Duration::from_secs(60),
        || status(&a, "web")["state"] == "Replicating" && point_ids(&b, "web").len() > before,
    );
    both_say(&a, &b, "web", "Replicating");

    // A time already past starts it at once.
    a.ok(&[
        "replication",
        "resume",
        "web",
        "--resynchronize",
        "--at",
        "2001-01-01T00:00:00Z",
    ]);
    assert_ne!(status(&a, "web")["state"], "WaitingForStartResynchronize");

    // Started now: Resynchronizing until its Full point commits, then Replicating.
    a.ok(&["replication", "resume", "web", "--resynchronize"]);
    assert_eq!(status(&a, "web")["state"], "Resynchronizing");
    wait_until("the resync point", Duration::from_secs(30), || {
        status(&a, "web")["state"] == "Replicating"
    });
    both_say(&a, &b, "web", "Replicating");
    let points = point_ids(&b, "web");
    assert!(
        points.len() >= 2,
        "the resync is a new point on top: {points:?}"
    );

    // The replica knows its relationship across a restart: state, primary, its own facts.
    b.stop();
    b.restart();
    let sb = status(&b, "web");
    assert_eq!(sb["state"], "Replicating", "{sb}");
    assert_eq!(sb["peer"], "primary", "{sb}");
    assert_eq!(sb["replica"]["points_kept"], points.len(), "{sb}");
    let events = events(&a);
    for id in [2009, 2010, 2011] {
        assert!(
            events.iter().any(|e| e["id"] == id),
            "no event {id} (resync scheduled/started/done)"
        );
    }
}

/// A host that replicates a VM cannot also be its replica, nor the reverse: one relationship
/// per VM, in one role (reverse replication changes the role of that one record).
#[test]
fn a_host_is_never_primary_and_replica_of_one_vm() {
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
    ]);
    // b is web's replica: its own VM of that name cannot replicate from b.
    b.ok(&["vm", "create", "web", "--disk", "4M"]);
    let out = b.run(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &a.addr(),
        "--frequency",
        "3600",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web is a replica on this host"), "{err}");

    // a replicates web: a third host's web cannot make a its replica.
    enable_replica_server(&a);
    let c = Host::start(root.path(), "third");
    trust_each_other(&a, &c);
    c.ok(&["vm", "create", "web", "--disk", "4M"]);
    let out = c.run(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &a.addr(),
        "--frequency",
        "3600",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("it cannot also be a replica"), "{err}");
    assert_eq!(status(&a, "web")["role"], "Primary");
    assert_eq!(status(&b, "web")["role"], "Replica");
}
