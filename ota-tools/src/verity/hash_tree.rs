//! The dm-verity hash tree as update_engine's verity writer lays it out.
//!
//! Level 0 holds one digest per data block; each higher level holds one digest per block
//! of the level below; the last level fits in one block. Every digest is
//! `H(salt || block)`, written into a slot of the digest size rounded up to a power of
//! two (zero-filled), and every level is zero-padded to a whole block. The tree is stored
//! top level first. The root hash is `H(salt || top-level block)`.

use rayon::prelude::*;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

use super::{whole_blocks, VerityError, VerityInput};

/// A hash algorithm a dm-verity tree can use (the names update_engine accepts in
/// `hash_tree_algorithm`, compared without case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// SHA-1 (20-byte digests in 32-byte slots).
    Sha1,
    /// SHA-256, the usual choice.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl HashAlgorithm {
    /// Parses `sha1`, `sha256` or `sha512` (any case).
    pub fn parse(name: &str) -> Result<Self, VerityError> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            "sha512" => Ok(Self::Sha512),
            _ => Err(VerityError::UnknownAlgorithm {
                name: name.to_string(),
            }),
        }
    }

    /// Length of one digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Bytes one digest occupies in the tree: the digest length rounded up to a power of
    /// two.
    pub fn slot_len(self) -> usize {
        self.digest_len().next_power_of_two()
    }
}

/// A computed hash tree and its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    /// The tree bytes, top level first, as written at `hash_tree_offset`.
    pub tree: Vec<u8>,
    /// The root digest (`digest_len` bytes), as in the AVB hashtree descriptor.
    pub root: Vec<u8>,
}

/// Checks the block size against the algorithm: a power of two (as the kernel requires)
/// holding more than two slots (as AOSP's tree builder requires).
fn check_block_size(block_size: u32, algorithm: HashAlgorithm) -> Result<(), VerityError> {
    if !block_size.is_power_of_two() {
        return Err(VerityError::BlockSize {
            block_size,
            reason: "it must be a power of two",
        });
    }
    let min = 2 * algorithm.slot_len() as u64;
    if u64::from(block_size) <= min {
        return Err(VerityError::BlockSize {
            block_size,
            reason: "a block must hold more than two digests",
        });
    }
    Ok(())
}

/// Size in bytes of the hash tree for `data_size` bytes of data (`hash_tree_size`).
pub fn hash_tree_size(
    data_size: u64,
    block_size: u32,
    algorithm: &str,
) -> Result<u64, VerityError> {
    tree_size(data_size, block_size, HashAlgorithm::parse(algorithm)?)
}

/// [`hash_tree_size`] for a parsed algorithm; also validates the block size and length.
fn tree_size(
    data_size: u64,
    block_size: u32,
    algorithm: HashAlgorithm,
) -> Result<u64, VerityError> {
    check_block_size(block_size, algorithm)?;
    let mut blocks = whole_blocks(data_size, block_size)?;
    let per_block = u64::from(block_size) / algorithm.slot_len() as u64;
    let mut total = 0u64;
    loop {
        blocks = blocks.div_ceil(per_block);
        total += blocks;
        if blocks <= 1 {
            break;
        }
    }
    total
        .checked_mul(u64::from(block_size))
        .ok_or(VerityError::TooLarge {
            what: "hash tree size",
            len: data_size,
        })
}

/// dm-verity hash tree bytes for `data` (whole blocks), as update_engine and avbtool lay
/// it out: levels top-down, each level padded to a block, the salt prepended to every
/// hashed block. `algorithm` is `"sha1"`, `"sha256"` or `"sha512"` (any case).
pub fn hash_tree(
    data: &[u8],
    block_size: u32,
    algorithm: &str,
    salt: &[u8],
) -> Result<Vec<u8>, VerityError> {
    Ok(hash_tree_with_root(data, block_size, algorithm, salt)?.tree)
}

/// Like [`hash_tree`], also returning the root digest.
pub fn hash_tree_with_root(
    data: &[u8],
    block_size: u32,
    algorithm: &str,
    salt: &[u8],
) -> Result<HashTree, VerityError> {
    hash_tree_of(data, block_size, algorithm, salt)
}

/// [`hash_tree_with_root`] over any [`VerityInput`], e.g. an [`super::ImageRegion`] of
/// an image file: data blocks are read (in parallel) and hashed, never held all at once;
/// only the tree itself is kept in memory.
pub fn hash_tree_of<I: VerityInput + ?Sized>(
    input: &I,
    block_size: u32,
    algorithm: &str,
    salt: &[u8],
) -> Result<HashTree, VerityError> {
    let algorithm = HashAlgorithm::parse(algorithm)?;
    // Validates the block size and the data length, and bounds the output size.
    let size = tree_size(input.len(), block_size, algorithm)?;
    let size = usize::try_from(size).map_err(|_| VerityError::TooLarge {
        what: "hash tree size",
        len: input.len(),
    })?;
    let block_size = block_size as usize;
    let slot = algorithm.slot_len();
    let tree = match algorithm {
        HashAlgorithm::Sha1 => build::<Sha1, I>(input, block_size, salt, slot)?,
        HashAlgorithm::Sha256 => build::<Sha256, I>(input, block_size, salt, slot)?,
        HashAlgorithm::Sha512 => build::<Sha512, I>(input, block_size, salt, slot)?,
    };
    debug_assert_eq!(tree.tree.len(), size);
    Ok(tree)
}

/// Builds every level bottom-up, then stores them top-down.
fn build<D, I>(
    input: &I,
    block_size: usize,
    salt: &[u8],
    slot_len: usize,
) -> Result<HashTree, VerityError>
where
    D: Digest + Clone + Send + Sync,
    I: VerityInput + ?Sized,
{
    let salted = D::new().chain_update(salt);
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let mut top = hash_level(&salted, input, block_size, slot_len)?;
    while top.len() > block_size {
        let next = hash_level(&salted, top.as_slice(), block_size, slot_len)?;
        levels.push(std::mem::replace(&mut top, next));
    }
    let root = salted.clone().chain_update(&top).finalize().to_vec();
    let mut tree = top;
    for level in levels.iter().rev() {
        tree.extend_from_slice(level);
    }
    Ok(HashTree { tree, root })
}

/// One level: a slot per block of `input`, zero-padded to a whole block.
fn hash_level<D, I>(
    salted: &D,
    input: &I,
    block_size: usize,
    slot_len: usize,
) -> Result<Vec<u8>, VerityError>
where
    D: Digest + Clone + Send + Sync,
    I: VerityInput + ?Sized,
{
    // The caller checked that the tree, a slot per block and more, fits in memory.
    let blocks = (input.len() / block_size as u64) as usize;
    let used = blocks * slot_len;
    let mut out = vec![0u8; used.div_ceil(block_size) * block_size];
    out[..used]
        .par_chunks_mut(slot_len)
        .enumerate()
        .with_min_len(64)
        .try_for_each_init(
            || vec![0u8; block_size],
            |scratch, (i, slot)| {
                let offset = i as u64 * block_size as u64;
                let block = input
                    .bytes_at(offset, scratch)
                    .map_err(|source| VerityError::Read { offset, source })?;
                let digest = salted.clone().chain_update(block).finalize();
                slot[..digest.len()].copy_from_slice(&digest);
                Ok::<(), VerityError>(())
            },
        )?;
    Ok(out)
}
