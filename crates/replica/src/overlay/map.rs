//! The overlay's `map` file (`docs/formats/failover-overlay.md`): the in-memory bitmap of the
//! blocks held in `data` ([`Bits`]) and its encoding and validation. Pure: no I/O here, so
//! every check of bytes read from the file is in one place and never panics.

use std::ops::Range;

use super::{BLOCK_BYTES, OVERLAY_DISK_BYTES_MAX};

pub(super) const MAGIC: &[u8; 8] = b"USOVMAP1";
pub(super) const VERSION: u32 = 1;
pub(super) const HEADER_BYTES: usize = 64;
pub(super) const CHECKSUM_BYTES: usize = 32;

/// What a map says it was made for: checked against what `open` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MapHeader {
    pub disk_size_bytes: u64,
    pub point: u64,
    pub disk: u32,
}

/// Bytes of the bitmap of a disk of `size_bytes` (one bit per block).
pub(super) fn bitmap_bytes(size_bytes: u64) -> u64 {
    (size_bytes / BLOCK_BYTES).div_ceil(8)
}

/// Exact length of a valid map file for a disk of `size_bytes`.
pub(super) fn map_file_bytes(size_bytes: u64) -> u64 {
    (HEADER_BYTES + CHECKSUM_BYTES) as u64 + bitmap_bytes(size_bytes)
}

/// One bit per 4 KiB block: set when the block is in `data`. Bits are only ever set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bits {
    words: Vec<u64>,
    blocks: u64,
}

