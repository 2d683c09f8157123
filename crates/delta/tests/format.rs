//! The delta format's promises: what is written reads back identically, and any damage —
//! a flipped byte anywhere, truncation anywhere, a wrong key, reordered frames, trailing
//! bytes, hostile bytes — is refused with an error, never a panic or a wrong decode.

mod common;

use common::*;
use delta::{
    decode_payload, decode_stored_frame, Compression, DeltaError, DeltaReader, DeltaWriter, Event,
    FrameKind, PushDecoder,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// disk slot, block, blocks, fill pattern (0 = compressible, else pseudo-random seed)
    Data(bool, u64, u64, u8),
    Zero(bool, u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<bool>(), 0u64..600, 1u64..300, any::<u8>())
            .prop_map(|(d, b, n, p)| Op::Data(d, b, n, p)),
        (any::<bool>(), 0u64..600, 1u64..300).prop_map(|(d, b, n)| Op::Zero(d, b, n)),
    ]
}

fn bytes_for(n: usize, pattern: u8) -> Vec<u8> {
    if pattern < 128 {
        (0..n)
            .map(|i| ((i / 512) as u8).wrapping_add(pattern))
            .collect()
    } else {
        let mut x = pattern as u64 | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Writing a sequence of DATA/ZERO ops and reading it back gives the same disk images as
    /// applying the ops to a model.
    #[test]
    fn round_trip_matches_model(ops in prop::collection::vec(op(), 0..12), zstd in any::<bool>(), shared in any::<bool>()) {
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let h = header(compression);
        let mut model: Vec<(u32, Vec<u8>)> =
            h.disks.iter().map(|d| (d.index, vec![0u8; d.size_bytes as usize])).collect();
        let mut w = DeltaWriter::new(Vec::new(), &h, &KEY).unwrap();
        for op in &ops {
            let (slot, block, blocks) = match op { Op::Data(d, b, n, _) | Op::Zero(d, b, n) => (*d as usize, *b, *n) };
            let (disk, size) = (model[slot].0, model[slot].1.len() as u64);
            let offset = (block * 4096) % size;
            let len = (blocks * 4096).min(size - offset);
            let range = offset as usize..(offset + len) as usize;
            match op {
                Op::Data(_, _, _, p) => {
                    let data = bytes_for(len as usize, *p);
                    if shared {
                        w.data_shared(disk, offset, bytes::Bytes::from(data.clone())).unwrap();
                    } else {
                        w.data(disk, offset, &data).unwrap();
                    }
                    model[slot].1[range].copy_from_slice(&data);
                }
                Op::Zero(..) => {
                    w.zero(disk, offset, len).unwrap();
                    model[slot].1[range].fill(0);
                }
            }
        }
        let (bytes, summary) = w.finish().unwrap();
        prop_assert_eq!(summary.stored_bytes, bytes.len() as u64);
        let decoded = decode_all(&bytes, &KEY).unwrap();
        prop_assert!(decoded == model);
        let mut r = DeltaReader::new(&bytes[..], &KEY).unwrap();
        prop_assert_eq!(r.header(), &h);
        let s = r.verify_to_end().unwrap();
        prop_assert_eq!(s, summary);
    }

    /// Bytes pushed in arbitrary pieces decode to the same events as the pull reader.
    #[test]
    fn push_decoder_accepts_any_chunking(cuts in prop::collection::vec(1usize..3000, 1..20)) {
        let bytes = small_delta();
        let mut p = PushDecoder::new(&KEY);
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            p.feed::<DeltaError>(&rest[..n], |ev| {
                if let Event::Frame(info, _) = ev { frames.push(info) }
                Ok(())
            }).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        let s = p.finish().unwrap();
        prop_assert_eq!(s.frames, 3);
        prop_assert_eq!(frames.len(), 3);
    }

    /// Arbitrary bytes never panic and never decode as a valid delta.
    #[test]
    fn arbitrary_bytes_never_decode(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(decode_all(&bytes, &KEY).is_err());
    }

    /// Arbitrary bytes after a valid magic and version never decode either.
    #[test]
    fn arbitrary_bytes_after_magic_never_decode(tail in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut bytes = small_delta()[..12].to_vec();
        bytes.extend_from_slice(&tail);
        prop_assert!(decode_all(&bytes, &KEY).is_err());
    }

    /// Arbitrary mutations of a valid delta (overwrite, insert, delete a run) are refused.
    #[test]
    fn mutations_never_decode(pos in any::<prop::sample::Index>(), run in prop::collection::vec(any::<u8>(), 1..16), how in 0u8..3) {
        let valid = small_delta();
        let at = pos.index(valid.len());
        let mut bytes = valid.clone();
        match how {
            0 => for (i, b) in run.iter().enumerate() { if at + i < bytes.len() { bytes[at + i] = *b } },
            1 => { bytes.splice(at..at, run.iter().copied()); }
            _ => { let end = (at + run.len()).min(bytes.len()); bytes.drain(at..end); }
        }
        prop_assume!(bytes != valid);
        prop_assert!(decode_all(&bytes, &KEY).is_err());
    }
}

#[test]
fn every_single_byte_corruption_is_detected() {
    let valid = small_delta();
    decode_all(&valid, &KEY).unwrap();
    for i in 0..valid.len() {
        let mut bytes = valid.clone();
        bytes[i] ^= 0x01;
        assert!(
            decode_all(&bytes, &KEY).is_err(),
            "flip at byte {i} went undetected"
        );
    }
}

#[test]
fn every_truncation_is_detected() {
    let valid = small_delta();
    for n in 0..valid.len() {
        match decode_all(&valid[..n], &KEY) {
            Err(DeltaError::Truncated { .. }) => {}
            other => panic!("truncation to {n} bytes gave {other:?}"),
        }
    }
}

#[test]
fn wrong_key_is_refused_at_the_header() {
    let valid = small_delta();
    let mut key = KEY;
    key[31] ^= 1;
    assert!(matches!(
        DeltaReader::new(&valid[..], &key),
        Err(DeltaError::HeaderChecksum)
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = small_delta();
    bytes.push(0);
    assert!(matches!(
        decode_all(&bytes, &KEY),
        Err(DeltaError::TrailingBytes { .. })
    ));
}

#[test]
fn reordered_frames_are_refused() {
    let h = header(Compression::None);
    let mut w = DeltaWriter::new(Vec::new(), &h, &KEY).unwrap();
    w.data(0, 0, &[1u8; 4096]).unwrap();
    w.data(0, 4096, &[2u8; 4096]).unwrap();
    let (bytes, _) = w.finish().unwrap();
    let mut r = DeltaReader::new(&bytes[..], &KEY).unwrap();
    let a = r.next_frame_info().unwrap().unwrap();
    let b = r.next_frame_info().unwrap().unwrap();
    let (a0, a1) = (a.frame_pos as usize, (a.frame_pos + a.frame_len()) as usize);
    let b1 = (b.frame_pos + b.frame_len()) as usize;
    let mut swapped = bytes[..a0].to_vec();
    swapped.extend_from_slice(&bytes[a1..b1]);
    swapped.extend_from_slice(&bytes[a0..a1]);
    swapped.extend_from_slice(&bytes[b1..]);
    assert_eq!(swapped.len(), bytes.len());
    assert!(matches!(
        decode_all(&swapped, &KEY),
        Err(DeltaError::FooterMismatch(_))
    ));
}

#[test]
fn writer_refuses_out_of_range_misaligned_and_unknown_disk() {
    let h = header(Compression::None);
    let mut w = DeltaWriter::new(Vec::new(), &h, &KEY).unwrap();
    assert!(matches!(
        w.data(0, DISK_BYTES, &[0u8; 4096]),
        Err(DeltaError::FrameOutOfRange {
            disk: 0,
            offset: DISK_BYTES,
            len: 4096
        })
    ));
    assert!(matches!(
        w.zero(0, DISK_BYTES - 4096, 8192),
        Err(DeltaError::FrameOutOfRange { .. })
    ));
    assert!(matches!(
        w.zero(0, u64::MAX - 4095, 4096),
        Err(DeltaError::FrameOutOfRange { .. })
    ));
    assert!(matches!(
        w.data(0, 100, &[0u8; 4096]),
        Err(DeltaError::Misaligned { .. })
    ));
    assert!(matches!(
        w.data(1, 0, &[0u8; 4096]),
        Err(DeltaError::UnknownDisk { disk: 1 })
    ));
}

#[test]
fn large_data_is_split_into_1mib_frames_and_incompressible_data_stored_raw() {
    let h = header(Compression::Zstd);
    let mut w = DeltaWriter::new(Vec::new(), &h, &KEY).unwrap();
    let data = bytes_for(3 * 1024 * 1024, 200);
    w.data(2, 0, &data).unwrap();
    let (bytes, s) = w.finish().unwrap();
    assert_eq!(s.frames, 3);
    let mut r = DeltaReader::new(&bytes[..], &KEY).unwrap();
    while let Some(info) = r.next_frame_info().unwrap() {
        assert_eq!(info.len, 1 << 20);
        assert_eq!(
            info.codec,
            Compression::None,
            "random data must be stored raw"
        );
        // Random access: the frame re-read from its stored position decodes to the same bytes.
        let stored = &bytes[info.frame_pos as usize..(info.frame_pos + info.frame_len()) as usize];
        let f = decode_stored_frame(stored, info.frame_pos).unwrap();
        let off = info.offset as usize;
        assert_eq!(f.data().unwrap(), &data[off..off + (1 << 20)]);
    }
}

#[test]
fn stored_frames_decode_at_random_and_detect_corruption() {
    let bytes = small_delta();
    let mut r = DeltaReader::new(&bytes[..], &KEY).unwrap();
    let mut seen_zstd = false;
    while let Some(info) = r.next_frame_info().unwrap() {
        let mut stored =
            bytes[info.frame_pos as usize..(info.frame_pos + info.frame_len()) as usize].to_vec();
        let f = decode_stored_frame(&stored, info.frame_pos).unwrap();
        assert_eq!(f.info, info);
        if info.kind == FrameKind::Data {
            seen_zstd |= info.codec == Compression::Zstd;
            let data = decode_payload(f.payload, info.codec, info.len).unwrap();
            assert_eq!(data.len() as u64, info.len);
        }
        let last = stored.len() - 1;
        stored[last] ^= 0x80;
        assert!(decode_stored_frame(&stored, info.frame_pos).is_err());
    }
    assert!(seen_zstd, "the 0xAB block must have been compressed");
}

#[test]
fn decode_payload_caps_lengths_before_allocating() {
    assert!(decode_payload(&[0u8; 16], Compression::Zstd, u64::MAX).is_err());
    assert!(decode_payload(&[0u8; 16], Compression::Zstd, 4096).is_err());
    assert!(decode_payload(&[0u8; 16], Compression::None, 4096).is_err());
}

/// Position and stored length of every frame of `bytes`, in stream order.
fn frames_of(bytes: &[u8]) -> Vec<delta::FrameInfo> {
    let mut r = DeltaReader::new(bytes, &KEY).unwrap();
    let mut out = Vec::new();
    while let Some(info) = r.next_frame_info().unwrap() {
        out.push(info);
    }
    out
}

/// Recomputes a frame's unkeyed checksum in place, as an attacker without the key can.
fn fix_frame_checksum(bytes: &mut [u8], info: &delta::FrameInfo) {
    let at = info.frame_pos as usize;
    let payload = at + 44..at + 44 + info.stored_len as usize;
    let mut h = blake3::Hasher::new();
    h.update(&bytes[at..at + 28]);
    h.update(&bytes[payload]);
    let sum = h.finalize();
    bytes[at + 28..at + 44].copy_from_slice(&sum.as_bytes()[..16]);
}

#[test]
fn flipped_payload_byte_is_caught_by_the_frame_checksum() {
    let valid = small_delta();
    for info in frames_of(&valid)
        .into_iter()
        .filter(|f| f.kind == FrameKind::Data)
    {
        for at in [info.payload_pos(), info.frame_pos + info.frame_len() - 1] {
            let mut bytes = valid.clone();
            bytes[at as usize] ^= 0x10;
            match decode_all(&bytes, &KEY) {
                Err(DeltaError::FrameChecksum { pos }) => assert_eq!(pos, info.frame_pos),
                other => panic!("flip at {at} gave {other:?}"),
            }
            let stored =
                &bytes[info.frame_pos as usize..(info.frame_pos + info.frame_len()) as usize];
            assert!(matches!(
                decode_stored_frame(stored, info.frame_pos),
                Err(DeltaError::FrameChecksum { .. })
            ));
        }
    }
}

#[test]
fn altered_frame_with_a_recomputed_checksum_is_caught_by_the_mac() {
    let valid = small_delta();
    let frames = frames_of(&valid);
    let raw = frames
        .iter()
        .find(|f| f.kind == FrameKind::Data && f.codec == Compression::None)
        .expect("small_delta has a raw frame");
    // A replaced payload, checksum made to match: the head changed, so the MAC fails.
    let mut bytes = valid.clone();
    let p = raw.payload_pos() as usize;
    bytes[p..p + raw.stored_len as usize].fill(0x5A);
    fix_frame_checksum(&mut bytes, raw);
    assert!(matches!(
        decode_all(&bytes, &KEY),
        Err(DeltaError::FooterMismatch(_))
    ));
    // A moved frame (other offset, still in range), checksum made to match.
    let mut bytes = valid.clone();
    let at = raw.frame_pos as usize + 8;
    bytes[at..at + 8].copy_from_slice(&(raw.offset + 4096).to_le_bytes());
    fix_frame_checksum(&mut bytes, raw);
    assert!(matches!(
        decode_all(&bytes, &KEY),
        Err(DeltaError::FooterMismatch(_))
    ));
    // A zero frame turned into one of another length, checksum made to match.
    let zero = frames.iter().find(|f| f.kind == FrameKind::Zero).unwrap();
    let mut bytes = valid.clone();
    let at = zero.frame_pos as usize + 16;
    bytes[at..at + 8].copy_from_slice(&4096u64.to_le_bytes());
    fix_frame_checksum(&mut bytes, zero);
    assert!(matches!(
        decode_all(&bytes, &KEY),
        Err(DeltaError::FooterMismatch(_))
    ));
    // Sanity: the untouched delta still decodes.
    decode_all(&valid, &KEY).unwrap();
}

#[test]
fn compression_backs_off_on_incompressible_frames_and_probes_again() {
    use delta::{ZSTD_BACKOFF_AFTER, ZSTD_BACKOFF_SKIP};
    const BLOCK: usize = 4096;
    let h = header(Compression::Zstd);
    let disk = 2u32;
    let mut model = vec![0u8; 3 * 1024 * 1024];
    let mut w = DeltaWriter::new(Vec::new(), &h, &KEY).unwrap();
    // (compressible?, expected codec is zstd?) per 4 KiB frame.
    let mut plan: Vec<(bool, bool)> = Vec::new();
    let after = ZSTD_BACKOFF_AFTER as usize;
    let skip = ZSTD_BACKOFF_SKIP as usize;
    // Incompressible frames: all tried, the last one triggers the back-off.
    plan.extend(std::iter::repeat((false, false)).take(after));
    // Compressible data during the back-off is stored raw without trying.
    plan.extend(std::iter::repeat((true, false)).take(skip));
    // The probe compresses and compression resumes for every frame.
    plan.extend(std::iter::repeat((true, true)).take(5));
    // Incompressible again: a fresh streak is needed to back off.
    plan.extend(std::iter::repeat((false, false)).take(after));
    plan.extend(std::iter::repeat((true, false)).take(skip));
    // The probe fails (incompressible): back off again at once.
    plan.push((false, false));
    plan.extend(std::iter::repeat((true, false)).take(skip));
    plan.extend(std::iter::repeat((true, true)).take(3));
    // A lone incompressible frame among compressible ones does not back off.
    plan.push((false, false));
    plan.extend(std::iter::repeat((true, true)).take(3));
    assert!(plan.len() * BLOCK <= model.len());
    for (i, &(compressible, _)) in plan.iter().enumerate() {
        let data = bytes_for(
            BLOCK,
            if compressible {
                i as u8 % 128
            } else {
                128 + (i as u8 % 127)
            },
        );
        let off = i * BLOCK;
        w.data(disk, off as u64, &data).unwrap();
        model[off..off + BLOCK].copy_from_slice(&data);
    }
    let (bytes, summary) = w.finish().unwrap();
    assert_eq!(summary.frames, plan.len() as u64);
    let frames = frames_of(&bytes);
    let codecs: Vec<bool> = frames
        .iter()
        .map(|f| f.codec == Compression::Zstd)
        .collect();
    let want: Vec<bool> = plan.iter().map(|&(_, z)| z).collect();
    assert_eq!(codecs, want);
    // Round trip is exact.
    let decoded = decode_all(&bytes, &KEY).unwrap();
    let img = &decoded.iter().find(|(i, _)| *i == disk).unwrap().1;
    assert!(img == &model);
}

#[test]
fn mixed_large_writes_round_trip_with_back_off() {
    // 1 MiB frames alternating runs of random and compressible data, larger than a back-off.
    let h = header(Compression::Zstd);
    let mut model = vec![0u8; 3 * 1024 * 1024];
    let mut w = DeltaWriter::new(Vec::new(), &h, &KEY).unwrap();
    for round in 0..40u64 {
        let pattern = if (round / 6) % 2 == 0 { 200 } else { 7 } + (round % 5) as u8;
        let off = (round % 3) * (1 << 20);
        let data = bytes_for(1 << 20, pattern);
        w.data(2, off, &data).unwrap();
        model[off as usize..off as usize + (1 << 20)].copy_from_slice(&data);
    }
    let (bytes, s) = w.finish().unwrap();
    assert_eq!(s.frames, 40);
    let decoded = decode_all(&bytes, &KEY).unwrap();
    assert!(decoded.iter().find(|(i, _)| *i == 2).unwrap().1 == model);
    assert_eq!(
        DeltaReader::new(&bytes[..], &KEY)
            .unwrap()
            .verify_to_end()
            .unwrap(),
        s
    );
}

#[test]
fn payload_decoder_reuses_buffers_and_refuses_wrong_lengths() {
    let mut d = delta::PayloadDecoder::new();
    let mut out = Vec::with_capacity(1 << 20);
    let big = zstd::bulk::compress(&[3u8; 8192], 1).unwrap();
    // Decompresses to more than declared, even though `out` has room: refused.
    assert!(d
        .decode_into(&big, Compression::Zstd, 4096, &mut out)
        .is_err());
    assert!(out.is_empty());
    d.decode_into(&big, Compression::Zstd, 8192, &mut out)
        .unwrap();
    assert_eq!(out, vec![3u8; 8192]);
    let small = zstd::bulk::compress(&[4u8; 4096], 1).unwrap();
    d.decode_into(&small, Compression::Zstd, 4096, &mut out)
        .unwrap();
    assert_eq!(out, vec![4u8; 4096]);
    assert!(d
        .decode_into(&small, Compression::Zstd, 8192, &mut out)
        .is_err());
    d.decode_into(&[9u8; 4096], Compression::None, 4096, &mut out)
        .unwrap();
    assert_eq!(out, vec![9u8; 4096]);
}
