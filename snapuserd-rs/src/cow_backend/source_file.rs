//! [`SourceDevice`] on a file or block device, with positioned reads (`pread`), so worker
//! threads share one descriptor without seeking.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::snapshot::merge_plan::SourceDevice;

/// The source (old-image) device read by COPY and XOR ops.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
}

impl FileSource {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening source {}: {e}", path.display()))
        })?;
        Ok(Self::from_file(file, path))
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
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, byte_offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "reading {} bytes at byte {byte_offset} of source {}: {e}",
                    buf.len(),
                    self.path.display()
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn positioned_reads_and_short_file_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let src = FileSource::open(f.path()).unwrap();
        let mut buf = [0u8; 4096];
        src.read_exact_at(&mut buf, 4097).unwrap();
        assert_eq!(&buf[..], &data[4097..4097 + 4096]);
        let err = src.read_exact_at(&mut buf, 8000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("byte 8000"), "{err}");
    }
}
