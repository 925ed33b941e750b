//! `ota-tools payload extract`: full and incremental payloads to
//! `<partition>.img`, operations in parallel, every hash checked.
//!
//! Each partition is written to a hidden temporary file in the output
//! directory and renamed to `<partition>.img` only once its
//! `new_partition_info.hash` matches, so a failed extraction leaves no
//! half-written image under the final name.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::file_error::FileError;
use super::install::{run_operation, InstallError, OldImage, PartitionBlocks};
use super::operation::{reads_source, OpId};
use super::partition::{self, PartitionError};
use super::proto::{op_type, PartitionUpdate};
use super::reader::{Payload, PayloadReadError};
use super::verity_regions::{self, VerityRegionError};
use super::worker_pool::{self, WorkerPoolError};
use crate::create::image::FileImage;
use crate::progress::Progress;

/// What to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The payload.
    pub payload: PathBuf,
    /// Where `<partition>.img` files go (created if absent).
    pub output_dir: PathBuf,
    /// Where the old `<partition>.img` files are (incremental payloads).
    pub source_dir: Option<PathBuf>,
    /// Only these partitions (default: all).
    pub partitions: Option<Vec<String>>,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Show progress bars on a terminal.
    pub progress: bool,
}

/// Errors extracting a payload.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The payload could not be opened.
    #[error(transparent)]
    Payload(#[from] PayloadReadError),
    /// A partition's description is invalid.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// An operation failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// Verity regions failed.
    #[error(transparent)]
    Verity(#[from] VerityRegionError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FileError),
    /// The extracted image's SHA-256 differs from `new_partition_info.hash`.
    #[error("partition `{partition}`: extracted image does not match new_partition_info.hash")]
    PartitionHash {
        /// The partition.
        partition: String,
    },
    /// The old image's size differs from `old_partition_info.size`.
    #[error("partition `{partition}`: old image {path} is {actual} bytes, the payload expects {expected}")]
    OldSize {
        /// The partition.
        partition: String,
        /// The image.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// Expected size.
        expected: u64,
    },
    /// The worker pool could not start.
    #[error(transparent)]
    Threads(#[from] WorkerPoolError),
}

/// One extracted partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractedPartition {
    /// Partition name.
    pub name: String,
    /// The image written.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Operations applied.
    pub operations: usize,
    /// Verity regions computed (hash tree, FEC).
    pub verity_regions: usize,
}

/// The old image of `p` in `source_dir`, when any of its operations needs one.
pub fn open_old_image(
    p: &PartitionUpdate,
    source_dir: Option<&Path>,
) -> Result<Option<OldImage>, ExtractError> {
    let needed = p.operations.iter().any(|op| reads_source(op.r#type));
    let Some(dir) = source_dir.filter(|_| needed) else {
        return Ok(None);
    };
    let path = dir.join(format!("{}.img", p.partition_name));
    let old = OldImage::open(&path).map_err(FileError::on(&path, "cannot open the old image"))?;
    if let Some(expected) = p.old_partition_info.as_ref().and_then(|i| i.size) {
        if old.size() < expected {
            return Err(ExtractError::OldSize {
                partition: p.partition_name.clone(),
                path,
                actual: old.size(),
                expected,
            });
        }
    }
    Ok(Some(old))
}

/// Blocks of the old partition: its declared size, else the image's.
pub fn old_blocks(p: &PartitionUpdate, old: Option<&OldImage>, block_size: u32) -> u64 {
    let size = p
        .old_partition_info
        .as_ref()
        .and_then(|i| i.size)
        .or(old.map(OldImage::size))
        .unwrap_or(0);
    size / u64::from(block_size)
}

/// SHA-256 of the first `size` bytes of `file`.
pub fn hash_file(file: &File, size: u64) -> std::io::Result<Vec<u8>> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut reader = file.take(size);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_vec())
}

/// Extract the payload's partitions.
pub fn extract(opts: &ExtractOptions) -> Result<Vec<ExtractedPartition>, ExtractError> {
    let payload = Payload::open(&opts.payload)?;
    let pool = worker_pool::build(opts.threads)?;
    let parts = partition::select(&payload.manifest, opts.partitions.as_deref())?;
    let block_size = payload.block_size();
    // Validate every selected partition before writing anything.
    for p in &parts {
        let (_, new_blocks) = partition::new_size(p, block_size)?;
        partition::check_destinations(p, new_blocks)?;
    }
    fs::create_dir_all(&opts.output_dir).map_err(FileError::on(
        &opts.output_dir,
        "cannot create the output directory",
    ))?;
    let mut out = Vec::new();
    for p in parts {
        out.push(pool.install(|| extract_partition(&payload, p, opts))?);
    }
    Ok(out)
}

fn extract_partition(
    payload: &Payload,
    p: &PartitionUpdate,
    opts: &ExtractOptions,
) -> Result<ExtractedPartition, ExtractError> {
    let block_size = payload.block_size();
    let bs = u64::from(block_size);
    let (size, new_blocks) = partition::new_size(p, block_size)?;
    let old = open_old_image(p, opts.source_dir.as_deref())?;
    let blocks = PartitionBlocks {
        new: new_blocks,
        old: old_blocks(p, old.as_ref(), block_size),
    };
    let final_path = opts.output_dir.join(format!("{}.img", p.partition_name));
    let tmp_path = opts
        .output_dir
        .join(format!(".{}.img.partial", p.partition_name));
    let io = FileError::on;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)
        .map_err(io(&tmp_path, "cannot create the image"))?;
    let result = (|| {
        file.set_len(size)
            .map_err(io(&tmp_path, "cannot size the image"))?;
        let progress = if opts.progress {
            Progress::bytes(&p.partition_name, size)
        } else {
            Progress::hidden()
        };
        let done = AtomicU64::new(0);
        p.operations.par_iter().enumerate().try_for_each(
            |(index, op)| -> Result<(), ExtractError> {
                let id = OpId {
                    partition: p.partition_name.clone(),
                    index,
                    op_type: op.r#type,
                };
                let written = if matches!(op.r#type, op_type::ZERO | op_type::DISCARD) {
                    // The fresh file reads as zero already; only bounds matter.
                    super::operation::dst_bytes(&id, op, block_size, new_blocks)
                        .map_err(InstallError::from)?
                } else {
                    let r = run_operation(payload, old.as_ref(), &id, op, blocks)?;
                    let mut pos = 0usize;
                    for e in &op.dst_extents {
                        let len = (e.len() * bs) as usize;
                        file.write_all_at(&r.new_data[pos..pos + len], e.start() * bs)
                            .map_err(io(&tmp_path, "cannot write the image"))?;
                        pos += len;
                    }
                    pos as u64
                };
                progress.advance(written);
                done.fetch_add(written, Ordering::Relaxed);
                Ok(())
            },
        )?;
        let regions = if verity_regions::has_verity(p) {
            let image = file
                .try_clone()
                .map_err(io(&tmp_path, "cannot reopen the image"))
                .and_then(|f| {
                    FileImage::from_file(f, &tmp_path).map_err(|e| {
                        io(&tmp_path, "cannot reopen the image")(std::io::Error::other(e))
                    })
                })?;
            let mut write_back =
                |r: &verity_regions::Region| file.write_all_at(&r.data, r.start_block * bs);
            verity_regions::compute(p, block_size, new_blocks, &image, &mut write_back)?.len()
        } else {
            0
        };
        progress.finish();
        file.sync_all()
            .map_err(io(&tmp_path, "cannot sync the image"))?;
        if let Some(want) = p.new_partition_info.as_ref().and_then(|i| i.hash.as_ref()) {
            let mut reader = &file;
            let got = {
                use std::io::Seek;
                reader
                    .seek(std::io::SeekFrom::Start(0))
                    .map_err(io(&tmp_path, "cannot read the image back"))?;
                hash_file(reader, size).map_err(io(&tmp_path, "cannot read the image back"))?
            };
            if got != *want {
                return Err(ExtractError::PartitionHash {
                    partition: p.partition_name.clone(),
                });
            }
        }
        log::debug!(
            "partition {}: {} bytes from {} operations",
            p.partition_name,
            done.load(Ordering::Relaxed),
            p.operations.len()
        );
        Ok(regions)
    })();
    match result {
        Ok(regions) => {
            fs::rename(&tmp_path, &final_path)
                .map_err(io(&final_path, "cannot rename the finished image"))?;
            Ok(ExtractedPartition {
                name: p.partition_name.clone(),
                path: final_path,
                size,
                operations: p.operations.len(),
                verity_regions: regions,
            })
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp_path);
            Err(e)
        }
    }
}
