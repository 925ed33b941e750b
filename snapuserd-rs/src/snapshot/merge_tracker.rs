//! Following dm-snapshot-merge and committing merge progress durably (reference §A.4, §A.5).
//!
//! dm-snapshot-merge merges the trailing run of consecutive exceptions, zeroes those entries
//! and writes the 4 KiB metadata area back. [`MergeTracker::on_metadata_write`] compares that
//! write with the in-memory area, works out how many more ops of the merge order are merged
//! and commits `num_merge_ops` through a [`MergeStateStore`]:
//! * non-ordered ops (REPLACE/ZERO), and every op of a COW without scratch space, commit at
//!   once: replaying them after a crash is harmless because the exception store's gap rules
//!   keep every kernel batch free of internal source/destination overlap;
//! * ordered ops (COPY/XOR) with scratch space commit a whole read-ahead window at a time.
//!   Before the kernel can read any op of a window, the window's source bytes are saved in
//!   scratch and the scratch state set to Done (durably); after a crash the window is
//!   rebuilt from scratch rather than from the partly overwritten source device.
//!
//! Ops are never reordered: the merged set is always a prefix of the merge order.

use crate::error_chain::ErrorChain;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::exception_store::{
    window_end_of, ExceptionStore, DISK_EXCEPTION_SIZE, EXCEPTIONS_PER_AREA, WINDOW_OPS,
};
use super::merge_plan::{MergePlan, OpKind, SourceDevice, BLOCK_SIZE};

/// The read-ahead state byte of the COW scratch region (Done: scratch holds the complete,
/// synced window that starts at `num_merge_ops`).
pub use cow_format::layout::BufferState as ScratchState;
/// A read-ahead window as stored in scratch: `new_block` of each op and the 4096 source
/// bytes each op reads, concatenated in the same order.
pub use cow_format::merge_state::ScratchWindow;

/// Durable merge progress: `num_merge_ops` and the scratch region of the COW file.
///
/// Every mutating method must be durable (written and synced) when it returns `Ok`.
/// `cow_backend::merge_store::CowMergeStore` implements it inside the COW file; tests use
/// `InMemoryMergeStore`.
pub trait MergeStateStore {
    /// Durable count of leading merge-order ops that are merged.
    fn num_merge_ops(&self) -> u64;
    /// Durable scratch state byte.
    fn scratch_state(&self) -> ScratchState;
    /// Blocks a scratch window can hold; 0 when the COW has no scratch space.
    fn scratch_capacity_blocks(&self) -> usize;
    /// Read the scratch metadata list and data (meaningful when the state is Done).
    fn read_window(&self) -> io::Result<ScratchWindow>;
    /// Set `num_merge_ops` (state unchanged).
    fn commit(&mut self, num_merge_ops: u64) -> io::Result<()>;
    /// Set `num_merge_ops` and state InProgress in one atomic write (both live in the
    /// COW header's first sector).
    fn commit_window(&mut self, num_merge_ops: u64) -> io::Result<()>;
    /// Write and sync the window's metadata list (zero-terminated) and data, then set and
    /// sync state Done.
    fn write_window(&mut self, window: &ScratchWindow) -> io::Result<()>;
    /// Re-read `num_merge_ops` and the scratch state from durable storage: another daemon
    /// serving the same COW before a handoff may have advanced them since this store was
    /// opened.
    fn reload(&mut self) -> io::Result<()>;
}

