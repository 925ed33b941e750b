//! One ublk device serving one [`RequestHandler`]: created (or recovered), its queue threads,
//! and its removal.
//!
//! Creation: ADD_DEV (with USER_RECOVERY and REISSUE, and USER_COPY where offered), the
//! parameters (512-byte logical and 4 KiB physical blocks, the I/O limit, the size), the
//! character node, one thread per queue, and START_DEV once every tag is fetched.
//!
//! Recovery: when the serving process dies, the kernel keeps the device and parks its I/O
//! (requests the dead process held are issued again). A new process finds the device by its
//! identity word, issues START_USER_RECOVERY (retried while the dead process's node is still
//! being released), opens the character node, starts its queues and issues
//! END_USER_RECOVERY, which lets the parked I/O through.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::abi::{
    DevInfo, ParamBasic, Params, BLOCK_PREFIX, CHAR_PREFIX, F_CMD_IOCTL_ENCODE, F_USER_COPY,
    F_USER_RECOVERY, F_USER_RECOVERY_REISSUE, MAX_QUEUE_DEPTH, PARAM_TYPE_BASIC, S_DEV_QUIESCED,
};
use super::control::{Control, ControlError};
use super::descriptor::{QueueLimits, SECTOR};
use super::node_request::{NodeKind, NodeRequestHook};
use super::queue::{run_queue, DataPath, QueueError, QueueReport, QueueSetup};
use super::stale_server::{stop_stale_server, StaleServer};
use crate::daemon::transport::RequestHandler;

/// Smallest queue depth accepted.
pub const MIN_QUEUE_DEPTH: u16 = 32;
/// Default largest request in bytes.
pub const DEFAULT_MAX_IO_BYTES: u32 = 1 << 20;
/// Largest request accepted (the dm-user path's limit).
pub const MAX_IO_BYTES: u32 = 4 << 20;
/// Default [`UblkOptions::stale_server_grace`]: an old daemon that exits by itself on
/// `detach` does so within a few hundred milliseconds, even while merging.
pub const DEFAULT_STALE_SERVER_GRACE: Duration = Duration::from_secs(2);

/// Errors of a ublk device.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A control command failed.
    #[error("ublk device {dev_id}: {step}")]
    Control {
        /// Device id (`u32::MAX` before ADD_DEV chose one).
        dev_id: u32,
        /// What was being done.
        step: &'static str,
        /// Underlying error.
        #[source]
        source: ControlError,
    },
    /// The options are outside what the device supports.
    #[error("invalid ublk options: {0}")]
    Options(String),
    /// The device to recover is not waiting for a new server.
    #[error("ublk device {dev_id} is in state {state}, not quiesced: nothing to recover")]
    NotQuiesced {
        /// Device id.
        dev_id: u32,
        /// Its state (`UBLK_S_DEV_*`).
        state: u16,
    },
    /// The device was created without user recovery.
    #[error("ublk device {dev_id} was created without USER_RECOVERY and cannot be re-attached")]
    NoRecovery {
        /// Device id.
        dev_id: u32,
    },
    /// The character node could not be opened.
    #[error("opening {path}")]
    CharNode {
        /// Node path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A queue thread could not be started or failed before fetching.
    #[error("ublk device {dev_id} queue {q_id}: {why}")]
    Queue {
        /// Device id.
        dev_id: u32,
        /// Queue id.
        q_id: u16,
        /// What went wrong.
        why: String,
    },
}

/// Which data path to use for READ data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserCopy {
    /// USER_COPY when the kernel offers it, the buffer path otherwise.
    #[default]
    Auto,
    /// USER_COPY (creation fails if the kernel lacks it).
    Always,
    /// The buffer path.
    Never,
}

