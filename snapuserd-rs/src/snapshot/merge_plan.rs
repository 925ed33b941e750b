//! The daemon's view of a COW file: its data ops in COW merge order.
//!
//! The COW reader's `merge_order()` yields the ordered ops (COPY, XOR) first, in the
//! sequence the OTA generator chose, then the REPLACE and ZERO ops. A [`MergePlan`] keeps
//! exactly that list (never reordered: reference §A.5, the stale-data lesson) together with
//! `num_merge_ops`, the durable count of leading ops that are already merged.
//!
//! The plan is validated once, at construction, so everything built on it (exception
//! store, merge tracker, block server) can rely on these invariants:
//! * every ordered op comes before every non-ordered op;
//! * no two ops write the same `new_block`;
//! * `num_merge_ops <= ops.len()`;
//! * byte offsets derived from block numbers (`block * 4096`) do not overflow.

use thiserror::Error;

/// Bytes per block (and per dm-snapshot chunk) everywhere in this module tree.
pub const BLOCK_SIZE: usize = 4096;

/// [`BLOCK_SIZE`] as a `u64`, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;

/// What a data op does to its destination block: the COW format's op kind (COPY: `source`
/// is a block number; XOR: a byte offset, possibly unaligned; REPLACE/ZERO: unused).
/// [`OpKind::is_ordered`] is true for COPY and XOR, the ops that read the source device and
/// therefore must be merged in exactly the planned order.
pub use cow_format::OpKind;

/// One data op of the merge plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlannedOp {
    /// What the op does.
    pub kind: OpKind,
    /// Position in `CowReader::ops` of the COW op that produces this block (a v3 multi-block
    /// REPLACE is one COW op for several planned ops); 0 for plans not built from a COW.
    pub cow_op: u32,
    /// Block of the new image this op produces (the dm-snapshot `old_chunk`).
    pub new_block: u64,
    /// COPY: source block number. XOR: source byte offset. REPLACE/ZERO: ignored.
    pub source: u64,
}

impl PlannedOp {
    /// A COPY of source block `source_block` to `new_block`.
    pub fn copy(new_block: u64, source_block: u64) -> Self {
        Self::new(OpKind::Copy, new_block, source_block)
    }

    /// An XOR op whose source bytes start at `source_byte_offset`.
    pub fn xor(new_block: u64, source_byte_offset: u64) -> Self {
        Self::new(OpKind::Xor, new_block, source_byte_offset)
    }

    /// A REPLACE op.
    pub fn replace(new_block: u64) -> Self {
        Self::new(OpKind::Replace, new_block, 0)
    }

    /// A ZERO op.
    pub fn zero(new_block: u64) -> Self {
        Self::new(OpKind::Zero, new_block, 0)
    }

    fn new(kind: OpKind, new_block: u64, source: u64) -> Self {
        PlannedOp {
            kind,
            cow_op: 0,
            new_block,
            source,
        }
    }

    /// Block `new_block` of the COW op at position `cow_op` of `CowReader::ops`.
    pub fn of_cow_op(cow_op: u32, op: &cow_format::CowOp, new_block: u64) -> Self {
        let source = match op.kind {
            OpKind::Copy | OpKind::Xor => op.source,
            OpKind::Replace | OpKind::Zero => 0,
        };
        PlannedOp {
            kind: op.kind,
            cow_op,
            new_block,
            source,
        }
    }

    /// Byte offset in the source device of the 4096 bytes this op reads, if it reads any.
    /// Validated plans guarantee this does not overflow.
    pub fn source_byte_offset(&self) -> Option<u64> {
        match self.kind {
            OpKind::Copy => self.source.checked_mul(BLOCK_SIZE_U64),
            OpKind::Xor => Some(self.source),
            OpKind::Replace | OpKind::Zero => None,
        }
    }

    /// The source blocks this op reads: none, one, or two (an unaligned XOR).
    pub fn source_blocks(&self) -> SourceBlocks {
        match self.kind {
            OpKind::Copy => SourceBlocks {
                first: self.source,
                count: 1,
            },
            OpKind::Xor => {
                let first = self.source / BLOCK_SIZE_U64;
                let count = if self.source % BLOCK_SIZE_U64 == 0 {
                    1
                } else {
                    2
                };
                SourceBlocks { first, count }
            }
            OpKind::Replace | OpKind::Zero => SourceBlocks { first: 0, count: 0 },
        }
    }
}

