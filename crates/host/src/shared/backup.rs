//! `backup NAME`: every disk of one replica point written into a directory with a manifest
//! (`docs/formats/backup.md`). The point is pinned by views for the whole backup, so
//! retention folds and merges around it and commits go on: a backup never fails because a
//! point is being applied. Raw is written here from the view (sparse); other formats by
//! `qemu-img convert` from a temporary read-only NBD export of the view.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nbd::{BlockBackend, Extent};
use proto::time::{now_unix_ns, rfc3339_from_unix_ns};
use proto::{BackupPoint, Seq};
use relationship::State;
use replica::{PointView, ReplicaError, ReplicaVm};

use super::replica_side::resolve_point;
use super::Shared;
use crate::backup::{
    disk_file_name, find_previous, hash_image, hash_zeros, qemu_convert, Backup, BackupDisk,
    Format, IncrementalFrom, BACKUP_CHUNK_BYTES, MANIFEST_NAME, PARTIAL_SUFFIX,
};
use crate::error::{bad_request, conflict, kind_of, not_found, transient, ErrorKind};
use crate::events;

/// **Test only:** a backup waits this many seconds after pinning its point, before reading
/// it, so a test can watch retention go around the pin. At most [`TEST_PAUSE_SECS_MAX`].
const TEST_PAUSE_ENV: &str = "UNDERSTUDY_TEST_BACKUP_PAUSE_SECS";
const TEST_PAUSE_SECS_MAX: u64 = 60;
/// Most extents one block-status answer of a backup export carries (the client asks again).
const STATUS_EXTENTS_MAX: usize = 1024;
/// The block size of qemu's zero detection and of our sparse writes.
const BLOCK: usize = 4096;

/// Counts a backup's pin of a point in [`Shared`] while it lives (`points list`: pinned by
/// `backup`); the views themselves are what hold retention back.
struct PinLabel<'a> {
    shared: &'a Shared,
    key: (String, u64),
}

impl Drop for PinLabel<'_> {
    fn drop(&mut self) {
        let mut b = self.shared.backups.lock();
        if let Some(n) = b.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                b.remove(&self.key);
            }
        }
    }
}

/// The point of an incremental backup, as its NBD export shows it: the point's bytes, and a
/// `base:allocation` that reports every range unchanged since the older point as a hole
/// without ZERO (allocated elsewhere: contents unspecified), so `qemu-img convert -B` leaves
/// those clusters to the backing file. Reads always return the point's true bytes.
struct ChangedOnly {
    view: Arc<PointView>,
    /// `(offset, len)`, sorted, disjoint.
    changed: Vec<(u64, u64)>,
}

impl BlockBackend for ChangedOnly {
    fn size_bytes(&self) -> u64 {
        self.view.size_bytes()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.view.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.view.write_at(data, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        self.view.trim(offset, len_bytes, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.view.write_zeroes(offset, len, may_trim, fua)
    }
    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len_bytes);
        let mut out: Vec<Extent> = Vec::new();
        let push = |e: Extent, out: &mut Vec<Extent>| match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero => l.len_bytes += e.len_bytes,
            _ => out.push(e),
        };
        let mut idx = self.changed.partition_point(|&(o, l)| o + l <= offset);
        let mut pos = offset;
        while pos < end && out.len() < STATUS_EXTENTS_MAX {
            match self.changed.get(idx) {
                Some(&(o, l)) if o <= pos => {
                    let seg_end = end.min(o + l);
                    let mut covered = 0;
                    for e in self.view.block_status(pos, seg_end - pos)? {
                        covered += e.len_bytes;
                        push(e, &mut out);
                    }
                    if covered < seg_end - pos {
                        break; // the view stopped short; the client asks again
                    }
                    pos = seg_end;
                    idx += 1;
                }
                next => {
                    let stop = next.map_or(end, |&(o, _)| o.min(end));
                    push(
                        Extent {
                            len_bytes: stop - pos,
                            hole: true,
                            zero: false,
                        },
                        &mut out,
                    );
                    pos = stop;
                }
            }
        }
        Ok(out)
    }
}

/// An incremental disk: the ranges `(offset, len)` changed since the older point, and the
/// backing file (relative to the backup's directory) with its format.
type Incremental = (Vec<(u64, u64)>, String, Format);

