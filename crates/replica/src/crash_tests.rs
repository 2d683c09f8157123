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

/// A VM name for tests (the store takes names validated once, as `VmName`).
fn name(s: &str) -> proto::VmName {
    proto::VmName::parse(s).unwrap()
}

/// The test VM's name.
fn vm_id() -> proto::VmName {
    name(VM)
}
const BLOCKS: u64 = 32;

/// Header of delta `seq` in a chain starting at 1 (Initial, then Incremental), generation 1,
/// cut time = seq. Shared by the crate's test modules.
pub(crate) fn chain_header(
    vm: &str,
    seq: u64,
    compression: Compression,
    disks: Vec<DiskEntry>,
) -> DeltaHeader {
    DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: proto::VmName::parse(vm).unwrap(),
        generation: proto::Generation(1),
        seq: proto::Seq(seq),
        parent_seq: proto::Seq(seq - 1),
        cut_time_unix_ns: seq,
        kind: if seq == 1 {
            DeltaKind::Initial
        } else {
            DeltaKind::Incremental
        },
        compression,
        disks,
    }
}

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
        let header = chain_header(VM, seq, Compression::Zstd, disks());
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
    let vm = store.vm(&vm_id()).unwrap();
    assert_eq!(vm.damage(), None);
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    for s in must_have {
        assert!(seqs.contains(s), "point {s} lost; points now {seqs:?}");
    }
    for &s in &seqs {
        let want = model
            .points
            .get(&s)
            .unwrap_or_else(|| panic!("unknown point {s} listed"));
        for (&disk, img) in want {
            let view = vm.view(proto::Seq(s), disk).unwrap();
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
    let vm = store
        .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
        .unwrap();
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
        let vm = store.vm(&vm_id()).unwrap();
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

/// Regression: a commit that failed after its journal file was renamed into place (a failed
/// directory fsync) left the point on disk but not in the index, and a later delta of the
/// same seq would have been renamed over it. Now the VM refuses deltas until reopened, and the
/// reopened store has the point.
#[test]
fn a_commit_failing_after_the_rename_wedges_until_reopen() {
    let (dir, store, mut model) = setup(2);
    let vm = store.vm(&vm_id()).unwrap();
    let (bytes, images) = model.delta(3);
    failpoint::arm("commit.after_rename");
    assert!(send(&vm, &bytes).is_err());
    // The same delta again (the primary retries): refused, the journal file is untouched.
    let again = send(&vm, &bytes);
    assert!(
        matches!(&again, Err(crate::ReplicaError::ReceiveFailed(r)) if r.contains("restarts")),
        "{again:?}"
    );
    model.points.insert(3, images);
    drop(vm);
    drop(store);
    let seqs = check(dir.path(), &model, &[1, 2, 3]);
    assert_eq!(seqs, vec![1, 2, 3]);
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
        let vm = store.vm(&vm_id()).unwrap();
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
        store.vm(&vm_id()).unwrap().retain(2).unwrap();
        drop(store);
        assert_eq!(check(dir.path(), &model, &[3, 4]), vec![3, 4], "{step}");
    }
}

/// An Initial delta (seq 1) writing `blocks` = (disk, block, seed) 4 KiB blocks, with a ZERO
/// frame over an earlier DATA frame and an all-zero DATA frame, and the images it leads to.
fn initial(blocks: &[(u32, u64, u8)]) -> (Vec<u8>, BTreeMap<u32, Vec<u8>>) {
    let header = DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: proto::VmName::parse(VM).unwrap(),
        generation: proto::Generation(1),
        seq: proto::Seq(1),
        parent_seq: proto::Seq(0),
        cut_time_unix_ns: 1,
        kind: DeltaKind::Initial,
        compression: Compression::Zstd,
        disks: disks(),
    };
    let mut images = Model::new().images;
    let mut w = DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
    for &(disk, block, seed) in blocks {
        let data: Vec<u8> = (0..4096u64)
            .map(|i| (i / 61 + u64::from(seed)) as u8 | 1)
            .collect();
        let off = block * 4096;
        w.data(disk, off, &data).unwrap();
        images.get_mut(&disk).unwrap()[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    // Overwritten in the same delta: a ZERO frame over the first block, an all-zero DATA frame
    // over the second (both must read as zeros).
    for &(disk, block, _) in blocks.iter().take(2) {
        let off = block * 4096;
        if block % 2 == 0 {
            w.zero(disk, off, 4096).unwrap();
        } else {
            w.data(disk, off, &[0u8; 4096]).unwrap();
        }
        images.get_mut(&disk).unwrap()[off as usize..off as usize + 4096].fill(0);
    }
    (w.finish().unwrap().0, images)
}

/// Streams `bytes` in uneven pieces, stops at the first refused write, commits.
fn send_chunked(vm: &ReplicaVm, bytes: &[u8]) -> Result<crate::PointInfo, crate::ReplicaError> {
    let mut inc = vm.begin_receive()?;
    for chunk in bytes.chunks(5003) {
        if inc.write_all(chunk).is_err() {
            break;
        }
    }
    vm.commit(inc)
}

/// Blocks the first attempt writes; the second attempt writes only the first half of them.
fn first_attempt_blocks() -> Vec<(u32, u64, u8)> {
    (0..BLOCKS)
        .step_by(3)
        .map(|b| (0, b, b as u8))
        .chain((0..8).map(|b| (7, b, 100 + b as u8)))
        .collect()
}

fn second_attempt_blocks() -> Vec<(u32, u64, u8)> {
    vec![(0, 1, 201), (0, 3, 202), (7, 2, 203), (0, 9, 204)]
}

/// After a failed or interrupted first attempt (no point), a second Initial that does not
/// write most of the blocks of the first must read exactly as its own image: zeros elsewhere.
fn second_attempt_reads_exactly(dir: &Path) {
    let store = ReplicaStore::open(dir).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert!(vm.points().is_empty());
    assert_eq!(vm.latest_seq().get(), 0);
    let (bytes, images) = initial(&second_attempt_blocks());
    assert_eq!(send_chunked(&vm, &bytes).unwrap().seq.get(), 1);
    let mut model = Model::new();
    model.points.insert(1, images.clone());
    model.images = images;
    drop(vm);
    assert_eq!(check(dir, &model, &[1]), vec![1]);
    // Later points build on it as usual.
    model.commit(&store.vm(&vm_id()).unwrap(), 2);
    drop(store);
    assert_eq!(check(dir, &model, &[1, 2]), vec![1, 2]);
}

fn journal_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join(VM).join("journal"))
        .unwrap()
        .next()
        .is_none()
}

