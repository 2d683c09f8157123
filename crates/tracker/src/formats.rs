//! Byte layouts of the persisted state files (`activity.log`, `bitmap`, `clean`), exactly as
//! specified in `docs/formats/tracker-state.md`: encoding, and validating decoding.
//!
//! Owns the persisted structs, which are separate from the in-memory ones. Decoding never
//! panics and never trusts a length it has not checked against a cap; it performs no I/O.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

/// Bytes per activity-log extent: 1024 blocks. Large enough that a busy disk has few hot
/// extents (the log stays small and appends are rare), small enough that re-shipping every hot
/// extent after a crash costs seconds, not a resync.
pub const EXTENT_BYTES: u64 = 4 * 1024 * 1024;

/// Extents per activity-log group: bounds one append (32 KiB of records) and therefore the
/// size of a torn tail that may be ignored at recovery.
pub(crate) const AL_GROUP_EXTENTS_MAX: usize = 4096;

const AL_MAGIC: &[u8; 8] = b"USTDYAL\0";
const BITMAP_MAGIC: &[u8; 8] = b"USTDYBM\0";
const CLEAN_MAGIC: &[u8; 8] = b"USTDYCL\0";
const GROUP_MAGIC: &[u8; 4] = b"ALGR";
const VERSION: u32 = 1;

pub(crate) const AL_HEADER_BYTES: usize = 64;
const GROUP_OVERHEAD_BYTES: usize = 4 + 4 + 16;
/// Largest possible group, i.e. the largest torn tail recovery may ignore.
pub(crate) const AL_GROUP_BYTES_MAX: usize = GROUP_OVERHEAD_BYTES + 8 * AL_GROUP_EXTENTS_MAX;
const BITMAP_HEADER_BYTES: usize = 48;
const CLEAN_BYTES: usize = 112;

/// A state file failed validation; the string says how, for the `TrackingLost` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {what}")]
pub(crate) struct Invalid {
    pub file: &'static str,
    pub what: String,
}

