//! [`UserSnapshot`]: one partition in user-space-merge mode — open, the read path, the
//! request handler and the progress view. The merge itself is in `merger`.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cow_format::layout::BufferState;
use cow_format::merge_state::DurableProgress;
use cow_format::reader::CowFileStorage;
use cow_format::{CowOp, CowReader, CowStorage, MergeState, OpKind};

use crate::dm_user::{
    AnswerPiece, Request, ResponseCode, DM_USER_REQ_MAP_FLUSH, DM_USER_REQ_MAP_READ,
    DM_USER_REQ_MAP_WRITE,
};
use crate::error_chain::ErrorChain;
use crate::log_limit::LogLimit;
use crate::snapshot::block_server::MAX_REQUEST_BYTES;

use super::block_map::BlockMap;
use super::direct_io::reopen_direct;
use super::direct_prefetch::{DirectPrefetch, Lending, Lent, ThroughChunks, CHUNK_BYTES};
use super::direct_runs::{DirectRuns, RunDevice};
use super::direct_source::DirectSource;
use super::error::{UserReadError, UserSnapshotError};
use super::merge_io::MergeIo;
use super::plan::{source_blocks, MergePlan};
use super::prefetch::{self, SequentialPrefetch};
use super::progress_store::ProgressStore;
use super::sync_io::SyncMergeIo;
use super::window::{LoadedWindow, SavedSource};

/// The only block size served (AOSP `BLOCK_SZ`).
pub(crate) const BLOCK: usize = 4096;
const BLOCK_U64: u64 = BLOCK as u64;
const SECTOR: u64 = 512;

/// How a [`UserSnapshot`] is opened and merged. The default: buffered source reads, no cap on
/// REPLACE/ZERO batches beyond 1 MiB, the COW read with `pread`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserSnapshotOptions {
    /// Read COPY/XOR sources on the read path with `O_DIRECT` (AOSP `-o_direct`), through
    /// an aligned bounce buffer, so they do not fill the page cache.
    pub o_direct: bool,
    /// Write the merge's destinations through an `O_DIRECT` descriptor of the base device
    /// where it accepts one (no page-cache copy and writeback of each destination; DESIGN.md,
    /// "Merge I/O"); the daemon turns it on by default (`-merge_o_direct`).
    pub merge_o_direct: bool,
    /// Read the windows' sources through an `O_DIRECT` descriptor of the source device into
    /// page-aligned buffers (runs at block offsets; XOR sources at other offsets stay
    /// buffered). The daemon turns it on by default (`-merge_direct_reads`).
    pub merge_direct_reads: bool,
    /// Save read-ahead windows in the COW's scratch region through an `O_DIRECT` descriptor
    /// of the COW file where it accepts one (the page-aligned 2 MiB of each save skip the
    /// page cache; DESIGN.md, "Merge I/O"). The daemon turns it on by default
    /// (`-merge_direct_scratch`).
    pub merge_direct_scratch: bool,
    /// At most this many ops per REPLACE/ZERO merge batch (AOSP
    /// `ro.virtual_ab.cow_op_merge_size`); `None` or `Some(0)`: no cap beyond 1 MiB.
    pub cow_op_merge_size: Option<u32>,
    /// Map the COW file (no system call per payload); falls back to `pread` if mapping fails.
    /// Off by default (payloads are read with `pread`): every mapped page a read
    /// or the merge touched counts in the daemon's RSS, so a mapping makes the daemon's
    /// resident memory grow with the COW (5.6 MiB of a 7.5 MiB COW in the emulator demo,
    /// `BENCHMARKS.md` "Daemon memory at the peak of the merge").
    pub mmap_cow: bool,
    /// Never answer in pieces ([`UserSnapshot::read_in_pieces`] plans nothing): every READ
    /// is produced whole in the daemon's buffer. Off by default, so a transport that can
    /// splice (dm-user) takes base and pending COPY runs from the page cache; the daemon's
    /// `-nosplice_reads` turns it on.
    pub whole_reads: bool,
    /// Keep the base device's page cache a few MiB ahead of a reader that reads the device
    /// in order (`POSIX_FADV_WILLNEED`; DESIGN.md, "Sequential read-ahead of the base"). The
    /// daemon turns it on by default (`-read_prefetch`).
    pub read_prefetch: bool,
    /// How many bytes ahead of a sequential reader the base is advised (`None`: 4 MiB;
    /// the daemon's `-read_prefetch_kib`).
    pub read_prefetch_ahead: Option<u64>,
    /// Read runs of the base and source devices of at least
    /// `direct_runs::DIRECT_RUN_MIN` bytes with `O_DIRECT` straight
    /// into the answer (`direct_runs.rs`): they do not pass through the page cache, and the
    /// base is not read ahead of a sequential reader. The daemon's `-direct_reads`.
    pub direct_reads: bool,
    /// Bytes of the base read ahead of a sequential reader with `O_DIRECT` into the
    /// daemon's own memory, by a thread of the snapshot, instead of advising the page cache
    /// (`direct_prefetch.rs`): used only before any merge, and only with
    /// [`read_prefetch`](Self::read_prefetch). 0 (the default here) turns it off; the
    /// daemon's `-direct_read_ahead_kib` (off by default).
    pub direct_read_ahead: usize,
}

/// Where a merge stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergePhase {
    /// `merge` was not called in this process (the durable progress may be partial).
    NotStarted,
    /// `merge` runs, or was stopped at a safe point.
    Merging,
    /// Every entry of the merge order is merged (durably).
    Complete,
    /// The last `merge` call failed; reads still work where they can.
    Failed,
}

impl MergePhase {
    fn to_u8(self) -> u8 {
        match self {
            MergePhase::NotStarted => 0,
            MergePhase::Merging => 1,
            MergePhase::Complete => 2,
            MergePhase::Failed => 3,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => MergePhase::Merging,
            2 => MergePhase::Complete,
            3 => MergePhase::Failed,
            _ => MergePhase::NotStarted,
        }
    }
}

