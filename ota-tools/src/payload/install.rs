//! One install operation end to end: read its blob by offset and check its
//! `data_sha256_hash`, read its source extents from the old image and check
//! its `src_sha256_hash`, and compute its new bytes. Shared by `extract` and
//! `to-cow`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::operation::{self, has_blob, reads_source, OpError, OpId, MAX_OP_BYTES};
use super::proto::{Extent, InstallOperation};
use super::reader::{Payload, PayloadReadError};
use crate::create::image::BlockImage;
use crate::sparse::ImageSource;

/// Errors running one install operation.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The blob could not be read.
    #[error("{op}: blob cannot be read")]
    Blob {
        /// The operation.
        op: OpId,
        /// The cause.
        #[source]
        source: PayloadReadError,
    },
    /// The blob's SHA-256 differs from `data_sha256_hash`.
    #[error("{op}: blob SHA-256 does not match data_sha256_hash (corrupt payload)")]
    BlobHash {
        /// The operation.
        op: OpId,
    },
    /// The source bytes' SHA-256 differs from `src_sha256_hash`.
    #[error("{op}: source SHA-256 does not match src_sha256_hash (wrong or modified old image)")]
    SourceHash {
        /// The operation.
        op: OpId,
    },
    /// The operation reads a source but no old image was given.
    #[error("{op}: needs the old partition image (pass --source-dir)")]
    NoSource {
        /// The operation.
        op: OpId,
    },
    /// Reading the old image failed.
    #[error("{op}: cannot read the old image {path} at byte {offset}")]
    SourceIo {
        /// The operation.
        op: OpId,
        /// The image.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operation itself failed.
    #[error(transparent)]
    Op(#[from] OpError),
}

/// An old partition image opened for reading by extent: a raw image, or an
/// Android sparse image (detected by its magic) read as the raw image it
/// describes.
pub struct OldImage {
    path: PathBuf,
    image: ImageSource,
    size: u64,
}

impl std::fmt::Debug for OldImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OldImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("sparse", &self.image.is_sparse())
            .finish()
    }
}

impl OldImage {
    /// Open `path` (raw or sparse).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let image = ImageSource::open(path).map_err(std::io::Error::other)?;
        let size = image.len_bytes();
        Ok(Self {
            path: path.to_path_buf(),
            image,
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read `buf.len()` bytes at `offset`; bytes past the end of the file read
    /// as zero (an old image may be shorter than its partition).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.image.read_exact_at(&mut buf[..avail], offset)?;
        buf[avail..].fill(0);
        Ok(())
    }

    /// Concatenated bytes of `extents` (already bounds-checked by the caller).
    pub fn read_extents(
        &self,
        id: &OpId,
        extents: &[Extent],
        block_size: u32,
        total: u64,
    ) -> Result<Vec<u8>, InstallError> {
        let mut buf = vec![0u8; total as usize];
        let mut pos = 0usize;
        for e in extents {
            let len = (e.len() * u64::from(block_size)) as usize;
            let offset = e.start() * u64::from(block_size);
            self.read_at(&mut buf[pos..pos + len], offset)
                .map_err(|source| InstallError::SourceIo {
                    op: id.clone(),
                    path: self.path.clone(),
                    offset,
                    source,
                })?;
            pos += len;
        }
        Ok(buf)
    }
}

/// What running one operation produced.
#[derive(Debug)]
pub struct OpOutput {
    /// New bytes of the destination extents, concatenated.
    pub new_data: Vec<u8>,
    /// The source bytes the operation read (empty when it reads none).
    pub source: Vec<u8>,
}

/// Blocks of a partition, for bounds checks.
#[derive(Debug, Clone, Copy)]
pub struct PartitionBlocks {
    /// Blocks of the new partition.
    pub new: u64,
    /// Blocks of the old partition (0 for a full payload).
    pub old: u64,
}

/// Run operation `op` (named by `id`) of `payload` against `old`.
pub fn run_operation(
    payload: &Payload,
    old: Option<&OldImage>,
    id: &OpId,
    op: &InstallOperation,
    blocks: PartitionBlocks,
) -> Result<OpOutput, InstallError> {
    let block_size = payload.block_size();
    let dst_len = operation::dst_bytes(id, op, block_size, blocks.new)?;
    if dst_len > MAX_OP_BYTES {
        return Err(OpError::TooLarge {
            op: id.clone(),
            bytes: dst_len,
        }
        .into());
    }
    if let Some(reason) = operation::unsupported_reason(op.r#type) {
        return Err(OpError::Unsupported {
            op: id.clone(),
            reason,
        }
        .into());
    }
    let blob = if has_blob(op.r#type) {
        let length = op.data_length.unwrap_or(0);
        if length > MAX_OP_BYTES {
            return Err(OpError::TooLarge {
                op: id.clone(),
                bytes: length,
            }
            .into());
        }
        let blob = payload
            .read_blob(op.data_offset.unwrap_or(0), length)
            .map_err(|source| InstallError::Blob {
                op: id.clone(),
                source,
            })?;
        if let Some(want) = &op.data_sha256_hash {
            if Sha256::digest(&blob).as_slice() != want.as_slice() {
                return Err(InstallError::BlobHash { op: id.clone() });
            }
        }
        blob
    } else {
        Vec::new()
    };
    let source = if reads_source(op.r#type) {
        let old = old.ok_or_else(|| InstallError::NoSource { op: id.clone() })?;
        let total = operation::src_bytes(id, op, block_size, blocks.old)?;
        let src = old.read_extents(id, &op.src_extents, block_size, total)?;
        if let Some(want) = &op.src_sha256_hash {
            // update_engine hashes the whole source extents; a src_length
            // shorter than them is accepted as the hashed range too.
            let whole = Sha256::digest(&src);
            let prefix = match op.src_length {
                Some(n) if n < src.len() as u64 => Some(Sha256::digest(&src[..n as usize])),
                _ => None,
            };
            let matches = whole.as_slice() == want.as_slice()
                || prefix.is_some_and(|h| h.as_slice() == want.as_slice());
            if !matches {
                return Err(InstallError::SourceHash { op: id.clone() });
            }
        }
        src
    } else {
        Vec::new()
    };
    let new_data = operation::new_data(id, op, &blob, &source, dst_len, block_size)?;
    Ok(OpOutput { new_data, source })
}
