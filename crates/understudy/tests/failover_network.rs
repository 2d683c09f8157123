//! Failover network settings for Linux guests (`vm set NAME --failover-network`,
//! `docs/formats/failover-seed.md`): set on the primary, they reach the replica host in the
//! hello; a failover there serves a cloud-init NoCloud seed disk as `NAME-seed`
//! (`NAME-test-seed`), read back here over NBD with real tools:
//!
//! - `nbdcopy` copies the export out (the seed really is served, read-only, on the NBD socket);
//! - `mdir`, `mtype`, `mlabel` (mtools) read the FAT file system the way a foreign FAT
//!   implementation does: the three files by their long names, their bytes, the volume label;
//! - `blkid` says `TYPE=vfat` and `LABEL=cidata`: cloud-init's NoCloud datasource finds its
//!   seed with exactly this probe (`blkid -t TYPE=vfat`, `-t LABEL=cidata`);
//! - Debian's `cloud-init` (22.4) itself: `cloud-init schema -c user-data` validates the
//!   user-data; `cloud-init devel net-convert -k yaml` runs the network config (version 2)
//!   through cloud-init's own parser and renders it as systemd-networkd files, whose addresses,
//!   gateways and DNS servers are checked (this cloud-init's `schema` command has no network
//!   config schema: that arrived in later versions); its NoCloud reader
//!   (`util.pathprefix2dict` with the datasource's required and optional files) accepts the
//!   files, and its YAML loader reads meta-data's `instance-id` and `local-hostname`.
//!
//! - a real Linux guest (Debian's cloud kernel, busybox, `qemu-system-x86_64` attaching the
//!   seed with the `qemu_blockdev` that `vm show` prints, read-only) probes it with `blkid`
//!   (`TYPE="vfat"`, `LABEL="cidata"`, as cloud-init does in a guest), mounts it as `vfat` and
//!   reads the files: the kernel cloud-init runs on reads our image.
//!
//! A missing tool fails the test (`scripts/test` installs `mtools` and `cloud-init`).

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const NET: &str = "dns=10.2.0.53, ipv4=10.2.0.5/24,gateway=10.2.0.1,ipv6=FD00::5/64,gateway6=fd00::1,dns=fd00::53";
const NET_NORMALIZED: &str =
    "ipv4=10.2.0.5/24,gateway=10.2.0.1,ipv6=fd00::5/64,gateway6=fd00::1,dns=10.2.0.53,dns=fd00::53";

/// The guest mounts its only disk, the seed, as vfat and prints what cloud-init would read.
const GUEST_SCRIPT: &str = r#"
echo "GUEST-BLKID $(/usr/sbin/blkid -p /dev/vda)"
if ! mount -t vfat -o ro /dev/vda /mnt; then echo GUEST-MOUNT-FAILED; poweroff -f; fi
ls /mnt | tr '\n' ' ' | sed 's/^/GUEST-LS /'; echo
grep gateway4 /mnt/network-config | sed 's/^ */GUEST-NET /'
grep local-hostname /mnt/meta-data | sed 's/^/GUEST-META /'
umount /mnt
"#;

/// Modules the cloud kernel needs for vfat (built as modules in Debian's cloud kernel).
const VFAT_MODULES: [&str; 5] = ["fat", "vfat", "nls_cp437", "nls_ascii", "nls_utf8"];

fn require_tools() {
    require("nbdcopy", "libnbd-bin");
    require("mdir", "mtools");
    require("mtype", "mtools");
    require("mlabel", "mtools");
    require("blkid", "util-linux");
    require("cloud-init", "cloud-init");
}

fn show(h: &Host, vm: &str) -> serde_json::Value {
    h.json(&["vm", "show", vm])
}

/// What the seed disk of a failover holds, read with the real tools.
struct Seed {
    dir: PathBuf,
    image: PathBuf,
}

