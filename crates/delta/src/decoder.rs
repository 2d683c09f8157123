//! The delta decoder as a state machine without I/O. At every step it says how many bytes it
//! needs next ([`Decoder::need`]); the caller hands exactly that many to [`Decoder::step`].
//! Every length is validated before it becomes a `need`, so the largest request is one frame
//! payload (≤ 1 MiB). [`PushDecoder`] adapts it to bytes pushed in arbitrary pieces.
//!
//! Invariant: [`Event::Footer`] is only produced after the footer's counts and keyed MAC have
//! been verified; nothing before it may be treated as committed. The MAC is fed the header,
//! every frame head and the footer, never a payload: each payload is verified by its frame
//! checksum, which sits in the MAC'd head (`docs/formats/delta.md`, version 2).

use crate::frame::{
    parse_frame_head, verify_checksum, FrameInfo, FrameKind, FRAME_HEAD_BYTES, TAG_DATA,
    TAG_FOOTER, TAG_ZERO,
};
use crate::header::{parse_header, parse_preamble, Keys, PREAMBLE_BYTES};
use crate::{DeltaError, DeltaHeader, DeltaSummary};

/// Footer bytes after its tag: 7 reserved, 3 counters, 32 MAC.
const FOOTER_REST_BYTES: usize = 7 + 24 + 32;
/// Footer bytes covered by the MAC, after the tag.
const FOOTER_MACED_BYTES: usize = 7 + 24;

/// What one step of the decoder produced.
#[derive(Debug)]
pub enum Event<'a> {
    /// Bytes consumed, nothing to report yet.
    More,
    /// The header was read and its checksum verified.
    Header(DeltaHeader),
    /// A frame whose checksum was verified; `payload` is its stored (maybe compressed) payload.
    Frame(FrameInfo, &'a [u8]),
    /// The footer was verified: the delta is complete and authentic.
    Footer(DeltaSummary),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Preamble,
    HeaderRest {
        preamble: [u8; PREAMBLE_BYTES],
        header_len: usize,
    },
    Tag,
    FrameHead {
        tag: u8,
    },
    Payload {
        info: FrameInfo,
        head: [u8; FRAME_HEAD_BYTES],
    },
    FooterRest,
    Done,
    Failed,
}

/// Validating delta decoder without I/O.
pub struct Decoder {
    keys: Keys,
    state: State,
    /// Bytes consumed so far.
    pos: u64,
    mac: blake3::Hasher,
    header: Option<DeltaHeader>,
    frames: u64,
    data_bytes: u64,
    zero_bytes: u64,
    summary: Option<DeltaSummary>,
}

impl Decoder {
    pub fn new(key: &[u8; 32]) -> Self {
        let keys = Keys::derive(key);
        let mac = blake3::Hasher::new_keyed(&keys.mac);
        Decoder {
            keys,
            state: State::Preamble,
            pos: 0,
            mac,
            header: None,
            frames: 0,
            data_bytes: 0,
            zero_bytes: 0,
            summary: None,
        }
    }

    /// How many bytes the next [`Decoder::step`] takes; 0 once the footer was verified (any
    /// further byte is an error) or after a failure.
    pub fn need(&self) -> usize {
        match self.state {
            State::Preamble => PREAMBLE_BYTES,
            State::HeaderRest { header_len, .. } => header_len - PREAMBLE_BYTES,
            State::Tag => 1,
            State::FrameHead { .. } => FRAME_HEAD_BYTES - 1,
            State::Payload { info, .. } => info.stored_len as usize,
            State::FooterRest => FOOTER_REST_BYTES,
            State::Done | State::Failed => 0,
        }
    }

    /// Bytes consumed so far (the stream position of the next byte).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The header, once read.
    pub fn header(&self) -> Option<&DeltaHeader> {
        self.header.as_ref()
    }

    /// The verified footer totals, once the footer was read.
    pub fn summary(&self) -> Option<&DeltaSummary> {
        self.summary.as_ref()
    }

