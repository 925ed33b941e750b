//! How a COW file is read in production: through the guarded memory mapping
//! ([`MappedFile`]: no syscall per read; a truncated file gives I/O errors, not a crash),
//! or with positioned reads when mapping is not wanted or fails (for example when the
//! process-wide table of guarded mappings is full).

use std::fs::File;
use std::io;

use super::mapped::MappedFile;
use super::storage::{forward_storage, CowStorage, SourceImage};

/// A COW file's storage: mapped, or read with `pread`.
#[derive(Debug)]
pub enum CowFileStorage {
    /// Memory-mapped (guarded).
    Mapped(MappedFile),
    /// Positioned reads.
    Pread(File),
}

impl CowFileStorage {
    /// Map `file` when `prefer_mmap` is set, falling back to positioned reads (logged)
    /// when mapping fails; positioned reads otherwise. Fails only if the descriptor cannot
    /// be duplicated for the fallback.
    pub fn open(file: File, prefer_mmap: bool) -> io::Result<Self> {
        if !prefer_mmap {
            return Ok(CowFileStorage::Pread(file));
        }
        let fallback = file.try_clone()?;
        match MappedFile::new(file) {
            Ok(m) => Ok(CowFileStorage::Mapped(m)),
            Err(e) => {
                log::warn!(
                    "mapping the COW file failed ({e}); reading it with pread instead, \
                     which costs one system call per payload"
                );
                Ok(CowFileStorage::Pread(fallback))
            }
        }
    }

    /// True when mapped.
    pub fn is_mapped(&self) -> bool {
        matches!(self, CowFileStorage::Mapped(_))
    }
}

impl CowFileStorage {
    /// The storage behind the policy. Mapped: payloads are lent straight from the mapping
    /// (guarded: a shrunk file is an error, see [`MappedFile`]); `pread`: read into the
    /// caller's staging buffer first.
    fn inner(&self) -> &dyn CowStorage {
        match self {
            CowFileStorage::Mapped(m) => m,
            CowFileStorage::Pread(f) => f,
        }
    }
}

forward_storage!(impl[][] CowFileStorage, |s| s.inner());

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn both_policies_read_the_same_bytes_and_report_a_shrunk_file() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 249) as u8).collect();
        f.write_all(&data).unwrap();
        let mapped = CowFileStorage::open(f.try_clone().unwrap(), true).unwrap();
        let pread = CowFileStorage::open(f.try_clone().unwrap(), false).unwrap();
        assert!(mapped.is_mapped());
        assert!(!pread.is_mapped());
        for s in [&mapped, &pread] {
            assert_eq!(s.size().unwrap(), data.len() as u64);
            let mut buf = [0u8; 100];
            SourceImage::read_exact_at(s, &mut buf, 4000).unwrap();
            assert_eq!(buf[..], data[4000..4100]);
            let mut seen = Vec::new();
            s.visit_at(8000, 200, &mut Vec::new(), &mut |b| {
                seen.extend_from_slice(b)
            })
            .unwrap();
            assert_eq!(seen, data[8000..8200]);
        }
        f.set_len(4096).unwrap();
        let mut buf = [0u8; 100];
        assert!(SourceImage::read_exact_at(&pread, &mut buf, 8192).is_err());
        assert!(SourceImage::read_exact_at(&mapped, &mut buf, 8192).is_err());
    }
}
