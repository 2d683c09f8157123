//! Adopting raw disk images as a replica VM's base (reverse replication after a planned
//! failover): the VM reads back the images exactly, holes stay holes, the next incremental
//! delta commits on top, refusals change nothing, a retry is idempotent, and images on another
//! file system are copied (for real: from tmpfs).

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{disks, read_point, send, vm_id, Model, Op, BLOCK, KEY};
use delta::{Compression, DeltaKind, DiskEntry};
use proto::{Generation, Seq};
use replica::{AdoptedBase, ReplicaError, ReplicaStore};

/// The point the images hold (the new primary started from it) and the lineage's generation.
const S: u64 = 5;
const GEN: u64 = 2;
const CUT: u64 = 5_000_000_000;

fn base() -> AdoptedBase {
    AdoptedBase {
        seq: Seq(S),
        cut_time_unix_ns: CUT,
        damage: None,
    }
}

/// Raw images of `disks()` in `dir`: per 4 KiB block, a hole (never written), noise, or (rarely)
/// explicit zeros. Returns the paths, the images' bytes, and which blocks were never written.
struct Images {
    paths: Vec<(u32, PathBuf)>,
    bytes: BTreeMap<u32, Vec<u8>>,
    holes: BTreeMap<u32, Vec<bool>>,
}

fn write_images(dir: &Path, seed: u64) -> Images {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Images {
        paths: Vec::new(),
        bytes: BTreeMap::new(),
        holes: BTreeMap::new(),
    };
    for d in disks() {
        let path = dir.join(format!("disk{}.img", d.index));
        let f = File::create(&path).unwrap();
        f.set_len(d.size_bytes).unwrap();
        let blocks = (d.size_bytes / BLOCK) as usize;
        let mut bytes = vec![0u8; d.size_bytes as usize];
        let mut holes = vec![true; blocks];
        // A hole at each end whatever the draw (the first and last blocks stay unwritten).
        for (b, hole) in holes.iter_mut().enumerate().take(blocks - 1).skip(1) {
            let block = &mut bytes[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            match next() % 5 {
                0 | 1 => continue, // a hole
                2 => {}            // explicit zeros: allocated in the image
                _ => block.iter_mut().for_each(|v| *v = next() as u8 | 1),
            }
            *hole = false;
            f.write_all_at(block, (b as u64) * BLOCK).unwrap();
        }
        f.sync_all().unwrap();
        out.paths.push((d.index, path));
        out.bytes.insert(d.index, bytes);
        out.holes.insert(d.index, holes);
    }
    out
}

fn base_image(store_dir: &Path, disk: u32) -> PathBuf {
    store_dir
        .join(common::VM)
        .join("base")
        .join(format!("disk-{disk}.raw"))
}

/// Every block the caller never wrote is a hole in the base image, and the base allocates
/// no more than what was written (plus the file system's own metadata blocks).
fn assert_holes_stay_holes(store_dir: &Path, images: &Images) {
    for (disk, holes) in &images.holes {
        let path = base_image(store_dir, *disk);
        let f = File::open(&path).unwrap();
        for (b, hole) in holes.iter().enumerate() {
            if !hole {
                continue;
            }
            let off = b as u64 * BLOCK;
            let data = sysutil::seek_data(&f, off).unwrap();
            assert!(
                data.map_or(true, |d| d >= off + BLOCK),
                "disk {disk} block {b} was a hole in the image and is data in the base"
            );
        }
        let written = holes.iter().filter(|h| !**h).count() as u64 * BLOCK;
        let allocated = f.metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= written + 16 * BLOCK,
            "disk {disk}: base allocates {allocated} bytes, the image had {written} written"
        );
    }
}

fn assert_images_intact(images: &Images) {
    for (disk, path) in &images.paths {
        let bytes = fs::read(path).unwrap();
        assert!(bytes == images.bytes[disk], "image of disk {disk} changed");
    }
}

fn adopt(store: &ReplicaStore, images: &Images) -> Result<(), ReplicaError> {
    store
        .adopt_vm(
            &vm_id(),
            Generation(GEN),
            &disks(),
            KEY,
            &images.paths,
            base(),
        )
        .map(|_| ())
}

