//! Per-target-block decision: what op (if any) produces each 4 KiB block of the target.
//!
//! In priority order a target block is:
//! 1. **unchanged** when the source holds the same bytes at the same position (no op);
//! 2. **ZERO** when it is all zeroes;
//! 3. **COPY** when some source block is byte-for-byte equal (found through the hash index
//!    and confirmed by comparison; the lowest matching block number wins);
//! 4. **XOR** against the most similar candidate (the same position, or a block that shares
//!    sampled windows) when the XOR delta compresses far better than the block itself;
//! 5. **REPLACE** otherwise.
//!
//! Every decision is a pure function of the block's bytes and of the source, so the result
//! does not depend on how many threads classify.

use rayon::prelude::*;

use super::block_index::SourceIndex;
use super::hash::{block_hash, equal_bytes, is_zero};
use super::image::{BlockImage, ImageError};
use super::BLOCK_SIZE;

/// What produces one target block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockClass {
    /// Same bytes as the source block at the same position: no op.
    Unchanged,
    /// All zeroes: a ZERO op.
    Zero,
    /// Equal to source block `source`: a COPY op.
    Copy {
        /// Source block number.
        source: u32,
    },
    /// Target = payload XOR source block `source`: an XOR op (block-aligned).
    Xor {
        /// Source block number.
        source: u32,
    },
    /// Stored in the COW: a REPLACE op.
    Replace,
    /// Target = payload XOR the 4096 source bytes at byte `block * 4096 + offset`
    /// (`offset` in 1..4096, so source blocks `block` and `block + 1` are read). Made only
    /// by [`super::shifted`], after ordering, for blocks whose content moved by a number
    /// of bytes that is not a multiple of the block size.
    XorAt {
        /// First source block read.
        block: u32,
        /// Byte offset inside that block (1..4096).
        offset: u16,
    },
}

impl BlockClass {
    /// True for ops that read the source image during the merge (COPY and XOR).
    pub fn is_ordered(self) -> bool {
        matches!(
            self,
            BlockClass::Copy { .. } | BlockClass::Xor { .. } | BlockClass::XorAt { .. }
        )
    }

    /// Source byte offset this op reads 4096 bytes from, if it reads the source.
    pub fn source_offset(self) -> Option<u64> {
        let bs = BLOCK_SIZE as u64;
        match self {
            BlockClass::Copy { source } | BlockClass::Xor { source } => {
                Some(u64::from(source) * bs)
            }
            BlockClass::XorAt { block, offset } => Some(u64::from(block) * bs + u64::from(offset)),
            _ => None,
        }
    }

    /// The (first) source block this op reads during the merge, if any.
    pub fn reads(self) -> Option<u32> {
        match self {
            BlockClass::Copy { source } | BlockClass::Xor { source } => Some(source),
            BlockClass::XorAt { block, .. } => Some(block),
            _ => None,
        }
    }

    /// The source blocks this op reads: first block and count (1, or 2 for
    /// [`BlockClass::XorAt`]).
    pub fn read_span(self) -> Option<(u32, u32)> {
        match self {
            BlockClass::XorAt { block, .. } => Some((block, 2)),
            c => c.reads().map(|b| (b, 1)),
        }
    }
}

/// Options for classification.
#[derive(Debug, Clone, Copy)]
pub struct ClassifyOptions {
    /// Consider XOR ops at all (pointless without compression).
    pub xor: bool,
    /// Similar-block candidates examined per block, besides the same position.
    pub similar_candidates: usize,
    /// Equal-hash source blocks compared byte for byte before giving up on COPY.
    pub exact_candidates: usize,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self {
            xor: true,
            similar_candidates: 4,
            exact_candidates: 8,
        }
    }
}

/// Target blocks read and classified per batch.
pub const CLASSIFY_BATCH_BLOCKS: usize = 1024;

/// Errors while classifying.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// Reading the source or the target failed.
    #[error("classifying target blocks")]
    Image(#[from] ImageError),
}

/// Size estimate (bytes) of a compressed block: the raw LZ4 block size, a fast and
/// deterministic proxy used for every algorithm.
pub fn estimate(data: &[u8]) -> usize {
    lz4_flex::block::compress(data).len()
}

/// Whether an XOR delta is worth an XOR op instead of REPLACE: at least a quarter smaller
/// and at least 256 bytes smaller than the block alone.
pub fn xor_pays_off(xor_estimate: usize, replace_estimate: usize) -> bool {
    xor_estimate * 4 <= replace_estimate * 3 && xor_estimate + 256 <= replace_estimate
}

