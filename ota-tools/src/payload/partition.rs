//! Checks on a partition's update before any byte is written: a file name
//! that stays inside the output directory, sizes that are whole blocks, and
//! destination extents that do not overlap.

use std::collections::BTreeSet;

use super::operation::{extent_blocks, OpError, OpId};
use super::proto::{DeltaArchiveManifest, PartitionUpdate};

/// Errors in a partition's description.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// A name that is not a plain file name.
    #[error("partition name {name:?} is not a plain file name (letters, digits, '_', '-', '.')")]
    BadName {
        /// The name.
        name: String,
    },
    /// A requested partition is not in the payload.
    #[error("partition `{name}` is not in the payload (it has: {available})")]
    NotInPayload {
        /// The name asked for.
        name: String,
        /// The payload's partitions.
        available: String,
    },
    /// A partition appears twice.
    #[error("partition `{name}` appears twice in the manifest")]
    Duplicate {
        /// The name.
        name: String,
    },
    /// No new size, one that is not whole blocks, or one above [`MAX_PARTITION_SIZE`].
    #[error("partition `{name}`: new size {size:?} is missing, not a multiple of the {block_size}-byte block, or above 1 TiB")]
    BadSize {
        /// The partition.
        name: String,
        /// The size found.
        size: Option<u64>,
        /// Block size.
        block_size: u32,
    },
    /// Two operations write the same block.
    #[error("{op}: destination block {block} is also written by an earlier operation")]
    Overlap {
        /// The second operation.
        op: OpId,
        /// The block.
        block: u64,
    },
    /// An operation's extents are out of bounds.
    #[error(transparent)]
    Op(#[from] OpError),
}

/// Check that `name` is a plain file name component.
pub fn check_name(name: &str) -> Result<(), PartitionError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(PartitionError::BadName {
            name: name.to_string(),
        })
    }
}

/// The partitions to process: all, or those named in `wanted` (in manifest order).
pub fn select<'a>(
    manifest: &'a DeltaArchiveManifest,
    wanted: Option<&[String]>,
) -> Result<Vec<&'a PartitionUpdate>, PartitionError> {
    let mut seen = BTreeSet::new();
    for p in &manifest.partitions {
        check_name(&p.partition_name)?;
        if !seen.insert(p.partition_name.as_str()) {
            return Err(PartitionError::Duplicate {
                name: p.partition_name.clone(),
            });
        }
    }
    if let Some(wanted) = wanted {
        for w in wanted {
            if !seen.contains(w.as_str()) {
                return Err(PartitionError::NotInPayload {
                    name: w.clone(),
                    available: seen.iter().copied().collect::<Vec<_>>().join(", "),
                });
            }
        }
    }
    Ok(manifest
        .partitions
        .iter()
        .filter(|p| wanted.is_none_or(|w| w.contains(&p.partition_name)))
        .collect())
}

/// Largest partition accepted (1 TiB): far above any real partition, and a
/// bound on the work a hostile size can ask for.
pub const MAX_PARTITION_SIZE: u64 = 1 << 40;

/// The new partition's size in bytes and blocks.
pub fn new_size(p: &PartitionUpdate, block_size: u32) -> Result<(u64, u64), PartitionError> {
    let size = p.new_partition_info.as_ref().and_then(|i| i.size);
    let bs = u64::from(block_size.max(1));
    match size {
        Some(s) if s % bs == 0 && s <= MAX_PARTITION_SIZE => Ok((s, s / bs)),
        _ => Err(PartitionError::BadSize {
            name: p.partition_name.clone(),
            size,
            block_size,
        }),
    }
}

/// Check every operation's destination extents: inside the partition and
/// written by one operation only.
pub fn check_destinations(p: &PartitionUpdate, new_blocks: u64) -> Result<(), PartitionError> {
    let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
    for (index, op) in p.operations.iter().enumerate() {
        let id = OpId {
            partition: p.partition_name.clone(),
            index,
            op_type: op.r#type,
        };
        extent_blocks(&id, "dst", &op.dst_extents, new_blocks)?;
        for e in &op.dst_extents {
            ranges.push((e.start(), e.start() + e.len(), index));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            let index = w[0].2.max(w[1].2);
            return Err(PartitionError::Overlap {
                op: OpId {
                    partition: p.partition_name.clone(),
                    index,
                    op_type: p.operations[index].r#type,
                },
                block: w[1].0,
            });
        }
    }
    Ok(())
}
