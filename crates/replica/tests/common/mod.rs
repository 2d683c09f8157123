//! Helpers for the replica tests: a model of the VM's disks that produces deltas and remembers
//! the exact image at every point, and functions that push deltas through the real receive
//! path and read points back through the real views.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;

use delta::{Compression, DeltaHeader, DeltaKind, DeltaWriter, DiskEntry};
use replica::{PointInfo, ReplicaError, ReplicaVm};

pub const KEY: [u8; 32] = [3u8; 32];
pub const VM: &str = "web-0";

/// A VM name for tests (the store takes names validated once, as `VmName`).
pub fn name(s: &str) -> delta::VmName {
    delta::VmName::parse(s).unwrap()
}

/// The test VM's name.
pub fn vm_id() -> delta::VmName {
    name(VM)
}
pub const BLOCK: u64 = 4096;

pub fn disks() -> Vec<DiskEntry> {
    vec![
        DiskEntry {
            index: 0,
            size_bytes: 64 * BLOCK,
        },
        DiskEntry {
            index: 1,
            size_bytes: 32 * BLOCK,
        },
    ]
}

#[derive(Debug, Clone)]
pub enum Op {
    Data {
        disk: u32,
        block: u64,
        blocks: u64,
        seed: u8,
    },
    Zero {
        disk: u32,
        block: u64,
        blocks: u64,
    },
}

pub type Images = BTreeMap<u32, Vec<u8>>;

/// The primary's disks, and the image at every point the replica accepted.
pub struct Model {
    pub images: Images,
    pub points: BTreeMap<u64, Images>,
    pub latest: u64,
    pub generation: u64,
    /// Full deltas made from now on are compared ones (`DeltaHeader::compared`).
    pub compared_full: bool,
}

/// Deterministic block content: compressible when seed < 128, noise otherwise.
pub fn content(len: usize, seed: u8) -> Vec<u8> {
    if seed < 128 {
        return (0..len)
            .map(|i| seed.wrapping_add((i / 1024) as u8))
            .collect();
    }
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Model {
    pub fn new() -> Self {
        Model {
            images: disks()
                .iter()
                .map(|d| (d.index, vec![0u8; d.size_bytes as usize]))
                .collect(),
            points: BTreeMap::new(),
            latest: 0,
            generation: 1,
            compared_full: false,
        }
    }

    /// Encodes the next delta (seq latest+1) for `ops`, and the images it leads to. Nothing
    /// changes in the model until [`Model::accept`].
    pub fn delta(
        &self,
        kind: DeltaKind,
        compression: Compression,
        ops: &[Op],
    ) -> (Vec<u8>, Images) {
        self.delta_with(
            self.latest + 1,
            self.latest,
            self.generation,
            kind,
            compression,
            ops,
            &KEY,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn delta_with(
        &self,
        seq: u64,
        parent_seq: u64,
        generation: u64,
        kind: DeltaKind,
        compression: Compression,
        ops: &[Op],
        key: &[u8; 32],
    ) -> (Vec<u8>, Images) {
        let header = DeltaHeader {
            compared: self.compared_full && kind == DeltaKind::Full,
            app_consistent: false,
            vm_id: delta::VmName::parse(VM).unwrap(),
            generation: delta::Generation(generation),
            seq: delta::Seq(seq),
            parent_seq: delta::Seq(parent_seq),
            cut_time_unix_ns: seq * 1_000_000_000,
            kind,
            compression,
            disks: disks(),
        };
        let mut images = self.images.clone();
        let mut w = DeltaWriter::new(Vec::new(), &header, key).unwrap();
        for op in ops {
            match *op {
                Op::Data {
                    disk,
                    block,
                    blocks,
                    seed,
                } => {
                    let img = images.get_mut(&disk).unwrap();
                    let (off, len) = clamp(img.len() as u64, block, blocks);
                    let data = content(len as usize, seed);
                    w.data(disk, off, &data).unwrap();
                    img[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                Op::Zero {
                    disk,
                    block,
                    blocks,
                } => {
                    let img = images.get_mut(&disk).unwrap();
                    let (off, len) = clamp(img.len() as u64, block, blocks);
                    w.zero(disk, off, len).unwrap();
                    img[off as usize..(off + len) as usize].fill(0);
                }
            }
        }
        (w.finish().unwrap().0, images)
    }

    pub fn accept(&mut self, images: Images) {
        self.latest += 1;
        self.images = images;
        self.points.insert(self.latest, self.images.clone());
    }
}

fn clamp(size: u64, block: u64, blocks: u64) -> (u64, u64) {
    let off = (block * BLOCK) % size;
    (off, (blocks * BLOCK).min(size - off).max(BLOCK))
}

/// Streams `bytes` into the VM in uneven pieces and commits.
pub fn send(vm: &ReplicaVm, bytes: &[u8]) -> Result<PointInfo, ReplicaError> {
    let mut inc = vm.begin_receive()?;
    for chunk in bytes.chunks(7919) {
        if inc.write_all(chunk).is_err() {
            break; // commit reports the named reason
        }
    }
    vm.commit(inc)
}

/// Reads a whole disk at a point through the NBD backend, in uneven pieces.
pub fn read_point(vm: &ReplicaVm, seq: u64, disk: u32) -> Vec<u8> {
    let view = vm.point_disk(delta::Seq(seq), disk).unwrap();
    assert!(view.read_only());
    let size = view.size_bytes() as usize;
    let mut out = vec![0u8; size];
    let mut off = 0;
    let mut step = 3 * BLOCK as usize;
    while off < size {
        let n = step.min(size - off);
        view.read_at(&mut out[off..off + n], off as u64).unwrap();
        off += n;
        step = step * 7 % (40 * BLOCK as usize) + BLOCK as usize;
    }
    out
}

/// Every listed point reads back exactly the model's image at that point.
pub fn assert_points_match(vm: &ReplicaVm, model: &Model) {
    let points = vm.points();
    assert!(!points.is_empty() || model.points.is_empty());
    for p in points {
        let want = model
            .points
            .get(&p.seq.get())
            .unwrap_or_else(|| panic!("replica lists unknown point {}", p.seq));
        for (&disk, img) in want {
            assert!(
                read_point(vm, p.seq.get(), disk) == *img,
                "point {} disk {disk} differs from the model",
                p.seq
            );
        }
    }
}
