//! `ota-tools payload create`: a full or incremental payload from partition
//! images. Design: `ota-tools/PAYLOAD.md` ("create").
//!
//! Each new image is read in windows. Every block is classified: all zero
//! (ZERO), equal to an old block (SOURCE_COPY, with a COW_COPY merge
//! operation), or changed. Runs of changed blocks become one operation each
//! (at most [`MAX_DATA_OP_BLOCKS`] blocks), encoded as the smallest allowed
//! of REPLACE, REPLACE_BZ, REPLACE_XZ, SOURCE_BSDIFF and BROTLI_BSDIFF (the
//! diffs against the old blocks at the same place). Changed blocks mostly
//! equal to the old block at the same place get a COW_XOR merge operation.
//! Merge operations are put in a merge-safe order (a topological sort: an
//! operation reading a block comes before the one overwriting it; cycles are
//! broken by dropping merge operations, whose blocks the device then writes
//! as REPLACE). `estimate_cow_size` is the size of the COW `to-cow` writes
//! for the partition (a dry run, as update_engine's estimator does).

use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::bspatch::{self, encode_int64, StreamCompressor, PATCH_HEADER_SIZE};
use super::file_error::FileError;
use super::partition::{check_name, PartitionError};
use super::proto::{
    merge_type, op_type, CowMergeOperation, DeltaArchiveManifest, DynamicPartitionGroup,
    DynamicPartitionMetadata, Extent, InstallOperation, PartitionInfo, PartitionUpdate,
    VabcFeatureSet,
};
use super::reader::{Payload, PayloadReadError, HEADER_SIZE};
use super::to_cow::{to_cow, ToCowError, ToCowOptions};
use super::worker_pool::{self, WorkerPoolError};
use super::writer::{PayloadWriteError, PayloadWriter};
use crate::create::image::BlockImage;
use crate::progress::Progress;
use crate::sparse::ImageSource;

/// Block size of created payloads.
pub const BLOCK_SIZE: u32 = 4096;
const BS: usize = BLOCK_SIZE as usize;
/// Largest REPLACE/diff operation, in blocks (512 KiB).
pub const MAX_DATA_OP_BLOCKS: usize = 128;
/// Largest ZERO/SOURCE_COPY operation, in blocks (4 MiB).
pub const MAX_COPY_OP_BLOCKS: u64 = 1024;
/// Blocks read per window (16 MiB).
const WINDOW_BLOCKS: u64 = 4096;
/// Minor version written for incremental payloads.
pub const INCREMENTAL_MINOR_VERSION: u32 = 8;

/// Which REPLACE encodings `create` may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplaceMode {
    /// The smallest of REPLACE, REPLACE_BZ, REPLACE_XZ.
    Auto,
    /// REPLACE only.
    None,
    /// REPLACE_BZ (or REPLACE when smaller).
    Bz,
    /// REPLACE_XZ (or REPLACE when smaller).
    Xz,
}

/// Which diff encodings `create` may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffMode {
    /// The smaller of SOURCE_BSDIFF and BROTLI_BSDIFF, when smaller than REPLACE.
    Auto,
    /// SOURCE_BSDIFF only.
    Bsdiff,
    /// BROTLI_BSDIFF only.
    Brotli,
    /// No diff operations.
    Off,
}

/// Options of `payload create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Directory of the new `<partition>.img` files.
    pub target_dir: PathBuf,
    /// Directory of the old images (incremental payload), or none (full).
    pub source_dir: Option<PathBuf>,
    /// The payload to write.
    pub output: PathBuf,
    /// Partitions (default: every `*.img` in `target_dir`, sorted).
    pub partitions: Option<Vec<String>>,
    /// REPLACE encodings allowed.
    pub replace: ReplaceMode,
    /// Diff encodings allowed.
    pub diff: DiffMode,
    /// Emit COW_XOR merge operations.
    pub xor: bool,
    /// `cow_version` of the dynamic partition metadata.
    pub cow_version: u32,
    /// `vabc_compression_param`.
    pub vabc_compression: String,
    /// `compression_factor`.
    pub compression_factor: u64,
    /// Compute `estimate_cow_size` with a dry run of `to-cow`.
    pub estimate: bool,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Progress bars on a terminal.
    pub progress: bool,
}