/// What a disk of the backup reads from, and what it builds on.
struct DiskJob {
    index: u32,
    view: Arc<PointView>,
    incremental: Option<Incremental>,
}

/// A write-side failure (the destination's: full, no permission, read-only, qemu-img
/// refusing it) is the user's to fix: 400 with one line, never 500.
fn dest_error(e: anyhow::Error) -> anyhow::Error {
    if kind_of(&e).is_some() {
        return e;
    }
    bad_request(crate::errfmt::one_line(&e))
}

fn replica_error(vm: &str, e: ReplicaError) -> anyhow::Error {
    match e {
        ReplicaError::NoSuchPoint { seq } => not_found(format!(
            "{vm} has no point {seq} any more (retention retired it)"
        )),
        e if e.is_transient() => transient(e.to_string()),
        e => anyhow::Error::from(e),
    }
}

/// Reads the view from start to end: hashes every byte (zero ranges without reading them)
/// and, with `sink`, writes the non-zero 4 KiB blocks there (holes elsewhere). Returns the
/// BLAKE3 and the data bytes read.
/// Hashes (and with `sink`, writes sparse) the view; `at(offset)` after each chunk (progress).
fn scan(
    view: &PointView,
    sink: Option<(&File, &Path)>,
    at: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<(String, u64)> {
    let size = view.size_bytes();
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::new();
    let mut copied = 0u64;
    let mut off = 0u64;
    while off < size {
        let n = (BACKUP_CHUNK_BYTES as u64).min(size - off);
        for e in view.status(off, n)? {
            if e.zero {
                hash_zeros(&mut h, e.len_bytes);
            } else {
                buf.resize(e.len_bytes as usize, 0);
                view.read_range(&mut buf, off)?;
                h.update(&buf);
                copied += e.len_bytes;
                if let Some((f, path)) = sink {
                    write_nonzero_blocks(f, &buf, off).map_err(|e| {
                        dest_error(
                            anyhow::Error::from(e).context(format!("writing {}", path.display())),
                        )
                    })?;
                }
            }
            off += e.len_bytes;
        }
        at(off);
    }
    Ok((h.finalize().to_hex().to_string(), copied))
}

fn write_nonzero_blocks(f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let mut i = 0;
    while i < buf.len() {
        let block = |i: usize| &buf[i..(i + BLOCK).min(buf.len())];
        if zero(block(i)) {
            i += BLOCK;
            continue;
        }
        let start = i;
        while i < buf.len() && !zero(block(i)) {
            i += BLOCK;
        }
        f.write_all_at(&buf[start..i.min(buf.len())], offset + start as u64)?;
    }
    Ok(())
}

fn create_file(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
        .map_err(dest_error)
}

fn fsync_path(path: &Path) -> anyhow::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync of {}", path.display()))
        .map_err(dest_error)
}

impl Shared {
    /// Points of `vm` pinned by running backups, and how many backups hold each.
    pub(super) fn backup_pins(&self, vm: &str) -> std::collections::BTreeMap<u64, usize> {
        self.backups
            .lock()
            .iter()
            .filter(|((v, _), _)| v == vm)
            .map(|((_, seq), n)| (*seq, *n))
            .collect()
    }

    /// Why no consistent point of `vm` can be backed up now (Hyper-V's conditions that
    /// apply here, `docs/formats/backup.md`), with when to retry; `None`: go ahead.
    fn backup_refusal(&self, vm: &str, rvm: &ReplicaVm) -> Option<String> {
        if let Some(State::FailedOverWaitingCompletion { point }) =
            self.replica_relationship(vm).map(|r| r.state)
        {
            return Some(format!(
                "failover in progress: {vm} is failed over to its point {point} on this host; retry after `understudy failover stop {vm}` (or back up the VM itself once `failover complete` made it this host's)"
            ));
        }
        if let Some(d) = rvm.damage() {
            return Some(format!(
                "resynchronization not done: the replica of {vm} waits for a resynchronization ({d}); retry when it completed (`understudy replication status {vm}` on the primary shows Replicating)"
            ));
        }
        if rvm.points().is_empty() {
            return Some(format!(
                "initial replication in progress: {vm} has no recovery point yet; retry when `understudy points list {vm}` lists one"
            ));
        }
        None
    }

