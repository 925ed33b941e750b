//! The merge order of the user-space mode, flattened once at open: merge-order entry →
//! op, the ordered part's length, and the read-ahead windows over it.
//!
//! The order is [`cow_format::MergeMode::User`]'s: the ordered part (sequence data, or the
//! COPY/XOR ops) first, then the REPLACE/ZERO ops by ascending block. One entry per op (a
//! multi-block v3 REPLACE is one entry, as AOSP counts `num_merge_ops`).

use std::collections::HashSet;
use std::ops::Range;

use cow_format::{CowOp, CowReader, CowStorage, MergeMode, OpKind};

use super::error::UserSnapshotError;

/// The merge order as op positions ([`CowReader::ops`] indices).
#[derive(Debug)]
pub(crate) struct MergePlan {
    /// Entry → op position.
    order: Vec<u32>,
    /// Entries `0..ordered` form the ordered part.
    ordered: u64,
    /// Ops of a durable read-ahead window (the scratch capacity); 0 without scratch.
    window_capacity: u64,
}

/// Ops of an in-memory window when the COW has no scratch region (AOSP's window size).
pub(crate) const WINDOW_WITHOUT_SCRATCH: u64 = cow_format::layout::READ_AHEAD_WINDOW_BLOCKS as u64;

impl MergePlan {
    /// Flatten `cow`'s user-space merge order; `window_capacity` is the scratch window's
    /// capacity in blocks (0: no scratch).
    pub(crate) fn build<S: CowStorage>(
        cow: &CowReader<S>,
        window_capacity: usize,
    ) -> Result<Self, UserSnapshotError> {
        let total = cow.num_total_data_ops();
        if total > u64::from(u32::MAX) {
            return Err(UserSnapshotError::TooManyEntries { entries: total });
        }
        let mut order = Vec::with_capacity(total as usize);
        let mut walk = cow.merge_order(MergeMode::User.order_options(false));
        while let Some((position, _)) = walk.next_indexed() {
            // ops.len() ≤ total ≤ u32::MAX (checked above).
            order.push(position as u32);
        }
        Ok(Self {
            ordered: cow.num_ordered_ops().min(order.len() as u64),
            order,
            window_capacity: window_capacity as u64,
        })
    }

    /// Entries of the merge order (`num_total_data_ops`).
    pub(crate) fn total(&self) -> u64 {
        self.order.len() as u64
    }

    /// Entries of the ordered part.
    pub(crate) fn ordered(&self) -> u64 {
        self.ordered
    }

    /// True if progress is kept in a durable scratch window.
    pub(crate) fn has_scratch(&self) -> bool {
        self.window_capacity != 0
    }

    /// Op position of entry `entry`.
    pub(crate) fn op_position(&self, entry: u64) -> Option<usize> {
        self.order
            .get(usize::try_from(entry).ok()?)
            .map(|&p| p as usize)
    }

    /// The op of entry `entry`.
    pub(crate) fn op<'a, S: CowStorage>(
        &self,
        cow: &'a CowReader<S>,
        entry: u64,
    ) -> Option<(usize, &'a CowOp)> {
        let position = self.op_position(entry)?;
        Some((position, cow.ops().get(position)?))
    }

    /// The read-ahead window that starts at ordered entry `start`.
    ///
    /// With scratch: up to the next boundary of the fixed grid of `window_capacity` entries
    /// (a resumed merge always stands on a boundary, since windows commit whole). Without
    /// scratch: up to [`WINDOW_WITHOUT_SCRATCH`] entries, cut before the first op whose
    /// source is a destination of the window or whose destination is a source of it, so
    /// that no op of a window reads a block the window writes: replaying it after a crash,
    /// and reading its blocks from the source before it commits, see only original bytes.
    pub(crate) fn window_at<S: CowStorage>(&self, cow: &CowReader<S>, start: u64) -> Range<u64> {
        if start >= self.ordered {
            return start..start;
        }
        if self.has_scratch() {
            let end = (start / self.window_capacity)
                .saturating_add(1)
                .saturating_mul(self.window_capacity)
                .min(self.ordered);
            return start..end;
        }
        let limit = start
            .saturating_add(WINDOW_WITHOUT_SCRATCH)
            .min(self.ordered);
        let bs = u64::from(cow.block_size());
        let overlaps = |list: &[Range<u64>], r: &Range<u64>| {
            list.iter().any(|d| d.start < r.end && r.start < d.end)
        };
        let mut dests: Vec<Range<u64>> = Vec::new();
        let mut sources: Vec<Range<u64>> = Vec::new();
        let mut end = start;
        while end < limit {
            let Some((_, op)) = self.op(cow, end) else {
                break;
            };
            let dest = op.new_block..op.new_block.saturating_add(op.num_blocks);
            let source = source_blocks(op, bs);
            if end > start {
                let reads_written = source.as_ref().is_some_and(|s| overlaps(&dests, s));
                if reads_written || overlaps(&sources, &dest) {
                    break;
                }
            }
            dests.push(dest);
            sources.extend(source);
            end += 1;
        }
        start..end
    }
}

