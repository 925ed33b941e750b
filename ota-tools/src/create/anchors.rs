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
    let bits = xenv("XA_BITS", ANCHOR_BITS as usize);
    let mut h = 0u64;
    let mut found = 0usize;
    let mut run = 0usize; // length of the current run of one repeated byte
    let mut prev: Option<u8> = None;
    for (i, &b) in data.iter().enumerate() {
        h = (h << 2).wrapping_add(GEAR[b as usize]);
        run = if prev == Some(b) { run + 1 } else { 1 };
        prev = Some(b);
        if i + 1 < ANCHOR_WINDOW || h >> (64 - bits) != 0 || run >= ANCHOR_WINDOW {
            continue;
        }
        f(i + 1 - ANCHOR_WINDOW, key_of(h));
        found += 1;
        if found >= limit {
            return;
        }
    }
}

/// The anchor index of a source image: sorted `u64` entries, `key << 40 | position`.
#[derive(Debug, Default)]
pub struct AnchorIndex {
    entries: Vec<u64>,
}

impl AnchorIndex {
    /// Appends the anchors of source block `block` (its bytes in `data`) to `out`.
    pub fn block_entries(block: u64, data: &[u8], out: &mut Vec<u64>) {
        let base = block.saturating_mul(BLOCK_SIZE as u64);
        for_each_anchor(data, xenv("XA_MAX", MAX_ANCHORS_PER_BLOCK), |pos, key| {
            let p = base.saturating_add(pos as u64);
            if p <= MAX_POSITION {
                out.push(key << 40 | p);
            }
        });
    }

    /// Builds the index from entries made by [`AnchorIndex::block_entries`] (any order).
    pub fn from_entries(mut entries: Vec<u64>) -> Self {
        use rayon::slice::ParallelSliceMut;
        entries.par_sort_unstable();
        entries.shrink_to_fit();
        Self { entries }
    }

    /// Bytes of memory held.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<u64>()
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
        let lo = self.entries.partition_point(|e| (e >> 40) < key);
        let run = &self.entries[lo..];
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
                .map(|i| 7u64 << 40 | i * 100)
                .collect(),
        );
        assert_eq!(common.positions(7).count(), 0);
    }
}

/// TEMP experiment knob.
pub fn xenv(name: &str, d: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}
