//! `O_DIRECT` read-ahead of the base device for a sequential reader, in the daemon's memory.
//!
//! [`SequentialPrefetch`](super::prefetch::SequentialPrefetch) keeps the base's page cache
//! ahead of a reader that goes through the snapshot in order. Filling the page cache is
//! itself part of the cost of a cold read (allocating and inserting every page, then copying
//! it out: most of it where the answer is copied anyway, as over ublk), and a device read
//! once at boot gains nothing from the cached copy. [`DirectPrefetch`]
//! reads the next few chunks of the base with `O_DIRECT` on two threads of its own, into a
//! small set of page-aligned buffers, while the workers answer the requests before them;
//! a READ whose base bytes (unchanged blocks, or COPY sources on the same device) lie in a
//! loaded chunk takes them from there ([`Lending::lend`]), anything else reads the base as
//! before.
//!
//! Invariants:
//! * A chunk holds the base's bytes as they were when it was read. It is used only while no
//!   merge has run in this process and none had begun before it opened (the base then
//!   changes nowhere the read path looks): the snapshot enables it only in that state, and
//!   calls [`DirectPrefetch::disable`] before its merge writes anything and when it follows
//!   another daemon's merge (the handoff). Readers hold the
//!   gate (read mode) from the lookup until their answer is out, and `disable` takes it in
//!   write mode, so no answer made of chunk bytes is in flight once the merge starts.
//! * Memory is bounded: at most `slots` chunks of `chunk` bytes are held by the cache, plus
//!   the ones workers borrowed for the answer they are sending. A reader that jumps away
//!   ([`DirectPrefetch::stop`]) or stays idle for [`IDLE_RELEASE`] frees them all.
//! * It is a cache: a chunk that failed to load, or one still loading after
//!   [`LOAD_WAIT`], is read from the base instead, so an error here costs speed, never a
//!   wrong or failed answer.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cow_format::SourceImage;

use super::direct_io::{reopen_direct, AlignedBuf, DIRECT_ALIGN};

/// How long a reader waits for a chunk being loaded before it reads the base itself.
pub const LOAD_WAIT: Duration = Duration::from_millis(500);

/// Bytes read per chunk (one `O_DIRECT` read).
pub const CHUNK_BYTES: usize = 512 << 10;

/// Threads loading chunks: two reads in flight keep the disk busy while one completes.
const LOADERS: usize = 2;

/// A reader that has not moved on for this long is done: its chunks are freed.
pub const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// Buffers of evicted chunks kept for the next loads (a loading thread takes one as soon
/// as the reader moves on, so more would only hold memory).
const SPARE_BUFFERS: usize = 2;

/// One chunk of the base: queued or loading (no data yet), loaded, or failed.
#[derive(Debug)]
struct Chunk {
    offset: u64,
    data: ChunkData,
}

#[derive(Debug)]
enum ChunkData {
    Queued,
    Loading,
    Loaded(Arc<AlignedBuf>),
    Failed,
}

impl Chunk {
    fn end(&self, chunk: usize) -> u64 {
        self.offset.saturating_add(chunk as u64)
    }
}

#[derive(Debug, Default)]
struct State {
    /// Chunks held (queued ones included), ascending by offset.
    chunks: VecDeque<Chunk>,
    /// Buffers of evicted chunks, for the next loads (at most [`SPARE_BUFFERS`]).
    spare: Vec<AlignedBuf>,
    /// Loading threads running.
    loaders: usize,
    /// Counts `advance` calls: the loading threads free the chunks of a reader that has not
    /// moved on for [`IDLE_RELEASE`].
    advances: u64,
    /// Set by `disable` and on drop: the loading threads end.
    closed: bool,
}

