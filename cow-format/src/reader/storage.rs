//! Positioned-read abstractions for the COW file and the source image.
//!
//! A `File` is read with positioned reads (`pread`), so a file that shrinks under the
//! reader yields a short read and a typed error instead of SIGBUS; the guarded mapping
//! (`super::mapped::MappedFile`) turns the same case into an error too. In-memory byte
//! buffers implement the same traits, which is what tests and the fuzz harness use.
//! [`CowStorage::visit_at`] lends bytes in place where the storage holds them in memory
//! (byte buffers, the mapping) and reads them into a staging buffer otherwise.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use thiserror::Error;

/// Why a storage read failed without an OS error. Storages return it inside an
/// `io::Error` (the traits' error type) of kind [`StorageError::kind`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// The range lies (partly) past the end of the bytes.
    #[error("{len} bytes at byte {offset} lie past the end ({size} bytes)")]
    PastEnd {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: usize,
        /// Size of the storage.
        size: u64,
    },
    /// A mapped file became shorter while it was read.
    #[error("the COW file shrank while mapped")]
    Shrank,
    /// The SIGBUS guard of mapped files could not be installed.
    #[error("cannot install the SIGBUS handler that guards mapped COW files")]
    NoSigbusHandler,
    /// Every slot of the process-wide table of guarded mappings is taken.
    #[error("too many mapped COW files open at once (at most {max})")]
    TooManyMappings {
        /// Table size.
        max: usize,
    },
    /// The file is larger than the address space.
    #[error("a file of {len} bytes is too large to map")]
    TooLarge {
        /// File size.
        len: u64,
    },
}

impl StorageError {
    /// `UnexpectedEof` for short data, `Other` otherwise.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Self::PastEnd { .. } | Self::Shrank => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::Other,
        }
    }
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        io::Error::new(e.kind(), e)
    }
}

/// Something blocks can be read from at a byte offset: the source image of
/// COPY/XOR ops, or the COW file itself.
pub trait SourceImage {
    /// Fill `buf` with the bytes at `byte_offset`, or fail (short data is an
    /// `UnexpectedEof` error).
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()>;
}

/// Storage holding a COW file: positioned reads plus a size.
pub trait CowStorage: SourceImage {
    /// Current size in bytes (works for regular files and block devices).
    fn size(&self) -> io::Result<u64>;

    /// Call `visit` once with the `len` bytes at `byte_offset`, or fail without calling it
    /// (short data is an `UnexpectedEof` error).
    ///
    /// Storages that hold the bytes in memory lend them in place; the default reads them
    /// into `staging` (grown as needed, never shrunk) first. The slice is valid only during
    /// the call. An error returned *after* `visit` ran (a memory mapping that faulted while
    /// `visit` read it) means `visit` may have seen wrong bytes and whatever it produced
    /// must be discarded.
    fn visit_at(
        &self,
        byte_offset: u64,
        len: usize,
        staging: &mut Vec<u8>,
        visit: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        if staging.len() < len {
            staging.resize(len, 0);
        }
        let bytes = &mut staging[..len];
        self.read_exact_at(bytes, byte_offset)?;
        visit(bytes);
        Ok(())
    }
}

impl SourceImage for File {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, byte_offset)
    }
}

impl CowStorage for File {
    fn size(&self) -> io::Result<u64> {
        // Seeking to the end works for block devices too, whose metadata
        // length is 0. The cursor position is irrelevant to positioned reads.
        let mut f = self;
        f.seek(SeekFrom::End(0))
    }
}

fn slice_read(data: &[u8], buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
    buf.copy_from_slice(slice_at(data, byte_offset, buf.len())?);
    Ok(())
}

/// The `len` bytes of `data` at `byte_offset`, or a [`StorageError::PastEnd`].
fn slice_at(data: &[u8], byte_offset: u64, len: usize) -> io::Result<&[u8]> {
    usize::try_from(byte_offset)
        .ok()
        .and_then(|s| data.get(s..s.checked_add(len)?))
        .ok_or_else(|| {
            StorageError::PastEnd {
                offset: byte_offset,
                len,
                size: data.len() as u64,
            }
            .into()
        })
}

/// `SourceImage` and `CowStorage` for a type that holds (or points to) another storage:
/// every call goes to `$inner`, the inner storage of `$s`.
macro_rules! forward_storage {
    (impl[$($src:tt)*][$($cow:tt)*] $ty:ty, |$s:ident| $inner:expr) => {
        impl<$($src)*> SourceImage for $ty {
            fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
                let $s = self;
                SourceImage::read_exact_at($inner, buf, byte_offset)
            }
        }

        impl<$($cow)*> CowStorage for $ty {
            fn size(&self) -> io::Result<u64> {
                let $s = self;
                CowStorage::size($inner)
            }

            fn visit_at(
                &self,
                byte_offset: u64,
                len: usize,
                staging: &mut Vec<u8>,
                visit: &mut dyn FnMut(&[u8]),
            ) -> io::Result<()> {
                let $s = self;
                CowStorage::visit_at($inner, byte_offset, len, staging, visit)
            }
        }
    };
}
pub(crate) use forward_storage;

impl SourceImage for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        slice_read(self, buf, byte_offset)
    }
}

/// In-memory bytes are lent in place.
impl CowStorage for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn visit_at(
        &self,
        byte_offset: u64,
        len: usize,
        _staging: &mut Vec<u8>,
        visit: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        visit(slice_at(self, byte_offset, len)?);
        Ok(())
    }
}

forward_storage!(impl[][] Vec<u8>, |s| s.as_slice());
forward_storage!(impl[T: SourceImage + ?Sized][T: CowStorage + ?Sized] &T, |s| &**s);
forward_storage!(impl[T: SourceImage + ?Sized][T: CowStorage + ?Sized] Arc<T>, |s| &**s);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_in_bounds_and_fail_past_the_end() {
        let data: Vec<u8> = (0..10).collect();
        let mut buf = [0u8; 3];
        data.read_exact_at(&mut buf, 7).unwrap();
        assert_eq!(buf, [7, 8, 9]);
        let e = data.read_exact_at(&mut buf, 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(data.read_exact_at(&mut buf, u64::MAX).is_err());
        assert_eq!(CowStorage::size(&data).unwrap(), 10);
    }

    #[test]
    fn file_that_shrinks_gives_an_error() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[1u8; 8192]).unwrap();
        assert_eq!(CowStorage::size(&f).unwrap(), 8192);
        let mut buf = [0u8; 4096];
        SourceImage::read_exact_at(&f, &mut buf, 4096).unwrap();
        f.set_len(5000).unwrap();
        assert!(SourceImage::read_exact_at(&f, &mut buf, 4096).is_err());
    }
}
