//! `replica::Overlay` from the outside: served over NBD and driven by the real `qemu-io`, and
//! killed with SIGKILL in the middle of unflushed writes (a real process, not a drop).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::{BlockBackend, MemoryBackend, NbdServer, ServerConfig, StaticRegistry};
use proto::Seq;
use replica::{Overlay, ReplicaStore};

use common::{disks, send, vm_id, Model, Op, KEY};
use delta::{Compression, DeltaKind};

const BS: usize = 4096;
const MIB: usize = 1 << 20;
/// Env variable that turns `kill_child_writer` into the child of the kill test.
const CHILD_DIR_ENV: &str = "UNDERSTUDY_OVERLAY_KILL_DIR";
/// How long the kill test waits for its child to flush (it takes milliseconds).
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Fails the test (never skips it) when a tool is missing.
fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is required: apt-get install -y {package}");
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {args:?}: {text}");
    assert!(!text.contains("failed"), "qemu-io {args:?}: {text}");
    text
}

#[test]
fn qemu_io_writes_and_reads_through_the_overlay_and_the_base_is_untouched() {
    need("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().expect("tempdir");
    let ov_dir = dir.path().join("ov");
    let content = vec![0x5a; 8 * MIB];
    let base = Arc::new(MemoryBackend::read_only(content.clone()));
    let ov = Arc::new(Overlay::create(&ov_dir, base.clone(), Seq(3), 0).expect("create"));
    let registry = Arc::new(StaticRegistry::new());
    registry.add("failover", ov.clone() as Arc<dyn BlockBackend>);
    let socket = dir.path().join("nbd.sock");
    let server =
        NbdServer::serve_unix(&socket, registry.clone(), ServerConfig::default()).expect("serve");
    let uri = format!("nbd+unix:///failover?socket={}", socket.display());
    // Unaligned (sector) writes that cross blocks, a zeroed and a discarded range, a flush.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 512 4k",
            "write -P 0xcd 1M 1M",
            "write -z 3M 64k",
            "discard 4M 1M",
            "flush",
        ],
    );
    let out = qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 512",
            "read -P 0xab 512 4k",
            "read -P 0x5a 4608 3584",
            "read -P 0xcd 1M 1M",
            "read -P 0x5a 2M 1M",
            "read -P 0 3M 64k",
            "read -P 0 4M 1M",
            "read -P 0x5a 5M 3M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(server);
    registry.remove("failover");
    drop(ov);
    assert!(base.snapshot() == content, "the base was written");
    // What qemu-io flushed is in the files: reopen and compare with the expected disk.
    let ov = Overlay::open(&ov_dir, base, Seq(3), 0).expect("reopen");
    let mut want = content;
    want[512..512 + 4096].fill(0xab);
    want[MIB..2 * MIB].fill(0xcd);
    want[3 * MIB..3 * MIB + 65536].fill(0);
    want[4 * MIB..5 * MIB].fill(0);
    let mut got = vec![0; 8 * MIB];
    ov.read_at(&mut got, 0).expect("read");
    assert!(
        got == want,
        "reopened overlay differs from what qemu-io wrote"
    );
    let block = |b: usize| (b / BS) as u64;
    assert_eq!(
        ov.written_blocks(),
        vec![
            0..2,
            block(MIB)..block(2 * MIB),
            block(3 * MIB)..block(3 * MIB + 65536),
            block(4 * MIB)..block(5 * MIB),
        ]
    );
}

/// The base of the kill test: a different byte in every block.
fn kill_base() -> Vec<u8> {
    (0..64 * BS).map(|i| (i / BS) as u8 ^ 0x33).collect()
}

/// Full-block content of block `b` written at phase `n` (n = 0: before the flush).
fn stamp(b: usize, n: u64) -> Vec<u8> {
    let mut v = vec![(b as u8).wrapping_mul(7) ^ (n as u8); BS];
    v[..8].copy_from_slice(&n.to_le_bytes());
    v
}

/// What the child process of `flushed_writes_survive_sigkill_and_unflushed_blocks_are_whole`
/// does (the same test, re-run with the directory in the environment): write, flush, then keep
/// writing without a flush until it is killed. Never returns.
fn kill_child_writer(dir: &Path) {
    let base = Arc::new(MemoryBackend::read_only(kill_base()));
    let ov = Overlay::create(&dir.join("ov"), base, Seq(8), 1).expect("create");
    // Flushed: blocks 0..16 whole, one sector in each of 16..20.
    for b in 0..16 {
        ov.write_at(&stamp(b, 0), (b * BS) as u64, false)
            .expect("write");
    }
    for b in 16..20 {
        ov.write_at(&[0xee; 512], (b * BS + 1024) as u64, false)
            .expect("write");
    }
    ov.flush().expect("flush");
    std::fs::write(dir.join("flushed"), b"").expect("marker");
    // Never flushed: rewrite 0..8 (mapped) and write sectors into 32..64 (unmapped) until killed.
    for n in 1u64.. {
        for b in 0..8 {
            ov.write_at(&stamp(b, n), (b * BS) as u64, false)
                .expect("write");
        }
        let b = 32 + (n as usize % 32);
        ov.write_at(&[0x77; 512], (b * BS + 512) as u64, false)
            .expect("write");
        if n == 1 {
            std::fs::write(dir.join("unflushed"), b"").expect("marker");
        }
    }
}

