//! [`Overlay`]: the writable copy-on-write disk a failed-over (or test-failed-over) VM boots
//! from on the replica host, over one disk of one read-only recovery point. It owns the
//! overlay directory (`data` + `map`, `docs/formats/failover-overlay.md`) and its durability:
//! a FLUSH or FUA write syncs `data`, then replaces `map`. It never writes the base and never
//! copies it at creation (ready in constant time whatever the disk size).
//!
//! Invariant: a block's bit is set only after its bytes are in `data` (in memory), and reaches
//! `map` only after `data` was synced; bits go from 0 to 1 only under the range lock, so a
//! read-modify-write of an unmapped block never races another write to that block.

mod map;

#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nbd::{BlockBackend, Extent};
use parking_lot::{Condvar, Mutex, RwLock};
use proto::Seq;
use sysutil::FileMode;

use crate::ReplicaError;
use map::{Bits, MapHeader};

/// The overlay's block: the unit of copy-on-write and of the map (the replica's block size).
pub const OVERLAY_BLOCK_BYTES: u64 = delta::BLOCK_BYTES;
const BLOCK_BYTES: u64 = OVERLAY_BLOCK_BYTES;
/// Largest disk an overlay is made for: its bitmap (1 bit per block) is held in memory and
/// rewritten whole by a flush that mapped new blocks, 512 MiB at this size (2 MiB for 64 GiB).
pub const OVERLAY_DISK_BYTES_MAX: u64 = 16 << 40;
/// `materialize` reads and writes this much at a time (bounded memory, few system calls).
pub const MATERIALIZE_CHUNK_BYTES: u64 = 4 << 20;

const DATA: &str = "data";
const MAP: &str = "map";
const MAP_TMP: &str = "map.tmp";
/// Mode of the overlay's files: guest data, readable by the daemon's user only.
const FILE_MODE: u32 = 0o600;
static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// A writable copy-on-write disk over a read-only base. See the module documentation.
/// Dropping it persists nothing (the same, for the files, as a kill -9): flush first.
pub struct Overlay {
    dir: PathBuf,
    base: Arc<dyn BlockBackend>,
    /// Holds the overlay's exclusive `flock` while open.
    data: File,
    header: MapHeader,
    bits: RwLock<BitsState>,
    ranges: RangeLocks,
    /// One flush at a time: the map is written by one flush, with the bits it copied.
    flush_lock: Mutex<()>,
    /// Set when syncing `data` failed: the kernel may have dropped the dirty pages, so no
    /// later flush may claim durability.
    poisoned: AtomicBool,
}

struct BitsState {
    bits: Bits,
    /// A bit was set since the last map written.
    unsaved: bool,
}

