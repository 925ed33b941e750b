//! Second-stage socket handoff (reference §C.5).
//!
//! The daemon that init relaunched after the SELinux transition runs with `-no_socket`; it
//! has no control socket. In second stage init creates the `snapuserd` stream socket and
//! starts the proxy (`snapuserd -socket-handoff`), which holds it and a `snapuserd_proxy`
//! `SOCK_SEQPACKET` socket:
//!
//! * **proxy** ([`run_proxy`]): listen on `snapuserd_proxy`, set `snapuserd.proxy_ready=true`,
//!   accept one client, send it a 1-byte message carrying the `snapuserd` socket as
//!   `SCM_RIGHTS`, wait for the 1-byte ACK `'a'`, exit;
//! * **receiver** ([`receive_listener`], in the `-no_socket` daemon once its handlers
//!   run): connect to the proxy, receive exactly one fd in a 1-byte message, ACK, then serve
//!   the control protocol on the received socket.
//!
//! Waits and their bounds:
//! * the receiver waits for the proxy without a time limit, as AOSP does (the proxy only
//!   appears when second stage starts it), but stops when told to (signal, or every handler
//!   ended). Instead of reading `snapuserd.proxy_ready` it retries the connection: the
//!   property only says the proxy listens, and a connection that succeeds proves exactly
//!   that (before `listen` the socket refuses connections);
//! * once connected, the receiver waits at most [`MESSAGE_TIMEOUT`] for the fd message (AOSP
//!   blocks): a proxy that accepts and never sends must not stop the daemon from carrying on
//!   without a control socket;
//! * the proxy waits for its client without a time limit (init stops it), and at most
//!   [`MESSAGE_TIMEOUT`] for the ACK (AOSP blocks), so a client that never answers cannot
//!   keep the proxy, and with it a copy of the control socket, alive.
//!
//! Every malformed exchange (no fd, several fds, a message of the wrong size, a peer that
//! closes, an fd that is not a Unix stream socket) is a [`HandoffError`].

use crate::error_chain::ErrorChain;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmsg, socket, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use thiserror::Error;

use super::events::DaemonEvents;
use super::sockets::{ensure_listening, is_socket, type_and_family};

