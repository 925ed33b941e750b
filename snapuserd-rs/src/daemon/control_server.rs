//! The control socket: AOSP's text protocol (§C.1-C.2) over a Unix stream socket.
//!
//! One `recv()` of at most 512 bytes is one message; replies are bare ASCII. Connections are
//! persistent. A single thread polls the listening socket and every client. Clients are
//! bounded ([`MAX_CLIENTS`]); a client beyond that is accepted and closed at once. Replies
//! are sent without blocking; each client may have at most [`MAX_PENDING_REPLY_BYTES`]
//! unsent, and a client that lets more pile up (it never reads) is dropped, so no client can
//! make the daemon allocate without bound or stall the others.
//!
//! Commands that can take long (`init` opens and indexes a COW, `start` opens dm-user
//! channels, `delete` joins threads, `update-verify` waits up to 10 s per handler) run on a
//! job thread, at most [`MAX_JOBS`] at once and one per client; the reply comes back to the
//! poll loop through a channel and a wake-up socket, and that client's next message is not
//! read until then, so its replies stay in order. Every other client is served meanwhile.
//!
//! Malformed commands get `fail` and the connection stays; an unknown command gets `fail`
//! and the connection is closed, as AOSP does. `stop` stops every handler and ends
//! [`ControlServer::run`]; `detach` closes the listening socket and stops the user-space
//! merges at their next safe point (as AOSP), and `run` returns once every handler's workers
//! and every job have ended.

use crate::error_chain::ErrorChain;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use thiserror::Error;

use crate::daemon::control_protocol::{
    supports_reply, Command, ControlError, Reply, MAX_MESSAGE_SIZE,
};

use super::events::DaemonEvents;
use super::handlers::HandlerRegistry;
use super::handoff::LISTEN_BACKLOG;
use super::sockets::{ensure_listening, is_socket, type_and_family};

/// Most clients served at once; more are accepted and closed immediately.
pub const MAX_CLIENTS: usize = 32;

/// Most unsent reply bytes per client before the client is dropped.
pub const MAX_PENDING_REPLY_BYTES: usize = 4096;

/// Most slow commands running at once; beyond that a slow command is answered `fail`.
pub const MAX_JOBS: usize = MAX_CLIENTS;

/// Most bytes discarded after an over-long message (what is immediately readable).
const MAX_DISCARD_BYTES: usize = 64 << 10;

/// Errors of the control server.
#[derive(Debug, Error)]
pub enum ControlServerError {
    /// `ANDROID_SOCKET_<name>` does not hold an fd number.
    #[error("{var}={value:?} is not a file descriptor number")]
    BadInheritedFd {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
    },
    /// The inherited fd is not an open socket.
    #[error("{var}: fd {fd} is not an open socket")]
    NotASocket {
        /// The variable.
        var: String,
        /// The fd.
        fd: RawFd,
    },
    /// The inherited socket is not a Unix stream socket that listens or can be made to.
    #[error("{var}: fd {fd} is a socket but not a listening one")]
    NotListening {
        /// The variable.
        var: String,
        /// The fd.
        fd: RawFd,
    },
    /// Neither an inherited socket nor a path.
    #[error("no inherited socket {var} (init provides it; on a host pass -socket=<path>)")]
    NoSocket {
        /// The variable that was looked for.
        var: String,
    },
    /// Binding the socket path failed.
    #[error("binding control socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("control socket {op}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Take the socket init created for service socket `name` (`ANDROID_SOCKET_<name>` holds
/// its fd number), of any type. Call once per name, early in `main`.
pub fn inherited_socket(name: &str) -> Result<OwnedFd, ControlServerError> {
    let var = format!("ANDROID_SOCKET_{name}");
    let value =
        std::env::var(&var).map_err(|_| ControlServerError::NoSocket { var: var.clone() })?;
    let fd: RawFd = value
        .trim()
        .parse()
        .ok()
        .filter(|&fd: &RawFd| fd >= 0)
        .ok_or_else(|| ControlServerError::BadInheritedFd {
            var: var.clone(),
            value: value.clone(),
        })?;
    // SAFETY: fcntl(F_GETFD) only reads the fd's flags; any integer is an acceptable
    // argument (an unopened one yields EBADF).
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ControlServerError::NotASocket { var, fd });
    }
    // SAFETY: the fd is open (checked above) and stays open while borrowed here: nothing
    // closes it before the ownership decision below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if !is_socket(borrowed) {
        return Err(ControlServerError::NotASocket { var, fd });
    }
    // SAFETY: the fd is an open socket (checked above). init passed it to this process for
    // our exclusive use and nothing else in the process wraps it: each name is taken once,
    // at start-up, so the OwnedFd is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned)?;
    Ok(owned)
}

