//! Parsing of v3 files: sequence region, resume buffer and the fixed op area
//! (fact sheet §5.2).

use crate::compression::CompressionAlgorithm;
use crate::layout::{op_type, CowHeaderV3, CowOpV3, ResumePoint, RESUME_POINT_SIZE, V3_OP_SIZE};
use crate::op::{CowOp, CowVersion, OpKind};

use super::error::{CompressionPlace, OpProblem, ReadError};
use super::payload::{attach_payload, PayloadSpan};
use super::storage::CowStorage;
use super::{read_at, Parsed};

/// Parse a v3 file whose header has been validated.
///
/// Without `label`, exactly `op_count` ops are read. With `label`, the first
/// of the `min(resume_point_count, resume_point_max)` resume points carrying
/// that label gives the op count. Region sizes are checked against the file
/// size before anything is allocated.
pub(super) fn parse<S: CowStorage + ?Sized>(
    storage: &S,
    file_size: u64,
    header: &CowHeaderV3,
    label: Option<u64>,
) -> Result<Parsed, ReadError> {
    let regions = header.regions()?;
    let block_size = u64::from(header.base.block_size);
    let compression = u8::try_from(header.compression_algorithm)
        .ok()
        .and_then(CompressionAlgorithm::from_id)
        .ok_or(ReadError::UnknownCompression {
            id: header.compression_algorithm,
            place: CompressionPlace::V3Header,
        })?;
    let mut out = Parsed::new(CowVersion::V3);
    out.compression = compression;

    // Sequence region.
    let seq_len = header
        .sequence_data_count
        .checked_mul(4)
        .ok_or(ReadError::Overflow {
            what: "sequence size",
        })?;
    let seq_bytes = region(
        storage,
        file_size,
        "sequence data",
        regions.sequence_offset,
        seq_len,
    )?;
    out.sequence = seq_bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();

    // Resume buffer: only the entries that can be valid (AOSP over-reads).
    let n_points = u64::from(header.resume_point_count.min(header.resume_point_max));
    let rp_bytes = region(
        storage,
        file_size,
        "resume buffer",
        regions.resume_offset,
        n_points * RESUME_POINT_SIZE as u64,
    )?;
    out.resume_points = ResumePoint::decode_all(&rp_bytes);

    let op_count = match label {
        None => header.op_count,
        Some(l) => {
            let point = out.resume_points.iter().find(|p| p.label == l).ok_or(
                ReadError::LabelNotFound {
                    label: l,
                    last: None,
                },
            )?;
            if point.op_index > header.op_count_max {
                return Err(ReadError::BadOp {
                    index: point.op_index,
                    offset: regions.resume_offset,
                    problem: OpProblem::ResumePointBeyondMax {
                        label: l,
                        op_index: point.op_index,
                        op_count_max: header.op_count_max,
                    },
                });
            }
            point.op_index
        }
    };

    // op_count ≤ op_count_max < 2^32, so this cannot overflow.
    let ops_bytes = region(
        storage,
        file_size,
        "op area",
        regions.ops_offset,
        op_count * V3_OP_SIZE as u64,
    )?;
    let factor = header.max_compression_size;
    let mut data_pos = regions.data_offset;
    out.ops.reserve(ops_bytes.len() / V3_OP_SIZE);
    for (i, chunk) in ops_bytes.chunks_exact(V3_OP_SIZE).enumerate() {
        let index = i as u64;
        let offset = regions.op_offset(index)?;
        let mut a = [0u8; V3_OP_SIZE];
        a.copy_from_slice(chunk);
        let op = CowOpV3::decode(&a);
        op.validate(offset, header.base.block_size, factor)?;
        let k = op.shift();
        let kind = match op.op_type() {
            op_type::COPY => OpKind::Copy,
            op_type::REPLACE => OpKind::Replace,
            op_type::ZERO => OpKind::Zero,
            _ => OpKind::Xor,
        };
        let mut cow_op = CowOp {
            kind,
            new_block: u64::from(op.new_block),
            num_blocks: 1u64 << k,
            source: op.source(),
            data_offset: 0,
            data_length: 0,
            compression: CompressionAlgorithm::None,
            stored_raw: false,
            index,
        };
        if kind.has_payload() {
            if kind == OpKind::Replace && op.source() != data_pos {
                return Err(ReadError::BadOp {
                    index,
                    offset,
                    problem: OpProblem::ReplaceSourceMismatch {
                        found: op.source(),
                        expected: data_pos,
                    },
                });
            }
            let len = u64::from(op.data_length);
            attach_payload(
                &mut cow_op,
                CowVersion::V3,
                PayloadSpan {
                    offset: data_pos,
                    len: op.data_length,
                    algorithm: compression,
                    unit: block_size << k,
                    min_offset: regions.data_offset,
                },
                file_size,
                offset,
            )?;
            data_pos = data_pos.checked_add(len).ok_or(ReadError::Overflow {
                what: "data position",
            })?;
        }
        out.ops.push(cow_op);
    }
    out.record_count = op_count;
    Ok(out)
}

/// Read a whole region after checking it lies inside the file.
fn region<S: CowStorage + ?Sized>(
    storage: &S,
    file_size: u64,
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ReadError> {
    // An empty region reads nothing, so it may start anywhere, even past the
    // end of the file: AOSP's v3 writer never writes unused op slots, so a
    // file with no ops (or no payloads) ends before its op area or data area.
    if len == 0 {
        return Ok(Vec::new());
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size => {}
        _ => {
            return Err(ReadError::OutOfBounds {
                what,
                offset,
                len,
                file_size,
            })
        }
    }
    let n = usize::try_from(len).map_err(|_| ReadError::Overflow { what })?;
    let mut buf = vec![0u8; n];
    read_at(storage, &mut buf, offset)?;
    Ok(buf)
}
