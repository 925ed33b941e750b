//! Parsing of the v2 op stream: clusters, labels, SEQUENCE ops and footer
//! (fact sheet §5.1), with the same stopping rules as AOSP's parser.

use crate::compression::CompressionAlgorithm;
use crate::layout::{op_type, CowFooterV2, CowHeaderV2, CowOpV2, V2_FOOTER_SIZE, V2_OP_SIZE};
use crate::op::{CowOp, CowVersion, OpKind};

use super::error::{CompressionPlace, OpProblem, ReadError};
use super::payload::{attach_payload, check_payload, PayloadSpan};
use super::storage::CowStorage;
use super::{read_at, Parsed};

const OP_SIZE: u64 = V2_OP_SIZE as u64;

/// Parse the ops of a v2 (or v1) file whose header has been validated.
///
/// Without `label`, the footer is required and must match the ops read.
/// With `label`, reading stops after the first LABEL op whose value is
/// `label`; a torn tail after it is ignored. Only whole 20-byte records are
/// read. Every step moves the read position forward by at least 20 bytes,
/// so hostile CLUSTER skips cannot loop.
pub(super) fn parse<S: CowStorage + ?Sized>(
    storage: &S,
    file_size: u64,
    header: &CowHeaderV2,
    label: Option<u64>,
) -> Result<Parsed, ReadError> {
    let block_size = u64::from(header.block_size);
    let buffer_size = if header.major_version >= 2 {
        u64::from(header.buffer_size)
    } else {
        0
    };
    let cluster_ops = u64::from(header.cluster_ops);
    let ops_start = u64::from(header.header_size) + buffer_size;
    let overflow = |what| ReadError::Overflow { what };
    let first_data = if cluster_ops > 0 {
        cluster_ops * OP_SIZE
    } else {
        OP_SIZE
    };
    let mut data_pos = ops_start
        .checked_add(first_data)
        .ok_or(overflow("first data position"))?;
    let batch = cluster_ops.max(1);

    let mut out = Parsed::new(CowVersion::V2);
    let mut pos = ops_start;
    let mut record_index: u64 = 0;
    let mut file_compression: Option<u8> = None;
    let mut seen_data_op = false;
    let mut done = false;
    let mut footer: Option<(u64, CowFooterV2)> = None;
    let mut records: Vec<u8> = Vec::new();

    while !done {
        if pos > file_size {
            return Err(ReadError::OutOfBounds {
                what: "op cluster",
                offset: pos,
                len: OP_SIZE,
                file_size,
            });
        }
        let to_add = batch.min((file_size - pos) / OP_SIZE);
        if to_add == 0 {
            break;
        }
        // to_add * 20 ≤ file_size - pos, so this allocation is bounded by the file.
        let len = to_add * OP_SIZE;
        records.resize(
            usize::try_from(len).map_err(|_| overflow("cluster size"))?,
            0,
        );
        read_at(storage, &mut records, pos)?;

        for chunk in records.chunks_exact(V2_OP_SIZE) {
            let mut raw = [0u8; V2_OP_SIZE];
            raw.copy_from_slice(chunk);
            let op = CowOpV2::decode(&raw);
            let offset = pos;
            let index = record_index;

            let skip = match op.op_type {
                op_type::CLUSTER => op.source,
                op_type::REPLACE | op_type::XOR if cluster_ops == 0 => u64::from(op.data_length),
                _ => 0,
            };
            pos = pos
                .checked_add(OP_SIZE)
                .and_then(|p| p.checked_add(skip))
                .ok_or(overflow("next op position"))?;
            let op_data_pos = data_pos;
            let data_skip = match op.op_type {
                op_type::CLUSTER => cluster_ops * OP_SIZE,
                _ if cluster_ops == 0 => OP_SIZE,
                _ => 0,
            };
            data_pos = data_pos
                .checked_add(u64::from(op.data_length))
                .and_then(|p| p.checked_add(data_skip))
                .ok_or(overflow("next data position"))?;

            if op.op_type == op_type::FOOTER {
                let mut raw_footer = [0u8; V2_FOOTER_SIZE];
                raw_footer[..V2_OP_SIZE].copy_from_slice(chunk);
                read_at(storage, &mut raw_footer[V2_OP_SIZE..], pos)?;
                footer = Some((offset, CowFooterV2::decode(&raw_footer)));
                done = true;
                break;
            }

            record_index += 1;
            op.validate(offset)?;
            if op.compression != 0 {
                match file_compression {
                    None => file_compression = Some(op.compression),
                    Some(first) if first != op.compression => {
                        return Err(ReadError::MixedCompression {
                            index,
                            first,
                            found: op.compression,
                        })
                    }
                    Some(_) => {}
                }
            }

            match op.op_type {
                op_type::CLUSTER => break,
                op_type::LABEL => {
                    out.last_label = Some(op.source);
                    if label == Some(op.source) {
                        done = true;
                        break;
                    }
                }
                op_type::SEQUENCE => {
                    if seen_data_op {
                        return Err(ReadError::LateSequence { index });
                    }
                    read_sequence(storage, file_size, ops_start, &op, index, offset, &mut out)?;
                }
                _ => {
                    seen_data_op = true;
                    let cow_op = data_op(
                        &op,
                        index,
                        offset,
                        op_data_pos,
                        block_size,
                        ops_start,
                        file_size,
                    )?;
                    out.ops.push(cow_op);
                }
            }
        }
    }

    match (label, &footer) {
        (Some(l), _) if out.last_label != Some(l) => {
            return Err(ReadError::LabelNotFound {
                label: l,
                last: out.last_label,
            })
        }
        (None, None) => return Err(ReadError::NoFooter),
        _ => {}
    }
    if let Some((offset, f)) = footer {
        f.validate(offset, record_index)?;
        out.footer = Some(f);
    }
    out.record_count = record_index;
    out.compression = match file_compression {
        None => CompressionAlgorithm::None,
        Some(id) => CompressionAlgorithm::from_id(id).ok_or(ReadError::UnknownCompression {
            id: id.into(),
            place: CompressionPlace::V2Ops,
        })?,
    };
    Ok(out)
}

