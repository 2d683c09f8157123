//! Recovery points served read-only over NBD on the replica (`points serve`, `points unserve`):
//! readable as is by the real tools, pinned while served (never changing while cycles and
//! retention run), pins surviving a restart, expiring with `--for`, and bad input refused in
//! one line. Real daemons on loopback, real tools.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Points the replica keeps in these tests (`serve --retain-points`, a tests-only knob): small,
/// so that a few cycles already exceed it and retention folds.
const RETAIN: &str = "3";
const DISK: &str = "8M";

/// A primary and a replica server (keeping [`RETAIN`] points) that trust each other.
fn pair_retaining(root: &Path) -> (Host, Host) {
    pair_with_args(root, &[], &["--retain-points", RETAIN])
}

fn write(uri: &str, cmd: &str) {
    qemu_io_ok(uri, &[cmd]);
}

/// Writes, then `replication sync`: returns the committed point's id.
fn point_after(primary: &Host, vm: &str, cmds: &[&str]) -> u64 {
    let uri = primary.nbd_uri(vm, 0);
    qemu_io_ok(&uri, cmds);
    sync_until_ok(primary, vm, 20)["seq"].as_u64().unwrap()
}

/// The primary's disk 0 of `vm` as it is now, in `to`.
fn primary_copy(primary: &Host, vm: &str, to: &Path) {
    let _ = std::fs::remove_file(to);
    copy_out(&primary.nbd_uri(vm, 0), to);
}

/// Reads a served export whole with nbdcopy and compares it with `expected`.
fn served_equals(uri: &str, expected: &Path, scratch: &Path) -> bool {
    let out = scratch.join("served-read.raw");
    let _ = std::fs::remove_file(&out);
    copy_out(uri, &out);
    files_equal(&out, expected)
}

fn serve(replica: &Host, vm: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["points", "serve", vm];
    a.extend_from_slice(args);
    replica.json(&a)
}

