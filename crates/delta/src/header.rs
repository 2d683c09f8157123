//! The delta header: its in-memory type, validation rules shared by writer and reader, and its
//! byte encoding (see `docs/formats/delta.md`, "Header"). Also owns the key derivation, since
//! the header checksum is the first use of the key.

use proto::{Generation, Seq, VmName, DISKS_PER_VM_MAX};

use crate::{DeltaError, BLOCK_BYTES, DISK_BYTES_MAX, HEADER_BYTES_MAX};

pub(crate) const MAGIC: [u8; 8] = *b"USDELTA\0";
/// Format version written and the only one read (`docs/formats/delta.md`, "Versioning").
pub(crate) const VERSION: u16 = 2;
/// magic, version, flags, header_len: enough to know how much more header to read.
pub(crate) const PREAMBLE_BYTES: usize = 16;
/// Fixed fields after the preamble, before the VM id.
const FIXED_BYTES: usize = 40;
const DISK_ENTRY_BYTES: usize = 12;
pub(crate) const CHECKSUM_BYTES: usize = 32;
/// Smallest possible header: a 1-byte VM id and one disk.
pub(crate) const HEADER_BYTES_MIN: usize =
    PREAMBLE_BYTES + FIXED_BYTES + 1 + DISK_ENTRY_BYTES + CHECKSUM_BYTES;

/// `flags` bit 0: the cut was taken while the guest's filesystems were frozen (guest agent or
/// hooks): an application-consistent point. Every other bit is reserved and refused.
pub(crate) const FLAG_APP_CONSISTENT: u16 = 1;
/// `flags` bit 1: a compared `Full` delta (see [`DeltaHeader::compared`]).
pub(crate) const FLAG_COMPARED: u16 = 2;
/// Every flag bit this version knows.
const FLAGS_KNOWN: u16 = FLAG_APP_CONSISTENT | FLAG_COMPARED;

const HEADER_KEY_CONTEXT: &str = "understudy delta v2 header checksum";
const MAC_KEY_CONTEXT: &str = "understudy delta v2 stream mac";

/// What a delta represents relative to its parent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeltaKind {
    /// First replication of the VM: the parent is an all-zero disk.
    Initial,
    /// Changes since the parent point.
    Incremental,
    /// Resynchronization: after applying it the disks equal the primary's even if the parent
    /// point had diverged (whole-disk copy, or every block found different by hash).
    Full,
}

impl DeltaKind {
    pub fn code(self) -> u8 {
        match self {
            DeltaKind::Initial => 1,
            DeltaKind::Incremental => 2,
            DeltaKind::Full => 3,
        }
    }

    pub fn from_code(code: u8) -> Result<Self, DeltaError> {
        match code {
            1 => Ok(DeltaKind::Initial),
            2 => Ok(DeltaKind::Incremental),
            3 => Ok(DeltaKind::Full),
            other => Err(DeltaError::UnknownKind(other)),
        }
    }

    /// Stable lower-case name (for JSON and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaKind::Initial => "initial",
            DeltaKind::Incremental => "incremental",
            DeltaKind::Full => "full",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "initial" => Some(DeltaKind::Initial),
            "incremental" => Some(DeltaKind::Incremental),
            "full" => Some(DeltaKind::Full),
            _ => None,
        }
    }
}

/// Payload codec: in the header, the codecs frames may use; in a frame, the one it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    pub fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
        }
    }

    pub fn from_code(code: u8) -> Result<Self, DeltaError> {
        match code {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Zstd),
            other => Err(DeltaError::UnknownCompression(other)),
        }
    }
}

/// One replicated disk: its index within the VM and its size.
///
/// `index` stays a plain `u32` (not `proto::DiskIndex`): it is compared with every frame's
/// `disk` field and keys the replica's per-disk maps, all `u32` on the wire and in memory, so a
/// newtype here would only add conversions at each of those places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskEntry {
    /// Below [`DISKS_PER_VM_MAX`] (the primary numbers a VM's disks 0, 1, ...).
    pub index: u32,
    pub size_bytes: u64,
}

/// Everything the header says about a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHeader {
    /// The VM's name: validated once, when the header is built or decoded.
    pub vm_id: VmName,
    pub generation: Generation,
    pub seq: Seq,
    pub parent_seq: Seq,
    pub cut_time_unix_ns: u64,
    pub kind: DeltaKind,
    pub compression: Compression,
    /// The cut was taken with the guest's filesystems frozen (`flags` bit 0).
    pub app_consistent: bool,
    /// A `Full` delta holding only the blocks that differed from the replica's newest point
    /// when compared (`flags` bit 1; `resync.md`): it must not clear damage the replica found
    /// after that compare began.
    pub compared: bool,
    pub disks: Vec<DiskEntry>,
}

