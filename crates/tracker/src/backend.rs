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

/// TRIM and WRITE_ZEROES (up to 4 GiB per request) run in pieces of at most this many bytes,
/// aligned to multiples of it, each under its own hold of the cut gate and setting its own
/// dirty bits: what one piece costs under the gate is what one maximal WRITE costs (the NBD
/// server's 32 MiB payload cap), so a cut waits for at most one piece, never a whole 4 GiB
/// write of zeros on a filesystem without `FALLOC_FL_ZERO_RANGE`.
pub(crate) const ZERO_PIECE_BYTES: u64 = 32 * 1024 * 1024;

fn fenced(disk: &TrackedDisk) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is fenced: the VM was failed over to another host",
            disk.image.display()
        ),
    )
}

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
        if self.fenced.load(std::sync::atomic::Ordering::Acquire) {
            return Err(fenced(self));
        }
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

    /// Runs `op(piece_offset, piece_len)` over `offset..offset+len` in `ZERO_PIECE_BYTES`
    /// pieces, each inside the tracking protocol (`modify`), so a cut can come between two
    /// pieces. The extents of the whole range are logged first, in one group commit.
    fn modify_in_pieces(
        &self,
        offset: u64,
        len: u64,
        op: impl Fn(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        check_range(self, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if len > ZERO_PIECE_BYTES {
            let (e0, e1) = ActivityLog::extents_of(offset / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
            // Logging ahead is conservative; `modify` checks each piece again anyway.
            self.al.ensure(e0, e1, false);
        }
        let mut pos = offset;
        while pos < end {
            let piece_end = ((pos / ZERO_PIECE_BYTES + 1) * ZERO_PIECE_BYTES).min(end);
            self.modify(pos, piece_end - pos, || op(pos, piece_end - pos))?;
            #[cfg(test)]
            if let Some(hook) = self.between_pieces.lock().as_mut() {
                hook(piece_end);
            }
            pos = piece_end;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        if may_trim {
            match sysutil::punch_hole(&self.file, offset, len) {
                Err(e) if sys::unsupported(&e) => {}
                other => return other,
            }
        }
        // ZERO_RANGE, falling back to writing zeros where the filesystem cannot.
        sysutil::zero_range(&self.file, offset, len)
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
            self.sync_image(false)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_image(false)
    }

    fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        self.modify_in_pieces(offset, len_bytes, |off, len| {
            match sysutil::punch_hole(&self.file, off, len) {
                // Trim is advisory: leaving the data in place is a valid outcome.
                Err(e) if sys::unsupported(&e) => Ok(()),
                other => other,
            }
        })?;
        if fua {
            self.sync_image(false)?;
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
        self.modify_in_pieces(offset, len_bytes, |off, len| self.zero(off, len, may_trim))?;
        if fua {
            self.sync_image(false)?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<Extent>> {
        check_range(self, offset, len_bytes)?;
        let end = offset + len_bytes;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < BLOCK_STATUS_EXTENTS_MAX {
            let data = sysutil::seek_data(&self.file, pos)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent {
                    len_bytes: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = sysutil::seek_hole(&self.file, pos)?
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
        sysutil::will_need(&self.file, offset, len_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cut::{cut, Cut, CutGate};
    use parking_lot::Mutex;
    use std::sync::Arc;

    const GIB: u64 = 1 << 30;

    fn disk(dir: &std::path::Path, size: u64) -> (Arc<CutGate>, Arc<TrackedDisk>) {
        let gate = CutGate::new();
        let d = TrackedDisk::create(&dir.join("img"), size, &dir.join("state"), gate.clone())
            .expect("create");
        (gate, d)
    }

    /// Records the end of every piece; the hook is removed again by the caller.
    fn record_pieces(d: &TrackedDisk) -> Arc<Mutex<Vec<u64>>> {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let e = Arc::clone(&ends);
        *d.between_pieces.lock() = Some(Box::new(move |end| e.lock().push(end)));
        ends
    }

    #[test]
    fn fenced_disk_refuses_every_modification_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_gate, d) = disk(dir.path(), 1 << 20);
        d.write_at(&[7u8; 4096], 8192, false).expect("write");
        d.set_fenced(true);
        let refused = [
            d.write_at(&[9u8; 4096], 8192, false),
            d.trim(8192, 4096, false),
            d.write_zeroes(0, 1 << 20, true, false),
        ];
        for r in refused {
            let e = r.expect_err("a fenced disk took a modification");
            assert_eq!(nbd::NbdErrno::from_io(&e), nbd::NbdErrno::Perm, "{e}");
            assert!(e.to_string().contains("fenced"), "{e}");
        }
        let mut buf = [0u8; 4096];
        d.read_at(&mut buf, 8192).expect("reads go on");
        assert_eq!(buf, [7u8; 4096]);
        assert_eq!(d.unshipped_ranges(), vec![(8192, 4096)]);
        d.set_fenced(false);
        d.write_at(&[9u8; 4096], 0, false).expect("unfenced");
        assert_eq!(d.unshipped_ranges(), vec![(0, 4096), (8192, 4096)]);
    }

    #[test]
    fn huge_write_zeroes_runs_in_bounded_pieces_and_marks_every_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_gate, d) = disk(dir.path(), 2 * GIB);
        let ends = record_pieces(&d);
        // Unaligned start: the first piece ends at the first piece boundary.
        let off = 3 * BLOCK_BYTES;
        d.write_zeroes(off, GIB, false, false)
            .expect("write zeroes");
        *d.between_pieces.lock() = None;
        let ends = ends.lock().clone();
        assert_eq!(ends.len() as u64, GIB / ZERO_PIECE_BYTES + 1, "{ends:?}");
        assert_eq!(ends[0], ZERO_PIECE_BYTES);
        assert_eq!(*ends.last().expect("pieces"), off + GIB);
        let mut start = off;
        for end in &ends {
            assert!(*end - start <= ZERO_PIECE_BYTES, "piece {start}..{end}");
            start = *end;
        }
        // Blocks 3..=3+GIB/B-1 are dirty: the range's blocks, nothing else.
        assert_eq!(d.dirty_bytes(), GIB);
        let runs = d.active().runs();
        assert_eq!(runs, vec![(3, GIB / BLOCK_BYTES)]);
    }

    #[test]
    fn cut_between_pieces_of_a_huge_trim_sees_the_pieces_done_so_far() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (gate, d) = disk(dir.path(), 2 * GIB);
        let taken: Arc<Mutex<Option<Cut>>> = Arc::new(Mutex::new(None));
        {
            // After the third piece, a cut: it must get the gate while the TRIM is under way
            // (the trimming thread holds nothing between pieces) and freeze three pieces.
            let (gate, d2, taken, mut pieces) =
                (Arc::clone(&gate), Arc::clone(&d), Arc::clone(&taken), 0);
            *d.between_pieces.lock() = Some(Box::new(move |_end| {
                pieces += 1;
                if pieces == 3 {
                    let c = cut(&gate, std::slice::from_ref(&d2)).expect("cut mid-trim");
                    *taken.lock() = Some(c);
                }
            }));
        }
        d.trim(0, GIB, false).expect("trim");
        // Break the hook's reference cycle.
        *d.between_pieces.lock() = None;
        let c = taken.lock().take().expect("a cut was taken between pieces");
        assert_eq!(c.disks[0].dirty_bytes(), 3 * ZERO_PIECE_BYTES);
        assert_eq!(
            c.disks[0].ranges(),
            vec![(0, 3 * ZERO_PIECE_BYTES)],
            "the frozen set is exactly the pieces done before the cut"
        );
        assert_eq!(d.dirty_bytes(), GIB);
        c.commit();
        assert_eq!(d.dirty_bytes(), GIB - 3 * ZERO_PIECE_BYTES);
    }
}