/// The 0, 1 or 2 consecutive source blocks an op reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceBlocks {
    /// First block read.
    pub first: u64,
    /// Number of blocks read (0, 1 or 2).
    pub count: u8,
}

impl SourceBlocks {
    /// Iterate over the blocks.
    pub fn iter(self) -> impl Iterator<Item = u64> {
        (0..u64::from(self.count)).map(move |i| self.first.saturating_add(i))
    }
}

/// Read access to the source (old-image) device: what COPY and XOR ops read. It is the COW
/// format's source trait: `cow_backend::source_file::FileSource` implements it on the real
/// source device with positioned reads; tests use byte vectors.
pub use cow_format::SourceImage as SourceDevice;

/// Why a list of ops is not a usable merge plan.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MergePlanError {
    /// An ordered op (COPY/XOR) follows a REPLACE/ZERO op in merge order.
    #[error("merge-order op {index} ({kind:?} to block {new_block}) is ordered but follows a non-ordered op")]
    OrderedAfterUnordered {
        /// Position in merge order.
        index: usize,
        /// Kind of the offending op.
        kind: OpKind,
        /// Its destination block.
        new_block: u64,
    },
    /// Two ops write the same block.
    #[error("merge-order ops {first} and {second} both write block {new_block}")]
    DuplicateBlock {
        /// Earlier position.
        first: usize,
        /// Later position.
        second: usize,
        /// The block.
        new_block: u64,
    },
    /// `num_merge_ops` exceeds the number of ops.
    #[error("num_merge_ops {num_merge_ops} exceeds the {num_ops} data ops of the plan")]
    MergedBeyondEnd {
        /// Recorded merge progress.
        num_merge_ops: u64,
        /// Number of ops.
        num_ops: usize,
    },
    /// A block number or source offset would overflow a byte offset.
    #[error("merge-order op {index}: block or source offset {value} overflows a byte offset")]
    OffsetOverflow {
        /// Position in merge order.
        index: usize,
        /// The offending value.
        value: u64,
    },
    /// More ops than chunk ids the exception store can hand out (u32 chunk ids).
    #[error("{num_ops} data ops are more than the exception store supports")]
    TooManyOps {
        /// Number of ops.
        num_ops: usize,
    },
}

/// Upper bound on ops: keeps every chunk id (about `ops * 257/256` plus gaps) within `u32`.
pub const MAX_OPS: usize = 1 << 30;

/// A validated list of data ops in COW merge order plus merge progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    ops: Vec<PlannedOp>,
    num_ordered: usize,
    num_merge_ops: usize,
}

