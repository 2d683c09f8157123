//! FileBackend tests on real sparse files in a temporary directory.

use super::*;

fn sparse(size: u64) -> (tempfile::NamedTempFile, FileBackend) {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    f.as_file().set_len(size).expect("set_len");
    let b = FileBackend::open(f.path(), false).expect("open");
    (f, b)
}

#[test]
fn read_write_round_trip_and_size() {
    let (_f, b) = sparse(1 << 20);
    assert_eq!(b.size_bytes(), 1 << 20);
    b.write_at(&[7u8; 4096], 8192, true).expect("write");
    let mut buf = [0u8; 4096];
    b.read_at(&mut buf, 8192).expect("read");
    assert_eq!(buf, [7u8; 4096]);
    b.flush().expect("flush");
}

#[test]
fn block_status_sees_holes_and_data() {
    let (_f, b) = sparse(4 << 20);
    b.write_at(&[1u8; 65536], 1 << 20, false).expect("write");
    let extents = b.block_status(0, 4 << 20).expect("status");
    let total: u64 = extents.iter().map(|e| e.len_bytes).sum();
    assert_eq!(total, 4 << 20);
    assert!(extents[0].hole && extents[0].zero);
    let data: Vec<_> = extents.iter().filter(|e| !e.hole).collect();
    assert_eq!(data.len(), 1);
    // Clipped to the request, starting mid-hole.
    let extents = b.block_status(4096, 8192).expect("status");
    assert_eq!(
        extents,
        vec![Extent {
            len_bytes: 8192,
            hole: true,
            zero: true
        }]
    );
}

#[test]
fn trim_and_write_zeroes_read_back_zero() {
    let (_f, b) = sparse(1 << 20);
    for (i, (may_trim, fast)) in [(true, false), (false, false), (true, true), (false, true)]
        .into_iter()
        .enumerate()
    {
        let off = i as u64 * 65536;
        b.write_at(&[9u8; 65536], off, false).expect("write");
        if fast {
            b.write_zeroes_fast(off, 65536, may_trim, false)
                .expect("fast zero on ext4/tmpfs");
        } else {
            b.write_zeroes(off, 65536, may_trim, true).expect("zero");
        }
        let mut buf = vec![1u8; 65536];
        b.read_at(&mut buf, off).expect("read");
        assert!(buf.iter().all(|&x| x == 0), "case {i}");
    }
    b.write_at(&[9u8; 65536], 0, false).expect("write");
    b.trim(0, 65536, false).expect("trim");
    let extents = b.block_status(0, 65536).expect("status");
    assert!(extents[0].hole, "trim punched a hole: {extents:?}");
}

#[test]
fn read_only_backend_reports_it() {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    f.as_file().set_len(4096).expect("set_len");
    let b = FileBackend::open(f.path(), true).expect("open");
    assert!(b.read_only());
    assert!(b.write_at(&[1], 0, false).is_err());
}
