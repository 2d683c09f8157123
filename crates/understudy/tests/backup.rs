//! `backup NAME` on the replica and `backup verify DIR` (`docs/formats/backup.md`): every
//! format equals its point byte for byte (compared with `points export` of the same point),
//! incremental chains restored with qemu-img equal the newest point, refusals while no
//! consistent point exists exit 75 and say when to retry, bad input is one named line that
//! leaves no file looking complete, and a backup loop against 1 s replication never fails.
//! Real daemons on loopback, real tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const DISK: &str = "16M";

fn tools() {
    require("qemu-img", "qemu-utils");
    require("qemu-nbd", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
}

/// Writes, then `replication sync`: returns the committed point's id.
fn point_after(primary: &Host, vm: &str, cmds: &[&str]) -> u64 {
    qemu_io_ok(&primary.nbd_uri(vm, 0), cmds);
    sync_until_ok(primary, vm, 20)["seq"].as_u64().unwrap()
}

fn backup_args<'a>(vm: &'a str, point: &'a str, to: &'a Path, format: &'a str) -> Vec<&'a str> {
    vec![
        "backup",
        vm,
        "--point",
        point,
        "--to",
        to.to_str().unwrap(),
        "--format",
        format,
    ]
}

fn backup(replica: &Host, vm: &str, point: &str, to: &Path, format: &str) -> serde_json::Value {
    replica.json(&backup_args(vm, point, to, format))
}

/// The virtual contents of `image` (any format, backing chain followed) as a raw file.
fn restore(image: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(to));
}

/// `points export` of disk `disk` of `point` into `to`.
fn exported(replica: &Host, vm: &str, point: u64, disk: usize, to: &Path) {
    let _ = std::fs::remove_file(to);
    export_point(replica, vm, &point.to_string(), disk, to);
}

fn verify(replica: &Host, dir: &Path) -> std::process::Output {
    replica.run(&["backup", "verify", dir.to_str().unwrap()])
}

