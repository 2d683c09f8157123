//! Lock-free bit sets over atomic `u64` words: the dirty bitmaps (one bit per 4 KiB block) and
//! the hot-extent set of the activity log (one bit per 4 MiB extent).
//!
//! Owns only bits. It never does I/O and never decides what a bit means; callers provide the
//! ordering guarantees they need (the cut gate orders the active bitmap; `secured` bits rely on
//! the acquire/release ordering used here).

use std::sync::atomic::{AtomicU64, Ordering};

const WORD_BITS: u64 = 64;

/// A fixed-size set of bits, settable and testable concurrently without locks.
pub(crate) struct Bitmap {
    words: Box<[AtomicU64]>,
    nbits: u64,
}

/// Mask of bits `lo..=hi` inside one word (`lo <= hi < 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 63 {
        u64::MAX
    } else {
        (1u64 << (hi + 1)) - 1
    };
    upper & !((1u64 << lo) - 1)
}

impl Bitmap {
    pub(crate) fn new(nbits: u64) -> Bitmap {
        let nwords = nbits.div_ceil(WORD_BITS) as usize;
        // A zeroed allocation (calloc: fresh zero pages from the kernel) instead of writing
        // each word: pages the guest never dirties are never resident, so an 8 TiB disk does
        // not cost 256 MiB of RAM per bitmap up front (T11: memory of an idle export).
        let zeroed: Box<[u64]> = vec![0u64; nwords].into_boxed_slice();
        // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64, and the
        // box is uniquely owned, so reinterpreting the allocation is sound.
        let words = unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) };
        Bitmap { words, nbits }
    }

    pub(crate) fn nbits(&self) -> u64 {
        self.nbits
    }

    /// Number of words; word `w` holds bits `64 * w..64 * (w + 1)`.
    pub(crate) fn nwords(&self) -> usize {
        self.words.len()
    }

    /// Word `w` (bits beyond `nbits` are zero). Acquire, like every read here.
    pub(crate) fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// Calls `f(word_index, mask)` for each word touched by bits `first..=last`, clipped to the
    /// size of the map.
    fn for_words(&self, first: u64, last: u64, mut f: impl FnMut(usize, u64) -> bool) -> bool {
        if self.nbits == 0 || first > last || first >= self.nbits {
            return true;
        }
        let last = last.min(self.nbits - 1);
        let (w0, w1) = (first / WORD_BITS, last / WORD_BITS);
        for w in w0..=w1 {
            let lo = if w == w0 { first % WORD_BITS } else { 0 };
            let hi = if w == w1 { last % WORD_BITS } else { 63 };
            if !f(w as usize, mask(lo, hi)) {
                return false;
            }
        }
        true
    }

    /// Sets bits `first..=last`. Skips the atomic read-modify-write when the bits are already
    /// set, so rewriting a hot block does not bounce the cache line between cores.
    pub(crate) fn set_range(&self, first: u64, last: u64) {
        self.for_words(first, last, |w, m| {
            let word = &self.words[w];
            if word.load(Ordering::Acquire) & m != m {
                word.fetch_or(m, Ordering::AcqRel);
            }
            true
        });
    }

    pub(crate) fn set(&self, bit: u64) {
        self.set_range(bit, bit);
    }

    pub(crate) fn clear_range(&self, first: u64, last: u64) {
        self.for_words(first, last, |w, m| {
            self.words[w].fetch_and(!m, Ordering::AcqRel);
            true
        });
    }

    pub(crate) fn test(&self, bit: u64) -> bool {
        bit < self.nbits
            && self.words[(bit / WORD_BITS) as usize].load(Ordering::Acquire)
                & (1u64 << (bit % WORD_BITS))
                != 0
    }

    /// True when any bit of `first..=last` is set.
    pub(crate) fn any_in(&self, first: u64, last: u64) -> bool {
        !self.for_words(first, last, |w, m| {
            self.words[w].load(Ordering::Acquire) & m == 0
        })
    }

    /// True when every bit of `first..=last` (clipped to the map) is set.
    pub(crate) fn all_in(&self, first: u64, last: u64) -> bool {
        self.for_words(first, last, |w, m| {
            self.words[w].load(Ordering::Acquire) & m == m
        })
    }

    /// True when some bit of `first..=last` is set here and clear in `other` (same size).
    pub(crate) fn any_in_and_not(&self, other: &Bitmap, first: u64, last: u64) -> bool {
        !self.for_words(first, last, |w, m| {
            let here = self.words[w].load(Ordering::Acquire);
            here & m == 0 || here & !other.words[w].load(Ordering::Acquire) & m == 0
        })
    }

    pub(crate) fn clear_all(&self) {
        for w in self.words.iter() {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// Sets every bit that is set in `other` (same size).
    pub(crate) fn or_from(&self, other: &Bitmap) {
        for (mine, theirs) in self.words.iter().zip(other.words.iter()) {
            let v = theirs.load(Ordering::Acquire);
            if v != 0 {
                mine.fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Number of bits set in `self ∪ other` (same size).
    pub(crate) fn count_union(&self, other: &Bitmap) -> u64 {
        self.words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| {
                u64::from((a.load(Ordering::Acquire) | b.load(Ordering::Acquire)).count_ones())
            })
            .sum()
    }

    /// Maximal runs of set bits as `(first, count)`, in order.
    pub(crate) fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, w) in self.words.iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            while v != 0 {
                let lo = u64::from(v.trailing_zeros());
                let len = u64::from((!(v >> lo)).trailing_zeros()).min(WORD_BITS - lo);
                let start = wi as u64 * WORD_BITS + lo;
                match out.last_mut() {
                    Some((s, n)) if *s + *n == start => *n += len,
                    _ => out.push((start, len)),
                }
                v &= !mask(lo, lo + len - 1);
            }
        }
        out
    }

    /// Indices of the set bits, in order.
    pub(crate) fn ones(&self) -> Vec<u64> {
        self.runs()
            .into_iter()
            .flat_map(|(s, n)| s..s + n)
            .collect()
    }

    /// A copy of the words.
    #[cfg(test)]
    pub(crate) fn snapshot_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Snapshot of `self ∪ other` (same size).
    pub(crate) fn union_words(&self, other: &Bitmap) -> Vec<u64> {
        self.words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| a.load(Ordering::Acquire) | b.load(Ordering::Acquire))
            .collect()
    }

    /// Sets every bit set in `words` (extra words and bits beyond `nbits` are ignored).
    pub(crate) fn or_words(&self, words: &[u64]) {
        for (i, v) in words.iter().enumerate().take(self.words.len()) {
            let first = i as u64 * WORD_BITS;
            let mut v = *v;
            while v != 0 {
                let bit = u64::from(v.trailing_zeros());
                v &= v - 1;
                if first + bit < self.nbits {
                    self.words[i].fetch_or(1u64 << bit, Ordering::AcqRel);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_test_clear_ranges_across_words() {
        let b = Bitmap::new(200);
        b.set_range(60, 130);
        assert!(!b.test(59));
        assert!(b.test(60) && b.test(64) && b.test(127) && b.test(130));
        assert!(!b.test(131));
        assert_eq!(b.count(), 71);
        assert!(b.all_in(60, 130));
        assert!(!b.all_in(59, 130));
        assert!(b.any_in(0, 60));
        assert!(!b.any_in(0, 59));
        assert!(!b.any_in(131, 199));
        b.clear_range(64, 127);
        assert_eq!(b.runs(), vec![(60, 4), (128, 3)]);
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn ranges_are_clipped_to_size() {
        let b = Bitmap::new(70);
        b.set_range(65, 1000);
        assert_eq!(b.count(), 5);
        assert!(!b.test(70));
        assert!(b.all_in(65, 5000));
        let empty = Bitmap::new(0);
        empty.set_range(0, 10);
        assert_eq!(empty.count(), 0);
        assert!(empty.runs().is_empty());
    }

    #[test]
    fn runs_coalesce_across_word_boundaries() {
        let b = Bitmap::new(256);
        b.set_range(0, 0);
        b.set_range(63, 64);
        b.set_range(127, 191);
        b.set(255);
        assert_eq!(b.runs(), vec![(0, 1), (63, 2), (127, 65), (255, 1)]);
        assert_eq!(b.ones().len() as u64, b.count());
        let full = Bitmap::new(128);
        full.set_range(0, 127);
        assert_eq!(full.runs(), vec![(0, 128)]);
    }

    #[test]
    fn union_and_difference() {
        let a = Bitmap::new(100);
        let b = Bitmap::new(100);
        a.set_range(0, 9);
        b.set_range(5, 14);
        assert_eq!(a.count_union(&b), 15);
        assert!(a.any_in_and_not(&b, 0, 9));
        assert!(!a.any_in_and_not(&b, 5, 9));
        a.or_from(&b);
        assert_eq!(a.runs(), vec![(0, 15)]);
        let c = Bitmap::new(100);
        c.or_words(&a.snapshot_words());
        assert_eq!(c.runs(), vec![(0, 15)]);
        assert_eq!(a.union_words(&b), a.snapshot_words());
    }

    #[test]
    fn or_words_ignores_bits_beyond_size() {
        let b = Bitmap::new(10);
        b.or_words(&[u64::MAX, u64::MAX]);
        assert_eq!(b.count(), 10);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_bool_model(ops in proptest::collection::vec((0u8..3, 0u64..300, 0u64..80), 0..60)) {
            let b = Bitmap::new(300);
            let mut model = vec![false; 300];
            for (op, first, len) in ops {
                let last = first + len;
                match op {
                    0 => { b.set_range(first, last); for i in first..=last.min(299) { model[i as usize] = true; } }
                    1 => { b.clear_range(first, last); for i in first..=last.min(299) { model[i as usize] = false; } }
                    _ => {
                        let any = (first..=last.min(299)).any(|i| model[i as usize]);
                        let all = (first..=last.min(299)).all(|i| model[i as usize]);
                        proptest::prop_assert_eq!(b.any_in(first, last), any);
                        proptest::prop_assert_eq!(b.all_in(first, last), all);
                    }
                }
            }
            let ones: Vec<u64> = (0..300).filter(|i| model[*i as usize]).collect();
            proptest::prop_assert_eq!(b.ones(), ones);
        }
    }
}
