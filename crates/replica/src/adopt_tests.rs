//! Crash simulation of an adoption (`ReplicaStore::adopt_vm`): stop it at each step (failure
//! injection on this thread; the store is then dropped without cleanup, as after kill -9) and
//! reopen. Either there is no VM and the caller's images are intact (and a retry succeeds), or
//! the adopted VM is complete. Also: a refused link falls back to a copy.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use delta::DiskEntry;
use proto::{Generation, Seq};

use crate::{failpoint, AdoptedBase, ReplicaStore};

const KEY: [u8; 32] = [5u8; 32];
const VM: &str = "app";
const S: u64 = 9;

fn vm_id() -> proto::VmName {
    proto::VmName::parse(VM).unwrap()
}

fn disks() -> Vec<DiskEntry> {
    vec![
        DiskEntry {
            index: 0,
            size_bytes: 48 * 4096,
        },
        DiskEntry {
            index: 3,
            size_bytes: 16 * 4096,
        },
    ]
}

fn base() -> AdoptedBase {
    AdoptedBase {
        seq: Seq(S),
        cut_time_unix_ns: 77,
        damage: None,
    }
}

/// Each disk's bytes.
type Bytes = BTreeMap<u32, Vec<u8>>;

/// Images with data in every other 8-block run (holes between), in `dir`.
fn write_images(dir: &Path) -> (Vec<(u32, PathBuf)>, Bytes) {
    let mut paths = Vec::new();
    let mut bytes = BTreeMap::new();
    for d in disks() {
        let path = dir.join(format!("d{}.img", d.index));
        let f = fs::File::create(&path).unwrap();
        f.set_len(d.size_bytes).unwrap();
        let mut img = vec![0u8; d.size_bytes as usize];
        for (i, run) in img.chunks_mut(8 * 4096).enumerate() {
            if i % 2 == 1 {
                for (j, b) in run.iter_mut().enumerate() {
                    *b = (j / 13 + i + d.index as usize) as u8 | 1;
                }
                f.write_all_at(run, (i * 8 * 4096) as u64).unwrap();
            }
        }
        f.sync_all().unwrap();
        paths.push((d.index, path));
        bytes.insert(d.index, img);
    }
    (paths, bytes)
}

fn adopt(store: &ReplicaStore, paths: &[(u32, PathBuf)]) -> Result<(), crate::ReplicaError> {
    store
        .adopt_vm(&vm_id(), Generation(1), &disks(), KEY, paths, base())
        .map(|_| ())
}

/// The reopened store has the complete adopted VM: point S only, reading the images.
fn assert_adopted(store: &ReplicaStore, bytes: &Bytes) {
    let vm = store.vm(&vm_id()).expect("the adopted VM");
    assert_eq!(vm.damage(), None);
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(seqs, vec![S]);
    for (&disk, img) in bytes {
        let view = vm.view(Seq(S), disk).unwrap();
        let mut buf = vec![0u8; img.len()];
        view.read_range(&mut buf, 0).unwrap();
        assert!(buf == *img, "disk {disk} differs from its image");
    }
}

fn assert_images_intact(paths: &[(u32, PathBuf)], bytes: &Bytes) {
    for (disk, path) in paths {
        assert!(
            fs::read(path).unwrap() == bytes[disk],
            "image {disk} changed"
        );
    }
}

