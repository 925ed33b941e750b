//! The virtual COW device as dm-snap-persistent sees it (reference §A.2).
//!
//! Layout, in 4 KiB chunks (8 sectors):
//! * chunk 0: the dm-snapshot header;
//! * chunk `1 + 257*k`: metadata area `k`, 256 `disk_exception {old_chunk, new_chunk}` entries;
//! * every other chunk from 2 on: a data chunk, handed out monotonically, skipping metadata
//!   chunks and leaving deliberate gaps where the kernel must not batch-merge.
//!
//! Exceptions are assigned walking the *reverse* of the unmerged merge order, because the
//! kernel merges from the last exception backwards: exception `e` (0-based, in assignment
//! order) belongs to merge-order op `num_merge_ops + (unmerged - 1 - e)`.
//!
//! Gap rules (each gap is one unused data chunk id, so `new_chunk` is not consecutive and
//! dm-snapshot's "trailing run of consecutive exceptions" batch stops there):
//! * one gap between the REPLACE/ZERO section and the ordered (COPY/XOR) section;
//! * one gap before each group of ordered ops; a group ends when the next op's destination
//!   is a source block of the group, or one of its source blocks (two for an unaligned XOR)
//!   is a destination of the group, or when it would cross a read-ahead window boundary
//!   (windows are a fixed grid of [`WINDOW_OPS`] ops over the merge order, see
//!   [`window_of`]).
//!
//! The layout is progress-invariant: ids are assigned over the whole merge order and the
//! merged ops (the last exceptions) are left out, so every daemon that serves the same COW
//! presents the same `new_chunk` for each op still unmerged, and the same device size.
//!
//! Memory: the store keeps one `u32` chunk id per unmerged op (4 bytes per op) and reads
//! `old_chunk` from the [`MergePlan`] when an area is rendered; areas are rendered on
//! demand, with the entries the kernel has already merged rendered as zeros.

use std::collections::HashSet;

use thiserror::Error;

use super::merge_plan::{MergePlan, BLOCK_SIZE, BLOCK_SIZE_U64};

/// dm-snapshot chunk size in 512-byte sectors (4 KiB chunks).
pub const CHUNK_SECTORS: u64 = 8;
/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Exceptions per 4 KiB metadata area.
pub const EXCEPTIONS_PER_AREA: usize = 256;
/// Distance in chunks between two metadata areas (area plus its data chunks).
pub const AREA_STRIDE: u64 = EXCEPTIONS_PER_AREA as u64 + 1;
/// Ordered ops per read-ahead window (2 MiB scratch minus 8 KiB metadata, in blocks).
pub const WINDOW_OPS: usize = cow_format::layout::READ_AHEAD_WINDOW_BLOCKS;
/// dm-snapshot header magic ("SnAp" little-endian).
pub const DISK_MAGIC: u32 = 0x7041_6e53;
/// Size of one on-disk `disk_exception`.
pub const DISK_EXCEPTION_SIZE: usize = 16;

/// Errors of the exception store.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExceptionStoreError {
    /// A chunk id no longer fits the compact `u32` representation.
    #[error("data chunk id {chunk} for exception {exception} exceeds the supported range")]
    ChunkIdOverflow {
        /// Chunk id that did not fit.
        chunk: u64,
        /// Exception being assigned.
        exception: usize,
    },
    /// A metadata area index outside the store.
    #[error("metadata area {area} does not exist (store has {num_areas})")]
    NoSuchArea {
        /// Requested area.
        area: usize,
        /// Areas present.
        num_areas: usize,
    },
    /// An output buffer of the wrong size.
    #[error("buffer of {len} bytes given where one chunk ({BLOCK_SIZE} bytes) is needed")]
    BadBufferSize {
        /// Length given.
        len: usize,
    },
}

/// What a chunk of the virtual COW device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Chunk 0, the dm-snapshot header.
    Header,
    /// A metadata area that exists.
    Metadata {
        /// Area index.
        area: usize,
    },
    /// The data chunk of an exception.
    Data {
        /// Exception index in assignment order.
        exception: usize,
        /// Merge-order index of the op the chunk holds.
        op_index: usize,
    },
    /// Anything else inside or beyond the device (gaps, metadata chunks past the last
    /// area): reads as zeros.
    Unmapped,
}

