//! Initial replication from external media (`docs/formats/initial-media.md`): the primary
//! writes point 1 as one delta file plus a manifest into a directory
//! ([`write_media`]); the replica host feeds that file to the same receiver an upload uses
//! ([`import_media`]), which verifies everything before it commits point 1.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use anyhow::{bail, Context};
use bytes::Bytes;
use delta::{DeltaHeader, SharedWrite};
use proto::peer::PeerDisk;
use proto::{Generation, Seq};
use serde::{Deserialize, Serialize};

use crate::error::bad_request;

/// The manifest's name in the media directory.
pub const MANIFEST_FILE: &str = "understudy-media.json";
/// The delta's name in the media directory.
pub const DELTA_FILE: &str = "point-1.delta";
/// The manifest's `format`.
pub const MEDIA_FORMAT: &str = "understudy-initial-media";
/// The manifest's version this understudy writes and reads.
pub const MEDIA_VERSION: u32 = 1;
/// Largest manifest read: a few hundred bytes per disk; anything bigger is not ours.
pub const MEDIA_MANIFEST_MAX_BYTES: u64 = 64 << 10;
/// Chunk the delta file is read and fed to the receiver in: streaming, so the import's
/// memory does not grow with the disk.
pub const MEDIA_READ_CHUNK_BYTES: usize = 1 << 20;

/// `understudy-media.json` (`initial-media.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub vm: String,
    pub generation: Generation,
    pub seq: Seq,
    pub cut_time_unix_ns: u64,
    pub delta_file: String,
    pub delta_bytes: u64,
    /// 64 hex digits.
    pub header_checksum: String,
    pub disks: Vec<PeerDisk>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A media file being written: counts what it wrote.
struct MediaFile {
    out: BufWriter<File>,
    written: u64,
}

impl Write for MediaFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl SharedWrite for MediaFile {
    fn write_shared(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.write_all(&bytes)
    }
}

