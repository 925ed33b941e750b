//! `ota-tools apply`: write the image a completed merge of a COW file leaves.
//!
//! Two modes:
//!
//! * **Separate output** (the normal case): every block of the output is
//!   computed against the *unmodified* source image, which is what a merge
//!   in a valid merge order produces. The output is written front to back in
//!   4 MiB chunks: the chunk is read from the source (zeros past its end),
//!   the blocks that ops produce are overlaid (decompression spread over the
//!   available cores), and the chunk is written with one positioned write.
//!   A regular output is written to a new temporary file in the output's
//!   directory (`.NAME.XXXXXX.tmp`, sized first so untouched chunks past the
//!   source's end stay holes), synced and renamed over the output at the
//!   end: a failure, or a signal with [`crate::interrupt::install`], leaves
//!   an existing output as it was. A block device output is written
//!   directly.
//! * **In place** (output is the same file as the source: same device and
//!   inode, or the same block device): ops are applied one by one in merge
//!   order, exactly as a device merge does, so each op reads the image as
//!   earlier ops left it. If the COW's merge order is wrong (an op reads a
//!   block an earlier op already overwrote), the result differs from the
//!   separate-output result; comparing the two therefore checks the merge
//!   order.
//!
//! A separate output ignores `num_merge_ops` (the source image is taken as
//! unmerged); an in-place merge resumes after that many entries of the merge
//! mode's order, and refuses a count past the end of that order.
//! A block written by several ops gets the first op in file order, as AOSP's
//! merge does.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cow_format::reader::{CowReader, MergeMode, ReadError, SourceImage};
use cow_format::CowOp;
use thiserror::Error;

use crate::create::image::{BlockImage, ImageError};
use crate::interrupt::PendingTemp;
use crate::progress::Progress;
use crate::sparse::ImageSource;

/// Bytes of output assembled per write in separate-output mode.
const CHUNK_BYTES: u64 = 4 << 20;

/// Errors of `apply`, each naming the file and, where it applies, the op or
/// byte offset.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The COW's `num_merge_ops` counts more entries than its merge order has.
    #[error("COW file {}: num_merge_ops {num_merge_ops} is past the end of its merge order ({total} entries); the COW is corrupt", path.display())]
    MergedPastEnd {
        /// The COW file.
        path: PathBuf,
        /// The COW's `num_merge_ops`.
        num_merge_ops: u64,
        /// Entries in the merge order.
        total: usize,
    },
    /// A file cannot be opened or examined.
    #[error("{role} {}", path.display())]
    Open {
        /// "source image", "COW file" or "output".
        role: &'static str,
        /// Path given.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The COW file is invalid.
    #[error("COW file {}", path.display())]
    Cow {
        /// Path of the COW file.
        path: PathBuf,
        /// What the reader found.
        #[source]
        source: ReadError,
    },
    /// Producing the data of an op failed (bad payload, source too short, …).
    #[error("COW file {}: op {index} (new block {block})", path.display())]
    Op {
        /// Path of the COW file.
        path: PathBuf,
        /// File-order index of the op.
        index: u64,
        /// Block being produced.
        block: u64,
        /// The reader's error.
        #[source]
        source: ReadError,
    },
    /// Reading or writing an image failed.
    #[error("{what} {} at byte {offset}", path.display())]
    Io {
        /// What was being done ("reading source image", "writing output", …).
        what: &'static str,
        /// File involved.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// `--size` is smaller than the blocks the COW writes.
    #[error("--size {size} is smaller than the {needed} bytes the COW file's ops write")]
    SizeTooSmall {
        /// Size asked for.
        size: u64,
        /// Bytes up to the end of the highest new block.
        needed: u64,
    },
    /// A block device output is smaller than the image.
    #[error("output {} is {device_size} bytes, the image needs {needed}", path.display())]
    OutputTooSmall {
        /// Output path.
        path: PathBuf,
        /// Device size.
        device_size: u64,
        /// Image size.
        needed: u64,
    },
    /// The output is neither a regular file nor a block device.
    #[error("output {} is not a regular file or block device", path.display())]
    UnsupportedOutput {
        /// Output path.
        path: PathBuf,
    },
    /// The output would overwrite the COW file being read.
    #[error("output {} is the COW file itself", path.display())]
    OutputIsCow {
        /// Output path.
        path: PathBuf,
    },
    /// Image size arithmetic overflows.
    #[error("image size overflows computing {what}")]
    Overflow {
        /// What was computed.
        what: &'static str,
    },
    /// The source image cannot be opened, or is an invalid sparse image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// An in-place apply was asked for on a sparse source, which cannot be written in place.
    #[error("source image {} is an Android sparse image, which cannot be merged in place; write the result to a separate output", path.display())]
    SparseInPlace {
        /// Source path.
        path: PathBuf,
    },
}

/// What to apply where.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Source image (only read, unless it is also the output).
    pub source: PathBuf,
    /// COW file.
    pub cow: PathBuf,
    /// Output image, block device, or the source itself (in place).
    pub output: PathBuf,
    /// Output size in bytes; default max(source size, end of highest new block).
    pub size: Option<u64>,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Worker threads for decompression (0 = available cores).
    pub threads: usize,
}