/// The shared part, owned by the snapshot and by the loading threads.
#[derive(Debug)]
struct Shared {
    direct: File,
    device_len: u64,
    chunk: usize,
    slots: usize,
    state: Mutex<State>,
    /// Signalled when a chunk finishes loading (readers wait on it).
    loaded: Condvar,
    /// Signalled when there is work for the loading threads.
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct DirectPrefetch {
    shared: Arc<Shared>,
    /// `true` while chunks may be used; readers hold it in read mode until their answer is
    /// out.
    gate: RwLock<bool>,
}

/// Permission to use chunks for one answer: the gate held in read mode. Take it once per
/// answer (never twice on one thread: a waiting `disable` would block the second) and keep
/// it until the answer is out.
pub(crate) struct Lending<'a> {
    _gate: RwLockReadGuard<'a, bool>,
    owner: &'a DirectPrefetch,
}

/// Bytes of a loaded chunk lent to one answer.
pub(crate) struct Lent {
    data: Arc<AlignedBuf>,
    start: usize,
    len: usize,
}

impl Lent {
    /// The bytes asked for.
    pub(crate) fn bytes(&self) -> &[u8] {
        // `lend` checked the range against the chunk's length.
        self.data
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

impl DirectPrefetch {
    /// A read-ahead of `base` (of `device_len` bytes) holding `ahead` bytes at most, in
    /// chunks of [`CHUNK_BYTES`]; `None` when `ahead` holds less than two chunks or the
    /// base refuses `O_DIRECT` (logged).
    pub(crate) fn new(base: &File, device_len: u64, ahead: usize) -> Option<Self> {
        let slots = ahead / CHUNK_BYTES;
        if slots < 2 {
            return None;
        }
        let direct = reopen_direct(base, "base", false, "direct read-ahead")?;
        Some(Self {
            shared: Arc::new(Shared {
                direct,
                device_len,
                chunk: CHUNK_BYTES,
                slots,
                state: Mutex::new(State::default()),
                loaded: Condvar::new(),
                work: Condvar::new(),
            }),
            gate: RwLock::new(true),
        })
    }

    /// Whether chunks may still be used (not disabled).
    pub(crate) fn enabled(&self) -> bool {
        *self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bytes held (loaded or loading) right now: for tests and diagnostics.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.shared.lock().chunks.len() * self.shared.chunk
    }

    /// Where the chunk holding byte `offset` ends (requests are split there).
    pub(crate) fn chunk_end(&self, offset: u64) -> u64 {
        let chunk = self.shared.chunk as u64;
        (offset / chunk).saturating_add(1).saturating_mul(chunk)
    }

    /// A sequential reader has read up to byte `end`: keep the chunks from the one holding
    /// `end` onwards, up to `slots` of them, loaded. Returns that range of the base.
    pub(crate) fn advance(&self, end: u64) -> Option<(u64, u64)> {
        let sh = &self.shared;
        if end >= sh.device_len || !self.enabled() {
            return None;
        }
        let chunk = sh.chunk as u64;
        let from = end / chunk * chunk;
        let to = from
            .saturating_add(chunk.saturating_mul(sh.slots as u64))
            .min(sh.device_len);
        let spawn = {
            let mut st = sh.lock();
            if st.closed {
                return None;
            }
            // Chunks wholly behind the reader are done with.
            while st.chunks.front().is_some_and(|c| c.end(sh.chunk) <= from) {
                if let Some(c) = st.chunks.pop_front() {
                    recycle(&mut st, c);
                }
            }
            // Queue the missing ones now, so a reader arriving before a loading thread
            // got to them waits for them rather than reading the base twice.
            let mut at = from;
            while at < to && st.chunks.len() < sh.slots {
                let i = st.chunks.partition_point(|c| c.offset < at);
                if st.chunks.get(i).is_none_or(|c| c.offset != at) {
                    st.chunks.insert(
                        i,
                        Chunk {
                            offset: at,
                            data: ChunkData::Queued,
                        },
                    );
                }
                at = at.saturating_add(chunk);
            }
            st.advances = st.advances.wrapping_add(1);
            let spawn = LOADERS.saturating_sub(st.loaders);
            st.loaders = LOADERS;
            spawn
        };
        sh.work.notify_all();
        for _ in 0..spawn {
            let shared = Arc::clone(sh);
            let started = std::thread::Builder::new()
                .name("snapuserd-ahead".into())
                .spawn(move || load_loop(&shared));
            if let Err(e) = started {
                log::warn!(
                    "direct read-ahead: cannot start its thread ({e}); the base is read through the page cache"
                );
                let mut st = sh.lock();
                st.closed = true;
                st.chunks.clear();
                return None;
            }
        }
        Some((from, to))
    }

    /// Whether a read at byte `offset` is close to the chunks held: inside them, or within
    /// the read-ahead's span before or after them. Requests of an in-order reader that are
    /// answered out of order (several in flight) land there; a real jump does not.
    pub(crate) fn near(&self, offset: u64) -> bool {
        let sh = &self.shared;
        let span = (sh.chunk as u64).saturating_mul(sh.slots as u64);
        let st = sh.lock();
        match (st.chunks.front(), st.chunks.back()) {
            (Some(first), Some(last)) => {
                offset >= first.offset.saturating_sub(span)
                    && offset < last.end(sh.chunk).saturating_add(span)
            }
            _ => false,
        }
    }

    /// The reader stopped going in order: drop every chunk (and its memory).
    pub(crate) fn stop(&self) {
        let mut st = self.shared.lock();
        st.chunks.clear();
        st.spare.clear();
    }

    /// Stop using chunks for good (the merge is about to write the base). Returns once no
    /// answer made of chunk bytes is in flight.
    pub(crate) fn disable(&self) {
        let mut gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        *gate = false;
        let mut st = self.shared.lock();
        st.closed = true;
        st.chunks.clear();
        st.spare.clear();
        drop(st);
        self.shared.work.notify_all();
        self.shared.loaded.notify_all();
    }

    /// Permission to use chunks for one answer; `None` once disabled.
    pub(crate) fn lending(&self) -> Option<Lending<'_>> {
        let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        (*gate).then_some(Lending {
            _gate: gate,
            owner: self,
        })
    }
}

impl Lending<'_> {
    /// Where the chunk holding byte `offset` ends (reads are split there).
    pub(crate) fn chunk_end(&self, offset: u64) -> u64 {
        self.owner.chunk_end(offset)
    }

