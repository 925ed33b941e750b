//! Deterministic hashes of blocks and of small windows inside blocks.
//!
//! No per-process random seed is used anywhere, so a plan (and therefore the COW file)
//! never depends on the run. Hashes only select candidates; every COPY is confirmed by a
//! full byte comparison before it is emitted.

use super::BLOCK_SIZE;

const P1: u64 = 0x9E37_79B9_7F4A_7C15;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// Final avalanche step (the well-known 64-bit finaliser constants of MurmurHash3).
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(bytes);
    u64::from_le_bytes(w)
}

/// Hash of a byte slice whose length is a multiple of 8 (a block or a window).
pub fn hash_words(data: &[u8], seed: u64) -> u64 {
    let mut lanes = [seed ^ P1, seed ^ P2, seed.rotate_left(17) ^ P1, seed ^ 1];
    for chunk in data.chunks_exact(32) {
        for (lane, w) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            *lane = (*lane ^ word(w)).wrapping_mul(P1).rotate_left(29);
        }
    }
    let rest = data.chunks_exact(32).remainder();
    for w in rest.chunks_exact(8) {
        lanes[0] = (lanes[0] ^ word(w)).wrapping_mul(P2).rotate_left(31);
    }
    let h = lanes[0]
        .wrapping_add(lanes[1].rotate_left(7))
        .wrapping_add(lanes[2].rotate_left(19))
        .wrapping_add(lanes[3].rotate_left(41))
        ^ data.len() as u64;
    mix(h)
}

/// Hash of one whole block.
pub fn block_hash(block: &[u8]) -> u64 {
    hash_words(block, 0)
}

/// True when every byte of the block is zero.
pub fn is_zero(block: &[u8]) -> bool {
    block.chunks_exact(8).all(|w| word(w) == 0)
        && block.chunks_exact(8).remainder().iter().all(|b| *b == 0)
}

/// Number of sampled windows per block.
pub const WINDOWS: usize = 8;
/// Bytes per sampled window.
pub const WINDOW_LEN: usize = 64;
const WINDOW_STRIDE: usize = BLOCK_SIZE / WINDOWS;

/// Hash of one window, or `None` for a window made of one repeated 8-byte word (zero
/// fill, 0xFF fill), which carries no information. The hash does not depend on where the
/// window lies, so a window can be found again at any byte offset.
pub fn window_hash(win: &[u8]) -> Option<u64> {
    let first = word(win.get(..8)?);
    if win.chunks_exact(8).all(|w| word(w) == first) {
        return None;
    }
    Some(hash_words(win, 0x5EED))
}

/// Byte offset of sampled window `i` inside a block.
pub fn window_offset(i: usize) -> usize {
    i * WINDOW_STRIDE
}

/// Hashes of the sampled windows of a block (window `i` at byte `i * 512`).
pub fn window_hashes(block: &[u8]) -> [Option<u64>; WINDOWS] {
    let mut out = [None; WINDOWS];
    for (i, slot) in out.iter_mut().enumerate() {
        let start = window_offset(i);
        if let Some(win) = block.get(start..start + WINDOW_LEN) {
            *slot = window_hash(win);
        }
    }
    out
}

/// Number of equal bytes at equal positions in two slices of the same length.
pub fn equal_bytes(a: &[u8], b: &[u8]) -> usize {
    a.chunks_exact(8)
        .zip(b.chunks_exact(8))
        .map(|(x, y)| zero_bytes(word(x) ^ word(y)))
        .sum::<usize>()
        + a.chunks_exact(8)
            .remainder()
            .iter()
            .zip(b.chunks_exact(8).remainder())
            .filter(|(x, y)| x == y)
            .count()
}

/// Number of zero bytes in `d` (no per-byte branches: the high bit of each byte of `t`
/// is set exactly when that byte of `d` is non-zero).
fn zero_bytes(d: u64) -> usize {
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let t = ((d & LOW7).wrapping_add(LOW7) | d) & !LOW7;
    8 - t.count_ones() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_content_sensitive() {
        let mut a = vec![0u8; BLOCK_SIZE];
        a[100] = 1;
        let mut b = a.clone();
        assert_eq!(block_hash(&a), block_hash(&b));
        b[4095] = 1;
        assert_ne!(block_hash(&a), block_hash(&b));
        assert!(!is_zero(&a));
        assert!(is_zero(&vec![0u8; BLOCK_SIZE]));
    }

    #[test]
    fn windows_skip_fill_and_follow_content() {
        let zero = vec![0u8; BLOCK_SIZE];
        assert!(window_hashes(&zero).iter().all(Option::is_none));
        let block: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let w = window_hashes(&block);
        assert!(w.iter().all(Option::is_some));
        let mut edited = block.clone();
        edited[520] ^= 0xFF; // inside window 1 (512..576)
        let e = window_hashes(&edited);
        assert_ne!(w[1], e[1]);
        assert_eq!(w[0], e[0]);
        assert_eq!(equal_bytes(&block, &edited), BLOCK_SIZE - 1);
        for d in [
            0u64,
            1,
            0x80,
            0xFF00,
            0x0100_0000_0000_0080,
            u64::MAX,
            0x8000_0000_0000_0000,
        ] {
            let slow = (0..8).filter(|k| (d >> (k * 8)) & 0xFF == 0).count();
            assert_eq!(zero_bytes(d), slow, "{d:#x}");
        }
        assert_eq!(equal_bytes(&[1, 2, 3], &[1, 0, 3]), 2);
        // The same bytes at another offset hash the same; other bytes do not.
        let mut other = vec![0u8; BLOCK_SIZE];
        other[5..5 + WINDOW_LEN].copy_from_slice(&block[512..512 + WINDOW_LEN]);
        assert_eq!(window_hash(&other[5..5 + WINDOW_LEN]), w[1]);
        assert_ne!(window_hash(&other[6..6 + WINDOW_LEN]), w[1]);
    }
}
