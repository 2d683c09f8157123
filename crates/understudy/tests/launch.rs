//! Bringing the VM up: `vm set NAME --launch 'COMMAND'` on the replica host and `failover start
//! NAME --start`, which runs the command (placeholders filled, single-quoted) once the failover
//! disks are served: a real qemu boots the replicated file system from them.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Mounts the replicated file system, prints the file replicated before the point, and stays
/// up past the daemon's 10 s wait for the launch command (so the command is left running).
const GUEST_SCRIPT: &str = r#"
if ! mount -t ext4 /dev/vda /mnt; then echo GUEST-MOUNT-FAILED; poweroff -f; fi
echo "GUEST-FILE $(cat /mnt/hello.txt)"
umount /mnt
sleep 11
"#;

/// `'path'` for a template (the test's paths hold no quote).
fn q(p: &Path) -> String {
    let s = p.display().to_string();
    assert!(!s.contains('\'') && !s.contains('{'), "{s}");
    format!("'{s}'")
}

/// Kills the launched qemu if the test ends before it powered off.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// The launch command stored on the replica host boots a real guest from the test failover's
/// disks: qemu (from the template, `{blockdev0}` and `{node0}` filled in) mounts the file
/// system replicated from the primary and finds its file; the daemon leaves it running past
/// its 10 s wait and records its end.
#[test]
fn failover_start_with_start_boots_a_real_guest_from_the_launch_command() {
    require("mkfs.ext4", "e2fsprogs");
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let kit = guest::build(scratch, GUEST_SCRIPT);
    let (a, b) = pair(scratch);
    replicate_ext4(scratch, &a, &b, "fs", "replicated-before-the-point");

    let serial = scratch.join("serial.log");
    let template = format!(
        "exec qemu-system-x86_64 -accel tcg -m 256 -smp 1 -display none -no-reboot -nodefaults \
         -name {{name}} -serial file:{serial} -kernel {kernel} -initrd {initrd} \
         -append 'console=ttyS0 panic=-1 loglevel=4' \
         -blockdev {{blockdev0}} -device virtio-blk-pci,drive={{node0}}",
        serial = q(&serial),
        kernel = q(&kit.kernel),
        initrd = q(&kit.initrd),
    );
    // On the replica host `fs` is a replica VM: `vm set` stores the command for it.
    let out = b.ok(&["vm", "set", "fs", "--launch", &template]);
    assert!(out.contains("Replica"), "{out}");
    assert!(out.contains("launch: exec qemu-system-x86_64"), "{out}");

    let info = b.json(&["failover", "start", "fs", "--test", "--start"]);
    assert_eq!(info["served_as"], "fs-test", "{info}");
    assert_eq!(info["launch_failed"], false, "{info}");
    let launched = info["launched"].as_str().unwrap().to_string();
    let pid: Option<u32> = launched
        .strip_prefix("started (pid ")
        .and_then(|r| r.strip_suffix(')'))
        .map(|p| p.parse().unwrap());
    let _guard = KillOnDrop(pid);
    let pid = pid.unwrap_or_else(|| panic!("qemu is still running after 10 s: {launched}"));

    let read_serial = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until("the guest's end marker", Duration::from_secs(240), || {
        read_serial().contains("GUEST-END")
    });
    let console = read_serial();
    assert!(
        console.contains("GUEST-FILE replicated-before-the-point"),
        "{console}"
    );
    // The guest powered off, so qemu exits (0) and the daemon records it.
    wait_until(
        "the launch command's end event",
        Duration::from_secs(60),
        || {
            events(&b).iter().any(|e| {
                e["id"] == 3040
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&format!("pid {pid}) ended: exit status 0")))
            })
        },
    );
    b.ok(&["failover", "stop", "fs", "--test"]);
    assert!(!b.run(&["vm", "show", "fs-test"]).status.success());
}