#[test]
fn flushed_writes_survive_sigkill_and_unflushed_blocks_are_whole() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        // This run is the child the test below kills.
        kill_child_writer(Path::new(&dir));
        unreachable!("the child writes until it is killed");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "flushed_writes_survive_sigkill_and_unflushed_blocks_are_whole",
            "--nocapture",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .spawn()
        .expect("spawn child");
    let started = Instant::now();
    // The child has flushed, then written at least one round it never flushes.
    while !dir.path().join("unflushed").exists() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("child exited before writing: {status}");
        }
        assert!(
            started.elapsed() < CHILD_READY_TIMEOUT,
            "child never got to its unflushed writes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL
    child.wait().expect("reap");

    let content = kill_base();
    let base = Arc::new(MemoryBackend::read_only(content.clone()));
    let ov = Overlay::open(&dir.path().join("ov"), base, Seq(8), 1).expect("reopen");
    let mut got = vec![0; 64 * BS];
    ov.read_at(&mut got, 0).expect("read");
    let block = |b: usize| &got[b * BS..(b + 1) * BS];
    for b in 0..8 {
        // Flushed, then rewritten without a flush: one whole version, never a mix.
        let mut n = [0u8; 8];
        n.copy_from_slice(&block(b)[..8]);
        let n = u64::from_le_bytes(n);
        assert!(block(b) == stamp(b, n), "block {b} is torn (stamp {n})");
        // A process kill loses no page cache: the rewrite of a mapped block is still there.
        assert!(n >= 1, "block {b}: the unflushed rewrite vanished");
    }
    for b in 8..16 {
        assert!(block(b) == stamp(b, 0), "flushed block {b} lost");
    }
    for b in 16..20 {
        let mut want = content[b * BS..(b + 1) * BS].to_vec();
        want[1024..1536].fill(0xee);
        assert!(block(b) == want, "flushed partial write to block {b} lost");
    }
    for b in 20..64 {
        assert!(
            block(b) == &content[b * BS..(b + 1) * BS],
            "block {b} was never flushed and must read from the base"
        );
    }
    assert_eq!(ov.written_blocks(), vec![0..20]);
}

#[test]
fn an_overlay_over_a_point_view_keeps_its_point_while_replication_and_retention_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ReplicaStore::open(&dir.path().join("store")).expect("store");
    let vm = store
        .create_vm(&vm_id(), delta::Generation(1), &disks(), KEY)
        .expect("vm");
    let mut model = Model::new();
    let commit = |model: &mut Model, i: u64| {
        let kind = if i == 0 {
            DeltaKind::Initial
        } else {
            DeltaKind::Incremental
        };
        let ops = [Op::Data {
            disk: 0,
            block: i * 5,
            blocks: 8,
            seed: 100 + i as u8,
        }];
        let (bytes, images) = model.delta(kind, Compression::Zstd, &ops);
        send(&vm, &bytes).expect("commit");
        model.accept(images);
    };
    commit(&mut model, 0);
    commit(&mut model, 1);
    let point = Seq(2);
    let base = vm.point_disk(point, 0).expect("view");
    let ov_dir = dir.path().join("failover/web/disk0");
    let ov = Overlay::create(&ov_dir, base, point, 0).expect("create");
    ov.write_at(&[0xa5; 3000], 7 * BS as u64 + 100, true)
        .expect("write");
    let mut want = model.points[&2][&0].clone();
    want[7 * BS + 100..7 * BS + 3100].fill(0xa5);
    // Replication goes on under the failover disk, and retention keeps only the newest point,
    // except the one the overlay reads.
    commit(&mut model, 2);
    commit(&mut model, 3);
    vm.retain(1).expect("retain");
    assert!(
        vm.points().iter().any(|p| p.seq == point),
        "retention folded the point under the overlay"
    );
    let mut got = vec![0; want.len()];
    ov.read_at(&mut got, 0).expect("read");
    assert!(
        got == want,
        "overlay over the point differs from point + writes"
    );
    let image = dir.path().join("disk0.raw");
    ov.materialize(&image).expect("materialize");
    assert!(std::fs::read(&image).expect("image") == want);
    assert_eq!(ov.written_blocks(), vec![7..8]);
    // Once the overlay is gone, retention proceeds.
    drop(ov);
    vm.retain(1).expect("retain");
    assert_eq!(vm.points().len(), 1);
}
