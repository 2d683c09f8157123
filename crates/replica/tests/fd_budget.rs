//! File descriptors are budgeted, never exhausted (AUDIT §1). This test lowers the soft
//! `RLIMIT_NOFILE` of its process to 1024 (the systemd default), so it lives in its own
//! integration-test binary: no other test runs in this process.

use std::io::Write;

use delta::{Compression, DeltaHeader, DeltaKind, DeltaWriter, DiskEntry};
use replica::{ReplicaStore, ReplicaVm, JOURNAL_FDS_MAX};

const KEY: [u8; 32] = [7u8; 32];

fn name(s: &str) -> delta::VmName {
    delta::VmName::parse(s).unwrap()
}
const VMS: u64 = 100;
const POINTS: u64 = 100;
const BLOCK: u64 = 4096;
const DISK_BLOCKS: u64 = 128;
/// The soft limit systemd gives services.
const NOFILE_SOFT: u64 = 1024;

fn disk() -> Vec<DiskEntry> {
    vec![DiskEntry {
        index: 0,
        size_bytes: DISK_BLOCKS * BLOCK,
    }]
}

fn block_of(seq: u64) -> u64 {
    (seq - 1) % DISK_BLOCKS
}

fn content(vm: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![(vm % 251) as u8; BLOCK as usize];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b
}

/// A tiny delta: point `seq` of VM `vm` writes one block.
fn delta(vm: u64, seq: u64) -> Vec<u8> {
    let header = DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: name(&format!("vm-{vm}")),
        generation: delta::Generation(1),
        seq: delta::Seq(seq),
        parent_seq: delta::Seq(seq - 1),
        cut_time_unix_ns: seq * 1_000_000_000,
        kind: if seq == 1 {
            DeltaKind::Initial
        } else {
            DeltaKind::Incremental
        },
        compression: Compression::None,
        disks: disk(),
    };
    let mut w = DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
    w.data(0, block_of(seq) * BLOCK, &content(vm, seq)).unwrap();
    w.finish().unwrap().0
}

fn send(vm: &ReplicaVm, bytes: &[u8]) {
    let mut inc = vm.begin_receive().unwrap();
    inc.write_all(bytes).unwrap();
    vm.commit(inc).unwrap();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn set_nofile_soft(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, nothing else.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// Regression: the index held one open descriptor per retained journal file, so a replica with
/// about 10 VMs × 100 points hit EMFILE under the usual 1024 soft limit and every later commit
/// failed. Now journal files are opened on demand through a bounded cache.
#[test]
fn hundred_vms_of_hundred_points_fit_in_1024_fds() {
    set_nofile_soft(NOFILE_SOFT);
    // Base images (one per VM disk), the journal cache, and a little for the test itself.
    let bound = VMS as usize + JOURNAL_FDS_MAX + 32;
    // On tmpfs when there is one: this test is about descriptors, and 10,000 commits' fsyncs
    // on a real disk would only make it slow.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    let vms: Vec<_> = (0..VMS)
        .map(|v| {
            store
                .create_vm(
                    &name(&format!("vm-{v}")),
                    delta::Generation(1),
                    &disk(),
                    KEY,
                )
                .unwrap()
        })
        .collect();
    let mut peak = 0;
    for seq in 1..=POINTS {
        for (v, vm) in vms.iter().enumerate() {
            send(vm, &delta(v as u64, seq));
        }
        // Reads of older points go through the cache too.
        let vm = &vms[(seq % VMS) as usize];
        let mut buf = vec![0u8; BLOCK as usize];
        vm.point_disk(delta::Seq(seq), 0)
            .unwrap()
            .read_at(&mut buf, block_of(seq) * BLOCK)
            .unwrap();
        peak = peak.max(open_fds());
    }
    assert!(peak <= bound, "{peak} descriptors open, bound {bound}");
    drop(vms);
    drop(store);

    // Reopen under the same limit: every point of every VM reads back.
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.broken().is_empty(), "{:?}", store.broken());
    assert!(store.pending().is_empty(), "{:?}", store.pending());
    for v in 0..VMS {
        let vm = store.vm(&name(&format!("vm-{v}"))).unwrap();
        assert_eq!(vm.points().len() as u64, POINTS);
        assert_eq!(vm.damage(), None);
        let mut buf = vec![0u8; BLOCK as usize];
        for seq in 1..=POINTS {
            vm.point_disk(delta::Seq(seq), 0)
                .unwrap()
                .read_at(&mut buf, block_of(seq) * BLOCK)
                .unwrap();
            assert!(buf == content(v, seq), "vm-{v} point {seq}");
        }
    }
    let (held, capacity) = store.journal_fds();
    assert!(held <= capacity && capacity <= JOURNAL_FDS_MAX);
    assert!(open_fds() <= bound, "{} descriptors open", open_fds());
}
