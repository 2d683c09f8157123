//! Resynchronization by comparison (`docs/formats/resync.md`): both hosts hash the same chunks
//! with a per-cycle key, the primary compares, refines the chunks that differ to 4 KiB blocks,
//! and its `Full` delta carries only the blocks that differ.
//!
//! The hashing is the same code on both sides: [`hash_chunks`] over a [`ChunkSource`], which
//! is the primary's cut ([`tracker::FrozenDisk`]) or the replica's newest point
//! ([`replica::PointView`]). A source says when a range is known to be zero without reading it
//! (a hole), so holes cost neither side a read.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use proto::peer::{HashReply, HashRequest, HASH_CHUNKS_MAX};
use proto::Seq;

/// The first pass compares chunks of this size.
pub const COMPARE_CHUNK_BYTES: u64 = 1 << 20;
/// Chunks that differ are compared again in pieces of this size, and the pieces that differ
/// in blocks of [`REFINE_BLOCK_BYTES`]: scattered changes then cost 16 + 16 hashes per
/// differing chunk rather than 256.
pub const REFINE_MID_BYTES: u64 = 64 << 10;
/// The last pass compares blocks of this size (the tracker's block): the unit a resync ships.
pub const REFINE_BLOCK_BYTES: u64 = 4096;
/// Bytes one hash request covers at most: the replica answers after reading them, within the
/// peer answer deadline (120 s by default: 2 MiB/s suffices), and a failed request costs at most
/// this much reading again.
pub const HASH_REQUEST_BYTES_MAX: u64 = 256 << 20;
/// Bytes of the keyed BLAKE3 kept per chunk: 128 bits, with a key nobody else knows.
const HASH_BYTES: usize = 16;

/// A chunk's digest: all zeros, or the truncated keyed hash of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    Zero,
    Hash([u8; HASH_BYTES]),
}

impl ChunkHash {
    fn of(key: &[u8; 32], bytes: &[u8]) -> ChunkHash {
        if crate::shipper::is_zero(bytes) {
            return ChunkHash::Zero;
        }
        let full = blake3::keyed_hash(key, bytes);
        let mut h = [0u8; HASH_BYTES];
        h.copy_from_slice(&full.as_bytes()[..HASH_BYTES]);
        ChunkHash::Hash(h)
    }

    pub fn to_wire(self) -> String {
        match self {
            ChunkHash::Zero => "z".into(),
            ChunkHash::Hash(h) => h.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// `None` unless `s` is `"z"` or 32 hex digits.
    pub fn from_wire(s: &str) -> Option<ChunkHash> {
        if s == "z" {
            return Some(ChunkHash::Zero);
        }
        if s.len() != HASH_BYTES * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut h = [0u8; HASH_BYTES];
        for (i, b) in h.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(ChunkHash::Hash(h))
    }
}

/// A chunk hashed as a tree (`resync.md`, "The hash"): its 4 KiB blocks' hashes, its 64 KiB
/// pieces' hashes (each over its blocks' hashes) and its own hash (over its pieces' hashes).
/// Kept for the chunks of the last 1 MiB pass, the refinement passes are answered from it
/// without reading the disk again. A chunk known to be zero keeps no children.
#[derive(Debug, Clone)]
pub struct ChunkTree {
    pub hash: ChunkHash,
    pieces: Vec<ChunkHash>,
    blocks: Vec<ChunkHash>,
}

/// Level bytes prefixed to the hashes a piece (1) or a chunk (2) is computed over.
const LEVEL_PIECE: u8 = 1;
const LEVEL_CHUNK: u8 = 2;

/// The hash over children's hashes: `"z"` when every child is zero, else the truncated keyed
/// BLAKE3 of the level byte and the children's 16-byte hashes (16 zero bytes for a zero child).
fn combine(key: &[u8; 32], level: u8, children: &[ChunkHash]) -> ChunkHash {
    if children.iter().all(|c| *c == ChunkHash::Zero) {
        return ChunkHash::Zero;
    }
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&[level]);
    for c in children {
        match c {
            ChunkHash::Zero => h.update(&[0u8; HASH_BYTES]),
            ChunkHash::Hash(x) => h.update(x),
        };
    }
    let mut out = [0u8; HASH_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..HASH_BYTES]);
    ChunkHash::Hash(out)
}

