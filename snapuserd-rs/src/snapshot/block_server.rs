//! Answering dm-user requests on the virtual COW device, independent of the transport.
//!
//! A worker thread reads a request header (and a WRITE payload) from its dm-user channel,
//! calls [`BlockServer::handle`], and only then writes the response header (plus the READ
//! data): success or failure is always decided before anything is sent.
//!
//! * READ: any sector-aligned range inside the device, possibly unaligned to chunks and
//!   spanning several chunks: header chunk, metadata areas (rendered with merged entries
//!   zeroed), data chunks (the op's new-image block via [`BlockSource`]), and zeros for
//!   gaps and metadata chunks past the last area.
//! * WRITE of exactly one metadata chunk: dm-snapshot-merge's write-back, given to the
//!   [`MergeTracker`]; SUCCESS only once the resulting commit is durable.
//! * Empty WRITE (a flush, normally with PREFLUSH): SUCCESS. Every commit is durable before
//!   its WRITE is answered, so nothing is pending.
//! * Any other WRITE: ERROR (the snapshot is read-only). Any other request type: UNSUPPORTED.

mod data_chunks;

use crate::error_chain::ErrorChain;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use thiserror::Error;

use super::exception_store::{
    header_chunk, sector_to_chunk, ChunkKind, ExceptionStore, ExceptionStoreError, SECTOR_SIZE,
};
use super::merge_plan::{MergePlan, PlannedOp, SourceDevice, BLOCK_SIZE, BLOCK_SIZE_U64};
use super::merge_tracker::{
    MergeProgress, MergeStateStore, MergeTracker, MergeTrackerError, Window,
};
use crate::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE};
use crate::log_limit::LogLimit;
use data_chunks::DataChunkIndex;

/// Largest request served (bytes); larger ones are answered with ERROR so a request can
/// never make the daemon allocate without bound.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// Produces the new-image content of one op. `cow_backend::blocks::CowBlockSource` implements
/// it with the COW reader (decompress REPLACE, zero-fill ZERO, COPY and XOR reading source
/// bytes through `source`, which during a merge window serves the saved scratch bytes).
pub trait BlockSource {
    /// Fill `out` (4096 bytes) with the new-image block written by merge-order op
    /// `op_index` (described by `op`).
    fn read_op_block(
        &self,
        op_index: usize,
        op: &PlannedOp,
        source: &dyn SourceDevice,
        out: &mut [u8],
    ) -> io::Result<()>;
}

/// Errors while serving a request (logged; the request is answered with ERROR).
#[derive(Debug, Error)]
pub enum BlockServerError {
    /// Building the exception store failed.
    #[error("building the exception store")]
    Layout(#[from] ExceptionStoreError),
    /// The merge tracker refused or failed.
    #[error("merge tracking")]
    Merge(#[from] MergeTrackerError),
    /// The request range is not sector-granular, too large, or beyond the device.
    #[error("request at sector {sector} of {len} bytes is outside the {device_sectors}-sector device or malformed")]
    BadRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Device size in sectors.
        device_sectors: u64,
    },
    /// Producing an op's data failed.
    #[error("reading data of merge-order op {op_index} (chunk {chunk})")]
    OpRead {
        /// Op index.
        op_index: usize,
        /// Chunk being read.
        chunk: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A write that is neither a metadata-area write nor a flush.
    #[error("write of {len} bytes at sector {sector} is not a metadata-area write")]
    UnsupportedWrite {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The WRITE payload length differs from the header's `len`.
    #[error("write payload of {got} bytes for a request of {len}")]
    PayloadLength {
        /// Payload bytes received.
        got: usize,
        /// Header length.
        len: u64,
    },
    /// A worker panicked while holding the tracker lock.
    #[error("merge tracker lock poisoned")]
    Poisoned,
}

/// Serves the virtual COW device of one snapshot.
#[derive(Debug)]
pub struct BlockServer<B, D, S: MergeStateStore> {
    plan: MergePlan,
    exceptions: ExceptionStore,
    /// Constant-time data-chunk lookup for READs (`None`: use `exceptions.lookup`). Built
    /// from `exceptions`, which never changes after construction; anything that rebuilds
    /// `exceptions` must rebuild this too.
    data_chunks: Option<DataChunkIndex>,
    blocks: B,
    source: D,
    tracker: Mutex<MergeTracker<S>>,
    /// Mirrors the tracker's activation, so requests after the first skip the lock.
    active: AtomicBool,
    /// What READs need of the tracker, published after each change (see `publish`), so that
    /// no READ waits for a metadata write-back's durable commit or window preparation.
    view: RwLock<TrackerView>,
    /// Budget of the log lines failed requests write.
    request_log: LogLimit,
}

/// The tracker state READs use: exceptions still live (metadata areas render `0..live`) and
/// the current read-ahead window.
#[derive(Debug, Clone)]
struct TrackerView {
    live: usize,
    window: Option<Window>,
}

impl TrackerView {
    fn of<S: MergeStateStore>(tracker: &MergeTracker<S>) -> Self {
        Self {
            live: tracker.live(),
            window: tracker.window(),
        }
    }
}

/// Source bytes of one op, as saved in the read-ahead window.
struct WindowSource<'a> {
    base: u64,
    bytes: &'a [u8],
}

impl SourceDevice for WindowSource<'_> {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        let inside = byte_offset
            .checked_sub(self.base)
            .and_then(|rel| usize::try_from(rel).ok())
            .and_then(|rel| self.bytes.get(rel..rel.checked_add(buf.len())?));
        match inside {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::other(format!(
                "source read at {byte_offset} outside the op's saved window bytes at {}",
                self.base
            ))),
        }
    }
}

