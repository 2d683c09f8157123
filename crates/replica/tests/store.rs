//! Replica store behaviour a user (the daemon) sees: points read back exactly the model image,
//! bad deltas are refused by name with nothing changed, retention keeps remaining points
//! byte-identical, damage is detected at reopen, export produces sparse files.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use common::*;
use delta::{Compression, DeltaKind, DeltaReader};
use proptest::prelude::*;
use replica::{ReplicaError, ReplicaStore};

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..2, 0u64..64, 1u64..20, any::<u8>())
            .prop_map(|(disk, block, blocks, seed)| Op::Data { disk, block, blocks, seed }),
        1 => (0u32..2, 0u64..64, 1u64..20).prop_map(|(disk, block, blocks)| Op::Zero { disk, block, blocks }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Commit a random sequence of deltas, then: every point reads back the model image at that
    /// point; after retention the remaining points are unchanged; after reopen too.
    #[test]
    fn points_read_back_the_model(
        deltas in prop::collection::vec((prop::collection::vec(op(), 0..8), any::<bool>()), 1..6),
        keep in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store.create_vm(&vm_id(), delta::Generation(1), &disks(), KEY).unwrap();
        let mut model = Model::new();
        for (i, (ops, zstd)) in deltas.iter().enumerate() {
            let kind = if i == 0 { DeltaKind::Initial } else { DeltaKind::Incremental };
            let compression = if *zstd { Compression::Zstd } else { Compression::None };
            let (bytes, images) = model.delta(kind, compression, ops);
            let info = send(&vm, &bytes).unwrap();
            model.accept(images);
            prop_assert_eq!(info.seq.get(), model.latest);
            prop_assert_eq!(vm.latest_seq().get(), model.latest);
        }
        prop_assert_eq!(vm.points().len(), deltas.len());
        assert_points_match(&vm, &model);
        vm.retain(keep).unwrap();
        prop_assert_eq!(vm.points().len(), keep.min(deltas.len()));
        prop_assert_eq!(vm.points().last().unwrap().seq.get(), model.latest);
        assert_points_match(&vm, &model);
        drop((vm, store));
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store.vm(&vm_id()).unwrap();
        prop_assert_eq!(vm.damage(), None);
        prop_assert_eq!(vm.points().len(), keep.min(deltas.len()));
        assert_points_match(&vm, &model);
    }
}

fn store_with_points(n: u64) -> (tempfile::TempDir, ReplicaStore, Model) {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .unwrap();
    let mut model = Model::new();
    for i in 0..n {
        let kind = if i == 0 {
            DeltaKind::Initial
        } else {
            DeltaKind::Incremental
        };
        let ops = [
            Op::Data {
                disk: 0,
                block: i * 3,
                blocks: 5,
                seed: (i * 50) as u8,
            },
            Op::Data {
                disk: 1,
                block: i,
                blocks: 2,
                seed: 200,
            },
        ];
        let (bytes, images) = model.delta(kind, Compression::Zstd, &ops);
        send(&vm, &bytes).unwrap();
        model.accept(images);
    }
    (dir, store, model)
}

