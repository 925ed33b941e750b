//! The op plan: what every target block becomes, and the merge order of the ordered ops.
//!
//! [`build_plan`] runs the whole pipeline: index the source, classify every target
//! block, give REPLACE blocks a second chance as XOR against source content at any byte
//! offset ([`super::shifted`]), move every COPY/XOR onto the nearest source block holding
//! its base's bytes ([`super::near_bases`]), drop the index, then order the COPY/XOR ops
//! and break cycles ([`super::order`]). The plan holds one [`BlockClass`] (8 bytes) per target block
//! plus one `u32` per ordered op; the search and the ordering hold their temporaries
//! (CREATE.md §5) one after the other.
//!
//! File order of the ops (what a writer should emit): the ordered ops in merge order
//! (which is also the sequence data), then ZERO and REPLACE ops in ascending block order,
//! adjacent REPLACE blocks grouped into runs. With the sequence data, the reader merges
//! the ordered ops in sequence order and the others ascending (cow-format.md §6.2).

use super::block_index::{IndexError, SourceIndex};
use super::classify::{
    classify_image, xor_pays_off, BlockClass, ClassifyError, ClassifyOptions, SizeEstimator,
};
use super::image::{BlockImage, ImageError};
use super::merge_check::MergeStep;
use super::near_bases::move_to_near_bases;
use super::order::{order_ops, CycleBreaker};
use super::shifted::add_shifted_xors;
use super::BLOCK_SIZE;
use cow_format::MergeMode;

/// Errors building a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The target length is not a whole number of blocks.
    #[error("target image {name} is {len} bytes, not a multiple of {BLOCK_SIZE}")]
    TargetSize {
        /// Name of the target image.
        name: String,
        /// Its length in bytes.
        len: u64,
    },
    /// Indexing the source failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Classification failed.
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    /// Reading an image while searching XOR bases or breaking cycles failed.
    #[error("searching XOR bases or breaking merge cycles")]
    Image(#[from] ImageError),
}

/// Pipeline stage reported to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Hashing the source blocks.
    Index,
    /// Classifying the target blocks.
    Classify,
    /// Searching XOR bases at any byte offset for REPLACE blocks (progress in target
    /// blocks).
    Shifted,
}

/// One op of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlannedOp {
    /// COPY `source` to `new_block`.
    Copy {
        /// Target block.
        new_block: u32,
        /// Source block.
        source: u32,
    },
    /// XOR of the target block with the 4096 source bytes at `source_offset`.
    Xor {
        /// Target block.
        new_block: u32,
        /// Source byte offset (a multiple of 4096 unless the content moved by bytes).
        source_offset: u64,
    },
    /// `count` zero blocks from `new_block`.
    Zero {
        /// First target block.
        new_block: u32,
        /// Number of blocks.
        count: u32,
    },
    /// `count` target blocks from `new_block`, stored in the COW.
    Replace {
        /// First target block.
        new_block: u32,
        /// Number of blocks.
        count: u32,
    },
}

impl PlannedOp {
    /// First target block written.
    pub fn new_block(self) -> u32 {
        match self {
            PlannedOp::Copy { new_block, .. }
            | PlannedOp::Xor { new_block, .. }
            | PlannedOp::Zero { new_block, .. }
            | PlannedOp::Replace { new_block, .. } => new_block,
        }
    }
}

/// Counts of ops and blocks in a plan.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpCounts {
    /// Target blocks identical to the source at the same position.
    pub unchanged: u64,
    /// ZERO blocks.
    pub zero: u64,
    /// COPY ops.
    pub copy: u64,
    /// XOR ops.
    pub xor: u64,
    /// REPLACE blocks.
    pub replace: u64,
}

impl OpCounts {
    /// Upper bound of data ops a writer emits (every ZERO/REPLACE block as its own op).
    pub fn max_ops(&self) -> u64 {
        self.zero + self.copy + self.xor + self.replace
    }
}

/// The complete plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What each target block becomes (index = target block).
    pub classes: Vec<BlockClass>,
    /// Merge order of the ordered ops (new-block numbers): the sequence data.
    pub sequence: Vec<u32>,
    /// Blocks converted to break dependency cycles.
    pub broken: Vec<u32>,
    /// Number of blocks in the source image.
    pub source_blocks: u64,
}

impl Plan {
    /// Number of blocks of the target image.
    pub fn target_blocks(&self) -> u64 {
        self.classes.len() as u64
    }

    /// Op and block counts.
    pub fn counts(&self) -> OpCounts {
        let mut c = OpCounts::default();
        for class in &self.classes {
            match class {
                BlockClass::Unchanged => c.unchanged += 1,
                BlockClass::Zero => c.zero += 1,
                BlockClass::Copy { .. } => c.copy += 1,
                BlockClass::Xor { .. } | BlockClass::XorAt { .. } => c.xor += 1,
                BlockClass::Replace => c.replace += 1,
            }
        }
        c
    }

