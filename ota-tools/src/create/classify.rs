//! Per-target-block decision: what op (if any) produces each 4 KiB block of the target.
//!
//! In priority order a target block is:
//! 1. **unchanged** when the source holds the same bytes at the same position (no op);
//! 2. **ZERO** when it is all zeroes;
//! 3. **COPY** when some source block is byte-for-byte equal (found through the hash index
//!    and confirmed by comparison; the lowest matching block number wins here, and
//!    [`near_bases`](super::near_bases) later moves it to the nearest equal block);
//! 4. **XOR** against the most similar candidate (the same position, or, when enabled, a block
//!    that shares sampled windows) when the XOR delta compresses far better than the block itself;
//! 5. **REPLACE** otherwise.
//!
//! Every decision is a pure function of the block's bytes and of the source, so the result
//! does not depend on how many threads classify.

use std::cell::RefCell;

use cow_format::{Compression, CompressionAlgorithm};
use rayon::prelude::*;

use super::block_index::SourceIndex;
use super::hash::{block_hash, equal_bytes, is_zero};
use super::image::{read_blocks_parallel, BlockImage, ImageError};
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
    /// by [`super::shifted`], before ordering, for blocks whose content moved by a number
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
    /// How payload sizes are estimated (the COW's own compression).
    pub estimator: SizeEstimator,
    /// Consider XOR ops at all (pointless without compression).
    pub xor: bool,
    /// Similar-block candidates examined per block, besides the same position (0: none,
    /// and the similarity index is not built; the byte-offset search of
    /// [`super::shifted`] finds aligned bases as well, and found slightly better ones on
    /// the PyPI pair).
    pub similar_candidates: usize,
    /// Equal-hash source blocks compared byte for byte before giving up on COPY.
    pub exact_candidates: usize,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self {
            estimator: SizeEstimator::default(),
            xor: true,
            similar_candidates: 0,
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

/// Stored size of one payload with the COW's compression: what decides between XOR and
/// REPLACE. lz4 is measured exactly; zstd, gz and brotli with the same algorithm at a level
/// capped to a fast one ([`ESTIMATE_MAX_LEVEL_ZSTD`], [`ESTIMATE_MAX_LEVEL_GZ`],
/// [`ESTIMATE_MAX_LEVEL_BROTLI`]): the decision needs the ratio of two sizes, which the
/// algorithm (its entropy coder, its match format) sets far more than the level, and the
/// top levels cost 10-100 times more per block. Without compression the raw LZ4 size
/// stands in (XOR is then disabled anyway). A payload never costs more than its own length
/// (it is stored raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeEstimator {
    compression: Compression,
}

/// Highest zstd level used for estimates (the default level).
pub const ESTIMATE_MAX_LEVEL_ZSTD: i32 = 3;
/// Highest gz level used for estimates.
pub const ESTIMATE_MAX_LEVEL_GZ: i32 = 1;
/// Highest brotli quality used for estimates.
pub const ESTIMATE_MAX_LEVEL_BROTLI: i32 = 4;

