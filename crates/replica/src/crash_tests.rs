//! Crash simulation: stop a commit or a fold at each of its steps (failure injection on this
//! thread, then the store is dropped without any cleanup, as after kill -9) and reopen. Every
//! point that existed before must read back exactly; the point being committed is either absent
//! or exact; nothing half-done is ever listed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use delta::{Compression, DeltaHeader, DeltaKind, DeltaWriter, DiskEntry};

use crate::{failpoint, ReplicaStore, ReplicaVm};

const KEY: [u8; 32] = [1u8; 32];
const VM: &str = "db";
const BLOCKS: u64 = 32;

fn disks() -> Vec<DiskEntry> {
    vec![
        DiskEntry {
            index: 0,
            size_bytes: BLOCKS * 4096,
        },
        DiskEntry {
            index: 7,
            size_bytes: 8 * 4096,
        },
    ]
}

/// Primary-side model: disk images now and at every accepted point.
struct Model {
    images: BTreeMap<u32, Vec<u8>>,
    points: BTreeMap<u64, BTreeMap<u32, Vec<u8>>>,
}

impl Model {
    fn new() -> Self {
        let images = disks()
            .iter()
            .map(|d| (d.index, vec![0u8; d.size_bytes as usize]))
            .collect();
        Model {
            images,
            points: BTreeMap::new(),
        }
    }

    /// Delta `seq` writing a few blocks (content depends on seq) and zeroing one range.
    fn delta(&self, seq: u64) -> (Vec<u8>, BTreeMap<u32, Vec<u8>>) {
        let header = DeltaHeader {
            vm_id: VM.into(),
            generation: 1,
            seq,
            parent_seq: seq - 1,
            cut_time_unix_ns: seq,
            kind: if seq == 1 {
                DeltaKind::Initial
            } else {
                DeltaKind::Incremental
            },
            compression: Compression::Zstd,
            disks: disks(),
        };
        let mut images = self.images.clone();
        let mut w = DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
        let start = (seq * 5) % (BLOCKS - 8);
        let data: Vec<u8> = (0..8 * 4096u64)
            .map(|i| (i / 97 + seq * 31) as u8)
            .collect();
        w.data(0, start * 4096, &data).unwrap();
        images.get_mut(&0).unwrap()[(start * 4096) as usize..((start + 8) * 4096) as usize]
            .copy_from_slice(&data);
        let z = (seq * 3) % 8;
        w.zero(7, z * 4096, 4096).unwrap();
        images.get_mut(&7).unwrap()[(z * 4096) as usize..((z + 1) * 4096) as usize].fill(0);
        let d7: Vec<u8> = vec![seq as u8; 4096];
        let b = (seq * 5 + 1) % 8;
        w.data(7, b * 4096, &d7).unwrap();
        images.get_mut(&7).unwrap()[(b * 4096) as usize..((b + 1) * 4096) as usize]
            .copy_from_slice(&d7);
        (w.finish().unwrap().0, images)
    }

    fn commit(&mut self, vm: &ReplicaVm, seq: u64) {
        let (bytes, images) = self.delta(seq);
        send(vm, &bytes).unwrap();
        self.images = images.clone();
        self.points.insert(seq, images);
    }
}

fn send(vm: &ReplicaVm, bytes: &[u8]) -> Result<crate::PointInfo, crate::ReplicaError> {
    let mut inc = vm.begin_receive()?;
    inc.write_all(bytes)
        .map_err(|e| crate::ReplicaError::ReceiveFailed(e.to_string()))?;
    vm.commit(inc)
}

fn check(dir: &Path, model: &Model, must_have: &[u64]) -> Vec<u64> {
    let store = ReplicaStore::open(dir).unwrap();
    let vm = store.vm(VM).unwrap();
    assert_eq!(vm.damage(), None);
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq).collect();
    for s in must_have {
        assert!(seqs.contains(s), "point {s} lost; points now {seqs:?}");
    }
    for &s in &seqs {
        let want = model
            .points
            .get(&s)
            .unwrap_or_else(|| panic!("unknown point {s} listed"));
        for (&disk, img) in want {
            let view = vm.view(s, disk).unwrap();
            let mut buf = vec![0u8; img.len()];
            view.read_range(&mut buf, 0).unwrap();
            assert!(buf == *img, "point {s} disk {disk} differs after reopen");
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.join(VM).join("incoming"))
            .unwrap()
            .count(),
        0
    );
    seqs
}