    /// `len` bytes at base byte `offset` split where chunks end: each part's offset, length
    /// and, when a chunk holds it, its bytes ([`Self::lend`]).
    pub(crate) fn parts(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (u64, usize, Option<Lent>)> + '_ {
        let end = offset.saturating_add(len as u64);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let here = at;
            at = self.chunk_end(here).min(end);
            let n = (at - here) as usize;
            Some((here, n, self.lend(here, n)))
        })
    }

    /// The `len` bytes at base byte `offset`, if they lie in one chunk that is loaded (or
    /// loads within [`LOAD_WAIT`]); `None`: read the base.
    pub(crate) fn lend(&self, offset: u64, len: usize) -> Option<Lent> {
        if len == 0 {
            return None;
        }
        let sh = &self.owner.shared;
        let end = offset.checked_add(len as u64)?;
        let mut st = sh.lock();
        let deadline = Instant::now() + LOAD_WAIT;
        loop {
            let c = st
                .chunks
                .iter()
                .find(|c| c.offset <= offset && end <= c.end(sh.chunk))?;
            match &c.data {
                ChunkData::Failed => return None,
                ChunkData::Loaded(data) => {
                    let start = usize::try_from(offset - c.offset).ok()?;
                    if start.checked_add(len)? > data.len() {
                        return None;
                    }
                    return Some(Lent {
                        data: Arc::clone(data),
                        start,
                        len,
                    });
                }
                ChunkData::Queued | ChunkData::Loading => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    st = sh
                        .loaded
                        .wait_timeout(st, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

/// A device read through the loaded chunks where they hold the bytes, else through `file`
/// (for COPY and XOR sources on the base device).
pub(crate) struct ThroughChunks<'a> {
    /// The chunks.
    pub(crate) lending: &'a Lending<'a>,
    /// The device, for bytes no chunk holds.
    pub(crate) file: &'a File,
}

impl SourceImage for ThroughChunks<'_> {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> std::io::Result<()> {
        match self.lending.lend(byte_offset, buf.len()) {
            Some(lent) => {
                buf.copy_from_slice(lent.bytes());
                Ok(())
            }
            None => std::os::unix::fs::FileExt::read_exact_at(self.file, buf, byte_offset),
        }
    }
}

impl Drop for DirectPrefetch {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        st.chunks.clear();
        drop(st);
        self.shared.work.notify_all();
    }
}

