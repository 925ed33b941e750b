//! Payload preparation: splitting REPLACE/XOR data into op-sized chunks and
//! compressing them, independent of any writer state.
//!
//! [`prepare_replace`] and [`prepare_xor`] are pure functions of their
//! arguments, so callers may run them on many threads and hand the results
//! to [`CowWriter::add_prepared`](super::CowWriter::add_prepared) in order;
//! the file is then byte-identical to one written with `add_replace` /
//! `add_xor` on a single thread.
//!
//! Stored-raw rules (fact sheet §7.2):
//! * v2, no compression: raw, compression byte 0.
//! * v2, lz4/zstd: raw when the compressed stream is ≥ block_size, the
//!   compression byte stays set (the reader treats data_length == block_size
//!   as raw).
//! * v2, gz/brotli: always the compressed stream, even when it is larger.
//! * v3, any algorithm: raw when the compressed stream is ≥ the chunk's
//!   uncompressed size (data_length == uncompressed size means raw).

use crate::compression::{self, CompressionAlgorithm};
use crate::layout::{MAX_NEW_BLOCK, SOURCE_MASK};
use crate::op::{CowVersion, OpKind};

use super::{WriteError, WriterOptions};

/// The options a prepared op depends on; `add_prepared` checks they match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreparedFormat {
    version: CowVersion,
    block_size: u32,
    algorithm: CompressionAlgorithm,
    level: Option<i32>,
    factor: u32,
}

impl PreparedFormat {
    pub(crate) fn of(opts: &WriterOptions) -> Self {
        Self {
            version: opts.version,
            block_size: opts.block_size,
            algorithm: opts.compression.algorithm,
            level: opts.compression.level,
            factor: match opts.version {
                CowVersion::V2 => 0,
                CowVersion::V3 => opts.compression_factor,
            },
        }
    }
}

/// One op record's worth of prepared payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PreparedRecord {
    /// First target block.
    pub(crate) new_block: u64,
    /// The op covers `1 << shift` blocks (v3 REPLACE only; else 0).
    pub(crate) shift: u8,
    /// XOR: source byte offset. REPLACE: unused (the writer assigns the
    /// payload's file offset).
    pub(crate) xor_source: u64,
    /// v2 compression byte of the record.
    pub(crate) compression_id: u8,
    /// Range of this record's payload in [`PreparedOp::payload`].
    pub(crate) payload_start: usize,
    /// Length of the stored payload.
    pub(crate) payload_len: usize,
}

/// REPLACE or XOR data, chunked and compressed, ready for
/// [`CowWriter::add_prepared`](super::CowWriter::add_prepared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedOp {
    pub(crate) format: PreparedFormat,
    pub(crate) kind: OpKind,
    pub(crate) first_block: u64,
    pub(crate) records: Vec<PreparedRecord>,
    pub(crate) payload: Vec<u8>,
}

impl PreparedOp {
    /// REPLACE or XOR.
    pub fn kind(&self) -> OpKind {
        self.kind
    }

    /// First target block.
    pub fn new_block(&self) -> u64 {
        self.first_block
    }

    /// Number of op records this will add.
    pub fn op_count(&self) -> u64 {
        self.records.len() as u64
    }

    /// Total payload bytes this will store.
    pub fn stored_bytes(&self) -> u64 {
        self.payload.len() as u64
    }
}

/// Check `data` is whole blocks and every target block is below 2^32;
/// returns the block count.
fn check_blocks(opts: &WriterOptions, new_block: u64, len: usize) -> Result<u64, WriteError> {
    let bs = opts.block_size as usize;
    if len % bs != 0 {
        return Err(WriteError::DataLength {
            new_block,
            len,
            block_size: opts.block_size,
        });
    }
    let blocks = (len / bs) as u64;
    if blocks > 0 {
        let last = new_block
            .checked_add(blocks - 1)
            .ok_or(WriteError::BlockOutOfRange { new_block })?;
        if last > MAX_NEW_BLOCK {
            return Err(WriteError::BlockOutOfRange { new_block: last });
        }
    }
    Ok(blocks)
}

/// zstd window used for a unit of `unit` bytes (AOSP: log2 of block size for
/// v2, of the compression factor for v3).
fn window_log(opts: &WriterOptions) -> u32 {
    let unit = match opts.version {
        CowVersion::V2 => opts.block_size,
        CowVersion::V3 => opts.compression_factor,
    };
    unit.trailing_zeros()
}

