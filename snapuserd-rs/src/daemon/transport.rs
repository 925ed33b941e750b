//! The request transport: worker threads that serve one handler's dm-user misc device.
//!
//! A [`RequestHandler`] decides requests; it knows nothing of how they arrive. A worker
//! owns one [`Channel`] (one `open()` of `/dev/dm-user/<misc>`), reads a request, asks the
//! handler for the status (and READ data) *before* writing anything back, and answers with
//! one response. The handler may ask for a request to be held ([`RequestHandler::hold`]):
//! the worker keeps it, unprocessed and unanswered, serves later requests (dm-user lets a
//! channel answer out of order), and offers it again each time the worker is woken.
//!
//! Workers sleep in `epoll_wait` on two fds: the channel, registered with `EPOLLEXCLUSIVE`,
//! and the worker's own eventfd ([`WorkerControl`]). All channels of a target share one
//! kernel wait queue, so without `EPOLLEXCLUSIVE` every request would wake every worker of
//! the handler; with it a request wakes one sleeping worker. Where an exclusive epoll cannot
//! be set up the worker sleeps in `poll` instead (every worker woken). Nothing ticks: a request, a stop, or a wake-up (the handler's hold
//! condition changed) is what runs a worker. Every request read is answered, except when
//! the channel itself can no longer carry the answer. A worker ends when its target is gone
//! (`ENOTBLK`, or end of stream on a test transport), when it is stopped (held requests are
//! answered first), or when the channel fails; it never takes the process down.
//!
//! Channels are produced by a [`ChannelOpener`], the seam that lets tests drive workers
//! through a socketpair playing the kernel.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;

use super::answer_buffers::AnswerBuffers;
use super::events::Notifier;
use crate::dm_user::{
    AnswerPiece, Channel, ChannelError, MessageHeader, Received, Request, ResponseCode,
    DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE, DM_USER_RESP_ERROR, SPLICE_MIN_PAYLOAD,
};
use crate::error_chain::ErrorChain;
use crate::log_limit::LogLimit;
use crate::snapshot::block_server::MAX_REQUEST_BYTES;

/// Piece size used to discard an over-long WRITE payload.
const DRAIN_PIECE: usize = 64 << 10;

/// Most requests one worker holds for its handler; later ones are processed at once.
pub const MAX_HELD_REQUESTS: usize = 8;

