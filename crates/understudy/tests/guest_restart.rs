//! The daemon sits in every guest's data path: a crash or an upgrade must never reach the
//! guest. A real Linux guest (Debian's cloud kernel under TCG) writes and fsyncs files on
//! ext4 on a disk attached the way `vm show` prints it (qemu `-blockdev` with NBD
//! `reconnect-delay`); the daemon is killed with SIGKILL and restarted under it, then stopped
//! and started cleanly; the guest must see no I/O error and read back every file it wrote.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::process::Command;
use std::time::Duration;

use common::*;

const GUEST_SCRIPT: &str = r#"
mount -t ext4 /dev/vda /mnt || { echo GUEST-MOUNT-FAILED; poweroff -f; }
echo GUEST-READY
i=0
while [ $i -lt 70 ]; do
  i=$((i+1))
  if ! dd if=/dev/urandom of=/mnt/f$i bs=4k count=16 conv=fsync 2>/tmp/dd.err; then
    echo "GUEST-WRITE-FAILED $i: $(cat /tmp/dd.err)"; break
  fi
  md5sum /mnt/f$i >> /tmp/sums
  echo "GUEST-WROTE $i"
  if [ $i -eq 12 ]; then echo GUEST-KILL-NOW; fi
  if [ $i -eq 40 ]; then echo GUEST-RESTART-NOW; fi
  sleep 0.2
done
sync
echo 3 > /proc/sys/vm/drop_caches
if md5sum -c /tmp/sums > /tmp/check 2>&1; then echo GUEST-VERIFIED $i; else echo GUEST-VERIFY-FAILED; cat /tmp/check; fi
if dmesg | grep -iE 'I/O error|EXT4-fs error|Buffer I/O|aborting journal|remounting filesystem read-only'; then echo GUEST-IO-ERRORS; fi
umount /mnt && echo GUEST-UNMOUNTED
"#;

#[test]
fn daemon_killed_and_restarted_under_a_writing_guest_never_fails_its_io() {
    require("mkfs.ext4", "e2fsprogs");
    let tmp = tempfile::tempdir().unwrap();
    let kit = guest::build(tmp.path(), GUEST_SCRIPT);
    let mut host = Host::start(tmp.path(), "host");

    // An ext4 disk, imported as a VM.
    let image = tmp.path().join("guest.raw");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&image)
        .arg("64M"));
    host.ok(&["vm", "import", "g", "--image", image.to_str().unwrap()]);
    let disk = &host.json(&["vm", "show", "g"])["disks"][0];
    let blockdev = disk["qemu_blockdev"].as_str().unwrap().to_string();
    assert!(
        blockdev.contains("reconnect-delay="),
        "vm show must print a reconnecting attachment: {blockdev}"
    );
    let xml = disk["libvirt_xml"].as_str().unwrap();
    assert!(xml.contains("<reconnect delay="), "{xml}");
    let node = disk["qemu_node_name"].as_str().unwrap().to_string();
    assert!(
        blockdev.contains(&format!("node-name={node},")),
        "{blockdev}"
    );

    let mut g = guest::Guest::start(&kit, &[(blockdev, node)]);
    g.wait_for("GUEST-READY", Duration::from_secs(120));

    // kill -9 while the guest writes, restart a moment later.
    g.wait_for("GUEST-KILL-NOW", Duration::from_secs(120));
    host.kill9();
    std::thread::sleep(Duration::from_secs(2));
    host.restart();
    // An ordinary stop and start (an upgrade) as well.
    g.wait_for("GUEST-RESTART-NOW", Duration::from_secs(120));
    host.stop();
    std::thread::sleep(Duration::from_secs(1));
    host.restart();

    let console = g.wait_exit(Duration::from_secs(240));
    assert!(
        !console.contains("GUEST-WRITE-FAILED")
            && !console.contains("GUEST-IO-ERRORS")
            && !console.contains("GUEST-VERIFY-FAILED"),
        "the guest saw the daemon restart:\n{console}"
    );
    assert!(
        console.contains("GUEST-VERIFIED 70") && console.contains("GUEST-UNMOUNTED"),
        "the guest did not finish its writes and checks:\n{console}"
    );
}