#[test]
fn out_of_sequence_duplicate_and_foreign_deltas_are_refused_and_change_nothing() {
    let (_dir, store, model) = store_with_points(2);
    let vm = store.vm(&vm_id()).unwrap();
    let before = vm.points();
    let ops = [Op::Data {
        disk: 0,
        block: 0,
        blocks: 4,
        seed: 9,
    }];
    let inc = DeltaKind::Incremental;

    let (skip, _) = model.delta_with(4, 3, 1, inc, Compression::None, &ops, &KEY);
    assert!(matches!(
        send(&vm, &skip),
        Err(ReplicaError::OutOfSequence {
            expected: 3,
            got: 4
        })
    ));
    let (dup, _) = model.delta_with(2, 1, 1, inc, Compression::None, &ops, &KEY);
    assert!(matches!(
        send(&vm, &dup),
        Err(ReplicaError::OutOfSequence {
            expected: 3,
            got: 2
        })
    ));
    let (gen, _) = model.delta_with(3, 2, 2, inc, Compression::None, &ops, &KEY);
    assert!(matches!(
        send(&vm, &gen),
        Err(ReplicaError::WrongGeneration {
            expected: 1,
            got: 2
        })
    ));
    let (foreign, _) = model.delta_with(3, 2, 1, inc, Compression::None, &ops, &[4u8; 32]);
    assert!(matches!(
        send(&vm, &foreign),
        Err(ReplicaError::Delta(delta::DeltaError::HeaderChecksum))
    ));
    let (good, _) = model.delta(inc, Compression::None, &ops);
    let truncated = &good[..good.len() - 1];
    assert!(matches!(
        send(&vm, truncated),
        Err(ReplicaError::Incomplete { .. })
    ));
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    assert!(matches!(send(&vm, &flipped), Err(ReplicaError::Delta(_))));

    assert_eq!(vm.points(), before);
    assert_eq!(vm.latest_seq().get(), 2);
    assert_points_match(&vm, &model);
    let incoming = std::fs::read_dir(_dir.path().join(VM).join("incoming"))
        .unwrap()
        .count();
    assert_eq!(incoming, 0, "refused deltas must not leave partial files");
    // The right delta still commits afterwards.
    assert_eq!(send(&vm, &good).unwrap().seq.get(), 3);
}

#[test]
fn generation_raised_after_failover_is_enforced() {
    let (_dir, store, mut model) = store_with_points(1);
    let vm = store.vm(&vm_id()).unwrap();
    vm.set_generation(delta::Generation(2)).unwrap();
    assert!(matches!(
        vm.set_generation(delta::Generation(1)),
        Err(ReplicaError::GenerationRegression { .. })
    ));
    let ops = [Op::Zero {
        disk: 0,
        block: 0,
        blocks: 1,
    }];
    let (old, _) = model.delta(DeltaKind::Incremental, Compression::None, &ops);
    assert!(matches!(
        send(&vm, &old),
        Err(ReplicaError::WrongGeneration {
            expected: 2,
            got: 1
        })
    ));
    model.generation = 2;
    let (new, images) = model.delta(DeltaKind::Incremental, Compression::None, &ops);
    send(&vm, &new).unwrap();
    model.accept(images);
    drop(vm);
    drop(store);
    let store = ReplicaStore::open(_dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert_eq!(vm.generation().get(), 2);
    assert_points_match(&vm, &model);
}

#[test]
fn corrupted_journal_file_is_reported_at_reopen_and_never_served() {
    let (dir, store, model) = store_with_points(4);
    let vm = store.vm(&vm_id()).unwrap();
    assert_eq!(vm.points().len(), 4);
    drop(vm);
    drop(store);
    // Point 1 is in the base; edit one byte into the middle of journal seq 3.
    let path = dir
        .path()
        .join(VM)
        .join("journal")
        .join(format!("{:020}.delta", 3));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    let damage = vm.damage().expect("damage must be reported");
    assert!(damage.contains("00000000000000000003.delta"), "{damage}");
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(
        seqs,
        vec![1, 2],
        "points depending on the damaged delta must not be served"
    );
    assert_points_match(&vm, &model);
    assert!(matches!(
        vm.point_disk(delta::Seq(3), 0),
        Err(ReplicaError::NoSuchPoint { seq: 3 })
    ));
    assert!(dir
        .path()
        .join(VM)
        .join("quarantine")
        .join(format!("{:020}.delta", 3))
        .exists());
    drop(vm);
    drop(store);
    // Damage survives a restart (the quarantined file is no longer in the journal).
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.vm(&vm_id()).unwrap().damage().is_some());
}

#[test]
fn a_full_delta_after_damage_clears_it() {
    let (dir, store, mut model) = store_with_points(3);
    drop(store);
    let path = dir
        .path()
        .join(VM)
        .join("journal")
        .join(format!("{:020}.delta", 3));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert!(vm.damage().is_some());
    assert_eq!(vm.latest_seq().get(), 2);
    model.points.remove(&3);
    model.latest = 2;
    model.images = model.points[&2].clone();
    let ops = [
        Op::Data {
            disk: 0,
            block: 0,
            blocks: 64,
            seed: 77,
        },
        Op::Data {
            disk: 1,
            block: 0,
            blocks: 32,
            seed: 78,
        },
    ];
    let (full, images) = model.delta(DeltaKind::Full, Compression::Zstd, &ops);
    send(&vm, &full).unwrap();
    model.accept(images);
    assert_eq!(vm.damage(), None);
    assert_points_match(&vm, &model);
}