/// Adopts images written in `image_dir`; checks the VM has exactly point S reading the images
/// byte for byte, holes stay holes, and an incremental delta S+1 commits on top and reads the
/// merged content (also after a reopen, and after retention folds S into the base).
fn adopt_then_increment(store_dir: &Path, image_dir: &Path) -> Images {
    let images = write_images(image_dir, 7);
    let store = ReplicaStore::open(store_dir).unwrap();
    let vm = store
        .adopt_vm(
            &vm_id(),
            Generation(GEN),
            &disks(),
            KEY,
            &images.paths,
            base(),
        )
        .unwrap();
    assert_eq!(vm.latest_seq(), Seq(S));
    let points = vm.points();
    assert_eq!(points.len(), 1, "{points:?}");
    assert_eq!(points[0].seq, Seq(S));
    assert_eq!(points[0].cut_time_unix_ns, CUT);
    assert_eq!(points[0].kind, DeltaKind::Initial);
    for (disk, bytes) in &images.bytes {
        assert!(
            read_point(&vm, S, *disk) == *bytes,
            "adopted disk {disk} differs from its image"
        );
    }
    assert_holes_stay_holes(store_dir, &images);

    // The first delta the adopted VM takes is an ordinary incremental on top, into the journal.
    let mut model = Model::new();
    model.images = images.bytes.clone();
    model.latest = S;
    model.generation = GEN;
    model.points.insert(S, images.bytes.clone());
    let ops = [
        Op::Data {
            disk: 0,
            block: 3,
            blocks: 5,
            seed: 200,
        },
        Op::Zero {
            disk: 1,
            block: 4,
            blocks: 3,
        },
        Op::Data {
            disk: 1,
            block: 30,
            blocks: 2,
            seed: 9,
        },
    ];
    let (bytes, after) = model.delta(DeltaKind::Incremental, Compression::Zstd, &ops);
    let p = send(&vm, &bytes).unwrap();
    assert_eq!(p.seq, Seq(S + 1));
    model.accept(after);
    assert!(store_dir
        .join(common::VM)
        .join("journal")
        .join(format!("{:020}.delta", S + 1))
        .is_file());
    common::assert_points_match(&vm, &model);
    drop(vm);
    drop(store);

    let store = ReplicaStore::open(store_dir).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(seqs, vec![S, S + 1]);
    common::assert_points_match(&vm, &model);
    // Retention folds the adopted point away like any base point.
    vm.retain(1).unwrap();
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(seqs, vec![S + 1]);
    common::assert_points_match(&vm, &model);
    images
}

#[test]
fn adopted_images_on_the_store_file_system_are_linked_and_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let image_dir = dir.path().join("images");
    fs::create_dir(&image_dir).unwrap();
    let images = write_images(&image_dir, 7);
    let store = ReplicaStore::open(&store_dir).unwrap();
    adopt(&store, &images).unwrap();
    for (disk, path) in &images.paths {
        let img = fs::metadata(path).unwrap();
        let base = fs::metadata(base_image(&store_dir, *disk)).unwrap();
        assert_eq!(
            (img.dev(), img.ino()),
            (base.dev(), base.ino()),
            "disk {disk}: not linked"
        );
        assert_eq!(base.mode() & 0o777, 0o600);
    }
    drop(store);
    fs::remove_dir_all(&store_dir).unwrap();
    // The whole story, with the images the caller then removes.
    let images = adopt_then_increment(&store_dir, &image_dir);
    for (_, path) in &images.paths {
        fs::remove_file(path).unwrap();
    }
    let store = ReplicaStore::open(&store_dir).unwrap();
    assert_eq!(store.vm(&vm_id()).unwrap().latest_seq(), Seq(S + 1));
}

#[test]
fn adopted_images_on_another_file_system_are_copied_sparse_and_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    // /dev/shm is a tmpfs on Linux: another file system than the test's temporary directory.
    let image_dir = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let shm = fs::metadata(image_dir.path()).unwrap().dev();
    let tmp = fs::metadata(dir.path()).unwrap().dev();
    assert_ne!(
        shm, tmp,
        "/dev/shm and the temporary directory are one file system: the copy path would not run"
    );
    let images = adopt_then_increment(&store_dir, image_dir.path());
    for (disk, path) in &images.paths {
        let img = fs::metadata(path).unwrap();
        assert_eq!(
            img.nlink(),
            1,
            "disk {disk}: the image was linked, not copied"
        );
    }
    // The caller's images were only read.
    assert_images_intact(&images);
}

