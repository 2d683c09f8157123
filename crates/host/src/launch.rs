//! Bringing a failed-over VM up: the command template `vm set NAME --launch 'COMMAND'` stores
//! (catalog `launch/<vm>`, `docs/formats/catalog.md`) and `failover start NAME --start` runs
//! once the failover's disks are served.
//!
//! The template's placeholders (`{name}`, `{diskN}`, `{blockdevN}`, `{nodeN}`, and `{seed}`,
//! `{seedblockdev}`, `{seednode}` for the failover's cloud-init seed disk) are checked when
//! it is set and filled at launch with values single-quoted for `/bin/sh -c`. The command is
//! started detached (its own process group, stdin from /dev/null, stdout and stderr to a log
//! file in the data directory): it is meant to start a VM that keeps running (`virsh start`
//! returns at once; a qemu command line may end with `&` or run in the foreground), so the
//! daemon waits at most [`LAUNCH_WAIT`] for it and then leaves it running.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest template `vm set --launch` accepts: a qemu command line with a dozen disks fits many
/// times over; the bound keeps one catalog record small.
pub const LAUNCH_COMMAND_MAX: usize = 16 * 1024;

/// How long `failover start --start` waits for the command to exit before it reports it as
/// started and leaves it running: `virsh start` or a backgrounded qemu returns within a
/// second; a command still running after this is taken to be the VM itself.
pub const LAUNCH_WAIT: Duration = Duration::from_secs(10);

/// How much of the end of the command's output a failure quotes (one line of the answer).
pub const OUTPUT_TAIL_MAX: usize = 300;

/// `launch/<vm>` in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub version: u32,
    pub vm: String,
    pub command: String,
}

impl LaunchRecord {
    pub const VERSION: u32 = 1;

    pub fn key(vm: &str) -> String {
        format!("launch/{vm}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Name,
    Disk(u32),
    Blockdev(u32),
    Node(u32),
    /// The failover's cloud-init seed disk (`failover-seed.md`): its `nbd_uri`, its qemu
    /// `-blockdev` argument, its node name.
    Seed,
    SeedBlockdev,
    SeedNode,
}

/// A parsed command template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

const KNOWN: &str = "{name}, {diskN}, {blockdevN}, {nodeN}, {seed}, {seedblockdev}, {seednode}; write {{ and }} for literal braces";

impl Template {
    /// Parses `command`; `disks` are the indexes of the VM's disks (what `{diskN}` may name:
    /// a replica VM may hold only some of its primary's disks). Every refusal is one line
    /// naming what is wrong.
    pub fn parse(command: &str, disks: &[u32]) -> Result<Template, String> {
        if command.trim().is_empty() {
            return Err("the launch command is empty (use --no-launch to remove it)".into());
        }
        if command.len() > LAUNCH_COMMAND_MAX {
            return Err(format!(
                "the launch command is {} bytes; at most {LAUNCH_COMMAND_MAX} are accepted",
                command.len()
            ));
        }
        if command.contains('\0') {
            return Err("the launch command contains a NUL byte".into());
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = command;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                text.push(c);
                rest = &rest[2..];
                continue;
            }
            if c != '{' {
                text.push(c);
                rest = &rest[c.len_utf8()..];
                continue;
            }
            let Some(end) = rest.find('}') else {
                return Err(format!(
                    "unclosed {{ in the launch command; placeholders are {KNOWN}"
                ));
            };
            let word = &rest[1..end];
            let piece = placeholder(word).ok_or_else(|| {
                let shown: String = word.chars().take(40).collect();
                format!("unknown placeholder {{{shown}}} in the launch command; placeholders are {KNOWN}")
            })?;
            if let Piece::Disk(n) | Piece::Blockdev(n) | Piece::Node(n) = piece {
                if !disks.contains(&n) {
                    let have: Vec<String> = disks.iter().map(u32::to_string).collect();
                    return Err(format!(
                        "the launch command names {{{word}}} but the VM's disks are {}",
                        have.join(", ")
                    ));
                }
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
            rest = &rest[end + 1..];
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template(pieces))
    }

    /// Whether the template names the seed disk (it needs failover network settings).
    pub fn uses_seed(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Seed | Piece::SeedBlockdev | Piece::SeedNode))
    }

    /// The command with every placeholder replaced by its value, single-quoted.
    pub fn render(
        &self,
        name: &str,
        disks: &[proto::DiskInfo],
        seed: Option<&proto::SeedInfo>,
    ) -> Result<String, String> {
        let disk = |n: u32| {
            disks.iter().find(|d| d.index == n).ok_or_else(|| {
                format!("the launch command names disk {n}, which {name} does not have")
            })
        };
        let seed = || {
            seed.ok_or_else(|| {
                format!("the launch command names the seed disk, which {name} does not have (no failover network settings)")
            })
        };
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Name => out.push_str(&shell_quote(name)),
                Piece::Disk(n) => out.push_str(&shell_quote(&disk(*n)?.nbd_uri)),
                Piece::Blockdev(n) => out.push_str(&shell_quote(&disk(*n)?.qemu_blockdev)),
                Piece::Node(n) => out.push_str(&shell_quote(&disk(*n)?.qemu_node_name)),
                Piece::Seed => out.push_str(&shell_quote(&seed()?.nbd_uri)),
                Piece::SeedBlockdev => out.push_str(&shell_quote(&seed()?.qemu_blockdev)),
                Piece::SeedNode => out.push_str(&shell_quote(&seed()?.qemu_node_name)),
            }
        }
        Ok(out)
    }
}