/// Review finding (issue 11): a compared Full delta holds only the blocks that differed when
/// its compare read the copy. It cleared any damage, also damage found after the compare, which
/// may lie under blocks it did not send: the damage vanished with the bad bytes still served.
#[test]
fn a_compared_full_cannot_clear_damage_found_after_its_compare() {
    let (dir, store, mut model) = store_with_points(3);
    drop(store);
    let path = dir
        .path()
        .join(VM)
        .join("journal")
        .join(format!("{:020}.delta", 3));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert!(vm.damage().is_some());
    model.points.remove(&3);
    model.latest = 2;
    model.images = model.points[&2].clone();
    model.compared_full = true;
    let ops = [Op::Data {
        disk: 0,
        block: 3,
        blocks: 2,
        seed: 91,
    }];
    // No compare began in this process (the damage was found at this open): refused, named.
    let (full, _) = model.delta(DeltaKind::Full, Compression::Zstd, &ops);
    let err = send(&vm, &full).unwrap_err().to_string();
    assert!(
        err.contains("found after the resynchronization compared"),
        "{err}"
    );
    assert!(vm.damage().is_some());
    assert_eq!(vm.latest_seq().get(), 2);
    // A compare that began with this damage known: its compared Full clears it.
    vm.note_compare(2);
    let (full, images) = model.delta(DeltaKind::Full, Compression::Zstd, &ops);
    send(&vm, &full).unwrap();
    model.accept(images);
    assert_eq!(vm.damage(), None);
    assert_points_match(&vm, &model);
}

#[test]
fn export_raw_is_sparse_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let size = 64u64 << 20;
    let disks = [delta::DiskEntry {
        index: 0,
        size_bytes: size,
    }];
    let vm = store
        .create_vm(&name("big"), delta::Generation(1), &disks, KEY)
        .unwrap();
    let header = delta::DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: delta::VmName::parse("big").unwrap(),
        generation: delta::Generation(1),
        seq: delta::Seq(1),
        parent_seq: delta::Seq(0),
        cut_time_unix_ns: 1,
        kind: DeltaKind::Initial,
        compression: Compression::Zstd,
        disks: disks.to_vec(),
    };
    let mut w = delta::DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
    w.data(0, 8 << 20, &content(8192, 201)).unwrap();
    w.data(0, 16 << 20, &vec![0u8; 1 << 20]).unwrap(); // explicit zeros must not allocate
    let (d1, _) = w.finish().unwrap();
    send(&vm, &d1).unwrap();
    // A second point on top, still in the journal.
    let header2 = delta::DeltaHeader {
        compared: false,
        app_consistent: false,
        seq: delta::Seq(2),
        parent_seq: delta::Seq(1),
        kind: DeltaKind::Incremental,
        ..header
    };
    let mut w = delta::DeltaWriter::new(Vec::new(), &header2, &KEY).unwrap();
    w.data(0, 32 << 20, &content(4096, 202)).unwrap();
    w.zero(0, 8 << 20, 4096).unwrap();
    let (d2, _) = w.finish().unwrap();
    send(&vm, &d2).unwrap();

    let out = dir.path().join("export.raw");
    vm.export_raw(delta::Seq(2), 0, &out).unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 <= 256 * 1024,
        "export allocated {} bytes",
        meta.blocks() * 512
    );
    let got = std::fs::read(&out).unwrap();
    let mut want = vec![0u8; size as usize];
    want[(8 << 20) + 4096..(8 << 20) + 8192].copy_from_slice(&content(8192, 201)[4096..]);
    want[32 << 20..(32 << 20) + 4096].copy_from_slice(&content(4096, 202));
    assert!(got == want, "exported image differs");
    assert!(!dir.path().join("export.raw.partial").exists());

    // block_status reports the zero ranges as zero/hole and the data as data.
    let view = vm.point_disk(delta::Seq(2), 0).unwrap();
    let ext = view.block_status(0, size).unwrap();
    assert_eq!(ext.iter().map(|e| e.len_bytes).sum::<u64>(), size);
    assert!(ext[0].zero && ext[0].hole && ext[0].len_bytes >= 8 << 20);
    assert!(ext.iter().any(|e| !e.zero));
    assert!(
        view.write_at(&[0u8; 4096], 0, false).is_err(),
        "views are read-only"
    );
}