#[test]
fn crash_at_each_step_of_the_first_point_commit() {
    let steps = [
        ("first.mid_receive", false),
        ("first.before_fsync", false),
        ("first.before_manifest", false),
        ("write_atomic.before_rename", false),
        ("first.after_manifest", true),
    ];
    for (step, survives) in steps {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store
            .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
            .unwrap();
        let (bytes, images) = initial(&first_attempt_blocks());
        failpoint::arm(step);
        let r = send_chunked(&vm, &bytes);
        assert!(
            matches!(r, Err(crate::ReplicaError::Injected(s)) if s == step),
            "{step}: {r:?}"
        );
        drop(vm);
        drop(store); // kill -9
        assert!(journal_is_empty(dir.path()), "{step}: no journal copy");
        let mut model = Model::new();
        model.points.insert(1, images);
        let seqs = check(dir.path(), &model, &[]);
        if survives {
            // The manifest was renamed: the point is there, complete.
            assert_eq!(seqs, vec![1], "{step}");
        } else {
            assert!(seqs.is_empty(), "{step}: {seqs:?}");
            second_attempt_reads_exactly(dir.path());
        }
    }
}

#[test]
fn a_refused_first_point_leaves_nothing_and_the_next_attempt_starts_from_zeros() {
    let (bytes, _) = initial(&first_attempt_blocks());
    let mut corrupt = bytes.clone();
    let at = bytes.len() - 40; // inside the footer's MAC: every frame was written already
    corrupt[at] ^= 1;
    let attempts: [(&str, &[u8]); 2] = [
        ("truncated", &bytes[..bytes.len() - 1]),
        ("bad footer", &corrupt),
    ];
    for (what, attempt) in attempts {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store
            .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
            .unwrap();
        let r = send_chunked(&vm, attempt);
        assert!(
            matches!(
                r,
                Err(crate::ReplicaError::Incomplete { .. } | crate::ReplicaError::Delta(_))
            ),
            "{what}: {r:?}"
        );
        assert!(vm.points().is_empty(), "{what}");
        assert_eq!(vm.latest_seq().get(), 0, "{what}");
        // Same process, no reopen: the next attempt resets the base itself.
        let (bytes2, images2) = initial(&second_attempt_blocks());
        send_chunked(&vm, &bytes2).unwrap();
        let mut model = Model::new();
        model.points.insert(1, images2);
        for (&disk, img) in &model.points[&1] {
            let mut buf = vec![0u8; img.len()];
            vm.view(proto::Seq(1), disk)
                .unwrap()
                .read_range(&mut buf, 0)
                .unwrap();
            assert!(
                buf == *img,
                "{what}: disk {disk} keeps blocks of the refused attempt"
            );
        }
        drop(vm);
        drop(store);
        assert_eq!(check(dir.path(), &model, &[1]), vec![1], "{what}");
    }
}

