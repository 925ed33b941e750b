//! The dm-verity hash tree and FEC regions of a partition, which are not
//! install operations: update_engine computes them on the device from the
//! new data (`hash_tree_*`, `fec_*` fields of the partition update). This
//! module computes them the same way with [`crate::verity`].

use super::proto::{Extent, PartitionUpdate};
use crate::create::image::BlockImage;
use crate::verity::{fec_of, fec_size, hash_tree_of, hash_tree_size, ImageRegion, VerityError};

/// Errors computing verity regions.
#[derive(Debug, thiserror::Error)]
pub enum VerityRegionError {
    /// An extent lies outside the partition or is inconsistent.
    #[error("partition `{partition}`: {what} {start}+{len} is out of bounds ({limit} blocks)")]
    BadExtent {
        /// The partition.
        partition: String,
        /// Which field.
        what: &'static str,
        /// First block.
        start: u64,
        /// Blocks.
        len: u64,
        /// Blocks in the partition.
        limit: u64,
    },
    /// The computed region has another size than its extent.
    #[error(
        "partition `{partition}`: computed {what} is {actual} bytes, its extent holds {expected}"
    )]
    SizeMismatch {
        /// The partition.
        partition: String,
        /// Which region.
        what: &'static str,
        /// Computed size.
        actual: u64,
        /// Extent size.
        expected: u64,
    },
    /// The verity computation failed.
    #[error("partition `{partition}`: {what} computation failed")]
    Compute {
        /// The partition.
        partition: String,
        /// Which region.
        what: &'static str,
        /// The cause.
        #[source]
        source: VerityError,
    },
    /// Reading the partition data failed.
    #[error("partition `{partition}`: cannot read its data for {what}")]
    Io {
        /// The partition.
        partition: String,
        /// Which region.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One computed region: its first block and its bytes (whole blocks).
#[derive(Debug)]
pub struct Region {
    /// What the region is (`hash tree` or `FEC`).
    pub what: &'static str,
    /// First block in the partition.
    pub start_block: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

fn check(
    p: &PartitionUpdate,
    what: &'static str,
    e: &Extent,
    limit: u64,
) -> Result<(u64, u64), VerityRegionError> {
    let end = e.start().checked_add(e.len());
    match end {
        Some(end) if end <= limit && !e.is_empty() => Ok((e.start(), e.len())),
        _ => Err(VerityRegionError::BadExtent {
            partition: p.partition_name.clone(),
            what,
            start: e.start(),
            len: e.len(),
            limit,
        }),
    }
}

fn size_mismatch(
    p: &PartitionUpdate,
    what: &'static str,
    actual: u64,
    expected: u64,
) -> VerityRegionError {
    VerityRegionError::SizeMismatch {
        partition: p.partition_name.clone(),
        what,
        actual,
        expected,
    }
}

/// The region `what` of `p` at `start_block`: its computed bytes `data`,
/// zero-padded to the `extent_bytes` its extent holds (never more).
fn padded_region(
    p: &PartitionUpdate,
    what: &'static str,
    start_block: u64,
    mut data: Vec<u8>,
    extent_bytes: u64,
) -> Result<Region, VerityRegionError> {
    if data.len() as u64 > extent_bytes {
        return Err(size_mismatch(p, what, data.len() as u64, extent_bytes));
    }
    data.resize(extent_bytes as usize, 0);
    Ok(Region {
        what,
        start_block,
        data,
    })
}

/// Whether the partition update asks for verity regions.
pub fn has_verity(p: &PartitionUpdate) -> bool {
    p.hash_tree_extent.is_some_and(|e| !e.is_empty()) || p.fec_extent.is_some_and(|e| !e.is_empty())
}

/// Compute the hash tree then the FEC of `p` from `image`, the new partition
/// as it stands (read in place, never loaded whole). The hash tree is
/// written back through `write_back` before the FEC, which covers it.
pub fn compute(
    p: &PartitionUpdate,
    block_size: u32,
    new_blocks: u64,
    image: &dyn BlockImage,
    write_back: &mut dyn FnMut(&Region) -> std::io::Result<()>,
) -> Result<Vec<Region>, VerityRegionError> {
    let bs = u64::from(block_size);
    let mut regions = Vec::new();
    let compute_err = |what: &'static str| {
        let partition = p.partition_name.clone();
        move |e: VerityError| VerityRegionError::Compute {
            partition,
            what,
            source: e,
        }
    };
    let io = |what: &'static str| {
        let partition = p.partition_name.clone();
        move |source| VerityRegionError::Io {
            partition,
            what,
            source,
        }
    };
    if let (Some(data_e), Some(tree_e)) = (p.hash_tree_data_extent, p.hash_tree_extent) {
        if !tree_e.is_empty() {
            let (ds, dl) = check(p, "hash_tree_data_extent", &data_e, new_blocks)?;
            let (ts, tl) = check(p, "hash_tree_extent", &tree_e, new_blocks)?;
            let algorithm = p.hash_tree_algorithm.as_deref().unwrap_or("sha256");
            let salt = p.hash_tree_salt.as_deref().unwrap_or(&[]);
            // The extent must hold exactly the tree (whole blocks): checked
            // before computing, so a hostile extent allocates nothing.
            let want = hash_tree_size(dl * bs, block_size, algorithm)
                .map_err(compute_err("hash tree"))?
                .div_ceil(bs)
                * bs;
            if want != tl * bs {
                return Err(size_mismatch(p, "hash tree", want, tl * bs));
            }
            let tree = ImageRegion::new(image, ds * bs, dl * bs)
                .and_then(|region| hash_tree_of(&region, block_size, algorithm, salt))
                .map_err(compute_err("hash tree"))?
                .tree;
            let r = padded_region(p, "hash tree", ts, tree, tl * bs)?;
            write_back(&r).map_err(io("hash tree"))?;
            regions.push(r);
        }
    }
    if let (Some(data_e), Some(fec_e)) = (p.fec_data_extent, p.fec_extent) {
        if !fec_e.is_empty() {
            let (ds, dl) = check(p, "fec_data_extent", &data_e, new_blocks)?;
            let (fs, fl) = check(p, "fec_extent", &fec_e, new_blocks)?;
            let roots = p.fec_roots.unwrap_or(2);
            let want = fec_size(dl * bs, roots, block_size).map_err(compute_err("FEC"))?;
            if want != fl * bs {
                return Err(size_mismatch(p, "FEC", want, fl * bs));
            }
            let parity = ImageRegion::new(image, ds * bs, dl * bs)
                .and_then(|region| fec_of(&region, roots, block_size))
                .map_err(compute_err("FEC"))?;
            let r = padded_region(p, "FEC", fs, parity, fl * bs)?;
            write_back(&r).map_err(io("FEC"))?;
            regions.push(r);
        }
    }
    Ok(regions)
}
