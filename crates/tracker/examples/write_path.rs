//! Measures the tracker's write path. No assertion (timing does not belong in tests).
//!
//! Mode `overhead` (default): 4 KiB random writes from several threads, raw `pwrite` on the
//! image versus `TrackedDisk::write_at`, idle and while replicating (a cut every 200 ms, shipped
//! by another thread through `FrozenDisk::read_at`, then committed). Prints IOPS and ratios.
//!
//! Mode `cbw`: the cost of copy-before-write. Each epoch freezes the whole disk
//! (`mark_all_dirty` + `cut`) and reads it back in 1 MiB chunks at a capped rate (the daemon's
//! shipper also compresses and encrypts; ~150 MiB/s was measured in the T1 benchmark), while
//! writer threads make one pass over the frozen disk: 256 MiB of 4 KiB random writes, or the
//! whole disk in 1 MiB sequential writes. Nearly every write into a block not yet shipped pays a
//! copy. As many passes with no cut outstanding are the reference. Prints per pattern the
//! writes/s of the passes and the writer threads' CPU time per write (`getrusage`
//! `RUSAGE_THREAD`: the write and its copy, whoever else loads the machine), and per epoch the
//! process's CPU time (`RUSAGE_SELF`: also the reading shipper), the machine's busy CPU time (`/proc/stat`: also the kernel's writeback threads;
//! noisy on a shared machine), bytes copied and bytes the process caused to be written to
//! storage (`/proc/self/io`).
//!
//! `cargo run --release -p understudy-tracker --example write_path [dir] [seconds] [mode]`
//! `... write_path [dir] [epochs] cbw [ship MiB/s] [CBW memory MiB, default 256] [order]
//! [writer threads, default 4]`
//!
//! `order` is `disk` (default: frozen ranges in disk order, as the daemon's shipper does),
//! `memory-first` (whenever copies fill half of the memory, read them first, then go on
//! with `next_unshipped`), or `after-pass` (in disk order, but only once the writers are done:
//! every first write to a block copies, which isolates the cost of a copy). One writer thread gives the steadiest CPU-per-write figures on a
//! shared machine (no contention on the image's inode lock).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::BlockBackend;
use understudy_tracker::{
    cut, CutGate, DiskOptions, TrackedDisk, BLOCK_BYTES, CBW_MEMORY_BYTES_MAX_DEFAULT,
};

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
    match args.get(3).map(String::as_str).unwrap_or("overhead") {
        "overhead" => overhead(dir.path(), seconds),
        "cbw" => {
            let ship_mib_s: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(150.0);
            let options = DiskOptions {
                cbw_memory_bytes_max: args
                    .get(5)
                    .and_then(|s| s.parse::<u64>().ok())
                    .map_or(CBW_MEMORY_BYTES_MAX_DEFAULT, |mib| mib << 20),
                ..DiskOptions::default()
            };
            let (memory_first, after_pass) = match args.get(6).map(String::as_str).unwrap_or("disk")
            {
                "disk" => (false, false),
                "memory-first" => (true, false),
                "after-pass" => (false, true),
                other => return Err(format!("unknown order {other:?}").into()),
            };
            let config = CbwConfig {
                writers: args.get(7).and_then(|s| s.parse().ok()).unwrap_or(THREADS),
                epochs: seconds.max(1.0) as u64,
                ship_bytes_per_s: ship_mib_s * f64::from(1 << 20),
                memory_first,
                after_pass,
            };
            cbw(dir.path(), &config, &options)
        }
        other => Err(format!("unknown mode {other:?} (overhead or cbw)").into()),
    }
}