/// How a device is shaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// Hardware queues, one serving thread each.
    pub queues: u16,
    /// Tags per queue (at least [`MIN_QUEUE_DEPTH`]).
    pub depth: u16,
    /// Largest request in bytes (a multiple of 4 KiB, at most [`MAX_IO_BYTES`]).
    pub max_io_bytes: u32,
    /// Data path.
    pub user_copy: UserCopy,
    /// Identity word stored with the device ([`identity_of`]), found again on recovery.
    pub identity: u64,
    /// How long recovery waits for the dead server's resources to be released.
    pub recovery_timeout: Duration,
    /// How long recovery waits for the old server to let the device go before it sends
    /// `SIGKILL` to the process that still holds the device's character node (a stopped or
    /// stuck daemon; see [`super::stale_server`]). `None`: never; wait up to
    /// `recovery_timeout` and give up.
    pub stale_server_grace: Option<Duration>,
    /// Told when a node of the device is due (`None`: the nodes appear by themselves).
    pub node_requests: Option<NodeRequestHook>,
    /// Run each queue's thread on the CPUs whose requests that queue receives (the kernel's
    /// queue affinity), so that a request wakes the serving thread on the submitter's CPU
    /// instead of another one. With one queue the set is every CPU and nothing changes.
    pub pin_queues: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            depth: MIN_QUEUE_DEPTH,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            user_copy: UserCopy::Auto,
            identity: 0,
            recovery_timeout: Duration::from_secs(30),
            stale_server_grace: Some(DEFAULT_STALE_SERVER_GRACE),
            node_requests: None,
            pin_queues: true,
        }
    }
}

impl UblkOptions {
    fn check(&self) -> Result<(), DeviceError> {
        if self.queues == 0 || self.queues > 64 {
            return Err(DeviceError::Options(format!(
                "{} queues (1..=64)",
                self.queues
            )));
        }
        if self.depth < MIN_QUEUE_DEPTH || self.depth > MAX_QUEUE_DEPTH {
            return Err(DeviceError::Options(format!(
                "queue depth {} ({MIN_QUEUE_DEPTH}..={MAX_QUEUE_DEPTH})",
                self.depth
            )));
        }
        if self.max_io_bytes < 4096
            || self.max_io_bytes > MAX_IO_BYTES
            || self.max_io_bytes % 4096 != 0
        {
            return Err(DeviceError::Options(format!(
                "I/O limit {} bytes (a multiple of 4096 up to {MAX_IO_BYTES})",
                self.max_io_bytes
            )));
        }
        Ok(())
    }
}

/// The identity word of a device serving `name` (FNV-1a of the name, never 0), stored in the
/// device's server-private word so that a recovering daemon finds its device.
pub fn identity_of(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// The suffix first-stage libsnapshot gives a handler's misc name (`<p>-init`); after the
/// SELinux transition the same partition's handler is named `<p>`.
pub const FIRST_STAGE_SUFFIX: &str = "-init";

/// The names whose device a handler named `name` takes over, in order: `name` itself, then
/// (for a name without [`FIRST_STAGE_SUFFIX`]) the first-stage name `name-init`.
pub fn takeover_names(name: &str) -> Vec<String> {
    let mut names = vec![name.to_string()];
    if !name.ends_with(FIRST_STAGE_SUFFIX) {
        names.push(format!("{name}{FIRST_STAGE_SUFFIX}"));
    }
    names
}

/// Ids of the ublk devices present (from their `/dev/ublkc<N>` nodes).
pub fn device_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("ublkc"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// The device whose identity word is `identity`, with its info.
pub fn find_device(identity: u64) -> Result<Option<DevInfo>, ControlError> {
    let mut control = Control::open()?;
    for id in device_ids() {
        match control.info(id) {
            Ok(info) if info.ublksrv_flags == identity => return Ok(Some(info)),
            Ok(_) => {}
            // Deleted between the listing and the query.
            Err(e) if e.errno() == Some(libc::ENODEV) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Block node of device `dev_id`.
pub fn block_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("{BLOCK_PREFIX}{dev_id}"))
}

/// A served ublk device.
pub struct UblkDevice {
    control: Control,
    info: DevInfo,
    data_path: DataPath,
    queues: Vec<JoinHandle<Result<QueueReport, QueueError>>>,
}

impl std::fmt::Debug for UblkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice")
            .field("info", &self.info)
            .field("data_path", &self.data_path)
            .finish_non_exhaustive()
    }
}

fn control_err(dev_id: u32, step: &'static str) -> impl FnOnce(ControlError) -> DeviceError {
    move |source| DeviceError::Control {
        dev_id,
        step,
        source,
    }
}

/// Open `/dev/ublkc<dev_id>`, waiting up to `timeout` for the node to appear and for a dead
/// server's open of it to be released.
fn open_char(dev_id: u32, timeout: Duration) -> Result<File, DeviceError> {
    let path = PathBuf::from(format!("{CHAR_PREFIX}{dev_id}"));
    let start = Instant::now();
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY))
                    && start.elapsed() < timeout =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => return Err(DeviceError::CharNode { path, source }),
        }
    }
}

