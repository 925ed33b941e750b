//! The block producer: the one place that turns an op into the bytes of a new-image block.
//!
//! * REPLACE: the decoded payload. A multi-block (v3) REPLACE is decoded whole once and
//!   sliced; the last one decoded is kept per thread (keyed by reader and op), so reading
//!   its blocks in turn, as a sequential read or a merge does, decodes it once.
//! * ZERO: zeroes.
//! * COPY: `block_size` bytes of the source at `source * block_size`.
//! * XOR: the decoded mask XOR `block_size` source bytes at byte offset `source` (any
//!   alignment: the read may span two source blocks).
//!
//! The source is whatever the caller passes: the source image, a device being merged in
//! place, or the bytes a merge saved in a read-ahead window. Choosing it by merge progress
//! is the caller's job; producing the bytes is this module's.

use std::cell::RefCell;

use super::{CowReader, CowStorage, ReadError, SourceImage};
use crate::op::OpKind;

/// Bytes read from the source per step of an XOR (a stack buffer; any block size works).
const XOR_STEP: usize = 4096;

/// The last multi-block op this thread decoded.
#[derive(Default)]
struct DecodedOp {
    /// [`CowReader`] instance it came from (0: none).
    reader: u64,
    /// Position of the op in [`CowReader::ops`].
    op: usize,
    data: Vec<u8>,
}

thread_local! {
    static DECODED: RefCell<DecodedOp> = RefCell::new(DecodedOp::default());
}

impl<S: CowStorage> CowReader<S> {
    /// Produce new-image block `block` of the op at position `op_index` of
    /// [`ops`](Self::ops) into `out` (`block_size` bytes), reading COPY/XOR source bytes
    /// from `source`.
    ///
    /// Errors: no such op, `block` not one of the op's blocks, a buffer of the wrong size,
    /// a payload that fails to read or decode, or a source read that fails.
    pub fn read_op_block(
        &self,
        op_index: usize,
        block: u64,
        source: &dyn SourceImage,
        out: &mut [u8],
    ) -> Result<(), ReadError> {
        let bs = u64::from(self.block_size());
        if out.len() as u64 != bs {
            return Err(ReadError::BufferSize {
                got: out.len(),
                expected: bs,
            });
        }
        let op = self
            .ops
            .get(op_index)
            .ok_or(ReadError::NoSuchOp { position: op_index })?;
        if !op.covers(block) {
            return Err(ReadError::BlockNotInOp {
                index: op.index,
                block,
                first: op.new_block,
                num_blocks: op.num_blocks,
            });
        }
        match op.kind {
            OpKind::Zero => {
                out.fill(0);
                Ok(())
            }
            OpKind::Copy => {
                let offset = op.source.checked_mul(bs).ok_or(ReadError::OutOfRange {
                    index: op.index,
                    what: "COPY source block",
                })?;
                read_source(source, out, offset)
            }
            OpKind::Replace if op.num_blocks == 1 => self.read_op_data(op, out),
            OpKind::Replace => self.read_multi_block(op_index, block, out),
            OpKind::Xor => {
                self.read_op_data(op, out)?;
                xor_with_source(source, out, op.source)
            }
        }
    }

    /// One block of a multi-block REPLACE, through this thread's decoded-op cache.
    fn read_multi_block(
        &self,
        op_index: usize,
        block: u64,
        out: &mut [u8],
    ) -> Result<(), ReadError> {
        let op = self
            .ops
            .get(op_index)
            .ok_or(ReadError::NoSuchOp { position: op_index })?;
        let size = usize::try_from(self.payload_size(op)).map_err(|_| ReadError::Overflow {
            what: "payload size",
        })?;
        // covers() held: block - new_block < num_blocks, and the payload holds them all.
        let start = usize::try_from((block - op.new_block) * u64::from(self.block_size()))
            .map_err(|_| ReadError::Overflow {
                what: "block offset in op",
            })?;
        let slice_into = |data: &[u8], out: &mut [u8]| match start
            .checked_add(out.len())
            .and_then(|end| data.get(start..end))
        {
            Some(bytes) => {
                out.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(ReadError::Overflow {
                what: "block offset in op",
            }),
        };
        DECODED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut cached) => {
                if cached.reader != self.id || cached.op != op_index || cached.data.len() != size {
                    cached.reader = 0;
                    cached.data.resize(size, 0);
                    self.read_op_data(op, &mut cached.data)?;
                    cached.reader = self.id;
                    cached.op = op_index;
                }
                slice_into(&cached.data, out)
            }
            // Re-entered from a source read: decode without the cache.
            Err(_) => {
                let mut data = vec![0u8; size];
                self.read_op_data(op, &mut data)?;
                slice_into(&data, out)
            }
        })
    }
}