fn setup(points: u64) -> (tempfile::TempDir, ReplicaStore, Model) {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.create_vm(VM, 1, &disks(), KEY).unwrap();
    let mut model = Model::new();
    for seq in 1..=points {
        model.commit(&vm, seq);
    }
    (dir, store, model)
}

#[test]
fn crash_at_each_commit_step_keeps_earlier_points() {
    let steps = [
        ("commit.before_fsync", false),
        ("commit.before_rename", false),
        ("commit.after_rename", true),
    ];
    for (step, survives) in steps {
        let (dir, store, mut model) = setup(2);
        let vm = store.vm(VM).unwrap();
        let (bytes, images) = model.delta(3);
        failpoint::arm(step);
        let r = send(&vm, &bytes);
        assert!(
            matches!(r, Err(crate::ReplicaError::Injected(s)) if s == step),
            "{step}: {r:?}"
        );
        model.points.insert(3, images);
        drop(vm);
        drop(store); // kill -9: no cleanup runs that open would not redo
        let seqs = check(dir.path(), &model, &[1, 2]);
        assert_eq!(seqs.contains(&3), survives, "{step}: points {seqs:?}");
    }
}

#[test]
fn crash_at_each_fold_step_keeps_remaining_points() {
    for step in [
        "fold.after_intent",
        "fold.mid_apply",
        "fold.after_apply",
        "fold.after_manifest",
    ] {
        let (dir, store, model) = setup(4);
        let vm = store.vm(VM).unwrap();
        assert_eq!(vm.points().len(), 4);
        failpoint::arm(step);
        let r = vm.retain(2);
        assert!(
            matches!(r, Err(crate::ReplicaError::Injected(s)) if s == step),
            "{step}: {r:?}"
        );
        drop(vm);
        drop(store);
        // Point 1 was being retired; 2..4 must be intact, and the fold completes at open.
        let seqs = check(dir.path(), &model, &[2, 3, 4]);
        assert_eq!(seqs, vec![2, 3, 4], "{step}");
        let manifest = crate::manifest::Manifest::load(&dir.path().join(VM)).unwrap();
        assert_eq!((manifest.base_seq, manifest.folding), (2, None), "{step}");
        // Retention continues normally afterwards.
        let store = ReplicaStore::open(dir.path()).unwrap();
        store.vm(VM).unwrap().retain(2).unwrap();
        drop(store);
        assert_eq!(check(dir.path(), &model, &[3, 4]), vec![3, 4], "{step}");
    }
}

#[test]
fn crash_while_folding_the_initial_point_into_the_base() {
    for step in [
        "fold.after_intent",
        "fold.mid_apply",
        "fold.after_apply",
        "fold.after_manifest",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store.create_vm(VM, 1, &disks(), KEY).unwrap();
        let mut model = Model::new();
        failpoint::arm(step);
        // The commit itself succeeded (the point is durable); only the fold stopped.
        model.commit(&vm, 1);
        drop(vm);
        drop(store);
        assert_eq!(check(dir.path(), &model, &[1]), vec![1], "{step}");
        let store = ReplicaStore::open(dir.path()).unwrap();
        model.commit(&store.vm(VM).unwrap(), 2);
        drop(store);
        assert_eq!(check(dir.path(), &model, &[1, 2]), vec![1, 2], "{step}");
    }
}

#[test]
fn crash_while_receiving_leaves_no_partial_and_no_point() {
    let (dir, store, model) = setup(1);
    let vm = store.vm(VM).unwrap();
    let (bytes, _) = model.delta(2);
    let mut inc = vm.begin_receive().unwrap();
    inc.write_all(&bytes[..bytes.len() / 2]).unwrap();
    inc.flush().unwrap();
    std::mem::forget(inc); // the process dies: no destructor deletes the partial file
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1]), vec![1]);
}
