//! Model test with a cut checker (RELIABILITY.md "the oracle"): writer threads issue stamped
//! whole-block writes, trims and write-zeroes on two disks of one VM while the main thread
//! cuts, ships every frozen range through `FrozenDisk::read_at` (concurrently with the
//! writes), and commits or aborts. Shipped deltas are replayed onto a model replica; after each
//! commit the replica must be a valid cut of the history:
//!
//! 1. every block holds content that was actually written (or zeros), never torn data;
//! 2. there is one instant T, inside the `cut()` call, such that every block holds the last
//!    operation on it issued before T, and no operation acknowledged before T is missing.
//!
//! Each case also picks the size of the disks' copy-before-write memory (none, a few blocks, or
//! plenty), so copies land in memory, in the spill file, or both within one epoch and one read.
//!
//! Each block is owned by one writer thread (never two writes in flight on a block), so a
//! block's history is a sequence. A global logical clock stamps each operation's issue (before
//! the call) and acknowledgement (after it returns). Content for block b is op k iff
//! issue(k) < T < ack(k+1); the checker looks for a T satisfying every block at once, which is
//! also write-order fidelity across both disks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use nbd::BlockBackend;
use proptest::prelude::*;
use understudy_tracker::{cut, CutGate, DiskOptions, TrackedDisk, BLOCK_BYTES, EXTENT_BYTES};

const B: u64 = BLOCK_BYTES;
const DISKS: usize = 2;
const THREADS: u64 = 3;
/// Blocks owned by each thread on each disk; regions sit in different 4 MiB extents so the
/// activity log's group commit is exercised concurrently too.
const REGION_BLOCKS: u64 = 6;
const DISK_BYTES: u64 = THREADS * EXTENT_BYTES;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write { fua: bool },
    Trim,
    Zero { may_trim: bool },
}

