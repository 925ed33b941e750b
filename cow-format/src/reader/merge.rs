//! Merge order (fact sheet §6.2): which op is merged when.
//!
//! The order has two parts: the *ordered* part (the sequence data, or when
//! there is none, v2's COPY/XOR ops / v3's ops in file order) and the
//! *other* part (ops whose block is not in the sequence; v2 without a
//! sequence: the non-COPY/XOR ops), sorted by block ascending (snapuserd's
//! userspace merge, our default) or descending (legacy dm-snapshot merge).
//! Every entry is resolved through a block → op map in which the **first**
//! op for a block wins, exactly as AOSP's reader does; a duplicate block is
//! therefore merged as its first op each time it appears.

use std::collections::{HashMap, HashSet};

use crate::op::{CowOp, CowVersion};

use super::error::ReadError;

/// Sort order of the ops outside the merge sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtherOpsOrder {
    /// Ascending block order (snapuserd's userspace merge). The default.
    #[default]
    Ascending,
    /// Descending block order (AOSP's default reader flag, dm-snapshot merge).
    Descending,
}

/// How to walk the merge order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeOrderOptions {
    /// Order of the ops outside the sequence.
    pub other_ops: OtherOpsOrder,
    /// Skip the first `num_merge_ops` entries (already merged), as snapuserd does.
    pub skip_merged: bool,
}

/// Which merge a device runs, and so the order in which it walks a COW's ops.
///
/// Both modes merge the *ordered* part (sequence data, or the COPY/XOR ops) first, in the
/// same order; they differ only in the REPLACE/ZERO part that follows:
///
/// - [`MergeMode::User`] (snapuserd's user-space merge, Android 13+): ascending block
///   order. `num_merge_ops` counts entries of this order: the ordered ops, then the
///   REPLACE/ZERO blocks from the lowest up. The merge writes runs of *ascending*
///   contiguous destinations as one batch.
/// - [`MergeMode::Legacy`] (dm-snapshot merge): descending block order, AOSP's default
///   reader flag. `num_merge_ops` counts the ordered ops, then the REPLACE/ZERO blocks
///   from the highest down. dm-snapshot-merge batches runs whose destinations *step down*
///   by one.
///
/// So a non-zero `num_merge_ops` past the ordered part names different blocks in the two
/// modes; within the ordered part both readings agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum MergeMode {
    /// snapuserd's user-space merge (REPLACE/ZERO ascending). The default.
    #[default]
    User,
    /// The legacy dm-snapshot merge (REPLACE/ZERO descending).
    Legacy,
}

impl MergeMode {
    /// Both modes, user-space first.
    pub const ALL: [MergeMode; 2] = [MergeMode::User, MergeMode::Legacy];

    /// The order of the ops outside the merge sequence in this mode.
    pub fn other_ops_order(self) -> OtherOpsOrder {
        match self {
            MergeMode::User => OtherOpsOrder::Ascending,
            MergeMode::Legacy => OtherOpsOrder::Descending,
        }
    }

    /// The reader options that walk this mode's merge order; `skip_merged` skips the
    /// first `num_merge_ops` entries (a resumed merge).
    pub fn order_options(self, skip_merged: bool) -> MergeOrderOptions {
        MergeOrderOptions {
            other_ops: self.other_ops_order(),
            skip_merged,
        }
    }

    /// The name used on command lines and in reports: `user` or `legacy`.
    pub fn name(self) -> &'static str {
        match self {
            MergeMode::User => "user",
            MergeMode::Legacy => "legacy",
        }
    }
}

impl std::fmt::Display for MergeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MergeMode {
    type Err = UnknownMergeMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(MergeMode::User),
            "legacy" => Ok(MergeMode::Legacy),
            _ => Err(UnknownMergeMode(s.to_owned())),
        }
    }
}

/// A merge-mode name other than `user` or `legacy`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown merge mode {0:?} (expected user or legacy)")]
pub struct UnknownMergeMode(pub String);

/// The merge plan computed once at open time.
#[derive(Debug, Clone, Default)]
pub(crate) struct MergePlan {
    /// Op indices (into the reader's op list) of the ordered part.
    pub ordered: Vec<usize>,
    /// Op indices of the other part, in ascending block order.
    pub others: Vec<usize>,
}