/// Errors of the merge tracker.
#[derive(Debug, Error)]
pub enum MergeTrackerError {
    /// The durable store failed.
    #[error("merge state store failed during {operation}")]
    Store {
        /// What was being done.
        operation: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading the source device for a read-ahead window failed.
    #[error("reading source bytes at offset {offset} for merge-order op {op_index}")]
    SourceRead {
        /// Op whose source was read.
        op_index: usize,
        /// Byte offset in the source device.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The plan was built from a different `num_merge_ops` than the store holds.
    #[error("plan built with num_merge_ops {plan} but the store holds {store}")]
    StaleProgress {
        /// Value the plan used.
        plan: usize,
        /// Value in the store.
        store: u64,
    },
    /// The scratch region is too small for a read-ahead window.
    #[error("scratch space holds {capacity} blocks, fewer than the {WINDOW_OPS} a window needs")]
    ScratchTooSmall {
        /// Capacity in blocks.
        capacity: usize,
    },
    /// Scratch state Done, but its content is not the next pending window.
    #[error(
        "scratch window does not match the pending ops at merge-order op {op_index}: {detail}"
    )]
    WindowMismatch {
        /// Merge-order op where the mismatch was found.
        op_index: usize,
        /// What differed.
        detail: String,
    },
    /// A metadata write payload that is not exactly one chunk.
    #[error("metadata write to area {area} carries {len} bytes, not {BLOCK_SIZE}")]
    BadPayloadLength {
        /// Area written.
        area: usize,
        /// Payload length.
        len: usize,
    },
    /// The kernel wrote an area other than the one holding the last unmerged exception.
    #[error(
        "metadata write to area {area}, but the last unmerged exception is in area {expected:?}"
    )]
    UnexpectedArea {
        /// Area written.
        area: usize,
        /// Area expected, if anything is left to merge.
        expected: Option<usize>,
    },
    /// An entry of the written area is neither the in-memory entry nor zero, or a zeroed
    /// entry is followed by a live one.
    #[error("metadata write to area {area}: entry {slot} is {found:?}, expected {expected:?} or a merged (zero) entry")]
    EntryMismatch {
        /// Area written.
        area: usize,
        /// Entry index in the area.
        slot: usize,
        /// `(old_chunk, new_chunk)` written by the kernel.
        found: (u64, u64),
        /// `(old_chunk, new_chunk)` in memory.
        expected: (u64, u64),
    },
    /// The write merged nothing new.
    #[error("metadata write to area {area} merges no new exception")]
    NoNewlyMerged {
        /// Area written.
        area: usize,
    },
    /// A merged batch reaches ordered ops outside the current read-ahead window.
    #[error("merged ops {first}..{end} leave the read-ahead window {window_start}..{window_end}")]
    CrossesWindow {
        /// First op merged.
        first: usize,
        /// One past the last op merged.
        end: usize,
        /// Window start (merge-order index).
        window_start: usize,
        /// Window end.
        window_end: usize,
    },
    /// Without scratch space, an XOR op that reads its own destination block cannot be
    /// replayed after a crash (it would read its own output), so such a COW is refused.
    #[error("merge-order op {op_index} (XOR to block {new_block}) reads its own destination; merging it crash-safely needs scratch space, which this COW lacks")]
    XorNeedsScratch {
        /// The op.
        op_index: usize,
        /// Its destination block.
        new_block: u64,
    },
    /// An earlier store or source failure left the tracker unusable.
    #[error("merge tracker failed earlier; restart from the durable state")]
    Failed,
}

/// What one metadata write changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Ops newly merged by this write.
    pub newly_merged: usize,
    /// Ops merged in memory (merge-order prefix length).
    pub merged: usize,
    /// Ops durably committed (`num_merge_ops`).
    pub committed: u64,
    /// True when every op is merged and committed.
    pub complete: bool,
}

/// What this daemon saw of the merge: logged when it completes, so a slow merge can be
/// told apart into the daemon's share and the kernel's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MergeStats {
    /// Metadata write-backs that merged something.
    pub write_backs: u64,
    /// Ops those write-backs merged.
    pub merged_ops: u64,
    /// Time spent handling them: checking the area, durable commits, read-ahead windows.
    pub handling: Duration,
    /// When the first of them arrived.
    pub first_write_back: Option<Instant>,
}

/// The current read-ahead window held in memory: the saved source bytes of ordered ops
/// `start..end`, one block each. Shared (`Arc`) so that readers can hold on to it while the
/// tracker commits and prepares the next one.
#[derive(Debug, Clone)]
pub struct Window {
    /// First merge-order op of the window.
    pub start: usize,
    /// One past its last op.
    pub end: usize,
    /// `(end - start) * BLOCK_SIZE` saved source bytes.
    pub data: Arc<[u8]>,
}

impl Window {
    /// The saved source bytes of merge-order op `op_index` if it is in this window.
    pub fn source_of(&self, op_index: usize) -> Option<&[u8]> {
        if op_index < self.start || op_index >= self.end {
            return None;
        }
        let at = (op_index - self.start).checked_mul(BLOCK_SIZE)?;
        self.data.get(at..at.checked_add(BLOCK_SIZE)?)
    }
}

