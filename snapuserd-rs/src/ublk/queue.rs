//! One ublk hardware queue, served by one thread.
//!
//! The thread maps its queue's descriptor array (read-only), fetches every tag, and then
//! loops: wait for completions; each completed fetch is a request whose descriptor is
//! decided ([`super::descriptor`]), answered through the handler, and committed together
//! with the next fetch of the same tag. The kernel binds a queue to the thread that fetched
//! it, so every command of a queue is issued from this thread.
//!
//! READ data reaches the kernel one of two ways: with USER_COPY, `pwrite` on the character
//! node at the request's window before the commit; otherwise the commit names a buffer of
//! this thread (one per tag, as large as the I/O limit) that the kernel copies from.
//!
//! The thread ends when every tag has been aborted (the device was stopped, or is being
//! torn down) or a command fails.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use thiserror::Error;

use super::abi::{
    desc_mmap_len, desc_mmap_offset, user_copy_pos, IoCmd, IoDesc, IO_COMMIT_AND_FETCH_REQ,
    IO_FETCH_REQ, IO_RES_ABORT, IO_RES_OK,
};
use super::descriptor::{read_request, serve, tag_of, QueueLimits};
use crate::daemon::transport::RequestHandler;
use crate::dm_user::Request;
use crate::user_merge::direct_io::AlignedBuf;