impl CreateOptions {
    /// Defaults for the given directories and output.
    pub fn new(target_dir: PathBuf, source_dir: Option<PathBuf>, output: PathBuf) -> Self {
        Self {
            target_dir,
            source_dir,
            output,
            partitions: None,
            replace: ReplaceMode::Auto,
            diff: DiffMode::Auto,
            xor: true,
            cow_version: 3,
            vabc_compression: "lz4".to_string(),
            compression_factor: 65536,
            estimate: true,
            threads: 0,
            progress: false,
        }
    }
}

/// Errors creating a payload.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A bad partition name.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// An image size that is not whole blocks.
    #[error("{path}: size {size} is not a multiple of {BLOCK_SIZE} bytes")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// No image found.
    #[error("{dir}: no <partition>.img files")]
    NoImages {
        /// The directory.
        dir: PathBuf,
    },
    /// Compression or diffing failed.
    #[error("partition `{partition}`, new blocks {first}+{count}: {what} failed")]
    Encode {
        /// The partition.
        partition: String,
        /// First block.
        first: u64,
        /// Blocks.
        count: usize,
        /// Which encoder.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the payload failed.
    #[error(transparent)]
    Write(#[from] PayloadWriteError),
    /// The dry run for `estimate_cow_size` failed.
    #[error("estimate_cow_size dry run failed")]
    Estimate(#[source] Box<ToCowError>),
    /// Re-reading the payload failed.
    #[error(transparent)]
    Reread(#[from] PayloadReadError),
    /// The worker pool could not start.
    #[error(transparent)]
    Threads(#[from] WorkerPoolError),
}

/// What `create` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreateSummary {
    /// Payload size.
    pub payload_size: u64,
    /// Per partition: name, operations, merge operations, estimate_cow_size.
    pub partitions: Vec<(String, usize, usize, Option<u64>)>,
}

fn list_images(dir: &Path) -> Result<Vec<String>, CreateError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(FileError::on(dir, "cannot list the directory"))? {
        let entry = entry.map_err(FileError::on(dir, "cannot list the directory"))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".img")) {
            if check_name(n).is_ok() {
                names.push(n.to_string());
            }
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(CreateError::NoImages {
            dir: dir.to_path_buf(),
        });
    }
    Ok(names)
}

/// An image (raw, or Android sparse detected by its magic) opened for block reads.
struct Image {
    path: PathBuf,
    image: ImageSource,
    blocks: u64,
}

impl Image {
    fn open(path: &Path) -> Result<Self, CreateError> {
        let image = ImageSource::open(path)
            .map_err(|e| FileError::on(path, "cannot open the image")(std::io::Error::other(e)))?;
        let size = image.len_bytes();
        if size % u64::from(BLOCK_SIZE) != 0 {
            return Err(CreateError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            image,
            blocks: size / u64::from(BLOCK_SIZE),
        })
    }

    fn read_blocks(&self, first: u64, count: u64) -> Result<Vec<u8>, CreateError> {
        let mut buf = vec![0u8; (count as usize) * BS];
        self.image
            .read_exact_at(&mut buf, first * u64::from(BLOCK_SIZE))
            .map_err(FileError::on(&self.path, "cannot read the image"))?;
        Ok(buf)
    }

    /// SHA-256 of the whole image.
    fn sha256(&self) -> Result<Vec<u8>, CreateError> {
        let mut h = Sha256::new();
        let mut first = 0u64;
        while first < self.blocks {
            let count = WINDOW_BLOCKS.min(self.blocks - first);
            h.update(self.read_blocks(first, count)?);
            first += count;
        }
        Ok(h.finalize().to_vec())
    }
}

fn block_key(block: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    block.hash(&mut h);
    h.finish()
}

/// Index of the old image's non-zero blocks by content hash (first block
/// with each hash).
fn index_old(old: &Image) -> Result<HashMap<u64, u64>, CreateError> {
    let mut map = HashMap::new();
    let mut first = 0u64;
    while first < old.blocks {
        let count = WINDOW_BLOCKS.min(old.blocks - first);
        let buf = old.read_blocks(first, count)?;
        for (i, b) in buf.chunks_exact(BS).enumerate() {
            if b.iter().any(|&x| x != 0) {
                map.entry(block_key(b)).or_insert(first + i as u64);
            }
        }
        first += count;
    }
    Ok(map)
}

/// How one new block is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockClass {
    Zero,
    Copy(u64),
    Changed,
}

