//! The source (old-image) device on a file or block device, with positioned reads
//! (`pread`), so worker threads share one descriptor without seeking.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::snapshot::merge_plan::SourceDevice;

/// A read of the source device failed.
#[derive(Debug, Error)]
#[error("reading {len} bytes at byte {offset} of source {}", path.display())]
pub struct SourceReadError {
    /// The source's path.
    pub path: PathBuf,
    /// Byte offset.
    pub offset: u64,
    /// Bytes asked for.
    pub len: usize,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// The source (old-image) device read by COPY and XOR ops.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
}

impl FileSource {
    /// Open `path` read-only (the caller names the path in its error).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self::from_file(File::open(path)?, path))
    }

    /// Wrap an open file; `path` is only used in error messages.
    pub fn from_file(file: File, path: &Path) -> Self {
        FileSource {
            file,
            path: path.to_path_buf(),
        }
    }
}

impl SourceDevice for FileSource {
    /// A failure is an `io::Error` of the OS error's kind carrying a [`SourceReadError`].
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, byte_offset).map_err(|source| {
            let kind = source.kind();
            io::Error::new(
                kind,
                SourceReadError {
                    path: self.path.clone(),
                    offset: byte_offset,
                    len: buf.len(),
                    source,
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use std::io::Write;

    #[test]
    fn positioned_reads_and_short_file_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let src = FileSource::open(f.path()).unwrap();
        let mut buf = [0u8; 4096];
        SourceDevice::read_exact_at(&src, &mut buf, 4097).unwrap();
        assert_eq!(&buf[..], &data[4097..4097 + 4096]);
        let err = SourceDevice::read_exact_at(&src, &mut buf, 8000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let typed = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<SourceReadError>())
            .expect("a SourceReadError inside");
        assert_eq!((typed.offset, typed.len), (8000, 4096));
        assert!(typed.to_string().contains("byte 8000"), "{typed}");
        assert!(typed.source().is_some());
    }
}
