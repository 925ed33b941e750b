//! [`BlockSource`] on a COW file: produce the new-image block of a planned op.
//!
//! * REPLACE: decompress the op's payload. A v3 multi-block REPLACE decompresses the whole
//!   op at once; the last one is kept per worker thread, so reading its blocks in turn (what
//!   dm-snapshot does for a sequential read) decompresses it once.
//! * ZERO: zero-fill.
//! * COPY: 4096 bytes of `source` at `block * 4096`.
//! * XOR: the decompressed mask XOR 4096 bytes of `source` at the op's byte offset.
//!
//! `source` is what the core passes: the source device, or a merge window's saved bytes.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use cow_format::{CowReader, CowStorage, OpKind as CowOpKind};

use crate::snapshot::block_server::BlockSource;
use crate::snapshot::merge_plan::{OpKind, PlannedOp, SourceDevice, BLOCK_SIZE, BLOCK_SIZE_U64};

/// Distinguishes block sources in the per-thread cache.
static NEXT_SOURCE_ID: AtomicU64 = AtomicU64::new(1);

/// The last decompressed multi-block op of this thread.
#[derive(Default)]
struct UnitCache {
    source_id: u64,
    cow_op: usize,
    valid: bool,
    data: Vec<u8>,
}

thread_local! {
    static UNIT_CACHE: RefCell<UnitCache> = RefCell::new(UnitCache::default());
}

/// Produces op blocks from a COW file through a [`CowReader`].
#[derive(Debug)]
pub struct CowBlockSource<S: CowStorage> {
    reader: CowReader<S>,
    cow_op_of: Vec<u32>,
    id: u64,
}

fn op_error(op_index: usize, what: &str, detail: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("merge-order op {op_index}: {what}: {detail}"))
}

impl<S: CowStorage> CowBlockSource<S> {
    /// Serve the ops of a plan built from `reader`, `cow_op_of` being its side table
    /// ([`super::plan::CowMergePlan::cow_op_of`]).
    pub fn new(reader: CowReader<S>, cow_op_of: Vec<u32>) -> Self {
        CowBlockSource {
            reader,
            cow_op_of,
            id: NEXT_SOURCE_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The reader.
    pub fn reader(&self) -> &CowReader<S> {
        &self.reader
    }

    fn cow_op(&self, op_index: usize) -> io::Result<(usize, &cow_format::CowOp)> {
        let idx = self
            .cow_op_of
            .get(op_index)
            .map(|&i| i as usize)
            .ok_or_else(|| op_error(op_index, "lookup", "no such planned op"))?;
        let op = self
            .reader
            .ops()
            .get(idx)
            .ok_or_else(|| op_error(op_index, "lookup", format!("COW op {idx} missing")))?;
        Ok((idx, op))
    }

    fn read_replace(
        &self,
        op_index: usize,
        planned: &PlannedOp,
        idx: usize,
        op: &cow_format::CowOp,
        out: &mut [u8],
    ) -> io::Result<()> {
        if op.num_blocks == 1 {
            return self
                .reader
                .read_op_data(op, out)
                .map_err(|e| op_error(op_index, "REPLACE payload", e));
        }
        let rel = planned
            .new_block
            .checked_sub(op.new_block)
            .filter(|&r| r < op.num_blocks)
            .ok_or_else(|| op_error(op_index, "REPLACE", "block outside its COW op"))?;
        let start = usize::try_from(rel * BLOCK_SIZE_U64)
            .map_err(|_| op_error(op_index, "REPLACE", "offset overflow"))?;
        let size = usize::try_from(self.reader.payload_size(op))
            .map_err(|_| op_error(op_index, "REPLACE", "payload size overflow"))?;
        UNIT_CACHE.with(|cell| {
            let mut cache = cell.borrow_mut();
            let hit = cache.valid && cache.source_id == self.id && cache.cow_op == idx;
            if !hit {
                cache.valid = false;
                cache.data.resize(size, 0);
                self.reader
                    .read_op_data(op, &mut cache.data[..size])
                    .map_err(|e| op_error(op_index, "REPLACE payload", e))?;
                cache.source_id = self.id;
                cache.cow_op = idx;
                cache.valid = true;
            }
            let bytes = start
                .checked_add(BLOCK_SIZE)
                .and_then(|end| cache.data.get(start..end))
                .ok_or_else(|| op_error(op_index, "REPLACE", "block past the payload"))?;
            out.copy_from_slice(bytes);
            Ok(())
        })
    }
}

impl<S: CowStorage> BlockSource for CowBlockSource<S> {
    fn read_op_block(
        &self,
        op_index: usize,
        op: &PlannedOp,
        source: &dyn SourceDevice,
        out: &mut [u8],
    ) -> io::Result<()> {
        if out.len() != BLOCK_SIZE {
            return Err(op_error(op_index, "read", "output is not one block"));
        }
        let (idx, cow) = self.cow_op(op_index)?;
        let kinds_agree = matches!(
            (op.kind, cow.kind),
            (OpKind::Copy, CowOpKind::Copy)
                | (OpKind::Xor, CowOpKind::Xor)
                | (OpKind::Replace, CowOpKind::Replace)
                | (OpKind::Zero, CowOpKind::Zero)
        );
        if !kinds_agree {
            return Err(op_error(op_index, "lookup", "plan and COW op kinds differ"));
        }
        match op.kind {
            OpKind::Zero => {
                out.fill(0);
                Ok(())
            }
            OpKind::Replace => self.read_replace(op_index, op, idx, cow, out),
            OpKind::Copy => {
                let at = op
                    .source
                    .checked_mul(BLOCK_SIZE_U64)
                    .ok_or_else(|| op_error(op_index, "COPY", "source offset overflow"))?;
                source
                    .read_exact_at(out, at)
                    .map_err(|e| op_error(op_index, "COPY source read", e))
            }
            OpKind::Xor => {
                self.reader
                    .read_op_data(cow, out)
                    .map_err(|e| op_error(op_index, "XOR payload", e))?;
                let mut src = [0u8; BLOCK_SIZE];
                source
                    .read_exact_at(&mut src, op.source)
                    .map_err(|e| op_error(op_index, "XOR source read", e))?;
                for (o, s) in out.iter_mut().zip(src.iter()) {
                    *o ^= s;
                }
                Ok(())
            }
        }
    }
}