/// Refuses a media directory that cannot take new media (not absolute, or already holding
/// media), creating it when missing.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_absolute() {
        return Err(bad_request(format!(
            "media directory {} must be an absolute path",
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(|e| {
        bad_request(format!(
            "cannot create the media directory {}: {e}",
            dir.display()
        ))
    })?;
    for f in [MANIFEST_FILE, DELTA_FILE] {
        if dir.join(f).exists() {
            return Err(crate::error::conflict(format!(
                "{} already holds media ({f}); give an empty directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Writes the cut `disks` as point 1 into `dir` (delta, then manifest, each fsynced and
/// renamed into place, then the directory fsynced). On failure nothing is left in `dir`.
pub fn write_media(
    dir: &Path,
    header: &DeltaHeader,
    key: &[u8; 32],
    disks: &[(u32, &tracker::FrozenDisk)],
    progress: &AtomicU64,
) -> anyhow::Result<Manifest> {
    let delta_path = dir.join(DELTA_FILE);
    let manifest_path = dir.join(MANIFEST_FILE);
    let delta_tmp = dir.join(format!("{DELTA_FILE}.partial"));
    let manifest_tmp = dir.join(format!("{MANIFEST_FILE}.partial"));
    let written = (|| -> anyhow::Result<Manifest> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&delta_tmp)
            .with_context(|| format!("creating {}", delta_tmp.display()))?;
        let out = MediaFile {
            out: BufWriter::with_capacity(MEDIA_READ_CHUNK_BYTES, file),
            written: 0,
        };
        let (mut out, _summary) = crate::shipper::encode_cut(out, header, key, disks, progress)?;
        out.flush()
            .with_context(|| format!("writing {}", delta_tmp.display()))?;
        let delta_bytes = out.written;
        drop(out);
        crate::durable::publish(&delta_tmp, &delta_path)?;
        let manifest = Manifest {
            format: MEDIA_FORMAT.into(),
            version: MEDIA_VERSION,
            vm: header.vm_id.to_string(),
            generation: header.generation,
            seq: header.seq,
            cut_time_unix_ns: header.cut_time_unix_ns,
            delta_file: DELTA_FILE.into(),
            delta_bytes,
            header_checksum: hex(&header.checksum(key)?),
            disks: header
                .disks
                .iter()
                .map(|d| PeerDisk {
                    index: d.index,
                    size_bytes: d.size_bytes,
                })
                .collect(),
        };
        fs::write(&manifest_tmp, serde_json::to_vec_pretty(&manifest)?)
            .with_context(|| format!("writing {}", manifest_tmp.display()))?;
        crate::durable::publish(&manifest_tmp, &manifest_path)?;
        Ok(manifest)
    })();
    if written.is_err() {
        for p in [&delta_tmp, &manifest_tmp, &delta_path, &manifest_path] {
            let _ = fs::remove_file(p);
        }
    }
    written
}

/// Removes media written by [`write_media`] (its relationship refused to record it).
pub fn remove_media(dir: &Path) {
    for f in [DELTA_FILE, MANIFEST_FILE] {
        let _ = fs::remove_file(dir.join(f));
    }
}

/// Reads and checks the manifest of `dir` for VM `vm`; returns it and the delta file's path.
pub fn read_manifest(dir: &Path, vm: &str) -> anyhow::Result<(Manifest, PathBuf)> {
    let path = dir.join(MANIFEST_FILE);
    let mut text = Vec::new();
    File::open(&path)
        .map_err(|e| bad_request(format!("{}: {e}", path.display())))?
        .take(MEDIA_MANIFEST_MAX_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad_request(format!("{}: {e}", path.display())))?;
    if text.len() as u64 > MEDIA_MANIFEST_MAX_BYTES {
        return Err(bad_request(format!(
            "{} is larger than {MEDIA_MANIFEST_MAX_BYTES} bytes: not an understudy media manifest",
            path.display()
        )));
    }
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
        bad_request(format!(
            "{} is not an understudy media manifest: {e}",
            path.display()
        ))
    })?;
    let refuse = |why: String| Err(bad_request(format!("{}: {why}", path.display())));
    if m.format != MEDIA_FORMAT {
        return refuse(format!("format {:?}, not {MEDIA_FORMAT:?}", m.format));
    }
    if m.version != MEDIA_VERSION {
        return refuse(format!(
            "media of version {}; this understudy reads version {MEDIA_VERSION}",
            m.version
        ));
    }
    if m.vm != vm {
        return refuse(format!("the media is of VM {}, not {vm}", m.vm));
    }
    if m.seq != Seq(1) {
        return refuse(format!("the media holds point {}, not point 1", m.seq));
    }
    if m.delta_file.is_empty() || m.delta_file.contains('/') || m.delta_file.starts_with('.') {
        return refuse(format!(
            "delta_file {:?} is not a bare file name",
            m.delta_file
        ));
    }
    let delta = dir.join(&m.delta_file);
    Ok((m, delta))
}

/// Feeds the media's delta file to `rvm`'s receiver and commits it (blocking). Every check
/// of an upload applies; any failure leaves the replica as it was.
pub fn import_media(
    rvm: &replica::ReplicaVm,
    manifest: &Manifest,
    delta: &Path,
) -> anyhow::Result<replica::PointInfo> {
    let shown = delta.display();
    if rvm.latest_seq() != Seq(0) {
        return Err(crate::error::conflict(format!(
            "the replica of {} already holds point {}: media can only start a replica that has no point",
            manifest.vm,
            rvm.latest_seq()
        )));
    }
    if rvm.generation() != manifest.generation {
        return Err(bad_request(format!(
            "the media is of generation {} but the replica of {} is of generation {}",
            manifest.generation,
            manifest.vm,
            rvm.generation()
        )));
    }
    let mut file = File::open(delta).map_err(|e| bad_request(format!("{shown}: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| bad_request(format!("{shown}: {e}")))?
        .len();
    if len != manifest.delta_bytes {
        return Err(bad_request(format!(
            "{shown} is {len} bytes but the manifest says {}: the media is incomplete or damaged",
            manifest.delta_bytes
        )));
    }
    let refused = |e: &dyn std::fmt::Display| {
        bad_request(format!(
            "{shown} is not a valid point 1 of {}: {e}",
            manifest.vm
        ))
    };
    let mut incoming = rvm.begin_receive().map_err(|e| refused(&e))?;
    let mut buf = vec![0u8; MEDIA_READ_CHUNK_BYTES];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| bad_request(format!("{shown}: {e}")))?;
        if n == 0 {
            break;
        }
        incoming.write_all(&buf[..n]).map_err(|e| refused(&e))?;
    }
    match incoming.header_checksum() {
        Some(sum) if hex(&sum) == manifest.header_checksum => {}
        Some(_) => bail!(refused(&"its header is not the one the manifest names")),
        None => return Err(refused(&"no header")),
    }
    rvm.commit(incoming).map_err(|e| refused(&e))
}