impl MergePlan {
    /// Build the plan from data ops in file order and the sequence entries.
    pub fn build(version: CowVersion, ops: &[CowOp], sequence: &[u64]) -> Result<Self, ReadError> {
        let mut block_map: HashMap<u64, usize> = HashMap::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            block_map.entry(op.new_block).or_insert(i);
        }
        let lookup = |entry: usize, block: u64| {
            block_map
                .get(&block)
                .copied()
                .ok_or(ReadError::SequenceWithoutOp {
                    entry: entry as u64,
                    block,
                })
        };
        let mut ordered = Vec::new();
        let mut other_blocks: Vec<u64> = Vec::new();
        if sequence.is_empty() {
            for op in ops {
                if version == CowVersion::V3 || op.kind.is_ordered() {
                    ordered.push(lookup(ordered.len(), op.new_block)?);
                } else {
                    other_blocks.push(op.new_block);
                }
            }
        } else {
            ordered.reserve(sequence.len());
            for (entry, &block) in sequence.iter().enumerate() {
                ordered.push(lookup(entry, block)?);
            }
            let in_sequence: HashSet<u64> = sequence.iter().copied().collect();
            other_blocks.extend(
                ops.iter()
                    .map(|op| op.new_block)
                    .filter(|b| !in_sequence.contains(b)),
            );
        }
        other_blocks.sort_unstable();
        let mut others = Vec::with_capacity(other_blocks.len());
        for (entry, block) in other_blocks.into_iter().enumerate() {
            others.push(lookup(entry, block)?);
        }
        Ok(Self { ordered, others })
    }

    /// Total entries (AOSP `num_total_data_ops`).
    pub fn total(&self) -> usize {
        self.ordered.len() + self.others.len()
    }
}

/// Iterator over ops in merge order (double-ended and exact-size).
#[derive(Debug, Clone)]
pub struct MergeOrder<'a> {
    ops: &'a [CowOp],
    plan: &'a MergePlan,
    descending: bool,
    front: usize,
    back: usize,
}

impl<'a> MergeOrder<'a> {
    pub(crate) fn new(
        ops: &'a [CowOp],
        plan: &'a MergePlan,
        opts: MergeOrderOptions,
        num_merge_ops: u64,
    ) -> Self {
        let total = plan.total();
        let front = if opts.skip_merged {
            usize::try_from(num_merge_ops)
                .unwrap_or(usize::MAX)
                .min(total)
        } else {
            0
        };
        Self {
            ops,
            plan,
            descending: opts.other_ops == OtherOpsOrder::Descending,
            front,
            back: total,
        }
    }

    /// Like [`Iterator::next`], with the op's position in [`CowReader::ops`] (what
    /// [`CowReader::read_op_block`] takes).
    ///
    /// [`CowReader::ops`]: super::CowReader::ops
    /// [`CowReader::read_op_block`]: super::CowReader::read_op_block
    pub fn next_indexed(&mut self) -> Option<(usize, &'a CowOp)> {
        if self.front >= self.back {
            return None;
        }
        let idx = self.index_at(self.front)?;
        self.front += 1;
        Some((idx, self.ops.get(idx)?))
    }

    fn op_at(&self, pos: usize) -> Option<&'a CowOp> {
        self.ops.get(self.index_at(pos)?)
    }

    fn index_at(&self, pos: usize) -> Option<usize> {
        let n = self.plan.ordered.len();
        let idx = if pos < n {
            self.plan.ordered.get(pos)
        } else {
            let j = pos - n;
            if self.descending {
                self.plan
                    .others
                    .len()
                    .checked_sub(j + 1)
                    .and_then(|k| self.plan.others.get(k))
            } else {
                self.plan.others.get(j)
            }
        }?;
        Some(*idx)
    }
}

impl<'a> Iterator for MergeOrder<'a> {
    type Item = &'a CowOp;

    fn next(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        let op = self.op_at(self.front);
        self.front += 1;
        op
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.back.saturating_sub(self.front);
        (n, Some(n))
    }
}

impl DoubleEndedIterator for MergeOrder<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.back -= 1;
        self.op_at(self.back)
    }
}

