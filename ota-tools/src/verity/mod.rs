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

use std::io;

use crate::create::image::BlockImage;

pub use fec::{fec, fec_of, fec_size};
pub use hash_tree::{
    hash_tree, hash_tree_of, hash_tree_size, hash_tree_with_root, HashAlgorithm, HashTree,
};

/// Input of the verity computations: `len()` bytes readable at any offset, from several
/// threads at once. Slices lend their bytes in place; [`ImageRegion`] reads a range of an
/// image file (raw or sparse) with positioned reads, so a partition never has to be held in
/// memory.
pub trait VerityInput: Sync {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// True when the input has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `scratch.len()` bytes at `offset`, either borrowed from the input or read into
    /// `scratch`. The range lies inside the input.
    fn bytes_at<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> io::Result<&'a [u8]>;
}

impl VerityInput for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn bytes_at<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> io::Result<&'a [u8]> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(scratch.len())?))
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

/// The `len` bytes of `image` from byte `offset` (e.g. a partition's
/// `fec_data_offset`/`fec_data_size`), as a [`VerityInput`].
pub struct ImageRegion<'a> {
    image: &'a dyn BlockImage,
    offset: u64,
    len: u64,
}

impl<'a> ImageRegion<'a> {
    /// The region `[offset, offset + len)` of `image`, which must lie inside it.
    pub fn new(image: &'a dyn BlockImage, offset: u64, len: u64) -> Result<Self, VerityError> {
        match offset.checked_add(len) {
            Some(end) if end <= image.len_bytes() => Ok(Self { image, offset, len }),
            _ => Err(VerityError::RegionOutside {
                offset,
                len,
                image_len: image.len_bytes(),
            }),
        }
    }
}

impl VerityInput for ImageRegion<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn bytes_at<'b>(&'b self, offset: u64, scratch: &'b mut [u8]) -> io::Result<&'b [u8]> {
        let at = self
            .offset
            .checked_add(offset)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        self.image.read_exact_at(scratch, at)?;
        Ok(scratch)
    }
}

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
    /// Reading the input failed.
    #[error("cannot read the verity input at byte {offset}")]
    Read {
        /// Offset in the input.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An [`ImageRegion`] does not lie inside its image.
    #[error("region of {len} bytes at byte {offset} is outside the {image_len}-byte image")]
    RegionOutside {
        /// Start of the region.
        offset: u64,
        /// Length of the region.
        len: u64,
        /// Length of the image.
        image_len: u64,
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
