//! Adopting raw disk images as a new replica VM's base (reverse replication after a planned
//! failover: the old primary's disks already hold the point the new primary started from, so
//! no initial replication is needed). The store's `adopt_vm` does the bookkeeping; this module
//! checks the caller's images and puts each in place as a base image: a hard link on the same
//! file system, a sparse copy otherwise. See "Adopting a VM (reverse replication)" in
//! `docs/formats/replica-store.md`.

use std::fs::{self, File, OpenOptions, Permissions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use delta::DiskEntry;
use proto::{Seq, VmName};

use crate::store::FILE_MODE;
use crate::{durable, failpoint, ReplicaError};

/// Buffer of an image copied across file systems: one chunk in memory at a time, large enough
/// for sequential throughput (the copy reads and writes whole MiB).
pub const ADOPT_COPY_CHUNK_BYTES: usize = 1 << 20;

/// Blocks of this size that are all zeros are not written by a copy (they stay holes).
const ZERO_BLOCK_BYTES: usize = 4096;

/// The point the adopted images hold: the point the new primary started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedBase {
    /// Its seq (≥ 1): the next delta the replica takes is `seq + 1` on parent `seq`.
    pub seq: Seq,
    /// Its cut time, as the point was listed where it was taken.
    pub cut_time_unix_ns: u64,
    /// `Some(reason)`: the images do not hold that point exactly (the old primary's own last
    /// state, after an unplanned failover); the VM is created damaged, so it takes only a
    /// `Full` delta next, whose commit clears it.
    pub damage: Option<String>,
}

/// How an image became a base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// A hard link to the caller's file (same inode).
    Linked,
    /// A sparse copy (the image is on another file system, or linking is not permitted).
    Copied,
}

/// Checks the caller's images against the disk table, changing nothing: exactly one per disk,
/// each an existing regular file (not a symlink) of its disk's size. Returns them in the disk
/// table's order.
pub(crate) fn check_images(
    vm_id: &VmName,
    disks: &[DiskEntry],
    images: &[(u32, PathBuf)],
) -> Result<Vec<(DiskEntry, PathBuf)>, ReplicaError> {
    let refuse = |reason: String| ReplicaError::Adopt {
        vm_id: vm_id.to_string(),
        reason,
    };
    for (i, (disk, path)) in images.iter().enumerate() {
        if !disks.iter().any(|d| d.index == *disk) {
            return Err(refuse(format!(
                "image {} is for disk {disk}, which the disk table does not have",
                path.display()
            )));
        }
        if images[..i].iter().any(|(d, _)| d == disk) {
            return Err(refuse(format!("two images for disk {disk}")));
        }
    }
    let mut out = Vec::with_capacity(disks.len());
    for d in disks {
        let Some((_, path)) = images.iter().find(|(i, _)| *i == d.index) else {
            return Err(refuse(format!("no image for disk {}", d.index)));
        };
        let meta = fs::symlink_metadata(path)
            .map_err(|e| refuse(format!("image {} of disk {}: {e}", path.display(), d.index)))?;
        if !meta.file_type().is_file() {
            return Err(refuse(format!(
                "image {} of disk {} is not a regular file",
                path.display(),
                d.index
            )));
        }
        if meta.len() != d.size_bytes {
            return Err(refuse(format!(
                "image {} of disk {} is {} bytes, the disk is {}",
                path.display(),
                d.index,
                meta.len(),
                d.size_bytes
            )));
        }
        out.push((*d, path.clone()));
    }
    Ok(out)
}