#[test]
fn retention_never_folds_away_a_point_an_open_view_reads() {
    let (_dir, store, model) = store_with_points(4);
    let vm = store.vm(&vm_id()).unwrap();
    let view = vm.point_disk(delta::Seq(2), 0).unwrap();
    vm.retain(1).unwrap();
    // Point 1 (base) was folded into 2; 2 is in use, so folding stopped there.
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    let mut buf = vec![0u8; model.points[&2][&0].len()];
    view.read_at(&mut buf, 0).unwrap();
    assert!(buf == model.points[&2][&0]);
    drop(view);
    vm.retain(1).unwrap();
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(seqs, vec![4]);
    assert_points_match(&vm, &model);
}

#[test]
fn a_view_of_a_journal_point_stays_exact_while_retention_folds_it() {
    let (_dir, store, model) = store_with_points(4);
    let vm = store.vm(&vm_id()).unwrap();
    let view = vm.point_disk(delta::Seq(4), 1).unwrap();
    vm.retain(1).unwrap();
    assert_eq!(vm.points().len(), 1);
    let mut buf = vec![0u8; model.points[&4][&1].len()];
    view.read_at(&mut buf, 0).unwrap();
    assert!(buf == model.points[&4][&1]);
}

#[test]
fn create_is_idempotent_and_remove_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let a = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .unwrap();
    let b = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert!(matches!(
        store.create_vm(&vm_id(), delta::Generation(2), &disks(), KEY),
        Err(ReplicaError::AlreadyExists { .. })
    ));
    // A resized disk is refused in one line naming both sizes.
    let mut resized = disks();
    resized[1].size_bytes *= 2;
    let err = store
        .create_vm(&vm_id(), delta::Generation(1), &resized, KEY)
        .err()
        .expect("a resized disk was accepted");
    let (here, asked) = (disks()[1].size_bytes, resized[1].size_bytes);
    assert_eq!(
        err.to_string(),
        format!("VM {VM} already exists with disk 1 of {here} bytes, but the request's disk 1 is {asked} bytes")
    );
    let err = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), [7; 32])
        .err()
        .expect("another key was accepted");
    assert!(err.to_string().contains("another key"), "{err}");
    assert_eq!(a.latest_seq().get(), 0);
    assert!(a.points().is_empty());
    store.remove_vm(&vm_id()).unwrap();
    assert!(store.vm(&vm_id()).is_none());
    assert!(!dir.path().join(VM).exists());
    assert!(matches!(
        a.begin_receive(),
        Err(ReplicaError::Removed { .. })
    ));
    assert!(matches!(
        store.remove_vm(&vm_id()),
        Err(ReplicaError::NotFound { .. })
    ));
}

#[test]
fn corrupt_manifest_is_reported_and_other_vms_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    store
        .create_vm(&name("a"), delta::Generation(1), &disks(), KEY)
        .unwrap();
    store
        .create_vm(&name("b"), delta::Generation(1), &disks(), KEY)
        .unwrap();
    drop(store);
    std::fs::write(dir.path().join("a").join("store.json"), b"{}").unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.vm(&name("b")).is_some());
    assert!(store.vm(&name("a")).is_none());
    assert_eq!(store.broken().len(), 1);
    assert_eq!(store.broken()[0].0, "a");
}

#[test]
fn journal_files_are_valid_deltas() {
    let (dir, store, _model) = store_with_points(3);
    drop(store);
    let path = dir
        .path()
        .join(VM)
        .join("journal")
        .join(format!("{:020}.delta", 2));
    let f = std::fs::File::open(path).unwrap();
    let mut r = DeltaReader::new(std::io::BufReader::new(f), &KEY).unwrap();
    assert_eq!(r.header().seq.get(), 2);
    r.verify_to_end().unwrap();
}

