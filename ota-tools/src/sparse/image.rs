//! A parsed sparse image read by byte offset.

use std::fs::File;
use std::io;
use std::iter::Peekable;
use std::slice::Iter;

use cow_format::reader::SourceImage;

use super::index::{self, CrcCheck, ExtentData, SparseIndex};
use super::SparseError;

/// Bytes read at a time while checking CRC32 chunks.
const CRC_READ_LEN: usize = 1 << 20;

/// Number of chunks of each type in a sparse image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkCounts {
    /// RAW chunks with at least one block.
    pub raw: usize,
    /// FILL chunks with at least one block.
    pub fill: usize,
    /// DONT_CARE chunks with at least one block.
    pub dont_care: usize,
    /// CRC32 chunks (all checked when the image was opened).
    pub crc32: usize,
}

/// An Android sparse image over storage `S` (a [`File`] by default), readable at any
/// byte offset of its expanded contents. [`super::ImageSource::open`] opens one by path.
#[derive(Debug)]
pub struct SparseImage<S = File> {
    storage: S,
    index: SparseIndex,
}

impl<S: SourceImage> SparseImage<S> {
    /// Parses the `len`-byte sparse image held by `storage`, checks every chunk header and
    /// every CRC32 chunk.
    pub fn new(storage: S, len: u64) -> Result<Self, SparseError> {
        let index = index::parse(&storage, len)?;
        if index.end_offset < len {
            log::warn!(
                "sparse image: {} bytes after the last chunk (at byte {}) are ignored",
                len - index.end_offset,
                index.end_offset
            );
        }
        let image = Self { storage, index };
        image.check_crcs()?;
        Ok(image)
    }

    /// Block size of the sparse image.
    pub fn block_size(&self) -> u32 {
        self.index.block_size
    }

    /// Length of the expanded image in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.index.total_blocks) * u64::from(self.index.block_size)
    }

    /// True when the expanded image has no blocks.
    pub fn is_empty(&self) -> bool {
        self.index.total_blocks == 0
    }

    /// Number of chunks that carry blocks (RAW, FILL and DONT_CARE).
    pub fn extent_count(&self) -> usize {
        self.index.extents.len()
    }

    /// How many chunks of each type carry blocks, and how many CRC32 chunks were checked.
    pub fn chunk_counts(&self) -> ChunkCounts {
        let mut counts = ChunkCounts {
            crc32: self.index.crc_checks.len(),
            ..ChunkCounts::default()
        };
        for extent in &self.index.extents {
            match extent.data {
                ExtentData::Raw { .. } => counts.raw += 1,
                ExtentData::Fill(_) => counts.fill += 1,
                ExtentData::DontCare => counts.dont_care += 1,
            }
        }
        counts
    }

    /// Fills `buf` with the expanded bytes at `offset`. Fails with `UnexpectedEof` when
    /// the range reaches past the end of the image.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.len())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at byte {offset} passes the sparse image's end ({} bytes)",
                        buf.len(),
                        self.len()
                    ),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.index.block_size);
        let extents = &self.index.extents;
        // The extent holding `offset`: the last one starting at or before its block.
        let block = offset / bs;
        let mut i = extents
            .partition_point(|e| e.first_block <= block)
            .saturating_sub(1);
        let mut pos = offset;
        let mut filled = 0usize;
        while pos < end {
            let extent = extents
                .get(i)
                .ok_or_else(|| io::Error::other("sparse index does not cover the image"))?;
            let start = extent.first_block * bs;
            let stop = (extent.first_block + extent.blocks) * bs;
            let take = (stop.min(end) - pos) as usize;
            let out = &mut buf[filled..filled + take];
            let within = pos - start;
            match extent.data {
                ExtentData::Raw { file_offset } => {
                    self.storage.read_exact_at(out, file_offset + within)?
                }
                ExtentData::Fill(pattern) => {
                    // The run starts at a block boundary, a multiple of 4 bytes.
                    let phase = (within % 4) as usize;
                    let word: [u8; 4] = std::array::from_fn(|i| pattern[(phase + i) % 4]);
                    // Write one word, then double the written prefix (whole words until
                    // the last copy), so long runs cost a few memcpys.
                    let first = out.len().min(4);
                    out[..first].copy_from_slice(&word[..first]);
                    let mut done = first;
                    while done < out.len() {
                        let n = done.min(out.len() - done);
                        out.copy_within(..n, done);
                        done += n;
                    }
                }
                ExtentData::DontCare => out.fill(0),
            }
            pos += take as u64;
            filled += take;
            i += 1;
        }
        Ok(())
    }

    /// Checks every CRC32 chunk against the expanded data before it. FILL and DONT_CARE
    /// runs are folded in without materialising them, so huge declared runs cost
    /// O(log length), not their size.
    fn check_crcs(&self) -> Result<(), SparseError> {
        let Some(last) = self.index.crc_checks.last() else {
            return Ok(());
        };
        let bs = u64::from(self.index.block_size);
        let mut checks = self.index.crc_checks.iter().peekable();
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::new();
        verify_crcs_up_to(&hasher, 0, &mut checks)?;
        for extent in &self.index.extents {
            if extent.first_block >= last.at_block {
                break;
            }
            let len = extent.blocks * bs;
            match extent.data {
                ExtentData::Raw { file_offset } => {
                    let mut done = 0u64;
                    while done < len {
                        let n = (len - done).min(CRC_READ_LEN as u64) as usize;
                        buf.resize(n, 0);
                        self.storage
                            .read_exact_at(&mut buf, file_offset + done)
                            .map_err(|source| SparseError::Io {
                                what: "RAW chunk data (checking CRC32)",
                                offset: file_offset + done,
                                source,
                            })?;
                        hasher.update(&buf);
                        done += n as u64;
                    }
                }
                ExtentData::Fill(pattern) => hasher.combine(&repeated_crc(pattern, len / 4)),
                ExtentData::DontCare => hasher.combine(&repeated_crc([0; 4], len / 4)),
            }
            verify_crcs_up_to(&hasher, extent.first_block + extent.blocks, &mut checks)?;
        }
        Ok(())
    }
}