impl Bits {
    pub fn empty(blocks: u64) -> Bits {
        Bits {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    pub fn get(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Sets the bits of `blocks`; returns whether any was clear.
    pub fn set(&mut self, blocks: Range<u64>) -> bool {
        let mut changed = false;
        for b in blocks.start..blocks.end.min(self.blocks) {
            if let Some(w) = self.words.get_mut((b / 64) as usize) {
                let bit = 1 << (b % 64);
                changed |= *w & bit == 0;
                *w |= bit;
            }
        }
        changed
    }

    pub fn all_set(&self, blocks: Range<u64>) -> bool {
        blocks.into_iter().all(|b| self.get(b))
    }

    /// The end of the run of blocks from `from` (below `end`) that share `from`'s bit, and that bit.
    pub fn run_from(&self, from: u64, end: u64) -> (u64, bool) {
        let state = self.get(from);
        let mut b = from + 1;
        while b < end {
            // Skip whole words that are all `state` when aligned.
            if b % 64 == 0 && b + 64 <= end {
                let w = self.words.get((b / 64) as usize).copied().unwrap_or(0);
                if w == if state { u64::MAX } else { 0 } {
                    b += 64;
                    continue;
                }
            }
            if self.get(b) != state {
                break;
            }
            b += 1;
        }
        (b.min(end), state)
    }

    /// The runs of set bits, as block ranges.
    pub fn set_runs(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut b = 0;
        while b < self.blocks {
            let (end, set) = self.run_from(b, self.blocks);
            if set {
                out.push(b..end);
            }
            b = end;
        }
        out
    }
}

/// The whole `map` file for `bits` made over `header`.
pub(super) fn encode(header: MapHeader, bits: &Bits) -> Vec<u8> {
    let bm_len = bitmap_bytes(header.disk_size_bytes) as usize;
    let mut out = Vec::with_capacity(HEADER_BYTES + bm_len + CHECKSUM_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&header.disk_size_bytes.to_le_bytes());
    out.extend_from_slice(&header.point.to_le_bytes());
    out.extend_from_slice(&header.disk.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(bm_len as u64).to_le_bytes());
    out.resize(HEADER_BYTES, 0);
    for w in &bits.words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.truncate(HEADER_BYTES + bm_len);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Validates a whole `map` file and returns what it was made for and its bits. The error is
/// the reason, one line, for the caller to prefix with the path.
pub(super) fn decode(bytes: &[u8]) -> Result<(MapHeader, Bits), String> {
    if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES {
        return Err(format!("{} bytes, shorter than any map", bytes.len()));
    }
    if &bytes[0..8] != MAGIC {
        return Err("not an overlay map (bad magic)".into());
    }
    let body_len = bytes.len() - CHECKSUM_BYTES;
    if blake3::hash(&bytes[..body_len]).as_bytes()[..] != bytes[body_len..] {
        return Err("checksum mismatch (damaged or truncated)".into());
    }
    let version = le_u32(bytes, 8);
    if version != VERSION {
        return Err(format!("version {version}, this build reads {VERSION}"));
    }
    let block = le_u32(bytes, 12);
    if u64::from(block) != BLOCK_BYTES {
        return Err(format!("block size {block}, expected {BLOCK_BYTES}"));
    }
    let header = MapHeader {
        disk_size_bytes: le_u64(bytes, 16),
        point: le_u64(bytes, 24),
        disk: le_u32(bytes, 32),
    };
    let size = header.disk_size_bytes;
    if size == 0 || size % BLOCK_BYTES != 0 || size > OVERLAY_DISK_BYTES_MAX {
        return Err(format!("invalid disk size {size}"));
    }
    let bm_len = le_u64(bytes, 40);
    if bm_len != bitmap_bytes(size) || bytes.len() as u64 != map_file_bytes(size) {
        return Err(format!(
            "bitmap of {bm_len} bytes in a file of {}, a disk of {size} bytes needs {}",
            bytes.len(),
            bitmap_bytes(size)
        ));
    }
    if le_u32(bytes, 36) != 0 || bytes[48..HEADER_BYTES].iter().any(|&b| b != 0) {
        return Err("reserved header bytes are not zero".into());
    }
    let blocks = size / BLOCK_BYTES;
    let mut bits = Bits::empty(blocks);
    for (i, chunk) in bytes[HEADER_BYTES..body_len].chunks(8).enumerate() {
        let mut a = [0u8; 8];
        a[..chunk.len()].copy_from_slice(chunk);
        if let Some(w) = bits.words.get_mut(i) {
            *w = u64::from_le_bytes(a);
        }
    }
    if let Some(last) = bits.words.last() {
        let used = blocks % 64;
        if used != 0 && last >> used != 0 {
            return Err("a bit is set past the last block".into());
        }
    }
    Ok((header, bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> MapHeader {
        MapHeader {
            disk_size_bytes: 100 * BLOCK_BYTES,
            point: 7,
            disk: 1,
        }
    }

    #[test]
    fn map_round_trips_and_runs_are_exact() {
        let mut bits = Bits::empty(100);
        assert!(bits.set(3..5));
        assert!(!bits.set(3..4));
        bits.set(60..70);
        bits.set(99..100);
        let bytes = encode(header(), &bits);
        assert_eq!(bytes.len() as u64, map_file_bytes(100 * BLOCK_BYTES));
        let (h, back) = decode(&bytes).expect("valid");
        assert_eq!(h, header());
        assert_eq!(back, bits);
        assert_eq!(back.set_runs(), vec![3..5, 60..70, 99..100]);
        assert_eq!(back.run_from(0, 100), (3, false));
        assert_eq!(back.run_from(61, 65), (65, true));
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let mut bits = Bits::empty(100);
        bits.set(10..20);
        let bytes = encode(header(), &bits);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} accepted");
        }
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
    }

    #[test]
    fn a_bit_past_the_last_block_is_refused_even_with_a_good_checksum() {
        let bits = Bits::empty(100);
        let mut bytes = encode(header(), &bits);
        let body = bytes.len() - CHECKSUM_BYTES;
        bytes[body - 1] |= 0x80; // block 103 of a 100-block disk
        let sum = blake3::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(sum.as_bytes());
        let e = decode(&bytes).expect_err("refused");
        assert!(e.contains("past the last block"), "{e}");
    }
}
