//! The merge: read-ahead windows and the ordered phase (the REPLACE/ZERO phase that follows is
//! `replace_batches`), each step durable before the next (DESIGN.md, "Commit protocol").

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cow_format::{CowOp, MergeStateError};

use crate::error_chain::ErrorChain;

use super::control::MergeControl;
use super::direct_io::AlignedBuf;
use super::error::{UserMergeError, UserSnapshotError};
use super::merge_io::{MergeIo, ReadRun, WriteRun};
use super::phase_times::{MergeStep, PhaseTimes};
use super::plan::source_offset;
use super::replace_batches::ProducedBatch;
use super::snapshot::{MergeOutcome, MergePhase, UserSnapshot, BLOCK};
use super::window::{LoadedWindow, SavedSource};

/// Destination blocks produced before a window's writes are handed to the engine.
const OUT_BLOCKS: usize = cow_format::layout::READ_AHEAD_WINDOW_BLOCKS;
/// Most read-ahead windows merged under one commit when none of them reads a block any of
/// them writes (`MergePlan::replayable_windows`): a crash replays at most this many.
const MAX_REPLAYABLE_WINDOWS: u64 = 8;

/// A failed step: an engine error (the step can be redone with the synchronous engine) or
/// anything else (the merge fails).
pub(super) enum StepError {
    Engine(UserMergeError),
    Fatal(UserMergeError),
}

/// Working state of one merge call: buffers reused across steps (at most one window of
/// destinations and one batch), and the time each kind of step took.
#[derive(Default)]
pub(super) struct Buffers {
    /// Time per kind of step, logged when the call ends.
    pub(super) times: PhaseTimes,
    /// Produced destinations; page-aligned so that their writes can go `O_DIRECT`.
    pub(super) out: AlignedBuf,
    /// `(first block, byte offset in the buffer, bytes)` of each run of contiguous
    /// destinations.
    spans: Vec<(u64, usize, usize)>,
    /// `(first destination block, entry)` of a window's entries, sorted by block.
    by_block: Vec<(u64, u64)>,
    /// A committed window's saved-bytes buffer, for the next window's sources (taken back
    /// when no reader holds that window any more), so the merge does not allocate and
    /// fault in 2 MiB per window; in the REPLACE/ZERO part, the buffer the next batch is
    /// produced in.
    pub(super) spare: Option<AlignedBuf>,
    /// The REPLACE/ZERO batch produced while the previous one was written.
    pub(super) next_batch: Option<ProducedBatch>,
}

impl Buffers {
    /// Keep the buffer of `window` for the next one, if no reader still holds the window.
    fn recycle(&mut self, window: Arc<LoadedWindow>) {
        if let Ok(window) = Arc::try_unwrap(window) {
            self.spare = Some(window.into_data());
        }
    }
}

impl Buffers {
    /// Add one produced destination block at `at` in the buffer.
    fn push_span(&mut self, block: u64, at: usize, len: usize) {
        push_span(&mut self.spans, block, at, len);
    }

    fn runs(&self) -> Vec<WriteRun<'_>> {
        write_runs(&self.spans, &self.out)
    }
}

/// Add `len` bytes of destination blocks from `block` on, held from byte `at` of a buffer,
/// to `spans` (`(first block, byte offset, bytes)` of each run of contiguous destinations).
pub(super) fn push_span(spans: &mut Vec<(u64, usize, usize)>, block: u64, at: usize, len: usize) {
    if let Some(last) = spans.last_mut() {
        let blocks = (last.2 / BLOCK) as u64;
        if last.0.checked_add(blocks) == Some(block) && last.1 + last.2 == at {
            last.2 += len;
            return;
        }
    }
    spans.push((block, at, len));
}

/// The write runs of `spans` (see [`push_span`]) over `buf`.
pub(super) fn write_runs<'a>(spans: &[(u64, usize, usize)], buf: &'a [u8]) -> Vec<WriteRun<'a>> {
    spans
        .iter()
        .map(|&(block, at, len)| WriteRun {
            offset: block * BLOCK as u64,
            buf: &buf[at..at + len],
        })
        .collect()
}

