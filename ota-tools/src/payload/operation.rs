//! Turning one install operation into the new bytes of its destination
//! extents: decompression (capped at the destination length), bsdiff
//! patching, and the checks shared by `extract` and `to-cow`.

use std::fmt;
use std::io::Read;

use super::bspatch::{self, BsPatchError};
use super::proto::{op_type, Extent, InstallOperation};

/// Largest destination one operation may write in memory (1 GiB). update_engine
/// splits operations far below this; a larger one is refused, not allocated.
pub const MAX_OP_BYTES: u64 = 1 << 30;

/// Names an operation in errors: partition, index and type.
#[derive(Debug, Clone)]
pub struct OpId {
    /// Partition name.
    pub partition: String,
    /// Index in the partition's operation list.
    pub index: usize,
    /// Operation type.
    pub op_type: i32,
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "partition `{}` operation #{} ({})",
            self.partition,
            self.index,
            op_type::name(self.op_type)
        )
    }
}

/// Errors applying one operation.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// An operation type this tool does not apply.
    #[error("{op}: operation type is not supported: {reason}")]
    Unsupported {
        /// The operation.
        op: OpId,
        /// Why.
        reason: &'static str,
    },
    /// Extents are malformed or out of the partition.
    #[error("{op}: {what} extent {start}+{len} is out of bounds ({limit} blocks)")]
    ExtentOutOfBounds {
        /// The operation.
        op: OpId,
        /// `src` or `dst`.
        what: &'static str,
        /// First block.
        start: u64,
        /// Blocks.
        len: u64,
        /// Blocks in the partition image.
        limit: u64,
    },
    /// A length field disagrees with the extents or the data.
    #[error("{op}: {what} is {actual} bytes, expected {expected}")]
    LengthMismatch {
        /// The operation.
        op: OpId,
        /// What was measured.
        what: &'static str,
        /// Measured.
        actual: u64,
        /// Expected.
        expected: u64,
    },
    /// The destination is larger than [`MAX_OP_BYTES`].
    #[error("{op}: destination of {bytes} bytes is larger than the {MAX_OP_BYTES}-byte limit")]
    TooLarge {
        /// The operation.
        op: OpId,
        /// Destination bytes.
        bytes: u64,
    },
    /// Decompression failed.
    #[error("{op}: data does not decompress")]
    Decompress {
        /// The operation.
        op: OpId,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A bsdiff patch failed.
    #[error("{op}: patch does not apply")]
    Patch {
        /// The operation.
        op: OpId,
        /// The cause.
        #[source]
        source: BsPatchError,
    },
}

/// Total blocks of `extents`, checked against `limit_blocks` (sparse holes
/// are refused: this tool never writes or reads them).
pub fn extent_blocks(
    op: &OpId,
    what: &'static str,
    extents: &[Extent],
    limit_blocks: u64,
) -> Result<u64, OpError> {
    let mut total = 0u64;
    for e in extents {
        let bad = || OpError::ExtentOutOfBounds {
            op: op.clone(),
            what,
            start: e.start(),
            len: e.len(),
            limit: limit_blocks,
        };
        let end = e.start().checked_add(e.len()).ok_or_else(bad)?;
        if e.is_empty() || end > limit_blocks {
            return Err(bad());
        }
        total = total.checked_add(e.len()).ok_or_else(bad)?;
    }
    Ok(total)
}

/// `blocks` of `block_size` bytes in bytes; [`OpError::TooLarge`] past `u64`.
fn blocks_to_bytes(id: &OpId, blocks: u64, block_size: u32) -> Result<u64, OpError> {
    blocks
        .checked_mul(u64::from(block_size))
        .ok_or_else(|| OpError::TooLarge {
            op: id.clone(),
            bytes: u64::MAX,
        })
}

/// Destination bytes of `op`, checked against the partition and the limit.
pub fn dst_bytes(
    id: &OpId,
    op: &InstallOperation,
    block_size: u32,
    new_blocks: u64,
) -> Result<u64, OpError> {
    let blocks = extent_blocks(id, "dst", &op.dst_extents, new_blocks)?;
    if blocks == 0 {
        return Err(length_mismatch(id, "destination", 0, 1));
    }
    let bytes = blocks_to_bytes(id, blocks, block_size)?;
    if let Some(dst_length) = op.dst_length {
        if dst_length > bytes {
            return Err(length_mismatch(id, "dst_length", dst_length, bytes));
        }
    }
    Ok(bytes)
}

/// Source bytes of `op` (0 for types without a source), checked against the
/// old partition.
pub fn src_bytes(
    id: &OpId,
    op: &InstallOperation,
    block_size: u32,
    old_blocks: u64,
) -> Result<u64, OpError> {
    let blocks = extent_blocks(id, "src", &op.src_extents, old_blocks)?;
    let bytes = blocks_to_bytes(id, blocks, block_size)?;
    if bytes > MAX_OP_BYTES {
        return Err(OpError::TooLarge {
            op: id.clone(),
            bytes,
        });
    }
    Ok(bytes)
}

/// Whether the operation type reads source extents.
pub fn reads_source(t: i32) -> bool {
    matches!(
        t,
        op_type::SOURCE_COPY
            | op_type::SOURCE_BSDIFF
            | op_type::BROTLI_BSDIFF
            | op_type::PUFFDIFF
            | op_type::ZUCCHINI
            | op_type::LZ4DIFF_BSDIFF
            | op_type::LZ4DIFF_PUFFDIFF
            | op_type::MOVE
            | op_type::BSDIFF
    )
}