/// Take the control socket init created for service socket `name` and make sure it
/// listens (init creates it bound; AOSP's daemon calls `listen` itself).
pub fn inherited_listener(name: &str) -> Result<UnixListener, ControlServerError> {
    let owned = inherited_socket(name)?;
    let var = format!("ANDROID_SOCKET_{name}");
    let fd = owned.as_raw_fd();
    let stream = type_and_family(owned.as_fd()) == Some((libc::SOCK_STREAM, libc::AF_UNIX));
    if !stream || ensure_listening(owned.as_fd(), LISTEN_BACKLOG).is_err() {
        return Err(ControlServerError::NotListening { var, fd });
    }
    Ok(UnixListener::from(owned))
}

fn set_cloexec(fd: &impl AsFd) -> Result<(), ControlServerError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(|_| ())
        .map_err(|e| ControlServerError::Io {
            op: "fcntl",
            source: e.into(),
        })
}

/// Bind a listening Unix stream socket at `path` (host use). A stale socket file left at
/// the path is replaced; any other existing file is an error.
pub fn bind_listener(path: &Path) -> Result<UnixListener, ControlServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            // A failed removal shows up as the bind error below.
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|source| ControlServerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// How [`ControlServer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerExit {
    /// A `stop` command.
    StopCommand,
    /// The shutdown flag (a signal).
    Shutdown,
    /// `detach`, and every handler's workers have ended.
    Detached,
}

struct Client {
    id: u64,
    stream: UnixStream,
    pending: Vec<u8>,
    close_when_sent: bool,
    /// A job is running for this client; its next message waits.
    busy: bool,
}

/// A finished job: the client it belongs to and its reply.
struct JobDone {
    client: u64,
    reply: Reply,
}

enum Flow {
    Continue,
    Stop,
}

/// The control server.
pub struct ControlServer {
    listener: Option<UnixListener>,
    registry: Arc<HandlerRegistry>,
    clients: Vec<Client>,
    next_id: u64,
    detached: bool,
    jobs_running: usize,
    done_tx: Sender<JobDone>,
    done_rx: Receiver<JobDone>,
    /// Written by job threads (one byte per finished job) to wake the poll.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl ControlServer {
    /// Serve `listener` (made non-blocking) for `registry`.
    pub fn new(
        listener: UnixListener,
        registry: Arc<HandlerRegistry>,
    ) -> Result<Self, ControlServerError> {
        listener
            .set_nonblocking(true)
            .map_err(|source| ControlServerError::Io {
                op: "set_nonblocking",
                source,
            })?;
        let io = |op| move |source| ControlServerError::Io { op, source };
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(io("socketpair"))?;
        wake_tx
            .set_nonblocking(true)
            .map_err(io("set_nonblocking"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io("set_nonblocking"))?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Self {
            listener: Some(listener),
            registry,
            clients: Vec::new(),
            next_id: 0,
            detached: false,
            jobs_running: 0,
            done_tx,
            done_rx,
            wake_tx,
            wake_rx,
        })
    }

    /// Serve until `stop`, a stop requested on `events` (a signal), or `detach` followed by
    /// the end of every worker. On `stop` and a stop request every handler's workers are
    /// stopped and joined. The loop sleeps until a client, a job, `events` or an ended
    /// worker wakes it.
    pub fn run(&mut self, events: &DaemonEvents) -> Result<ServerExit, ControlServerError> {
        self.registry.notify_worker_exits(events.notifier());
        loop {
            events.drain();
            if events.stop_requested() {
                self.registry.shut_down();
                return Ok(ServerExit::Shutdown);
            }
            if self.detached && self.jobs_running == 0 && self.registry.all_workers_finished() {
                return Ok(ServerExit::Detached);
            }
            let (listener_ready, client_events) = self.wait(events)?;
            if let Flow::Stop = self.serve_clients(&client_events) {
                self.registry.shut_down();
                return Ok(ServerExit::StopCommand);
            }
            if listener_ready {
                self.accept_all();
            }
            // After `serve_clients`: poll's events are indexed by client position, and
            // this may drop a client.
            self.collect_jobs();
        }
    }

