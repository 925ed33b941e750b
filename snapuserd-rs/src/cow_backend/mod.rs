//! The snapshot core's backends on a real COW file and source image.
//!
//! | module | job |
//! |---|---|
//! | [`plan`] | `MergePlan` from the reader's legacy merge order (multi-block ops expanded), entry ↔ planned-op progress map |
//! | [`blocks`] | `BlockSource` with the reader: REPLACE (decompressed, per-thread cache of the last multi-block op), ZERO, COPY, XOR |
//! | [`cow_storage`] | how the COW is read: mmap (preferred) or `pread` |
//! | [`source_file`] | `SourceDevice` on a file or block device (`pread`) |
//! | [`merge_store`] | `MergeStateStore` in the COW file: `num_merge_ops`, scratch state, window metadata and data, each synced |
//! | [`handle`] | `CowSnapshot`: opens a COW and a source and builds the block server |

pub mod blocks;
pub mod cow_storage;
pub mod handle;
pub mod merge_store;
pub mod plan;
pub mod source_file;

pub use handle::{CowBlockServer, CowSnapshot, SnapshotOpenError};

#[cfg(test)]
mod tests;