impl<B: BlockSource, D: SourceDevice, S: MergeStateStore> BlockServer<B, D, S> {
    /// Build the exception store for `plan`, open merge tracking on `store`, and serve.
    pub fn new(plan: MergePlan, blocks: B, source: D, store: S) -> Result<Self, BlockServerError> {
        let exceptions = ExceptionStore::build(&plan)?;
        let tracker = MergeTracker::open(&plan, &exceptions, store)?;
        let view = RwLock::new(TrackerView::of(&tracker));
        let data_chunks = DataChunkIndex::build(&exceptions);
        if data_chunks.is_none() {
            log::warn!("exception chunk ids not strictly increasing: READs use the binary search");
        }
        Ok(BlockServer {
            plan,
            exceptions,
            data_chunks,
            blocks,
            source,
            tracker: Mutex::new(tracker),
            active: AtomicBool::new(false),
            view,
            request_log: LogLimit::new(),
        })
    }

    /// Size of the virtual COW device in sectors (the `init` reply in legacy mode).
    pub fn device_sectors(&self) -> u64 {
        self.exceptions.device_sectors()
    }

    /// The exception layout.
    pub fn exceptions(&self) -> &ExceptionStore {
        &self.exceptions
    }

    /// The merge plan served.
    pub fn plan(&self) -> &MergePlan {
        &self.plan
    }