fn nbd_reachable(uri: &str) -> bool {
    Command::new("nbdinfo")
        .arg(uri)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Exports `nbdinfo --list` shows on the replica's NBD socket.
fn listed_exports(replica: &Host) -> Vec<String> {
    let uri = format!(
        "nbd+unix:///?socket={}",
        replica.dir.join("nbd.sock").display()
    );
    let out = sh(Command::new("nbdinfo").args(["--list", "--json"]).arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["export-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Connects to the URI in argv[1] and reads, prints "connected", waits for a line on stdin,
/// then reads again and prints whether that read was refused.
const HELD_READER: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(4096, 0)
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("read-after-unserve", flush=True)
except nbd.Error as e:
    print("refused", e, flush=True)
"#;

fn has_event(h: &Host, id: u64, vm: &str, needle: &str) -> bool {
    events(h).iter().any(|e| {
        e["id"] == id && e["vm"] == vm && e["message"].as_str().unwrap_or("").contains(needle)
    })
}

/// A served point is read as is by nbdinfo, nbdcopy, qemu-img and qemu-io, refuses writes,
/// and never changes while 1 s cycles run and retention (3 points here) folds everything
/// older: it stays equal to the primary at its cut. Unserve ends it and retention resumes.
#[test]
fn served_point_is_read_by_every_tool_and_never_changes_while_cycles_and_retention_run() {
    require("nbdinfo", "nbdinfo");
    require("nbdcopy", "nbdcopy");
    require("qemu-img", "qemu-utils");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair_retaining(scratch);
    replicate(&a, &b, "web", &[DISK], 1);
    let live = a.nbd_uri("web", 0);

    let p = point_after(&a, "web", &["write -P 7 0 1M", "write -P 9 3M 512k"]);
    let expected = scratch.join("expected.raw");
    primary_copy(&a, "web", &expected);

    let served = serve(&b, "web", &["--point", &p.to_string()]);
    assert_eq!(served["point"]["id"], p, "{served}");
    let disk = &served["disks"][0];
    assert_eq!(disk["export_name"], format!("web@{p}-0"), "{served}");
    let uri = disk["nbd_uri"].as_str().unwrap().to_string();

    // nbdinfo: the export is there, read-only, of the disk's size.
    let info: serde_json::Value =
        serde_json::from_str(&sh(Command::new("nbdinfo").arg("--json").arg(&uri))).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["is_read_only"], true, "{info}");
    assert_eq!(export["export-size"], 8 << 20, "{info}");
    // nbdcopy and qemu-img read it whole, equal to the primary at the point's cut.
    assert!(served_equals(&uri, &expected, scratch));
    let converted = scratch.join("converted.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&converted));
    assert!(files_equal(&converted, &expected));
    // qemu-io reads it read-only; a write is refused.
    sh(Command::new("qemu-io")
        .args(["-r", "-f", "raw"])
        .args(["-c", "read -P 7 0 1M", "-c", "read -P 9 3M 512k"])
        .args(["-c", "read -P 0 1M 2M"])
        .arg(&uri));
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(&uri)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() || said.contains("ermission") || said.contains("read-only"),
        "a write through a served point was not refused: {said}"
    );
    assert!(served_equals(&uri, &expected, scratch));

    // 1 s cycles keep running while a guest stand-in rewrites the whole disk; retention (3
    // points) folds everything older than the pinned point, and the point never changes.
    let writer = PatternWriter::start(&live, 8 << 20, 9);
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(1200));
        assert!(
            served_equals(&uri, &expected, scratch),
            "the served point changed in round {round}"
        );
    }
    let (writes, _) = writer.stop();
    assert!(writes > 0);
    sync_until_ok(&a, "web", 20);
    let ids = point_ids(&b, "web");
    assert_eq!(
        ids.first(),
        Some(&p),
        "retention folds up to the pinned point, never past it: {ids:?}"
    );
    assert!(latest_equals_primary(&a, &b, "web", 0, scratch));
    assert!(served_equals(&uri, &expected, scratch));
    assert!(has_event(&b, 3020, "web", &format!("point {p} served")));

    // Unserve: the export is gone, a reader still connected is cut off, the pin released,
    // retention catches up.
    let mut reader = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(HELD_READER)
        .arg(&uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "connected");
    let out = b.ok(&["points", "unserve", "web", "--point", &p.to_string()]);
    writeln!(reader.stdin.take().unwrap()).unwrap();
    let after = lines.next().unwrap().unwrap();
    assert!(after.starts_with("refused"), "{after}");
    reader.wait().unwrap();
    assert!(
        out.contains(&format!("point {p} no longer served")),
        "{out}"
    );
    assert!(!nbd_reachable(&uri), "{uri} still served after unserve");
    assert!(has_event(&b, 3021, "web", "unserved"));
    wait_until(
        "retention to fold past the released point",
        Duration::from_secs(60),
        || {
            write(&live, "write -P 99 0 4k");
            sync_until_ok(&a, "web", 20);
            let ids = point_ids(&b, "web");
            ids.len() <= 3 && !ids.contains(&p)
        },
    );
    assert!(b
        .json(&["points", "served", "web"])
        .as_array()
        .unwrap()
        .is_empty());
}

/// A pin is recorded: after kill -9 and a restart the point is served and pinned again
/// (retention still never folds it); `--for` releases a point when its time ends (event
/// 3021), also when that time ended while the daemon was down.
#[test]
fn served_point_pin_survives_a_restart_and_for_releases_it_with_an_event() {
    require("nbdinfo", "nbdinfo");
    require("nbdcopy", "nbdcopy");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, mut b) = pair_retaining(scratch);
    replicate(&a, &b, "db", &[DISK], 3600);
    let p = point_after(&a, "db", &["write -P 5 1M 2M"]);
    let expected = scratch.join("expected.raw");
    primary_copy(&a, "db", &expected);
    let served = serve(&b, "db", &["--point", "latest"]);
    assert_eq!(served["point"]["id"], p, "{served}");
    assert!(served["expires_at"].is_null(), "{served}");
    let uri = served["disks"][0]["nbd_uri"].as_str().unwrap().to_string();

    b.kill9();
    // Commits while the replica is down fail and stay pending; past RETAIN after it is back.
    b.restart();
    for round in 0..5u64 {
        point_after(&a, "db", &[&format!("write -P {} 1M 2M", 40 + round)]);
    }
    let ids = point_ids(&b, "db");
    assert_eq!(
        ids.first(),
        Some(&p),
        "the pin did not survive the restart: {ids:?}"
    );
    assert!(served_equals(&uri, &expected, scratch));
    let listed = b.json(&["points", "served", "db"]);
    assert_eq!(listed[0]["point"]["id"], p, "{listed}");
    assert_eq!(listed[0]["disks"][0]["nbd_uri"], uri.as_str(), "{listed}");

    // --for: released when its time ends.
    let q = point_ids(&b, "db").last().copied().unwrap();
    let timed = serve(&b, "db", &["--point", &q.to_string(), "--for", "2s"]);
    assert!(timed["expires_at"].is_string(), "{timed}");
    let timed_uri = timed["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
    assert!(nbd_reachable(&timed_uri));
    wait_until("the --for expiry", Duration::from_secs(30), || {
        has_event(&b, 3021, "db", &format!("point {q} no longer served"))
    });
    assert!(!nbd_reachable(&timed_uri));
    // The untimed pin is untouched.
    assert!(served_equals(&uri, &expected, scratch));

    // --for whose time ends while the daemon is down: released at the next start.
    let r = point_after(&a, "db", &["write -P 77 0 4k"]);
    serve(&b, "db", &["--point", &r.to_string(), "--for", "1s"]);
    b.stop();
    std::thread::sleep(Duration::from_millis(1500));
    b.restart();
    wait_until(
        "release of the expired pin",
        Duration::from_secs(30),
        || has_event(&b, 3021, "db", &format!("point {r} no longer served")),
    );
    let listed = b.json(&["points", "served", "db"]);
    let served_ids: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["point"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(served_ids, vec![p], "{listed}");
    assert!(served_equals(&uri, &expected, scratch));
}

/// Without `--disk` every disk of the point is served (one URI each, equal to `points
/// export` of that disk); `--disk N` adds one disk of another point; unserving the VM ends
/// them all.
#[test]
fn serving_a_point_gives_one_read_only_uri_per_disk() {
    require("nbdinfo", "nbdinfo");
    require("nbdcopy", "nbdcopy");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair_retaining(scratch);
    replicate(&a, &b, "two", &["4M", "8M"], 3600);
    qemu_io_ok(&a.nbd_uri("two", 0), &["write -P 3 0 1M"]);
    qemu_io_ok(&a.nbd_uri("two", 1), &["write -P 4 4M 1M"]);
    let p = sync_until_ok(&a, "two", 20)["seq"].as_u64().unwrap();
    let q = point_after(&a, "two", &["write -P 5 0 4k"]);

    let all = serve(&b, "two", &["--point", &p.to_string()]);
    let disks = all["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{all}");
    for (i, d) in disks.iter().enumerate() {
        assert_eq!(d["index"], i as u64);
        assert_eq!(d["export_name"], format!("two@{p}-{i}"));
        let exported = scratch.join(format!("exported-{i}.raw"));
        export_point(&b, "two", &p.to_string(), i, &exported);
        assert!(served_equals(
            d["nbd_uri"].as_str().unwrap(),
            &exported,
            scratch
        ));
    }
    let one = serve(&b, "two", &["--point", &q.to_string(), "--disk", "1"]);
    assert_eq!(one["disks"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["disks"][0]["export_name"], format!("two@{q}-1"));
    let mut listed = listed_exports(&b);
    listed.retain(|e| e.contains('@'));
    listed.sort();
    assert_eq!(
        listed,
        vec![
            format!("two@{p}-0"),
            format!("two@{p}-1"),
            format!("two@{q}-1")
        ]
    );
    let out = b.ok(&["points", "unserve", "two"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(!listed_exports(&b).iter().any(|e| e.contains('@')));
}

fn refused_in_one_line(h: &Host, args: &[&str], needle: &str) {
    let out = h.run(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not say {needle:?}"
    );
}

/// Bad input to `points serve` / `points unserve`: one line, and nothing served or pinned.
#[test]
fn serving_bad_input_is_refused_in_one_line_and_changes_nothing() {
    require("nbdinfo", "nbdinfo");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair_retaining(root.path());
    replicate(&a, &b, "app", &[DISK], 3600);
    let cases: &[(&[&str], &str)] = &[
        (
            &["points", "serve", "app", "--point", "999"],
            "has no point 999",
        ),
        (
            &["points", "serve", "app", "--point", "soon"],
            "--point must be",
        ),
        (
            &["points", "serve", "nope", "--point", "latest"],
            "no replica of nope",
        ),
        (&["points", "serve", "app", "--disk", "5"], "no disk 5"),
        (&["points", "serve", "app", "--for", "0s"], "--for"),
        (&["points", "serve", "app", "--for", "later"], "--for"),
        (&["points", "serve", "app", "--for", "31d"], "--for must be"),
        (&["points", "unserve", "app"], "no point of app is served"),
        (&["points", "unserve", "app", "--point", "1"], "not served"),
    ];
    for (args, needle) in cases {
        refused_in_one_line(&b, args, needle);
    }
    // The primary is not a replica server: its VM has no points here.
    refused_in_one_line(
        &a,
        &["points", "serve", "app", "--point", "latest"],
        "not a replica server",
    );
    assert!(
        !listed_exports(&b).iter().any(|e| e.contains('@')),
        "{:?}",
        listed_exports(&b)
    );
    assert!(b
        .json(&["points", "served", "app"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(!events(&b).iter().any(|e| e["id"] == 3020));
}

#[path = "common/guest.rs"]
mod guest;

const GUEST_SCRIPT: &str = r#"
if ! mount -t ext4 -o ro,noload /dev/vda /mnt; then echo GUEST-MOUNT-FAILED; poweroff -f; fi
echo "GUEST-FILE $(cat /mnt/hello.txt)"
umount /mnt
if dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/tmp/dd.err; then
  echo GUEST-WRITE-ACCEPTED
else
  echo "GUEST-WRITE-REFUSED $(cat /tmp/dd.err | head -1)"
fi
"#;

/// A real guest (qemu-system-x86_64 under TCG) attaches a served point the way `points serve`
/// prints it (`-blockdev ...,read-only=on`) and mounts the ext4 file system it holds; the
/// primary's disk has been overwritten since, the guest still reads the point's file, and its
/// writes to the device are refused.
#[test]
fn a_guest_mounts_a_served_point_read_only() {
    require("mkfs.ext4", "e2fsprogs");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let kit = guest::build(scratch, GUEST_SCRIPT);
    let (a, b) = pair_retaining(scratch);
    replicate_ext4(scratch, &a, &b, "fs", "written-before-point-one");
    let served = serve(&b, "fs", &["--point", "latest"]);
    let disk = &served["disks"][0];
    let blockdev = disk["qemu_blockdev"].as_str().unwrap().to_string();
    assert!(blockdev.contains("read-only=on"), "{blockdev}");
    let drive = disk["qemu_drive"].as_str().unwrap();
    assert!(drive.contains("readonly=on"), "{drive}");
    let node = blockdev
        .split(',')
        .find_map(|kv| kv.strip_prefix("node-name="))
        .unwrap()
        .to_string();
    // The primary's file system is gone in the next points.
    point_after(&a, "fs", &["write -P 0 0 32M"]);
    point_after(&a, "fs", &["write -P 1 0 1M"]);

    let mut g = guest::Guest::start(&kit, &[(blockdev, node)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        console.contains("GUEST-FILE written-before-point-one"),
        "{console}"
    );
    assert!(console.contains("GUEST-WRITE-REFUSED"), "{console}");
}
