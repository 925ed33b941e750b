//! The daemon's stop request and wake-ups: what its waiting loops sleep on instead of ticks.
//!
//! [`DaemonEvents`] is a stop flag plus a self-pipe (a Unix socket pair). A signal handler
//! (SIGTERM, SIGINT), an ended dm-user worker, or a test writes one byte to the pipe after
//! changing what the sleeper looks at; a loop drains the pipe, then looks at its conditions
//! (stop requested, workers ended, …), then sleeps in `poll` on the pipe and its own fds.
//! Drain before look, look before sleep: no wake-up is lost, and an idle daemon is never
//! woken.

use crate::error_chain::ErrorChain;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// Writes wake-ups into a [`DaemonEvents`] pipe; cheap to clone and share between threads.
#[derive(Debug, Clone)]
pub struct Notifier(Arc<UnixStream>);

impl Notifier {
    /// Wake whoever sleeps on the pipe. A full pipe already holds a wake-up.
    pub fn notify(&self) {
        match (&*self.0).write(&[1]) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::error!(
                "waking the daemon's control loop: {chain}",
                chain = ErrorChain(&e)
            ),
        }
    }
}

/// The stop flag and the self-pipe of the daemon's waiting loops.
#[derive(Debug)]
pub struct DaemonEvents {
    stop: Arc<AtomicBool>,
    receiver: UnixStream,
    sender: Notifier,
}

impl DaemonEvents {
    /// A new pipe, stop not requested.
    pub fn new() -> io::Result<Self> {
        let (sender, receiver) = UnixStream::pair()?;
        sender.set_nonblocking(true)?;
        receiver.set_nonblocking(true)?;
        Ok(Self {
            stop: Arc::new(AtomicBool::new(false)),
            receiver,
            sender: Notifier(Arc::new(sender)),
        })
    }

    /// Request a stop when one of `signals` arrives (flag set, then the pipe written, both
    /// from the signal handler).
    pub fn stop_on_signals(&self, signals: &[libc::c_int]) -> io::Result<()> {
        for &signal in signals {
            signal_hook::flag::register(signal, Arc::clone(&self.stop))?;
            let sender = self.sender.0.try_clone()?;
            signal_hook::low_level::pipe::register(signal, sender)?;
        }
        Ok(())
    }

    /// A handle that wakes the loops sleeping on these events.
    pub fn notifier(&self) -> Notifier {
        self.sender.clone()
    }

    /// Request a stop (as a signal would) and wake the sleeper.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.sender.notify();
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The pipe's read end, to poll together with a loop's own fds.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.receiver.as_fd()
    }

    /// Consume the pending wake-ups (before looking at the conditions they announce).
    pub fn drain(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.receiver).read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Sleep until a wake-up arrives, a signal interrupts, or `limit` passes (`None`: no
    /// limit). Wake-ups are left pending: [`drain`](Self::drain) them before looking.
    pub fn wait(&self, limit: Option<Duration>) -> io::Result<()> {
        let timeout = match limit {
            Some(l) => PollTimeout::try_from(l).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sleep until `done()` holds or a stop is requested (true if `done()` held). `done` is
    /// looked at after every wake-up: whatever changes it must wake these events.
    pub fn wait_until(&self, done: &dyn Fn() -> bool) -> io::Result<bool> {
        loop {
            self.drain();
            if done() {
                return Ok(true);
            }
            if self.stop_requested() {
                return Ok(false);
            }
            self.wait(None)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notify_from_another_thread_ends_the_wait() {
        let events = DaemonEvents::new().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let t = {
            let (flag, notifier) = (Arc::clone(&flag), events.notifier());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                flag.store(true, Ordering::Release);
                notifier.notify();
            })
        };
        assert!(events.wait_until(&|| flag.load(Ordering::Acquire)).unwrap());
        t.join().unwrap();
    }

    #[test]
    fn a_stop_request_ends_the_wait_unsatisfied() {
        let events = DaemonEvents::new().unwrap();
        events.request_stop();
        assert!(!events.wait_until(&|| false).unwrap());
        assert!(events.stop_requested());
    }

    #[test]
    fn wake_ups_are_kept_until_drained_and_never_block_the_sender() {
        let events = DaemonEvents::new().unwrap();
        let n = events.notifier();
        for _ in 0..100_000 {
            n.notify();
        }
        events.wait(None).unwrap();
        events.drain();
        events.wait(Some(Duration::from_millis(1))).unwrap();
        let mut fds = [PollFd::new(events.fd(), PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut fds, PollTimeout::ZERO).unwrap(), 0);
    }
}
