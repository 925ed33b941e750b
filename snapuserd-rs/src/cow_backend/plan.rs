//! Build the core's [`MergePlan`] from a COW file's merge order.
//!
//! The reader's legacy merge order (ops outside the sequence sorted by **descending** block,
//! cow-format.md §6.2, the dm-snapshot flag) is walked from the start. Every entry becomes one
//! [`PlannedOp`] per block it covers: a v3 multi-block REPLACE expands to `num_blocks`
//! planned ops, **descending** like the entries around it, so that a run of adjacent blocks
//! stays one run of exceptions that dm-snapshot-merge copies in one batch (expanded
//! ascending, every block of such a run was its own batch, with its own metadata commit).
//! Each planned op carries the position of its COW op in [`CowReader::ops`]
//! ([`PlannedOp::cow_op`]), so the block producer finds the payload without a side table.
//! [`ProgressMap`] converts progress: the durable `num_merge_ops` counts merge-order
//! **entries**; the core counts planned ops (identity when no entry covers more than one
//! block).
//!
//! COWs the legacy daemon cannot merge are refused here with a clear error: a REPLACE or
//! ZERO entry in the ordered part before a COPY/XOR entry (a v3 file without sequence data
//! that mixes them; the core needs every ordered op first), and duplicate destinations.

use cow_format::{CowOp, CowReader, CowStorage, MergeOrderOptions, OpKind};
use cow_format::{OtherOpsOrder, ReadError};
use thiserror::Error;

use crate::snapshot::merge_plan::{MergePlan, MergePlanError, PlannedOp, BLOCK_SIZE_U64};

/// Why a COW's merge order cannot be served.
#[derive(Debug, Error)]
pub enum CowPlanError {
    /// The COW's block size is not the 4096 bytes dm-snapshot chunks use here.
    #[error("COW block size {block_size} is not 4096")]
    BlockSize {
        /// Block size from the header.
        block_size: u32,
    },
    /// A merge-order entry names an op the reader does not list.
    #[error("merge-order entry {entry}: op index out of range")]
    MissingOp {
        /// Merge-order entry.
        entry: usize,
    },
    /// An op covers no blocks or its block range overflows.
    #[error("merge-order entry {entry} (COW op record {op_index}) covers a bad block range: first {new_block}, {num_blocks} blocks")]
    BadRange {
        /// Merge-order entry.
        entry: usize,
        /// File-order op record index.
        op_index: u64,
        /// First block.
        new_block: u64,
        /// Block count.
        num_blocks: u64,
    },
    /// A multi-block op that is not a REPLACE (the format allows only REPLACE to span).
    #[error("merge-order entry {entry} (COW op record {op_index}) is a {kind:?} covering {num_blocks} blocks")]
    MultiBlockNonReplace {
        /// Merge-order entry.
        entry: usize,
        /// File-order op record index.
        op_index: u64,
        /// Op kind.
        kind: OpKind,
        /// Block count.
        num_blocks: u64,
    },
    /// More ops than a planned op's `u32` COW op position can index.
    #[error("{count} COW ops are more than this daemon indexes (u32)")]
    TooManyOps {
        /// Ops in the file.
        count: usize,
    },
    /// The header's `num_merge_ops` is larger than the merge order.
    #[error("num_merge_ops {num_merge_ops} exceeds the {entries} merge-order entries")]
    MergedBeyondEnd {
        /// Header value.
        num_merge_ops: u64,
        /// Entries in the merge order.
        entries: usize,
    },
    /// The core refused the expanded plan (ordered after unordered, duplicates, overflow).
    #[error(transparent)]
    Plan(#[from] MergePlanError),
    /// The reader failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Converts between merge-order entries (the COW's `num_merge_ops` unit) and planned ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressMap {
    /// `None`: one planned op per entry. `Some(ends)`: `ends[i]` = planned ops covered by
    /// entries `0..=i`.
    ends: Option<Vec<u64>>,
    entries: usize,
}

impl ProgressMap {
    /// Number of merge-order entries.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Planned ops covered by the first `entries` entries (`None` past the end).
    pub fn planned_for_entries(&self, entries: u64) -> Option<u64> {
        let n = usize::try_from(entries)
            .ok()
            .filter(|&n| n <= self.entries)?;
        match &self.ends {
            None => Some(entries),
            Some(_) if n == 0 => Some(0),
            Some(ends) => ends.get(n - 1).copied(),
        }
    }

    /// Entries fully covered by the first `planned` planned ops (rounds down when `planned`
    /// ends inside a multi-block entry, which is always a REPLACE: replaying it is harmless).
    pub fn entries_for_planned(&self, planned: u64) -> u64 {
        match &self.ends {
            None => planned.min(self.entries as u64),
            Some(ends) => ends.partition_point(|&end| end <= planned) as u64,
        }
    }
}

/// The core plan for one COW file plus the progress map the merge store needs.
#[derive(Debug, Clone)]
pub struct CowMergePlan {
    /// The validated plan (merge order, durable progress in planned ops).
    pub plan: MergePlan,
    /// Entry ↔ planned-op progress conversion.
    pub progress: ProgressMap,
}

impl CowMergePlan {
    /// Build the plan for `reader`, honouring its header's `num_merge_ops`.
    pub fn build<S: CowStorage>(reader: &CowReader<S>) -> Result<Self, CowPlanError> {
        Self::build_with_progress(reader, reader.num_merge_ops())
    }

