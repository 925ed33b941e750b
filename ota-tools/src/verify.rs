//! `ota-tools verify`: does a COW turn the source image into the target image when a
//! device merges it in place?
//!
//! Two checks, in this order:
//!
//! 1. **Merge-order safety** (cow-format.md §6.4): walking the ops in snapuserd's merge
//!    order (sequence first, other ops ascending), no COPY/XOR may read a source block
//!    that an earlier-merged op has already overwritten, and every COPY/XOR comes before
//!    every REPLACE/ZERO. No op may write a block beyond the target's end.
//! 2. **Content**: every target block is compared with what the COW produces for it.
//!
//! When check 1 passes, every read of the in-place merge sees the original source bytes,
//! so the block the merge leaves is exactly the block the reader produces against the
//! untouched source image; check 2 can therefore stream both images with bounded memory
//! (one batch of blocks) instead of merging a full copy of the source.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use cow_format::reader::{MergeMode, ReadError};
use cow_format::{CowReader, OpKind};
use rayon::prelude::*;

use crate::create::command::check_target_size;
use crate::create::image::{BlockImage, ImageError};
use crate::create::merge_check::{check_merge_order, MergeCheckError, MergeStep};
use crate::create::plan::PlanError;
use crate::progress::Progress;
use crate::sparse::ImageSource;

/// Target blocks compared per parallel batch.
const VERIFY_BATCH_BLOCKS: u64 = 1024;

/// Why verification could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// An image could not be opened or read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The target is not a whole number of 4 KiB blocks (the rule `create` applies too).
    #[error(transparent)]
    TargetSize(#[from] PlanError),
    /// The COW could not be opened.
    #[error("cannot open COW {path}")]
    OpenCow {
        /// COW path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The COW could not be parsed or read.
    #[error("COW {path}")]
    Cow {
        /// COW path.
        path: PathBuf,
        /// Underlying error.
        source: ReadError,
    },
    /// The COW's block size is not 4096.
    #[error("COW {path} has block size {block_size}; only 4096 is supported")]
    BlockSize {
        /// COW path.
        path: PathBuf,
        /// Its block size.
        block_size: u32,
    },
    /// The merge order reads a block after overwriting it.
    #[error("unsafe merge order")]
    UnsafeOrder(#[from] MergeCheckError),
    /// An op writes beyond the end of the target.
    #[error("op {index} writes block {block}, beyond the target's {target_blocks} blocks")]
    BeyondTarget {
        /// File-order op index.
        index: u64,
        /// Block written.
        block: u64,
        /// Blocks in the target.
        target_blocks: u64,
    },
    /// A block has no op and the source has no block at that position.
    #[error("block {block} has no op in the COW and lies beyond the source image")]
    Uncovered {
        /// Target block.
        block: u64,
    },
    /// The merged block differs from the target.
    #[error(
        "block {block} does not match the target (first difference at byte {byte} of the block)"
    )]
    Mismatch {
        /// First mismatching target block.
        block: u64,
        /// First differing byte inside that block.
        byte: usize,
    },
}

/// What a successful verification saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// Target blocks compared.
    pub blocks: u64,
    /// Data ops in the COW.
    pub ops: u64,
    /// Ordered (COPY/XOR) ops checked for merge safety.
    pub ordered_ops: u64,
}

/// The merge steps of a COW, in `mode`'s merge order.
fn merge_steps(reader: &CowReader, bs: u64, mode: MergeMode) -> Vec<MergeStep> {
    reader
        .merge_order(mode.order_options(false))
        .enumerate()
        .map(|(i, op)| {
            let reads = match op.kind {
                OpKind::Copy => Some((op.source, 1)),
                OpKind::Xor => Some((op.source / bs, if op.source % bs == 0 { 1 } else { 2 })),
                _ => None,
            };
            MergeStep {
                position: i as u64,
                new_block: op.new_block,
                num_blocks: op.num_blocks,
                ordered: op.kind.is_ordered(),
                reads,
            }
        })
        .collect()
}

/// Adapter so the COW reader can read our source image.
struct Source<'a>(&'a ImageSource);

impl cow_format::reader::SourceImage for Source<'_> {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, byte_offset)
    }
}

/// Verifies that `cow` turns `source` into `target` when merged in place by snapuserd's
/// user-space merge ([`MergeMode::User`]). Returns the first problem found, or a report.
pub fn verify(source: &Path, target: &Path, cow: &Path) -> Result<VerifyReport, VerifyError> {
    verify_in_mode(source, target, cow, MergeMode::User)
}

/// Like [`verify`], checking the merge-order safety rule in `mode`'s merge order (the two
/// modes differ in where ops outside the sequence are merged, so a COW can be safe in one
/// and not the other).
pub fn verify_in_mode(
    source: &Path,
    target: &Path,
    cow: &Path,
    mode: MergeMode,
) -> Result<VerifyReport, VerifyError> {
    let src = ImageSource::open(source)?;
    let tgt = ImageSource::open(target)?;
    check_target_size(&tgt)?;
    let cow_err = |source| VerifyError::Cow {
        path: cow.to_path_buf(),
        source,
    };
    let file = File::open(cow).map_err(|source| VerifyError::OpenCow {
        path: cow.to_path_buf(),
        source,
    })?;
    let reader = CowReader::open(file).map_err(cow_err)?;
    if reader.block_size() != crate::create::BLOCK_SIZE as u32 {
        return Err(VerifyError::BlockSize {
            path: cow.to_path_buf(),
            block_size: reader.block_size(),
        });
    }
    let bs = u64::from(reader.block_size());
    let target_blocks = tgt.block_count();
    for op in reader.ops() {
        let last = op.new_block.saturating_add(op.num_blocks.saturating_sub(1));
        if last >= target_blocks {
            return Err(VerifyError::BeyondTarget {
                index: op.index,
                block: last,
                target_blocks,
            });
        }
    }
    let steps = merge_steps(&reader, bs, mode);
    let ordered_ops = steps.iter().filter(|s| s.ordered).count() as u64;
    check_merge_order(steps)?;

    let bar = Progress::bytes("verifying", tgt.len_bytes());
    let src_adapter = Source(&src);
    let src_blocks = src.block_count();
    let mut tbuf = vec![0u8; VERIFY_BATCH_BLOCKS as usize * bs as usize];
    let mut first = 0u64;
    while first < target_blocks {
        let count = (target_blocks - first).min(VERIFY_BATCH_BLOCKS);
        let chunk = &mut tbuf[..(count * bs) as usize];
        tgt.read_blocks(first, chunk)?;
        let chunk = &*chunk;
        // The first problem of the batch, by block number (deterministic).
        let problem = chunk
            .par_chunks_exact(bs as usize)
            .enumerate()
            .map(|(i, want)| -> Result<(), VerifyError> {
                let block = first + i as u64;
                if reader.find_op(block).is_none() && block >= src_blocks {
                    return Err(VerifyError::Uncovered { block });
                }
                let mut got = vec![0u8; bs as usize];
                reader
                    .read_block(block, &src_adapter, &mut got)
                    .map_err(cow_err)?;
                match got.iter().zip(want).position(|(a, b)| a != b) {
                    Some(byte) => Err(VerifyError::Mismatch { block, byte }),
                    None => Ok(()),
                }
            })
            .find_first(|r| r.is_err());
        if let Some(Err(e)) = problem {
            return Err(e);
        }
        bar.advance(count * bs);
        first += count;
    }
    bar.finish();
    Ok(VerifyReport {
        blocks: target_blocks,
        ops: reader.ops().len() as u64,
        ordered_ops,
    })
}