fn overlay_error(dir: &Path, reason: impl Into<String>) -> ReplicaError {
    ReplicaError::Overlay {
        dir: dir.to_owned(),
        reason: reason.into(),
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Overlay {
    /// Makes a new overlay in `dir` (created if missing; refused if it exists and is not
    /// empty) over `base`, which is disk `disk` of point `point`. Copies nothing.
    pub fn create(
        dir: &Path,
        base: Arc<dyn BlockBackend>,
        point: Seq,
        disk: u32,
    ) -> Result<Overlay, ReplicaError> {
        let size = base.size_bytes();
        if size == 0 || size % BLOCK_BYTES != 0 || size > OVERLAY_DISK_BYTES_MAX {
            return Err(overlay_error(
                dir,
                format!(
                    "a disk of {size} bytes cannot have an overlay (a non-zero multiple of \
                     {BLOCK_BYTES} up to {OVERLAY_DISK_BYTES_MAX} bytes)"
                ),
            ));
        }
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(overlay_error(
                        dir,
                        "exists and is not empty (discard the old overlay first)",
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(ReplicaError::io("create directory", dir))?;
                let parent = sysutil::parent_dir(dir);
                sysutil::fsync_dir(parent).map_err(ReplicaError::io("fsync directory", parent))?;
            }
            Err(e) => return Err(ReplicaError::io("list", dir)(e)),
        }
        let data_path = dir.join(DATA);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&data_path)
            .map_err(ReplicaError::io("create", &data_path))?;
        lock(&data, dir)?;
        data.set_len(size)
            .map_err(ReplicaError::io("resize", &data_path))?;
        data.sync_all()
            .map_err(ReplicaError::io("fsync", &data_path))?;
        let header = MapHeader {
            disk_size_bytes: size,
            point: point.get(),
            disk,
        };
        let bits = Bits::empty(size / BLOCK_BYTES);
        // replace_file fsyncs the directory, which also makes `data`'s entry durable.
        write_map(dir, header, &bits)?;
        Ok(Overlay::new(dir, base, data, header, bits))
    }

    /// Opens the overlay in `dir` again (after a restart) over `base`, which must be the disk
    /// `disk` of point `point` it was made over. Refuses, with one line, a map that fails
    /// validation or was made over another point, disk or size.
    pub fn open(
        dir: &Path,
        base: Arc<dyn BlockBackend>,
        point: Seq,
        disk: u32,
    ) -> Result<Overlay, ReplicaError> {
        // Lock first: the temporary removed below may be a live overlay's map being replaced.
        let data_path = dir.join(DATA);
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir.is_dir() => {
                return Err(overlay_error(
                    dir,
                    "has no data: its creation did not finish (discard it)",
                ))
            }
            Err(e) => return Err(ReplicaError::io("open", &data_path)(e)),
        };
        lock(&data, dir)?;
        remove_if_present(&dir.join(MAP_TMP))?;
        let map_path = dir.join(MAP);
        let size = base.size_bytes();
        let expected_len = map::map_file_bytes(size);
        let file_len = match fs::metadata(&map_path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir.is_dir() => {
                return Err(overlay_error(
                    dir,
                    "has no map: its creation did not finish (discard it)",
                ))
            }
            Err(e) => return Err(ReplicaError::io("open", &map_path)(e)),
        };
        if file_len != expected_len {
            return Err(overlay_error(
                dir,
                format!(
                    "map is {file_len} bytes, a disk of {size} bytes needs {expected_len} \
                     (truncated, or made over another disk)"
                ),
            ));
        }
        let bytes = fs::read(&map_path).map_err(ReplicaError::io("read", &map_path))?;
        let (header, bits) =
            map::decode(&bytes).map_err(|reason| overlay_error(dir, format!("map: {reason}")))?;
        let want = MapHeader {
            disk_size_bytes: size,
            point: point.get(),
            disk,
        };
        if header != want {
            return Err(overlay_error(
                dir,
                format!(
                    "was made over point {} disk {} ({} bytes), not point {} disk {} ({} bytes)",
                    header.point, header.disk, header.disk_size_bytes, want.point, disk, size
                ),
            ));
        }
        let len = data
            .metadata()
            .map_err(ReplicaError::io("stat", &data_path))?
            .len();
        if len != size {
            return Err(overlay_error(
                dir,
                format!("data is {len} bytes, the disk is {size}"),
            ));
        }
        Ok(Overlay::new(dir, base, data, header, bits))
    }

    /// Removes the overlay in `dir` durably (its writes are gone). Missing already is
    /// success; refused while an `Overlay` has it open.
    pub fn discard(dir: &Path) -> Result<(), ReplicaError> {
        if !dir.exists() {
            return Ok(());
        }
        let data_path = dir.join(DATA);
        // Held until the end, so no `open` starts on what is being removed.
        let _locked = match File::open(&data_path) {
            Ok(f) => {
                lock(&f, dir)?;
                Some(f)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(ReplicaError::io("open", &data_path)(e)),
        };
        // The map goes first: from then on `open` refuses the directory, whatever remains.
        remove_if_present(&dir.join(MAP))?;
        sysutil::fsync_dir(dir).map_err(ReplicaError::io("fsync directory", dir))?;
        remove_if_present(&dir.join(MAP_TMP))?;
        remove_if_present(&data_path)?;
        fs::remove_dir(dir).map_err(ReplicaError::io("remove directory", dir))?;
        let parent = sysutil::parent_dir(dir);
        sysutil::fsync_dir(parent).map_err(ReplicaError::io("fsync directory", parent))
    }

    fn new(
        dir: &Path,
        base: Arc<dyn BlockBackend>,
        data: File,
        header: MapHeader,
        bits: Bits,
    ) -> Overlay {
        Overlay {
            dir: dir.to_owned(),
            base,
            data,
            header,
            bits: RwLock::new(BitsState {
                bits,
                unsaved: false,
            }),
            ranges: RangeLocks::default(),
            flush_lock: Mutex::new(()),
            poisoned: AtomicBool::new(false),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The point the overlay was made over.
    pub fn point(&self) -> Seq {
        Seq(self.header.point)
    }

    /// The disk of that point.
    pub fn disk(&self) -> u32 {
        self.header.disk
    }

    /// The blocks (of [`OVERLAY_BLOCK_BYTES`]) written, trimmed or zeroed since the overlay
    /// was created, as sorted, disjoint, non-adjacent ranges of block indices: what the VM
    /// changed over its point. After a crash, those of the last flush.
    pub fn written_blocks(&self) -> Vec<Range<u64>> {
        self.bits.read().bits.set_runs()
    }

    /// Writes the merged disk (base + overlay) to `dest` as a sparse raw image (all-zero
    /// blocks left as holes) through `dest.partial`, fsynced and renamed into place. Returns
    /// the bytes of data written (the rest of the image is holes).
    pub fn materialize(&self, dest: &Path) -> Result<u64, ReplicaError> {
        self.materialize_reporting(dest, &|_| {})
    }

    /// [`Self::materialize`], calling `progress(bytes of the disk covered)` after each chunk.
    pub fn materialize_reporting(
        &self,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<u64, ReplicaError> {
        let mut tmp = dest.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let result = self.materialize_to(&tmp, progress).and_then(|n| {
            sysutil::rename_durable(&tmp, dest)
                .map_err(ReplicaError::io("rename", &tmp))
                .map(|()| n)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn materialize_to(&self, tmp: &Path, progress: &dyn Fn(u64)) -> Result<u64, ReplicaError> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(tmp)
            .map_err(ReplicaError::io("create", tmp))?;
        let size = self.header.disk_size_bytes;
        f.set_len(size).map_err(ReplicaError::io("resize", tmp))?;
        let mut buf = Vec::new();
        let mut written = 0u64;
        let mut off = 0u64;
        while off < size {
            let n = MATERIALIZE_CHUNK_BYTES.min(size - off);
            let extents = self
                .block_status(off, n)
                .map_err(ReplicaError::io("block status", &self.dir))?;
            let mut progressed = false;
            for e in extents {
                if e.len_bytes == 0 {
                    break;
                }
                progressed = true;
                if !e.zero {
                    buf.resize(e.len_bytes as usize, 0);
                    self.read_at(&mut buf, off)
                        .map_err(ReplicaError::io("read overlay", &self.dir))?;
                    written += write_nonzero_blocks(&f, &buf, off)
                        .map_err(ReplicaError::io("write", tmp))?;
                }
                off += e.len_bytes;
            }
            if !progressed {
                return Err(overlay_error(&self.dir, "block status made no progress"));
            }
            progress(off);
        }
        f.sync_all().map_err(ReplicaError::io("fsync", tmp))?;
        Ok(written)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.disk_size_bytes => Ok(()),
            _ => Err(einval()),
        }
    }

    /// Reads one block of the base, patches `patch` in at `in_block` and writes the whole block
    /// to `data` (copy-on-write). Called under the range lock, on an unmapped block.
    fn copy_on_write(&self, block: u64, in_block: usize, patch: &[u8]) -> io::Result<()> {
        let mut b = [0u8; BLOCK_BYTES as usize];
        self.base.read_at(&mut b, block * BLOCK_BYTES)?;
        b.get_mut(in_block..in_block + patch.len())
            .ok_or_else(einval)?
            .copy_from_slice(patch);
        self.data.write_all_at(&b, block * BLOCK_BYTES)
    }

    /// Writes `buf` at `offset` (zeros when `buf` is `None`, `len` bytes) with the range lock
    /// held: unmapped partial edge blocks are completed from the base, the rest is written (or
    /// punched) in place, then every block of the range is mapped.
    fn write_locked(&self, buf: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let (b0, b1) = block_span(offset, len);
        let mapped = {
            let st = self.bits.read();
            [st.bits.get(b0), st.bits.get(b1 - 1)]
        };
        // [lo, hi): the part written in place once the edge blocks are dealt with.
        let (mut lo, mut hi) = (offset, end);
        for (i, block) in [b0, b1 - 1].into_iter().enumerate() {
            if i == 1 && block == b0 {
                break;
            }
            let (bs, be) = (block * BLOCK_BYTES, (block + 1) * BLOCK_BYTES);
            let (s, t) = (offset.max(bs), end.min(be));
            if (s, t) == (bs, be) {
                continue; // whole block: written in place with the rest
            }
            let patch = match buf {
                Some(b) => &b[(s - offset) as usize..(t - offset) as usize],
                None => &ZEROS[..(t - s) as usize],
            };
            if mapped[i] {
                self.data.write_all_at(patch, s)?;
            } else {
                self.copy_on_write(block, (s - bs) as usize, patch)?;
            }
            if i == 0 {
                lo = t;
            } else {
                hi = s;
            }
        }
        if lo < hi {
            match buf {
                Some(b) => self
                    .data
                    .write_all_at(&b[(lo - offset) as usize..(hi - offset) as usize], lo)?,
                // lo and hi are block-aligned here: every partial edge was handled above.
                None => punch_or_zero(&self.data, lo, hi - lo)?,
            }
        }
        let mut st = self.bits.write();
        if st.bits.set(b0..b1) {
            st.unsaved = true;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len > 0 {
            let (b0, b1) = block_span(offset, len);
            let _held = self.ranges.lock(b0..b1);
            self.write_locked(None, offset, len)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
}

impl BlockBackend for Overlay {
    fn size_bytes(&self) -> u64 {
        self.header.disk_size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (b0, b1) = block_span(offset, len);
        let runs = {
            let st = self.bits.read();
            let mut runs = Vec::new();
            let mut b = b0;
            while b < b1 {
                let (e, mapped) = st.bits.run_from(b, b1);
                runs.push((b, e, mapped));
                b = e;
            }
            runs
        };
        for (rb, re, mapped) in runs {
            let (s, t) = (offset.max(rb * BLOCK_BYTES), end.min(re * BLOCK_BYTES));
            let out = &mut buf[(s - offset) as usize..(t - offset) as usize];
            if mapped {
                self.data.read_exact_at(out, s)?;
            } else {
                self.base.read_at(out, s)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len > 0 {
            let (b0, b1) = block_span(offset, len);
            if self.bits.read().bits.all_set(b0..b1) {
                // Every block is mapped: no read-modify-write can be under way on them.
                self.data.write_all_at(data, offset)?;
            } else {
                let _held = self.ranges.lock(b0..b1);
                self.write_locked(Some(data), offset, len)?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let _one = self.flush_lock.lock();
        // Copy the bits before syncing: each of them belongs to a write that returned, so the
        // sync below covers its bytes.
        let copy = {
            let mut st = self.bits.write();
            if st.unsaved {
                st.unsaved = false;
                Some(st.bits.clone())
            } else {
                None
            }
        };
        if let Err(e) = self.data.sync_data() {
            self.poisoned.store(true, Ordering::Release);
            return Err(e);
        }
        if let Some(bits) = copy {
            if let Err(e) = write_map(&self.dir, self.header, &bits) {
                self.bits.write().unsaved = true;
                return Err(io::Error::other(e.to_string()));
            }
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        // Trimmed blocks read zeros, not the base: the guest may rely on it (discard_zeroes).
        self.zero(offset, len_bytes, fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        _may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.zero(offset, len_bytes, fua)
    }

    fn write_zeroes_fast(
        &self,
        offset: u64,
        len_bytes: u64,
        _may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        // Always faster than the client writing zeros: whole blocks are punched, and at most
        // the two edge blocks are read from the base.
        self.zero(offset, len_bytes, fua)
    }

    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len_bytes)?;
        if len_bytes == 0 {
            return Ok(vec![Extent {
                len_bytes: 0,
                hole: false,
                zero: false,
            }]);
        }
        let (b0, b1) = block_span(offset, len_bytes);
        let (run_end, mapped) = self.bits.read().bits.run_from(b0, b1);
        let run_len = (run_end * BLOCK_BYTES).min(offset + len_bytes) - offset;
        if mapped {
            // Conservative: a mapped block may be a punched hole, but it is reported as data.
            return Ok(vec![Extent {
                len_bytes: run_len,
                hole: false,
                zero: false,
            }]);
        }
        let mut out = Vec::new();
        let mut covered = 0u64;
        for e in self.base.block_status(offset, run_len)? {
            if covered >= run_len || e.len_bytes == 0 {
                break;
            }
            let len_bytes = e.len_bytes.min(run_len - covered);
            covered += len_bytes;
            out.push(Extent { len_bytes, ..e });
        }
        if out.is_empty() {
            out.push(Extent {
                len_bytes: run_len,
                hole: false,
                zero: false,
            });
        }
        Ok(out)
    }
}

/// The blocks `[b0, b1)` that `[offset, offset + len)` touches (`len > 0`).
fn block_span(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK_BYTES, (offset + len).div_ceil(BLOCK_BYTES))
}

/// Deallocates a block-aligned range of `data` (reads zeros), or zeroes it where the file
/// system cannot punch holes.
fn punch_or_zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match sysutil::punch_hole(file, offset, len) {
        Err(e) if sysutil::is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
            sysutil::zero_range(file, offset, len)
        }
        other => other,
    }
}

fn lock(data: &File, dir: &Path) -> Result<(), ReplicaError> {
    match sysutil::try_lock_exclusive(data) {
        Ok(true) => Ok(()),
        Ok(false) => Err(overlay_error(
            dir,
            "is in use (open in this or another process)",
        )),
        Err(e) => Err(ReplicaError::io("lock", dir.join(DATA))(e)),
    }
}

fn write_map(dir: &Path, header: MapHeader, bits: &Bits) -> Result<(), ReplicaError> {
    let path = dir.join(MAP);
    sysutil::replace_file(
        &path,
        &dir.join(MAP_TMP),
        &map::encode(header, bits),
        FileMode::Umask(FILE_MODE),
    )
    .map_err(ReplicaError::io("replace", path))
}

fn remove_if_present(path: &Path) -> Result<(), ReplicaError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ReplicaError::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Writes the runs of non-zero 4 KiB blocks of `buf` (at `offset`), leaving zero blocks as
/// holes; returns the bytes written.
fn write_nonzero_blocks(f: &File, buf: &[u8], offset: u64) -> io::Result<u64> {
    let bs = BLOCK_BYTES as usize;
    let is_zero = |i: usize| buf[i..(i + bs).min(buf.len())].iter().all(|&x| x == 0);
    let mut written = 0;
    let mut i = 0;
    while i < buf.len() {
        if is_zero(i) {
            i += bs;
            continue;
        }
        let start = i;
        while i < buf.len() && !is_zero(i) {
            i += bs;
        }
        let end = i.min(buf.len());
        f.write_all_at(&buf[start..end], offset + start as u64)?;
        written += (end - start) as u64;
    }
    Ok(written)
}

/// Locks on ranges of blocks: a holder excludes every other holder of an overlapping range.
/// Held by writes that map blocks; at most one range per thread, so there is no lock order.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<Range<u64>>>,
    freed: Condvar,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: Range<u64>,
}

impl RangeLocks {
    fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        let mut held = self.held.lock();
        while held
            .iter()
            .any(|h| h.start < range.end && range.start < h.end)
        {
            self.freed.wait(&mut held);
        }
        held.push(range.clone());
        RangeGuard { locks: self, range }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|h| *h == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.freed.notify_all();
    }
}
