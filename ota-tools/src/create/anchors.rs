//! Content-defined anchors: where moved content can be found again at any byte offset.
//!
//! A rolling "gear" hash runs over every byte (`h = (h << 2) + GEAR[byte]`, so `h` depends
//! on the last [`ANCHOR_WINDOW`] bytes only). A position is an **anchor** when the top
//! [`ANCHOR_BITS`] bits of `h` are zero: which positions are anchors depends on the content
//! alone, not on where the content lies, so the same bytes shifted by any number of bytes
//! (inserted code, relocated functions, a file moved inside the image) give the same
//! anchors with the same keys. A rolling hash over every byte of every source block costs
//! a few operations per byte.
//!
//! The source index keeps at most [`MAX_ANCHORS_PER_BLOCK`] anchors per source block, one
//! `u64` each (a 24-bit key and the 40-bit byte position of the window), sorted, so the
//! memory is bounded by 16 × 8 = 128 bytes per source block (32 MiB per GiB), about half
//! that on real data. A target block's anchors are looked up to propose XOR bases
//! (source byte offsets); keys shared by more than [`MAX_KEY_OWNERS`] source positions
//! (padding, tables of repeated records) are ignored. Windows made of one repeated byte are
//! never anchors.

use super::BLOCK_SIZE;

/// Bytes that determine the rolling hash at a position.
pub const ANCHOR_WINDOW: usize = 32;
/// Top bits of the rolling hash that must be zero at an anchor (mean spacing 2^bits).
pub const ANCHOR_BITS: u32 = 8;
/// Anchors kept per block (the first ones; bounds memory on any content).
pub const MAX_ANCHORS_PER_BLOCK: usize = 16;
/// Source positions a key may have and still be used.
pub const MAX_KEY_OWNERS: usize = 4;
/// Source byte positions representable in an index entry (1 TiB); anchors beyond are not
/// indexed.
pub const MAX_POSITION: u64 = (1 << 40) - 1;

const fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Per-byte constants of the gear hash (fixed: the anchors never depend on the run).
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = splitmix(i as u64 ^ 0xA5A5_0F0F_3C3C_5A5A);
        i += 1;
    }
    t
};

/// Key of an anchor's window: 24 well-mixed bits of the rolling hash.
fn key_of(h: u64) -> u64 {
    splitmix(h) >> 40
}

/// Calls `f(window_start, key)` for the anchors of `data` (at most `limit`), in ascending
/// position. A window lies wholly inside `data`.
pub fn for_each_anchor(data: &[u8], limit: usize, mut f: impl FnMut(usize, u64)) {
    let mut found = 0usize;
    let mut h = 0u64;
    // Warm up on the first window, then test every position: the hot loop is one shift,
    // one add, one table load and one compare per byte.
    for &b in data.iter().take(ANCHOR_WINDOW - 1) {
        h = (h << 2).wrapping_add(GEAR[b as usize]);
    }
    for (i, &b) in data.iter().enumerate().skip(ANCHOR_WINDOW - 1) {
        h = (h << 2).wrapping_add(GEAR[b as usize]);
        if h >> (64 - ANCHOR_BITS) != 0 {
            continue;
        }
        let start = i + 1 - ANCHOR_WINDOW;
        let win = &data[start..=i];
        if win.iter().all(|&x| x == b) {
            continue; // fill (zeros, 0xFF, padding) carries no information
        }
        f(start, key_of(h));
        found += 1;
        if found >= limit {
            return;
        }
    }
}

/// Streams hashed together by [`for_each_anchor_of_blocks`].
pub const INTERLEAVE: usize = 4;

