//! On-disk layout of COW files: constants, fixed-size records and their
//! little-endian encodings, for format versions 2 and 3.
//!
//! Every record here is a plain value type with `decode` (from a fixed-size
//! byte array) and `encode` (to one). Decoding never fails: it only splits
//! bytes into fields. Semantic checks live in the `validate_*` helpers, which
//! return a [`LayoutError`] naming the byte offset of the offending record.
//! All integers are little-endian, all records packed (fact sheet §0).

use thiserror::Error;

/// The magic number at offset 0 of every COW file (`!!WOcwoC` on disk).
pub const COW_MAGIC: u64 = 0x436f_7763_4f57_2121;

/// Size of the header prefix common to all versions (magic, major, minor, header_size).
pub const HEADER_PREFIX_SIZE: usize = 14;
/// Size of a v1 header (a v2 header without `buffer_size`).
pub const V1_HEADER_SIZE: usize = 34;
/// Size of a v2 header on disk.
pub const V2_HEADER_SIZE: usize = 38;
/// Size of a v3 header on disk; also the largest `header_size` any reader accepts.
pub const V3_HEADER_SIZE: usize = 78;
/// Size of a v2 op record.
pub const V2_OP_SIZE: usize = 20;
/// Size of a v3 op record.
pub const V3_OP_SIZE: usize = 16;
/// Size of the v2 footer: a 20-byte footer op followed by 64 unused bytes.
pub const V2_FOOTER_SIZE: usize = 84;
/// Number of unused (historically checksum) bytes after the v2 footer op.
pub const V2_FOOTER_UNUSED_SIZE: usize = 64;
/// Size of one v3 resume point.
pub const RESUME_POINT_SIZE: usize = 16;
/// Size of one scratch-region metadata entry.
pub const SCRATCH_METADATA_SIZE: usize = 16;
/// Size of the scratch-region state byte.
pub const BUFFER_STATE_SIZE: usize = 1;

/// Major version written by v2 writers.
pub const V2_MAJOR: u16 = 2;
/// Major version of v3 files.
pub const V3_MAJOR: u16 = 3;
/// The only valid minor version.
pub const MINOR_VERSION: u16 = 0;

/// Default (and, for snapuserd, only) block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Largest block size a writer accepts (v2 `data_length` is a u16).
pub const MAX_BLOCK_SIZE: u32 = 65535;
/// Default v2 ops per cluster.
pub const DEFAULT_CLUSTER_OPS: u32 = 1024;
/// Capacity of the v3 resume buffer (`resume_point_max`).
pub const RESUME_POINT_MAX: u32 = 4;
/// Size of the scratch region when enabled (2 MiB).
pub const BUFFER_REGION_DEFAULT_SIZE: u32 = 2 * 1024 * 1024;
/// Smallest v3 compression factor (`max_compression_size`).
pub const MIN_COMPRESSION_FACTOR: u32 = 4096;
/// Largest v3 compression factor.
pub const MAX_COMPRESSION_FACTOR: u32 = 256 * 1024;
/// Largest v3 compression-factor exponent k (payload of `block_size << k`).
pub const MAX_COMPRESSION_SHIFT: u8 = 6;
/// Byte offset of `num_merge_ops` in every header.
pub const NUM_MERGE_OPS_OFFSET: u64 = 26;
/// Blocks one read-ahead window holds in the default scratch region (2 MiB, 4 KiB blocks):
/// the data area after the 8 KiB metadata area, 510 blocks. The metadata list (511 entries
/// from `header_size + 1`) holds them plus the all-zero terminator.
pub const READ_AHEAD_WINDOW_BLOCKS: usize = (BUFFER_REGION_DEFAULT_SIZE as usize
    - BUFFER_REGION_DEFAULT_SIZE as usize / DEFAULT_BLOCK_SIZE as usize * SCRATCH_METADATA_SIZE)
    / DEFAULT_BLOCK_SIZE as usize;
/// Largest byte offset (exclusive) a single write may span and stay atomic: a window commit
/// rewrites header bytes `0..=header_size` (`num_merge_ops` and the state byte) in one
/// write, which must stay inside the first sector.
pub const ATOMIC_WRITE_SECTOR: u64 = 512;
/// Largest new_block a v2 op may carry (AOSP translates it to 32 bits).
pub const MAX_NEW_BLOCK: u64 = u32::MAX as u64;
/// Bit width of an op's `source` value.
pub const SOURCE_BITS: u32 = 48;
/// Mask of an op's `source` value.
pub const SOURCE_MASK: u64 = (1u64 << SOURCE_BITS) - 1;
/// Largest `op_count_max` we accept or write (AOSP narrows op indices to u32).
pub const MAX_V3_OP_COUNT_MAX: u64 = u32::MAX as u64;

const V3_TYPE_SHIFT: u32 = 60;
const V3_FACTOR_SHIFT: u32 = 57;
const V3_FACTOR_MASK: u64 = 0x7;
const V3_RESERVED_MASK: u64 = ((1u64 << 9) - 1) << SOURCE_BITS;

// Every record size equals the sum of its field widths.
const _: () = assert!(HEADER_PREFIX_SIZE == 8 + 2 + 2 + 2);
const _: () = assert!(V1_HEADER_SIZE == HEADER_PREFIX_SIZE + 2 + 2 + 4 + 4 + 8);
const _: () = assert!(V2_HEADER_SIZE == V1_HEADER_SIZE + 4);
const _: () = assert!(V3_HEADER_SIZE == V2_HEADER_SIZE + 8 + 4 + 4 + 8 + 8 + 4 + 4);
const _: () = assert!(V2_OP_SIZE == 1 + 1 + 2 + 8 + 8);
const _: () = assert!(V3_OP_SIZE == 4 + 4 + 8);
const _: () = assert!(V2_FOOTER_SIZE == V2_OP_SIZE + V2_FOOTER_UNUSED_SIZE);
const _: () = assert!(RESUME_POINT_SIZE == 8 + 8);
const _: () = assert!(SCRATCH_METADATA_SIZE == 8 + 8);
const _: () = assert!(NUM_MERGE_OPS_OFFSET as usize == HEADER_PREFIX_SIZE + 2 + 2 + 4 + 4);