/// init's name for the proxy socket (`ANDROID_SOCKET_snapuserd_proxy`).
pub const PROXY_SOCKET_NAME: &str = "snapuserd_proxy";
/// Where init creates service sockets.
pub const ANDROID_SOCKET_DIR: &str = "/dev/socket";
/// The 1-byte message that carries the fd, and the ACK.
pub const HANDOFF_BYTE: u8 = b'a';
/// Longest wait for the fd message (receiver) or the ACK (proxy).
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Backlog of the sockets the daemon listens on (AOSP's).
pub const LISTEN_BACKLOG: libc::c_int = 4;
/// Pause between attempts to connect to a proxy that does not listen yet (a wake-up of the
/// daemon's events ends it early).
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// Most fds accepted in one message (more are reported, and all closed).
const MAX_FDS: usize = 4;

/// Errors of the socket handoff.
#[derive(Debug, Error)]
pub enum HandoffError {
    /// An inherited or received fd is not the kind of socket needed.
    #[error("{what}: fd {fd} is not a {want} socket")]
    WrongSocket {
        /// Which socket.
        what: &'static str,
        /// The fd.
        fd: RawFd,
        /// The kind needed.
        want: &'static str,
    },
    /// A socket operation failed.
    #[error("socket handoff: {op} ({path})")]
    Io {
        /// The operation.
        op: &'static str,
        /// The socket path, or a description.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent nothing in time.
    #[error("socket handoff: no {what} within {secs} s")]
    TimedOut {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        secs: u64,
    },
    /// The peer closed the connection.
    #[error("socket handoff: the peer closed the connection before sending the {what}")]
    PeerClosed {
        /// What was awaited.
        what: &'static str,
    },
    /// The message was not exactly one byte.
    #[error("socket handoff: expected a 1-byte {what}, got {got}")]
    WrongSize {
        /// What was awaited.
        what: &'static str,
        /// What arrived ("0 bytes", "more than 1 byte").
        got: &'static str,
    },
    /// The fd message did not carry exactly one fd.
    #[error("socket handoff: expected exactly one fd, got {got}")]
    FdCount {
        /// How many arrived (`MAX_FDS + 1` stands for "more than fit").
        got: usize,
    },
    /// The ACK byte is not `'a'`.
    #[error("socket handoff: expected ACK 'a', got byte 0x{byte:02x}")]
    BadAck {
        /// The byte received.
        byte: u8,
    },
    /// Waiting was given up (signal, or nothing left to serve).
    #[error("socket handoff: stopped while waiting for the {what}")]
    Stopped {
        /// What was awaited.
        what: &'static str,
    },
}

fn io_err(op: &'static str, path: impl Into<String>) -> impl FnOnce(Errno) -> HandoffError {
    let path = path.into();
    move |e| HandoffError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Default path the receiver connects to (`/dev/socket/snapuserd_proxy`).
pub fn default_proxy_path() -> PathBuf {
    Path::new(ANDROID_SOCKET_DIR).join(PROXY_SOCKET_NAME)
}

/// Bind a `SOCK_SEQPACKET` socket at `path` (host stand-in for init's `snapuserd_proxy`);
/// a stale socket file there is replaced.
pub fn bind_seqpacket(path: &Path) -> Result<OwnedFd, HandoffError> {
    let shown = path.display().to_string();
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    let fd = seqpacket_socket(&shown)?;
    let addr = UnixAddr::new(path).map_err(io_err("address", shown.clone()))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(io_err("bind", shown))?;
    Ok(fd)
}

/// A new close-on-exec Unix SEQPACKET socket (`shown` names it in errors).
fn seqpacket_socket(shown: &str) -> Result<OwnedFd, HandoffError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_err("socket", shown.to_string()))
}

/// Check that `fd` is a Unix socket of type `ty`.
fn check_socket(
    fd: BorrowedFd<'_>,
    what: &'static str,
    ty: libc::c_int,
    want: &'static str,
) -> Result<(), HandoffError> {
    let ok = is_socket(fd) && type_and_family(fd) == Some((ty, libc::AF_UNIX));
    if ok {
        Ok(())
    } else {
        Err(HandoffError::WrongSocket {
            what,
            fd: fd.as_raw_fd(),
            want,
        })
    }
}

/// Wait until `fd` is readable, up to `limit` (`None`: no limit). Sleeps on `fd` and
/// `events`; after every wake-up of `events` it ends with [`HandoffError::Stopped`] if a stop
/// was requested or `give_up()` holds. Returns false on timeout.
fn wait_readable(
    fd: BorrowedFd<'_>,
    limit: Option<Duration>,
    events: &DaemonEvents,
    give_up: &dyn Fn() -> bool,
    what: &'static str,
) -> Result<bool, HandoffError> {
    let start = Instant::now();
    loop {
        events.drain();
        if events.stop_requested() || give_up() {
            return Err(HandoffError::Stopped { what });
        }
        let timeout = match limit {
            Some(l) => match l.checked_sub(start.elapsed()) {
                Some(left) if !left.is_zero() => {
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
                _ => return Ok(false),
            },
            None => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(events.fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => return Ok(true),
            Ok(_) => continue,
            Err(e) => return Err(io_err("poll", what)(e)),
        }
    }
}

/// The proxy role: hand `server` (init's `snapuserd` socket) to the first client of
/// `proxy` (init's `snapuserd_proxy` SEQPACKET socket, bound), then wait for the ACK.
/// `set_ready` publishes `snapuserd.proxy_ready=true` once `proxy` listens.
pub fn run_proxy(
    proxy: OwnedFd,
    server: BorrowedFd<'_>,
    set_ready: &dyn Fn(),
    events: &DaemonEvents,
) -> Result<(), HandoffError> {
    check_socket(
        proxy.as_fd(),
        "proxy socket",
        libc::SOCK_SEQPACKET,
        "Unix seqpacket",
    )?;
    check_socket(server, "snapuserd socket", libc::SOCK_STREAM, "Unix stream")?;
    ensure_listening(proxy.as_fd(), LISTEN_BACKLOG).map_err(|source| HandoffError::Io {
        op: "listen",
        path: "proxy socket".into(),
        source,
    })?;
    set_ready();
    let never = || false;
    wait_readable(proxy.as_fd(), None, events, &never, "proxy client")?;
    // SAFETY: accept4 takes a listening fd (borrowed, open) and null address pointers, and
    // returns a new fd or -1.
    let raw = unsafe {
        libc::accept4(
            proxy.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(HandoffError::Io {
            op: "accept",
            path: "proxy socket".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    let client = unsafe { OwnedFd::from_raw_fd(raw) };
    drop(proxy);
    let fds = [server.as_raw_fd()];
    let sent = sendmsg::<()>(
        client.as_raw_fd(),
        &[IoSlice::new(&[HANDOFF_BYTE])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io_err("send fd", "proxy client"))?;
    if sent != 1 {
        return Err(HandoffError::WrongSize {
            what: "fd message sent",
            got: "0 bytes",
        });
    }
    log::info!("socket handoff: snapuserd socket sent, waiting for the ACK");
    if !wait_readable(client.as_fd(), Some(MESSAGE_TIMEOUT), events, &never, "ACK")? {
        return Err(HandoffError::TimedOut {
            what: "ACK",
            secs: MESSAGE_TIMEOUT.as_secs(),
        });
    }
    let (byte, _) = receive_one(client.as_fd(), "ACK", false)?;
    if byte != HANDOFF_BYTE {
        return Err(HandoffError::BadAck { byte });
    }
    log::info!("socket handoff: ACK received");
    Ok(())
}

/// Receive one SEQPACKET message that must be exactly one byte, collecting any fds it
/// carries (closed on return unless `want_fd`). Returns the byte and the fds.
fn receive_one(
    fd: BorrowedFd<'_>,
    what: &'static str,
    want_fd: bool,
) -> Result<(u8, Vec<OwnedFd>), HandoffError> {
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, flags, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                // SAFETY: the kernel installed this fd in our table for
                                // this message; nothing else refers to it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                            }
                        }
                    }
                }
                break (msg.bytes, msg.flags, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err("receive", what)(e)),
        }
    };
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(HandoffError::FdCount { got: MAX_FDS + 1 });
    }
    if bytes == 0 {
        return Err(if fds.is_empty() {
            HandoffError::PeerClosed { what }
        } else {
            HandoffError::WrongSize {
                what,
                got: "0 bytes",
            }
        });
    }
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(HandoffError::WrongSize {
            what,
            got: "more than 1 byte",
        });
    }
    if !want_fd && !fds.is_empty() {
        return Err(HandoffError::FdCount { got: fds.len() });
    }
    Ok((byte[0], fds))
}

/// The receiving role: connect to the proxy at `proxy_path` (retrying while it does not
/// exist or does not listen yet), receive the control socket (waiting at most
/// [`MESSAGE_TIMEOUT`]), ACK, and return it listening. Gives up when a stop is requested on
/// `events` or, after a wake-up of `events`, `give_up()` holds.
pub fn receive_listener(
    proxy_path: &Path,
    events: &DaemonEvents,
    give_up: &dyn Fn() -> bool,
) -> Result<UnixListener, HandoffError> {
    let shown = proxy_path.display().to_string();
    let addr = UnixAddr::new(proxy_path).map_err(io_err("address", shown.clone()))?;
    let conn = loop {
        events.drain();
        if events.stop_requested() || give_up() {
            return Err(HandoffError::Stopped { what: "proxy" });
        }
        let fd = seqpacket_socket(&shown)?;
        match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break fd,
            // Not created yet, or created but not listening yet.
            Err(Errno::ENOENT | Errno::ECONNREFUSED | Errno::EINTR) => events
                .wait(Some(CONNECT_RETRY))
                .map_err(|source| HandoffError::Io {
                    op: "poll",
                    path: shown.clone(),
                    source,
                })?,
            Err(e) => return Err(io_err("connect", shown)(e)),
        }
    };
    log::info!("socket handoff: connected to the proxy at {shown}");
    if !wait_readable(
        conn.as_fd(),
        Some(MESSAGE_TIMEOUT),
        events,
        give_up,
        "fd message",
    )? {
        return Err(HandoffError::TimedOut {
            what: "fd message",
            secs: MESSAGE_TIMEOUT.as_secs(),
        });
    }
    let (code, mut fds) = receive_one(conn.as_fd(), "fd message", true)?;
    if fds.len() != 1 {
        return Err(HandoffError::FdCount { got: fds.len() });
    }
    let Some(server) = fds.pop() else {
        return Err(HandoffError::FdCount { got: 0 });
    };
    if code != HANDOFF_BYTE {
        log::debug!("socket handoff: fd message byte 0x{code:02x}");
    }
    check_socket(
        server.as_fd(),
        "received socket",
        libc::SOCK_STREAM,
        "Unix stream",
    )?;
    ensure_listening(server.as_fd(), LISTEN_BACKLOG).map_err(|source| HandoffError::Io {
        op: "listen",
        path: "received socket".into(),
        source,
    })?;
    // The proxy only waits for the ACK; losing it costs nothing but a log line there, so a
    // failed send does not stop us from serving the socket we hold.
    if let Err(e) =
        nix::sys::socket::send(conn.as_raw_fd(), &[HANDOFF_BYTE], MsgFlags::MSG_NOSIGNAL)
    {
        log::warn!(
            "socket handoff: sending the ACK: {chain}",
            chain = ErrorChain(&e)
        );
    }
    Ok(UnixListener::from(server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;

    fn events() -> DaemonEvents {
        DaemonEvents::new().unwrap()
    }

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send_raw(fd: &OwnedFd, bytes: &[u8], fds: &[RawFd]) {
        let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        sendmsg::<()>(
            fd.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn one_byte_with_one_fd_is_accepted() {
        let (a, b) = seqpacket_pair();
        let (x, _y) = UnixStream::pair().unwrap();
        send_raw(&a, b"a", &[x.as_raw_fd()]);
        let (byte, fds) = receive_one(b.as_fd(), "fd message", true).unwrap();
        assert_eq!((byte, fds.len()), (b'a', 1));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let (x, _y) = UnixStream::pair().unwrap();
        // Too long.
        let (a, b) = seqpacket_pair();
        send_raw(&a, b"abc", &[x.as_raw_fd()]);
        let e = receive_one(b.as_fd(), "fd message", true).unwrap_err();
        assert!(matches!(e, HandoffError::WrongSize { .. }), "{e}");
        // Too many fds for the control buffer.
        let many: Vec<RawFd> = vec![x.as_raw_fd(); MAX_FDS + 2];
        send_raw(&a, b"a", &many);
        let e = receive_one(b.as_fd(), "fd message", true).unwrap_err();
        assert!(matches!(e, HandoffError::FdCount { .. }), "{e}");
        // An fd where none is expected (the ACK).
        send_raw(&a, b"a", &[x.as_raw_fd()]);
        let e = receive_one(b.as_fd(), "ACK", false).unwrap_err();
        assert!(matches!(e, HandoffError::FdCount { got: 1 }), "{e}");
        // Nothing pending is an error, not a wait.
        let e = receive_one(b.as_fd(), "ACK", false).unwrap_err();
        assert!(matches!(e, HandoffError::Io { .. }), "{e}");
        // Closed.
        drop(a);
        let e = receive_one(b.as_fd(), "ACK", false).unwrap_err();
        assert!(matches!(e, HandoffError::PeerClosed { .. }), "{e}");
    }

    /// A fake proxy at `path` that sends `bytes` with `fds` to its first client and returns
    /// what it received back.
    fn fake_proxy(
        path: &Path,
        bytes: &'static [u8],
        fds: Vec<OwnedFd>,
    ) -> thread::JoinHandle<Vec<u8>> {
        let l = bind_seqpacket(path).unwrap();
        ensure_listening(l.as_fd(), 4).unwrap();
        thread::spawn(move || {
            // SAFETY: test: accept on a listening socket we own.
            let c =
                unsafe { libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
            assert!(c >= 0);
            // SAFETY: test: a fresh fd from accept.
            let c = unsafe { OwnedFd::from_raw_fd(c) };
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            if !bytes.is_empty() || !raw.is_empty() {
                send_raw(&c, bytes, &raw);
            }
            let mut back = [0u8; 8];
            let n =
                nix::sys::socket::recv(c.as_raw_fd(), &mut back, MsgFlags::empty()).unwrap_or(0);
            back[..n].to_vec()
        })
    }

    #[test]
    fn receiver_gets_a_listening_socket_and_acks() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("snapuserd");
        let listener = UnixListener::bind(&ctl).unwrap();
        let proxy = dir.path().join("proxy");
        let t = fake_proxy(&proxy, b"a", vec![OwnedFd::from(listener)]);
        let got = receive_listener(&proxy, &events(), &|| false).unwrap();
        assert_eq!(t.join().unwrap(), b"a");
        // The received socket is the control socket: a client of its path reaches it.
        let _c = UnixStream::connect(&ctl).unwrap();
        let (_s, _) = got.accept().unwrap();
    }

    #[test]
    fn receiver_refuses_a_message_without_fd_or_a_wrong_socket() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = dir.path().join("proxy");
        let t = fake_proxy(&proxy, b"a", vec![]);
        let e = receive_listener(&proxy, &events(), &|| false).unwrap_err();
        assert!(matches!(e, HandoffError::FdCount { got: 0 }), "{e}");
        assert_eq!(t.join().unwrap(), b"");
        let proxy2 = dir.path().join("proxy2");
        let file = std::fs::File::open("/dev/null").unwrap();
        let t = fake_proxy(&proxy2, b"a", vec![OwnedFd::from(file)]);
        let e = receive_listener(&proxy2, &events(), &|| false).unwrap_err();
        assert!(matches!(e, HandoffError::WrongSocket { .. }), "{e}");
        // No ACK was sent for a refused handoff.
        assert_eq!(t.join().unwrap(), b"");
    }

    #[test]
    fn receiver_refuses_two_fds() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = dir.path().join("proxy");
        let a = UnixListener::bind(dir.path().join("a")).unwrap();
        let b = UnixListener::bind(dir.path().join("b")).unwrap();
        let t = fake_proxy(&proxy, b"a", vec![OwnedFd::from(a), OwnedFd::from(b)]);
        let e = receive_listener(&proxy, &events(), &|| false).unwrap_err();
        assert!(matches!(e, HandoffError::FdCount { got: 2 }), "{e}");
        assert_eq!(t.join().unwrap(), b"");
    }

    #[test]
    fn receiver_gives_up_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let e = receive_listener(&dir.path().join("never"), &events(), &|| true).unwrap_err();
        assert!(matches!(e, HandoffError::Stopped { .. }), "{e}");
    }

    #[test]
    fn proxy_hands_the_socket_over_and_checks_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("snapuserd");
        let server = UnixListener::bind(&ctl).unwrap();
        let proxy_path = dir.path().join("proxy");
        let proxy = bind_seqpacket(&proxy_path).unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&ready);
        let t = thread::spawn(move || receive_listener(&proxy_path, &events(), &|| false).unwrap());
        run_proxy(
            proxy,
            server.as_fd(),
            &|| r.store(true, Ordering::Release),
            &events(),
        )
        .unwrap();
        assert!(ready.load(Ordering::Acquire));
        let got = t.join().unwrap();
        let _c = UnixStream::connect(&ctl).unwrap();
        let (_s, _) = got.accept().unwrap();
    }

    #[test]
    fn proxy_refuses_a_bad_ack() {
        let dir = tempfile::tempdir().unwrap();
        let server = UnixListener::bind(dir.path().join("snapuserd")).unwrap();
        let proxy_path = dir.path().join("proxy");
        let proxy = bind_seqpacket(&proxy_path).unwrap();
        let p = proxy_path.clone();
        let t = thread::spawn(move || {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::empty(),
                None,
            )
            .unwrap();
            let addr = UnixAddr::new(&p).unwrap();
            while nix::sys::socket::connect(fd.as_raw_fd(), &addr).is_err() {
                thread::sleep(Duration::from_millis(10));
            }
            let (_, fds) = {
                wait_readable(fd.as_fd(), None, &events(), &|| false, "x").unwrap();
                receive_one(fd.as_fd(), "fd message", true).unwrap()
            };
            assert_eq!(fds.len(), 1);
            send_raw(&fd, b"zz", &[]);
        });
        let e = run_proxy(proxy, server.as_fd(), &|| {}, &events()).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, HandoffError::WrongSize { .. }), "{e}");
    }

    #[test]
    fn proxy_refuses_wrong_socket_kinds_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let server = UnixListener::bind(dir.path().join("snapuserd")).unwrap();
        // A stream socket where the seqpacket proxy socket belongs.
        let wrong = UnixListener::bind(dir.path().join("wrong")).unwrap();
        let e = run_proxy(OwnedFd::from(wrong), server.as_fd(), &|| {}, &events()).unwrap_err();
        assert!(matches!(e, HandoffError::WrongSocket { .. }), "{e}");
        let proxy = bind_seqpacket(&dir.path().join("proxy")).unwrap();
        let stopping = events();
        stopping.request_stop();
        let e = run_proxy(proxy, server.as_fd(), &|| {}, &stopping).unwrap_err();
        assert!(matches!(e, HandoffError::Stopped { .. }), "{e}");
    }
}