#[test]
fn incoming_refuses_bytes_after_the_first_error() {
    let (_dir, store, model) = store_with_points(1);
    let vm = store.vm(&vm_id()).unwrap();
    let (bytes, _) = model.delta_with(
        5,
        4,
        1,
        DeltaKind::Incremental,
        Compression::None,
        &[],
        &KEY,
    );
    let mut inc = vm.begin_receive().unwrap();
    assert!(
        inc.write_all(&bytes).is_err(),
        "out-of-sequence header is refused while streaming"
    );
    assert!(inc.write_all(&bytes).is_err());
    assert!(matches!(
        vm.commit(inc),
        Err(ReplicaError::OutOfSequence {
            expected: 2,
            got: 5
        })
    ));
}

#[test]
fn a_journal_file_damaged_while_open_is_an_error_never_wrong_bytes() {
    let (dir, store, _model) = store_with_points(3);
    let vm = store.vm(&vm_id()).unwrap();
    let path = dir
        .path()
        .join(VM)
        .join("journal")
        .join(format!("{:020}.delta", 3));
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a byte inside the first frame's payload (past header and frame head).
    let at = bytes.len() / 3;
    bytes[at] ^= 0x10;
    // Rewrite in place: the store holds this inode open.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes[at..at + 1], at as u64).unwrap();
    let failed = [0u32, 1].iter().any(|&disk| {
        let view = vm.point_disk(delta::Seq(3), disk).unwrap();
        let mut buf = vec![0u8; view.size_bytes() as usize];
        view.read_at(&mut buf, 0).is_err()
    });
    assert!(failed, "a damaged frame must not be served");
    assert!(vm.damage().is_some());
}

/// Regression (AUDIT §11): damage found while running (a frame failing its checksum on read)
/// did not stop the replica from committing increments on the damaged chain, so the primary
/// never learned of it. Now a non-Full delta is refused by name (`VmDamaged`) and a Full
/// delta still commits and clears the damage.
#[test]
fn damage_found_at_runtime_refuses_increments_until_a_full_delta() {
    let (dir, store, mut model) = store_with_points(3);
    let vm = store.vm(&vm_id()).unwrap();
    let path = dir
        .path()
        .join(VM)
        .join("journal")
        .join(format!("{:020}.delta", 3));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let failed = [0u32, 1].iter().any(|&disk| {
        let view = vm.point_disk(delta::Seq(3), disk).unwrap();
        let mut buf = vec![0u8; view.size_bytes() as usize];
        view.read_at(&mut buf, 0).is_err()
    });
    assert!(failed && vm.damage().is_some());
    let ops = [Op::Data {
        disk: 0,
        block: 1,
        blocks: 1,
        seed: 9,
    }];
    let (inc, _) = model.delta(DeltaKind::Incremental, Compression::Zstd, &ops);
    let refused = send(&vm, &inc);
    assert!(
        matches!(refused, Err(ReplicaError::VmDamaged { .. })),
        "{refused:?}"
    );
    assert_eq!(vm.latest_seq().get(), 3);
    let ops = [
        Op::Data {
            disk: 0,
            block: 0,
            blocks: 64,
            seed: 77,
        },
        Op::Data {
            disk: 1,
            block: 0,
            blocks: 32,
            seed: 78,
        },
    ];
    let (full, images) = model.delta(DeltaKind::Full, Compression::Zstd, &ops);
    send(&vm, &full).unwrap();
    model.accept(images);
    assert_eq!(vm.damage(), None);
    assert_eq!(vm.latest_seq().get(), 4);
}