    fn tracker(&self) -> Result<MutexGuard<'_, MergeTracker<S>>, BlockServerError> {
        self.tracker.lock().map_err(|_| BlockServerError::Poisoned)
    }

    /// Publish what READs need of `tracker` (called with the tracker lock held, after every
    /// change). A READ running meanwhile sees the state before the change: what it would
    /// have seen had it taken the tracker lock before the writer.
    fn publish(&self, tracker: &MergeTracker<S>) {
        let view = TrackerView::of(tracker);
        match self.view.write() {
            Ok(mut g) => *g = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
    }

    fn view(&self) -> RwLockReadGuard<'_, TrackerView> {
        match self.view.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Durable `num_merge_ops` as last committed.
    pub fn committed(&self) -> Result<u64, BlockServerError> {
        Ok(self.tracker()?.committed())
    }

    /// Merge progress in percent (0.0 to 100.0): ops merged by the kernel (committed or
    /// not) over all data ops, as `merge_percent` reports. A COW with no ops is 100% merged.
    pub fn merge_percent(&self) -> Result<f64, BlockServerError> {
        let live = {
            let mut tracker = self.tracker()?;
            tracker.follow_finished_merge(&self.plan);
            self.publish(&tracker);
            tracker.live()
        };
        let total = self.plan.len();
        if total == 0 {
            return Ok(100.0);
        }
        let merged = total - live;
        Ok(merged as f64 * 100.0 / total as f64)
    }

    /// True once every op is merged and durably committed.
    pub fn merge_complete(&self) -> Result<bool, BlockServerError> {
        let mut tracker = self.tracker()?;
        tracker.follow_finished_merge(&self.plan);
        self.publish(&tracker);
        Ok(tracker.live() == 0 && tracker.committed() == self.plan.len() as u64)
    }

    /// Activate merge tracking once (the first dm-user request does it).
    fn activate(&self) -> Result<(), BlockServerError> {
        let mut tracker = self.tracker()?;
        let activated = tracker.activate(&self.plan, &self.source);
        self.publish(&tracker);
        activated?;
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Stop serving and hand back the durable store.
    pub fn into_store(self) -> S {
        let tracker = match self.tracker.into_inner() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        tracker.into_store()
    }

    /// Decide and produce the response to `req`. For READ, `read_out` is resized to
    /// `req.len` and filled; for WRITE, `write_payload` must hold `req.len` bytes.
    ///
    /// The first request activates merge tracking (see [`MergeTracker::activate`]): until
    /// the kernel talks to this daemon, another daemon may still be merging the same COW.
    pub fn handle(
        &self,
        req: &Request,
        write_payload: &[u8],
        read_out: &mut Vec<u8>,
    ) -> ResponseCode {
        if req.kind != DM_USER_REQ_MAP_READ {
            read_out.clear();
        }
        // The first request takes over the merge state; until it succeeds every request fails.
        let active = if self.active.load(Ordering::Acquire) {
            Ok(())
        } else {
            self.activate()
        };
        let result = match (active, req.kind) {
            (Err(e), _) => Err(e),
            (Ok(()), DM_USER_REQ_MAP_READ) => self.serve_read(req, read_out),
            (Ok(()), DM_USER_REQ_MAP_WRITE) => self.serve_write(req, write_payload).map(|_| ()),
            (Ok(()), other) => {
                crate::log_limited!(
                    self.request_log,
                    log::Level::Warn,
                    "dm-user request type {other} at sector {} unsupported",
                    req.sector
                );
                return ResponseCode::Unsupported;
            }
        };
        match result {
            Ok(()) => ResponseCode::Success,
            Err(e) => {
                crate::log_limited!(
                    self.request_log,
                    log::Level::Error,
                    "request {req:?} failed: {chain}",
                    chain = ErrorChain(&e)
                );
                read_out.clear();
                ResponseCode::Error
            }
        }
    }

    fn check_range(&self, sector: u64, len: u64) -> Result<(), BlockServerError> {
        let device_sectors = self.device_sectors();
        let bad = BlockServerError::BadRange {
            sector,
            len,
            device_sectors,
        };
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return Err(bad);
        }
        match sector.checked_add(len / SECTOR_SIZE) {
            Some(end) if end <= device_sectors => Ok(()),
            _ => Err(bad),
        }
    }

    fn serve_read(&self, req: &Request, out: &mut Vec<u8>) -> Result<(), BlockServerError> {
        self.check_range(req.sector, req.len)?;
        // Bounded by MAX_REQUEST_BYTES. A reused buffer keeps its old bytes instead of being
        // zero-filled first: every path of `read` overwrites all of them on success, and
        // `handle` clears the buffer on failure.
        out.truncate(req.len as usize);
        out.resize(req.len as usize, 0);
        self.read_checked(req.sector, out)
    }

    /// Read `out.len()` bytes (a multiple of 512) starting at `sector`.
    pub fn read(&self, sector: u64, out: &mut [u8]) -> Result<(), BlockServerError> {
        self.check_range(sector, out.len() as u64)?;
        self.read_checked(sector, out)
    }

    /// [`read`](Self::read) once the range is known to be inside the device.
    fn read_checked(&self, sector: u64, out: &mut [u8]) -> Result<(), BlockServerError> {
        // The bounce buffer for partial chunks is zeroed only when one is met: whole
        // aligned chunks (every read dm-snapshot makes) never touch it.
        let mut chunk_buf: Option<[u8; BLOCK_SIZE]> = None;
        let mut done = 0usize;
        let (mut chunk, mut offset) = sector_to_chunk(sector);
        while done < out.len() {
            // A whole aligned chunk is produced in place, without the bounce buffer.
            if offset == 0 {
                if let Some(whole) = out
                    .get_mut(done..done + BLOCK_SIZE)
                    .and_then(|s| <&mut [u8; BLOCK_SIZE]>::try_from(s).ok())
                {
                    self.read_chunk(chunk, whole)?;
                    done += BLOCK_SIZE;
                    chunk += 1;
                    continue;
                }
            }
            let chunk_buf = chunk_buf.get_or_insert([0u8; BLOCK_SIZE]);
            self.read_chunk(chunk, chunk_buf)?;
            let take = (BLOCK_SIZE - offset).min(out.len() - done);
            out[done..done + take].copy_from_slice(&chunk_buf[offset..offset + take]);
            done += take;
            offset = 0;
            chunk += 1;
        }
        Ok(())
    }

    /// Produce the full content of chunk `chunk`.
    pub fn read_chunk(
        &self,
        chunk: u64,
        out: &mut [u8; BLOCK_SIZE],
    ) -> Result<(), BlockServerError> {
        // Data chunks (nearly every READ) through the index; the rest through the store.
        let data_op = self
            .data_chunks
            .as_ref()
            .and_then(|index| index.exception(chunk))
            .and_then(|exception| self.exceptions.op_index(exception));
        if let Some(op_index) = data_op {
            return self.read_data_chunk(chunk, op_index, out);
        }
        match self.exceptions.lookup(chunk) {
            ChunkKind::Header => *out = header_chunk(),
            ChunkKind::Metadata { area } => {
                let live = self.view().live;
                self.exceptions.render_area(&self.plan, area, live, out)?;
            }
            ChunkKind::Data { op_index, .. } => self.read_data_chunk(chunk, op_index, out)?,
            ChunkKind::Unmapped => out.fill(0),
        }
        Ok(())
    }

    fn read_data_chunk(
        &self,
        chunk: u64,
        op_index: usize,
        out: &mut [u8; BLOCK_SIZE],
    ) -> Result<(), BlockServerError> {
        let op = self
            .plan
            .op(op_index)
            .copied()
            .ok_or_else(|| BlockServerError::OpRead {
                op_index,
                chunk,
                source: io::Error::other("op index outside the plan"),
            })?;
        if !op.kind.is_ordered() {
            // Windows hold ordered ops only: REPLACE/ZERO never need the tracker lock.
            return self
                .blocks
                .read_op_block(op_index, &op, &self.source, out)
                .map_err(|source| BlockServerError::OpRead {
                    op_index,
                    chunk,
                    source,
                });
        }
        // The view's lock is held only to copy the saved bytes (ops outside the window copy
        // nothing); the tracker itself is not locked, so a write-back in progress does not
        // hold this READ up.
        let saved: Option<[u8; BLOCK_SIZE]> =
            match self
                .view()
                .window
                .as_ref()
                .and_then(|w| w.source_of(op_index))
            {
                Some(bytes) => Some(<[u8; BLOCK_SIZE]>::try_from(bytes).map_err(|_| {
                    BlockServerError::OpRead {
                        op_index,
                        chunk,
                        source: io::Error::other(format!(
                            "saved window bytes are {} bytes, not one block",
                            bytes.len()
                        )),
                    }
                })?),
                None => None,
            };
        let result = match &saved {
            Some(saved) => {
                let window = WindowSource {
                    base: op.source_byte_offset().unwrap_or(0),
                    bytes: saved,
                };
                self.blocks.read_op_block(op_index, &op, &window, out)
            }
            None => self.blocks.read_op_block(op_index, &op, &self.source, out),
        };
        result.map_err(|source| BlockServerError::OpRead {
            op_index,
            chunk,
            source,
        })
    }

    fn serve_write(
        &self,
        req: &Request,
        payload: &[u8],
    ) -> Result<Option<MergeProgress>, BlockServerError> {
        if payload.len() as u64 != req.len {
            return Err(BlockServerError::PayloadLength {
                got: payload.len(),
                len: req.len,
            });
        }
        if req.len == 0 {
            // A flush: every commit is already durable when its write is answered.
            return Ok(None);
        }
        let (chunk, offset) = sector_to_chunk(req.sector);
        let area = match self.exceptions.lookup(chunk) {
            ChunkKind::Metadata { area } if offset == 0 && req.len == BLOCK_SIZE_U64 => area,
            _ => {
                return Err(BlockServerError::UnsupportedWrite {
                    sector: req.sector,
                    len: req.len,
                })
            }
        };
        let mut tracker = self.tracker()?;
        let progress =
            tracker.on_metadata_write(&self.plan, &self.exceptions, area, payload, &self.source);
        self.publish(&tracker);
        let progress = progress?;
        log::debug!("merge progress: {progress:?}");
        Ok(Some(progress))
    }
}