fn placeholder(word: &str) -> Option<Piece> {
    match word {
        "name" => return Some(Piece::Name),
        "seed" => return Some(Piece::Seed),
        "seedblockdev" => return Some(Piece::SeedBlockdev),
        "seednode" => return Some(Piece::SeedNode),
        _ => {}
    }
    let (make, digits): (fn(u32) -> Piece, &str) = if let Some(d) = word.strip_prefix("disk") {
        (Piece::Disk, d)
    } else if let Some(d) = word.strip_prefix("blockdev") {
        (Piece::Blockdev, d)
    } else if let Some(d) = word.strip_prefix("node") {
        (Piece::Node, d)
    } else {
        return None;
    };
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(make)
}

/// `s` as one word for `/bin/sh`: single-quoted, each `'` written `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A launch ready to run: the filled command and where its output goes.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The replica VM failed over.
    pub vm: String,
    /// The name its disks are served as (`{name}`).
    pub served_as: String,
    pub command: String,
    pub log: PathBuf,
}

/// What became of a launch within [`LAUNCH_WAIT`].
#[derive(Debug)]
pub enum Outcome {
    /// The command exited 0 (it started the VM and returned, as `virsh start` does).
    Exited,
    /// Still running (the VM itself, presumably): left running; a thread reaps it.
    Running { pid: u32, child: Child },
    /// Exited non-zero, or could not be started: why, with the tail of its output.
    Failed(String),
}

/// Starts `launch.command` with `/bin/sh -c`, detached, and waits up to `wait` for it.
pub fn run(launch: &Launch, wait: Duration) -> Outcome {
    let output = match open_log(&launch.log) {
        Ok(f) => f,
        Err(e) => {
            return Outcome::Failed(format!(
                "the launch command's log {} cannot be written: {e}",
                launch.log.display()
            ))
        }
    };
    let (out, err) = match output.try_clone() {
        Ok(second) => (Stdio::from(output), Stdio::from(second)),
        Err(e) => return Outcome::Failed(format!("the launch command's log: {e}")),
    };
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&launch.command)
        .env("UNDERSTUDY_VM", &launch.vm)
        .env("UNDERSTUDY_SERVED_AS", &launch.served_as)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a signal to the daemon's group (Ctrl-C, a stop) does not
        // take the VM with it.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("the launch command could not start: {e}")),
    };
    let deadline = Instant::now() + wait;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Outcome::Exited,
            Ok(Some(st)) => {
                return Outcome::Failed(format!(
                    "the launch command failed ({}){}",
                    describe(st),
                    tail_of(&launch.log)
                ))
            }
            Ok(None) if Instant::now() >= deadline => {
                return Outcome::Running {
                    pid: child.id(),
                    child,
                }
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Outcome::Failed(format!("waiting for the launch command: {e}")),
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    File::create(path)
}

/// "exit status 3" or "killed by signal 9".
pub fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