impl Seed {
    /// Copies export `uri` out with `nbdcopy` into `dir/seed.img`.
    fn copy(uri: &str, dir: &Path) -> Seed {
        std::fs::create_dir_all(dir).unwrap();
        let image = dir.join("seed.img");
        sh(Command::new("nbdcopy").arg(uri).arg(&image));
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
        Seed {
            dir: dir.to_path_buf(),
            image,
        }
    }

    fn mtools(&self, tool: &str, args: &[&str]) -> String {
        sh(Command::new(tool).arg("-i").arg(&self.image).args(args))
    }

    /// `mtype` of one file, also written beside the image for cloud-init.
    fn file(&self, name: &str) -> String {
        let text = self.mtools("mtype", &[&format!("::{name}")]);
        std::fs::write(self.dir.join(name), &text).unwrap();
        text
    }

    /// Checks the seed with mtools, blkid and cloud-init; returns (network-config, instance-id).
    fn check(&self, hostname: &str) -> (String, String) {
        let listing = self.mtools("mdir", &["::"]);
        for f in ["meta-data", "user-data", "network-config"] {
            assert!(listing.contains(f), "{f} missing: {listing}");
        }
        let label = self.mtools("mlabel", &["-s", "::"]);
        assert!(label.contains("Volume label is cidata"), "{label}");
        let probe = sh(Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&self.image));
        assert!(probe.contains("TYPE=vfat"), "{probe}");
        assert!(probe.contains("LABEL=cidata"), "{probe}");
        eprintln!("--- mdir\n{listing}--- mlabel -s\n{label}--- blkid -p\n{probe}");

        let network = self.file("network-config");
        let user = self.file("user-data");
        let meta = self.file("meta-data");
        assert!(user.starts_with("#cloud-config\n"), "{user}");
        let valid = sh(Command::new("cloud-init")
            .args(["schema", "-c"])
            .arg(self.dir.join("user-data")));
        assert!(valid.contains("Valid cloud-config"), "{valid}");
        eprintln!("--- meta-data\n{meta}--- user-data\n{user}--- network-config\n{network}--- cloud-init schema\n{valid}");

