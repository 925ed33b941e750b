//! dm-verity metadata computed from partition data as an Android device computes it after
//! an update: the hash tree (`hash_tree_*` fields of an update_engine partition) and the
//! Reed-Solomon FEC parity (`fec_*` fields).
//!
//! How the pieces sit in a partition that carries both (offsets are payload fields):
//!
//! ```text
//! [0, hash_tree_data_size)        filesystem data           (hash_tree_data_extent)
//! [hash_tree_offset, +size)       hash tree of that data    (hash_tree_extent)
//! [0, fec_data_size)              data AND hash tree        (fec_data_extent)
//! [fec_offset, +fec_size)         parity of fec_data only   (fec_extent)
//! ```
//!
//! So the FEC is computed over the data *followed by its hash tree*: the caller passes
//! the bytes of `fec_data_extent` (normally the image up to `fec_offset`, hash tree
//! already written) to [`fec`]. The parity region holds parity bytes only; unlike the
//! output of AOSP's `fec --encode` tool it carries no `fec_header` block (on a device
//! that header lives in the AVB footer area, not in `fec_extent`).
//!
//! * [`hash_tree`] / [`hash_tree_with_root`]: the tree, levels stored top-down, each
//!   level zero-padded to a whole block, each digest zero-padded to a power of two
//!   (SHA-1 digests take 32-byte slots), every hash input prefixed with the salt.
//! * [`fec`]: RS(255, 255 - roots) parity over GF(2^8) (polynomial 0x11d, first
//!   consecutive root alpha^0, primitive element alpha), interleaved across blocks so
//!   that one lost block costs each codeword at most one byte.

mod fec;
mod hash_tree;
mod reed_solomon;

pub use fec::{fec, fec_size};
pub use hash_tree::{hash_tree, hash_tree_size, hash_tree_with_root, HashAlgorithm, HashTree};

/// Errors computing verity metadata. Every one is a bad argument: nothing is read or
/// written, so nothing is lost.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The hash algorithm is not one update_engine accepts.
    #[error("unsupported verity hash algorithm {name:?}; expected sha1, sha256 or sha512")]
    UnknownAlgorithm {
        /// The name given.
        name: String,
    },
    /// The block size cannot hold the tree (or is zero).
    #[error("verity block size {block_size} is invalid: {reason}")]
    BlockSize {
        /// The block size given.
        block_size: u32,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The data is not a whole number of blocks.
    #[error("verity input of {len} bytes is not a whole number of {block_size}-byte blocks")]
    PartialBlock {
        /// Length of the data in bytes.
        len: u64,
        /// The block size.
        block_size: u32,
    },
    /// The data is empty: a hash tree needs at least one block.
    #[error("verity input is empty; at least one block is needed")]
    Empty,
    /// The number of FEC roots is out of range.
    #[error("FEC roots {roots} out of range; libfec accepts 1 to 254 parity bytes per codeword")]
    Roots {
        /// The number of roots given.
        roots: u32,
    },
    /// A size computed from the arguments does not fit in memory or in 64 bits.
    #[error("{what} overflows for an input of {len} bytes")]
    TooLarge {
        /// Which size overflowed.
        what: &'static str,
        /// Length of the input in bytes.
        len: u64,
    },
}

/// Checks that `len` bytes are a non-empty whole number of `block_size`-byte blocks and
/// returns the block count.
fn whole_blocks(len: u64, block_size: u32) -> Result<u64, VerityError> {
    if block_size == 0 {
        return Err(VerityError::BlockSize {
            block_size,
            reason: "it must not be zero",
        });
    }
    if len == 0 {
        return Err(VerityError::Empty);
    }
    if len % u64::from(block_size) != 0 {
        return Err(VerityError::PartialBlock { len, block_size });
    }
    Ok(len / u64::from(block_size))
}