/// How the output was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// Output separate from the source.
    SeparateOutput,
    /// Output is the source; ops applied in merge order.
    InPlace,
}

/// What `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// Mode used.
    pub mode: ApplyMode,
    /// Output image size in bytes.
    pub size: u64,
    /// Blocks produced by ops.
    pub blocks_from_ops: u64,
    /// Bytes written to the output.
    pub bytes_written: u64,
}

fn open_err(role: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ApplyError {
    let path = path.to_path_buf();
    move |source| ApplyError::Open { role, path, source }
}

/// Same file: same device and inode, or the same block device node target.
fn same_file(a: &Metadata, b: &Metadata) -> bool {
    (a.dev() == b.dev() && a.ino() == b.ino())
        || (a.file_type().is_block_device()
            && b.file_type().is_block_device()
            && a.rdev() == b.rdev())
}

/// Size of a file or block device (seeking to the end works for both).
fn byte_size(file: &File, role: &'static str, path: &Path) -> Result<u64, ApplyError> {
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(open_err(role, path))
}

/// The union of the block ranges the ops write, sorted and disjoint. Memory
/// is proportional to the number of ops, not of blocks (duplicates in a
/// hostile file cannot inflate it).
fn touched_ranges(ops: &[CowOp]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = ops
        .iter()
        .map(|o| (o.new_block, o.new_block.saturating_add(o.num_blocks)))
        .collect();
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Check that a block device output holds `needed` bytes.
pub fn check_device_size(path: &Path, device_size: u64, needed: u64) -> Result<(), ApplyError> {
    if device_size < needed {
        return Err(ApplyError::OutputTooSmall {
            path: path.to_path_buf(),
            device_size,
            needed,
        });
    }
    Ok(())
}

/// Apply the COW file to the source image, writing the merged image; in place, in the
/// user-space merge's order ([`MergeMode::User`]).
pub fn apply(opts: &ApplyOptions) -> Result<ApplyReport, ApplyError> {
    apply_with_mode(opts, MergeMode::User)
}

/// Like [`apply`]; in place, ops are merged in `merge_mode`'s order, and a COW whose
/// `num_merge_ops` is non-zero resumes after that many entries of that order (the output
/// is then taken to be the partly merged device). A separate output is always built whole.
pub fn apply_with_mode(
    opts: &ApplyOptions,
    merge_mode: MergeMode,
) -> Result<ApplyReport, ApplyError> {
    let cow_file = File::open(&opts.cow).map_err(open_err("COW file", &opts.cow))?;
    let cow_meta = cow_file
        .metadata()
        .map_err(open_err("COW file", &opts.cow))?;
    let src_meta =
        std::fs::metadata(&opts.source).map_err(open_err("source image", &opts.source))?;
    let out_meta = match std::fs::metadata(&opts.output) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(open_err("output", &opts.output)(e)),
    };
    if out_meta.as_ref().is_some_and(|m| same_file(m, &cow_meta)) {
        return Err(ApplyError::OutputIsCow {
            path: opts.output.clone(),
        });
    }
    let in_place = out_meta.as_ref().is_some_and(|m| same_file(m, &src_meta));

    let reader = CowReader::open(cow_file).map_err(|source| ApplyError::Cow {
        path: opts.cow.clone(),
        source,
    })?;
    let bs = u64::from(reader.block_size());
    let needed = reader
        .ops()
        .iter()
        .map(|op| {
            op.new_block
                .checked_add(op.num_blocks)
                .and_then(|end| end.checked_mul(bs))
        })
        .try_fold(0u64, |acc, end| end.map(|e| acc.max(e)))
        .ok_or(ApplyError::Overflow {
            what: "end of the highest new block",
        })?;

    // Size everything before touching the output.
    let source_ro = ImageSource::open(&opts.source)?;
    if in_place && source_ro.is_sparse() {
        return Err(ApplyError::SparseInPlace {
            path: opts.source.clone(),
        });
    }
    let source_size = source_ro.len_bytes();
    let size = match opts.size {
        Some(s) if s < needed => return Err(ApplyError::SizeTooSmall { size: s, needed }),
        Some(s) => s,
        None => source_size.max(needed),
    };

    // A new or existing regular output is built in a temporary file and renamed over it at
    // the end; in place and on a block device the file itself is written.
    let out_type = out_meta.as_ref().map(Metadata::file_type);
    let mut temp: Option<(tempfile::NamedTempFile, PendingTemp)> = None;
    let output = if in_place || out_type.is_some_and(|t| t.is_block_device()) {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&opts.output)
            .map_err(open_err("output", &opts.output))?
    } else if out_type.is_none_or(|t| t.is_file()) {
        let tmp = temp_output(&opts.output)?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(open_err("output", &opts.output))?;
        let pending = PendingTemp::register(tmp.path());
        temp = Some((tmp, pending));
        file
    } else {
        return Err(ApplyError::UnsupportedOutput {
            path: opts.output.clone(),
        });
    };
    let source = if in_place {
        let file = output
            .try_clone()
            .map_err(open_err("source image", &opts.source))?;
        ImageSource::from_file(file, &opts.source)?
    } else {
        source_ro
    };

    let out_type = output
        .metadata()
        .map_err(open_err("output", &opts.output))?
        .file_type();
    let set_output_len = || {
        output.set_len(size).map_err(|source| ApplyError::Io {
            what: "setting the length of output",
            path: opts.output.clone(),
            offset: size,
            source,
        })
    };
    if out_type.is_block_device() {
        let device_size = byte_size(&output, "output", &opts.output)?;
        check_device_size(&opts.output, device_size, size)?;
    } else if out_type.is_file() {
        // A separate output is a new empty file: sized in one step, it is one hole, so
        // untouched ranges past the source's end need not be written. In place, only
        // grow: shrinking would drop source bytes still to be read.
        if !in_place || size > source_size {
            set_output_len()?;
        }
    } else {
        return Err(ApplyError::UnsupportedOutput {
            path: opts.output.clone(),
        });
    }

    let ctx = Ctx {
        reader: &reader,
        cow_path: &opts.cow,
        source: &source,
        source_path: &opts.source,
        source_size,
        output: &output,
        output_path: &opts.output,
        bs,
        merge_mode,
    };
    let report = if in_place {
        let r = ctx.apply_in_place(opts.progress)?;
        if size < source_size && out_type.is_file() {
            set_output_len()?;
        }
        ApplyReport { size, ..r }
    } else {
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        ctx.apply_separate(size, threads, opts.progress, out_type.is_file())?
    };
    output.sync_all().map_err(|source| ApplyError::Io {
        what: "syncing output",
        path: opts.output.clone(),
        offset: 0,
        source,
    })?;
    if let Some((tmp, pending)) = temp {
        replace_output(tmp, pending, &opts.output, out_meta.as_ref())?;
    }
    log::info!(
        "applied {} to {}: {} bytes, {} blocks from ops",
        opts.cow.display(),
        opts.output.display(),
        report.size,
        report.blocks_from_ops
    );
    Ok(report)
}

