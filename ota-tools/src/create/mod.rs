//! `ota-tools create`: plan the smallest correct COW that turns a source image into a
//! target image, and order its ops so that an in-place merge never reads a block after
//! it has been overwritten.
//!
//! The pipeline is split into small modules, each with one job:
//!
//! * [`image`]: random-access block images (files or memory);
//! * [`hash`]: deterministic block and window hashes (no per-run seeds);
//! * [`anchors`]: content-defined anchors that find moved content at any byte offset;
//! * [`block_index`]: the memory-bounded content index of the source blocks;
//! * [`classify`]: the per-target-block decision (unchanged, ZERO, COPY, XOR, REPLACE);
//! * [`near_bases`]: moves each COPY/XOR onto the nearest source block holding its base's bytes;
//! * [`order`]: the merge-order engine (dependency graph, topological order, cycle breaking);
//! * [`plan`]: the resulting op plan and its sequence data;
//! * [`shifted`]: XOR bases at byte offsets for REPLACE blocks whose content moved;
//! * [`merge_check`]: the in-place merge safety rule (cow-format.md §6.4);
//! * [`simulate`]: an in-memory in-place merge of a plan, used to prove plans correct.

pub mod anchors;
pub mod block_index;
pub mod classify;
pub mod command;
pub mod hash;
pub mod image;
pub mod merge_check;
pub mod near_bases;
pub mod order;
pub mod plan;
pub mod shifted;
pub mod simulate;

/// Size of one image block in bytes; the only block size snapuserd accepts.
pub const BLOCK_SIZE: usize = 4096;

#[cfg(test)]
mod plan_tests;