thread_local! {
    /// One zstd context per thread and level: creating one per block costs more than
    /// compressing the block.
    static ZSTD_CTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

impl SizeEstimator {
    /// An estimator for `compression`.
    pub fn new(compression: Compression) -> Self {
        Self { compression }
    }

    /// Whether the XOR delta `xor` of target block `target` is worth an XOR op instead of
    /// REPLACE ([`xor_pays_off`] on the sizes with this estimator's compression). With
    /// zstd, gz or brotli the raw LZ4 sizes are tried first and settle the clear cases (the
    /// delta at most half the block: XOR; a quarter larger than the block: REPLACE); only
    /// the others are compressed with the COW's algorithm, which costs several times more.
    pub fn xor_pays_off(&self, xor: &[u8], target: &[u8]) -> bool {
        let lz4 = |d: &[u8]| lz4_flex::block::compress(d).len().min(d.len());
        if matches!(
            self.compression.algorithm,
            CompressionAlgorithm::None | CompressionAlgorithm::Lz4
        ) {
            return xor_pays_off(lz4(xor), lz4(target));
        }
        let (x, r) = (lz4(xor), lz4(target));
        if x * 2 <= r && x + 128 <= r {
            return true;
        }
        if x * 4 >= r * 5 {
            return false;
        }
        xor_pays_off(self.estimate(xor), self.estimate(target))
    }

    /// Estimated stored size of `data` (one or more whole blocks) in bytes.
    pub fn estimate(&self, data: &[u8]) -> usize {
        let level = self.compression.effective_level();
        let size = match self.compression.algorithm {
            CompressionAlgorithm::None | CompressionAlgorithm::Lz4 => {
                lz4_flex::block::compress(data).len()
            }
            CompressionAlgorithm::Zstd => zstd_size(level.min(ESTIMATE_MAX_LEVEL_ZSTD), data),
            alg @ (CompressionAlgorithm::Gz | CompressionAlgorithm::Brotli) => {
                let cap = if alg == CompressionAlgorithm::Gz {
                    ESTIMATE_MAX_LEVEL_GZ
                } else {
                    ESTIMATE_MAX_LEVEL_BROTLI
                };
                let mut out = Vec::new();
                match cow_format::compression::compress(alg, Some(level.min(cap)), data, &mut out) {
                    Ok(()) => out.len(),
                    Err(_) => data.len(),
                }
            }
        };
        size.min(data.len())
    }
}

/// zstd size of `data` at `level` with a block-sized window, as the writer compresses.
fn zstd_size(level: i32, data: &[u8]) -> usize {
    use zstd::zstd_safe::CParameter;
    ZSTD_CTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let made = zstd::bulk::Compressor::new(level).and_then(|mut c| {
                c.set_parameter(CParameter::WindowLog(12))?;
                c.set_parameter(CParameter::ChecksumFlag(false))?;
                Ok(c)
            });
            *slot = made.ok().map(|c| (level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return data.len();
        };
        let mut out = vec![0u8; zstd::zstd_safe::compress_bound(data.len())];
        c.compress_to_buffer(data, &mut out[..])
            .unwrap_or(data.len())
    })
}

/// Whether an XOR delta is worth an XOR op instead of REPLACE: at least 10 % and at least
/// 128 bytes smaller than the block alone (the margin covers what a REPLACE block gains by
/// being compressed with its neighbours; on the PyPI pair 10 % / 128 gave smaller COWs than
/// 25 % / 256, 33 % / 256, 15 % / 256 and 5 % / 64, for lz4 and zstd).
pub fn xor_pays_off(xor_estimate: usize, replace_estimate: usize) -> bool {
    xor_estimate * 10 <= replace_estimate * 9 && xor_estimate + 128 <= replace_estimate
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
    let est = &opts.estimator;
    if est.xor_pays_off(&buf, target) {
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
        read_blocks_parallel(target, first, tchunk)?;
        let same_count = src_blocks.saturating_sub(first).min(count as u64) as usize;
        let schunk = &mut sbuf[..same_count * BLOCK_SIZE];
        if same_count > 0 {
            read_blocks_parallel(source, first, schunk)?;
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

    /// Estimates use the COW's algorithm, never exceed the block, and the XOR decision
    /// follows them (clear cases and borderline ones).
    #[test]
    fn estimates_follow_the_compression_and_decide_xor() {
        use super::{SizeEstimator, BLOCK_SIZE};
        use cow_format::{Compression, CompressionAlgorithm};
        let text: Vec<u8> = (0..BLOCK_SIZE)
            .map(|i| b"the quick brown fox jumps over "[i % 31] ^ ((i / 97) as u8 & 3))
            .collect();
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        let noise: Vec<u8> = (0..BLOCK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut sparse = vec![0u8; BLOCK_SIZE];
        for i in (0..BLOCK_SIZE).step_by(61) {
            sparse[i] = 0x10;
        }
        let est = |a| {
            SizeEstimator::new(Compression {
                algorithm: a,
                level: None,
            })
        };
        let sizes: Vec<usize> = [
            CompressionAlgorithm::Lz4,
            CompressionAlgorithm::Zstd,
            CompressionAlgorithm::Gz,
            CompressionAlgorithm::Brotli,
        ]
        .into_iter()
        .map(|a| {
            let e = est(a);
            assert_eq!(e.estimate(&noise), BLOCK_SIZE, "{a:?}: noise is stored raw");
            assert!(e.xor_pays_off(&sparse, &noise), "{a:?}");
            assert!(!e.xor_pays_off(&noise, &text), "{a:?}");
            e.estimate(&text)
        })
        .collect();
        assert!(sizes.iter().all(|&n| n < BLOCK_SIZE / 2), "{sizes:?}");
        // Not one proxy for all: the algorithms give different sizes.
        assert!(sizes.windows(2).any(|w| w[0] != w[1]), "{sizes:?}");
    }
}