/// The exception table presented to dm-snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionStore {
    /// Merge-order index of the first unmerged op when the store was built.
    first_unmerged: usize,
    /// `new_chunk` of each exception, strictly increasing.
    new_chunks: Vec<u32>,
    /// Number of metadata areas presented.
    num_areas: usize,
    /// One past the highest chunk id handed out: the device size in chunks.
    device_chunks: u64,
}

/// True when `chunk` is a metadata-area chunk.
pub fn is_metadata_chunk(chunk: u64) -> bool {
    chunk % AREA_STRIDE == 1
}

/// Chunk id of metadata area `area`.
pub fn area_chunk(area: usize) -> u64 {
    1 + AREA_STRIDE * area as u64
}

fn next_data_chunk(chunk: u64) -> u64 {
    let next = chunk + 1;
    if is_metadata_chunk(next) {
        next + 1
    } else {
        next
    }
}

/// Read-ahead window of ordered merge-order op `index`.
///
/// Windows are a fixed grid over the merge order (`[k*WINDOW_OPS, (k+1)*WINDOW_OPS)`), not
/// counted from wherever a daemon happened to start, so the layout's window gaps and the
/// tracker's windows agree across restarts and handoffs.
pub fn window_of(index: usize) -> usize {
    index / WINDOW_OPS
}

/// One past the last op of the window holding ordered op `index`.
pub fn window_end_of(index: usize) -> usize {
    window_of(index)
        .saturating_add(1)
        .saturating_mul(WINDOW_OPS)
}

/// Bytes of the header chunk: magic, valid=1, version=1, chunk_size=8, rest zero.
pub fn header_chunk() -> [u8; BLOCK_SIZE] {
    let mut out = [0u8; BLOCK_SIZE];
    out[0..4].copy_from_slice(&DISK_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&1u32.to_le_bytes());
    out[8..12].copy_from_slice(&1u32.to_le_bytes());
    out[12..16].copy_from_slice(&(CHUNK_SECTORS as u32).to_le_bytes());
    out
}

/// Tracks the ordered group being assigned, for the gap rules.
#[derive(Default)]
struct GroupState {
    dests: HashSet<u64>,
    sources: HashSet<u64>,
    window: Option<usize>,
}

impl ExceptionStore {
    /// Build the table from the unmerged part of `plan`.
    ///
    /// The chunk ids do not depend on merge progress: ids are assigned over the **whole**
    /// merge order (as if nothing were merged) and the merged ops, which are always the
    /// last exceptions in assignment order, are then left out. A daemon opened later in the
    /// merge (after a crash, or taking over from another daemon while dm-snapshot keeps its
    /// in-core table) therefore presents the same `new_chunk` for every op the kernel still
    /// holds, and the same device size.
    pub fn build(plan: &MergePlan) -> Result<Self, ExceptionStoreError> {
        let first_unmerged = plan.num_merge_ops();
        let unmerged = plan.num_unmerged();
        let mut new_chunks: Vec<u32> = Vec::with_capacity(unmerged);
        let mut next: u64 = 2;
        // Exceptions are assigned in reverse merge order; only ops at or after
        // `first_unmerged` are presented.
        let mut assign = |index: usize, next: u64| -> Result<(), ExceptionStoreError> {
            if index < first_unmerged {
                return Ok(());
            }
            let id = u32::try_from(next).map_err(|_| ExceptionStoreError::ChunkIdOverflow {
                chunk: next,
                exception: new_chunks.len(),
            })?;
            new_chunks.push(id);
            Ok(())
        };

        // Reverse merge order: the REPLACE/ZERO section (end of the plan) comes first.
        let ordered_end = plan.num_ordered();
        for index in (ordered_end..plan.len()).rev() {
            assign(index, next)?;
            next = next_data_chunk(next);
        }
        if ordered_end > 0 {
            if ordered_end < plan.len() {
                next = next_data_chunk(next); // gap between the two sections
            }
            let mut group = GroupState::default();
            for index in (0..ordered_end).rev() {
                let Some(op) = plan.op(index) else { break };
                let window = window_of(index);
                let joins = group.window == Some(window)
                    && !group.sources.contains(&op.new_block)
                    && !op.source_blocks().iter().any(|b| group.dests.contains(&b));
                if !joins {
                    group.dests.clear();
                    group.sources.clear();
                    group.window = Some(window);
                    next = next_data_chunk(next); // gap before each group
                }
                group.dests.insert(op.new_block);
                group.sources.extend(op.source_blocks().iter());
                assign(index, next)?;
                next = next_data_chunk(next);
            }
        }
        let num_areas = if unmerged == 0 {
            1
        } else {
            // A full last area is followed by an all-zero one, the kernel's terminator.
            unmerged / EXCEPTIONS_PER_AREA + 1
        };
        log::debug!("exception store: {unmerged} exceptions, {num_areas} areas, {next} chunks");
        Ok(ExceptionStore {
            first_unmerged,
            new_chunks,
            num_areas,
            device_chunks: next,
        })
    }

