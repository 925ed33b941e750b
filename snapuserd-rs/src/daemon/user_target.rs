//! What the registry needs of a user-space-merge snapshot (Android 13+ mode).
//!
//! In this mode the dm-user device *is* the partition and the daemon itself merges. The
//! registry, the merge monitor and `update-verify` see a snapshot only through
//! [`UserMergeTarget`], so their logic does not depend on how the read path and the merge
//! engine are built (`crate::user_merge` on real files; a test double in the unit tests).

use std::path::Path;
use std::sync::Arc;

use super::handlers::{BackendError, TargetError};
use super::transport::RequestHandler;

/// Merge progress as the COW records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserProgress {
    /// Ops merged durably (the COW header's `num_merge_ops`).
    pub merged_ops: u64,
    /// Ops the merge copies in all.
    pub total_ops: u64,
    /// True when the COW says the merge is complete.
    pub complete: bool,
    /// True when the snapshot saw a merge failure it cannot recover from.
    pub failed: bool,
}

impl UserProgress {
    /// Merged share in percent (`num_merge_ops * 100 / total`, as AOSP); 100 when there is
    /// nothing to merge or the merge is complete.
    pub fn percent(&self) -> f64 {
        if self.complete || self.total_ops == 0 {
            return 100.0;
        }
        (self.merged_ops.min(self.total_ops) as f64) * 100.0 / self.total_ops as f64
    }
}

/// How a merge run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeEnd {
    /// Every op is merged and the COW says so durably.
    Complete,
    /// Stopped at a safe point on request; a later run resumes from the durable state.
    Stopped,
}

/// The pause/stop switch of one merge run; the run waits at its safe points while paused
/// and ends at the next safe point once stopped (a stop also ends a pause).
pub trait MergeSwitch: Send + Sync {
    /// Hold the merge at its next safe point.
    fn pause(&self);
    /// Let a paused merge carry on.
    fn resume(&self);
    /// End the merge at its next safe point.
    fn stop(&self);
}

/// Body of one merge run, executed on the merge thread the monitor spawns.
pub type MergeBody = Box<dyn FnOnce() -> Result<MergeEnd, TargetError> + Send>;

/// One merge run, ready to start: its switch, and the body to run on the merge thread.
pub struct PreparedMerge {
    /// Pauses, resumes and stops the run (also before it starts).
    pub switch: Arc<dyn MergeSwitch>,
    /// Runs the merge to its end on the calling thread.
    pub body: MergeBody,
}

/// A user-space-merge snapshot as the registry serves and merges it.
pub trait UserMergeTarget: RequestHandler {
    /// Size of the base device in 512-byte sectors (the `init` reply, the device size).
    fn base_sectors(&self) -> u64;
    /// Merge progress now.
    fn progress(&self) -> UserProgress;
    /// Prepare a merge run over the io_uring engine when `io_uring` (falling back to the
    /// synchronous engine when the ring cannot be built), or the synchronous engine.
    fn prepare_merge(self: Arc<Self>, io_uring: bool) -> PreparedMerge;
    /// Read `out.len()` bytes (a multiple of 512) at `sector` through the serving read path.
    fn read(&self, sector: u64, out: &mut [u8]) -> Result<(), BackendError>;
}

/// Opens user-space-merge snapshots from their COW, source and base paths.
pub trait UserTargetOpener: Send + Sync {
    /// Open the COW at `cow` over `source`, merging into `base`.
    fn open(
        &self,
        cow: &Path,
        source: &Path,
        base: &Path,
    ) -> Result<Arc<dyn UserMergeTarget>, TargetError>;
}