/// Clears the running flag when the merge returns.
struct Running<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl UserSnapshot {
    /// Run the merge to completion on the calling thread (the caller picks the thread and
    /// its priority). Returns [`MergeOutcome::Complete`], or [`MergeOutcome::Stopped`] when
    /// `control` asked it to stop (at a safe point; resumable later). An engine error
    /// mid-step is logged and the step redone with the synchronous engine, which then
    /// carries on. Any other failure sets [`MergePhase::Failed`] and is returned; the
    /// durable state stays consistent and a later call resumes from it.
    pub fn merge(
        &self,
        io: Box<dyn MergeIo>,
        control: &MergeControl,
    ) -> Result<MergeOutcome, UserMergeError> {
        if self.merging.swap(true, Ordering::AcqRel) {
            return Err(UserMergeError::AlreadyRunning);
        }
        let _running = Running(&self.merging);
        // The base changes from here on: no answer may come from its read-ahead chunks.
        self.stop_direct_prefetch();
        self.set_phase(MergePhase::Merging);
        let result = self.run_merge(io, control);
        match &result {
            Ok(MergeOutcome::Complete) => {
                self.set_phase(MergePhase::Complete);
                log::info!("merge complete: {} entries", self.plan.total());
            }
            Ok(MergeOutcome::Stopped) => {
                log::info!(
                    "merge stopped at entry {} of {}; it resumes from there",
                    self.merged.load(Ordering::Acquire),
                    self.plan.total()
                );
            }
            Err(e) => {
                self.set_phase(MergePhase::Failed);
                log::error!(
                    "merge failed: {}; reads go on, and a new merge resumes from the durable progress",
                    ErrorChain(e)
                );
            }
        }
        result
    }