/// Errors of the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// Opening a channel for a worker failed.
    #[error("opening dm-user channel {index} for {misc}")]
    Open {
        /// Misc name of the handler.
        misc: String,
        /// Index of the worker.
        index: u32,
        /// Underlying error.
        #[source]
        source: ChannelError,
    },
    /// Creating a worker's wake-up eventfd failed.
    #[error("creating the wake-up eventfd of worker {index} for {misc}")]
    WakeFd {
        /// Misc name of the handler.
        misc: String,
        /// Index of the worker.
        index: u32,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Spawning a worker thread failed.
    #[error("spawning worker {index} for {misc}")]
    Spawn {
        /// Misc name of the handler.
        misc: String,
        /// Index of the worker.
        index: u32,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Something that answers block requests: the block server of one snapshot, behind
/// whatever transport carries the requests.
pub trait RequestHandler: Send + Sync {
    /// Decide the status of `req` and, for a successful READ, fill `read_out` with `req.len`
    /// bytes. `write_payload` holds a WRITE's payload.
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> ResponseCode;

    /// True to hold `req` for now: the transport neither processes nor answers it, and asks
    /// again each time its worker is woken ([`WorkerGroup::wake`]); a stopping worker
    /// processes it regardless. The default holds nothing.
    fn hold(&self, req: &Request) -> bool {
        let _ = req;
        false
    }

    /// For a READ whose every byte is, unchanged, at one place of one file: that file and
    /// the byte offset. The transport may then splice the answer from the file's page cache
    /// (no copy through the daemon's memory) instead of calling [`RequestHandler::handle`];
    /// the bytes there must stay what `handle` would return for as long as the handler
    /// lives. The default names no file.
    fn read_from_file(&self, req: &Request) -> Option<(&std::fs::File, u64)> {
        let _ = req;
        None
    }

    /// For a READ the handler can describe as pieces (runs of a file's bytes that stay put
    /// while it holds its locks, and bytes it produces into `produced`): plan them and call
    /// `send` once with the pieces and the produced bytes, while the bytes they name stay
    /// what [`RequestHandler::handle`] would return. `send` returns whether the answer went
    /// out; this returns that, or `None` when the handler does not answer this request in
    /// pieces (the transport then calls [`RequestHandler::handle`]). The default plans
    /// nothing.
    fn read_in_pieces(
        &self,
        req: &Request,
        produced: &mut Vec<u8>,
        send: &mut dyn FnMut(&[AnswerPiece<'_>], &[u8]) -> bool,
    ) -> Option<bool> {
        let _ = (req, produced, send);
        None
    }

    /// Fill `out`, exactly the length of the READ `req`, with its bytes: for transports that
    /// give the handler the memory the answer must end up in (ublk, whose buffer is
    /// page-aligned so that runs can be read into it with `O_DIRECT`). The default produces
    /// the answer with [`RequestHandler::handle`] and copies it; an answer of another length
    /// is an error.
    fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
        let mut data = Vec::new();
        match self.handle(req, &[], &mut data) {
            ResponseCode::Success if data.len() == out.len() => {
                out.copy_from_slice(&data);
                ResponseCode::Success
            }
            ResponseCode::Success => {
                log::error!(
                    "READ at sector {}: the handler returned {} bytes for a {}-byte request; \
                     failing it (a handler bug: report it)",
                    req.sector,
                    data.len(),
                    out.len()
                );
                ResponseCode::Error
            }
            other => other,
        }
    }

    /// Called after the answer to `req` went out and the buffer it was produced in was
    /// released: work that must not delay an answer nor keep its buffer (read-ahead advice
    /// for the requests to come). The default does nothing.
    fn answered(&self, req: &Request) {
        let _ = req;
    }
}

/// Runs once every worker of a handler has stopped serving.
pub type EndHook = Arc<dyn Fn() + Send + Sync>;

/// Opens the channels of a handler's misc device.
pub trait ChannelOpener: Send + Sync {
    /// Open one new channel on the misc device named `misc`.
    fn open(&self, misc: &str) -> Result<Channel, ChannelError>;
}

/// Opens `<dir>/<misc>` (by default `/dev/dm-user/<misc>`), waiting for the node to appear.
#[derive(Debug, Clone)]
pub struct DevDmUser {
    dir: PathBuf,
    timeout: Duration,
}

impl DevDmUser {
    /// Open nodes under `dir`, waiting up to `timeout` for each to appear.
    pub fn new(dir: &Path, timeout: Duration) -> Self {
        Self {
            dir: dir.to_path_buf(),
            timeout,
        }
    }
}

impl Default for DevDmUser {
    fn default() -> Self {
        Self::new(Path::new(crate::dm_user::DEV_DIR), Duration::from_secs(10))
    }
}

impl ChannelOpener for DevDmUser {
    fn open(&self, misc: &str) -> Result<Channel, ChannelError> {
        Channel::open_path(&self.dir.join(misc), self.timeout)
    }
}

/// Why a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// The target was destroyed (`ENOTBLK`) or the peer closed the channel.
    TargetGone,
    /// The worker was stopped.
    Stopped,
    /// The channel failed (logged); the other workers carry on.
    ChannelFailed,
}

/// Counters of one worker, returned when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerReport {
    /// Why it ended.
    pub exit: WorkerExit,
    /// Requests answered.
    pub answered: u64,
}

/// The stop flag and wake-up eventfd of one worker.
///
/// The eventfd is written after the flag (or the handler's hold condition) changes and read
/// by the worker before it looks at them again, so no change is missed and an idle worker
/// costs no wake-ups.
#[derive(Debug)]
pub struct WorkerControl {
    stop: AtomicBool,
    wake: EventFd,
}

impl WorkerControl {
    /// A control with the stop flag clear.
    pub fn new() -> std::io::Result<Self> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Self {
            stop: AtomicBool::new(false),
            wake,
        })
    }

    /// Wake the worker so that it offers its held requests to the handler again.
    pub fn wake(&self) {
        // EAGAIN only when the counter is saturated: the worker is woken anyway.
        if let Err(e) = self.wake.write(1) {
            if e != Errno::EAGAIN {
                log::error!("waking a dm-user worker: {chain}", chain = ErrorChain(&e));
            }
        }
    }

    /// Ask the worker to stop: it answers its held requests and ends.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Reset the eventfd's counter (before the worker looks at what changed).
    fn clear(&self) {
        // EAGAIN: nothing was pending.
        let _ = self.wake.read();
    }
}

/// What woke a waiting worker.
enum Event {
    /// The channel has a message (or hung up): `receive` tells which.
    Channel,
    /// The worker's control was written.
    Control,
}

/// Epoll token of the channel.
const CHANNEL_TOKEN: u64 = 1;
/// Epoll token of the worker's control eventfd.
const CONTROL_TOKEN: u64 = 2;

/// Where a worker sleeps: an epoll instance watching its channel with `EPOLLEXCLUSIVE` (a
/// request wakes one sleeping worker of the target, not all) and its control eventfd.
struct Sleeper {
    epoll: Epoll,
}

impl Sleeper {
    fn new(channel: &Channel, control: &WorkerControl) -> nix::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            channel.as_fd(),
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
                CHANNEL_TOKEN,
            ),
        )?;
        epoll.add(
            control.wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, CONTROL_TOKEN),
        )?;
        Ok(Self { epoll })
    }

    /// Sleep until the channel or the control has something. A signal only restarts the wait.
    fn wait(&self) -> Result<Event, ChannelError> {
        loop {
            let mut events = [EpollEvent::empty(); 2];
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(ChannelError::Io {
                        op: "epoll_wait",
                        source: e.into(),
                    })
                }
            };
            let got = events.get(..n).unwrap_or_default();
            if got.iter().any(|e| e.data() == CONTROL_TOKEN) {
                return Ok(Event::Control);
            }
            if got.iter().any(|e| e.data() == CHANNEL_TOKEN) {
                return Ok(Event::Channel);
            }
        }
    }
}