/// One encoded data operation before its blob is placed.
struct Encoded {
    op: InstallOperation,
    blob: Vec<u8>,
    xor: Vec<CowMergeOperation>,
}

fn xz(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(data)?;
    e.finish()
}

fn bz(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    e.write_all(data)?;
    e.finish()
}

fn brotli_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 9, 22);
        w.write_all(data)?;
        w.flush()?;
    }
    Ok(out)
}

/// A BSDIFF40 patch of `old` → `new`.
pub fn bsdiff40(old: &[u8], new: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(old, new)
        .parallel_scheme(qbsdiff::ParallelScheme::Never)
        .compression_level(9)
        .compare(std::io::Cursor::new(&mut patch))?;
    Ok(patch)
}

/// Re-encode a BSDIFF40 patch as BSDF2 with brotli streams.
pub fn bsdiff40_to_bsdf2_brotli(patch: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = |e: bspatch::BsPatchError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let h = bspatch::parse_header(patch).map_err(bad)?;
    let body = &patch[PATCH_HEADER_SIZE..];
    let ctrl_end = h.ctrl_len as usize;
    let diff_end = ctrl_end + h.diff_len as usize;
    let stream = |r: &[u8]| -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        bzip2::read::BzDecoder::new(r).read_to_end(&mut out)?;
        brotli_compress(&out)
    };
    let slice = |a: usize, b: usize| {
        body.get(a..b)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "short patch"))
    };
    let ctrl = stream(slice(0, ctrl_end)?)?;
    let diff = stream(slice(ctrl_end, diff_end)?)?;
    let extra = stream(slice(diff_end, body.len())?)?;
    let mut out = Vec::with_capacity(PATCH_HEADER_SIZE + ctrl.len() + diff.len() + extra.len());
    out.extend_from_slice(b"BSDF2");
    out.extend([StreamCompressor::Brotli.id(); 3]);
    out.extend(encode_int64(ctrl.len() as i64));
    out.extend(encode_int64(diff.len() as i64));
    out.extend(encode_int64(h.new_size as i64));
    out.extend(ctrl);
    out.extend(diff);
    out.extend(extra);
    Ok(out)
}