    /// Number of exceptions (unmerged ops when built).
    pub fn num_exceptions(&self) -> usize {
        self.new_chunks.len()
    }

    /// Number of metadata areas presented (at least 1).
    pub fn num_areas(&self) -> usize {
        self.num_areas
    }

    /// Size of the virtual COW device in chunks.
    pub fn device_chunks(&self) -> u64 {
        self.device_chunks
    }

    /// Size of the virtual COW device in 512-byte sectors (what `init` returns).
    pub fn device_sectors(&self) -> u64 {
        self.device_chunks * CHUNK_SECTORS
    }

    /// Merge-order index of the first unmerged op at build time.
    pub fn first_unmerged(&self) -> usize {
        self.first_unmerged
    }

    /// Merge-order op index of exception `exception`.
    pub fn op_index(&self, exception: usize) -> Option<usize> {
        let n = self.new_chunks.len();
        (exception < n).then(|| self.first_unmerged + (n - 1 - exception))
    }

    /// Exception index of merge-order op `op_index`, if it is in the table.
    pub fn exception_of_op(&self, op_index: usize) -> Option<usize> {
        let n = self.new_chunks.len();
        let u = op_index.checked_sub(self.first_unmerged)?;
        (u < n).then(|| n - 1 - u)
    }

    /// `new_chunk` of exception `exception`.
    pub fn new_chunk(&self, exception: usize) -> Option<u64> {
        self.new_chunks.get(exception).map(|&c| u64::from(c))
    }

    /// Classify `chunk`.
    pub fn lookup(&self, chunk: u64) -> ChunkKind {
        if chunk == 0 {
            return ChunkKind::Header;
        }
        if is_metadata_chunk(chunk) {
            let area = chunk / AREA_STRIDE;
            return match usize::try_from(area) {
                Ok(area) if area < self.num_areas => ChunkKind::Metadata { area },
                _ => ChunkKind::Unmapped,
            };
        }
        let Ok(c) = u32::try_from(chunk) else {
            return ChunkKind::Unmapped;
        };
        match self.new_chunks.binary_search(&c) {
            Ok(exception) => match self.op_index(exception) {
                Some(op_index) => ChunkKind::Data {
                    exception,
                    op_index,
                },
                None => ChunkKind::Unmapped,
            },
            Err(_) => ChunkKind::Unmapped,
        }
    }

    /// Render metadata area `area` into `out` (4096 bytes), showing exceptions
    /// `0..live` and zeros for the rest (merged entries and padding).
    pub fn render_area(
        &self,
        plan: &MergePlan,
        area: usize,
        live: usize,
        out: &mut [u8],
    ) -> Result<(), ExceptionStoreError> {
        if out.len() != BLOCK_SIZE {
            return Err(ExceptionStoreError::BadBufferSize { len: out.len() });
        }
        if area >= self.num_areas {
            return Err(ExceptionStoreError::NoSuchArea {
                area,
                num_areas: self.num_areas,
            });
        }
        out.fill(0);
        let live = live.min(self.new_chunks.len());
        let first = area * EXCEPTIONS_PER_AREA;
        for (slot, entry) in out.chunks_exact_mut(DISK_EXCEPTION_SIZE).enumerate() {
            let exception = first + slot;
            if exception >= live {
                break;
            }
            let (Some(op_index), Some(new_chunk)) =
                (self.op_index(exception), self.new_chunk(exception))
            else {
                break;
            };
            let Some(op) = plan.op(op_index) else { break };
            entry[0..8].copy_from_slice(&op.new_block.to_le_bytes());
            entry[8..16].copy_from_slice(&new_chunk.to_le_bytes());
        }
        Ok(())
    }