/// Checks the pending CRC32 chunks placed at or before `at_block` against `hasher`, the
/// CRC of the first `at_block` blocks.
fn verify_crcs_up_to(
    hasher: &crc32fast::Hasher,
    at_block: u64,
    checks: &mut Peekable<Iter<'_, CrcCheck>>,
) -> Result<(), SparseError> {
    while let Some(c) = checks.next_if(|c| c.at_block <= at_block) {
        let computed = hasher.clone().finalize();
        if computed != c.stored {
            return Err(SparseError::Crc {
                index: c.index,
                offset: c.offset,
                stored: c.stored,
                computed,
            });
        }
    }
    Ok(())
}

/// CRC-32 state of `pattern` repeated `count` times, by doubling: O(log count).
fn repeated_crc(pattern: [u8; 4], mut count: u64) -> crc32fast::Hasher {
    let mut result = crc32fast::Hasher::new();
    let mut power = crc32fast::Hasher::new();
    power.update(&pattern);
    while count > 0 {
        if count & 1 == 1 {
            result.combine(&power);
        }
        count >>= 1;
        if count > 0 {
            let copy = power.clone();
            power.combine(&copy);
        }
    }
    result
}

impl<S: SourceImage> SourceImage for SparseImage<S> {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        SparseImage::read_exact_at(self, buf, byte_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_crc_matches_direct() {
        for count in [0u64, 1, 2, 3, 7, 1000, 4097] {
            let pattern = [1u8, 2, 0xfe, 0x80];
            let data: Vec<u8> = pattern
                .iter()
                .copied()
                .cycle()
                .take(count as usize * 4)
                .collect();
            assert_eq!(
                repeated_crc(pattern, count).finalize(),
                crc32fast::hash(&data),
                "count {count}"
            );
        }
    }
}
