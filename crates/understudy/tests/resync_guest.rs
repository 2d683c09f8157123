//! End to end with real guests: a guest writes files on ext4 on the primary while a
//! resynchronization runs; a second guest mounts the resync's point and then the final point
//! (exported from the replica) and checks every file against its checksum, and `e2fsck -fn`
//! is clean. Every file the writer had synced before the resync started is in its point.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const FILES: u32 = 30;

/// Writes FILES files of 256 KiB of random bytes, each with its md5 beside it, syncing and
/// announcing each.
const WRITER: &str = r#"
if ! mount -t ext4 /dev/vda /mnt; then echo GUEST-MOUNT-FAILED; poweroff -f; fi
i=1
while [ $i -le 30 ]; do
  dd if=/dev/urandom of=/mnt/f$i bs=64k count=4 2>/dev/null
  md5sum /mnt/f$i | cut -d' ' -f1 > /mnt/f$i.md5
  sync
  echo "WROTE $i"
  i=$((i+1))
done
umount /mnt
echo GUEST-DONE
"#;

/// Mounts the disk (replaying ext4's journal, as a boot after a crash would) and checks every
/// file whose checksum file exists.
const CHECKER: &str = r#"
if ! mount -t ext4 /dev/vda /mnt; then echo GUEST-MOUNT-FAILED; poweroff -f; fi
for m in /mnt/f*.md5; do
  [ -f "$m" ] || continue
  f=${m%.md5}
  if [ "$(md5sum $f | cut -d' ' -f1)" = "$(cat $m)" ]; then echo "HAVE ${f#/mnt/}"; else echo "BAD ${f#/mnt/}"; fi
done
echo "HELLO $(cat /mnt/hello.txt)"
umount /mnt
echo GUEST-DONE
"#;

fn check(kit: &guest::Kit, image: &Path) -> String {
    let blockdev = format!(
        "driver=raw,node-name=chk,file.driver=file,file.filename={}",
        image.display()
    );
    let mut g = guest::Guest::start(kit, &[(blockdev, "chk".into())]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(console.contains("GUEST-DONE"), "{console}");
    assert!(!console.contains("BAD "), "a torn file: {console}");
    assert!(console.contains("HELLO replicated-first"), "{console}");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    console
}

fn wrote(console: &str) -> u32 {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("WROTE "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_real_guest_writing_during_a_resync_finds_every_synced_file_in_its_point() {
    require("e2fsck", "e2fsprogs");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let writer = guest::build(&scratch.join("writer"), WRITER);
    let checker = guest::build(&scratch.join("checker"), CHECKER);
    let (a, b) = pair(scratch);
    replicate_ext4(scratch, &a, &b, "fs", "replicated-first");

    let disk = a.json(&["vm", "show", "fs"])["disks"][0].clone();
    let blockdev = disk["qemu_blockdev"].as_str().unwrap().to_string();
    let node = disk["qemu_node_name"].as_str().unwrap().to_string();
    let mut g = guest::Guest::start(&writer, &[(blockdev, node)]);
    g.wait_for("WROTE 3", Duration::from_secs(240));
    let before = wrote(&g.console());
    a.ok(&["replication", "resume", "fs", "--resynchronize", "--wait"]);
    let m = a.json(&["replication", "measure", "fs"]);
    assert!(
        m["resync_compared_bytes_total"].as_u64().unwrap() > 0,
        "{m}"
    );
    let resync_point = scratch.join("resync-point.raw");
    export_point(&b, "fs", "latest", 0, &resync_point);
    let console = g.wait_exit(Duration::from_secs(300));
    assert!(console.contains("GUEST-DONE"), "{console}");
    sync_until_ok(&a, "fs", 20);
    let final_point = scratch.join("final-point.raw");
    export_point(&b, "fs", "latest", 0, &final_point);

    let seen = check(&checker, &resync_point);
    for i in 1..=before {
        assert!(
            seen.contains(&format!("HAVE f{i}\n")),
            "f{i} was synced before the resync started but is not in its point:\n{seen}"
        );
    }
    println!(
        "the resync's point holds {} files ({before} synced before it started)",
        seen.matches("HAVE ").count()
    );
    let seen = check(&checker, &final_point);
    for i in 1..=FILES {
        assert!(seen.contains(&format!("HAVE f{i}\n")), "f{i}:\n{seen}");
    }
}
