//! Block → op lookup for reads of the new image.
//!
//! Ops may cover several blocks (v3 multi-block REPLACE) and, in hostile or
//! sloppy files, overlap. The index resolves overlaps with the rule the merge
//! uses: the first op in file order wins. It stores disjoint block ranges
//! sorted by start, so a lookup is one binary search and memory is
//! proportional to the number of ops.

use std::collections::BTreeMap;

use crate::op::CowOp;

/// Disjoint `[start, end)` block ranges, each owned by one op.
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockIndex {
    ranges: Vec<(u64, u64, usize)>,
}

impl BlockIndex {
    /// Build from ops in file order (earlier ops win overlaps).
    pub fn build(ops: &[CowOp]) -> Self {
        let mut map: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            let start = op.new_block;
            // new_block < 2^32 and num_blocks ≤ 64: no overflow, but stay safe.
            let end = start.saturating_add(op.num_blocks);
            let mut cur = start;
            if let Some((_, &(prev_end, _))) = map.range(..=cur).next_back() {
                cur = cur.max(prev_end);
            }
            while cur < end {
                match map.range(cur..).next() {
                    Some((&next_start, &(next_end, _))) if next_start < end => {
                        if next_start > cur {
                            map.insert(cur, (next_start, i));
                        }
                        cur = cur.max(next_end);
                    }
                    _ => {
                        map.insert(cur, (end, i));
                        cur = end;
                    }
                }
            }
        }
        Self {
            ranges: map.into_iter().map(|(s, (e, i))| (s, e, i)).collect(),
        }
    }

    /// Index of the op producing `block`, if any.
    pub fn find(&self, block: u64) -> Option<usize> {
        let n = self.ranges.partition_point(|&(s, _, _)| s <= block);
        let &(_, end, op) = self.ranges.get(n.checked_sub(1)?)?;
        (block < end).then_some(op)
    }

    /// Number of distinct ranges.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::CompressionAlgorithm;
    use crate::op::OpKind;

    fn op(new_block: u64, num_blocks: u64) -> CowOp {
        CowOp {
            kind: OpKind::Replace,
            new_block,
            num_blocks,
            source: 0,
            data_offset: 0,
            data_length: 0,
            compression: CompressionAlgorithm::None,
            stored_raw: true,
            index: 0,
        }
    }

    #[test]
    fn first_op_wins_overlaps() {
        let ops = [op(4, 4), op(2, 4), op(6, 1), op(10, 1), op(0, 16)];
        let idx = BlockIndex::build(&ops);
        let expect = [4, 4, 1, 1, 0, 0, 0, 0, 4, 4, 3, 4, 4, 4, 4, 4];
        for (b, &e) in expect.iter().enumerate() {
            assert_eq!(idx.find(b as u64), Some(e), "block {b}");
        }
        assert_eq!(idx.find(16), None);
        assert_eq!(idx.find(u64::MAX), None);
    }

    #[test]
    fn duplicates_keep_first_and_gaps_are_empty() {
        let ops = [op(7, 1), op(7, 1), op(3, 1), op(3, 1)];
        let idx = BlockIndex::build(&ops);
        assert_eq!(idx.find(7), Some(0));
        assert_eq!(idx.find(3), Some(2));
        assert_eq!(idx.find(5), None);
        assert_eq!(idx.len(), 2);
    }
}
