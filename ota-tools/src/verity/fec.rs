//! Interleaved Reed-Solomon parity over whole blocks, as update_engine's verity writer
//! and libfec compute it.
//!
//! With `n = 255 - roots` message bytes per codeword and `B` blocks of input, the blocks
//! are split into `rounds = ceil(B / n)` rounds. Round `i` encodes `block_size` codewords;
//! codeword `k` of round `i` takes byte `k` of blocks `i, i + rounds, i + 2 * rounds, ...`
//! (`n` blocks, those past the end read as zeros). The output is round after round, each
//! `block_size * roots` bytes: the `roots` parity bytes of codeword 0, then of codeword
//! 1, and so on. Neighbouring blocks thus land in different codewords, so a whole lost
//! block costs any codeword at most one byte.

use rayon::prelude::*;

use super::reed_solomon::{ColumnEncoder, RsEncoder};
use super::{whole_blocks, VerityError, VerityInput};

/// Bytes per Reed-Solomon codeword (message plus parity).
const CODEWORD_LEN: u32 = 255;

/// Checks `roots` and returns the message length per codeword.
fn message_len(roots: u32) -> Result<u64, VerityError> {
    if roots == 0 || roots >= CODEWORD_LEN {
        return Err(VerityError::Roots { roots });
    }
    Ok(u64::from(CODEWORD_LEN - roots))
}

/// Size in bytes of the parity for `data_size` bytes (`fec_size` of a partition).
pub fn fec_size(data_size: u64, roots: u32, block_size: u32) -> Result<u64, VerityError> {
    let n = message_len(roots)?;
    let blocks = whole_blocks(data_size, block_size)?;
    blocks
        .div_ceil(n)
        .checked_mul(u64::from(roots))
        .and_then(|x| x.checked_mul(u64::from(block_size)))
        .ok_or(VerityError::TooLarge {
            what: "FEC size",
            len: data_size,
        })
}

/// FEC parity bytes for `data` (whole blocks): RS(255, 255 - roots) interleaved as
/// libfec and update_engine do. `data` is what `fec_data_extent` covers, normally the
/// filesystem data followed by its hash tree. The result is exactly what belongs in
/// `fec_extent` (no libfec header).
pub fn fec(data: &[u8], roots: u32, block_size: u32) -> Result<Vec<u8>, VerityError> {
    fec_of(data, roots, block_size)
}

/// [`fec`] over any [`VerityInput`], e.g. an [`super::ImageRegion`] of an image file:
/// each round reads its blocks with positioned reads, so only the parity is kept in
/// memory.
pub fn fec_of<I: VerityInput + ?Sized>(
    input: &I,
    roots: u32,
    block_size: u32,
) -> Result<Vec<u8>, VerityError> {
    let size = fec_size(input.len(), roots, block_size)?;
    let size = usize::try_from(size).map_err(|_| VerityError::TooLarge {
        what: "FEC size",
        len: input.len(),
    })?;
    let n = u64::from(CODEWORD_LEN - roots);
    let encoder = RsEncoder::new(roots as usize);
    let roots = roots as usize;
    let block_size = block_size as usize;
    let bs = block_size as u64;
    let blocks = input.len() / bs;
    let rounds = blocks.div_ceil(n);
    let zeros = vec![0u8; block_size];
    let mut out = vec![0u8; size];
    out.par_chunks_exact_mut(roots * block_size)
        .enumerate()
        .try_for_each_init(
            || vec![0u8; block_size],
            |scratch, (round, parity)| {
                let mut columns = ColumnEncoder::new(&encoder, block_size);
                for j in 0..n {
                    // round < rounds and j < n, so block < rounds * n <= blocks + n.
                    let block = round as u64 + j * rounds;
                    if block < blocks {
                        let offset = block * bs;
                        let bytes = input
                            .bytes_at(offset, scratch)
                            .map_err(|source| VerityError::Read { offset, source })?;
                        columns.push_row(bytes);
                    } else {
                        columns.push_row(&zeros);
                    }
                }
                columns.finish(parity);
                Ok::<(), VerityError>(())
            },
        )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout written out literally: codeword by codeword, byte by byte.
    fn fec_by_codeword(data: &[u8], roots: usize, block_size: usize) -> Vec<u8> {
        let n = 255 - roots;
        let blocks = data.len() / block_size;
        let rounds = blocks.div_ceil(n);
        let enc = RsEncoder::new(roots);
        let mut out = Vec::new();
        for round in 0..rounds {
            for k in 0..block_size {
                let message: Vec<u8> = (0..n)
                    .map(|j| {
                        let b = round + j * rounds;
                        if b < blocks {
                            data[b * block_size + k]
                        } else {
                            0
                        }
                    })
                    .collect();
                out.extend(enc.encode(&message));
            }
        }
        out
    }

    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn matches_the_codeword_by_codeword_layout() {
        for (blocks, roots, bs) in [
            (1, 2, 64),
            (253, 2, 64),
            (254, 2, 64),
            (600, 2, 32),
            (37, 16, 16),
        ] {
            let data = pseudo_random(blocks * bs, blocks as u64 + 7);
            let got = fec(&data, roots as u32, bs as u32).unwrap();
            assert_eq!(
                got,
                fec_by_codeword(&data, roots, bs),
                "{blocks} blocks, {roots} roots"
            );
            assert_eq!(
                got.len() as u64,
                fec_size(data.len() as u64, roots as u32, bs as u32).unwrap()
            );
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(matches!(
            fec(&[0; 4096], 0, 4096),
            Err(VerityError::Roots { roots: 0 })
        ));
        assert!(matches!(
            fec(&[0; 4096], 255, 4096),
            Err(VerityError::Roots { .. })
        ));
        assert!(matches!(
            fec(&[0; 4095], 2, 4096),
            Err(VerityError::PartialBlock { .. })
        ));
        assert!(matches!(fec(&[], 2, 4096), Err(VerityError::Empty)));
        assert!(matches!(
            fec(&[0; 16], 2, 0),
            Err(VerityError::BlockSize { .. })
        ));
    }

    #[test]
    fn size_formula_matches_update_engine() {
        // 1 GiB at 4 KiB blocks, 2 roots: ceil(262144 / 253) = 1037 rounds.
        assert_eq!(fec_size(1 << 30, 2, 4096).unwrap(), 1037 * 2 * 4096);
    }
}