/// Tracks merge progress for one snapshot.
#[derive(Debug)]
pub struct MergeTracker<S: MergeStateStore> {
    store: S,
    /// Exceptions not merged yet (the first `live` exceptions are still in the areas).
    live: usize,
    /// Durable `num_merge_ops`.
    committed: usize,
    use_scratch: bool,
    window: Option<Window>,
    failed: bool,
    /// Set by [`MergeTracker::activate`]; until then nothing durable is touched.
    active: bool,
    stats: MergeStats,
}

impl<S: MergeStateStore> MergeTracker<S> {
    /// Start tracking: check the store against the plan. Nothing durable is read beyond
    /// what the store read at open, and nothing is written or read from the source device,
    /// until [`Self::activate`].
    pub fn open(
        plan: &MergePlan,
        exceptions: &ExceptionStore,
        store: S,
    ) -> Result<Self, MergeTrackerError> {
        let stored = store.num_merge_ops();
        if stored != plan.num_merge_ops() as u64 {
            return Err(MergeTrackerError::StaleProgress {
                plan: plan.num_merge_ops(),
                store: stored,
            });
        }
        let capacity = store.scratch_capacity_blocks();
        if capacity != 0 && capacity < WINDOW_OPS {
            return Err(MergeTrackerError::ScratchTooSmall { capacity });
        }
        if capacity == 0 {
            let self_reading = plan.unmerged().find(|(_, op)| {
                op.kind == OpKind::Xor && op.source_blocks().iter().any(|b| b == op.new_block)
            });
            if let Some((op_index, op)) = self_reading {
                return Err(MergeTrackerError::XorNeedsScratch {
                    op_index,
                    new_block: op.new_block,
                });
            }
        }
        let tracker = MergeTracker {
            store,
            live: exceptions.num_exceptions(),
            committed: plan.num_merge_ops(),
            use_scratch: capacity != 0,
            window: None,
            failed: false,
            active: false,
            stats: MergeStats::default(),
        };
        Ok(tracker)
    }

    /// True once [`Self::activate`] succeeded.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Take over the merge, on the first request the kernel sends to this daemon.
    ///
    /// Opening touches nothing durable: libsnapshot's second-stage handoff initialises a new
    /// daemon while the old one still merges the same COW, and a scratch window written by
    /// the newcomer then could overwrite the one the old daemon's crash safety rests on.
    /// By the first dm-user request the old daemon is gone (the table swap drained its
    /// I/O), so this re-reads the durable progress it left, then loads the saved window
    /// (state Done) or saves the next one from the source.
    pub fn activate(
        &mut self,
        plan: &MergePlan,
        source: &dyn SourceDevice,
    ) -> Result<(), MergeTrackerError> {
        if self.active {
            return Ok(());
        }
        if let Err(source) = self.store.reload() {
            return Err(MergeTrackerError::Store {
                operation: "read the durable merge state",
                source,
            });
        }
        let durable = self.store.num_merge_ops();
        let Some(durable) = usize::try_from(durable).ok().filter(|&d| d <= plan.len()) else {
            return Err(MergeTrackerError::StaleProgress {
                plan: plan.num_merge_ops(),
                store: durable,
            });
        };
        if durable > self.committed {
            log::info!(
                "merge progress advanced from {} to {durable} ops since this daemon opened the COW; following it",
                self.committed
            );
            self.committed = durable;
        }
        self.window = None;
        if self.use_scratch && self.committed < plan.num_ordered() {
            if self.store.scratch_state() == ScratchState::Done {
                self.window = Some(self.rebuild_window(plan)?);
                log::info!(
                    "resuming merge from scratch window at op {}",
                    self.committed
                );
            } else {
                self.prepare_window(plan, source)?;
            }
        }
        self.failed = false;
        self.active = true;
        Ok(())
    }

    /// The window that starts at ordered op `start` and ends at the next grid boundary
    /// (a window is shorter than [`WINDOW_OPS`] only when the durable progress was left
    /// mid-grid by another writer, or at the end of the ordered ops).
    fn window_range(&self, plan: &MergePlan, start: usize) -> (usize, usize) {
        (start, window_end_of(start).min(plan.num_ordered()))
    }

    fn rebuild_window(&self, plan: &MergePlan) -> Result<Window, MergeTrackerError> {
        let (start, end) = self.window_range(plan, self.committed);
        let stored = self
            .store
            .read_window()
            .map_err(|source| MergeTrackerError::Store {
                operation: "read scratch window",
                source,
            })?;
        let expected =
            (start..end).map(|op_index| plan.op(op_index).map_or(u64::MAX, |op| op.new_block));
        stored
            .check_blocks(expected, BLOCK_SIZE)
            .map_err(|detail| MergeTrackerError::WindowMismatch {
                op_index: start,
                detail,
            })?;
        Ok(Window {
            start,
            end,
            data: stored.data.into(),
        })
    }

