//! Parsing a sparse image's headers into an index of extents.

use std::io;

use cow_format::reader::SourceImage;

use super::{SparseError, SPARSE_MAGIC};

/// Size of the version-1 file header.
const FILE_HEADER_LEN: u16 = 28;
/// Size of the version-1 chunk header.
const CHUNK_HEADER_LEN: u16 = 12;

const CHUNK_RAW: u16 = 0xcac1;
const CHUNK_FILL: u16 = 0xcac2;
const CHUNK_DONT_CARE: u16 = 0xcac3;
const CHUNK_CRC32: u16 = 0xcac4;

/// What a run of blocks reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExtentData {
    /// Stored verbatim at this byte offset of the sparse file.
    Raw {
        /// Offset of the run's first byte in the sparse file.
        file_offset: u64,
    },
    /// A 4-byte pattern repeated from the run's first byte.
    Fill([u8; 4]),
    /// No data: zeros.
    DontCare,
}

/// A run of blocks from one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    /// First block of the run.
    pub first_block: u64,
    /// Number of blocks (never zero).
    pub blocks: u64,
    /// Its contents.
    pub data: ExtentData,
}

/// A CRC32 chunk: the checksum of blocks `[0, at_block)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CrcCheck {
    /// Chunk number.
    pub index: u32,
    /// Byte offset of the chunk header.
    pub offset: u64,
    /// Blocks before the chunk.
    pub at_block: u64,
    /// The stored checksum.
    pub stored: u32,
}

/// The parsed structure of a sparse image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SparseIndex {
    /// Block size in bytes.
    pub block_size: u32,
    /// Number of blocks of the expanded image.
    pub total_blocks: u32,
    /// Runs in block order, tiling `[0, total_blocks)` exactly.
    pub extents: Vec<Extent>,
    /// CRC32 chunks in file order.
    pub crc_checks: Vec<CrcCheck>,
    /// Offset just past the last chunk.
    pub end_offset: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads `buf.len()` bytes at `offset`, telling a short file from an I/O error.
fn read_at(
    storage: &(impl SourceImage + ?Sized),
    file_len: u64,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), SparseError> {
    let len = buf.len() as u64;
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(SparseError::Truncated {
            what,
            offset,
            len,
            file_len,
        });
    }
    storage
        .read_exact_at(buf, offset)
        .map_err(|source| match source.kind() {
            io::ErrorKind::UnexpectedEof => SparseError::Truncated {
                what,
                offset,
                len,
                file_len,
            },
            _ => SparseError::Io {
                what,
                offset,
                source,
            },
        })
}

/// Reads the magic, or `None` when the storage is shorter than four bytes.
pub(super) fn read_magic(
    storage: &(impl SourceImage + ?Sized),
    file_len: u64,
) -> Result<Option<u32>, SparseError> {
    if file_len < 4 {
        return Ok(None);
    }
    let mut magic = [0u8; 4];
    read_at(storage, file_len, &mut magic, 0, "magic")?;
    Ok(Some(u32::from_le_bytes(magic)))
}