/// The old server of `dev_id` still holds it after `grace`: stop it if it really is the
/// device's server, and say what was done.
fn report_stale_server(dev_id: u32, state: u16, grace: Duration, pid: i32) {
    match stop_stale_server(dev_id, pid) {
        StaleServer::Killed { pid } => log::warn!(
            "ublk device {dev_id}: its old server (pid {pid}) still held {CHAR_PREFIX}{dev_id} \
             {grace:?} after the re-attach began (state {state}; stopped or stuck): sent it \
             SIGKILL; its requests go to this daemon once it is gone"
        ),
        StaleServer::Gone | StaleServer::Ourselves => {}
        StaleServer::NotHolding { pid } => log::warn!(
            "ublk device {dev_id}: not released after {grace:?} (state {state}), and its \
             recorded server pid {pid} does not hold {CHAR_PREFIX}{dev_id}: left alone; find \
             the process holding the node and stop it, or the re-attach gives up"
        ),
        StaleServer::Failed { pid, why } => log::warn!(
            "ublk device {dev_id}: could not stop its old server (pid {pid}) after {grace:?}: \
             {why}; stop it by hand, or the re-attach gives up"
        ),
    }
}

/// Tell the options' hook (if any) that node `kind` of `dev_id` is due.
fn request_node(opts: &UblkOptions, kind: NodeKind, dev_id: u32) {
    if let Some(hook) = &opts.node_requests {
        hook.request(kind, dev_id);
    }
}

impl UblkDevice {
    /// Create and start a device of `dev_sectors` sectors served by `handler`.
    pub fn create(
        handler: Arc<dyn RequestHandler>,
        dev_sectors: u64,
        opts: &UblkOptions,
    ) -> Result<Self, DeviceError> {
        opts.check()?;
        if dev_sectors == 0 {
            return Err(DeviceError::Options("an empty device".into()));
        }
        let mut control = Control::open().map_err(control_err(u32::MAX, "opening control"))?;
        let features = control
            .features()
            .map_err(control_err(u32::MAX, "querying features"))?;
        let user_copy = match opts.user_copy {
            UserCopy::Auto => features & F_USER_COPY != 0,
            UserCopy::Always if features & F_USER_COPY == 0 => {
                return Err(DeviceError::Options(
                    "USER_COPY asked for, but this kernel's ublk does not offer it".into(),
                ))
            }
            UserCopy::Always => true,
            UserCopy::Never => false,
        };
        let mut flags = F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_CMD_IOCTL_ENCODE;
        if user_copy {
            flags |= F_USER_COPY;
        }
        let mut info = DevInfo {
            nr_hw_queues: opts.queues,
            queue_depth: opts.depth,
            max_io_buf_bytes: opts.max_io_bytes,
            dev_id: u32::MAX,
            flags,
            ublksrv_flags: opts.identity,
            ..DevInfo::default()
        };
        control
            .add(&mut info)
            .map_err(control_err(u32::MAX, "adding the device"))?;
        let dev_id = info.dev_id;
        let mut device = Self {
            control,
            info,
            data_path: if user_copy {
                DataPath::UserCopy
            } else {
                DataPath::Buffer
            },
            queues: Vec::new(),
        };
        // The character node is due now: the queues open it next.
        request_node(opts, NodeKind::Char, dev_id);
        // From here on a failure deletes the half-made device.
        let result = device.set_up(handler, dev_sectors, opts);
        if let Err(e) = result {
            device.teardown();
            return Err(e);
        }
        request_node(opts, NodeKind::Block, dev_id);
        log::info!(
            "ublk device {dev_id} started: {} sectors, {} queue(s) of depth {}, I/O limit {} \
             bytes, {:?} data path",
            dev_sectors,
            device.info.nr_hw_queues,
            device.info.queue_depth,
            device.info.max_io_buf_bytes,
            device.data_path
        );
        Ok(device)
    }