/// Compress one chunk and append the stored form to `payload`.
/// Returns the v2 compression byte.
fn store_chunk(
    opts: &WriterOptions,
    new_block: u64,
    chunk: &[u8],
    payload: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<u8, WriteError> {
    let algorithm = opts.compression.algorithm;
    if algorithm == CompressionAlgorithm::None {
        payload.extend_from_slice(chunk);
        return Ok(0);
    }
    scratch.clear();
    compression::compress_with_window(
        algorithm,
        opts.compression.level,
        Some(window_log(opts)),
        chunk,
        scratch,
    )
    .map_err(|source| WriteError::Compression { new_block, source })?;
    let keep_compressed = match (opts.version, algorithm) {
        (CowVersion::V2, CompressionAlgorithm::Gz | CompressionAlgorithm::Brotli) => true,
        _ => scratch.len() < chunk.len(),
    };
    if keep_compressed {
        if opts.version == CowVersion::V2 && scratch.len() > usize::from(u16::MAX) {
            return Err(WriteError::PayloadTooLarge {
                new_block,
                len: scratch.len(),
            });
        }
        payload.extend_from_slice(scratch);
    } else {
        payload.extend_from_slice(chunk);
    }
    Ok(algorithm.id())
}

/// Split `data` (whole blocks for `new_block`, `new_block + 1`, …) into
/// REPLACE ops and compress them.
///
/// v2: one op per block. v3: the largest power-of-two block count up to the
/// compression factor that still fits, repeatedly (7 blocks at 16 KiB give
/// ops of 4, 2 and 1 blocks). Empty data gives an op list of length 0.
pub fn prepare_replace(
    opts: &WriterOptions,
    new_block: u64,
    data: &[u8],
) -> Result<PreparedOp, WriteError> {
    opts.validate()?;
    let blocks = check_blocks(opts, new_block, data.len())?;
    let bs = opts.block_size as usize;
    let max = opts.max_blocks_per_op();
    let mut op = PreparedOp {
        format: PreparedFormat::of(opts),
        kind: OpKind::Replace,
        first_block: new_block,
        records: Vec::new(),
        payload: Vec::with_capacity(data.len() / 2),
    };
    let mut scratch = Vec::new();
    let mut done = 0u64;
    while done < blocks {
        let remaining = blocks - done;
        // Largest power of two ≤ min(max, remaining); both are ≥ 1.
        let fit = max.min(remaining);
        let shift = 63 - fit.leading_zeros();
        let count = 1u64 << shift;
        let start = done as usize * bs;
        let chunk = &data[start..start + count as usize * bs];
        let block = new_block + done;
        let payload_start = op.payload.len();
        let compression_id = store_chunk(opts, block, chunk, &mut op.payload, &mut scratch)?;
        op.records.push(PreparedRecord {
            new_block: block,
            // shift ≤ 6 because max ≤ 64 (validated options).
            shift: shift as u8,
            xor_source: 0,
            compression_id,
            payload_start,
            payload_len: op.payload.len() - payload_start,
        });
        done += count;
    }
    Ok(op)
}

/// Split `xor_data` (whole blocks for `new_block`, …) into one XOR op per
/// block and compress them. Block `i` is XORed with the source image bytes
/// at `source_byte_offset + i * block_size`.
pub fn prepare_xor(
    opts: &WriterOptions,
    new_block: u64,
    xor_data: &[u8],
    source_byte_offset: u64,
) -> Result<PreparedOp, WriteError> {
    opts.validate()?;
    check_blocks(opts, new_block, xor_data.len())?;
    let bs = opts.block_size as usize;
    let mut op = PreparedOp {
        format: PreparedFormat::of(opts),
        kind: OpKind::Xor,
        first_block: new_block,
        records: Vec::new(),
        payload: Vec::with_capacity(xor_data.len() / 2),
    };
    let mut scratch = Vec::new();
    for (i, chunk) in xor_data.chunks_exact(bs).enumerate() {
        let i = i as u64;
        let block = new_block + i;
        let source = i
            .checked_mul(u64::from(opts.block_size))
            .and_then(|d| d.checked_add(source_byte_offset))
            .filter(|s| *s <= SOURCE_MASK)
            .ok_or(WriteError::SourceOutOfRange {
                new_block: block,
                source_value: source_byte_offset,
            })?;
        let payload_start = op.payload.len();
        let compression_id = store_chunk(opts, block, chunk, &mut op.payload, &mut scratch)?;
        op.records.push(PreparedRecord {
            new_block: block,
            shift: 0,
            xor_source: source,
            compression_id,
            payload_start,
            payload_len: op.payload.len() - payload_start,
        });
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Compression;

    fn v3(factor: u32, compression: &str) -> WriterOptions {
        WriterOptions {
            version: CowVersion::V3,
            compression_factor: factor,
            compression: compression.parse::<Compression>().unwrap(),
            op_count_max: Some(100),
            ..WriterOptions::default()
        }
    }

    fn shifts(op: &PreparedOp) -> Vec<(u64, u8, usize)> {
        op.records
            .iter()
            .map(|r| (r.new_block, r.shift, r.payload_len))
            .collect()
    }

    #[test]
    fn seven_blocks_at_16k_become_4_2_1() {
        let data = vec![0x5au8; 7 * 4096];
        let op = prepare_replace(&v3(16384, "none"), 10, &data).unwrap();
        assert_eq!(
            shifts(&op),
            vec![(10, 2, 16384), (14, 1, 8192), (16, 0, 4096)]
        );
        assert_eq!(op.payload, data);
    }

    #[test]
    fn v2_is_one_block_per_op() {
        let data = vec![1u8; 3 * 4096];
        let op = prepare_replace(&WriterOptions::default(), 0, &data).unwrap();
        assert_eq!(shifts(&op), vec![(0, 0, 4096), (1, 0, 4096), (2, 0, 4096)]);
        assert!(op.records.iter().all(|r| r.compression_id == 0));
    }

    fn incompressible(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def0u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn v2_raw_rules_per_algorithm() {
        let data = incompressible(4096);
        for (alg, raw) in [
            ("lz4", true),
            ("zstd", true),
            ("gz", false),
            ("brotli", false),
        ] {
            let opts = WriterOptions {
                compression: alg.parse().unwrap(),
                ..WriterOptions::default()
            };
            let op = prepare_replace(&opts, 0, &data).unwrap();
            let r = &op.records[0];
            assert_ne!(r.compression_id, 0, "{alg}");
            if raw {
                assert_eq!(op.payload, data, "{alg} must fall back to raw");
            } else {
                assert_ne!(op.payload, data, "{alg} must stay compressed");
                assert!(op.payload.len() > 4096, "{alg}: {}", op.payload.len());
            }
        }
    }

    #[test]
    fn v3_raw_when_not_smaller() {
        let data = incompressible(8192);
        for alg in ["gz", "brotli", "lz4", "zstd"] {
            let op = prepare_replace(&v3(8192, alg), 0, &data).unwrap();
            assert_eq!(shifts(&op), vec![(0, 1, 8192)], "{alg}");
            assert_eq!(op.payload, data);
        }
        let zeros = vec![0u8; 8192];
        let op = prepare_replace(&v3(8192, "lz4"), 0, &zeros).unwrap();
        assert!(op.records[0].payload_len < 8192);
    }

    #[test]
    fn xor_sources_advance_by_block_size() {
        let data = vec![0u8; 3 * 4096];
        let op = prepare_xor(&v3(65536, "none"), 50, &data, 98314).unwrap();
        let sources: Vec<u64> = op.records.iter().map(|r| r.xor_source).collect();
        assert_eq!(sources, vec![98314, 98314 + 4096, 98314 + 8192]);
        assert!(op.records.iter().all(|r| r.shift == 0));
    }

    #[test]
    fn argument_errors() {
        let o = WriterOptions::default();
        assert!(matches!(
            prepare_replace(&o, 0, &[0u8; 100]),
            Err(WriteError::DataLength { len: 100, .. })
        ));
        assert!(matches!(
            prepare_replace(&o, u64::from(u32::MAX), &[0u8; 8192]),
            Err(WriteError::BlockOutOfRange { .. })
        ));
        prepare_replace(&o, u64::from(u32::MAX), &[0u8; 4096]).unwrap();
        assert!(matches!(
            prepare_xor(&o, 0, &[0u8; 8192], SOURCE_MASK - 10),
            Err(WriteError::SourceOutOfRange { .. })
        ));
        assert_eq!(prepare_replace(&o, 7, &[]).unwrap().op_count(), 0);
    }

    #[test]
    fn deterministic() {
        let data = incompressible(4096 * 5);
        let o = v3(16384, "zstd,5");
        assert_eq!(
            prepare_replace(&o, 3, &data).unwrap(),
            prepare_replace(&o, 3, &data).unwrap()
        );
    }
}