impl ChunkTree {
    /// The tree of `bytes`, one unit of `unit_bytes` (4 KiB, 64 KiB or 1 MiB; the disk's last
    /// unit may be shorter, a whole number of blocks).
    fn of(key: &[u8; 32], unit_bytes: u64, bytes: &[u8]) -> ChunkTree {
        let blocks: Vec<ChunkHash> = bytes
            .chunks(REFINE_BLOCK_BYTES as usize)
            .map(|b| ChunkHash::of(key, b))
            .collect();
        if unit_bytes <= REFINE_BLOCK_BYTES {
            let hash = blocks.first().copied().unwrap_or(ChunkHash::Zero);
            return ChunkTree {
                hash,
                pieces: Vec::new(),
                blocks,
            };
        }
        let per_piece = (REFINE_MID_BYTES / REFINE_BLOCK_BYTES) as usize;
        let pieces: Vec<ChunkHash> = blocks
            .chunks(per_piece)
            .map(|c| combine(key, LEVEL_PIECE, c))
            .collect();
        if unit_bytes <= REFINE_MID_BYTES {
            return ChunkTree {
                hash: pieces.first().copied().unwrap_or(ChunkHash::Zero),
                pieces,
                blocks,
            };
        }
        ChunkTree {
            hash: combine(key, LEVEL_CHUNK, &pieces),
            pieces,
            blocks,
        }
    }

