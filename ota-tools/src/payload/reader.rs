//! Opening a payload: the `CrAU` header, the manifest, and blobs read by
//! offset (the data section is never loaded whole).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{DeltaArchiveManifest, Signatures};

/// The payload magic.
pub const PAYLOAD_MAGIC: &[u8; 4] = b"CrAU";
/// The only major version this reader accepts.
pub const SUPPORTED_MAJOR_VERSION: u64 = 2;
/// Largest manifest accepted (update_engine's own limit is far smaller in
/// practice; this bounds the allocation a hostile header can ask for).
pub const MAX_MANIFEST_SIZE: u64 = 256 << 20;
/// Largest metadata signature accepted.
pub const MAX_METADATA_SIGNATURE_SIZE: u32 = 1 << 20;
/// Fixed header size: magic, major version, manifest size, signature size.
pub const HEADER_SIZE: u64 = 4 + 8 + 8 + 4;

/// Errors opening or reading a payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadReadError {
    /// The file could not be opened or read.
    #[error("{path}: cannot read at byte {offset}")]
    Io {
        /// The payload.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The first bytes are not `CrAU`.
    #[error("{path}: not an update_engine payload (magic is not CrAU)")]
    BadMagic {
        /// The payload.
        path: PathBuf,
    },
    /// A major version other than 2.
    #[error("{path}: payload major version {version} is not supported (expected 2)")]
    UnsupportedVersion {
        /// The payload.
        path: PathBuf,
        /// The version found.
        version: u64,
    },
    /// A header size field is out of bounds.
    #[error("{path}: {what} of {value} bytes is out of bounds (file is {file_size} bytes)")]
    SizeOutOfBounds {
        /// The payload.
        path: PathBuf,
        /// Which field.
        what: &'static str,
        /// The value.
        value: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The manifest does not decode.
    #[error("{path}: the manifest does not decode")]
    Manifest {
        /// The payload.
        path: PathBuf,
        /// The cause.
        #[source]
        source: prost::DecodeError,
    },
    /// A block size that is not a power of two in 512..=1 MiB.
    #[error(
        "{path}: manifest block size {block_size} is not a power of two between 512 and 1048576"
    )]
    BadBlockSize {
        /// The payload.
        path: PathBuf,
        /// The value found.
        block_size: u32,
    },
    /// A blob lies outside the file.
    #[error("{path}: blob at data offset {offset}, {length} bytes, lies past the end of the file")]
    BlobOutOfBounds {
        /// The payload.
        path: PathBuf,
        /// Offset relative to the data section.
        offset: u64,
        /// Length.
        length: u64,
    },
}

/// An open payload: its header fields and manifest, with blob access.
#[derive(Debug)]
pub struct Payload {
    path: PathBuf,
    file: File,
    file_size: u64,
    /// Major version (2).
    pub major_version: u64,
    /// Manifest size in bytes.
    pub manifest_size: u64,
    /// Metadata signature size in bytes.
    pub metadata_signature_size: u32,
    /// The decoded manifest.
    pub manifest: DeltaArchiveManifest,
    /// The decoded metadata signature, if any and if it decodes.
    pub metadata_signatures: Option<Signatures>,
    /// Where the data section starts (blob offsets are relative to it).
    pub data_start: u64,
}