    /// Build the plan with `num_merge_ops` (merge-order entries) read from elsewhere (the
    /// durable merge state, which may be newer than the reader's header copy).
    pub fn build_with_progress<S: CowStorage>(
        reader: &CowReader<S>,
        num_merge_ops: u64,
    ) -> Result<Self, CowPlanError> {
        if reader.block_size() as u64 != BLOCK_SIZE_U64 {
            return Err(CowPlanError::BlockSize {
                block_size: reader.block_size(),
            });
        }
        let ops = reader.ops();
        if u32::try_from(ops.len()).is_err() {
            return Err(CowPlanError::TooManyOps { count: ops.len() });
        }
        let mut order = reader.merge_order(MergeOrderOptions {
            other_ops: OtherOpsOrder::Descending,
            skip_merged: false,
        });
        let mut planned = Vec::with_capacity(ops.len());
        let mut ends: Vec<u64> = Vec::new();
        let mut multi = false;
        let mut entries = 0usize;
        while let Some((idx, op)) = order.next_indexed() {
            let idx32 =
                u32::try_from(idx).map_err(|_| CowPlanError::TooManyOps { count: ops.len() })?;
            expand(entries, op, idx32, &mut planned)?;
            multi |= op.num_blocks != 1;
            ends.push(planned.len() as u64);
            entries += 1;
        }
        if entries != order_len(reader) {
            return Err(CowPlanError::MissingOp { entry: entries });
        }
        let progress = ProgressMap {
            ends: multi.then_some(ends),
            entries,
        };
        let merged =
            progress
                .planned_for_entries(num_merge_ops)
                .ok_or(CowPlanError::MergedBeyondEnd {
                    num_merge_ops,
                    entries,
                })?;
        let plan = MergePlan::new(planned, merged)?;
        Ok(CowMergePlan { plan, progress })
    }
}

/// Entries of the reader's merge order.
fn order_len<S: CowStorage>(reader: &CowReader<S>) -> usize {
    usize::try_from(reader.num_total_data_ops()).unwrap_or(usize::MAX)
}

fn expand(
    entry: usize,
    op: &CowOp,
    idx: u32,
    planned: &mut Vec<PlannedOp>,
) -> Result<(), CowPlanError> {
    let bad_range = || CowPlanError::BadRange {
        entry,
        op_index: op.index,
        new_block: op.new_block,
        num_blocks: op.num_blocks,
    };
    if op.num_blocks == 0 {
        return Err(bad_range());
    }
    op.new_block
        .checked_add(op.num_blocks)
        .ok_or_else(bad_range)?;
    if op.num_blocks != 1 && op.kind != OpKind::Replace {
        return Err(CowPlanError::MultiBlockNonReplace {
            entry,
            op_index: op.index,
            kind: op.kind,
            num_blocks: op.num_blocks,
        });
    }
    // Descending, as the legacy order sorts the entries: see the module documentation.
    for i in (0..op.num_blocks).rev() {
        planned.push(PlannedOp::of_cow_op(idx, op, op.new_block + i));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A map for `entries` single-block entries.
    pub(crate) fn identity_map(entries: usize) -> ProgressMap {
        ProgressMap {
            ends: None,
            entries,
        }
    }

    #[test]
    fn progress_map_identity_and_expanded() {
        let id = ProgressMap {
            ends: None,
            entries: 5,
        };
        assert_eq!(id.planned_for_entries(5), Some(5));
        assert_eq!(id.planned_for_entries(6), None);
        assert_eq!(id.entries_for_planned(3), 3);
        // Entries of 1, 4, 1 blocks.
        let m = ProgressMap {
            ends: Some(vec![1, 5, 6]),
            entries: 3,
        };
        assert_eq!(m.planned_for_entries(0), Some(0));
        assert_eq!(m.planned_for_entries(2), Some(5));
        assert_eq!(m.planned_for_entries(3), Some(6));
        assert_eq!(m.planned_for_entries(4), None);
        assert_eq!(m.entries_for_planned(0), 0);
        assert_eq!(m.entries_for_planned(1), 1);
        assert_eq!(m.entries_for_planned(4), 1, "inside the 4-block entry");
        assert_eq!(m.entries_for_planned(5), 2);
        assert_eq!(m.entries_for_planned(6), 3);
    }

    #[test]
    fn planned_ops_name_the_cow_op_that_produces_them() {
        use cow_format::{CowVersion, CowWriter, WriterOptions};
        let file = tempfile::tempfile().unwrap();
        let opts = WriterOptions {
            version: CowVersion::V3,
            op_count_max: Some(16),
            compression_factor: 16384,
            ..WriterOptions::default()
        };
        let mut w = CowWriter::create(file.try_clone().unwrap(), opts).unwrap();
        w.add_copy(40, 2).unwrap();
        w.add_xor(41, &[1u8; 4096], 4096 * 3 + 17).unwrap();
        w.add_replace(10, &[7u8; 4 * 4096]).unwrap();
        w.add_zero(30, 1).unwrap();
        w.finalize().unwrap();
        let reader = CowReader::open(file).unwrap();
        let built = CowMergePlan::build(&reader).unwrap();
        let plan = &built.plan;
        assert_eq!(plan.len(), 7, "the 4-block REPLACE is expanded");
        for op in plan.ops() {
            let cow = &reader.ops()[op.cow_op as usize];
            assert!(cow.covers(op.new_block), "{op:?} names {cow:?}");
            assert_eq!(cow.kind, op.kind);
        }
        let replace: Vec<u64> = plan
            .ops()
            .iter()
            .filter(|o| o.kind == OpKind::Replace)
            .map(|o| o.new_block)
            .collect();
        assert_eq!(
            replace,
            [13, 12, 11, 10],
            "descending, like the entries around it"
        );
        let xor = plan.ops().iter().find(|o| o.kind == OpKind::Xor).unwrap();
        assert_eq!(xor.source, 4096 * 3 + 17);
    }
}
