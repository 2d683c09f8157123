//! Copy-before-write into the bounded memory pool, through the public API: copies spill to the
//! file when the pool is full, memory is recycled as soon as the shipper has read a copy and
//! reused across epochs, commit and abort release everything, and the bound holds.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use nbd::BlockBackend;
use understudy_tracker::{cut, CutGate, DiskOptions, FrozenDisk, TrackedDisk, BLOCK_BYTES};

const B: u64 = BLOCK_BYTES;

struct Fixture {
    dir: tempfile::TempDir,
    gate: Arc<CutGate>,
    disk: Arc<TrackedDisk>,
}

impl Fixture {
    fn cbw_file_len(&self) -> u64 {
        fs::metadata(self.state().join("disk.cbw"))
            .expect("cbw file")
            .len()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// A disk of `size` bytes whose copy-before-write memory holds `pool_blocks` blocks.
fn disk(size: u64, pool_blocks: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = CutGate::new();
    let disk = TrackedDisk::create_with(
        &dir.path().join("disk.img"),
        size,
        &dir.path().join("state"),
        gate.clone(),
        &DiskOptions {
            cbw_memory_bytes_max: pool_blocks * B,
            ..DiskOptions::default()
        },
    )
    .expect("create");
    Fixture { dir, gate, disk }
}

fn fill(byte: u8, blocks: u64) -> Vec<u8> {
    vec![byte; (blocks * B) as usize]
}

/// Writes block `i` of `0..n` filled with `i + 1 + base`.
fn stamp_blocks(d: &TrackedDisk, n: u64, base: u8) {
    for i in 0..n {
        d.write_at(&fill(i as u8 + 1 + base, 1), i * B, false)
            .expect("write");
    }
}

fn read(fd: &FrozenDisk, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    fd.read_at(&mut buf, offset).expect("frozen read");
    buf
}

fn assert_stamped(got: &[u8], first_block: u64, base: u8) {
    for (i, blk) in got.chunks(B as usize).enumerate() {
        let want = (first_block + i as u64) as u8 + 1 + base;
        assert!(
            blk.iter().all(|b| *b == want),
            "block {} holds {:?}.., want {want}",
            first_block + i as u64,
            &blk[..4]
        );
    }
}

#[test]
fn copies_spill_to_the_file_when_memory_is_full() {
    let f = disk(64 * B, 2);
    let d = &f.disk;
    stamp_blocks(d, 8, 0);
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    // Blocks 0 and 1 fill the memory; 2 and 3 spill; the 3-block run 4..=6 spills whole.
    for i in 0..4 {
        d.write_at(&fill(0xEE, 1), i * B, false).expect("overwrite");
    }
    d.write_at(&fill(0xEE, 3), 4 * B, false)
        .expect("overwrite run");
    assert_eq!(d.cbw_copied_bytes(), 7 * B);
    assert_eq!(d.cbw_spilled_bytes(), 5 * B);
    assert_eq!(d.cbw_memory_bytes(), 2 * B);
    assert!(f.cbw_file_len() > 0, "spilled copies are in the file");
    // One read mixes memory, file and image (block 7 was not overwritten).
    assert_stamped(&read(&c.disks[0], 0, 8 * B), 0, 0);
    let mut buf = fill(0, 1);
    for i in 0..8 {
        assert!(
            c.disks[0].read_at(&mut buf, i * B).is_err(),
            "block {i} read twice"
        );
    }
    c.commit();
    assert_eq!(f.cbw_file_len(), 0, "the file is truncated at commit");
    assert_eq!(
        d.cbw_memory_bytes(),
        2 * B,
        "memory is kept for the next epoch"
    );
}

#[test]
fn without_memory_every_copy_goes_to_the_file() {
    let f = disk(16 * B, 0);
    let d = &f.disk;
    stamp_blocks(d, 4, 0);
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    d.write_at(&fill(0xEE, 4), 0, false).expect("overwrite");
    assert_eq!(d.cbw_spilled_bytes(), 4 * B);
    assert_eq!(d.cbw_copied_bytes(), 4 * B);
    assert_eq!(d.cbw_memory_bytes(), 0);
    assert_stamped(&read(&c.disks[0], 0, 2 * B), 0, 0);
    let mut buf = fill(0, 1);
    assert!(
        c.disks[0].read_at(&mut buf, B).is_err(),
        "file copies too are read once"
    );
    assert_stamped(&read(&c.disks[0], 2 * B, 2 * B), 2, 0);
    c.abort();
    assert_eq!(f.cbw_file_len(), 0, "the file is truncated at abort");
}

#[test]
fn shipped_copies_free_their_memory_during_the_epoch() {
    let f = disk(64 * B, 1);
    let d = &f.disk;
    stamp_blocks(d, 6, 0);
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    let fd = &c.disks[0];
    // One slot serves block after block as the shipper reads them.
    for i in 0..3 {
        d.write_at(&fill(0xEE, 1), i * B, false).expect("overwrite");
        assert_stamped(&read(fd, i * B, B), i, 0);
    }
    assert_eq!(d.cbw_spilled_bytes(), 0);
    // A copy read in parts stays until a read covers the whole block.
    d.write_at(&fill(0xEE, 1), 3 * B, false).expect("overwrite");
    let half = B / 2;
    assert_stamped(&read(fd, 3 * B, half), 3, 0);
    d.write_at(&fill(0xEE, 1), 4 * B, false).expect("overwrite");
    assert_eq!(
        d.cbw_spilled_bytes(),
        B,
        "the slot was still held by block 3"
    );
    assert_eq!(read(fd, 3 * B + half, half), fill(4, 1)[..half as usize]);
    assert_stamped(&read(fd, 3 * B, B), 3, 0);
    let mut buf = fill(0, 1);
    assert!(fd.read_at(&mut buf, 3 * B).is_err(), "read whole: shipped");
    d.write_at(&fill(0xEE, 1), 5 * B, false).expect("overwrite");
    assert_eq!(d.cbw_spilled_bytes(), B, "block 3's slot is free again");
    assert_stamped(&read(fd, 4 * B, 2 * B), 4, 0);
    assert_eq!(d.cbw_memory_bytes(), B);
    c.commit();
}

#[test]
fn commit_and_abort_release_every_slot_and_later_epochs_reuse_them() {
    let f = disk(64 * B, 4);
    let d = &f.disk;
    stamp_blocks(d, 8, 0);
    // Epoch 1: memory full, one spill, then the link fails before anything shipped.
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut 1");
    stamp_blocks(d, 5, 10);
    assert_eq!(d.cbw_spilled_bytes(), B);
    c.abort();
    // Epoch 2 ships blocks 0..8 again (abort merged them back): all 4 slots are free again.
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut 2");
    assert_eq!(c.disks[0].ranges(), vec![(0, 8 * B)]);
    stamp_blocks(d, 4, 20);
    assert_eq!(d.cbw_spilled_bytes(), B, "abort released the slots");
    let got = read(&c.disks[0], 0, 8 * B);
    assert_stamped(&got[..(5 * B) as usize], 0, 10);
    assert_stamped(&got[(5 * B) as usize..], 5, 0);
    c.commit();
    // Epochs 3..: same volume, same memory, nothing spilled.
    for e in 0..3u8 {
        stamp_blocks(d, 4, 30 + 10 * e);
        let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
        stamp_blocks(d, 4, 35 + 10 * e);
        assert_eq!(d.cbw_spilled_bytes(), B, "commit released the slots");
        assert_eq!(
            d.cbw_memory_bytes(),
            4 * B,
            "the same slots, not new memory"
        );
        assert_stamped(&read(&c.disks[0], 0, 4 * B), 0, 30 + 10 * e);
        c.commit();
    }
    assert_eq!(d.cbw_copied_bytes(), (5 + 4 + 3 * 4) * B);
}

#[test]
fn memory_stays_within_its_bound() {
    const MIB: u64 = 1 << 20;
    let f = disk(4 * MIB, 16);
    let d = &f.disk;
    d.write_at(&vec![0x11u8; (4 * MIB) as usize], 0, false)
        .expect("fill");
    d.mark_all_dirty().unwrap();
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    for m in 0..4 {
        d.write_at(&vec![0x22u8; MIB as usize], m * MIB, false)
            .expect("overwrite");
        assert!(d.cbw_memory_bytes() <= 16 * B);
    }
    assert_eq!(d.cbw_copied_bytes(), 4 * MIB);
    assert_eq!(d.cbw_spilled_bytes(), 4 * MIB - 16 * B);
    for m in 0..4 {
        assert_eq!(read(&c.disks[0], m * MIB, MIB), vec![0x11u8; MIB as usize]);
    }
    c.commit();
    assert_eq!(d.cbw_memory_bytes(), 16 * B);
}

#[test]
fn a_disk_that_never_copies_never_takes_memory() {
    let f = disk(1 << 20, 1 << 16);
    let d = &f.disk;
    stamp_blocks(d, 8, 0);
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    d.write_at(&fill(1, 1), 100 * B, false)
        .expect("write outside the cut");
    assert_stamped(&read(&c.disks[0], 0, 8 * B), 0, 0);
    d.write_at(&fill(1, 1), 0, false)
        .expect("write to a shipped block");
    c.commit();
    assert_eq!(d.cbw_copied_bytes(), 0);
    assert_eq!(d.cbw_memory_bytes(), 0);
}

#[test]
fn shipping_copies_in_memory_first_still_ships_every_block_once() {
    const MIB: u64 = 1 << 20;
    let f = disk(3 * MIB + 512, 64);
    let d = &f.disk;
    let size = d.size_bytes();
    let stamp = |b: u64| (b % 251) as u8 + 1;
    let content: Vec<u8> = (0..size).map(|i| stamp(i / B)).collect();
    d.write_at(&content, 0, false).expect("fill");
    d.mark_all_dirty().unwrap();
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    let fd = &c.disks[0];
    for blk in [5, 6, 300, 700, 767] {
        d.write_at(&fill(0xEE, 1), blk * B, false)
            .expect("overwrite");
    }
    d.write_at(&[0xEE; 512], 3 * MIB, false)
        .expect("overwrite the partial tail");
    assert_eq!(
        fd.ranges_in_memory(),
        vec![
            (5 * B, 2 * B),
            (300 * B, B),
            (700 * B, B),
            (767 * B, B + 512)
        ]
    );
    assert_eq!(fd.in_memory_bytes(), (6 * B, 64 * B));
    let mut shipped = vec![0u8; size as usize];
    let mut ship = |off: u64, len: u64| {
        fd.read_at(&mut shipped[off as usize..(off + len) as usize], off)
            .expect("frozen read");
    };
    for (off, len) in fd.ranges_in_memory() {
        ship(off, len);
    }
    assert_eq!(fd.in_memory_bytes().0, 0, "read copies free their memory");
    assert!(fd.ranges_in_memory().is_empty());
    // The rest, in 1 MiB-bounded runs that skip what was shipped.
    let mut runs = Vec::new();
    let mut pos = 0;
    while let Some((off, len)) = fd.next_unshipped(pos, MIB) {
        assert!(off >= pos && len > 0);
        assert_eq!(
            off / MIB,
            (off + len - 1) / MIB,
            "{off}+{len} crosses a MiB"
        );
        ship(off, len);
        runs.push((off, len));
        pos = off + len;
    }
    assert_eq!(
        runs,
        vec![
            (0, 5 * B),
            (7 * B, 249 * B),
            (256 * B, 44 * B),
            (301 * B, 211 * B),
            (512 * B, 188 * B),
            (701 * B, 66 * B),
        ]
    );
    assert!(shipped == content, "every block as of the cut");
    assert_eq!(fd.next_unshipped(0, MIB), None);
    // Blocks skipped as holes count as shipped too; a copy not yet read does not.
    c.commit();
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("ship the overwrites");
    let mut pos = 0;
    while let Some((off, len)) = c.disks[0].next_unshipped(pos, MIB) {
        read(&c.disks[0], off, len);
        pos = off + len;
    }
    c.commit();
    d.trim(MIB, MIB, false).expect("punch");
    d.write_at(&fill(1, 1), 2 * MIB, false).expect("w");
    let mut c = cut(&f.gate, std::slice::from_ref(d)).expect("cut 2");
    let fd = c.disks.pop().expect("one disk");
    d.write_at(&fill(2, 1), 2 * MIB, false).expect("overwrite");
    assert!(fd.skip_if_hole(MIB, MIB).expect("hole"));
    assert_eq!(fd.next_unshipped(0, 4 * MIB), Some((2 * MIB, B)));
    assert_eq!(fd.next_unshipped(2 * MIB + 1, MIB), None, "from rounds up");
    assert_eq!(fd.next_unshipped(0, MIB), Some((2 * MIB, B)));
    assert_eq!(read(&fd, 2 * MIB, B), fill(1, 1));
    assert_eq!(fd.next_unshipped(0, MIB), None);
    d.write_at(&fill(3, 1), 0, false).expect("w");
    c.commit();
    assert_eq!(fd.next_unshipped(0, MIB), None, "nothing after commit");
}

#[test]
fn memory_can_be_released_between_cuts_only() {
    let f = disk(64 * B, 8);
    let d = &f.disk;
    stamp_blocks(d, 4, 0);
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    stamp_blocks(d, 4, 10);
    assert_eq!(d.cbw_memory_bytes(), 4 * B);
    assert_eq!(d.release_cbw_memory(), 0, "not while a cut is outstanding");
    assert_stamped(&read(&c.disks[0], 0, 4 * B), 0, 0);
    c.commit();
    assert_eq!(d.release_cbw_memory(), 4 * B);
    assert_eq!(d.cbw_memory_bytes(), 0);
    // The next epoch maps memory again.
    let c = cut(&f.gate, std::slice::from_ref(d)).expect("cut");
    stamp_blocks(d, 2, 20);
    assert_eq!(d.cbw_memory_bytes(), 2 * B);
    assert_eq!(d.cbw_spilled_bytes(), 0);
    assert_stamped(&read(&c.disks[0], 0, 4 * B), 0, 10);
    c.commit();
}

#[test]
fn spill_cap_abandons_the_epoch_and_never_fails_a_guest_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = CutGate::new();
    let spill_cap = 16 * B;
    let d = TrackedDisk::create_with(
        &dir.path().join("disk.img"),
        4 << 20,
        &dir.path().join("state"),
        gate.clone(),
        &DiskOptions {
            cbw_memory_bytes_max: 0,
            cbw_spill_bytes_max: Some(spill_cap),
        },
    )
    .expect("create");
    let region = 256; // blocks: 1 MiB
    d.write_at(&fill(0xA1, region), 0, false).expect("write A");
    let c = cut(&gate, std::slice::from_ref(&d)).expect("cut");
    // The guest rewrites the frozen MiB in 64 KiB writes: the first run (16 blocks) fits in
    // the spill cap, the next ones would not. Every write succeeds.
    for i in 0..region / 16 {
        d.write_at(&fill(0xB2, 16), i * 16 * B, false)
            .expect("a guest write never fails because of the spill cap");
    }
    assert_eq!(
        d.cbw_spilled_bytes(),
        spill_cap,
        "spilled up to the cap only"
    );
    let mut buf = vec![0u8; (region * B) as usize];
    let err = c.disks[0]
        .read_at(&mut buf, 0)
        .expect_err("the epoch was abandoned");
    assert!(
        err.to_string()
            .contains("copy-before-write spill cap reached"),
        "{err}"
    );
    c.abort();
    // The blocks stay dirty, the file is emptied, and the next cut ships the new content.
    assert_eq!(d.dirty_bytes(), region * B);
    assert_eq!(
        fs::metadata(dir.path().join("state/disk.cbw"))
            .expect("cbw")
            .len(),
        0
    );
    let c = cut(&gate, std::slice::from_ref(&d)).expect("next cut");
    assert_eq!(c.disks[0].ranges(), vec![(0, region * B)]);
    assert_eq!(read(&c.disks[0], 0, region * B), fill(0xB2, region));
    c.commit();
    assert_eq!(d.dirty_bytes(), 0);
}

/// Regression (review of AUDIT §9): the spill cap held per disk, so several disks (or VMs)
/// cutting at once on one filesystem could together spill everything that was free. The cap is
/// now a budget for all spills on the filesystem at once.
#[test]
fn spill_cap_is_shared_by_every_disk_on_the_filesystem() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A cap no other test uses: disks with the same explicit cap share one budget.
    let spill_cap = 24 * B;
    let make = |name: &str, gate: &Arc<CutGate>| {
        TrackedDisk::create_with(
            &dir.path().join(format!("{name}.img")),
            4 << 20,
            &dir.path().join(format!("{name}.state")),
            gate.clone(),
            &DiskOptions {
                cbw_memory_bytes_max: 0,
                cbw_spill_bytes_max: Some(spill_cap),
            },
        )
        .expect("create")
    };
    let (ga, gb) = (CutGate::new(), CutGate::new());
    let (a, b) = (make("a", &ga), make("b", &gb));
    a.write_at(&fill(0xA1, 16), 0, false).expect("write a");
    b.write_at(&fill(0xB1, 16), 0, false).expect("write b");
    let ca = cut(&ga, std::slice::from_ref(&a)).expect("cut a");
    let cb = cut(&gb, std::slice::from_ref(&b)).expect("cut b");
    // Disk a spills 16 blocks of the 24; disk b's 16 would pass its own cap but not the
    // filesystem's: its cut is abandoned, and its guest write still succeeds.
    a.write_at(&fill(0xA2, 16), 0, false)
        .expect("write a again");
    b.write_at(&fill(0xB2, 16), 0, false)
        .expect("a guest write never fails because of the spill cap");
    assert_eq!(a.cbw_spilled_bytes(), 16 * B);
    assert_eq!(b.cbw_spilled_bytes(), 0);
    let mut buf = vec![0u8; (16 * B) as usize];
    let err = cb.disks[0]
        .read_at(&mut buf, 0)
        .expect_err("b's cut was abandoned");
    assert!(err.to_string().contains("spill cap reached"), "{err}");
    assert_eq!(read(&ca.disks[0], 0, 16 * B), fill(0xA1, 16));
    cb.abort();
    // Once a's cut ends, its share is given back: b's next cut may spill again.
    ca.commit();
    let cb = cut(&gb, std::slice::from_ref(&b)).expect("cut b again");
    b.write_at(&fill(0xB3, 16), 0, false)
        .expect("write b again");
    assert_eq!(b.cbw_spilled_bytes(), 16 * B);
    assert_eq!(read(&cb.disks[0], 0, 16 * B), fill(0xB2, 16));
    cb.commit();
}