#[cfg(test)]
mod tests {
    use super::super::merge_plan::OpKind;
    use super::super::test_support::{CrashClock, DurableMergeState, InMemoryMergeStore};
    use super::*;
    use crate::dm_user::{DM_USER_REQ_MAP_FLAG_FUA, DM_USER_REQ_MAP_FLAG_PREFLUSH};

    struct Fill;
    impl BlockSource for Fill {
        fn read_op_block(
            &self,
            _: usize,
            op: &PlannedOp,
            source: &dyn SourceDevice,
            out: &mut [u8],
        ) -> io::Result<()> {
            match op.kind {
                OpKind::Copy | OpKind::Xor => {
                    source.read_exact_at(out, op.source_byte_offset().unwrap_or(0))
                }
                OpKind::Zero => {
                    out.fill(0);
                    Ok(())
                }
                OpKind::Replace => {
                    out.fill(op.new_block as u8);
                    Ok(())
                }
            }
        }
    }

    fn server(ops: Vec<PlannedOp>) -> BlockServer<Fill, Vec<u8>, InMemoryMergeStore> {
        let plan = MergePlan::new(ops, 0).unwrap();
        let source: Vec<u8> = (0..32 * BLOCK_SIZE)
            .map(|i| (i / BLOCK_SIZE) as u8 ^ 0x80)
            .collect();
        let store = InMemoryMergeStore::new(DurableMergeState::fresh(0), 0, CrashClock::never());
        BlockServer::new(plan, Fill, source, store).unwrap()
    }

