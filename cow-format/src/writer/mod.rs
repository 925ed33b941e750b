//! COW writer for versions 2 and 3.
//!
//! ```no_run
//! use cow_format::writer::{CowWriter, WriterOptions};
//! use cow_format::CowVersion;
//!
//! let file = std::fs::File::create("out.cow")?;
//! let opts = WriterOptions {
//!     version: CowVersion::V3,
//!     compression: "lz4".parse()?,
//!     op_count_max: Some(1024),
//!     ..WriterOptions::default()
//! };
//! let mut w = CowWriter::create(file, opts)?;
//! w.add_copy(0, 5)?;
//! w.add_replace(1, &[0u8; 8192])?;
//! w.add_label(1)?;
//! w.finalize()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout rules, stored-raw rules and the chunking policy are documented in
//! the submodules and in `cow-format/WRITER.md`.

mod append;
mod blocks;
mod error;
mod options;
mod prepared;
mod sink;
mod v2;
mod v3;

use std::fs::File;

use crate::layout::{
    op_type, CowHeaderV2, CowHeaderV3, CowOpV2, CowOpV3, MAX_NEW_BLOCK, SOURCE_MASK,
    V2_HEADER_SIZE, V3_HEADER_SIZE,
};
use crate::op::{CowVersion, OpKind};

pub use error::{AppendProblem, WriteError};
pub use options::{parse_compression_option, WriterOptions, DEFAULT_COMPRESSION_FACTOR};
pub use prepared::{prepare_replace, prepare_xor, PreparedOp};

use blocks::{BlockSet, PendingSequence};
use prepared::PreparedFormat;
use sink::Sink;
use v2::V2Stream;
use v3::V3Layout;

/// Most sequence entries per v2 SEQUENCE op (AOSP: 2·block_size/4, capped so
/// the payload fits the 16-bit data_length).
fn v2_sequence_entries_per_op(block_size: u32) -> usize {
    ((block_size as usize * 2).min(usize::from(u16::MAX)) / 4).max(1)
}

/// What [`CowWriter::finalize`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    /// Format version written.
    pub version: CowVersion,
    /// Size of the file's content in bytes (end of the last thing written).
    pub file_size: u64,
    /// Op records in the file. v2: every record before the footer,
    /// CLUSTER/LABEL/SEQUENCE included; v3: the header's `op_count`.
    pub op_records: u64,
    /// COPY, REPLACE, ZERO and XOR records.
    pub data_ops: u64,
    /// Payload bytes stored (compressed or raw), sequence data excluded.
    pub payload_bytes: u64,
    /// Blocks of the new image the ops cover.
    pub blocks: u64,
}

enum Format {
    V2(V2Stream),
    V3(V3Layout),
}

/// Writes one COW file. Create it with [`CowWriter::create`], add ops, then
/// call [`CowWriter::finalize`]; a writer dropped without `finalize` leaves an
/// incomplete file (readable only up to its last label).
pub struct CowWriter {
    opts: WriterOptions,
    sink: Sink,
    format: Format,
    sequence_allowed: bool,
    poisoned: bool,
    data_ops: u64,
    payload_bytes: u64,
    blocks: u64,
    written: BlockSet,
    sequence: PendingSequence,
}

fn check_block(new_block: u64, count: u64) -> Result<(), WriteError> {
    if count == 0 {
        return Ok(());
    }
    match new_block.checked_add(count - 1) {
        Some(last) if last <= MAX_NEW_BLOCK => Ok(()),
        Some(last) => Err(WriteError::BlockOutOfRange { new_block: last }),
        None => Err(WriteError::BlockOutOfRange { new_block }),
    }
}

impl CowWriter {
    /// Start a COW file in `file` (opened for writing). A regular file is
    /// truncated first; a block device is written in place. Writes the header
    /// and, if enabled, the zero-filled scratch region, and syncs them.
    pub fn create(file: File, opts: WriterOptions) -> Result<Self, WriteError> {
        opts.validate()?;
        let mut sink = Sink::new(file);
        if sink.is_regular_file()? {
            sink.set_len(0)?;
        }
        let buffer_size = opts.buffer_size();
        let (format, header_size) = match opts.version {
            CowVersion::V2 => {
                let mut header = CowHeaderV2::new(opts.block_size, opts.cluster_ops, buffer_size);
                header.num_merge_ops = opts.num_merge_ops;
                sink.put(0, &header.encode())?;
                let ops_start = V2_HEADER_SIZE as u64 + u64::from(buffer_size);
                (
                    Format::V2(V2Stream::new(ops_start, opts.cluster_ops)?),
                    V2_HEADER_SIZE as u64,
                )
            }
            CowVersion::V3 => {
                // validate() guarantees op_count_max is Some.
                let mut header = CowHeaderV3::new(
                    opts.block_size,
                    buffer_size,
                    opts.op_count_max.unwrap_or(0),
                    opts.compression.algorithm.id().into(),
                    opts.compression_factor,
                );
                header.base.num_merge_ops = opts.num_merge_ops;
                sink.put(0, &header.encode())?;
                (Format::V3(V3Layout::new(header)?), V3_HEADER_SIZE as u64)
            }
        };
        sink.put_zeros(header_size, buffer_size.into())?;
        sink.sync()?;
        Ok(Self {
            opts,
            sink,
            format,
            sequence_allowed: true,
            poisoned: false,
            data_ops: 0,
            payload_bytes: 0,
            blocks: 0,
            written: BlockSet::default(),
            sequence: PendingSequence::default(),
        })
    }