#[test]
fn reads_stay_exact_while_commits_and_retention_run_concurrently() {
    let (_dir, store, mut model) = store_with_points(2);
    let vm = store.vm(&vm_id()).unwrap();
    let pinned = 2u64;
    let want = model.points[&pinned].clone();
    let view = vm.point_disk(delta::Seq(pinned), 0).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            let mut buf = vec![0u8; want[&0].len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                view.read_at(&mut buf, 0).unwrap();
                assert!(buf == want[&0], "point {pinned} changed under a reader");
                reads += 1;
            }
            reads
        })
    };
    for i in 0..6u64 {
        let ops = [Op::Data {
            disk: 0,
            block: i * 7,
            blocks: 9,
            seed: 130 + i as u8,
        }];
        let (bytes, images) = model.delta(DeltaKind::Incremental, Compression::Zstd, &ops);
        send(&vm, &bytes).unwrap();
        model.accept(images);
        vm.retain(2).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    // The pinned point kept retention from folding past it; everything listed is exact.
    assert_eq!(vm.points().first().unwrap().seq.get(), pinned);
    assert_points_match(&vm, &model);
    vm.retain(2).unwrap();
    assert_eq!(vm.points().len(), 2);
    assert_points_match(&vm, &model);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// The first point (Initial, or a Full when the replica holds nothing) is written straight
    /// into the base: it reads back exactly the model (overlapping DATA and ZERO frames, raw
    /// and zstd), keeps no journal copy, and later points and reopen see it unchanged.
    #[test]
    fn first_point_goes_straight_into_the_base_and_reads_back_exactly(
        ops in prop::collection::vec(op(), 1..24),
        next in prop::collection::vec(op(), 0..6),
        zstd in any::<bool>(),
        full in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store.create_vm(&vm_id(), delta::Generation(1), &disks(), KEY).unwrap();
        let mut model = Model::new();
        let kind = if full { DeltaKind::Full } else { DeltaKind::Initial };
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let (bytes, images) = model.delta(kind, compression, &ops);
        let info = send(&vm, &bytes).unwrap();
        model.accept(images);
        prop_assert_eq!(info.seq.get(), 1);
        prop_assert_eq!(info.stored_bytes, bytes.len() as u64);
        prop_assert_eq!(vm.points(), vec![info]);
        let journal = dir.path().join(VM).join("journal");
        prop_assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0);
        assert_points_match(&vm, &model);
        let (bytes, images) = model.delta(DeltaKind::Incremental, compression, &next);
        send(&vm, &bytes).unwrap();
        model.accept(images);
        assert_points_match(&vm, &model);
        drop((vm, store));
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store.vm(&vm_id()).unwrap();
        prop_assert_eq!(vm.damage(), None);
        prop_assert_eq!(vm.points().len(), 2);
        assert_points_match(&vm, &model);
    }
}

#[test]
fn a_first_point_is_refused_by_name_like_any_delta_and_leaves_no_point() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .unwrap();
    let model = Model::new();
    let ops = [Op::Data {
        disk: 0,
        block: 2,
        blocks: 6,
        seed: 150,
    }];
    let init = DeltaKind::Initial;
    let (foreign, _) = model.delta_with(1, 0, 1, init, Compression::Zstd, &ops, &[4u8; 32]);
    assert!(matches!(
        send(&vm, &foreign),
        Err(ReplicaError::Delta(delta::DeltaError::HeaderChecksum))
    ));
    let (gen, _) = model.delta_with(1, 0, 2, init, Compression::Zstd, &ops, &KEY);
    assert!(matches!(
        send(&vm, &gen),
        Err(ReplicaError::WrongGeneration { .. })
    ));
    let (skip, _) = model.delta_with(2, 1, 1, init, Compression::Zstd, &ops, &KEY);
    assert!(matches!(
        send(&vm, &skip),
        Err(ReplicaError::OutOfSequence {
            expected: 1,
            got: 2
        })
    ));
    let (good, images) = model.delta(init, Compression::None, &ops);
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    assert!(matches!(send(&vm, &flipped), Err(ReplicaError::Delta(_))));
    assert!(matches!(
        send(&vm, &good[..good.len() - 1]),
        Err(ReplicaError::Incomplete { .. })
    ));
    assert!(vm.points().is_empty());
    assert_eq!(vm.latest_seq().get(), 0);
    drop((vm, store));
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert!(vm.points().is_empty());
    assert_eq!(send(&vm, &good).unwrap().seq.get(), 1);
    let mut model = model;
    model.accept(images);
    assert_points_match(&vm, &model);
}