    fn set_up(
        &mut self,
        handler: Arc<dyn RequestHandler>,
        dev_sectors: u64,
        opts: &UblkOptions,
    ) -> Result<(), DeviceError> {
        let dev_id = self.info.dev_id;
        let max_sectors = self.info.max_io_buf_bytes / SECTOR as u32;
        let params = Params {
            types: PARAM_TYPE_BASIC,
            basic: ParamBasic {
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors,
                dev_sectors,
                ..ParamBasic::default()
            },
            ..Params::default()
        };
        self.control
            .set_params(dev_id, &params)
            .map_err(control_err(dev_id, "setting parameters"))?;
        self.spawn_queues(handler, dev_sectors, opts)?;
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        self.control
            .start(dev_id, pid)
            .map_err(control_err(dev_id, "starting"))
    }

    /// Serve `handler` as the device named `name` (or, failing that, its first-stage name,
    /// see [`takeover_names`]): re-attach to it if a dead server left it waiting (its I/O
    /// parked), otherwise create it with `dev_sectors` sectors. A device of
    /// that name that is still served elsewhere, or has another size, is an error.
    pub fn serve(
        handler: Arc<dyn RequestHandler>,
        name: &str,
        dev_sectors: u64,
        opts: &UblkOptions,
    ) -> Result<Self, DeviceError> {
        let opts = UblkOptions {
            identity: identity_of(name),
            ..opts.clone()
        };
        // The first-stage daemon may have named the partition `<p>-init`: its device is the
        // one `<p>`'s dm-linear table points at, so it is taken over rather than a new one made.
        let mut found = None;
        for candidate in takeover_names(name) {
            let info = find_device(identity_of(&candidate))
                .map_err(control_err(u32::MAX, "finding the device"))?;
            if let Some(info) = info {
                if candidate != name {
                    log::info!(
                        "ublk device {} was made for {candidate} (first stage): {name} takes it \
                         over",
                        info.dev_id
                    );
                }
                found = Some(info);
                break;
            }
        }
        let Some(info) = found else {
            return Self::create(handler, dev_sectors, &opts);
        };
        let mut control = Control::open().map_err(control_err(info.dev_id, "opening control"))?;
        let existing = Self::dev_sectors_of(&mut control, info.dev_id)?;
        if existing != dev_sectors {
            return Err(DeviceError::Options(format!(
                "ublk device {} for {name} has {existing} sectors, not {dev_sectors}",
                info.dev_id
            )));
        }
        log::info!(
            "ublk device {} for {name} exists (state {}): re-attaching",
            info.dev_id,
            info.state
        );
        Self::recover_id(handler, info.dev_id, &opts)
    }

    /// Re-attach to the device of `identity` whose server died, serving it with `handler`.
    pub fn recover(
        handler: Arc<dyn RequestHandler>,
        identity: u64,
        opts: &UblkOptions,
    ) -> Result<Self, DeviceError> {
        let found = find_device(identity).map_err(control_err(u32::MAX, "finding the device"))?;
        let Some(info) = found else {
            return Err(DeviceError::Options(format!(
                "no ublk device has identity {identity:#x}"
            )));
        };
        Self::recover_id(handler, info.dev_id, opts)
    }