    fn zero() -> ChunkTree {
        ChunkTree {
            hash: ChunkHash::Zero,
            pieces: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// The hash of the unit of `unit_bytes` at `at` bytes into this chunk, if the tree holds it.
    fn part(&self, unit_bytes: u64, at: u64) -> Option<ChunkHash> {
        if self.hash == ChunkHash::Zero {
            return Some(ChunkHash::Zero);
        }
        match unit_bytes {
            REFINE_MID_BYTES => self.pieces.get((at / REFINE_MID_BYTES) as usize).copied(),
            REFINE_BLOCK_BYTES => self.blocks.get((at / REFINE_BLOCK_BYTES) as usize).copied(),
            _ => None,
        }
    }
}

/// The trees of one 1 MiB pass (one request) over one disk of one point with one key: the
/// refinement passes that follow it read nothing (`resync.md`). At most one request's chunks
/// (`HASH_REQUEST_BYTES_MAX` / 1 MiB = 256 trees of 272 hashes, about 1.2 MB).
pub struct TreeCache {
    key: [u8; 32],
    seq: u64,
    disk: u32,
    trees: std::collections::HashMap<u64, ChunkTree>,
}

impl TreeCache {
    pub fn new(key: [u8; 32], seq: u64, disk: u32, offsets: &[u64], trees: Vec<ChunkTree>) -> Self {
        TreeCache {
            key,
            seq,
            disk,
            trees: offsets.iter().copied().zip(trees).collect(),
        }
    }

    /// Whether these trees were hashed with `key` (the same compare).
    pub fn key_is(&self, key: &[u8; 32]) -> bool {
        &self.key == key
    }

    /// The hash of the unit of `unit_bytes` at `offset`, if a cached chunk holds it.
    pub fn lookup(
        &self,
        key: &[u8; 32],
        seq: u64,
        disk: u32,
        unit_bytes: u64,
        offset: u64,
    ) -> Option<ChunkHash> {
        if &self.key != key || self.seq != seq || self.disk != disk {
            return None;
        }
        let chunk = offset - offset % COMPARE_CHUNK_BYTES;
        self.trees.get(&chunk)?.part(unit_bytes, offset - chunk)
    }
}

/// How many 1 MiB passes the replica keeps the trees of, per VM: the primary compares two
/// windows of a disk at once, so the refinements of one window may come after the next
/// window's 1 MiB pass; one more for slack.
pub const REPLICA_TREE_CACHES: usize = 3;

/// Parses a compare key (64 hex digits).
pub fn parse_key(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(k)
}

fn key_hex(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a side hashes: one disk, as of the cut or the point.
pub trait ChunkSource {
    fn size_bytes(&self) -> u64;
    /// True when `offset..offset+len` is known to read as zeros without reading it.
    fn known_zero(&self, offset: u64, len: u64) -> anyhow::Result<bool>;
    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()>;
    /// Read-ahead hint: `offset..offset+len` will be read soon.
    fn will_need(&self, _offset: u64, _len: u64) {}
}

/// Chunks read ahead of the one being hashed: cold disks are read with several requests in
/// flight while the hashing goes on.
const READ_AHEAD_CHUNKS: usize = 8;

impl ChunkSource for tracker::FrozenDisk {
    fn size_bytes(&self) -> u64 {
        tracker::FrozenDisk::size_bytes(self)
    }

    // Peeks: the blocks stay in the cut for the shipper to read the ones that differ.
    fn known_zero(&self, offset: u64, len: u64) -> anyhow::Result<bool> {
        Ok(self.peek_hole(offset, len)?)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        Ok(self.peek_at(buf, offset)?)
    }

    fn will_need(&self, offset: u64, len: u64) {
        tracker::FrozenDisk::will_need(self, offset, len)
    }
}

impl ChunkSource for replica::PointView {
    fn size_bytes(&self) -> u64 {
        nbd::BlockBackend::size_bytes(self)
    }

    fn known_zero(&self, offset: u64, len: u64) -> anyhow::Result<bool> {
        let extents = self.status(offset, len)?;
        let zero: u64 = extents
            .iter()
            .take_while(|e| e.zero)
            .map(|e| e.len_bytes)
            .sum();
        Ok(zero >= len)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        Ok(self.read_range(buf, offset)?)
    }

    fn will_need(&self, offset: u64, len: u64) {
        replica::PointView::will_need(self, offset, len)
    }
}

/// Checks a hash request against a disk of `size` bytes: one line saying what is wrong.
pub fn check_request(req: &HashRequest, size: u64) -> Result<[u8; 32], String> {
    let key = parse_key(&req.key).ok_or("the compare key is not 64 hex digits")?;
    if ![COMPARE_CHUNK_BYTES, REFINE_MID_BYTES, REFINE_BLOCK_BYTES].contains(&req.chunk_bytes) {
        return Err(format!(
            "chunk_bytes {} is none of {COMPARE_CHUNK_BYTES}, {REFINE_MID_BYTES}, {REFINE_BLOCK_BYTES}",
            req.chunk_bytes
        ));
    }
    if req.offsets.len() > HASH_CHUNKS_MAX {
        return Err(format!(
            "{} chunks asked at once; at most {HASH_CHUNKS_MAX}",
            req.offsets.len()
        ));
    }
    if let Some(o) = req
        .offsets
        .iter()
        .find(|&&o| o % req.chunk_bytes != 0 || o >= size)
    {
        return Err(format!(
            "offset {o} is not a multiple of {} below the disk's size {size}",
            req.chunk_bytes
        ));
    }
    Ok(key)
}

/// Hashing threads per side for a request of many chunks: reading a cold disk with one
/// synchronous reader leaves the device idle between reads (and BLAKE3 is single-threaded per
/// chunk); two readers, each with its read-ahead, keep it busy. The cores are two on the
/// machines this is measured on: more threads only compete with the guest.
const HASH_THREADS: usize = 2;

/// Requests with fewer chunks than this are hashed on one thread (the refinement passes of a
/// few blocks: a thread costs more than it saves).
const PARALLEL_HASH_MIN_CHUNKS: usize = 8;

/// Hashes the chunks of `src` at `offsets` (each `chunk_bytes`, the last one of the disk
/// shorter). Holes known to the source are not read. A request of many chunks is hashed by
/// [`HASH_THREADS`] threads, chunks dealt in turn (so the disk is still read in order).
pub fn hash_chunks(
    src: &(dyn ChunkSource + Sync),
    key: &[u8; 32],
    chunk_bytes: u64,
    offsets: &[u64],
) -> anyhow::Result<Vec<ChunkHash>> {
    Ok(hash_trees(src, key, chunk_bytes, offsets)?
        .into_iter()
        .map(|t| t.hash)
        .collect())
}

/// [`hash_chunks`], answering from `caches` the units a cached chunk holds (read nothing for
/// them) and reading the others.
pub fn hash_cached(
    src: &(dyn ChunkSource + Sync),
    caches: &[&TreeCache],
    key: &[u8; 32],
    (seq, disk): (u64, u32),
    chunk_bytes: u64,
    offsets: &[u64],
) -> anyhow::Result<Vec<ChunkHash>> {
    let known: Vec<Option<ChunkHash>> = offsets
        .iter()
        .map(|&o| {
            caches
                .iter()
                .find_map(|c| c.lookup(key, seq, disk, chunk_bytes, o))
        })
        .collect();
    let misses: Vec<u64> = offsets
        .iter()
        .zip(&known)
        .filter(|(_, k)| k.is_none())
        .map(|(o, _)| *o)
        .collect();
    let mut read = hash_chunks(src, key, chunk_bytes, &misses)?.into_iter();
    known
        .into_iter()
        .map(|k| match k {
            Some(h) => Ok(h),
            None => read
                .next()
                .ok_or_else(|| anyhow!("fewer hashes than chunks read")),
        })
        .collect()
}

/// The trees of the chunks of `src` at `offsets` (see [`hash_chunks`]).
pub fn hash_trees(
    src: &(dyn ChunkSource + Sync),
    key: &[u8; 32],
    chunk_bytes: u64,
    offsets: &[u64],
) -> anyhow::Result<Vec<ChunkTree>> {
    if offsets.len() < PARALLEL_HASH_MIN_CHUNKS {
        return hash_some(src, key, chunk_bytes, offsets.iter().copied());
    }
    let parts: Vec<anyhow::Result<Vec<ChunkTree>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..HASH_THREADS)
            .map(|t| {
                scope.spawn(move || {
                    hash_some(
                        src,
                        key,
                        chunk_bytes,
                        offsets.iter().copied().skip(t).step_by(HASH_THREADS),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a hashing thread panicked")))
            })
            .collect()
    });
    let parts = parts.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let mut iters: Vec<_> = parts.into_iter().map(|p| p.into_iter()).collect();
    let mut out = Vec::with_capacity(offsets.len());
    for i in 0..offsets.len() {
        let t = iters
            .get_mut(i % HASH_THREADS)
            .and_then(|p| p.next())
            .ok_or_else(|| anyhow!("a hashing thread returned too few hashes"))?;
        out.push(t);
    }
    Ok(out)
}

/// One thread's part of [`hash_trees`].
fn hash_some(
    src: &(dyn ChunkSource + Sync),
    key: &[u8; 32],
    chunk_bytes: u64,
    offsets: impl Iterator<Item = u64> + Clone,
) -> anyhow::Result<Vec<ChunkTree>> {
    let size = src.size_bytes();
    let mut buf = vec![0u8; chunk_bytes as usize];
    let mut out = Vec::new();
    let mut ahead = offsets.clone();
    for o in ahead.by_ref().take(READ_AHEAD_CHUNKS) {
        src.will_need(o, chunk_bytes.min(size.saturating_sub(o)));
    }
    for o in offsets {
        if let Some(next) = ahead.next() {
            src.will_need(next, chunk_bytes.min(size.saturating_sub(next)));
        }
        let len = chunk_bytes.min(size.saturating_sub(o));
        if len == 0 {
            return Err(anyhow!("offset {o} is beyond the disk's size {size}"));
        }
        if src.known_zero(o, len)? {
            out.push(ChunkTree::zero());
            continue;
        }
        let b = &mut buf[..len as usize];
        src.read(b, o)?;
        out.push(ChunkTree::of(key, chunk_bytes, b));
    }
    Ok(out)
}

/// What a compare found and did, for the events and counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct CompareStats {
    pub compared_bytes: u64,
    pub chunks: u64,
    pub blocks_refined: u64,
    pub differing_blocks: u64,
    pub differing_bytes: u64,
    /// JSON bytes of the hash requests and answers (HTTP/2 and TLS framing not counted).
    pub hash_bytes: u64,
}

impl std::ops::AddAssign for CompareStats {
    fn add_assign(&mut self, o: CompareStats) {
        self.compared_bytes += o.compared_bytes;
        self.chunks += o.chunks;
        self.blocks_refined += o.blocks_refined;
        self.differing_blocks += o.differing_blocks;
        self.differing_bytes += o.differing_bytes;
        self.hash_bytes += o.hash_bytes;
    }
}

/// Asks the replica for hashes; checks its answer names what was asked.
async fn replica_hashes(
    peer: &transport::Peer,
    vm: &str,
    req: &HashRequest,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<ChunkHash>> {
    let reply: HashReply =
        tokio::time::timeout(timeout, crate::peer_client::resync_hashes(peer, vm, req))
            .await
            .map_err(|_| {
                anyhow!(
                    "the replica did not answer a resync hash request within {} s",
                    timeout.as_secs()
                )
            })??;
    check_reply(req, &reply)
}

/// The replica's answer, if it answers exactly what was asked: the same point and disk, one
/// well-formed hash per chunk. Anything else is refused with what is wrong, and nothing of it
/// is used.
pub fn check_reply(req: &HashRequest, reply: &HashReply) -> anyhow::Result<Vec<ChunkHash>> {
    if reply.seq != req.seq || reply.disk != req.disk {
        return Err(anyhow!(
            "the replica answered hashes of point {} disk {} for point {} disk {}",
            reply.seq,
            reply.disk,
            req.seq,
            req.disk
        ));
    }
    if reply.hashes.len() != req.offsets.len() {
        return Err(anyhow!(
            "the replica answered {} hashes for {} chunks",
            reply.hashes.len(),
            req.offsets.len()
        ));
    }
    reply
        .hashes
        .iter()
        .map(|h| {
            ChunkHash::from_wire(h)
                .ok_or_else(|| anyhow!("the replica answered a malformed hash {h:?}"))
        })
        .collect()
}

/// One pass: the offsets (of `chunk_bytes`) whose hashes differ between the replica's point
/// `seq` and `disk` of the cut, both sides hashing each batch at the same time.
#[allow(clippy::too_many_arguments)]
async fn differing(
    peer: &transport::Peer,
    vm: &str,
    seq: Seq,
    index: u32,
    disk: Arc<dyn ChunkSource + Send + Sync>,
    key: &[u8; 32],
    chunk_bytes: u64,
    offsets: Vec<u64>,
    timeout: std::time::Duration,
    hash_bytes: &mut u64,
    compared_blocks: Option<&std::sync::atomic::AtomicU64>,
    cache: &mut Option<Arc<TreeCache>>,
) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    let coarse = chunk_bytes == COMPARE_CHUNK_BYTES;
    let mut trees: Vec<(u64, ChunkTree)> = Vec::new();
    let per_request = ((HASH_REQUEST_BYTES_MAX / chunk_bytes) as usize).clamp(1, HASH_CHUNKS_MAX);
    for batch in offsets.chunks(per_request) {
        let req = HashRequest {
            seq,
            disk: index,
            key: key_hex(key),
            chunk_bytes,
            offsets: batch.to_vec(),
        };
        let (src, k, b) = (disk.clone(), *key, batch.to_vec());
        let known = cache.clone();
        let at = (seq.get(), index);
        // The 1 MiB pass keeps its trees; a refinement reads only what they do not hold.
        let local = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<ChunkTree>> {
            if coarse {
                hash_trees(src.as_ref(), &k, chunk_bytes, &b)
            } else {
                Ok(hash_cached(
                    src.as_ref(),
                    known.as_deref().as_slice(),
                    &k,
                    at,
                    chunk_bytes,
                    &b,
                )?
                .into_iter()
                .map(|hash| ChunkTree {
                    hash,
                    pieces: Vec::new(),
                    blocks: Vec::new(),
                })
                .collect())
            }
        });
        let (theirs, ours) = tokio::join!(replica_hashes(peer, vm, &req, timeout), local);
        let theirs = theirs?;
        if let Some(c) = compared_blocks {
            let bytes = batch.len() as u64 * chunk_bytes;
            c.fetch_add(
                bytes / REFINE_BLOCK_BYTES,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        // The request as sent, and the answer: one hash (32 hex digits, or "z") per chunk.
        *hash_bytes += serde_json::to_vec(&req).map_or(0, |v| v.len() as u64)
            + 40
            + theirs
                .iter()
                .map(|h| if *h == ChunkHash::Zero { 4 } else { 35 })
                .sum::<u64>();
        let ours = ours.context("the hashing task")??;
        out.extend(
            batch
                .iter()
                .zip(ours.iter().zip(theirs.iter()))
                .filter(|(_, (a, b))| a.hash != **b)
                .map(|(o, _)| *o),
        );
        if coarse {
            trees.extend(batch.iter().copied().zip(ours));
        }
    }
    if coarse {
        let (offsets, trees): (Vec<u64>, Vec<ChunkTree>) = trees.into_iter().unzip();
        *cache = Some(Arc::new(TreeCache::new(
            *key,
            seq.get(),
            index,
            &offsets,
            trees,
        )));
    }
    Ok(out)
}

/// Splits the cut's ranges (byte ranges, block aligned) into the 1 MiB chunks they cover whole
/// and the 4 KiB blocks of the chunks they cover in part.
pub fn plan(ranges: &[(u64, u64)], size: u64) -> (Vec<u64>, Vec<u64>) {
    let (mut chunks, mut blocks) = (Vec::new(), Vec::new());
    let mut i = 0;
    let mut chunk = 0;
    while chunk < size {
        let end = (chunk + COMPARE_CHUNK_BYTES).min(size);
        // Ranges are sorted and disjoint: the ones that touch [chunk, end).
        while i < ranges.len() && ranges[i].0 + ranges[i].1 <= chunk {
            i += 1;
        }
        let mut j = i;
        let mut covered = 0;
        let mut in_chunk = Vec::new();
        while j < ranges.len() && ranges[j].0 < end {
            let (s, e) = (ranges[j].0.max(chunk), (ranges[j].0 + ranges[j].1).min(end));
            covered += e - s;
            in_chunk.push((s, e));
            j += 1;
        }
        if covered == end - chunk {
            chunks.push(chunk);
        } else {
            for (s, e) in in_chunk {
                blocks.extend((s..e).step_by(REFINE_BLOCK_BYTES as usize));
            }
        }
        chunk = end;
    }
    (chunks, blocks)
}

/// Compares the blocks of the cut's `ranges` of `disk` (byte ranges, block aligned, sorted:
/// every block for a full resynchronization) with the replica's point `seq`: the byte ranges
/// `(offset, len)` (4 KiB blocks, coalesced) that differ.
#[allow(clippy::too_many_arguments)]
pub async fn compare_disk(
    peer: &transport::Peer,
    vm: &str,
    seq: Seq,
    index: u32,
    disk: Arc<dyn ChunkSource + Send + Sync>,
    ranges: &[(u64, u64)],
    key: &[u8; 32],
    timeout: std::time::Duration,
    stats: &mut CompareStats,
    compared_blocks: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let size = disk.size_bytes();
    let (chunks, partial) = plan(ranges, size);
    let mut cache: Option<Arc<TreeCache>> = None;
    stats.chunks += chunks.len() as u64;
    stats.compared_bytes += ranges.iter().map(|r| r.1).sum::<u64>();
    let coarse = differing(
        peer,
        vm,
        seq,
        index,
        disk.clone(),
        key,
        COMPARE_CHUNK_BYTES,
        chunks,
        timeout,
        &mut stats.hash_bytes,
        Some(compared_blocks),
        &mut cache,
    )
    .await?;
    let pieces = |of: &[u64], from: u64, to: u64| -> Vec<u64> {
        of.iter()
            .flat_map(|&c| (c..(c + from).min(size)).step_by(to as usize))
            .collect()
    };
    let mids = pieces(&coarse, COMPARE_CHUNK_BYTES, REFINE_MID_BYTES);
    stats.blocks_refined += mids.len() as u64;
    let mid = differing(
        peer,
        vm,
        seq,
        index,
        disk.clone(),
        key,
        REFINE_MID_BYTES,
        mids,
        timeout,
        &mut stats.hash_bytes,
        None,
        &mut cache,
    )
    .await?;
    let mut blocks = pieces(&mid, REFINE_MID_BYTES, REFINE_BLOCK_BYTES);
    compared_blocks.fetch_add(partial.len() as u64, std::sync::atomic::Ordering::Relaxed);
    blocks.extend(partial);
    blocks.sort_unstable();
    stats.blocks_refined += blocks.len() as u64;
    let fine = differing(
        peer,
        vm,
        seq,
        index,
        disk,
        key,
        REFINE_BLOCK_BYTES,
        blocks,
        timeout,
        &mut stats.hash_bytes,
        None,
        &mut cache,
    )
    .await?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for o in fine {
        let len = REFINE_BLOCK_BYTES.min(size - o);
        stats.differing_blocks += 1;
        stats.differing_bytes += len;
        match ranges.last_mut() {
            Some((s, l)) if *s + *l == o => *l += len,
            _ => ranges.push((o, len)),
        }
    }
    Ok(ranges)
}

/// A fresh compare key.
pub fn new_key() -> anyhow::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut k).context("drawing a compare key")?;
    Ok(k)
}

/// Seconds since `t`, for events.
pub fn secs_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>, std::sync::atomic::AtomicU64);

    impl ChunkSource for Mem {
        fn size_bytes(&self) -> u64 {
            self.0.len() as u64
        }
        fn known_zero(&self, _: u64, _: u64) -> anyhow::Result<bool> {
            Ok(false)
        }
        fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
            self.1
                .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    /// The refinement passes answered from the 1 MiB pass's trees equal a fresh read's hashes
    /// and read nothing: each side reads a differing chunk once, not three times.
    #[test]
    fn refinements_from_the_trees_equal_a_fresh_read_and_read_nothing() {
        let mut bytes: Vec<u8> = (0..(2 << 20) as u32)
            .map(|i| (i / 4096 * 7 + i % 13) as u8)
            .collect();
        bytes[(1 << 20) + 5 * 4096..(1 << 20) + 6 * 4096].fill(0);
        let src = Mem(bytes, Default::default());
        let key = [9; 32];
        let chunks = [0, 1 << 20];
        let trees = hash_trees(&src, &key, COMPARE_CHUNK_BYTES, &chunks).unwrap();
        let read_once = src.1.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(read_once, 2 << 20);
        let cache = TreeCache::new(key, 7, 0, &chunks, trees.clone());
        for (unit, offsets) in [
            (
                REFINE_MID_BYTES,
                (0..32).map(|i| i * REFINE_MID_BYTES).collect::<Vec<_>>(),
            ),
            (
                REFINE_BLOCK_BYTES,
                (0..512).map(|i| i * REFINE_BLOCK_BYTES).collect(),
            ),
        ] {
            let before = src.1.load(std::sync::atomic::Ordering::Relaxed);
            let cached = hash_cached(&src, &[&cache], &key, (7, 0), unit, &offsets).unwrap();
            assert_eq!(src.1.load(std::sync::atomic::Ordering::Relaxed), before);
            let fresh = hash_chunks(&src, &key, unit, &offsets).unwrap();
            assert_eq!(cached, fresh, "unit {unit}");
        }
        assert_eq!(
            hash_cached(
                &src,
                &[&cache],
                &key,
                (7, 0),
                REFINE_BLOCK_BYTES,
                &[(1 << 20) + 5 * 4096]
            )
            .unwrap(),
            vec![ChunkHash::Zero]
        );
        // Another key, point or disk: the trees are not used.
        let before = src.1.load(std::sync::atomic::Ordering::Relaxed);
        hash_cached(&src, &[&cache], &key, (8, 0), REFINE_BLOCK_BYTES, &[0]).unwrap();
        assert_eq!(
            src.1.load(std::sync::atomic::Ordering::Relaxed),
            before + 4096
        );
        // A chunk's hash is its pieces' tree: one changed block changes it.
        let fresh = hash_chunks(&src, &key, COMPARE_CHUNK_BYTES, &chunks).unwrap();
        assert_eq!(fresh, trees.iter().map(|t| t.hash).collect::<Vec<_>>());
    }

    #[test]
    fn hashes_from_two_threads_come_back_in_the_order_asked() {
        let bytes: Vec<u8> = (0..37 * 4096u32).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
        let src = Mem(bytes.clone(), Default::default());
        let offsets: Vec<u64> = (0..37u64).rev().map(|i| i * 4096).collect();
        let got = hash_chunks(&src, &[3; 32], 4096, &offsets).unwrap();
        assert_eq!(got.len(), offsets.len());
        for (o, h) in offsets.iter().zip(&got) {
            let o = *o as usize;
            assert_eq!(
                *h,
                ChunkHash::of(&[3; 32], &bytes[o..o + 4096]),
                "chunk at {o}"
            );
        }
        let past = [0, 4096, 37 * 4096, 8192, 0, 0, 0, 0, 0];
        assert!(hash_chunks(&src, &[3; 32], 4096, &past).is_err());
    }

    #[test]
    fn wire_form_round_trips_and_refuses_anything_else() {
        let h = ChunkHash::of(&[7; 32], b"data");
        assert_eq!(ChunkHash::from_wire(&h.to_wire()), Some(h));
        assert_eq!(ChunkHash::from_wire("z"), Some(ChunkHash::Zero));
        let plus = format!("+{}", "f".repeat(31));
        for bad in ["", "Z", "00", &"g".repeat(32), &"0".repeat(33), &plus] {
            assert_eq!(ChunkHash::from_wire(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_hash_depends_on_the_key_and_zeros_need_none() {
        let a = ChunkHash::of(&[1; 32], b"same bytes");
        let b = ChunkHash::of(&[2; 32], b"same bytes");
        assert_ne!(a, b);
        assert_eq!(ChunkHash::of(&[1; 32], &[0u8; 4096]), ChunkHash::Zero);
    }

    #[test]
    fn last_chunk_is_short_and_offsets_past_the_end_are_refused() {
        let src = Mem(vec![5u8; 5000], Default::default());
        let h = hash_chunks(&src, &[0; 32], 4096, &[0, 4096]).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1], ChunkHash::of(&[0; 32], &[5u8; 904]));
        assert!(hash_chunks(&src, &[0; 32], 4096, &[8192]).is_err());
    }

    #[test]
    fn whole_chunks_are_compared_coarse_and_parts_block_by_block() {
        const M: u64 = COMPARE_CHUNK_BYTES;
        const B: u64 = REFINE_BLOCK_BYTES;
        // Every block of a 2.5 MiB disk: two whole chunks and a short last one (whole too).
        let size = 2 * M + M / 2;
        assert_eq!(plan(&[(0, size)], size), (vec![0, M, 2 * M], vec![]));
        // Two blocks in the first chunk, the second chunk whole.
        let (chunks, blocks) = plan(&[(0, 2 * B), (M, M)], size);
        assert_eq!(chunks, vec![M]);
        assert_eq!(blocks, vec![0, B]);
        // Nothing in the cut: nothing to compare.
        assert_eq!(plan(&[], size), (vec![], vec![]));
    }

    #[test]
    fn a_reply_that_is_not_what_was_asked_is_refused_with_why() {
        let req = HashRequest {
            seq: Seq(4),
            disk: 1,
            key: "ab".repeat(32),
            chunk_bytes: COMPARE_CHUNK_BYTES,
            offsets: vec![0, COMPARE_CHUNK_BYTES],
        };
        let good = HashReply {
            seq: Seq(4),
            disk: 1,
            hashes: vec!["z".into(), "0f".repeat(16)],
        };
        assert_eq!(check_reply(&req, &good).unwrap().len(), 2);
        let mut more = good.clone();
        more.hashes.push("z".into());
        let e = check_reply(&req, &more).unwrap_err().to_string();
        assert!(e.contains("3 hashes for 2 chunks"), "{e}");
        let mut other = good.clone();
        other.seq = Seq(3);
        assert!(check_reply(&req, &other)
            .unwrap_err()
            .to_string()
            .contains("point 3"));
        let mut bad = good;
        bad.hashes[1] = "not a hash".into();
        assert!(check_reply(&req, &bad)
            .unwrap_err()
            .to_string()
            .contains("malformed"));
    }

    #[test]
    fn requests_are_checked_in_one_line() {
        let ok = HashRequest {
            seq: Seq(1),
            disk: 0,
            key: "ab".repeat(32),
            chunk_bytes: 4096,
            offsets: vec![0, 4096],
        };
        assert!(check_request(&ok, 8192).is_ok());
        let mut r = ok.clone();
        r.key = "xy".into();
        assert!(check_request(&r, 8192).unwrap_err().contains("key"));
        let mut r = ok.clone();
        r.chunk_bytes = 512;
        assert!(check_request(&r, 8192).unwrap_err().contains("512"));
        let mut r = ok.clone();
        r.offsets = vec![8192];
        assert!(check_request(&r, 8192).unwrap_err().contains("8192"));
        let mut r = ok.clone();
        r.offsets = vec![0; HASH_CHUNKS_MAX + 1];
        assert!(check_request(&r, 8192).unwrap_err().contains("at most"));
        let mut r = ok;
        r.offsets = vec![100];
        assert!(check_request(&r, 8192).is_err());
    }
}
