//! The Android 13+ user-space-merge mode: the dm-user (or ublk) device *is* the partition.
//!
//! Reads of blocks the COW does not change, and of blocks already merged, come from the base
//! device; changed blocks are produced from the COW (REPLACE, ZERO) or from the source
//! device and the read-ahead scratch window (COPY, XOR). The daemon itself merges: it copies
//! the new blocks into the base device, window by window, crash-safely, through a
//! [`merge_io::MergeIo`] engine (synchronous, or io_uring). See `DESIGN.md` beside this file.
//!
//! * [`UserSnapshot`]: open, read, answer requests, merge, report progress;
//! * [`MergeControl`]: pause, resume and stop a running merge;
//! * [`SyncMergeIo`]: the synchronous engine (and the fallback of every other).

mod block_map;
mod control;
pub mod direct_io;
mod direct_prefetch;
mod direct_runs;
mod direct_source;
mod error;
mod handoff;
pub mod merge_io;
mod merger;
mod phase_times;
mod plan;
mod prefetch;
mod progress_store;
mod replace_batches;
mod snapshot;
mod sync_io;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
mod window;

pub use control::MergeControl;
pub use direct_io::DirectDescriptors;
pub use error::{UserMergeError, UserReadError, UserSnapshotError};
pub use merge_io::{MergeIo, ReadRun, WriteRun};
pub use snapshot::{MergeOutcome, MergePhase, MergeProgress, UserSnapshot, UserSnapshotOptions};
pub use sync_io::SyncMergeIo;