    /// Reopen a COW file written with `opts` at `label` and continue
    /// writing after it (AOSP's append mode, for resuming an interrupted
    /// write). `file` must be open for reading and writing. Ops after the
    /// label are discarded: v2 overwrites them, v3 forgets them (the next
    /// commit rewrites `op_count`). For v3, `op_count_max: None` takes the
    /// file's capacity. Options that shape the layout (version, block size,
    /// clustering, scratch, compression, factor) must match the file.
    pub fn open_for_append(
        file: File,
        opts: WriterOptions,
        label: u64,
    ) -> Result<Self, WriteError> {
        let mut check = opts;
        if check.version == CowVersion::V3 && check.op_count_max.is_none() {
            check.op_count_max = Some(0);
        }
        check.validate()?;
        let resumed = append::resume(&file, &opts, label)?;
        let mut opts = opts;
        let mut sink = Sink::new(file);
        sink.note_existing()?;
        let format = match (resumed.v2, resumed.v3) {
            (Some(mut stream), _) => {
                stream.close_cluster_if_full(&mut sink)?;
                Format::V2(stream)
            }
            (None, Some(layout)) => {
                opts.op_count_max = Some(layout.header().op_count_max);
                Format::V3(layout)
            }
            (None, None) => {
                return Err(WriteError::NotAppendable {
                    offset: 0,
                    problem: error::AppendProblem::NoWriterState,
                })
            }
        };
        sink.flush()?;
        Ok(Self {
            opts,
            sink,
            format,
            sequence_allowed: false,
            poisoned: false,
            data_ops: resumed.data_ops,
            payload_bytes: resumed.payload_bytes,
            blocks: resumed.blocks,
            written: resumed.written,
            sequence: resumed.sequence,
        })
    }

    /// The options this writer was created with.
    pub fn options(&self) -> &WriterOptions {
        &self.opts
    }

    /// Whether labels and `finalize` fsync (the default, as on a device) or
    /// only write. A host tool producing a file to ship can turn this off and
    /// sync the finished file once: the bytes written are the same.
    pub fn set_durable(&mut self, durable: bool) {
        self.sink.set_durable(durable);
    }

    /// Op records written so far (v2: including CLUSTER/LABEL/SEQUENCE).
    pub fn op_records(&self) -> u64 {
        match &self.format {
            Format::V2(s) => s.num_ops(),
            Format::V3(l) => l.op_count(),
        }
    }