        // cloud-init's own NoCloud reader and YAML loader on the files of the seed.
        let py = format!(
            r#"
import json, sys
from cloudinit import util
d = util.pathprefix2dict({dir:?}, required=["user-data", "meta-data"], optional=["vendor-data", "network-config"])
md = util.load_yaml(d["meta-data"])
nc = util.load_yaml(d["network-config"])
print(json.dumps({{"instance-id": md["instance-id"], "local-hostname": md["local-hostname"], "version": nc["version"]}}))
"#,
            dir = self.dir.display().to_string()
        );
        let out = sh(Command::new("/usr/bin/python3").arg("-c").arg(&py));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["local-hostname"], hostname, "{v}\n{meta}");
        assert_eq!(v["version"], 2, "{v}");
        let instance = v["instance-id"].as_str().unwrap().to_string();
        assert!(instance.starts_with("understudy-"), "{instance}");
        (network, instance)
    }

    /// The network config rendered by cloud-init as systemd-networkd files (all of them).
    fn networkd(&self) -> String {
        let out = self.dir.join("rendered");
        let _ = std::fs::remove_dir_all(&out);
        sh(Command::new("cloud-init")
            .args([
                "devel",
                "net-convert",
                "-k",
                "yaml",
                "-D",
                "debian",
                "-O",
                "networkd",
            ])
            .arg("-p")
            .arg(self.dir.join("network-config"))
            .arg("-d")
            .arg(&out));
        let mut text = String::new();
        for e in walk(&out) {
            text.push_str(&std::fs::read_to_string(e).unwrap());
        }
        assert!(!text.is_empty(), "cloud-init rendered nothing");
        eprintln!("--- cloud-init devel net-convert -O networkd\n{text}");
        text
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

/// The main path: set on the primary, the setting reaches the replica host (a hello), a test
/// failover serves `web-test-seed`, and what is in it is what cloud-init needs: read back with
/// mtools, blkid and Debian's cloud-init. A restart of the replica daemon serves the seed
/// again (made anew: new instance-id); `failover stop --test` removes it.
#[test]
fn failover_network_set_on_the_primary_reaches_the_test_failovers_seed_disk() {
    require_tools();
    let root = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(root.path());
    replicate(&a, &b, "web", &["1M"], 3600);

    let out = a.ok(&["vm", "set", "web", "--failover-network", NET]);
    assert!(
        out.contains(&format!("failover network: {NET_NORMALIZED}")),
        "{out}"
    );
    assert_eq!(show(&a, "web")["failover_network"], NET_NORMALIZED);
    // The set says hello: the replica host shows the primary's setting.
    wait_until(
        "the replica host to learn the failover network",
        std::time::Duration::from_secs(20),
        || show(&b, "web")["failover_network"] == NET_NORMALIZED,
    );
    assert_eq!(show(&b, "web")["replication_role"], "Replica");

    let info = b.json(&["failover", "start", "web", "--test"]);
    let sock = b.dir.join("nbd.sock");
    let want_uri = format!("nbd+unix:///web-test-seed?socket={}", sock.display());
    assert_eq!(info["seed"]["nbd_uri"], want_uri.as_str(), "{info}");
    let vm = show(&b, "web-test");
    assert_eq!(vm["seed"]["nbd_uri"], want_uri.as_str(), "{vm}");
    assert_eq!(vm["failover_network"], NET_NORMALIZED, "{vm}");
    assert!(
        b.dir.join("failover/web-test/seed.img").exists(),
        "the seed lives beside the overlays"
    );

    let seed = Seed::copy(&want_uri, &root.path().join("seed1"));
    let (network, instance) = seed.check("web");
    assert!(instance.starts_with("understudy-web-test-"), "{instance}");
    assert!(network.contains("version: 2"), "{network}");
    let rendered = seed.networkd();
    for want in [
        "Address=10.2.0.5/24",
        "Address=fd00::5/64",
        "Gateway=10.2.0.1",
        "Gateway=fd00::1",
        "DNS=10.2.0.53 fd00::53",
    ] {
        assert!(rendered.contains(want), "{want} missing from\n{rendered}");
    }
    // Read-only: a write is refused by the server.
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(&want_uri)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !w.status.success()
            || text.contains("denied")
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "a write to the seed was accepted: {text}"
    );

    // A real guest reads it, attached as `vm show` says (read-only blockdev).
    let kit = guest::build_with(
        root.path(),
        GUEST_SCRIPT,
        &VFAT_MODULES,
        &["/usr/sbin/blkid"],
    );
    let blockdev = vm["seed"]["qemu_blockdev"].as_str().unwrap().to_string();
    assert!(blockdev.ends_with(",read-only=on"), "{blockdev}");
    let node = vm["seed"]["qemu_node_name"].as_str().unwrap().to_string();
    let mut g = guest::Guest::start(&kit, &[(blockdev, node)]);
    let console = g.wait_exit(Duration::from_secs(240));
    assert!(console.contains("GUEST-END"), "{console}");
    assert!(!console.contains("GUEST-MOUNT-FAILED"), "{console}");
    let line = |tag: &str| {
        console
            .lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("{tag} missing:\n{console}"))
            .to_string()
    };
    let blkid = line("GUEST-BLKID");
    assert!(
        blkid.contains("LABEL=\"cidata\"") && blkid.contains("TYPE=\"vfat\""),
        "{blkid}\n{console}"
    );
    let ls = line("GUEST-LS");
    for f in ["meta-data", "network-config", "user-data"] {
        assert!(ls.contains(f), "{ls}");
    }
    assert!(
        line("GUEST-NET").contains("gateway4: \"10.2.0.1\""),
        "{console}"
    );
    assert!(
        line("GUEST-META").contains("local-hostname: \"web\""),
        "{console}"
    );

    // Across a restart of the replica daemon the seed is served again, made anew.
    b.stop();
    b.restart();
    wait_until(
        "the test failover to be served again",
        std::time::Duration::from_secs(30),
        || b.run(&["vm", "show", "web-test"]).status.success(),
    );
    assert_eq!(show(&b, "web-test")["seed"]["nbd_uri"], want_uri.as_str());
    let again = Seed::copy(&want_uri, &root.path().join("seed2"));
    let (network2, instance2) = again.check("web");
    assert_eq!(network2, network);
    assert_ne!(
        instance2, instance,
        "a seed made again has a new instance-id"
    );

    b.ok(&["failover", "stop", "web", "--test"]);
    assert!(!b.run(&["vm", "show", "web-test"]).status.success());
    assert!(!b.dir.join("failover/web-test").exists());
    let gone = Command::new("nbdinfo").arg(&want_uri).output().unwrap();
    assert!(!gone.status.success(), "web-test-seed is still served");
}