/// Runs one crash at `step`, with the images in `image_dir`, and checks the outcome.
fn crash_at(step: &'static str, image_dir: &Path, survives: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (paths, bytes) = write_images(image_dir);
    let store = ReplicaStore::open(dir.path()).unwrap();
    failpoint::arm(step);
    let r = adopt(&store, &paths);
    assert!(
        matches!(r, Err(crate::ReplicaError::Injected(s)) if s == step),
        "{step}: {r:?}"
    );
    drop(store); // kill -9: nothing runs that open would not redo
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.broken().is_empty(), "{step}: {:?}", store.broken());
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".creating")),
        "{step}: {names:?}"
    );
    assert_images_intact(&paths, &bytes);
    if survives {
        assert_adopted(&store, &bytes);
    } else {
        assert!(store.vm(&vm_id()).is_none(), "{step}: a VM appeared");
        // Nothing of the attempt holds the images (a link in `.creating` was removed).
        for (disk, path) in &paths {
            assert_eq!(
                fs::metadata(path).unwrap().nlink(),
                1,
                "{step}: disk {disk}"
            );
        }
        // The caller retries and succeeds.
        adopt(&store, &paths).unwrap();
        assert_adopted(&store, &bytes);
    }
    // Either way the adopted VM survives another restart.
    drop(store);
    assert_adopted(&ReplicaStore::open(dir.path()).unwrap(), &bytes);
    for (_, path) in &paths {
        fs::remove_file(path).unwrap();
    }
}

#[test]
fn a_crash_at_each_adoption_step_leaves_no_vm_and_the_images_or_the_whole_vm() {
    let images = tempfile::tempdir().unwrap();
    for (step, survives) in [
        ("adopt.after_image", false),
        ("write_atomic.before_rename", false),
        ("adopt.before_rename", false),
        ("adopt.after_rename", true),
    ] {
        crash_at(step, images.path(), survives);
    }
}

#[test]
fn a_crash_while_copying_from_another_file_system_leaves_no_vm_and_the_images() {
    let images = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    crash_at("adopt.mid_copy", images.path(), false);
}

/// A link refused for crossing file systems (`EXDEV`, injected here on one file system) is a
/// sparse copy instead: another inode, the same bytes.
#[test]
fn a_refused_link_falls_back_to_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let (paths, bytes) = write_images(images.path());
    let store = ReplicaStore::open(dir.path()).unwrap();
    failpoint::arm("adopt.link");
    adopt(&store, &paths).unwrap();
    assert_adopted(&store, &bytes);
    let base0 = dir.path().join(VM).join("base").join("disk-0.raw");
    assert_ne!(
        fs::metadata(&base0).unwrap().ino(),
        fs::metadata(&paths[0].1).unwrap().ino(),
        "disk 0 was linked although the link was refused"
    );
    // Disk 3 was linked (the failpoint fires once).
    let base3 = dir.path().join(VM).join("base").join("disk-3.raw");
    assert_eq!(
        fs::metadata(&base3).unwrap().ino(),
        fs::metadata(&paths[1].1).unwrap().ino()
    );
    assert_images_intact(&paths, &bytes);
}

/// A copy that fails for a full disk (an I/O error, no crash) removes what it wrote (a partial
/// copy must not hold space until a restart): no `.creating` directory, no VM, the images
/// intact, and a retry succeeds.
#[test]
fn a_copy_failing_for_a_full_disk_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let (paths, bytes) = write_images(images.path());
    let store = ReplicaStore::open(dir.path()).unwrap();
    failpoint::arm("adopt.write");
    let err = adopt(&store, &paths).unwrap_err();
    assert!(
        matches!(&err, crate::ReplicaError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err:?}"
    );
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["understudy-store.json".to_string()]);
    assert!(store.vm(&vm_id()).is_none());
    assert_images_intact(&paths, &bytes);
    adopt(&store, &paths).unwrap();
    assert_adopted(&store, &bytes);
}

/// An adoption that fails after its rename (the VM is on disk; here the open is stopped) is
/// not lost: the VM is pending, a retry is refused as transient (`Verifying`), and once the
/// store opens it the retry is answered by the idempotent rule.
#[test]
fn an_adoption_failing_after_its_rename_is_opened_later_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let (paths, bytes) = write_images(images.path());
    let store = ReplicaStore::open(dir.path()).unwrap();
    failpoint::arm("adopt.after_rename");
    assert!(adopt(&store, &paths).is_err());
    assert!(store.is_pending(&vm_id()));
    let err = adopt(&store, &paths).unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(store.open_pending(), 0);
    adopt(&store, &paths).unwrap();
    assert_adopted(&store, &bytes);
}