    /// Run `f`; an error from it that is not an argument error poisons the writer.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, WriteError>,
    ) -> Result<T, WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        let r = f(self);
        if let Err(e) = &r {
            if matches!(
                e,
                WriteError::Io { .. }
                    | WriteError::OffsetOverflow { .. }
                    | WriteError::Layout { .. }
            ) {
                self.poisoned = true;
            }
        }
        r
    }

    /// Fail if any of `[new_block, new_block + count)` already has an op
    /// (unless duplicates are allowed).
    fn check_unwritten(&self, new_block: u64, count: u64) -> Result<(), WriteError> {
        if self.opts.allow_duplicate_blocks {
            return Ok(());
        }
        match self.written.first_overlap(new_block, count) {
            Some(b) => Err(WriteError::DuplicateBlock { new_block: b }),
            None => Ok(()),
        }
    }

    /// Fail if the v3 op area cannot take `n` more records.
    fn reserve(&self, n: u64) -> Result<(), WriteError> {
        match &self.format {
            Format::V2(_) => Ok(()),
            Format::V3(l) => l.reserve(n),
        }
    }

    /// Write one data-op record (COPY/ZERO/REPLACE/XOR). `source` is the
    /// type's source value; for REPLACE pass 0, the writer fills in the
    /// payload offset.
    fn write_data_op(
        &mut self,
        kind: OpKind,
        new_block: u64,
        source: u64,
        shift: u8,
        compression_id: u8,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        let t = match kind {
            OpKind::Copy => op_type::COPY,
            OpKind::Replace => op_type::REPLACE,
            OpKind::Zero => op_type::ZERO,
            OpKind::Xor => op_type::XOR,
        };
        let sink = &mut self.sink;
        match &mut self.format {
            Format::V2(s) => {
                let index = s.num_ops();
                let source = if kind == OpKind::Replace {
                    s.next_data_pos()
                } else {
                    source
                };
                if source > SOURCE_MASK {
                    return Err(WriteError::OffsetOverflow {
                        what: "op source",
                        op_index: index,
                    });
                }
                let data_length =
                    u16::try_from(payload.len()).map_err(|_| WriteError::PayloadTooLarge {
                        new_block,
                        len: payload.len(),
                    })?;
                let op = CowOpV2 {
                    op_type: t,
                    compression: compression_id,
                    data_length,
                    new_block,
                    source,
                };
                s.write_op(sink, op, payload)?;
            }
            Format::V3(l) => {
                let index = l.op_count();
                let source = if kind == OpKind::Replace {
                    l.next_data_pos()
                } else {
                    source
                };
                let block = u32::try_from(new_block)
                    .map_err(|_| WriteError::BlockOutOfRange { new_block })?;
                let data_length =
                    u32::try_from(payload.len()).map_err(|_| WriteError::OffsetOverflow {
                        what: "payload length",
                        op_index: index,
                    })?;
                let op = CowOpV3::new(t, block, source, shift, data_length).map_err(|source| {
                    WriteError::Layout {
                        op_index: index,
                        source,
                    }
                })?;
                l.write_op(sink, op, payload)?;
            }
        }
        self.sequence_allowed = false;
        self.sequence.op_added(new_block);
        if !self.opts.allow_duplicate_blocks {
            self.written.insert(new_block, 1u64 << shift);
        }
        self.data_ops += 1;
        self.payload_bytes += payload.len() as u64;
        self.blocks += 1u64 << shift;
        Ok(())
    }

    /// Set the merge order: the new-image blocks of the ordered ops
    /// (COPY/XOR), first merged first. Allowed once, before any op or label.
    ///
    /// v2 writes SEQUENCE ops (2·block_size/4 entries each) and needs
    /// clustering (AOSP's unclustered writer corrupts sequence data, fact
    /// sheet §5.1.3). v3 writes the sequence region.
    pub fn add_sequence(&mut self, merge_order: &[u32]) -> Result<(), WriteError> {
        self.guarded(|w| {
            if !w.sequence_allowed {
                return Err(WriteError::SequenceOrder {
                    reason: "ops, labels or a sequence were already added",
                });
            }
            let sink = &mut w.sink;
            match &mut w.format {
                Format::V2(s) => {
                    if w.opts.cluster_ops == 0 {
                        return Err(WriteError::SequenceUnsupported {
                            reason: "v2 sequence ops need cluster_ops ≥ 2",
                        });
                    }
                    let per_op = v2_sequence_entries_per_op(w.opts.block_size);
                    for chunk in merge_order.chunks(per_op) {
                        let payload: Vec<u8> = chunk.iter().flat_map(|b| b.to_le_bytes()).collect();
                        let op = CowOpV2 {
                            op_type: op_type::SEQUENCE,
                            compression: 0,
                            // per_op·4 ≤ 65535.
                            data_length: payload.len() as u16,
                            new_block: 0,
                            source: s.next_data_pos(),
                        };
                        s.write_op(sink, op, &payload)?;
                    }
                }
                Format::V3(l) => l.set_sequence(sink, merge_order)?,
            }
            w.sequence = PendingSequence::new(merge_order);
            w.sequence_allowed = false;
            Ok(())
        })
    }

    /// New block `new_block` = source block `old_block`.
    pub fn add_copy(&mut self, new_block: u64, old_block: u64) -> Result<(), WriteError> {
        self.add_copy_range(new_block, old_block, 1)
    }

    /// New blocks `new_block + i` = source blocks `old_block + i`, for `i < num_blocks`.
    pub fn add_copy_range(
        &mut self,
        new_block: u64,
        old_block: u64,
        num_blocks: u64,
    ) -> Result<(), WriteError> {
        self.guarded(|w| {
            check_block(new_block, num_blocks)?;
            let last_old = old_block.checked_add(num_blocks.saturating_sub(1));
            if num_blocks > 0 && last_old.is_none_or(|b| b > SOURCE_MASK) {
                return Err(WriteError::SourceOutOfRange {
                    new_block,
                    source_value: old_block,
                });
            }
            w.check_unwritten(new_block, num_blocks)?;
            w.reserve(num_blocks)?;
            for i in 0..num_blocks {
                w.write_data_op(OpKind::Copy, new_block + i, old_block + i, 0, 0, &[])?;
            }
            Ok(())
        })
    }

    /// New blocks `new_block .. new_block + num_blocks` are all zero.
    pub fn add_zero(&mut self, new_block: u64, num_blocks: u64) -> Result<(), WriteError> {
        self.guarded(|w| {
            check_block(new_block, num_blocks)?;
            w.check_unwritten(new_block, num_blocks)?;
            w.reserve(num_blocks)?;
            for i in 0..num_blocks {
                w.write_data_op(OpKind::Zero, new_block + i, 0, 0, 0, &[])?;
            }
            Ok(())
        })
    }

    /// New blocks from `new_block` on = `data` (whole blocks). v3 groups
    /// blocks into ops of up to the compression factor.
    pub fn add_replace(&mut self, new_block: u64, data: &[u8]) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        let op = prepare_replace(&self.opts, new_block, data)?;
        self.add_prepared(op)
    }

    /// New blocks from `new_block` on = `xor_data` XOR the source image bytes
    /// at `source_byte_offset` (block `i` at `source_byte_offset + i·block_size`).
    pub fn add_xor(
        &mut self,
        new_block: u64,
        xor_data: &[u8],
        source_byte_offset: u64,
    ) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        let op = prepare_xor(&self.opts, new_block, xor_data, source_byte_offset)?;
        self.add_prepared(op)
    }

    /// Append an op list made by [`prepare_replace`] / [`prepare_xor`] with
    /// the same options as this writer.
    pub fn add_prepared(&mut self, op: PreparedOp) -> Result<(), WriteError> {
        self.guarded(|w| {
            if op.format != PreparedFormat::of(&w.opts) {
                return Err(WriteError::PreparedMismatch {
                    new_block: op.first_block,
                });
            }
            let blocks: u64 = op.records.iter().map(|r| 1u64 << r.shift).sum();
            w.check_unwritten(op.first_block, blocks)?;
            w.reserve(op.op_count())?;
            for r in &op.records {
                let payload = op
                    .payload
                    .get(r.payload_start..r.payload_start + r.payload_len)
                    .ok_or(WriteError::PreparedMismatch {
                        new_block: r.new_block,
                    })?;
                w.write_data_op(
                    op.kind,
                    r.new_block,
                    r.xor_source,
                    r.shift,
                    r.compression_id,
                    payload,
                )?;
            }
            Ok(())
        })
    }

    /// Add a checkpoint and make everything so far durable.
    ///
    /// v2: a LABEL op (full 64-bit value), then fsync. v3: a resume point
    /// `{label, op_count}` with AOSP's pruning (labels ≥ `label` dropped, at
    /// most 4 kept, `resume_point_count` = entries kept), then ops/data are
    /// synced before the resume buffer and header are rewritten and synced.
    pub fn add_label(&mut self, label: u64) -> Result<(), WriteError> {
        self.guarded(|w| {
            w.sequence_allowed = false;
            let sink = &mut w.sink;
            match &mut w.format {
                Format::V2(s) => {
                    let op = CowOpV2 {
                        op_type: op_type::LABEL,
                        source: label,
                        ..CowOpV2::default()
                    };
                    s.write_op(sink, op, &[])?;
                    sink.sync()
                }
                Format::V3(l) => {
                    l.add_resume_point(label);
                    l.commit(sink)
                }
            }
        })
    }

    /// Finish the file: v2 writes the footer and truncates a regular file
    /// after it; v3 rewrites the header. Everything is synced before return.
    pub fn finalize(mut self) -> Result<WriteSummary, WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        if let Some(block) = self.sequence.first_missing() {
            return Err(WriteError::SequenceWithoutOp { block });
        }
        let op_records;
        let file_size = match &mut self.format {
            Format::V2(s) => {
                let end = s.finish(&mut self.sink)?;
                op_records = s.num_ops();
                if self.sink.is_regular_file()? {
                    self.sink.set_len(end)?;
                }
                self.sink.sync()?;
                end
            }
            Format::V3(l) => {
                // A file without payloads would end inside the op area; extend
                // it to the data area so that file size = data offset + payload
                // bytes always holds (the added range is a sparse hole).
                let data_offset = l.data_offset();
                if self.sink.high_water() < data_offset && self.sink.is_regular_file()? {
                    self.sink.set_len(data_offset)?;
                }
                l.commit(&mut self.sink)?;
                op_records = l.op_count();
                self.sink.high_water()
            }
        };
        Ok(WriteSummary {
            version: self.opts.version,
            file_size,
            op_records,
            data_ops: self.data_ops,
            payload_bytes: self.payload_bytes,
            blocks: self.blocks,
        })
    }

    /// The v3 header as it stands (None for v2). For tests and tools.
    pub fn v3_header(&self) -> Option<CowHeaderV3> {
        match &self.format {
            Format::V2(_) => None,
            Format::V3(l) => Some(*l.header()),
        }
    }
}

#[cfg(test)]
mod tests;
