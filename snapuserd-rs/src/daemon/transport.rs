//! dm-user transport: worker threads that serve one handler's misc device.
//!
//! Each worker owns its own [`Channel`] (one `open()` of `/dev/dm-user/<misc>`), reads a
//! request, asks the block server for the status (and READ data) *before* writing anything
//! back, and answers with one response. Every request read is answered. A worker ends when
//! its target is gone (`ENOTBLK`, or end of stream on a test transport), when its stop flag
//! is set, or when the channel itself fails; it never takes the process down.
//!
//! Channels are produced by a [`ChannelOpener`], the seam that lets tests drive workers
//! through a socketpair playing the kernel.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

#[cfg(not(test))]
use crate::cow_backend::{source_file::FileSource, CowSnapshot};
use crate::dm_user::{
    Channel, ChannelError, MessageHeader, Readiness, Received, DM_USER_REQ_MAP_READ,
    DM_USER_REQ_MAP_WRITE, DM_USER_RESP_ERROR,
};
use crate::snapshot::block_server::{Request, Status, MAX_REQUEST_BYTES};

/// How long a worker waits for a message before it looks at its stop flag again.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Pause after a readiness report that produced no message (a kernel without poll support
/// reports the fd always readable), so such a worker does not spin.
const SPURIOUS_WAKE_PAUSE: Duration = Duration::from_millis(5);

/// Piece size used to discard an over-long WRITE payload.
const DRAIN_PIECE: usize = 64 << 10;

/// Errors of the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// Opening a channel for a worker failed.
    #[error("opening dm-user channel {index} for {misc}: {source}")]
    Open {
        /// Misc name of the handler.
        misc: String,
        /// Index of the worker.
        index: u32,
        /// Underlying error.
        #[source]
        source: ChannelError,
    },
    /// Spawning a worker thread failed.
    #[error("spawning worker {index} for {misc}: {source}")]
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

/// Something that answers dm-user requests: the block server of one snapshot.
pub trait RequestHandler: Send + Sync {
    /// Decide the status of `req` and, for a successful READ, fill `read_out` with `req.len`
    /// bytes. `write_payload` holds a WRITE's payload.
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> Status;
}

// Under `cfg(test)` the COW store carries a single-threaded crash clock, so `CowSnapshot` is
// not `Sync` in this crate's unit tests; they use fakes and the integration tests use this.
#[cfg(not(test))]
impl RequestHandler for CowSnapshot<FileSource> {
    fn handle(&self, req: &Request, write_payload: &[u8], read_out: &mut Vec<u8>) -> Status {
        self.server().handle(req, write_payload, read_out)
    }
}

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
    /// The stop flag was set.
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

/// Most metadata write-backs one worker holds while the merge is paused; later ones are
/// answered at once (the kernel issues one write-back at a time per snapshot).
pub const MAX_PARKED_WRITES: usize = 8;

/// Size of a metadata write-back (one 4 KiB exception area); only these are held.
const METADATA_WRITE_BYTES: u64 = 4096;

/// A WRITE held while the merge is paused.
struct Parked {
    header: MessageHeader,
    payload: Vec<u8>,
}

