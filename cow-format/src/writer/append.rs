//! Reopening a COW file at a label to continue writing (AOSP's
//! `OpenForAppend`), e.g. after an interrupted OTA install.
//!
//! The file is parsed here, not through the reader: resuming before all
//! sequence entries have their ops is the normal case, and the reader
//! (rightly) rejects such a view for merging. Every value read is checked
//! against the file size with checked arithmetic.
//!
//! * v2: the records from the start of the op stream up to and including the
//!   first LABEL op with the label are replayed through the writer's own
//!   position rules; writing continues right after that LABEL op (whatever
//!   followed is overwritten; `finalize` writes a new footer and truncates).
//! * v3: the resume point gives the op count to keep; the next payload goes
//!   after the kept ops' payloads. Resume points after the label are
//!   dropped, so `resume_point_count` stays honest.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use crate::layout::{
    op_type, CowHeaderV2, CowHeaderV3, CowOpV2, CowOpV3, LayoutError, ResumePoint,
    RESUME_POINT_SIZE, V2_HEADER_SIZE, V2_OP_SIZE, V3_HEADER_SIZE, V3_OP_SIZE,
};
use crate::op::CowVersion;

use super::blocks::{BlockSet, PendingSequence};
use super::error::AppendProblem;
use super::v2::V2Stream;
use super::v3::V3Layout;
use super::{WriteError, WriterOptions};

/// Writer state rebuilt from an existing file.
pub(crate) struct Resumed {
    pub(crate) v2: Option<V2Stream>,
    pub(crate) v3: Option<V3Layout>,
    pub(crate) data_ops: u64,
    pub(crate) payload_bytes: u64,
    pub(crate) blocks: u64,
    pub(crate) written: BlockSet,
    pub(crate) sequence: PendingSequence,
}

fn bad(offset: u64, problem: AppendProblem) -> WriteError {
    WriteError::NotAppendable { offset, problem }
}

fn mismatch(option: &'static str, file: u64, given: u64) -> WriteError {
    bad(
        0,
        AppendProblem::OptionMismatch {
            option,
            file,
            given,
        },
    )
}

fn bad_record(offset: u64) -> impl FnOnce(LayoutError) -> WriteError {
    move |source| WriteError::AppendRecord { offset, source }
}

/// Read exactly `buf.len()` bytes at `offset`, which must lie inside `size`.
fn read_at(file: &File, size: u64, buf: &mut [u8], offset: u64) -> Result<(), WriteError> {
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| bad(offset, AppendProblem::OffsetOverflow))?;
    if end > size {
        return Err(bad(
            offset,
            AppendProblem::PastEnd {
                needed: buf.len() as u64,
                size,
            },
        ));
    }
    file.read_exact_at(buf, offset)
        .map_err(|source| WriteError::Io {
            what: "reading the file to append to",
            offset,
            source,
        })
}

/// Allocate a buffer for `len` bytes at `offset` only if the file holds them.
fn read_vec(file: &File, size: u64, len: u64, offset: u64) -> Result<Vec<u8>, WriteError> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(bad(offset, AppendProblem::PastEnd { needed: len, size }));
    }
    let mut v = vec![
        0u8;
        usize::try_from(len)
            .map_err(|_| bad(offset, AppendProblem::RegionTooLarge { len }))?
    ];
    read_at(file, size, &mut v, offset)?;
    Ok(v)
}

fn file_size(file: &File) -> Result<u64, WriteError> {
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(|source| WriteError::Io {
        what: "sizing the file to append to",
        offset: 0,
        source,
    })
}

/// Track a data op of the existing file in the bookkeeping.
fn note_op(r: &mut Resumed, opts: &WriterOptions, new_block: u64, blocks: u64, dl: u64) {
    r.data_ops += 1;
    r.payload_bytes += dl;
    r.blocks += blocks;
    r.sequence.op_added(new_block);
    if !opts.allow_duplicate_blocks && r.written.first_overlap(new_block, blocks).is_none() {
        r.written.insert(new_block, blocks);
    }
}