/// Most destination blocks a run of windows merged without scratch plans for (8 full
/// windows of single-block ops); only a run's first window may exceed it.
const REPLAYABLE_RUN_BLOCKS: usize = 8 * WINDOW_WITHOUT_SCRATCH as usize;

impl MergePlan {
    /// End of the longest run of whole scratch windows from ordered entry `start`, at most
    /// `max_windows` of them, in which no op reads a block that an op of the run writes
    /// (any op, before or after it in the run); `start` itself if the first window already
    /// reads a block it writes, or without scratch.
    ///
    /// Such a run can be merged without saving its sources in scratch and committed once:
    /// until its commit every source it reads still holds its original bytes (earlier
    /// windows never write a later window's sources, the merge order being a topological
    /// order of the reads), so a crash anywhere inside it replays it from the source
    /// device, and readers may take its blocks from the source meanwhile.
    pub(crate) fn replayable_windows<S: CowStorage>(
        &self,
        cow: &CowReader<S>,
        start: u64,
        max_windows: u64,
    ) -> u64 {
        if !self.has_scratch() || start >= self.ordered {
            return start;
        }
        let bs = u64::from(cow.block_size());
        let mut written: HashSet<u64> = HashSet::new();
        let mut read: HashSet<u64> = HashSet::new();
        let mut end = start;
        for _ in 0..max_windows {
            let window = self.window_at(cow, end);
            if window.is_empty() {
                break;
            }
            let mut dests: Vec<u64> = Vec::new();
            let mut sources: Vec<u64> = Vec::new();
            for entry in window.clone() {
                let Some((_, op)) = self.op(cow, entry) else {
                    return end;
                };
                if op.num_blocks > WINDOW_WITHOUT_SCRATCH {
                    // Not a valid op of the ordered part; let the staged path report it.
                    return end;
                }
                dests.extend(op.new_block..op.new_block.saturating_add(op.num_blocks));
                match source_blocks(op, bs) {
                    Some(s) => sources.extend(s),
                    None if op.kind.is_ordered() => return end,
                    None => {}
                }
            }
            // Sources against every write of the run so far and this window's own; this
            // window's writes against the sources of the windows before it.
            // Bound the sets (multi-block ops may sit in the ordered part of a v3 COW): a
            // run stops before a window that would take it past the limit.
            if end > start && written.len() + dests.len() > REPLAYABLE_RUN_BLOCKS {
                break;
            }
            written.extend(dests.iter().copied());
            let clash = sources.iter().any(|b| written.contains(b))
                || dests.iter().any(|b| read.contains(b));
            if clash {
                break;
            }
            read.extend(sources);
            end = window.end;
        }
        end
    }
}

/// The source blocks an ordered op reads (COPY: one; XOR: one or two, as its byte offset
/// may be unaligned); `None` for other kinds or an offset that overflows.
pub(crate) fn source_blocks(op: &CowOp, block_size: u64) -> Option<Range<u64>> {
    match op.kind {
        OpKind::Copy => Some(op.source..op.source.checked_add(1)?),
        OpKind::Xor => {
            let last = op.source.checked_add(block_size - 1)? / block_size;
            Some(op.source / block_size..last.checked_add(1)?)
        }
        OpKind::Replace | OpKind::Zero => None,
    }
}

/// Byte offset in the source device of the `block_size` bytes an ordered op reads.
pub(crate) fn source_offset(op: &CowOp, block_size: u64) -> Option<u64> {
    match op.kind {
        OpKind::Copy => op.source.checked_mul(block_size),
        OpKind::Xor => Some(op.source),
        OpKind::Replace | OpKind::Zero => None,
    }
}