impl DeltaHeader {
    /// The disk entry for `index`, if the delta carries that disk.
    pub fn disk(&self, index: u32) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.index == index)
    }

    /// Checks every rule of the format that does not depend on bytes (shared by writer and
    /// reader so that the writer can never produce what the reader refuses).
    pub fn validate(&self) -> Result<(), DeltaError> {
        // `vm_id` is a `VmName`, valid by construction (1..=VM_NAME_MAX bytes, so its length
        // fits the one-byte `vm_id_len`).
        if self.seq == Seq(0) {
            return Err(DeltaError::BadHeader("seq must be at least 1"));
        }
        if self.parent_seq >= self.seq {
            return Err(DeltaError::BadHeader("parent_seq must be below seq"));
        }
        if self.compared && self.kind != DeltaKind::Full {
            return Err(DeltaError::BadHeader(
                "flag COMPARED is only for a Full delta",
            ));
        }
        validate_disks(&self.disks)
    }

    /// The header checksum (its last 32 bytes) this header has under `key`: what identifies
    /// one delta's bytes when an interrupted upload is resumed (`docs/formats/peer-protocol.md`).
    /// The encoding is a function of the fields, so a decoded header gives back the checksum
    /// it arrived with.
    pub fn checksum(&self, key: &[u8; 32]) -> Result<[u8; 32], DeltaError> {
        self.validate()?;
        let bytes = self.encode(&Keys::derive(key));
        let mut sum = [0u8; CHECKSUM_BYTES];
        sum.copy_from_slice(&bytes[bytes.len() - CHECKSUM_BYTES..]);
        Ok(sum)
    }

    fn encoded_len(vm_id_len: usize, disk_count: usize) -> usize {
        PREAMBLE_BYTES + FIXED_BYTES + vm_id_len + DISK_ENTRY_BYTES * disk_count + CHECKSUM_BYTES
    }

    /// Encodes the header, checksum included. The caller has validated it.
    pub(crate) fn encode(&self, keys: &Keys) -> Vec<u8> {
        let len = Self::encoded_len(self.vm_id.len(), self.disks.len());
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.app_consistent {
            FLAG_APP_CONSISTENT
        } else {
            0
        } | if self.compared { FLAG_COMPARED } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        // validate() bounds len far below u32::MAX (≤ HEADER_BYTES_MAX).
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(self.kind.code());
        out.push(self.compression.code());
        out.push(self.vm_id.len() as u8);
        out.push(0);
        for v in [
            self.generation.get(),
            self.seq.get(),
            self.parent_seq.get(),
            self.cut_time_unix_ns,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.disks.len() as u32).to_le_bytes());
        out.extend_from_slice(self.vm_id.as_bytes());
        for d in &self.disks {
            out.extend_from_slice(&d.index.to_le_bytes());
            out.extend_from_slice(&d.size_bytes.to_le_bytes());
        }
        let sum = blake3::keyed_hash(&keys.header, &out);
        out.extend_from_slice(sum.as_bytes());
        out
    }
}

/// Checks a disk table against the format's rules (the ones a VM's disks obey on the primary):
/// 1..=[`DISKS_PER_VM_MAX`] disks, indices unique and below it, sizes non-zero multiples of
/// [`BLOCK_BYTES`] up to [`DISK_BYTES_MAX`]. Shared by the header and the replica store, so a
/// disk table is judged by one rule everywhere.
pub fn validate_disks(disks: &[DiskEntry]) -> Result<(), DeltaError> {
    if disks.is_empty() || disks.len() > DISKS_PER_VM_MAX as usize {
        return Err(DeltaError::BadHeader(
            "disk count must be 1..=16 (DISKS_PER_VM_MAX)",
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        if d.size_bytes == 0 || d.size_bytes % BLOCK_BYTES != 0 || d.size_bytes > DISK_BYTES_MAX {
            return Err(DeltaError::BadHeader(
                "disk size must be a non-zero multiple of 4096 and at most 1 PiB",
            ));
        }
        if d.index >= DISKS_PER_VM_MAX {
            return Err(DeltaError::BadHeader(
                "disk index must be below 16 (DISKS_PER_VM_MAX)",
            ));
        }
        if disks[..i].iter().any(|o| o.index == d.index) {
            return Err(DeltaError::BadHeader("duplicate disk index"));
        }
    }
    Ok(())
}

/// Parses the 16-byte preamble and returns the total header length it announces.
pub(crate) fn parse_preamble(p: &[u8]) -> Result<usize, DeltaError> {
    let mut c = Cursor::new(p);
    if c.bytes(8)? != MAGIC {
        return Err(DeltaError::BadMagic);
    }
    let version = c.u16()?;
    if version != VERSION {
        return Err(DeltaError::UnsupportedVersion(version));
    }
    let flags = c.u16()?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DeltaError::UnsupportedFlags(flags));
    }
    let len = c.u32()?;
    if len > HEADER_BYTES_MAX || (len as usize) < HEADER_BYTES_MIN {
        return Err(DeltaError::BadHeader("header length out of bounds"));
    }
    Ok(len as usize)
}

