//! Constant-time lookup of a device block: unchanged, or the merge-order entry that writes
//! it.
//!
//! A bitmap over the device's blocks marks the changed ones; a running count of set bits
//! before each 64-bit word (its *rank*) turns a set bit into an index into a dense array of
//! entries, sorted by block. Memory: 1 bit + 32 bits / 64 = 1.5 bits per device block
//! (192 KiB for a 4 GiB partition), plus 4 bytes per changed block.

use cow_format::{CowReader, CowStorage};

use super::error::UserSnapshotError;
use super::plan::MergePlan;

/// Marker of a slot not yet filled while building.
const UNSET: u32 = u32::MAX;

/// Device block → merge-order entry.
#[derive(Debug)]
pub(crate) struct BlockMap {
    bits: Vec<u64>,
    /// Set bits in `bits[..i]`.
    ranks: Vec<u32>,
    /// Entry of each changed block, in block order.
    entries: Vec<u32>,
}

impl BlockMap {
    /// Map every block of `device_blocks` written by an entry of `plan` to the first entry
    /// that writes it (an op past the device is an error).
    pub(crate) fn build<S: CowStorage>(
        cow: &CowReader<S>,
        plan: &MergePlan,
        device_blocks: u64,
    ) -> Result<Self, UserSnapshotError> {
        let words = device_blocks.div_ceil(64);
        let words = usize::try_from(words).map_err(|_| UserSnapshotError::BaseSize {
            bytes: device_blocks.saturating_mul(4096),
        })?;
        let mut bits = vec![0u64; words];
        let mut changed: u64 = 0;
        for entry in 0..plan.total() {
            let Some((_, op)) = plan.op(cow, entry) else {
                continue;
            };
            let end = op.new_block.checked_add(op.num_blocks);
            if end.is_none_or(|e| e > device_blocks) {
                return Err(UserSnapshotError::OpBeyondDevice {
                    op_index: op.index,
                    block: op.new_block,
                    device_blocks,
                });
            }
            for block in op.new_block..op.new_block + op.num_blocks {
                // block < device_blocks, so the word exists.
                let word = &mut bits[(block / 64) as usize];
                let bit = 1u64 << (block % 64);
                if *word & bit == 0 {
                    *word |= bit;
                    changed += 1;
                }
            }
        }
        if changed > u64::from(u32::MAX) {
            return Err(UserSnapshotError::TooManyEntries { entries: changed });
        }
        let mut ranks = Vec::with_capacity(words);
        let mut running = 0u32;
        for w in &bits {
            ranks.push(running);
            running += w.count_ones();
        }
        let mut map = BlockMap {
            bits,
            ranks,
            entries: vec![UNSET; changed as usize],
        };
        for entry in 0..plan.total() {
            let Some((_, op)) = plan.op(cow, entry) else {
                continue;
            };
            for block in op.new_block..op.new_block + op.num_blocks {
                if let Some(slot) = map.slot(block) {
                    let e = &mut map.entries[slot];
                    // First entry wins (entries are walked in merge order); entry < 2^32 - 1.
                    if *e == UNSET {
                        *e = entry as u32;
                    }
                }
            }
        }
        Ok(map)
    }

    fn slot(&self, block: u64) -> Option<usize> {
        let word = usize::try_from(block / 64).ok()?;
        let w = *self.bits.get(word)?;
        let bit = 1u64 << (block % 64);
        if w & bit == 0 {
            return None;
        }
        let below = (w & (bit - 1)).count_ones();
        Some((self.ranks[word] + below) as usize)
    }

    /// The first merge-order entry that writes `block`, or `None` if no op changes it.
    pub(crate) fn entry(&self, block: u64) -> Option<u64> {
        self.entries.get(self.slot(block)?).map(|&e| u64::from(e))
    }

    /// Heap bytes used.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.bits.len() * 8 + self.ranks.len() * 4 + self.entries.len() * 4
    }
}