impl MergePlan {
    /// Validate `ops` (merge order) and `num_merge_ops` (durable merge progress).
    pub fn new(ops: Vec<PlannedOp>, num_merge_ops: u64) -> Result<Self, MergePlanError> {
        if ops.len() > MAX_OPS {
            return Err(MergePlanError::TooManyOps { num_ops: ops.len() });
        }
        let merged = usize::try_from(num_merge_ops)
            .ok()
            .filter(|&m| m <= ops.len())
            .ok_or(MergePlanError::MergedBeyondEnd {
                num_merge_ops,
                num_ops: ops.len(),
            })?;
        let mut num_ordered = 0usize;
        let mut seen_unordered = false;
        for (index, op) in ops.iter().enumerate() {
            if op.kind.is_ordered() {
                if seen_unordered {
                    return Err(MergePlanError::OrderedAfterUnordered {
                        index,
                        kind: op.kind,
                        new_block: op.new_block,
                    });
                }
                num_ordered += 1;
            } else {
                seen_unordered = true;
            }
            let dest_ok = op.new_block.checked_mul(BLOCK_SIZE_U64).is_some();
            let src_ok = match op.kind {
                OpKind::Copy => op.source.checked_mul(BLOCK_SIZE_U64).is_some(),
                OpKind::Xor => op.source.checked_add(BLOCK_SIZE_U64).is_some(),
                _ => true,
            };
            if !dest_ok {
                return Err(MergePlanError::OffsetOverflow {
                    index,
                    value: op.new_block,
                });
            }
            if !src_ok {
                return Err(MergePlanError::OffsetOverflow {
                    index,
                    value: op.source,
                });
            }
        }
        let mut by_block: Vec<(u64, usize)> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| (op.new_block, i))
            .collect();
        by_block.sort_unstable();
        if let Some(pair) = by_block.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(MergePlanError::DuplicateBlock {
                first: pair[0].1,
                second: pair[1].1,
                new_block: pair[0].0,
            });
        }
        Ok(MergePlan {
            ops,
            num_ordered,
            num_merge_ops: merged,
        })
    }

    /// All ops in merge order (merged ones included).
    pub fn ops(&self) -> &[PlannedOp] {
        &self.ops
    }

    /// The op at merge-order position `index`.
    pub fn op(&self, index: usize) -> Option<&PlannedOp> {
        self.ops.get(index)
    }

    /// Total number of data ops.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when the plan has no data ops.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of ordered ops (they form the prefix `0..num_ordered`).
    pub fn num_ordered(&self) -> usize {
        self.num_ordered
    }

    /// Number of leading ops already merged when the plan was built.
    pub fn num_merge_ops(&self) -> usize {
        self.num_merge_ops
    }

    /// The ops not yet merged, with their merge-order positions.
    pub fn unmerged(&self) -> impl DoubleEndedIterator<Item = (usize, &PlannedOp)> + '_ {
        self.ops.iter().enumerate().skip(self.num_merge_ops)
    }

    /// Number of ops not yet merged.
    pub fn num_unmerged(&self) -> usize {
        self.ops.len() - self.num_merge_ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordered_then_unordered() {
        let plan = MergePlan::new(
            vec![
                PlannedOp::copy(3, 1),
                PlannedOp::xor(4, 10),
                PlannedOp::zero(1),
                PlannedOp::replace(2),
            ],
            1,
        )
        .unwrap();
        assert_eq!(plan.num_ordered(), 2);
        assert_eq!(plan.num_unmerged(), 3);
        assert_eq!(plan.unmerged().next().unwrap().0, 1);
    }

    #[test]
    fn rejects_ordered_after_unordered() {
        let err = MergePlan::new(vec![PlannedOp::zero(1), PlannedOp::copy(3, 1)], 0).unwrap_err();
        assert_eq!(
            err,
            MergePlanError::OrderedAfterUnordered {
                index: 1,
                kind: OpKind::Copy,
                new_block: 3
            }
        );
    }

    #[test]
    fn rejects_duplicates_and_bad_progress() {
        let err = MergePlan::new(vec![PlannedOp::zero(7), PlannedOp::replace(7)], 0).unwrap_err();
        assert_eq!(
            err,
            MergePlanError::DuplicateBlock {
                first: 0,
                second: 1,
                new_block: 7
            }
        );
        let err = MergePlan::new(vec![PlannedOp::zero(7)], 2).unwrap_err();
        assert_eq!(
            err,
            MergePlanError::MergedBeyondEnd {
                num_merge_ops: 2,
                num_ops: 1
            }
        );
        let err = MergePlan::new(vec![PlannedOp::copy(1, u64::MAX / 2)], 0).unwrap_err();
        assert!(matches!(
            err,
            MergePlanError::OffsetOverflow { index: 0, .. }
        ));
        let err = MergePlan::new(vec![PlannedOp::xor(1, u64::MAX - 5)], 0).unwrap_err();
        assert!(matches!(
            err,
            MergePlanError::OffsetOverflow { index: 0, .. }
        ));
    }

    #[test]
    fn planned_op_is_24_bytes() {
        // Reported as the plan's memory cost per op.
        assert_eq!(std::mem::size_of::<PlannedOp>(), 24);
    }

    #[test]
    fn xor_source_blocks_span_two_when_unaligned() {
        assert_eq!(
            PlannedOp::xor(0, 8192)
                .source_blocks()
                .iter()
                .collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(
            PlannedOp::xor(0, 8193)
                .source_blocks()
                .iter()
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            PlannedOp::copy(0, 9)
                .source_blocks()
                .iter()
                .collect::<Vec<_>>(),
            vec![9]
        );
        assert_eq!(PlannedOp::zero(0).source_blocks().iter().count(), 0);
        assert_eq!(PlannedOp::copy(0, 9).source_byte_offset(), Some(9 * 4096));
    }
}