/// Keep `c`'s buffer for a later load if nobody borrows it and there is room.
fn recycle(st: &mut State, c: Chunk) {
    if let ChunkData::Loaded(data) = c.data {
        if let Ok(buf) = Arc::try_unwrap(data) {
            if st.spare.len() < SPARE_BUFFERS {
                st.spare.push(buf);
            }
        }
    }
}

/// A loading thread: load the first queued chunk, one at a time, until closed.
fn load_loop(sh: &Shared) {
    loop {
        let (offset, mut buf) = {
            let mut st = sh.lock();
            let at = loop {
                if st.closed {
                    st.loaders = st.loaders.saturating_sub(1);
                    return;
                }
                if let Some(c) = st
                    .chunks
                    .iter_mut()
                    .find(|c| matches!(c.data, ChunkData::Queued))
                {
                    c.data = ChunkData::Loading;
                    break c.offset;
                }
                let advances = st.advances;
                let (next, waited) = sh
                    .work
                    .wait_timeout(st, IDLE_RELEASE)
                    .unwrap_or_else(PoisonError::into_inner);
                st = next;
                if waited.timed_out() && st.advances == advances {
                    // The reader is gone or paused: its chunks only hold memory.
                    st.chunks.clear();
                    st.spare.clear();
                }
            };
            (at, st.spare.pop().unwrap_or_default())
        };
        let result = read_chunk(sh, &mut buf, offset);
        let mut st = sh.lock();
        // Gone meanwhile (the reader stopped or jumped): the bytes are dropped.
        let waiting = st.chunks.iter_mut().find(|c| {
            c.offset == offset && matches!(c.data, ChunkData::Queued | ChunkData::Loading)
        });
        if let Some(c) = waiting {
            c.data = match result {
                Ok(()) => ChunkData::Loaded(Arc::new(buf)),
                Err(e) => {
                    log::debug!(
                        "direct read-ahead: reading {} bytes of the base at {offset} failed ({e}); that part is read through the page cache",
                        sh.chunk
                    );
                    ChunkData::Failed
                }
            };
        }
        drop(st);
        sh.loaded.notify_all();
    }
}

