//! Errors of the COW reader.

use std::io;

use thiserror::Error;

use crate::compression::CompressionError;
use crate::layout::LayoutError;

/// Everything that can go wrong opening or reading a COW file.
#[derive(Debug, Error)]
pub enum ReadError {
    /// An I/O error (including a file that shrank under the reader).
    #[error("reading {len} bytes at byte {offset} of the {what} failed")]
    Io {
        /// Which file: "COW file" or "source image".
        what: &'static str,
        /// Byte offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Could not determine the file size.
    #[error("cannot determine the size of the COW file")]
    Size(#[source] io::Error),
    /// The file could not be memory-mapped (`CowReader::open_mapped`).
    #[error("cannot map the COW file")]
    Map(#[source] io::Error),
    /// A header or record field is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The file ends before a region the header or an op points to.
    #[error("{what} at byte {offset} ({len} bytes) extends past the end of the file ({file_size} bytes)")]
    OutOfBounds {
        /// What was being located.
        what: &'static str,
        /// Its start offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file size.
        file_size: u64,
    },
    /// A v2 file without footer opened without a label.
    #[error("no COW footer found (the file is incomplete; open it at a label to recover)")]
    NoFooter,
    /// The requested label is not in the file.
    #[error("label {label} not found{}", last.map(|l| format!(" (last label seen: {l})")).unwrap_or_default())]
    LabelNotFound {
        /// The label asked for.
        label: u64,
        /// The last label that was seen, if any.
        last: Option<u64>,
    },
    /// An op is inconsistent with the file or with other ops.
    #[error("op {index} (at byte {offset}): {problem}")]
    BadOp {
        /// File-order op index.
        index: u64,
        /// Byte offset of the op record.
        offset: u64,
        /// What is wrong.
        problem: OpProblem,
    },
    /// A merge-sequence entry names a block no op writes.
    #[error("merge sequence entry {entry} names block {block}, which no op writes")]
    SequenceWithoutOp {
        /// Position in the sequence.
        entry: u64,
        /// Block number.
        block: u64,
    },
    /// A v2 SEQUENCE op after a data op.
    #[error("op {index}: SEQUENCE op after data ops")]
    LateSequence {
        /// File-order op index.
        index: u64,
    },
    /// Two different non-zero compression bytes in a v2 file.
    #[error("op {index}: compression {found} differs from the file's {first} (mixed compression)")]
    MixedCompression {
        /// File-order op index.
        index: u64,
        /// The first algorithm id seen.
        first: u8,
        /// The conflicting id.
        found: u8,
    },
    /// Unknown compression algorithm id.
    #[error("unknown compression algorithm {id} in {place}")]
    UnknownCompression {
        /// The id found.
        id: u32,
        /// Where it was found.
        place: CompressionPlace,
    },
    /// A payload failed to decompress.
    #[error("op {index}: payload at byte {offset} does not decode")]
    Decompress {
        /// File-order op index.
        index: u64,
        /// Payload file offset.
        offset: u64,
        /// The codec error.
        #[source]
        source: CompressionError,
    },
    /// The caller's buffer has the wrong size.
    #[error("output buffer is {got} bytes, expected {expected}")]
    BufferSize {
        /// Buffer length given.
        got: usize,
        /// Length required.
        expected: u64,
    },
    /// A block number or offset computation overflows.
    #[error("arithmetic overflow computing {what}")]
    Overflow {
        /// What was computed.
        what: &'static str,
    },
    /// A storage's `visit_at` returned success without calling the visitor.
    #[error("op {index}: the storage returned without lending the payload at byte {offset}")]
    PayloadNotLent {
        /// File-order op index.
        index: u64,
        /// Payload file offset.
        offset: u64,
    },
    /// An op position past the end of the op list.
    #[error("no op at position {position} of the op list")]
    NoSuchOp {
        /// Position asked for.
        position: usize,
    },
    /// A block asked of an op that does not produce it.
    #[error("op {index} produces blocks {first}..+{num_blocks}, not block {block}")]
    BlockNotInOp {
        /// File-order op index.
        index: u64,
        /// Block asked for.
        block: u64,
        /// The op's first block.
        first: u64,
        /// The op's block count.
        num_blocks: u64,
    },
    /// The block is beyond what the COW can describe (more than 2^32 blocks).
    #[error("op {index}: {what} is out of range")]
    OutOfRange {
        /// File-order op index.
        index: u64,
        /// What is out of range.
        what: &'static str,
    },
}

/// What is wrong with an op ([`ReadError::BadOp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpProblem {
    /// A v3 resume point names an op past the op area.
    #[error("resume point for label {label} names op index {op_index} beyond op_count_max {op_count_max}")]
    ResumePointBeyondMax {
        /// The label.
        label: u64,
        /// Op index it names.
        op_index: u64,
        /// The header's `op_count_max`.
        op_count_max: u64,
    },
    /// A v3 REPLACE whose source is not where the payloads so far end.
    #[error("REPLACE source {found} is not the running data offset {expected}")]
    ReplaceSourceMismatch {
        /// Source field.
        found: u64,
        /// Running data offset.
        expected: u64,
    },
    /// A payload placed before the op area.
    #[error("{what} at byte {payload_offset} lies before the op area ({min_offset})")]
    PayloadBeforeOpArea {
        /// Which payload.
        what: &'static str,
        /// Its offset.
        payload_offset: u64,
        /// First byte allowed.
        min_offset: u64,
    },
    /// An uncompressed payload whose length is not the op's size.
    #[error("uncompressed payload of {len} bytes, expected {expected}")]
    RawPayloadSize {
        /// Payload length.
        len: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// An op type no data or metadata op has.
    #[error("unexpected op type {op_type}")]
    UnexpectedType {
        /// The type byte.
        op_type: u8,
    },
    /// A payload asked of an op kind that has none.
    #[error("{kind} op has no payload")]
    NoPayload {
        /// Op kind name.
        kind: &'static str,
    },
}

/// Where a compression algorithm id was read ([`ReadError::UnknownCompression`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CompressionPlace {
    /// The v3 header's `compression_algorithm` (byte 70).
    #[error("the v3 header (byte 70)")]
    V3Header,
    /// The compression byte the v2 ops share.
    #[error("the v2 op compression byte")]
    V2Ops,
    /// One v2 op record.
    #[error("op {index} at byte {offset}")]
    Op {
        /// File-order op index.
        index: u64,
        /// Byte offset of the record.
        offset: u64,
    },
}