    fn prepare_window(
        &mut self,
        plan: &MergePlan,
        source: &dyn SourceDevice,
    ) -> Result<(), MergeTrackerError> {
        let (start, end) = self.window_range(plan, self.committed);
        let mut window = ScratchWindow {
            new_blocks: Vec::with_capacity(end - start),
            data: vec![0u8; (end - start) * BLOCK_SIZE],
        };
        for (i, buf) in window.data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            let op_index = start + i;
            let Some(op) = plan.op(op_index) else { break };
            let offset = op.source_byte_offset().unwrap_or(0);
            if let Err(source) = source.read_exact_at(buf, offset) {
                self.failed = true;
                return Err(MergeTrackerError::SourceRead {
                    op_index,
                    offset,
                    source,
                });
            }
            window.new_blocks.push(op.new_block);
        }
        if let Err(source) = self.store.write_window(&window) {
            self.failed = true;
            return Err(MergeTrackerError::Store {
                operation: "write scratch window",
                source,
            });
        }
        log::debug!("read-ahead window {start}..{end} saved to scratch");
        self.window = Some(Window {
            start,
            end,
            data: window.data.into(),
        });
        Ok(())
    }

    /// The saved source bytes of merge-order op `op_index` if it is in the current window.
    pub fn window_source(&self, op_index: usize) -> Option<&[u8]> {
        self.window.as_ref()?.source_of(op_index)
    }

    /// The current window (shared, not copied), for readers that must not wait for the
    /// tracker.
    pub fn window(&self) -> Option<Window> {
        self.window.clone()
    }

    /// Notice a merge that a daemon before this one finished (a handoff after the last
    /// metadata write leaves this tracker nothing to follow). Partial progress made by a
    /// previous daemon is picked up at the next metadata write instead (see `resync`).
    pub fn follow_finished_merge(&mut self, plan: &MergePlan) {
        if self.committed == plan.len() {
            return;
        }
        if let Err(e) = self.store.reload() {
            log::debug!(
                "re-reading the durable merge state for a status query: {chain}",
                chain = ErrorChain(&e)
            );
            return;
        }
        if self.store.num_merge_ops() == plan.len() as u64 {
            log::info!("the merge was finished by the daemon before this one");
            self.committed = plan.len();
            self.live = 0;
            self.window = None;
        }
    }

    /// Exceptions not merged yet; areas render exceptions `0..live()`.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Durable `num_merge_ops`.
    pub fn committed(&self) -> u64 {
        self.committed as u64
    }

    /// The durable store (for inspection).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Consume the tracker, returning the store.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Handle the kernel's write of metadata area `area` with `payload` (4096 bytes).
    pub fn on_metadata_write(
        &mut self,
        plan: &MergePlan,
        exceptions: &ExceptionStore,
        area: usize,
        payload: &[u8],
        source: &dyn SourceDevice,
    ) -> Result<MergeProgress, MergeTrackerError> {
        let started = Instant::now();
        if !self.active {
            self.activate(plan, source)?;
        }
        if self.failed {
            return Err(MergeTrackerError::Failed);
        }
        if payload.len() != BLOCK_SIZE {
            return Err(MergeTrackerError::BadPayloadLength {
                area,
                len: payload.len(),
            });
        }
        let expected_area = self.live.checked_sub(1).map(|e| e / EXCEPTIONS_PER_AREA);
        let Some(last_area) = expected_area.filter(|&last| area <= last) else {
            return Err(MergeTrackerError::UnexpectedArea {
                area,
                expected: expected_area,
            });
        };
        // The kernel moves to an earlier area only once the later ones are wholly merged.
        // A write to an earlier area than ours therefore means a daemon before us (handoff
        // with dm-snapshot's in-core table kept) followed those merges: everything after
        // this area is merged, and this area is full as far as we know.
        let live_before = if area < last_area {
            let assumed = (area + 1) * EXCEPTIONS_PER_AREA;
            log::info!(
                "metadata area {area} written while area {last_area} still looked live: \
                 exceptions {assumed}..{} were merged before this daemon took over",
                self.live
            );
            assumed
        } else {
            self.live
        };
        let mut current = [0u8; BLOCK_SIZE];
        // The area exists because it holds exception live_before-1.
        exceptions
            .render_area(plan, area, live_before, &mut current)
            .map_err(|_| MergeTrackerError::UnexpectedArea {
                area,
                expected: expected_area,
            })?;
        let live_in_area = live_before - area * EXCEPTIONS_PER_AREA;
        let mut still_live = 0usize;
        let mut seen_merged = false;
        for slot in 0..EXCEPTIONS_PER_AREA {
            let at = slot * DISK_EXCEPTION_SIZE;
            let found = read_entry(payload, at);
            let expected = read_entry(&current, at);
            let merged = found.1 == 0; // new_chunk 0 marks a free slot, even for old_chunk 0
            let ok = if slot >= live_in_area {
                found == (0, 0)
            } else if merged {
                seen_merged = true;
                true
            } else {
                !seen_merged && found == expected
            };
            if !ok {
                return Err(MergeTrackerError::EntryMismatch {
                    area,
                    slot,
                    found,
                    expected,
                });
            }
            if slot < live_in_area && !merged {
                still_live += 1;
            }
        }
        if still_live == live_in_area {
            return Err(MergeTrackerError::NoNewlyMerged { area });
        }
        let live_after = area * EXCEPTIONS_PER_AREA + still_live;
        let total = exceptions.first_unmerged() + exceptions.num_exceptions();
        let first = total - self.live;
        let end = total - live_after;
        let newly = self.live - live_after;
        self.live = live_after;
        self.commit_merged(plan, first, end, source)?;
        let progress = MergeProgress {
            newly_merged: newly,
            merged: end,
            committed: self.committed as u64,
            complete: self.live == 0 && self.committed == plan.len(),
        };
        self.record_write_back(started, &progress);
        Ok(progress)
    }

    /// Counters of the write-backs handled so far.
    pub fn stats(&self) -> MergeStats {
        self.stats
    }

    /// Count a write-back that merged something; log the totals when the merge completes.
    fn record_write_back(&mut self, started: Instant, progress: &MergeProgress) {
        let stats = &mut self.stats;
        stats.write_backs = stats.write_backs.saturating_add(1);
        stats.merged_ops = stats
            .merged_ops
            .saturating_add(progress.newly_merged as u64);
        stats.handling = stats.handling.saturating_add(started.elapsed());
        let first = *stats.first_write_back.get_or_insert(started);
        if progress.complete {
            let elapsed = first.elapsed().as_secs_f64();
            let handling = stats.handling.as_secs_f64();
            log::info!(
                "merge complete: this daemon followed {} ops in {} metadata write-backs \
                 ({:.1} ops each) over {elapsed:.2} s, {handling:.2} s of it ({:.0}%) in \
                 handling them (area checks, durable commits, read-ahead windows); the \
                 rest is dm-snapshot-merge reading the chunks through dm-user, writing and \
                 flushing the base",
                stats.merged_ops,
                stats.write_backs,
                stats.merged_ops as f64 / stats.write_backs as f64,
                100.0 * handling / elapsed.max(1e-9),
            );
        }
    }

    fn commit_merged(
        &mut self,
        plan: &MergePlan,
        first: usize,
        end: usize,
        source: &dyn SourceDevice,
    ) -> Result<(), MergeTrackerError> {
        let ordered_end = plan.num_ordered();
        if self.use_scratch && first < ordered_end {
            let ordered_last = end.min(ordered_end);
            let committed = self.committed;
            let fits = self
                .window
                .as_ref()
                .is_some_and(|w| first.max(committed) >= w.start && ordered_last <= w.end);
            if !fits {
                // A daemon before us may have committed windows since we opened: adopt the
                // durable state it left, then check again.
                self.resync(plan, source)?;
                if first.max(self.committed) >= ordered_end {
                    // Every ordered op is durably merged already (by the daemon before us).
                    return self.commit_to(end);
                }
            }
            let Some((w_start, w_end)) = self.window.as_ref().map(|w| (w.start, w.end)) else {
                self.failed = true;
                return Err(MergeTrackerError::CrossesWindow {
                    first,
                    end,
                    window_start: self.committed,
                    window_end: self.committed,
                });
            };
            // Ops before the window are durably merged (by us or a daemon before us).
            if first.max(self.committed) < w_start || ordered_last > w_end {
                self.failed = true;
                return Err(MergeTrackerError::CrossesWindow {
                    first,
                    end,
                    window_start: w_start,
                    window_end: w_end,
                });
            }
            if end >= w_end {
                if let Err(source) = self.store.commit_window(w_end as u64) {
                    self.failed = true;
                    return Err(MergeTrackerError::Store {
                        operation: "commit window",
                        source,
                    });
                }
                self.committed = w_end;
                self.window = None;
                log::debug!("read-ahead window {w_start}..{w_end} merged and committed");
                if w_end < ordered_end {
                    self.prepare_window(plan, source)?;
                }
            }
            if end > ordered_end {
                self.commit_to(end)?;
            }
            return Ok(());
        }
        self.commit_to(end)
    }

    /// Adopt the durable progress another daemon left in the store after this tracker was
    /// opened (a handoff in the middle of a merge) and load the window it saved.
    fn resync(
        &mut self,
        plan: &MergePlan,
        source: &dyn SourceDevice,
    ) -> Result<(), MergeTrackerError> {
        if let Err(source) = self.store.reload() {
            self.failed = true;
            return Err(MergeTrackerError::Store {
                operation: "reload durable merge state",
                source,
            });
        }
        let durable = usize::try_from(self.store.num_merge_ops()).unwrap_or(usize::MAX);
        if durable <= self.committed || durable > plan.len() {
            return Ok(());
        }
        log::info!(
            "merge progress advanced from {} to {durable} ops by the daemon before this one; \
             following it",
            self.committed
        );
        self.committed = durable;
        self.window = None;
        if durable < plan.num_ordered() {
            if self.store.scratch_state() == ScratchState::Done {
                match self.rebuild_window(plan) {
                    Ok(w) => self.window = Some(w),
                    Err(e) => {
                        self.failed = true;
                        return Err(e);
                    }
                }
            } else {
                // No op of the next window can have been served yet: its Done mark would
                // be durable first. Save it from the source.
                self.prepare_window(plan, source)?;
            }
        }
        Ok(())
    }

    fn commit_to(&mut self, end: usize) -> Result<(), MergeTrackerError> {
        if end <= self.committed {
            return Ok(());
        }
        if let Err(source) = self.store.commit(end as u64) {
            self.failed = true;
            return Err(MergeTrackerError::Store {
                operation: "commit num_merge_ops",
                source,
            });
        }
        self.committed = end;
        Ok(())
    }
}