/// Errors of a queue thread.
#[derive(Debug, Error)]
pub enum QueueError {
    /// Mapping the descriptor array failed.
    #[error("mapping the descriptors of ublk queue {q_id}")]
    Map {
        /// Queue id.
        q_id: u16,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The queue's io_uring could not be set up.
    #[error("setting up the io_uring of ublk queue {q_id}")]
    Ring {
        /// Queue id.
        q_id: u16,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Submitting or waiting failed.
    #[error("submitting the commands of ublk queue {q_id}")]
    Submit {
        /// Queue id.
        q_id: u16,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// How a queue moves READ data to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// `pwrite` on the character node (`UBLK_F_USER_COPY`).
    UserCopy,
    /// A buffer per tag named in the commit.
    Buffer,
}

/// What one queue thread needs.
#[derive(Clone)]
pub struct QueueSetup {
    /// Queue id.
    pub q_id: u16,
    /// CPUs to run the queue's thread on (the CPUs whose requests the queue receives); empty:
    /// anywhere.
    pub cpus: Vec<usize>,
    /// The descriptor ranges (depth, I/O limit, device size).
    pub limits: QueueLimits,
    /// How READ data goes to the kernel.
    pub data_path: DataPath,
    /// The device's character node, shared by the queues.
    pub char_file: Arc<File>,
    /// Who answers requests.
    pub handler: Arc<dyn RequestHandler>,
}

/// Counters of a queue thread, returned when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueReport {
    /// Requests committed.
    pub committed: u64,
    /// Requests committed with an error result.
    pub failed: u64,
}

/// The descriptor array of one queue, mapped read-only; unmapped on drop.
struct Descriptors {
    base: NonNull<u8>,
    len: usize,
    depth: u16,
}

impl Descriptors {
    fn map(file: &File, q_id: u16, depth: u16) -> Result<Self, QueueError> {
        let map_err = |source| QueueError::Map { q_id, source };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096);
        let len = usize::try_from(desc_mmap_len(depth, page))
            .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        let offset = libc::off_t::try_from(desc_mmap_offset(q_id, page))
            .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        // SAFETY: a fresh shared read-only mapping of the character node; the kernel checks
        // the offset and length and the mapping is only read through `read`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
        Ok(Self { base, len, depth })
    }

    /// The descriptor of `tag` as the kernel wrote it (`None` past the depth).
    fn read(&self, tag: u16) -> Option<IoDesc> {
        if tag >= self.depth {
            return None;
        }
        let offset = usize::from(tag) * IoDesc::SIZE;
        if offset + IoDesc::SIZE > self.len {
            return None;
        }
        let mut raw = [0u8; IoDesc::SIZE];
        for (i, b) in raw.iter_mut().enumerate() {
            // SAFETY: offset + i < self.len (checked above), inside the live mapping; the
            // kernel may write the page concurrently, so each byte is read volatile.
            *b = unsafe { std::ptr::read_volatile(self.base.as_ptr().add(offset + i)) };
        }
        Some(IoDesc::from_bytes(&raw))
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: base/len describe the mapping made in `map`, unmapped once here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Build the FETCH or COMMIT_AND_FETCH entry of `tag`.
fn io_entry(fd: i32, op: u32, cmd: IoCmd) -> io_uring::squeue::Entry {
    opcode::UringCmd16::new(types::Fd(fd), op)
        .cmd(cmd.to_bytes())
        .build()
        .user_data(u64::from(cmd.tag))
}

/// Serve queue `setup.q_id` until every tag is aborted. `fetched` is told once every tag's
/// first fetch is submitted (START_DEV / END_USER_RECOVERY may then be issued), or why the
/// queue could not get there.
pub fn run_queue(
    setup: QueueSetup,
    fetched: SyncSender<Result<(), String>>,
) -> Result<QueueReport, QueueError> {
    let q_id = setup.q_id;
    let limits = setup.limits;
    let fail_setup = |e: QueueError| {
        let _ = fetched.send(Err(crate::error_chain::ErrorChain(&e).to_string()));
        e
    };
    pin_to(q_id, &setup.cpus);
    let descs = Descriptors::map(&setup.char_file, q_id, limits.depth).map_err(fail_setup)?;
    let io_bytes = usize::try_from(limits.max_io_bytes).unwrap_or(usize::MAX);
    // Buffer path: one buffer per tag, as large as the largest request (the kernel copies
    // WRITE data into it before offering the request). Zeroed allocations stay untouched
    // (and out of the RSS) until a request of that size uses them. Declared before the ring,
    // so they outlive it.
    let mut buffers: Vec<Vec<u8>> = match setup.data_path {
        DataPath::Buffer => (0..limits.depth).map(|_| vec![0u8; io_bytes]).collect(),
        DataPath::UserCopy => Vec::new(),
    };
    let mut ring: IoUring = IoUring::builder()
        .build(u32::from(limits.depth).next_power_of_two().max(4))
        .map_err(|source| fail_setup(QueueError::Ring { q_id, source }))?;
    let fd = setup.char_file.as_raw_fd();
    let addr_of = |buffers: &mut Vec<Vec<u8>>, tag: u16| -> u64 {
        buffers
            .get_mut(usize::from(tag))
            .map_or(0, |b| b.as_mut_ptr() as u64)
    };
    for tag in 0..limits.depth {
        let cmd = IoCmd {
            q_id,
            tag,
            result: 0,
            addr: addr_of(&mut buffers, tag),
        };
        let entry = io_entry(fd, IO_FETCH_REQ, cmd);
        // SAFETY: the buffer named by `addr` lives in `buffers`, which is never resized and
        // is dropped after the ring.
        unsafe { ring.submission().push(&entry) }.map_err(|_| {
            fail_setup(QueueError::Submit {
                q_id,
                source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
            })
        })?;
    }
    ring.submit()
        .map_err(|source| fail_setup(QueueError::Submit { q_id, source }))?;
    let _ = fetched.send(Ok(()));
    log::debug!("ublk queue {q_id}: {} tags fetched", limits.depth);

    let mut report = QueueReport::default();
    let mut live = usize::from(limits.depth);
    let mut out = AlignedBuf::default();
    let mut done: Vec<(u16, i32)> = Vec::new();
    let mut answered: Vec<Request> = Vec::new();
    while live > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(source) => return Err(QueueError::Submit { q_id, source }),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result()))
                .filter_map(|(user_data, res)| match tag_of(user_data, &limits) {
                    Some(tag) => Some((tag, res)),
                    None => {
                        log::error!(
                            "ublk queue {q_id}: completion for unknown tag {user_data}; ignored"
                        );
                        None
                    }
                }),
        );
        for &(tag, res) in &done {
            if res != IO_RES_OK {
                live -= 1;
                if res != IO_RES_ABORT {
                    log::warn!(
                        "ublk queue {q_id} tag {tag}: the kernel refused the command ({}); \
                         the tag is no longer served",
                        std::io::Error::from_raw_os_error(res.saturating_neg())
                    );
                }
                continue;
            }
            let desc = descs.read(tag);
            let result = match &desc {
                Some(desc) => serve(setup.handler.as_ref(), desc, &limits, &mut out),
                None => -libc::EINVAL,
            };
            if result > 0 {
                if let Some(Ok(req)) = desc.as_ref().map(|d| read_request(d, &limits)) {
                    answered.push(req);
                }
            }
            let result = if result > 0 {
                deliver(&setup, &mut buffers, tag, &out, result)
            } else {
                result
            };
            report.committed = report.committed.saturating_add(1);
            if result < 0 {
                report.failed = report.failed.saturating_add(1);
            }
            let cmd = IoCmd {
                q_id,
                tag,
                result,
                addr: addr_of(&mut buffers, tag),
            };
            let entry = io_entry(fd, IO_COMMIT_AND_FETCH_REQ, cmd);
            // SAFETY: as for the fetches above; at most one command per tag is in flight and
            // the ring has room for every tag.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                ring.submit()
                    .map_err(|source| QueueError::Submit { q_id, source })?;
                // SAFETY: as above; the queue was just drained into the kernel.
                unsafe { ring.submission().push(&entry) }.map_err(|_| QueueError::Submit {
                    q_id,
                    source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
                })?;
            }
        }
        if !answered.is_empty() {
            // The answers go to the kernel first, then the handler's after-answer work
            // (read-ahead advice) runs. A failed submit here is only early: the commands stay
            // queued and the next `submit_and_wait` submits them or reports the error.
            let _ = ring.submit();
            for req in answered.drain(..) {
                setup.handler.answered(&req);
            }
        }
    }
    log::debug!(
        "ublk queue {q_id} ended: {} requests committed, {} failed",
        report.committed,
        report.failed
    );
    Ok(report)
}

