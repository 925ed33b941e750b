//! The user-space-merge snapshots the daemon serves on real files and devices:
//! [`crate::user_merge::UserSnapshot`] behind the registry's [`UserMergeTarget`].
//!
//! Engine choice: with `io_uring` asked for, the merge runs over the io_uring engine
//! ([`crate::uring::UringMergeIo`]) when a ring can be built over the snapshot's source and
//! base files, else (old kernel, seccomp) over the synchronous engine, logged once per run.
//! An engine error in the middle of a step is handled by the merge itself (the step is
//! redone synchronously).

use std::path::Path;
use std::sync::{Arc, Once};

use crate::dm_user::{Request, ResponseCode};
use crate::error_chain::ErrorChain;
use crate::uring::{uring_or_fallback, UringOptions};
use crate::user_merge::{
    MergeControl, MergeIo, MergeOutcome, MergePhase, UserSnapshot, UserSnapshotOptions,
};

use super::handlers::{BackendError, TargetError};
use super::transport::RequestHandler;
use super::user_target::{
    MergeEnd, MergeSwitch, PreparedMerge, UserMergeTarget, UserProgress, UserTargetOpener,
};

impl MergeSwitch for MergeControl {
    fn pause(&self) {
        MergeControl::pause(self);
    }
    fn resume(&self) {
        MergeControl::resume(self);
    }
    fn stop(&self) {
        MergeControl::stop(self);
    }
}

/// A [`UserSnapshot`] served by the registry.
///
/// Handoff: the daemon may open a COW while another daemon (the first stage's) still serves
/// it. Before the first request is answered, the snapshot's view is reloaded from the COW's
/// durable progress, and the merge reloads it again when it starts.
pub struct ServedUserSnapshot {
    snapshot: UserSnapshot,
    first_request: Once,
}

impl ServedUserSnapshot {
    /// Serve `snapshot`.
    pub fn new(snapshot: UserSnapshot) -> Self {
        Self {
            snapshot,
            first_request: Once::new(),
        }
    }

    /// Reload the view from the COW once, before the first request (the others wait).
    fn follow_handoff(&self) {
        self.first_request.call_once(|| {
            if let Err(e) = self.snapshot.follow_durable_progress() {
                log::error!(
                    "re-reading the merge progress at the first request: {chain}; serving \
                     with the progress read at init (check the COW device)",
                    chain = ErrorChain(&e)
                );
            }
        });
    }

    /// The snapshot.
    pub fn snapshot(&self) -> &UserSnapshot {
        &self.snapshot
    }

    /// The merge engine: io_uring when asked for and available here (logged otherwise),
    /// else synchronous.
    fn engine(&self, io_uring: bool) -> std::io::Result<Box<dyn MergeIo>> {
        if !io_uring {
            return self.snapshot.sync_io();
        }
        uring_or_fallback(
            self.snapshot.source_file(),
            self.snapshot.base_file(),
            self.snapshot.direct_descriptors(),
            &UringOptions::default(),
            || self.snapshot.sync_io(),
        )
    }
}

impl RequestHandler for ServedUserSnapshot {
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> ResponseCode {
        self.follow_handoff();
        self.snapshot.handle(req, write_payload, read_out)
    }

    fn read_from_file(&self, req: &Request) -> Option<(&std::fs::File, u64)> {
        self.follow_handoff();
        self.snapshot.read_from_file(req)
    }

    fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[crate::dm_user::AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        self.follow_handoff();
        self.snapshot.read_in_pieces(req, produced, send)
    }

    fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
        self.follow_handoff();
        self.snapshot.read_into(req, out)
    }

    fn answered(&self, req: &Request) {
        self.snapshot.answered(req);
    }
}

impl UserMergeTarget for ServedUserSnapshot {
    fn base_sectors(&self) -> u64 {
        self.snapshot.base_sectors()
    }

    fn progress(&self) -> UserProgress {
        let p = self.snapshot.progress();
        UserProgress {
            merged_ops: p.merged_ops,
            total_ops: p.total_ops,
            complete: p.state == MergePhase::Complete || p.merged_ops >= p.total_ops,
            failed: p.state == MergePhase::Failed,
        }
    }

    fn prepare_merge(self: Arc<Self>, io_uring: bool) -> PreparedMerge {
        let control = Arc::new(MergeControl::new());
        let switch: Arc<dyn MergeSwitch> = control.clone();
        PreparedMerge {
            switch,
            body: Box::new(move || {
                let io = self
                    .engine(io_uring)
                    .map_err(|e| TargetError::Merge(Box::new(e)))?;
                log::info!("merging with the {} engine", io.name());
                match self.snapshot.merge(io, &control) {
                    Ok(MergeOutcome::Complete) => Ok(MergeEnd::Complete),
                    Ok(MergeOutcome::Stopped) => Ok(MergeEnd::Stopped),
                    Err(e) => Err(TargetError::Merge(Box::new(e))),
                }
            }),
        }
    }

    fn read(&self, sector: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.snapshot.read(sector, out).map_err(|e| e.into())
    }
}

/// Opens [`UserSnapshot`]s by path with fixed options.
#[derive(Debug, Default, Clone, Copy)]
pub struct UserSnapshotOpener {
    options: UserSnapshotOptions,
}

impl UserSnapshotOpener {
    /// Open snapshots with `options` (`-o_direct`, `-cow_op_merge_size`).
    pub fn new(options: UserSnapshotOptions) -> Self {
        Self { options }
    }
}

impl UserTargetOpener for UserSnapshotOpener {
    fn open(
        &self,
        cow: &Path,
        source: &Path,
        base: &Path,
    ) -> Result<Arc<dyn UserMergeTarget>, TargetError> {
        UserSnapshot::open(cow, source, base, &self.options)
            .map(|s| Arc::new(ServedUserSnapshot::new(s)) as Arc<dyn UserMergeTarget>)
            .map_err(|e| TargetError::OpenUser {
                cow: cow.to_path_buf(),
                source_path: source.to_path_buf(),
                base: base.to_path_buf(),
                source: Box::new(e),
            })
    }
}
