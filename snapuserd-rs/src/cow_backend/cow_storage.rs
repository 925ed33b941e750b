//! How the COW file is read: memory-mapped ([`cow_format::reader::MappedFile`], no syscall
//! per read; a truncated file gives I/O errors, not a crash) or with positioned reads.
//!
//! Mapping is preferred; if it fails (for example the process-wide table of guarded
//! mappings is full) the file is read with `pread` instead.

use std::fs::File;
use std::io;

use cow_format::reader::MappedFile;
use cow_format::{CowStorage, SourceImage};

/// The COW file's storage.
#[derive(Debug)]
pub enum CowFileStorage {
    /// Memory-mapped.
    Mapped(MappedFile),
    /// Positioned reads.
    Pread(File),
}

impl CowFileStorage {
    /// Map `file`, or fall back to positioned reads (logged) when mapping fails.
    pub fn open(file: File, prefer_mmap: bool) -> io::Result<Self> {
        if !prefer_mmap {
            return Ok(CowFileStorage::Pread(file));
        }
        let fallback = file.try_clone()?;
        match MappedFile::new(file) {
            Ok(m) => Ok(CowFileStorage::Mapped(m)),
            Err(e) => {
                log::warn!("mapping the COW failed ({e}); reading it with pread");
                Ok(CowFileStorage::Pread(fallback))
            }
        }
    }

    /// True when mapped.
    pub fn is_mapped(&self) -> bool {
        matches!(self, CowFileStorage::Mapped(_))
    }
}

impl SourceImage for CowFileStorage {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        match self {
            CowFileStorage::Mapped(m) => SourceImage::read_exact_at(m, buf, byte_offset),
            CowFileStorage::Pread(f) => SourceImage::read_exact_at(f, buf, byte_offset),
        }
    }
}

impl CowStorage for CowFileStorage {
    fn size(&self) -> io::Result<u64> {
        match self {
            CowFileStorage::Mapped(m) => m.size(),
            CowFileStorage::Pread(f) => f.size(),
        }
    }

    /// Mapped: the payload is decoded straight from the mapping (guarded: a shrunk file is
    /// an error, see [`MappedFile`]). `pread`: read into `staging` first.
    fn visit_at(
        &self,
        byte_offset: u64,
        len: usize,
        staging: &mut Vec<u8>,
        visit: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        match self {
            CowFileStorage::Mapped(m) => m.visit_at(byte_offset, len, staging, visit),
            CowFileStorage::Pread(f) => f.visit_at(byte_offset, len, staging, visit),
        }
    }
}
