//! [`CowSnapshot`]: one snapshot served from a COW file and a source image, the object the
//! daemon's `init` command creates.
//!
//! Opening reads the COW (validated by [`CowReader`]), the durable merge state (the COW's
//! `num_merge_ops` and scratch region, through [`CowMergeStore`]), builds the merge plan
//! from both, and hands everything to the core's [`BlockServer`], which lays out the
//! exception store and opens merge tracking (loading or preparing the scratch window).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use cow_format::reader::CowFileStorage;
use cow_format::{CowReader, ReadError};
use thiserror::Error;

use super::blocks::CowBlockSource;
use super::merge_store::{CowMergeStore, CowMergeStoreError};
use super::plan::{CowMergePlan, CowPlanError};
use super::source_file::FileSource;
use crate::snapshot::block_server::{BlockServer, BlockServerError};
use crate::snapshot::exception_store::SECTOR_SIZE;
use crate::snapshot::merge_plan::SourceDevice;
use crate::snapshot::merge_tracker::MergeStateStore;

/// Errors opening a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotOpenError {
    /// Opening a file failed.
    #[error("opening {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The COW file is invalid.
    #[error("reading COW {path}")]
    Cow {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: ReadError,
    },
    /// The COW's durable merge state is invalid.
    #[error("merge state of COW {path}")]
    MergeState {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: CowMergeStoreError,
    },
    /// The COW's merge order cannot be served.
    #[error("merge plan of COW {path}")]
    Plan {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: CowPlanError,
    },
    /// The exception store or merge tracking could not be set up.
    #[error("serving COW {path}")]
    Serve {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: BlockServerError,
    },
}

/// The block server over real backends; `S` is the merge-state store (the COW file's own,
/// or a wrapper around it).
pub type CowBlockServer<D, S = CowMergeStore> = BlockServer<CowBlockSource<CowFileStorage>, D, S>;

/// One snapshot: its block server over a COW file and a source device.
#[derive(Debug)]
pub struct CowSnapshot<D: SourceDevice = FileSource, S: MergeStateStore = CowMergeStore> {
    server: CowBlockServer<D, S>,
    cow_path: PathBuf,
}

impl CowSnapshot<FileSource> {
    /// Open the COW file at `cow` (read-write: merge progress is written into it) and the
    /// source image or device at `source`.
    ///
    /// Opening writes nothing: another daemon may still be merging the same COW
    /// (libsnapshot's second-stage handoff starts the new daemon before the old one stops).
    /// The merge state is taken over at the first dm-user request
    /// ([`crate::snapshot::merge_tracker::MergeTracker::activate`]).
    pub fn open(cow: &Path, source: &Path) -> Result<Self, SnapshotOpenError> {
        let src = FileSource::open(source).map_err(|e| SnapshotOpenError::Open {
            path: source.to_path_buf(),
            source: e,
        })?;
        Self::open_with_source(cow, src)
    }
}

impl<D: SourceDevice> CowSnapshot<D> {
    /// Open the COW file at `cow` with any source device.
    pub fn open_with_source(cow: &Path, source: D) -> Result<Self, SnapshotOpenError> {
        Self::build(cow, source, true, |store| store)
    }

    /// Like [`Self::open_with_source`], reading the COW with `pread` instead of a mapping.
    pub fn open_with_source_pread(cow: &Path, source: D) -> Result<Self, SnapshotOpenError> {
        Self::build(cow, source, false, |store| store)
    }
}

impl<D: SourceDevice, S: MergeStateStore> CowSnapshot<D, S> {
    /// Like [`CowSnapshot::open_with_source`], with the COW file's store wrapped by `wrap`
    /// (a wrapper store can, for example, inject faults between durable steps).
    pub fn build(
        cow: &Path,
        source: D,
        prefer_mmap: bool,
        wrap: impl FnOnce(CowMergeStore) -> S,
    ) -> Result<Self, SnapshotOpenError> {
        let path = cow.to_path_buf();
        let open_err = |e: io::Error| SnapshotOpenError::Open {
            path: path.clone(),
            source: e,
        };
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(cow)
            .map_err(open_err)?;
        let ro = File::open(cow).map_err(open_err)?;
        let opened = CowMergeStore::open(rw).map_err(|e| SnapshotOpenError::MergeState {
            path: path.clone(),
            source: e,
        })?;
        let storage = CowFileStorage::open(ro, prefer_mmap).map_err(open_err)?;
        let reader = CowReader::from_storage(storage).map_err(|e| SnapshotOpenError::Cow {
            path: path.clone(),
            source: e,
        })?;
        let planned =
            CowMergePlan::build_with_progress(&reader, opened.num_merge_ops()).map_err(|e| {
                SnapshotOpenError::Plan {
                    path: path.clone(),
                    source: e,
                }
            })?;
        let store = opened.into_store(planned.progress.clone()).map_err(|e| {
            SnapshotOpenError::MergeState {
                path: path.clone(),
                source: e,
            }
        })?;
        let store = wrap(store);
        let blocks = CowBlockSource::new(reader);
        let server = BlockServer::new(planned.plan, blocks, source, store).map_err(|e| {
            SnapshotOpenError::Serve {
                path: path.clone(),
                source: e,
            }
        })?;
        log::info!(
            "snapshot on {}: {} data ops ({} merged), {} exceptions, device {} sectors",
            path.display(),
            server.plan().len(),
            server.plan().num_merge_ops(),
            server.exceptions().num_exceptions(),
            server.device_sectors()
        );
        Ok(CowSnapshot {
            server,
            cow_path: path,
        })
    }

    /// The block server the dm-user workers call.
    pub fn server(&self) -> &CowBlockServer<D, S> {
        &self.server
    }

    /// Size of the virtual COW device in 512-byte sectors (the `init` reply).
    pub fn device_sectors(&self) -> u64 {
        self.server.device_sectors()
    }

    /// Size of the virtual COW device in bytes.
    pub fn device_bytes(&self) -> u64 {
        self.server.device_sectors().saturating_mul(SECTOR_SIZE)
    }

    /// Path of the COW file.
    pub fn cow_path(&self) -> &Path {
        &self.cow_path
    }

    /// Stop serving; the durable state stays in the COW file.
    pub fn into_server(self) -> CowBlockServer<D, S> {
        self.server
    }
}

// Worker threads share one server through an `Arc`: it must be `Send + Sync`.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<CowSnapshot<FileSource>>();
};
