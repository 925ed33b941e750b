//! A host model of the kernel side: dm-snap-persistent loading the exception store,
//! dm-snapshot's read path, and dm-snapshot-merge's merge loop (reference §A.4,
//! dm-user-and-dm-snapshot.md §3).
//!
//! The model talks to the daemon logic only through [`CowDevice`] (read chunk, write chunk
//! with PREFLUSH|FUA, empty flush), implemented here by [`ServerCow`] as dm-user requests to
//! a [`BlockServer`], so it exercises exactly the path dm-user will. The origin is an
//! in-memory disk with a volatile write cache and a crash clock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

use thiserror::Error;

use super::block_server::{BlockServer, BlockSource};
use super::exception_store::{area_chunk, CHUNK_SECTORS, DISK_MAGIC, EXCEPTIONS_PER_AREA};
use super::merge_plan::{SourceDevice, BLOCK_SIZE, BLOCK_SIZE_U64};
use super::merge_tracker::MergeStateStore;
use super::test_support::CrashClock;
use crate::dm_user::{
    Request, ResponseCode, DM_USER_REQ_MAP_FLAG_FUA, DM_USER_REQ_MAP_FLAG_PREFLUSH,
    DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE,
};

/// One chunk.
pub type Chunk = [u8; BLOCK_SIZE];

/// Errors seen by the kernel model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The COW device answered a request with something other than SUCCESS.
    #[error("COW device answered {status:?} to {what} of chunk {chunk}")]
    Cow {
        /// What was attempted.
        what: &'static str,
        /// Chunk addressed.
        chunk: u64,
        /// Response code.
        status: ResponseCode,
    },
    /// The origin device failed (or crashed).
    #[error("origin device")]
    Origin(#[from] io::Error),
    /// The header chunk is not a valid persistent snapshot header.
    #[error("bad snapshot header: {0}")]
    BadHeader(String),
    /// The exception table is inconsistent.
    #[error("bad exception table: {0}")]
    BadTable(String),
}

/// The COW device as dm-snapshot uses it.
pub trait CowDevice {
    /// Read one chunk.
    fn read_chunk(&mut self, chunk: u64, buf: &mut Chunk) -> Result<(), ModelError>;
    /// Write one chunk with PREFLUSH|FUA (a metadata-area commit).
    fn write_chunk(&mut self, chunk: u64, buf: &Chunk) -> Result<(), ModelError>;
    /// Empty flush.
    fn flush(&mut self) -> Result<(), ModelError>;
}

/// [`CowDevice`] implemented as dm-user requests to a [`BlockServer`].
pub struct ServerCow<'a, B, D, S: MergeStateStore> {
    /// The daemon side.
    pub server: &'a BlockServer<B, D, S>,
}

impl<B: BlockSource, D: SourceDevice, S: MergeStateStore> CowDevice for ServerCow<'_, B, D, S> {
    fn read_chunk(&mut self, chunk: u64, buf: &mut Chunk) -> Result<(), ModelError> {
        let req = Request {
            kind: DM_USER_REQ_MAP_READ,
            flags: 0,
            sector: chunk * CHUNK_SECTORS,
            len: BLOCK_SIZE_U64,
        };
        let mut out = Vec::new();
        match self.server.handle(&req, &[], &mut out) {
            ResponseCode::Success if out.len() == BLOCK_SIZE => {
                buf.copy_from_slice(&out);
                Ok(())
            }
            status => Err(ModelError::Cow {
                what: "read",
                chunk,
                status,
            }),
        }
    }

    fn write_chunk(&mut self, chunk: u64, buf: &Chunk) -> Result<(), ModelError> {
        let req = Request {
            kind: DM_USER_REQ_MAP_WRITE,
            flags: DM_USER_REQ_MAP_FLAG_PREFLUSH | DM_USER_REQ_MAP_FLAG_FUA,
            sector: chunk * CHUNK_SECTORS,
            len: BLOCK_SIZE_U64,
        };
        match self.server.handle(&req, buf, &mut Vec::new()) {
            ResponseCode::Success => Ok(()),
            status => Err(ModelError::Cow {
                what: "write",
                chunk,
                status,
            }),
        }
    }

    fn flush(&mut self) -> Result<(), ModelError> {
        let req = Request {
            kind: DM_USER_REQ_MAP_WRITE,
            flags: DM_USER_REQ_MAP_FLAG_PREFLUSH,
            sector: 0,
            len: 0,
        };
        match self.server.handle(&req, &[], &mut Vec::new()) {
            ResponseCode::Success => Ok(()),
            status => Err(ModelError::Cow {
                what: "flush",
                chunk: 0,
                status,
            }),
        }
    }
}

/// What happens to the origin's unflushed writes at a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// All unflushed writes are lost.
    DropUnflushed,
    /// All unflushed writes reached the disk.
    KeepUnflushed,
    /// The older half of the unflushed writes reached the disk.
    KeepOlderHalf,
}

