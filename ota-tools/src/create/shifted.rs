//! XOR bases at any byte offset for REPLACE blocks: content that moved by a number of
//! bytes that is not a multiple of the block size (recompiled code shifted by a few bytes,
//! a file rewritten with lines inserted, inode tables shifted by whole inodes).
//! cow-format.md §9 allows an XOR op to read 4096 source bytes at any byte offset,
//! spanning two source blocks.
//!
//! # Search
//!
//! 1. **Anchors** ([`super::anchors`]): the content-defined anchors of the target block
//!    are looked up in the source's anchor index; each hit proposes the base offset
//!    `source position - target position`. Offsets are ranked by how many anchors agree
//!    (then lowest offset) and the best [`MAX_CANDIDATES`] are compared byte for byte.
//! 2. **Neighbours**: content that moved usually moved with its neighbours (a file's
//!    blocks move together), so each block also tries the base of the block before it plus
//!    4096 and the base of the block after it minus 4096, whatever produced those (a COPY,
//!    an XOR, an unchanged block or this search). This runs as a forward then a backward
//!    sweep over runs of [`SWEEP_SEGMENT_BLOCKS`] REPLACE blocks, so a base found by
//!    anchors in one block of a moved file carries over to the blocks next to it that
//!    have no anchor hit of their own.
//!
//! The candidate with the most equal bytes wins (then the lowest offset); it becomes an
//! XOR when its delta compresses smaller than the block by the rule of
//! [`super::classify::xor_pays_off`], measured with the COW's own compression
//! ([`super::classify::SizeEstimator::xor_pays_off`]). The result is a pure function of the images and
//! of the plan before this pass (segments have fixed boundaries), so it does not depend on
//! the number of threads.
//!
//! # Merge order
//!
//! This pass runs before ordering: the XORs it makes are ordered together with the COPY
//! and block-aligned XOR ops by [`super::order`], which knows that an unaligned XOR reads
//! two source blocks. So a base may lie where another op writes: the XOR is merged before
//! that op, or, when that closes a cycle, one member of the cycle is converted.
//!
//! # Cost
//!
//! Per REPLACE block: one rolling hash over 4096 bytes, about 16 index lookups, and at most
//! `MAX_CANDIDATES + 4` reads and comparisons of 4096 source bytes. Memory: the batch of
//! target blocks (4 MiB) and one result (16 bytes) per REPLACE block.

use rayon::prelude::*;

use super::anchors::{for_each_anchor, AnchorIndex, MAX_ANCHORS_PER_BLOCK};
use super::block_index::SourceIndex;
use super::classify::{BlockClass, SizeEstimator};
use super::hash::equal_bytes;
use super::image::{BlockImage, ImageError};
use super::BLOCK_SIZE;

/// Anchor-proposed base offsets compared byte for byte per block.
pub const MAX_CANDIDATES: usize = 4;
/// REPLACE blocks searched per batch.
pub const SHIFT_BATCH_BLOCKS: usize = 1024;
/// REPLACE blocks per neighbour sweep (sweeps of different segments run in parallel).
pub const SWEEP_SEGMENT_BLOCKS: usize = 64;

/// What the search needs to know about the source and the plan so far.
pub struct SearchContext<'a> {
    /// The source image.
    pub source: &'a dyn BlockImage,
    /// Its anchor index.
    pub anchors: &'a AnchorIndex,
    /// The classes so far (neighbours' bases come from them).
    pub classes: &'a [BlockClass],
    /// Size estimates with the COW's compression.
    pub estimator: &'a SizeEstimator,
}