/// Files of `dir` (names), sorted; empty when it does not exist.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every format of a backup of a point of a two-disk VM equals `points export` of that point
/// byte for byte and verifies; raw is sparse; a manifest names the point, its cut time and
/// consistency; a changed backup is named by `backup verify` (exit 1), disk by disk.
#[test]
fn backup_in_every_format_equals_points_export_and_verify_names_a_corrupted_disk() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    replicate(&a, &b, "web", &[DISK, "8M"], 1);
    qemu_io_ok(&a.nbd_uri("web", 1), &["write -P 3 1M 64k"]);
    let p = point_after(
        &a,
        "web",
        &["write -P 7 0 1M", "write -P 9 5M 512k", "write -z 0 4k"],
    );
    let point = p.to_string();
    let want: Vec<PathBuf> = (0..2)
        .map(|d| {
            let f = scratch.join(format!("export-{d}.raw"));
            exported(&b, "web", p, d, &f);
            f
        })
        .collect();
    for format in ["raw", "qcow2", "vmdk", "vhdx"] {
        let dir = scratch.join(format!("backup-{format}"));
        let m = backup(&b, "web", &point, &dir, format);
        assert_eq!(m["point"], p);
        assert_eq!(m["vm"], "web");
        assert_eq!(m["consistency"], "crash");
        assert!(m["cut_time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            files_in(&dir),
            vec![
                "backup.json".to_string(),
                format!("disk-0.{format}"),
                format!("disk-1.{format}")
            ]
        );
        for (d, want) in want.iter().enumerate() {
            let file = dir.join(format!("disk-{d}.{format}"));
            let got = scratch.join("restored.raw");
            restore(&file, &got);
            assert!(
                files_equal(&got, want),
                "{format} disk {d} differs from its point"
            );
            assert_eq!(
                m["disks"][d]["blake3"].as_str().unwrap(),
                blake3::hash(&std::fs::read(want).unwrap())
                    .to_hex()
                    .as_str()
            );
        }
        let out = verify(&b, &dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
        use std::os::unix::fs::PermissionsExt;
        for f in files_in(&dir) {
            let mode = std::fs::metadata(dir.join(&f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{format}: {f} is {mode:o}");
        }
    }
    // Raw is sparse: 16 MiB virtual, ~1.5 MiB written.
    use std::os::unix::fs::MetadataExt;
    let raw = std::fs::metadata(scratch.join("backup-raw/disk-0.raw")).unwrap();
    assert_eq!(raw.len(), 16 << 20);
    assert!(
        raw.blocks() * 512 < 4 << 20,
        "raw backup not sparse: {} blocks",
        raw.blocks()
    );

    // One changed byte in a raw disk, one changed cluster in a qcow2 disk: named.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(scratch.join("backup-raw/disk-1.raw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xEE], (1 << 20) + 17).unwrap();
    let err = one_line_failure(&verify(&b, &scratch.join("backup-raw")));
    assert!(
        err.contains("disk 1 (disk-1.raw)") && err.contains("differ"),
        "{err}"
    );
    assert!(!err.contains("disk 0"), "{err}");
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 238 2M 64k"])
        .arg(scratch.join("backup-qcow2/disk-0.qcow2")));
    let err = one_line_failure(&verify(&b, &scratch.join("backup-qcow2")));
    assert!(err.contains("disk 0 (disk-0.qcow2)"), "{err}");
    // A manifest edited by hand is refused by name.
    let m = scratch.join("backup-vmdk/backup.json");
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, text.replace("\"crash\"", "\"application\"")).unwrap();
    let err = one_line_failure(&verify(&b, &scratch.join("backup-vmdk")));
    assert!(err.contains("checksum mismatch"), "{err}");
    // A directory that holds a backup is not overwritten.
    let out = b.run(&backup_args(
        "web",
        &point,
        &scratch.join("backup-vhdx"),
        "vhdx",
    ));
    let err = one_line_failure(&out);
    assert!(err.contains("already holds a backup"), "{err}");
    assert!(events(&b)
        .iter()
        .any(|e| e["id"] == 2033 && e["message"].as_str().unwrap().contains("done")));
}

/// Backups while no consistent point exists: exit 75 with the named reason and when to
/// retry (initial replication not done, failover in progress); then they succeed.
#[test]
fn backup_without_a_consistent_point_exits_75_and_says_when_to_retry() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    a.ok(&["vm", "create", "web", "--disk", "8M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "1",
    ]);
    let dir = scratch.join("b1");
    let out = b.run(&backup_args("web", "latest", &dir, "raw"));
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let err = one_line_failure(&out);
    assert!(
        err.contains("initial replication in progress") && err.contains("retry when"),
        "{err}"
    );
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    a.ok(&["replication", "start", "web", "--wait"]);
    backup(&b, "web", "latest", &dir, "raw");

    b.ok(&["failover", "start", "web"]);
    let out = b.run(&backup_args("web", "latest", &scratch.join("b2"), "qcow2"));
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let err = one_line_failure(&out);
    assert!(
        err.contains("failover in progress") && err.contains("failover stop web"),
        "{err}"
    );
    b.ok(&["failover", "stop", "web"]);
    backup(&b, "web", "latest", &scratch.join("b2"), "qcow2");
    assert!(events(&b).iter().any(|e| e["id"] == 2034
        && e["message"]
            .as_str()
            .unwrap()
            .contains("failover in progress")));
}

/// Unmounts on drop (a test that fails never leaves a mount behind).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount(args: &[&str], at: &Path) -> Mount {
    std::fs::create_dir_all(at).unwrap();
    sh(Command::new("mount").args(args).arg(at));
    Mount(at.to_path_buf())
}

/// Bad destinations: a full file system (8 MiB tmpfs), a read-only one, a path under a
/// file. Each is one named line (exit 1), leaves no file looking complete (no disk file,
/// no manifest, no partial), and replication goes on.
#[test]
fn backup_to_a_full_or_read_only_destination_fails_in_one_line_and_leaves_nothing() {
    tools();
    require("mount", "mount");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    replicate(&a, &b, "web", &["32M"], 1);
    // 24 MiB of data that does not compress to holes: more than the tmpfs holds.
    let p = point_after(
        &a,
        "web",
        &["write -P 1 0 8M", "write -P 2 8M 8M", "write -P 3 16M 8M"],
    );
    let point = p.to_string();
    let full = mount(
        &["-t", "tmpfs", "-o", "size=8m", "tmpfs"],
        &scratch.join("full"),
    );
    for format in ["raw", "qcow2"] {
        let dir = full.0.join(format!("b-{format}"));
        let out = b.run(&backup_args("web", &point, &dir, format));
        assert_eq!(out.status.code(), Some(1), "{format}: {out:?}");
        let err = one_line_failure(&out);
        assert!(err.contains("No space left on device"), "{format}: {err}");
        assert!(files_in(&dir).is_empty(), "{format}: {:?}", files_in(&dir));
    }
    let ro_src = scratch.join("ro-src");
    std::fs::create_dir_all(&ro_src).unwrap();
    let ro = mount(&["--bind", ro_src.to_str().unwrap()], &scratch.join("ro"));
    sh(Command::new("mount")
        .args(["-o", "remount,ro,bind"])
        .arg(&ro.0));
    let out = b.run(&backup_args("web", &point, &ro.0.join("b"), "raw"));
    let err = one_line_failure(&out);
    assert!(err.contains("Read-only file system"), "{err}");
    let file = scratch.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = b.run(&backup_args("web", &point, &file.join("b"), "vmdk"));
    let err = one_line_failure(&out);
    assert!(err.contains("Not a directory"), "{err}");
    // A directory holding a file of the same name: refused, the file untouched.
    let busy = scratch.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("disk-0.raw"), b"mine").unwrap();
    std::fs::write(busy.join(".notes.partial"), b"mine too").unwrap();
    let err = one_line_failure(&b.run(&backup_args("web", &point, &busy, "raw")));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(busy.join("disk-0.raw")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read(busy.join(".notes.partial")).unwrap(),
        b"mine too"
    );
    let out = b.run(&[
        "backup",
        "web",
        "--to",
        scratch.join("inc").to_str().unwrap(),
        "--format",
        "raw",
        "--incremental-from",
        "1",
    ]);
    let err = one_line_failure(&out);
    assert!(err.contains("--incremental-from"), "{err}");
    // Replication is unaffected: a new point commits and the VM replicates.
    let q = point_after(&a, "web", &["write -P 5 0 4k"]);
    assert!(q > p);
    assert_eq!(state(&b, "web"), "Replicating");
}