/// Run the calling (queue) thread on `cpus` (nothing to do when empty). A failure costs only
/// speed, so it is logged and serving goes on.
fn pin_to(q_id: u16, cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    let mut set = CpuSet::new();
    let mut named = 0usize;
    for &cpu in cpus {
        if set.set(cpu).is_ok() {
            named += 1;
        }
    }
    if named == 0 {
        log::warn!("ublk queue {q_id}: none of its CPUs {cpus:?} fits a CPU set; not pinned");
        return;
    }
    match sched_setaffinity(Pid::from_raw(0), &set) {
        Ok(()) => log::debug!("ublk queue {q_id}: thread runs on CPUs {cpus:?}"),
        Err(e) => log::warn!(
            "ublk queue {q_id}: pinning its thread to CPUs {cpus:?} failed ({e}); it runs on \
             any CPU (requests may then wake it on another CPU, which is slower but correct)"
        ),
    }
}

/// Hand a READ's `result` bytes in `data` to the kernel; the result to commit.
fn deliver(setup: &QueueSetup, buffers: &mut [Vec<u8>], tag: u16, data: &[u8], result: i32) -> i32 {
    match setup.data_path {
        DataPath::Buffer => match buffers.get_mut(usize::from(tag)) {
            Some(buf) if buf.len() >= data.len() => {
                buf[..data.len()].copy_from_slice(data);
                result
            }
            _ => -libc::EIO,
        },
        DataPath::UserCopy => {
            let pos = user_copy_pos(setup.q_id, tag, 0);
            match setup.char_file.write_all_at(data, pos) {
                Ok(()) => result,
                Err(e) => {
                    log::error!(
                        "ublk queue {} tag {tag}: copying {} bytes to the request failed: {e}; \
                         failing it",
                        setup.q_id,
                        data.len()
                    );
                    -libc::EIO
                }
            }
        }
    }
}
