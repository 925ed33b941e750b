//! Errors of the COW writer.

use std::io;

use thiserror::Error;

use crate::compression::CompressionError;
use crate::layout::LayoutError;

/// Everything that can go wrong while writing a COW file.
///
/// Argument errors are reported before anything is written, so the writer
/// stays usable after them. After an I/O error the writer refuses further
/// work ([`WriteError::Poisoned`]), because the file may be half-written.
#[derive(Debug, Error)]
pub enum WriteError {
    /// A [`WriterOptions`](super::WriterOptions) field has a value the format forbids.
    #[error("invalid writer option {option} = {value}: {reason}")]
    InvalidOption {
        /// Option name.
        option: &'static str,
        /// Value given (as text).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A payload length that is not a whole number of blocks.
    #[error("data for new block {new_block} is {len} bytes, not a multiple of the block size {block_size}")]
    DataLength {
        /// First target block of the call.
        new_block: u64,
        /// Length given.
        len: usize,
        /// Block size of the file.
        block_size: u32,
    },
    /// A target block at or above 2^32 (both versions store it in 32 bits).
    #[error("new block {new_block} is out of range (must be below 2^32)")]
    BlockOutOfRange {
        /// The offending block number.
        new_block: u64,
    },
    /// A COPY source block or XOR source byte offset that does not fit in 48 bits.
    #[error("source {source_value} of the op for new block {new_block} does not fit in 48 bits")]
    SourceOutOfRange {
        /// Target block of the op.
        new_block: u64,
        /// The offending source value.
        source_value: u64,
    },
    /// A file offset or size computation overflowed or left the 48-bit range.
    #[error("file offset overflow while writing {what} (at op {op_index})")]
    OffsetOverflow {
        /// What was being placed.
        what: &'static str,
        /// Index of the op record being written.
        op_index: u64,
    },
    /// A compressed v2 payload does not fit the 16-bit `data_length` field.
    #[error("payload of {len} bytes for new block {new_block} does not fit a v2 op (max 65535)")]
    PayloadTooLarge {
        /// Target block.
        new_block: u64,
        /// Stored payload length.
        len: usize,
    },
    /// Sequence data was added after ops or labels, or twice.
    #[error("sequence data must be added once, before any op or label ({reason})")]
    SequenceOrder {
        /// Why it was refused.
        reason: &'static str,
    },
    /// Sequence data is not usable with the chosen options.
    #[error("sequence data cannot be written: {reason}")]
    SequenceUnsupported {
        /// Why.
        reason: &'static str,
    },
    /// A target block that an earlier op already writes (one op per block,
    /// fact sheet §6.2); allowed with `WriterOptions::allow_duplicate_blocks`.
    #[error("new block {new_block} is already written by an earlier op")]
    DuplicateBlock {
        /// The first block written twice.
        new_block: u64,
    },
    /// At finalize: a merge-sequence entry that no op writes (AOSP's reader
    /// rejects such files).
    #[error("merge sequence names block {block}, but no op was added for it")]
    SequenceWithoutOp {
        /// The smallest such block.
        block: u64,
    },
    /// The v3 op area is full.
    #[error("v3 op area full: {op_count} ops written, {adding} more requested, op_count_max is {op_count_max}")]
    OpCapacityExceeded {
        /// Ops already written.
        op_count: u64,
        /// Ops the call needs.
        adding: u64,
        /// Capacity fixed at creation.
        op_count_max: u64,
    },
    /// A [`PreparedOp`](super::PreparedOp) built with different options than the writer's.
    #[error("prepared op for new block {new_block} was built with different writer options")]
    PreparedMismatch {
        /// First target block of the prepared op.
        new_block: u64,
    },
    /// The file to append to does not fit the options or is not well formed.
    #[error("cannot append at byte {offset}: {problem}")]
    NotAppendable {
        /// Byte offset of the problem (0 for option mismatches).
        offset: u64,
        /// What is wrong.
        problem: AppendProblem,
    },
    /// A record of the file to append to is invalid.
    #[error("cannot append: the record at byte {offset} is invalid")]
    AppendRecord {
        /// Byte offset of the record (0: the header).
        offset: u64,
        /// What the record check found.
        #[source]
        source: LayoutError,
    },
    /// Replaying the kept v2 ops into a writer state failed.
    #[error("cannot append: the op stream is not well formed at byte {offset}")]
    AppendReplay {
        /// Byte offset of the op record.
        offset: u64,
        /// What the replay found.
        #[source]
        source: Box<WriteError>,
    },
    /// The label to append at is not in the file.
    #[error("label {label} not found in the file to append to")]
    AppendLabelNotFound {
        /// The label asked for.
        label: u64,
    },
    /// Compressing a payload failed.
    #[error("compressing data for new block {new_block} failed")]
    Compression {
        /// Target block of the payload.
        new_block: u64,
        /// The codec error.
        #[source]
        source: CompressionError,
    },
    /// An on-disk record could not be built.
    #[error("building the record for op {op_index} failed")]
    Layout {
        /// Index of the op record.
        op_index: u64,
        /// The layout error.
        #[source]
        source: LayoutError,
    },
    /// Reading metadata of, writing or syncing the output file failed.
    #[error("{what} at byte {offset} failed")]
    Io {
        /// What the writer was doing.
        what: &'static str,
        /// File offset involved.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An earlier I/O error left the file in an unknown state.
    #[error("the writer failed earlier and refuses further writes")]
    Poisoned,
}

/// What makes a file impossible to append to ([`WriteError::NotAppendable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AppendProblem {
    /// An offset computation overflows.
    #[error("offset overflows")]
    OffsetOverflow,
    /// A region the file claims lies past its end.
    #[error("{needed} bytes needed past the end of the file ({size} bytes)")]
    PastEnd {
        /// Bytes asked for.
        needed: u64,
        /// File size.
        size: u64,
    },
    /// A region larger than the address space.
    #[error("a region of {len} bytes is too large")]
    RegionTooLarge {
        /// Region length.
        len: u64,
    },
    /// Appending to v2 needs a v2 file with the 38-byte header.
    #[error("not a v2 file with a 38-byte header")]
    NotV2,
    /// A writer option differs from the file.
    #[error("option {option} is {given} but the file has {file}")]
    OptionMismatch {
        /// Option name.
        option: &'static str,
        /// The file's value.
        file: u64,
        /// The writer's value.
        given: u64,
    },
    /// A v2 SEQUENCE op after data ops.
    #[error("SEQUENCE op after data ops")]
    LateSequence,
    /// A v2 op compressed with another algorithm than the writer's.
    #[error("op compression {file} differs from the writer's {writer}")]
    CompressionMismatch {
        /// The op's algorithm id.
        file: u8,
        /// The writer's algorithm id.
        writer: u8,
    },
    /// A v3 resume point names an op past the op area.
    #[error("resume point names op {op_index} beyond op_count_max")]
    ResumePointBeyondMax {
        /// Op index named.
        op_index: u64,
    },
    /// A v3 REPLACE whose source is not where the payloads so far end.
    #[error("REPLACE source is not the running data offset")]
    ReplaceSourceMismatch,
    /// The running data offset overflows.
    #[error("data offset overflows")]
    DataOffsetOverflow,
    /// The kept ops' payloads extend past the end of the file.
    #[error("payloads of the kept ops extend past the end of the file")]
    PayloadsPastEnd,
    /// Neither a v2 nor a v3 writer state was rebuilt.
    #[error("no writer state rebuilt")]
    NoWriterState,
}
