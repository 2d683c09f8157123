//! Measures the tracker's write-path overhead: 4 KiB random writes from several threads,
//! raw `pwrite` on the image versus `TrackedDisk::write_at`, idle and while replicating (a cut
//! every 200 ms, shipped by another thread through `FrozenDisk::read_at`, then committed).
//! Prints IOPS and ratios; no assertion (timing does not belong in tests).
//!
//! `cargo run --release -p understudy-tracker --example write_path [dir] [seconds]`

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbd::BlockBackend;
use understudy_tracker::{cut, CutGate, TrackedDisk, BLOCK_BYTES};

const DISK_BYTES: u64 = 1 << 30;
const THREADS: u64 = 4;

fn run(seconds: f64, write: impl Fn(u64, &[u8]) + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (stop, ops, write) = (&stop, &ops, &write);
            s.spawn(move || {
                let buf = vec![t as u8 + 1; BLOCK_BYTES as usize];
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    write((x % (DISK_BYTES / BLOCK_BYTES)) * BLOCK_BYTES, &buf);
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    ops.load(Ordering::Relaxed) as f64 / seconds
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let dir = tempfile::tempdir_in(base)?;

    let raw_path = dir.path().join("raw.img");
    let raw = std::fs::File::create(&raw_path)?;
    raw.set_len(DISK_BYTES)?;
    // Warm-up passes allocate the images' blocks (and make the tracker's extents hot), so the
    // measured passes compare steady states.
    run(seconds, |off, b| raw.write_all_at(b, off).expect("pwrite"));
    let raw_iops = run(seconds, |off, b| raw.write_all_at(b, off).expect("pwrite"));

    let gate = CutGate::new();
    let disk = TrackedDisk::create(
        &dir.path().join("t.img"),
        DISK_BYTES,
        &dir.path().join("state"),
        gate.clone(),
    )?;
    run(seconds, |off, b| {
        disk.write_at(b, off, false).expect("write")
    });
    let idle_iops = run(seconds, |off, b| {
        disk.write_at(b, off, false).expect("write")
    });

    let replicating = AtomicBool::new(true);
    let cuts = AtomicU64::new(0);
    let pause_us_max = AtomicU64::new(0);
    let busy_iops = std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; 1 << 20];
            while replicating.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let c = cut(&gate, std::slice::from_ref(&disk)).expect("cut");
                pause_us_max.fetch_max(c.pause.as_micros() as u64, Ordering::Relaxed);
                for (off, len) in c.disks[0].ranges() {
                    let mut pos = off;
                    while pos < off + len {
                        let n = (off + len - pos).min(buf.len() as u64);
                        c.disks[0]
                            .read_at(&mut buf[..n as usize], pos)
                            .expect("frozen read");
                        pos += n;
                    }
                }
                c.commit();
                cuts.fetch_add(1, Ordering::Relaxed);
            }
        });
        let iops = run(seconds, |off, b| {
            disk.write_at(b, off, false).expect("write")
        });
        replicating.store(false, Ordering::Relaxed);
        iops
    });
    let started = Instant::now();
    disk.shutdown_clean()?;
    println!("threads {THREADS}, 4 KiB random writes, {seconds} s each");
    println!("raw pwrite           {raw_iops:>12.0} IOPS");
    println!(
        "tracked, idle        {idle_iops:>12.0} IOPS  ratio {:.3}",
        idle_iops / raw_iops
    );
    println!(
        "tracked, replicating {busy_iops:>12.0} IOPS  ratio {:.3}  ({} cuts, max pause {} us)",
        busy_iops / raw_iops,
        cuts.load(Ordering::Relaxed),
        pause_us_max.load(Ordering::Relaxed)
    );
    println!("clean shutdown {:?}", started.elapsed());
    Ok(())
}
