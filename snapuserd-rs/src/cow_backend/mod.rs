//! The snapshot core's backends on a real COW file and source image.
//!
//! | module | job |
//! |---|---|
//! | [`plan`] | `MergePlan` from the reader's legacy merge order (multi-block ops expanded), entry ↔ planned-op progress map |
//! | [`blocks`] | `BlockSource`: a planned op's block from `cow_format`'s block producer (`CowReader::read_op_block`) |
//! | [`source_file`] | the source device (`SourceDevice`, i.e. `cow_format::SourceImage`) on a file or block device (`pread`) |
//! | [`merge_store`] | `MergeStateStore` adapter over `cow_format::MergeState` (window write, window commit, plain commit), entry ↔ planned-op progress |
//!
//! How the COW is read (guarded mmap, `pread` fallback) is `cow_format::reader::CowFileStorage`.
//! | [`handle`] | `CowSnapshot`: opens a COW and a source and builds the block server |

pub mod blocks;
pub mod handle;
pub mod merge_store;
pub mod plan;
pub mod source_file;

pub use handle::{CowBlockServer, CowSnapshot, SnapshotOpenError};

#[cfg(test)]
mod tests;