/// Fill `buf` with source bytes at `offset`.
pub(super) fn read_source(
    source: &dyn SourceImage,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ReadError> {
    super::read_exact_from("source image", source, buf, offset)
}

/// XOR `out` with the source bytes from byte `offset` on.
fn xor_with_source(source: &dyn SourceImage, out: &mut [u8], offset: u64) -> Result<(), ReadError> {
    let mut src = [0u8; XOR_STEP];
    let mut at = offset;
    for part in out.chunks_mut(XOR_STEP) {
        let src = &mut src[..part.len()];
        read_source(source, src, at)?;
        for (o, s) in part.iter_mut().zip(src.iter()) {
            *o ^= *s;
        }
        at = at
            .checked_add(part.len() as u64)
            .ok_or(ReadError::Overflow {
                what: "XOR source offset",
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::compression::{Compression, CompressionAlgorithm};
    use crate::reader::{CowReader, CowStorage, SourceImage};
    use crate::writer::{CowWriter, WriterOptions};
    use crate::{CowVersion, ReadError};

    /// A v3 lz4 COW: a 4-block REPLACE of `data` at 10, an XOR at 20 (source byte 4196), a
    /// COPY 21 ← 3 and a ZERO at 22.
    fn cow(data: &[u8]) -> CowReader<Vec<u8>> {
        let file = tempfile::tempfile().unwrap();
        let opts = WriterOptions {
            version: CowVersion::V3,
            compression: Compression {
                algorithm: CompressionAlgorithm::Lz4,
                level: None,
            },
            compression_factor: 16384,
            op_count_max: Some(16),
            ..WriterOptions::default()
        };
        let mut w = CowWriter::create(file.try_clone().unwrap(), opts).unwrap();
        w.add_replace(10, data).unwrap();
        w.add_xor(20, &[0x0Fu8; 4096], 4096 + 100).unwrap();
        w.add_copy(21, 3).unwrap();
        w.add_zero(22, 1).unwrap();
        w.finalize().unwrap();
        let mut bytes = vec![0u8; CowStorage::size(&file).unwrap() as usize];
        SourceImage::read_exact_at(&file, &mut bytes, 0).unwrap();
        CowReader::from_storage(bytes).unwrap()
    }

    fn data(seed: u8) -> Vec<u8> {
        (0..4 * 4096)
            .map(|i| b"multi-block replace "[i % 20] ^ seed ^ (i / 4096) as u8)
            .collect()
    }

    #[test]
    fn every_kind_is_produced_and_multi_block_ops_are_sliced() {
        let data = data(0);
        let r = cow(&data);
        let source: Vec<u8> = (0..8 * 4096).map(|i| (i % 13) as u8).collect();
        let mut out = vec![0u8; 4096];
        let pos = |block| r.find_op_index(block).unwrap();
        assert_eq!(
            r.ops()[pos(10)].num_blocks,
            4,
            "the writer made one 4-block op"
        );
        // Out of order and twice: the cache must key by op and slice by block.
        for block in [12u64, 10, 13, 11, 12] {
            r.read_op_block(pos(block), block, &source, &mut out)
                .unwrap();
            let at = (block - 10) as usize * 4096;
            assert_eq!(out, data[at..at + 4096], "block {block}");
        }
        r.read_op_block(pos(20), 20, &source, &mut out).unwrap();
        let expected: Vec<u8> = source[4196..4196 + 4096].iter().map(|s| s ^ 0x0F).collect();
        assert_eq!(out, expected, "XOR at an unaligned source offset");
        r.read_op_block(pos(21), 21, &source, &mut out).unwrap();
        assert_eq!(out, source[3 * 4096..4 * 4096]);
        out.fill(1);
        r.read_op_block(pos(22), 22, &source, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn wrong_block_op_or_buffer_is_an_error() {
        let r = cow(&data(0));
        let source = vec![0u8; 8 * 4096];
        let mut out = vec![0u8; 4096];
        let replace = r.find_op_index(10).unwrap();
        assert!(matches!(
            r.read_op_block(replace, 14, &source, &mut out),
            Err(ReadError::BlockNotInOp { block: 14, .. })
        ));
        assert!(matches!(
            r.read_op_block(r.ops().len(), 10, &source, &mut out),
            Err(ReadError::NoSuchOp { .. })
        ));
        assert!(matches!(
            r.read_op_block(replace, 10, &source, &mut out[..100]),
            Err(ReadError::BufferSize { got: 100, .. })
        ));
        // A source too short for the XOR's second block.
        let xor = r.find_op_index(20).unwrap();
        assert!(matches!(
            r.read_op_block(xor, 20, &vec![0u8; 4096 + 200], &mut out),
            Err(ReadError::Io {
                what: "source image",
                ..
            })
        ));
    }

    #[test]
    fn two_readers_do_not_share_cached_blocks() {
        // Same layout, other bytes: a cache keyed by op position alone would mix them up.
        let (da, db) = (data(0), data(0x55));
        let (a, b) = (cow(&da), cow(&db));
        let mut out = vec![0u8; 4096];
        let src: Vec<u8> = Vec::new();
        for _ in 0..2 {
            a.read_op_block(a.find_op_index(11).unwrap(), 11, &src, &mut out)
                .unwrap();
            assert_eq!(out, da[4096..8192]);
            b.read_op_block(b.find_op_index(11).unwrap(), 11, &src, &mut out)
                .unwrap();
            assert_eq!(out, db[4096..8192]);
        }
    }
}