/// The daemon opens the store without reading any journal (`open_deferred`) and verifies VMs
/// in the background: until then a VM is pending, and calls for it are refused as transient
/// (`Verifying`), never as a conflict or an unknown VM.
#[test]
fn a_deferred_store_lists_vms_as_pending_until_verified() {
    let (dir, store, model) = store_with_points(3);
    drop(store);
    let store = ReplicaStore::open_deferred(dir.path()).unwrap();
    assert!(store.vm(&vm_id()).is_none() && store.is_pending(&vm_id()));
    let refused = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .err()
        .unwrap();
    assert!(
        matches!(refused, ReplicaError::Verifying { .. }) && refused.is_transient(),
        "{refused:?}"
    );
    assert_eq!(store.open_pending(), 0);
    let vm = store.vm(&vm_id()).unwrap();
    assert_points_match(&vm, &model);
}

/// Regression (AUDIT §14): index memory had no total bound (about 120 bytes per frame of every
/// retained delta). Now the store counts indexed frames: at the bound a commit folds its VM's
/// oldest points first, is refused as transient (`IndexFull`) when that cannot make room,
/// and `relieve_index_pressure` folds the VMs holding the most.
#[test]
fn index_memory_is_bounded_by_folding_sooner_or_refusing_transiently() {
    const MAX: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    store.set_index_frames_max(MAX);
    let vm = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .unwrap();
    let mut model = Model::new();
    let two_frames = |i: u64| {
        [
            Op::Data {
                disk: 0,
                block: i,
                blocks: 1,
                seed: i as u8,
            },
            Op::Zero {
                disk: 1,
                block: i,
                blocks: 1,
            },
        ]
    };
    for i in 0..10u64 {
        let kind = if i == 0 {
            DeltaKind::Initial
        } else {
            DeltaKind::Incremental
        };
        let (bytes, images) = model.delta(kind, Compression::Zstd, &two_frames(i));
        send(&vm, &bytes).unwrap();
        model.accept(images);
        let (indexed, max) = store.index_frames();
        assert!(indexed <= max, "{indexed} frames indexed, bound {max}");
    }
    // Folded sooner than any retention asked: 3 journal deltas of 2 frames fit.
    assert_eq!(store.index_frames().0, MAX);
    assert_eq!(vm.points().len(), 4);
    assert_points_match(&vm, &model);

    // A delta larger than the whole bound: refused as transient, nothing changes.
    let ops: Vec<Op> = (0..8)
        .map(|b| Op::Data {
            disk: 0,
            block: b * 2,
            blocks: 1,
            seed: 99,
        })
        .collect();
    let (big, images) = model.delta(DeltaKind::Incremental, Compression::Zstd, &ops);
    let refused = send(&vm, &big).unwrap_err();
    assert!(
        matches!(refused, ReplicaError::IndexFull { .. }) && refused.is_transient(),
        "{refused:?}"
    );
    assert_eq!(vm.latest_seq().get(), model.latest);
    store.set_index_frames_max(100);
    send(&vm, &big).unwrap();
    model.accept(images);

    // Past 3/4 of a lowered bound, retention folds until under it again.
    store.set_index_frames_max(8);
    store.relieve_index_pressure().unwrap();
    assert!(store.index_frames().0 <= 6, "{:?}", store.index_frames());
    assert_points_match(&vm, &model);
    drop(vm);
    drop(store);
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    let (indexed, _) = store.index_frames();
    assert!(indexed <= 6, "{indexed} frames indexed after reopen");
    assert_points_match(&vm, &model);
}

