//! Checks shared by the v2 and v3 parsers for the payload of one data op.

use crate::compression::{effective_algorithm, CompressionAlgorithm};
use crate::op::{CowOp, CowVersion};

use super::error::{OpProblem, ReadError};

/// Check that a payload lies inside the op/data area of the file.
pub(super) fn check_payload(
    what: &'static str,
    payload_offset: u64,
    len: u64,
    min_offset: u64,
    file_size: u64,
    index: u64,
    offset: u64,
) -> Result<(), ReadError> {
    if payload_offset < min_offset {
        return Err(ReadError::BadOp {
            index,
            offset,
            problem: OpProblem::PayloadBeforeOpArea {
                what,
                payload_offset,
                min_offset,
            },
        });
    }
    match payload_offset.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(ReadError::OutOfBounds {
            what,
            offset: payload_offset,
            len,
            file_size,
        }),
    }
}

/// Where an op's payload sits and how it is stored, as its op record says.
pub(super) struct PayloadSpan {
    /// Absolute file offset of the payload.
    pub offset: u64,
    /// Stored bytes (the op's `data_length`).
    pub len: u32,
    /// The algorithm the payload is compressed with, unless stored raw.
    pub algorithm: CompressionAlgorithm,
    /// Uncompressed size the op covers (`block_size`, or `block_size << k` in v3).
    pub unit: u64,
    /// First byte a payload may occupy (the op or data area).
    pub min_offset: u64,
}

/// Check `span` against the file and the version's stored-raw rule (fact sheet §7.2), then
/// record it in `op`. `record_offset` is the byte offset of the op record, for errors.
pub(super) fn attach_payload(
    op: &mut CowOp,
    version: CowVersion,
    span: PayloadSpan,
    file_size: u64,
    record_offset: u64,
) -> Result<(), ReadError> {
    let len = u64::from(span.len);
    check_payload(
        "op payload",
        span.offset,
        len,
        span.min_offset,
        file_size,
        op.index,
        record_offset,
    )?;
    let raw =
        effective_algorithm(version, span.algorithm, len, span.unit) == CompressionAlgorithm::None;
    if raw && len != span.unit {
        return Err(ReadError::BadOp {
            index: op.index,
            offset: record_offset,
            problem: OpProblem::RawPayloadSize {
                len,
                expected: span.unit,
            },
        });
    }
    op.data_offset = span.offset;
    op.data_length = span.len;
    op.compression = span.algorithm;
    op.stored_raw = raw;
    Ok(())
}