    /// Bytes per op held by this structure (for reports).
    pub const BYTES_PER_OP: usize = std::mem::size_of::<u32>();
}

/// Convert a sector to its chunk and the byte offset inside that chunk.
pub fn sector_to_chunk(sector: u64) -> (u64, usize) {
    let chunk = sector / CHUNK_SECTORS;
    let offset = (sector % CHUNK_SECTORS) * SECTOR_SIZE;
    (chunk, offset as usize)
}

/// Byte size of the device with `chunks` chunks.
pub fn chunks_to_bytes(chunks: u64) -> Option<u64> {
    chunks.checked_mul(BLOCK_SIZE_U64)
}

#[cfg(test)]
mod tests {
    use super::super::merge_plan::PlannedOp;
    use super::*;

    fn entry(area: &[u8], slot: usize) -> (u64, u64) {
        let e = &area[slot * 16..slot * 16 + 16];
        (
            u64::from_le_bytes(e[0..8].try_into().unwrap()),
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
        )
    }

    /// The `Snapshot_Metadata` scenario of reference §A.2: a 1 MiB (256-block) image,
    /// the copy ops below in file order (no sequence: file order is merge order), 256
    /// REPLACE blocks at 256..511 and 256 ZERO blocks at 512..767; non-ordered ops are
    /// sorted descending (legacy dm-snapshot merge order).
    fn snapshot_metadata_plan() -> MergePlan {
        let copies = [
            (23, 20),
            (22, 19),
            (21, 18),
            (20, 17),
            (19, 16),
            (18, 15),
            (50, 75),
            (51, 76),
            (52, 77),
            (53, 78),
            (110, 130),
            (105, 125),
            (100, 120),
            (25, 30),
            (30, 31),
        ];
        let mut ops: Vec<PlannedOp> = copies.iter().map(|&(d, s)| PlannedOp::copy(d, s)).collect();
        let mut others: Vec<PlannedOp> = (256..512)
            .map(PlannedOp::replace)
            .chain((512..768).map(PlannedOp::zero))
            .collect();
        others.sort_by_key(|op| std::cmp::Reverse(op.new_block));
        ops.extend(others);
        MergePlan::new(ops, 0).unwrap()
    }

    #[test]
    fn snapshot_metadata_test_vector() {
        let plan = snapshot_metadata_plan();
        let store = ExceptionStore::build(&plan).unwrap();
        assert_eq!(store.num_areas(), 3);
        let live = store.num_exceptions();
        let mut area = [0u8; BLOCK_SIZE];
        store.render_area(&plan, 0, live, &mut area).unwrap();
        for j in 0..256u64 {
            assert_eq!(entry(&area, j as usize), (256 + j, 2 + j));
        }
        store.render_area(&plan, 1, live, &mut area).unwrap();
        for j in 0..256u64 {
            assert_eq!(entry(&area, j as usize), (512 + j, 259 + j));
        }
        store.render_area(&plan, 2, live, &mut area).unwrap();
        let expected = [
            (30, 518),
            (25, 520),
            (100, 521),
            (105, 522),
            (110, 523),
            (53, 524),
            (52, 525),
            (51, 526),
            (50, 527),
            (18, 528),
            (19, 529),
            (20, 530),
            (21, 532),
            (22, 533),
            (23, 534),
        ];
        for (slot, &want) in expected.iter().enumerate() {
            assert_eq!(entry(&area, slot), want, "slot {slot}");
        }
        for slot in expected.len()..256 {
            assert_eq!(entry(&area, slot), (0, 0));
        }
        assert_eq!(store.device_chunks(), 535);
        assert_eq!(store.device_sectors(), 535 * 8);
        // Lookups.
        assert_eq!(store.lookup(0), ChunkKind::Header);
        assert_eq!(store.lookup(258), ChunkKind::Metadata { area: 1 });
        assert_eq!(store.lookup(772), ChunkKind::Unmapped); // area 3 does not exist
        assert_eq!(store.lookup(519), ChunkKind::Unmapped); // a gap
        assert_eq!(
            store.lookup(534),
            ChunkKind::Data {
                exception: 526,
                op_index: 0
            }
        );
        assert_eq!(
            store.lookup(2),
            ChunkKind::Data {
                exception: 0,
                op_index: 526
            }
        );
        assert_eq!(plan.op(526).unwrap().new_block, 256);
    }

