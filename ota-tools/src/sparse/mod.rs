//! Android sparse images (the `img2simg` / fastboot format), read as if they were raw.
//!
//! A sparse image is a 28-byte file header (magic `0xed26ff3a`, version 1.x, block size,
//! total blocks, chunk count) followed by chunks, each a 12-byte header and its payload:
//!
//! * `RAW` (0xCAC1): `chunk_sz` blocks of data stored verbatim;
//! * `FILL` (0xCAC2): one 4-byte pattern repeated over `chunk_sz` blocks;
//! * `DONT_CARE` (0xCAC3): `chunk_sz` blocks with no data (read as zeros);
//! * `CRC32` (0xCAC4): the CRC-32 of everything expanded so far (zeros for `DONT_CARE`).
//!
//! Opening walks the chunk headers once and keeps one small index entry per chunk; reads
//! at any byte offset then binary-search that index (O(log chunks)) and fetch `RAW` bytes
//! with positioned reads. Nothing is expanded in memory or on disk. Every header field is
//! checked before use: chunks must tile the declared blocks exactly, each chunk's size
//! must match its type, payloads must lie inside the file and `CRC32` chunks must match.
//!
//! * [`SparseImage`]: one parsed sparse image over any positioned-read storage.
//! * [`ImageSource`]: what every `ota-tools` command opens: a raw image or block device,
//!   or a sparse image, told apart by the magic.
//! * [`fuzz_harness`]: the entry point of the `sparse_parse` fuzz target.

pub mod fuzz_harness;
mod image;
mod index;
mod source;

pub use image::{ChunkCounts, SparseImage};
pub use source::ImageSource;

use std::io;

/// Magic number at the start of every sparse image (little-endian on disk).
pub const SPARSE_MAGIC: u32 = 0xed26_ff3a;

/// Why a sparse image was rejected or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    /// Reading the file failed.
    #[error("I/O error reading the {what} at byte {offset}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// Byte offset in the sparse file.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file ends inside a header or a chunk payload.
    #[error("the file ends at byte {file_len}, inside the {what} at byte {offset} ({len} bytes)")]
    Truncated {
        /// What was cut off.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// How long it should be.
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The file does not start with the sparse magic.
    #[error("no sparse magic: found {magic:#010x}, expected {SPARSE_MAGIC:#010x}")]
    NotSparse {
        /// The first four bytes, little-endian.
        magic: u32,
    },
    /// The major version is not 1.
    #[error("unsupported sparse format version {major}.{minor}; only 1.x is known")]
    Version {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// A header size field is smaller than the format's header.
    #[error("file header size {file_header} / chunk header size {chunk_header} is below the format's 28 / 12 bytes")]
    HeaderSize {
        /// Declared file header size.
        file_header: u16,
        /// Declared chunk header size.
        chunk_header: u16,
    },
    /// The block size is zero or not a multiple of 4.
    #[error("block size {block_size} is not a non-zero multiple of 4")]
    BlockSize {
        /// Declared block size.
        block_size: u32,
    },
    /// A chunk has an unknown type.
    #[error("chunk {index} at byte {offset} has unknown type {chunk_type:#06x}")]
    ChunkType {
        /// Chunk number (from 0).
        index: u32,
        /// Byte offset of its header.
        offset: u64,
        /// The type field.
        chunk_type: u16,
    },
    /// A chunk's total size does not match what its type and block count need.
    #[error("{kind} chunk {index} at byte {offset} declares {total} bytes but its header and payload take {expected}")]
    ChunkSize {
        /// Chunk type name.
        kind: &'static str,
        /// Chunk number (from 0).
        index: u32,
        /// Byte offset of its header.
        offset: u64,
        /// The declared total size.
        total: u32,
        /// The size the chunk must have.
        expected: u64,
    },
    /// A chunk reaches past the declared number of blocks.
    #[error("chunk {index} at byte {offset} ends at block {end_block}, past the image's {total_blocks} blocks")]
    PastEnd {
        /// Chunk number (from 0).
        index: u32,
        /// Byte offset of its header.
        offset: u64,
        /// First block after the chunk.
        end_block: u64,
        /// Declared number of blocks.
        total_blocks: u32,
    },
    /// The chunks cover fewer blocks than declared.
    #[error("the chunks cover {covered} of the image's {total_blocks} blocks")]
    Short {
        /// Blocks the chunks cover.
        covered: u64,
        /// Declared number of blocks.
        total_blocks: u32,
    },
    /// A CRC32 chunk claims data blocks.
    #[error("CRC32 chunk {index} at byte {offset} claims {blocks} blocks; it must claim none")]
    CrcChunkBlocks {
        /// Chunk number (from 0).
        index: u32,
        /// Byte offset of its header.
        offset: u64,
        /// The block count it claims.
        blocks: u32,
    },
    /// A CRC32 chunk does not match the data before it.
    #[error("CRC32 chunk {index} at byte {offset} stores {stored:#010x} but the data before it has {computed:#010x}")]
    Crc {
        /// Chunk number (from 0).
        index: u32,
        /// Byte offset of its header.
        offset: u64,
        /// The stored checksum.
        stored: u32,
        /// The checksum of the expanded data.
        computed: u32,
    },
}