/// Like [`for_each_anchor`] over [`INTERLEAVE`] equally long slices at once (the same
/// anchors, in ascending position per slice; `f(slice, window_start, key)`). The rolling
/// hash is a chain of dependent operations per byte; running independent chains side by
/// side lets the processor overlap them.
pub fn for_each_anchor_of_blocks(
    data: [&[u8]; INTERLEAVE],
    limit: usize,
    mut f: impl FnMut(usize, usize, u64),
) {
    let len = data[0].len();
    if data.iter().any(|d| d.len() != len) {
        for (j, d) in data.iter().enumerate() {
            for_each_anchor(d, limit, |p, k| f(j, p, k));
        }
        return;
    }
    let [d0, d1, d2, d3] = data;
    let (d0, d1, d2, d3) = (&d0[..len], &d1[..len], &d2[..len], &d3[..len]);
    let mut h = [0u64; INTERLEAVE];
    let mut found = [0usize; INTERLEAVE];
    let shift = 64 - ANCHOR_BITS;
    for i in 0..len {
        h[0] = (h[0] << 2).wrapping_add(GEAR[d0[i] as usize]);
        h[1] = (h[1] << 2).wrapping_add(GEAR[d1[i] as usize]);
        h[2] = (h[2] << 2).wrapping_add(GEAR[d2[i] as usize]);
        h[3] = (h[3] << 2).wrapping_add(GEAR[d3[i] as usize]);
        // Non-short-circuiting: one branch per position for the four streams.
        let any = (h[0] >> shift == 0)
            | (h[1] >> shift == 0)
            | (h[2] >> shift == 0)
            | (h[3] >> shift == 0);
        if !any || i + 1 < ANCHOR_WINDOW {
            continue;
        }
        let start = i + 1 - ANCHOR_WINDOW;
        for (j, d) in [d0, d1, d2, d3].into_iter().enumerate() {
            if h[j] >> shift != 0 || found[j] >= limit {
                continue;
            }
            let win = &d[start..=i];
            if win.iter().all(|&x| x == d[i]) {
                continue;
            }
            f(j, start, key_of(h[j]));
            found[j] += 1;
        }
    }
}

/// Bits of the key that select a bucket of the directory.
const DIRECTORY_BITS: u32 = 16;
/// Fixed size of the directory in bytes (256 KiB).
pub const DIRECTORY_BYTES: usize = ((1 << DIRECTORY_BITS) + 1) * std::mem::size_of::<u32>();

/// The anchor index of a source image: sorted `u64` entries, `key << 40 | position`, and
/// a directory of where each bucket of keys (top `DIRECTORY_BITS` bits) starts, so a
/// lookup scans a few entries instead of binary-searching millions (256 KiB).
#[derive(Debug, Default)]
pub struct AnchorIndex {
    entries: Vec<u64>,
    directory: Vec<u32>,
}

impl AnchorIndex {
    /// Appends the anchors of source block `block` (its bytes in `data`) to `out`.
    pub fn block_entries(block: u64, data: &[u8], out: &mut Vec<u64>) {
        let base = block.saturating_mul(BLOCK_SIZE as u64);
        for_each_anchor(data, MAX_ANCHORS_PER_BLOCK, |pos, key| {
            let p = base.saturating_add(pos as u64);
            if p <= MAX_POSITION {
                out.push((key << 40) | p);
            }
        });
    }

    /// Appends the anchors of [`INTERLEAVE`] source blocks from `block` (their bytes in
    /// `data`, `INTERLEAVE * BLOCK_SIZE` bytes) to `out`, one list per block: the same as
    /// [`AnchorIndex::block_entries`] on each, faster.
    pub fn blocks_entries(block: u64, data: &[u8], out: &mut [Vec<u64>; INTERLEAVE]) {
        let mut parts: [&[u8]; INTERLEAVE] = [&[]; INTERLEAVE];
        for (j, part) in parts.iter_mut().enumerate() {
            *part = data
                .get(j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE)
                .unwrap_or(&[]);
        }
        for_each_anchor_of_blocks(parts, MAX_ANCHORS_PER_BLOCK, |j, pos, key| {
            let p = block
                .saturating_add(j as u64)
                .saturating_mul(BLOCK_SIZE as u64)
                .saturating_add(pos as u64);
            if p <= MAX_POSITION {
                out[j].push((key << 40) | p);
            }
        });
    }

    /// Builds the index from entries made by [`AnchorIndex::block_entries`] (any order).
    pub fn from_entries(mut entries: Vec<u64>) -> Self {
        use rayon::slice::ParallelSliceMut;
        entries.par_sort_unstable();
        entries.shrink_to_fit();
        // Entries are fewer than 2^32 (at most 16 per block of an image of < 2^32 blocks
        // would not fit, so saturate: a saturated directory only makes lookups miss).
        let buckets = 1usize << DIRECTORY_BITS;
        let mut directory = vec![0u32; buckets + 1];
        for e in &entries {
            let b = (e >> (64 - DIRECTORY_BITS)) as usize;
            directory[b + 1] = directory[b + 1].saturating_add(1);
        }
        for b in 0..buckets {
            directory[b + 1] = directory[b + 1].saturating_add(directory[b]);
        }
        Self { entries, directory }
    }

