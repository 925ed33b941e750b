//! The `ota-tools create` command: plan the ops, compress REPLACE/XOR payloads in
//! parallel, write the COW under a temporary name in the output's directory and rename it
//! into place only when it is complete.
//!
//! Determinism: the plan is a pure function of the images (see [`super::plan`]); payloads
//! are compressed in parallel batches with [`prepare_replace`]/[`prepare_xor`] but added
//! to the writer strictly in plan order, so the file is byte-identical for any thread
//! count.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cow_format::writer::{prepare_replace, prepare_xor, PreparedOp, WriteSummary};
use cow_format::{
    Compression, CompressionAlgorithm, CowVersion, CowWriter, WriteError, WriterOptions,
};
use rayon::prelude::*;

use super::classify::{ClassifyOptions, SizeEstimator};
use super::image::{BlockImage, ImageError};
use super::plan::{build_plan, OpCounts, Plan, PlanError, PlanOptions, PlannedOp, Stage};
use super::BLOCK_SIZE;
use crate::interrupt::PendingTemp;
use crate::progress::Progress;
use crate::sparse::ImageSource;
use cow_format::MergeMode;

/// Target blocks whose payloads are read and compressed per parallel batch (4 MiB).
pub const WRITE_BATCH_BLOCKS: u64 = 1024;

/// Options of `ota-tools create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// COW format version.
    pub version: CowVersion,
    /// Payload compression.
    pub compression: Compression,
    /// v3 compression factor in bytes (ignored for v2).
    pub compression_factor: u32,
    /// Worker threads; `None` = one per CPU. At most [`max_threads`]: the work is CPU-bound,
    /// so more threads only cost memory and scheduling.
    pub threads: Option<usize>,
    /// The merge the COW is made for; it chooses the order of the COPY/XOR ops so that
    /// the device's merge batches them into long runs.
    pub merge_mode: MergeMode,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            version: CowVersion::V3,
            compression: Compression {
                algorithm: CompressionAlgorithm::Lz4,
                level: None,
            },
            compression_factor: 65536,
            threads: None,
            merge_mode: MergeMode::User,
        }
    }
}