#[test]
fn crash_mid_first_point_then_a_new_attempt_starts_from_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store
        .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
        .unwrap();
    let (bytes, _) = initial(&first_attempt_blocks());
    let mut inc = vm.begin_receive().unwrap();
    inc.write_all(&bytes[..bytes.len() * 3 / 4]).unwrap();
    // The frames reach the base (its writer thread is done with them), then the process dies
    // mid-receive. Without the flush, the forgotten writer thread of this test process could
    // still write after the reopen below; a real crash stops it with everything else.
    inc.flush().unwrap();
    std::mem::forget(inc);
    drop(vm);
    drop(store);
    // Open frees what the interrupted attempt wrote (no point: the base is all holes).
    let base = dir.path().join(VM).join("base").join("disk-0.raw");
    {
        let _store = ReplicaStore::open(dir.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&base).unwrap().blocks(), 0);
    }
    second_attempt_reads_exactly(dir.path());
}

#[test]
fn a_newer_first_point_attempt_supersedes_an_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store
        .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
        .unwrap();
    let (old, _) = initial(&first_attempt_blocks());
    let (new, images) = initial(&second_attempt_blocks());
    let mut a = vm.begin_receive().unwrap();
    a.write_all(&old[..old.len() / 2]).unwrap();
    let mut b = vm.begin_receive().unwrap();
    b.write_all(&new[..new.len() / 2]).unwrap(); // header: resets the base, new epoch
    assert!(
        a.write_all(&old[old.len() / 2..]).is_err(),
        "the older attempt may not write after the reset"
    );
    b.write_all(&new[new.len() / 2..]).unwrap();
    assert!(matches!(
        vm.commit(a),
        Err(crate::ReplicaError::ReceiveFailed(_))
    ));
    assert_eq!(vm.commit(b).unwrap().seq.get(), 1);
    let mut model = Model::new();
    model.points.insert(1, images.clone());
    model.images = images;
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1]), vec![1]);
    assert!(journal_is_empty(dir.path()));
}

#[test]
fn crash_while_receiving_leaves_no_partial_and_no_point() {
    let (dir, store, model) = setup(1);
    let vm = store.vm(&vm_id()).unwrap();
    let (bytes, _) = model.delta(2);
    let mut inc = vm.begin_receive().unwrap();
    inc.write_all(&bytes[..bytes.len() / 2]).unwrap();
    inc.flush().unwrap();
    std::mem::forget(inc); // the process dies: no destructor deletes the partial file
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1]), vec![1]);
}

