//! The handler registry: one handler per dm-user misc name, driven by the control commands.
//!
//! A handler runs in one of two modes, chosen per handler as AOSP chooses:
//!
//! * **user-space merge** (Android 13+; the 5-field `init,<misc>,<cow>,<source>,<base>`):
//!   the dm-user device is the partition, and the daemon merges. `initiate_merge` queues the
//!   handler on the [`MergeMonitor`]; `getstatus` and `merge_percent` report the COW's
//!   progress and the monitor's view (queued, running, failed);
//! * **legacy dm-snapshot** (the 4-field `init`): the dm-user device is the virtual COW
//!   device of a dm-snapshot, the kernel drives the merge, so `initiate_merge` only records
//!   the request; `getstatus` and `merge_percent` report what the snapshot core has seen of
//!   the kernel's merge.
//!
//! A daemon started with `-user_snapshot` serves the user-space-merge mode only: a 4-field
//! `init` there is answered `fail` with a log line saying what to do.
//!
//! `init` opens the snapshot; `start` spawns its workers and, where it applies, a
//! verification pass; `delete` stops the merge at a safe point and joins everything.
//!
//! The registry lock is never held across slow work (opening a COW, opening dm-user
//! channels, joining threads, waiting for verification), so the control loop, which calls
//! the quick commands directly, is never stalled by a slow one running on a job thread.

use crate::error_chain::ErrorChain;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::daemon::control_protocol::{MergeStatus, Reply};

use thiserror::Error;

use crate::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_WRITE};
use crate::snapshot::merge_plan::BLOCK_SIZE_U64;

use super::events::Notifier;
use super::merge_monitor::{
    lower_thread_priority, MergeMonitor, MergeRunPhase, UserMerge, DEFAULT_MERGE_THREADS,
};
use super::transport::{ChannelOpener, EndHook, RequestHandler, WorkerGroup, Workers};
use super::update_verify::VerifyDevices;
use super::user_target::{UserMergeTarget, UserTargetOpener};
use crate::ublk::{UblkDevice, UblkOptions};

/// How long `update-verify` waits for each handler's verification (AOSP's 10 s).
pub const VERIFY_WAIT: Duration = Duration::from_secs(10);