/// Merge progress now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Merge-order entries merged (the durable `num_merge_ops`).
    pub merged_ops: u64,
    /// Entries of the merge order.
    pub total_ops: u64,
    /// The state.
    pub state: MergePhase,
}

/// How a `merge` call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Everything is merged.
    Complete,
    /// [`super::MergeControl::stop`] was honoured at a safe point; resumable.
    Stopped,
}

/// What readers consult to decide where a COPY/XOR block comes from. The merge takes it in
/// write mode only to switch a window's state, so a reader holding it in read mode while it
/// reads the source device for an unmerged window finishes before any destination of that
/// window is written.
#[derive(Debug, Default)]
pub(crate) struct ReadView {
    /// Durable `num_merge_ops`.
    pub(crate) merged: u64,
    /// The window being read ahead or merged (its source bytes are saved).
    pub(crate) window: Option<Arc<LoadedWindow>>,
}

/// One partition served and merged in user-space-merge mode.
pub struct UserSnapshot {
    pub(crate) cow: CowReader<CowFileStorage>,
    pub(crate) source: File,
    /// `O_DIRECT` descriptor of the source for the read path, when asked for.
    source_direct: Option<DirectSource>,
    pub(crate) base: File,
    pub(crate) plan: MergePlan,
    map: BlockMap,
    device_sectors: u64,
    pub(crate) view: RwLock<ReadView>,
    /// Mirror of `view.merged` for reads that need no lock.
    pub(crate) merged: AtomicU64,
    phase: AtomicU8,
    pub(crate) store: Mutex<Box<dyn ProgressStore>>,
    pub(crate) merging: AtomicBool,
    pub(crate) opts: UserSnapshotOptions,
    request_log: LogLimit,
    prefetch: SequentialPrefetch,
    /// The COW file, for read-ahead advice on its payloads (`None`: no advice).
    cow_advice: Option<File>,
    /// `O_DIRECT` twins of `base` and `source` for the read path's runs, when asked for.
    direct_runs: Option<DirectRuns>,
    /// `O_DIRECT` read-ahead of the base for a sequential reader, when asked for and no
    /// merge had begun at open (disabled when one starts).
    direct_prefetch: Option<DirectPrefetch>,
    /// The source and the base are the same device (a Virtual A/B device): before any
    /// merge, source reads may come from the base's read-ahead too.
    source_is_base: bool,
}

impl std::fmt::Debug for UserSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSnapshot")
            .field("device_sectors", &self.device_sectors)
            .field("progress", &self.progress())
            .finish_non_exhaustive()
    }
}

fn open_file(role: &'static str, path: &Path, write: bool) -> Result<File, UserSnapshotError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|source| UserSnapshotError::Open {
            role,
            path: path.to_path_buf(),
            source,
        })
}

impl UserSnapshot {
    /// Open COW (read-write: progress goes into it), source (read-only) and base
    /// (read-write) by path. Nothing durable is written and nothing is merged until
    /// [`merge`](Self::merge).
    pub fn open(
        cow: &Path,
        source: &Path,
        base: &Path,
        opts: &UserSnapshotOptions,
    ) -> Result<Self, UserSnapshotError> {
        let cow_file = open_file("COW", cow, true)?;
        // Only advice goes through this one; refused, reads go on without it.
        let cow_advice = cow_file.try_clone().ok();
        let state_file = cow_file
            .try_clone()
            .map_err(|source| UserSnapshotError::Open {
                role: "COW",
                path: cow.to_path_buf(),
                source,
            })?;
        let direct_scratch = opts
            .merge_direct_scratch
            .then(|| reopen_direct(&state_file, "COW", true, "window saves in scratch"))
            .flatten();
        let mut state =
            MergeState::open(state_file).map_err(|source| UserSnapshotError::MergeState {
                path: cow.to_path_buf(),
                source,
            })?;
        if let Some(direct) = direct_scratch {
            state.set_direct_writes(direct);
        }
        let storage = CowFileStorage::open(cow_file, opts.mmap_cow).map_err(|source| {
            UserSnapshotError::Open {
                role: "COW",
                path: cow.to_path_buf(),
                source,
            }
        })?;
        let reader = CowReader::from_storage(storage).map_err(|source| UserSnapshotError::Cow {
            path: cow.to_path_buf(),
            source,
        })?;
        let source_file = open_file("source", source, false)?;
        let source_direct = if opts.o_direct {
            Some(
                DirectSource::open(source).map_err(|e| UserSnapshotError::Open {
                    role: "source",
                    path: source.to_path_buf(),
                    source: e,
                })?,
            )
        } else {
            None
        };
        let base_file = open_file("base", base, true)?;
        let mut snap = Self::from_parts(reader, source_file, base_file, Box::new(state), *opts)?;
        snap.source_direct = source_direct;
        snap.cow_advice = cow_advice;
        Ok(snap)
    }