#[test]
fn a_refused_adoption_changes_nothing_and_leaves_the_images_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let image_dir = dir.path().join("images");
    fs::create_dir(&image_dir).unwrap();
    let images = write_images(&image_dir, 11);
    let store = ReplicaStore::open(&store_dir).unwrap();
    let listing = |d: &Path| {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&store_dir);
    let try_adopt = |paths: &[(u32, PathBuf)], disks: &[DiskEntry], seq: u64| {
        store
            .adopt_vm(
                &vm_id(),
                Generation(GEN),
                disks,
                KEY,
                paths,
                AdoptedBase {
                    seq: Seq(seq),
                    cut_time_unix_ns: CUT,
                    damage: None,
                },
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let mut cases: Vec<(&str, String)> = Vec::new();
    // An image whose size differs from its disk's.
    let mut bigger = disks();
    bigger[1].size_bytes += BLOCK;
    cases.push(("is 131072 bytes", try_adopt(&images.paths, &bigger, S)));
    // A missing image file.
    let mut missing = images.paths.clone();
    missing[1].1 = image_dir.join("nope.img");
    cases.push(("nope.img", try_adopt(&missing, &disks(), S)));
    // A disk without an image.
    cases.push((
        "no image for disk 1",
        try_adopt(&images.paths[..1], &disks(), S),
    ));
    // An image for a disk the table does not have, and one disk twice.
    let mut extra = images.paths.clone();
    extra.push((9, images.paths[0].1.clone()));
    cases.push(("disk 9", try_adopt(&extra, &disks(), S)));
    let mut twice = images.paths.clone();
    twice.push(twice[0].clone());
    cases.push(("two images for disk 0", try_adopt(&twice, &disks(), S)));
    // A symlink is no image (a link would link the symlink).
    let sym = image_dir.join("sym.img");
    std::os::unix::fs::symlink(&images.paths[0].1, &sym).unwrap();
    let mut via_sym = images.paths.clone();
    via_sym[0].1 = sym;
    cases.push(("not a regular file", try_adopt(&via_sym, &disks(), S)));
    // Point 0 is no point.
    cases.push(("point 0", try_adopt(&images.paths, &disks(), 0)));
    for (want, got) in &cases {
        assert!(got.contains(want), "want {want:?} in {got:?}");
        assert!(!got.contains('\n'), "not one line: {got:?}");
        assert_eq!(listing(&store_dir), before, "{got}");
    }
    assert!(store.vm(&vm_id()).is_none());

    // A VM of that name that exists differently: refused, the VM and the images untouched.
    let other = store
        .create_vm(&vm_id(), Generation(GEN), &disks(), [9u8; 32])
        .unwrap();
    let err = adopt(&store, &images).unwrap_err();
    assert!(matches!(err, ReplicaError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(other.latest_seq(), Seq(0));
    for (disk, path) in &images.paths {
        assert_eq!(fs::metadata(path).unwrap().nlink(), 1, "disk {disk}");
        let base = fs::metadata(base_image(&store_dir, *disk)).unwrap();
        assert_ne!(base.ino(), fs::metadata(path).unwrap().ino());
    }
    assert_images_intact(&images);
    drop(other);
    drop(store);
    let store = ReplicaStore::open(&store_dir).unwrap();
    assert_eq!(store.vm(&vm_id()).unwrap().latest_seq(), Seq(0));
}

#[test]
fn adopt_retry_after_a_lost_answer_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let image_dir = dir.path().join("images");
    fs::create_dir(&image_dir).unwrap();
    let images = write_images(&image_dir, 13);
    let store = ReplicaStore::open(&store_dir).unwrap();
    adopt(&store, &images).unwrap();
    // The answer was lost: the caller asks again, with the same images.
    let vm = store
        .adopt_vm(
            &vm_id(),
            Generation(GEN),
            &disks(),
            KEY,
            &images.paths,
            base(),
        )
        .unwrap();
    assert_eq!(vm.points().len(), 1);
    // The caller removed its names after the first success and asks once more: still Ok.
    for (_, path) in &images.paths {
        fs::remove_file(path).unwrap();
    }
    let vm = store
        .adopt_vm(
            &vm_id(),
            Generation(GEN),
            &disks(),
            KEY,
            &images.paths,
            base(),
        )
        .unwrap();
    for (disk, bytes) in &images.bytes {
        assert!(read_point(&vm, S, *disk) == *bytes, "disk {disk}");
    }
    // Not the same request: another point, cut time, generation or key is refused.
    for (seq, cut, generation, key) in [
        (S + 1, CUT, GEN, KEY),
        (S, CUT + 1, GEN, KEY),
        (S, CUT, GEN + 1, KEY),
        (S, CUT, GEN, [4u8; 32]),
    ] {
        let err = store
            .adopt_vm(
                &vm_id(),
                Generation(generation),
                &disks(),
                key,
                &images.paths,
                AdoptedBase {
                    seq: Seq(seq),
                    cut_time_unix_ns: cut,
                    damage: None,
                },
            )
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, ReplicaError::AlreadyExists { .. }), "{err:?}");
    }
    // Also across a restart (the VM found at open).
    drop(vm);
    drop(store);
    let store = ReplicaStore::open(&store_dir).unwrap();
    let vm = store
        .adopt_vm(
            &vm_id(),
            Generation(GEN),
            &disks(),
            KEY,
            &images.paths,
            base(),
        )
        .unwrap();
    assert_eq!(vm.latest_seq(), Seq(S));
}
