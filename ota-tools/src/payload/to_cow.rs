//! `ota-tools payload to-cow`: for each partition, the COW file update_engine's
//! Virtual A/B writer would produce on the device from this payload and the
//! old image (fact sheet `ota-payload.md` §3):
//!
//! 1. the merge sequence: the new blocks of the `COW_COPY` and `COW_XOR`
//!    merge operations in manifest order (an extent copied onto an
//!    overlapping higher range is walked backwards), then the COPY ops
//!    (a block copied onto itself is neither sequenced nor written), label 0;
//! 2. each install operation's new data, block by block: a block covered by
//!    a `COW_COPY` was written in step 1 (the new data is checked to equal
//!    that old block), one covered by a `COW_XOR` becomes XOR against the old
//!    bytes at `src_offset`, anything else REPLACE (ZERO/DISCARD: ZERO); then
//!    a label with the number of operations done (update_engine's resume
//!    point);
//! 3. the dm-verity hash tree and FEC, computed from the new data, as
//!    REPLACE; the end-of-install label (2^48); finalize.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rayon::prelude::*;

use cow_format::{Compression, CowVersion, CowWriter, WriteError, WriterOptions};

use super::extract::{old_blocks, open_old_image, ExtractError};
use super::file_error::FileError;
use super::install::{run_operation, InstallError, OldImage, PartitionBlocks};
use super::operation::{dst_bytes, OpError, OpId, MAX_OP_BYTES};
use super::partition::{self, PartitionError};
use super::proto::{merge_type, op_type, DynamicPartitionMetadata, PartitionUpdate};
use super::reader::{Payload, PayloadReadError};
use super::verity_regions::{self, VerityRegionError};
use crate::create::image::FileImage;
use crate::progress::Progress;

/// update_engine's end-of-install label.
pub const END_OF_INSTALL_LABEL: u64 = 1 << 48;

/// What to convert.
#[derive(Debug, Clone)]
pub struct ToCowOptions {
    /// The payload.
    pub payload: PathBuf,
    /// Directory of the old `<partition>.img` files.
    pub source_dir: PathBuf,
    /// Where `<partition>.cow` files go.
    pub output_dir: PathBuf,
    /// Only these partitions.
    pub partitions: Option<Vec<String>>,
    /// COW version (default: the payload's `cow_version`, else 2).
    pub cow_version: Option<CowVersion>,
    /// Compression (default: the payload's `vabc_compression_param`, else gz).
    pub compression: Option<Compression>,
    /// v3 compression factor (default: the payload's, else 64 KiB).
    pub compression_factor: Option<u32>,
    /// Progress bars on a terminal.
    pub progress: bool,
}

