//! COW reader: open and validate a v2 or v3 file, list its ops in file and
//! merge order, and produce new-image blocks.
//!
//! All file access goes through [`CowStorage`]: positioned reads, or a guarded
//! memory mapping ([`MappedFile`]) whose bytes payload decoding reads in place
//! ([`CowReader::with_op_payload`]). Everything the header
//! and ops claim is checked against the file size at open time, so later
//! reads fail only if the file changes underneath (reported as I/O errors).

mod error;
mod file_storage;
mod index;
#[allow(unsafe_code)]
mod mapped;
mod merge;
mod parse_v2;
mod parse_v3;
mod payload;
mod produce;
mod storage;

use std::cell::RefCell;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

pub use error::{CompressionPlace, OpProblem, ReadError};
pub use file_storage::CowFileStorage;
pub use mapped::MappedFile;
pub use merge::{MergeMode, MergeOrder, MergeOrderOptions, OtherOpsOrder, UnknownMergeMode};
pub use storage::{CowStorage, SourceImage, StorageError};

use crate::compression::{self, CompressionAlgorithm};
use crate::layout::{
    CowFooterV2, CowHeaderV2, CowHeaderV3, LayoutError, ResumePoint, COW_MAGIC, HEADER_PREFIX_SIZE,
    V1_HEADER_SIZE, V2_HEADER_SIZE, V3_HEADER_SIZE, V3_MAJOR,
};
use crate::op::{CowOp, CowVersion};

use index::BlockIndex;
use merge::MergePlan;

/// The header of an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CowHeader {
    /// v1/v2 header (fields past `header_size` read as 0).
    V2(CowHeaderV2),
    /// v3 header.
    V3(CowHeaderV3),
}

impl CowHeader {
    /// The v2-compatible leading fields (present in both versions).
    pub fn base(&self) -> &CowHeaderV2 {
        match self {
            Self::V2(h) => h,
            Self::V3(h) => &h.base,
        }
    }

    /// Format version.
    pub fn version(&self) -> CowVersion {
        match self {
            Self::V2(_) => CowVersion::V2,
            Self::V3(_) => CowVersion::V3,
        }
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u32 {
        self.base().block_size
    }

    /// Merge progress counter.
    pub fn num_merge_ops(&self) -> u64 {
        self.base().num_merge_ops
    }

    /// Effective scratch size (0 for v1 files, whatever the field says).
    pub fn buffer_size(&self) -> u32 {
        let b = self.base();
        if b.major_version < 2 {
            0
        } else {
            b.buffer_size
        }
    }

    /// Header size on disk.
    pub fn header_size(&self) -> u16 {
        self.base().header_size
    }
}

/// Result of [`CowReader::read_block`]: where the block's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOrigin {
    /// Produced by the op with this index in [`CowReader::ops`].
    Op(usize),
    /// No op writes this block: it is the source image's block of the same number.
    Unchanged,
}

/// What the parser hands to the reader.
#[derive(Debug)]
pub(crate) struct Parsed {
    version: CowVersion,
    ops: Vec<CowOp>,
    sequence: Vec<u64>,
    last_label: Option<u64>,
    footer: Option<CowFooterV2>,
    resume_points: Vec<ResumePoint>,
    compression: CompressionAlgorithm,
    record_count: u64,
}

impl Parsed {
    fn new(version: CowVersion) -> Self {
        Self {
            version,
            ops: Vec::new(),
            sequence: Vec::new(),
            last_label: None,
            footer: None,
            resume_points: Vec::new(),
            compression: CompressionAlgorithm::None,
            record_count: 0,
        }
    }
}