    /// Re-attach to device `dev_id` whose server died, serving it with `handler`.
    pub fn recover_id(
        handler: Arc<dyn RequestHandler>,
        dev_id: u32,
        opts: &UblkOptions,
    ) -> Result<Self, DeviceError> {
        let mut control = Control::open().map_err(control_err(dev_id, "opening control"))?;
        let start = Instant::now();
        let mut stale_server_handled = false;
        // The dead server's queues are torn down asynchronously: wait for the quiesced state
        // and for its node to be released (EBUSY until then).
        let info = loop {
            let info = control
                .info(dev_id)
                .map_err(control_err(dev_id, "reading the device"))?;
            if info.flags & F_USER_RECOVERY == 0 {
                return Err(DeviceError::NoRecovery { dev_id });
            }
            let busy = if info.state == S_DEV_QUIESCED {
                match control.start_recovery(dev_id) {
                    Ok(()) => break info,
                    Err(e) if e.errno() == Some(libc::EBUSY) => true,
                    Err(e) => return Err(control_err(dev_id, "starting recovery")(e)),
                }
            } else {
                true
            };
            if busy && !stale_server_handled {
                if let Some(grace) = opts.stale_server_grace {
                    if start.elapsed() >= grace {
                        stale_server_handled = true;
                        report_stale_server(dev_id, info.state, grace, info.ublksrv_pid);
                    }
                }
            }
            if busy && start.elapsed() >= opts.recovery_timeout {
                return Err(DeviceError::NotQuiesced {
                    dev_id,
                    state: info.state,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let params = Self::dev_sectors_of(&mut control, dev_id)?;
        let mut device = Self {
            control,
            info,
            data_path: if info.flags & F_USER_COPY != 0 {
                DataPath::UserCopy
            } else {
                DataPath::Buffer
            },
            queues: Vec::new(),
        };
        request_node(opts, NodeKind::Char, dev_id);
        device.spawn_queues(handler, params, opts)?;
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        device
            .control
            .end_recovery(dev_id, pid)
            .map_err(control_err(dev_id, "ending recovery"))?;
        request_node(opts, NodeKind::Block, dev_id);
        log::info!(
            "ublk device {dev_id} recovered after {:?}: {} queue(s), {:?} data path",
            start.elapsed(),
            info.nr_hw_queues,
            device.data_path
        );
        Ok(device)
    }

    fn dev_sectors_of(control: &mut Control, dev_id: u32) -> Result<u64, DeviceError> {
        let params = control
            .params(dev_id)
            .map_err(control_err(dev_id, "reading parameters"))?;
        Ok(params.basic.dev_sectors)
    }

    fn spawn_queues(
        &mut self,
        handler: Arc<dyn RequestHandler>,
        dev_sectors: u64,
        opts: &UblkOptions,
    ) -> Result<(), DeviceError> {
        let dev_id = self.info.dev_id;
        let char_file = Arc::new(open_char(dev_id, opts.recovery_timeout)?);
        let limits = QueueLimits {
            dev_sectors,
            max_io_bytes: self.info.max_io_buf_bytes,
            depth: self.info.queue_depth,
        };
        for q_id in 0..self.info.nr_hw_queues {
            let cpus = if opts.pin_queues {
                self.queue_cpus(q_id)
            } else {
                Vec::new()
            };
            let setup = QueueSetup {
                q_id,
                cpus,
                limits,
                data_path: self.data_path,
                char_file: char_file.clone(),
                handler: handler.clone(),
            };
            let (tx, rx) = sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("ublk{dev_id}q{q_id}"))
                .spawn(move || run_queue(setup, tx))
                .map_err(|e| DeviceError::Queue {
                    dev_id,
                    q_id,
                    why: format!("spawning its thread: {e}"),
                })?;
            self.queues.push(thread);
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(DeviceError::Queue { dev_id, q_id, why }),
                Err(_) => {
                    return Err(DeviceError::Queue {
                        dev_id,
                        q_id,
                        why: "its thread ended before fetching".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The CPUs queue `q_id` serves, or none (the thread then runs anywhere) when the kernel
    /// does not say.
    fn queue_cpus(&mut self, q_id: u16) -> Vec<usize> {
        let dev_id = self.info.dev_id;
        match self.control.queue_affinity(dev_id, q_id) {
            Ok(cpus) => cpus,
            Err(e) => {
                log::warn!(
                    "ublk device {dev_id} queue {q_id}: reading its CPU affinity failed ({}); \
                     its thread runs on any CPU (requests may then wake it on another CPU, \
                     which is slower but correct)",
                    crate::error_chain::ErrorChain(&e)
                );
                Vec::new()
            }
        }
    }

    /// Device id (`N` of `/dev/ublkbN`).
    pub fn dev_id(&self) -> u32 {
        self.info.dev_id
    }

    /// Block node of this device.
    pub fn block_path(&self) -> PathBuf {
        block_path(self.info.dev_id)
    }

    /// Whether READ data goes through USER_COPY.
    pub fn user_copy(&self) -> bool {
        self.data_path == DataPath::UserCopy
    }

    /// The device as the kernel described it at creation or recovery.
    pub fn info(&self) -> &DevInfo {
        &self.info
    }

    /// True once every queue thread has ended (the device was stopped, or a queue failed).
    pub fn queues_finished(&self) -> bool {
        self.queues.iter().all(JoinHandle::is_finished)
    }

    /// Stop and delete the device; returns the requests its queues committed.
    pub fn remove(mut self) -> Result<QueueReport, DeviceError> {
        let dev_id = self.info.dev_id;
        self.control
            .stop(dev_id)
            .map_err(control_err(dev_id, "stopping"))?;
        let report = self.join_queues();
        self.control
            .delete(dev_id)
            .map_err(control_err(dev_id, "deleting"))?;
        log::info!("ublk device {dev_id} removed");
        Ok(report)
    }

    /// Wait for the queue threads (they end when the device is stopped from elsewhere).
    pub fn wait(mut self) -> QueueReport {
        self.join_queues()
    }

    fn join_queues(&mut self) -> QueueReport {
        let mut total = QueueReport::default();
        for (q_id, t) in self.queues.drain(..).enumerate() {
            match t.join() {
                Ok(Ok(r)) => {
                    total.committed = total.committed.saturating_add(r.committed);
                    total.failed = total.failed.saturating_add(r.failed);
                }
                Ok(Err(e)) => log::error!(
                    "ublk device {} queue {q_id}: {}",
                    self.info.dev_id,
                    crate::error_chain::ErrorChain(&e)
                ),
                Err(_) => log::error!(
                    "ublk device {} queue {q_id}: its thread panicked",
                    self.info.dev_id
                ),
            }
        }
        total
    }

    /// Undo a half-made device as far as possible: stop it. Queue threads that fetched keep
    /// the character node open, and the kernel deletes nothing while it is open, so they are
    /// left to end with the process (which is what follows a failed creation).
    fn teardown(&mut self) {
        let dev_id = self.info.dev_id;
        if let Err(e) = self.control.stop(dev_id) {
            log::debug!("ublk device {dev_id}: stop during teardown: {e}");
        }
        let fetched = std::mem::take(&mut self.queues);
        if fetched.is_empty() {
            if let Err(e) = self.control.delete(dev_id) {
                log::warn!(
                    "ublk device {dev_id}: deleting the half-made device failed: {}",
                    crate::error_chain::ErrorChain(&e)
                );
            }
        } else {
            log::warn!(
                "ublk device {dev_id}: creation failed after {} queue(s) fetched; the device \
                 goes when this process exits",
                fetched.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_outside_the_supported_shape_are_refused() {
        let ok = UblkOptions::default();
        assert!(ok.check().is_ok());
        for bad in [
            UblkOptions {
                queues: 0,
                ..ok.clone()
            },
            UblkOptions {
                depth: MIN_QUEUE_DEPTH - 1,
                ..ok.clone()
            },
            UblkOptions {
                depth: MAX_QUEUE_DEPTH + 1,
                ..ok.clone()
            },
            UblkOptions {
                max_io_bytes: 4096 + 512,
                ..ok.clone()
            },
            UblkOptions {
                max_io_bytes: MAX_IO_BYTES + 4096,
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.check(), Err(DeviceError::Options(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn identities_are_stable_distinct_and_never_zero() {
        assert_eq!(identity_of("system_b"), identity_of("system_b"));
        assert_ne!(identity_of("system_b"), identity_of("vendor_b"));
        assert_ne!(identity_of("system_b"), identity_of("system_b-init"));
        assert_ne!(identity_of(""), 0);
    }

    #[test]
    fn a_second_stage_name_takes_over_its_first_stage_device() {
        assert_eq!(takeover_names("system_b"), ["system_b", "system_b-init"]);
        // A first-stage name is looked up as itself only.
        assert_eq!(takeover_names("system_b-init"), ["system_b-init"]);
    }

    #[test]
    fn creating_without_ublk_is_a_clear_error() {
        if crate::ublk::available() {
            return; // A host with ublk: nothing to check here.
        }
        struct Nothing;
        impl RequestHandler for Nothing {
            fn handle(
                &self,
                _: &crate::dm_user::Request,
                _: &[u8],
                _: &mut Vec<u8>,
            ) -> crate::dm_user::ResponseCode {
                crate::dm_user::ResponseCode::Error
            }
        }
        let err = UblkDevice::create(Arc::new(Nothing), 8, &UblkOptions::default()).unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Control {
                source: ControlError::Open { .. },
                ..
            }
        ));
        assert!(err.to_string().contains("ublk device"));
    }
}
