//! The dirty-region bitmap the coordinator keeps for a replica that is not in sync.
//!
//! One bit per [`super::DIRTY_REGION_BYTES`] region. A set bit means "this region may
//! differ from the in-sync replicas"; resync clears a bit just before it copies the region
//! (under the range lock) and sets it again if the copy fails, so the set bits are always
//! a superset of the regions the replica is missing.

/// A fixed-size set of region indexes.
#[derive(Debug, Clone)]
pub(super) struct RegionBitmap {
    words: Vec<u64>,
    regions: u64,
    set: u64,
}

impl RegionBitmap {
    /// No region set.
    pub(super) fn empty(regions: u64) -> RegionBitmap {
        RegionBitmap {
            words: vec![0; regions.div_ceil(64) as usize],
            regions,
            set: 0,
        }
    }

    /// Every region set (a full resync).
    pub(super) fn full(regions: u64) -> RegionBitmap {
        let mut b = RegionBitmap::empty(regions);
        for r in 0..regions {
            b.set(r);
        }
        b
    }

    pub(super) fn set(&mut self, region: u64) {
        if region >= self.regions {
            return;
        }
        let (w, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.set += 1;
        }
    }

    pub(super) fn clear(&mut self, region: u64) {
        if region >= self.regions {
            return;
        }
        let (w, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        if self.words[w] & bit != 0 {
            self.words[w] &= !bit;
            self.set -= 1;
        }
    }

    /// Sets every region overlapping bytes `[offset, offset + len)` of regions of
    /// `region_bytes`.
    pub(super) fn set_bytes(&mut self, offset: u64, len: u64, region_bytes: u64) {
        if len == 0 {
            return;
        }
        let first = offset / region_bytes;
        let last = (offset + len - 1) / region_bytes;
        for r in first..=last {
            self.set(r);
        }
    }

    /// The lowest set region, if any.
    pub(super) fn first_set(&self) -> Option<u64> {
        self.words
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| i as u64 * 64 + w.trailing_zeros() as u64)
    }

    pub(super) fn count(&self) -> u64 {
        self.set
    }

    #[cfg(test)]
    pub(super) fn is_set(&self, region: u64) -> bool {
        self.words
            .get((region / 64) as usize)
            .is_some_and(|w| w & (1 << (region % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_first_set() {
        let mut b = RegionBitmap::empty(130);
        assert_eq!(b.first_set(), None);
        b.set_bytes(65 * 10 + 5, 20, 10); // regions 65..=67
        assert_eq!(b.count(), 3);
        assert_eq!(b.first_set(), Some(65));
        b.set(65);
        assert_eq!(b.count(), 3, "setting twice counts once");
        b.clear(65);
        assert_eq!(b.first_set(), Some(66));
        b.set(500); // out of range: ignored
        assert_eq!(b.count(), 2);
        let f = RegionBitmap::full(130);
        assert_eq!((f.count(), f.first_set()), (130, Some(0)));
    }
}
