//! A RAM-backed block device served over dm-user channels.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapuserd::dm_user::{
    Channel, ChannelError, MessageHeader, Received, DM_USER_REQ_MAP_DISCARD, DM_USER_REQ_MAP_READ,
    DM_USER_REQ_MAP_WRITE, DM_USER_REQ_MAP_WRITE_ZEROES, DM_USER_RESP_ERROR, DM_USER_RESP_SUCCESS,
    DM_USER_RESP_UNSUPPORTED,
};

/// Counters of what the daemon saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// READ requests.
    pub reads: AtomicU64,
    /// WRITE requests with data.
    pub writes: AtomicU64,
    /// Flushes (empty PREFLUSH writes or FLUSH).
    pub flushes: AtomicU64,
    /// DISCARD requests.
    pub discards: AtomicU64,
    /// Bytes discarded.
    pub discarded_bytes: AtomicU64,
    /// Requests answered UNSUPPORTED or ERROR.
    pub rejected: AtomicU64,
    /// Largest request seen, bytes.
    pub max_len: AtomicU64,
    /// Union of the flag bits of every request.
    pub flags_seen: AtomicU64,
    /// Nanoseconds spent answering READs (the `respond` call: header and data written back).
    pub read_respond_ns: AtomicU64,
}

/// The backing store shared by all channels of one device.
#[derive(Debug)]
pub struct RamDisk {
    /// Contents.
    pub data: RwLock<Vec<u8>>,
    /// Counters.
    pub stats: Stats,
}

impl RamDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            data: RwLock::new(vec![0; size]),
            stats: Stats::default(),
        })
    }

    /// Copy of `len` bytes at `off`.
    pub fn snapshot(&self, off: usize, len: usize) -> Vec<u8> {
        let d = self.data.read().unwrap();
        d[off..off + len].to_vec()
    }

    /// Serve one request on `chan`: decide the outcome first, then send the
    /// response header exactly once (READ data straight from the store, no copy).
    pub fn respond_to(
        &self,
        chan: &mut Channel,
        h: &MessageHeader,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        let s = &self.stats;
        s.max_len.fetch_max(h.len, Ordering::Relaxed);
        s.flags_seen.fetch_or(h.flags, Ordering::Relaxed);
        if h.is_flush() {
            s.flushes.fetch_add(1, Ordering::Relaxed);
            return chan.respond(h, DM_USER_RESP_SUCCESS, &[]);
        }
        let len = self.data.read().unwrap().len();
        let range = h
            .byte_offset()
            .and_then(|off| usize::try_from(off).ok())
            .and_then(|off| Some(off..off.checked_add(usize::try_from(h.len).ok()?)?))
            .filter(|r| r.end <= len);
        let Some(range) = range else {
            s.rejected.fetch_add(1, Ordering::Relaxed);
            return chan.respond(h, DM_USER_RESP_ERROR, &[]);
        };
        match h.msg_type {
            DM_USER_REQ_MAP_READ => {
                s.reads.fetch_add(1, Ordering::Relaxed);
                let data = self.data.read().unwrap();
                let started = Instant::now();
                let sent = chan.respond(h, DM_USER_RESP_SUCCESS, &data[range]);
                let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                s.read_respond_ns.fetch_add(ns, Ordering::Relaxed);
                sent
            }
            DM_USER_REQ_MAP_WRITE => {
                if payload.len() != range.len() {
                    s.rejected.fetch_add(1, Ordering::Relaxed);
                    return chan.respond(h, DM_USER_RESP_ERROR, &[]);
                }
                s.writes.fetch_add(1, Ordering::Relaxed);
                self.data.write().unwrap()[range].copy_from_slice(payload);
                chan.respond(h, DM_USER_RESP_SUCCESS, &[])
            }
            DM_USER_REQ_MAP_DISCARD | DM_USER_REQ_MAP_WRITE_ZEROES => {
                s.discards.fetch_add(1, Ordering::Relaxed);
                s.discarded_bytes.fetch_add(h.len, Ordering::Relaxed);
                self.data.write().unwrap()[range].fill(0);
                chan.respond(h, DM_USER_RESP_SUCCESS, &[])
            }
            _ => {
                s.rejected.fetch_add(1, Ordering::Relaxed);
                chan.respond(h, DM_USER_RESP_UNSUPPORTED, &[])
            }
        }
    }
}

/// How a serving loop ended.
#[derive(Debug)]
pub enum ServeEnd {
    /// ENOTBLK: the target was removed.
    TargetGone,
    /// Another error.
    Error(ChannelError),
}

/// Serve `chan` until the target goes away or an error occurs.
pub fn serve(mut chan: Channel, disk: &RamDisk) -> ServeEnd {
    let mut payload = Vec::new();
    loop {
        match chan.receive(&mut payload) {
            Ok(Received::Request(h)) => match disk.respond_to(&mut chan, &h, &payload) {
                Ok(()) => {}
                Err(ChannelError::TargetGone) => return ServeEnd::TargetGone,
                Err(e) => return ServeEnd::Error(e),
            },
            Ok(Received::TargetGone) => return ServeEnd::TargetGone,
            Err(ChannelError::Interrupted) => continue,
            Err(e) => return ServeEnd::Error(e),
        }
    }
}

/// `threads` serving threads, each on its own channel of control node `name`.
pub struct Daemon {
    /// The disk served.
    pub disk: Arc<RamDisk>,
    handles: Vec<JoinHandle<ServeEnd>>,
}

impl Daemon {
    /// Open `threads` channels on `/dev/dm-user/<name>` and serve `disk`.
    pub fn start(name: &str, disk: Arc<RamDisk>, threads: usize) -> Result<Self, ChannelError> {
        Self::start_with(name, disk, threads, true)
    }

    /// As [`Daemon::start`], with answers spliced (`splice`) or always written.
    pub fn start_with(
        name: &str,
        disk: Arc<RamDisk>,
        threads: usize,
        splice: bool,
    ) -> Result<Self, ChannelError> {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let mut chan = Channel::open(name, Duration::from_secs(5))?;
            chan.set_splice(splice);
            let d = disk.clone();
            handles.push(std::thread::spawn(move || serve(chan, &d)));
        }
        Ok(Self { disk, handles })
    }

    /// Wait for all threads (after the device was removed); Err if any ended otherwise than ENOTBLK.
    pub fn join(self) -> Result<(), String> {
        for h in self.handles {
            match h.join() {
                Ok(ServeEnd::TargetGone) => {}
                Ok(ServeEnd::Error(e)) => return Err(format!("daemon thread ended with {e}")),
                Err(_) => return Err("daemon thread panicked".into()),
            }
        }
        Ok(())
    }
}
