//! `-fd_num=N`: the socket over which the daemon init relaunched after the SELinux transition
//! asks init for its ublk device nodes (no ueventd runs yet).
//!
//! The protocol, as AOSP's init reads it (`SOCK_STREAM` socketpair, one `recv` of up to 4 KiB
//! per message): each request is the node's path, bare (no newline, no NUL), e.g.
//! `/dev/ublkc0` then `/dev/block/ublkb0`; when every handler has started, the daemon sends
//! `DONE` with its NUL (5 bytes) and closes its end. A stream has no message boundaries, so a
//! request is sent only once init has read the previous one (the socket's unread byte count,
//! `SIOCOUTQ`, is back to 0): two paths never reach init in one `recv`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::sockets::{is_socket, type_and_family};
use crate::ublk::{NodeKind, NodeRequestHook};

/// The terminator init waits for (`DONE` and its NUL).
pub const DONE_MESSAGE: &[u8] = b"DONE\0";
/// Longest request init reads in one `recv`.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// How long a request waits for init to read it by default (init gives up after 30 s).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong on init's uevent socket.
#[derive(Debug, Error)]
pub enum InitUeventError {
    /// The number cannot name an inherited descriptor.
    #[error("-fd_num={fd}: not a descriptor number (init passes its socketpair end, 3 or more)")]
    BadFdNumber {
        /// The number given.
        fd: RawFd,
    },
    /// Nothing is open at that number.
    #[error("-fd_num={fd}: no such open descriptor (was the daemon started by init?)")]
    NotOpen {
        /// The number given.
        fd: RawFd,
    },
    /// The descriptor is open but is not a socket.
    #[error("-fd_num={fd}: the descriptor is not a socket (init passes a socketpair end)")]
    NotASocket {
        /// The number given.
        fd: RawFd,
    },
    /// A socket of another kind than a Unix stream or seqpacket socket.
    #[error(
        "-fd_num={fd}: socket of type {kind} and family {family}, expected a Unix stream socket"
    )]
    WrongSocketType {
        /// The number given.
        fd: RawFd,
        /// `SO_TYPE`.
        kind: i32,
        /// `SO_DOMAIN`.
        family: i32,
    },
    /// A request too long for init's buffer, or with a NUL in it.
    #[error("node path {path:?} cannot be sent to init (empty, over {MAX_REQUEST_BYTES} bytes, or with a NUL)")]
    BadPath {
        /// The path.
        path: String,
    },
    /// `DONE` was sent already; the socket is closed.
    #[error("init's uevent socket is closed already (DONE was sent)")]
    Closed,
    /// init closed its end (it stopped waiting, or died).
    #[error(
        "init closed its uevent socket before {what} was sent; init will not create that node"
    )]
    PeerClosed {
        /// The message that could not be sent.
        what: String,
    },
    /// The kernel took only part of a message.
    #[error("init's uevent socket took {sent} of {len} bytes of {what}")]
    Partial {
        /// The message.
        what: String,
        /// Bytes taken.
        sent: usize,
        /// Bytes in the message.
        len: usize,
    },
    /// init did not read a request in time.
    #[error("init did not read {what} within {timeout:?}; is init processing -fd_num requests?")]
    NotRead {
        /// The message.
        what: String,
        /// How long the daemon waited.
        timeout: Duration,
    },
    /// Another OS error on the socket.
    #[error("{op} on init's uevent socket for {what}")]
    Io {
        /// The call that failed.
        op: &'static str,
        /// The message.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's end of init's uevent socketpair.
#[derive(Debug)]
pub struct InitUeventChannel {
    fd: Mutex<Option<OwnedFd>>,
    read_timeout: Duration,
}

impl InitUeventChannel {
    /// Take over descriptor `fd` (from `-fd_num`): it must be an open Unix stream (or
    /// seqpacket) socket, and not standard input, output or error. On success the channel
    /// owns it (close-on-exec from then on); on failure the descriptor is left as it was.
    pub fn claim(fd: RawFd) -> Result<Self, InitUeventError> {
        if fd <= libc::STDERR_FILENO {
            return Err(InitUeventError::BadFdNumber { fd });
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; an unused number gives EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(InitUeventError::NotOpen { fd });
        }
        // SAFETY: fcntl just showed `fd` is open, and nothing closes it while it is borrowed
        // in this function (only this channel takes it over, below).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if !is_socket(borrowed) {
            return Err(InitUeventError::NotASocket { fd });
        }
        match type_and_family(borrowed) {
            Some((libc::SOCK_STREAM | libc::SOCK_SEQPACKET, libc::AF_UNIX)) => {}
            Some((kind, family)) => {
                return Err(InitUeventError::WrongSocketType { fd, kind, family })
            }
            None => return Err(InitUeventError::NotASocket { fd }),
        }
        // SAFETY: only the flags word of an open descriptor is written.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(InitUeventError::Io {
                op: "fcntl(F_SETFD)",
                what: "the inherited socket".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the descriptor is open (checked above) and came to this process from init
        // for this purpose only; no other object in the process owns it, so the channel may
        // close it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd: Mutex::new(Some(owned)),
            read_timeout: DEFAULT_READ_TIMEOUT,
        })
    }

    /// The same channel waiting at most `timeout` for init to read each request.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Ask init for the node at `path`; returns once init has read the request.
    pub fn request_node(&self, path: &str) -> Result<(), InitUeventError> {
        if path.is_empty() || path.len() > MAX_REQUEST_BYTES || path.contains('\0') {
            return Err(InitUeventError::BadPath { path: path.into() });
        }
        let guard = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let fd = guard.as_ref().ok_or(InitUeventError::Closed)?;
        send_all(fd, path.as_bytes(), path)?;
        self.wait_until_read(fd, path)?;
        log::info!("asked init for {path}");
        Ok(())
    }

    /// Send `DONE` (with its NUL) and close the socket; later requests fail with
    /// [`InitUeventError::Closed`]. The socket is closed also when the send fails.
    pub fn finish(&self) -> Result<(), InitUeventError> {
        let taken = self.fd.lock().unwrap_or_else(|p| p.into_inner()).take();
        let fd = taken.ok_or(InitUeventError::Closed)?;
        send_all(&fd, DONE_MESSAGE, "DONE")?;
        log::info!("told init DONE on its uevent socket; closing it");
        Ok(())
    }

    /// A ublk node hook sending each due node's AOSP path here. A failed request is logged
    /// (the device goes on: its own wait for the node reports a node that never came).
    pub fn node_hook(self: &std::sync::Arc<Self>) -> NodeRequestHook {
        let channel = std::sync::Arc::clone(self);
        NodeRequestHook::new(move |kind: NodeKind, dev_id| {
            let path = kind.android_path(dev_id);
            match channel.request_node(&path) {
                Ok(()) => {}
                Err(InitUeventError::Closed) => log::info!(
                    "{path}: init's uevent socket was closed after startup; relying on ueventd"
                ),
                Err(e) => log::error!(
                    "{e}; {path} must be created by init or ueventd, or the device will not serve"
                ),
            }
        })
    }

    fn wait_until_read(&self, fd: &OwnedFd, what: &str) -> Result<(), InitUeventError> {
        let start = Instant::now();
        loop {
            let mut unread: libc::c_int = 0;
            // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int, into `unread`, which we own; the fd
            // is open (owned by the caller).
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut unread) };
            if rc < 0 {
                return Err(InitUeventError::Io {
                    op: "ioctl(SIOCOUTQ)",
                    what: what.into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            if unread == 0 {
                return Ok(());
            }
            if start.elapsed() >= self.read_timeout {
                return Err(InitUeventError::NotRead {
                    what: what.into(),
                    timeout: self.read_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One `send` of the whole message (no SIGPIPE), retried on EINTR.
fn send_all(fd: &OwnedFd, bytes: &[u8], what: &str) -> Result<(), InitUeventError> {
    use nix::errno::Errno;
    use nix::sys::socket::{send, MsgFlags};
    let sent = loop {
        match send(fd.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(sent) => break sent,
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(InitUeventError::PeerClosed { what: what.into() })
            }
            Err(e) => {
                return Err(InitUeventError::Io {
                    op: "send",
                    what: what.into(),
                    source: e.into(),
                })
            }
        }
    };
    if sent != bytes.len() {
        return Err(InitUeventError::Partial {
            what: what.into(),
            sent,
            len: bytes.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, IntoRawFd};
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::sync::Arc;

    /// One `recv` of at most 4 KiB, as AOSP's init reads a request.
    fn init_recv(init: &UnixStream) -> Vec<u8> {
        let mut buf = [0u8; MAX_REQUEST_BYTES];
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we own.
        let n = unsafe {
            libc::recv(
                init.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                0,
            )
        };
        assert!(n >= 0, "recv: {}", std::io::Error::last_os_error());
        buf[..n as usize].to_vec()
    }

    /// A channel over one end of a fresh socketpair, and init's end.
    fn pair() -> (InitUeventChannel, UnixStream) {
        let (daemon, init) = UnixStream::pair().unwrap();
        let channel = InitUeventChannel::claim(daemon.into_raw_fd()).unwrap();
        (channel, init)
    }

    #[test]
    fn init_reads_each_path_alone_then_done_then_end_of_file() {
        let (channel, init) = pair();
        let channel = Arc::new(channel);
        let hook = channel.node_hook();
        // init reads slowly (it creates each node before its next recv).
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                std::thread::sleep(Duration::from_millis(20));
                let m = init_recv(&init);
                if m.is_empty() {
                    return got;
                }
                got.push(m);
            }
        });
        // Two devices, as UblkDevice::create announces them: char node, then block node.
        hook.request(NodeKind::Char, 0);
        hook.request(NodeKind::Block, 0);
        hook.request(NodeKind::Char, 1);
        hook.request(NodeKind::Block, 1);
        channel.finish().unwrap();
        let got = reader.join().unwrap();
        let expected: Vec<&[u8]> = vec![
            b"/dev/ublkc0",
            b"/dev/block/ublkb0",
            b"/dev/ublkc1",
            b"/dev/block/ublkb1",
            b"DONE\0",
        ];
        assert_eq!(got, expected);
        // After DONE the socket is closed: later requests fail cleanly.
        assert!(matches!(
            channel.request_node("/dev/ublkc2"),
            Err(InitUeventError::Closed)
        ));
        assert!(matches!(channel.finish(), Err(InitUeventError::Closed)));
        hook.request(NodeKind::Char, 2); // logged, no panic
    }

    #[test]
    fn a_request_init_never_reads_times_out() {
        let (channel, init) = pair();
        let channel = channel.with_read_timeout(Duration::from_millis(50));
        let err = channel.request_node("/dev/ublkc0").unwrap_err();
        assert!(
            matches!(err, InitUeventError::NotRead { ref what, .. } if what == "/dev/ublkc0"),
            "{err:?}"
        );
        // The bytes are still there, unframed: exactly the path.
        assert_eq!(init_recv(&init), b"/dev/ublkc0");
    }

    #[test]
    fn a_closed_init_end_is_a_clear_error_not_a_signal() {
        let (channel, init) = pair();
        drop(init);
        let err = channel.request_node("/dev/ublkc0").unwrap_err();
        assert!(matches!(err, InitUeventError::PeerClosed { .. }), "{err:?}");
        assert!(err.to_string().contains("init closed"), "{err}");
        let err = channel.finish().unwrap_err();
        assert!(matches!(err, InitUeventError::PeerClosed { ref what } if what == "DONE"));
        // The failed DONE still closed the socket.
        assert!(matches!(channel.finish(), Err(InitUeventError::Closed)));
    }

    #[test]
    fn paths_init_cannot_read_are_refused_before_sending() {
        let (channel, _init) = pair();
        for bad in [
            String::new(),
            "/dev/a\0b".into(),
            "/".repeat(MAX_REQUEST_BYTES + 1),
        ] {
            assert!(matches!(
                channel.request_node(&bad),
                Err(InitUeventError::BadPath { .. })
            ));
        }
    }

    #[test]
    fn descriptor_numbers_that_are_not_init_sockets_are_refused() {
        for fd in [-1, -7, 0, 1, 2] {
            assert!(matches!(
                InitUeventChannel::claim(fd),
                Err(InitUeventError::BadFdNumber { fd: f }) if f == fd
            ));
        }
        // No descriptor can have this number.
        assert!(matches!(
            InitUeventChannel::claim(i32::MAX),
            Err(InitUeventError::NotOpen { .. })
        ));
        // A regular file: refused, and left open (not taken over).
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = InitUeventChannel::claim(file.as_raw_fd()).unwrap_err();
        assert!(matches!(err, InitUeventError::NotASocket { .. }), "{err:?}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert!(!crate::daemon::sockets::is_socket(file.as_fd()));
        // SAFETY: F_GETFD only reads flags of a descriptor we own.
        assert!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) } >= 0);
        // A datagram socket has no stream to send paths on.
        let (dgram, _other) = UnixDatagram::pair().unwrap();
        let err = InitUeventChannel::claim(dgram.as_raw_fd()).unwrap_err();
        assert!(
            matches!(err, InitUeventError::WrongSocketType { kind, .. } if kind == libc::SOCK_DGRAM),
            "{err:?}"
        );
        // A TCP socket is not init's socketpair either.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = InitUeventChannel::claim(tcp.as_raw_fd()).unwrap_err();
        assert!(
            matches!(err, InitUeventError::WrongSocketType { family, .. } if family == libc::AF_INET),
            "{err:?}"
        );
    }

    #[test]
    fn a_claimed_socket_is_closed_on_exec() {
        let (daemon, _init) = UnixStream::pair().unwrap();
        let fd = daemon.into_raw_fd();
        // Clear close-on-exec as init leaves it for the exec'd daemon.
        // SAFETY: only the flags word of our own open descriptor is written.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let channel = InitUeventChannel::claim(fd).unwrap();
        // SAFETY: F_GETFD only reads flags; the channel keeps the descriptor open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        drop(channel);
    }
}
