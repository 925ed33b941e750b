//! Entry point of the `sparse_parse` fuzz target (and of its seed-corpus test).
//!
//! [`run`] parses arbitrary bytes as a sparse image. Rejection must be a [`SparseError`]
//! (never a panic); an accepted image is read three ways that must agree: whole, block by
//! block, and at odd offsets and lengths spanning chunk boundaries, each compared with a
//! straightforward chunk-by-chunk expansion written independently of the indexed reader.

use cow_format::reader::SourceImage;

use super::{SparseError, SparseImage};

/// Largest expanded image the harness reads back in full (bigger ones are only parsed
/// and sampled), so a declared multi-gigabyte image costs no memory.
const MAX_EXPANDED: u64 = 1 << 20;

/// Parses `data` as a sparse image and cross-checks every way of reading it. Returns the
/// parse error, if any, so callers can check that errors render.
pub fn run(data: &[u8]) -> Result<(), SparseError> {
    let image = SparseImage::new(data, data.len() as u64)?;
    let len = image.len();
    if len > MAX_EXPANDED {
        let mut probe = [0u8; 7];
        for offset in [0, len / 3, len.saturating_sub(7)] {
            let _ = image.read_exact_at(&mut probe, offset);
        }
        return Ok(());
    }
    let want = expand_sequentially(data).expect("an accepted image expands chunk by chunk");
    assert_eq!(want.len() as u64, len, "expanded length");
    let mut whole = vec![0u8; want.len()];
    image.read_exact_at(&mut whole, 0).expect("whole read");
    assert!(whole == want, "whole read differs from the expansion");
    let bs = image.block_size() as usize;
    // An image of no blocks may declare any block size: size the buffer by what is read.
    let mut block = vec![0u8; bs.min(want.len())];
    for (i, chunk) in want.chunks_exact(bs).enumerate() {
        image
            .read_exact_at(&mut block, (i * bs) as u64)
            .expect("block read");
        assert!(block == chunk, "block {i} differs");
    }
    let mut step = 1usize;
    let mut offset = 0usize;
    while offset < want.len() {
        let n = (step * 7 + 3).min(want.len() - offset);
        let mut buf = vec![0u8; n];
        SourceImage::read_exact_at(&image, &mut buf, offset as u64).expect("span read");
        assert!(
            buf == want[offset..offset + n],
            "read at {offset}+{n} differs"
        );
        offset += step * 5 + 1;
        step += 1;
    }
    let mut one = [0u8; 1];
    assert!(
        image.read_exact_at(&mut one, len).is_err(),
        "read past the end"
    );
    Ok(())
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Expands an already-validated sparse image chunk by chunk into a vector.
fn expand_sequentially(data: &[u8]) -> Option<Vec<u8>> {
    let file_header = usize::from(le16(data, 8)?);
    let chunk_header = usize::from(le16(data, 10)?);
    let bs = le32(data, 12)? as usize;
    let chunks = le32(data, 20)?;
    let mut out = Vec::new();
    let mut at = file_header;
    for _ in 0..chunks {
        let kind = le16(data, at)?;
        let blocks = le32(data, at + 4)? as usize;
        let total = le32(data, at + 8)? as usize;
        let payload = data.get(at + chunk_header..at + total)?;
        match kind {
            0xcac1 => out.extend_from_slice(payload),
            0xcac2 => out.extend(payload.iter().copied().cycle().take(blocks * bs)),
            0xcac3 => out.resize(out.len() + blocks * bs, 0),
            _ => {}
        }
        at += total;
    }
    Some(out)
}