impl CrashMode {
    /// Every mode, for sweeps.
    pub const ALL: [CrashMode; 3] = [
        CrashMode::DropUnflushed,
        CrashMode::KeepUnflushed,
        CrashMode::KeepOlderHalf,
    ];
}

/// Crash at budgets 0, `stride`, 2·`stride`, … in every crash mode, until a run completes
/// without reaching its budget. `run_one(budget, mode)` returns whether the crash happened.
/// Returns how many crashed runs were tried.
pub fn crash_sweep(stride: u64, mut run_one: impl FnMut(u64, CrashMode) -> bool) -> u64 {
    let mut tried = 0;
    for mode in CrashMode::ALL {
        let mut budget = 0;
        while run_one(budget, mode) {
            tried += 1;
            budget += stride;
        }
    }
    tried
}

/// An in-memory origin disk with a volatile write cache.
#[derive(Debug)]
pub struct OriginDevice {
    durable: Vec<u8>,
    /// Unflushed writes in issue order.
    volatile: Vec<(u64, Chunk)>,
    /// Index in `volatile` of the latest unflushed write of each block.
    latest: HashMap<u64, usize>,
    clock: CrashClock,
}

/// Shared handle to the origin (the daemon reads it as the source device).
#[derive(Debug, Clone)]
pub struct Origin(pub Rc<RefCell<OriginDevice>>);

impl OriginDevice {
    /// A disk holding `image`.
    pub fn create(image: Vec<u8>, clock: CrashClock) -> Origin {
        Origin(Rc::new(RefCell::new(OriginDevice {
            durable: image,
            volatile: Vec::new(),
            latest: HashMap::new(),
            clock,
        })))
    }

    fn view(&self) -> Vec<u8> {
        let mut img = self.durable.clone();
        apply(&mut img, self.volatile.iter());
        img
    }
}

fn apply<'a>(img: &mut [u8], writes: impl Iterator<Item = &'a (u64, Chunk)>) {
    for (block, data) in writes {
        let at = *block as usize * BLOCK_SIZE;
        img[at..at + BLOCK_SIZE].copy_from_slice(data);
    }
}

impl Origin {
    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        (self.0.borrow().durable.len() / BLOCK_SIZE) as u64
    }

    /// Read block `block` as the running system sees it (cache included).
    pub fn read_block(&self, block: u64, out: &mut Chunk) -> Result<(), ModelError> {
        let dev = self.0.borrow();
        if let Some((_, data)) = dev.latest.get(&block).and_then(|&i| dev.volatile.get(i)) {
            out.copy_from_slice(data);
            return Ok(());
        }
        let at = usize::try_from(block)
            .ok()
            .and_then(|b| b.checked_mul(BLOCK_SIZE));
        match at.and_then(|a| dev.durable.get(a..a + BLOCK_SIZE)) {
            Some(bytes) => {
                out.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(ModelError::Origin(io::Error::other(format!(
                "origin block {block} out of range"
            )))),
        }
    }

    /// Write block `block` into the volatile cache.
    pub fn write_block(&self, block: u64, data: &Chunk) -> Result<(), ModelError> {
        let mut dev = self.0.borrow_mut();
        dev.clock.step("origin write")?;
        if block as usize >= dev.durable.len() / BLOCK_SIZE {
            return Err(ModelError::Origin(io::Error::other(format!(
                "origin write {block} out of range"
            ))));
        }
        let index = dev.volatile.len();
        dev.volatile.push((block, *data));
        dev.latest.insert(block, index);
        Ok(())
    }

    /// Flush the cache to the durable image.
    pub fn flush(&self) -> Result<(), ModelError> {
        let mut dev = self.0.borrow_mut();
        dev.clock.step("origin flush")?;
        let pending = std::mem::take(&mut dev.volatile);
        dev.latest.clear();
        apply(&mut dev.durable, pending.iter());
        Ok(())
    }

    /// The current image, cache included.
    pub fn image(&self) -> Vec<u8> {
        self.0.borrow().view()
    }

    /// The image a reboot after a crash finds.
    pub fn crash_image(&self, mode: CrashMode) -> Vec<u8> {
        let dev = self.0.borrow();
        let mut img = dev.durable.clone();
        let keep = match mode {
            CrashMode::DropUnflushed => 0,
            CrashMode::KeepUnflushed => dev.volatile.len(),
            CrashMode::KeepOlderHalf => dev.volatile.len() / 2,
        };
        apply(&mut img, dev.volatile.iter().take(keep));
        img
    }
}