fn overhead(dir: &Path, seconds: f64) -> Result<(), Box<dyn std::error::Error>> {
    let raw_path = dir.join("raw.img");
    let raw = std::fs::File::create(&raw_path)?;
    raw.set_len(DISK_BYTES)?;
    // Warm-up passes allocate the images' blocks (and make the tracker's extents hot), so the
    // measured passes compare steady states.
    run(seconds, |off, b| raw.write_all_at(b, off).expect("pwrite"));
    let raw_iops = run(seconds, |off, b| raw.write_all_at(b, off).expect("pwrite"));

    let gate = CutGate::new();
    let disk = TrackedDisk::create(
        &dir.join("t.img"),
        DISK_BYTES,
        &dir.join("state"),
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

/// Disk of the `cbw` mode: the 512 MiB of the benchmark's quick mode.
const CBW_DISK_BYTES: u64 = 512 << 20;
const SHIP_CHUNK_BYTES: u64 = 1 << 20;

struct Pattern {
    name: &'static str,
    write_bytes: u64,
    sequential: bool,
    /// Writes per pass.
    writes: u64,
}

/// Counters sampled before and after the measured epochs.
#[derive(Clone, Copy)]
struct Sample {
    cpu_s: f64,
    machine_busy_s: f64,
    storage_write_bytes: u64,
    copied_bytes: u64,
    spilled_bytes: u64,
}

fn sample(disk: &TrackedDisk) -> Sample {
    Sample {
        cpu_s: process_cpu_seconds(),
        machine_busy_s: machine_busy_seconds(),
        storage_write_bytes: storage_write_bytes(),
        copied_bytes: disk.cbw_copied_bytes(),
        spilled_bytes: disk.cbw_spilled_bytes(),
    }
}

/// User + system CPU time of this process (all threads).
fn process_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct owned by this frame and reads nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Busy CPU time of the whole machine (every state but idle and iowait), from `/proc/stat`.
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let Some(line) = stat.lines().next() else {
        return f64::NAN;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return f64::NAN;
    }
    // SAFETY: sysconf only reads its argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (v.iter().take(8).sum::<f64>() - v[3] - v[4]) / hz
}

/// Bytes this process caused to be sent to storage (`write_bytes` of `/proc/self/io`).
fn storage_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

struct CbwConfig {
    writers: u64,
    epochs: u64,
    ship_bytes_per_s: f64,
    memory_first: bool,
    after_pass: bool,
}

fn cbw(
    dir: &Path,
    config: &CbwConfig,
    options: &DiskOptions,
) -> Result<(), Box<dyn std::error::Error>> {
    let epochs = config.epochs;
    let gate = CutGate::new();
    let disk = TrackedDisk::create_with(
        &dir.join("t.img"),
        CBW_DISK_BYTES,
        &dir.join("state"),
        gate.clone(),
        options,
    )?;
    // Fill the disk so that frozen blocks hold data, and make every extent hot.
    let fill = vec![0x5Au8; SHIP_CHUNK_BYTES as usize];
    for off in (0..CBW_DISK_BYTES).step_by(SHIP_CHUNK_BYTES as usize) {
        disk.write_at(&fill, off, false)?;
    }
    disk.flush()?;
    let patterns = [
        Pattern {
            name: "4 KiB random",
            write_bytes: BLOCK_BYTES,
            sequential: false,
            writes: (256 << 20) / BLOCK_BYTES,
        },
        Pattern {
            name: "1 MiB sequential",
            write_bytes: 1 << 20,
            sequential: true,
            writes: CBW_DISK_BYTES >> 20,
        },
    ];
    println!(
        "cbw: {} MiB disk frozen whole, shipped at <= {} MiB/s{}, {} writer threads, {epochs} epochs per pattern, CBW memory {} MiB",
        CBW_DISK_BYTES >> 20,
        config.ship_bytes_per_s / f64::from(1 << 20),
        match (config.memory_first, config.after_pass) {
            (true, _) => " copies in memory first",
            (_, true) => " after each pass",
            _ => " in disk order",
        },
        config.writers,
        options.cbw_memory_bytes_max >> 20
    );
    for p in &patterns {
        let r = cbw_run(&disk, &gate, p, config);
        let per = |x: f64| x / epochs as f64;
        let n = (r.writes * epochs) as f64;
        let writes_s = |t: PassTime| n / t.wall.as_secs_f64();
        let cpu_us = |t: PassTime| t.cpu_s * 1e6 / n;
        println!(
            "{:<17} writes/s: frozen {:>8.0}, reference {:>8.0} (ratio {:.2}) | writer CPU per write: frozen {:.1} us, reference {:.1} us | per epoch: process CPU {:.2} s, machine busy {:.2} s, copied {} MiB (spilled {} MiB), storage writes {} MiB, shipping {:.2} s | pool {} MiB",
            p.name,
            writes_s(r.frozen),
            writes_s(r.reference),
            writes_s(r.frozen) / writes_s(r.reference),
            cpu_us(r.frozen),
            cpu_us(r.reference),
            per(r.after.cpu_s - r.before.cpu_s),
            per(r.after.machine_busy_s - r.before.machine_busy_s),
            per((r.after.copied_bytes - r.before.copied_bytes) as f64) as u64 >> 20,
            per((r.after.spilled_bytes - r.before.spilled_bytes) as f64) as u64 >> 20,
            per((r.after.storage_write_bytes - r.before.storage_write_bytes) as f64) as u64 >> 20,
            per(r.shipping.as_secs_f64()),
            disk.cbw_memory_bytes() >> 20,
        );
    }
    disk.shutdown_clean()?;
    Ok(())
}

struct CbwReport {
    before: Sample,
    after: Sample,
    /// Writes per pass.
    writes: u64,
    /// Sums over the epochs' passes.
    frozen: PassTime,
    reference: PassTime,
    shipping: Duration,
}

/// Wall time and the writer threads' CPU time of one pass.
#[derive(Default, Clone, Copy)]
struct PassTime {
    wall: Duration,
    cpu_s: f64,
}

impl std::ops::AddAssign for PassTime {
    fn add_assign(&mut self, o: PassTime) {
        self.wall += o.wall;
        self.cpu_s += o.cpu_s;
    }
}

/// CPU time of the calling thread.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct owned by this frame and reads nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One pass of `p` over `disk` by `writers` threads.
fn pass(disk: &TrackedDisk, p: &Pattern, writers: u64, seed: u64) -> PassTime {
    let next = AtomicU64::new(0);
    let slots = CBW_DISK_BYTES / p.write_bytes;
    let started = Instant::now();
    let cpu_s: f64 = std::thread::scope(|s| {
        let writers: Vec<_> = (0..writers)
            .map(|t| {
                let next = &next;
                s.spawn(move || {
                    let cpu0 = thread_cpu_seconds();
                    let buf = vec![t as u8 + 1; p.write_bytes as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= p.writes {
                            break;
                        }
                        let slot = if p.sequential {
                            i % slots
                        } else {
                            // splitmix64 of (seed, i): uniform, different in every pass.
                            let mut x = (seed << 32 ^ i).wrapping_add(0x9E37_79B9_7F4A_7C15);
                            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                            (x ^ (x >> 31)) % slots
                        };
                        disk.write_at(&buf, slot * p.write_bytes, false)
                            .expect("write");
                    }
                    thread_cpu_seconds() - cpu0
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().expect("writer")).sum()
    });
    PassTime {
        wall: started.elapsed(),
        cpu_s,
    }
}

/// Reads every frozen range of `c` in 1 MiB chunks, at most `bytes_per_s`.
fn ship_throttled(c: &understudy_tracker::Cut, config: &CbwConfig) {
    let fd = &c.disks[0];
    let mut buf = vec![0u8; SHIP_CHUNK_BYTES as usize];
    let started = Instant::now();
    let mut shipped = 0u64;
    let mut read = |off: u64, len: u64| {
        let mut pos = off;
        while pos < off + len {
            let n = (SHIP_CHUNK_BYTES - pos % SHIP_CHUNK_BYTES).min(off + len - pos);
            fd.read_at(&mut buf[..n as usize], pos)
                .expect("frozen read");
            pos += n;
            shipped += n;
            let due = Duration::from_secs_f64(shipped as f64 / config.ship_bytes_per_s);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    };
    if !config.memory_first {
        for (off, len) in fd.ranges() {
            read(off, len);
        }
        return;
    }
    let mut pos = 0;
    loop {
        let (in_memory, bound) = fd.in_memory_bytes();
        if in_memory > 0 && in_memory >= bound / 2 {
            for (off, len) in fd.ranges_in_memory() {
                read(off, len);
            }
        }
        let Some((off, len)) = fd.next_unshipped(pos, SHIP_CHUNK_BYTES) else {
            break;
        };
        read(off, len);
        pos = off + len;
    }
}

fn cbw_run(disk: &Arc<TrackedDisk>, gate: &CutGate, p: &Pattern, config: &CbwConfig) -> CbwReport {
    let epochs = config.epochs;
    let mut reference = PassTime::default();
    for e in 0..epochs {
        reference += pass(disk, p, config.writers, 1000 + e);
    }
    let before = sample(disk);
    let mut frozen = PassTime::default();
    let mut shipping = Duration::ZERO;
    for e in 1..=epochs {
        disk.mark_all_dirty().unwrap();
        let c = cut(gate, std::slice::from_ref(disk)).expect("cut");
        std::thread::scope(|s| {
            let writers = s.spawn(|| pass(disk, p, config.writers, e));
            if config.after_pass {
                while !writers.is_finished() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let started = Instant::now();
            ship_throttled(&c, config);
            shipping += started.elapsed();
            frozen += writers.join().expect("writers");
        });
        c.commit();
    }
    let after = sample(disk);
    CbwReport {
        before,
        after,
        writes: p.writes,
        frozen,
        reference,
        shipping,
    }
}