/// Parses and checks a whole header (`bytes` is exactly the announced header length).
pub(crate) fn parse_header(bytes: &[u8], keys: &Keys) -> Result<DeltaHeader, DeltaError> {
    let body_len = bytes
        .len()
        .checked_sub(CHECKSUM_BYTES)
        .ok_or(DeltaError::BadHeader("header too short"))?;
    let (body, sum) = bytes.split_at(body_len);
    let mut c = Cursor::new(body);
    c.bytes(10)?;
    let flags = c.u16()?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DeltaError::UnsupportedFlags(flags));
    }
    c.bytes(PREAMBLE_BYTES - 12)?;
    let kind = c.u8()?;
    let compression = c.u8()?;
    let vm_id_len = c.u8()? as usize;
    if c.u8()? != 0 {
        return Err(DeltaError::BadHeader("reserved byte must be zero"));
    }
    let generation = c.u64()?;
    let seq = c.u64()?;
    let parent_seq = c.u64()?;
    let cut_time_unix_ns = c.u64()?;
    let disk_count = c.u32()?;
    if disk_count == 0 || disk_count > DISKS_PER_VM_MAX {
        return Err(DeltaError::BadHeader(
            "disk count must be 1..=16 (DISKS_PER_VM_MAX)",
        ));
    }
    if DeltaHeader::encoded_len(vm_id_len, disk_count as usize) != bytes.len() {
        return Err(DeltaError::BadHeader(
            "header length does not match its fields",
        ));
    }
    // Only now that the length is known to be consistent, check the checksum: a wrong key or a
    // flipped bit anywhere is refused before any field is interpreted further.
    let want = blake3::keyed_hash(&keys.header, body);
    if want.as_bytes() != sum {
        return Err(DeltaError::HeaderChecksum);
    }
    let kind = DeltaKind::from_code(kind)?;
    let compression = Compression::from_code(compression)?;
    let vm_id = std::str::from_utf8(c.bytes(vm_id_len)?)
        .ok()
        .and_then(|s| VmName::parse(s).ok())
        .ok_or(DeltaError::BadHeader(
            "vm_id must be a valid VM name (1-64 letters, digits, '.', '_', '-')",
        ))?;
    let mut disks = Vec::with_capacity(disk_count as usize);
    for _ in 0..disk_count {
        let index = c.u32()?;
        let size_bytes = c.u64()?;
        disks.push(DiskEntry { index, size_bytes });
    }
    let header = DeltaHeader {
        compared: flags & FLAG_COMPARED != 0,
        app_consistent: flags & FLAG_APP_CONSISTENT != 0,
        vm_id,
        generation: Generation(generation),
        seq: Seq(seq),
        parent_seq: Seq(parent_seq),
        cut_time_unix_ns,
        kind,
        compression,
        disks,
    };
    header.validate()?;
    Ok(header)
}

/// The two sub-keys derived from the caller's key (domain separation).
#[derive(Clone)]
pub(crate) struct Keys {
    pub header: [u8; 32],
    pub mac: [u8; 32],
}

impl Keys {
    pub fn derive(key: &[u8; 32]) -> Self {
        Keys {
            header: blake3::derive_key(HEADER_KEY_CONTEXT, key),
            mac: blake3::derive_key(MAC_KEY_CONTEXT, key),
        }
    }
}

