//! Backups of replica points (`docs/formats/backup.md`): the manifest (`backup.json`), the
//! BLAKE3 of a disk's virtual contents, and `backup verify`. Foreign formats are written and
//! read only through `qemu-img`, `qemu-nbd` and `nbdcopy`, never parsed here.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::error::bad_request;

pub const MANIFEST_NAME: &str = "backup.json";
const MANIFEST_FORMAT: &str = "understudy-backup";
const MANIFEST_VERSION: u32 = 1;
/// Largest `backup.json` read: 16 disks take about 4 KiB; anything far larger is not ours.
pub const BACKUP_MANIFEST_BYTES_MAX: u64 = 64 << 10;
/// Reads and hashes go in pieces of this size (bounded memory, sequential throughput).
pub const BACKUP_CHUNK_BYTES: usize = 4 << 20;
/// Suffix of files being written; never named by a manifest.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Output formats. Raw is written by the daemon; the others by `qemu-img convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl Format {
    pub fn parse(s: &str) -> anyhow::Result<Format> {
        Ok(match s {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vhdx" => Format::Vhdx,
            other => {
                return Err(bad_request(format!(
                    "--format must be raw, qcow2, vmdk or vhdx, got {other:?}"
                )))
            }
        })
    }

    /// The name qemu tools use, also the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
        }
    }
}

