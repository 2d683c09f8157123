//! The point index: for each journal delta and disk, a layer mapping disk ranges to the frame
//! that wrote them last in that delta (or ZERO). A read of point P walks the layers with
//! `seq ≤ P` newest first and falls back to the base image: O(L · log F + S) for L layers,
//! F extents per layer and S segments returned. Layers are immutable once built and shared by
//! `Arc`, so a reader clones the list it needs and does its I/O without holding any lock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use delta::{FrameInfo, FrameKind};

/// A journal file, by name only: reads open it through the store's bounded descriptor cache
/// (`fds`), so the index holds no file descriptor however many points it lists.
#[derive(Debug)]
pub(crate) struct JournalFile {
    pub seq: u64,
    pub path: PathBuf,
    /// Unique per file for the process's lifetime: a merge replaces a point's file by another
    /// one of the same seq, so caches key decoded frames by this, never by seq.
    pub id: u64,
}

static NEXT_JOURNAL_FILE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl JournalFile {
    pub fn new(seq: u64, path: PathBuf) -> Arc<JournalFile> {
        Arc::new(JournalFile {
            seq,
            path,
            id: NEXT_JOURNAL_FILE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// Where a DATA frame is stored.
#[derive(Debug)]
pub(crate) struct FrameRef {
    pub journal: Arc<JournalFile>,
    pub info: FrameInfo,
}

/// What an extent of a layer reads as.
#[derive(Debug, Clone)]
pub(crate) enum Src {
    Zero,
    Data(Arc<FrameRef>),
}

/// One delta's view of one disk: non-overlapping extents keyed by start offset.
#[derive(Debug, Default)]
pub(crate) struct Layer {
    extents: BTreeMap<u64, (u64, Src)>,
}

/// A contiguous run of a read and where its bytes come from.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub start: u64,
    pub end: u64,
    pub src: SegSrc,
}

#[derive(Debug, Clone)]
pub(crate) enum SegSrc {
    Base,
    Zero,
    Data(Arc<FrameRef>),
}

impl Layer {
    /// Records a frame of this delta; later frames override earlier ones (stream order).
    pub fn insert_frame(&mut self, journal: &Arc<JournalFile>, info: FrameInfo) {
        let src = match info.kind {
            FrameKind::Zero => Src::Zero,
            FrameKind::Data => Src::Data(Arc::new(FrameRef {
                journal: journal.clone(),
                info,
            })),
        };
        self.insert(info.offset, info.offset + info.len, src);
    }

    fn insert(&mut self, start: u64, end: u64, src: Src) {
        // An extent starting before `start` that reaches into it: keep its head, and its tail
        // if it also reaches past `end`.
        if let Some((&s, (e, old))) = self.extents.range(..start).next_back() {
            let (e, old) = (*e, old.clone());
            if e > start {
                self.extents.insert(s, (start, old.clone()));
                if e > end {
                    self.extents.insert(end, (e, old));
                }
            }
        }
        // Extents starting inside [start, end): drop them, keeping any tail past `end`.
        let inside: Vec<u64> = self.extents.range(start..end).map(|(k, _)| *k).collect();
        for k in inside {
            if let Some((e, old)) = self.extents.remove(&k) {
                if e > end {
                    self.extents.insert(end, (e, old));
                }
            }
        }
        self.extents.insert(start, (end, src));
    }

    /// Splits [start, end) into what this layer covers (appended to `out`) and the gaps it
    /// leaves (appended to `gaps`).
    fn cover(&self, start: u64, end: u64, out: &mut Vec<Segment>, gaps: &mut Vec<(u64, u64)>) {
        let mut cursor = start;
        let before = self.extents.range(..start).next_back();
        let overlapping = before
            .filter(|(_, (e, _))| *e > start)
            .into_iter()
            .chain(self.extents.range(start..end));
        for (&s, (e, src)) in overlapping {
            if s > cursor {
                gaps.push((cursor, s));
            }
            let seg_start = s.max(cursor);
            let seg_end = (*e).min(end);
            let src = match src {
                Src::Zero => SegSrc::Zero,
                Src::Data(f) => SegSrc::Data(f.clone()),
            };
            out.push(Segment {
                start: seg_start,
                end: seg_end,
                src,
            });
            cursor = seg_end;
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
    }

    /// The ranges `[start, end)` this layer covers, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.extents.iter().map(|(s, (e, _))| (*s, *e))
    }

    /// Number of extents (for tests and metrics).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.extents.len()
    }
}

/// Resolves [start, end) through `layers` (newest first) down to the base image. The result is
/// sorted, contiguous and covers exactly [start, end).
pub(crate) fn resolve(layers: &[Arc<Layer>], start: u64, end: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut gaps = vec![(start, end)];
    for layer in layers {
        if gaps.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for (s, e) in gaps {
            layer.cover(s, e, &mut out, &mut next);
        }
        gaps = next;
    }
    out.extend(gaps.into_iter().map(|(start, end)| Segment {
        start,
        end,
        src: SegSrc::Base,
    }));
    out.sort_by_key(|s| s.start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zero(offset: u64, len: u64) -> FrameInfo {
        FrameInfo {
            kind: FrameKind::Zero,
            disk: 0,
            offset,
            len,
            codec: delta::Compression::None,
            stored_len: 0,
            frame_pos: offset, // used as a tag for which frame wrote a block
        }
    }

    fn journal() -> Arc<JournalFile> {
        JournalFile::new(1, PathBuf::new())
    }

    proptest! {
        /// Layers built from random overlapping frames resolve every block to the last frame
        /// that wrote it, in the newest layer that has one, else to the base.
        #[test]
        fn resolve_matches_block_model(
            layers in prop::collection::vec(prop::collection::vec((0u64..64, 1u64..16, any::<bool>()), 0..8), 1..5),
            a in 0u64..80, n in 1u64..80,
        ) {
            const BLOCKS: u64 = 80;
            let j = journal();
            // model[layer][block] = Some(tag) where tag = (is_data, frame index)
            let mut model: Vec<Vec<Option<(bool, u64)>>> = Vec::new();
            let mut built = Vec::new();
            for frames in &layers {
                let mut layer = Layer::default();
                let mut m = vec![None; BLOCKS as usize];
                for (i, &(b, len, data)) in frames.iter().enumerate() {
                    let len = len.min(BLOCKS - b);
                    let mut info = zero(b, len);
                    info.frame_pos = i as u64;
                    if data { info.kind = FrameKind::Data; }
                    layer.insert_frame(&j, info);
                    for blk in b..b + len { m[blk as usize] = Some((data, i as u64)); }
                }
                model.push(m);
                built.push(Arc::new(layer));
            }
            model.reverse();
            built.reverse();
            let (start, end) = (a.min(BLOCKS - 1), (a + n).min(BLOCKS));
            let segs = resolve(&built, start, end);
            let mut cursor = start;
            for s in &segs {
                prop_assert_eq!(s.start, cursor);
                prop_assert!(s.end > s.start);
                cursor = s.end;
                for blk in s.start..s.end {
                    let want = model.iter().find_map(|m| m[blk as usize]);
                    let got = match &s.src {
                        SegSrc::Base => None,
                        SegSrc::Zero => Some((false, u64::MAX)),
                        SegSrc::Data(f) => Some((true, f.info.frame_pos)),
                    };
                    match (want, got) {
                        (None, None) => {}
                        (Some((false, _)), Some((false, _))) => {}
                        (Some((true, w)), Some((true, g))) => prop_assert_eq!(w, g),
                        other => prop_assert!(false, "block {}: {:?}", blk, other),
                    }
                }
            }
            prop_assert_eq!(cursor, end);
        }
    }

    #[test]
    fn overwrite_splits_extents() {
        let j = journal();
        let mut l = Layer::default();
        l.insert_frame(&j, zero(0, 10));
        let mut d = zero(3, 2);
        d.kind = FrameKind::Data;
        l.insert_frame(&j, d);
        assert_eq!(l.len(), 3);
    }
}
