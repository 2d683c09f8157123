//! Application-consistent points with a real QEMU guest agent (issue 9, part 2): Debian's
//! `qemu-ga` runs inside a real guest (Debian's cloud kernel under TCG, busybox initramfs) on a
//! virtio-serial channel whose host end is the unix socket given to `vm set --guest-agent`. The
//! guest writes to ext4 on its replicated disk the whole time. Hours are compressed by the
//! daemons' test clock (`UNDERSTUDY_TEST_CLOCK`).

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Test clock speed: one real second is six minutes of history (an hour in 10 s).
const FACTOR: u64 = 360;

const GUEST_SCRIPT: &str = r#"
insmod /modules/virtio_console.ko 2>/dev/null
mount -t ext4 /dev/vda /mnt || { echo GUEST-MOUNT-FAILED; poweroff -f; }
mkdir -p /var/run /run
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for n in /sys/class/virtio-ports/*; do
    if [ "$(cat $n/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then port=/dev/$(basename $n); fi
  done
  [ -z "$port" ] && sleep 0.1
  i=$((i+1))
done
[ -n "$port" ] || { echo GUEST-NO-AGENT-PORT; ls /sys/class/virtio-ports; poweroff -f; }
/usr/sbin/qemu-ga -m virtio-serial -p $port -v -l /tmp/qga.log -f /tmp/qga.pid -t /tmp &
echo GUEST-READY
i=0
while [ ! -e /tmp/stop ]; do
  i=$((i+1))
  dd if=/dev/urandom of=/mnt/f$((i % 20)) bs=4k count=4 conv=fsync 2>/dev/null || echo GUEST-WRITE-FAILED
  echo GUEST-WROTE
  sleep 0.2
done
echo "GUEST-WRITES $i"
grep -E 'guest-fsfreeze|frozen|thawed' /tmp/qga.log | sed 's/^/QGA: /'
umount /mnt && echo GUEST-UNMOUNTED
"#;

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

/// One guest-agent command from the test itself (resync first, as the daemon does).
fn qga(sock: &Path, cmd: serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let id = std::process::id() as u64 * 1000 + rand_id();
    s.write_all(&[0xFF]).unwrap();
    writeln!(
        s,
        "{}",
        serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // Up to the 0xFF delimiter, then lines until our id.
    loop {
        s.read_exact(&mut byte).unwrap();
        if byte[0] == 0xFF {
            break;
        }
    }
    loop {
        s.read_exact(&mut byte).unwrap();
        if byte[0] != b'\n' {
            buf.push(byte[0]);
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap_or_default();
        buf.clear();
        if v["return"] == id {
            break;
        }
    }
    writeln!(s, "{cmd}").unwrap();
    loop {
        s.read_exact(&mut byte).unwrap();
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
    }
    serde_json::from_slice(&buf).unwrap()
}

fn rand_id() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn freeze_status(sock: &Path) -> String {
    qga(
        sock,
        serde_json::json!({"execute": "guest-fsfreeze-status"}),
    )["return"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn latest_point(b: &Host, vm: &str) -> serde_json::Value {
    b.json(&["points", "list", vm])
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|p| p["id"].as_u64().unwrap())
        .unwrap()
        .clone()
}

/// With `--app-consistent-every 1` the daemon freezes the real guest through qemu-ga, cuts, and
/// thaws: the point is listed `application`, the agent says `thawed` afterwards and logged the
/// freeze and the thaw, and the guest kept writing. Then the daemon is "killed between freeze
/// and thaw" (the test freezes the guest itself and kills the daemon with SIGKILL): at restart
/// the daemon finds the guest frozen and thaws it (event 1006).
#[test]
fn real_guest_agent_freezes_for_the_cut_only_and_a_restart_thaws_a_frozen_guest() {
    origin();
    require("mkfs.ext4", "e2fsprogs");
    assert!(
        Path::new("/usr/sbin/qemu-ga").exists(),
        "/usr/sbin/qemu-ga is required: apt-get install -y qemu-guest-agent"
    );
    let tmp = tempfile::tempdir().unwrap();
    let kit = guest::build_with(
        tmp.path(),
        GUEST_SCRIPT,
        &["virtio_console"],
        &["/usr/sbin/qemu-ga"],
    );
    let (mut a, b) = pair(tmp.path());
    let image = tmp.path().join("guest.raw");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&image)
        .arg("32M"));
    a.ok(&["vm", "import", "g", "--image", image.to_str().unwrap()]);
    let sock = tmp.path().join("qga.sock");
    a.ok(&["vm", "set", "g", "--guest-agent", sock.to_str().unwrap()]);
    let disk = &a.json(&["vm", "show", "g"])["disks"][0];
    let blockdev = disk["qemu_blockdev"].as_str().unwrap().to_string();
    let node = disk["qemu_node_name"].as_str().unwrap().to_string();
    let extra: Vec<String> = [
        "-chardev",
        &format!("socket,path={},server=on,wait=off,id=qga0", sock.display()),
        "-device",
        "virtio-serial",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut g = guest::Guest::start_with(&kit, &[(blockdev, node)], &extra);
    g.wait_for("GUEST-READY", Duration::from_secs(120));
    // qemu-ga is up once it answers.
    wait_until("qemu-ga answers", Duration::from_secs(60), || {
        UnixStream::connect(&sock).is_ok() && freeze_status(&sock) == "thawed"
    });

    a.ok(&[
        "replication",
        "enable",
        "g",
        "--replica",
        &b.addr(),
        "--frequency",
        "3600",
        "--recovery-history",
        "1",
        "--app-consistent-every",
        "1",
    ]);
    a.ok(&["replication", "start", "g", "--wait"]);
    // The first cycle is due at once; if the agent was slow, the next ones try again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let app = loop {
        let p = latest_point(&b, "g");
        if p["consistency"] == "application" {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no application-consistent point: {p}\n{}\n{}",
            serde_json::to_string(&events(&a)).unwrap(),
            g.console()
        );
        sync_until_ok(&a, "g", 3);
    };
    println!("application-consistent point: {app}");
    assert_eq!(freeze_status(&sock), "thawed");
    let m = a.json(&["replication", "measure", "g"]);
    assert!(
        m["app_consistent_points_total"].as_u64().unwrap() >= 1,
        "{m}"
    );
    // Not due again within the hour: crash-consistent, and the guest is never frozen for it.
    sync_until_ok(&a, "g", 3);
    assert_eq!(latest_point(&b, "g")["consistency"], "crash");
    assert_eq!(freeze_status(&sock), "thawed");

    // The daemon dies between freeze and thaw: the test freezes, then SIGKILLs it.
    let frozen = qga(
        &sock,
        serde_json::json!({"execute": "guest-fsfreeze-freeze"}),
    );
    assert!(frozen["return"].as_u64().unwrap() >= 1, "{frozen}");
    assert_eq!(freeze_status(&sock), "frozen");
    a.kill9();
    let wrote = |g: &guest::Guest| g.console().matches("GUEST-WROTE").count();
    let before = wrote(&g);
    a.restart();
    wait_until(
        "the restarted daemon thaws the guest",
        Duration::from_secs(30),
        || freeze_status(&sock) == "thawed",
    );
    // The guest writes again (a frozen ext4 would block its fsync'ed writes).
    wait_until(
        "the guest writes after the thaw",
        Duration::from_secs(60),
        || wrote(&g) > before + 1,
    );
    assert!(
        events(&a).iter().any(|e| e["id"] == 1006),
        "no event 1006 after the thaw on restart"
    );

    // Stop the guest's writer through the agent itself, and read qemu-ga's log.
    let h = qga(
        &sock,
        serde_json::json!({"execute": "guest-file-open", "arguments": {"path": "/tmp/stop", "mode": "w"}}),
    );
    let handle = h["return"].as_u64().unwrap();
    qga(
        &sock,
        serde_json::json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
    );
    let console = g.wait_exit(Duration::from_secs(120));
    println!("{}", tail(&console, 30));
    assert!(!console.contains("GUEST-WRITE-FAILED"), "{console}");
    assert!(console.contains("GUEST-UNMOUNTED"), "{console}");
    let qga_log: Vec<&str> = console.lines().filter(|l| l.contains("QGA:")).collect();
    // qemu-ga disables the freeze command while frozen and enables it again at the thaw: the
    // daemon's freeze, the test's freeze, and a thaw for each.
    let freezes = qga_log
        .iter()
        .filter(|l| l.ends_with("disabling command: guest-fsfreeze-freeze"))
        .count();
    let thaws = qga_log
        .iter()
        .filter(|l| l.ends_with("enabling command: guest-fsfreeze-freeze"))
        .count();
    assert!(
        freezes >= 2,
        "qemu-ga logged no freeze:\n{}",
        qga_log.join("\n")
    );
    assert_eq!(freezes, thaws, "unbalanced:\n{}", qga_log.join("\n"));
}
