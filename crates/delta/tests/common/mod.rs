//! Helpers shared by the delta integration tests: a reference header, a key, and a model disk
//! that applies frames, so round trips compare bytes rather than frame lists.

#![allow(dead_code)]

use delta::{Compression, DeltaHeader, DeltaKind, DeltaReader, DeltaWriter, DiskEntry, FrameBody};

pub const KEY: [u8; 32] = [7u8; 32];
pub const DISK_BYTES: u64 = 256 * 1024;

pub fn header(compression: Compression) -> DeltaHeader {
    DeltaHeader {
        compared: false,
        app_consistent: false,
        vm_id: delta::VmName::parse("web-0").unwrap(),
        generation: delta::Generation(3),
        seq: delta::Seq(5),
        parent_seq: delta::Seq(4),
        cut_time_unix_ns: 1_700_000_000_000_000_000,
        kind: DeltaKind::Incremental,
        compression,
        disks: vec![
            DiskEntry {
                index: 0,
                size_bytes: DISK_BYTES,
            },
            DiskEntry {
                index: 2,
                size_bytes: 3 * 1024 * 1024,
            },
        ],
    }
}

/// A small delta with a raw frame, a compressed frame and a zero frame.
pub fn small_delta() -> Vec<u8> {
    let mut w = DeltaWriter::new(Vec::new(), &header(Compression::Zstd), &KEY).unwrap();
    // xorshift: incompressible, so this frame is stored raw.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    w.data(0, 4096, &random).unwrap();
    w.data(2, 8192, &[0xAB; 4096]).unwrap();
    w.zero(0, 65536, 8192).unwrap();
    w.finish().unwrap().0
}

/// Decodes `bytes` fully; returns the disk images (disk index → bytes) it describes applied on
/// zeroed disks, or the first error.
pub fn decode_all(bytes: &[u8], key: &[u8; 32]) -> Result<Vec<(u32, Vec<u8>)>, delta::DeltaError> {
    let mut r = DeltaReader::new(bytes, key)?;
    let mut disks: Vec<(u32, Vec<u8>)> = r
        .header()
        .disks
        .iter()
        .map(|d| (d.index, vec![0u8; d.size_bytes as usize]))
        .collect();
    while let Some(f) = r.next_frame()? {
        let img = &mut disks.iter_mut().find(|(i, _)| *i == f.info.disk).unwrap().1;
        let range = f.info.offset as usize..(f.info.offset + f.info.len) as usize;
        match f.body {
            FrameBody::Data(d) => img[range].copy_from_slice(&d),
            FrameBody::Zero => img[range].fill(0),
        }
    }
    assert!(
        r.summary().is_some(),
        "None returned before the footer was verified"
    );
    Ok(disks)
}