/// Whether the operation type carries a data blob.
pub fn has_blob(t: i32) -> bool {
    !matches!(
        t,
        op_type::ZERO | op_type::DISCARD | op_type::SOURCE_COPY | op_type::MOVE
    )
}

/// Why an operation type is not applied, or `None` when it is.
pub fn unsupported_reason(t: i32) -> Option<&'static str> {
    match t {
        op_type::REPLACE
        | op_type::REPLACE_BZ
        | op_type::REPLACE_XZ
        | op_type::ZERO
        | op_type::DISCARD
        | op_type::SOURCE_COPY
        | op_type::SOURCE_BSDIFF
        | op_type::BROTLI_BSDIFF => None,
        op_type::MOVE | op_type::BSDIFF => {
            Some("in-place operations of minor version 1 were removed from update_engine")
        }
        op_type::PUFFDIFF => Some(
            "puffin (deflate-aware diff) has no well-kept Rust implementation; \
             regenerate the payload without --enable_puffdiff",
        ),
        op_type::ZUCCHINI => Some(
            "zucchini exists only as Chromium C++ (the Rust crate binds it); \
             regenerate the payload without --enable_zucchini",
        ),
        op_type::LZ4DIFF_BSDIFF | op_type::LZ4DIFF_PUFFDIFF => Some(
            "LZ4DIFF needs byte-exact re-compression with the C lz4 (HC) encoder, \
             which no Rust crate reproduces; regenerate the payload without --enable_lz4diff",
        ),
        _ => Some("unknown operation type"),
    }
}

/// The [`OpError::LengthMismatch`] of `id`: `what` is `actual` bytes, `expected` were due.
fn length_mismatch(id: &OpId, what: &'static str, actual: u64, expected: u64) -> OpError {
    OpError::LengthMismatch {
        op: id.clone(),
        what,
        actual,
        expected,
    }
}

/// Read a decompressor to its end, refusing more than `cap` bytes.
fn read_capped(id: &OpId, mut r: impl Read, cap: u64) -> Result<Vec<u8>, OpError> {
    let mut out = Vec::new();
    r.by_ref()
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| OpError::Decompress {
            op: id.clone(),
            source,
        })?;
    if out.len() as u64 > cap {
        return Err(length_mismatch(
            id,
            "decompressed data",
            out.len() as u64,
            cap,
        ));
    }
    Ok(out)
}

/// The new bytes of `op`'s destination extents (exactly `dst_len` bytes),
/// from its blob and its source bytes (concatenated source extents).
///
/// The caller has verified the blob and source hashes and bounded `dst_len`.
pub fn new_data(
    id: &OpId,
    op: &InstallOperation,
    blob: &[u8],
    src: &[u8],
    dst_len: u64,
    block_size: u32,
) -> Result<Vec<u8>, OpError> {
    if dst_len > MAX_OP_BYTES {
        return Err(OpError::TooLarge {
            op: id.clone(),
            bytes: dst_len,
        });
    }
    if let Some(reason) = unsupported_reason(op.r#type) {
        return Err(OpError::Unsupported {
            op: id.clone(),
            reason,
        });
    }
    let mut data = match op.r#type {
        op_type::REPLACE => {
            if blob.len() as u64 > dst_len {
                return Err(length_mismatch(
                    id,
                    "REPLACE data",
                    blob.len() as u64,
                    dst_len,
                ));
            }
            blob.to_vec()
        }
        op_type::REPLACE_BZ => read_capped(id, bzip2::read::BzDecoder::new(blob), dst_len)?,
        op_type::REPLACE_XZ => read_capped(id, liblzma::read::XzDecoder::new(blob), dst_len)?,
        op_type::ZERO | op_type::DISCARD => Vec::new(),
        op_type::SOURCE_COPY => {
            if src.len() as u64 != dst_len {
                return Err(length_mismatch(id, "source", src.len() as u64, dst_len));
            }
            src.to_vec()
        }
        op_type::SOURCE_BSDIFF | op_type::BROTLI_BSDIFF => {
            let src = match op.src_length {
                Some(n) if n <= src.len() as u64 => &src[..n as usize],
                Some(n) => return Err(length_mismatch(id, "src_length", n, src.len() as u64)),
                None => src,
            };
            let out_len = op.dst_length.unwrap_or(dst_len);
            bspatch::apply(src, blob, out_len).map_err(|source| OpError::Patch {
                op: id.clone(),
                source,
            })?
        }
        _ => {
            return Err(OpError::Unsupported {
                op: id.clone(),
                reason: "unknown operation type",
            })
        }
    };
    // Whole-block data shorter than the destination by less than a block is
    // zero-padded (REPLACE data is padded to blocks; a dst_length shorter
    // than the extents leaves the tail zero).
    let short = dst_len.saturating_sub(data.len() as u64);
    let is_zero = matches!(op.r#type, op_type::ZERO | op_type::DISCARD);
    let too_short = !is_zero && short >= u64::from(block_size) && op.dst_length.is_none();
    if too_short || data.len() as u64 > dst_len {
        return Err(length_mismatch(
            id,
            "operation output",
            data.len() as u64,
            dst_len,
        ));
    }
    data.resize(dst_len as usize, 0);
    Ok(data)
}
