//! Pause, resume and stop requests to a running merge, honoured at its safe points.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct Flags {
    paused: bool,
    stopped: bool,
}

/// Shared between the merge and whoever controls it (the daemon's control socket).
///
/// The merge checks it only at safe points: after a read-ahead window is committed, and
/// between REPLACE/ZERO batches once their progress is durable. While paused it waits
/// there; a stop wakes it and makes `merge` return [`super::MergeOutcome::Stopped`].
#[derive(Debug, Default)]
pub struct MergeControl {
    flags: Mutex<Flags>,
    changed: Condvar,
}

impl MergeControl {
    /// Running, not paused.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ask the merge to wait at its next safe point.
    pub fn pause(&self) {
        self.lock().paused = true;
        self.changed.notify_all();
    }

    /// Let a paused merge go on.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Ask the merge to return at its next safe point (also when paused).
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// True once stopped.
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// True if a pause or stop waits for the merge's next safe point (no waiting here).
    pub(crate) fn safe_point_wanted(&self) -> bool {
        let f = self.lock();
        f.paused || f.stopped
    }

    /// True if the merge should stop now; waits first while paused and not stopped.
    pub(crate) fn checkpoint(&self) -> bool {
        let mut f = self.lock();
        while f.paused && !f.stopped {
            f = self.changed.wait(f).unwrap_or_else(PoisonError::into_inner);
        }
        f.stopped
    }
}