/// Errors from validating on-disk records.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// The file does not start with the COW magic.
    #[error("bad magic {found:#018x} at byte 0 (expected {COW_MAGIC:#018x})")]
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// The major/minor version is not one this crate handles.
    #[error("unsupported COW version {major}.{minor} at byte 8")]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// A header field has a value the format forbids.
    #[error("header field {field} at byte {offset} is {value}: {reason}")]
    BadHeaderField {
        /// Field name.
        field: &'static str,
        /// Byte offset of the field in the file.
        offset: u64,
        /// Value found.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An op record field has a value the format forbids.
    #[error("op record at byte {offset}: field {field} is {value}: {reason}")]
    BadOpField {
        /// Byte offset of the op record in the file.
        offset: u64,
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An op type byte/nibble that is not defined for this version.
    #[error("op record at byte {offset}: unknown op type {op_type}")]
    UnknownOpType {
        /// Byte offset of the op record in the file.
        offset: u64,
        /// The type value found.
        op_type: u8,
    },
    /// The footer disagrees with itself.
    #[error("footer at byte {offset}: {reason}")]
    BadFooter {
        /// Byte offset of the footer op.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A region offset computed from header fields overflows u64.
    #[error("layout arithmetic overflows computing {what}")]
    Overflow {
        /// Which offset was being computed.
        what: &'static str,
    },
}

/// Op types as stored on disk (v2 type byte, v3 type nibble).
pub mod op_type {
    /// New block = source-image block.
    pub const COPY: u8 = 1;
    /// New block(s) = payload.
    pub const REPLACE: u8 = 2;
    /// New block = zeroes.
    pub const ZERO: u8 = 3;
    /// v2 checkpoint marker.
    pub const LABEL: u8 = 4;
    /// v2 end of op cluster.
    pub const CLUSTER: u8 = 5;
    /// New block = payload XOR source bytes.
    pub const XOR: u8 = 6;
    /// v2 merge-sequence payload.
    pub const SEQUENCE: u8 = 7;
    /// v2 footer op.
    pub const FOOTER: u8 = 255;
}

/// Read-ahead state stored in the first byte of the scratch region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferState {
    /// Read-ahead has not run (also the state of a fresh file).
    NotStarted = 0,
    /// A merge commit happened after read-ahead data was consumed.
    InProgress = 1,
    /// Read-ahead data and metadata in the scratch region are complete.
    Done = 2,
}

impl BufferState {
    /// Decode the state byte; `None` for values other than 0, 1, 2.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::NotStarted),
            1 => Some(Self::InProgress),
            2 => Some(Self::Done),
            _ => None,
        }
    }

    /// The on-disk byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

// ---------------------------------------------------------------------------
// Little-endian field helpers over fixed arrays (offsets are constants).