    /// The ordered ops, in merge order.
    pub fn ordered_ops(&self) -> impl Iterator<Item = PlannedOp> + '_ {
        self.sequence
            .iter()
            .filter_map(move |&n| match self.classes.get(n as usize)? {
                BlockClass::Copy { source } => Some(PlannedOp::Copy {
                    new_block: n,
                    source: *source,
                }),
                c @ (BlockClass::Xor { .. } | BlockClass::XorAt { .. }) => Some(PlannedOp::Xor {
                    new_block: n,
                    source_offset: c.source_offset()?,
                }),
                _ => None,
            })
    }

    /// ZERO and REPLACE ops in ascending block order; adjacent blocks of the same kind are
    /// grouped into runs of at most `max_run` blocks (at least 1).
    pub fn other_ops(&self, max_run: u32) -> impl Iterator<Item = PlannedOp> + '_ {
        let max_run = max_run.max(1);
        let mut n = 0usize;
        std::iter::from_fn(move || {
            while n < self.classes.len() {
                let class = self.classes[n];
                if !matches!(class, BlockClass::Zero | BlockClass::Replace) {
                    n += 1;
                    continue;
                }
                let first = n;
                while n < self.classes.len()
                    && self.classes[n] == class
                    && n - first < max_run as usize
                {
                    n += 1;
                }
                let new_block = first as u32;
                let count = (n - first) as u32;
                return Some(if class == BlockClass::Zero {
                    PlannedOp::Zero { new_block, count }
                } else {
                    PlannedOp::Replace { new_block, count }
                });
            }
            None
        })
    }

    /// Every op in file order (= merge order), REPLACE/ZERO runs capped at `max_run`.
    pub fn ops(&self, max_run: u32) -> impl Iterator<Item = PlannedOp> + '_ {
        self.ordered_ops().chain(self.other_ops(max_run))
    }

    /// The plan's ops as merge steps (one step per block), for [`super::merge_check`].
    pub fn merge_steps(&self) -> impl Iterator<Item = MergeStep> + '_ {
        self.ops(1).enumerate().map(|(i, op)| {
            let bs = BLOCK_SIZE as u64;
            let (ordered, reads) = match op {
                PlannedOp::Copy { source, .. } => (true, Some((u64::from(source), 1))),
                PlannedOp::Xor { source_offset, .. } => (
                    true,
                    Some((
                        source_offset / bs,
                        if source_offset % bs == 0 { 1 } else { 2 },
                    )),
                ),
                _ => (false, None),
            };
            MergeStep {
                position: i as u64,
                new_block: u64::from(op.new_block()),
                num_blocks: 1,
                ordered,
                reads,
            }
        })
    }
}

/// Options for planning.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Classification options.
    pub classify: ClassifyOptions,
    /// The merge the COW is made for: it chooses the order of independent ordered ops.
    pub merge_mode: MergeMode,
}

/// Breaks cycles by reading the images: a member becomes an XOR against its own position
/// when that compresses far better than the block alone, else REPLACE.
struct ImageBreaker<'a> {
    source: &'a dyn BlockImage,
    target: &'a dyn BlockImage,
    xor: bool,
    estimator: SizeEstimator,
}

impl ImageBreaker<'_> {
    /// (estimate of REPLACE, estimate of self-XOR if possible)
    fn estimates(&self, block: u32) -> Result<(usize, Option<usize>), ImageError> {
        let mut t = vec![0u8; BLOCK_SIZE];
        self.target.read_blocks(u64::from(block), &mut t)?;
        let rep = self.estimator.estimate(&t);
        if !self.xor || u64::from(block) >= self.source.block_count() {
            return Ok((rep, None));
        }
        let mut s = vec![0u8; BLOCK_SIZE];
        self.source.read_blocks(u64::from(block), &mut s)?;
        for (x, y) in s.iter_mut().zip(&t) {
            *x ^= y;
        }
        Ok((rep, Some(self.estimator.estimate(&s))))
    }
}

impl CycleBreaker for ImageBreaker<'_> {
    type Error = ImageError;

    fn cost(&mut self, block: u32) -> Result<u64, ImageError> {
        let (rep, xor) = self.estimates(block)?;
        Ok(xor.map_or(rep, |x| x.min(rep)) as u64)
    }

    fn replacement(&mut self, block: u32) -> Result<BlockClass, ImageError> {
        Ok(match self.estimates(block)? {
            (rep, Some(x)) if xor_pays_off(x, rep) => BlockClass::Xor { source: block },
            _ => BlockClass::Replace,
        })
    }
}

/// Builds the plan that turns `source` into `target`. `progress(stage, blocks)` is called
/// after each batch of blocks.
pub fn build_plan(
    source: &dyn BlockImage,
    target: &dyn BlockImage,
    opts: &PlanOptions,
    progress: &(dyn Fn(Stage, u64) + Sync),
) -> Result<Plan, PlanError> {
    let len = target.len_bytes();
    if len % BLOCK_SIZE as u64 != 0 {
        return Err(PlanError::TargetSize {
            name: target.name(),
            len,
        });
    }
    let index = SourceIndex::build_for(source, opts.classify.similar_candidates > 0, &|n| {
        progress(Stage::Index, n)
    })?;
    log::debug!("source index: {} bytes", index.memory_bytes());
    let mut classes = classify_image(source, target, &index, &opts.classify, &|n| {
        progress(Stage::Classify, n)
    })?;
    let mut breaker = ImageBreaker {
        source,
        target,
        xor: opts.classify.xor,
        estimator: opts.classify.estimator,
    };
    if opts.classify.xor {
        add_shifted_xors(
            &mut classes,
            source,
            target,
            &index,
            &opts.classify.estimator,
            &|n| progress(Stage::Shifted, n),
        )?;
    }
    let moved = move_to_near_bases(&mut classes, source, &index)?;
    log::debug!("{moved} ordered ops moved onto a nearer equal source block");
    drop(index);
    let order = order_ops(&mut classes, &mut breaker, opts.merge_mode)?;
    Ok(Plan {
        classes,
        sequence: order.sequence,
        broken: order.broken,
        source_blocks: source.block_count(),
    })
}
