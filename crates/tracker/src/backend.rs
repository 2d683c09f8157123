//! The write path: `nbd::BlockBackend` for `TrackedDisk`.
//!
//! Hot path of every modifying call: shared gate, atomic check of the hot-extent set, atomic
//! check of frozen-and-unsecured bits, the I/O itself, atomic set of the dirty bits. No
//! allocation and no syscall beyond the I/O (plus `fdatasync` for FUA) unless an extent must be
//! logged or a frozen block copied. Guest reads never touch the gate, the bitmaps or the CBW.

use std::io;
use std::os::unix::fs::FileExt;

use nbd::{BlockBackend, Extent};

use crate::activity::ActivityLog;
use crate::disk::TrackedDisk;
use crate::{sys, BLOCK_BYTES};

/// Writes at least this large are taken as bulk copying (nbdcopy, qemu-img convert and
/// initial fills use 256 KiB–2 MiB requests; guests mostly 4–64 KiB), and make the activity
/// log look ahead.
const AL_LOOK_AHEAD_WRITE_BYTES_MIN: u64 = 256 * 1024;

/// Cap on extents returned by one `block_status` call (the trait allows stopping short).
const BLOCK_STATUS_EXTENTS_MAX: usize = 64;

fn check_range(disk: &TrackedDisk, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= disk.size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: range {offset}+{len} beyond size {}",
                disk.image.display(),
                disk.size
            ),
        )),
    }
}

impl TrackedDisk {
    /// Runs one modifying operation on `offset..offset+len` inside the tracking protocol.
    fn modify(&self, offset: u64, len: u64, op: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        check_range(self, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / BLOCK_BYTES, (offset + len - 1) / BLOCK_BYTES);
        let (e0, e1) = ActivityLog::extents_of(first, last);
        let shared = loop {
            let g = self.gate.shared();
            if self.al.all_hot(e0, e1) {
                break g;
            }
            // Never hold the gate across an fsync: the cut would wait for it.
            drop(g);
            self.al.ensure(e0, e1, len >= AL_LOOK_AHEAD_WRITE_BYTES_MIN);
        };
        let idx = self.active_idx.load(std::sync::atomic::Ordering::Acquire) & 1;
        let frozen = &self.maps[idx ^ 1];
        if frozen.any_in_and_not(&self.secured, first, last) {
            self.copy_before_write(frozen, first, last);
        }
        let result = op();
        // Set even when the I/O failed: a partial write is still a change.
        self.maps[idx].set_range(first, last);
        drop(shared);
        result
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        if may_trim {
            match nbd::file::punch_hole(&self.file, offset, len) {
                Err(e) if sys::unsupported(&e) => {}
                other => return other,
            }
        }
        // ZERO_RANGE, falling back to writing zeros where the filesystem cannot.
        nbd::file::zero_range(&self.file, offset, len)
    }
}

impl BlockBackend for TrackedDisk {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.modify(offset, data.len() as u64, || {
            self.file.write_all_at(data, offset)
        })?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        self.modify(offset, len_bytes, || {
            match nbd::file::punch_hole(&self.file, offset, len_bytes) {
                // Trim is advisory: leaving the data in place is a valid outcome.
                Err(e) if sys::unsupported(&e) => Ok(()),
                other => other,
            }
        })?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.modify(offset, len_bytes, || self.zero(offset, len_bytes, may_trim))?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        check_range(self, offset, len_bytes)?;
        let end = offset + len_bytes;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < BLOCK_STATUS_EXTENTS_MAX {
            let data = sys::seek_data(&self.file, pos)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent {
                    len_bytes: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = sys::seek_hole(&self.file, pos)?
                .unwrap_or(end)
                .min(end)
                .max(pos + 1);
            out.push(Extent {
                len_bytes: hole - pos,
                hole: false,
                zero: false,
            });
            pos = hole;
        }
        if out.is_empty() {
            out.push(Extent {
                len_bytes,
                hole: false,
                zero: false,
            });
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        check_range(self, offset, len_bytes)?;
        sys::will_need(&self.file, offset, len_bytes)
    }
}
