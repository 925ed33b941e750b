//! Version-independent view of data ops, as the reader presents them.

use crate::compression::CompressionAlgorithm;

/// COW format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CowVersion {
    /// v2 (major 1 or 2): clusters, labels, footer.
    V2,
    /// v3 (major 3): fixed op area, resume points.
    V3,
}

/// Kind of a data op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// New block = source-image block `source`.
    Copy,
    /// New block(s) = payload.
    Replace,
    /// New block = zeroes.
    Zero,
    /// New block = payload XOR `block_size` source bytes at byte offset `source`.
    Xor,
}

impl OpKind {
    /// Ops that read the source image (AOSP "ordered ops").
    pub fn is_ordered(self) -> bool {
        matches!(self, Self::Copy | Self::Xor)
    }

    /// Ops that carry a payload in the COW file.
    pub fn has_payload(self) -> bool {
        matches!(self, Self::Replace | Self::Xor)
    }

    /// Upper-case name as AOSP's tools print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Copy => "COPY",
            Self::Replace => "REPLACE",
            Self::Zero => "ZERO",
            Self::Xor => "XOR",
        }
    }
}

/// One parsed data op (metadata ops are consumed by the parser).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CowOp {
    /// What the op does.
    pub kind: OpKind,
    /// First new-image block this op produces.
    pub new_block: u64,
    /// Blocks covered: 2^k for a v3 multi-block REPLACE, else 1.
    pub num_blocks: u64,
    /// COPY: source block. XOR: source byte offset. REPLACE: payload file offset.
    /// ZERO: as stored (0).
    pub source: u64,
    /// Absolute file offset of the payload (REPLACE/XOR), else 0.
    pub data_offset: u64,
    /// Stored payload bytes (REPLACE/XOR), else 0.
    pub data_length: u32,
    /// Algorithm the payload was compressed with (v2: op byte; v3: header).
    pub compression: CompressionAlgorithm,
    /// True if the payload is stored uncompressed under the version's raw rule.
    pub stored_raw: bool,
    /// Index of the op record in file order (v2 counts metadata records too).
    pub index: u64,
}

impl CowOp {
    /// True if `block` is one of the new-image blocks this op produces.
    pub fn covers(&self, block: u64) -> bool {
        block >= self.new_block && block - self.new_block < self.num_blocks
    }
}