/// A new temporary file next to `output` (same directory, so the final rename is atomic).
fn temp_output(output: &Path) -> Result<tempfile::NamedTempFile, ApplyError> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = output
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy());
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(open_err("output", output))
}

/// Give the finished temporary file the mode of the output it replaces (0644 for a new
/// one), rename it over `output` and make the rename durable.
fn replace_output(
    tmp: tempfile::NamedTempFile,
    pending: PendingTemp,
    output: &Path,
    old: Option<&Metadata>,
) -> Result<(), ApplyError> {
    let mode = old.map_or(0o644, |m| m.permissions().mode() & 0o7777);
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode)).map_err(
        |source| ApplyError::Io {
            what: "setting the mode of output",
            path: output.to_path_buf(),
            offset: 0,
            source,
        },
    )?;
    pending
        .rename_with(|| tmp.persist(output))
        .map_err(|e| ApplyError::Io {
            what: "renaming the finished image to output",
            path: output.to_path_buf(),
            offset: 0,
            source: e.error,
        })?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The data is synced already; a failure here only risks the rename after a crash.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Shared state of one apply run.
struct Ctx<'a> {
    reader: &'a CowReader<File>,
    cow_path: &'a Path,
    source: &'a ImageSource,
    source_path: &'a Path,
    source_size: u64,
    output: &'a File,
    output_path: &'a Path,
    bs: u64,
    merge_mode: MergeMode,
}