impl SourceDevice for Origin {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        let mut block_buf = [0u8; BLOCK_SIZE];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = byte_offset + done as u64;
            let (block, offset) = (pos / BLOCK_SIZE_U64, (pos % BLOCK_SIZE_U64) as usize);
            self.read_block(block, &mut block_buf)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let take = (BLOCK_SIZE - offset).min(buf.len() - done);
            buf[done..done + take].copy_from_slice(&block_buf[offset..offset + take]);
            done += take;
        }
        Ok(())
    }
}

fn entry(area: &Chunk, slot: usize) -> (u64, u64) {
    let at = slot * 16;
    let mut o = [0u8; 8];
    let mut n = [0u8; 8];
    o.copy_from_slice(&area[at..at + 8]);
    n.copy_from_slice(&area[at + 8..at + 16]);
    (u64::from_le_bytes(o), u64::from_le_bytes(n))
}

/// Result of one merge step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeStep {
    /// Every exception is merged.
    Done,
    /// This many chunks were merged as one batch.
    Merged(usize),
}

/// dm-snapshot with a persistent exception store, as loaded by one table.
#[derive(Debug)]
pub struct DmSnapshot {
    exceptions: HashMap<u64, u64>,
    area: Chunk,
    current_area: usize,
    current_committed: usize,
}

impl DmSnapshot {
    /// Read the header and the metadata areas until one is not full.
    pub fn load(cow: &mut dyn CowDevice) -> Result<Self, ModelError> {
        let mut buf = [0u8; BLOCK_SIZE];
        cow.read_chunk(0, &mut buf)?;
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        if word(0) != DISK_MAGIC
            || word(4) != 1
            || word(8) != 1
            || u64::from(word(12)) != CHUNK_SECTORS
        {
            return Err(ModelError::BadHeader(format!("{:x?}", &buf[..16])));
        }
        let mut exceptions = HashMap::new();
        let mut area_index = 0usize;
        loop {
            let mut area = [0u8; BLOCK_SIZE];
            cow.read_chunk(area_chunk(area_index), &mut area)?;
            let mut count = 0usize;
            for slot in 0..EXCEPTIONS_PER_AREA {
                let (old, new) = entry(&area, slot);
                if new == 0 {
                    break;
                }
                if exceptions.insert(old, new).is_some() {
                    return Err(ModelError::BadTable(format!(
                        "old_chunk {old} appears twice"
                    )));
                }
                count += 1;
            }
            if count < EXCEPTIONS_PER_AREA {
                return Ok(DmSnapshot {
                    exceptions,
                    area,
                    current_area: area_index,
                    current_committed: count,
                });
            }
            area_index += 1;
            if area_index > 1 << 22 {
                return Err(ModelError::BadTable("no terminating area".into()));
            }
        }
    }

    /// Read block `block` of the snapshot device.
    pub fn read_block(
        &self,
        origin: &Origin,
        cow: &mut dyn CowDevice,
        block: u64,
        out: &mut Chunk,
    ) -> Result<(), ModelError> {
        match self.exceptions.get(&block) {
            Some(&new) => cow.read_chunk(new, out),
            None => origin.read_block(block, out),
        }
    }

    /// One iteration of the snapshot-merge loop.
    pub fn merge_step(
        &mut self,
        origin: &Origin,
        cow: &mut dyn CowDevice,
    ) -> Result<MergeStep, ModelError> {
        if self.current_committed == 0 {
            if self.current_area == 0 {
                return Ok(MergeStep::Done);
            }
            self.current_area -= 1;
            cow.read_chunk(area_chunk(self.current_area), &mut self.area)?;
            self.current_committed = EXCEPTIONS_PER_AREA;
        }
        let last = self.current_committed - 1;
        let (last_old, last_new) = entry(&self.area, last);
        let mut n = 1usize;
        while n < self.current_committed {
            let (old, new) = entry(&self.area, last - n);
            let step = n as u64;
            if last_old.checked_sub(step) != Some(old) || last_new.checked_sub(step) != Some(new) {
                break;
            }
            n += 1;
        }
        let first_old = last_old + 1 - n as u64;
        let first_new = last_new + 1 - n as u64;
        // kcopyd: read the whole batch from the COW, then write it to the origin.
        let mut data = vec![[0u8; BLOCK_SIZE]; n];
        for (i, buf) in data.iter_mut().enumerate() {
            cow.read_chunk(first_new + i as u64, buf)?;
        }
        for (i, buf) in data.iter().enumerate() {
            origin.write_block(first_old + i as u64, buf)?;
        }
        origin.flush()?;
        cow.flush()?;
        for slot in self.current_committed - n..self.current_committed {
            self.area[slot * 16..slot * 16 + 16].fill(0);
        }
        cow.write_chunk(area_chunk(self.current_area), &self.area)?;
        self.current_committed -= n;
        for i in 0..n as u64 {
            self.exceptions.remove(&(first_old + i));
        }
        Ok(MergeStep::Merged(n))
    }
}