/// Errors converting a payload to COW files.
#[derive(Debug, thiserror::Error)]
pub enum ToCowError {
    /// The payload could not be opened.
    #[error(transparent)]
    Payload(#[from] PayloadReadError),
    /// A partition's description is invalid.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// An operation failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// Opening the old image failed.
    #[error(transparent)]
    Old(#[from] ExtractError),
    /// Verity regions failed.
    #[error(transparent)]
    Verity(#[from] VerityRegionError),
    /// The COW writer refused an op.
    #[error("partition `{partition}`: COW write failed")]
    Write {
        /// The partition.
        partition: String,
        /// The cause.
        #[source]
        source: WriteError,
    },
    /// A merge operation is malformed or disagrees with the install operations.
    #[error("partition `{partition}` merge operation #{index}: {reason}")]
    MergeOp {
        /// The partition.
        partition: String,
        /// Index in `merge_operations`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A COPY merge operation claims a block whose new data differs.
    #[error("{op}: new block {block} differs from old block {old_block}, which a COW_COPY merge operation copies there")]
    CopyMismatch {
        /// The install operation writing the block.
        op: OpId,
        /// The new block.
        block: u64,
        /// The old block.
        old_block: u64,
    },
    /// Unsupported dynamic partition metadata value.
    #[error("dynamic partition metadata: {what} {value:?} is not supported")]
    Metadata {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// One COW written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CowFileReport {
    /// Partition.
    pub name: String,
    /// The COW file.
    pub path: PathBuf,
    /// Its size.
    pub cow_size: u64,
    /// The manifest's `estimate_cow_size`.
    pub estimate_cow_size: Option<u64>,
    /// COPY ops.
    pub copy_blocks: u64,
    /// XOR blocks.
    pub xor_blocks: u64,
    /// REPLACE blocks.
    pub replace_blocks: u64,
    /// ZERO blocks.
    pub zero_blocks: u64,
    /// Blocks of verity regions.
    pub verity_blocks: u64,
}

/// How a merge operation builds one new block.
#[derive(Debug, Clone, Copy)]
enum MergeSource {
    /// Copy of this old block.
    Copy(u64),
    /// XOR against the old bytes at this byte offset.
    Xor(u64),
    /// Copy of the same old block: nothing to write (the base device holds it).
    Unchanged,
}

/// The COW settings: the payload's, overridden by the options.
pub fn writer_settings(
    meta: Option<&DynamicPartitionMetadata>,
    opts: &ToCowOptions,
) -> Result<(CowVersion, Compression, u32), ToCowError> {
    let version = match opts.cow_version {
        Some(v) => v,
        None => match meta.and_then(|m| m.cow_version).unwrap_or(2) {
            2 => CowVersion::V2,
            3 => CowVersion::V3,
            v => {
                return Err(ToCowError::Metadata {
                    what: "cow_version",
                    value: v.to_string(),
                })
            }
        },
    };
    let compression = match opts.compression {
        Some(c) => c,
        None => {
            let param = meta
                .and_then(|m| m.vabc_compression_param.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("gz");
            param.parse().map_err(|_| ToCowError::Metadata {
                what: "vabc_compression_param",
                value: param.to_string(),
            })?
        }
    };
    let factor = match opts.compression_factor {
        Some(f) => f,
        None => match meta.and_then(|m| m.compression_factor).unwrap_or(0) {
            0 => cow_format::writer::DEFAULT_COMPRESSION_FACTOR,
            f => u32::try_from(f).map_err(|_| ToCowError::Metadata {
                what: "compression_factor",
                value: f.to_string(),
            })?,
        },
    };
    Ok((version, compression, factor))
}

/// Convert the payload's partitions to COW files.
pub fn to_cow(opts: &ToCowOptions) -> Result<Vec<CowFileReport>, ToCowError> {
    let payload = Payload::open(&opts.payload)?;
    let parts = partition::select(&payload.manifest, opts.partitions.as_deref())?;
    let block_size = payload.block_size();
    for p in &parts {
        let (_, new_blocks) = partition::new_size(p, block_size)?;
        partition::check_destinations(p, new_blocks)?;
    }
    let settings = writer_settings(payload.manifest.dynamic_partition_metadata.as_ref(), opts)?;
    fs::create_dir_all(&opts.output_dir).map_err(FileError::on(
        &opts.output_dir,
        "cannot create the output directory",
    ))?;
    parts
        .into_iter()
        .map(|p| partition_to_cow(&payload, p, opts, settings))
        .collect()
}

/// Parse and check the merge operations of `p`: the merge sequence (new
/// blocks in merge order) and each covered new block's source.
fn merge_plan(
    p: &PartitionUpdate,
    block_size: u32,
    new_blocks: u64,
    old_blocks: u64,
) -> Result<(Vec<u32>, HashMap<u64, MergeSource>), ToCowError> {
    let bs = u64::from(block_size);
    let mut sequence = Vec::new();
    let mut map = HashMap::new();
    for (index, m) in p.merge_operations.iter().enumerate() {
        let bad = |reason: String| ToCowError::MergeOp {
            partition: p.partition_name.clone(),
            index,
            reason,
        };
        let kind = m.r#type.unwrap_or(merge_type::COW_COPY);
        if kind == merge_type::COW_REPLACE {
            continue;
        }
        if kind != merge_type::COW_COPY && kind != merge_type::COW_XOR {
            return Err(bad(format!("unknown type {kind}")));
        }
        let (src, dst) = match (m.src_extent, m.dst_extent) {
            (Some(s), Some(d)) => (s, d),
            _ => return Err(bad("missing src_extent or dst_extent".into())),
        };
        let offset = u64::from(m.src_offset.unwrap_or(0));
        if offset >= bs || (kind == merge_type::COW_COPY && offset != 0) {
            return Err(bad(format!("src_offset {offset} is invalid")));
        }
        let want_src = dst.len() + u64::from(offset != 0);
        let dst_end = dst.start().checked_add(dst.len());
        let src_end = src.start().checked_add(src.len());
        if dst.is_empty()
            || dst_end.is_none_or(|e| e > new_blocks || e > u64::from(u32::MAX))
            // An XOR at an offset reads into the block after its extent,
            // which may be the partition's last block + 1 (read as zeros).
            || src_end.is_none_or(|e| e > old_blocks + u64::from(offset != 0))
            || src.len() != want_src
        {
            return Err(bad(format!(
                "extents src {}+{} dst {}+{} (offset {offset}) are inconsistent or out of bounds",
                src.start(),
                src.len(),
                dst.start(),
                dst.len()
            )));
        }
        // Walk backwards when copying onto an overlapping higher range, so
        // no block is overwritten before it is read.
        let backwards = src.start() < dst.start() && src_end.unwrap_or(0) > dst.start();
        let order: Box<dyn Iterator<Item = u64>> = if backwards {
            Box::new((0..dst.len()).rev())
        } else {
            Box::new(0..dst.len())
        };
        for i in order {
            let new_block = dst.start() + i;
            let source = if kind == merge_type::COW_COPY {
                let old = src.start() + i;
                if old == new_block {
                    if map.insert(new_block, MergeSource::Unchanged).is_some() {
                        return Err(bad(format!("block {new_block} is covered twice")));
                    }
                    continue;
                }
                MergeSource::Copy(old)
            } else {
                MergeSource::Xor((src.start() + i) * bs + offset)
            };
            if map.insert(new_block, source).is_some() {
                return Err(bad(format!("block {new_block} is covered twice")));
            }
            // Bounded by u32::MAX above.
            sequence.push(new_block as u32);
        }
    }
    check_merge_order(p, &sequence, &map, bs)?;
    Ok((sequence, map))
}

/// Refuse a merge sequence in which a block is read after an earlier merge
/// step overwrote it (the device would merge wrong data).
fn check_merge_order(
    p: &PartitionUpdate,
    sequence: &[u32],
    map: &HashMap<u64, MergeSource>,
    bs: u64,
) -> Result<(), ToCowError> {
    let mut written = std::collections::HashSet::new();
    for &b in sequence {
        let b = u64::from(b);
        let reads: [Option<u64>; 2] = match map.get(&b) {
            Some(MergeSource::Copy(old)) => [Some(*old), None],
            Some(MergeSource::Xor(off)) => {
                [Some(off / bs), (off % bs != 0).then_some(off / bs + 1)]
            }
            _ => [None, None],
        };
        if let Some(r) = reads.into_iter().flatten().find(|r| written.contains(r)) {
            return Err(ToCowError::MergeOp {
                partition: p.partition_name.clone(),
                index: 0,
                reason: format!(
                    "merge order is unsafe: new block {b} reads old block {r}, which an earlier merge step overwrote"
                ),
            });
        }
        written.insert(b);
    }
    Ok(())
}

/// Counts for the report.
#[derive(Debug, Default)]
struct Counts {
    copy: u64,
    xor: u64,
    replace: u64,
    zero: u64,
}

/// Writes runs of REPLACE / XOR blocks to the COW.
struct BlockEmitter<'a> {
    writer: &'a mut CowWriter,
    partition: &'a str,
    old: Option<&'a OldImage>,
    block_size: usize,
}

impl BlockEmitter<'_> {
    fn write_err(&self, source: WriteError) -> ToCowError {
        ToCowError::Write {
            partition: self.partition.to_string(),
            source,
        }
    }

    fn replace(&mut self, first: u64, data: &[u8]) -> Result<(), ToCowError> {
        if data.is_empty() {
            return Ok(());
        }
        let r = self.writer.add_replace(first, data);
        r.map_err(|e| self.write_err(e))
    }

    fn xor(&mut self, first: u64, new: &[u8], src_offset: u64) -> Result<(), ToCowError> {
        let old = self.old.ok_or_else(|| ToCowError::MergeOp {
            partition: self.partition.to_string(),
            index: 0,
            reason: "COW_XOR needs the old image".into(),
        })?;
        let mut base = vec![0u8; new.len()];
        old.read_at(&mut base, src_offset)
            .map_err(FileError::on(old.path(), "cannot read the old image"))?;
        for (b, n) in base.iter_mut().zip(new) {
            *b ^= n;
        }
        let r = self.writer.add_xor(first, &base, src_offset);
        r.map_err(|e| self.write_err(e))
    }
}

fn partition_to_cow(
    payload: &Payload,
    p: &PartitionUpdate,
    opts: &ToCowOptions,
    (version, compression, factor): (CowVersion, Compression, u32),
) -> Result<CowFileReport, ToCowError> {
    let block_size = payload.block_size();
    let bs = u64::from(block_size);
    let (size, new_blocks) = partition::new_size(p, block_size)?;
    let old = open_old_image(p, Some(&opts.source_dir))?;
    let old = match old {
        Some(o) => Some(o),
        None if !p.merge_operations.is_empty() => {
            let path = opts.source_dir.join(format!("{}.img", p.partition_name));
            Some(OldImage::open(&path).map_err(FileError::on(&path, "cannot open the old image"))?)
        }
        None => None,
    };
    let blocks = PartitionBlocks {
        new: new_blocks,
        old: old_blocks(p, old.as_ref(), block_size),
    };
    let (sequence, merge) = merge_plan(p, block_size, blocks.new, blocks.old)?;
    let path = opts.output_dir.join(format!("{}.cow", p.partition_name));
    let tmp_path = opts
        .output_dir
        .join(format!(".{}.cow.partial", p.partition_name));
    let io = FileError::on;
    let file = File::create(&tmp_path).map_err(io(&tmp_path, "cannot create the COW"))?;
    // A scratch image of the new partition, kept only to compute verity.
    let verity_image = if verity_regions::has_verity(p) {
        let vpath = opts
            .output_dir
            .join(format!(".{}.verity.partial", p.partition_name));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&vpath)
            .map_err(io(&vpath, "cannot create the scratch image"))?;
        f.set_len(size)
            .map_err(io(&vpath, "cannot size the scratch image"))?;
        Some((vpath, f))
    } else {
        None
    };
    let result = (|| -> Result<CowFileReport, ToCowError> {
        let wopts = WriterOptions {
            version,
            block_size,
            compression,
            compression_factor: factor,
            op_count_max: (version == CowVersion::V3).then_some(new_blocks.max(1)),
            ..WriterOptions::default()
        };
        let werr = |source| ToCowError::Write {
            partition: p.partition_name.clone(),
            source,
        };
        let sync_file = file
            .try_clone()
            .map_err(io(&tmp_path, "cannot duplicate the COW file handle"))?;
        let mut writer = CowWriter::create(file, wopts).map_err(werr)?;
        // One fsync of the finished file instead of one per label: the bytes
        // are those a device writes, the durability points are not needed.
        writer.set_durable(false);
        let mut counts = Counts::default();
        if !sequence.is_empty() {
            writer.add_sequence(&sequence).map_err(werr)?;
        }
        for &b in &sequence {
            if let Some(MergeSource::Copy(old_block)) = merge.get(&u64::from(b)) {
                writer.add_copy(u64::from(b), *old_block).map_err(werr)?;
                counts.copy += 1;
            }
        }
        writer.add_label(0).map_err(werr)?;
        let progress = if opts.progress {
            Progress::items(&p.partition_name, p.operations.len() as u64)
        } else {
            Progress::hidden()
        };
        // Operations are computed in parallel, a batch at a time (bounded
        // memory), and written in order.
        let threads = rayon::current_num_threads().max(1);
        let batch_len = threads * 4;
        for (batch_no, batch) in p.operations.chunks(batch_len).enumerate() {
            let first_index = batch_no * batch_len;
            let computed: Vec<Result<Option<Vec<u8>>, ToCowError>> = batch
                .par_iter()
                .enumerate()
                .map(|(k, op)| {
                    let id = OpId {
                        partition: p.partition_name.clone(),
                        index: first_index + k,
                        op_type: op.r#type,
                    };
                    let is_zero = matches!(op.r#type, op_type::ZERO | op_type::DISCARD);
                    let covered = op.dst_extents.iter().any(|e| {
                        (e.start()..e.start().saturating_add(e.len()))
                            .any(|b| merge.contains_key(&b))
                    });
                    let n =
                        dst_bytes(&id, op, block_size, new_blocks).map_err(InstallError::from)?;
                    if is_zero && !covered {
                        Ok(None)
                    } else if is_zero {
                        if n > MAX_OP_BYTES {
                            let e = OpError::TooLarge { op: id, bytes: n };
                            return Err(InstallError::from(e).into());
                        }
                        Ok(Some(vec![0u8; n as usize]))
                    } else {
                        Ok(Some(
                            run_operation(payload, old.as_ref(), &id, op, blocks)?.new_data,
                        ))
                    }
                })
                .collect();
            for (k, (op, new_data)) in batch.iter().zip(computed).enumerate() {
                let index = first_index + k;
                let id = OpId {
                    partition: p.partition_name.clone(),
                    index,
                    op_type: op.r#type,
                };
                match new_data? {
                    None => {
                        for e in &op.dst_extents {
                            writer.add_zero(e.start(), e.len()).map_err(werr)?;
                            counts.zero += e.len();
                        }
                    }
                    Some(new_data) => {
                        let mut emitter = BlockEmitter {
                            writer: &mut writer,
                            partition: &p.partition_name,
                            old: old.as_ref(),
                            block_size: block_size as usize,
                        };
                        let mut pos = 0usize;
                        for e in &op.dst_extents {
                            let ext_data = &new_data[pos..pos + (e.len() * bs) as usize];
                            if let Some((_, f)) = &verity_image {
                                f.write_all_at(ext_data, e.start() * bs)
                                    .map_err(io(&tmp_path, "cannot write the scratch image"))?;
                            }
                            emit_extent(
                                &mut emitter,
                                &id,
                                &merge,
                                e.start(),
                                ext_data,
                                &mut counts,
                            )?;
                            pos += (e.len() * bs) as usize;
                        }
                    }
                }
                writer.add_label(index as u64 + 1).map_err(werr)?;
                progress.advance(1);
            }
        }
        progress.finish();
        let xor_planned = merge
            .values()
            .filter(|m| matches!(m, MergeSource::Xor(_)))
            .count() as u64;
        let xor_written = counts.xor;
        if xor_written != xor_planned {
            return Err(ToCowError::MergeOp {
                partition: p.partition_name.clone(),
                index: 0,
                reason: format!(
                    "{} COW_XOR blocks are not written by any install operation",
                    xor_planned - xor_written.min(xor_planned)
                ),
            });
        }
        let mut verity_blocks = 0u64;
        if let Some((vpath, f)) = &verity_image {
            // COPY blocks hold old data in the new image.
            for (&b, m) in &merge {
                let old_block = match m {
                    MergeSource::Copy(o) => Some(*o),
                    MergeSource::Unchanged => Some(b),
                    MergeSource::Xor(_) => None,
                };
                if let (Some(old_block), Some(old)) = (old_block, old.as_ref()) {
                    let mut buf = vec![0u8; bs as usize];
                    old.read_at(&mut buf, old_block * bs)
                        .map_err(io(&tmp_path, "cannot read the old image"))?;
                    f.write_all_at(&buf, b * bs)
                        .map_err(io(&tmp_path, "cannot write the scratch image"))?;
                }
            }
            let image = f
                .try_clone()
                .and_then(|c| FileImage::from_file(c, vpath).map_err(std::io::Error::other))
                .map_err(io(vpath, "cannot reopen the scratch image"))?;
            let mut write_back =
                |r: &verity_regions::Region| f.write_all_at(&r.data, r.start_block * bs);
            let regions =
                verity_regions::compute(p, block_size, new_blocks, &image, &mut write_back)?;
            for r in regions {
                writer.add_replace(r.start_block, &r.data).map_err(werr)?;
                verity_blocks += r.data.len() as u64 / bs;
            }
        }
        writer.add_label(END_OF_INSTALL_LABEL).map_err(werr)?;
        let summary = writer.finalize().map_err(werr)?;
        sync_file
            .sync_all()
            .map_err(io(&tmp_path, "cannot sync the COW"))?;
        Ok(CowFileReport {
            name: p.partition_name.clone(),
            path: path.clone(),
            cow_size: summary.file_size,
            estimate_cow_size: p.estimate_cow_size,
            copy_blocks: counts.copy,
            xor_blocks: counts.xor,
            replace_blocks: counts.replace,
            zero_blocks: counts.zero,
            verity_blocks,
        })
    })();
    if let Some((vpath, _)) = &verity_image {
        let _ = fs::remove_file(vpath);
    }
    match result {
        Ok(r) => {
            fs::rename(&tmp_path, &path).map_err(io(&path, "cannot rename the finished COW"))?;
            Ok(r)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp_path);
            Err(e)
        }
    }
}

/// Emit one destination extent's new data block by block: COPY-covered
/// blocks are checked and skipped, XOR-covered blocks become XOR, runs of the
/// others REPLACE.
fn emit_extent(
    em: &mut BlockEmitter<'_>,
    id: &OpId,
    merge: &HashMap<u64, MergeSource>,
    first_block: u64,
    data: &[u8],
    counts: &mut Counts,
) -> Result<(), ToCowError> {
    let bs = em.block_size;
    let nblocks = data.len() / bs;
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    while i < nblocks {
        let block = first_block + i as u64;
        let chunk = &data[i * bs..(i + 1) * bs];
        match merge.get(&block) {
            None => {
                run_start.get_or_insert(i);
                i += 1;
                continue;
            }
            Some(m) => {
                if let Some(s) = run_start.take() {
                    em.replace(first_block + s as u64, &data[s * bs..i * bs])?;
                    counts.replace += (i - s) as u64;
                }
                match *m {
                    MergeSource::Copy(_) | MergeSource::Unchanged => {
                        let old_block = match *m {
                            MergeSource::Copy(b) => b,
                            _ => block,
                        };
                        let old = em.old.ok_or_else(|| ToCowError::CopyMismatch {
                            op: id.clone(),
                            block,
                            old_block,
                        })?;
                        let mut buf = vec![0u8; bs];
                        old.read_at(&mut buf, old_block * bs as u64)
                            .map_err(FileError::on(old.path(), "cannot read the old image"))?;
                        if buf != chunk {
                            return Err(ToCowError::CopyMismatch {
                                op: id.clone(),
                                block,
                                old_block,
                            });
                        }
                    }
                    MergeSource::Xor(offset) => {
                        em.xor(block, chunk, offset)?;
                        counts.xor += 1;
                    }
                }
            }
        }
        i += 1;
    }
    if let Some(s) = run_start {
        em.replace(first_block + s as u64, &data[s * bs..])?;
        counts.replace += (nblocks - s) as u64;
    }
    Ok(())
}