/// Encode one run of changed blocks `[first, first + n)` (new bytes `new`);
/// `old` holds the old blocks at the same place (possibly fewer).
fn encode_run(
    opts: &CreateOptions,
    partition: &str,
    first: u64,
    new: &[u8],
    old: &[u8],
) -> Result<Encoded, CreateError> {
    let count = new.len() / BS;
    let enc = |what: &'static str| {
        let partition = partition.to_string();
        move |source| CreateError::Encode {
            partition,
            first,
            count,
            what,
            source,
        }
    };
    let mut best: (i32, Vec<u8>) = (op_type::REPLACE, new.to_vec());
    let mut consider = |t: i32, blob: Vec<u8>| {
        if blob.len() < best.1.len() {
            best = (t, blob);
        }
    };
    if matches!(opts.replace, ReplaceMode::Auto | ReplaceMode::Bz) {
        consider(op_type::REPLACE_BZ, bz(new).map_err(enc("bzip2"))?);
    }
    if matches!(opts.replace, ReplaceMode::Auto | ReplaceMode::Xz) {
        consider(op_type::REPLACE_XZ, xz(new).map_err(enc("xz"))?);
    }
    if !old.is_empty() && opts.diff != DiffMode::Off {
        let patch = bsdiff40(old, new).map_err(enc("bsdiff"))?;
        if opts.diff == DiffMode::Brotli || opts.diff == DiffMode::Auto {
            let b = bsdiff40_to_bsdf2_brotli(&patch).map_err(enc("brotli"))?;
            consider(op_type::BROTLI_BSDIFF, b);
        }
        if opts.diff == DiffMode::Bsdiff || opts.diff == DiffMode::Auto {
            consider(op_type::SOURCE_BSDIFF, patch);
        }
    }
    let (t, blob) = best;
    let old_blocks = (old.len() / BS) as u64;
    let mut op = InstallOperation {
        r#type: t,
        dst_extents: vec![Extent::new(first, count as u64)],
        data_sha256_hash: Some(Sha256::digest(&blob).to_vec()),
        ..Default::default()
    };
    let mut xor = Vec::new();
    if t == op_type::SOURCE_BSDIFF || t == op_type::BROTLI_BSDIFF {
        op.src_extents = vec![Extent::new(first, old_blocks)];
        op.src_sha256_hash = Some(Sha256::digest(old).to_vec());
        if opts.xor {
            // Blocks mostly equal to the old block at the same place.
            let mut run: Option<u64> = None;
            let similar = |i: usize| {
                (i as u64) < old_blocks && {
                    let n = &new[i * BS..(i + 1) * BS];
                    let o = &old[i * BS..(i + 1) * BS];
                    let same = n.iter().zip(o).filter(|(a, b)| a == b).count();
                    same * 2 >= BS
                }
            };
            for i in 0..=count {
                let yes = i < count && similar(i);
                match (yes, run) {
                    (true, None) => run = Some(i as u64),
                    (false, Some(s)) => {
                        let len = i as u64 - s;
                        xor.push(CowMergeOperation {
                            r#type: Some(merge_type::COW_XOR),
                            src_extent: Some(Extent::new(first + s, len)),
                            dst_extent: Some(Extent::new(first + s, len)),
                            src_offset: Some(0),
                        });
                        run = None;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(Encoded { op, blob, xor })
}

/// Order merge operations so that none overwrites a block a later one reads
/// (per operation; within one, `to-cow` walks overlapping copies in the safe
/// direction). A dependency cycle is broken by dropping one of its
/// operations. Returns the ordered operations and how many were dropped.
pub fn order_merge_ops(ops: Vec<CowMergeOperation>) -> (Vec<CowMergeOperation>, usize) {
    let n = ops.len();
    let range = |e: Option<Extent>| e.map_or((0, 0), |e| (e.start(), e.start() + e.len()));
    // Destinations sorted by start (they do not overlap).
    // A copy onto itself writes nothing and constrains nothing (an XOR at
    // its own place does write).
    let mut by_dst: Vec<(u64, u64, usize)> = ops
        .iter()
        .enumerate()
        .filter(|(_, m)| m.r#type != Some(merge_type::COW_COPY) || m.src_extent != m.dst_extent)
        .map(|(i, m)| {
            let (s, e) = range(m.dst_extent);
            (s, e, i)
        })
        .collect();
    by_dst.sort_unstable();
    // Edge reader -> writer: the reader must come first.
    let mut out_edges: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (i, m) in ops.iter().enumerate() {
        let (ss, se) = range(m.src_extent);
        let start = by_dst.partition_point(|&(_, e, _)| e <= ss);
        for &(ds, _, j) in &by_dst[start..] {
            if ds >= se {
                break;
            }
            if j != i {
                out_edges[i].push(j);
                indegree[j] += 1;
            }
        }
    }
    let mut ready: std::collections::VecDeque<usize> =
        (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    let mut done = vec![false; n];
    let mut dropped = 0usize;
    let mut next_victim = 0usize;
    loop {
        while let Some(i) = ready.pop_front() {
            done[i] = true;
            order.push(i);
            for &j in &out_edges[i] {
                indegree[j] -= 1;
                if indegree[j] == 0 && !done[j] {
                    ready.push_back(j);
                }
            }
        }
        // Everything left waits on a cycle: drop one operation (its blocks
        // become REPLACE); it no longer has to come before anything.
        while next_victim < n && done[next_victim] {
            next_victim += 1;
        }
        if next_victim == n {
            break;
        }
        let victim = next_victim;
        done[victim] = true;
        dropped += 1;
        for &j in &out_edges[victim] {
            indegree[j] -= 1;
            if indegree[j] == 0 && !done[j] {
                ready.push_back(j);
            }
        }
    }
    let mut slots: Vec<Option<CowMergeOperation>> = ops.into_iter().map(Some).collect();
    let ordered = order.into_iter().filter_map(|i| slots[i].take()).collect();
    (ordered, dropped)
}

/// Build one partition's update, appending its blobs to `writer`.
fn partition_update(
    opts: &CreateOptions,
    name: &str,
    writer: &mut PayloadWriter,
) -> Result<PartitionUpdate, CreateError> {
    let new = Image::open(&opts.target_dir.join(format!("{name}.img")))?;
    let old = match &opts.source_dir {
        Some(dir) => {
            let path = dir.join(format!("{name}.img"));
            if path.exists() {
                Some(Image::open(&path)?)
            } else {
                log::warn!(
                    "{}: absent; partition `{name}` is sent in full",
                    path.display()
                );
                None
            }
        }
        None => None,
    };
    let index = match &old {
        Some(o) => index_old(o)?,
        None => HashMap::new(),
    };
    let progress = if opts.progress {
        Progress::bytes(name, new.blocks * u64::from(BLOCK_SIZE))
    } else {
        Progress::hidden()
    };
    let mut operations = Vec::new();
    let mut merge = Vec::new();
    let mut first = 0u64;
    while first < new.blocks {
        let count = WINDOW_BLOCKS.min(new.blocks - first);
        let new_buf = new.read_blocks(first, count)?;
        let old_count = old
            .as_ref()
            .map_or(0, |o| o.blocks.saturating_sub(first).min(count));
        let old_buf = match &old {
            Some(o) if old_count > 0 => o.read_blocks(first, old_count)?,
            _ => Vec::new(),
        };
        // Classify.
        let mut classes = Vec::with_capacity(count as usize);
        for (i, b) in new_buf.chunks_exact(BS).enumerate() {
            let here = first + i as u64;
            let class = if b.iter().all(|&x| x == 0) {
                BlockClass::Zero
            } else if old_buf.get(i * BS..(i + 1) * BS) == Some(b) {
                BlockClass::Copy(here)
            } else if let (Some(&ob), Some(o)) = (index.get(&block_key(b)), old.as_ref()) {
                if o.read_blocks(ob, 1)? == b {
                    BlockClass::Copy(ob)
                } else {
                    BlockClass::Changed
                }
            } else {
                BlockClass::Changed
            };
            classes.push(class);
        }
        // Split into runs: (start index, len, class of the first block).
        let mut runs: Vec<(usize, usize, BlockClass)> = Vec::new();
        for (i, &c) in classes.iter().enumerate() {
            if let Some(last) = runs.last_mut() {
                let extends = match (last.2, c) {
                    (BlockClass::Zero, BlockClass::Zero) => (last.1 as u64) < MAX_COPY_OP_BLOCKS,
                    (BlockClass::Changed, BlockClass::Changed) => last.1 < MAX_DATA_OP_BLOCKS,
                    (BlockClass::Copy(s), BlockClass::Copy(o)) => {
                        o == s + last.1 as u64 && (last.1 as u64) < MAX_COPY_OP_BLOCKS
                    }
                    _ => false,
                };
                if extends {
                    last.1 += 1;
                    continue;
                }
            }
            runs.push((i, 1, c));
        }
        // Encode the changed runs in parallel, in order.
        let encoded: Vec<Option<Encoded>> = runs
            .par_iter()
            .map(|&(s, len, c)| {
                if c != BlockClass::Changed {
                    return Ok(None);
                }
                let new_bytes = &new_buf[s * BS..(s + len) * BS];
                let old_end = (s + len).min(old_buf.len() / BS);
                let old_bytes = if old_end > s {
                    &old_buf[s * BS..old_end * BS]
                } else {
                    &[][..]
                };
                encode_run(opts, name, first + s as u64, new_bytes, old_bytes).map(Some)
            })
            .collect::<Result<_, _>>()?;
        for (&(s, len, c), e) in runs.iter().zip(encoded) {
            let dst = Extent::new(first + s as u64, len as u64);
            match (c, e) {
                (BlockClass::Zero, _) => operations.push(InstallOperation {
                    r#type: op_type::ZERO,
                    dst_extents: vec![dst],
                    ..Default::default()
                }),
                (BlockClass::Copy(src), _) => {
                    let src_e = Extent::new(src, len as u64);
                    let o = old.as_ref().map(|o| o.read_blocks(src, len as u64));
                    let src_hash = match o {
                        Some(bytes) => Some(Sha256::digest(bytes?).to_vec()),
                        None => None,
                    };
                    operations.push(InstallOperation {
                        r#type: op_type::SOURCE_COPY,
                        src_extents: vec![src_e],
                        dst_extents: vec![dst],
                        src_sha256_hash: src_hash,
                        ..Default::default()
                    });
                    merge.push(CowMergeOperation {
                        r#type: Some(merge_type::COW_COPY),
                        src_extent: Some(src_e),
                        dst_extent: Some(dst),
                        src_offset: None,
                    });
                }
                (BlockClass::Changed, Some(mut enc)) => {
                    let (offset, length) = writer.add_blob(&enc.blob)?;
                    enc.op.data_offset = Some(offset);
                    enc.op.data_length = Some(length);
                    operations.push(enc.op);
                    merge.extend(enc.xor);
                }
                (BlockClass::Changed, None) => {}
            }
        }
        progress.advance(count * u64::from(BLOCK_SIZE));
        first += count;
    }
    progress.finish();
    let (merge_operations, dropped) = order_merge_ops(merge);
    if dropped > 0 {
        log::info!("partition {name}: {dropped} merge operations in cycles left to REPLACE");
    }
    Ok(PartitionUpdate {
        partition_name: name.to_string(),
        old_partition_info: match &old {
            Some(o) => Some(PartitionInfo {
                size: Some(o.blocks * u64::from(BLOCK_SIZE)),
                hash: Some(o.sha256()?),
            }),
            None => None,
        },
        new_partition_info: Some(PartitionInfo {
            size: Some(new.blocks * u64::from(BLOCK_SIZE)),
            hash: Some(new.sha256()?),
        }),
        operations,
        merge_operations,
        estimate_op_count_max: Some(new.blocks),
        ..Default::default()
    })
}

/// Rewrite the manifest of the payload at `path` (blob offsets are relative
/// to the data section, so the blobs are copied unchanged).
fn rewrite_manifest(path: &Path, manifest: &DeltaArchiveManifest) -> Result<u64, CreateError> {
    let payload = Payload::open(path)?;
    let data_start = payload.data_start;
    drop(payload);
    let mut writer = PayloadWriter::new(path)?;
    let mut f = File::open(path).map_err(FileError::on(path, "cannot reopen the payload"))?;
    let mut skip = vec![0u8; data_start as usize];
    f.read_exact(&mut skip)
        .map_err(FileError::on(path, "cannot reread the payload"))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(FileError::on(path, "cannot reread the payload"))?;
        if n == 0 {
            break;
        }
        writer.add_blob(&buf[..n])?;
    }
    debug_assert!(data_start >= HEADER_SIZE);
    Ok(writer.finish(manifest)?)
}

/// Create the payload.
pub fn create(opts: &CreateOptions) -> Result<CreateSummary, CreateError> {
    let pool = worker_pool::build(opts.threads)?;
    let names = match &opts.partitions {
        Some(p) => p.clone(),
        None => list_images(&opts.target_dir)?,
    };
    for n in &names {
        check_name(n)?;
    }
    let mut writer = PayloadWriter::new(&opts.output)?;
    let mut partitions = Vec::new();
    for n in &names {
        partitions.push(pool.install(|| partition_update(opts, n, &mut writer))?);
    }
    let incremental = partitions.iter().any(|p| p.old_partition_info.is_some());
    let total: u64 = partitions
        .iter()
        .filter_map(|p| p.new_partition_info.as_ref().and_then(|i| i.size))
        .sum();
    let mut manifest = DeltaArchiveManifest {
        block_size: Some(BLOCK_SIZE),
        minor_version: Some(if incremental {
            INCREMENTAL_MINOR_VERSION
        } else {
            0
        }),
        partitions,
        dynamic_partition_metadata: Some(DynamicPartitionMetadata {
            groups: vec![DynamicPartitionGroup {
                name: "default".to_string(),
                size: Some(total),
                partition_names: names.clone(),
            }],
            snapshot_enabled: Some(true),
            vabc_enabled: Some(true),
            vabc_compression_param: Some(opts.vabc_compression.clone()),
            cow_version: Some(opts.cow_version),
            vabc_feature_set: Some(VabcFeatureSet {
                threaded: Some(true),
                batch_writes: Some(true),
            }),
            compression_factor: Some(opts.compression_factor),
        }),
        ..Default::default()
    };
    let mut size = writer.finish(&manifest)?;
    if opts.estimate {
        let dry = tempfile::tempdir_in(
            opts.output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
        .map_err(FileError::on(
            &opts.output,
            "cannot create a scratch directory",
        ))?;
        let reports = pool
            .install(|| {
                to_cow(&ToCowOptions {
                    payload: opts.output.clone(),
                    source_dir: opts
                        .source_dir
                        .clone()
                        .unwrap_or_else(|| dry.path().to_path_buf()),
                    output_dir: dry.path().to_path_buf(),
                    partitions: None,
                    cow_version: None,
                    compression: None,
                    compression_factor: None,
                    progress: false,
                })
            })
            .map_err(|e| CreateError::Estimate(Box::new(e)))?;
        for (p, r) in manifest.partitions.iter_mut().zip(&reports) {
            p.estimate_cow_size = Some(r.cow_size);
        }
        size = rewrite_manifest(&opts.output, &manifest)?;
    }
    Ok(CreateSummary {
        payload_size: size,
        partitions: manifest
            .partitions
            .iter()
            .map(|p| {
                (
                    p.partition_name.clone(),
                    p.operations.len(),
                    p.merge_operations.len(),
                    p.estimate_cow_size,
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(src: u64, dst: u64, n: u64) -> CowMergeOperation {
        CowMergeOperation {
            r#type: Some(merge_type::COW_COPY),
            src_extent: Some(Extent::new(src, n)),
            dst_extent: Some(Extent::new(dst, n)),
            src_offset: None,
        }
    }

    #[test]
    fn an_xor_in_place_is_a_writer() {
        let xor = CowMergeOperation {
            r#type: Some(merge_type::COW_XOR),
            src_extent: Some(Extent::new(5, 1)),
            dst_extent: Some(Extent::new(5, 1)),
            src_offset: Some(0),
        };
        // The copy reads block 5, which the XOR rewrites: the copy goes first.
        let (ordered, dropped) = order_merge_ops(vec![xor, copy(5, 9, 1)]);
        assert_eq!(dropped, 0);
        assert_eq!(ordered[0].dst_extent.unwrap().start(), 9);
    }

    #[test]
    fn readers_come_before_writers_and_one_op_breaks_a_cycle() {
        // a: 10 -> 20 reads 10; b: 20 -> 30 reads 20 (must precede a);
        // c: 30 -> 40 reads 30 (must precede b).
        let (ordered, dropped) =
            order_merge_ops(vec![copy(10, 20, 1), copy(20, 30, 1), copy(30, 40, 1)]);
        assert_eq!(dropped, 0);
        let dsts: Vec<u64> = ordered
            .iter()
            .map(|m| m.dst_extent.unwrap().start())
            .collect();
        assert_eq!(dsts, vec![40, 30, 20]);
        // A three-way rotation is a cycle: one op dropped, the other two kept in a safe order.
        let (ordered, dropped) = order_merge_ops(vec![copy(1, 2, 1), copy(2, 3, 1), copy(3, 1, 1)]);
        assert_eq!(dropped, 1);
        assert_eq!(ordered.len(), 2);
        let mut written = std::collections::HashSet::new();
        for m in &ordered {
            assert!(!written.contains(&m.src_extent.unwrap().start()));
            written.insert(m.dst_extent.unwrap().start());
        }
    }
}