/// Bounds-checked little-endian reads over a byte slice (never panics).
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DeltaError> {
        if self.buf.len() < n {
            return Err(DeltaError::BadHeader("field runs past the end"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DeltaError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, DeltaError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DeltaError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DeltaError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DeltaError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(app_consistent: bool) -> DeltaHeader {
        DeltaHeader {
            compared: false,
            vm_id: VmName::parse("vm").unwrap(),
            generation: Generation(1),
            seq: Seq(2),
            parent_seq: Seq(1),
            cut_time_unix_ns: 5,
            kind: DeltaKind::Incremental,
            compression: Compression::None,
            app_consistent,
            disks: vec![DiskEntry {
                index: 0,
                size_bytes: 4096,
            }],
        }
    }

    #[test]
    fn app_consistent_flag_round_trips_and_unknown_flags_are_refused() {
        let keys = Keys::derive(&[7; 32]);
        for app in [false, true] {
            let bytes = header(app).encode(&keys);
            assert_eq!(bytes[10], u8::from(app));
            let len = parse_preamble(&bytes[..PREAMBLE_BYTES]).unwrap();
            assert_eq!(len, bytes.len());
            assert_eq!(parse_header(&bytes, &keys).unwrap(), header(app));
        }
        // COMPARED round-trips on a Full delta and is refused on any other kind.
        let mut full = header(false);
        full.kind = DeltaKind::Full;
        full.compared = true;
        let bytes = full.encode(&keys);
        assert_eq!(bytes[10], 0b10);
        assert_eq!(parse_header(&bytes, &keys).unwrap(), full);
        let mut other = header(false);
        other.compared = true;
        assert!(matches!(other.validate(), Err(DeltaError::BadHeader(_))));
        let mut bytes = header(true).encode(&keys);
        bytes[10] = 0b101;
        assert!(matches!(
            parse_preamble(&bytes[..PREAMBLE_BYTES]),
            Err(DeltaError::UnsupportedFlags(5))
        ));
        assert!(matches!(
            parse_header(&bytes, &keys),
            Err(DeltaError::UnsupportedFlags(5))
        ));
    }

    /// Re-signs `bytes` (a whole encoded header) after a test edited its body.
    fn resign(bytes: &mut [u8], keys: &Keys) {
        let body = bytes.len() - CHECKSUM_BYTES;
        let sum = blake3::keyed_hash(&keys.header, &bytes[..body]);
        bytes[body..].copy_from_slice(sum.as_bytes());
    }

    #[test]
    fn delta_header_with_more_disks_than_a_vm_may_have_is_refused() {
        let keys = Keys::derive(&[7; 32]);
        let mut h = header(false);
        h.disks = (0..DISKS_PER_VM_MAX)
            .map(|index| DiskEntry {
                index,
                size_bytes: 4096,
            })
            .collect();
        // The most a VM may have is accepted both ways.
        h.validate().unwrap();
        assert_eq!(parse_header(&h.encode(&keys), &keys).unwrap(), h);
        // One more: the writer refuses to build it, and the reader refuses it on the wire even
        // with a correct checksum (as a hostile or buggy peer holding the key could send).
        h.disks.push(DiskEntry {
            index: DISKS_PER_VM_MAX,
            size_bytes: 4096,
        });
        assert!(matches!(h.validate(), Err(DeltaError::BadHeader(_))));
        assert!(matches!(
            parse_header(&h.encode(&keys), &keys),
            Err(DeltaError::BadHeader(_))
        ));
        // A disk index a VM cannot have is refused too.
        let mut h = header(false);
        h.disks[0].index = DISKS_PER_VM_MAX;
        assert!(matches!(h.validate(), Err(DeltaError::BadHeader(_))));
        assert!(matches!(
            parse_header(&h.encode(&keys), &keys),
            Err(DeltaError::BadHeader(_))
        ));
    }

    #[test]
    fn delta_header_vm_id_is_refused_unless_the_primary_could_name_a_vm_so() {
        let keys = Keys::derive(&[7; 32]);
        let mut h = header(false);
        h.vm_id = VmName::parse("abcd").unwrap();
        let good = h.encode(&keys);
        assert_eq!(parse_header(&good, &keys).unwrap().vm_id, "abcd");
        let at = PREAMBLE_BYTES + FIXED_BYTES;
        assert_eq!(&good[at..at + 4], b"abcd");
        // Names the old 1..=255-byte UTF-8 rule let through but the primary never creates (the
        // replica store refused some of them later, with a rule of its own): refused at the
        // header, never a panic.
        let bad: [&[u8; 4]; 6] = [
            b"a/..",
            b"-abc",
            b".abc",
            b"a bc",
            b"\xff\xfe\x00a",
            b"\xc3\xa9ab",
        ];
        for bad in bad {
            let mut bytes = good.clone();
            bytes[at..at + 4].copy_from_slice(bad);
            resign(&mut bytes, &keys);
            assert!(
                matches!(parse_header(&bytes, &keys), Err(DeltaError::BadHeader(_))),
                "{bad:?} accepted"
            );
        }
    }
}
