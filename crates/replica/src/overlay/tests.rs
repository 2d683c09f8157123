//! The overlay against a plain in-memory model of a disk, crashes (drop without flush, torn
//! files), refusals at reopen, materialize, constant-time creation and concurrent partial
//! writes.

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Barrier};

use nbd::{BlockBackend, MemoryBackend};
use proptest::prelude::*;
use proto::Seq;

use super::*;

const BS: usize = BLOCK_BYTES as usize;

/// Deterministic pseudo-random bytes (xorshift), so a failing case replays.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A base of `blocks` blocks of random content, with every fourth block all zeros (so
/// materialize has holes to leave).
fn base_content(blocks: usize, seed: u64) -> Vec<u8> {
    let mut v = noise(seed, blocks * BS);
    for b in (0..blocks).step_by(4) {
        v[b * BS..(b + 1) * BS].fill(0);
    }
    v
}

fn memory_base(content: &[u8]) -> Arc<dyn BlockBackend> {
    Arc::new(MemoryBackend::read_only(content.to_vec()))
}

fn read_all(o: &Overlay) -> Vec<u8> {
    let mut v = vec![0; o.size_bytes() as usize];
    o.read_at(&mut v, 0).expect("read");
    v
}

fn one_line(e: &ReplicaError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    assert!(s.starts_with("failover overlay "), "{s}");
    s
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
        fua: bool,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
        fast: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    /// Flush, drop, open again from the files.
    Reopen,
}

const MODEL_BLOCKS: u64 = 24;