/// Without settings a failover has no seed; settings made on the replica host override the
/// primary's (and `--no-failover-network` there brings the primary's back); a second
/// `failover start` makes the seed anew; `failover complete` drops it.
#[test]
fn failover_network_set_on_the_replica_host_overrides_and_no_setting_means_no_seed() {
    require_tools();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "db", &["1M"], 3600);
    let sock = b.dir.join("nbd.sock");
    let seed_uri = |served: &str| format!("nbd+unix:///{served}-seed?socket={}", sock.display());

    // No setting anywhere: no seed.
    assert!(show(&b, "db").get("failover_network").is_none());
    let info = b.json(&["failover", "start", "db", "--test"]);
    assert!(info.get("seed").is_none(), "{info}");
    assert!(show(&b, "db-test").get("seed").is_none());
    let none = Command::new("nbdinfo")
        .arg(seed_uri("db-test"))
        .output()
        .unwrap();
    assert!(!none.status.success(), "a seed is served without settings");
    assert!(!b.dir.join("failover/db-test/seed.img").exists());
    b.ok(&["failover", "stop", "db", "--test"]);
    // A launch command naming the seed is refused before anything changes when there is none.
    b.ok(&[
        "vm",
        "set",
        "db",
        "--launch",
        "test -n {seed} && test -n {seedblockdev}",
    ]);
    let err = one_line_failure(&b.run(&["failover", "start", "db", "--test", "--start"]));
    assert!(err.contains("no failover network settings"), "{err}");
    assert!(!b.run(&["vm", "show", "db-test"]).status.success());

    // Set on the replica host: it applies there.
    let local = "ipv4=192.0.2.10/24,gateway=192.0.2.1,dns=192.0.2.53,mac=52:54:00:AA:bb:01";
    let out = b.ok(&["vm", "set", "db", "--failover-network", local]);
    assert!(out.contains("Replica"), "{out}");
    let local_norm = "ipv4=192.0.2.10/24,gateway=192.0.2.1,dns=192.0.2.53,mac=52:54:00:aa:bb:01";
    assert_eq!(show(&b, "db")["failover_network"], local_norm);
    // The primary's setting arrives, and the replica host's own still wins.
    a.ok(&["vm", "set", "db", "--failover-network", "ipv4=10.9.0.7/16"]);
    assert_eq!(show(&b, "db")["failover_network"], local_norm);

    let info = b.json(&["failover", "start", "db", "--test", "--start"]);
    assert_eq!(info["seed"]["nbd_uri"], seed_uri("db-test").as_str());
    assert_eq!(info["launched"], "exited 0", "{info}");
    let s = Seed::copy(&seed_uri("db-test"), &root.path().join("s1"));
    let (network, first) = s.check("db");
    assert!(
        network.contains("macaddress: \"52:54:00:aa:bb:01\""),
        "{network}"
    );
    assert!(network.contains("192.0.2.10/24"), "{network}");
    assert!(!network.contains("10.9.0.7"), "{network}");
    let rendered = s.networkd();
    assert!(rendered.contains("Address=192.0.2.10/24"), "{rendered}");
    assert!(rendered.contains("Gateway=192.0.2.1"), "{rendered}");
    // A second start makes the seed anew (the test failover is started over).
    b.ok(&["failover", "stop", "db", "--test"]);
    b.ok(&["failover", "start", "db", "--test"]);
    let (_, second) = Seed::copy(&seed_uri("db-test"), &root.path().join("s2")).check("db");
    assert_ne!(first, second);
    b.ok(&["failover", "stop", "db", "--test"]);

    // Forgetting the override: the primary's setting applies again.
    b.ok(&["vm", "set", "db", "--no-failover-network"]);
    wait_until(
        "the primary's setting to apply on the replica host",
        std::time::Duration::from_secs(20),
        || show(&b, "db")["failover_network"] == "ipv4=10.9.0.7/16",
    );

    // A failover proper serves db-seed; completing it drops the seed.
    let info = b.json(&["failover", "start", "db"]);
    assert_eq!(info["seed"]["nbd_uri"], seed_uri("db").as_str());
    let (network, third) = Seed::copy(&seed_uri("db"), &root.path().join("s3")).check("db");
    assert!(network.contains("10.9.0.7/16"), "{network}");
    // Starting over (`failover start` again, here at the same point) makes it anew.
    b.ok(&["failover", "start", "db", "--point", "latest"]);
    let (_, fourth) = Seed::copy(&seed_uri("db"), &root.path().join("s4")).check("db");
    assert_ne!(third, fourth);
    b.ok(&["failover", "complete", "db"]);
    let vm = show(&b, "db");
    assert!(vm.get("seed").is_none(), "{vm}");
    assert!(!b.dir.join("failover/db").exists());
    let gone = Command::new("nbdinfo")
        .arg(seed_uri("db"))
        .output()
        .unwrap();
    assert!(!gone.status.success(), "db-seed is still served");
}

