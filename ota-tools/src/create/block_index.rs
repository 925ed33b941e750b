//! The content index of the source image: which source blocks might equal, or resemble,
//! a given target block.
//!
//! Memory is bounded and independent of the content: each entry is one `u64` that packs a
//! 32-bit hash (high half) with a 32-bit block number (low half), and the entries are kept
//! in a sorted vector (no hash map, no per-run seed, so lookups are deterministic).
//!
//! * exact index: one entry per non-zero source block (8 bytes);
//! * similarity index: up to [`SIMILAR_PER_BLOCK`] sampled-window entries per source block
//!   (16 bytes).
//!
//! * a bit filter over the similarity index (2 bytes per entry, 4 per source block).
//!
//! That is at most 28 bytes per source block, 7 MiB per GiB of source image. A 32-bit hash
//! only selects candidates: COPY candidates are confirmed byte for byte by the caller.

use rayon::prelude::*;

use super::anchors::{AnchorIndex, INTERLEAVE};
use super::hash::{block_hash, is_zero, window_hashes};
use super::image::{read_blocks_parallel, BlockImage, ImageError};
use super::BLOCK_SIZE;

/// Window entries kept per source block (the smallest window hashes, a bottom-k sketch).
pub const SIMILAR_PER_BLOCK: usize = 2;
/// Blocks read and hashed per batch while building the index.
pub const INDEX_BATCH_BLOCKS: usize = 1024;
/// At most this many entries are taken from one bucket, so a hash shared by thousands of
/// blocks cannot make a lookup slow.
pub const MAX_BUCKET_TAKE: usize = 4;

/// Errors building the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading the source image failed.
    #[error("indexing the source image")]
    Image(#[from] ImageError),
}

/// The sorted, packed content index of a source image.
#[derive(Debug, Default)]
pub struct SourceIndex {
    exact: Vec<u64>,
    similar: Vec<u64>,
    /// Bloom filter (2 bits set per similarity entry, 16 bits per entry): most lookups of
    /// a window that is not in the index stop here, without a binary search.
    similar_filter: Vec<u64>,
    /// Content-defined anchors of the source, for XOR bases at any byte offset.
    anchors: AnchorIndex,
    block_count: u64,
}

/// The two filter bits (word index, mask) of a window hash (a Bloom filter with k = 2:
/// about 1.4 % false positives at 16 bits per entry).
fn filter_bits(filter: &[u64], hash: u64) -> [(usize, u64); 2] {
    let bits = (filter.len() as u64 * 64).max(1);
    let key = hash >> 32;
    let b1 = key % bits;
    let b2 = ((key.wrapping_mul(0x9E37_79B9) >> 7) ^ key.rotate_left(13)) % bits;
    [b1, b2].map(|b| ((b / 64) as usize, 1u64 << (b % 64)))
}

fn pack(hash: u64, block: u32) -> u64 {
    (hash & 0xFFFF_FFFF_0000_0000) | u64::from(block)
}

fn bucket(entries: &[u64], hash: u64) -> &[u64] {
    let key = hash >> 32;
    let lo = entries.partition_point(|e| (e >> 32) < key);
    let hi = entries.partition_point(|e| (e >> 32) <= key);
    entries.get(lo..hi).unwrap_or(&[])
}

/// Index entries of one source block.
#[derive(Default)]
struct BlockEntries {
    exact: Option<u64>,
    sketch: [Option<u64>; SIMILAR_PER_BLOCK],
    anchors: Vec<u64>,
}