fn range() -> impl Strategy<Value = (u64, u64)> {
    let size = MODEL_BLOCKS * BLOCK_BYTES;
    prop_oneof![
        // Anywhere, any length (unaligned, crossing blocks).
        (0..size).prop_flat_map(move |off| (Just(off), 1..=(size - off).min(3 * BLOCK_BYTES))),
        // Sector-aligned small pieces, the usual guest write.
        (0..size / 512, 1u64..=16).prop_map(move |(s, n)| {
            let off = s * 512;
            (off, (n * 512).min(size - off))
        }),
        // Whole blocks.
        (0..MODEL_BLOCKS, 1u64..=4)
            .prop_map(|(b, n)| { (b * BLOCK_BYTES, n.min(MODEL_BLOCKS - b) * BLOCK_BYTES) }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>(), any::<bool>())
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        2 => range().prop_map(|(off, len)| Op::Trim { off, len }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), fast)| Op::Zero { off, len, fast }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn touch(written: &mut [bool], off: u64, len: u64) {
    for b in off / BLOCK_BYTES..(off + len).div_ceil(BLOCK_BYTES) {
        written[b as usize] = true;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn overlay_reads_as_a_plain_disk_and_never_writes_its_base(
        ops in prop::collection::vec(op(), 1..40),
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ov_dir = dir.path().join("ov");
        let content = base_content(MODEL_BLOCKS as usize, seed);
        let base = Arc::new(MemoryBackend::read_only(content.clone()));
        let mut model = content.clone();
        let mut written = vec![false; MODEL_BLOCKS as usize];
        let mut ov = Overlay::create(&ov_dir, base.clone(), Seq(3), 0).expect("create");
        for op in ops {
            match op {
                Op::Write { off, len, seed, fua } => {
                    let data = noise(seed, len as usize);
                    ov.write_at(&data, off, fua).expect("write");
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    touch(&mut written, off, len);
                }
                Op::Trim { off, len } => {
                    ov.trim(off, len, false).expect("trim");
                    model[off as usize..(off + len) as usize].fill(0);
                    touch(&mut written, off, len);
                }
                Op::Zero { off, len, fast } => {
                    if fast {
                        ov.write_zeroes_fast(off, len, true, false).expect("fast zero");
                    } else {
                        ov.write_zeroes(off, len, true, false).expect("zero");
                    }
                    model[off as usize..(off + len) as usize].fill(0);
                    touch(&mut written, off, len);
                }
                Op::Read { off, len } => {
                    let mut buf = vec![0; len as usize];
                    ov.read_at(&mut buf, off).expect("read");
                    prop_assert_eq!(&buf[..], &model[off as usize..(off + len) as usize]);
                }
                Op::Flush => ov.flush().expect("flush"),
                Op::Reopen => {
                    ov.flush().expect("flush");
                    drop(ov);
                    ov = Overlay::open(&ov_dir, base.clone(), Seq(3), 0).expect("reopen");
                }
            }
        }
        prop_assert!(read_all(&ov) == model, "overlay differs from the model");
        prop_assert!(base.snapshot() == content, "the base was written");
        let mut expected = Vec::new();
        for (b, w) in written.iter().enumerate() {
            if *w {
                match expected.last_mut() {
                    Some(r @ Range { .. }) if r.end == b as u64 => r.end += 1,
                    _ => expected.push(b as u64..b as u64 + 1),
                }
            }
        }
        prop_assert_eq!(ov.written_blocks(), expected);
    }
}

#[test]
fn flushed_writes_survive_a_kill_and_unflushed_blocks_are_whole_old_or_whole_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let blocks = 32;
    let content = base_content(blocks, 1);
    let base = memory_base(&content);
    let ov = Overlay::create(&ov_dir, base.clone(), Seq(9), 2).expect("create");
    // Flushed: blocks 0..8 partly and wholly, a trim of 8..10.
    ov.write_at(&noise(2, 3 * BS + 100), 700, false)
        .expect("write");
    ov.write_at(&noise(3, 4 * BS), 4 * BS as u64, false)
        .expect("write");
    ov.trim(8 * BS as u64, 2 * BS as u64, false).expect("trim");
    ov.flush().expect("flush");
    let at_flush = read_all(&ov);
    // Not flushed: over mapped blocks, over new blocks (partial and whole), a FUA-less trim.
    ov.write_at(&noise(4, 2 * BS), 2 * BS as u64 + 512, false)
        .expect("write");
    ov.write_at(&noise(5, 100), 20 * BS as u64 + 7, false)
        .expect("write");
    ov.write_at(&noise(6, 3 * BS), 24 * BS as u64, false)
        .expect("write");
    ov.trim(28 * BS as u64, BS as u64, false).expect("trim");
    let last = read_all(&ov);
    // The kill: no flush, nothing persisted at drop (there is no Drop-time persistence).
    drop(ov);
    let ov = Overlay::open(&ov_dir, base, Seq(9), 2).expect("reopen");
    let after = read_all(&ov);
    for b in 0..blocks {
        let r = b * BS..(b + 1) * BS;
        assert!(
            after[r.clone()] == at_flush[r.clone()] || after[r.clone()] == last[r.clone()],
            "block {b} is neither its flushed nor its latest content"
        );
        if b >= 10 {
            // Never mapped at the flush: the whole block reads from the base.
            assert!(
                after[r.clone()] == content[r],
                "block {b} shows unflushed bytes"
            );
        }
    }
    // Blocks flushed and not written since hold exactly what was flushed (2..5 were written
    // again after the flush: either content is allowed, checked above).
    for b in [0, 1, 5, 6, 7, 8, 9] {
        let r = b * BS..(b + 1) * BS;
        assert!(after[r.clone()] == at_flush[r], "flushed block {b} lost");
    }
    assert_eq!(ov.written_blocks(), vec![0..10]);
}

#[test]
fn a_fua_write_is_durable_without_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let content = base_content(8, 11);
    let base = memory_base(&content);
    let ov = Overlay::create(&ov_dir, base.clone(), Seq(1), 0).expect("create");
    let data = noise(12, 1000);
    ov.write_at(&data, 5000, true).expect("fua write");
    drop(ov);
    let ov = Overlay::open(&ov_dir, base, Seq(1), 0).expect("reopen");
    let mut buf = vec![0; 1000];
    ov.read_at(&mut buf, 5000).expect("read");
    assert_eq!(buf, data);
    assert_eq!(ov.written_blocks(), vec![1..2]);
}

