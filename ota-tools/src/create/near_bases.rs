//! Near bases: every COPY and XOR reads, among the source blocks that hold the bytes it
//! needs, the one nearest its own position.
//!
//! The classifier and the byte-offset search choose a base by content: the lowest equal
//! block for COPY, the best-matching candidate for XOR, wherever it lies. But where a base
//! lies matters to the merge. An ordered op must merge before the block it reads is
//! overwritten (cow-format.md §6.4), so a base far from its target ties two places of the
//! device together in the merge order: the order then has to step between the two places
//! each time such a tie comes due, and every read-ahead window of the user-space merge
//! covers both in small pieces (on the demo pair, 229 XORs of one shifted file reading
//! ~3,000 blocks below turned 26 windows into ~2,000 destination runs instead of ~200).
//!
//! When the very same 4096 bytes are also an aligned source block nearer the target,
//! reading that block gives the op the same payload (the same COPY, the same XOR delta)
//! with a shorter tie; an XOR at a byte offset moved onto an aligned block also reads one
//! block instead of two. So this pass, run after classification and before ordering,
//! moves each ordered op onto the nearest aligned source block holding its base's bytes
//! (ties: the lower block). It never changes what the COW stores, only which source block
//! an op reads.

use rayon::prelude::*;

use super::block_index::SourceIndex;
use super::classify::BlockClass;
use super::hash::block_hash;
use super::image::{BlockImage, ImageError};
use super::BLOCK_SIZE;

/// Equal-hash source blocks looked at per op (the index lists the lowest first).
pub const NEAR_BASE_CANDIDATES: usize = 256;

/// Target blocks handled per parallel task.
const NEAR_BASE_CHUNK_BLOCKS: usize = 4096;

/// Distance in blocks between target block `n` and the source block(s) `class` reads:
/// the nearer of the two for a base at a byte offset.
fn distance(n: u64, class: BlockClass) -> Option<u64> {
    let (first, count) = class.read_span()?;
    (u64::from(first)..u64::from(first) + u64::from(count))
        .map(|b| b.abs_diff(n))
        .min()
}

/// The class of target block `n` moved onto the nearest aligned source block that holds
/// the same bytes as its current base, or `None` when the current base is already the
/// nearest (an aligned block at the same distance replaces a base at a byte offset).
fn nearer_base(
    n: u64,
    class: BlockClass,
    source: &dyn BlockImage,
    index: &SourceIndex,
    base: &mut [u8],
    cand_buf: &mut [u8],
) -> Result<Option<BlockClass>, ImageError> {
    let (Some(offset), Some(now)) = (class.source_offset(), distance(n, class)) else {
        return Ok(None);
    };
    let aligned = matches!(class, BlockClass::Copy { .. } | BlockClass::Xor { .. });
    let better = |c: u32| {
        let d = u64::from(c).abs_diff(n);
        d < now || (!aligned && d == now)
    };
    let mut candidates: Vec<u32> = index
        .exact_candidates(
            {
                source.read_bytes(offset, base)?;
                block_hash(base)
            },
            NEAR_BASE_CANDIDATES,
        )
        .filter(|&c| better(c))
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    candidates.sort_unstable_by_key(|&c| (u64::from(c).abs_diff(n), c));
    for c in candidates {
        // COPY from its own position would mean the block is unchanged; the classifier
        // decided that first, so such a candidate cannot hold the bytes, but never make it.
        if matches!(class, BlockClass::Copy { .. }) && u64::from(c) == n {
            continue;
        }
        source.read_blocks(u64::from(c), cand_buf)?;
        if cand_buf == base {
            return Ok(Some(match class {
                BlockClass::Copy { .. } => BlockClass::Copy { source: c },
                _ => BlockClass::Xor { source: c },
            }));
        }
    }
    Ok(None)
}