#[derive(Debug, Clone, Copy)]
struct Op {
    disk: usize,
    first: u64,
    nblocks: u64,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct Step {
    /// Blocks per `read_at` call while shipping.
    chunk_blocks: u64,
    /// Abort after this many chunks (a failed transfer), or ship everything and commit.
    fail_after_chunks: Option<u64>,
    /// Yields between cuts, to let writers run.
    gap: u32,
    /// Ship the copies held in memory first, then the rest through `next_unshipped` (the
    /// order a shipper that frees copy memory early uses), instead of `ranges()` in order.
    memory_first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Zero,
    Write(u64),
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    issue: u64,
    ack: u64,
    content: Stamp,
}

type Key = (usize, u64); // (disk, block)

fn block_of(thread: u64, i: u64) -> u64 {
    thread * (EXTENT_BYTES / B) + i
}

fn tag(disk: usize, block: u64) -> u64 {
    ((disk as u64) << 40) | block
}

fn stamped(id: u64, disk: usize, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(B as usize);
    for i in 0..(B / 8) {
        let w = if i % 2 == 0 { id } else { tag(disk, block) };
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Decodes a block; a torn or foreign block fails the test (checker rule 1).
fn decode(bytes: &[u8], disk: usize, block: u64) -> Result<Stamp, String> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(Stamp::Zero);
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let id = word(0);
    for i in 0..bytes.len() / 8 {
        let want = if i % 2 == 0 { id } else { tag(disk, block) };
        if word(i) != want {
            return Err(format!(
                "disk {disk} block {block}: torn or foreign content at word {i}"
            ));
        }
    }
    Ok(Stamp::Write(id))
}

fn writer(
    thread: u64,
    disks: Vec<Arc<TrackedDisk>>,
    ops: Vec<Op>,
    clock: Arc<AtomicU64>,
) -> HashMap<Key, Vec<Rec>> {
    let mut hist: HashMap<Key, Vec<Rec>> = HashMap::new();
    for (seq, op) in ops.into_iter().enumerate() {
        let first = block_of(thread, op.first.min(REGION_BLOCKS - 1));
        let n = op.nblocks.min(block_of(thread, REGION_BLOCKS) - first);
        let d = &disks[op.disk];
        let id = (thread + 1) << 32 | (seq as u64 + 1);
        let issue = clock.fetch_add(1, Ordering::SeqCst);
        match op.kind {
            Kind::Write { fua } => {
                let data: Vec<u8> = (first..first + n)
                    .flat_map(|b| stamped(id, op.disk, b))
                    .collect();
                d.write_at(&data, first * B, fua)
                    .expect("guest write never fails");
            }
            Kind::Trim => d.trim(first * B, n * B, false).expect("trim"),
            Kind::Zero { may_trim } => d
                .write_zeroes(first * B, n * B, may_trim, false)
                .expect("zeroes"),
        }
        let ack = clock.fetch_add(1, Ordering::SeqCst);
        let content = match op.kind {
            Kind::Write { .. } => Stamp::Write(id),
            _ => Stamp::Zero,
        };
        for b in first..first + n {
            hist.entry((op.disk, b)).or_default().push(Rec {
                issue,
                ack,
                content,
            });
        }
        std::thread::yield_now();
    }
    hist
}

struct Snapshot {
    c0: u64,
    c1: u64,
    replica: HashMap<Key, Stamp>,
}

/// Checker rule 2: is there one instant T in (c0, c1) explaining every block?
fn check(snap: &Snapshot, hist: &HashMap<Key, Vec<Rec>>) -> Result<(), String> {
    // Candidate intervals (lo, hi) per block: T in (lo, hi) makes its content right.
    let mut per_block: Vec<(Key, Vec<(u64, u64)>)> = Vec::new();
    for t in 0..THREADS {
        for disk in 0..DISKS {
            for i in 0..REGION_BLOCKS {
                let key = (disk, block_of(t, i));
                let got = snap.replica.get(&key).copied().unwrap_or(Stamp::Zero);
                let recs = hist.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                let mut cands = Vec::new();
                if got == Stamp::Zero {
                    cands.push((0, recs.first().map_or(u64::MAX, |r| r.ack)));
                }
                for (k, r) in recs.iter().enumerate() {
                    if r.content == got {
                        cands.push((r.issue, recs.get(k + 1).map_or(u64::MAX, |n| n.ack)));
                    }
                }
                if cands.is_empty() {
                    return Err(format!("{key:?} holds {got:?}, which was never written"));
                }
                per_block.push((key, cands));
            }
        }
    }
    // The feasible set is a union of open intervals; if non-empty it contains x + 1/2 for
    // some lower bound x (or c0). Work in doubled units to stay in integers.
    let mut xs: Vec<u64> = vec![snap.c0];
    for (_, cands) in &per_block {
        xs.extend(
            cands
                .iter()
                .map(|c| c.0)
                .filter(|x| *x >= snap.c0 && *x < snap.c1),
        );
    }
    for x in xs {
        let t2 = 2 * x + 1;
        if t2 >= 2 * snap.c1 {
            continue;
        }
        if per_block.iter().all(|(_, cands)| {
            cands
                .iter()
                .any(|(lo, hi)| 2 * lo < t2 && t2 < hi.saturating_mul(2))
        }) {
            return Ok(());
        }
    }
    let stale: Vec<_> = per_block
        .iter()
        .filter(|(_, c)| !c.iter().any(|(lo, hi)| *lo < snap.c1 && *hi > snap.c0))
        .map(|(k, c)| format!("{k:?}: {c:?}"))
        .take(5)
        .collect();
    Err(format!("no single cut instant in ({}, {}) explains the replica; blocks impossible in the window: {stale:?}", snap.c0, snap.c1))
}

/// Ships a cut: reads every frozen range in chunks; returns the delta, or None when the
/// transfer "fails" (then the caller aborts).
fn ship(c: &understudy_tracker::Cut, step: &Step) -> Result<Option<Vec<(Key, Stamp)>>, String> {
    let mut delta = Vec::new();
    let mut chunks = 0;
    let chunk = step.chunk_blocks * B;
    for (disk, fd) in c.disks.iter().enumerate() {
        let mut read = |pos: u64, n: u64| -> Result<bool, String> {
            if step.fail_after_chunks == Some(chunks) {
                return Ok(false);
            }
            let mut buf = vec![0u8; n as usize];
            fd.read_at(&mut buf, pos)
                .map_err(|e| format!("frozen read at {pos}: {e}"))?;
            for (i, blk) in buf.chunks(B as usize).enumerate() {
                let b = pos / B + i as u64;
                delta.push(((disk, b), decode(blk, disk, b)?));
            }
            chunks += 1;
            std::thread::yield_now();
            Ok(true)
        };
        let mut ranges = fd.ranges();
        if step.memory_first {
            ranges = fd.ranges_in_memory();
        }
        for (off, len) in ranges {
            if off % B != 0 || len % B != 0 {
                return Err(format!("unaligned range {off}+{len}"));
            }
            let mut pos = off;
            while pos < off + len {
                let n = chunk.min(off + len - pos);
                if !read(pos, n)? {
                    return Ok(None);
                }
                pos += n;
            }
        }
        if step.memory_first {
            let mut pos = 0;
            while let Some((off, n)) = fd.next_unshipped(pos, chunk) {
                if !read(off, n)? {
                    return Ok(None);
                }
                pos = off + n;
            }
        }
    }
    Ok(Some(delta))
}

fn run(ops: Vec<Vec<Op>>, steps: Vec<Step>, pool_blocks: u64) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = CutGate::new();
    let options = DiskOptions {
        cbw_memory_bytes_max: pool_blocks * B,
        ..DiskOptions::default()
    };
    let disks: Vec<Arc<TrackedDisk>> = (0..DISKS)
        .map(|i| {
            TrackedDisk::create_with(
                &dir.path().join(format!("d{i}.img")),
                DISK_BYTES,
                &dir.path().join(format!("s{i}")),
                gate.clone(),
                &options,
            )
            .expect("create disk")
        })
        .collect();
    let clock = Arc::new(AtomicU64::new(1));
    let finished = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = ops
        .into_iter()
        .enumerate()
        .map(|(t, ops)| {
            let (disks, clock, finished) = (disks.clone(), clock.clone(), finished.clone());
            std::thread::spawn(move || {
                let h = writer(t as u64, disks, ops, clock);
                finished.fetch_add(1, Ordering::SeqCst);
                h
            })
        })
        .collect();

    let mut replica: HashMap<Key, Stamp> = HashMap::new();
    let mut snaps = Vec::new();
    let mut i = 0;
    let mut last = false;
    loop {
        if finished.load(Ordering::SeqCst) == THREADS as usize {
            last = true; // one final full cut after every writer finished
        }
        let step = if last {
            Step {
                chunk_blocks: 4,
                fail_after_chunks: None,
                gap: 0,
                memory_first: false,
            }
        } else {
            steps[i % steps.len()].clone()
        };
        i += 1;
        let c0 = clock.fetch_add(1, Ordering::SeqCst);
        let c = cut(&gate, &disks).map_err(|e| e.to_string())?;
        let c1 = clock.fetch_add(1, Ordering::SeqCst);
        match ship(&c, &step)? {
            Some(delta) => {
                c.commit();
                replica.extend(delta);
                snaps.push(Snapshot {
                    c0,
                    c1,
                    replica: replica.clone(),
                });
            }
            None => c.abort(),
        }
        if last {
            break;
        }
        for _ in 0..step.gap {
            std::thread::yield_now();
        }
    }
    let mut hist: HashMap<Key, Vec<Rec>> = HashMap::new();
    for h in handles {
        hist.extend(h.join().map_err(|_| "writer panicked".to_string())?);
    }
    for (n, s) in snaps.iter().enumerate() {
        check(s, &hist).map_err(|e| format!("commit #{n} of {}: {e}", snaps.len()))?;
    }
    // The final point must be exactly the final disk content.
    for d in &disks {
        if d.dirty_bytes() != 0 {
            return Err(format!(
                "{} still dirty after the final commit",
                d.image_path().display()
            ));
        }
    }
    Ok(())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        12 => Just(Kind::Write { fua: false }),
        1 => Just(Kind::Write { fua: true }),
        1 => Just(Kind::Trim),
        1 => any::<bool>().prop_map(|may_trim| Kind::Zero { may_trim }),
    ];
    (0..DISKS, 0..REGION_BLOCKS, 1u64..4, kind).prop_map(|(disk, first, nblocks, kind)| Op {
        disk,
        first,
        nblocks,
        kind,
    })
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        1u64..5,
        prop::option::weighted(0.25, 0u64..6),
        0u32..50,
        any::<bool>(),
    )
        .prop_map(
            |(chunk_blocks, fail_after_chunks, gap, memory_first)| Step {
                chunk_blocks,
                fail_after_chunks,
                gap,
                memory_first,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_commit_is_a_valid_cut(
        ops in prop::collection::vec(prop::collection::vec(op_strategy(), 20..120), THREADS as usize),
        steps in prop::collection::vec(step_strategy(), 1..8),
        pool_blocks in prop_oneof![Just(0u64), 1u64..6, Just(1024u64)],
    ) {
        if let Err(e) = run(ops, steps, pool_blocks) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The checker itself must be able to fail: a replica that missed an acknowledged write.
#[test]
fn checker_rejects_a_stale_replica() {
    let key = (0usize, block_of(0, 0));
    let mut hist = HashMap::new();
    hist.insert(
        key,
        vec![
            Rec {
                issue: 2,
                ack: 3,
                content: Stamp::Write(7),
            },
            Rec {
                issue: 4,
                ack: 5,
                content: Stamp::Write(8),
            },
        ],
    );
    let stale = Snapshot {
        c0: 10,
        c1: 12,
        replica: HashMap::from([(key, Stamp::Write(7))]),
    };
    assert!(check(&stale, &hist).is_err());
    let good = Snapshot {
        c0: 10,
        c1: 12,
        replica: HashMap::from([(key, Stamp::Write(8))]),
    };
    check(&good, &hist).expect("valid");
    // In flight across the cut: either is fine.
    let snap = Snapshot {
        c0: 3,
        c1: 6,
        replica: HashMap::from([(key, Stamp::Write(7))]),
    };
    check(&snap, &hist).expect("older is allowed while the newer was in flight");
    // Write order across blocks: B (issued after A was acked) without A is not a cut.
    let key2 = (1usize, block_of(1, 0));
    hist.insert(
        key2,
        vec![Rec {
            issue: 6,
            ack: 7,
            content: Stamp::Write(9),
        }],
    );
    let torn_order = Snapshot {
        c0: 1,
        c1: 20,
        replica: HashMap::from([(key, Stamp::Write(7)), (key2, Stamp::Write(9))]),
    };
    assert!(check(&torn_order, &hist).is_err());
    assert!(
        decode(&[1u8; B as usize], 0, 0).is_err(),
        "torn content is detected"
    );
}
