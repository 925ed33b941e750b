//! Random-access images of 4 KiB blocks: a file read with positioned reads, or a byte
//! vector in memory (tests and the merge simulator).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::BLOCK_SIZE;

/// Errors opening or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image could not be opened or its size not determined.
    #[error("cannot open image {path}")]
    Open {
        /// Path of the image.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },
    /// A read failed.
    #[error("cannot read {len} bytes at byte offset {offset} of image {name}")]
    Read {
        /// Name of the image (path or "memory").
        name: String,
        /// Byte offset of the read.
        offset: u64,
        /// Length of the read.
        len: usize,
        /// Underlying I/O error.
        source: io::Error,
    },
    /// The image starts with the Android sparse magic but is not a valid sparse image.
    #[error("invalid Android sparse image {path}")]
    Sparse {
        /// Path of the image.
        path: PathBuf,
        /// What is wrong with it.
        source: crate::sparse::SparseError,
    },
    /// The image has more blocks than a COW op can address (2^32).
    #[error("image {name} has {blocks} blocks; at most 2^32 are supported")]
    TooLarge {
        /// Name of the image.
        name: String,
        /// Number of blocks.
        blocks: u64,
    },
}

/// A read-only image addressed in bytes and 4 KiB blocks. Implementations must be safe to
/// read from several threads at once.
pub trait BlockImage: Sync {
    /// Length of the image in bytes.
    fn len_bytes(&self) -> u64;
    /// A name for error messages.
    fn name(&self) -> String;
    /// Fills `buf` from byte `offset`; the whole range must lie inside the image.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Number of whole blocks in the image (a partial last block is not counted).
    fn block_count(&self) -> u64 {
        self.len_bytes() / BLOCK_SIZE as u64
    }

    /// Reads `buf.len() / BLOCK_SIZE` whole blocks starting at block `first`.
    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.read_bytes(first.saturating_mul(BLOCK_SIZE as u64), buf)
    }

    /// Fills `buf` from byte `offset` (any alignment), naming the image and the range in
    /// the error.
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.read_exact_at(buf, offset)
            .map_err(|source| ImageError::Read {
                name: self.name(),
                offset,
                len: buf.len(),
                source,
            })
    }
}

/// Blocks per positioned read when a batch is read by several threads.
pub const PARALLEL_READ_BLOCKS: usize = 128;

/// Reads `buf.len() / BLOCK_SIZE` whole blocks from block `first` like
/// [`BlockImage::read_blocks`], split into reads of [`PARALLEL_READ_BLOCKS`] blocks issued
/// by the current thread pool: the copy out of the page cache is a large share of the
/// work, and one thread alone would leave the others idle meanwhile.
pub fn read_blocks_parallel(
    img: &dyn BlockImage,
    first: u64,
    buf: &mut [u8],
) -> Result<(), ImageError> {
    use rayon::prelude::*;
    buf.par_chunks_mut(PARALLEL_READ_BLOCKS * BLOCK_SIZE)
        .enumerate()
        .try_for_each(|(i, chunk)| {
            let at = first.saturating_add((i * PARALLEL_READ_BLOCKS) as u64);
            img.read_blocks(at, chunk)
        })
}

/// An image held in memory.
#[derive(Debug, Clone)]
pub struct MemImage {
    /// The image bytes.
    pub data: Vec<u8>,
}

impl BlockImage for MemImage {
    fn len_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn name(&self) -> String {
        "memory".to_string()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self
            .data
            .get(start..end)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// An image file read with positioned reads (`pread`), so many threads can share it and
/// nothing is mapped: a file that shrinks under us gives an error, not a crash.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    len: u64,
    path: PathBuf,
}

impl FileImage {
    /// Opens `path` read-only and records its current size.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file(file, path)
    }

    /// Wraps `file`, already open for reading from `path`, and records its current size.
    pub fn from_file(file: File, path: &Path) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            )));
        }
        // A block device reports length 0 in its metadata; its size is where it ends.
        let len = if meta.file_type().is_block_device() {
            (&file).seek(SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        let blocks = len / BLOCK_SIZE as u64;
        if blocks > u64::from(u32::MAX) {
            return Err(ImageError::TooLarge {
                name: path.display().to_string(),
                blocks,
            });
        }
        Ok(Self {
            file,
            len,
            path: path.to_path_buf(),
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockImage for FileImage {
    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}