fn read_entry(area: &[u8], at: usize) -> (u64, u64) {
    let mut old = [0u8; 8];
    let mut new = [0u8; 8];
    if let (Some(o), Some(n)) = (area.get(at..at + 8), area.get(at + 8..at + 16)) {
        old.copy_from_slice(o);
        new.copy_from_slice(n);
    }
    (u64::from_le_bytes(old), u64::from_le_bytes(new))
}

#[cfg(test)]
mod tests {
    use super::super::merge_plan::PlannedOp;
    use super::super::test_support::{CrashClock, DurableMergeState, InMemoryMergeStore};
    use super::*;

    /// Open and activate at once, as the first dm-user request would.
    fn open_active(
        plan: &MergePlan,
        exceptions: &ExceptionStore,
        store: InMemoryMergeStore,
        source: &dyn SourceDevice,
    ) -> Result<MergeTracker<InMemoryMergeStore>, MergeTrackerError> {
        let mut t = MergeTracker::open(plan, exceptions, store)?;
        t.activate(plan, source)?;
        Ok(t)
    }

    fn area_bytes(entries: &[(u64, u64)]) -> Vec<u8> {
        let mut v = vec![0u8; BLOCK_SIZE];
        for (i, &(o, n)) in entries.iter().enumerate() {
            v[i * 16..i * 16 + 8].copy_from_slice(&o.to_le_bytes());
            v[i * 16 + 8..i * 16 + 16].copy_from_slice(&n.to_le_bytes());
        }
        v
    }