/// Serve `channel` with `handler` until the target goes away, `stop` is set, or the channel
/// fails. Runs on the calling thread.
///
/// While `merge_paused` is set, 4 KiB WRITEs (dm-snapshot-merge's metadata write-backs)
/// are held, unprocessed and unanswered, up to [`MAX_PARKED_WRITES`]; READs, empty
/// flushes and other WRITEs are answered as usual, since dm-user lets a channel answer out of order. The
/// kernel's merge waits for the held write, so it makes no progress; reads of the snapshot
/// do not stall. Held writes are processed and answered, in arrival order, when the flag
/// clears or the worker is stopped.
pub fn serve_channel(
    mut channel: Channel,
    handler: &dyn RequestHandler,
    stop: &AtomicBool,
    merge_paused: &AtomicBool,
) -> WorkerReport {
    let mut answered = 0u64;
    let max_payload = usize::try_from(MAX_REQUEST_BYTES).unwrap_or(usize::MAX);
    channel.set_max_payload(max_payload);
    if let Err(e) = channel.set_nonblocking(true) {
        log::error!("dm-user worker: {e}");
        return WorkerReport {
            exit: WorkerExit::ChannelFailed,
            answered,
        };
    }
    let mut payload = Vec::new();
    let mut data = Vec::new();
    let mut parked: Vec<Parked> = Vec::new();
    let exit = 'serve: loop {
        let stopping = stop.load(Ordering::Acquire);
        if !parked.is_empty() && (stopping || !merge_paused.load(Ordering::Acquire)) {
            for p in parked.drain(..) {
                match answer(&mut channel, handler, &p.header, &p.payload, &mut data) {
                    Ok(()) => answered = answered.saturating_add(1),
                    Err(exit) => break 'serve exit,
                }
            }
        }
        if stopping {
            break WorkerExit::Stopped;
        }
        match channel.poll(STOP_POLL_INTERVAL) {
            Ok(Readiness::TimedOut) => continue,
            Ok(Readiness::Readable | Readiness::HangUp) => {}
            Err(e) => {
                log::error!("dm-user worker: {e}");
                break WorkerExit::ChannelFailed;
            }
        }
        let header = match channel.receive(&mut payload) {
            Ok(Received::Request(h)) => h,
            Ok(Received::TargetGone) => break WorkerExit::TargetGone,
            Err(ChannelError::WouldBlock) => {
                std::thread::sleep(SPURIOUS_WAKE_PAUSE);
                continue;
            }
            Err(ChannelError::Interrupted) => continue,
            Err(ChannelError::UnexpectedEof { got: 0, .. }) => break WorkerExit::TargetGone,
            Err(ChannelError::PayloadTooLarge { seq, len, max }) => {
                log::error!("dm-user WRITE seq {seq}: {len}-byte payload over the {max}-byte cap");
                match refuse_oversized_write(&mut channel, seq, len) {
                    Ok(()) => {
                        answered = answered.saturating_add(1);
                        continue;
                    }
                    Err(exit) => break exit,
                }
            }
            Err(e) => {
                log::error!("dm-user worker: {e}");
                break WorkerExit::ChannelFailed;
            }
        };
        if header.msg_type == DM_USER_REQ_MAP_WRITE
            && header.len == METADATA_WRITE_BYTES
            && merge_paused.load(Ordering::Acquire)
        {
            if parked.len() < MAX_PARKED_WRITES {
                log::debug!("merge paused: holding WRITE seq {}", header.seq);
                parked.push(Parked {
                    header,
                    payload: std::mem::take(&mut payload),
                });
                continue;
            }
            log::warn!(
                "merge paused but {MAX_PARKED_WRITES} writes are held; answering seq {}",
                header.seq
            );
        }
        match answer(&mut channel, handler, &header, &payload, &mut data) {
            Ok(()) => answered = answered.saturating_add(1),
            Err(exit) => break exit,
        }
    };
    match exit {
        WorkerExit::ChannelFailed => log::warn!("dm-user worker ended after {answered} requests"),
        _ => log::debug!("dm-user worker ended ({exit:?}) after {answered} requests"),
    }
    WorkerReport { exit, answered }
}

/// Decide the status of one request with `handler` and send the response.
fn answer(
    channel: &mut Channel,
    handler: &dyn RequestHandler,
    header: &MessageHeader,
    payload: &[u8],
    data: &mut Vec<u8>,
) -> Result<(), WorkerExit> {
    let req = Request {
        kind: header.msg_type,
        flags: header.flags,
        sector: header.sector,
        len: header.len,
    };
    let status = handler.handle(&req, payload, data);
    let body: &[u8] = if status == Status::Success && header.msg_type == DM_USER_REQ_MAP_READ {
        data
    } else {
        &[]
    };
    match channel.respond(header, status.code(), body) {
        Ok(()) => Ok(()),
        Err(ChannelError::TargetGone) => Err(WorkerExit::TargetGone),
        Err(e) => {
            log::error!("dm-user worker: answering seq {}: {e}", header.seq);
            Err(WorkerExit::ChannelFailed)
        }
    }
}