    /// Assemble a snapshot from an open COW, its devices and its progress store, and load
    /// the durable position.
    pub(crate) fn from_parts(
        cow: CowReader<CowFileStorage>,
        source: File,
        base: File,
        store: Box<dyn ProgressStore>,
        opts: UserSnapshotOptions,
    ) -> Result<Self, UserSnapshotError> {
        if cow.block_size() as usize != BLOCK {
            return Err(UserSnapshotError::BlockSize {
                block_size: cow.block_size(),
            });
        }
        let bytes = CowStorage::size(&base).map_err(|source| UserSnapshotError::Open {
            role: "base",
            path: "(open descriptor)".into(),
            source,
        })?;
        if bytes == 0 || bytes % SECTOR != 0 {
            return Err(UserSnapshotError::BaseSize { bytes });
        }
        let plan = MergePlan::build(&cow, store.window_capacity())?;
        if !plan.has_scratch() {
            for entry in 0..plan.ordered() {
                if let Some((_, op)) = plan.op(&cow, entry) {
                    let self_reading = op.kind == OpKind::Xor
                        && source_blocks(op, BLOCK_U64).is_some_and(|s| s.contains(&op.new_block));
                    if self_reading {
                        return Err(UserSnapshotError::XorNeedsScratch {
                            entry,
                            block: op.new_block,
                        });
                    }
                }
            }
        }
        let device_blocks = bytes.div_ceil(BLOCK_U64);
        let map = BlockMap::build(&cow, &plan, device_blocks)?;
        log::debug!(
            "user-space snapshot: {} blocks, {} merge-order entries ({} ordered), lookup {} KiB",
            device_blocks,
            plan.total(),
            plan.ordered(),
            map.heap_bytes() / 1024
        );
        let direct_runs = opts.direct_reads.then(|| DirectRuns::open(&base, &source));
        let source_is_base = same_device(&source, &base);
        let mut snap = Self {
            cow,
            source,
            source_direct: None,
            base,
            plan,
            map,
            device_sectors: bytes / SECTOR,
            view: RwLock::new(ReadView::default()),
            merged: AtomicU64::new(0),
            phase: AtomicU8::new(MergePhase::NotStarted.to_u8()),
            store: Mutex::new(store),
            merging: AtomicBool::new(false),
            opts,
            request_log: LogLimit::new(),
            prefetch: SequentialPrefetch::new(opts.read_prefetch_ahead),
            cow_advice: None,
            direct_runs,
            direct_prefetch: None,
            source_is_base,
        };
        let durable =
            snap.lock_store()
                .progress()
                .map_err(|source| UserSnapshotError::MergeState {
                    path: "(COW)".into(),
                    source,
                })?;
        snap.adopt(durable)?;
        snap.check_mode(durable.num_merge_ops)?;
        // Chunks of the base hold its bytes as they were when read: only while nothing
        // merges (see direct_prefetch.rs).
        if opts.read_prefetch && opts.direct_read_ahead > 0 && !merge_begun(&durable) {
            snap.direct_prefetch = DirectPrefetch::new(&snap.base, bytes, opts.direct_read_ahead);
        }
        Ok(snap)
    }

