//! Constant-time data-chunk lookup for the READ path: chunk id → exception index.
//!
//! [`ExceptionStore::lookup`] binary-searches the sorted chunk ids (about 20 dependent,
//! mispredicted steps for a million ops, each a cache miss once the table outgrows the
//! cache). This index answers the same question with one 16-byte entry per 64 chunks: a
//! bitmap of which of those chunks are data chunks, and how many data chunks come before
//! them. Because exceptions are numbered in increasing chunk order, the exception index of
//! a data chunk is that count plus the set bits below it. Memory is a quarter of a byte
//! per chunk, next to the four bytes per chunk the store itself holds.

use super::super::exception_store::ExceptionStore;

/// Chunks covered by one [`Group`].
const GROUP_CHUNKS: u64 = u64::BITS as u64;

/// 64 consecutive chunks starting at a multiple of 64.
#[derive(Debug, Clone, Copy, Default)]
struct Group {
    /// Bit `i` is set when chunk `64 * g + i` is a data chunk.
    data: u64,
    /// Data chunks in all earlier groups (the exception index of this group's first one).
    before: u32,
}

/// Which chunks are data chunks, and the exception index of each.
#[derive(Debug, Clone, Default)]
pub(super) struct DataChunkIndex {
    groups: Vec<Group>,
}

impl DataChunkIndex {
    /// Index the data chunks of `store`. `None` when the store's chunk ids are not strictly
    /// increasing or too many to count in a `u32` (the store never builds such a table; the
    /// caller then keeps using [`ExceptionStore::lookup`]).
    pub(super) fn build(store: &ExceptionStore) -> Option<Self> {
        let n = store.num_exceptions();
        let mut groups: Vec<Group> = Vec::new();
        let mut prev: Option<u64> = None;
        for exception in 0..n {
            let chunk = store.new_chunk(exception)?;
            if prev.is_some_and(|p| p >= chunk) {
                return None;
            }
            prev = Some(chunk);
            let g = usize::try_from(chunk / GROUP_CHUNKS).ok()?;
            if groups.len() <= g {
                // Groups between the last data chunk and this one: all counted so far.
                let before = u32::try_from(exception).ok()?;
                groups.resize(g.checked_add(1)?, Group { data: 0, before });
            }
            let group = groups.get_mut(g)?;
            group.data |= 1u64 << (chunk % GROUP_CHUNKS);
        }
        Some(DataChunkIndex { groups })
    }

    /// The exception index of `chunk` if it is a data chunk.
    #[inline]
    pub(super) fn exception(&self, chunk: u64) -> Option<usize> {
        let group = self
            .groups
            .get(usize::try_from(chunk / GROUP_CHUNKS).ok()?)?;
        let bit = 1u64 << (chunk % GROUP_CHUNKS);
        if group.data & bit == 0 {
            return None;
        }
        let below = (group.data & (bit - 1)).count_ones() as usize;
        (group.before as usize).checked_add(below)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::exception_store::ChunkKind;
    use super::super::super::merge_plan::{MergePlan, PlannedOp};
    use super::*;

    /// Every chunk (and some past the device) classifies as `lookup` does. Gives the number
    /// of gap chunks inside the device.
    fn agrees_with_lookup(plan: &MergePlan) -> usize {
        let store = ExceptionStore::build(plan).unwrap();
        let index = DataChunkIndex::build(&store).expect("index");
        let (mut data, mut gaps) = (0, 0);
        for chunk in 0..store.device_chunks() + 3 * GROUP_CHUNKS {
            let want = match store.lookup(chunk) {
                ChunkKind::Data { exception, .. } => Some(exception),
                _ => None,
            };
            assert_eq!(index.exception(chunk), want, "chunk {chunk}");
            data += usize::from(want.is_some());
            let gap = matches!(store.lookup(chunk), ChunkKind::Unmapped);
            gaps += usize::from(gap && chunk < store.device_chunks());
        }
        assert_eq!(data, store.num_exceptions());
        assert_eq!(index.exception(u64::MAX), None);
        gaps
    }

    #[test]
    fn matches_the_binary_search_on_every_chunk() {
        // REPLACE-only (one section), long enough to span several metadata areas.
        let replaces: Vec<PlannedOp> = (0..700).map(PlannedOp::replace).collect();
        agrees_with_lookup(&MergePlan::new(replaces, 0).unwrap());
        // Ordered COPY chains (gaps before each dependency group and window) then REPLACEs.
        let mut ops: Vec<PlannedOp> = (0..1200).map(|b| PlannedOp::copy(b + 1, b)).collect();
        ops.extend((2000..2300).map(PlannedOp::replace));
        assert!(agrees_with_lookup(&MergePlan::new(ops.clone(), 0).unwrap()) > 100);
        // Partly merged: the store starts at the first unmerged op.
        assert!(agrees_with_lookup(&MergePlan::new(ops, 600).unwrap()) > 100);
        // Empty.
        agrees_with_lookup(&MergePlan::new(Vec::new(), 0).unwrap());
    }
}