    #[test]
    fn merged_entries_render_as_zero() {
        let plan = snapshot_metadata_plan();
        let store = ExceptionStore::build(&plan).unwrap();
        let mut area = [0u8; BLOCK_SIZE];
        store.render_area(&plan, 2, 512 + 12, &mut area).unwrap();
        assert_eq!(entry(&area, 11), (20, 530));
        assert_eq!(entry(&area, 12), (0, 0));
        assert!(store.render_area(&plan, 3, 0, &mut area).is_err());
        assert!(store.render_area(&plan, 0, 0, &mut [0u8; 10]).is_err());
    }

    #[test]
    fn no_ops_gives_one_empty_area() {
        let plan = MergePlan::new(vec![], 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        assert_eq!(store.num_areas(), 1);
        assert_eq!(store.device_chunks(), 2);
        let mut area = [0xffu8; BLOCK_SIZE];
        store.render_area(&plan, 0, 0, &mut area).unwrap();
        assert!(area.iter().all(|&b| b == 0));
        // Everything merged is the same as no ops.
        let plan = MergePlan::new(vec![PlannedOp::zero(1)], 1).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        assert_eq!((store.num_areas(), store.num_exceptions()), (1, 0));
    }

    #[test]
    fn full_area_is_followed_by_empty_terminator_area() {
        let plan = MergePlan::new((0..256).map(PlannedOp::zero).collect(), 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        assert_eq!(store.num_areas(), 2);
        assert_eq!(store.device_chunks(), 259);
        assert_eq!(store.lookup(258), ChunkKind::Metadata { area: 1 });
    }

    #[test]
    fn window_boundaries_force_gaps() {
        // 1100 independent copies with consecutive blocks: groups only split at windows.
        let n = 1100u64;
        let ops = (0..n).map(|i| PlannedOp::copy(10_000 + i, i)).collect();
        let plan = MergePlan::new(ops, 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        let mut gaps_after = vec![];
        for e in 1..store.num_exceptions() {
            let (a, b) = (store.new_chunk(e - 1).unwrap(), store.new_chunk(e).unwrap());
            let expected_step = if is_metadata_chunk(a + 1) { 2 } else { 1 };
            if b - a != expected_step {
                gaps_after.push(store.op_index(e).unwrap());
            }
        }
        // Window boundaries in merge order are at ops 510 and 1020; the exception with the
        // lower op index on the far side of each gap is the first op of the later window...
        // walking backwards, the gap precedes op 1019 and op 509.
        assert_eq!(gaps_after, vec![1019, 509]);
    }

    #[test]
    fn header_bytes() {
        let h = header_chunk();
        assert_eq!(
            &h[0..16],
            &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]
        );
        assert!(h[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn sector_math() {
        assert_eq!(sector_to_chunk(0), (0, 0));
        assert_eq!(sector_to_chunk(17), (2, 512));
        assert!(!is_metadata_chunk(0));
        assert!(is_metadata_chunk(258));
        assert_eq!(area_chunk(2), 515);
    }

    /// The batches dm-snapshot-merge would form: per area, trailing runs of entries whose
    /// old and new chunks both step by one. Returned as lists of exception indexes.
    fn kernel_batches(plan: &MergePlan, store: &ExceptionStore) -> Vec<Vec<usize>> {
        let mut batches = Vec::new();
        let mut area = [0u8; BLOCK_SIZE];
        for a in (0..store.num_areas()).rev() {
            store
                .render_area(plan, a, store.num_exceptions(), &mut area)
                .unwrap();
            let mut count = (0..EXCEPTIONS_PER_AREA)
                .take_while(|&s| entry(&area, s).1 != 0)
                .count();
            while count > 0 {
                let (lo, ln) = entry(&area, count - 1);
                let mut n = 1;
                while n < count
                    && Some(entry(&area, count - 1 - n))
                        == lo.checked_sub(n as u64).zip(ln.checked_sub(n as u64))
                {
                    n += 1;
                }
                batches.push(
                    (count - n..count)
                        .map(|s| a * EXCEPTIONS_PER_AREA + s)
                        .collect(),
                );
                count -= n;
            }
        }
        batches
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Every kernel batch is free of read/write overlap, lies in one read-ahead window,
        /// does not mix ordered and unordered ops, and the batches taken from the end
        /// merge the ops in exact merge order.
        #[test]
        fn kernel_batches_respect_dependencies_and_windows(
            raw in prop::collection::vec((0u64..1400, 0u64..1400, 0u8..4), 0..1400),
            merged in 0usize..600,
        ) {
            let mut written = std::collections::HashSet::new();
            let mut ordered = Vec::new();
            let mut others = Vec::new();
            for (dest, src, kind) in raw {
                if !written.insert(dest) {
                    continue;
                }
                match kind {
                    0 => ordered.push(PlannedOp::copy(dest, src)),
                    1 => ordered.push(PlannedOp::xor(dest, src * 4096 + (dest % 3) * 1000)),
                    2 => others.push(PlannedOp::replace(dest)),
                    _ => others.push(PlannedOp::zero(dest)),
                }
            }
            others.sort_by_key(|op| std::cmp::Reverse(op.new_block));
            ordered.extend(others);
            let merged = merged.min(ordered.len()) as u64;
            let plan = MergePlan::new(ordered, merged).unwrap();
            let store = ExceptionStore::build(&plan).unwrap();
            let mut next_op = plan.num_merge_ops();
            for batch in kernel_batches(&plan, &store) {
                let ops: Vec<usize> = batch.iter().rev().map(|&e| store.op_index(e).unwrap()).collect();
                // Merged in order: the batch is the next ops of the merge order.
                prop_assert_eq!(ops.clone(), (next_op..next_op + ops.len()).collect::<Vec<_>>());
                next_op += ops.len();
                let kinds: std::collections::HashSet<bool> =
                    ops.iter().map(|&i| plan.ops()[i].kind.is_ordered()).collect();
                prop_assert!(kinds.len() == 1, "batch mixes ordered and unordered ops");
                if plan.ops()[ops[0]].kind.is_ordered() {
                    let windows: std::collections::HashSet<usize> =
                        ops.iter().map(|&i| window_of(i)).collect();
                    prop_assert!(windows.len() == 1, "batch spans windows");
                    let dests: std::collections::HashSet<u64> =
                        ops.iter().map(|&i| plan.ops()[i].new_block).collect();
                    for &i in &ops {
                        // An op reading its own destination is a single-op matter that
                        // only scratch space can make replay-safe (see MergeTracker::open).
                        let own = plan.ops()[i].new_block;
                        let reads_batch_dest = plan.ops()[i]
                            .source_blocks()
                            .iter()
                            .any(|b| b != own && dests.contains(&b));
                        prop_assert!(!reads_batch_dest, "op {} {:?} reads a block its batch writes: {:?}", i, plan.ops()[i], ops.iter().map(|&j| plan.ops()[j]).collect::<Vec<_>>());
                    }
                }
            }
            prop_assert_eq!(next_op, plan.len());

            // Progress-invariant layout: the table built with nothing merged gives every
            // still-unmerged op the same chunk id, and the device the same size.
            let fresh_plan = MergePlan::new(plan.ops().to_vec(), 0).unwrap();
            let fresh = ExceptionStore::build(&fresh_plan).unwrap();
            prop_assert_eq!(fresh.device_chunks(), store.device_chunks());
            for e in 0..store.num_exceptions() {
                let op = store.op_index(e).unwrap();
                let fe = fresh.exception_of_op(op).unwrap();
                prop_assert_eq!(e, fe);
                prop_assert_eq!(store.new_chunk(e), fresh.new_chunk(fe));
            }
        }
    }
}
