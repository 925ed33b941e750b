//! Small checks on socket fds the daemon is handed (by init, or by the handoff proxy).

use std::os::fd::{AsRawFd, BorrowedFd};

/// Read an integer `SOL_SOCKET` option; `None` if the fd is not a socket or the call fails.
pub fn int_option(fd: BorrowedFd<'_>, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (the size of `value`, which we own) into
    // `value` and updates `len`; the fd is borrowed, so it stays open during the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<libc::c_int>()).then_some(value)
}

/// True if `fd` is an open socket.
pub fn is_socket(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: `libc::stat` is plain old data for which all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`, which we own; the fd is borrowed and open.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    rc == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
}

/// The socket's type (`SOCK_STREAM`, `SOCK_SEQPACKET`, ...) and family (`AF_UNIX`, ...).
pub fn type_and_family(fd: BorrowedFd<'_>) -> Option<(libc::c_int, libc::c_int)> {
    Some((
        int_option(fd, libc::SO_TYPE)?,
        int_option(fd, libc::SO_DOMAIN)?,
    ))
}

/// Make sure `fd` is listening: init creates service sockets bound but leaves `listen` to
/// the service (AOSP's daemon calls `listen(fd, 4)` itself). A socket that already listens
/// is left as it is; one that cannot listen (connected, unbound) gives the OS error.
pub fn ensure_listening(fd: BorrowedFd<'_>, backlog: libc::c_int) -> std::io::Result<()> {
    if int_option(fd, libc::SO_ACCEPTCONN).unwrap_or(0) != 0 {
        return Ok(());
    }
    // SAFETY: listen takes an fd and an integer; the fd is borrowed and open.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn listening_connected_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        assert!(is_socket(l.as_fd()));
        assert_eq!(
            type_and_family(l.as_fd()),
            Some((libc::SOCK_STREAM, libc::AF_UNIX))
        );
        ensure_listening(l.as_fd(), 4).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(
            ensure_listening(a.as_fd(), 4).is_err(),
            "a connected socket"
        );
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(!is_socket(f.as_fd()));
        assert_eq!(type_and_family(f.as_fd()), None);
    }
}
