//! Taking a merge over from another daemon (the first-stage → second-stage handoff).

use std::sync::atomic::Ordering;

use super::error::UserSnapshotError;
use super::snapshot::UserSnapshot;

impl UserSnapshot {
    /// Adopt the durable merge progress the COW holds now, in case another daemon serving
    /// the same COW advanced it since this snapshot was opened. Nothing happens while a
    /// merge runs in this process (it follows the durable state itself when it starts).
    pub fn follow_durable_progress(&self) -> Result<(), UserSnapshotError> {
        if self.merging.load(Ordering::Acquire) {
            return Ok(());
        }
        self.follow_durable()
    }
}