/// The file name of disk `index` in `format`.
pub fn disk_file_name(index: u32, format: Format) -> String {
    format!("disk-{index}.{}", format.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncrementalFrom {
    pub point: u64,
    /// The previous backup's directory, relative to this backup's directory.
    pub backup: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDisk {
    pub index: u32,
    pub file: String,
    pub format: Format,
    pub virtual_size: u64,
    /// BLAKE3 of the disk's virtual contents, 64 hex.
    pub blake3: String,
    pub backing_file: Option<String>,
    pub backing_format: Option<Format>,
    pub copied_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub vm: String,
    pub host: String,
    pub point: u64,
    pub cut_time: String,
    pub cut_time_unix_ns: u64,
    pub consistency: String,
    pub created_unix_ns: u64,
    pub incremental_from: Option<IncrementalFrom>,
    pub disks: Vec<BackupDisk>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    blake3: String,
    backup: Backup,
}

fn checksum(b: &Backup) -> anyhow::Result<String> {
    Ok(blake3::hash(&serde_json::to_vec(b)?).to_hex().to_string())
}

/// A disk file name a manifest may name: `disk-<index>.<ext>` of a known format, nothing
/// else (no path, no `..`).
fn file_name_ok(d: &BackupDisk) -> bool {
    d.file == disk_file_name(d.index, d.format)
}

impl Backup {
    /// Writes `dir/backup.json` durably (partial name, fsync, rename, fsync of `dir`).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let env = Envelope {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            blake3: checksum(self)?,
            backup: self.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&env)?;
        bytes.push(b'\n');
        let tmp = dir.join(format!(".{MANIFEST_NAME}{PARTIAL_SUFFIX}"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&bytes)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("fsync of {}", tmp.display()))?;
            let dest = dir.join(MANIFEST_NAME);
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
            sysutil::fsync_dir(dir).with_context(|| format!("fsync of {}", dir.display()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Reads and checks `dir/backup.json`: size, format, version, checksum, file names.
    pub fn read(dir: &Path) -> anyhow::Result<Backup> {
        let path = dir.join(MANIFEST_NAME);
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut bytes = Vec::new();
        f.take(BACKUP_MANIFEST_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > BACKUP_MANIFEST_BYTES_MAX {
            bail!(
                "{}: larger than {} bytes, not a backup manifest",
                path.display(),
                BACKUP_MANIFEST_BYTES_MAX
            );
        }
        let env: Envelope = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a backup manifest", path.display()))?;
        if env.format != MANIFEST_FORMAT {
            bail!(
                "{}: format {:?} is not {MANIFEST_FORMAT}",
                path.display(),
                env.format
            );
        }
        if env.version != MANIFEST_VERSION {
            bail!(
                "{}: unsupported version {} (this build reads version {MANIFEST_VERSION})",
                path.display(),
                env.version
            );
        }
        if checksum(&env.backup)? != env.blake3 {
            bail!(
                "{}: checksum mismatch (the manifest was altered or damaged)",
                path.display()
            );
        }
        if let Some(d) = env.backup.disks.iter().find(|d| !file_name_ok(d)) {
            bail!(
                "{}: disk {} names file {:?}, expected {:?}",
                path.display(),
                d.index,
                d.file,
                disk_file_name(d.index, d.format)
            );
        }
        if env.backup.disks.is_empty() || env.backup.disks.len() > proto::DISKS_PER_VM_MAX as usize
        {
            bail!("{}: {} disks", path.display(), env.backup.disks.len());
        }
        Ok(env.backup)
    }
}

/// Hashes `len` zero bytes (the zero ranges of a disk are hashed, never read).
pub fn hash_zeros(h: &mut blake3::Hasher, mut len: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// BLAKE3 of a raw file's contents, which must be exactly `size` bytes.
pub fn hash_raw_file(path: &Path, size: u64) -> anyhow::Result<String> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("stat of {}", path.display()))?
        .len();
    if len != size {
        bail!("{} is {len} bytes long, the disk is {size}", path.display());
    }
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BACKUP_CHUNK_BYTES];
    let mut off = 0u64;
    while off < size {
        // Holes are read as zeros by the kernel without touching the device.
        let n = (size - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .with_context(|| format!("reading {} at {off}", path.display()))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// BLAKE3 of the virtual contents of a `format` image (a qcow2's backing chain included),
/// streamed by `nbdcopy` from a read-only `qemu-nbd` of it; exactly `size` bytes expected.
pub fn hash_image(path: &Path, format: Format, size: u64) -> anyhow::Result<String> {
    if format == Format::Raw {
        return hash_raw_file(path, size);
    }
    let mut child = Command::new("nbdcopy")
        .args(["--", "[", "qemu-nbd", "-r", "-f", format.as_str()])
        .arg(path)
        .args(["]", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nbdcopy (install Debian's libnbd-bin and qemu-utils)")?;
    let mut out = child.stdout.take().context("nbdcopy's stdout")?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BACKUP_CHUNK_BYTES];
    let mut total = 0u64;
    let read: std::io::Result<()> = (|| loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
        total += n as u64;
    })();
    drop(out);
    let output = child.wait_with_output().context("waiting for nbdcopy")?;
    read.with_context(|| format!("reading {} through nbdcopy", path.display()))?;
    if !output.status.success() {
        bail!(
            "reading {} through qemu-nbd: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    if total != size {
        bail!(
            "{} reads as {total} bytes, the disk is {size}",
            path.display()
        );
    }
    Ok(h.finalize().to_hex().to_string())
}

/// One disk's verdict from [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskVerdict {
    pub index: u32,
    pub file: String,
    /// `None`: the contents hash as recorded; `Some(why)`: they do not, or cannot be read.
    pub problem: Option<String>,
}

/// `backup verify DIR`: every disk's virtual contents against the manifest.
pub fn verify(dir: &Path) -> anyhow::Result<(Backup, Vec<DiskVerdict>)> {
    let backup = Backup::read(dir)?;
    let verdicts = backup
        .disks
        .iter()
        .map(|d| {
            let path = dir.join(&d.file);
            let problem = match hash_image(&path, d.format, d.virtual_size) {
                Ok(h) if h == d.blake3 => None,
                Ok(h) => Some(format!(
                    "contents differ from the manifest (BLAKE3 {h}, recorded {})",
                    d.blake3
                )),
                Err(e) => Some(crate::errfmt::one_line(&e)),
            };
            DiskVerdict {
                index: d.index,
                file: d.file.clone(),
                problem,
            }
        })
        .collect();
    Ok((backup, verdicts))
}

/// The directories next to `dir` (siblings) whose manifest verifies and names `vm` and
/// `point`: where an incremental backup finds the backup it builds on.
pub fn find_previous(dir: &Path, vm: &str, point: u64) -> anyhow::Result<(PathBuf, Backup)> {
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent directory", dir.display()))?;
    let mut found = Vec::new();
    let entries = std::fs::read_dir(parent)
        .with_context(|| format!("listing {} for the previous backup", parent.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p == dir || !p.is_dir() {
            continue;
        }
        if let Ok(b) = Backup::read(&p) {
            if b.vm == vm && b.point == point {
                found.push((p, b));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(bad_request(format!(
            "--incremental-from {point}: no backup of {vm} point {point} next to {} (a directory in {} whose backup.json names it); take a full backup first",
            dir.display(),
            parent.display()
        ))),
        n => Err(bad_request(format!(
            "--incremental-from {point}: {n} backups of {vm} point {point} in {}: {}; keep one",
            parent.display(),
            found
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `qemu-img convert -f raw -O FORMAT SRC DEST` (SRC an NBD URI), with `-B backing -F fmt`
/// for an incremental: unallocated source ranges stay unallocated in DEST.
pub fn qemu_convert(
    src: &str,
    dest: &Path,
    format: Format,
    backing: Option<(&str, Format)>,
) -> anyhow::Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", format.as_str()]);
    if let Some((file, fmt)) = backing {
        cmd.args(["-B", file, "-F", fmt.as_str()]);
    }
    cmd.arg(src).arg(dest);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img (install Debian's qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img convert to {}: {}",
            format.as_str(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backup {
        Backup {
            vm: "web".into(),
            host: "r1".into(),
            point: 7,
            cut_time: "2026-12-03T00:00:00Z".into(),
            cut_time_unix_ns: 1,
            consistency: "crash".into(),
            created_unix_ns: 2,
            incremental_from: None,
            disks: vec![BackupDisk {
                index: 0,
                file: "disk-0.raw".into(),
                format: Format::Raw,
                virtual_size: 8192,
                blake3: String::new(),
                backing_file: None,
                backing_format: None,
                copied_bytes: 0,
            }],
        }
    }

    #[test]
    fn a_manifest_round_trips_and_an_edited_one_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = sample();
        b.write(dir.path()).unwrap();
        assert_eq!(Backup::read(dir.path()).unwrap(), b);
        let path = dir.path().join(MANIFEST_NAME);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"point\": 7", "\"point\": 8")).unwrap();
        let err = format!("{:#}", Backup::read(dir.path()).unwrap_err());
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn a_manifest_naming_a_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = sample();
        b.disks[0].file = "../etc/passwd".into();
        b.write(dir.path()).unwrap();
        let err = format!("{:#}", Backup::read(dir.path()).unwrap_err());
        assert!(err.contains("names file"), "{err}");
    }

    #[test]
    fn a_raw_disk_that_differs_is_named_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 8192];
        std::fs::write(dir.path().join("disk-0.raw"), &data).unwrap();
        let mut b = sample();
        b.disks[0].blake3 = blake3::hash(&data).to_hex().to_string();
        b.write(dir.path()).unwrap();
        let (_, v) = verify(dir.path()).unwrap();
        assert_eq!(v[0].problem, None);
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("disk-0.raw"))
            .unwrap();
        f.write_all_at(&[8], 4096).unwrap();
        let (_, v) = verify(dir.path()).unwrap();
        assert!(v[0].problem.as_deref().unwrap().contains("differ"));
    }

    #[test]
    fn zeros_hash_like_zero_bytes() {
        let mut h = blake3::Hasher::new();
        hash_zeros(&mut h, 200_000);
        assert_eq!(h.finalize(), blake3::hash(&vec![0u8; 200_000]));
    }
}