fn xor_into(out: &mut [u8], a: &[u8], b: &[u8]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
}

/// Classifies one target block `n` (`same` = source block `n` if the source has it).
pub fn classify_block(
    n: u64,
    target: &[u8],
    same: Option<&[u8]>,
    source: &dyn BlockImage,
    index: &SourceIndex,
    opts: &ClassifyOptions,
) -> Result<BlockClass, ImageError> {
    if same == Some(target) {
        return Ok(BlockClass::Unchanged);
    }
    if is_zero(target) {
        return Ok(BlockClass::Zero);
    }
    let mut buf = vec![0u8; BLOCK_SIZE];
    for cand in index.exact_candidates(block_hash(target), opts.exact_candidates) {
        source.read_blocks(u64::from(cand), &mut buf)?;
        if buf == target {
            return Ok(BlockClass::Copy { source: cand });
        }
    }
    if !opts.xor {
        return Ok(BlockClass::Replace);
    }
    // Best XOR base: the most equal bytes; the same position wins ties (it never adds an
    // ordering constraint), then the lowest block number.
    let mut best: Option<(usize, u32)> = None;
    if let Some(s) = same {
        if let Ok(n32) = u32::try_from(n) {
            best = Some((equal_bytes(target, s), n32));
        }
    }
    let mut best_data = same.map(<[u8]>::to_vec);
    for cand in index.similar_candidates(target, opts.similar_candidates) {
        if u64::from(cand) == n {
            continue;
        }
        source.read_blocks(u64::from(cand), &mut buf)?;
        let eq = equal_bytes(target, &buf);
        if best.is_none_or(|(e, b)| eq > e || (eq == e && cand < b && u64::from(b) != n)) {
            best = Some((eq, cand));
            best_data = Some(buf.clone());
        }
    }
    let (Some((eq, base)), Some(base_data)) = (best, best_data) else {
        return Ok(BlockClass::Replace);
    };
    if eq < BLOCK_SIZE / 4 {
        return Ok(BlockClass::Replace);
    }
    xor_into(&mut buf, target, &base_data);
    if xor_pays_off(estimate(&buf), estimate(target)) {
        Ok(BlockClass::Xor { source: base })
    } else {
        Ok(BlockClass::Replace)
    }
}

/// Classifies every block of `target`, reading both images in batches and deciding the
/// blocks of a batch in parallel. `progress` gets the number of blocks done per batch.
pub fn classify_image(
    source: &dyn BlockImage,
    target: &dyn BlockImage,
    index: &SourceIndex,
    opts: &ClassifyOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<BlockClass>, ClassifyError> {
    let blocks = target.block_count();
    let src_blocks = source.block_count();
    let mut classes = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
    let mut tbuf = vec![0u8; CLASSIFY_BATCH_BLOCKS * BLOCK_SIZE];
    let mut sbuf = vec![0u8; CLASSIFY_BATCH_BLOCKS * BLOCK_SIZE];
    let mut first = 0u64;
    while first < blocks {
        let count = (blocks - first).min(CLASSIFY_BATCH_BLOCKS as u64) as usize;
        let tchunk = &mut tbuf[..count * BLOCK_SIZE];
        target.read_blocks(first, tchunk)?;
        let same_count = src_blocks.saturating_sub(first).min(count as u64) as usize;
        let schunk = &mut sbuf[..same_count * BLOCK_SIZE];
        if same_count > 0 {
            source.read_blocks(first, schunk)?;
        }
        let tchunk = &*tchunk;
        let schunk = &*schunk;
        let batch: Vec<BlockClass> = tchunk
            .par_chunks_exact(BLOCK_SIZE)
            .enumerate()
            .map(|(i, t)| {
                let same = schunk.get(i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE);
                classify_block(first + i as u64, t, same, source, index, opts)
            })
            .collect::<Result<_, _>>()?;
        classes.extend(batch);
        first += count as u64;
        progress(count as u64);
    }
    Ok(classes)
}

#[cfg(test)]
mod tests {
    use super::BlockClass;

    #[test]
    fn a_class_is_eight_bytes() {
        // The plan holds one per target block; CREATE.md's memory figures rely on it.
        assert_eq!(std::mem::size_of::<BlockClass>(), 8);
    }
}