/// Read exactly `buf.len()` bytes of the COW file at `offset`.
pub(crate) fn read_at<S: SourceImage + ?Sized>(
    storage: &S,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ReadError> {
    read_exact_from("COW file", storage, buf, offset)
}

/// Read exactly `buf.len()` bytes of `what` ("COW file", "source image") at `offset`.
pub(crate) fn read_exact_from<S: SourceImage + ?Sized>(
    what: &'static str,
    storage: &S,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ReadError> {
    storage
        .read_exact_at(buf, offset)
        .map_err(|source| ReadError::Io {
            what,
            offset,
            len: buf.len() as u64,
            source,
        })
}

/// Read and validate the header (fact sheet §3.4).
pub(crate) fn read_header<S: CowStorage + ?Sized>(
    storage: &S,
    file_size: u64,
) -> Result<CowHeader, ReadError> {
    if file_size < HEADER_PREFIX_SIZE as u64 {
        return Err(ReadError::OutOfBounds {
            what: "header",
            offset: 0,
            len: HEADER_PREFIX_SIZE as u64,
            file_size,
        });
    }
    let mut raw = [0u8; V3_HEADER_SIZE];
    read_at(storage, &mut raw[..HEADER_PREFIX_SIZE], 0)?;
    let prefix = CowHeaderV3::decode(&raw).base;
    if prefix.magic != COW_MAGIC {
        return Err(LayoutError::BadMagic {
            found: prefix.magic,
        }
        .into());
    }
    let min = if prefix.major_version == V3_MAJOR {
        V3_HEADER_SIZE
    } else {
        V1_HEADER_SIZE
    };
    crate::layout::validate_header_size(prefix.header_size, min as u16)?;
    let size = usize::from(prefix.header_size);
    if (size as u64) > file_size {
        return Err(ReadError::OutOfBounds {
            what: "header",
            offset: 0,
            len: size as u64,
            file_size,
        });
    }
    read_at(storage, &mut raw[..size], 0)?;
    let v3 = CowHeaderV3::decode(&raw);
    match v3.base.major_version {
        1 | 2 => {
            let mut v2 = [0u8; V2_HEADER_SIZE];
            v2.copy_from_slice(&raw[..V2_HEADER_SIZE]);
            let h = CowHeaderV2::decode(&v2);
            h.validate()?;
            Ok(CowHeader::V2(h))
        }
        V3_MAJOR => {
            v3.validate()?;
            Ok(CowHeader::V3(v3))
        }
        major => Err(LayoutError::UnsupportedVersion {
            major,
            minor: v3.base.minor_version,
        }
        .into()),
    }
}

thread_local! {
    /// Compressed payload staging buffer.
    static PAYLOAD_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Distinguishes reader instances in the per-thread decoded-op cache (`produce`).
static NEXT_READER_ID: AtomicU64 = AtomicU64::new(1);

/// An open, validated COW file.
#[derive(Debug)]
pub struct CowReader<S = File> {
    id: u64,
    storage: S,
    file_size: u64,
    header: CowHeader,
    ops: Vec<CowOp>,
    sequence: Vec<u64>,
    last_label: Option<u64>,
    footer: Option<CowFooterV2>,
    resume_points: Vec<ResumePoint>,
    compression: CompressionAlgorithm,
    record_count: u64,
    index: BlockIndex,
    merge: MergePlan,
}

impl CowReader<File> {
    /// Open a complete COW file (v2 with footer, v3 up to the header's op_count).
    pub fn open(file: File) -> Result<Self, ReadError> {
        Self::from_storage(file)
    }

    /// Open a possibly torn file at its last consistent point for `label`
    /// (v2: up to the first LABEL op with that value; v3: the resume point).
    pub fn open_at_label(file: File, label: u64) -> Result<Self, ReadError> {
        Self::from_storage_at_label(file, label)
    }
}

impl CowReader<MappedFile> {
    /// Like [`CowReader::open`], but reads through a memory mapping
    /// ([`MappedFile`]): no syscall per read. If the file shrinks while
    /// mapped, reads fail with an I/O error instead of crashing.
    pub fn open_mapped(file: File) -> Result<Self, ReadError> {
        Self::from_storage(MappedFile::new(file).map_err(ReadError::Map)?)
    }

    /// Like [`CowReader::open_at_label`], through a memory mapping.
    pub fn open_mapped_at_label(file: File, label: u64) -> Result<Self, ReadError> {
        Self::from_storage_at_label(MappedFile::new(file).map_err(ReadError::Map)?, label)
    }
}

impl<S: CowStorage> CowReader<S> {
    /// Like [`CowReader::open`], over any storage (e.g. a `Vec<u8>`).
    pub fn from_storage(storage: S) -> Result<Self, ReadError> {
        Self::parse(storage, None)
    }

    /// Like [`CowReader::open_at_label`], over any storage.
    pub fn from_storage_at_label(storage: S, label: u64) -> Result<Self, ReadError> {
        Self::parse(storage, Some(label))
    }

    fn parse(storage: S, label: Option<u64>) -> Result<Self, ReadError> {
        let file_size = storage.size().map_err(ReadError::Size)?;
        let header = read_header(&storage, file_size)?;
        let parsed = match &header {
            CowHeader::V2(h) => parse_v2::parse(&storage, file_size, h, label)?,
            CowHeader::V3(h) => parse_v3::parse(&storage, file_size, h, label)?,
        };
        let merge = MergePlan::build(parsed.version, &parsed.ops, &parsed.sequence)?;
        let index = BlockIndex::build(&parsed.ops);
        log::debug!(
            "opened COW {:?}: {} data ops, {} records, {} merge entries",
            parsed.version,
            parsed.ops.len(),
            parsed.record_count,
            merge.total()
        );
        Ok(Self {
            id: NEXT_READER_ID.fetch_add(1, Ordering::Relaxed),
            storage,
            file_size,
            header,
            ops: parsed.ops,
            sequence: parsed.sequence,
            last_label: parsed.last_label,
            footer: parsed.footer,
            resume_points: parsed.resume_points,
            compression: parsed.compression,
            record_count: parsed.record_count,
            index,
            merge,
        })
    }

    /// The header.
    pub fn header(&self) -> &CowHeader {
        &self.header
    }

    /// Format version.
    pub fn version(&self) -> CowVersion {
        self.header.version()
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u32 {
        self.header.block_size()
    }

    /// File size seen at open time.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Give back the storage.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Data ops (COPY, REPLACE, ZERO, XOR) in file order.
    pub fn ops(&self) -> &[CowOp] {
        &self.ops
    }

    /// Op records read, including v2 metadata records (LABEL, CLUSTER,
    /// SEQUENCE); for v3 the number of op records.
    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    /// Merge-sequence entries (block numbers), empty if the file has none.
    pub fn sequence(&self) -> &[u64] {
        &self.sequence
    }

    /// v2: value of the last LABEL op read (full 64 bits). Always `None` for v3.
    pub fn last_label(&self) -> Option<u64> {
        self.last_label
    }

    /// v2: the footer, if the file was read up to it.
    pub fn footer(&self) -> Option<&CowFooterV2> {
        self.footer.as_ref()
    }

    /// v3: the valid resume points (at most `resume_point_max`).
    pub fn resume_points(&self) -> &[ResumePoint] {
        &self.resume_points
    }

    /// The file's compression algorithm (v2: the ops' common byte; v3: header).
    pub fn compression(&self) -> CompressionAlgorithm {
        self.compression
    }

    /// `num_merge_ops` from the header as read at open time.
    pub fn num_merge_ops(&self) -> u64 {
        self.header.num_merge_ops()
    }

    /// Entries of the merge order (AOSP `num_total_data_ops`).
    pub fn num_total_data_ops(&self) -> u64 {
        self.merge.total() as u64
    }

    /// Entries of the ordered part of the merge order (the sequence, or the COPY/XOR ops;
    /// v3 without sequence: every op), which both merge modes walk first and alike.
    pub fn num_ordered_ops(&self) -> u64 {
        self.merge.ordered.len() as u64
    }

    /// Ordered entries not yet merged (AOSP `num_ordered_ops_to_merge`).
    pub fn num_ordered_ops_to_merge(&self) -> u64 {
        (self.merge.ordered.len() as u64).saturating_sub(self.num_merge_ops())
    }

    /// Ops in merge order (fact sheet §6.2).
    pub fn merge_order(&self, opts: MergeOrderOptions) -> MergeOrder<'_> {
        MergeOrder::new(&self.ops, &self.merge, opts, self.num_merge_ops())
    }

    /// The op that produces new-image block `block` (first op wins duplicates).
    pub fn find_op(&self, block: u64) -> Option<&CowOp> {
        self.index.find(block).and_then(|i| self.ops.get(i))
    }

    /// Position in [`ops`](Self::ops) of the op that produces `block` (what
    /// [`read_op_block`](Self::read_op_block) takes).
    pub fn find_op_index(&self, block: u64) -> Option<usize> {
        self.index.find(block)
    }

    /// Size of the decoded payload of `op` (REPLACE: all its blocks; XOR: one block).
    pub fn payload_size(&self, op: &CowOp) -> u64 {
        u64::from(self.block_size()) * op.num_blocks
    }

    /// Call `f` with `op`'s stored payload (`data_length` bytes, compressed unless the op is
    /// stored raw) and return what it returns.
    ///
    /// A mapped or in-memory file lends the bytes in place, with no copy; a file read with
    /// `pread` reads them into a per-thread staging buffer first. If the mapped file shrank
    /// while `f` read the payload, `f`'s result is discarded and this is an I/O error.
    pub fn with_op_payload<R>(
        &self,
        op: &CowOp,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ReadError> {
        if !op.kind.has_payload() {
            return Err(ReadError::BadOp {
                index: op.index,
                offset: op.data_offset,
                problem: OpProblem::NoPayload {
                    kind: op.kind.name(),
                },
            });
        }
        let len = op.data_length as usize;
        let mut f = Some(f);
        let mut result = None;
        let mut visit = |bytes: &[u8]| {
            if let Some(f) = f.take() {
                result = Some(f(bytes));
            }
        };
        let io_error = |source| ReadError::Io {
            what: "COW file",
            offset: op.data_offset,
            len: u64::from(op.data_length),
            source,
        };
        PAYLOAD_BUF
            .with(|cell| match cell.try_borrow_mut() {
                Ok(mut staging) => {
                    self.storage
                        .visit_at(op.data_offset, len, &mut staging, &mut visit)
                }
                // `f` itself reads a payload: give the inner call its own staging buffer.
                Err(_) => self
                    .storage
                    .visit_at(op.data_offset, len, &mut Vec::new(), &mut visit),
            })
            .map_err(io_error)?;
        result.ok_or(ReadError::PayloadNotLent {
            index: op.index,
            offset: op.data_offset,
        })
    }

    /// Decode `op`'s payload into `out` (exactly [`payload_size`](Self::payload_size)
    /// bytes). For XOR this is the XOR mask, before applying the source.
    pub fn read_op_data(&self, op: &CowOp, out: &mut [u8]) -> Result<(), ReadError> {
        let expected = self.payload_size(op);
        if out.len() as u64 != expected {
            return Err(ReadError::BufferSize {
                got: out.len(),
                expected,
            });
        }
        if op.stored_raw && op.kind.has_payload() {
            return read_at(&self.storage, out, op.data_offset);
        }
        self.with_op_payload(op, |payload| {
            compression::decompress(op.compression, payload, out)
        })?
        .map_err(|source| ReadError::Decompress {
            index: op.index,
            offset: op.data_offset,
            source,
        })
    }

    /// Produce new-image block `block` into `out` (`block_size` bytes), reading COPY/XOR
    /// sources and unchanged blocks from `source` (see [`read_op_block`](Self::read_op_block)).
    pub fn read_block(
        &self,
        block: u64,
        source: &dyn SourceImage,
        out: &mut [u8],
    ) -> Result<BlockOrigin, ReadError> {
        let bs = u64::from(self.block_size());
        if out.len() as u64 != bs {
            return Err(ReadError::BufferSize {
                got: out.len(),
                expected: bs,
            });
        }
        match self.index.find(block) {
            Some(i) => {
                self.read_op_block(i, block, source, out)?;
                Ok(BlockOrigin::Op(i))
            }
            None => {
                let off = block.checked_mul(bs).ok_or(ReadError::Overflow {
                    what: "source offset of unchanged block",
                })?;
                produce::read_source(source, out, off)?;
                Ok(BlockOrigin::Unchanged)
            }
        }
    }
}

#[cfg(test)]
mod borrow_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{op_type, CowOpV2, V2_OP_SIZE};

    fn v2_file(ops: &[CowOpV2]) -> Vec<u8> {
        let mut f = CowHeaderV2::new(4096, 0, 0).encode().to_vec();
        for op in ops {
            f.extend_from_slice(&op.encode());
        }
        f.extend_from_slice(&CowFooterV2::new(ops.len() as u64).unwrap().encode());
        f
    }

    #[test]
    fn header_errors_are_typed() {
        assert!(matches!(
            CowReader::from_storage(vec![0u8; 5]),
            Err(ReadError::OutOfBounds { what: "header", .. })
        ));
        let mut f = v2_file(&[]);
        f[0] ^= 1;
        assert!(matches!(
            CowReader::from_storage(f),
            Err(ReadError::Layout(LayoutError::BadMagic { .. }))
        ));
        let mut f = v2_file(&[]);
        f[12] = 79;
        assert!(CowReader::from_storage(f).is_err());
        let mut f = v2_file(&[]);
        f[8] = 4;
        assert!(matches!(
            CowReader::from_storage(f),
            Err(ReadError::Layout(LayoutError::UnsupportedVersion {
                major: 4,
                ..
            }))
        ));
        let f = v2_file(&[]);
        let r = CowReader::from_storage(f).unwrap();
        assert!(r.ops().is_empty());
        assert_eq!(r.num_total_data_ops(), 0);
    }

    #[test]
    fn buffer_sizes_and_payload_free_ops() {
        let copy = CowOpV2 {
            op_type: op_type::COPY,
            new_block: 1,
            source: 2,
            ..Default::default()
        };
        let r = CowReader::from_storage(v2_file(&[copy])).unwrap();
        let src = vec![9u8; 3 * 4096];
        let mut small = vec![0u8; 100];
        assert!(matches!(
            r.read_block(1, &src, &mut small),
            Err(ReadError::BufferSize { got: 100, .. })
        ));
        let mut out = vec![0u8; 4096];
        assert_eq!(r.read_block(1, &src, &mut out).unwrap(), BlockOrigin::Op(0));
        assert_eq!(
            r.read_block(0, &src, &mut out).unwrap(),
            BlockOrigin::Unchanged
        );
        // COPY from a block past the end of the source image.
        assert!(matches!(
            r.read_block(1, &vec![0u8; 4096], &mut out),
            Err(ReadError::Io {
                what: "source image",
                ..
            })
        ));
        let op = r.ops()[0];
        assert!(matches!(
            r.read_op_data(&op, &mut out),
            Err(ReadError::BadOp { .. })
        ));
        assert_eq!(r.find_op(1).map(|o| o.kind), Some(crate::op::OpKind::Copy));
        assert!(r.find_op(2).is_none());
        assert_eq!(r.record_count(), 1);
        assert_eq!(V2_OP_SIZE, 20);
    }
}