impl ExactSizeIterator for MergeOrder<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::CompressionAlgorithm;
    use crate::op::OpKind;

    fn op(kind: OpKind, new_block: u64, source: u64) -> CowOp {
        CowOp {
            kind,
            new_block,
            num_blocks: 1,
            source,
            data_offset: 0,
            data_length: 0,
            compression: CompressionAlgorithm::None,
            stored_raw: false,
            index: 0,
        }
    }

    fn walk(
        v: CowVersion,
        ops: &[CowOp],
        seq: &[u64],
        opts: MergeOrderOptions,
        merged: u64,
    ) -> Vec<u64> {
        let plan = MergePlan::build(v, ops, seq).unwrap();
        MergeOrder::new(ops, &plan, opts, merged)
            .map(|o| o.new_block)
            .collect()
    }

    #[test]
    fn v2_legacy_and_v3_file_order() {
        let ops = [
            op(OpKind::Zero, 9, 0),
            op(OpKind::Copy, 1, 3),
            op(OpKind::Replace, 4, 0),
            op(OpKind::Xor, 2, 77),
        ];
        let asc = MergeOrderOptions::default();
        let desc = MergeOrderOptions {
            other_ops: OtherOpsOrder::Descending,
            skip_merged: false,
        };
        assert_eq!(walk(CowVersion::V2, &ops, &[], asc, 0), vec![1, 2, 4, 9]);
        assert_eq!(walk(CowVersion::V2, &ops, &[], desc, 0), vec![1, 2, 9, 4]);
        assert_eq!(walk(CowVersion::V3, &ops, &[], desc, 0), vec![9, 1, 4, 2]);
        let skip = MergeOrderOptions {
            skip_merged: true,
            ..asc
        };
        assert_eq!(walk(CowVersion::V2, &ops, &[], skip, 3), vec![9]);
        assert!(walk(CowVersion::V2, &ops, &[], skip, u64::MAX).is_empty());
        let plan = MergePlan::build(CowVersion::V2, &ops, &[]).unwrap();
        assert_eq!((plan.ordered.len(), plan.total()), (2, 4));
    }

    #[test]
    fn sequence_then_others_and_missing_entries() {
        let ops = [
            op(OpKind::Copy, 1, 3),
            op(OpKind::Copy, 3, 7),
            op(OpKind::Zero, 9, 0),
            op(OpKind::Replace, 4, 0),
        ];
        let asc = MergeOrderOptions::default();
        assert_eq!(
            walk(CowVersion::V2, &ops, &[3, 1], asc, 0),
            vec![3, 1, 4, 9]
        );
        let mut it = {
            let plan = MergePlan::build(CowVersion::V3, &ops, &[3, 1]).unwrap();
            let v: Vec<u64> = MergeOrder::new(&ops, &plan, asc, 0)
                .rev()
                .map(|o| o.new_block)
                .collect();
            v.into_iter()
        };
        assert_eq!(it.next(), Some(9));
        assert!(matches!(
            MergePlan::build(CowVersion::V2, &ops, &[3, 5]),
            Err(ReadError::SequenceWithoutOp { entry: 1, block: 5 })
        ));
    }

    #[test]
    fn merge_modes_differ_only_in_the_replace_zero_part() {
        let ops = [
            op(OpKind::Zero, 9, 0),
            op(OpKind::Copy, 1, 3),
            op(OpKind::Replace, 4, 0),
            op(OpKind::Replace, 6, 0),
            op(OpKind::Xor, 2, 77),
        ];
        let user = MergeMode::User.order_options(false);
        let legacy = MergeMode::Legacy.order_options(false);
        assert_eq!(MergeMode::default(), MergeMode::User);
        assert_eq!(
            walk(CowVersion::V2, &ops, &[], user, 0),
            vec![1, 2, 4, 6, 9]
        );
        assert_eq!(
            walk(CowVersion::V2, &ops, &[], legacy, 0),
            vec![1, 2, 9, 6, 4]
        );
        // Resuming after three merged entries: the next block differs by mode.
        let user_resume = MergeMode::User.order_options(true);
        let legacy_resume = MergeMode::Legacy.order_options(true);
        assert_eq!(walk(CowVersion::V2, &ops, &[], user_resume, 3), vec![6, 9]);
        assert_eq!(
            walk(CowVersion::V2, &ops, &[], legacy_resume, 3),
            vec![6, 4]
        );
        assert_eq!("legacy".parse::<MergeMode>(), Ok(MergeMode::Legacy));
        assert_eq!("user".parse::<MergeMode>(), Ok(MergeMode::User));
        assert!("dm".parse::<MergeMode>().is_err());
    }

    #[test]
    fn iterator_is_exact_size_from_both_ends() {
        let ops: Vec<CowOp> = (0..10).map(|b| op(OpKind::Zero, b, 0)).collect();
        let plan = MergePlan::build(CowVersion::V3, &ops, &[]).unwrap();
        let opts = MergeOrderOptions {
            skip_merged: true,
            ..Default::default()
        };
        let mut it = MergeOrder::new(&ops, &plan, opts, 4);
        assert_eq!(it.len(), 6);
        assert_eq!(it.next().map(|o| o.new_block), Some(4));
        assert_eq!(it.next_back().map(|o| o.new_block), Some(9));
        assert_eq!(it.len(), 4);
        assert_eq!(it.count(), 4);
    }
}