/// A store is opened only where it was set up: a missing directory, a directory without the
/// marker (an empty mount point) and a damaged marker are refused by name, creating nothing.
#[test]
fn open_deferred_refuses_a_missing_directory_or_marker_and_creates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("storage");
    let e = ReplicaStore::open_deferred(&dir).err().unwrap();
    assert!(matches!(e, ReplicaError::StorageMissing { .. }), "{e}");
    assert!(!dir.exists());
    std::fs::create_dir(&dir).unwrap();
    let e = ReplicaStore::open_deferred(&dir).err().unwrap();
    assert!(matches!(e, ReplicaError::NoStoreMarker { .. }), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let marker = ReplicaStore::init_storage(&dir, "replica-1").unwrap();
    assert_eq!(marker.host, "replica-1");
    let store = ReplicaStore::open_deferred(&dir).unwrap();
    assert_eq!(store.marker(), &marker);
    // Set up again: the same store.
    assert_eq!(ReplicaStore::init_storage(&dir, "other").unwrap(), marker);
    let path = dir.join("understudy-store.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("replica-1", "replica-2");
    std::fs::write(&path, text).unwrap();
    let e = ReplicaStore::open_deferred(&dir).err().unwrap();
    assert!(
        matches!(e, ReplicaError::BadStoreMarker { .. }) && e.to_string().contains("checksum"),
        "{e}"
    );
}

/// The replica had a VM-id rule of its own (1-255 bytes, a leading '-' allowed), wider than the
/// primary's: now both use `VmName`, so a name is accepted by the primary, in a delta header
/// and by the store alike, and a directory no VM can be named is not taken for a VM.
#[test]
fn replica_and_primary_accept_the_same_vm_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    // The longest name the primary accepts travels in a delta and survives a reopen.
    let longest = "v".repeat(delta::VM_NAME_MAX);
    let vm = store
        .create_vm(&name(&longest), delta::Generation(1), &disks(), KEY)
        .unwrap();
    let header = delta::DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: name(&longest),
        generation: delta::Generation(1),
        seq: delta::Seq(1),
        parent_seq: delta::Seq(0),
        cut_time_unix_ns: 1,
        kind: DeltaKind::Initial,
        compression: Compression::None,
        disks: disks(),
    };
    let mut w = delta::DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
    w.data(0, 0, &[5u8; BLOCK as usize]).unwrap();
    let bytes = w.finish().unwrap().0;
    assert_eq!(send(&vm, &bytes).unwrap().seq, delta::Seq(1));
    drop(vm);
    drop(store);
    // Names the old replica rule accepted and the primary never creates: one byte too long,
    // a leading '-'. Laid out like VM directories, they are still not VMs of the store.
    for bad in ["v".repeat(delta::VM_NAME_MAX + 1), "-web".to_string()] {
        assert!(delta::VmName::parse(&bad).is_err(), "{bad:?}");
        std::fs::create_dir(dir.path().join(&bad)).unwrap();
        std::fs::copy(
            dir.path().join(&longest).join("store.json"),
            dir.path().join(&bad).join("store.json"),
        )
        .unwrap();
    }
    let store = ReplicaStore::open(dir.path()).unwrap();
    let names: Vec<String> = store.vms().iter().map(|v| v.vm_id().to_string()).collect();
    assert_eq!(names, [longest.as_str()]);
    assert!(store.broken().is_empty(), "{:?}", store.broken());
    assert!(store.pending().is_empty());
    let vm = store.vm(&name(&longest)).unwrap();
    assert_eq!(vm.latest_seq(), delta::Seq(1));
    assert_eq!(
        read_point(&vm, 1, 0)[..BLOCK as usize],
        [5u8; BLOCK as usize]
    );
}

/// The replica accepted VMs of up to 256 disks while a primary never has more than 16: the
/// store now refuses, by the one limit, a disk table no primary could send.
#[test]
fn replica_refuses_a_vm_with_more_disks_than_a_vm_may_have() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let table = |n: u32| -> Vec<delta::DiskEntry> {
        (0..n)
            .map(|index| delta::DiskEntry {
                index,
                size_bytes: BLOCK,
            })
            .collect()
    };
    store
        .create_vm(
            &name("most"),
            delta::Generation(1),
            &table(delta::DISKS_PER_VM_MAX),
            KEY,
        )
        .unwrap();
    assert!(matches!(
        store.create_vm(
            &name("too-many"),
            delta::Generation(1),
            &table(delta::DISKS_PER_VM_MAX + 1),
            KEY
        ),
        Err(ReplicaError::InvalidDisks(_))
    ));
    assert!(store.vm(&name("too-many")).is_none());
    assert!(!dir.path().join("too-many").exists());
}