fn get_u16<const N: usize>(b: &[u8; N], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

fn get_u32<const N: usize>(b: &[u8; N], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn get_u64<const N: usize>(b: &[u8; N], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put<const N: usize>(b: &mut [u8; N], off: usize, bytes: &[u8]) {
    b[off..off + bytes.len()].copy_from_slice(bytes);
}

// ---------------------------------------------------------------------------
// Headers

/// The v2 header (38 bytes). A v1 header is its first 34 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CowHeaderV2 {
    /// Must be [`COW_MAGIC`].
    pub magic: u64,
    /// 1 or 2 for the v2 layout.
    pub major_version: u16,
    /// Must be 0.
    pub minor_version: u16,
    /// Size of the header on disk (38 for v2).
    pub header_size: u16,
    /// Must be [`V2_FOOTER_SIZE`] for v2, 0 for v3.
    pub footer_size: u16,
    /// Must be [`V2_OP_SIZE`] for v2, [`V3_OP_SIZE`] for v3.
    pub op_size: u16,
    /// Bytes per block.
    pub block_size: u32,
    /// Op slots per cluster (v2); 0 = unclustered. Must be 0 in v3.
    pub cluster_ops: u32,
    /// Merge progress: leading merge-order entries already merged.
    pub num_merge_ops: u64,
    /// Scratch region size after the header (0 or 2 MiB).
    pub buffer_size: u32,
}

impl CowHeaderV2 {
    /// A fresh v2 header as the writer emits it.
    pub fn new(block_size: u32, cluster_ops: u32, buffer_size: u32) -> Self {
        Self {
            magic: COW_MAGIC,
            major_version: V2_MAJOR,
            minor_version: MINOR_VERSION,
            header_size: V2_HEADER_SIZE as u16,
            footer_size: V2_FOOTER_SIZE as u16,
            op_size: V2_OP_SIZE as u16,
            block_size,
            cluster_ops,
            num_merge_ops: 0,
            buffer_size,
        }
    }

    /// Split 38 bytes into fields.
    pub fn decode(b: &[u8; V2_HEADER_SIZE]) -> Self {
        Self {
            magic: get_u64(b, 0),
            major_version: get_u16(b, 8),
            minor_version: get_u16(b, 10),
            header_size: get_u16(b, 12),
            footer_size: get_u16(b, 14),
            op_size: get_u16(b, 16),
            block_size: get_u32(b, 18),
            cluster_ops: get_u32(b, 22),
            num_merge_ops: get_u64(b, 26),
            buffer_size: get_u32(b, 34),
        }
    }

    /// Encode to 38 bytes.
    pub fn encode(&self) -> [u8; V2_HEADER_SIZE] {
        let mut b = [0u8; V2_HEADER_SIZE];
        put(&mut b, 0, &self.magic.to_le_bytes());
        put(&mut b, 8, &self.major_version.to_le_bytes());
        put(&mut b, 10, &self.minor_version.to_le_bytes());
        put(&mut b, 12, &self.header_size.to_le_bytes());
        put(&mut b, 14, &self.footer_size.to_le_bytes());
        put(&mut b, 16, &self.op_size.to_le_bytes());
        put(&mut b, 18, &self.block_size.to_le_bytes());
        put(&mut b, 22, &self.cluster_ops.to_le_bytes());
        put(&mut b, 26, &self.num_merge_ops.to_le_bytes());
        put(&mut b, 34, &self.buffer_size.to_le_bytes());
        b
    }

    /// Checks the v2 parser applies (fact sheet §3.4, §10.1), plus our own:
    /// block_size a nonzero power of two ≤ 65535... (see [`validate_block_size`]),
    /// buffer_size 0 or 2 MiB, header_size ≥ 34 and ≤ 78.
    ///
    /// For major 1 the caller must treat `buffer_size` as 0.
    pub fn validate(&self) -> Result<(), LayoutError> {
        validate_magic(self.magic)?;
        if !(self.major_version == 1 || self.major_version == V2_MAJOR)
            || self.minor_version != MINOR_VERSION
        {
            return Err(LayoutError::UnsupportedVersion {
                major: self.major_version,
                minor: self.minor_version,
            });
        }
        validate_header_size(self.header_size, V1_HEADER_SIZE as u16)?;
        expect_field(
            "footer_size",
            14,
            self.footer_size.into(),
            V2_FOOTER_SIZE as u64,
        )?;
        expect_field("op_size", 16, self.op_size.into(), V2_OP_SIZE as u64)?;
        validate_block_size(self.block_size)?;
        if self.cluster_ops == 1 {
            return Err(bad_header("cluster_ops", 22, 1, "must not be 1"));
        }
        if self.major_version == V2_MAJOR {
            validate_buffer_size(self.buffer_size)?;
        }
        Ok(())
    }
}

/// The v3 header (78 bytes): the v2 fields plus the v3 region descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CowHeaderV3 {
    /// The first 38 bytes (major 3, footer_size 0, op_size 16, cluster_ops 0).
    pub base: CowHeaderV2,
    /// Number of u32 entries in the sequence region.
    pub sequence_data_count: u64,
    /// Resume points the writer claims (may exceed `resume_point_max`, §5.2.4).
    pub resume_point_count: u32,
    /// Capacity of the resume buffer (4).
    pub resume_point_max: u32,
    /// Committed op records.
    pub op_count: u64,
    /// Capacity of the op area in records.
    pub op_count_max: u64,
    /// Compression algorithm id for the whole file.
    pub compression_algorithm: u32,
    /// Compression factor: largest uncompressed payload of one op, in bytes.
    pub max_compression_size: u32,
}

impl CowHeaderV3 {
    /// A fresh v3 header as the writer emits it at open time (op_count 0).
    pub fn new(
        block_size: u32,
        buffer_size: u32,
        op_count_max: u64,
        compression_algorithm: u32,
        max_compression_size: u32,
    ) -> Self {
        let base = CowHeaderV2 {
            major_version: V3_MAJOR,
            header_size: V3_HEADER_SIZE as u16,
            footer_size: 0,
            op_size: V3_OP_SIZE as u16,
            cluster_ops: 0,
            ..CowHeaderV2::new(block_size, 0, buffer_size)
        };
        Self {
            base,
            sequence_data_count: 0,
            resume_point_count: 0,
            resume_point_max: RESUME_POINT_MAX,
            op_count: 0,
            op_count_max,
            compression_algorithm,
            max_compression_size,
        }
    }

    /// Split 78 bytes into fields.
    pub fn decode(b: &[u8; V3_HEADER_SIZE]) -> Self {
        let mut v2 = [0u8; V2_HEADER_SIZE];
        v2.copy_from_slice(&b[..V2_HEADER_SIZE]);
        Self {
            base: CowHeaderV2::decode(&v2),
            sequence_data_count: get_u64(b, 38),
            resume_point_count: get_u32(b, 46),
            resume_point_max: get_u32(b, 50),
            op_count: get_u64(b, 54),
            op_count_max: get_u64(b, 62),
            compression_algorithm: get_u32(b, 70),
            max_compression_size: get_u32(b, 74),
        }
    }

    /// Encode to 78 bytes.
    pub fn encode(&self) -> [u8; V3_HEADER_SIZE] {
        let mut b = [0u8; V3_HEADER_SIZE];
        put(&mut b, 0, &self.base.encode());
        put(&mut b, 38, &self.sequence_data_count.to_le_bytes());
        put(&mut b, 46, &self.resume_point_count.to_le_bytes());
        put(&mut b, 50, &self.resume_point_max.to_le_bytes());
        put(&mut b, 54, &self.op_count.to_le_bytes());
        put(&mut b, 62, &self.op_count_max.to_le_bytes());
        put(&mut b, 70, &self.compression_algorithm.to_le_bytes());
        put(&mut b, 74, &self.max_compression_size.to_le_bytes());
        b
    }

    /// Field checks for v3 (fact sheet §3.3, §10.1, §12), independent of file size:
    /// version 3.0, header_size 78, footer_size 0, op_size 16, cluster_ops 0,
    /// block size, buffer size, op_count ≤ op_count_max < 2^32, resume_point_max ≤ 4
    /// ... (nonzero), compression factor a power of two in 4K..=256K and ≥ block_size.
    /// The compression algorithm id is checked by the caller (it owns that enum).
    pub fn validate(&self) -> Result<(), LayoutError> {
        let b = &self.base;
        validate_magic(b.magic)?;
        if b.major_version != V3_MAJOR || b.minor_version != MINOR_VERSION {
            return Err(LayoutError::UnsupportedVersion {
                major: b.major_version,
                minor: b.minor_version,
            });
        }
        expect_field(
            "header_size",
            12,
            b.header_size.into(),
            V3_HEADER_SIZE as u64,
        )?;
        expect_field("footer_size", 14, b.footer_size.into(), 0)?;
        expect_field("op_size", 16, b.op_size.into(), V3_OP_SIZE as u64)?;
        validate_block_size(b.block_size)?;
        expect_field("cluster_ops", 22, b.cluster_ops.into(), 0)?;
        validate_buffer_size(b.buffer_size)?;
        if self.resume_point_max > RESUME_POINT_MAX {
            return Err(bad_header(
                "resume_point_max",
                50,
                self.resume_point_max.into(),
                "larger than 4",
            ));
        }
        if self.op_count_max > MAX_V3_OP_COUNT_MAX {
            return Err(bad_header(
                "op_count_max",
                62,
                self.op_count_max,
                "must be below 2^32",
            ));
        }
        if self.op_count > self.op_count_max {
            return Err(bad_header(
                "op_count",
                54,
                self.op_count,
                "larger than op_count_max",
            ));
        }
        let f = self.max_compression_size;
        if !f.is_power_of_two()
            || !(MIN_COMPRESSION_FACTOR..=MAX_COMPRESSION_FACTOR).contains(&f)
            || f < b.block_size
        {
            return Err(bad_header(
                "max_compression_size",
                74,
                f.into(),
                "must be a power of two in 4096..=262144 and at least block_size",
            ));
        }
        Ok(())
    }

    /// Region offsets of this file (checked arithmetic).
    pub fn regions(&self) -> Result<V3Regions, LayoutError> {
        V3Regions::compute(
            self.base.header_size.into(),
            self.base.buffer_size.into(),
            self.sequence_data_count,
            self.resume_point_max.into(),
            self.op_count_max,
        )
    }
}

fn validate_magic(magic: u64) -> Result<(), LayoutError> {
    if magic != COW_MAGIC {
        return Err(LayoutError::BadMagic { found: magic });
    }
    Ok(())
}

fn bad_header(field: &'static str, offset: u64, value: u64, reason: &'static str) -> LayoutError {
    LayoutError::BadHeaderField {
        field,
        offset,
        value,
        reason,
    }
}

fn expect_field(
    field: &'static str,
    offset: u64,
    value: u64,
    expected: u64,
) -> Result<(), LayoutError> {
    if value != expected {
        return Err(bad_header(field, offset, value, "unexpected value"));
    }
    Ok(())
}

/// `header_size` must lie in `min..=78` (AOSP has no lower bound; we require
/// the header to at least contain the fields the version needs).
pub fn validate_header_size(header_size: u16, min: u16) -> Result<(), LayoutError> {
    if header_size < min || usize::from(header_size) > V3_HEADER_SIZE {
        return Err(bad_header(
            "header_size",
            12,
            header_size.into(),
            "outside the range this version allows",
        ));
    }
    Ok(())
}

/// Block size must be a power of two in 512..=32768 (≤ 65535 per the writer,
/// power of two so block arithmetic is exact).
pub fn validate_block_size(block_size: u32) -> Result<(), LayoutError> {
    if !block_size.is_power_of_two() || !(512..=32768).contains(&block_size) {
        return Err(bad_header(
            "block_size",
            18,
            block_size.into(),
            "must be a power of two in 512..=32768",
        ));
    }
    Ok(())
}

/// The scratch region is either absent or exactly 2 MiB.
pub fn validate_buffer_size(buffer_size: u32) -> Result<(), LayoutError> {
    if buffer_size != 0 && buffer_size != BUFFER_REGION_DEFAULT_SIZE {
        return Err(bad_header(
            "buffer_size",
            34,
            buffer_size.into(),
            "must be 0 or 2097152",
        ));
    }
    Ok(())
}

/// Byte offsets of the v3 regions (fact sheet §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V3Regions {
    /// Start of the scratch region (= header_size).
    pub scratch_offset: u64,
    /// Start of the sequence region.
    pub sequence_offset: u64,
    /// Start of the resume buffer.
    pub resume_offset: u64,
    /// Start of the op area (op record 0).
    pub ops_offset: u64,
    /// Start of the data area (after all `op_count_max` op slots).
    pub data_offset: u64,
}