/// Sleep until the channel or the control has something, in `poll` (the fallback when no
/// exclusive epoll could be set up). A signal only restarts the wait.
fn wait(channel: &Channel, control: &WorkerControl) -> Result<Event, ChannelError> {
    loop {
        let mut fds = [
            PollFd::new(channel.as_fd(), PollFlags::POLLIN),
            PollFd::new(control.wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(ChannelError::Io {
                    op: "poll",
                    source: e.into(),
                })
            }
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[1]) {
            return Ok(Event::Control);
        }
        if ready(&fds[0]) {
            return Ok(Event::Channel);
        }
    }
}

/// Sleep until the channel is readable (mid-payload on a non-blocking channel).
fn wait_readable(channel: &Channel) -> Result<(), ChannelError> {
    let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(ChannelError::Io {
            op: "poll",
            source: e.into(),
        }),
    }
}

/// A request held for the handler.
struct Held {
    header: MessageHeader,
    payload: Vec<u8>,
}

/// Serve `channel` with `handler` until the target goes away, `control` is stopped, or the
/// channel fails. Runs on the calling thread.
///
/// Requests the handler holds ([`RequestHandler::hold`]) are kept, up to
/// [`MAX_HELD_REQUESTS`], and offered again in arrival order at each wake-up; a stopped
/// worker processes and answers them before it ends. READ answers are produced into a
/// buffer taken from `buffers` for the time of one answer (shared by a handler's workers).
pub fn serve_channel(
    mut channel: Channel,
    handler: &dyn RequestHandler,
    control: &WorkerControl,
    buffers: &AnswerBuffers,
) -> WorkerReport {
    let mut answered = 0u64;
    let max_payload = usize::try_from(MAX_REQUEST_BYTES).unwrap_or(usize::MAX);
    channel.set_max_payload(max_payload);
    if let Err(e) = channel.set_nonblocking(true) {
        log::error!("dm-user worker: {}", ErrorChain(&e));
        return WorkerReport {
            exit: WorkerExit::ChannelFailed,
            answered,
        };
    }
    let sleeper = match Sleeper::new(&channel, control) {
        Ok(sleeper) => Some(sleeper),
        Err(e) => {
            log::warn!(
                "dm-user worker: no exclusive epoll ({e}); sleeping in poll(), so every \
                 request wakes every worker of this handler"
            );
            None
        }
    };
    let mut payload = Vec::new();
    let mut held: Vec<Held> = Vec::new();
    let request_log = LogLimit::new();
    let mut times = StageTimes::default();
    let exit = 'serve: loop {
        let stopping = control.stopping();
        if !held.is_empty() {
            let mut index = 0;
            while let Some(h) = held.get(index) {
                if !stopping && handler.hold(&h.header.request()) {
                    index += 1;
                    continue;
                }
                let h = held.remove(index);
                match answer(
                    &mut channel,
                    handler,
                    &h.header,
                    &h.payload,
                    buffers,
                    &mut times,
                ) {
                    Ok(()) => answered = answered.saturating_add(1),
                    Err(exit) => break 'serve exit,
                }
            }
        }
        if stopping {
            break WorkerExit::Stopped;
        }
        let t = Instant::now();
        let woken = match &sleeper {
            Some(sleeper) => sleeper.wait(),
            None => wait(&channel, control),
        };
        times.waiting += t.elapsed();
        match woken {
            Ok(Event::Control) => {
                control.clear();
                continue;
            }
            Ok(Event::Channel) => {}
            Err(e) => {
                log::error!("dm-user worker: {}", ErrorChain(&e));
                break WorkerExit::ChannelFailed;
            }
        }
        let t = Instant::now();
        let received = channel.receive(&mut payload);
        times.receiving += t.elapsed();
        let header = match received {
            Ok(Received::Request(h)) => h,
            Ok(Received::TargetGone) => break WorkerExit::TargetGone,
            // Another channel took the message, or a signal came first: wait again.
            Err(ChannelError::WouldBlock | ChannelError::Interrupted) => continue,
            Err(ChannelError::UnexpectedEof { got: 0, .. }) => break WorkerExit::TargetGone,
            Err(ChannelError::PayloadTooLarge { seq, len, max }) => {
                crate::log_limited!(
                    request_log,
                    log::Level::Error,
                    "dm-user WRITE seq {seq}: {len}-byte payload over the {max}-byte cap; \
                     answering ERROR"
                );
                match refuse_oversized_write(&mut channel, seq, len) {
                    Ok(()) => {
                        answered = answered.saturating_add(1);
                        continue;
                    }
                    Err(exit) => break exit,
                }
            }
            Err(e) => {
                log::error!("dm-user worker: {}", ErrorChain(&e));
                break WorkerExit::ChannelFailed;
            }
        };
        if handler.hold(&header.request()) {
            if held.len() < MAX_HELD_REQUESTS {
                log::debug!("holding request seq {}", header.seq);
                held.push(Held {
                    header,
                    payload: std::mem::take(&mut payload),
                });
                continue;
            }
            crate::log_limited!(
                request_log,
                log::Level::Warn,
                "{MAX_HELD_REQUESTS} requests are held already; processing seq {} now",
                header.seq
            );
        }
        let t = Instant::now();
        let answered_now = answer(
            &mut channel,
            handler,
            &header,
            &payload,
            buffers,
            &mut times,
        );
        times.answering += t.elapsed();
        match answered_now {
            Ok(()) => answered = answered.saturating_add(1),
            Err(exit) => break exit,
        }
    };
    if !held.is_empty() {
        log::warn!(
            "dm-user worker ended ({exit:?}) with {} held requests the channel can no longer \
             answer; the kernel fails them",
            held.len()
        );
    }
    match exit {
        WorkerExit::ChannelFailed => log::warn!("dm-user worker ended after {answered} requests"),
        _ => log::debug!(
            "dm-user worker ended ({exit:?}) after {answered} requests; {times}, draining pipes {:.1} ms",
            channel.drain_time().as_secs_f64() * 1e3
        ),
    }
    WorkerReport { exit, answered }
}

