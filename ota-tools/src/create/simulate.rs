//! An in-memory in-place merge of a [`Plan`], exactly as a device would merge the COW the
//! plan describes: ordered ops in sequence order reading the *partly merged* device, then
//! ZERO/REPLACE ascending. Used by the tests to prove that plans are correct and safely
//! ordered before (and independently of) any COW file is written.

use super::classify::BlockClass;
use super::merge_check::{check_merge_order, MergeCheckError};
use super::plan::{Plan, PlannedOp};
use super::BLOCK_SIZE;

/// Why a simulated merge failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulateError {
    /// The merge order breaks the §6.4 rule.
    #[error("unsafe merge order")]
    Unsafe(#[from] MergeCheckError),
    /// The merged device differs from the target.
    #[error("merged block {block} differs from the target")]
    Mismatch {
        /// First differing target block.
        block: u64,
    },
    /// An op reads or writes outside the images.
    #[error("op for block {block} reaches outside the images")]
    OutOfRange {
        /// Target block of the op.
        block: u64,
    },
    /// The plan does not cover the target (sizes disagree).
    #[error("plan covers {plan} blocks but the target has {target}")]
    Size {
        /// Blocks in the plan.
        plan: u64,
        /// Blocks in the target.
        target: u64,
    },
}

fn blk(data: &[u8], n: u32) -> &[u8] {
    let s = n as usize * BLOCK_SIZE;
    &data[s..s + BLOCK_SIZE]
}

/// Merges `plan` in place over a copy of `source` and compares the result with `target`.
/// Device blocks beyond the source start as a junk pattern, so a plan that forgets to
/// write them fails.
pub fn simulate_merge(source: &[u8], target: &[u8], plan: &Plan) -> Result<(), SimulateError> {
    check_merge_order(plan.merge_steps())?;
    let tblocks = (target.len() / BLOCK_SIZE) as u64;
    if plan.target_blocks() != tblocks {
        return Err(SimulateError::Size {
            plan: plan.target_blocks(),
            target: tblocks,
        });
    }
    let src_len = source.len() / BLOCK_SIZE * BLOCK_SIZE;
    let mut dev = source[..src_len].to_vec();
    if dev.len() < target.len() {
        dev.resize(target.len(), 0xA5);
    }
    let mut tmp = vec![0u8; BLOCK_SIZE];
    for op in plan.ops(16) {
        let (read_end, write_end) = match op {
            PlannedOp::Copy { new_block, source } => (
                (source as usize + 1) * BLOCK_SIZE,
                (new_block as usize + 1) * BLOCK_SIZE,
            ),
            PlannedOp::Xor {
                new_block,
                source_offset,
            } => (
                source_offset as usize + BLOCK_SIZE,
                (new_block as usize + 1) * BLOCK_SIZE,
            ),
            PlannedOp::Zero { new_block, count } | PlannedOp::Replace { new_block, count } => {
                (0, (new_block as usize + count as usize) * BLOCK_SIZE)
            }
        };
        if read_end > src_len || write_end > target.len() {
            return Err(SimulateError::OutOfRange {
                block: u64::from(op.new_block()),
            });
        }
        match op {
            PlannedOp::Copy {
                new_block,
                source: s,
            } => {
                tmp.copy_from_slice(blk(&dev, s));
                let d = new_block as usize * BLOCK_SIZE;
                dev[d..d + BLOCK_SIZE].copy_from_slice(&tmp);
            }
            PlannedOp::Xor {
                new_block,
                source_offset,
            } => {
                let s = source_offset as usize;
                // The COW payload was computed against the original source...
                let payload: Vec<u8> = blk(target, new_block)
                    .iter()
                    .zip(&source[s..s + BLOCK_SIZE])
                    .map(|(a, b)| a ^ b)
                    .collect();
                // ...and the device applies it to whatever those bytes hold now.
                for ((t, p), d) in tmp.iter_mut().zip(&payload).zip(&dev[s..s + BLOCK_SIZE]) {
                    *t = p ^ d;
                }
                let d = new_block as usize * BLOCK_SIZE;
                dev[d..d + BLOCK_SIZE].copy_from_slice(&tmp);
            }
            PlannedOp::Zero { new_block, count } => {
                let d = new_block as usize * BLOCK_SIZE;
                dev[d..d + count as usize * BLOCK_SIZE].fill(0);
            }
            PlannedOp::Replace { new_block, count } => {
                let d = new_block as usize * BLOCK_SIZE;
                let e = d + count as usize * BLOCK_SIZE;
                dev[d..e].copy_from_slice(&target[d..e]);
            }
        }
    }
    for n in 0..tblocks as u32 {
        let unchanged_ok = plan.classes[n as usize] != BlockClass::Unchanged
            || (n as usize + 1) * BLOCK_SIZE <= src_len;
        if !unchanged_ok || blk(&dev, n) != blk(target, n) {
            return Err(SimulateError::Mismatch {
                block: u64::from(n),
            });
        }
    }
    Ok(())
}