impl Ctx<'_> {
    /// Produce `block`, written by the op at position `op` of the reader's op list, into
    /// `out`, reading the source through `src` (the format's block producer; a multi-block
    /// REPLACE is decoded once per thread and sliced).
    fn produce(
        &self,
        src: &dyn SourceImage,
        block: u64,
        op: usize,
        out: &mut [u8],
    ) -> Result<(), ApplyError> {
        self.reader
            .read_op_block(op, block, src, out)
            .map_err(|source| ApplyError::Op {
                path: self.cow_path.to_path_buf(),
                index: self.reader.ops().get(op).map_or(op as u64, |o| o.index),
                block,
                source,
            })
    }

    /// Fill `buf` with source bytes at `offset`, zeros past the source's end.
    fn read_source_chunk(&self, buf: &mut [u8], offset: u64) -> Result<(), ApplyError> {
        let available = self
            .source_size
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(available);
        self.source
            .read_exact_at(head, offset)
            .map_err(|source| ApplyError::Io {
                what: "reading source image",
                path: self.source_path.to_path_buf(),
                offset,
                source,
            })?;
        tail.fill(0);
        Ok(())
    }

    fn write_output(&self, buf: &[u8], offset: u64) -> Result<(), ApplyError> {
        self.output
            .write_all_at(buf, offset)
            .map_err(|source| ApplyError::Io {
                what: "writing output",
                path: self.output_path.to_path_buf(),
                offset,
                source,
            })
    }

    /// `sparse_tail`: the output is a fresh regular file (all holes), so
    /// untouched chunks past the source's end are skipped.
    fn apply_separate(
        &self,
        size: u64,
        threads: usize,
        show_progress: bool,
        sparse_tail: bool,
    ) -> Result<ApplyReport, ApplyError> {
        let ranges = touched_ranges(self.reader.ops());
        let progress = if show_progress {
            Progress::bytes("apply", size)
        } else {
            Progress::hidden()
        };
        let chunk_bytes = CHUNK_BYTES.max(self.bs) / self.bs * self.bs;
        let mut buf = vec![0u8; chunk_bytes as usize];
        // First range that may still intersect the current chunk.
        let mut ri = 0usize;
        let mut offset = 0u64;
        let mut written = 0u64;
        let mut blocks_from_ops = 0u64;
        while offset < size {
            let first_block = offset / self.bs;
            while ranges.get(ri).is_some_and(|r| r.1 <= first_block) {
                ri += 1;
            }
            if sparse_tail && offset >= self.source_size {
                // Past the source, a regular output is a hole already: jump to
                // the chunk holding the next op-produced block.
                let target = ranges
                    .get(ri)
                    .map_or(size, |r| {
                        r.0.max(first_block).saturating_mul(self.bs) / chunk_bytes * chunk_bytes
                    })
                    .clamp(offset, size);
                if target > offset {
                    progress.advance(target - offset);
                    offset = target;
                    continue;
                }
            }
            let len = chunk_bytes.min(size - offset);
            let chunk = &mut buf[..len as usize];
            self.read_source_chunk(chunk, offset)?;
            let end_block = (offset + len) / self.bs;
            // Pair each op-produced block of the chunk with its slice.
            let mut slots: Vec<(u64, usize, &mut [u8])> = Vec::new();
            let mut rest: &mut [u8] = chunk;
            let mut rest_block = first_block;
            let mut j = ri;
            while let Some(&(s, e)) = ranges.get(j).filter(|r| r.0 < end_block) {
                for block in s.max(first_block)..e.min(end_block) {
                    let op = self
                        .reader
                        .find_op_index(block)
                        .ok_or(ApplyError::Overflow {
                            what: "block index",
                        })?;
                    let skip = ((block - rest_block) * self.bs) as usize;
                    let tail = std::mem::take(&mut rest);
                    let (_, tail) = tail.split_at_mut(skip);
                    let (slot, tail) = tail.split_at_mut(self.bs as usize);
                    slots.push((block, op, slot));
                    rest = tail;
                    rest_block = block + 1;
                }
                j += 1;
            }
            blocks_from_ops += slots.len() as u64;
            self.produce_all(&mut slots, threads)?;
            self.write_output(&buf[..len as usize], offset)?;
            written += len;
            progress.advance(len);
            offset += len;
        }
        progress.finish();
        Ok(ApplyReport {
            mode: ApplyMode::SeparateOutput,
            size,
            blocks_from_ops,
            bytes_written: written,
        })
    }

    /// Produce every slot, splitting the work over up to `threads` threads.
    fn produce_all(
        &self,
        slots: &mut [(u64, usize, &mut [u8])],
        threads: usize,
    ) -> Result<(), ApplyError> {
        let workers = threads.min(slots.len() / 16).max(1);
        if workers == 1 {
            for (block, op, out) in slots.iter_mut() {
                self.produce(self.source, *block, *op, out)?;
            }
            return Ok(());
        }
        let per = slots.len().div_ceil(workers);
        std::thread::scope(|s| {
            let handles: Vec<_> = slots
                .chunks_mut(per)
                .map(|part| {
                    s.spawn(move || {
                        for (block, op, out) in part.iter_mut() {
                            self.produce(self.source, *block, *op, out)?;
                        }
                        Ok::<(), ApplyError>(())
                    })
                })
                .collect();
            let mut result = Ok(());
            for h in handles {
                let r = h.join().unwrap_or(Err(ApplyError::Overflow {
                    what: "worker thread panicked",
                }));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    fn apply_in_place(&self, show_progress: bool) -> Result<ApplyReport, ApplyError> {
        // In place, the output is the device being merged: the first `num_merge_ops`
        // entries of this mode's order are already on it, so resume after them.
        let mut order = self.reader.merge_order(self.merge_mode.order_options(true));
        let total = self
            .reader
            .merge_order(self.merge_mode.order_options(false))
            .len();
        if usize::try_from(self.reader.num_merge_ops()).map_or(true, |n| n > total) {
            return Err(ApplyError::MergedPastEnd {
                path: self.cow_path.to_path_buf(),
                num_merge_ops: self.reader.num_merge_ops(),
                total,
            });
        }
        let progress = if show_progress {
            Progress::items("merge", order.len() as u64)
        } else {
            Progress::hidden()
        };
        let mut block_buf = vec![0u8; self.bs as usize];
        let mut blocks = 0u64;
        let mut written = 0u64;
        while let Some((idx, op)) = order.next_indexed() {
            for k in 0..op.num_blocks {
                let block = op.new_block + k;
                self.produce(self.output, block, idx, &mut block_buf)?;
                let offset = block.checked_mul(self.bs).ok_or(ApplyError::Overflow {
                    what: "output offset",
                })?;
                self.write_output(&block_buf, offset)?;
                blocks += 1;
                written += self.bs;
            }
            progress.advance(1);
        }
        progress.finish();
        Ok(ApplyReport {
            mode: ApplyMode::InPlace,
            size: 0,
            blocks_from_ops: blocks,
            bytes_written: written,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cow_format::{CompressionAlgorithm, OpKind};

    fn op(kind: OpKind, new_block: u64, num_blocks: u64, index: u64) -> CowOp {
        CowOp {
            kind,
            new_block,
            num_blocks,
            source: 0,
            data_offset: 0,
            data_length: 0,
            compression: CompressionAlgorithm::None,
            stored_raw: false,
            index,
        }
    }

    #[test]
    fn touched_ranges_are_a_disjoint_union() {
        let ops = [
            op(OpKind::Zero, 7, 1, 0),
            op(OpKind::Replace, 4, 4, 1),
            op(OpKind::Copy, 7, 1, 2),
            op(OpKind::Copy, 1, 1, 3),
            op(OpKind::Copy, 9, 1, 4),
        ];
        assert_eq!(touched_ranges(&ops), vec![(1, 2), (4, 8), (9, 10)]);
    }

    #[test]
    fn device_size_check() {
        let p = Path::new("/dev/fake");
        check_device_size(p, 8192, 8192).unwrap();
        let e = check_device_size(p, 4096, 8192).unwrap_err();
        assert_eq!(
            e.to_string(),
            "output /dev/fake is 4096 bytes, the image needs 8192"
        );
    }
}
