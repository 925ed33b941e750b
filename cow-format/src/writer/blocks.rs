//! Bookkeeping of the target blocks already written, to enforce "at most one
//! op per new block" (fact sheet §6.2 [REC]), and of the merge-sequence
//! entries still waiting for their op.

use std::collections::{BTreeMap, HashSet};

/// A set of block ranges, stored as disjoint, non-touching intervals.
#[derive(Debug, Default)]
pub(crate) struct BlockSet {
    /// start → end (exclusive).
    ranges: BTreeMap<u64, u64>,
}

impl BlockSet {
    /// The first block of `[start, start + len)` already in the set, if any.
    pub(crate) fn first_overlap(&self, start: u64, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let end = start.saturating_add(len);
        if let Some((_, &e)) = self.ranges.range(..=start).next_back() {
            if e > start {
                return Some(start);
            }
        }
        self.ranges.range(start..end).next().map(|(&s, _)| s)
    }

    /// Add `[start, start + len)`, which must not overlap the set.
    pub(crate) fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = start;
        let mut e = start.saturating_add(len);
        // Merge with a range ending exactly at `start`.
        if let Some((&ps, &pe)) = self.ranges.range(..start).next_back() {
            if pe == start {
                s = ps;
                self.ranges.remove(&ps);
            }
        }
        // Merge with a range starting exactly at the end.
        if let Some(ne) = self.ranges.remove(&e) {
            e = ne;
        }
        self.ranges.insert(s, e);
    }
}

/// Sequence entries whose op has not been added yet.
#[derive(Debug, Default)]
pub(crate) struct PendingSequence {
    waiting: HashSet<u64>,
}

impl PendingSequence {
    pub(crate) fn new(entries: &[u32]) -> Self {
        Self {
            waiting: entries.iter().map(|&b| u64::from(b)).collect(),
        }
    }

    /// An op record starting at `new_block` was written.
    pub(crate) fn op_added(&mut self, new_block: u64) {
        if !self.waiting.is_empty() {
            self.waiting.remove(&new_block);
        }
    }

    /// The smallest entry still without an op.
    pub(crate) fn first_missing(&self) -> Option<u64> {
        self.waiting.iter().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_and_merging() {
        let mut s = BlockSet::default();
        s.insert(10, 5); // [10,15)
        assert_eq!(s.first_overlap(0, 10), None);
        assert_eq!(s.first_overlap(15, 3), None);
        assert_eq!(s.first_overlap(14, 3), Some(14));
        assert_eq!(s.first_overlap(5, 10), Some(10));
        assert_eq!(s.first_overlap(12, 1), Some(12));
        s.insert(15, 2); // merges into [10,17)
        s.insert(5, 5); // merges into [5,17)
        assert_eq!(s.ranges.len(), 1);
        assert_eq!(s.ranges.get(&5), Some(&17));
        s.insert(20, 1);
        assert_eq!(s.first_overlap(17, 3), None);
        assert_eq!(s.first_overlap(17, 4), Some(20));
        s.insert(17, 3); // joins both
        assert_eq!(s.ranges.len(), 1);
        assert_eq!(s.ranges.get(&5), Some(&21));
        assert_eq!(s.first_overlap(u64::MAX - 1, 5), None);
    }

    #[test]
    fn pending_sequence() {
        let mut p = PendingSequence::new(&[7, 3, 9]);
        p.op_added(3);
        p.op_added(100);
        assert_eq!(p.first_missing(), Some(7));
        p.op_added(7);
        p.op_added(9);
        assert_eq!(p.first_missing(), None);
    }
}