    /// Bytes of memory held.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<u64>()
            + self.directory.capacity() * std::mem::size_of::<u32>()
    }

    /// Number of anchors indexed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no anchor is indexed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Source byte positions of the windows with anchor key `key`, unless more than
    /// [`MAX_KEY_OWNERS`] share it (then none: a common window says little).
    pub fn positions(&self, key: u64) -> impl Iterator<Item = u64> + '_ {
        let b = (key >> (24 - DIRECTORY_BITS)) as usize;
        let lo = self.directory.get(b).map_or(0, |&x| x as usize);
        let hi = self.directory.get(b + 1).map_or(0, |&x| x as usize);
        let bucket = self.entries.get(lo..hi).unwrap_or(&[]);
        let first = bucket.partition_point(|e| (e >> 40) < key);
        let run = &bucket[first..];
        let n = run
            .iter()
            .take(MAX_KEY_OWNERS + 1)
            .take_while(|e| (*e >> 40) == key)
            .count();
        let take = if n > MAX_KEY_OWNERS { 0 } else { n };
        run[..take].iter().map(|e| e & MAX_POSITION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (splitmix(i ^ seed) >> 56) as u8)
            .collect()
    }

    #[test]
    fn anchors_follow_content_not_position() {
        let data = noise(8192, 1);
        let mut a = Vec::new();
        for_each_anchor(&data, usize::MAX, |p, k| a.push((p, k)));
        // About one anchor per 256 bytes.
        assert!((16..=64).contains(&a.len()), "{} anchors", a.len());
        // Shift the content by 37 bytes: the same windows are anchors, 37 bytes later.
        let mut shifted = noise(37, 2);
        shifted.extend_from_slice(&data);
        let mut b = Vec::new();
        for_each_anchor(&shifted, usize::MAX, |p, k| b.push((p, k)));
        let moved: Vec<(usize, u64)> = a.iter().map(|&(p, k)| (p + 37, k)).collect();
        for m in &moved {
            assert!(b.contains(m), "anchor {m:?} lost after the shift");
        }
    }

    #[test]
    fn interleaved_hashing_gives_the_same_anchors() {
        let mut data = noise(4 * BLOCK_SIZE, 9);
        data[BLOCK_SIZE..2 * BLOCK_SIZE].fill(0); // a zero block among them
        let mut one = Vec::new();
        for (j, chunk) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            AnchorIndex::block_entries(j as u64 + 10, chunk, &mut one);
        }
        let mut four: [Vec<u64>; INTERLEAVE] = Default::default();
        AnchorIndex::blocks_entries(10, &data, &mut four);
        assert!(four[1].is_empty());
        assert_eq!(four.concat(), one);
        assert!(one.len() > 20);
    }

    #[test]
    fn fill_is_never_an_anchor_and_count_is_capped() {
        let mut n = 0;
        for fill in [0u8, 0xFF, 0x20] {
            for_each_anchor(&vec![fill; 4096], usize::MAX, |_, _| n += 1);
        }
        assert_eq!(n, 0);
        let mut capped = 0;
        for_each_anchor(&noise(1 << 16, 3), 5, |_, _| capped += 1);
        assert_eq!(capped, 5);
    }

    #[test]
    fn index_finds_positions_and_ignores_common_keys() {
        let data = noise(4 * BLOCK_SIZE, 4);
        let mut entries = Vec::new();
        for (b, chunk) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            AnchorIndex::block_entries(b as u64, chunk, &mut entries);
        }
        let idx = AnchorIndex::from_entries(entries);
        assert!(!idx.is_empty());
        let mut block2 = Vec::new();
        for_each_anchor(&data[2 * BLOCK_SIZE..3 * BLOCK_SIZE], 16, |p, k| {
            block2.push((p, k))
        });
        let (p, k) = block2[0];
        let pos: Vec<u64> = idx.positions(k).collect();
        assert!(pos.contains(&(2 * BLOCK_SIZE as u64 + p as u64)));
        // A key held by more than MAX_KEY_OWNERS positions yields nothing.
        let common = AnchorIndex::from_entries(
            (0..=MAX_KEY_OWNERS as u64)
                .map(|i| (7u64 << 40) | (i * 100))
                .collect(),
        );
        assert_eq!(common.positions(7).count(), 0);
    }
}