    fn run_merge(
        &self,
        mut io: Box<dyn MergeIo>,
        control: &MergeControl,
    ) -> Result<MergeOutcome, UserMergeError> {
        self.follow_durable()
            .map_err(|e| UserMergeError::Reload(Box::new(e)))?;
        let mut bufs = Buffers::default();
        let mut ordered_done = self.merged.load(Ordering::Acquire) >= self.plan.ordered();
        loop {
            let p = self.merged.load(Ordering::Acquire);
            if !ordered_done && p >= self.plan.ordered() {
                ordered_done = true;
                log::info!("merge time of the ordered part {}", bufs.times);
            }
            if p >= self.plan.total() {
                log::info!("merge time {}", bufs.times);
                return Ok(MergeOutcome::Complete);
            }
            if control.checkpoint() {
                log::info!("merge time until the stop {}", bufs.times);
                return Ok(MergeOutcome::Stopped);
            }
            let step = if p < self.plan.ordered() {
                // A window already read ahead (saved in scratch before a restart, or read
                // before an engine error) is merged alone; otherwise windows that read
                // nothing they write skip the scratch and share one commit.
                let loaded = self
                    .view_read()
                    .window
                    .as_ref()
                    .is_some_and(|w| w.contains(p));
                let end = if loaded {
                    p
                } else {
                    self.plan
                        .replayable_windows(&self.cow, p, MAX_REPLAYABLE_WINDOWS)
                };
                if end > p {
                    self.merge_replayable(p..end, io.as_mut(), &mut bufs, control)
                } else {
                    self.merge_window(p, io.as_mut(), &mut bufs)
                }
            } else {
                self.merge_batch(p, io.as_mut(), &mut bufs)
            };
            match step {
                Ok(()) => {}
                Err(StepError::Engine(e)) if io.name() != "sync" => {
                    log::warn!(
                        "merge engine {} failed: {}; redoing the step with synchronous I/O, which carries on from here",
                        io.name(),
                        ErrorChain(&e)
                    );
                    io = self.sync_io().map_err(UserMergeError::SyncEngine)?;
                }
                Err(StepError::Engine(e) | StepError::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Adopt progress another daemon made since this snapshot was opened (a handoff).
    pub(crate) fn follow_durable(&self) -> Result<(), UserSnapshotError> {
        let durable =
            self.lock_store()
                .progress()
                .map_err(|source| UserSnapshotError::MergeState {
                    path: "(COW)".into(),
                    source,
                })?;
        // Another daemon has begun merging: the base changes from here on, so the base's
        // read-ahead chunks may no longer be used (taken before any lock of the view).
        if super::snapshot::merge_begun(&durable) {
            self.stop_direct_prefetch();
        }
        if durable.num_merge_ops != self.merged.load(Ordering::Acquire) {
            log::info!(
                "durable merge progress is {} entries, this daemon had {}; following it",
                durable.num_merge_ops,
                self.merged.load(Ordering::Acquire)
            );
            self.adopt(durable)?;
        }
        Ok(())
    }

    pub(super) fn op_at(&self, entry: u64) -> Result<(usize, &CowOp), StepError> {
        self.plan.op(&self.cow, entry).ok_or_else(|| {
            StepError::Fatal(UserMergeError::Produce {
                entry,
                op_index: entry,
                block: 0,
                source: cow_format::ReadError::NoSuchOp {
                    position: entry as usize,
                },
            })
        })
    }

    /// One window of the ordered part: read ahead (unless its saved copy is loaded), write
    /// its destinations durably, commit.
    ///
    /// A window read ahead here is saved in scratch by a second thread while this one
    /// produces its destinations; the first destination write waits for the save (data,
    /// then state Done, both durable), so the commit protocol is unchanged and only the
    /// producing overlaps the save's I/O.
    fn merge_window(
        &self,
        p: u64,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
    ) -> Result<(), StepError> {
        let range = self.plan.window_at(&self.cow, p);
        let loaded = self
            .view_read()
            .window
            .clone()
            .filter(|w| w.entries == range);
        let window = match loaded {
            Some(w) => {
                self.write_destinations(&w, io, bufs, true, &mut || Ok(()))?;
                w
            }
            None => {
                let (window, new_blocks) = self.read_ahead(range.clone(), io, bufs)?;
                if self.plan.has_scratch() {
                    self.save_while_producing(&window, &new_blocks, io, bufs)?;
                } else {
                    self.write_destinations(&window, io, bufs, true, &mut || Ok(()))?;
                }
                window
            }
        };
        bufs.times
            .time(MergeStep::Commit, || self.commit_ordered(range.end))?;
        bufs.recycle(window);
        log::debug!("merged window {}..{}", range.start, range.end);
        Ok(())
    }

    /// Windows `range` (whole windows, none reading a block any of them writes; see
    /// `MergePlan::replayable_windows`): each read ahead into memory only and its
    /// destinations written, the last batch durably, then one commit. A crash anywhere
    /// before the commit replays them from the source device, which they have not touched;
    /// readers take their blocks from the source (or the window in memory) meanwhile. A
    /// pause or stop request ends the run early at a window boundary.
    fn merge_replayable(
        &self,
        range: std::ops::Range<u64>,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
        control: &MergeControl,
    ) -> Result<(), StepError> {
        let mut at = range.start;
        loop {
            let window_range = self.plan.window_at(&self.cow, at);
            let window = self.read_sources(window_range.clone(), io, bufs)?;
            let last = window_range.end >= range.end || control.safe_point_wanted();
            self.write_destinations(&window, io, bufs, last, &mut || Ok(()))?;
            at = window_range.end;
            if last {
                break;
            }
            // Free this window's bytes before the next window's are read (one window in
            // memory, as on the staged path): readers take its blocks from the source
            // device, which the run does not write.
            self.view_write().window = None;
            bufs.recycle(window);
        }
        bufs.times
            .time(MergeStep::Commit, || self.commit_ordered(at))?;
        log::debug!(
            "merged windows {}..{} without scratch (none reads what they write)",
            range.start,
            at
        );
        Ok(())
    }

    /// Commit the ordered part up to `end` (merged and synced), then move the readers on.
    fn commit_ordered(&self, end: u64) -> Result<(), StepError> {
        {
            let mut store = self.lock_store();
            let (operation, result) = if self.plan.has_scratch() {
                ("commit the merged window", store.commit_window(end))
            } else {
                ("commit merged entries", store.commit_merged(end))
            };
            result.map_err(|source| {
                StepError::Fatal(UserMergeError::Progress {
                    operation,
                    num_merge_ops: end,
                    source,
                })
            })?;
        }
        let mut view = self.view_write();
        view.merged = end;
        view.window = None;
        self.merged.store(end, Ordering::Release);
        Ok(())
    }

    /// Read the sources of the window's ordered ops (contiguous ones coalesced) and make
    /// them the window readers use (the source device still holds the same bytes: no
    /// destination of the window is written before its save); returns the window and the
    /// destination block of each slot, for the save.
    fn read_ahead(
        &self,
        range: std::ops::Range<u64>,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
    ) -> Result<(Arc<LoadedWindow>, Vec<u64>), StepError> {
        let ((new_blocks, data), has_slot) = self.read_window_sources(range.clone(), io, bufs)?;
        let window = self.install_window(range, has_slot, data);
        Ok((window, new_blocks))
    }

    /// Save `window` durably in scratch (data and metadata synced, then state Done synced)
    /// on a second thread while this one produces its destinations, then write them. If the
    /// save fails, the window is taken back from the readers (they read its sources from
    /// the source device, unchanged), so that a later merge reads it ahead and saves it
    /// again instead of writing destinations that a crash could not replay.
    fn save_while_producing(
        &self,
        window: &Arc<LoadedWindow>,
        new_blocks: &[u64],
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
    ) -> Result<(), StepError> {
        let start = window.entries.start;
        let mut saved_ok = false;
        let written = std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("merge-save".into())
                .spawn_scoped(scope, || self.save_window(start, new_blocks, window.data()));
            // Without a second thread (none could be started) the save is done here first.
            let mut saving = Some(spawned.map_err(|e| {
                log::warn!(
                    "merge: no thread for the window save ({e}); saving before producing instead \
                     (correct, slower)"
                );
                self.save_window(start, new_blocks, window.data())
            }));
            let mut wait = || -> Result<(), StepError> {
                let result = match saving.take() {
                    None => return Ok(()),
                    Some(Err(saved)) => saved,
                    Some(Ok(handle)) => handle.join().unwrap_or_else(|_| {
                        Err(StepError::Fatal(UserMergeError::Progress {
                            operation: "save the read-ahead window in scratch",
                            num_merge_ops: start,
                            source: MergeStateError::Io {
                                op: "write",
                                offset: 0,
                                len: 0,
                                source: std::io::Error::other("the saving thread panicked"),
                            },
                        }))
                    }),
                };
                saved_ok = result.is_ok();
                result
            };
            let written = self.write_destinations(window, io, bufs, true, &mut wait);
            // Producing failed before the first write: still learn how the save ended.
            let waited = wait();
            written.and(waited)
        });
        if !saved_ok {
            self.view_write().window = None;
        }
        written
    }

    /// The durable half of a read-ahead: stage the window's slots and list, then mark it
    /// Done (each synced).
    fn save_window(&self, start: u64, new_blocks: &[u64], data: &[u8]) -> Result<(), StepError> {
        let progress = |operation| {
            move |source| {
                StepError::Fatal(UserMergeError::Progress {
                    operation,
                    num_merge_ops: start,
                    source,
                })
            }
        };
        let mut store = self.lock_store();
        store
            .stage_window(new_blocks, data)
            .map_err(progress("save the read-ahead window in scratch"))?;
        store
            .mark_window_done()
            .map_err(progress("mark the read-ahead window Done"))
    }

    /// Read the sources of a window that needs no scratch copy into memory and make them
    /// the window readers use (a window already in memory is reused).
    fn read_sources(
        &self,
        range: std::ops::Range<u64>,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
    ) -> Result<Arc<LoadedWindow>, StepError> {
        let loaded = self
            .view_read()
            .window
            .clone()
            .filter(|w| w.entries == range);
        if let Some(w) = loaded {
            return Ok(w);
        }
        let (saved, has_slot) = self.read_window_sources(range.clone(), io, bufs)?;
        Ok(self.install_window(range, has_slot, saved.1))
    }

    /// Publish a window's saved source bytes to readers.
    fn install_window(
        &self,
        range: std::ops::Range<u64>,
        has_slot: Vec<bool>,
        data: AlignedBuf,
    ) -> Arc<LoadedWindow> {
        let window = Arc::new(LoadedWindow::new(
            range.clone(),
            has_slot.into_iter(),
            data,
            BLOCK,
        ));
        // From here readers take this window's blocks from the saved bytes; any reader
        // still reading one of its sources holds the view and finishes first.
        self.view_write().window = Some(Arc::clone(&window));
        log::debug!("read ahead window {}..{}", range.start, range.end);
        window
    }

    /// Read the sources of the window's ordered ops (contiguous ones coalesced) into
    /// memory: the destination block of each slot, the bytes slot by slot (in a page-aligned
    /// buffer, the spare one if there is one), and which entries have a slot.
    #[allow(clippy::type_complexity)]
    fn read_window_sources(
        &self,
        range: std::ops::Range<u64>,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
    ) -> Result<((Vec<u64>, AlignedBuf), Vec<bool>), StepError> {
        let bs = BLOCK as u64;
        let mut new_blocks: Vec<u64> = Vec::new();
        // (source offset, slots)
        let mut spans: Vec<(u64, usize)> = Vec::new();
        let mut has_slot = Vec::with_capacity((range.end - range.start) as usize);
        for entry in range.clone() {
            let (_, op) = self.op_at(entry)?;
            has_slot.push(op.kind.is_ordered());
            if !op.kind.is_ordered() {
                continue;
            }
            let offset = source_offset(op, bs).ok_or_else(|| {
                StepError::Fatal(UserMergeError::Produce {
                    entry,
                    op_index: op.index,
                    block: op.new_block,
                    source: cow_format::ReadError::OutOfRange {
                        index: op.index,
                        what: "COPY source block",
                    },
                })
            })?;
            new_blocks.push(op.new_block);
            match spans.last_mut() {
                Some(last) if last.0.checked_add(last.1 as u64 * bs) == Some(offset) => last.1 += 1,
                _ => spans.push((offset, 1)),
            }
        }
        let mut data = bufs.spare.take().unwrap_or_default();
        // Every slot is covered by exactly one run below, so no byte of an earlier window
        // survives.
        data.set_len(new_blocks.len() * BLOCK);
        {
            let mut runs = Vec::with_capacity(spans.len());
            let mut rest: &mut [u8] = &mut data;
            for &(offset, slots) in &spans {
                let (head, tail) = rest.split_at_mut(slots * BLOCK);
                runs.push(ReadRun { offset, buf: head });
                rest = tail;
            }
            let at = Instant::now();
            let read = io.read_source(&mut runs);
            bufs.times.add(MergeStep::SourceRead, at.elapsed());
            read.map_err(|source| {
                StepError::Engine(UserMergeError::SourceRead {
                    start: range.start,
                    end: range.end,
                    engine: io.name(),
                    source,
                })
            })?;
        }
        Ok(((new_blocks, data), has_slot))
    }

    /// Produce every destination block of `window` and write them in runs of contiguous
    /// blocks; if `durable`, the last batch durably (write, then sync the base device).
    /// `before_writing` is called before the first write (and its error returned).
    ///
    /// The entries are produced in ascending order of their destination, not in merge
    /// order: every source of the window is in memory before the first write and nothing
    /// here reads the base device, so the order of the writes inside a window changes no
    /// byte, while a window whose ops step down in small groups (a file shifted up by a few
    /// blocks) becomes one run per contiguous range instead of one per group.
    fn write_destinations(
        &self,
        window: &LoadedWindow,
        io: &mut dyn MergeIo,
        bufs: &mut Buffers,
        durable: bool,
        before_writing: &mut dyn FnMut() -> Result<(), StepError>,
    ) -> Result<(), StepError> {
        let started = Instant::now();
        let mut writing = std::time::Duration::ZERO;
        let mut waiting = std::time::Duration::ZERO;
        let mut wait = |waiting: &mut std::time::Duration| {
            let at = Instant::now();
            let result = before_writing();
            *waiting += at.elapsed();
            result
        };
        let range = window.entries.clone();
        bufs.out.set_len(OUT_BLOCKS * BLOCK);
        bufs.spans.clear();
        let write_error = |io: &dyn MergeIo, source| {
            StepError::Engine(UserMergeError::BaseWrite {
                start: range.start,
                end: range.end,
                engine: io.name(),
                source,
            })
        };
        let mut by_block = std::mem::take(&mut bufs.by_block);
        by_block.clear();
        for entry in range.clone() {
            by_block.push((self.op_at(entry)?.1.new_block, entry));
        }
        by_block.sort_unstable();
        // `(entry, destination block)` of each block of the buffer, filled and produced a
        // bufferful at a time.
        let capacity = bufs.out.len() / BLOCK;
        let mut jobs: Vec<(u64, u64)> = Vec::with_capacity(capacity);
        for &(_, entry) in &by_block {
            let op = self.op_at(entry)?.1;
            for block in op.new_block..op.new_block.saturating_add(op.num_blocks) {
                if jobs.len() == capacity {
                    self.produce_blocks(window, &jobs, &mut bufs.out[..jobs.len() * BLOCK])?;
                    bufs.spans.clear();
                    for (i, &(_, b)) in jobs.iter().enumerate() {
                        bufs.push_span(b, i * BLOCK, BLOCK);
                    }
                    jobs.clear();
                    wait(&mut waiting)?;
                    let at = Instant::now();
                    let written = io.write_base(&bufs.runs());
                    writing += at.elapsed();
                    written.map_err(|e| write_error(io, e))?;
                }
                jobs.push((entry, block));
            }
        }
        self.produce_blocks(window, &jobs, &mut bufs.out[..jobs.len() * BLOCK])?;
        bufs.spans.clear();
        for (i, &(_, b)) in jobs.iter().enumerate() {
            bufs.push_span(b, i * BLOCK, BLOCK);
        }
        bufs.by_block = by_block;
        wait(&mut waiting)?;
        let at = Instant::now();
        let runs = bufs.runs();
        let written = if durable {
            io.write_base_durably(&runs)
        } else {
            io.write_base(&runs)
        };
        writing += at.elapsed();
        bufs.times.add(MergeStep::BaseWrite, writing);
        bufs.times.add(MergeStep::ScratchSave, waiting);
        bufs.times.add(
            MergeStep::Produce,
            started.elapsed().saturating_sub(writing + waiting),
        );
        written.map_err(|e| write_error(io, e))
    }

    /// Produce the destination block of each `(entry, block)` of `jobs` into consecutive
    /// blocks of `out`; the first block that cannot be produced fails the call.
    fn produce_blocks(
        &self,
        window: &LoadedWindow,
        jobs: &[(u64, u64)],
        out: &mut [u8],
    ) -> Result<(), StepError> {
        for (&(entry, block), out) in jobs.iter().zip(out.chunks_exact_mut(BLOCK)) {
            let (position, op) = self.op_at(entry)?;
            let produced = if op.kind.is_ordered() {
                match window.saved_source(entry) {
                    Some(bytes) => {
                        let saved = SavedSource {
                            offset: source_offset(op, BLOCK as u64).unwrap_or(u64::MAX),
                            bytes,
                        };
                        self.cow.read_op_block(position, block, &saved, out)
                    }
                    None => Err(cow_format::ReadError::NoSuchOp {
                        position: entry as usize,
                    }),
                }
            } else {
                self.cow.read_op_block(position, block, &self.source, out)
            };
            produced.map_err(|source| {
                StepError::Fatal(UserMergeError::Produce {
                    entry,
                    op_index: op.index,
                    block,
                    source,
                })
            })?;
        }
        Ok(())
    }
}