#[test]
fn a_failed_first_point_manifest_write_blocks_resets_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store
        .create_vm(&vm_id(), proto::Generation(1), &disks(), KEY)
        .unwrap();
    let (bytes, images) = initial(&first_attempt_blocks());
    // Simulates a manifest write failing at the rename (the on-disk state is then unknown).
    failpoint::arm("write_atomic.before_rename");
    assert!(send_chunked(&vm, &bytes).is_err());
    let r = send_chunked(&vm, &bytes);
    assert!(
        matches!(r, Err(crate::ReplicaError::Damaged(_))),
        "no reset before reopen: {r:?}"
    );
    drop(vm);
    drop(store);
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert_eq!(send_chunked(&vm, &bytes).unwrap().seq.get(), 1);
    let mut model = Model::new();
    model.points.insert(1, images);
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1]), vec![1]);
}

/// Regression (AUDIT §1): running out of descriptors while open verified the journal was taken
/// for damage: the journal file and every later one were moved to quarantine/ and the damage
/// persisted. Now it is transient: nothing moves, the VM stays pending and opens later.
#[test]
fn emfile_at_open_is_transient_never_quarantines_journal_files() {
    let (dir, store, model) = setup(4);
    drop(store);
    failpoint::arm("journal.open");
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.vm(&vm_id()).is_none());
    let pending = store.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert!(
        pending[0]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("Too many open files"),
        "{pending:?}"
    );
    assert!(store.broken().is_empty());
    assert!(!dir.path().join(VM).join(crate::vm::QUARANTINE_DIR).exists());
    let manifest = crate::manifest::Manifest::load(&dir.path().join(VM)).unwrap();
    assert_eq!(manifest.damage, None);
    // The descriptors are back: the next attempt opens it with every point.
    assert_eq!(store.open_pending(), 0);
    let vm = store.vm(&vm_id()).unwrap();
    assert_eq!(vm.damage(), None);
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1, 2, 3, 4]), vec![1, 2, 3, 4]);
}

/// Merging a point into the next one (retention between kept points): every other point reads
/// exactly as before, a view of the next point opened before the merge keeps reading the same
/// bytes, and the result survives a reopen and a later fold.
#[test]
fn merge_keeps_every_other_point_byte_equal() {
    let (dir, store, mut model) = setup(6);
    let vm = store.vm(&vm_id()).unwrap();
    let view4 = vm.view(proto::Seq(4), 0).unwrap();
    assert!(crate::merge::merge_into_next(&vm.inner, 3).unwrap());
    let mut buf = vec![0u8; model.points[&4][&0].len()];
    view4.read_range(&mut buf, 0).unwrap();
    assert!(
        buf == model.points[&4][&0],
        "view of 4 changed under a merge"
    );
    drop(view4);
    model.points.remove(&3);
    assert!(crate::merge::merge_into_next(&vm.inner, 2).unwrap());
    model.points.remove(&2);
    // The newest point is never merged.
    assert!(!crate::merge::merge_into_next(&vm.inner, 6).unwrap());
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1, 4, 5, 6]), vec![1, 4, 5, 6]);
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    vm.retain(2).unwrap();
    model.commit(&vm, 7);
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[5, 6, 7]), vec![5, 6, 7]);
}

/// kill -9 at each step of a merge: every point but the merged one reads exactly; the merged
/// one is either still there (exact) or gone, and no superseded file is left behind.
#[test]
fn crash_at_each_merge_step_keeps_every_other_point() {
    for (step, survives) in [
        ("merge.mid_write", true),
        ("merge.before_rename", true),
        ("merge.after_rename", false),
        ("merge.before_delete", false),
    ] {
        let (dir, store, model) = setup(5);
        let vm = store.vm(&vm_id()).unwrap();
        failpoint::arm(step);
        let r = crate::merge::merge_into_next(&vm.inner, 3);
        assert!(
            matches!(r, Err(crate::ReplicaError::Injected(s)) if s == step),
            "{step}: {r:?}"
        );
        drop(vm);
        drop(store);
        let seqs = check(dir.path(), &model, &[1, 2, 4, 5]);
        assert_eq!(seqs.contains(&3), survives, "{step}: {seqs:?}");
        let files = std::fs::read_dir(dir.path().join(VM).join("journal"))
            .unwrap()
            .count();
        assert_eq!(files, seqs.len() - 1, "{step}: superseded files left");
    }
}