/// Parses the file header and every chunk header of the `file_len`-byte sparse image in
/// `storage`. Memory is one entry per chunk, and a chunk takes at least 12 bytes of file.
pub(super) fn parse(
    storage: &(impl SourceImage + ?Sized),
    file_len: u64,
) -> Result<SparseIndex, SparseError> {
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    read_at(storage, file_len, &mut header, 0, "file header")?;
    let magic = le32(&header, 0);
    if magic != SPARSE_MAGIC {
        return Err(SparseError::NotSparse { magic });
    }
    let (major, minor) = (le16(&header, 4), le16(&header, 6));
    if major != 1 {
        return Err(SparseError::Version { major, minor });
    }
    let (file_header, chunk_header) = (le16(&header, 8), le16(&header, 10));
    if file_header < FILE_HEADER_LEN || chunk_header < CHUNK_HEADER_LEN {
        return Err(SparseError::HeaderSize {
            file_header,
            chunk_header,
        });
    }
    let block_size = le32(&header, 12);
    if block_size == 0 || block_size % 4 != 0 {
        return Err(SparseError::BlockSize { block_size });
    }
    let total_blocks = le32(&header, 16);
    let total_chunks = le32(&header, 20);
    // image_checksum (offset 24) is not written by libsparse and not checked by it.

    let max_chunks = file_len / u64::from(CHUNK_HEADER_LEN);
    let mut extents =
        Vec::with_capacity(u64::from(total_chunks).min(max_chunks).min(1 << 16) as usize);
    let mut crc_checks = Vec::new();
    let mut offset = u64::from(file_header);
    let mut block = 0u64;
    let bs = u64::from(block_size);
    let hdr = u64::from(chunk_header);
    for index in 0..total_chunks {
        let mut ch = [0u8; CHUNK_HEADER_LEN as usize];
        read_at(storage, file_len, &mut ch, offset, "chunk header")?;
        let chunk_type = le16(&ch, 0);
        let chunk_blocks = le32(&ch, 4);
        let total = le32(&ch, 8);
        let payload_offset = offset.checked_add(hdr).ok_or(SparseError::Truncated {
            what: "chunk header",
            offset,
            len: hdr,
            file_len,
        })?;
        let (kind, payload_len) = match chunk_type {
            CHUNK_RAW => ("RAW", u64::from(chunk_blocks) * bs),
            CHUNK_FILL | CHUNK_CRC32 => (
                if chunk_type == CHUNK_FILL {
                    "FILL"
                } else {
                    "CRC32"
                },
                4,
            ),
            CHUNK_DONT_CARE => ("DONT_CARE", 0),
            _ => {
                return Err(SparseError::ChunkType {
                    index,
                    offset,
                    chunk_type,
                })
            }
        };
        // hdr < 2^16 and payload_len <= (2^32 - 1)^2, so the sum fits in 64 bits.
        let expected = hdr + payload_len;
        if u64::from(total) != expected {
            return Err(SparseError::ChunkSize {
                kind,
                index,
                offset,
                total,
                expected,
            });
        }
        if payload_offset
            .checked_add(payload_len)
            .is_none_or(|end| end > file_len)
        {
            return Err(SparseError::Truncated {
                what: "chunk payload",
                offset: payload_offset,
                len: payload_len,
                file_len,
            });
        }
        if chunk_type == CHUNK_CRC32 {
            if chunk_blocks != 0 {
                return Err(SparseError::CrcChunkBlocks {
                    index,
                    offset,
                    blocks: chunk_blocks,
                });
            }
            let mut crc = [0u8; 4];
            read_at(storage, file_len, &mut crc, payload_offset, "CRC32 value")?;
            crc_checks.push(CrcCheck {
                index,
                offset,
                at_block: block,
                stored: u32::from_le_bytes(crc),
            });
        } else {
            let end_block = block + u64::from(chunk_blocks);
            if end_block > u64::from(total_blocks) {
                return Err(SparseError::PastEnd {
                    index,
                    offset,
                    end_block,
                    total_blocks,
                });
            }
            let data = match chunk_type {
                CHUNK_RAW => ExtentData::Raw {
                    file_offset: payload_offset,
                },
                CHUNK_FILL => {
                    let mut pattern = [0u8; 4];
                    read_at(
                        storage,
                        file_len,
                        &mut pattern,
                        payload_offset,
                        "fill value",
                    )?;
                    ExtentData::Fill(pattern)
                }
                _ => ExtentData::DontCare,
            };
            if chunk_blocks > 0 {
                extents.push(Extent {
                    first_block: block,
                    blocks: u64::from(chunk_blocks),
                    data,
                });
            }
            block = end_block;
        }
        offset = payload_offset + payload_len; // <= file_len, checked above
    }
    if block != u64::from(total_blocks) {
        return Err(SparseError::Short {
            covered: block,
            total_blocks,
        });
    }
    Ok(SparseIndex {
        block_size,
        total_blocks,
        extents,
        crc_checks,
        end_offset: offset,
    })
}