    /// `backup NAME`: see the module doc. Emits 2032, then 2033 or 2034.
    pub fn backup(&self, req: &BackupPoint) -> anyhow::Result<Backup> {
        let result = self.backup_inner(req);
        if let Err(e) = &result {
            self.events.emit(
                events::BACKUP_FAILED,
                Some(&req.vm),
                "warning",
                &format!(
                    "backup to {} failed: {}",
                    req.to,
                    crate::errfmt::one_line(e)
                ),
            );
        }
        result
    }

    fn backup_inner(&self, req: &BackupPoint) -> anyhow::Result<Backup> {
        let vm = req.vm.as_str();
        let format = Format::parse(&req.format)?;
        let dir = PathBuf::from(&req.to);
        if !dir.is_absolute() {
            return Err(bad_request(format!("--to {} must be absolute", req.to)));
        }
        if req.incremental_from.is_some() && format != Format::Qcow2 {
            return Err(bad_request(format!(
                "--incremental-from writes qcow2 over the previous backup; --format {} cannot have a backing file here",
                format.as_str()
            )));
        }
        let rvm = match self.replica_vm(vm) {
            Ok(r) => r,
            Err(e)
                if kind_of(&e) == Some(ErrorKind::NotFound)
                    && self.replica_relationship(vm).is_some() =>
            {
                return Err(transient(format!(
                    "initial replication in progress: {vm} has no recovery point yet; retry when `understudy points list {vm}` lists one"
                )))
            }
            Err(e) => return Err(e),
        };
        if let Some(why) = self.backup_refusal(vm, &rvm) {
            return Err(transient(why));
        }
        // Pin: views of every disk. `latest` may be retired between resolving and pinning
        // (a newer point arrived and retention ran): resolve again.
        let disks = rvm.disks();
        let mut attempt = 0;
        let (point, views) = loop {
            attempt += 1;
            let point = resolve_point(&rvm, vm, &req.point)?;
            let views: Result<Vec<Arc<PointView>>, ReplicaError> = disks
                .iter()
                .map(|d| rvm.view(point.seq, d.index).map(Arc::new))
                .collect();
            match views {
                Ok(v) => break (point, v),
                Err(ReplicaError::NoSuchPoint { .. }) if req.point == "latest" && attempt < 3 => {
                    continue
                }
                Err(e) => return Err(replica_error(vm, e)),
            }
        };
        let seq = point.seq.get();
        self.backups
            .lock()
            .entry((vm.to_string(), seq))
            .and_modify(|n| *n += 1)
            .or_insert(1);
        let _label = PinLabel {
            shared: self,
            key: (vm.to_string(), seq),
        };
        if let Some(secs) = std::env::var(TEST_PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_secs(secs.min(TEST_PAUSE_SECS_MAX)));
        }