impl SearchContext<'_> {
    /// Whether an XOR may read the 4096 source bytes at `off`: they lie inside the source.
    pub fn is_valid_base(&self, off: u64) -> bool {
        let bs = BLOCK_SIZE as u64;
        off.checked_add(bs)
            .is_some_and(|end| end <= self.source.block_count().saturating_mul(bs))
    }

    /// Base offsets proposed by the anchors of target block `t`, best first.
    pub fn anchor_candidates(&self, t: &[u8]) -> Vec<u64> {
        let mut votes: Vec<(u64, u32)> = Vec::new();
        for_each_anchor(t, MAX_ANCHORS_PER_BLOCK, |pos, key| {
            for src_pos in self.anchors.positions(key) {
                let Some(off) = src_pos.checked_sub(pos as u64) else {
                    continue;
                };
                match votes.iter_mut().find(|(o, _)| *o == off) {
                    Some((_, v)) => *v += 1,
                    None => votes.push((off, 1)),
                }
            }
        });
        votes.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        votes.into_iter().map(|(o, _)| o).collect()
    }

    /// Compares `t` with the source at each safe offset of `offsets` (at most `limit`
    /// tried); returns the best (equal bytes, offset), improving on `best`.
    fn best_of(
        &self,
        t: &[u8],
        offsets: impl IntoIterator<Item = u64>,
        limit: usize,
        mut best: Option<(usize, u64)>,
        buf: &mut [u8],
    ) -> Result<Option<(usize, u64)>, ImageError> {
        let mut tried = 0usize;
        for off in offsets {
            if tried >= limit {
                break;
            }
            if best.is_some_and(|(_, o)| o == off) || !self.is_valid_base(off) {
                continue;
            }
            tried += 1;
            self.source.read_bytes(off, buf)?;
            let eq = equal_bytes(t, buf);
            if best.is_none_or(|(e, o)| eq > e || (eq == e && off < o)) {
                best = Some((eq, off));
            }
        }
        Ok(best)
    }

    /// The final decision for target block `t` with its best base: `Some(offset)` when
    /// the XOR pays off against REPLACE.
    pub fn decide(&self, t: &[u8], best: Option<(usize, u64)>) -> Result<Option<u64>, ImageError> {
        let Some((eq, off)) = best else {
            return Ok(None);
        };
        if eq < BLOCK_SIZE / 4 {
            return Ok(None);
        }
        let mut x = vec![0u8; BLOCK_SIZE];
        self.source.read_bytes(off, &mut x)?;
        for (b, y) in x.iter_mut().zip(t) {
            *b ^= y;
        }
        Ok(self.estimator.xor_pays_off(&x, t).then_some(off))
    }
}

/// Finds the best byte-shifted XOR base for target block `t` from its anchors alone, if
/// one pays off. (The plan also tries neighbours' bases; see the module docs.)
pub fn find_shifted_base(t: &[u8], ctx: &SearchContext<'_>) -> Result<Option<u64>, ImageError> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    let best = ctx.best_of(t, ctx.anchor_candidates(t), MAX_CANDIDATES, None, &mut buf)?;
    ctx.decide(t, best)
}

/// The base offset that block `m` of the plan reads (or would read), for neighbours.
fn class_base(
    classes: &[BlockClass],
    found: &[Option<(usize, u64)>],
    pos: &[u32],
    m: u64,
) -> Option<u64> {
    let i = usize::try_from(m).ok()?;
    match classes.get(i)? {
        BlockClass::Unchanged => m.checked_mul(BLOCK_SIZE as u64),
        BlockClass::Replace => {
            let k = pos.binary_search(&(i as u32)).ok()?;
            found.get(k).copied().flatten().map(|(_, o)| o)
        }
        c => c.source_offset(),
    }
}