impl V3Regions {
    /// Compute the regions from the header fields H, B, S, R, M.
    pub fn compute(
        header_size: u64,
        buffer_size: u64,
        sequence_count: u64,
        resume_point_max: u64,
        op_count_max: u64,
    ) -> Result<Self, LayoutError> {
        let of = |what| LayoutError::Overflow { what };
        let sequence_offset = header_size
            .checked_add(buffer_size)
            .ok_or(of("sequence offset"))?;
        let resume_offset = sequence_count
            .checked_mul(4)
            .and_then(|n| n.checked_add(sequence_offset))
            .ok_or(of("resume offset"))?;
        let ops_offset = resume_point_max
            .checked_mul(RESUME_POINT_SIZE as u64)
            .and_then(|n| n.checked_add(resume_offset))
            .ok_or(of("op area offset"))?;
        let data_offset = op_count_max
            .checked_mul(V3_OP_SIZE as u64)
            .and_then(|n| n.checked_add(ops_offset))
            .ok_or(of("data area offset"))?;
        Ok(Self {
            scratch_offset: header_size,
            sequence_offset,
            resume_offset,
            ops_offset,
            data_offset,
        })
    }

    /// Byte offset of op record `index` (checked).
    pub fn op_offset(&self, index: u64) -> Result<u64, LayoutError> {
        index
            .checked_mul(V3_OP_SIZE as u64)
            .and_then(|n| n.checked_add(self.ops_offset))
            .ok_or(LayoutError::Overflow {
                what: "op record offset",
            })
    }
}

// ---------------------------------------------------------------------------
// v2 records

/// A v2 op record (20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CowOpV2 {
    /// Op type ([`op_type`]).
    pub op_type: u8,
    /// Compression algorithm id of the payload (REPLACE/XOR), else 0.
    pub compression: u8,
    /// Payload bytes stored for this op.
    pub data_length: u16,
    /// Target block in the new image.
    pub new_block: u64,
    /// Type-dependent value (see fact sheet §4.1).
    pub source: u64,
}

impl CowOpV2 {
    /// Split 20 bytes into fields.
    pub fn decode(b: &[u8; V2_OP_SIZE]) -> Self {
        Self {
            op_type: b[0],
            compression: b[1],
            data_length: get_u16(b, 2),
            new_block: get_u64(b, 4),
            source: get_u64(b, 12),
        }
    }