        // The destination: created if missing, refused if it holds a backup already.
        if dir.join(MANIFEST_NAME).exists() {
            return Err(conflict(format!(
                "{} already holds a backup ({MANIFEST_NAME}); choose another directory",
                dir.display()
            )));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))
            .map_err(dest_error)?;
        remove_partials(&dir, &disks, format);
        // Never replace a file of the user's: a disk file of this backup must not exist yet.
        for d in &disks {
            let file = dir.join(disk_file_name(d.index, format));
            if file.symlink_metadata().is_ok() {
                return Err(conflict(format!(
                    "{} already exists; choose an empty directory",
                    file.display()
                )));
            }
        }

        // Incremental: the older point pinned too, its changes, the backup it builds on.
        let mut _older_views = Vec::new();
        let mut incremental_from = None;
        let mut jobs = Vec::new();
        let prev = match req.incremental_from {
            Some(from) => {
                if from >= seq {
                    return Err(bad_request(format!(
                        "--incremental-from {from} must be older than the point backed up ({seq})"
                    )));
                }
                let (prev_dir, prev) = find_previous(&dir, vm, from)?;
                let name = prev_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("{} has no usable name", prev_dir.display()))?
                    .to_string();
                incremental_from = Some(IncrementalFrom {
                    point: from,
                    backup: format!("../{name}"),
                });
                Some((from, name, prev))
            }
            None => None,
        };
        for (d, view) in disks.iter().zip(&views) {
            let incremental = match &prev {
                None => None,
                Some((from, name, prev)) => {
                    let pd = prev
                        .disks
                        .iter()
                        .find(|p| p.index == d.index && p.virtual_size == d.size_bytes)
                        .ok_or_else(|| {
                            bad_request(format!(
                                "the backup of point {from} in ../{name} has no disk {} of {} bytes",
                                d.index, d.size_bytes
                            ))
                        })?;
                    _older_views.push(
                        rvm.view(Seq(*from), d.index)
                            .map_err(|e| incremental_error(vm, *from, e))?,
                    );
                    let changed = rvm
                        .changed_between(Seq(*from), point.seq, d.index)
                        .map_err(|e| incremental_error(vm, *from, e))?;
                    Some((changed, format!("../{name}/{}", pd.file), pd.format))
                }
            };
            jobs.push(DiskJob {
                index: d.index,
                view: view.clone(),
                incremental,
            });
        }

        let kind = match req.incremental_from {
            Some(f) => format!("incremental from point {f}"),
            None => "full".to_string(),
        };
        self.events.emit(
            events::BACKUP_STARTED,
            Some(vm),
            "info",
            &format!(
                "backup of point {seq} started: {}, {kind}, to {}",
                format.as_str(),
                dir.display()
            ),
        );
        let started = Instant::now();
        let mut created: Vec<PathBuf> = Vec::new();
        let tracker = self.progress.track(req.progress_id.as_deref());
        let total: u64 = jobs.iter().map(|j| j.view.size_bytes()).sum();
        let result = self.write_disks(vm, seq, &dir, format, &jobs, &mut created, &|done| {
            tracker.set(done.min(total), total)
        });
        let disks_done = match result {
            Ok(d) => d,
            Err(e) => {
                for p in &created {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        };
        let backup = Backup {
            vm: vm.to_string(),
            host: self.host_name.clone(),
            point: seq,
            cut_time: rfc3339_from_unix_ns(point.cut_time_unix_ns),
            cut_time_unix_ns: point.cut_time_unix_ns,
            consistency: if point.app_consistent {
                "application".into()
            } else {
                "crash".into()
            },
            created_unix_ns: now_unix_ns(),
            incremental_from,
            disks: disks_done,
        };
        if let Err(e) = backup.write(&dir).map_err(dest_error) {
            for p in &created {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        let copied: u64 = backup.disks.iter().map(|d| d.copied_bytes).sum();
        self.events.emit(
            events::BACKUP_DONE,
            Some(vm),
            "info",
            &format!(
                "backup of point {seq} done: {}, {kind}, {copied} bytes copied in {:.1} s, {}",
                format.as_str(),
                started.elapsed().as_secs_f64(),
                dir.display()
            ),
        );
        Ok(backup)
    }

    /// Writes every disk to its partial name, fsyncs and renames it; `created` collects every
    /// file made, for the caller to remove on failure.
    #[allow(clippy::too_many_arguments)]
    fn write_disks(
        &self,
        vm: &str,
        seq: u64,
        dir: &Path,
        format: Format,
        jobs: &[DiskJob],
        created: &mut Vec<PathBuf>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> anyhow::Result<Vec<BackupDisk>> {
        let mut out = Vec::new();
        let mut done = 0u64;
        for job in jobs {
            let file = disk_file_name(job.index, format);
            let tmp = dir.join(format!(".{file}{PARTIAL_SUFFIX}"));
            let dest = dir.join(&file);
            created.push(tmp.clone());
            let size = job.view.size_bytes();
            let (blake3, copied) = if format == Format::Raw {
                let f = create_file(&tmp)?;
                f.set_len(size)
                    .with_context(|| format!("sizing {}", tmp.display()))
                    .map_err(dest_error)?;
                let (want, data) = scan(&job.view, Some((&f, &tmp)), &|o| progress(done + o))?;
                f.sync_all()
                    .with_context(|| format!("fsync of {}", tmp.display()))
                    .map_err(dest_error)?;
                // Read back, as the other formats are: the manifest names only what the file
                // holds.
                let got = hash_image(&tmp, format, size)
                    .map_err(|e| e.context("reading the written disk back"))?;
                if got != want {
                    anyhow::bail!(
                        "disk {} written as raw reads back differently from point {seq} (BLAKE3 {got}, point {want})",
                        job.index
                    );
                }
                (want, data)
            } else {
                self.convert_disk(vm, seq, job, &tmp, format, &|o| progress(done + o))?
            };
            done += size;
            progress(done);
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
                .map_err(dest_error)?;
            created.push(dest);
            let (backing_file, backing_format) = match &job.incremental {
                Some((_, b, f)) => (Some(b.clone()), Some(*f)),
                None => (None, None),
            };
            out.push(BackupDisk {
                index: job.index,
                file,
                format,
                virtual_size: size,
                blake3,
                backing_file,
                backing_format,
                copied_bytes: copied,
            });
        }
        sysutil::fsync_dir(dir)
            .with_context(|| format!("fsync of {}", dir.display()))
            .map_err(dest_error)?;
        Ok(out)
    }

    /// `qemu-img convert` from a temporary read-only NBD export of the disk's view, while the
    /// view is hashed here; the written file is then read back and must hash the same.
    fn convert_disk(
        &self,
        vm: &str,
        seq: u64,
        job: &DiskJob,
        tmp: &Path,
        format: Format,
        at: &(dyn Fn(u64) + Sync),
    ) -> anyhow::Result<(String, u64)> {
        let n = self.backup_exports.fetch_add(1, Ordering::Relaxed);
        let name = format!("backup.{vm}@{seq}-{}.{n}", job.index);
        let (backend, copied): (Arc<dyn BlockBackend>, Option<u64>) = match &job.incremental {
            Some((changed, _, _)) => (
                Arc::new(ChangedOnly {
                    view: job.view.clone(),
                    changed: changed.clone(),
                }),
                Some(changed.iter().map(|&(_, l)| l).sum()),
            ),
            None => (job.view.clone(), None),
        };
        self.exports.add_with_description(
            name.clone(),
            format!("{vm} point {seq} disk {} (backup, read-only)", job.index),
            backend,
        );
        let uri = format!("nbd+unix:///{name}?socket={}", self.nbd_socket.display());
        let backing = job
            .incremental
            .as_ref()
            .map(|(_, file, fmt)| (file.as_str(), *fmt));
        let (converted, hashed) = std::thread::scope(|s| {
            let hasher = s.spawn(|| scan(&job.view, None, at));
            let converted = qemu_convert(&uri, tmp, format, backing);
            let hashed = hasher
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("hashing the point panicked")));
            (converted, hashed)
        });
        self.exports.remove(&name);
        if let Some(server) = self.nbd.lock().as_ref() {
            server.close_export_connections(&name);
        }
        converted.map_err(dest_error)?;
        // qemu-img creates the file with the daemon's umask; it holds the guest's data.
        std::fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", tmp.display()))
            .map_err(dest_error)?;
        let (want, data) = hashed?;
        fsync_path(tmp)?;
        let got = hash_image(tmp, format, job.view.size_bytes())
            .map_err(|e| e.context("reading the written disk back"))?;
        if got != want {
            anyhow::bail!(
                "disk {} written as {} reads back differently from point {seq} (BLAKE3 {got}, point {want})",
                job.index,
                format.as_str()
            );
        }
        Ok((want, copied.unwrap_or(data)))
    }
}

fn incremental_error(vm: &str, from: u64, e: ReplicaError) -> anyhow::Error {
    match e {
        ReplicaError::NoSuchPoint { .. } | ReplicaError::ChangesUnknown { .. } => bad_request(format!(
            "--incremental-from {from}: the blocks {vm} changed since point {from} are no longer known ({e}); take a full backup"
        )),
        e => replica_error(vm, e),
    }
}

/// Removes the partial files a crashed backup of these disks in this format left in `dir`
/// (never named by a manifest); only those exact names, nothing else of the directory.
fn remove_partials(dir: &Path, disks: &[replica::DiskEntry], format: Format) {
    let names = disks
        .iter()
        .map(|d| disk_file_name(d.index, format))
        .chain(std::iter::once(MANIFEST_NAME.to_string()));
    for name in names {
        let _ = std::fs::remove_file(dir.join(format!(".{name}{PARTIAL_SUFFIX}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_inside_data_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = create_file(&path).unwrap();
        let mut buf = vec![0u8; 4 * BLOCK];
        buf[BLOCK] = 1;
        buf[3 * BLOCK + 5] = 2;
        f.set_len(8 * BLOCK as u64).unwrap();
        write_nonzero_blocks(&f, &buf, BLOCK as u64).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[BLOCK..5 * BLOCK], &buf[..]);
        assert_eq!(sysutil::seek_data(&f, 0).unwrap(), Some(2 * BLOCK as u64));
    }
}
