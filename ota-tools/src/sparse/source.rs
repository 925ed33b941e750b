//! Opening an image by path, raw or sparse.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use cow_format::reader::SourceImage;

use super::{index, SparseImage, SPARSE_MAGIC};
use crate::create::image::{BlockImage, FileImage, ImageError};
use crate::create::BLOCK_SIZE;

/// A read-only image as every `ota-tools` command takes it: a raw file or block device,
/// or an Android sparse image (recognised by its magic) read as its expanded contents.
/// Both serve positioned reads from many threads; neither is loaded into memory.
#[derive(Debug)]
pub enum ImageSource {
    /// A raw image or block device.
    Raw(FileImage),
    /// A sparse image, read through its chunk index.
    Sparse {
        /// The parsed image.
        image: SparseImage<File>,
        /// Where it was opened from.
        path: PathBuf,
    },
}

impl ImageSource {
    /// Opens `path`, reading it as a sparse image when it starts with the sparse magic.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        Self::from_raw(FileImage::open(path)?)
    }

    /// Like [`ImageSource::open`] for a file already open for reading from `path`.
    pub fn from_file(file: File, path: &Path) -> Result<Self, ImageError> {
        Self::from_raw(FileImage::from_file(file, path)?)
    }

    fn from_raw(raw: FileImage) -> Result<Self, ImageError> {
        let path = raw.path().to_path_buf();
        let sparse_err = |source| ImageError::Sparse {
            path: path.clone(),
            source,
        };
        let len = raw.len_bytes();
        if index::read_magic(raw.file(), len).map_err(sparse_err)? != Some(SPARSE_MAGIC) {
            return Ok(Self::Raw(raw));
        }
        let file = raw.file().try_clone().map_err(|source| ImageError::Open {
            path: path.clone(),
            source,
        })?;
        let image = SparseImage::new(file, len).map_err(sparse_err)?;
        let blocks = image.len() / BLOCK_SIZE as u64;
        if blocks > u64::from(u32::MAX) {
            return Err(ImageError::TooLarge {
                name: path.display().to_string(),
                blocks,
            });
        }
        log::info!(
            "{}: Android sparse image, {} bytes expanded in {} chunks",
            path.display(),
            image.len(),
            image.extent_count()
        );
        Ok(Self::Sparse { image, path })
    }

    /// True for a sparse image.
    pub fn is_sparse(&self) -> bool {
        matches!(self, Self::Sparse { .. })
    }

    /// Fills `buf` with the image bytes at `offset` (expanded bytes for a sparse image).
    /// The whole range must lie inside the image.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Self::Raw(raw) => BlockImage::read_exact_at(raw, buf, offset),
            Self::Sparse { image, .. } => image.read_exact_at(buf, offset),
        }
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Self::Raw(raw) => raw.path(),
            Self::Sparse { path, .. } => path,
        }
    }
}

impl BlockImage for ImageSource {
    fn len_bytes(&self) -> u64 {
        match self {
            Self::Raw(raw) => raw.len_bytes(),
            Self::Sparse { image, .. } => image.len(),
        }
    }

    fn name(&self) -> String {
        self.path().display().to_string()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ImageSource::read_exact_at(self, buf, offset)
    }
}

impl SourceImage for ImageSource {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        ImageSource::read_exact_at(self, buf, byte_offset)
    }
}
