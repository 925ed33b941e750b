//! Writing a payload file: blobs are appended to a temporary data file as
//! operations are made (memory stays bounded), then the header, the manifest
//! and the data section are written to the output under a temporary name and
//! renamed into place.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use tempfile::NamedTempFile;

use super::file_error::FileError;
use super::proto::DeltaArchiveManifest;
use super::reader::{PAYLOAD_MAGIC, SUPPORTED_MAJOR_VERSION};

/// Errors writing a payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadWriteError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// Collects blobs, then writes the payload.
#[derive(Debug)]
pub struct PayloadWriter {
    output: PathBuf,
    data: NamedTempFile,
    data_len: u64,
}

impl PayloadWriter {
    /// A writer for `output`; the blob file is created beside it.
    pub fn new(output: &Path) -> Result<Self, PayloadWriteError> {
        let dir = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let data = NamedTempFile::new_in(dir)
            .map_err(FileError::on(dir, "cannot create a temporary blob file"))?;
        Ok(Self {
            output: output.to_path_buf(),
            data,
            data_len: 0,
        })
    }

    /// Append a blob; returns its `(data_offset, data_length)`.
    pub fn add_blob(&mut self, blob: &[u8]) -> Result<(u64, u64), PayloadWriteError> {
        let offset = self.data_len;
        self.data
            .as_file_mut()
            .write_all(blob)
            .map_err(FileError::on(self.data.path(), "cannot write a blob"))?;
        self.data_len += blob.len() as u64;
        Ok((offset, blob.len() as u64))
    }

    /// Bytes of blobs so far.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Write the payload with `manifest` (unsigned) and return its size.
    pub fn finish(mut self, manifest: &DeltaArchiveManifest) -> Result<u64, PayloadWriteError> {
        let io = FileError::on;
        let manifest_bytes = manifest.encode_to_vec();
        let dir = self
            .output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let out = NamedTempFile::new_in(&dir).map_err(io(&dir, "cannot create the payload"))?;
        {
            let mut w = BufWriter::new(out.as_file());
            w.write_all(PAYLOAD_MAGIC)
                .and_then(|()| w.write_all(&SUPPORTED_MAJOR_VERSION.to_be_bytes()))
                .and_then(|()| w.write_all(&(manifest_bytes.len() as u64).to_be_bytes()))
                .and_then(|()| w.write_all(&0u32.to_be_bytes()))
                .and_then(|()| w.write_all(&manifest_bytes))
                .map_err(io(&self.output, "cannot write the payload header"))?;
            let data = self.data.as_file_mut();
            data.seek(SeekFrom::Start(0))
                .map_err(io(&self.output, "cannot read the blob file"))?;
            std::io::copy(data, &mut w).map_err(io(&self.output, "cannot copy the blobs"))?;
            w.flush()
                .map_err(io(&self.output, "cannot write the payload"))?;
        }
        let file: &File = out.as_file();
        file.sync_all()
            .map_err(io(&self.output, "cannot sync the payload"))?;
        let size = file
            .metadata()
            .map_err(io(&self.output, "cannot stat the payload"))?
            .len();
        out.persist(&self.output).map_err(|e| {
            FileError::on(&self.output, "cannot rename the finished payload")(e.error)
        })?;
        Ok(size)
    }
}