    fn req(kind: u64, flags: u64, sector: u64, len: u64) -> Request {
        Request {
            kind,
            flags,
            sector,
            len,
        }
    }

    /// A store with no interior `Rc`, like the real file-backed one. With a gate, `commit`
    /// reports that it was entered and waits for the test, to hold a write-back inside its
    /// durable commit (with the tracker locked) while READs arrive.
    #[derive(Default)]
    struct ThreadSafeStore {
        num_merge_ops: u64,
        gate: Option<(
            std::sync::mpsc::Sender<()>,
            std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        )>,
    }
    impl MergeStateStore for ThreadSafeStore {
        fn num_merge_ops(&self) -> u64 {
            self.num_merge_ops
        }
        fn scratch_state(&self) -> super::super::merge_tracker::ScratchState {
            super::super::merge_tracker::ScratchState::NotStarted
        }
        fn scratch_capacity_blocks(&self) -> usize {
            0
        }
        fn read_window(&self) -> io::Result<super::super::merge_tracker::ScratchWindow> {
            Ok(Default::default())
        }
        fn commit(&mut self, n: u64) -> io::Result<()> {
            if let Some((entered, gate)) = &self.gate {
                entered.send(()).map_err(io::Error::other)?;
                gate.lock().unwrap().recv().map_err(io::Error::other)?;
            }
            self.num_merge_ops = n;
            Ok(())
        }
        fn commit_window(&mut self, n: u64) -> io::Result<()> {
            self.commit(n)
        }
        fn write_window(
            &mut self,
            _: &super::super::merge_tracker::ScratchWindow,
        ) -> io::Result<()> {
            Ok(())
        }
        fn reload(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_do_not_wait_for_a_write_back_in_its_durable_commit() {
        use super::super::exception_store::{area_chunk, CHUNK_SECTORS};
        use std::sync::{mpsc, Arc};
        use std::time::Duration;
        let plan = MergePlan::new(
            vec![
                PlannedOp::copy(9, 3),
                PlannedOp::replace(4),
                PlannedOp::zero(5),
            ],
            0,
        )
        .unwrap();
        let source: Vec<u8> = vec![7u8; 16 * BLOCK_SIZE];
        let (entered_tx, entered) = mpsc::channel();
        let (release, gate) = mpsc::channel();
        let store = ThreadSafeStore {
            num_merge_ops: 0,
            gate: Some((entered_tx, std::sync::Mutex::new(gate))),
        };
        let server = Arc::new(BlockServer::new(plan, Fill, source, store).unwrap());
        let area_sector = area_chunk(0) * CHUNK_SECTORS;
        let mut before = Vec::new();
        let whole = req(0, 0, 0, server.device_sectors() * 512);
        assert_eq!(
            server.handle(&whole, &[], &mut before),
            ResponseCode::Success
        );
        let mut area = Vec::new();
        let read_area = req(0, 0, area_sector, BLOCK_SIZE_U64);
        assert_eq!(
            server.handle(&read_area, &[], &mut area),
            ResponseCode::Success
        );
        // dm-snapshot-merge merged the last exception: its entry is zeroed and written back.
        let live = server.exceptions().num_exceptions();
        area[(live - 1) * 16..live * 16].fill(0);
        let writer = {
            let (s, payload) = (Arc::clone(&server), area.clone());
            let write = req(
                1,
                DM_USER_REQ_MAP_FLAG_PREFLUSH | DM_USER_REQ_MAP_FLAG_FUA,
                area_sector,
                BLOCK_SIZE_U64,
            );
            std::thread::spawn(move || s.handle(&write, &payload, &mut Vec::new()))
        };
        entered.recv().unwrap();
        // The write-back now sits in its commit, the tracker locked. READs go on, and see
        // the state before it: the entry is still live.
        let (done_tx, done) = mpsc::channel();
        let reader = {
            let s = Arc::clone(&server);
            std::thread::spawn(move || {
                let (mut all, mut area) = (Vec::new(), Vec::new());
                let a = s.handle(&whole, &[], &mut all);
                let b = s.handle(&read_area, &[], &mut area);
                done_tx.send((a, all, b, area)).unwrap();
            })
        };
        let during = done.recv_timeout(Duration::from_secs(120));
        release.send(()).unwrap();
        let (a, all, b, area_during) = during.expect("READs waited for the write-back's commit");
        assert_eq!((a, b), (ResponseCode::Success, ResponseCode::Success));
        assert_eq!(all, before);
        assert_ne!(&area_during[(live - 1) * 16..live * 16], &[0u8; 16]);
        reader.join().unwrap();
        assert_eq!(writer.join().unwrap(), ResponseCode::Success);
        // Once answered, the write-back is visible to READs.
        let mut after = Vec::new();
        assert_eq!(
            server.handle(&read_area, &[], &mut after),
            ResponseCode::Success
        );
        assert_eq!(after, area);
    }

    #[test]
    fn server_can_be_shared_by_worker_threads() {
        fn assert_sync_send<T: Sync + Send>(_: &T) {}
        let plan = MergePlan::new(vec![PlannedOp::copy(1, 2), PlannedOp::zero(3)], 0).unwrap();
        let source: Vec<u8> = vec![5u8; 8 * BLOCK_SIZE];
        let server = BlockServer::new(plan, Fill, source, ThreadSafeStore::default()).unwrap();
        assert_sync_send(&server);
        let server = std::sync::Arc::new(server);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = std::sync::Arc::clone(&server);
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let status = s.handle(&req(0, 0, 0, s.device_sectors() * 512), &[], &mut out);
                    (status, out)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (status, out) in &results {
            assert_eq!(*status, ResponseCode::Success);
            assert_eq!(out, &results[0].1);
        }
    }

    #[test]
    fn unaligned_multi_chunk_reads_match_chunk_reads() {
        let s = server(vec![
            PlannedOp::copy(9, 3),
            PlannedOp::replace(4),
            PlannedOp::replace(5),
        ]);
        let sectors = s.device_sectors();
        let mut whole = Vec::new();
        assert_eq!(
            s.handle(&req(0, 0, 0, sectors * 512), &[], &mut whole),
            ResponseCode::Success
        );
        let mut piece = Vec::new();
        for (sector, len) in [
            (3u64, 512u64),
            (7, 1024),
            (15, 4096 + 1536),
            (1, sectors * 512 - 512),
        ] {
            assert_eq!(
                s.handle(&req(0, 0, sector, len), &[], &mut piece),
                ResponseCode::Success
            );
            let at = (sector * 512) as usize;
            assert_eq!(
                &piece[..],
                &whole[at..at + len as usize],
                "sector {sector} len {len}"
            );
        }
        // Header and data content.
        assert_eq!(&whole[0..4], &0x7041_6e53u32.to_le_bytes());
        let chunk = s.exceptions().new_chunk(2).unwrap() as usize; // op 0: copy 9 <- 3
        assert!(whole[chunk * BLOCK_SIZE..(chunk + 1) * BLOCK_SIZE]
            .iter()
            .all(|&b| b == 3 ^ 0x80));
    }

    #[test]
    fn bad_requests_are_answered_not_dropped() {
        let s = server(vec![PlannedOp::zero(1)]);
        let mut out = Vec::new();
        let end = s.device_sectors();
        assert_eq!(
            s.handle(&req(0, 0, end, 512), &[], &mut out),
            ResponseCode::Error
        );
        assert_eq!(
            s.handle(&req(0, 0, 0, 100), &[], &mut out),
            ResponseCode::Error
        );
        assert_eq!(
            s.handle(&req(0, 0, u64::MAX, 512), &[], &mut out),
            ResponseCode::Error
        );
        assert_eq!(
            s.handle(&req(0, 0, 0, MAX_REQUEST_BYTES + 512), &[], &mut out),
            ResponseCode::Error
        );
        assert!(out.is_empty());
        assert_eq!(
            s.handle(&req(3, 0, 0, 4096), &[], &mut out),
            ResponseCode::Unsupported
        );
        assert_eq!(
            s.handle(&req(2, 0, 0, 0), &[], &mut out),
            ResponseCode::Unsupported
        );
        // Empty flush.
        assert_eq!(
            s.handle(&req(1, DM_USER_REQ_MAP_FLAG_PREFLUSH, 0, 0), &[], &mut out),
            ResponseCode::Success
        );
        // Writes to data or header chunks, unaligned or short metadata writes.
        let data = vec![0u8; 4096];
        assert_eq!(
            s.handle(&req(1, 0, 16, 4096), &data, &mut out),
            ResponseCode::Error
        );
        assert_eq!(
            s.handle(&req(1, 0, 0, 4096), &data, &mut out),
            ResponseCode::Error
        );
        assert_eq!(
            s.handle(&req(1, 0, 9, 4096), &data, &mut out),
            ResponseCode::Error
        );
        assert_eq!(
            s.handle(&req(1, 0, 8, 4096), &data[..512], &mut out),
            ResponseCode::Error
        );
        assert_eq!(s.merge_percent().unwrap(), 0.0);
        assert!(!s.merge_complete().unwrap());
        // A correct merge write of the only exception.
        assert_eq!(
            s.handle(
                &req(
                    1,
                    DM_USER_REQ_MAP_FLAG_PREFLUSH | DM_USER_REQ_MAP_FLAG_FUA,
                    8,
                    4096
                ),
                &data,
                &mut out
            ),
            ResponseCode::Success
        );
        assert_eq!(s.committed().unwrap(), 1);
        assert_eq!(s.merge_percent().unwrap(), 100.0);
        assert!(s.merge_complete().unwrap());
        // The area now reads as all zeros.
        assert_eq!(
            s.handle(&req(0, 0, 8, 4096), &[], &mut out),
            ResponseCode::Success
        );
        assert!(out.iter().all(|&b| b == 0));
    }
}