/// Full backup (raw) + two qcow2 incrementals (each on the previous backup as backing
/// file, found next to it): each restored with `qemu-img convert` equals its point, the
/// incrementals hold only the changed blocks (a zeroed range included), and verify reads
/// the whole chain.
#[test]
fn incremental_chain_restored_with_qemu_img_equals_the_newest_point() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    replicate(&a, &b, "web", &[DISK], 1);
    let p1 = point_after(&a, "web", &["write -P 1 0 16M"]);
    let full = scratch.join("full");
    backup(&b, "web", &p1.to_string(), &full, "raw");
    let p2 = point_after(&a, "web", &["write -P 2 1M 64k", "write -P 3 9M 4k"]);
    let inc1 = scratch.join("inc1");
    let m2 = b.json(&[
        "backup",
        "web",
        "--point",
        &p2.to_string(),
        "--to",
        inc1.to_str().unwrap(),
        "--format",
        "qcow2",
        "--incremental-from",
        &p1.to_string(),
    ]);
    assert_eq!(m2["incremental_from"]["point"], p1);
    assert_eq!(m2["disks"][0]["backing_file"], "../full/disk-0.raw");
    let p3 = point_after(&a, "web", &["write -z 4M 1M", "write -P 4 15M 128k"]);
    let inc2 = scratch.join("inc2");
    let m3 = b.json(&[
        "backup",
        "web",
        "--point",
        &p3.to_string(),
        "--to",
        inc2.to_str().unwrap(),
        "--format",
        "qcow2",
        "--incremental-from",
        &p2.to_string(),
    ]);
    assert_eq!(m3["disks"][0]["backing_file"], "../inc1/disk-0.qcow2");
    // Only the changed blocks were copied and stored.
    let copied = m3["disks"][0]["copied_bytes"].as_u64().unwrap();
    assert!(copied <= 2 << 20, "copied {copied}");
    for dir in [&inc1, &inc2] {
        let len = std::fs::metadata(dir.join("disk-0.qcow2")).unwrap().len();
        assert!(
            len < 4 << 20,
            "{} is {len} bytes: not incremental",
            dir.display()
        );
    }
    for (p, image) in [
        (p1, full.join("disk-0.raw")),
        (p2, inc1.join("disk-0.qcow2")),
        (p3, inc2.join("disk-0.qcow2")),
    ] {
        let want = scratch.join("want.raw");
        exported(&b, "web", p, 0, &want);
        let got = scratch.join("got.raw");
        restore(&image, &got);
        assert!(
            files_equal(&got, &want),
            "point {p} restored from {} differs",
            image.display()
        );
    }
    let out = verify(&b, &inc2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Verify follows the chain: damage in the full backup shows in the newest.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(full.join("disk-0.raw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xEE], 12 << 20).unwrap();
    let err = one_line_failure(&verify(&b, &inc2));
    assert!(err.contains("disk 0 (disk-0.qcow2)"), "{err}");
}

/// The promise: backups back to back while a writer changes the primary and 1 s cycles
/// commit points: every backup succeeds and equals `points export` of its point.
#[test]
fn backup_loop_against_1s_replication_always_succeeds_and_equals_its_point() {
    tools();
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    replicate(&a, &b, "web", &[DISK], 1);
    let writer = PatternWriter::start(&a.nbd_uri("web", 0), 16 << 20, seed());
    // "For minutes": two.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut ok, mut points) = (0u32, std::collections::BTreeSet::new());
    let mut i = 0u32;
    while Instant::now() < deadline {
        i += 1;
        let format = if i.is_multiple_of(2) { "qcow2" } else { "raw" };
        let dir = scratch.join(format!("loop-{i}"));
        let out = b.run(&backup_args("web", "latest", &dir, format));
        assert!(
            out.status.success(),
            "backup {i} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("backup.json")).unwrap()).unwrap();
        let p = m["backup"]["point"].as_u64().unwrap();
        let want = scratch.join("want.raw");
        exported(&b, "web", p, 0, &want);
        let got = scratch.join("got.raw");
        restore(&dir.join(format!("disk-0.{format}")), &got);
        assert!(files_equal(&got, &want), "backup {i} of point {p} differs");
        std::fs::remove_dir_all(&dir).unwrap();
        ok += 1;
        points.insert(p);
    }
    let (writes, _) = writer.stop();
    eprintln!(
        "backup loop: {ok}/{i} backups succeeded and equal their points ({} distinct points, {writes} writes)",
        points.len()
    );
    assert_eq!(ok, i);
    assert!(points.len() > 5, "replication did not move: {points:?}");
}

/// Applies the extents the served point's `qemu:dirty-bitmap:since-<ID>` context marks
/// changed (python nbd: block status, then pread only those) onto a copy of the older point.
/// `base:allocation` is selected too: every BLOCK_STATUS reply carries both contexts.
const APPLY_CHANGED: &str = r#"
import sys, nbd
uri, ctx, target = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD()
h.add_meta_context(ctx)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.can_meta_context(ctx), ctx
seen = set()
size = h.get_size()
dirty = []
def cb(metacontext, offset, entries, err):
    seen.add(metacontext)
    if metacontext != ctx:
        return
    pos = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((pos, entries[i]))
        pos += entries[i]
off = 0
while off < size:
    n = min(size - off, 32 << 20)
    before = len(dirty)
    last = [off]
    def track(metacontext, offset, entries, err):
        cb(metacontext, offset, entries, err)
        if metacontext == ctx:
            last[0] = offset + sum(entries[0::2])
    h.block_status(n, off, track)
    off = last[0]
assert seen == {ctx, "base:allocation"}, seen
copied = 0
with open(target, "r+b") as f:
    for (o, l) in dirty:
        f.seek(o)
        f.write(h.pread(l, o))
        copied += l
print(copied)
"#;

/// A served point exposes the blocks changed since any older point as the NBD metadata
/// context `qemu:dirty-bitmap:since-<ID>`: nbdinfo lists and maps it, and copying only the
/// extents it marks onto the older point gives the newer point byte for byte.
#[test]
fn changed_since_context_of_a_served_point_turns_the_older_point_into_the_newer() {
    require("nbdinfo", "libnbd-bin");
    require("python3", "python3-nbd");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    replicate(&a, &b, "web", &[DISK], 1);
    let p1 = point_after(&a, "web", &["write -P 1 0 16M"]);
    point_after(&a, "web", &["write -P 2 1M 64k"]);
    let p3 = point_after(&a, "web", &["write -z 4M 1M", "write -P 3 15M 128k"]);
    let served = b.json(&["points", "serve", "web", "--point", &p3.to_string()]);
    let uri = served["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
    let ctx = format!("qemu:dirty-bitmap:since-{p1}");
    let info = sh(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(info.contains(&ctx), "not listed: {info}");
    let map = sh(Command::new("nbdinfo")
        .arg(format!("--map={ctx}"))
        .arg(&uri));
    let dirty: u64 = map
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| f[1].parse::<u64>().unwrap())
        })
        .sum();
    assert_eq!(dirty, (64 << 10) + (1 << 20) + (128 << 10), "{map}");
    let old = scratch.join("old.raw");
    exported(&b, "web", p1, 0, &old);
    let copied = sh(Command::new("/usr/bin/python3")
        .args(["-c", APPLY_CHANGED, &uri, &ctx])
        .arg(&old));
    assert_eq!(copied.trim().parse::<u64>().unwrap(), dirty);
    let new = scratch.join("new.raw");
    exported(&b, "web", p3, 0, &new);
    assert!(
        files_equal(&old, &new),
        "older point + changed extents != newer point"
    );
    // A context of a point that is not older is refused.
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:since-{}", p3 + 5))
        .arg(&uri)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