    /// Encode to 20 bytes.
    pub fn encode(&self) -> [u8; V2_OP_SIZE] {
        let mut b = [0u8; V2_OP_SIZE];
        b[0] = self.op_type;
        b[1] = self.compression;
        put(&mut b, 2, &self.data_length.to_le_bytes());
        put(&mut b, 4, &self.new_block.to_le_bytes());
        put(&mut b, 12, &self.source.to_le_bytes());
        b
    }

    /// Per-type field rules for a v2 op found at file byte `offset`
    /// (the footer is validated separately by [`CowFooterV2::validate`]):
    ///
    /// * known type (not FOOTER);
    /// * COPY/ZERO/LABEL/CLUSTER carry no payload and no compression byte;
    /// * new_block ≤ u32::MAX; source < 2^48 except for LABEL (as AOSP's
    ///   translation checks);
    /// * REPLACE/XOR: data_length > 0; SEQUENCE: data_length a multiple of 4.
    pub fn validate(&self, offset: u64) -> Result<(), LayoutError> {
        let bad = |field, value, reason| LayoutError::BadOpField {
            offset,
            field,
            value,
            reason,
        };
        match self.op_type {
            op_type::COPY | op_type::ZERO | op_type::LABEL | op_type::CLUSTER => {
                if self.data_length != 0 {
                    return Err(bad(
                        "data_length",
                        self.data_length.into(),
                        "must be 0 for this op type",
                    ));
                }
                if self.compression != 0 {
                    return Err(bad(
                        "compression",
                        self.compression.into(),
                        "must be 0 for this op type",
                    ));
                }
            }
            op_type::REPLACE | op_type::XOR => {
                if self.data_length == 0 {
                    return Err(bad("data_length", 0, "data op without payload"));
                }
            }
            op_type::SEQUENCE => {
                if self.data_length % 4 != 0 {
                    return Err(bad(
                        "data_length",
                        self.data_length.into(),
                        "sequence payload is not a multiple of 4",
                    ));
                }
            }
            other => {
                return Err(LayoutError::UnknownOpType {
                    offset,
                    op_type: other,
                })
            }
        }
        // AOSP's v2 → v3 translation applies these to every record.
        if self.new_block > MAX_NEW_BLOCK {
            return Err(bad("new_block", self.new_block, "exceeds u32::MAX"));
        }
        if self.op_type != op_type::LABEL && self.source > SOURCE_MASK {
            return Err(bad("source", self.source, "exceeds 48 bits"));
        }
        Ok(())
    }
}

/// The v2 footer (84 bytes: footer op + 64 unused bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CowFooterV2 {
    /// `num_ops * 20`.
    pub ops_size: u64,
    /// Op records before the footer (CLUSTER/LABEL/SEQUENCE included).
    pub num_ops: u64,
    /// The 64 historical checksum bytes; writers write zeros, readers ignore them.
    pub unused: [u8; V2_FOOTER_UNUSED_SIZE],
}

impl CowFooterV2 {
    /// A footer for `num_ops` op records.
    pub fn new(num_ops: u64) -> Result<Self, LayoutError> {
        let ops_size = num_ops
            .checked_mul(V2_OP_SIZE as u64)
            .ok_or(LayoutError::Overflow { what: "ops_size" })?;
        Ok(Self {
            ops_size,
            num_ops,
            unused: [0; V2_FOOTER_UNUSED_SIZE],
        })
    }

    /// The footer's leading op record as raw fields.
    pub fn op(&self) -> CowOpV2 {
        CowOpV2 {
            op_type: op_type::FOOTER,
            compression: 0,
            data_length: V2_FOOTER_UNUSED_SIZE as u16,
            new_block: self.ops_size,
            source: self.num_ops,
        }
    }

    /// Decode 84 bytes; the caller has checked that byte 0 is FOOTER.
    pub fn decode(b: &[u8; V2_FOOTER_SIZE]) -> Self {
        let mut unused = [0u8; V2_FOOTER_UNUSED_SIZE];
        unused.copy_from_slice(&b[V2_OP_SIZE..]);
        Self {
            ops_size: get_u64(b, 4),
            num_ops: get_u64(b, 12),
            unused,
        }
    }

    /// Encode to 84 bytes.
    pub fn encode(&self) -> [u8; V2_FOOTER_SIZE] {
        let mut b = [0u8; V2_FOOTER_SIZE];
        put(&mut b, 0, &self.op().encode());
        put(&mut b, V2_OP_SIZE, &self.unused);
        b
    }