/// Rebuild the writer state of `file` at `label`.
pub(crate) fn resume(file: &File, opts: &WriterOptions, label: u64) -> Result<Resumed, WriteError> {
    let size = file_size(file)?;
    match opts.version {
        CowVersion::V2 => resume_v2(file, size, opts, label),
        CowVersion::V3 => resume_v3(file, size, opts, label),
    }
}

fn empty() -> Resumed {
    Resumed {
        v2: None,
        v3: None,
        data_ops: 0,
        payload_bytes: 0,
        blocks: 0,
        written: BlockSet::default(),
        sequence: PendingSequence::default(),
    }
}

fn resume_v2(
    file: &File,
    size: u64,
    opts: &WriterOptions,
    label: u64,
) -> Result<Resumed, WriteError> {
    let mut raw = [0u8; V2_HEADER_SIZE];
    read_at(file, size, &mut raw, 0)?;
    let h = CowHeaderV2::decode(&raw);
    h.validate().map_err(bad_record(0))?;
    if h.major_version != 2 || usize::from(h.header_size) != V2_HEADER_SIZE {
        return Err(bad(8, AppendProblem::NotV2));
    }
    if h.block_size != opts.block_size {
        return Err(mismatch(
            "block_size",
            h.block_size.into(),
            opts.block_size.into(),
        ));
    }
    if h.cluster_ops != opts.cluster_ops {
        return Err(mismatch(
            "cluster_ops",
            h.cluster_ops.into(),
            opts.cluster_ops.into(),
        ));
    }
    if h.buffer_size != opts.buffer_size() {
        return Err(mismatch(
            "scratch size",
            h.buffer_size.into(),
            opts.buffer_size().into(),
        ));
    }
    let ops_start = V2_HEADER_SIZE as u64 + u64::from(h.buffer_size);
    let mut stream = V2Stream::new(ops_start, h.cluster_ops)?;
    let mut r = empty();
    let mut sequence: Vec<u32> = Vec::new();
    let mut seen_data = false;
    let alg = opts.compression.algorithm.id();
    loop {
        // Every record moves the position forward by at least 20 bytes, and
        // reading past the end fails, so this loop ends.
        let pos = stream.next_op_pos();
        let mut rec = [0u8; V2_OP_SIZE];
        read_at(file, size, &mut rec, pos)
            .map_err(|_| WriteError::AppendLabelNotFound { label })?;
        let op = CowOpV2::decode(&rec);
        if op.op_type == op_type::FOOTER {
            return Err(WriteError::AppendLabelNotFound { label });
        }
        op.validate(pos).map_err(bad_record(pos))?;
        match op.op_type {
            op_type::LABEL | op_type::CLUSTER => {}
            op_type::SEQUENCE => {
                if seen_data {
                    return Err(bad(pos, AppendProblem::LateSequence));
                }
                let payload = read_vec(file, size, op.data_length.into(), op.source)?;
                sequence.extend(
                    payload
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            _ => {
                if !seen_data {
                    // All SEQUENCE ops precede the data ops.
                    r.sequence = PendingSequence::new(&sequence);
                    seen_data = true;
                }
                if op.compression != 0 && op.compression != alg {
                    return Err(bad(
                        pos,
                        AppendProblem::CompressionMismatch {
                            file: op.compression,
                            writer: alg,
                        },
                    ));
                }
            }
        }
        stream.replay(&op).map_err(|e| WriteError::AppendReplay {
            offset: pos,
            source: Box::new(e),
        })?;
        if matches!(
            op.op_type,
            op_type::COPY | op_type::REPLACE | op_type::ZERO | op_type::XOR
        ) {
            note_op(&mut r, opts, op.new_block, 1, op.data_length.into());
        }
        if op.op_type == op_type::LABEL && op.source == label {
            break;
        }
    }
    if !seen_data {
        r.sequence = PendingSequence::new(&sequence);
    }
    r.v2 = Some(stream);
    Ok(r)
}

fn resume_v3(
    file: &File,
    size: u64,
    opts: &WriterOptions,
    label: u64,
) -> Result<Resumed, WriteError> {
    let mut raw = [0u8; V3_HEADER_SIZE];
    read_at(file, size, &mut raw, 0)?;
    let mut h = CowHeaderV3::decode(&raw);
    h.validate().map_err(bad_record(0))?;
    let b = &h.base;
    if b.block_size != opts.block_size {
        return Err(mismatch(
            "block_size",
            b.block_size.into(),
            opts.block_size.into(),
        ));
    }
    if b.buffer_size != opts.buffer_size() {
        return Err(mismatch(
            "scratch size",
            b.buffer_size.into(),
            opts.buffer_size().into(),
        ));
    }
    if h.compression_algorithm != u32::from(opts.compression.algorithm.id()) {
        return Err(mismatch(
            "compression",
            h.compression_algorithm.into(),
            opts.compression.algorithm.id().into(),
        ));
    }
    if h.max_compression_size != opts.compression_factor {
        return Err(mismatch(
            "compression_factor",
            h.max_compression_size.into(),
            opts.compression_factor.into(),
        ));
    }
    if let Some(m) = opts.op_count_max {
        if m != h.op_count_max {
            return Err(mismatch("op_count_max", h.op_count_max, m));
        }
    }
    let regions = h.regions().map_err(bad_record(0))?;
    let n_points = u64::from(h.resume_point_count.min(h.resume_point_max));
    let rp = read_vec(
        file,
        size,
        n_points * RESUME_POINT_SIZE as u64,
        regions.resume_offset,
    )?;
    let points = ResumePoint::decode_all(&rp);
    let keep = points
        .iter()
        .find(|p| p.label == label)
        .ok_or(WriteError::AppendLabelNotFound { label })?
        .op_index;
    if keep > h.op_count_max {
        return Err(bad(
            regions.resume_offset,
            AppendProblem::ResumePointBeyondMax { op_index: keep },
        ));
    }
    let ops = read_vec(file, size, keep * V3_OP_SIZE as u64, regions.ops_offset)?;
    let seq = read_vec(
        file,
        size,
        h.sequence_data_count * 4,
        regions.sequence_offset,
    )?;
    let sequence: Vec<u32> = seq
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut r = empty();
    r.sequence = PendingSequence::new(&sequence);
    let mut data_pos = regions.data_offset;
    for (i, c) in ops.chunks_exact(V3_OP_SIZE).enumerate() {
        let offset = regions.ops_offset + (i * V3_OP_SIZE) as u64;
        let mut a = [0u8; V3_OP_SIZE];
        a.copy_from_slice(c);
        let op = CowOpV3::decode(&a);
        op.validate(offset, b.block_size, h.max_compression_size)
            .map_err(bad_record(offset))?;
        if op.op_type() == op_type::REPLACE && op.source() != data_pos {
            return Err(bad(offset, AppendProblem::ReplaceSourceMismatch));
        }
        data_pos = data_pos
            .checked_add(op.data_length.into())
            .ok_or_else(|| bad(offset, AppendProblem::DataOffsetOverflow))?;
        note_op(
            &mut r,
            opts,
            op.new_block.into(),
            1u64 << op.shift(),
            op.data_length.into(),
        );
    }
    if data_pos > size {
        return Err(bad(data_pos, AppendProblem::PayloadsPastEnd));
    }
    h.op_count = keep;
    let kept_points: Vec<ResumePoint> = points.into_iter().filter(|p| p.op_index <= keep).collect();
    r.v3 = Some(V3Layout::resume(h, kept_points, data_pos)?);
    Ok(r)
}
