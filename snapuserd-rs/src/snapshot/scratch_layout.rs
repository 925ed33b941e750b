//! Byte layout of a read-ahead window in the COW scratch region (cow-format.md §5.3), for
//! the `MergeStateStore` implementation on the real COW file.
//!
//! With `H` = header size and `B` = buffer size (2 MiB by default):
//! * byte `H`: the state byte (0 NotStarted, 1 InProgress, 2 Done);
//! * from `H + 1`: `ScratchMetadata { new_block u64, file_offset u64 }` entries (little-endian),
//!   ended by an all-zero entry;
//! * from `H + 8192` to `H + B`: the data, one 4 KiB block per entry, at `file_offset`.
//!
//! This module only encodes and decodes; reading, writing and syncing are the store's job.

use thiserror::Error;

use super::merge_plan::BLOCK_SIZE_U64;
use super::merge_tracker::ScratchState;

/// Bytes reserved for the metadata list (from `H + 1`; the data starts at `H + 8192`).
pub const SCRATCH_METADATA_BYTES: u64 = 8192;
/// Size of one `ScratchMetadata` entry.
pub const SCRATCH_ENTRY_SIZE: usize = 16;

/// Errors of the scratch layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScratchLayoutError {
    /// The buffer size cannot hold even one block after the metadata area, or offsets overflow.
    #[error("scratch buffer of {buffer_size} bytes after a {header_size}-byte header is unusable")]
    BadGeometry {
        /// Header size.
        header_size: u64,
        /// Buffer size.
        buffer_size: u64,
    },
    /// More entries than the data area (or the metadata area) can hold.
    #[error("window of {entries} blocks exceeds the scratch capacity of {capacity}")]
    TooManyEntries {
        /// Entries given or found.
        entries: usize,
        /// Capacity in blocks.
        capacity: usize,
    },
    /// An unknown state byte.
    #[error("scratch state byte {0} is not 0, 1 or 2")]
    BadState(u8),
    /// A metadata entry points outside the data area or at a misaligned offset.
    #[error("scratch entry {index} (block {new_block}) has data offset {file_offset} outside the data area")]
    BadOffset {
        /// Entry index.
        index: usize,
        /// Its block.
        new_block: u64,
        /// Its offset.
        file_offset: u64,
    },
    /// The metadata bytes given are not the size of the metadata area.
    #[error("metadata area slice of {len} bytes, expected {expected}")]
    BadMetadataLength {
        /// Bytes given.
        len: usize,
        /// Bytes expected.
        expected: usize,
    },
}

/// Where a COW's scratch region lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchGeometry {
    header_size: u64,
    buffer_size: u64,
}

impl ScratchGeometry {
    /// Geometry for a header of `header_size` bytes followed by `buffer_size` scratch bytes.
    pub fn new(header_size: u64, buffer_size: u64) -> Result<Self, ScratchLayoutError> {
        let bad = || ScratchLayoutError::BadGeometry {
            header_size,
            buffer_size,
        };
        header_size.checked_add(buffer_size).ok_or_else(bad)?;
        if buffer_size < SCRATCH_METADATA_BYTES + BLOCK_SIZE_U64 {
            return Err(bad());
        }
        Ok(ScratchGeometry {
            header_size,
            buffer_size,
        })
    }

    /// File offset of the state byte.
    pub fn state_offset(&self) -> u64 {
        self.header_size
    }

    /// File offset of the first metadata entry.
    pub fn metadata_offset(&self) -> u64 {
        self.header_size + 1
    }

    /// Bytes of the metadata list area (from [`Self::metadata_offset`]), entries plus
    /// terminator for a full window.
    pub fn metadata_len(&self) -> usize {
        (self.capacity_blocks() + 1) * SCRATCH_ENTRY_SIZE
    }

    /// File offset of the data area.
    pub fn data_offset(&self) -> u64 {
        self.header_size + SCRATCH_METADATA_BYTES
    }

    /// Blocks a window can hold: limited by the data area and by the metadata area
    /// (which must also hold the terminator).
    pub fn capacity_blocks(&self) -> usize {
        let data = (self.buffer_size - SCRATCH_METADATA_BYTES) / BLOCK_SIZE_U64;
        let meta = (SCRATCH_METADATA_BYTES - 1) / SCRATCH_ENTRY_SIZE as u64 - 1;
        usize::try_from(data.min(meta)).unwrap_or(0)
    }

    /// File offset of the data of window slot `slot`.
    pub fn slot_offset(&self, slot: usize) -> u64 {
        self.data_offset() + slot as u64 * BLOCK_SIZE_U64
    }

    /// Encode the metadata list for a window of `new_blocks` (data in consecutive slots),
    /// terminator and zero padding included: [`Self::metadata_len`] bytes to write at
    /// [`Self::metadata_offset`].
    pub fn encode_metadata(&self, new_blocks: &[u64]) -> Result<Vec<u8>, ScratchLayoutError> {
        let capacity = self.capacity_blocks();
        if new_blocks.len() > capacity {
            return Err(ScratchLayoutError::TooManyEntries {
                entries: new_blocks.len(),
                capacity,
            });
        }
        let mut out = vec![0u8; self.metadata_len()];
        for (slot, (&block, entry)) in new_blocks
            .iter()
            .zip(out.chunks_exact_mut(SCRATCH_ENTRY_SIZE))
            .enumerate()
        {
            entry[0..8].copy_from_slice(&block.to_le_bytes());
            entry[8..16].copy_from_slice(&self.slot_offset(slot).to_le_bytes());
        }
        Ok(out)
    }