#[test]
fn garbage_in_unmapped_data_blocks_and_a_torn_map_tmp_are_never_read() {
    // What a crash can leave: bytes of lost writes in `data` at blocks the map does not name,
    // and a half-written `map.tmp`.
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let content = base_content(8, 21);
    let base = memory_base(&content);
    let ov = Overlay::create(&ov_dir, base.clone(), Seq(4), 0).expect("create");
    ov.write_at(&noise(22, BS), 0, true).expect("write");
    let flushed = read_all(&ov);
    drop(ov);
    let f = OpenOptions::new()
        .write(true)
        .open(ov_dir.join(DATA))
        .expect("open data");
    f.write_all_at(&noise(23, 3 * BS), 3 * BS as u64)
        .expect("garbage");
    fs::write(ov_dir.join(MAP_TMP), b"USOVMAP1 torn").expect("torn tmp");
    let ov = Overlay::open(&ov_dir, base, Seq(4), 0).expect("reopen");
    assert!(read_all(&ov) == flushed, "garbage of a lost write was read");
    assert!(!ov_dir.join(MAP_TMP).exists(), "leftover map.tmp removed");
}

#[test]
fn reopen_over_another_point_disk_or_size_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let content = base_content(8, 31);
    let base = memory_base(&content);
    let ov = Overlay::create(&ov_dir, base.clone(), Seq(5), 1).expect("create");
    ov.write_at(b"x", 0, true).expect("write");
    drop(ov);
    let e = Overlay::open(&ov_dir, base.clone(), Seq(6), 1)
        .err()
        .expect("other point");
    assert!(one_line(&e).contains("made over point 5 disk 1"), "{e}");
    let e = Overlay::open(&ov_dir, base.clone(), Seq(5), 0)
        .err()
        .expect("other disk");
    assert!(one_line(&e).contains("not point 5 disk 0"), "{e}");
    let bigger = memory_base(&base_content(16, 31));
    let e = Overlay::open(&ov_dir, bigger, Seq(5), 1)
        .err()
        .expect("other size");
    one_line(&e);
    // The refusals changed nothing.
    Overlay::open(&ov_dir, base, Seq(5), 1).expect("the right point still opens");
}

#[test]
fn a_corrupted_truncated_or_missing_map_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let base = memory_base(&base_content(8, 41));
    let ov = Overlay::create(&ov_dir, base.clone(), Seq(2), 0).expect("create");
    ov.write_at(b"y", 9000, true).expect("write");
    drop(ov);
    let good = fs::read(ov_dir.join(MAP)).expect("map");
    let mut flipped = good.clone();
    flipped[64] ^= 0x01; // one bit of the bitmap
    fs::write(ov_dir.join(MAP), &flipped).expect("flip");
    let e = Overlay::open(&ov_dir, base.clone(), Seq(2), 0)
        .err()
        .expect("flipped");
    assert!(one_line(&e).contains("checksum"), "{e}");
    fs::write(ov_dir.join(MAP), &good[..good.len() - 1]).expect("truncate");
    let e = Overlay::open(&ov_dir, base.clone(), Seq(2), 0)
        .err()
        .expect("truncated");
    assert!(one_line(&e).contains("truncated"), "{e}");
    fs::remove_file(ov_dir.join(MAP)).expect("remove map");
    let e = Overlay::open(&ov_dir, base, Seq(2), 0)
        .err()
        .expect("missing");
    assert!(one_line(&e).contains("no map"), "{e}");
}

#[test]
fn a_second_open_create_or_discard_of_an_open_overlay_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let base = memory_base(&base_content(4, 51));
    let ov = Overlay::create(&ov_dir, base.clone(), Seq(1), 0).expect("create");
    let e = Overlay::open(&ov_dir, base.clone(), Seq(1), 0)
        .err()
        .expect("in use");
    assert!(one_line(&e).contains("in use"), "{e}");
    let e = Overlay::discard(&ov_dir).expect_err("in use");
    assert!(one_line(&e).contains("in use"), "{e}");
    let e = Overlay::create(&ov_dir, base.clone(), Seq(1), 0)
        .err()
        .expect("not empty");
    assert!(one_line(&e).contains("not empty"), "{e}");
    drop(ov);
    Overlay::discard(&ov_dir).expect("discard");
    assert!(!ov_dir.exists());
    Overlay::discard(&ov_dir).expect("discarding nothing is success");
    Overlay::create(&ov_dir, base, Seq(2), 0).expect("create again over another point");
}

