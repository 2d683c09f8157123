//! Real guests for the end-to-end tests: Debian's cloud kernel under `qemu-system-x86_64
//! -accel tcg` with a busybox initramfs that runs a test script as `/init`, its disks attached
//! from the daemon's NBD socket. The console (serial, on stdout) is captured line by line so a
//! test can wait for what the guest prints. Missing tools fail the test with the package to
//! install (scripts/test installs them); nothing is skipped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Modules the cloud kernel needs for a virtio disk, in load order.
const VIRTIO_MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// A kernel and an initramfs whose `/init` runs `script` after loading the virtio modules.
pub struct Kit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The newest Debian cloud kernel installed, with its module directory.
fn cloud_kernel() -> (PathBuf, PathBuf) {
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let name = found.pop().unwrap_or_else(|| {
        panic!("no /boot/vmlinuz-*-cloud-amd64: apt-get install -y linux-image-cloud-amd64 (scripts/test does it)")
    });
    let version = name.trim_start_matches("vmlinuz-").to_string();
    (
        PathBuf::from("/boot").join(&name),
        PathBuf::from("/lib/modules").join(version),
    )
}

/// Builds the initramfs in `dir`.
pub fn build(dir: &Path, script: &str) -> Kit {
    build_with(dir, script, &[], &[])
}

/// Like [`build`], plus kernel `modules` loaded after the virtio ones and host `files` (with
/// the libraries `ldd` names for each, and the dynamic loader) copied at the same paths.
pub fn build_with(dir: &Path, script: &str, modules_extra: &[&str], files: &[&str]) -> Kit {
    super::common::require("qemu-system-x86_64", "qemu-system-x86");
    super::common::require("cpio", "cpio");
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is required for the guest tests: apt-get install -y busybox-static"
    );
    let (kernel, modules) = cloud_kernel();
    let root = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "dev", "proc", "sys", "mnt", "tmp", "modules"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mut copies: Vec<String> = Vec::new();
    for f in files {
        copies.push(f.to_string());
        let out = Command::new("ldd").arg(f).output().expect("running ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                copies.push(p.to_string());
            }
        }
    }
    for f in &copies {
        let to = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        // Follow symlinks: the initramfs gets the files themselves.
        std::fs::copy(f, &to).unwrap_or_else(|e| panic!("copying {f}: {e}"));
    }
    let mut insmods = String::new();
    for m in VIRTIO_MODULES.iter().chain(modules_extra) {
        let path = find_module(&modules, m).unwrap_or_else(|| {
            panic!("kernel module {m}.ko not found under {}", modules.display())
        });
        std::fs::copy(&path, root.join("modules").join(format!("{m}.ko"))).unwrap();
        insmods.push_str(&format!("insmod /modules/{m}.ko\n"));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         {insmods}\
         i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo GUEST-BOOTED\n\
         {script}\n\
         echo GUEST-END\n\
         poweroff -f\n"
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let initrd = dir.join("initrd.cpio.gz");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
            root.display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(out.success(), "building the initramfs failed");
    Kit { kernel, initrd }
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let want = format!("{name}.ko");
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().map(|n| n == want.as_str()).unwrap_or(false) {
                return Some(p);
            }
        }
    }
    None
}

/// A running guest and its console so far.
pub struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Guest {
    /// Boots `kit` with each `(blockdev, node)` attached as a virtio disk (`/dev/vda`, ...).
    pub fn start(kit: &Kit, disks: &[(String, String)]) -> Guest {
        Self::start_with(kit, disks, &[])
    }

    /// Like [`Guest::start`], with more qemu arguments (e.g. a guest agent channel).
    pub fn start_with(kit: &Kit, disks: &[(String, String)], extra: &[String]) -> Guest {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&kit.initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"]);
        for (blockdev, node) in disks {
            c.args(["-blockdev", blockdev]);
            c.args(["-device", &format!("virtio-blk-pci,drive={node}")]);
        }
        c.args(extra);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut c = console.lock().unwrap();
                    c.push_str(&line);
                    c.push('\n');
                }
            });
        }
        Guest { child, console }
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits until the console holds `marker`; panics with the console after `timeout` or if
    /// the guest ends first.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(marker) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if self.console().contains(marker) {
                    return;
                }
                panic!(
                    "guest ended ({st}) before printing {marker:?}:\n{}",
                    self.console()
                );
            }
            assert!(
                Instant::now() < deadline,
                "guest did not print {marker:?} within {timeout:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest to power off; returns its console.
    pub fn wait_exit(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                return self.console();
            }
            assert!(
                Instant::now() < deadline,
                "guest did not power off within {timeout:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