    /// True once the footer was verified.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// True once a step failed; the decoder refuses everything afterwards.
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed)
    }

    /// Consumes exactly [`Decoder::need`] bytes. Any error is final.
    pub fn step<'a>(&mut self, bytes: &'a [u8]) -> Result<Event<'a>, DeltaError> {
        match self.state {
            State::Failed => return Err(DeltaError::Failed),
            State::Done => return Err(DeltaError::TrailingBytes { pos: self.pos }),
            _ => {}
        }
        if bytes.len() != self.need() {
            self.state = State::Failed;
            return Err(DeltaError::Failed);
        }
        match self.advance(bytes) {
            Ok(ev) => {
                self.pos += bytes.len() as u64;
                Ok(ev)
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    fn advance<'a>(&mut self, bytes: &'a [u8]) -> Result<Event<'a>, DeltaError> {
        match self.state {
            State::Preamble => {
                let header_len = parse_preamble(bytes)?;
                let mut preamble = [0u8; PREAMBLE_BYTES];
                preamble.copy_from_slice(bytes);
                self.mac.update(bytes);
                self.state = State::HeaderRest {
                    preamble,
                    header_len,
                };
                Ok(Event::More)
            }
            State::HeaderRest {
                preamble,
                header_len,
            } => {
                let mut all = Vec::with_capacity(header_len);
                all.extend_from_slice(&preamble);
                all.extend_from_slice(bytes);
                let header = parse_header(&all, &self.keys)?;
                self.mac.update(bytes);
                self.header = Some(header.clone());
                self.state = State::Tag;
                Ok(Event::Header(header))
            }
            State::Tag => {
                let tag = bytes[0];
                match tag {
                    TAG_DATA | TAG_ZERO => self.state = State::FrameHead { tag },
                    TAG_FOOTER => self.state = State::FooterRest,
                    other => {
                        return Err(DeltaError::BadFrameTag {
                            pos: self.pos,
                            tag: other,
                        })
                    }
                }
                self.mac.update(bytes);
                Ok(Event::More)
            }
            State::FrameHead { tag } => {
                let frame_pos = self.pos - 1;
                let mut head = [0u8; FRAME_HEAD_BYTES];
                head[0] = tag;
                head[1..].copy_from_slice(bytes);
                let header = self.header.as_ref().ok_or(DeltaError::Failed)?;
                let info =
                    parse_frame_head(&head, frame_pos, Some(&header.disks), header.compression)?;
                self.mac.update(bytes);
                match info.kind {
                    FrameKind::Zero => {
                        verify_checksum(&head, &[], frame_pos)?;
                        self.count(&info)?;
                        self.state = State::Tag;
                        Ok(Event::Frame(info, &[]))
                    }
                    FrameKind::Data => {
                        self.state = State::Payload { info, head };
                        Ok(Event::More)
                    }
                }
            }
            State::Payload { info, head } => {
                // The payload's only hash: the MAC already covered the head holding this
                // checksum (format version 2).
                verify_checksum(&head, bytes, info.frame_pos)?;
                self.count(&info)?;
                self.state = State::Tag;
                Ok(Event::Frame(info, bytes))
            }
            State::FooterRest => {
                let (maced, mac) = bytes.split_at(FOOTER_MACED_BYTES);
                if maced[..7].iter().any(|&b| b != 0) {
                    return Err(DeltaError::FooterMismatch("reserved bytes must be zero"));
                }
                let field = |i: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&maced[7 + 8 * i..15 + 8 * i]);
                    u64::from_le_bytes(a)
                };
                self.mac.update(maced);
                let want = self.mac.finalize();
                if want.as_bytes() != mac {
                    return Err(DeltaError::FooterMismatch(
                        "keyed hash mismatch (corrupt, reordered or foreign delta, or wrong key)",
                    ));
                }
                if field(0) != self.frames {
                    return Err(DeltaError::FooterMismatch("frame count"));
                }
                if field(1) != self.data_bytes || field(2) != self.zero_bytes {
                    return Err(DeltaError::FooterMismatch("byte totals"));
                }
                let summary = DeltaSummary {
                    frames: self.frames,
                    data_bytes: self.data_bytes,
                    zero_bytes: self.zero_bytes,
                    stored_bytes: self.pos + bytes.len() as u64,
                    mac: *want.as_bytes(),
                };
                self.summary = Some(summary);
                self.state = State::Done;
                Ok(Event::Footer(summary))
            }
            State::Done | State::Failed => Err(DeltaError::Failed),
        }
    }

    /// Marks the decoder failed (a consumer refused an event).
    pub fn poison(&mut self) {
        self.state = State::Failed;
    }

    fn count(&mut self, info: &FrameInfo) -> Result<(), DeltaError> {
        self.frames += 1;
        let total = match info.kind {
            FrameKind::Data => &mut self.data_bytes,
            FrameKind::Zero => &mut self.zero_bytes,
        };
        *total = total.checked_add(info.len).ok_or(DeltaError::BadFrame {
            pos: info.frame_pos,
            reason: "byte total overflows",
        })?;
        Ok(())
    }
}

/// [`Decoder`] for bytes pushed in pieces of any size: buffers at most one unit (header, frame
/// head, one payload, footer) and hands each completed unit's event to a callback.
pub struct PushDecoder {
    dec: Decoder,
    buf: Vec<u8>,
}

impl PushDecoder {
    pub fn new(key: &[u8; 32]) -> Self {
        PushDecoder {
            dec: Decoder::new(key),
            buf: Vec::new(),
        }
    }

    pub fn decoder(&self) -> &Decoder {
        &self.dec
    }