/// Where a worker's time went, for the log line it writes when it ends.
#[derive(Debug, Default)]
struct StageTimes {
    /// Asleep until a request (or a control event) came.
    waiting: Duration,
    /// Reading request headers (and WRITE payloads) from the channel.
    receiving: Duration,
    /// Producing answers and sending them.
    answering: Duration,
    /// The part of `answering` spent sending answers in pieces (filling the pipe and
    /// splicing it into the channel); the rest of it is producing them.
    sending_pieces: Duration,
}

impl std::fmt::Display for StageTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "time waiting {:.1} ms, receiving {:.1} ms, answering {:.1} ms (of which sending \
             pieces {:.1} ms)",
            self.waiting.as_secs_f64() * 1e3,
            self.receiving.as_secs_f64() * 1e3,
            self.answering.as_secs_f64() * 1e3,
            self.sending_pieces.as_secs_f64() * 1e3
        )
    }
}

/// Decide the status of one request with `handler` and send the response; a READ's
/// answer is produced into a buffer of `buffers`, given back once it is sent.
fn answer(
    channel: &mut Channel,
    handler: &dyn RequestHandler,
    header: &MessageHeader,
    payload: &[u8],
    buffers: &AnswerBuffers,
    times: &mut StageTimes,
) -> Result<(), WorkerExit> {
    let mut data = buffers.take();
    let answered = answer_into(channel, handler, header, payload, &mut data, times);
    buffers.give_back(data);
    if answered.is_ok() {
        handler.answered(&header.request());
    }
    answered
}

/// [`answer`], producing into `data`.
fn answer_into(
    channel: &mut Channel,
    handler: &dyn RequestHandler,
    header: &MessageHeader,
    payload: &[u8],
    data: &mut Vec<u8>,
    times: &mut StageTimes,
) -> Result<(), WorkerExit> {
    let request = header.request();
    if header.msg_type == DM_USER_REQ_MAP_READ {
        match splice_answer(channel, handler, header, &request, data, times) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(ChannelError::TargetGone) => return Err(WorkerExit::TargetGone),
            Err(e) => {
                log::error!(
                    "dm-user worker: splicing the answer to seq {}: {}",
                    header.seq,
                    ErrorChain(&e)
                );
                return Err(WorkerExit::ChannelFailed);
            }
        }
    }
    let status = handler.handle(&request, payload, data);
    let body: &[u8] = if status == ResponseCode::Success && header.msg_type == DM_USER_REQ_MAP_READ
    {
        data
    } else {
        &[]
    };
    respond(channel, header, status.to_wire(), body)
}