/// The policy: the hourly point and the newest stay, everything between is merged away, and
/// a point an open view reads is never retired.
#[test]
fn history_policy_retires_points_between_kept_ones_but_not_pinned_ones() {
    let (dir, store, mut model) = setup(6);
    let vm = store.vm(&vm_id()).unwrap();
    let bad = crate::HistoryPolicy {
        recovery_history: 25,
        app_consistent_every_hours: None,
        keep_every_point_for_secs: 0,
    };
    assert!(matches!(
        vm.set_history(bad),
        Err(crate::ReplicaError::InvalidHistory(_))
    ));
    assert_eq!(vm.history(), None);
    vm.set_history(crate::HistoryPolicy {
        recovery_history: 1,
        ..bad
    })
    .unwrap();
    let pinned = vm.view(proto::Seq(4), 0).unwrap();
    // Cut times are 1..6 ns: all in the first hour, whose first point (1) is the hourly one.
    vm.apply_history(10, 64).unwrap();
    let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(seqs, vec![1, 4, 6]);
    let kinds: Vec<crate::PointKind> = vm.points_with_kinds(10).iter().map(|p| p.1).collect();
    assert_eq!(
        kinds,
        vec![
            crate::PointKind::Initial,
            crate::PointKind::Standard,
            crate::PointKind::Latest
        ]
    );
    drop(pinned);
    vm.apply_history(10, 64).unwrap();
    for s in [2, 3, 4, 5] {
        model.points.remove(&s);
    }
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1, 6]), vec![1, 6]);
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert_eq!(
        store
            .vm(&vm_id())
            .unwrap()
            .history()
            .unwrap()
            .recovery_history,
        1
    );
}

/// Retired points are hidden and compacted (merges of similar sizes, like a binary counter)
/// rather than each merged into the next at once, which would rewrite everything written
/// since the previous kept point at every cycle (an hour's changes every second at 1 s
/// cycles). The journal stays short, only kept points are listed, they read exactly, and a
/// reopen (kill -9 after a pass) loses nothing.
#[test]
fn retired_points_are_hidden_and_compacted_in_a_few_files() {
    let (dir, store, mut model) = setup(1);
    let vm = store.vm(&vm_id()).unwrap();
    vm.set_history(crate::HistoryPolicy {
        recovery_history: 1,
        app_consistent_every_hours: None,
        keep_every_point_for_secs: 0,
    })
    .unwrap();
    let mut max_files = 0;
    for seq in 2..=64 {
        model.commit(&vm, seq);
        vm.apply_history(100, 64).unwrap();
        let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq.get()).collect();
        assert_eq!(
            seqs,
            vec![1, seq],
            "only the hourly point and the newest are listed"
        );
        let files = std::fs::read_dir(dir.path().join(VM).join("journal"))
            .unwrap()
            .count();
        max_files = max_files.max(files);
    }
    // Binary-counter compaction: about log2(63) hidden deltas at most, not 63.
    assert!(max_files <= 8, "{max_files} journal files at once");
    for s in 2..64 {
        model.points.remove(&s);
    }
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1, 64]), vec![1, 64]);
}

/// kill -9 while retention hides points (its one manifest write fails before the rename):
/// every point reads exactly after reopen, and the next pass finishes the job.
#[test]
fn crash_while_hiding_points_keeps_every_point() {
    let (dir, store, mut model) = setup(5);
    let vm = store.vm(&vm_id()).unwrap();
    vm.set_history(crate::HistoryPolicy {
        recovery_history: 1,
        app_consistent_every_hours: None,
        keep_every_point_for_secs: 0,
    })
    .unwrap();
    failpoint::arm("write_atomic.before_rename");
    let r = vm.apply_history(100, 64);
    assert!(matches!(r, Err(crate::ReplicaError::Injected(_))), "{r:?}");
    drop(vm);
    drop(store);
    assert_eq!(
        check(dir.path(), &model, &[1, 2, 3, 4, 5]),
        vec![1, 2, 3, 4, 5]
    );
    let store = ReplicaStore::open(dir.path()).unwrap();
    store.vm(&vm_id()).unwrap().apply_history(100, 64).unwrap();
    drop(store);
    for s in 2..5 {
        model.points.remove(&s);
    }
    assert_eq!(check(dir.path(), &model, &[1, 5]), vec![1, 5]);
}