/// A bad `--failover-network` is refused in one line, exit non-zero, on either host, and
/// changes nothing.
#[test]
fn bad_failover_network_is_refused_in_one_line_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    replicate(&a, &b, "app", &["1M"], 3600);
    a.ok(&["vm", "set", "app", "--failover-network", "ipv4=10.2.0.5/24"]);
    let before_a = show(&a, "app");
    for (value, want) in [
        ("ipv4=10.2.0.0/24", "network address"),
        ("ipv4=10.2.0.5/33", "prefix length must be 1 to 32"),
        ("ipv4=10.2.0.5", "prefix length too"),
        ("ipv4=10.2.0.5/24,gateway=fd00::1", "not an IPv4 address"),
        ("ipv4=10.2.0.5/24,search=example.com", "unknown key"),
        ("ipv6=fd00::/64", "subnet-router anycast"),
        ("dns=10.2.0.53", "give an address"),
        ("", "empty"),
    ] {
        for h in [&a, &b] {
            let err = one_line_failure(&h.run(&["vm", "set", "app", "--failover-network", value]));
            assert!(err.contains(want), "{value:?} on {}: {err}", h.name);
        }
    }
    assert_eq!(show(&a, "app"), before_a);
    wait_until(
        "the replica host to learn the failover network",
        std::time::Duration::from_secs(20),
        || show(&b, "app")["failover_network"] == "ipv4=10.2.0.5/24",
    );
    let err = one_line_failure(&a.run(&[
        "vm",
        "set",
        "nope",
        "--failover-network",
        "ipv4=10.2.0.5/24",
    ]));
    assert!(err.contains("nope"), "{err}");
    let out = a.run(&[
        "vm",
        "set",
        "app",
        "--failover-network",
        "ipv4=10.2.0.6/24",
        "--no-failover-network",
    ]);
    assert!(!out.status.success());
    assert_eq!(show(&a, "app"), before_a);
}