    /// Permission to use the base's read-ahead chunks for one answer (none when there is no
    /// read-ahead or it was disabled).
    fn lending(&self) -> Option<Lending<'_>> {
        self.direct_prefetch.as_ref()?.lending()
    }

    /// Stop using the base's read-ahead for good (the merge is about to write the base);
    /// returns once no answer made of its bytes is in flight.
    pub(crate) fn stop_direct_prefetch(&self) {
        if let Some(direct) = &self.direct_prefetch {
            direct.disable();
        }
    }

    pub(crate) fn lock_store(&self) -> MutexGuard<'_, Box<dyn ProgressStore>> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn view_read(&self) -> RwLockReadGuard<'_, ReadView> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn view_write(&self) -> RwLockWriteGuard<'_, ReadView> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take `durable` as the position: merged entries, and the saved window when the
    /// scratch state is Done (reads of that window then come from it, never from a base
    /// device that may already hold some of its destinations).
    pub(crate) fn adopt(&self, durable: DurableProgress) -> Result<(), UserSnapshotError> {
        let p = durable.num_merge_ops;
        let total = self.plan.total();
        if p > total {
            return Err(UserSnapshotError::ProgressPastEnd {
                num_merge_ops: p,
                total,
            });
        }
        let mut window = None;
        if self.plan.has_scratch() && p < self.plan.ordered() && durable.state == BufferState::Done
        {
            let saved = self.lock_store().read_window().map_err(|source| {
                UserSnapshotError::MergeState {
                    path: "(COW)".into(),
                    source,
                }
            })?;
            let range = self.plan.window_at(&self.cow, p);
            let expected = range.clone().filter_map(|e| {
                self.plan
                    .op(&self.cow, e)
                    .filter(|(_, op)| op.kind.is_ordered())
                    .map(|(_, op)| op.new_block)
            });
            saved.check_blocks(expected, BLOCK).map_err(|detail| {
                UserSnapshotError::ScratchMismatch {
                    num_merge_ops: p,
                    detail,
                }
            })?;
            let has_slot: Vec<bool> = range
                .clone()
                .map(|e| {
                    self.plan
                        .op(&self.cow, e)
                        .is_some_and(|(_, op)| op.kind.is_ordered())
                })
                .collect();
            log::info!(
                "merge position {p}: the read-ahead window of entries {}..{} is saved in scratch; reads of it come from there",
                range.start,
                range.end
            );
            let data = super::direct_io::AlignedBuf::from_slice(&saved.data);
            window = Some(Arc::new(LoadedWindow::new(
                range,
                has_slot.into_iter(),
                data,
                BLOCK,
            )));
        }
        let mut view = self.view_write();
        view.merged = p;
        view.window = window;
        self.merged.store(p, Ordering::Release);
        if p == total {
            self.set_phase(MergePhase::Complete);
        }
        Ok(())
    }

    /// Refuse progress that the legacy order made (see DESIGN.md, "Mode mismatch"): with
    /// `num_merge_ops` inside the REPLACE/ZERO part, the last entry the user-space order
    /// has merged must hold its new data in the base device.
    fn check_mode(&self, p: u64) -> Result<(), UserSnapshotError> {
        let ordered = self.plan.ordered();
        if p <= ordered || p >= self.plan.total() {
            return Ok(());
        }
        let holds_new_data = |entry: u64| -> Result<bool, UserSnapshotError> {
            let Some((position, op)) = self.plan.op(&self.cow, entry) else {
                return Ok(true);
            };
            let mut want = [0u8; BLOCK];
            let mut have = [0u8; BLOCK];
            for block in op.new_block..op.new_block.saturating_add(op.num_blocks) {
                let wrap = |source| UserSnapshotError::ModeCheck {
                    block,
                    source: Box::new(source),
                };
                self.cow
                    .read_op_block(position, block, &self.source, &mut want)
                    .map_err(|source| {
                        wrap(UserReadError::Produce {
                            block,
                            op_index: op.index,
                            source,
                        })
                    })?;
                self.read_base(block * BLOCK_U64, &mut have).map_err(wrap)?;
                if want != have {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let user_last = p - 1;
        if holds_new_data(user_last)? {
            return Ok(());
        }
        // The legacy order walks the same part from the top: its (p-1)-th entry.
        let legacy_last = self.plan.total() - 1 - (user_last - ordered);
        let legacy_matches = holds_new_data(legacy_last)?;
        let block = self
            .plan
            .op(&self.cow, user_last)
            .map_or(0, |(_, op)| op.new_block);
        Err(UserSnapshotError::ModeMismatch {
            num_merge_ops: p,
            block,
            legacy_matches,
        })
    }

    /// Size of the base device in 512-byte sectors: the `init` reply and the device size.
    pub fn base_sectors(&self) -> u64 {
        self.device_sectors
    }

    /// Merge progress now: merged ops (the durable `num_merge_ops`), total ops, and the
    /// state.
    pub fn progress(&self) -> MergeProgress {
        MergeProgress {
            merged_ops: self.merged.load(Ordering::Acquire),
            total_ops: self.plan.total(),
            state: self.phase(),
        }
    }

    pub(crate) fn phase(&self) -> MergePhase {
        MergePhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub(crate) fn set_phase(&self, phase: MergePhase) {
        self.phase.store(phase.to_u8(), Ordering::Release);
    }

    /// The synchronous engine over this snapshot's source and base files.
    /// Aligned transfers go through `O_DIRECT` descriptors where the options ask for them
    /// ([`UserSnapshot::direct_descriptors`]).
    pub fn sync_io(&self) -> std::io::Result<Box<dyn MergeIo>> {
        Ok(Box::new(
            SyncMergeIo::new(self.source.try_clone()?, self.base.try_clone()?)
                .with_direct(self.direct_descriptors()),
        ))
    }

    /// New `O_DIRECT` descriptors for a merge engine's aligned transfers: of the base
    /// device for destination writes if [`UserSnapshotOptions::merge_o_direct`], of the
    /// source device for window source reads if [`UserSnapshotOptions::merge_direct_reads`];
    /// `None` where not asked for or (logged) where the device refuses `O_DIRECT`. The read
    /// path keeps reading the base buffered: a direct write drops the cached pages of its
    /// range once it completes, before the merge commits those blocks, and until that commit
    /// no reader takes them from the base (DESIGN.md, "Merge I/O").
    pub fn direct_descriptors(&self) -> super::direct_io::DirectDescriptors {
        super::direct_io::DirectDescriptors {
            source: self
                .opts
                .merge_direct_reads
                .then(|| reopen_direct(&self.source, "source", false, "merge I/O"))
                .flatten(),
            base: self
                .opts
                .merge_o_direct
                .then(|| reopen_direct(&self.base, "base", true, "merge I/O"))
                .flatten(),
        }
    }

    /// The source device (read-only).
    pub fn source_file(&self) -> &File {
        &self.source
    }

    /// The base device (read-write).
    pub fn base_file(&self) -> &File {
        &self.base
    }

    /// Answer one request: READ of any sector-aligned range inside the device up to
    /// [`MAX_REQUEST_BYTES`]; WRITE with data is an error (the snapshot is read-only); an
    /// empty WRITE (a flush) and FLUSH succeed; anything else is unsupported.
    pub fn handle(
        &self,
        req: &Request,
        write_payload: &[u8],
        read_out: &mut Vec<u8>,
    ) -> ResponseCode {
        match req.kind {
            DM_USER_REQ_MAP_READ => {
                let result = self.check_range(req.sector, req.len).and_then(|()| {
                    // Bounded by MAX_REQUEST_BYTES. Every path of the read overwrites all
                    // bytes on success; the buffer is cleared on failure.
                    read_out.truncate(req.len as usize);
                    read_out.resize(req.len as usize, 0);
                    self.read_checked(req.sector * SECTOR, read_out)
                });
                let code = self.read_outcome(req, result);
                if code != ResponseCode::Success {
                    read_out.clear();
                }
                code
            }
            DM_USER_REQ_MAP_WRITE if req.len == 0 && write_payload.is_empty() => {
                ResponseCode::Success
            }
            DM_USER_REQ_MAP_FLUSH => ResponseCode::Success,
            DM_USER_REQ_MAP_WRITE => {
                crate::log_limited!(
                    self.request_log,
                    log::Level::Warn,
                    "write of {} bytes at sector {} refused: the snapshot device is read-only",
                    req.len,
                    req.sector
                );
                ResponseCode::Error
            }
            other => {
                crate::log_limited!(
                    self.request_log,
                    log::Level::Warn,
                    "request type {other} at sector {} is not supported",
                    req.sector
                );
                ResponseCode::Unsupported
            }
        }
    }

    /// Fill `out` with the READ `req` (`out` exactly its length) through the read path, in
    /// place: runs of the base are read straight into `out` (with `O_DIRECT` where
    /// [`UserSnapshotOptions::direct_reads`] asks for it and `out` is page-aligned).
    pub fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
        if req.kind != DM_USER_REQ_MAP_READ || req.len != out.len() as u64 {
            crate::log_limited!(
                self.request_log,
                log::Level::Error,
                "request type {} of {} bytes at sector {} given {} bytes to read into; failed",
                req.kind,
                req.len,
                req.sector,
                out.len()
            );
            return ResponseCode::Error;
        }
        let result = self.read(req.sector, out);
        self.read_outcome(req, result)
    }

    /// The answer to the READ `req` whose read ended in `result` (a failure is logged).
    fn read_outcome(&self, req: &Request, result: Result<(), UserReadError>) -> ResponseCode {
        match result {
            Ok(()) => ResponseCode::Success,
            Err(e) => {
                crate::log_limited!(
                    self.request_log,
                    log::Level::Error,
                    "read of {} bytes at sector {} failed: {}",
                    req.len,
                    req.sector,
                    ErrorChain(&e)
                );
                ResponseCode::Error
            }
        }
    }

    /// After the answer to `req` went out (its buffer released): for a READ inside the
    /// device, keep the base's page cache, the COW payloads and the COPY/XOR sources of the
    /// blocks ahead of a sequential reader (see `prefetch.rs`). Transports call it through
    /// [`crate::daemon::transport::RequestHandler::answered`], so the advice neither delays
    /// the answer nor keeps its buffer out of reach of the next request.
    pub fn answered(&self, req: &Request) {
        if req.kind == DM_USER_REQ_MAP_READ && self.check_range(req.sector, req.len).is_ok() {
            self.prefetch_after(req.sector, req.len);
        }
    }

    /// Advise what a sequential reader needs next after a READ of `len` bytes at `sector`.
    fn prefetch_after(&self, sector: u64, len: u64) {
        if !self.opts.read_prefetch {
            return;
        }
        let start = sector.saturating_mul(SECTOR);
        let end = start.saturating_add(len);
        let size = self.device_sectors.saturating_mul(SECTOR);
        let (in_order, advice) = self.prefetch.follow(start, end, size);
        // The base's own read-ahead, when it runs, covers the range right ahead.
        let mut direct_ahead = None;
        if let Some(direct) = self.direct_prefetch.as_ref().filter(|d| d.enabled()) {
            // A request of an in-order reader answered out of order (several in flight)
            // lands near the chunks: keep them.
            if in_order || direct.near(start) {
                direct_ahead = direct.advance(end);
            } else {
                direct.stop();
            }
        }
        let Some((offset, len)) = advice else {
            return;
        };
        // Runs read with O_DIRECT do not use the base's page cache, and the base's own
        // read-ahead reads the whole range as the reader gets there: advising it too would
        // read the disk twice.
        if self.direct_runs.is_none() && direct_ahead.is_none() {
            prefetch::will_need(&self.base, [(offset, len)]);
        }
        // The span of the base's read-ahead when the reader reaches block `b`.
        let span = direct_ahead.map_or(0, |(lo, hi)| hi - lo);
        let served_by_chunks = |b: u64, from: u64, n: u64| {
            let lo = (b * BLOCK_U64) / CHUNK_BYTES as u64 * CHUNK_BYTES as u64;
            direct_ahead.is_some()
                && self.source_is_base
                && from >= lo
                && from.saturating_add(n) <= lo.saturating_add(span)
        };
        let merged = self.merged.load(Ordering::Acquire);
        let (mut payloads, mut sources) = (Vec::new(), Vec::new());
        let mut last = None;
        for block in offset / BLOCK_U64..offset.saturating_add(len).div_ceil(BLOCK_U64) {
            let Some(entry) = self.map.entry(block).filter(|&e| e >= merged) else {
                continue;
            };
            if last == Some(entry) {
                continue;
            }
            last = Some(entry);
            if let Some((_, op)) = self.plan.op(&self.cow, entry) {
                if op.data_length > 0 {
                    payloads.push((op.data_offset, u64::from(op.data_length)));
                }
                // COPY and XOR blocks read their source (wherever it lies) unless a window
                // holds it; an extra advice for those is harmless.
                if op.kind.is_ordered() {
                    if let Some(from) = super::plan::source_offset(op, BLOCK_U64) {
                        let n = op
                            .num_blocks
                            .max(1)
                            .saturating_add(1)
                            .saturating_mul(BLOCK_U64);
                        if !served_by_chunks(block, from, n) {
                            sources.push((from, n));
                        }
                    }
                }
            }
        }
        if self.direct_runs.is_none() {
            prefetch::will_need(&self.source, prefetch::scattered_ranges(sources));
        }
        if let Some(cow_file) = &self.cow_advice {
            prefetch::will_need(cow_file, prefetch::scattered_ranges(payloads));
        }
    }

    fn check_range(&self, sector: u64, len: u64) -> Result<(), UserReadError> {
        let ok = len % SECTOR == 0
            && len <= MAX_REQUEST_BYTES
            && sector
                .checked_add(len / SECTOR)
                .is_some_and(|end| end <= self.device_sectors);
        if ok {
            Ok(())
        } else {
            Err(UserReadError::BadRange {
                sector,
                len,
                device_sectors: self.device_sectors,
                max: MAX_REQUEST_BYTES,
            })
        }
    }

    /// Read `out.len()` bytes (a multiple of 512, at most [`MAX_REQUEST_BYTES`]) at
    /// `sector` through the read path.
    pub fn read(&self, sector: u64, out: &mut [u8]) -> Result<(), UserReadError> {
        self.check_range(sector, out.len() as u64)?;
        self.read_checked(sector * SECTOR, out)
    }

    /// For a READ inside the device whose every block is read from the base device
    /// (unchanged by the COW, or merged): the base device and the byte offset. Such blocks
    /// stay as they are on the base (the merge writes only changed blocks not yet merged),
    /// so the transport may splice the answer from the base's page cache.
    pub fn read_from_file(&self, req: &Request) -> Option<(&File, u64)> {
        if req.kind != DM_USER_REQ_MAP_READ || req.len == 0 {
            return None;
        }
        self.check_range(req.sector, req.len).ok()?;
        let start = req.sector.checked_mul(SECTOR)?;
        let end = start.checked_add(req.len)?;
        let merged = self.merged.load(Ordering::Acquire);
        let from_base = (start / BLOCK_U64..end.div_ceil(BLOCK_U64))
            .all(|block| self.map.entry(block).filter(|&e| e >= merged).is_none());
        from_base.then_some((&self.base, start))
    }

    /// Fill `out` from byte `offset` of the base device: with `O_DIRECT` where
    /// [`UserSnapshotOptions::direct_reads`] asks for it and the run qualifies, else through
    /// the page cache.
    pub(crate) fn read_base(&self, offset: u64, out: &mut [u8]) -> Result<(), UserReadError> {
        self.read_base_lent(None, offset, out)
    }

    /// [`Self::read_base`], taking the bytes that loaded read-ahead chunks hold from there
    /// (`lending`: see `direct_prefetch.rs`).
    fn read_base_lent(
        &self,
        lending: Option<&Lending<'_>>,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), UserReadError> {
        let Some(lending) = lending else {
            return self.read_base_device(offset, out);
        };
        // Bytes no chunk holds, read together: (device offset, start in `out`).
        let mut missed: Option<(u64, usize)> = None;
        for (at, n, lent) in lending.parts(offset, out.len()) {
            let from = (at - offset) as usize;
            match lent {
                Some(lent) => {
                    if let Some((m_at, m_from)) = missed.take() {
                        self.read_base_device(m_at, &mut out[m_from..from])?;
                    }
                    out[from..from + n].copy_from_slice(lent.bytes());
                }
                None => {
                    missed.get_or_insert((at, from));
                }
            }
        }
        if let Some((m_at, m_from)) = missed {
            self.read_base_device(m_at, &mut out[m_from..])?;
        }
        Ok(())
    }

    /// Fill `out` from byte `offset` of the base device itself (see [`Self::read_base`]).
    fn read_base_device(&self, offset: u64, out: &mut [u8]) -> Result<(), UserReadError> {
        let len = out.len() as u64;
        let wrap = |source| UserReadError::Base {
            offset,
            len,
            source,
        };
        if let Some(direct) = &self.direct_runs {
            if direct
                .read_into(RunDevice::Base, out, offset)
                .map_err(wrap)?
            {
                return Ok(());
            }
        }
        std::os::unix::fs::FileExt::read_exact_at(&self.base, out, offset).map_err(wrap)
    }

    /// The read path over a range known to lie inside the device: runs of unchanged and
    /// merged blocks with one `pread` each, other blocks produced in place (whole aligned
    /// blocks) or through one bounce block (the partial blocks at the ends).
    fn read_checked(&self, start: u64, out: &mut [u8]) -> Result<(), UserReadError> {
        // Taken before the view (the order everywhere), held until the bytes are in.
        let lending = self.lending();
        let lending = lending.as_ref();
        let mut bounce: Option<[u8; BLOCK]> = None;
        // Pending run of base bytes: (device offset, start in `out`).
        let mut base_run: Option<(u64, usize)> = None;
        let mut done = 0usize;
        while done < out.len() {
            let pos = start + done as u64;
            let block = pos / BLOCK_U64;
            let in_block = (pos % BLOCK_U64) as usize;
            let take = (BLOCK - in_block).min(out.len() - done);
            let entry = self
                .map
                .entry(block)
                .filter(|&e| e >= self.merged.load(Ordering::Acquire));
            let Some(entry) = entry else {
                base_run.get_or_insert((pos, done));
                done += take;
                continue;
            };
            if let Some((offset, from)) = base_run.take() {
                self.read_base_lent(lending, offset, &mut out[from..done])?;
            }
            if in_block == 0 {
                if let Some(n) = self.produce_whole_op(entry, block, &mut out[done..])? {
                    done += n;
                    continue;
                }
            }
            if in_block == 0 && take == BLOCK {
                self.produce(lending, entry, block, &mut out[done..done + BLOCK])?;
            } else {
                let b = bounce.get_or_insert([0u8; BLOCK]);
                self.produce(lending, entry, block, b)?;
                out[done..done + take].copy_from_slice(&b[in_block..in_block + take]);
            }
            done += take;
        }
        if let Some((offset, from)) = base_run {
            self.read_base_lent(lending, offset, &mut out[from..])?;
        }
        Ok(())
    }

    /// A multi-block REPLACE whose blocks all lie in `out` from its first one: decode it
    /// once, straight into place. Returns the bytes produced, or `None` if it does not
    /// apply.
    fn produce_whole_op(
        &self,
        entry: u64,
        block: u64,
        out: &mut [u8],
    ) -> Result<Option<usize>, UserReadError> {
        let Some((_, op)) = self.plan.op(&self.cow, entry) else {
            return Ok(None);
        };
        if op.kind != OpKind::Replace || op.num_blocks < 2 || op.new_block != block {
            return Ok(None);
        }
        let Some(len) = usize::try_from(op.num_blocks)
            .ok()
            .and_then(|n| n.checked_mul(BLOCK))
            .filter(|&len| len <= out.len())
        else {
            return Ok(None);
        };
        self.cow
            .read_op_data(op, &mut out[..len])
            .map_err(|source| UserReadError::Produce {
                block,
                op_index: op.index,
                source,
            })?;
        Ok(Some(len))
    }

    /// Produce block `block` of unmerged entry `entry` into `out` (one block).
    fn produce(
        &self,
        lending: Option<&Lending<'_>>,
        entry: u64,
        block: u64,
        out: &mut [u8],
    ) -> Result<(), UserReadError> {
        let Some((position, op)) = self.plan.op(&self.cow, entry) else {
            return Err(no_such_entry(entry, block));
        };
        if !op.kind.is_ordered() {
            return self.produce_unordered(position, op, block, out);
        }
        // Held (read mode) until the bytes are in, so the merge cannot write this
        // window's destinations meanwhile.
        let view = self.view_read();
        self.produce_ordered(&view, lending, (entry, position), op, block, out)
    }

    /// Produce block `block` of the REPLACE or ZERO op at `position` into `out`.
    fn produce_unordered(
        &self,
        position: usize,
        op: &CowOp,
        block: u64,
        out: &mut [u8],
    ) -> Result<(), UserReadError> {
        self.cow
            .read_op_block(position, block, &self.source, out)
            .map_err(|source| UserReadError::Produce {
                block,
                op_index: op.index,
                source,
            })
    }

    /// Produce block `block` of the ordered (COPY or XOR) op at `position` into `out`,
    /// following the window state in `view`.
    fn produce_ordered(
        &self,
        view: &ReadView,
        lending: Option<&Lending<'_>>,
        (entry, position): (u64, usize),
        op: &CowOp,
        block: u64,
        out: &mut [u8],
    ) -> Result<(), UserReadError> {
        let wrap = |source| UserReadError::Produce {
            block,
            op_index: op.index,
            source,
        };
        if entry < view.merged {
            return self.read_base(block * BLOCK_U64, out);
        }
        if let Some(window) = view.window.as_ref().filter(|w| w.contains(entry)) {
            let offset = super::plan::source_offset(op, BLOCK_U64).unwrap_or(u64::MAX);
            if let Some(bytes) = window.saved_source(entry) {
                let saved = SavedSource { offset, bytes };
                return self
                    .cow
                    .read_op_block(position, block, &saved, out)
                    .map_err(wrap);
            }
        }
        // Not read ahead yet: the source device (through the base's read-ahead chunks when
        // they are the same device).
        match (&self.source_direct, lending.filter(|_| self.source_is_base)) {
            (Some(direct), _) => self.cow.read_op_block(position, block, direct, out),
            (None, Some(lending)) => {
                let through = ThroughChunks {
                    lending,
                    file: &self.source,
                };
                self.cow.read_op_block(position, block, &through, out)
            }
            (None, None) => self.cow.read_op_block(position, block, &self.source, out),
        }
        .map_err(wrap)
    }

    /// Plan a READ as pieces and hand them to `send` (see
    /// [`crate::daemon::transport::RequestHandler::read_in_pieces`]): unchanged and merged
    /// blocks as runs of the base device, COPY blocks not read ahead yet as runs of the
    /// source device (unless the source is read with `O_DIRECT`), everything else produced
    /// into `produced`. The view is held (read mode) from the plan until `send` returns: no
    /// window is installed or committed meanwhile, so the merge writes none of the blocks
    /// the file pieces name. `None` for what is not a READ inside the device, or when a
    /// block cannot be produced (the normal read then reports it).
    pub fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        if self.opts.whole_reads || req.kind != DM_USER_REQ_MAP_READ || req.len == 0 {
            return None;
        }
        self.check_range(req.sector, req.len).ok()?;
        let start = req.sector.checked_mul(SECTOR)?;
        let len = usize::try_from(req.len).ok()?;
        // Taken before the view (the order everywhere), held until the answer is out.
        let lending = self.lending();
        let view = self.view_read();
        let mut pieces = AnswerPieces::default();
        produced.clear();
        // One allocation for the largest answer, not a growing series of them (each freed
        // step would stay in the worker's malloc arena); untouched capacity costs no memory.
        produced.reserve(len);
        let mut done = 0usize;
        while done < len {
            let pos = start + done as u64;
            let block = pos / BLOCK_U64;
            let in_block = (pos % BLOCK_U64) as usize;
            let take = (BLOCK - in_block).min(len - done);
            let entry = self.map.entry(block).filter(|&e| e >= view.merged);
            let Some(entry) = entry else {
                pieces.file(&self.base, pos, take);
                done += take;
                continue;
            };
            let (position, op) = self.plan.op(&self.cow, entry)?;
            if op.kind == OpKind::Copy
                && op.num_blocks == 1
                && self.source_direct.is_none()
                && !view.window.as_ref().is_some_and(|w| w.contains(entry))
            {
                let from =
                    super::plan::source_offset(op, BLOCK_U64)?.checked_add(in_block as u64)?;
                pieces.file(&self.source, from, take);
                done += take;
                continue;
            }
            let at = produced.len();
            if in_block == 0 && op.kind == OpKind::Replace && op.num_blocks >= 2 {
                if let Some(n) = self.produce_whole_op_into(op, block, len - done, produced) {
                    pieces.produced(at, n);
                    done += n;
                    continue;
                }
            }
            produced.resize(at + BLOCK, 0);
            let out = produced.get_mut(at..at + BLOCK)?;
            let made = if op.kind.is_ordered() {
                self.produce_ordered(&view, lending.as_ref(), (entry, position), op, block, out)
            } else {
                self.produce_unordered(position, op, block, out)
            };
            made.ok()?;
            produced.truncate(at + in_block + take);
            pieces.produced(at + in_block, take);
            done += take;
        }
        // Runs the base's read-ahead holds go out from its chunks.
        let lent = match &lending {
            Some(lending) => self.lend_runs(lending, &pieces.list),
            None => Vec::new(),
        };
        if !lent.is_empty() {
            pieces = with_lent_runs(pieces, &lent);
        }
        if let Some(direct) = &self.direct_runs {
            pieces = self.read_runs_direct(direct, pieces, produced)?;
        }
        let sent = send(&pieces.list, produced);
        drop(view);
        drop(lent);
        drop(lending);
        Some(sent)
    }

    /// For each file piece of `pieces` on the base (or on the source when it is the base),
    /// split where the read-ahead's chunks end: the parts the chunks hold, lent, with the
    /// index of their piece (ascending).
    fn lend_runs(
        &self,
        lending: &Lending<'_>,
        pieces: &[AnswerPiece<'_>],
    ) -> Vec<(usize, u64, Lent)> {
        let mut lent = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let AnswerPiece::File { file, offset, len } = *piece else {
                continue;
            };
            let on_base = std::ptr::eq(file, &self.base)
                || (self.source_is_base && std::ptr::eq(file, &self.source));
            if !on_base {
                continue;
            }
            lent.extend(
                lending
                    .parts(offset, len)
                    .filter_map(|(at, _, l)| Some((i, at, l?))),
            );
        }
        lent
    }

    /// The file pieces of `pieces` that [`DirectRuns`] takes, read with `O_DIRECT` and
    /// appended to `produced` (each becomes a produced piece); the others as they were.
    /// `None` when a direct read fails (the normal read then reports the error).
    fn read_runs_direct<'a>(
        &self,
        direct: &DirectRuns,
        pieces: AnswerPieces<'a>,
        produced: &mut Vec<u8>,
    ) -> Option<AnswerPieces<'a>> {
        let mut out = AnswerPieces::default();
        for piece in pieces.list {
            if let AnswerPiece::File { file, offset, len } = piece {
                let device = if std::ptr::eq(file, &self.base) {
                    Some(RunDevice::Base)
                } else if std::ptr::eq(file, &self.source) {
                    Some(RunDevice::Source)
                } else {
                    None
                };
                if let Some(device) = device {
                    if let Some(start) = direct.append(device, produced, offset, len).ok()? {
                        out.produced(start, len);
                        continue;
                    }
                }
            }
            out.list.push(piece);
        }
        Some(out)
    }

    /// [`Self::produce_whole_op`] appending to `produced`, for a multi-block REPLACE that
    /// starts at `block` and fits in `room` bytes: the bytes appended.
    fn produce_whole_op_into(
        &self,
        op: &CowOp,
        block: u64,
        room: usize,
        produced: &mut Vec<u8>,
    ) -> Option<usize> {
        if op.new_block != block {
            return None;
        }
        let n = usize::try_from(op.num_blocks)
            .ok()?
            .checked_mul(BLOCK)
            .filter(|&n| n <= room)?;
        let at = produced.len();
        produced.resize(at.checked_add(n)?, 0);
        match self.cow.read_op_data(op, produced.get_mut(at..)?) {
            Ok(()) => Some(n),
            Err(_) => {
                produced.truncate(at);
                None
            }
        }
    }
}