/// Gives the REPLACE blocks of `classes` an XOR base at any byte offset where one pays
/// off (see the module docs). Returns how many were converted. `progress` gets the number
/// of target blocks covered per batch. Run it before ordering.
pub fn add_shifted_xors(
    classes: &mut [BlockClass],
    source: &dyn BlockImage,
    target: &dyn BlockImage,
    index: &SourceIndex,
    estimator: &SizeEstimator,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, ImageError> {
    let replace: Vec<u32> = (0..classes.len())
        .filter(|&n| classes[n] == BlockClass::Replace)
        .map(|n| n as u32)
        .collect();
    let ctx = SearchContext {
        source,
        anchors: index.anchors(),
        classes,
        estimator,
    };
    let bs = BLOCK_SIZE as u64;
    // Best (equal bytes, offset) per REPLACE block, then the decision.
    let mut best: Vec<Option<(usize, u64)>> = vec![None; replace.len()];
    let mut decided: Vec<Option<u64>> = vec![None; replace.len()];
    let mut covered = 0u64;
    let mut tbuf = vec![0u8; SHIFT_BATCH_BLOCKS * BLOCK_SIZE];
    for (batch_no, batch) in replace.chunks(SHIFT_BATCH_BLOCKS).enumerate() {
        let first = batch_no * SHIFT_BATCH_BLOCKS;
        let tdata = &mut tbuf[..batch.len() * BLOCK_SIZE];
        for (k, &n) in batch.iter().enumerate() {
            target.read_blocks(
                u64::from(n),
                &mut tdata[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE],
            )?;
        }
        let tdata = &*tdata;
        // 1. Anchors, in parallel.
        let anchored: Vec<Option<(usize, u64)>> = batch
            .par_iter()
            .enumerate()
            .map(|(k, _)| {
                let t = &tdata[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
                let mut buf = vec![0u8; BLOCK_SIZE];
                ctx.best_of(t, ctx.anchor_candidates(t), MAX_CANDIDATES, None, &mut buf)
            })
            .collect::<Result<_, ImageError>>()?;
        best[first..first + batch.len()].copy_from_slice(&anchored);
        // 2. Neighbour sweeps, segments in parallel; each segment sees the results of
        //    the earlier batches and its own, never those of a sibling segment.
        let snapshot = &best;
        let swept: Vec<Vec<Option<(usize, u64)>>> = batch
            .par_chunks(SWEEP_SEGMENT_BLOCKS)
            .enumerate()
            .map(|(s, seg)| {
                let seg_first = first + s * SWEEP_SEGMENT_BLOCKS;
                let mut local: Vec<Option<(usize, u64)>> =
                    snapshot[seg_first..seg_first + seg.len()].to_vec();
                let mut buf = vec![0u8; BLOCK_SIZE];
                let base_of = |local: &[Option<(usize, u64)>], m: u64| -> Option<u64> {
                    let i = usize::try_from(m).ok()?;
                    if let Ok(k) = seg.binary_search(&(i as u32)) {
                        return local[k].map(|(_, o)| o);
                    }
                    class_base(ctx.classes, snapshot, &replace, m)
                };
                for forward in [true, false] {
                    let order: Vec<usize> = if forward {
                        (0..seg.len()).collect()
                    } else {
                        (0..seg.len()).rev().collect()
                    };
                    for k in order {
                        let n = seg[k];
                        let k_all = seg_first + k - first;
                        let t = &tdata[k_all * BLOCK_SIZE..(k_all + 1) * BLOCK_SIZE];
                        let hint = if forward {
                            u64::from(n)
                                .checked_sub(1)
                                .and_then(|m| base_of(&local, m))
                                .and_then(|o| o.checked_add(bs))
                        } else {
                            base_of(&local, u64::from(n) + 1).and_then(|o| o.checked_sub(bs))
                        };
                        if let Some(h) = hint {
                            local[k] = ctx.best_of(t, [h], 1, local[k], &mut buf)?;
                        }
                    }
                }
                Ok(local)
            })
            .collect::<Result<_, ImageError>>()?;
        for (s, local) in swept.into_iter().enumerate() {
            let seg_first = first + s * SWEEP_SEGMENT_BLOCKS;
            best[seg_first..seg_first + local.len()].copy_from_slice(&local);
        }
        // 3. Decide XOR or REPLACE by compressed size, in parallel.
        let best_batch = &best[first..first + batch.len()];
        let d: Vec<Option<u64>> = best_batch
            .par_iter()
            .enumerate()
            .map(|(k, &b)| ctx.decide(&tdata[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE], b))
            .collect::<Result<_, ImageError>>()?;
        decided[first..first + batch.len()].copy_from_slice(&d);
        let end = batch.last().map_or(covered, |&n| u64::from(n) + 1);
        progress(end - covered);
        covered = end;
    }
    progress((classes.len() as u64).saturating_sub(covered));
    let no_base = best.iter().filter(|b| b.is_none()).count();
    let weak = best
        .iter()
        .filter(|b| b.is_some_and(|(eq, _)| eq < BLOCK_SIZE / 4))
        .count();
    let taken = decided.iter().filter(|d| d.is_some()).count();
    log::debug!(
        "byte-offset search over {} REPLACE blocks: {no_base} without a base, {weak} with \
         under a quarter of equal bytes, {} not paying off, {taken} XOR",
        replace.len(),
        replace.len() - no_base - weak - taken
    );
    let bs = BLOCK_SIZE as u64;
    for (&n, d) in replace.iter().zip(&decided) {
        let Some(off) = *d else { continue };
        let Ok(block) = u32::try_from(off / bs) else {
            continue;
        };
        classes[n as usize] = match u16::try_from(off % bs) {
            Ok(0) | Err(_) => BlockClass::Xor { source: block },
            Ok(offset) => BlockClass::XorAt { block, offset },
        };
    }
    Ok(taken as u64)
}