#[test]
fn materialize_is_the_merged_disk_with_zero_blocks_as_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let blocks = 64;
    let content = base_content(blocks, 61);
    let base = memory_base(&content);
    let ov = Overlay::create(&ov_dir, base, Seq(7), 0).expect("create");
    ov.write_at(&noise(62, 5 * BS + 33), 3 * BS as u64 + 100, false)
        .expect("write");
    ov.trim(16 * BS as u64, 8 * BS as u64, false).expect("trim");
    ov.write_zeroes(40 * BS as u64 + 10, 2 * BS as u64, false, false)
        .expect("zero");
    let model = read_all(&ov);
    let dest = dir.path().join("disk.raw");
    let n = ov.materialize(&dest).expect("materialize");
    let image = fs::read(&dest).expect("read image");
    assert!(
        image == model,
        "materialized image differs from the overlay"
    );
    let nonzero = model
        .chunks(BS)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert!(nonzero < blocks, "the test needs zero blocks");
    assert_eq!(n, (nonzero * BS) as u64);
    let allocated = fs::metadata(&dest).expect("stat").blocks() * 512;
    // Slack of 4 blocks for the file system's own extent blocks (ext4 counts them).
    assert!(
        allocated <= ((nonzero + 4) * BS) as u64,
        "zero blocks were allocated: {allocated} bytes for {nonzero} data blocks"
    );
    assert!(blocks - nonzero > 8, "too few zero blocks to tell");
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    assert!(!Path::new(&partial).exists());
}

/// A base of any size that reads zeros: a 64 GiB disk without 64 GiB of memory.
struct ZeroBase(u64);

impl BlockBackend for ZeroBase {
    fn size_bytes(&self) -> u64 {
        self.0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
}

#[test]
fn creation_over_a_64_gib_disk_copies_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let size = 64u64 << 30;
    let ov = Overlay::create(&ov_dir, Arc::new(ZeroBase(size)), Seq(1), 0).expect("create");
    let allocated = |name: &str| fs::metadata(ov_dir.join(name)).expect("stat").blocks() * 512;
    assert_eq!(fs::metadata(ov_dir.join(DATA)).expect("stat").len(), size);
    assert!(
        allocated(DATA) <= 64 << 10,
        "data: {} bytes",
        allocated(DATA)
    );
    // The map is the bitmap: 2 MiB for 64 GiB, 1/32768 of the disk.
    assert_eq!(
        fs::metadata(ov_dir.join(MAP)).expect("stat").len(),
        64 + (2 << 20) + 32
    );
    assert!(allocated(MAP) <= 3 << 20, "map: {} bytes", allocated(MAP));
    // The far end of the disk works.
    let last = size - BLOCK_BYTES;
    ov.write_at(&noise(71, 100), last + 50, true)
        .expect("write");
    let mut buf = vec![1; BS];
    ov.read_at(&mut buf, last).expect("read");
    assert!(buf[..50].iter().all(|&b| b == 0));
    assert_eq!(buf[50..150], noise(71, 100)[..]);
    assert_eq!(
        ov.written_blocks(),
        vec![last / BLOCK_BYTES..last / BLOCK_BYTES + 1]
    );
}

/// A base whose reads take a while, so that two read-modify-writes of one block would
/// overlap if nothing serialized them.
struct SlowBase(MemoryBackend);

impl BlockBackend for SlowBase {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
}

#[test]
fn concurrent_partial_writes_to_the_same_blocks_both_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let blocks = 64u64;
    let content = base_content(blocks as usize, 81);
    let base: Arc<dyn BlockBackend> = Arc::new(SlowBase(MemoryBackend::read_only(content)));
    let ov = Arc::new(Overlay::create(&ov_dir, base, Seq(1), 0).expect("create"));
    let sectors = BS / 512;
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (ov, barrier) = (ov.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Thread 0 writes even sectors, thread 1 odd ones, of the same unmapped block at
                // the same moment: a read-modify-write each. (Written once: a second pass
                // would rewrite every sector and hide a lost write.)
                for b in 0..blocks {
                    barrier.wait();
                    for s in (t..sectors).step_by(2) {
                        let off = b * BLOCK_BYTES + (s * 512) as u64;
                        ov.write_at(&[(s + 1) as u8; 512], off, false)
                            .expect("write");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let all = read_all(&ov);
    for b in 0..blocks as usize {
        for s in 0..sectors {
            let at = b * BS + s * 512;
            let want = (s + 1) as u8;
            assert!(
                all[at..at + 512].iter().all(|&x| x == want),
                "block {b} sector {s} lost a write"
            );
        }
    }
}