/// `pieces` with the parts in `lent` (from [`UserSnapshot::lend_runs`]: piece index, device
/// offset, bytes; ascending) as memory pieces, the rest of each file piece as it was.
fn with_lent_runs<'a>(
    pieces: AnswerPieces<'a>,
    lent: &'a [(usize, u64, Lent)],
) -> AnswerPieces<'a> {
    let mut out = AnswerPieces::default();
    let mut next = lent.iter().peekable();
    for (i, piece) in pieces.list.into_iter().enumerate() {
        let AnswerPiece::File { file, offset, len } = piece else {
            out.list.push(piece);
            continue;
        };
        let end = offset.saturating_add(len as u64);
        let mut at = offset;
        while let Some((_, from, l)) = next.next_if(|(j, _, _)| *j == i) {
            if *from > at {
                out.file(file, at, (*from - at) as usize);
            }
            out.list.push(AnswerPiece::Memory { bytes: l.bytes() });
            at = from.saturating_add(l.bytes().len() as u64);
        }
        if at < end {
            out.file(file, at, (end - at) as usize);
        }
    }
    out
}

/// The pieces of one answer, neighbours joined.
#[derive(Default)]
struct AnswerPieces<'a> {
    list: Vec<AnswerPiece<'a>>,
}

impl<'a> AnswerPieces<'a> {
    fn file(&mut self, file: &'a File, offset: u64, len: usize) {
        if let Some(AnswerPiece::File {
            file: last_file,
            offset: last_offset,
            len: last_len,
        }) = self.list.last_mut()
        {
            if std::ptr::eq(*last_file, file)
                && last_offset.checked_add(*last_len as u64) == Some(offset)
            {
                *last_len += len;
                return;
            }
        }
        self.list.push(AnswerPiece::File { file, offset, len });
    }