/// Answer the READ `header` without producing it whole, if the handler and the channel allow:
/// in pieces (a large READ on a channel that splices; it covers a READ wholly in one file too),
/// else straight from one file. `Ok(false)`: nothing was sent, produce the answer instead.
fn splice_answer(
    channel: &mut Channel,
    handler: &dyn RequestHandler,
    header: &MessageHeader,
    request: &Request,
    data: &mut Vec<u8>,
    times: &mut StageTimes,
) -> Result<bool, ChannelError> {
    // Below SPLICE_MIN_PAYLOAD the extra system calls cost more than the copy they save.
    if header.len >= SPLICE_MIN_PAYLOAD as u64 && channel.splices() {
        let mut failure = None;
        let sent = handler.read_in_pieces(request, data, &mut |pieces, produced| {
            let t = Instant::now();
            let outcome = channel.respond_pieces(header, pieces, produced);
            times.sending_pieces += t.elapsed();
            match outcome {
                Ok(sent) => sent,
                Err(e) => {
                    failure = Some(e);
                    true
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(sent) = sent {
            return Ok(sent);
        }
    }
    match handler.read_from_file(request) {
        Some((file, offset)) => channel.respond_from_file(header, file, offset),
        None => Ok(false),
    }
}

/// Send one response; the exit it forces if the channel cannot carry it.
fn respond(
    channel: &mut Channel,
    header: &MessageHeader,
    code: u64,
    body: &[u8],
) -> Result<(), WorkerExit> {
    match channel.respond(header, code, body) {
        Ok(()) => Ok(()),
        Err(ChannelError::TargetGone) => Err(WorkerExit::TargetGone),
        Err(e) => {
            log::error!(
                "dm-user worker: answering seq {}: {}",
                header.seq,
                ErrorChain(&e)
            );
            Err(WorkerExit::ChannelFailed)
        }
    }
}

/// Read and discard the `len`-byte payload of an over-long WRITE, then answer it ERROR, so
/// the channel stays in step and the request is not dropped.
fn refuse_oversized_write(channel: &mut Channel, seq: u64, len: u64) -> Result<(), WorkerExit> {
    let mut left = len;
    let mut piece = vec![0u8; DRAIN_PIECE];
    while left > 0 {
        let want = usize::try_from(left.min(DRAIN_PIECE as u64)).unwrap_or(DRAIN_PIECE);
        let buf = piece.get_mut(..want).unwrap_or_default();
        match channel.file().read(buf) {
            Ok(0) => return Err(WorkerExit::TargetGone),
            Ok(n) => left = left.saturating_sub(n as u64),
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOTBLK) => return Err(WorkerExit::TargetGone),
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if let Err(e) = wait_readable(channel) {
                        log::error!(
                            "dm-user worker: discarding payload of seq {seq}: {}",
                            ErrorChain(&e)
                        );
                        return Err(WorkerExit::ChannelFailed);
                    }
                }
                _ => {
                    log::error!(
                        "dm-user worker: discarding payload of seq {seq}: {chain}",
                        chain = ErrorChain(&e)
                    );
                    return Err(WorkerExit::ChannelFailed);
                }
            },
        }
    }
    let header = MessageHeader {
        seq,
        msg_type: DM_USER_REQ_MAP_WRITE,
        flags: 0,
        sector: 0,
        len,
    };
    respond(channel, &header, DM_USER_RESP_ERROR, &[])
}

/// The controls of one handler's workers: stop them, or wake them when the handler's hold
/// condition changed.
#[derive(Debug)]
pub struct WorkerGroup {
    controls: Vec<Arc<WorkerControl>>,
}

impl WorkerGroup {
    /// Wake every worker so that each offers its held requests to the handler again.
    pub fn wake(&self) {
        self.controls.iter().for_each(|c| c.wake());
    }

    /// Ask every worker to stop.
    pub fn stop(&self) {
        self.controls.iter().for_each(|c| c.stop());
    }
}

/// The worker threads of one handler.
#[derive(Debug)]
pub struct Workers {
    group: Arc<WorkerGroup>,
    threads: Vec<JoinHandle<WorkerReport>>,
    /// Workers whose serving loop has not ended yet (lowered before `on_exit` is woken, so
    /// whoever it wakes sees the count that woke it).
    serving: Arc<AtomicUsize>,
}

impl Workers {
    /// Open `count` channels on `misc` with `opener` (all before any thread starts, so a
    /// missing device fails the whole start), then serve each on its own thread. Each
    /// worker that ends wakes `on_exit`.
    pub fn spawn(
        opener: &dyn ChannelOpener,
        misc: &str,
        handler: Arc<dyn RequestHandler>,
        count: u32,
        on_exit: Option<Notifier>,
    ) -> Result<Self, TransportError> {
        Self::spawn_with_end_hook(opener, misc, handler, count, on_exit, None)
    }

    /// [`spawn`](Self::spawn), and `on_all_ended` runs (on the last worker's thread) once
    /// every worker has stopped serving, whatever the reason.
    pub fn spawn_with_end_hook(
        opener: &dyn ChannelOpener,
        misc: &str,
        handler: Arc<dyn RequestHandler>,
        count: u32,
        on_exit: Option<Notifier>,
        on_all_ended: Option<EndHook>,
    ) -> Result<Self, TransportError> {
        let mut channels = Vec::new();
        let mut controls = Vec::new();
        for index in 0..count.max(1) {
            let channel = opener.open(misc).map_err(|source| TransportError::Open {
                misc: misc.to_string(),
                index,
                source,
            })?;
            channels.push(channel);
            let control = WorkerControl::new().map_err(|source| TransportError::WakeFd {
                misc: misc.to_string(),
                index,
                source,
            })?;
            controls.push(Arc::new(control));
        }
        let buffers = Arc::new(AnswerBuffers::default());
        let mut workers = Workers {
            group: Arc::new(WorkerGroup {
                controls: controls.clone(),
            }),
            threads: Vec::new(),
            serving: Arc::new(AtomicUsize::new(0)),
        };
        for ((index, channel), control) in (0u32..).zip(channels).zip(controls) {
            let handler = Arc::clone(&handler);
            let buffers = Arc::clone(&buffers);
            let on_exit = on_exit.clone();
            let on_all_ended = on_all_ended.clone();
            let serving = Arc::clone(&workers.serving);
            serving.fetch_add(1, Ordering::AcqRel);
            let spawned = std::thread::Builder::new()
                .name(format!("snapuserd-{index}"))
                .spawn(move || {
                    let report = serve_channel(channel, handler.as_ref(), &control, &buffers);
                    if serving.fetch_sub(1, Ordering::AcqRel) == 1 {
                        if let Some(hook) = on_all_ended {
                            hook();
                        }
                    }
                    if let Some(n) = on_exit {
                        n.notify();
                    }
                    report
                });
            match spawned {
                Ok(t) => workers.threads.push(t),
                Err(source) => {
                    workers.serving.fetch_sub(1, Ordering::AcqRel);
                    workers.stop_and_join();
                    return Err(TransportError::Spawn {
                        misc: misc.to_string(),
                        index,
                        source,
                    });
                }
            }
        }
        Ok(workers)
    }

    /// The controls of these workers, for whoever changes the handler's hold condition.
    pub fn group(&self) -> Arc<WorkerGroup> {
        Arc::clone(&self.group)
    }

    /// True once every worker has stopped serving.
    pub fn all_finished(&self) -> bool {
        self.serving.load(Ordering::Acquire) == 0
    }

    /// Ask every worker to stop (each is woken at once).
    pub fn request_stop(&self) {
        self.group.stop();
    }

    /// Stop every worker and wait for it; returns the reports of the workers that ended
    /// normally (a panicked worker is logged and left out).
    pub fn stop_and_join(&mut self) -> Vec<WorkerReport> {
        self.request_stop();
        let mut reports = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(r) => reports.push(r),
                Err(_) => log::error!("a dm-user worker thread panicked"),
            }
        }
        reports
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm_user::{DM_USER_RESP_SUCCESS, DM_USER_RESP_UNSUPPORTED, HEADER_SIZE};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    /// Answers READs with the sector number repeated, counts WRITE payload bytes, refuses
    /// everything else.
    #[derive(Default)]
    struct Fake {
        written: Mutex<Vec<u8>>,
    }

    impl RequestHandler for Fake {
        fn handle(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> ResponseCode {
            match req.kind {
                0 if req.len <= 1 << 20 => {
                    out.clear();
                    out.resize(req.len as usize, req.sector as u8);
                    ResponseCode::Success
                }
                0 => ResponseCode::Error,
                1 => {
                    self.written.lock().unwrap().extend_from_slice(payload);
                    ResponseCode::Success
                }
                _ => ResponseCode::Unsupported,
            }
        }
    }

    fn header(seq: u64, kind: u64, sector: u64, len: u64) -> [u8; HEADER_SIZE] {
        MessageHeader {
            seq,
            msg_type: kind,
            flags: 0,
            sector,
            len,
        }
        .to_bytes()
    }

    fn read_response(kernel: &mut UnixStream) -> MessageHeader {
        let mut raw = [0u8; HEADER_SIZE];
        kernel.read_exact(&mut raw).unwrap();
        MessageHeader::from_bytes(&raw)
    }

    fn start(
        handler: Arc<dyn RequestHandler>,
    ) -> (UnixStream, std::thread::JoinHandle<WorkerReport>) {
        let (kernel, daemon) = UnixStream::pair().unwrap();
        let channel = Channel::from_fd(daemon.into());
        let t = std::thread::spawn(move || {
            let control = WorkerControl::new().unwrap();
            serve_channel(
                channel,
                handler.as_ref(),
                &control,
                &AnswerBuffers::default(),
            )
        });
        (kernel, t)
    }

    #[test]
    fn read_write_unsupported_then_close_ends_worker() {
        let fake = Arc::new(Fake::default());
        let (mut kernel, t) = start(fake.clone());
        kernel.write_all(&header(7, 0, 3, 1024)).unwrap();
        let h = read_response(&mut kernel);
        assert_eq!(
            (h.seq, h.msg_type, h.sector, h.len),
            (7, DM_USER_RESP_SUCCESS, 3, 1024)
        );
        let mut data = vec![0u8; 1024];
        kernel.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == 3));

        kernel.write_all(&header(8, 1, 0, 5)).unwrap();
        kernel.write_all(b"hello").unwrap();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (8, DM_USER_RESP_SUCCESS));
        assert_eq!(&*fake.written.lock().unwrap(), b"hello");

        kernel.write_all(&header(9, 3, 0, 4096)).unwrap();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (9, DM_USER_RESP_UNSUPPORTED));

        // A failed READ gets a bare ERROR header: the next response follows directly.
        kernel.write_all(&header(10, 0, 0, 2 << 20)).unwrap();
        kernel.write_all(&header(11, 2, 0, 0)).unwrap();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (10, DM_USER_RESP_ERROR));
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (11, DM_USER_RESP_UNSUPPORTED));

        drop(kernel);
        let report = t.join().unwrap();
        assert_eq!(report.exit, WorkerExit::TargetGone);
        assert_eq!(report.answered, 5);
    }

    #[test]
    fn workers_taking_turns_at_large_reads_share_one_answer_buffer() {
        let buffers = Arc::new(AnswerBuffers::default());
        let fake: Arc<dyn RequestHandler> = Arc::new(Fake::default());
        let mut kernels = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..2 {
            let (kernel, daemon) = UnixStream::pair().unwrap();
            let channel = Channel::from_fd(daemon.into());
            let (handler, buffers) = (Arc::clone(&fake), Arc::clone(&buffers));
            threads.push(std::thread::spawn(move || {
                let control = WorkerControl::new().unwrap();
                serve_channel(channel, handler.as_ref(), &control, &buffers)
            }));
            kernels.push(kernel);
        }
        // One READ of 1 MiB at a time, alternating between the workers (queue depth 1).
        for seq in 0..6u64 {
            let kernel = &mut kernels[(seq % 2) as usize];
            kernel.write_all(&header(seq, 0, seq, 1 << 20)).unwrap();
            let h = read_response(kernel);
            assert_eq!((h.seq, h.msg_type), (seq, DM_USER_RESP_SUCCESS));
            let mut data = vec![0u8; 1 << 20];
            kernel.read_exact(&mut data).unwrap();
            assert!(data.iter().all(|&b| b == seq as u8));
            // The worker gives its buffer back just after the answer's last byte is sent.
            let given_back = Instant::now();
            while buffers.idle() == 0 {
                assert!(
                    given_back.elapsed() < Duration::from_secs(10),
                    "buffer kept"
                );
                std::thread::yield_now();
            }
        }
        drop(kernels);
        for t in threads {
            assert_eq!(t.join().unwrap().exit, WorkerExit::TargetGone);
        }
        assert_eq!(
            buffers.idle(),
            1,
            "both workers answered from the same buffer"
        );
    }

    #[test]
    fn oversized_write_is_drained_and_refused() {
        let fake = Arc::new(Fake::default());
        let (mut kernel, t) = start(fake.clone());
        let len = MAX_REQUEST_BYTES + 4096;
        let writer = {
            let mut k = kernel.try_clone().unwrap();
            std::thread::spawn(move || {
                k.write_all(&header(1, 1, 0, len)).unwrap();
                k.write_all(&vec![0xabu8; len as usize]).unwrap();
                k.write_all(&header(2, 0, 1, 512)).unwrap();
            })
        };
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type, h.len), (1, DM_USER_RESP_ERROR, len));
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (2, DM_USER_RESP_SUCCESS));
        let mut data = vec![0u8; 512];
        kernel.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == 1));
        writer.join().unwrap();
        assert!(fake.written.lock().unwrap().is_empty());
        drop(kernel);
        assert_eq!(t.join().unwrap().exit, WorkerExit::TargetGone);
    }

    struct PairOpener {
        kernels: Mutex<Vec<UnixStream>>,
    }

    impl ChannelOpener for PairOpener {
        fn open(&self, _misc: &str) -> Result<Channel, ChannelError> {
            let (k, d) = UnixStream::pair().map_err(|source| ChannelError::Io {
                op: "socketpair",
                source,
            })?;
            self.kernels.lock().unwrap().push(k);
            Ok(Channel::from_fd(d.into()))
        }
    }

    #[test]
    fn workers_each_serve_their_channel_and_stop_on_request() {
        let opener = PairOpener {
            kernels: Mutex::new(Vec::new()),
        };
        let mut workers = Workers::spawn(&opener, "x", Arc::new(Fake::default()), 3, None).unwrap();
        let mut kernels = std::mem::take(&mut *opener.kernels.lock().unwrap());
        assert_eq!(kernels.len(), 3);
        for (i, k) in (0u64..).zip(kernels.iter_mut()) {
            k.write_all(&header(100 + i, 0, i, 512)).unwrap();
            let h = read_response(k);
            assert_eq!((h.seq, h.msg_type), (100 + i, DM_USER_RESP_SUCCESS));
            let mut data = vec![0u8; 512];
            k.read_exact(&mut data).unwrap();
            assert!(data.iter().all(|&b| u64::from(b) == i));
        }
        assert!(!workers.all_finished());
        let reports = workers.stop_and_join();
        assert_eq!(reports.len(), 3);
        assert!(reports
            .iter()
            .all(|r| r.exit == WorkerExit::Stopped && r.answered == 1));
    }

    struct FailingOpener;

    impl ChannelOpener for FailingOpener {
        fn open(&self, _misc: &str) -> Result<Channel, ChannelError> {
            Err(ChannelError::TargetGone)
        }
    }

    #[test]
    fn spawn_fails_when_the_device_cannot_be_opened() {
        let err =
            Workers::spawn(&FailingOpener, "gone", Arc::new(Fake::default()), 2, None).unwrap_err();
        assert!(matches!(err, TransportError::Open { index: 0, .. }));
    }

    /// Holds 4 KiB WRITEs while `paused` is set, like the daemon's merge pause.
    struct Pausing {
        inner: Fake,
        paused: AtomicBool,
    }

    impl RequestHandler for Pausing {
        fn handle(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> ResponseCode {
            self.inner.handle(req, payload, out)
        }
        fn hold(&self, req: &Request) -> bool {
            self.paused.load(Ordering::Acquire) && req.kind == 1 && req.len == 4096
        }
    }

    #[test]
    fn held_requests_wait_for_a_wake_up_while_others_are_served() {
        let handler = Arc::new(Pausing {
            inner: Fake::default(),
            paused: AtomicBool::new(true),
        });
        let control = Arc::new(WorkerControl::new().unwrap());
        let (mut kernel, daemon) = UnixStream::pair().unwrap();
        let channel = Channel::from_fd(daemon.into());
        let t = {
            let (handler, control) = (handler.clone(), control.clone());
            std::thread::spawn(move || {
                serve_channel(
                    channel,
                    handler.as_ref(),
                    &control,
                    &AnswerBuffers::default(),
                )
            })
        };
        let fake = &handler.inner;
        let paused = &handler.paused;
        // A metadata write-back while paused: held, not processed.
        kernel.write_all(&header(1, 1, 8, 4096)).unwrap();
        kernel.write_all(&[b'a'; 4096]).unwrap();
        // An empty flush and a READ behind it are answered (out of order: the write waits).
        kernel.write_all(&header(2, 1, 0, 0)).unwrap();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (2, DM_USER_RESP_SUCCESS));
        kernel.write_all(&header(3, 0, 5, 512)).unwrap();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (3, DM_USER_RESP_SUCCESS));
        let mut data = vec![0u8; 512];
        kernel.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == 5));
        assert!(
            fake.written.lock().unwrap().is_empty(),
            "held, not processed"
        );
        // Resume: the worker is woken and answers the held write.
        paused.store(false, Ordering::Release);
        control.wake();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (1, DM_USER_RESP_SUCCESS));
        assert_eq!(&*fake.written.lock().unwrap(), &[b'a'; 4096]);
        // Paused again, then stopped: the held write is answered before the worker ends.
        paused.store(true, Ordering::Release);
        kernel.write_all(&header(4, 1, 8, 4096)).unwrap();
        kernel.write_all(&[b'b'; 4096]).unwrap();
        // A WRITE of another size is not a write-back: answered at once.
        kernel.write_all(&header(6, 1, 16, 5)).unwrap();
        kernel.write_all(b"other").unwrap();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (6, DM_USER_RESP_SUCCESS));
        kernel.write_all(&header(5, 0, 1, 512)).unwrap();
        let h = read_response(&mut kernel);
        assert_eq!(h.seq, 5);
        kernel.read_exact(&mut data).unwrap();
        control.stop();
        let h = read_response(&mut kernel);
        assert_eq!((h.seq, h.msg_type), (4, DM_USER_RESP_SUCCESS));
        let report = t.join().unwrap();
        assert_eq!((report.exit, report.answered), (WorkerExit::Stopped, 6));
        let written = fake.written.lock().unwrap();
        assert_eq!(written.len(), 4096 * 2 + 5);
        assert!(written[..4096].iter().all(|&b| b == b'a'));
        assert_eq!(
            &written[4096..4101],
            b"other",
            "answered before the held one"
        );
        assert!(written[4101..].iter().all(|&b| b == b'b'));
    }

    extern "C" fn ignore_signal(_: libc::c_int) {}

    /// A signal landing on a worker asleep in `poll` (libFuzzer's SIGALRM timer, a profiler)
    /// must not end it: the wait restarts and the next request is answered.
    #[test]
    fn signals_while_waiting_do_not_end_the_worker() {
        // SAFETY: installs a handler that does nothing (async-signal-safe) for SIGUSR2, which
        // no other test of this crate uses. SA_RESTART does not restart `poll`.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
        let (mut kernel, daemon) = UnixStream::pair().unwrap();
        let channel = Channel::from_fd(daemon.into());
        let control = Arc::new(WorkerControl::new().unwrap());
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = {
            let control = control.clone();
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                tid_tx.send(unsafe { libc::pthread_self() }).unwrap();
                serve_channel(
                    channel,
                    &Fake::default(),
                    &control,
                    &AnswerBuffers::default(),
                )
            })
        };
        let thread = tid_rx.recv().unwrap();
        for round in 0..20u64 {
            // SAFETY: the worker thread is alive (it answers below) and SIGUSR2 is handled.
            assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR2) }, 0);
            std::thread::sleep(Duration::from_millis(2));
            if round % 5 == 4 {
                kernel.write_all(&header(round, 0, 2, 512)).unwrap();
                let h = read_response(&mut kernel);
                assert_eq!((h.seq, h.msg_type), (round, DM_USER_RESP_SUCCESS));
                let mut data = vec![0u8; 512];
                kernel.read_exact(&mut data).unwrap();
            }
        }
        control.stop();
        let report = t.join().unwrap();
        assert_eq!((report.exit, report.answered), (WorkerExit::Stopped, 4));
    }
}