    /// Sleep until the listener, a client, a job or `events` has something.
    fn wait(&self, daemon: &DaemonEvents) -> Result<(bool, Vec<PollFlags>), ControlServerError> {
        let mut fds = Vec::with_capacity(self.clients.len().saturating_add(2));
        for c in &self.clients {
            let mut events = if c.busy {
                PollFlags::empty()
            } else {
                PollFlags::POLLIN
            };
            if !c.pending.is_empty() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(c.stream.as_fd(), events));
        }
        fds.push(PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(daemon.fd(), PollFlags::POLLIN));
        if let Some(l) = &self.listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, Vec::new())),
            Err(e) => {
                return Err(ControlServerError::Io {
                    op: "poll",
                    source: e.into(),
                })
            }
        }
        let mut events: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        let listener_ready = if self.listener.is_some() {
            events.pop().is_some_and(|e| !e.is_empty())
        } else {
            false
        };
        // The events' entry (drained at the top of `run`) and the job wake-up socket's
        // (drained in `collect_jobs`).
        events.pop();
        events.pop();
        Ok((listener_ready, events))
    }

    /// Hand every finished job's reply to its client (if still connected).
    fn collect_jobs(&mut self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        while let Ok(done) = self.done_rx.try_recv() {
            self.jobs_running = self.jobs_running.saturating_sub(1);
            let Some(i) = self.clients.iter().position(|c| c.id == done.client) else {
                continue;
            };
            let keep = match self.clients.get_mut(i) {
                Some(c) => {
                    c.busy = false;
                    c.pending
                        .extend_from_slice(done.reply.to_string().as_bytes());
                    flush(c)
                }
                None => true,
            };
            if !keep {
                self.clients.remove(i);
            }
        }
    }

    /// Run a slow command for client `id` on a job thread. False (and nothing started) when
    /// too many jobs run or the thread cannot be spawned.
    fn spawn_job(&mut self, id: u64, job: Job) -> bool {
        if self.jobs_running >= MAX_JOBS {
            log::warn!("control: {MAX_JOBS} slow commands running; refusing another");
            return false;
        }
        let registry = Arc::clone(&self.registry);
        let done = self.done_tx.clone();
        let Ok(wake) = self.wake_tx.try_clone() else {
            return false;
        };
        let spawned = std::thread::Builder::new()
            .name("snapuserd-job".into())
            .spawn(move || {
                let reply = job.run(&registry);
                if done.send(JobDone { client: id, reply }).is_ok() {
                    // A full wake-up socket already has a wake-up pending.
                    let _ = (&wake).write(&[1]);
                }
            });
        match spawned {
            Ok(_) => {
                self.jobs_running = self.jobs_running.saturating_add(1);
                true
            }
            Err(e) => {
                log::error!(
                    "control: cannot spawn a job thread: {chain}",
                    chain = ErrorChain(&e)
                );
                false
            }
        }
    }

    fn accept_all(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        log::warn!("control: {MAX_CLIENTS} clients connected, refusing another");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("control: new client: {chain}", chain = ErrorChain(&e));
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id = self.next_id.wrapping_add(1);
                    self.clients.push(Client {
                        id,
                        stream,
                        pending: Vec::new(),
                        close_when_sent: false,
                        busy: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control: accept: {chain}", chain = ErrorChain(&e));
                    return;
                }
            }
        }
    }

    /// Read, answer and flush every client that poll reported; drop the ones that are done.
    fn serve_clients(&mut self, events: &[PollFlags]) -> Flow {
        let mut flow = Flow::Continue;
        let mut keep = vec![true; self.clients.len()];
        for (i, ev) in events.iter().enumerate() {
            let Some(client) = self.clients.get_mut(i) else {
                break;
            };
            let readable =
                ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR);
            let mut job = None;
            let alive = if client.busy {
                // Its next message waits for the job; a vanished peer is dropped (the
                // job's reply is then discarded).
                !ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
            } else if readable {
                match receive_message(&mut client.stream) {
                    Received::Message(msg) => match classify(&msg) {
                        Action::Now(reply, after) => {
                            let (reply, after) =
                                run_now(&self.registry, reply, after, &mut self.detached);
                            // Stop accepting before any later reply can be seen.
                            if self.detached && self.listener.take().is_some() {
                                log::info!("control: detached, no longer accepting connections");
                            }
                            if let Some(r) = reply {
                                client.pending.extend_from_slice(r.to_string().as_bytes());
                            }
                            match after {
                                After::Keep => true,
                                After::Close => {
                                    client.close_when_sent = true;
                                    true
                                }
                                After::Stop => {
                                    flow = Flow::Stop;
                                    false
                                }
                            }
                        }
                        Action::Job(j) => {
                            job = Some((client.id, j));
                            true
                        }
                    },
                    Received::Nothing => true,
                    Received::Closed => false,
                }
            } else {
                true
            };
            if let Some((id, j)) = job {
                if self.spawn_job(id, j) {
                    if let Some(c) = self.clients.get_mut(i) {
                        c.busy = true;
                    }
                } else if let Some(c) = self.clients.get_mut(i) {
                    c.pending
                        .extend_from_slice(Reply::Fail.to_string().as_bytes());
                }
            }
            let Some(client) = self.clients.get_mut(i) else {
                break;
            };
            let alive = alive && flush(client);
            if let Some(k) = keep.get_mut(i) {
                *k = alive && !(client.close_when_sent && client.pending.is_empty());
            }
        }
        let mut flags = keep.into_iter();
        self.clients.retain(|_| flags.next().unwrap_or(true));
        flow
    }
}