/// `: <the last line(s) of the log, on one line>`, or nothing when the command said nothing.
fn tail_of(log: &Path) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = bytes.len().saturating_sub(OUTPUT_TAIL_MAX * 4);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    let chars: Vec<char> = joined.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(OUTPUT_TAIL_MAX)..]
        .iter()
        .collect();
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(i: u32) -> proto::DiskInfo {
        proto::DiskInfo {
            index: i,
            size_bytes: 1 << 20,
            export_name: format!("web-{i}"),
            nbd_uri: format!("nbd+unix:///web-{i}?socket=/var/lib/u/nbd.sock"),
            path: String::new(),
            replicated: true,
            qemu_blockdev: format!("driver=nbd,export=web-{i},node-name=disk{i}-web"),
            qemu_node_name: format!("disk{i}-web"),
            libvirt_xml: String::new(),
        }
    }

    #[test]
    fn placeholders_are_filled_single_quoted() {
        let t = Template::parse(
            "qemu -name {name} -blockdev {blockdev1} -device virtio-blk-pci,drive={node1} {disk0}",
            &[0, 1],
        )
        .unwrap();
        let out = t.render("web-test", &[disk(0), disk(1)], None).unwrap();
        assert_eq!(
            out,
            "qemu -name 'web-test' -blockdev 'driver=nbd,export=web-1,node-name=disk1-web' \
             -device virtio-blk-pci,drive='disk1-web' 'nbd+unix:///web-0?socket=/var/lib/u/nbd.sock'"
        );
    }

    #[test]
    fn the_seed_placeholders_are_filled_or_refused_without_a_seed() {
        let t = Template::parse(
            "qemu {disk0} -drive file={seed},if=virtio,readonly=on -blockdev {seedblockdev} -device virtio-blk-pci,drive={seednode}",
            &[0],
        )
        .unwrap();
        assert!(t.uses_seed());
        assert!(!Template::parse("qemu {disk0}", &[0]).unwrap().uses_seed());
        let seed = proto::SeedInfo {
            export_name: "web-seed".into(),
            nbd_uri: "nbd+unix:///web-seed?socket=/s".into(),
            size_bytes: 1 << 20,
            path: String::new(),
            qemu_blockdev: "driver=nbd,export=web-seed,node-name=seed-web,read-only=on".into(),
            qemu_node_name: "seed-web".into(),
            libvirt_xml: String::new(),
        };
        let out = t.render("web", &[disk(0)], Some(&seed)).unwrap();
        assert_eq!(
            out,
            "qemu 'nbd+unix:///web-0?socket=/var/lib/u/nbd.sock' -drive file='nbd+unix:///web-seed?socket=/s',if=virtio,readonly=on \
             -blockdev 'driver=nbd,export=web-seed,node-name=seed-web,read-only=on' -device virtio-blk-pci,drive='seed-web'"
        );
        let err = t.render("web", &[disk(0)], None).unwrap_err();
        assert!(err.contains("no failover network settings"), "{err}");
    }

    #[test]
    fn a_quote_in_a_value_stays_one_word() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote("a 'b' $HOME ?*")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a 'b' $HOME ?*");
    }

    #[test]
    fn doubled_braces_are_literal() {
        let t = Template::parse("echo ${{HOME}} {{x}} }", &[0]).unwrap();
        assert_eq!(t.render("w", &[], None).unwrap(), "echo ${HOME} {x} }");
    }

    #[test]
    fn unknown_placeholders_are_refused_in_one_line() {
        for (cmd, want) in [
            ("virsh start {vm}", "unknown placeholder {vm}"),
            ("echo ${HOME}", "unknown placeholder {HOME}"),
            ("echo {disk}", "unknown placeholder {disk}"),
            ("echo {disk-1}", "unknown placeholder {disk-1}"),
            ("echo {disk0", "unclosed {"),
            ("echo {disk2}", "{disk2} but the VM's disks are 0, 1"),
            ("", "empty"),
        ] {
            let disks: &[u32] = if cmd.contains("node1") {
                &[0, 2]
            } else {
                &[0, 1]
            };
            let err = Template::parse(cmd, disks).unwrap_err();
            assert!(err.contains(want), "{cmd}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let long = "x".repeat(LAUNCH_COMMAND_MAX + 1);
        assert!(Template::parse(&long, &[0])
            .unwrap_err()
            .contains("at most"));
    }

    /// A replica of disks 0 and 2 of its primary (`replication enable --disks 0,2`) has two
    /// disks, indexes 0 and 2: `{disk2}` is fine, `{node1}` is not.
    #[test]
    fn a_replica_of_some_disks_is_checked_by_their_indexes_not_their_count() {
        let t = Template::parse("echo {disk2}", &[0, 2]).unwrap();
        assert_eq!(
            t.render("web", &[disk(0), disk(2)], None).unwrap(),
            "echo 'nbd+unix:///web-2?socket=/var/lib/u/nbd.sock'"
        );
        let err = Template::parse("echo {node1}", &[0, 2]).unwrap_err();
        assert!(err.contains("{node1} but the VM's disks are 0, 2"), "{err}");
    }

    #[test]
    fn a_failing_command_is_reported_with_its_output_tail() {
        let dir = tempfile::tempdir().unwrap();
        let l = Launch {
            vm: "web".into(),
            served_as: "web-test".into(),
            command: "echo starting; echo \"no domain $UNDERSTUDY_SERVED_AS\" >&2; exit 3".into(),
            log: dir.path().join("launch").join("web-test.log"),
        };
        match run(&l, Duration::from_secs(10)) {
            Outcome::Failed(why) => {
                assert!(why.contains("exit status 3"), "{why}");
                assert!(why.contains("starting / no domain web-test"), "{why}");
            }
            o => panic!("{o:?}"),
        }
        let l = Launch {
            command: "true".into(),
            ..l
        };
        assert!(matches!(run(&l, Duration::from_secs(10)), Outcome::Exited));
        let l = Launch {
            command: "exec sleep 30".into(),
            ..l
        };
        match run(&l, Duration::from_millis(300)) {
            Outcome::Running { pid, mut child } => {
                assert_eq!(pid, child.id());
                child.kill().unwrap();
                child.wait().unwrap();
            }
            o => panic!("{o:?}"),
        }
    }
}