/// An interrupted incremental upload whose prefix was kept survives the death of the process
/// (no destructor runs) and continues from there after open, mid-frame; the point is whole and
/// the kept prefix is gone once it is committed.
#[test]
fn a_kept_prefix_survives_a_restart_and_the_upload_continues() {
    let (dir, store, mut model) = setup(1);
    let vm = store.vm(&vm_id()).unwrap();
    let (bytes, images) = model.delta(2);
    let cut = bytes.len() / 2 + 7;
    let mut inc = vm.begin_receive().unwrap();
    inc.write_all(&bytes[..cut]).unwrap();
    assert!(inc.persist_prefix().unwrap());
    let sum = inc.header_checksum().unwrap();
    std::mem::forget(inc);
    drop(vm);
    drop(store);

    let store = ReplicaStore::open(dir.path()).unwrap();
    let vm = store.vm(&vm_id()).unwrap();
    assert_eq!(vm.kept_prefix(proto::Seq(2)), Some((sum, cut as u64)));
    let mut other = sum;
    other[0] ^= 1;
    assert!(
        vm.adopt_kept(proto::Seq(2), &other).unwrap().is_none(),
        "another delta"
    );
    let mut inc = vm.adopt_kept(proto::Seq(2), &sum).unwrap().unwrap();
    assert_eq!(inc.received_bytes(), cut as u64);
    inc.write_all(&bytes[cut..]).unwrap();
    vm.commit(inc).unwrap();
    model.images = images.clone();
    model.points.insert(2, images);
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1, 2]), vec![1, 2]);
}

/// A kept prefix of a seq that got committed by another upload is stale: open deletes it.
#[test]
fn a_stale_kept_prefix_is_deleted_at_open() {
    let (dir, store, mut model) = setup(1);
    let vm = store.vm(&vm_id()).unwrap();
    let (bytes, _) = model.delta(2);
    let mut inc = vm.begin_receive().unwrap();
    inc.write_all(&bytes[..bytes.len() / 3]).unwrap();
    assert!(inc.persist_prefix().unwrap());
    std::mem::forget(inc);
    model.commit(&vm, 2);
    assert!(
        vm.kept_prefix(proto::Seq(2)).is_some(),
        "still there until open"
    );
    drop(vm);
    drop(store);
    assert_eq!(check(dir.path(), &model, &[1, 2]), vec![1, 2]);
}

/// What an incremental backup copies (`changed_between`) must be every byte where the newer
/// point differs from the older one, across merges, and it must refuse an older point whose
/// changes a fold took into the base (the base keeps no history).
#[test]
fn changed_between_covers_every_difference_across_merges_and_refuses_a_folded_start() {
    let (_dir, store, model) = setup(6);
    let vm = store.vm(&vm_id()).unwrap();
    let patch = |from: u64, to: u64| {
        for (&disk, want) in &model.points[&to] {
            let mut img = model.points[&from][&disk].clone();
            let view = vm.view(proto::Seq(to), disk).unwrap();
            for (off, len) in vm
                .changed_between(proto::Seq(from), proto::Seq(to), disk)
                .unwrap()
            {
                view.read_range(&mut img[off as usize..(off + len) as usize], off)
                    .unwrap();
            }
            assert!(img == *want, "{from}→{to} disk {disk}: a change was missed");
        }
    };
    patch(1, 6);
    patch(2, 4);
    patch(5, 5);
    // A hidden point merged into the next one: the union still covers it.
    assert!(crate::merge::merge_into_next(&vm.inner, 3).unwrap());
    patch(2, 4);
    patch(2, 6);
    // Point 1 folded into the base: changes since 1 are no longer known.
    vm.retain(4).unwrap();
    assert!(matches!(
        vm.changed_between(proto::Seq(1), proto::Seq(6), 0),
        Err(crate::ReplicaError::NoSuchPoint { .. } | crate::ReplicaError::ChangesUnknown { .. })
    ));
    assert!(matches!(
        vm.changed_between(proto::Seq(6), proto::Seq(5), 0),
        Err(crate::ReplicaError::ChangesUnknown { .. })
    ));
}