/// The cause of a [`TargetError`]: whatever the snapshot's backend failed with.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of a served snapshot, as the registry sees them.
#[derive(Debug, Error)]
pub enum TargetError {
    /// Opening the snapshot failed.
    #[error("opening COW {cow} over source {source_path}")]
    Open {
        /// The COW file or device.
        cow: PathBuf,
        /// The source image or device.
        source_path: PathBuf,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The merge progress could not be read.
    #[error("reading the merge progress")]
    Progress(#[source] BackendError),
    /// A block could not be read during the verification pass.
    #[error("verification: reading block {block} of {blocks}")]
    VerifyRead {
        /// The block.
        block: u64,
        /// Blocks in the device.
        blocks: u64,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The verification pass was stopped before its end.
    #[error("verification stopped after {block} of {blocks} blocks")]
    VerifyStopped {
        /// Blocks read.
        block: u64,
        /// Blocks in the device.
        blocks: u64,
    },
    /// The device to verify could not be opened, sized or read.
    #[error("verification of {device}")]
    VerifyDevice {
        /// The device.
        device: PathBuf,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// A user-space-merge snapshot could not be opened.
    #[error("opening COW {cow} over source {source_path}, merging into {base}")]
    OpenUser {
        /// The COW file or device.
        cow: PathBuf,
        /// The source image or device.
        source_path: PathBuf,
        /// The base device.
        base: PathBuf,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The merge failed.
    #[error("merge")]
    Merge(#[source] BackendError),
}

/// A served snapshot, as the registry needs it.
pub trait SnapshotTarget: RequestHandler {
    /// Size of the virtual COW device in 512-byte sectors (the `init` reply).
    fn device_sectors(&self) -> u64;
    /// Merge progress in percent.
    fn merge_percent(&self) -> Result<f64, TargetError>;
    /// True once the merge is complete and durable.
    fn merge_complete(&self) -> Result<bool, TargetError>;
    /// Read every block of the device through the serving read path, stopping early when
    /// `stop` is set; the number of blocks read, or the first read error.
    fn verify(&self, stop: &AtomicBool) -> Result<u64, TargetError>;
}

/// Opens a snapshot from its COW and source paths.
pub trait SnapshotOpener: Send + Sync {
    /// Open the COW at `cow` over the source at `source`.
    fn open(&self, cow: &Path, source: &Path) -> Result<Arc<dyn SnapshotTarget>, TargetError>;
}

mod cow_files {
    use super::*;
    use crate::cow_backend::{source_file::FileSource, CowSnapshot};
    use crate::snapshot::merge_plan::BLOCK_SIZE;

    impl RequestHandler for CowSnapshot<FileSource> {
        fn handle(
            &self,
            req: &Request,
            write_payload: &[u8],
            read_out: &mut Vec<u8>,
        ) -> ResponseCode {
            self.server().handle(req, write_payload, read_out)
        }
    }

    impl SnapshotTarget for CowSnapshot<FileSource> {
        fn device_sectors(&self) -> u64 {
            CowSnapshot::device_sectors(self)
        }
        fn merge_percent(&self) -> Result<f64, TargetError> {
            self.server()
                .merge_percent()
                .map_err(|e| TargetError::Progress(e.into()))
        }
        fn merge_complete(&self) -> Result<bool, TargetError> {
            self.server()
                .merge_complete()
                .map_err(|e| TargetError::Progress(e.into()))
        }
        /// Every chunk of the virtual COW device, as dm-snapshot would read it: the header,
        /// every metadata area, and every data chunk (the new content of every COW op:
        /// REPLACE decompressed, COPY/XOR read from the source).
        ///
        /// Like AOSP, a snapshot whose merge has already committed progress is not verified
        /// again (it was verified on the boot that started the merge, and reading it now
        /// would only slow the merge down): the pass succeeds having read nothing.
        fn verify(&self, stop: &AtomicBool) -> Result<u64, TargetError> {
            let server = self.server();
            let committed = server
                .committed()
                .map_err(|e| TargetError::Progress(e.into()))?;
            if committed > 0 {
                log::info!(
                    "{}: merge in progress ({committed} ops merged), verification skipped",
                    self.cow_path().display()
                );
                return Ok(0);
            }
            let chunks = server.exceptions().device_chunks();
            let mut block = [0u8; BLOCK_SIZE];
            for chunk in 0..chunks {
                if stop.load(Ordering::Relaxed) {
                    return Err(TargetError::VerifyStopped {
                        block: chunk,
                        blocks: chunks,
                    });
                }
                server
                    .read_chunk(chunk, &mut block)
                    .map_err(|e| TargetError::VerifyRead {
                        block: chunk,
                        blocks: chunks,
                        source: e.into(),
                    })?;
            }
            Ok(chunks)
        }
    }

    /// Opens COW files and source images or devices with [`CowSnapshot::open`].
    #[derive(Debug, Default, Clone, Copy)]
    pub struct CowFileOpener;

    impl SnapshotOpener for CowFileOpener {
        fn open(&self, cow: &Path, source: &Path) -> Result<Arc<dyn SnapshotTarget>, TargetError> {
            CowSnapshot::open(cow, source)
                .map(|s| Arc::new(s) as Arc<dyn SnapshotTarget>)
                .map_err(|e| TargetError::Open {
                    cow: cow.to_path_buf(),
                    source_path: source.to_path_buf(),
                    source: e.into(),
                })
        }
    }
}
pub use cow_files::CowFileOpener;

/// The daemon-wide merge pause (`pause_merge` / `resume_merge`).
///
/// In the legacy design the kernel's snapshot-merge target drives the merge, one metadata
/// write-back (a 4 KiB WRITE of an exception area) at a time; it waits for each to be
/// answered. While paused, every handler holds those write-backs unanswered, so the kernel's
/// merge makes no progress while reads of the snapshots are still served. Resuming wakes
/// every worker group, which then answers what it held.
#[derive(Default)]
struct MergePause {
    paused: AtomicBool,
    groups: Mutex<Vec<Weak<WorkerGroup>>>,
}

impl MergePause {
    fn set(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        if !paused {
            let mut groups = lock(&self.groups);
            groups.retain(|g| match g.upgrade() {
                Some(group) => {
                    group.wake();
                    true
                }
                None => false,
            });
        }
    }

    /// Wake `group` on every resume (until its workers are gone).
    fn register(&self, group: &Arc<WorkerGroup>) {
        let mut groups = lock(&self.groups);
        groups.retain(|g| g.strong_count() > 0);
        groups.push(Arc::downgrade(group));
    }

    /// True if `req` is a metadata write-back that must wait for the resume.
    fn holds(&self, req: &Request) -> bool {
        req.kind == DM_USER_REQ_MAP_WRITE
            && req.len == BLOCK_SIZE_U64
            && self.paused.load(Ordering::Acquire)
    }
}

/// A snapshot as its workers serve it: the snapshot decides, the merge pause holds.
struct PausableTarget {
    target: Arc<dyn SnapshotTarget>,
    pause: Arc<MergePause>,
}

impl RequestHandler for PausableTarget {
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> ResponseCode {
        self.target.handle(req, write_payload, read_out)
    }

    fn hold(&self, req: &Request) -> bool {
        self.pause.holds(req)
    }

    fn read_from_file(&self, req: &Request) -> Option<(&std::fs::File, u64)> {
        self.target.read_from_file(req)
    }

    fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[crate::dm_user::AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        self.target.read_in_pieces(req, produced, send)
    }

    fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
        self.target.read_into(req, out)
    }

    fn answered(&self, req: &Request) {
        self.target.answered(req);
    }
}

/// Result of a handler's verification pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VerifyState {
    Pending,
    Passed,
    Failed,
    /// Not verified by this daemon (see [`HandlerRegistry::init_user`]).
    Skipped,
}

/// One handler's verification pass: its state, and the thread running it.
struct Verification {
    state: Mutex<VerifyState>,
    done: Condvar,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Verification {
    fn new() -> Self {
        Self {
            state: Mutex::new(VerifyState::Pending),
            done: Condvar::new(),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        }
    }

    fn set(&self, state: VerifyState) {
        *lock(&self.state) = state;
        self.done.notify_all();
    }

    /// Wait up to `limit` for the pass to end; true if it passed.
    fn wait(&self, limit: Duration) -> bool {
        // A limit too large for the clock means no limit.
        let deadline = Instant::now().checked_add(limit);
        let mut state = lock(&self.state);
        while *state == VerifyState::Pending {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => left,
                    None => return false,
                },
                None => Duration::from_secs(3600),
            };
            state = match self.done.wait_timeout(state, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        *state == VerifyState::Passed
    }

    /// Stop the pass and wait for its thread.
    fn stop_and_join(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = lock(&self.thread).take() {
            if t.join().is_err() {
                log::error!("a verification thread panicked");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        // Nothing in the critical sections can leave the data inconsistent.
        Err(poisoned) => poisoned.into_inner(),
    }
}

enum Lifecycle {
    /// Registered by `init`, not started.
    Idle,
    /// A `start` is opening channels.
    Starting,
    /// Serving its device.
    Running(Serving),
}

/// What serves a started handler's device.
enum Serving {
    /// dm-user workers.
    DmUser(Workers),
    /// A ublk device (user-space-merge handlers under `-ublk`).
    Ublk(Box<UblkDevice>),
}

impl Serving {
    /// True once nothing serves the device any more.
    fn all_finished(&self) -> bool {
        match self {
            Serving::DmUser(w) => w.all_finished(),
            Serving::Ublk(d) => d.queues_finished(),
        }
    }

    /// Ask the dm-user workers to stop. A ublk device is left served: when this process
    /// ends, the kernel parks its I/O for the next daemon ([`UblkDevice::serve`]).
    fn request_stop(&self) {
        if let Serving::DmUser(w) = self {
            w.request_stop();
        }
    }

    /// Stop and join the dm-user workers; a ublk device stays (see `request_stop`).
    fn stop_and_join(&mut self) {
        match self {
            Serving::DmUser(w) => {
                w.stop_and_join();
            }
            Serving::Ublk(d) => log::info!(
                "ublk device {} stays for the next daemon (its I/O waits until one re-attaches)",
                d.dev_id()
            ),
        }
    }

    /// Remove what serves the device for good (`delete`).
    fn remove(self) {
        match self {
            Serving::DmUser(mut w) => {
                w.stop_and_join();
            }
            Serving::Ublk(d) => {
                let dev_id = d.dev_id();
                if let Err(e) = d.remove() {
                    log::error!(
                        "deleting ublk device {dev_id}: {chain}; remove it by hand (DEL_DEV)",
                        chain = ErrorChain(&e)
                    );
                }
            }
        }
    }
}

struct Handler {
    target: Arc<dyn SnapshotTarget>,
    /// The merge of a user-space-merge handler (none for a legacy one).
    user: Option<Arc<UserMerge>>,
    /// Whether `start` runs a verification pass.
    verify_on_start: bool,
    lifecycle: Lifecycle,
    merge_requested: bool,
    worker_count: u32,
    verification: Arc<Verification>,
}

#[derive(Default)]
struct State {
    handlers: HashMap<String, Handler>,
    /// Handlers deleted after their merge completed (they count as 100% in `merge_percent`).
    completed_deleted: u64,
    /// Set by [`HandlerRegistry::shut_down`]: nothing new starts.
    closed: bool,
}

/// All handlers of the daemon.
pub struct HandlerRegistry {
    snapshots: Box<dyn SnapshotOpener>,
    user_snapshots: Option<Box<dyn UserTargetOpener>>,
    user_snapshot_only: bool,
    ublk: Option<UblkOptions>,
    merges: Arc<MergeMonitor>,
    verify_devices: VerifyDevices,
    channels: Box<dyn ChannelOpener>,
    worker_count: AtomicU32,
    merge_pause: Arc<MergePause>,
    worker_exits: Mutex<Option<Notifier>>,
    verify_wait: Duration,
    state: Mutex<State>,
}

impl HandlerRegistry {
    /// A registry opening snapshots with `snapshots` and dm-user channels with `channels`,
    /// `worker_count` workers for each handler registered from now on.
    pub fn new(
        snapshots: Box<dyn SnapshotOpener>,
        channels: Box<dyn ChannelOpener>,
        worker_count: u32,
    ) -> Self {
        Self {
            snapshots,
            user_snapshots: None,
            user_snapshot_only: false,
            ublk: None,
            merges: Arc::new(MergeMonitor::new(DEFAULT_MERGE_THREADS, true)),
            verify_devices: VerifyDevices::default(),
            channels,
            worker_count: AtomicU32::new(worker_count.max(1)),
            merge_pause: Arc::default(),
            worker_exits: Mutex::new(None),
            verify_wait: VERIFY_WAIT,
            state: Mutex::new(State::default()),
        }
    }

    /// The same registry with `update-verify` waiting at most `limit` per handler.
    pub fn with_verify_wait(mut self, limit: Duration) -> Self {
        self.verify_wait = limit;
        self
    }

    /// The same registry serving 5-field `init`s (user-space merge) with `opener`.
    pub fn with_user_snapshots(mut self, opener: Box<dyn UserTargetOpener>) -> Self {
        self.user_snapshots = Some(opener);
        self
    }

    /// The same registry serving user-space-merge handlers as ublk devices shaped by `opts`
    /// (`-ublk`; `None`: dm-user). The queue count follows the worker count.
    pub fn with_ublk(mut self, opts: Option<UblkOptions>) -> Self {
        self.ublk = opts;
        self
    }

    /// The same registry refusing legacy (4-field) `init`s (`-user_snapshot`).
    pub fn with_user_snapshot_only(mut self, only: bool) -> Self {
        self.user_snapshot_only = only;
        self
    }

    /// The same registry running at most `threads` merges at once, over io_uring when
    /// `io_uring` (else the synchronous engine).
    pub fn with_merge_threads(mut self, threads: u32, io_uring: bool) -> Self {
        self.merges = Arc::new(MergeMonitor::new(threads, io_uring));
        self
    }

    /// The same registry finding the devices `update-verify` reads with `devices`.
    pub fn with_verify_devices(mut self, devices: VerifyDevices) -> Self {
        self.verify_devices = devices;
        self
    }

    /// Wake `notifier` whenever a worker of a handler started from now on ends (for loops
    /// waiting on [`all_workers_finished`](Self::all_workers_finished)).
    pub fn notify_worker_exits(&self, notifier: Notifier) {
        *lock(&self.worker_exits) = Some(notifier);
    }

    /// Workers per handler for handlers registered from now on. AOSP uses 1 once the
    /// daemon serves a control socket (from the start, or after the handoff).
    pub fn set_worker_count(&self, count: u32) {
        self.worker_count.store(count.max(1), Ordering::Release);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// `init` in the legacy form (4 fields): open the dm-snapshot COW and register it;
    /// replies with the virtual COW device's size in sectors.
    pub fn init(&self, misc: &str, cow: &str, source: &str) -> Reply {
        if self.user_snapshot_only {
            log::error!(
                "init {misc}: this daemon runs user-space snapshots (-user_snapshot), whose \
                 init has 5 fields: init,<misc>,<cow>,<source>,<base>; send the base device \
                 too, or run the daemon without -user_snapshot for a legacy dm-snapshot \
                 handler"
            );
            return Reply::Fail;
        }
        if !self.name_is_free(misc) {
            return Reply::Fail;
        }
        let target = match self.snapshots.open(Path::new(cow), Path::new(source)) {
            Ok(t) => t,
            Err(e) => {
                log::error!("init {misc}: {chain}", chain = ErrorChain(&e));
                return Reply::Fail;
            }
        };
        log::info!("init {misc}: legacy dm-snapshot mode, cow {cow}, source {source}");
        self.register(misc, target, None, true)
    }

    /// `init` with 5 fields: open a user-space-merge snapshot (the device is the partition,
    /// the daemon merges into `base`) and register it; replies with the base device's size
    /// in sectors (`fail` for 0). `verify`: run the update verification after `start` (the
    /// transitioned daemon's handlers; AOSP skips `-init` names, and skips it when a merge
    /// is being resumed).
    pub fn init_user(
        &self,
        misc: &str,
        cow: &str,
        source: &str,
        base: &str,
        verify: bool,
    ) -> Reply {
        let Some(opener) = &self.user_snapshots else {
            log::error!(
                "init {misc}: this daemon has no user-space-merge support; send the legacy \
                 4-field init,<misc>,<cow>,<source>"
            );
            return Reply::Fail;
        };
        if !self.name_is_free(misc) {
            return Reply::Fail;
        }
        let user = match opener.open(Path::new(cow), Path::new(source), Path::new(base)) {
            Ok(t) => t,
            Err(e) => {
                log::error!("init {misc}: {chain}", chain = ErrorChain(&e));
                return Reply::Fail;
            }
        };
        let verify = verify && !misc.ends_with("-init");
        let target: Arc<dyn SnapshotTarget> = Arc::new(UserServing {
            misc: misc.to_string(),
            target: Arc::clone(&user),
            devices: self.verify_devices.clone(),
        });
        let merge = UserMerge::new(misc, user);
        log::info!(
            "init {misc}: user-space-merge mode, cow {cow}, source {source}, base {base}{}",
            if verify {
                ""
            } else {
                ", no update verification"
            }
        );
        self.register(misc, target, Some(merge), verify)
    }

    /// `init` as the control socket received it: 5 fields (with `base`) are a user-space
    /// merge handler, 4 a legacy one.
    pub fn init_from_command(
        &self,
        misc: &str,
        cow: &str,
        source: &str,
        base: Option<&str>,
    ) -> Reply {
        match base {
            Some(base) => self.init_user(misc, cow, source, base, false),
            None => self.init(misc, cow, source),
        }
    }

    fn name_is_free(&self, misc: &str) -> bool {
        let state = self.state();
        if state.closed || state.handlers.contains_key(misc) {
            log::error!("init {misc}: a handler with that name exists, or shutting down");
            return false;
        }
        true
    }

    fn register(
        &self,
        misc: &str,
        target: Arc<dyn SnapshotTarget>,
        user: Option<Arc<UserMerge>>,
        verify_on_start: bool,
    ) -> Reply {
        let sectors = target.device_sectors();
        if sectors == 0 {
            log::error!("init {misc}: the snapshot device would be empty");
            return Reply::Fail;
        }
        let mut state = self.state();
        if state.closed || state.handlers.contains_key(misc) {
            log::error!("init {misc}: a handler with that name exists, or shutting down");
            return Reply::Fail;
        }
        state.handlers.insert(
            misc.to_string(),
            Handler {
                target,
                user,
                verify_on_start,
                lifecycle: Lifecycle::Idle,
                merge_requested: false,
                worker_count: self.worker_count.load(Ordering::Acquire),
                verification: Arc::new(Verification::new()),
            },
        );
        log::info!("init {misc}: {sectors} sectors");
        Reply::SuccessSectors(sectors)
    }

    /// `start`: spawn the handler's workers, then its verification pass (where it applies).
    /// Fails if it is unknown, already started (or starting), or its device cannot be
    /// opened. When every worker of a user-space-merge handler has ended (its device is
    /// gone), its merge is stopped at the next safe point.
    pub fn start(&self, misc: &str) -> Reply {
        let (target, user, count, verification, verify) = {
            let mut state = self.state();
            let closed = state.closed;
            let Some(handler) = state.handlers.get_mut(misc) else {
                log::error!("start {misc}: no such handler");
                return Reply::Fail;
            };
            if closed || !matches!(handler.lifecycle, Lifecycle::Idle) {
                log::error!("start {misc}: already started, or shutting down");
                return Reply::Fail;
            }
            handler.lifecycle = Lifecycle::Starting;
            // A fresh pass for every start (a stopped one may have ended early).
            handler.verification = Arc::new(Verification::new());
            (
                Arc::clone(&handler.target),
                handler.user.clone(),
                handler.worker_count,
                Arc::clone(&handler.verification),
                handler.verify_on_start,
            )
        };
        // Opening the channels may wait for the device node: no lock held.
        let serving: Arc<dyn RequestHandler> = Arc::new(PausableTarget {
            target: Arc::clone(&target),
            pause: Arc::clone(&self.merge_pause),
        });
        let on_exit = lock(&self.worker_exits).clone();
        let on_end: Option<EndHook> = user.as_ref().map(|m| {
            let merges = Arc::clone(&self.merges);
            let m = Arc::clone(m);
            let name = misc.to_string();
            Arc::new(move || {
                log::info!("{name}: every worker ended (device gone); stopping its merge");
                merges.request_stop(&m);
            }) as EndHook
        });
        let spawned: Result<Serving, String> = match (&self.ublk, &user) {
            (Some(opts), Some(_)) => {
                let opts = UblkOptions {
                    queues: u16::try_from(count).unwrap_or(u16::MAX),
                    ..opts.clone()
                };
                UblkDevice::serve(serving, misc, target.device_sectors(), &opts)
                    .map(|d| Serving::Ublk(Box::new(d)))
                    .map_err(|e| ErrorChain(&e).to_string())
            }
            _ => Workers::spawn_with_end_hook(
                self.channels.as_ref(),
                misc,
                serving,
                count,
                on_exit,
                on_end,
            )
            .map(Serving::DmUser)
            .map_err(|e| ErrorChain(&e).to_string()),
        };
        let mut state = self.state();
        let closed = state.closed;
        let Some(handler) = state.handlers.get_mut(misc) else {
            // Deleted while starting: the workers (if any) stop when dropped.
            drop(state);
            log::error!("start {misc}: deleted while starting");
            return Reply::Fail;
        };
        match spawned {
            Ok(serving) if !closed => {
                if let Serving::DmUser(w) = &serving {
                    self.merge_pause.register(&w.group());
                }
                handler.lifecycle = Lifecycle::Running(serving);
            }
            Ok(_) => {
                handler.lifecycle = Lifecycle::Idle;
                log::error!("start {misc}: shutting down");
                return Reply::Fail;
            }
            Err(e) => {
                handler.lifecycle = Lifecycle::Idle;
                log::error!("start {misc}: {e}");
                return Reply::Fail;
            }
        }
        drop(state);
        log::info!("start {misc}: {count} workers");
        let resuming = user.as_ref().is_some_and(|m| m.progress().merged_ops > 0);
        if !verify {
            verification.set(VerifyState::Skipped);
        } else if resuming {
            log::info!("{misc}: a merge is being resumed; no update verification (as AOSP)");
            verification.set(VerifyState::Skipped);
        } else {
            spawn_verification(misc, target, verification);
        }
        Reply::Success
    }

    /// `delete`: stop the handler's merge at a safe point, stop and join its workers and
    /// verification, and forget it (`success` also when it is unknown, as AOSP answers).
    pub fn delete(&self, misc: &str) -> Reply {
        let removed = self.state().handlers.remove(misc);
        if let Some(handler) = removed {
            if let Some(m) = &handler.user {
                self.merges.stop(m);
            }
            handler.verification.stop_and_join();
            if let Lifecycle::Running(serving) = handler.lifecycle {
                serving.remove();
            }
            if handler.target.merge_complete().unwrap_or(false) {
                let mut state = self.state();
                state.completed_deleted = state.completed_deleted.saturating_add(1);
            }
            log::info!("delete {misc}");
        }
        Reply::Success
    }

    /// `create,<misc>,<sectors>` (`-ublk`): serve the handler as its ublk device, which
    /// must have the handler's size; `success` also when it already serves it.
    pub fn create_ublk(&self, misc: &str, sectors: &str) -> Reply {
        if self.ublk.is_none() {
            log::error!("create {misc}: this daemon serves dm-user; create needs -ublk");
            return Reply::Fail;
        }
        let Ok(sectors) = sectors.parse::<u64>() else {
            log::error!("create {misc}: {sectors:?} is not a sector count");
            return Reply::Fail;
        };
        {
            let state = self.state();
            let Some(h) = state.handlers.get(misc) else {
                log::error!("create {misc}: no such handler; send init first");
                return Reply::Fail;
            };
            if h.user.is_none() {
                log::error!("create {misc}: a legacy handler cannot be served over ublk");
                return Reply::Fail;
            }
            let size = h.target.device_sectors();
            if size != sectors {
                log::error!("create {misc}: {sectors} sectors asked, the base device has {size}");
                return Reply::Fail;
            }
            if matches!(h.lifecycle, Lifecycle::Running(Serving::Ublk(_))) {
                return Reply::Success;
            }
        }
        self.start(misc)
    }

    /// `get_device_name,<misc>`: the block node of the handler's ublk device.
    pub fn device_name(&self, misc: &str) -> Reply {
        let state = self.state();
        match state.handlers.get(misc).map(|h| &h.lifecycle) {
            Some(Lifecycle::Running(Serving::Ublk(d))) => Reply::SuccessDeviceName {
                dir: if Path::new("/dev/block").is_dir() {
                    "/dev/block"
                } else {
                    "/dev"
                },
                dev_id: d.dev_id(),
            },
            _ => Reply::FailDeviceNotFound,
        }
    }

    /// `initiate_merge`: a user-space-merge handler (started) is queued on the merge
    /// monitor; for a legacy one the request is recorded (the kernel's snapshot-merge target
    /// drives that merge).
    pub fn initiate_merge(&self, misc: &str) -> Reply {
        let user = {
            let mut state = self.state();
            let Some(h) = state.handlers.get_mut(misc) else {
                log::error!("initiate_merge {misc}: no such handler");
                return Reply::Fail;
            };
            h.merge_requested = true;
            let serving = match &h.lifecycle {
                Lifecycle::Running(w) => !w.all_finished(),
                Lifecycle::Idle | Lifecycle::Starting => false,
            };
            match &h.user {
                None => return Reply::Success,
                Some(_) if !serving => {
                    log::error!(
                        "initiate_merge {misc}: the handler is not serving (not started, or its \
                         device is gone); send start,{misc} first"
                    );
                    h.merge_requested = false;
                    return Reply::Fail;
                }
                Some(m) => Arc::clone(m),
            }
        };
        if self.merges.enqueue(&user) {
            Reply::Success
        } else {
            log::error!("initiate_merge {misc}: the merge cannot be queued (shutting down)");
            Reply::Fail
        }
    }

    /// `pause_merge` / `resume_merge`: hold (or release) every user-space merge at its next
    /// safe point, and the kernel's metadata write-backs in every legacy handler's workers
    /// (see `MergePause`).
    pub fn set_merge_paused(&self, paused: bool) -> Reply {
        self.merge_pause.set(paused);
        self.merges.set_paused(paused);
        log::info!("merge {}", if paused { "paused" } else { "resumed" });
        Reply::Success
    }

    /// `getstatus`.
    pub fn status(&self, misc: &str) -> Reply {
        let state = self.state();
        let Some(h) = state.handlers.get(misc) else {
            return Reply::Status(MergeStatus::SnapshotMergeFailed);
        };
        if let Some(m) = &h.user {
            return Reply::Status(user_status(m));
        }
        let status = match (h.target.merge_complete(), h.target.merge_percent()) {
            (Ok(true), _) => MergeStatus::SnapshotMergeComplete,
            (Ok(false), Ok(p)) if h.merge_requested || p > 0.0 => MergeStatus::SnapshotMerge,
            (Ok(false), Ok(_)) => MergeStatus::Snapshot,
            (Err(e), _) | (_, Err(e)) => {
                log::error!("getstatus {misc}: {chain}", chain = ErrorChain(&e));
                MergeStatus::SnapshotMergeFailed
            }
        };
        Reply::Status(status)
    }

    /// `merge_percent`: the average over the handlers counted and the handlers deleted after
    /// a complete merge; 0 with none. A legacy handler counts while registered; a
    /// user-space-merge handler (as AOSP) while its workers run, and as 100% once its merge
    /// is complete and its workers have ended.
    pub fn merge_percent(&self) -> Reply {
        let state = self.state();
        let mut sum = 100.0 * state.completed_deleted as f64;
        let mut count = state.completed_deleted;
        for (misc, h) in &state.handlers {
            if let Some(m) = &h.user {
                let p = m.progress();
                let serving = match &h.lifecycle {
                    Lifecycle::Running(w) => !w.all_finished(),
                    Lifecycle::Starting | Lifecycle::Idle => false,
                };
                if serving {
                    sum += p.percent();
                } else if p.complete {
                    sum += 100.0;
                } else {
                    continue;
                }
                count = count.saturating_add(1);
                continue;
            }
            match h.target.merge_percent() {
                Ok(p) => sum += p,
                Err(e) => log::error!("merge_percent {misc}: {chain}", chain = ErrorChain(&e)),
            }
            count = count.saturating_add(1);
        }
        if count == 0 {
            Reply::MergePercent(0.0)
        } else {
            Reply::MergePercent(sum / count as f64)
        }
    }

    /// `update-verify`: `fail` at once if a handler is not running or was not verified by
    /// this daemon; otherwise wait up to the verify limit (10 s) for each handler's
    /// verification pass, `success` only if every pass read every block without error.
    /// Blocks the caller: run it off the control loop.
    pub fn update_verify(&self) -> Reply {
        let passes: Vec<(String, Arc<Verification>)> = {
            let state = self.state();
            let mut passes = Vec::with_capacity(state.handlers.len());
            for (misc, h) in &state.handlers {
                if !matches!(h.lifecycle, Lifecycle::Running(_)) {
                    log::error!("update-verify: {misc} is not running");
                    return Reply::Fail;
                }
                passes.push((misc.clone(), Arc::clone(&h.verification)));
            }
            passes
        };
        for (misc, v) in passes {
            if *lock(&v.state) == VerifyState::Skipped {
                log::error!(
                    "update-verify: {misc} was not verified by this daemon (a first-stage \
                     name, a handler added over the socket, or a merge being resumed); \
                     update_verifier reads the partition itself"
                );
                return Reply::Fail;
            }
            if !v.wait(self.verify_wait) {
                log::error!("update-verify: {misc} did not verify");
                return Reply::Fail;
            }
        }
        Reply::Success
    }

    /// Number of registered handlers.
    pub fn len(&self) -> usize {
        self.state().handlers.len()
    }

    /// True with no handler registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when no started handler has a worker still running.
    pub fn all_workers_finished(&self) -> bool {
        self.state().handlers.values().all(|h| match &h.lifecycle {
            Lifecycle::Running(w) => w.all_finished(),
            Lifecycle::Idle => true,
            Lifecycle::Starting => false,
        })
    }

    /// True when a detached daemon may end: every dm-user worker has ended. ublk devices do
    /// not hold the daemon: when it exits the kernel parks their I/O until the next daemon
    /// re-attaches (the handoff), and their merges resume from the durable state.
    pub fn detached_may_exit(&self) -> bool {
        self.state().handlers.values().all(|h| match &h.lifecycle {
            Lifecycle::Running(Serving::Ublk(_)) | Lifecycle::Idle => true,
            Lifecycle::Running(s) => s.all_finished(),
            Lifecycle::Starting => false,
        })
    }

    /// `detach`: ask every user-space merge to stop at its next safe point, without waiting
    /// (as AOSP's detach terminates the merge threads; the workers keep serving until their
    /// devices go).
    pub fn request_stop_merges(&self) {
        let merges: Vec<Arc<UserMerge>> = self
            .state()
            .handlers
            .values()
            .filter_map(|h| h.user.clone())
            .collect();
        for m in &merges {
            self.merges.request_stop(m);
        }
    }

    /// Merges running now (user-space-merge handlers).
    pub fn merges_running(&self) -> u32 {
        self.merges.active()
    }

    /// Stop every handler's merge at a safe point, stop and join its workers and
    /// verification (the handlers stay registered, and can be started again).
    pub fn stop_all(&self) {
        let (mut workers, passes, merges) = {
            let mut state = self.state();
            let mut workers: Vec<Serving> = Vec::new();
            let mut passes: Vec<Arc<Verification>> = Vec::new();
            let mut merges: Vec<Arc<UserMerge>> = Vec::new();
            for h in state.handlers.values_mut() {
                passes.push(Arc::clone(&h.verification));
                merges.extend(h.user.clone());
                if matches!(h.lifecycle, Lifecycle::Running(_)) {
                    if let Lifecycle::Running(w) =
                        std::mem::replace(&mut h.lifecycle, Lifecycle::Idle)
                    {
                        workers.push(w);
                    }
                }
            }
            (workers, passes, merges)
        };
        for m in &merges {
            self.merges.request_stop(m);
        }
        for w in &workers {
            w.request_stop();
        }
        for v in &passes {
            v.stop_and_join();
        }
        for w in &mut workers {
            w.stop_and_join();
        }
        for m in &merges {
            self.merges.stop(m);
        }
    }

    /// Refuse every later `init`, `start` and merge, then [`stop_all`](Self::stop_all).
    pub fn shut_down(&self) {
        self.state().closed = true;
        self.stop_all();
        self.merges.shut_down();
    }
}

/// `getstatus` of a user-space-merge handler (§D.1): failed if its merge failed; complete
/// once the COW says so (also before any `initiate_merge`); `snapshot-merge` while queued or
/// running; otherwise `snapshot`.
fn user_status(m: &UserMerge) -> MergeStatus {
    let progress = m.progress();
    match m.phase() {
        MergeRunPhase::Failed => MergeStatus::SnapshotMergeFailed,
        _ if progress.complete => MergeStatus::SnapshotMergeComplete,
        MergeRunPhase::Complete => MergeStatus::SnapshotMergeComplete,
        // A retry after a failure is merging again, even before its run resets the state.
        MergeRunPhase::Queued | MergeRunPhase::Running => MergeStatus::SnapshotMerge,
        _ if progress.failed => MergeStatus::SnapshotMergeFailed,
        MergeRunPhase::Idle | MergeRunPhase::Stopped => MergeStatus::Snapshot,
    }
}

/// A user-space-merge snapshot as the registry's handler code sees every snapshot.
struct UserServing {
    misc: String,
    target: Arc<dyn UserMergeTarget>,
    devices: VerifyDevices,
}

impl RequestHandler for UserServing {
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> ResponseCode {
        self.target.handle(req, write_payload, read_out)
    }

    fn read_from_file(&self, req: &Request) -> Option<(&std::fs::File, u64)> {
        self.target.read_from_file(req)
    }

    fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[crate::dm_user::AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        self.target.read_in_pieces(req, produced, send)
    }

    fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
        self.target.read_into(req, out)
    }

    fn answered(&self, req: &Request) {
        self.target.answered(req);
    }
}

impl SnapshotTarget for UserServing {
    fn device_sectors(&self) -> u64 {
        self.target.base_sectors()
    }
    fn merge_percent(&self) -> Result<f64, TargetError> {
        Ok(self.target.progress().percent())
    }
    fn merge_complete(&self) -> Result<bool, TargetError> {
        Ok(self.target.progress().complete)
    }
    fn verify(&self, stop: &AtomicBool) -> Result<u64, TargetError> {
        super::update_verify::verify(&self.misc, self.target.as_ref(), &self.devices, stop)
    }
}

/// Nice value of the verification thread: it yields the CPU to the dm-user workers.
const VERIFY_NICE: libc::c_int = 10;

/// Run `target`'s verification pass on its own thread and record the result in `v`.
fn spawn_verification(misc: &str, target: Arc<dyn SnapshotTarget>, v: Arc<Verification>) {
    let name = misc.to_string();
    let pass = Arc::clone(&v);
    let spawned = std::thread::Builder::new()
        .name(format!("verify-{misc}"))
        .spawn(move || {
            lower_thread_priority(VERIFY_NICE, "verification");
            match target.verify(&pass.stop) {
                Ok(blocks) => {
                    log::info!("{name}: verification read {blocks} blocks");
                    pass.set(VerifyState::Passed);
                }
                Err(e) => {
                    log::error!(
                        "{name}: verification failed: {chain}",
                        chain = ErrorChain(&e)
                    );
                    pass.set(VerifyState::Failed);
                }
            }
        });
    match spawned {
        Ok(t) => *lock(&v.thread) = Some(t),
        Err(e) => {
            log::error!(
                "{misc}: cannot spawn the verification thread: {chain}",
                chain = ErrorChain(&e)
            );
            v.set(VerifyState::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::test_support::{thread_nice, FakeUserTarget};
    use crate::dm_user::{Channel, ChannelError, Request, ResponseCode};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeTarget {
        sectors: u64,
        percent_tenths: AtomicU64,
        /// "" verifies, "bad" fails verification, "hang" verifies until stopped.
        verify: String,
    }

    impl RequestHandler for FakeTarget {
        fn handle(&self, _: &Request, _: &[u8], _: &mut Vec<u8>) -> ResponseCode {
            ResponseCode::Unsupported
        }
    }

    impl SnapshotTarget for FakeTarget {
        fn device_sectors(&self) -> u64 {
            self.sectors
        }
        fn merge_percent(&self) -> Result<f64, TargetError> {
            Ok(self.percent_tenths.load(Ordering::Relaxed) as f64 / 10.0)
        }
        fn merge_complete(&self) -> Result<bool, TargetError> {
            Ok(self.percent_tenths.load(Ordering::Relaxed) == 1000)
        }
        fn verify(&self, stop: &AtomicBool) -> Result<u64, TargetError> {
            match self.verify.as_str() {
                "bad" => Err(TargetError::VerifyRead {
                    block: 3,
                    blocks: self.sectors / 8,
                    source: "read error".into(),
                }),
                "hang" => {
                    HANG_ENTERED.store(true, Ordering::Release);
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(TargetError::VerifyStopped {
                        block: 0,
                        blocks: self.sectors / 8,
                    })
                }
                _ => Ok(self.sectors / 8),
            }
        }
    }

    /// Set once a "hang" verification runs (its priority is lowered by then).
    static HANG_ENTERED: AtomicBool = AtomicBool::new(false);

    /// Opens "<n>" as a fake of n sectors at 0%, "<n>@<tenths>" at that progress, and
    /// "<n>!<verify>" with that verification behaviour.
    struct FakeOpener;

    impl SnapshotOpener for FakeOpener {
        fn open(&self, cow: &Path, _: &Path) -> Result<Arc<dyn SnapshotTarget>, TargetError> {
            let refuse = |why: &str| TargetError::Open {
                cow: cow.to_path_buf(),
                source_path: PathBuf::new(),
                source: why.into(),
            };
            let text = cow.to_str().ok_or_else(|| refuse("not text"))?;
            let (text, verify) = text.split_once('!').unwrap_or((text, ""));
            let (n, p) = text.split_once('@').unwrap_or((text, "0"));
            Ok(Arc::new(FakeTarget {
                sectors: n.parse().map_err(|_| refuse("no COW"))?,
                percent_tenths: AtomicU64::new(p.parse().map_err(|_| refuse("bad progress"))?),
                verify: verify.to_string(),
            }))
        }
    }

    struct Pairs(Mutex<Vec<UnixStream>>);

    impl ChannelOpener for Pairs {
        fn open(&self, misc: &str) -> Result<Channel, ChannelError> {
            if misc == "nodev" {
                return Err(ChannelError::TargetGone);
            }
            let (k, d) = UnixStream::pair().map_err(|source| ChannelError::Io {
                op: "socketpair",
                source,
            })?;
            self.0.lock().unwrap().push(k);
            Ok(Channel::from_fd(d.into()))
        }
    }

    fn registry() -> HandlerRegistry {
        HandlerRegistry::new(
            Box::new(FakeOpener),
            Box::new(Pairs(Mutex::new(Vec::new()))),
            2,
        )
    }

    #[test]
    fn lifecycle() {
        let r = registry();
        assert_eq!(r.init("a", "4096", "src"), Reply::SuccessSectors(4096));
        assert_eq!(r.init("a", "8", "src"), Reply::Fail, "duplicate name");
        assert_eq!(r.init("b", "missing", "src"), Reply::Fail);
        assert_eq!(r.init("z", "0", "src"), Reply::Fail, "empty device");
        assert_eq!(r.update_verify(), Reply::Fail);
        assert_eq!(r.start("nope"), Reply::Fail);
        assert_eq!(r.start("a"), Reply::Success);
        assert_eq!(r.start("a"), Reply::Fail, "already started");
        assert_eq!(r.update_verify(), Reply::Success);
        assert!(!r.all_workers_finished());
        assert_eq!(r.status("a"), Reply::Status(MergeStatus::Snapshot));
        assert_eq!(r.initiate_merge("x"), Reply::Fail);
        assert_eq!(r.initiate_merge("a"), Reply::Success);
        assert_eq!(r.status("a"), Reply::Status(MergeStatus::SnapshotMerge));
        assert_eq!(
            r.status("x"),
            Reply::Status(MergeStatus::SnapshotMergeFailed)
        );
        assert_eq!(r.delete("a"), Reply::Success);
        assert_eq!(r.delete("a"), Reply::Success, "unknown is success");
        assert!(r.is_empty());
    }

    #[test]
    fn ublk_commands_without_ublk_fail_cleanly() {
        let r = registry();
        assert_eq!(r.init("h", "8", "src"), Reply::SuccessSectors(8));
        assert_eq!(r.device_name("h"), Reply::FailDeviceNotFound);
        assert_eq!(r.device_name("unknown"), Reply::FailDeviceNotFound);
        // Without -ublk, `create` is refused and starts nothing.
        assert_eq!(r.create_ublk("h", "8"), Reply::Fail);
        let r = registry().with_ublk(Some(UblkOptions::default()));
        assert_eq!(r.init("h", "8", "src"), Reply::SuccessSectors(8));
        assert_eq!(r.create_ublk("h", "eight"), Reply::Fail);
        assert_eq!(r.create_ublk("unknown", "8"), Reply::Fail);
        // A legacy handler is never served over ublk.
        assert_eq!(r.create_ublk("h", "8"), Reply::Fail);
        assert!(r.all_workers_finished());
    }

    #[test]
    fn start_fails_without_the_device() {
        let r = registry();
        assert_eq!(r.init("nodev", "8", "src"), Reply::SuccessSectors(8));
        assert_eq!(r.start("nodev"), Reply::Fail);
        assert!(r.all_workers_finished());
    }

    #[test]
    fn merge_percent_averages_live_and_completed_handlers() {
        let r = registry();
        assert_eq!(r.merge_percent(), Reply::MergePercent(0.0));
        r.init("a", "8@1000", "s");
        r.init("b", "8@250", "s");
        assert_eq!(
            r.status("a"),
            Reply::Status(MergeStatus::SnapshotMergeComplete)
        );
        assert_eq!(r.status("b"), Reply::Status(MergeStatus::SnapshotMerge));
        assert_eq!(r.merge_percent(), Reply::MergePercent(62.5));
        r.delete("a");
        r.init("c", "8@0", "s");
        // a (deleted, complete) 100 + b 25 + c 0.
        assert_eq!(r.merge_percent().to_string(), "41.666667");
    }

    #[test]
    fn stop_all_joins_workers() {
        let r = registry();
        r.init("a", "8", "s");
        r.init("b", "8", "s");
        assert_eq!(r.start("a"), Reply::Success);
        assert_eq!(r.start("b"), Reply::Success);
        r.stop_all();
        assert!(r.all_workers_finished());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn update_verify_reports_each_handlers_pass() {
        let r = registry();
        assert_eq!(
            r.update_verify(),
            Reply::Success,
            "no handler, nothing to fail"
        );
        r.init("good", "64", "s");
        r.init("bad", "64!bad", "s");
        assert_eq!(r.update_verify(), Reply::Fail, "not started");
        assert_eq!(r.start("good"), Reply::Success);
        assert_eq!(r.update_verify(), Reply::Fail, "bad is not started");
        assert_eq!(r.start("bad"), Reply::Success);
        assert_eq!(r.update_verify(), Reply::Fail, "bad's pass fails");
        r.delete("bad");
        assert_eq!(r.update_verify(), Reply::Success);
    }

    #[test]
    fn update_verify_gives_up_on_a_pass_that_does_not_end() {
        let r = registry().with_verify_wait(std::time::Duration::from_millis(50));
        r.init("slow", "64!hang", "s");
        assert_eq!(r.start("slow"), Reply::Success);
        assert_eq!(r.update_verify(), Reply::Fail);
        while !HANG_ENTERED.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        assert_eq!(
            thread_nice("verify-slow"),
            Some(10),
            "runs in the background"
        );
        // delete stops the pass and joins it.
        assert_eq!(r.delete("slow"), Reply::Success);
        assert!(r.is_empty());
    }

    #[test]
    fn a_restarted_handler_verifies_again_and_shut_down_refuses_new_work() {
        let r = registry();
        r.init("a", "64", "s");
        assert_eq!(r.start("a"), Reply::Success);
        r.stop_all();
        assert_eq!(r.update_verify(), Reply::Fail, "stopped");
        assert_eq!(r.start("a"), Reply::Success);
        assert_eq!(r.update_verify(), Reply::Success);
        r.shut_down();
        assert_eq!(r.init("b", "8", "s"), Reply::Fail);
        assert_eq!(r.start("a"), Reply::Fail);
    }

    #[test]
    fn worker_count_applies_to_handlers_registered_later() {
        let pairs = Arc::new(Pairs(Mutex::new(Vec::new())));
        struct Shared(Arc<Pairs>);
        impl ChannelOpener for Shared {
            fn open(&self, misc: &str) -> Result<Channel, ChannelError> {
                self.0.open(misc)
            }
        }
        let r = HandlerRegistry::new(Box::new(FakeOpener), Box::new(Shared(pairs.clone())), 4);
        r.init("first", "8", "s");
        r.set_worker_count(1);
        r.init("second", "8", "s");
        assert_eq!(r.start("first"), Reply::Success);
        assert_eq!(pairs.0.lock().unwrap().len(), 4);
        assert_eq!(r.start("second"), Reply::Success);
        assert_eq!(pairs.0.lock().unwrap().len(), 5);
        r.stop_all();
    }

    /// The handler the workers of a user-space-merge snapshot get forwards the answer in
    /// pieces (a wrapper that forgot it made every READ a whole produced copy) and the
    /// after-answer call (which drives the read-ahead advice).
    #[test]
    fn the_workers_handler_of_a_user_snapshot_answers_in_pieces() {
        let fake = Arc::new(FakeUserTarget::new(64, 0, 1, None));
        let user: Arc<dyn UserMergeTarget> = fake.clone();
        let serving = PausableTarget {
            target: Arc::new(UserServing {
                misc: "system_a".into(),
                target: user,
                devices: VerifyDevices::default(),
            }),
            pause: Arc::default(),
        };
        let req = Request {
            kind: crate::dm_user::DM_USER_REQ_MAP_READ,
            flags: 0,
            sector: 8,
            len: 65536,
        };
        let mut sent = 0usize;
        let answered = serving.read_in_pieces(&req, &mut Vec::new(), &mut |pieces, produced| {
            sent = pieces.len() + produced.len();
            true
        });
        assert_eq!(answered, Some(true));
        assert_eq!(sent, 1 + 65536);
        let mut out = vec![0u8; 65536];
        assert_eq!(serving.read_into(&req, &mut out), ResponseCode::Success);
        assert!(
            out.iter().all(|&b| b == 0xAB),
            "read in place, not through handle"
        );
        serving.answered(&req);
        assert_eq!(fake.answered_calls(), 1);
    }
}