/// Per-block index entries of [`INTERLEAVE`] consecutive blocks from `n` (fewer at the
/// end of the image): the exact entry (none for a zero block), the window sketch and the
/// content-defined anchors.
fn group_entries(group: &[u8], n: u32, sketches: bool) -> Vec<BlockEntries> {
    let mut out: Vec<BlockEntries> = group
        .chunks_exact(BLOCK_SIZE)
        .enumerate()
        .map(|(j, block)| {
            let b = n.saturating_add(j as u32);
            if is_zero(block) {
                return BlockEntries::default();
            }
            let mut sketch = [None; SIMILAR_PER_BLOCK];
            if sketches {
                let mut wins: Vec<u64> = window_hashes(block).iter().flatten().copied().collect();
                wins.sort_unstable();
                wins.dedup();
                for (slot, h) in sketch.iter_mut().zip(wins) {
                    *slot = Some(pack(h, b));
                }
            }
            BlockEntries {
                exact: Some(pack(block_hash(block), b)),
                sketch,
                anchors: Vec::new(),
            }
        })
        .collect();
    if out.len() == INTERLEAVE {
        let mut anchors: [Vec<u64>; INTERLEAVE] = Default::default();
        AnchorIndex::blocks_entries(u64::from(n), group, &mut anchors);
        for (e, a) in out.iter_mut().zip(anchors) {
            e.anchors = a;
        }
    } else {
        for (j, e) in out.iter_mut().enumerate() {
            let b = u64::from(n) + j as u64;
            AnchorIndex::block_entries(
                b,
                &group[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                &mut e.anchors,
            );
        }
    }
    // Zero blocks have no anchors (a fill is never one), as the one-block path gives.
    out
}

impl SourceIndex {
    /// Reads the whole source image once (in batches, hashed in parallel) and builds the
    /// index. `progress` is called with the number of blocks done after every batch.
    pub fn build(
        source: &dyn BlockImage,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, IndexError> {
        Self::build_for(source, true, progress)
    }

    /// Like [`SourceIndex::build`]; without `sketches` the similarity index (sampled
    /// windows at fixed offsets, for block-aligned XOR candidates) stays empty, which
    /// saves its hashing and 20 bytes per source block when the anchors find the bases.
    pub fn build_for(
        source: &dyn BlockImage,
        sketches: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, IndexError> {
        let blocks = source.block_count();
        // Reserve the worst case once, so growth never doubles the footprint.
        let cap = usize::try_from(blocks).unwrap_or(0);
        let mut exact = Vec::with_capacity(cap);
        let mut similar =
            Vec::with_capacity(cap.saturating_mul(if sketches { SIMILAR_PER_BLOCK } else { 0 }));
        let mut anchors = Vec::new();
        let mut buf = vec![0u8; INDEX_BATCH_BLOCKS * BLOCK_SIZE];
        let mut first = 0u64;
        while first < blocks {
            let count = (blocks - first).min(INDEX_BATCH_BLOCKS as u64) as usize;
            let chunk = &mut buf[..count * BLOCK_SIZE];
            read_blocks_parallel(source, first, chunk)?;
            let entries: Vec<BlockEntries> = chunk
                .par_chunks(INTERLEAVE * BLOCK_SIZE)
                .enumerate()
                .flat_map_iter(|(g, group)| {
                    // The image has fewer than 2^32 blocks (checked at open), so this fits.
                    let n = u32::try_from(first + (g * INTERLEAVE) as u64).unwrap_or(u32::MAX);
                    group_entries(group, n, sketches)
                })
                .collect();
            for e in entries {
                exact.extend(e.exact);
                similar.extend(e.sketch.iter().flatten());
                anchors.extend_from_slice(&e.anchors);
            }
            first += count as u64;
            progress(count as u64);
        }
        // Entries are unique (they contain the block number), so an unstable sort is
        // deterministic.
        exact.par_sort_unstable();
        similar.par_sort_unstable();
        exact.shrink_to_fit();
        similar.shrink_to_fit();
        let words = (similar.len() * 16 / 64).next_power_of_two().max(1);
        let mut similar_filter = vec![0u64; words];
        for e in &similar {
            for (w, bit) in filter_bits(&similar_filter, *e) {
                similar_filter[w] |= bit;
            }
        }
        Ok(Self {
            exact,
            similar,
            similar_filter,
            anchors: AnchorIndex::from_entries(anchors),
            block_count: blocks,
        })
    }

    /// Number of blocks of the indexed source image.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Bytes of memory held by the index.
    pub fn memory_bytes(&self) -> usize {
        (self.exact.capacity() + self.similar.capacity() + self.similar_filter.capacity())
            * std::mem::size_of::<u64>()
            + self.anchors.memory_bytes()
    }

    /// The content-defined anchors of the source.
    pub fn anchors(&self) -> &AnchorIndex {
        &self.anchors
    }

    /// Source blocks whose hash matches the block `hash` (lowest block numbers first, at
    /// most `limit`). Candidates must be confirmed by comparing bytes.
    pub fn exact_candidates(&self, hash: u64, limit: usize) -> impl Iterator<Item = u32> + '_ {
        bucket(&self.exact, hash)
            .iter()
            .take(limit)
            .map(|e| (e & 0xFFFF_FFFF) as u32)
    }

    /// Source blocks (at most `limit`, lowest first) that have a sampled window whose
    /// hash matches `window_hash` in its upper 32 bits; `None` when more than `limit`
    /// blocks share it (a common window says little about where content came from).
    pub fn window_owners(&self, window_hash: u64, limit: usize) -> Option<Vec<u32>> {
        if !self.may_have_window(window_hash) {
            return Some(Vec::new());
        }
        // One binary search, then at most `limit + 1` entries scanned.
        let key = window_hash >> 32;
        let lo = self.similar.partition_point(|e| (e >> 32) < key);
        let run: Vec<u32> = self.similar[lo..]
            .iter()
            .take(limit + 1)
            .take_while(|e| (*e >> 32) == key)
            .map(|e| (e & 0xFFFF_FFFF) as u32)
            .collect();
        (run.len() <= limit).then_some(run)
    }

    /// False when no sampled source window has this hash; true when one may have it.
    pub fn may_have_window(&self, window_hash: u64) -> bool {
        filter_bits(&self.similar_filter, window_hash)
            .iter()
            .all(|&(w, bit)| self.similar_filter.get(w).is_some_and(|x| x & bit != 0))
    }

    /// Source blocks that share at least one sampled window (same offset, same bytes) with
    /// `block`: at most `limit` distinct blocks, in a deterministic order.
    pub fn similar_candidates(&self, block: &[u8], limit: usize) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        if limit == 0 || self.similar.is_empty() {
            return out;
        }
        for h in window_hashes(block).iter().flatten() {
            if !self.may_have_window(*h) {
                continue;
            }
            for e in bucket(&self.similar, *h).iter().take(MAX_BUCKET_TAKE) {
                let b = (e & 0xFFFF_FFFF) as u32;
                if !out.contains(&b) {
                    out.push(b);
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::MemImage;
    use super::*;

    fn pattern(seed: u8) -> Vec<u8> {
        (0..BLOCK_SIZE)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed.wrapping_mul(17))
                    ^ seed
            })
            .collect()
    }

    #[test]
    fn finds_equal_and_similar_blocks_but_not_zero() {
        let mut data = Vec::new();
        data.extend(pattern(1));
        data.extend(vec![0u8; BLOCK_SIZE]);
        data.extend(pattern(2));
        let img = MemImage { data };
        let idx = SourceIndex::build(&img, &|_| {}).unwrap();
        assert_eq!(idx.block_count(), 3);
        let c: Vec<u32> = idx.exact_candidates(block_hash(&pattern(2)), 8).collect();
        assert!(c.contains(&2));
        let z: Vec<u32> = idx
            .exact_candidates(block_hash(&vec![0u8; BLOCK_SIZE]), 8)
            .collect();
        assert!(!z.contains(&1));
        let mut edited = pattern(2);
        edited[10] ^= 1;
        edited[3000] ^= 1;
        assert!(idx.similar_candidates(&edited, 4).contains(&2));
        assert!(idx.memory_bytes() <= 3 * (28 + 128) + 8 + super::super::anchors::DIRECTORY_BYTES);
        // The filter passes the indexed windows and stops most others.
        let w1 = window_hashes(&pattern(1));
        assert!(w1.iter().flatten().any(|h| idx.may_have_window(*h)));
        let other = window_hashes(&pattern(99));
        assert!(
            other
                .iter()
                .flatten()
                .filter(|h| idx.may_have_window(**h))
                .count()
                < 4
        );
    }
}