    fn produced(&mut self, start: usize, len: usize) {
        if let Some(AnswerPiece::Produced {
            start: last_start,
            len: last_len,
        }) = self.list.last_mut()
        {
            if *last_start + *last_len == start {
                *last_len += len;
                return;
            }
        }
        self.list.push(AnswerPiece::Produced { start, len });
    }
}

/// Whether `durable` shows a merge begun (by any daemon): entries merged, or a read-ahead
/// window saved in scratch.
pub(crate) fn merge_begun(durable: &DurableProgress) -> bool {
    durable.num_merge_ops > 0 || durable.state != BufferState::NotStarted
}

/// Whether `a` and `b` are the same device (or the same file).
fn same_device(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => {
            if a.file_type().is_file() {
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            } else {
                a.rdev() != 0 && a.rdev() == b.rdev()
            }
        }
        _ => false,
    }
}

/// The error for an entry the plan does not know.
fn no_such_entry(entry: u64, block: u64) -> UserReadError {
    UserReadError::Produce {
        block,
        op_index: entry,
        source: cow_format::ReadError::NoSuchOp {
            position: entry as usize,
        },
    }
}

impl crate::daemon::transport::RequestHandler for UserSnapshot {
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> ResponseCode {
        UserSnapshot::handle(self, req, write_payload, read_out)
    }

    fn read_from_file(&self, req: &Request) -> Option<(&File, u64)> {
        UserSnapshot::read_from_file(self, req)
    }

    fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        UserSnapshot::read_in_pieces(self, req, produced, send)
    }

    fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
        UserSnapshot::read_into(self, req, out)
    }

    fn answered(&self, req: &Request) {
        UserSnapshot::answered(self, req);
    }
}