/// Makes `image` the base image `dst` of disk `disk` (`dst` does not exist yet): a hard link,
/// or a sparse copy when the link is refused for crossing file systems (`EXDEV`) or not
/// permitted (`EPERM`, `EMLINK`). Then mode [`FILE_MODE`] (a link shares the caller's inode)
/// and fsync, so the base image's bytes and size are durable before any manifest names them.
pub(crate) fn place_image(
    vm_id: &VmName,
    disk: &DiskEntry,
    image: &Path,
    dst: &Path,
) -> Result<Placed, ReplicaError> {
    let linked =
        failpoint::hit_os("adopt.link", libc::EXDEV).and_then(|()| fs::hard_link(image, dst));
    let (file, placed) = match linked {
        Ok(()) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(dst)
                .map_err(ReplicaError::io("open base image", dst))?;
            (file, Placed::Linked)
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EPERM | libc::EMLINK)
            ) =>
        {
            let src = File::open(image).map_err(ReplicaError::io("open image", image))?;
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(dst)
                .map_err(ReplicaError::io("create base image", dst))?;
            copy_sparse(&src, image, &file, dst, disk.size_bytes)?;
            (file, Placed::Copied)
        }
        Err(e) => return Err(ReplicaError::io("link", dst)(e)),
    };
    // The image may have changed since it was checked (the caller promised it would not).
    let len = file
        .metadata()
        .map_err(ReplicaError::io("stat", dst))?
        .len();
    if len != disk.size_bytes {
        return Err(ReplicaError::Adopt {
            vm_id: vm_id.to_string(),
            reason: format!(
                "image {} of disk {} changed size while adopted ({len} bytes, the disk is {})",
                image.display(),
                disk.index,
                disk.size_bytes
            ),
        });
    }
    file.set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(ReplicaError::io("chmod", dst))?;
    durable::fsync_file(&file, dst)?;
    Ok(placed)
}

/// The next data extent `[start, end)` of `src` at or after `pos` (below `size`), or `None`.
/// A file system that cannot answer `SEEK_DATA`/`SEEK_HOLE` (`EINVAL`) makes the rest data.
fn next_extent(
    src: &File,
    path: &Path,
    pos: u64,
    size: u64,
) -> Result<Option<(u64, u64)>, ReplicaError> {
    let start = match sysutil::seek_data(src, pos) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((pos, size))),
        Err(e) => return Err(ReplicaError::io("SEEK_DATA", path)(e)),
    };
    if start >= size {
        return Ok(None);
    }
    let end = match sysutil::seek_hole(src, start) {
        Ok(Some(h)) => h.min(size),
        Ok(None) => size,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => size,
        Err(e) => return Err(ReplicaError::io("SEEK_HOLE", path)(e)),
    };
    // A hole right at a data offset cannot be; should a file system answer so, copy the rest
    // (never loop without progress).
    Ok(Some((start, if end > start { end } else { size })))
}

/// Copies `size` bytes of `src` into `dst` (new and empty), keeping holes: only `src`'s data
/// extents are read, in chunks of [`ADOPT_COPY_CHUNK_BYTES`], and blocks that are all zeros
/// are not written.
fn copy_sparse(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    size: u64,
) -> Result<(), ReplicaError> {
    dst.set_len(size)
        .map_err(ReplicaError::io("resize base image", dst_path))?;
    let mut buf = vec![0u8; ADOPT_COPY_CHUNK_BYTES];
    let mut pos = 0;
    while let Some((start, end)) = next_extent(src, src_path, pos, size)? {
        let mut off = start;
        while off < end {
            // At most ADOPT_COPY_CHUNK_BYTES, so it fits in usize.
            let n = (end - off).min(ADOPT_COPY_CHUNK_BYTES as u64) as usize;
            src.read_exact_at(&mut buf[..n], off)
                .map_err(ReplicaError::io("read image", src_path))?;
            write_nonzero(dst, dst_path, &buf[..n], off)?;
            off += n as u64;
            failpoint::hit("adopt.mid_copy")?;
        }
        pos = end;
    }
    Ok(())
}

/// Writes `bytes` at `offset`, skipping runs of all-zero blocks (the file is new: they are
/// holes already).
fn write_nonzero(dst: &File, path: &Path, bytes: &[u8], offset: u64) -> Result<(), ReplicaError> {
    let mut run: Option<usize> = None;
    let mut at = 0;
    for block in bytes.chunks(ZERO_BLOCK_BYTES) {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(at),
            (true, Some(s)) => {
                failpoint::hit_os("adopt.write", libc::ENOSPC)
                    .and_then(|()| dst.write_all_at(&bytes[s..at], offset + s as u64))
                    .map_err(ReplicaError::io("write base image", path))?;
                run = None;
            }
            _ => {}
        }
        at += block.len();
    }
    if let Some(s) = run {
        failpoint::hit_os("adopt.write", libc::ENOSPC)
            .and_then(|()| dst.write_all_at(&bytes[s..], offset + s as u64))
            .map_err(ReplicaError::io("write base image", path))?;
    }
    Ok(())
}