/// Read and discard the `len`-byte payload of an over-long WRITE, then answer it ERROR, so
/// the channel stays in step and the request is not dropped.
fn refuse_oversized_write(channel: &mut Channel, seq: u64, len: u64) -> Result<(), WorkerExit> {
    let mut left = len;
    let mut piece = vec![0u8; DRAIN_PIECE];
    let mut file = channel.file();
    while left > 0 {
        let want = usize::try_from(left.min(DRAIN_PIECE as u64)).unwrap_or(DRAIN_PIECE);
        let buf = piece.get_mut(..want).unwrap_or_default();
        match file.read(buf) {
            Ok(0) => return Err(WorkerExit::TargetGone),
            Ok(n) => left = left.saturating_sub(n as u64),
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOTBLK) => return Err(WorkerExit::TargetGone),
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if channel.poll(STOP_POLL_INTERVAL).is_err() {
                        return Err(WorkerExit::ChannelFailed);
                    }
                }
                _ => {
                    log::error!("dm-user worker: discarding payload of seq {seq}: {e}");
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
    match channel.respond(&header, DM_USER_RESP_ERROR, &[]) {
        Ok(()) => Ok(()),
        Err(ChannelError::TargetGone) => Err(WorkerExit::TargetGone),
        Err(e) => {
            log::error!("dm-user worker: answering seq {seq}: {e}");
            Err(WorkerExit::ChannelFailed)
        }
    }
}

/// The worker threads of one handler, with their shared stop flag.
#[derive(Debug)]
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<WorkerReport>>,
}

impl Workers {
    /// Open `count` channels on `misc` with `opener` (all before any thread starts, so a
    /// missing device fails the whole start), then serve each on its own thread.
    /// `merge_paused` is the daemon-wide pause flag (see [`serve_channel`]).
    pub fn spawn(
        opener: &dyn ChannelOpener,
        misc: &str,
        handler: Arc<dyn RequestHandler>,
        count: u32,
        merge_paused: Arc<AtomicBool>,
    ) -> Result<Self, TransportError> {
        let mut channels = Vec::new();
        for index in 0..count.max(1) {
            let channel = opener.open(misc).map_err(|source| TransportError::Open {
                misc: misc.to_string(),
                index,
                source,
            })?;
            channels.push(channel);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Workers {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for (index, channel) in (0u32..).zip(channels) {
            let stop = Arc::clone(&stop);
            let handler = Arc::clone(&handler);
            let paused = Arc::clone(&merge_paused);
            let spawned = std::thread::Builder::new()
                .name(format!("snapuserd-{index}"))
                .spawn(move || serve_channel(channel, handler.as_ref(), &stop, &paused));
            match spawned {
                Ok(t) => workers.threads.push(t),
                Err(source) => {
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

    /// True once every worker thread has ended.
    pub fn all_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Ask every worker to stop (each notices within [`STOP_POLL_INTERVAL`]).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
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
        fn handle(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> Status {
            match req.kind {
                0 if req.len <= 1 << 20 => {
                    out.clear();
                    out.resize(req.len as usize, req.sector as u8);
                    Status::Success
                }
                0 => Status::Error,
                1 => {
                    self.written.lock().unwrap().extend_from_slice(payload);
                    Status::Success
                }
                _ => Status::Unsupported,
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
            let stop = AtomicBool::new(false);
            serve_channel(channel, handler.as_ref(), &stop, &AtomicBool::new(false))
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
        let mut workers =
            Workers::spawn(&opener, "x", Arc::new(Fake::default()), 3, Arc::default()).unwrap();
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
        let err = Workers::spawn(
            &FailingOpener,
            "gone",
            Arc::new(Fake::default()),
            2,
            Arc::default(),
        )
        .unwrap_err();
        assert!(matches!(err, TransportError::Open { index: 0, .. }));
    }

    #[test]
    fn paused_merge_holds_write_backs_but_serves_reads() {
        let fake = Arc::new(Fake::default());
        let paused = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (mut kernel, daemon) = UnixStream::pair().unwrap();
        let channel = Channel::from_fd(daemon.into());
        let t = {
            let (fake, paused, stop) = (fake.clone(), paused.clone(), stop.clone());
            std::thread::spawn(move || serve_channel(channel, fake.as_ref(), &stop, &paused))
        };
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
        // Resume: the held write is processed and answered.
        paused.store(false, Ordering::Release);
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
        stop.store(true, Ordering::Release);
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
}