/// The bad inputs, each refused in one line with nothing changed; a command that exits 0 gets
/// every placeholder as one shell word; a command that fails is reported (exit 1, its stderr in
/// the answer, event 3041) while the failover stays and `failover stop --test` still ends it.
#[test]
fn launch_bad_input_and_a_failing_command_leave_the_failover_served() {
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path();
    let (a, b) = pair(scratch);
    replicate(&a, &b, "web", &["8M"], 3600);

    // Unknown placeholders, a disk the VM does not have, an unknown VM, guest settings on a
    // replica VM: refused, nothing stored.
    let err = one_line_failure(&b.run(&["vm", "set", "web", "--launch", "virsh start {vm}"]));
    assert!(err.contains("unknown placeholder {vm}"), "{err}");
    let err = one_line_failure(&b.run(&["vm", "set", "web", "--launch", "echo ${HOME}"]));
    assert!(err.contains("unknown placeholder {HOME}"), "{err}");
    let err = one_line_failure(&b.run(&["vm", "set", "web", "--launch", "echo {disk1}"]));
    assert!(err.contains("{disk1}"), "{err}");
    let err = one_line_failure(&b.run(&["vm", "set", "nope", "--launch", "true"]));
    assert!(err.contains("no VM named nope"), "{err}");
    let err = one_line_failure(&b.run(&["vm", "set", "web", "--guest-agent", "/run/x.sock"]));
    assert!(err.contains("replica VM"), "{err}");

    // --start without a launch command: refused before anything changes.
    let err = one_line_failure(&b.run(&["failover", "start", "web", "--test", "--start"]));
    assert!(err.contains("launch command"), "{err}");
    assert!(!b.run(&["vm", "show", "web-test"]).status.success());
    let st = b.json(&["replication", "status", "web"]);
    assert_eq!(st["state"], "Replicating", "{st}");

    // On the primary the command is part of `vm show`; --no-launch removes it.
    a.ok(&["vm", "set", "web", "--launch", "virsh start {name}"]);
    assert_eq!(
        a.json(&["vm", "show", "web"])["launch"],
        "virsh start {name}"
    );
    a.ok(&["vm", "set", "web", "--no-launch"]);
    assert!(a.json(&["vm", "show", "web"]).get("launch").is_none());

    // A command that exits 0: each placeholder is one word, whatever it holds (an nbd_uri
    // has a `?`, a blockdev commas).
    let words = scratch.join("words.txt");
    b.ok(&[
        "vm",
        "set",
        "web",
        "--launch",
        &format!(
            "printf '%s\\n' {{name}} {{disk0}} {{blockdev0}} {{node0}} \"$UNDERSTUDY_VM\" > {}",
            q(&words)
        ),
    ]);
    let info = b.json(&["failover", "start", "web", "--test", "--start"]);
    assert_eq!(info["launched"], "exited 0", "{info}");
    let d = &info["disks"][0];
    let expected = format!(
        "web-test\n{}\n{}\n{}\nweb\n",
        d["nbd_uri"].as_str().unwrap(),
        d["qemu_blockdev"].as_str().unwrap(),
        d["qemu_node_name"].as_str().unwrap()
    );
    assert_eq!(std::fs::read_to_string(&words).unwrap(), expected);
    b.ok(&["failover", "stop", "web", "--test"]);

    // A command that fails: exit 1 with its stderr in one line; the failover stays.
    b.ok(&[
        "vm",
        "set",
        "web",
        "--launch",
        "echo starting {name}; echo error: failed to get domain {name} >&2; exit 1",
    ]);
    let out = b.run(&["failover", "start", "web", "--test", "--start", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line_failure(&out);
    assert!(err.contains("launch failed"), "{err}");
    assert!(
        err.contains("error: failed to get domain web-test"),
        "the command's stderr is quoted: {err}"
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["launch_failed"], true, "{info}");
    assert!(
        info["launched"].as_str().unwrap().contains("exit status 1"),
        "{info}"
    );
    assert!(b.run(&["vm", "show", "web-test"]).status.success());
    assert_eq!(
        b.json(&["replication", "status", "web"])["state"],
        "TestFailoverInProgress"
    );
    assert!(
        events(&b).iter().any(|e| e["id"] == 3041),
        "a launch failure is an event"
    );
    b.ok(&["failover", "stop", "web", "--test"]);
    assert!(!b.run(&["vm", "show", "web-test"]).status.success());
    assert_eq!(
        b.json(&["replication", "status", "web"])["state"],
        "Replicating"
    );

    // --no-launch on the replica host: --start is refused again.
    b.ok(&["vm", "set", "web", "--no-launch"]);
    let err = one_line_failure(&b.run(&["failover", "start", "web", "--test", "--start"]));
    assert!(err.contains("launch command"), "{err}");
}