    /// Checks a footer at file byte `offset` against the ops parsed before it.
    /// The footer op's compression and data_length bytes are not checked
    /// (AOSP does not check them either).
    pub fn validate(&self, offset: u64, parsed_ops: u64) -> Result<(), LayoutError> {
        if self.num_ops != parsed_ops {
            return Err(LayoutError::BadFooter {
                offset,
                reason: "num_ops does not match the number of op records",
            });
        }
        if parsed_ops.checked_mul(V2_OP_SIZE as u64) != Some(self.ops_size) {
            return Err(LayoutError::BadFooter {
                offset,
                reason: "ops_size is not num_ops * 20",
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// v3 records

/// A v3 op record (16 bytes) with the packed `source_info` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CowOpV3 {
    /// Payload bytes in the data area.
    pub data_length: u32,
    /// First target block.
    pub new_block: u32,
    /// Bits 0..48 source, 57..60 compression shift k, 60..64 op type.
    pub source_info: u64,
}

impl CowOpV3 {
    /// Pack an op. Fails if `source` needs more than 48 bits, `shift` > 6 or
    /// `op_type` > 15.
    pub fn new(
        op_type: u8,
        new_block: u32,
        source: u64,
        shift: u8,
        data_length: u32,
    ) -> Result<Self, LayoutError> {
        let bad = |field, value, reason| LayoutError::BadOpField {
            offset: 0,
            field,
            value,
            reason,
        };
        if source > SOURCE_MASK {
            return Err(bad("source", source, "exceeds 48 bits"));
        }
        if shift > MAX_COMPRESSION_SHIFT {
            return Err(bad("compression shift", shift.into(), "exceeds 6"));
        }
        if op_type > 15 {
            return Err(bad("type", op_type.into(), "does not fit in 4 bits"));
        }
        let source_info =
            (u64::from(op_type) << V3_TYPE_SHIFT) | (u64::from(shift) << V3_FACTOR_SHIFT) | source;
        Ok(Self {
            data_length,
            new_block,
            source_info,
        })
    }

    /// Split 16 bytes into fields.
    pub fn decode(b: &[u8; V3_OP_SIZE]) -> Self {
        Self {
            data_length: get_u32(b, 0),
            new_block: get_u32(b, 4),
            source_info: get_u64(b, 8),
        }
    }

    /// Encode to 16 bytes.
    pub fn encode(&self) -> [u8; V3_OP_SIZE] {
        let mut b = [0u8; V3_OP_SIZE];
        put(&mut b, 0, &self.data_length.to_le_bytes());
        put(&mut b, 4, &self.new_block.to_le_bytes());
        put(&mut b, 8, &self.source_info.to_le_bytes());
        b
    }

    /// Op type (bits 60..64).
    pub fn op_type(&self) -> u8 {
        // The shifted value is < 16, so the narrowing keeps every bit.
        (self.source_info >> V3_TYPE_SHIFT) as u8
    }

    /// The 48-bit source value.
    pub fn source(&self) -> u64 {
        self.source_info & SOURCE_MASK
    }

    /// Compression-factor exponent k (bits 57..60): the payload covers `block_size << k`.
    pub fn shift(&self) -> u8 {
        // Masked to 3 bits.
        ((self.source_info >> V3_FACTOR_SHIFT) & V3_FACTOR_MASK) as u8
    }

    /// The unused bits 48..57 (never checked by AOSP).
    pub fn reserved_bits(&self) -> u64 {
        self.source_info & V3_RESERVED_MASK
    }

    /// Per-type field rules for a v3 op at file byte `offset`, given the block
    /// size and the header's compression factor:
    ///
    /// * type COPY, REPLACE, ZERO or XOR;
    /// * k ≤ 6 and `block_size << k` ≤ compression factor; k = 0 unless REPLACE;
    /// * COPY/ZERO: data_length 0; REPLACE/XOR: data_length in 1..=`block_size << k`.
    ///
    /// The REPLACE source/data-position check needs parse state and is the
    /// reader's job.
    pub fn validate(
        &self,
        offset: u64,
        block_size: u32,
        compression_factor: u32,
    ) -> Result<(), LayoutError> {
        let bad = |field, value, reason| LayoutError::BadOpField {
            offset,
            field,
            value,
            reason,
        };
        let t = self.op_type();
        let k = self.shift();
        if !matches!(
            t,
            op_type::COPY | op_type::REPLACE | op_type::ZERO | op_type::XOR
        ) {
            return Err(LayoutError::UnknownOpType { offset, op_type: t });
        }
        if k > MAX_COMPRESSION_SHIFT {
            return Err(bad("compression shift", k.into(), "exceeds 6"));
        }
        if k != 0 && t != op_type::REPLACE {
            return Err(bad(
                "compression shift",
                k.into(),
                "only REPLACE ops may cover several blocks",
            ));
        }
        let unit = u64::from(block_size) << k;
        if unit > u64::from(compression_factor) {
            return Err(bad(
                "compression shift",
                k.into(),
                "op covers more than the header's compression factor",
            ));
        }
        match t {
            op_type::COPY | op_type::ZERO => {
                if self.data_length != 0 {
                    return Err(bad(
                        "data_length",
                        self.data_length.into(),
                        "must be 0 for this op type",
                    ));
                }
            }
            _ => {
                if self.data_length == 0 || u64::from(self.data_length) > unit {
                    return Err(bad(
                        "data_length",
                        self.data_length.into(),
                        "must be in 1..=uncompressed size",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A v3 resume point (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ResumePoint {
    /// Caller-chosen label.
    pub label: u64,
    /// Ops `[0, op_index)` belong to this checkpoint.
    pub op_index: u64,
}

impl ResumePoint {
    /// Split 16 bytes into fields.
    pub fn decode(b: &[u8; RESUME_POINT_SIZE]) -> Self {
        Self {
            label: get_u64(b, 0),
            op_index: get_u64(b, 8),
        }
    }

    /// Encode to 16 bytes.
    pub fn encode(&self) -> [u8; RESUME_POINT_SIZE] {
        let mut b = [0u8; RESUME_POINT_SIZE];
        put(&mut b, 0, &self.label.to_le_bytes());
        put(&mut b, 8, &self.op_index.to_le_bytes());
        b
    }

    /// Decode consecutive 16-byte records (a resume buffer); a trailing partial record is
    /// ignored.
    pub fn decode_all(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(RESUME_POINT_SIZE)
            .map(|c| {
                let mut record = [0u8; RESUME_POINT_SIZE];
                record.copy_from_slice(c);
                Self::decode(&record)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Scratch region (fact sheet §4.5, §5.3)

/// One scratch metadata entry: a read-ahead copy of `new_block`'s source data
/// stored at `file_offset` in the COW file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScratchMetadata {
    /// Block of the new image whose source data was saved.
    pub new_block: u64,
    /// Absolute COW-file offset of the saved 4 KiB copy.
    pub file_offset: u64,
}

impl ScratchMetadata {
    /// Split 16 bytes into fields.
    pub fn decode(b: &[u8; SCRATCH_METADATA_SIZE]) -> Self {
        Self {
            new_block: get_u64(b, 0),
            file_offset: get_u64(b, 8),
        }
    }

    /// Encode to 16 bytes.
    pub fn encode(&self) -> [u8; SCRATCH_METADATA_SIZE] {
        let mut b = [0u8; SCRATCH_METADATA_SIZE];
        put(&mut b, 0, &self.new_block.to_le_bytes());
        put(&mut b, 8, &self.file_offset.to_le_bytes());
        b
    }

    /// The all-zero entry terminates the list.
    pub fn is_terminator(&self) -> bool {
        self.new_block == 0 && self.file_offset == 0
    }
}

/// Byte ranges inside the scratch region of a file (absolute file offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchLayout {
    /// Offset of the BufferState byte (= header_size).
    pub state_offset: u64,
    /// Offset of the first ScratchMetadata entry (= header_size + 1).
    pub metadata_offset: u64,
    /// Size of the metadata area (`buffer_size * 16 / 4096`, 8192 for 2 MiB).
    pub metadata_size: u64,
    /// Offset of the read-ahead data area (= header_size + metadata_size).
    pub data_offset: u64,
    /// End of the scratch region (= header_size + buffer_size).
    pub end: u64,
}

impl ScratchLayout {
    /// Layout for a header of `header_size` bytes and a scratch region of
    /// `buffer_size` bytes; `None` if there is no scratch region.
    pub fn new(header_size: u64, buffer_size: u32) -> Option<Self> {
        if buffer_size == 0 {
            return None;
        }
        let buffer_size = u64::from(buffer_size);
        let metadata_size =
            buffer_size / u64::from(DEFAULT_BLOCK_SIZE) * SCRATCH_METADATA_SIZE as u64;
        // header_size ≤ 65535 and buffer_size < 2^32: no overflow possible.
        Some(Self {
            state_offset: header_size,
            metadata_offset: header_size + BUFFER_STATE_SIZE as u64,
            metadata_size,
            data_offset: header_size + metadata_size,
            end: header_size + buffer_size,
        })
    }

    /// Most metadata entries that fit without touching the data area.
    pub fn max_entries(&self) -> u64 {
        // A region under one block has no metadata area: the list starts past its end.
        self.data_offset.saturating_sub(self.metadata_offset) / SCRATCH_METADATA_SIZE as u64
    }

    /// Blocks of `block_size` bytes one read-ahead window holds: limited by the data area
    /// and by the metadata list, which keeps room for its all-zero terminator.
    /// [`READ_AHEAD_WINDOW_BLOCKS`] for the default region.
    pub fn window_capacity(&self, block_size: u32) -> u64 {
        let data_blocks = (self.end - self.data_offset) / u64::from(block_size.max(1));
        data_blocks.min(self.max_entries().saturating_sub(1))
    }

    /// File offset of window slot `slot` (blocks of `block_size` bytes from the data
    /// area's start); `None` past the window capacity.
    pub fn slot_offset(&self, slot: u64, block_size: u32) -> Option<u64> {
        (slot < self.window_capacity(block_size))
            .then(|| self.data_offset + slot * u64::from(block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_header_round_trip_matches_cow_v2_bytes() {
        let mut h = CowHeaderV2::new(4096, 5, BUFFER_REGION_DEFAULT_SIZE);
        h.num_merge_ops = 1;
        let b = h.encode();
        let expect: [u8; 28] = [
            0x21, 0x21, 0x57, 0x4F, 0x63, 0x77, 0x6F, 0x43, 0x02, 0x00, 0x00, 0x00, 0x26, 0x00,
            0x54, 0x00, 0x14, 0x00, 0x00, 0x10, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x01, 0x00,
        ];
        assert_eq!(&b[..28], &expect);
        assert_eq!(CowHeaderV2::decode(&b), h);
        h.validate().unwrap();
    }

    #[test]
    fn v2_header_rejects_bad_fields() {
        let good = CowHeaderV2::new(4096, 1024, 0);
        let mut h = good;
        h.cluster_ops = 1;
        assert!(h.validate().is_err());
        let mut h = good;
        h.magic ^= 1;
        assert!(matches!(h.validate(), Err(LayoutError::BadMagic { .. })));
        let mut h = good;
        h.op_size = 16;
        assert!(h.validate().is_err());
        let mut h = good;
        h.block_size = 0;
        assert!(h.validate().is_err());
        let mut h = good;
        h.header_size = 79;
        assert!(h.validate().is_err());
        let mut h = good;
        h.minor_version = 1;
        assert!(matches!(
            h.validate(),
            Err(LayoutError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn v3_header_round_trip_and_regions() {
        let mut h = CowHeaderV3::new(4096, 0, 20, 0, 4096);
        h.resume_point_count = 2;
        h.op_count = 3;
        let b = h.encode();
        assert_eq!(CowHeaderV3::decode(&b), h);
        h.validate().unwrap();
        let r = h.regions().unwrap();
        assert_eq!(
            (r.resume_offset, r.ops_offset, r.data_offset),
            (78, 142, 462)
        );
        let with_scratch = CowHeaderV3::new(4096, BUFFER_REGION_DEFAULT_SIZE, 20, 0, 4096);
        assert_eq!(with_scratch.regions().unwrap().data_offset, 2_097_614);
        let mut seq = CowHeaderV3::new(4096, 0, 8, 0, 4096);
        seq.sequence_data_count = 2;
        let r = seq.regions().unwrap();
        assert_eq!(
            (
                r.sequence_offset,
                r.resume_offset,
                r.ops_offset,
                r.data_offset
            ),
            (78, 86, 150, 278)
        );
    }

    #[test]
    fn v3_header_rejects_bad_fields() {
        let good = CowHeaderV3::new(4096, 0, 20, 3, 65536);
        good.validate().unwrap();
        let mut h = good;
        h.op_count = 21;
        assert!(h.validate().is_err());
        let mut h = good;
        h.op_count_max = 1 << 32;
        h.op_count = 0;
        assert!(h.validate().is_err());
        let mut h = good;
        h.max_compression_size = 3 * 4096;
        assert!(h.validate().is_err());
        let mut h = good;
        h.max_compression_size = 512 * 1024;
        assert!(h.validate().is_err());
        let mut h = good;
        h.base.cluster_ops = 5;
        assert!(h.validate().is_err());
        let mut h = good;
        h.resume_point_max = 5;
        assert!(h.validate().is_err());
    }

    #[test]
    fn regions_overflow_is_an_error() {
        assert!(V3Regions::compute(78, 0, u64::MAX / 2, 4, 0).is_err());
        assert!(V3Regions::compute(78, 0, 0, 4, u64::MAX / 8).is_err());
    }

    #[test]
    fn v3_op_encodings_from_fact_sheet() {
        let copy = CowOpV3::new(op_type::COPY, 0, 5, 0, 0).unwrap();
        assert_eq!(copy.source_info, 0x1000_0000_0000_0005);
        let rep = CowOpV3::new(op_type::REPLACE, 0, 0x1CE, 2, 100).unwrap();
        assert_eq!(rep.source_info, 0x2400_0000_0000_01CE);
        let xor = CowOpV3::new(op_type::XOR, 50, 98314, 0, 4096).unwrap();
        assert_eq!(xor.source_info, 0x6000_0000_0001_800A);
        let d = CowOpV3::decode(&rep.encode());
        assert_eq!(d, rep);
        assert_eq!((d.op_type(), d.shift(), d.source()), (2, 2, 0x1CE));
        assert!(CowOpV3::new(op_type::REPLACE, 0, 1 << 48, 0, 1).is_err());
        assert!(CowOpV3::new(op_type::REPLACE, 0, 0, 7, 1).is_err());
    }

    #[test]
    fn v3_op_validation() {
        let rep = CowOpV3::new(op_type::REPLACE, 0, 0, 2, 16384).unwrap();
        rep.validate(0, 4096, 16384).unwrap();
        assert!(rep.validate(0, 4096, 8192).is_err());
        let big = CowOpV3::new(op_type::REPLACE, 0, 0, 2, 16385).unwrap();
        assert!(big.validate(0, 4096, 16384).is_err());
        let mut k7 = rep;
        k7.source_info |= 7 << 57;
        assert!(k7.validate(0, 4096, 262144).is_err());
        let xor2 = CowOpV3 {
            source_info: (6u64 << 60) | (1 << 57),
            data_length: 10,
            new_block: 0,
        };
        assert!(xor2.validate(0, 4096, 65536).is_err());
        let label = CowOpV3 {
            source_info: 4u64 << 60,
            ..Default::default()
        };
        assert!(matches!(
            label.validate(0, 4096, 4096),
            Err(LayoutError::UnknownOpType { op_type: 4, .. })
        ));
        let copy_with_data = CowOpV3 {
            source_info: 1u64 << 60,
            data_length: 1,
            new_block: 0,
        };
        assert!(copy_with_data.validate(0, 4096, 4096).is_err());
    }

    #[test]
    fn v2_op_and_footer() {
        let op = CowOpV2 {
            op_type: op_type::REPLACE,
            compression: 0,
            data_length: 4096,
            new_block: 2,
            source: 0x20008A,
        };
        let b = op.encode();
        assert_eq!(b[0], 2);
        assert_eq!(&b[2..4], &[0x00, 0x10]);
        assert_eq!(CowOpV2::decode(&b), op);
        op.validate(0).unwrap();
        let seq = CowOpV2 {
            op_type: op_type::SEQUENCE,
            data_length: 6,
            ..Default::default()
        };
        assert!(seq.validate(0).is_err());
        let zero_with_data = CowOpV2 {
            op_type: op_type::ZERO,
            data_length: 4,
            ..Default::default()
        };
        assert!(zero_with_data.validate(0).is_err());
        let big_block = CowOpV2 {
            op_type: op_type::COPY,
            new_block: 1 << 32,
            ..Default::default()
        };
        assert!(big_block.validate(0).is_err());
        let label = CowOpV2 {
            op_type: op_type::LABEL,
            source: u64::MAX,
            ..Default::default()
        };
        label.validate(0).unwrap();
        let unknown = CowOpV2 {
            op_type: 0,
            ..Default::default()
        };
        assert!(unknown.validate(0).is_err());

        let f = CowFooterV2::new(18).unwrap();
        let fb = f.encode();
        assert_eq!(fb[0], 0xFF);
        assert_eq!(&fb[2..4], &[64, 0]);
        assert_eq!(u64::from_le_bytes(fb[4..12].try_into().unwrap()), 360);
        assert_eq!(CowFooterV2::decode(&fb), f);
        f.validate(100, 18).unwrap();
        assert!(f.validate(100, 17).is_err());
        let mut f2 = f;
        f2.ops_size = 361;
        assert!(f2.validate(100, 18).is_err());
    }

    #[test]
    fn resume_point_and_scratch_records() {
        let r = ResumePoint {
            label: 1,
            op_index: 2,
        };
        assert_eq!(ResumePoint::decode(&r.encode()), r);
        let m = ScratchMetadata {
            new_block: 7,
            file_offset: 8192 + 38,
        };
        assert_eq!(ScratchMetadata::decode(&m.encode()), m);
        assert!(ScratchMetadata::default().is_terminator());
        let l = ScratchLayout::new(38, BUFFER_REGION_DEFAULT_SIZE).unwrap();
        assert_eq!(l.metadata_size, 8192);
        assert_eq!(l.data_offset, 38 + 8192);
        assert_eq!(l.end, 38 + 2 * 1024 * 1024);
        assert_eq!(l.max_entries(), 511);
        assert_eq!(l.window_capacity(4096) as usize, READ_AHEAD_WINDOW_BLOCKS);
        assert_eq!(READ_AHEAD_WINDOW_BLOCKS, 510);
        assert_eq!(l.slot_offset(509, 4096), Some(l.end - 4096));
        assert_eq!(l.slot_offset(510, 4096), None);
        assert!(ScratchLayout::new(38, 0).is_none());
        // A region smaller than one block has room for no window (and no metadata list).
        for tiny in [1, 16, 4095] {
            let t = ScratchLayout::new(38, tiny).unwrap();
            assert_eq!(t.max_entries(), 0, "buffer_size {tiny}");
            assert_eq!(t.window_capacity(4096), 0, "buffer_size {tiny}");
            assert_eq!(t.slot_offset(0, 4096), None, "buffer_size {tiny}");
        }
        assert_eq!(BufferState::from_u8(2), Some(BufferState::Done));
        assert_eq!(BufferState::from_u8(3), None);
    }
}