/// Read the chunk at `offset` into `buf` (a whole number of pages; the device's last
/// partial page is left out, so reads of it find no chunk holding them).
fn read_chunk(sh: &Shared, buf: &mut AlignedBuf, offset: u64) -> std::io::Result<()> {
    let left = sh.device_len.saturating_sub(offset);
    let len = usize::try_from(left.min(sh.chunk as u64)).unwrap_or(sh.chunk);
    let len = len / DIRECT_ALIGN * DIRECT_ALIGN;
    if len == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    buf.set_len(len);
    std::os::unix::fs::FileExt::read_exact_at(&sh.direct, buf, offset)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::device_file;
    use super::*;

    const MIB: u64 = 1 << 20;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    fn lend(p: &DirectPrefetch, offset: u64, len: usize) -> Option<Lent> {
        p.lending()?.lend(offset, len)
    }

    fn lend_eventually(p: &DirectPrefetch, offset: u64, len: usize) -> Option<Vec<u8>> {
        for _ in 0..200 {
            if let Some(l) = p.lending().and_then(|g| g.lend(offset, len)) {
                return Some(l.bytes().to_vec());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn chunks_ahead_of_the_reader_hold_the_base_bytes() {
        let data = bytes(8 << 20);
        let (_dir, file) = device_file(&data);
        let Some(p) = DirectPrefetch::new(&file, data.len() as u64, 2 << 20) else {
            return; // no O_DIRECT here
        };
        // Nothing is held before a reader goes in order.
        assert!(lend(&p, 0, 4096).is_none());
        p.advance(MIB);
        let got = lend_eventually(&p, MIB + 4096, 64 * 1024).expect("loaded");
        assert_eq!(got, &data[MIB as usize + 4096..MIB as usize + 4096 + 65536]);
        // A range across two chunks is not lent whole; each part is.
        let edge = MIB + CHUNK_BYTES as u64;
        assert!(lend(&p, edge - 4096, 8192).is_none());
        let tail = lend_eventually(&p, edge, 4096).expect("second chunk");
        assert_eq!(tail, &data[edge as usize..edge as usize + 4096]);
        // Never more than the slots asked for.
        assert!(p.held_bytes() <= 2 << 20);
        // Behind the reader: dropped.
        p.advance(5 * MIB);
        assert!(lend(&p, MIB, 4096).is_none());
        let far = lend_eventually(&p, 5 * MIB, 4096).expect("moved on");
        assert_eq!(far, &data[5 * MIB as usize..5 * MIB as usize + 4096]);
    }

    #[test]
    fn stop_frees_everything_and_disable_ends_all_lending() {
        let data = bytes(4 << 20);
        let (_dir, file) = device_file(&data);
        let Some(p) = DirectPrefetch::new(&file, data.len() as u64, 2 << 20) else {
            return;
        };
        p.advance(0);
        assert!(lend_eventually(&p, 0, 4096).is_some());
        // Close to the chunks (2 MiB held from 0, span 2 MiB): near; far away: not.
        assert!(p.near(0) && p.near(3 << 20));
        assert!(!p.near(4 << 20) && !p.near(64 << 20));
        p.stop();
        assert!(!p.near(0), "nothing held, nothing near");
        assert_eq!(p.held_bytes(), 0);
        assert!(lend(&p, 0, 4096).is_none());
        p.advance(0);
        assert!(lend_eventually(&p, 0, 4096).is_some());
        // A reader that does not move on loses its chunks after IDLE_RELEASE.
        p.advance(0);
        assert!(lend_eventually(&p, 0, 4096).is_some());
        std::thread::sleep(IDLE_RELEASE * 2 + Duration::from_millis(200));
        assert_eq!(p.held_bytes(), 0, "idle chunks freed");
        p.advance(0);
        assert!(lend_eventually(&p, 0, 4096).is_some());
        p.disable();
        assert!(!p.enabled());
        assert!(lend(&p, 0, 4096).is_none());
        p.advance(0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(p.held_bytes(), 0, "nothing loads once disabled");
    }

    #[test]
    fn the_end_of_the_device_and_a_short_last_chunk_are_handled() {
        // 1 MiB + 12 KiB + 512 bytes: the last chunk holds 12 KiB, the partial page none.
        let len = (1 << 20) + 12 * 1024 + 512;
        let data = bytes(len);
        let (_dir, file) = device_file(&data);
        let Some(p) = DirectPrefetch::new(&file, len as u64, 2 << 20) else {
            return;
        };
        p.advance(MIB - 4096);
        let last = lend_eventually(&p, MIB, 12 * 1024).expect("short chunk");
        assert_eq!(last, &data[MIB as usize..MIB as usize + 12 * 1024]);
        assert!(lend(&p, MIB + 12 * 1024, 512).is_none(), "partial page");
        // Past the end: nothing wanted.
        p.advance(len as u64);
        assert!(lend(&p, len as u64, 4096).is_none());
    }

    #[test]
    fn too_small_a_budget_turns_it_off() {
        let (_dir, file) = device_file(&bytes(1 << 20));
        assert!(DirectPrefetch::new(&file, 1 << 20, CHUNK_BYTES).is_none());
    }
}
