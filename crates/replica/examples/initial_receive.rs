//! Times the replica side of an initial replication: builds an Initial delta in memory (like
//! T6: DATA in 4 MiB extents alternating with 4 MiB ZERO extents, 1 MiB frames), then streams
//! it into a fresh replica VM in 256 KiB pieces (as the HTTP body arrives) and commits.
//!
//! ```text
//! cargo run --release -p understudy-replica --example initial_receive -- [DATA_MIB] [RUNS] [COMPRESSIBLE_PERCENT]
//! ```
//! Defaults: 512 MiB of data (a 1 GiB disk), 3 runs, 0 % compressible (random data, stored raw
//! since it does not compress). The store lives in `$BENCH_DIR` or the system temp directory
//! (use a real file system: the commit's fsync is part of what is measured). Every run writes
//! into a new VM directory, so its pages are never warm from the previous run. Each run also
//! prints the CPU time the process used for receive + commit (`getrusage`, all threads) and
//! the CPU time the whole machine used meanwhile (`/proc/stat`, busy = not idle or iowait):
//! the kernel's writeback of page-cache pages runs in kworker threads, which `getrusage` does
//! not count; on a quiet machine the second figure includes it.
//! `BENCH_PAUSE_S=N` sleeps N seconds before each run: on a VM whose balloon reports free pages
//! to the host, pages freed by the previous run are then cold again (first touch is slow), so
//! every run sees the same, realistic, state of the page cache.
//! `BENCH_MODE=journal` times the same delta as seq 2 of a VM whose first point (one frame)
//! is already committed, i.e. received into `incoming/` and committed into the journal (the
//! path of every delta after the initial replication, T1).

use std::io::Write;
use std::time::Instant;

use delta::{Compression, DeltaHeader, DeltaKind, DeltaWriter, DiskEntry};
use replica::ReplicaStore;

const MIB: u64 = 1 << 20;
const KEY: [u8; 32] = [7u8; 32];

fn fill(buf: &mut [u8], mut x: u64) {
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// User + system CPU seconds used so far by every thread of this process.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Busy CPU seconds of the whole machine so far (all CPUs, everything but idle and iowait).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf only reads its argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let data_mib = args.first().copied().unwrap_or(512);
    let runs = args.get(1).copied().unwrap_or(3);
    let compressible = args.get(2).copied().unwrap_or(0);
    let disk = DiskEntry {
        index: 0,
        size_bytes: 2 * data_mib * MIB,
    };
    let journal = match std::env::var("BENCH_MODE").as_deref() {
        Ok("journal") => true,
        Ok("base") | Err(_) => false,
        Ok(other) => panic!("BENCH_MODE: base or journal, not {other}"),
    };
    let mut header = DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: delta::VmName::parse("bench").unwrap(),
        generation: delta::Generation(1),
        seq: delta::Seq(1),
        parent_seq: delta::Seq(0),
        cut_time_unix_ns: 1,
        kind: DeltaKind::Initial,
        compression: Compression::Zstd,
        disks: vec![disk],
    };
    // Journal mode: a one-frame first point, then the timed delta as seq 2.
    let first = {
        let mut w = DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
        w.data(0, 0, &[1u8; 4096]).unwrap();
        w.finish().unwrap().0
    };
    if journal {
        header.seq = delta::Seq(2);
        header.parent_seq = delta::Seq(1);
        header.kind = DeltaKind::Incremental;
    }
    let t = Instant::now();
    let mut w = DeltaWriter::new(Vec::new(), &header, &KEY).unwrap();
    let mut frame = vec![0u8; MIB as usize];
    for i in 0..data_mib {
        let extent = i / 4;
        let off = extent * 8 * MIB + (i % 4) * MIB;
        if i % 100 < compressible {
            frame.fill((i % 251) as u8 | 1);
            fill(&mut frame[..4096], i + 1);
        } else {
            fill(&mut frame, i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        }
        w.data(0, off, &frame).unwrap();
        if i % 4 == 3 {
            w.zero(0, off + MIB, 4 * MIB).unwrap();
        }
    }
    let (bytes, summary) = w.finish().unwrap();
    eprintln!(
        "delta: {} MiB data, {} MiB zero, {} MiB encoded, built in {:.2} s",
        summary.data_bytes / MIB,
        summary.zero_bytes / MIB,
        bytes.len() as u64 / MIB,
        t.elapsed().as_secs_f64()
    );
    let parent = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let pause_s: u64 = std::env::var("BENCH_PAUSE_S")
        .ok()
        .map(|v| v.parse().expect("BENCH_PAUSE_S: seconds"))
        .unwrap_or(0);
    let mut totals = Vec::new();
    for run in 1..=runs {
        std::thread::sleep(std::time::Duration::from_secs(pause_s));
        let dir = tempfile::tempdir_in(&parent).unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let vm = store
            .create_vm(
                &delta::VmName::parse("bench").unwrap(),
                delta::Generation(1),
                &[disk],
                KEY,
            )
            .unwrap();
        if journal {
            let mut inc = vm.begin_receive().unwrap();
            inc.write_all(&first).unwrap();
            vm.commit(inc).unwrap();
        }
        // Start from a quiet page cache: the previous run's dirty pages are not ours to wait on.
        unsafe { libc::sync() };
        let cpu0 = cpu_seconds();
        let busy0 = machine_busy_seconds();
        let t0 = Instant::now();
        let mut inc = vm.begin_receive().unwrap();
        for chunk in bytes.chunks(256 * 1024) {
            inc.write_all(chunk).unwrap();
        }
        let received = t0.elapsed();
        let point = vm.commit(inc).unwrap();
        let total = t0.elapsed();
        let cpu = cpu_seconds() - cpu0;
        // Writeback still running after the commit's fsync is not ours; the fsync waited for
        // everything the point needs.
        let busy = machine_busy_seconds() - busy0;
        assert_eq!(point.seq, header.seq);
        println!(
            "run {run}: receive {:.3} s + commit {:.3} s = {:.3} s ({:.0} MiB/s of data), CPU {:.3} s, machine {:.2} s",
            received.as_secs_f64(),
            (total - received).as_secs_f64(),
            total.as_secs_f64(),
            summary.data_bytes as f64 / MIB as f64 / total.as_secs_f64(),
            cpu,
            busy
        );
        totals.push(total.as_secs_f64());
        drop((vm, store));
    }
    totals.sort_by(f64::total_cmp);
    println!("median {:.3} s", totals[totals.len() / 2]);
}
