//! Single-thread encode and decode throughput of the delta format.
//!
//! ```text
//! cargo run --release -p understudy-delta --example throughput [MiB per case, default 512] [FILE]
//! ```
//!
//! With FILE, its first 16 MiB are a fourth case (e.g. blocks a `fio` run wrote: fio's buffers
//! compress 4-6× at zstd level 1).
//!
//! For each workload it encodes `MiB` of data into a sink (encode MiB/s: zero detection is the
//! shipper's job, so this is framing + compression + hashing), then decodes the same amount
//! (a delta of at most 64 MiB is encoded once and decoded repeatedly; decode MiB/s includes
//! checksum, MAC and decompression into a fresh buffer, as `DeltaReader::next_frame` does).
//! Input bytes cycle through a 16 MiB pool so that generating them is not measured.

use std::io;
use std::time::Instant;

use delta::{Compression, DeltaHeader, DeltaKind, DeltaReader, DeltaWriter, DiskEntry};

const MIB: usize = 1 << 20;
const POOL_BYTES: usize = 16 * MIB;
const DECODE_DELTA_BYTES: usize = 64 * MIB;
const KEY: [u8; 32] = [5u8; 32];

fn header(disk_bytes: u64) -> DeltaHeader {
    DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: delta::VmName::parse("bench").unwrap(),
        generation: delta::Generation(1),
        seq: delta::Seq(1),
        parent_seq: delta::Seq(0),
        cut_time_unix_ns: 0,
        kind: DeltaKind::Initial,
        compression: Compression::Zstd,
        disks: vec![DiskEntry {
            index: 0,
            size_bytes: disk_bytes,
        }],
    }
}

fn random_pool() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(POOL_BYTES);
    while out.len() < POOL_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Text-like blocks: records with a counter and some varying words; zstd -1 gets ~4-6×.
fn compressible_pool() -> Vec<u8> {
    let words = [
        "alpha ", "bravo ", "charlie ", "delta ", "echo ", "foxtrot ", "golf ", "hotel ",
    ];
    let mut out = Vec::with_capacity(POOL_BYTES);
    let mut i: u64 = 0;
    while out.len() < POOL_BYTES {
        let line = format!(
            "{i:012} {}{}{}value={}\n",
            words[(i % 8) as usize],
            words[((i / 8) % 8) as usize],
            words[((i * 7) % 8) as usize],
            i.wrapping_mul(2_654_435_761) % 100_000
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(POOL_BYTES);
    out
}

struct Case {
    name: &'static str,
    pool: Vec<u8>,
    /// Bytes handed to `DeltaWriter::data` per call (the writer frames by 1 MiB).
    write_bytes: usize,
}

fn encode(case: &Case, total: usize, out: impl io::Write) -> io::Result<(u64, u64)> {
    let disk_bytes = total.next_multiple_of(MIB) as u64;
    let mut w = DeltaWriter::new(out, &header(disk_bytes), &KEY).map_err(io::Error::other)?;
    let mut off = 0usize;
    while off < total {
        let n = case.write_bytes.min(total - off);
        let src = off % POOL_BYTES;
        let n = n.min(POOL_BYTES - src);
        w.data(0, off as u64, &case.pool[src..src + n])
            .map_err(io::Error::other)?;
        off += n;
    }
    let (_, s) = w.finish().map_err(io::Error::other)?;
    Ok((s.stored_bytes, s.frames))
}

fn main() -> io::Result<()> {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MiB per case"))
        .unwrap_or(512);
    let total = mib * MIB;
    let mut cases = vec![
        Case {
            name: "random, 1 MiB frames",
            pool: random_pool(),
            write_bytes: MIB,
        },
        Case {
            name: "compressible, 1 MiB frames",
            pool: compressible_pool(),
            write_bytes: MIB,
        },
        Case {
            name: "random, 16 KiB frames",
            pool: random_pool(),
            write_bytes: 16 * 1024,
        },
    ];
    if let Some(path) = std::env::args().nth(2) {
        let mut pool = std::fs::read(&path)?;
        pool.truncate(POOL_BYTES);
        if pool.len() < POOL_BYTES {
            return Err(io::Error::other(format!("{path}: need at least 16 MiB")));
        }
        cases.push(Case {
            name: "file, 1 MiB frames",
            pool,
            write_bytes: MIB,
        });
    }
    println!(
        "{:<28} {:>12} {:>12} {:>10} {:>8}",
        "case", "encode MiB/s", "decode MiB/s", "ratio", "frames"
    );
    for case in &cases {
        let t = Instant::now();
        let (stored, frames) = encode(case, total, io::sink())?;
        let enc = t.elapsed().as_secs_f64();

        let piece = total.min(DECODE_DELTA_BYTES);
        let mut bytes = Vec::new();
        encode(case, piece, &mut bytes)?;
        let t = Instant::now();
        let mut decoded = 0usize;
        while decoded < total {
            let mut r = DeltaReader::new(&bytes[..], &KEY).map_err(io::Error::other)?;
            while let Some(f) = r.next_frame().map_err(io::Error::other)? {
                std::hint::black_box(&f);
            }
            decoded += piece;
        }
        let dec = t.elapsed().as_secs_f64();
        println!(
            "{:<28} {:>12.0} {:>12.0} {:>10.3} {:>8}",
            case.name,
            total as f64 / MIB as f64 / enc,
            decoded as f64 / MIB as f64 / dec,
            stored as f64 / total as f64,
            frames
        );
    }
    Ok(())
}
