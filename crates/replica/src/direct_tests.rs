//! End-to-end checks of the direct write path: a first point, journal deltas and a fold
//! written with `O_DIRECT` — and with `O_DIRECT` refused at open or at the first write, as on a
//! file system without it — read back exactly, before and after reopen; and data written
//! directly does not stay in the page cache.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use delta::{Compression, DeltaWriter, DiskEntry};

use crate::direct::test_hook::{refuse_direct, Refusal};
use crate::{ReplicaStore, ReplicaVm};

const KEY: [u8; 32] = [9u8; 32];
const VM: &str = "direct";

/// A VM name for tests (the store takes names validated once, as `VmName`).
fn name(s: &str) -> proto::VmName {
    proto::VmName::parse(s).unwrap()
}

/// The test VM's name.
fn vm_id() -> proto::VmName {
    name(VM)
}
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn disks() -> Vec<DiskEntry> {
    vec![
        DiskEntry {
            index: 0,
            size_bytes: 8 * MIB,
        },
        DiskEntry {
            index: 1,
            size_bytes: 3 * MIB + 8 * KIB,
        },
    ]
}

#[derive(Clone, Copy)]
enum Op {
    Data(u32, u64, u64, u64),
    /// A DATA frame whose bytes are all zero.
    ZeroData(u32, u64, u64),
    Zero(u32, u64, u64),
}

/// Incompressible test bytes, reproducible from `seed` (shared by the crate's test modules).
pub(crate) fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

type Images = BTreeMap<u32, Vec<u8>>;

/// Delta `seq` applying `ops` to `images` (updated), stored raw so that frames are big.
fn delta(seq: u64, images: &mut Images, ops: &[Op]) -> Vec<u8> {
    let header = crate::crash_tests::chain_header(VM, seq, Compression::None, disks());
    let mut w = DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
    for &op in ops {
        let (disk, off, bytes) = match op {
            Op::Data(disk, off, len, seed) => {
                let d = noise(len, seed);
                w.data(disk, off, &d).unwrap();
                (disk, off, d)
            }
            Op::ZeroData(disk, off, len) => {
                w.data(disk, off, &vec![0u8; len as usize]).unwrap();
                (disk, off, vec![0u8; len as usize])
            }
            Op::Zero(disk, off, len) => {
                w.zero(disk, off, len).unwrap();
                (disk, off, vec![0u8; len as usize])
            }
        };
        let img = images.get_mut(&disk).unwrap();
        img[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    }
    w.finish().unwrap().0
}

fn send(vm: &ReplicaVm, bytes: &[u8]) {
    let mut inc = vm.begin_receive().unwrap();
    for chunk in bytes.chunks(256 * 1024 + 17) {
        inc.write_all(chunk).unwrap();
    }
    vm.commit(inc).unwrap();
}

fn assert_point(vm: &ReplicaVm, seq: u64, want: &Images, what: &str) {
    for (&disk, img) in want {
        let mut buf = vec![0u8; img.len()];
        vm.view(proto::Seq(seq), disk)
            .unwrap()
            .read_range(&mut buf, 0)
            .unwrap();
        assert!(buf == *img, "{what}: point {seq} disk {disk} differs");
    }
}

/// Pages of `path` in the page cache (mincore over a read-only mapping).
fn resident_pages(path: &Path) -> usize {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a fresh read-only shared mapping of an open file, only passed to mincore (never
    // dereferenced) and unmapped before return; `vec` has one byte per page of the mapping.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// Whether files in `dir` live outside the page cache once written directly: not on tmpfs
/// (whose files are page cache), and O_DIRECT opens there.
fn direct_bypasses_cache(dir: &Path) -> bool {
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type == libc::TMPFS_MAGIC {
        return false;
    }
    let probe = dir.join("direct-probe");
    std::fs::write(&probe, b"").unwrap();
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    std::fs::remove_file(&probe).unwrap();
    ok
}

/// The first point: big frames (direct), a frame split at the end of a run (12 KiB, buffered),
/// small frames, ZERO frames and an all-zero DATA frame over earlier data.
fn first_ops() -> Vec<Op> {
    vec![
        Op::Data(0, 0, MIB, 1),
        Op::Data(0, 3 * MIB, 2 * MIB + 12 * KIB, 2),
        Op::Zero(0, 3 * MIB + 512 * KIB, 256 * KIB),
        Op::ZeroData(0, 4 * MIB, 128 * KIB),
        Op::Data(1, 12 * KIB, 20 * KIB, 3),
        Op::Data(1, MIB, MIB, 4),
        Op::Data(1, 3 * MIB, 8 * KIB, 5), // the disk's last two blocks
    ]
}

fn later_ops(seq: u64) -> Vec<Op> {
    vec![
        Op::Data(0, (seq % 4) * MIB + 4 * KIB, MIB + 4 * KIB, 10 + seq),
        Op::Data(1, 16 * KIB, 4 * KIB, 20 + seq),
        Op::Zero(0, 3 * MIB, 64 * KIB),
        Op::Data(1, 2 * MIB, 768 * KIB, 30 + seq),
    ]
}

#[test]
fn points_written_directly_or_not_read_back_exactly() {
    for refusal in [Refusal::Never, Refusal::AtOpen, Refusal::AtWrite] {
        let what = format!("{refusal:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store
            .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
            .unwrap();
        let mut images: Images = disks()
            .iter()
            .map(|d| (d.index, vec![0u8; d.size_bytes as usize]))
            .collect();
        let mut points = BTreeMap::new();
        refuse_direct(refusal);
        send(&vm, &delta(1, &mut images, &first_ops()));
        points.insert(1, images.clone());
        if refusal == Refusal::Never && direct_bypasses_cache(dir.path()) {
            // Written directly: only the small frames went through the page cache.
            for d in disks() {
                let base = crate::vm::base_path(&dir.path().join(VM), d.index);
                let pages = resident_pages(&base);
                assert!(pages <= 8, "disk {}: {pages} pages cached", d.index);
            }
        }
        for seq in 2..=4 {
            send(&vm, &delta(seq, &mut images, &later_ops(seq)));
            points.insert(seq, images.clone());
        }
        if refusal == Refusal::Never && direct_bypasses_cache(dir.path()) {
            let journal = dir.path().join(VM).join("journal");
            for e in std::fs::read_dir(&journal).unwrap() {
                let path = e.unwrap().path();
                let pages = resident_pages(&path);
                assert!(pages <= 16, "{}: {pages} pages cached", path.display());
            }
        }
        for (&seq, want) in &points {
            assert_point(&vm, seq, want, &what);
        }
        // Folds 1 and 2 into the base through the same writer.
        vm.retain(2).unwrap();
        refuse_direct(Refusal::Never);
        let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
        assert_eq!(seqs, vec![3, 4], "{what}");
        for seq in [3, 4] {
            assert_point(&vm, seq, &points[&seq], &what);
        }
        drop((vm, store));
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store.vm(&vm_id()).unwrap();
        assert_eq!(vm.damage(), None, "{what}");
        for seq in [3, 4] {
            assert_point(&vm, seq, &points[&seq], &format!("{what}, reopened"));
        }
    }
}
