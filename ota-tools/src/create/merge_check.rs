//! The in-place merge safety rule (cow-format.md §6.4, AOSP's `VerifyMergeOps`), over any
//! list of ops given in merge order.
//!
//! 1. Every ordered op (COPY, XOR) comes before every other op.
//! 2. No ordered op reads a block that an earlier-merged op has already overwritten.
//!    Reading one's own target block is fine (read first, then write).

/// One op as the merge sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeStep {
    /// Position of the op in the merge order (for messages).
    pub position: u64,
    /// First target block written.
    pub new_block: u64,
    /// Number of target blocks written.
    pub num_blocks: u64,
    /// True for COPY and XOR.
    pub ordered: bool,
    /// Source blocks read: first block and count (XOR at an unaligned offset reads 2).
    pub reads: Option<(u64, u64)>,
}

/// Why a merge order is unsafe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeCheckError {
    /// An ordered op is merged after a non-ordered one.
    #[error("merge position {position} (new block {new_block}) is a COPY/XOR merged after the REPLACE/ZERO op at merge position {after}")]
    OrderedAfterOther {
        /// Merge position of the ordered op.
        position: u64,
        /// Its target block.
        new_block: u64,
        /// Merge position of the first non-ordered op.
        after: u64,
    },
    /// An op reads a block already overwritten by an earlier-merged op.
    #[error("merge position {position} (new block {new_block}) reads source block {block}, already overwritten by the op at merge position {writer}")]
    ReadAfterWrite {
        /// Merge position of the reading op.
        position: u64,
        /// Its target block.
        new_block: u64,
        /// The block read.
        block: u64,
        /// Merge position of the op that overwrote it.
        writer: u64,
    },
}

/// Checks the rule over `steps` (in merge order). Memory grows with the number of
/// ordered ops only.
pub fn check_merge_order(
    steps: impl IntoIterator<Item = MergeStep>,
) -> Result<(), MergeCheckError> {
    // Blocks overwritten by ordered ops so far, with the merge position of the writer.
    let mut written: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut first_other: Option<u64> = None;
    for s in steps {
        if !s.ordered {
            first_other.get_or_insert(s.position);
            continue;
        }
        if let Some(after) = first_other {
            return Err(MergeCheckError::OrderedAfterOther {
                position: s.position,
                new_block: s.new_block,
                after,
            });
        }
        if let Some((first, count)) = s.reads {
            for block in first..first.saturating_add(count) {
                if let Some(&writer) = written.get(&block) {
                    return Err(MergeCheckError::ReadAfterWrite {
                        position: s.position,
                        new_block: s.new_block,
                        block,
                        writer,
                    });
                }
            }
        }
        for b in s.new_block..s.new_block.saturating_add(s.num_blocks) {
            written.entry(b).or_insert(s.position);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(position: u64, new_block: u64, src: u64) -> MergeStep {
        MergeStep {
            position,
            new_block,
            num_blocks: 1,
            ordered: true,
            reads: Some((src, 1)),
        }
    }

    #[test]
    fn detects_read_after_write_and_allows_self_read() {
        assert!(check_merge_order([copy(0, 1, 2), copy(1, 2, 3)]).is_ok());
        assert!(check_merge_order([copy(0, 5, 5)]).is_ok());
        assert_eq!(
            check_merge_order([copy(0, 2, 3), copy(1, 1, 2)]),
            Err(MergeCheckError::ReadAfterWrite {
                position: 1,
                new_block: 1,
                block: 2,
                writer: 0
            })
        );
    }

    #[test]
    fn detects_ordered_after_other() {
        let other = MergeStep {
            position: 0,
            new_block: 9,
            num_blocks: 1,
            ordered: false,
            reads: None,
        };
        assert!(matches!(
            check_merge_order([other, copy(1, 1, 2)]),
            Err(MergeCheckError::OrderedAfterOther { after: 0, .. })
        ));
    }
}