/// Errors of `ota-tools create`.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// An input image could not be opened or read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The COW writer failed.
    #[error("writing the COW file")]
    Write(#[from] WriteError),
    /// The output could not be created, written or renamed.
    #[error("cannot write output {path}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The requested thread count is 0 or more than [`max_threads`].
    #[error("--threads {requested}: give 1 to {max} (twice the {cpus} CPUs, at least 4)")]
    ThreadCount {
        /// Requested threads.
        requested: usize,
        /// The largest accepted count.
        max: usize,
        /// CPUs available to this process.
        cpus: usize,
    },
    /// The thread pool could not be built.
    #[error("cannot start {threads} worker threads: {message}")]
    Threads {
        /// Requested threads.
        threads: usize,
        /// What went wrong.
        message: String,
    },
    /// The output names one of the input images; replacing it would destroy the input.
    #[error("output {path} is the same file as the {role} image")]
    OutputIsInput {
        /// The output path.
        path: PathBuf,
        /// "source" or "target".
        role: &'static str,
    },
    /// The plan has more ops than a v3 file can hold.
    #[error("the COW would need {ops} op records; v3 allows fewer than 2^32")]
    TooManyOps {
        /// Ops needed.
        ops: u64,
    },
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSummary {
    /// Blocks per class.
    pub counts: OpCounts,
    /// Ops converted to break merge cycles.
    pub cycle_breaks: u64,
    /// Entries in the sequence data.
    pub sequence_len: u64,
    /// What the writer reported.
    pub write: WriteSummary,
    /// Size of the COW file on disk.
    pub cow_size: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for CreateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "blocks: {} unchanged, {} copy, {} xor, {} zero, {} replace ({} cycle breaks)",
            c.unchanged, c.copy, c.xor, c.zero, c.replace, self.cycle_breaks
        )?;
        writeln!(
            f,
            "ops: {} data ops, {} sequence entries, {} payload bytes",
            self.write.data_ops, self.sequence_len, self.write.payload_bytes
        )?;
        write!(
            f,
            "cow: {} bytes, {:.2} s",
            self.cow_size,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Op records the writer will emit for `plan` (exact for this writer's chunking policy:
/// a REPLACE run of `n` blocks, `n` ≤ blocks per op, takes one record per set bit of `n`).
pub fn op_records(plan: &Plan, max_run: u32, version: CowVersion) -> u64 {
    plan.ops(max_run)
        .map(|op| match op {
            PlannedOp::Copy { .. } | PlannedOp::Xor { .. } => 1,
            PlannedOp::Zero { count, .. } => u64::from(count),
            PlannedOp::Replace { count, .. } => match version {
                CowVersion::V2 => u64::from(count),
                CowVersion::V3 => u64::from(count.count_ones()),
            },
        })
        .sum()
}

fn read_block_vec(img: &dyn BlockImage, first: u32, count: u32) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; count as usize * BLOCK_SIZE];
    img.read_blocks(u64::from(first), &mut buf)?;
    Ok(buf)
}

/// Compresses the payload of one planned op (None for COPY/ZERO).
fn prepare(
    op: PlannedOp,
    wopts: &WriterOptions,
    source: &dyn BlockImage,
    target: &dyn BlockImage,
) -> Result<Option<PreparedOp>, CreateError> {
    Ok(match op {
        PlannedOp::Replace { new_block, count } => {
            let data = read_block_vec(target, new_block, count)?;
            Some(prepare_replace(wopts, u64::from(new_block), &data)?)
        }
        PlannedOp::Xor {
            new_block,
            source_offset,
        } => {
            let mut data = read_block_vec(target, new_block, 1)?;
            let mut base = vec![0u8; BLOCK_SIZE];
            source
                .read_exact_at(&mut base, source_offset)
                .map_err(|e| ImageError::Read {
                    name: source.name(),
                    offset: source_offset,
                    len: BLOCK_SIZE,
                    source: e,
                })?;
            for (d, b) in data.iter_mut().zip(&base) {
                *d ^= b;
            }
            Some(prepare_xor(
                wopts,
                u64::from(new_block),
                &data,
                source_offset,
            )?)
        }
        PlannedOp::Copy { .. } | PlannedOp::Zero { .. } => None,
    })
}

/// Writes the ops of `plan` to `writer` in plan order, compressing batches in parallel.
fn write_ops(
    writer: &mut CowWriter,
    plan: &Plan,
    max_run: u32,
    source: &dyn BlockImage,
    target: &dyn BlockImage,
    progress: &Progress,
) -> Result<(), CreateError> {
    let wopts = *writer.options();
    let mut ops = plan.ops(max_run).peekable();
    while ops.peek().is_some() {
        let mut batch = Vec::new();
        let mut blocks = 0u64;
        while blocks < WRITE_BATCH_BLOCKS {
            let Some(op) = ops.next() else { break };
            blocks += match op {
                PlannedOp::Zero { count, .. } | PlannedOp::Replace { count, .. } => {
                    u64::from(count)
                }
                _ => 1,
            };
            batch.push(op);
        }
        let prepared: Vec<Option<PreparedOp>> = batch
            .par_iter()
            .map(|&op| prepare(op, &wopts, source, target))
            .collect::<Result<_, _>>()?;
        for (op, prep) in batch.into_iter().zip(prepared) {
            match (op, prep) {
                (PlannedOp::Copy { new_block, source }, _) => {
                    writer.add_copy(u64::from(new_block), u64::from(source))?
                }
                (PlannedOp::Zero { new_block, count }, _) => {
                    writer.add_zero(u64::from(new_block), u64::from(count))?
                }
                (_, Some(p)) => writer.add_prepared(p)?,
                (_, None) => {}
            }
        }
        progress.advance(blocks * BLOCK_SIZE as u64);
    }
    Ok(())
}

/// CPUs available to this process (at least 1).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most worker threads `create` (and `apply`) accept: twice the CPUs, and at least
/// [`MIN_THREAD_CAP`]. Both are CPU-bound; beyond this, threads add memory and scheduling,
/// not speed.
pub fn max_threads() -> usize {
    available_cpus().saturating_mul(2).max(MIN_THREAD_CAP)
}

/// [`max_threads`] never goes below this, so a small machine can still check that the
/// output does not depend on the thread count.
pub const MIN_THREAD_CAP: usize = 4;

/// The worker count for `requested` (`None`: one per CPU), or why it is refused.
pub fn worker_threads(requested: Option<usize>) -> Result<usize, CreateError> {
    let cpus = available_cpus();
    match requested {
        None => Ok(cpus),
        Some(n) if (1..=max_threads()).contains(&n) => Ok(n),
        Some(n) => Err(CreateError::ThreadCount {
            requested: n,
            max: max_threads(),
            cpus,
        }),
    }
}

/// The one rule on target images, shared by `create` and `verify`: a whole number of
/// 4 KiB blocks.
pub fn check_target_size(target: &impl BlockImage) -> Result<(), PlanError> {
    if target.len_bytes() % BLOCK_SIZE as u64 != 0 {
        return Err(PlanError::TargetSize {
            name: target.name(),
            len: target.len_bytes(),
        });
    }
    Ok(())
}

fn output_error(path: &Path) -> impl FnOnce(io::Error) -> CreateError + '_ {
    move |source| CreateError::Output {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `create`: turns `source` into `target` as a COW at `output`. On any error no file
/// is left at `output` (an existing one is untouched) and the temporary file is removed;
/// with [`crate::interrupt::install`] also when SIGINT, SIGTERM or SIGHUP ends the process.
pub fn create_cow(
    opts: &CreateOptions,
    source: &Path,
    target: &Path,
    output: &Path,
) -> Result<CreateSummary, CreateError> {
    let start = Instant::now();
    let threads = worker_threads(opts.threads)?;
    let src = ImageSource::open(source)?;
    let tgt = ImageSource::open(target)?;
    check_target_size(&tgt)?;
    if let Ok(out_meta) = std::fs::metadata(output) {
        for (role, input) in [("source", source), ("target", target)] {
            if let Ok(m) = std::fs::metadata(input) {
                if m.dev() == out_meta.dev() && m.ino() == out_meta.ino() {
                    return Err(CreateError::OutputIsInput {
                        path: output.to_path_buf(),
                        role,
                    });
                }
            }
        }
    }
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cow".to_string());
    // Create the temporary file first: an unwritable output fails before any work.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(output_error(output))?;
    let pending = PendingTemp::register(tmp.path());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| CreateError::Threads {
            threads,
            message: e.to_string(),
        })?;
    let (plan, write, max_run) = pool.install(|| -> Result<_, CreateError> {
        let src_bar = Progress::bytes("indexing source", src.len_bytes());
        let tgt_bar = Progress::bytes("comparing target", tgt.len_bytes());
        let shift_bar = Progress::items("searching moved content", tgt.block_count());
        let plan_opts = PlanOptions {
            classify: ClassifyOptions {
                xor: opts.compression.algorithm != CompressionAlgorithm::None,
                estimator: SizeEstimator::new(opts.compression),
                ..Default::default()
            },
            merge_mode: opts.merge_mode,
        };
        let plan = build_plan(&src, &tgt, &plan_opts, &|stage, n| match stage {
            Stage::Index => src_bar.advance(n * BLOCK_SIZE as u64),
            Stage::Classify => tgt_bar.advance(n * BLOCK_SIZE as u64),
            Stage::Shifted => shift_bar.advance(n),
        })?;
        src_bar.finish();
        tgt_bar.finish();
        shift_bar.finish();
        let max_run = match opts.version {
            CowVersion::V2 => 16,
            CowVersion::V3 => (opts.compression_factor / BLOCK_SIZE as u32).max(1),
        };
        let records = op_records(&plan, max_run, opts.version);
        if opts.version == CowVersion::V3 && records >= 1 << 32 {
            return Err(CreateError::TooManyOps { ops: records });
        }
        let wopts = WriterOptions {
            version: opts.version,
            compression: opts.compression,
            compression_factor: opts.compression_factor,
            op_count_max: (opts.version == CowVersion::V3).then_some(records),
            ..WriterOptions::default()
        };
        let file = tmp.as_file().try_clone().map_err(output_error(output))?;
        let mut writer = CowWriter::create(file, wopts)?;
        if !plan.sequence.is_empty() {
            writer.add_sequence(&plan.sequence)?;
        }
        let c = plan.counts();
        let write_bar = Progress::bytes(
            "writing cow",
            (c.copy + c.xor + c.zero + c.replace) * BLOCK_SIZE as u64,
        );
        write_ops(&mut writer, &plan, max_run, &src, &tgt, &write_bar)?;
        write_bar.finish();
        let write = writer.finalize()?;
        Ok((plan, write, max_run))
    })?;
    log::debug!(
        "wrote {} ops with runs of up to {max_run} blocks",
        write.data_ops
    );
    let cow_size = tmp
        .as_file()
        .metadata()
        .map_err(output_error(output))?
        .len();
    // tempfile creates 0600; a COW is not secret, give it the usual 0644.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(output_error(output))?;
    pending
        .rename_with(|| tmp.persist(output))
        .map_err(|e| output_error(output)(e.error))?;
    // Make the rename durable; a failure here does not lose data already synced.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(CreateSummary {
        counts: plan.counts(),
        cycle_breaks: plan.broken.len() as u64,
        sequence_len: plan.sequence.len() as u64,
        write,
        cow_size,
        elapsed: start.elapsed(),
    })
}