fn read_sequence<S: CowStorage + ?Sized>(
    storage: &S,
    file_size: u64,
    ops_start: u64,
    op: &CowOpV2,
    index: u64,
    offset: u64,
    out: &mut Parsed,
) -> Result<(), ReadError> {
    let len = u64::from(op.data_length);
    check_payload(
        "SEQUENCE payload",
        op.source,
        len,
        ops_start,
        file_size,
        index,
        offset,
    )?;
    let mut buf = vec![0u8; usize::from(op.data_length)];
    read_at(storage, &mut buf, op.source)?;
    out.sequence.extend(
        buf.chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
    );
    Ok(())
}

fn data_op(
    op: &CowOpV2,
    index: u64,
    offset: u64,
    data_pos: u64,
    block_size: u64,
    ops_start: u64,
    file_size: u64,
) -> Result<CowOp, ReadError> {
    let kind = match op.op_type {
        op_type::COPY => OpKind::Copy,
        op_type::REPLACE => OpKind::Replace,
        op_type::ZERO => OpKind::Zero,
        op_type::XOR => OpKind::Xor,
        other => {
            return Err(ReadError::BadOp {
                index,
                offset,
                problem: OpProblem::UnexpectedType { op_type: other },
            })
        }
    };
    let mut cow_op = CowOp {
        kind,
        new_block: op.new_block,
        num_blocks: 1,
        source: op.source,
        data_offset: 0,
        data_length: 0,
        compression: CompressionAlgorithm::None,
        stored_raw: false,
        index,
    };
    if kind.has_payload() {
        let alg =
            CompressionAlgorithm::from_id(op.compression).ok_or(ReadError::UnknownCompression {
                id: op.compression.into(),
                place: CompressionPlace::Op { index, offset },
            })?;
        let payload = if kind == OpKind::Replace {
            op.source
        } else {
            data_pos
        };
        attach_payload(
            &mut cow_op,
            CowVersion::V2,
            PayloadSpan {
                offset: payload,
                len: u32::from(op.data_length),
                algorithm: alg,
                unit: block_size,
                min_offset: ops_start,
            },
            file_size,
            offset,
        )?;
    }
    Ok(cow_op)
}