    /// Decode a metadata list read from [`Self::metadata_offset`] ([`Self::metadata_len`]
    /// bytes): the window's blocks and the data offset of each.
    pub fn decode_metadata(&self, bytes: &[u8]) -> Result<Vec<(u64, u64)>, ScratchLayoutError> {
        if bytes.len() != self.metadata_len() {
            return Err(ScratchLayoutError::BadMetadataLength {
                len: bytes.len(),
                expected: self.metadata_len(),
            });
        }
        let capacity = self.capacity_blocks();
        let last_slot = self.slot_offset(capacity.saturating_sub(1));
        let mut entries = Vec::new();
        // metadata_len() holds capacity + 1 entries, so the loop always ends in a return.
        for (index, entry) in bytes.chunks_exact(SCRATCH_ENTRY_SIZE).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&entry[0..8]);
            let new_block = u64::from_le_bytes(b);
            b.copy_from_slice(&entry[8..16]);
            let file_offset = u64::from_le_bytes(b);
            if new_block == 0 && file_offset == 0 {
                return Ok(entries);
            }
            if index >= capacity {
                return Err(ScratchLayoutError::TooManyEntries {
                    entries: index + 1,
                    capacity,
                });
            }
            let aligned = file_offset
                .checked_sub(self.data_offset())
                .is_some_and(|rel| rel % BLOCK_SIZE_U64 == 0);
            if !aligned || file_offset > last_slot {
                return Err(ScratchLayoutError::BadOffset {
                    index,
                    new_block,
                    file_offset,
                });
            }
            entries.push((new_block, file_offset));
        }
        Err(ScratchLayoutError::TooManyEntries {
            entries: bytes.len() / SCRATCH_ENTRY_SIZE,
            capacity,
        })
    }
}

/// Decode the state byte.
pub fn decode_state(byte: u8) -> Result<ScratchState, ScratchLayoutError> {
    match byte {
        0 => Ok(ScratchState::NotStarted),
        1 => Ok(ScratchState::InProgress),
        2 => Ok(ScratchState::Done),
        other => Err(ScratchLayoutError::BadState(other)),
    }
}

/// Encode the state byte.
pub fn encode_state(state: ScratchState) -> u8 {
    match state {
        ScratchState::NotStarted => 0,
        ScratchState::InProgress => 1,
        ScratchState::Done => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_cow_format() {
        // v2 header: 38 bytes, 2 MiB scratch.
        let g = ScratchGeometry::new(38, 2 << 20).unwrap();
        assert_eq!(g.capacity_blocks(), 510);
        assert_eq!(g.state_offset(), 38);
        assert_eq!(g.metadata_offset(), 39);
        assert_eq!(g.data_offset(), 38 + 8192);
        // 511 entries (510 + terminator) = 8176 bytes: ends before the data area.
        assert_eq!(g.metadata_len(), 8176);
        assert!(g.metadata_offset() + g.metadata_len() as u64 <= g.data_offset());
        assert_eq!(g.slot_offset(509) + 4096, 38 + (2 << 20));
        assert!(ScratchGeometry::new(38, 4096).is_err());
        assert!(ScratchGeometry::new(u64::MAX, 2 << 20).is_err());
    }

    #[test]
    fn metadata_roundtrip_and_validation() {
        let g = ScratchGeometry::new(78, 2 << 20).unwrap();
        let blocks: Vec<u64> = (0..510).map(|i| 1000 - i).collect();
        let bytes = g.encode_metadata(&blocks).unwrap();
        let decoded = g.decode_metadata(&bytes).unwrap();
        assert_eq!(decoded.len(), 510);
        for (i, &(block, off)) in decoded.iter().enumerate() {
            assert_eq!((block, off), (blocks[i], g.slot_offset(i)));
        }
        assert_eq!(
            g.decode_metadata(&g.encode_metadata(&[]).unwrap()).unwrap(),
            vec![]
        );
        // Block 0 with a real offset is an entry, not the terminator.
        let zero_block = g.encode_metadata(&[0, 5]).unwrap();
        assert_eq!(
            g.decode_metadata(&zero_block).unwrap(),
            vec![(0, g.slot_offset(0)), (5, g.slot_offset(1))]
        );
        assert!(matches!(
            g.encode_metadata(&[1; 511]),
            Err(ScratchLayoutError::TooManyEntries { .. })
        ));
        let mut bad = bytes.clone();
        bad[8..16].copy_from_slice(&(g.data_offset() + 1).to_le_bytes());
        assert!(matches!(
            g.decode_metadata(&bad),
            Err(ScratchLayoutError::BadOffset { index: 0, .. })
        ));
        let mut bad = g.encode_metadata(&[7]).unwrap();
        bad[8..16].copy_from_slice(&g.slot_offset(510).to_le_bytes());
        assert!(matches!(
            g.decode_metadata(&bad),
            Err(ScratchLayoutError::BadOffset { .. })
        ));
        let mut full = bytes;
        full[510 * 16..511 * 16].fill(0xff);
        assert!(matches!(
            g.decode_metadata(&full),
            Err(ScratchLayoutError::TooManyEntries { .. })
        ));
        assert!(matches!(
            g.decode_metadata(&[0u8; 16]),
            Err(ScratchLayoutError::BadMetadataLength { .. })
        ));
    }

    #[test]
    fn state_byte() {
        for s in [
            ScratchState::NotStarted,
            ScratchState::InProgress,
            ScratchState::Done,
        ] {
            assert_eq!(decode_state(encode_state(s)).unwrap(), s);
        }
        assert_eq!(decode_state(3), Err(ScratchLayoutError::BadState(3)));
    }
}