    fn setup(
        ops: Vec<PlannedOp>,
        capacity: usize,
    ) -> (
        MergePlan,
        ExceptionStore,
        MergeTracker<InMemoryMergeStore>,
        Vec<u8>,
    ) {
        let plan = MergePlan::new(ops, 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        let source: Vec<u8> = (0..64 * BLOCK_SIZE)
            .map(|i| (i / BLOCK_SIZE) as u8)
            .collect();
        let mem =
            InMemoryMergeStore::new(DurableMergeState::fresh(0), capacity, CrashClock::never());
        let tracker = open_active(&plan, &store, mem, &source).unwrap();
        (plan, store, tracker, source)
    }

    #[test]
    fn zero_ops_commit_immediately_and_old_chunk_zero_counts() {
        // ZERO ops for blocks 0 and 1: the exception for old_chunk 0 is the sector-0 case.
        let (plan, store, mut t, src) = setup(vec![PlannedOp::zero(1), PlannedOp::zero(0)], 510);
        // Exceptions (reverse order): e0 = op1 (block 0), e1 = op0 (block 1).
        let c0 = store.new_chunk(0).unwrap();
        let c1 = store.new_chunk(1).unwrap();
        let p = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&[(0, c0)]), &src)
            .unwrap();
        assert_eq!((p.newly_merged, p.committed, p.complete), (1, 1, false));
        // Writing the same area again merges nothing: error.
        let err = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&[(0, c0)]), &src)
            .unwrap_err();
        assert!(matches!(err, MergeTrackerError::NoNewlyMerged { area: 0 }));
        let p = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&[]), &src)
            .unwrap();
        assert_eq!((p.newly_merged, p.committed, p.complete), (1, 2, true));
        assert_eq!(t.store().durable().num_merge_ops, 2);
        // Two write-backs merged one op each; the refused one is not counted.
        let stats = t.stats();
        assert_eq!((stats.write_backs, stats.merged_ops), (2, 2));
        assert!(stats.first_write_back.is_some());
        let _ = c1;
    }

    #[test]
    fn rejects_foreign_entries_holes_and_wrong_area() {
        let ops = (0..3).map(PlannedOp::zero).collect();
        let (plan, store, mut t, src) = setup(ops, 0);
        let e: Vec<(u64, u64)> = (0..3)
            .map(|i| (2 - i as u64, store.new_chunk(i).unwrap()))
            .collect();
        let mut bad = e.clone();
        bad[0].0 = 99;
        let err = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&bad), &src)
            .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::EntryMismatch { slot: 0, .. }
        ));
        let hole = [e[0], (0, 0), e[2]];
        let err = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&hole), &src)
            .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::EntryMismatch { slot: 2, .. }
        ));
        let mut extra = e.clone();
        extra.push((5, 9));
        let err = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&extra), &src)
            .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::EntryMismatch { slot: 3, .. }
        ));
        let err = t
            .on_metadata_write(&plan, &store, 1, &area_bytes(&e[..2]), &src)
            .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::UnexpectedArea {
                area: 1,
                expected: Some(0)
            }
        ));
        let err = t
            .on_metadata_write(&plan, &store, 0, &[0u8; 100], &src)
            .unwrap_err();
        assert!(matches!(err, MergeTrackerError::BadPayloadLength { .. }));
        // Nothing was committed by the rejected writes.
        assert_eq!(t.committed(), 0);
        let p = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&e[..1]), &src)
            .unwrap();
        assert_eq!((p.newly_merged, p.committed), (2, 2));
    }

    #[test]
    fn ordered_ops_commit_only_at_window_end() {
        // Two independent copies and one zero; the copies form a window of 2.
        let ops = vec![
            PlannedOp::copy(10, 1),
            PlannedOp::copy(12, 2),
            PlannedOp::zero(20),
        ];
        let (plan, store, mut t, src) = setup(ops, 510);
        assert_eq!(t.store().durable().state, ScratchState::Done);
        assert_eq!(t.store().durable().window.new_blocks, vec![10, 12]);
        assert_eq!(t.window_source(1).unwrap()[0], 2);
        assert!(t.window_source(2).is_none());
        // Exceptions: e0 = zero(20), e1 = copy 12<-2, e2 = copy 10<-1 (separate chunks? same group).
        let e: Vec<(u64, u64)> = (0..3)
            .map(|i| {
                (
                    plan.op(store.op_index(i).unwrap()).unwrap().new_block,
                    store.new_chunk(i).unwrap(),
                )
            })
            .collect();
        let p = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&e[..2]), &src)
            .unwrap();
        assert_eq!((p.merged, p.committed), (1, 0)); // first op merged, window not complete
        let p = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&e[..1]), &src)
            .unwrap();
        assert_eq!((p.merged, p.committed), (2, 2));
        assert_eq!(t.store().durable().state, ScratchState::InProgress);
        assert!(t.window_source(0).is_none());
        let p = t
            .on_metadata_write(&plan, &store, 0, &area_bytes(&[]), &src)
            .unwrap();
        assert!(p.complete);
    }

    #[test]
    fn restart_with_done_rebuilds_window_and_verifies_it() {
        let ops = vec![PlannedOp::copy(10, 1), PlannedOp::copy(12, 2)];
        let plan = MergePlan::new(ops, 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        let window = ScratchWindow {
            new_blocks: vec![10, 12],
            data: vec![7u8; 2 * BLOCK_SIZE],
        };
        let durable = DurableMergeState {
            num_merge_ops: 0,
            state: ScratchState::Done,
            window,
        };
        let empty: Vec<u8> = Vec::new(); // the source must not be read
        let t = open_active(
            &plan,
            &store,
            InMemoryMergeStore::new(durable.clone(), 510, CrashClock::never()),
            &empty,
        )
        .unwrap();
        assert_eq!(t.window_source(1).unwrap(), &[7u8; BLOCK_SIZE][..]);
        let mut wrong = durable.clone();
        wrong.window.new_blocks = vec![12, 10];
        let err = open_active(
            &plan,
            &store,
            InMemoryMergeStore::new(wrong, 510, CrashClock::never()),
            &empty,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::WindowMismatch { op_index: 0, .. }
        ));
        let mut short = durable;
        short.window.data.truncate(BLOCK_SIZE);
        let err = open_active(
            &plan,
            &store,
            InMemoryMergeStore::new(short, 510, CrashClock::never()),
            &empty,
        )
        .unwrap_err();
        assert!(matches!(err, MergeTrackerError::WindowMismatch { .. }));
        // Stale progress and tiny scratch are refused.
        let err = open_active(
            &plan,
            &store,
            InMemoryMergeStore::new(DurableMergeState::fresh(1), 510, CrashClock::never()),
            &empty,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::StaleProgress { plan: 0, store: 1 }
        ));
        let err = open_active(
            &plan,
            &store,
            InMemoryMergeStore::new(DurableMergeState::fresh(0), 5, CrashClock::never()),
            &empty,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::ScratchTooSmall { capacity: 5 }
        ));
    }

    #[test]
    fn self_reading_xor_needs_scratch() {
        let src: Vec<u8> = vec![1u8; 16 * BLOCK_SIZE];
        // XOR to block 5 reading bytes 4.5..5.5 blocks: its own destination.
        let plan = MergePlan::new(vec![PlannedOp::xor(5, 4 * 4096 + 2048)], 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        let none = InMemoryMergeStore::new(DurableMergeState::fresh(0), 0, CrashClock::never());
        let err = open_active(&plan, &store, none, &src).unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::XorNeedsScratch {
                op_index: 0,
                new_block: 5
            }
        ));
        let with = InMemoryMergeStore::new(DurableMergeState::fresh(0), 510, CrashClock::never());
        assert!(open_active(&plan, &store, with, &src).is_ok());
        // A self-copy is an identity and replays harmlessly; an XOR elsewhere is fine too.
        let plan = MergePlan::new(
            vec![PlannedOp::copy(5, 5), PlannedOp::xor(6, 4 * 4096 + 2048)],
            0,
        )
        .unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        let none = InMemoryMergeStore::new(DurableMergeState::fresh(0), 0, CrashClock::never());
        assert!(open_active(&plan, &store, none, &src).is_ok());
    }

    #[test]
    fn crash_between_scratch_write_and_done_leaves_state_not_done() {
        let plan = MergePlan::new(vec![PlannedOp::copy(10, 1)], 0).unwrap();
        let store = ExceptionStore::build(&plan).unwrap();
        let src: Vec<u8> = vec![1u8; 4 * BLOCK_SIZE];
        let mem = InMemoryMergeStore::new(DurableMergeState::fresh(0), 510, CrashClock::after(1));
        let err = open_active(&plan, &store, mem, &src).unwrap_err();
        assert!(matches!(
            err,
            MergeTrackerError::Store {
                operation: "write scratch window",
                ..
            }
        ));
    }

    #[test]
    fn clock_counts_and_crashes() {
        let c = CrashClock::after(2);
        assert!(c.step("a").is_ok());
        assert!(c.clone().step("b").is_ok());
        assert!(c.step("c").is_err());
        assert!(c.crashed());
        assert!(c.step("d").is_err());
        assert_eq!(c.steps(), 2);
    }
}