/// Moves every ordered op of `classes` (index = target block) onto the nearest aligned
/// source block holding its base's bytes; returns how many ops moved.
pub fn move_to_near_bases(
    classes: &mut [BlockClass],
    source: &dyn BlockImage,
    index: &SourceIndex,
) -> Result<u64, ImageError> {
    classes
        .par_chunks_mut(NEAR_BASE_CHUNK_BLOCKS)
        .enumerate()
        .map(|(k, chunk)| {
            let mut base = vec![0u8; BLOCK_SIZE];
            let mut cand = vec![0u8; BLOCK_SIZE];
            let first = (k * NEAR_BASE_CHUNK_BLOCKS) as u64;
            let mut moved = 0u64;
            for (i, class) in chunk.iter_mut().enumerate() {
                let n = first + i as u64;
                if let Some(c) = nearer_base(n, *class, source, index, &mut base, &mut cand)? {
                    *class = c;
                    moved += 1;
                }
            }
            Ok(moved)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::image::MemImage;

    fn pattern(seed: u8) -> Vec<u8> {
        (0..BLOCK_SIZE)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).rotate_left(3) ^ seed)
            .collect()
    }

    /// 64 source blocks: block 2 and block 50 hold pattern A, block 10 pattern B, block
    /// 40 and block 41 hold pattern B's second half then first half (so B appears at a
    /// byte offset too), every other block its own pattern.
    fn source() -> Vec<u8> {
        let mut s = Vec::new();
        for b in 0..64u8 {
            s.extend(pattern(100u8.wrapping_add(b)));
        }
        let a = pattern(1);
        let bb = pattern(2);
        let blk = |n: usize| n * BLOCK_SIZE..(n + 1) * BLOCK_SIZE;
        s[blk(2)].copy_from_slice(&a);
        s[blk(50)].copy_from_slice(&a);
        s[blk(10)].copy_from_slice(&bb);
        s[40 * BLOCK_SIZE + 2048..41 * BLOCK_SIZE].copy_from_slice(&bb[..2048]);
        s[41 * BLOCK_SIZE..41 * BLOCK_SIZE + 2048].copy_from_slice(&bb[2048..]);
        s
    }

    fn moved(classes: &mut [BlockClass]) -> u64 {
        let src = MemImage { data: source() };
        let index = SourceIndex::build_for(&src, false, &|_| {}).expect("index");
        move_to_near_bases(classes, &src, &index).expect("pass")
    }

    #[test]
    fn copy_and_xor_move_to_the_nearest_equal_block() {
        let mut classes = vec![BlockClass::Unchanged; 64];
        classes[48] = BlockClass::Copy { source: 2 };
        classes[5] = BlockClass::Copy { source: 2 };
        classes[47] = BlockClass::Xor { source: 2 };
        assert_eq!(moved(&mut classes), 2);
        assert_eq!(classes[48], BlockClass::Copy { source: 50 });
        assert_eq!(classes[47], BlockClass::Xor { source: 50 });
        // Already the nearest of the two.
        assert_eq!(classes[5], BlockClass::Copy { source: 2 });
    }

    #[test]
    fn a_base_at_a_byte_offset_moves_onto_an_aligned_block_holding_its_bytes() {
        let mut classes = vec![BlockClass::Unchanged; 64];
        // Bytes 2048.. of block 40 and ..2048 of block 41 are pattern B, as is block 10.
        classes[12] = BlockClass::XorAt {
            block: 40,
            offset: 2048,
        };
        // Nearer to the offset base than to block 10, and an aligned block at the same
        // distance does not exist: it stays.
        classes[42] = BlockClass::XorAt {
            block: 40,
            offset: 2048,
        };
        assert_eq!(moved(&mut classes), 1);
        assert_eq!(classes[12], BlockClass::Xor { source: 10 });
        assert_eq!(
            classes[42],
            BlockClass::XorAt {
                block: 40,
                offset: 2048
            }
        );
    }

    #[test]
    fn bases_with_no_equal_block_elsewhere_stay() {
        let mut classes = vec![BlockClass::Unchanged; 64];
        classes[20] = BlockClass::Copy { source: 30 };
        classes[21] = BlockClass::Xor { source: 60 };
        classes[22] = BlockClass::Replace;
        classes[23] = BlockClass::Zero;
        let before = classes.clone();
        assert_eq!(moved(&mut classes), 0);
        assert_eq!(classes, before);
    }
}
