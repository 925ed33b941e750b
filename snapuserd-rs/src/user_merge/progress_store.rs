//! Where the merge keeps its durable progress: the COW file's `num_merge_ops` and scratch
//! region, behind a small trait so the crash harness can cut power between any two steps.

use cow_format::merge_state::{DurableProgress, ScratchWindow};
use cow_format::{MergeState, MergeStateError};

/// The durable merge steps (each durable when it returns `Ok`), as
/// [`cow_format::MergeState`] performs them.
pub(crate) trait ProgressStore: Send {
    /// Both durable values, read now.
    fn progress(&self) -> Result<DurableProgress, MergeStateError>;
    /// Blocks a scratch window holds; 0 without scratch.
    fn window_capacity(&self) -> usize;
    /// Write the window's data (one block per entry of `new_blocks`) and metadata and sync
    /// (state untouched).
    fn stage_window(&mut self, new_blocks: &[u64], data: &[u8]) -> Result<(), MergeStateError>;
    /// Set state Done and sync.
    fn mark_window_done(&mut self) -> Result<(), MergeStateError>;
    /// The saved window.
    fn read_window(&self) -> Result<ScratchWindow, MergeStateError>;
    /// `num_merge_ops` and state InProgress, in one atomic write, synced.
    fn commit_window(&mut self, num_merge_ops: u64) -> Result<(), MergeStateError>;
    /// `num_merge_ops` alone, synced.
    fn commit_merged(&mut self, num_merge_ops: u64) -> Result<(), MergeStateError>;
}

impl ProgressStore for MergeState {
    fn progress(&self) -> Result<DurableProgress, MergeStateError> {
        MergeState::progress(self)
    }
    fn window_capacity(&self) -> usize {
        MergeState::window_capacity(self)
    }
    fn stage_window(&mut self, new_blocks: &[u64], data: &[u8]) -> Result<(), MergeStateError> {
        MergeState::stage_window_parts(self, new_blocks, data)
    }
    fn mark_window_done(&mut self) -> Result<(), MergeStateError> {
        MergeState::mark_window_done(self)
    }
    fn read_window(&self) -> Result<ScratchWindow, MergeStateError> {
        MergeState::read_window(self)
    }
    fn commit_window(&mut self, num_merge_ops: u64) -> Result<(), MergeStateError> {
        MergeState::commit_window(self, num_merge_ops)
    }
    fn commit_merged(&mut self, num_merge_ops: u64) -> Result<(), MergeStateError> {
        MergeState::commit_merged(self, num_merge_ops)
    }
}