enum Received {
    Message(Vec<u8>),
    Nothing,
    Closed,
}

/// One `recv()` is one message. A message longer than [`MAX_MESSAGE_SIZE`] is kept whole
/// (up to one byte over, so the parser refuses it), and the rest of what is immediately
/// readable, up to [`MAX_DISCARD_BYTES`], is discarded.
fn receive_message(stream: &mut UnixStream) -> Received {
    let mut buf = [0u8; MAX_MESSAGE_SIZE + 1];
    match stream.read(&mut buf) {
        Ok(0) => Received::Closed,
        Ok(n) => {
            if n > MAX_MESSAGE_SIZE {
                let mut discarded = 0usize;
                let mut sink = [0u8; 4096];
                while discarded < MAX_DISCARD_BYTES {
                    match stream.read(&mut sink) {
                        Ok(0) | Err(_) => break,
                        Ok(m) => discarded = discarded.saturating_add(m),
                    }
                }
            }
            Received::Message(buf.get(..n).unwrap_or_default().to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Received::Nothing,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Received::Nothing,
        Err(_) => Received::Closed,
    }
}

/// Send what can be sent now. False when the client must be dropped (error, or too much
/// unsent because it does not read).
fn flush(client: &mut Client) -> bool {
    while !client.pending.is_empty() {
        match client.stream.write(&client.pending) {
            Ok(0) => return false,
            Ok(n) => {
                client.pending.drain(..n.min(client.pending.len()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    if client.pending.len() > MAX_PENDING_REPLY_BYTES {
        log::warn!("control: a client does not read its replies; dropping it");
        return false;
    }
    true
}

enum After {
    Keep,
    Close,
    Stop,
}

/// A slow command, run on a job thread.
enum Job {
    Init {
        misc: String,
        cow: String,
        source: String,
        base: Option<String>,
    },
    Start(String),
    Delete(String),
    UpdateVerify,
}

impl Job {
    fn run(self, registry: &HandlerRegistry) -> Reply {
        match self {
            Job::Init {
                misc,
                cow,
                source,
                base,
            } => registry.init_from_command(&misc, &cow, &source, base.as_deref()),
            Job::Start(misc) => registry.start(&misc),
            Job::Delete(misc) => registry.delete(&misc),
            Job::UpdateVerify => registry.update_verify(),
        }
    }
}

/// A quick command, answered on the poll loop.
enum Quick {
    Reply(Reply),
    Query,
    Stop,
    Detach,
    InitiateMerge(String),
    MergePercent,
    GetStatus(String),
    SetMergePaused(bool),
}

enum Action {
    Now(Quick, After),
    Job(Job),
}

/// Parse one message into what to do.
fn classify(msg: &[u8]) -> Action {
    let cmd = match Command::parse(msg) {
        Ok(c) => c,
        Err(e @ ControlError::UnknownCommand { .. }) => {
            log::warn!(
                "control: {chain}; closing the connection",
                chain = ErrorChain(&e)
            );
            return Action::Now(Quick::Reply(Reply::Fail), After::Close);
        }
        Err(e) => {
            log::warn!("control: {chain}", chain = ErrorChain(&e));
            return Action::Now(Quick::Reply(Reply::Fail), After::Keep);
        }
    };
    log::debug!("control: {cmd:?}");
    let quick = match cmd {
        Command::Init {
            misc_name,
            cow_device,
            source_device,
            base_device,
        } => {
            return Action::Job(Job::Init {
                misc: misc_name.to_string(),
                cow: cow_device.to_string(),
                source: source_device.to_string(),
                base: base_device.map(str::to_string),
            })
        }
        Command::Start { misc_name } => return Action::Job(Job::Start(misc_name.to_string())),
        Command::Delete { misc_name } => return Action::Job(Job::Delete(misc_name.to_string())),
        Command::UpdateVerify => return Action::Job(Job::UpdateVerify),
        Command::Query => Quick::Query,
        Command::Stop => Quick::Stop,
        Command::Detach => Quick::Detach,
        Command::Supports { feature } => Quick::Reply(supports_reply(feature)),
        Command::InitiateMerge { misc_name } => Quick::InitiateMerge(misc_name.to_string()),
        Command::MergePercent => Quick::MergePercent,
        Command::GetStatus { misc_name } => Quick::GetStatus(misc_name.to_string()),
        Command::PauseMerge => Quick::SetMergePaused(true),
        Command::ResumeMerge => Quick::SetMergePaused(false),
    };
    Action::Now(quick, After::Keep)
}

/// Run a quick command; returns the reply (if the command has one) and what happens next.
fn run_now(
    registry: &HandlerRegistry,
    quick: Quick,
    after: After,
    detached: &mut bool,
) -> (Option<Reply>, After) {
    let reply = match quick {
        Quick::Reply(r) => r,
        Quick::Query => {
            if *detached {
                Reply::Passive
            } else {
                Reply::Active
            }
        }
        Quick::Stop => return (None, After::Stop),
        Quick::Detach => {
            *detached = true;
            registry.request_stop_merges();
            return (None, After::Keep);
        }
        Quick::InitiateMerge(misc) => registry.initiate_merge(&misc),
        Quick::MergePercent => registry.merge_percent(),
        Quick::GetStatus(misc) => registry.status(&misc),
        Quick::SetMergePaused(paused) => registry.set_merge_paused(paused),
    };
    (Some(reply), after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(stream: UnixStream, pending: Vec<u8>) -> Client {
        stream.set_nonblocking(true).unwrap();
        Client {
            id: 0,
            stream,
            pending,
            close_when_sent: false,
            busy: false,
        }
    }

    #[test]
    fn flush_sends_everything_to_a_reading_peer() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut c = client(ours, b"active".to_vec());
        assert!(flush(&mut c));
        assert!(c.pending.is_empty());
        let mut buf = [0u8; 6];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"active");
    }

    #[test]
    fn flush_drops_a_peer_that_lets_replies_pile_up() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        // Far more than any socket buffer: the rest stays pending, over the cap.
        let mut c = client(ours, vec![b'x'; 16 << 20]);
        assert!(!flush(&mut c));
        // Within the cap, a full socket only leaves the reply pending.
        c.pending.truncate(MAX_PENDING_REPLY_BYTES);
        assert!(flush(&mut c));
        assert_eq!(c.pending.len(), MAX_PENDING_REPLY_BYTES);
    }

    #[test]
    fn oversized_message_is_kept_over_the_limit_and_the_rest_discarded() {
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.write_all(&[b'a'; 2000]).unwrap();
        match receive_message(&mut ours) {
            Received::Message(m) => assert_eq!(m.len(), MAX_MESSAGE_SIZE + 1),
            _ => panic!("expected a message"),
        }
        assert!(matches!(receive_message(&mut ours), Received::Nothing));
        drop(peer);
        assert!(matches!(receive_message(&mut ours), Received::Closed));
    }
}