fn invalid(file: &'static str, what: impl Into<String>) -> Invalid {
    Invalid {
        file,
        what: what.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Extents covering a disk of `size_bytes`.
pub(crate) fn extent_count(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(EXTENT_BYTES)
}

/// Cap on `activity.log` size for a disk: every extent appended four times over plus two
/// maximal groups of slack, each record in its own group. The writer compacts long before.
pub(crate) fn al_file_bytes_max(size_bytes: u64) -> u64 {
    let records = 4 * extent_count(size_bytes) + 2 * AL_GROUP_EXTENTS_MAX as u64;
    AL_HEADER_BYTES as u64 + records * (8 + GROUP_OVERHEAD_BYTES as u64)
}

/// Identity of the image file at a clean stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub size: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Fingerprint {
    pub(crate) fn of(meta: &Metadata) -> Fingerprint {
        Fingerprint {
            size: meta.size(),
            ino: meta.ino(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            ctime_ns: meta
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.ctime_nsec()),
        }
    }

    /// Human-readable difference and whether the image was replaced (another inode, an
    /// mtime that went back, or an unchanged mtime with a later ctime: a copy's timestamps
    /// restored over it), or `None` when equal. The ctime is what no copy can restore: any
    /// write, truncate, `utimensat` or rename of the image sets it to now.
    pub(crate) fn diff(&self, now: &Fingerprint) -> Option<(String, bool)> {
        if self.ino != now.ino {
            Some((
                format!(
                    "image inode changed from {} to {} (file replaced)",
                    self.ino, now.ino
                ),
                true,
            ))
        } else if now.mtime_ns < self.mtime_ns {
            Some((
                format!(
                    "image mtime went back from {} to {} ns (an older copy restored over it)",
                    self.mtime_ns, now.mtime_ns
                ),
                true,
            ))
        } else if self.size == now.size
            && self.mtime_ns == now.mtime_ns
            && self.ctime_ns != now.ctime_ns
        {
            // Any write moves the mtime; an unchanged mtime with a later ctime is a copy
            // restored with its timestamps (a whole directory restored with its tracker
            // state), or a change of the file's metadata only.
            Some((
                format!(
                    "image ctime changed from {} to {} ns with its mtime unchanged (a copy restored with its timestamps, or its metadata changed)",
                    self.ctime_ns, now.ctime_ns
                ),
                true,
            ))
        } else if self.size != now.size {
            Some((
                format!(
                    "image size changed from {} to {} bytes",
                    self.size, now.size
                ),
                false,
            ))
        } else if self.mtime_ns != now.mtime_ns || self.ctime_ns != now.ctime_ns {
            Some((
                format!(
                    "image modified after the clean stop (mtime {} -> {}, ctime {} -> {} ns)",
                    self.mtime_ns, now.mtime_ns, self.ctime_ns, now.ctime_ns
                ),
                false,
            ))
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// activity.log

pub(crate) fn encode_al_header(disk_size_bytes: u64) -> [u8; AL_HEADER_BYTES] {
    let mut h = [0u8; AL_HEADER_BYTES];
    h[0..8].copy_from_slice(AL_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&EXTENT_BYTES.to_le_bytes());
    h[24..32].copy_from_slice(&disk_size_bytes.to_le_bytes());
    let sum = blake3::hash(&h[0..48]);
    h[48..64].copy_from_slice(&sum.as_bytes()[0..16]);
    h
}

/// Appends one group per `AL_GROUP_EXTENTS_MAX` extents to `out`.
pub(crate) fn encode_al_groups(header: &[u8; AL_HEADER_BYTES], extents: &[u64], out: &mut Vec<u8>) {
    for chunk in extents.chunks(AL_GROUP_EXTENTS_MAX) {
        let start = out.len();
        out.extend_from_slice(GROUP_MAGIC);
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        for e in chunk {
            out.extend_from_slice(&e.to_le_bytes());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(header);
        hasher.update(&out[start..]);
        out.extend_from_slice(&hasher.finalize().as_bytes()[0..16]);
    }
}

/// What a valid activity log says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AlContents {
    pub disk_size_bytes: u64,
    /// Hot extents, sorted, deduplicated.
    pub extents: Vec<u64>,
    /// Bytes of an ignored torn tail (0 when the log ended cleanly).
    pub torn_tail_bytes: u64,
}

pub(crate) fn decode_al(bytes: &[u8]) -> Result<AlContents, Invalid> {
    const F: &str = "activity.log";
    if bytes.len() < AL_HEADER_BYTES {
        return Err(invalid(
            F,
            format!("{} bytes, shorter than the header", bytes.len()),
        ));
    }
    let h = &bytes[0..AL_HEADER_BYTES];
    if &h[0..8] != AL_MAGIC {
        return Err(invalid(F, "bad magic"));
    }
    if blake3::hash(&h[0..48]).as_bytes()[0..16] != h[48..64] {
        return Err(invalid(F, "header checksum mismatch"));
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(invalid(F, format!("unsupported version {version}")));
    }
    if u64_at(h, 16) != EXTENT_BYTES {
        return Err(invalid(
            F,
            format!("extent size {} != {EXTENT_BYTES}", u64_at(h, 16)),
        ));
    }
    let disk_size_bytes = u64_at(h, 24);
    if bytes.len() as u64 > al_file_bytes_max(disk_size_bytes) {
        return Err(invalid(F, format!("{} bytes exceeds the cap", bytes.len())));
    }
    let nextents = extent_count(disk_size_bytes);
    let mut extents = Vec::new();
    let mut at = AL_HEADER_BYTES;
    while at < bytes.len() {
        match decode_group(h, &bytes[at..], nextents) {
            Ok((group, used)) => {
                extents.extend_from_slice(&group);
                at += used;
            }
            Err(what) => {
                if is_torn_tail(h, &bytes[at..]) {
                    // The torn tail of the last append: its writers never proceeded.
                    break;
                }
                return Err(invalid(F, format!("corrupt group at byte {at}: {what}")));
            }
        }
    }
    extents.sort_unstable();
    extents.dedup();
    Ok(AlContents {
        disk_size_bytes,
        extents,
        torn_tail_bytes: (bytes.len() - at) as u64,
    })
}

/// True when `rest` (from a group that failed to decode to EOF) can only be an append that
/// never completed: shorter than a group header, a readable header that declares more bytes
/// than remain, or nothing but zeros (space the filesystem extended whose data never landed).
/// A group with all its declared bytes present that still fails (checksum, extent range), a
/// non-zero tail with a bad magic or count, or a whole group whose count was damaged upward,
/// was written whole and damaged later: corruption, never a torn tail (its writers may have
/// proceeded, so its extents must not be dropped).
fn is_torn_tail(header: &[u8], rest: &[u8]) -> bool {
    if rest.len() > AL_GROUP_BYTES_MAX {
        return false;
    }
    if rest.len() < 8 || rest.iter().all(|b| *b == 0) {
        return true;
    }
    if &rest[0..4] != GROUP_MAGIC {
        return false;
    }
    let count = u32_at(rest, 4) as usize;
    if count == 0 || count > AL_GROUP_EXTENTS_MAX {
        return false;
    }
    if rest.len() >= GROUP_OVERHEAD_BYTES + 8 * count {
        return false;
    }
    // Fewer bytes than declared. If they are exactly a whole group of fewer extents whose
    // checksum matches with that count, the group was complete and its count was damaged.
    let body = rest.len().saturating_sub(16);
    if rest.len() > GROUP_OVERHEAD_BYTES && (body - 8).is_multiple_of(8) {
        let mut hasher = blake3::Hasher::new();
        hasher.update(header);
        hasher.update(&rest[0..4]);
        hasher.update(&(((body - 8) / 8) as u32).to_le_bytes());
        hasher.update(&rest[8..body]);
        if hasher.finalize().as_bytes()[0..16] == rest[body..] {
            return false;
        }
    }
    true
}

fn decode_group(header: &[u8], b: &[u8], nextents: u64) -> Result<(Vec<u64>, usize), String> {
    if b.len() < GROUP_OVERHEAD_BYTES {
        return Err("truncated group header".into());
    }
    if &b[0..4] != GROUP_MAGIC {
        return Err("bad group magic".into());
    }
    let count = u32_at(b, 4) as usize;
    if count == 0 || count > AL_GROUP_EXTENTS_MAX {
        return Err(format!("group count {count} out of range"));
    }
    let body = 8 + 8 * count;
    let total = body + 16;
    if b.len() < total {
        return Err("truncated group".into());
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    hasher.update(&b[0..body]);
    if hasher.finalize().as_bytes()[0..16] != b[body..total] {
        return Err("group checksum mismatch".into());
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = u64_at(b, 8 + 8 * i);
        if e >= nextents {
            return Err(format!("extent {e} beyond the disk ({nextents} extents)"));
        }
        out.push(e);
    }
    Ok((out, total))
}

// ---------------------------------------------------------------------------------------------
// bitmap

pub(crate) fn bitmap_words(nblocks: u64) -> u64 {
    nblocks.div_ceil(64)
}

pub(crate) fn encode_bitmap(disk_size_bytes: u64, block_bytes: u64, words: &[u64]) -> Vec<u8> {
    let nblocks = disk_size_bytes.div_ceil(block_bytes);
    let mut out = Vec::with_capacity(BITMAP_HEADER_BYTES + 8 * words.len() + 32);
    out.extend_from_slice(BITMAP_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&block_bytes.to_le_bytes());
    out.extend_from_slice(&disk_size_bytes.to_le_bytes());
    out.extend_from_slice(&nblocks.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// A valid bitmap file: the disk size it was written for and its words.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BitmapContents {
    pub disk_size_bytes: u64,
    pub words: Vec<u64>,
}

/// Decodes a bitmap file; `size_cap_bytes` bounds the file before anything is trusted.
pub(crate) fn decode_bitmap(bytes: &[u8], block_bytes: u64) -> Result<BitmapContents, Invalid> {
    const F: &str = "bitmap";
    if bytes.len() < BITMAP_HEADER_BYTES + 32 {
        return Err(invalid(
            F,
            format!("{} bytes, shorter than header + checksum", bytes.len()),
        ));
    }
    if &bytes[0..8] != BITMAP_MAGIC {
        return Err(invalid(F, "bad magic"));
    }
    let body = bytes.len() - 32;
    if blake3::hash(&bytes[0..body]).as_bytes() != &bytes[body..] {
        return Err(invalid(F, "checksum mismatch"));
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(invalid(F, format!("unsupported version {version}")));
    }
    if u64_at(bytes, 16) != block_bytes {
        return Err(invalid(
            F,
            format!("block size {} != {block_bytes}", u64_at(bytes, 16)),
        ));
    }
    let disk_size_bytes = u64_at(bytes, 24);
    let nblocks = u64_at(bytes, 32);
    if nblocks != disk_size_bytes.div_ceil(block_bytes) {
        return Err(invalid(F, "block count does not match the disk size"));
    }
    let payload = (body - BITMAP_HEADER_BYTES) as u64;
    if payload != 8 * bitmap_words(nblocks) {
        return Err(invalid(F, "payload length does not match the block count"));
    }
    let nwords = (payload / 8) as usize;
    let words = (0..nwords)
        .map(|i| u64_at(bytes, BITMAP_HEADER_BYTES + 8 * i))
        .collect();
    Ok(BitmapContents {
        disk_size_bytes,
        words,
    })
}

// ---------------------------------------------------------------------------------------------
// clean

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CleanMarker {
    pub fingerprint: Fingerprint,
    pub bitmap_hash: [u8; 32],
}

pub(crate) fn encode_clean(m: &CleanMarker) -> Vec<u8> {
    let mut out = Vec::with_capacity(CLEAN_BYTES);
    out.extend_from_slice(CLEAN_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&m.fingerprint.size.to_le_bytes());
    out.extend_from_slice(&m.fingerprint.ino.to_le_bytes());
    out.extend_from_slice(&m.fingerprint.mtime_ns.to_le_bytes());
    out.extend_from_slice(&m.fingerprint.ctime_ns.to_le_bytes());
    out.extend_from_slice(&m.bitmap_hash);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

pub(crate) fn decode_clean(bytes: &[u8]) -> Result<CleanMarker, Invalid> {
    const F: &str = "clean";
    if bytes.len() != CLEAN_BYTES {
        return Err(invalid(
            F,
            format!("{} bytes, expected {CLEAN_BYTES}", bytes.len()),
        ));
    }
    if &bytes[0..8] != CLEAN_MAGIC {
        return Err(invalid(F, "bad magic"));
    }
    if blake3::hash(&bytes[0..80]).as_bytes() != &bytes[80..112] {
        return Err(invalid(F, "checksum mismatch"));
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(invalid(F, format!("unsupported version {version}")));
    }
    let mut bitmap_hash = [0u8; 32];
    bitmap_hash.copy_from_slice(&bytes[48..80]);
    Ok(CleanMarker {
        fingerprint: Fingerprint {
            size: u64_at(bytes, 16),
            ino: u64_at(bytes, 24),
            mtime_ns: u64_at(bytes, 32) as i64,
            ctime_ns: u64_at(bytes, 40) as i64,
        },
        bitmap_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 10 * EXTENT_BYTES + 5;

    fn al(extent_groups: &[&[u64]]) -> Vec<u8> {
        let h = encode_al_header(SIZE);
        let mut out = h.to_vec();
        for g in extent_groups {
            encode_al_groups(&h, g, &mut out);
        }
        out
    }

    #[test]
    fn al_roundtrip_sorts_and_dedups() {
        let c = decode_al(&al(&[&[3, 1], &[3, 10]])).expect("valid");
        assert_eq!(c.extents, vec![1, 3, 10]);
        assert_eq!(c.disk_size_bytes, SIZE);
        assert_eq!(c.torn_tail_bytes, 0);
        assert_eq!(
            decode_al(&al(&[])).expect("empty").extents,
            Vec::<u64>::new()
        );
    }

    #[test]
    fn al_torn_tail_is_ignored_but_corrupt_middle_is_not() {
        let mut b = al(&[&[1], &[2, 4]]);
        let full = b.len();
        b.truncate(full - 3);
        let c = decode_al(&b).expect("torn tail ok");
        assert_eq!(c.extents, vec![1]);
        assert!(c.torn_tail_bytes > 0);

        // A corrupt first group followed by more than a maximal group is corruption.
        let many: Vec<u64> = (0..11).collect();
        let mut groups: Vec<&[u64]> = vec![&[5]];
        let filler: Vec<Vec<u64>> = (0..3000).map(|i| vec![many[i % 11]]).collect();
        for f in &filler {
            groups.push(f);
        }
        let mut b = al(&groups);
        b[AL_HEADER_BYTES + 8] ^= 1;
        let e = decode_al(&b).expect_err("corrupt middle");
        assert!(e.what.contains("corrupt group"), "{e}");
    }

    #[test]
    fn corrupt_last_complete_group_is_not_taken_for_a_torn_tail() {
        let good = al(&[&[1], &[2, 4]]);
        let last = good.len() - (GROUP_OVERHEAD_BYTES + 16);
        // One flipped byte anywhere in the last (complete) group: its checksum, an extent,
        // its count or its magic. It was fsynced and its writers proceeded: corruption.
        for at in [good.len() - 1, good.len() - 16, last + 8, last + 4, last] {
            let mut b = good.clone();
            b[at] ^= 0x01;
            let e = decode_al(&b).expect_err("complete corrupt group");
            assert!(e.what.contains("corrupt group"), "flip at {at}: {e}");
        }
        // An incomplete last group (the append never finished) is still a torn tail...
        for cut in [1, 16, 20, GROUP_OVERHEAD_BYTES + 16 - 1] {
            let c = decode_al(&good[..good.len() - cut]).expect("torn tail");
            assert_eq!(c.extents, vec![1], "cut {cut}");
            assert!(c.torn_tail_bytes > 0);
        }
        // ...as is an appended range that reads as zeros (extended, data never written).
        let mut b = al(&[&[1]]);
        b.extend_from_slice(&[0u8; 40]);
        assert_eq!(decode_al(&b).expect("zero tail").extents, vec![1]);
        // A short last group whose declared count is wrong (flipped to fewer extents) is
        // complete for what it declares: corrupt.
        let mut b = good.clone();
        b[last + 4] = 1;
        assert!(decode_al(&b).is_err());
    }

    #[test]
    fn al_rejects_out_of_range_extents_and_bad_header() {
        // A complete group naming an extent beyond the disk was written whole: corrupt.
        let b = al(&[&[11]]);
        assert!(decode_al(&b).is_err());
        let mut b = al(&[&[1]]);
        b[24] ^= 1; // disk size, covered by the header checksum
        assert!(decode_al(&b).is_err());
        assert!(decode_al(b"short").is_err());
    }

    #[test]
    fn bitmap_roundtrip_and_rejections() {
        let words = vec![1u64, 0, 1 << 63];
        let size = 3 * 64 * 4096;
        let b = encode_bitmap(size, 4096, &words);
        let c = decode_bitmap(&b, 4096).expect("valid");
        assert_eq!(c.words, words);
        assert_eq!(c.disk_size_bytes, size);
        for i in [0usize, 10, 30, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(decode_bitmap(&bad, 4096).is_err(), "flip at {i}");
        }
        assert!(decode_bitmap(&b[..b.len() - 8], 4096).is_err());
        assert!(decode_bitmap(&b, 512).is_err());
        // Wrong word count for the declared size, with a valid checksum.
        let b = encode_bitmap(size, 4096, &[0, 0]);
        assert!(decode_bitmap(&b, 4096).is_err());
    }

    #[test]
    fn clean_roundtrip_and_rejections() {
        let m = CleanMarker {
            fingerprint: Fingerprint {
                size: 7,
                ino: 9,
                mtime_ns: -3,
                ctime_ns: 12345,
            },
            bitmap_hash: [7u8; 32],
        };
        let b = encode_clean(&m);
        assert_eq!(decode_clean(&b).expect("valid"), m);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_clean(&bad).is_err(), "flip at {i}");
        }
        assert!(decode_clean(&b[1..]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = decode_al(&bytes);
            let _ = decode_bitmap(&bytes, 4096);
            let _ = decode_clean(&bytes);
            let mut with_header = encode_al_header(SIZE).to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = decode_al(&with_header);
        }
    }
}