impl Payload {
    /// Open `path` and parse its header and manifest.
    pub fn open(path: &Path) -> Result<Self, PayloadReadError> {
        let io = |offset: u64| {
            let path = path.to_path_buf();
            move |source| PayloadReadError::Io {
                path,
                offset,
                source,
            }
        };
        let file = File::open(path).map_err(io(0))?;
        let file_size = file.metadata().map_err(io(0))?.len();
        let mut header = [0u8; HEADER_SIZE as usize];
        if file_size < HEADER_SIZE {
            return Err(PayloadReadError::SizeOutOfBounds {
                path: path.to_path_buf(),
                what: "header",
                value: HEADER_SIZE,
                file_size,
            });
        }
        file.read_exact_at(&mut header, 0).map_err(io(0))?;
        if &header[0..4] != PAYLOAD_MAGIC {
            return Err(PayloadReadError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        let be64 = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        };
        let major_version = be64(&header[4..12]);
        if major_version != SUPPORTED_MAJOR_VERSION {
            return Err(PayloadReadError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: major_version,
            });
        }
        let manifest_size = be64(&header[12..20]);
        let mut sig = [0u8; 4];
        sig.copy_from_slice(&header[20..24]);
        let metadata_signature_size = u32::from_be_bytes(sig);
        let out_of_bounds = |what, value| PayloadReadError::SizeOutOfBounds {
            path: path.to_path_buf(),
            what,
            value,
            file_size,
        };
        let manifest_end = HEADER_SIZE
            .checked_add(manifest_size)
            .filter(|&e| manifest_size <= MAX_MANIFEST_SIZE && e <= file_size)
            .ok_or_else(|| out_of_bounds("manifest", manifest_size))?;
        let data_start = manifest_end
            .checked_add(u64::from(metadata_signature_size))
            .filter(|&e| metadata_signature_size <= MAX_METADATA_SIGNATURE_SIZE && e <= file_size)
            .ok_or_else(|| {
                out_of_bounds("metadata signature", u64::from(metadata_signature_size))
            })?;
        // Bounded by MAX_MANIFEST_SIZE and the file size above.
        let mut manifest_bytes = vec![0u8; manifest_size as usize];
        file.read_exact_at(&mut manifest_bytes, HEADER_SIZE)
            .map_err(io(HEADER_SIZE))?;
        let manifest =
            DeltaArchiveManifest::decode(manifest_bytes.as_slice()).map_err(|source| {
                PayloadReadError::Manifest {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let block_size = manifest.block_size.unwrap_or(4096);
        if !block_size.is_power_of_two() || !(512..=1 << 20).contains(&block_size) {
            return Err(PayloadReadError::BadBlockSize {
                path: path.to_path_buf(),
                block_size,
            });
        }
        let metadata_signatures = if metadata_signature_size > 0 {
            let mut sig_bytes = vec![0u8; metadata_signature_size as usize];
            file.read_exact_at(&mut sig_bytes, manifest_end)
                .map_err(io(manifest_end))?;
            Signatures::decode(sig_bytes.as_slice()).ok()
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            file_size,
            major_version,
            manifest_size,
            metadata_signature_size,
            manifest,
            metadata_signatures,
            data_start,
        })
    }

    /// The payload's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The payload file's size.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// The manifest's block size (4096 when absent; checked by [`Payload::open`]
    /// to be a power of two in 512..=1 MiB).
    pub fn block_size(&self) -> u32 {
        self.manifest.block_size.unwrap_or(4096)
    }

    /// Check that `length` bytes at data offset `offset` lie inside the file.
    pub fn check_blob(&self, offset: u64, length: u64) -> Result<u64, PayloadReadError> {
        self.data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(length).map(|e| (s, e)))
            .filter(|&(_, e)| e <= self.file_size)
            .map(|(s, _)| s)
            .ok_or_else(|| PayloadReadError::BlobOutOfBounds {
                path: self.path.clone(),
                offset,
                length,
            })
    }

    /// Read the `length` bytes at data offset `offset`. The caller bounds
    /// `length` (it is checked against the file size here).
    pub fn read_blob(&self, offset: u64, length: u64) -> Result<Vec<u8>, PayloadReadError> {
        let start = self.check_blob(offset, length)?;
        let len = usize::try_from(length).map_err(|_| PayloadReadError::BlobOutOfBounds {
            path: self.path.clone(),
            offset,
            length,
        })?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(|source| PayloadReadError::Io {
                path: self.path.clone(),
                offset: start,
                source,
            })?;
        Ok(buf)
    }

    /// The payload signatures, when the manifest locates some inside the file.
    pub fn payload_signatures(&self) -> Option<Signatures> {
        let offset = self.manifest.signatures_offset?;
        let size = self.manifest.signatures_size?;
        if size == 0 || size > u64::from(MAX_METADATA_SIGNATURE_SIZE) {
            return None;
        }
        let bytes = self.read_blob(offset, size).ok()?;
        Signatures::decode(bytes.as_slice()).ok()
    }
}