    /// Feeds bytes; calls `on_event` for every event other than [`Event::More`]. The first
    /// error (from the decoder or the callback) is returned and the decoder is then failed.
    pub fn feed<E: From<DeltaError>>(
        &mut self,
        mut input: &[u8],
        mut on_event: impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            let need = self.dec.need();
            if need == 0 {
                return Err(match self.dec.is_failed() {
                    true => DeltaError::Failed.into(),
                    false => DeltaError::TrailingBytes {
                        pos: self.dec.position(),
                    }
                    .into(),
                });
            }
            let event = if self.buf.is_empty() && input.len() >= need {
                let (unit, rest) = input.split_at(need);
                input = rest;
                self.dec.step(unit)?
            } else {
                let take = (need - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.buf.len() < need {
                    continue;
                }
                let unit = std::mem::take(&mut self.buf);
                let result = self
                    .dec
                    .step(&unit)
                    .map(|ev| Self::deliver(ev, &mut on_event));
                self.buf = unit;
                self.buf.clear();
                match result {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => {
                        self.dec.poison();
                        return Err(e);
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if let Err(e) = Self::deliver(event, &mut on_event) {
                self.dec.poison();
                return Err(e);
            }
        }
        Ok(())
    }

    fn deliver<E>(
        ev: Event<'_>,
        on_event: &mut impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        match ev {
            Event::More => Ok(()),
            other => on_event(other),
        }
    }

    /// Ends the stream: an error unless the footer was verified.
    pub fn finish(&self) -> Result<DeltaSummary, DeltaError> {
        match self.dec.summary() {
            Some(s) if self.buf.is_empty() => Ok(*s),
            _ if self.dec.is_failed() => Err(DeltaError::Failed),
            _ => Err(DeltaError::Truncated {
                pos: self.dec.position() + self.buf.len() as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Hostile frames that a correct writer cannot produce, crafted with valid checksums so that
    //! the field checks themselves are exercised.

    use super::*;
    use crate::frame::encode_frame_head;
    use crate::{Compression, DeltaKind, DeltaReader, DiskEntry};

    const KEY: [u8; 32] = [9u8; 32];

    fn header() -> DeltaHeader {
        DeltaHeader {
            compared: false,
            app_consistent: false,
            vm_id: proto::VmName::parse("vm").unwrap(),
            generation: proto::Generation(1),
            seq: proto::Seq(1),
            parent_seq: proto::Seq(0),
            cut_time_unix_ns: 0,
            kind: DeltaKind::Initial,
            compression: Compression::None,
            disks: vec![DiskEntry {
                index: 0,
                size_bytes: 8192,
            }],
        }
    }

    fn with_frame(info: FrameInfo, payload: &[u8]) -> Vec<u8> {
        let mut bytes = header().encode(&Keys::derive(&KEY));
        bytes.extend_from_slice(&encode_frame_head(&info, payload));
        bytes.extend_from_slice(payload);
        bytes
    }

    fn zero_frame(disk: u32, offset: u64, len: u64) -> FrameInfo {
        FrameInfo {
            kind: FrameKind::Zero,
            disk,
            offset,
            len,
            codec: Compression::None,
            stored_len: 0,
            frame_pos: 0,
        }
    }

    fn first_frame_error(bytes: &[u8]) -> DeltaError {
        let mut r = DeltaReader::new(bytes, &KEY).expect("header is valid");
        r.next_frame().expect_err("frame must be refused")
    }

    #[test]
    fn frame_beyond_disk_end_is_refused_by_name() {
        let e = first_frame_error(&with_frame(zero_frame(0, 8192, 4096), &[]));
        assert!(matches!(
            e,
            DeltaError::FrameOutOfRange {
                disk: 0,
                offset: 8192,
                len: 4096
            }
        ));
        let e = first_frame_error(&with_frame(zero_frame(0, u64::MAX - 4095, 4096), &[]));
        assert!(matches!(e, DeltaError::FrameOutOfRange { .. }));
    }

    #[test]
    fn unknown_disk_and_misaligned_frames_are_refused() {
        let e = first_frame_error(&with_frame(zero_frame(1, 0, 4096), &[]));
        assert!(matches!(e, DeltaError::UnknownDisk { disk: 1 }));
        let e = first_frame_error(&with_frame(zero_frame(0, 512, 4096), &[]));
        assert!(matches!(e, DeltaError::Misaligned { .. }));
    }

    #[test]
    fn zstd_frame_in_uncompressed_delta_is_refused() {
        let info = FrameInfo {
            kind: FrameKind::Data,
            codec: Compression::Zstd,
            stored_len: 10,
            ..zero_frame(0, 0, 4096)
        };
        let e = first_frame_error(&with_frame(info, &[0u8; 10]));
        assert!(matches!(e, DeltaError::BadFrame { .. }));
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        let mut bytes = with_frame(zero_frame(0, 0, 4096), &[]);
        for version in [1u8, 3] {
            bytes[8] = version;
            assert!(matches!(
                DeltaReader::new(&bytes[..], &KEY),
                Err(DeltaError::UnsupportedVersion(v)) if v == u16::from(version)
            ));
        }
        bytes[0] = b'X';
        assert!(matches!(
            DeltaReader::new(&bytes[..], &KEY),
            Err(DeltaError::BadMagic)
        ));
    }
}
