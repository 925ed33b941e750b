//! [`UringMergeIo`]: the merge's [`MergeIo`] engine on io_uring.
//!
//! One ring per engine, owned by the merge thread. A batch's runs are cut into pieces of at
//! most [`UringOptions::max_piece_bytes`], and up to [`UringOptions::queue_depth`] pieces are
//! in flight at once; a short completion is resubmitted for its remainder. A durable write
//! batch ends with an `fdatasync` submitted with `IOSQE_IO_DRAIN` behind the last write piece,
//! so the barrier costs no extra round trip and starts only once every earlier write has
//! completed (links would serialise the writes themselves).
//!
//! Buffer lifetime: every submitted entry points into a buffer the caller lent for the length of
//! the call, so no call returns while an entry it submitted may still be running. Errors
//! included: after the first failed piece, no new piece is submitted and every piece in flight
//! is reaped before the error is returned.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::batch::{BatchPlan, Direction, Piece, PieceFailure};
use super::probe::{check_opcodes, new_ring, UringUnavailable};
use crate::user_merge::direct_io::{direct_capable, write_direct, DirectDescriptors};
use crate::user_merge::merge_io::{MergeIo, ReadRun, WriteRun};

/// `user_data` of the barrier entry; pieces use their slot index.
const SYNC_TAG: u64 = u64::MAX;

/// How long to back off when the kernel is short of resources to take entries.
const ENTER_BACKOFF: Duration = Duration::from_millis(1);

/// Largest queue depth accepted (the kernel allows 32768 entries; the merge needs far fewer).
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// Shape of a [`UringMergeIo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// Pieces in flight at once (1 to [`MAX_QUEUE_DEPTH`]).
    pub queue_depth: u32,
    /// Largest piece one entry moves; longer runs are split so that they use the whole depth.
    pub max_piece_bytes: u32,
}

impl UringOptions {
    /// The default queue depth, chosen with `cargo bench -p snapuserd --bench merge_io`
    /// (figures in BENCHMARKS.md).
    pub const DEFAULT_QUEUE_DEPTH: u32 = 16;
    /// The default piece size: a merge run of up to 256 blocks is one or a few entries.
    pub const DEFAULT_MAX_PIECE_BYTES: u32 = 256 * 1024;
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            queue_depth: Self::DEFAULT_QUEUE_DEPTH,
            max_piece_bytes: Self::DEFAULT_MAX_PIECE_BYTES,
        }
    }
}

/// Why a [`UringMergeIo`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UringEngineError {
    /// io_uring cannot be used here: fall back to the synchronous engine.
    #[error("io_uring is unavailable")]
    Unavailable(#[source] UringUnavailable),
    /// The options are out of range.
    #[error("queue depth {queue_depth} and piece size {max_piece_bytes} must both be at least 1 (depth at most {MAX_QUEUE_DEPTH})")]
    InvalidOptions {
        /// The queue depth asked for.
        queue_depth: u32,
        /// The piece size asked for.
        max_piece_bytes: u32,
    },
    /// Duplicating the source or base file descriptor failed.
    #[error("duplicating the {device} device's file descriptor")]
    Duplicate {
        /// `"source"` or `"base"`.
        device: &'static str,
        /// The `dup` error.
        #[source]
        source: io::Error,
    },
}

impl UringEngineError {
    /// True when the error says io_uring is missing or refused (not a bad option or a file
    /// error): the caller should fall back to the synchronous engine.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, UringEngineError::Unavailable(_))
    }
}

/// A failed batch of a [`UringMergeIo`]; returned inside the `io::Error` of the [`MergeIo`]
/// calls (`io::Error::get_ref` and `downcast`), with an `io::ErrorKind` that matches it.
#[derive(Debug, thiserror::Error)]
pub enum UringIoError {
    /// A piece failed with an errno.
    #[error("{action} run {run}: {len} bytes at byte {offset}")]
    Piece {
        /// `"reading source"` or `"writing base"`.
        action: &'static str,
        /// Index of the run in the batch.
        run: usize,
        /// Device byte offset of the failed piece.
        offset: u64,
        /// Bytes the piece asked for.
        len: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A read of the source device returned no bytes: the run lies past the device's end.
    #[error("reading source run {run}: the device ends at byte {offset}, before the run does")]
    EndOfDevice {
        /// Index of the run in the batch.
        run: usize,
        /// Device byte offset where the read returned 0 bytes.
        offset: u64,
    },
    /// A write to the base device took no bytes.
    #[error("writing base run {run}: the device took no bytes at byte {offset}")]
    WriteZero {
        /// Index of the run in the batch.
        run: usize,
        /// Device byte offset of the write.
        offset: u64,
    },
    /// The kernel reported more bytes than were asked for.
    #[error("{action} run {run}: the kernel reported {reported} bytes for a {len}-byte request at byte {offset}")]
    Overlong {
        /// `"reading source"` or `"writing base"`.
        action: &'static str,
        /// Index of the run in the batch.
        run: usize,
        /// Device byte offset of the piece.
        offset: u64,
        /// Bytes asked for.
        len: u32,
        /// Bytes reported.
        reported: i32,
    },
    /// The `EAGAIN`/`EINTR` completions of one batch exceeded the retry budget.
    #[error("{action} run {run}: still failing transiently at byte {offset} after {retries} resubmissions", retries = super::batch::MAX_TRANSIENT_RETRIES)]
    TooManyRetries {
        /// `"reading source"` or `"writing base"`.
        action: &'static str,
        /// Index of the run in the batch.
        run: usize,
        /// Device byte offset of the piece.
        offset: u64,
        /// The last transient error.
        #[source]
        source: io::Error,
    },
    /// The base device's `fdatasync` failed (or was cancelled): nothing of the batch is durable.
    #[error("fdatasync of the base device")]
    Sync(#[source] io::Error),
    /// `io_uring_enter` failed for good; the engine is unusable from now on.
    #[error("io_uring_enter failed; this engine takes no more batches")]
    Enter(#[source] io::Error),
    /// An earlier `io_uring_enter` failure left the engine unusable.
    #[error("the engine is unusable after an earlier io_uring_enter failure; use the synchronous engine")]
    Poisoned,
}

impl UringIoError {
    /// The `io::ErrorKind` the merge sees.
    fn kind(&self) -> io::ErrorKind {
        match self {
            UringIoError::Piece { source, .. }
            | UringIoError::TooManyRetries { source, .. }
            | UringIoError::Sync(source)
            | UringIoError::Enter(source) => source.kind(),
            UringIoError::EndOfDevice { .. } => io::ErrorKind::UnexpectedEof,
            UringIoError::WriteZero { .. } => io::ErrorKind::WriteZero,
            UringIoError::Overlong { .. } => io::ErrorKind::InvalidData,
            UringIoError::Poisoned => io::ErrorKind::Other,
        }
    }

    fn from_piece(direction: Direction, piece: Piece, failure: PieceFailure) -> Self {
        let action = match direction {
            Direction::Read => "reading source",
            Direction::Write => "writing base",
        };
        let Piece {
            run, offset, len, ..
        } = piece;
        match failure {
            PieceFailure::Os(errno) => UringIoError::Piece {
                action,
                run,
                offset,
                len,
                source: io::Error::from_raw_os_error(errno),
            },
            PieceFailure::EndOfDevice => UringIoError::EndOfDevice { run, offset },
            PieceFailure::WriteZero => UringIoError::WriteZero { run, offset },
            PieceFailure::Overlong { reported } => UringIoError::Overlong {
                action,
                run,
                offset,
                len,
                reported,
            },
            PieceFailure::TooManyRetries(errno) => UringIoError::TooManyRetries {
                action,
                run,
                offset,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }
}

impl From<UringIoError> for io::Error {
    fn from(error: UringIoError) -> Self {
        io::Error::new(error.kind(), error)
    }
}

/// Start address and length of one run's buffer, as the ring sees it.
#[derive(Clone, Copy)]
struct RunBuffer {
    addr: *mut u8,
    len: usize,
}

/// The merge's I/O engine on io_uring, over its own duplicates of the source and base files.
///
/// The engine `dup`s the descriptors it is given, so it does not borrow the snapshot that owns
/// the files and can move to the merge thread; closing the originals does not affect it. The
/// files' open flags (`O_DIRECT` and its alignment rules included) are the originals'.
pub struct UringMergeIo {
    ring: IoUring,
    source: File,
    base: File,
    queue_depth: u32,
    max_piece_bytes: u32,
    /// `O_DIRECT` descriptors of the source and base files, for aligned pieces.
    direct: DirectDescriptors,
    /// Set after an `io_uring_enter` failure that may have left entries unsubmitted in the
    /// ring: they point into buffers of a call that has returned, so the ring is never
    /// entered again.
    poisoned: bool,
}

impl std::fmt::Debug for UringMergeIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringMergeIo")
            .field("source_fd", &self.source.as_raw_fd())
            .field("base_fd", &self.base.as_raw_fd())
            .field("queue_depth", &self.queue_depth)
            .field("max_piece_bytes", &self.max_piece_bytes)
            .field(
                "direct_source_fd",
                &self.direct.source.as_ref().map(AsRawFd::as_raw_fd),
            )
            .field(
                "direct_base_fd",
                &self.direct.base.as_ref().map(AsRawFd::as_raw_fd),
            )
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl UringMergeIo {
    /// An engine over duplicates of `source` (read) and `base` (written and synced).
    ///
    /// [`UringEngineError::is_unavailable`] tells the caller to use the synchronous engine.
    pub fn new(
        source: &File,
        base: &File,
        options: &UringOptions,
    ) -> Result<Self, UringEngineError> {
        let UringOptions {
            queue_depth,
            max_piece_bytes,
        } = *options;
        if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH || max_piece_bytes == 0 {
            return Err(UringEngineError::InvalidOptions {
                queue_depth,
                max_piece_bytes,
            });
        }
        // One entry more than the depth: the barrier may go out with a full queue of writes.
        let ring = new_ring(queue_depth + 1).map_err(UringEngineError::Unavailable)?;
        check_opcodes(&ring).map_err(UringEngineError::Unavailable)?;
        let source = source
            .try_clone()
            .map_err(|source| UringEngineError::Duplicate {
                device: "source",
                source,
            })?;
        let base = base
            .try_clone()
            .map_err(|source| UringEngineError::Duplicate {
                device: "base",
                source,
            })?;
        Ok(UringMergeIo {
            ring,
            source,
            base,
            queue_depth,
            max_piece_bytes,
            direct: DirectDescriptors::default(),
            poisoned: false,
        })
    }

    /// Move pieces whose buffer, length and offset are page-aligned through `direct`,
    /// `O_DIRECT` descriptors of the source and base files (`None`: that device buffered).
    /// Source reads go through the ring (a refused one fails the batch like any other
    /// error, and the merge redoes the step with the synchronous engine, which goes on
    /// buffered). Base writes are issued synchronously with
    /// [`crate::user_merge::direct_io::write_direct`] before the ring takes the
    /// rest and the barrier: only a synchronous direct write leaves the page cache coherent
    /// (`direct_io`). The barrier stays on the buffered descriptor: it names the same inode.
    pub fn with_direct(mut self, direct: DirectDescriptors) -> Self {
        self.direct = direct;
        self
    }

    /// The queue depth in use.
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    /// Submit every piece of the runs (and a trailing barrier if `then_sync`), and return once
    /// every submitted entry has completed.
    fn run_batch(
        &mut self,
        direction: Direction,
        fd: RawFd,
        runs: &[(u64, RunBuffer)],
        then_sync: bool,
    ) -> Result<(), UringIoError> {
        if self.poisoned {
            return Err(UringIoError::Poisoned);
        }
        let mut plan = BatchPlan::new(
            direction,
            runs.iter()
                .map(|(offset, buf)| (*offset, buf.len))
                .collect(),
            self.max_piece_bytes,
        );
        // Direct writes never go through the ring (`write_buffered_rest`).
        let direct_fd = match direction {
            Direction::Write => None,
            Direction::Read => self.direct.source.as_ref().map(AsRawFd::as_raw_fd),
        };
        let depth = self.queue_depth as usize;
        let mut slots: Vec<Option<Piece>> = vec![None; depth];
        let mut free_slots: Vec<usize> = (0..depth).rev().collect();
        let mut in_flight = 0usize;
        // Write pieces pushed so far; the barrier covers those pushed before it.
        let mut pieces_pushed = 0u64;
        let mut synced_upto: Option<u64> = None;
        let mut sync_in_flight: Option<u64> = None;
        let mut sync_error: Option<io::Error> = None;

        loop {
            {
                let mut sq = self.ring.submission();
                while let Some(&slot) = free_slots.last() {
                    let Some(piece) = plan.next_piece() else {
                        break;
                    };
                    free_slots.pop();
                    let buffer = runs[piece.run].1;
                    // SAFETY: (pointer arithmetic) the plan only hands out pieces inside their
                    // run (`piece.start + piece.len <= buffer.len`), so the address stays
                    // inside the caller's buffer.
                    let addr = unsafe { buffer.addr.add(piece.start) };
                    let fd = match direct_fd {
                        Some(direct) if direct_capable(addr, piece.len as usize, piece.offset) => {
                            direct
                        }
                        _ => fd,
                    };
                    let entry = match direction {
                        Direction::Read => {
                            opcode::Read::new(types::Fd(fd), addr, piece.len).offset(piece.offset)
                        }
                        .build(),
                        Direction::Write => opcode::Write::new(types::Fd(fd), addr, piece.len)
                            .offset(piece.offset)
                            .build(),
                    }
                    .user_data(slot as u64);
                    // SAFETY: the entry points at `piece.len` bytes inside a buffer the caller
                    // lent us for this call (`&mut` for reads, so nothing else touches it), and
                    // this function does not return before the entry's completion is reaped
                    // (the loop runs while `in_flight > 0`; the poisoned path waits for every
                    // consumed entry and never submits the rest). The ring has `depth + 1`
                    // entries and at most `depth` pieces plus one barrier are in flight, so
                    // the push cannot find the queue full.
                    if unsafe { sq.push(&entry) }.is_err() {
                        free_slots.push(slot);
                        plan.fail(piece, PieceFailure::Os(libc::EBUSY));
                        break;
                    }
                    slots[slot] = Some(piece);
                    in_flight += 1;
                    pieces_pushed += 1;
                }
                let barrier_due = then_sync
                    && sync_in_flight.is_none()
                    && sync_error.is_none()
                    && plan.failure().is_none()
                    && plan.nothing_to_submit()
                    && synced_upto != Some(pieces_pushed);
                if barrier_due {
                    // IO_DRAIN: the barrier starts only after every entry submitted before it
                    // has completed, so it covers exactly the pieces pushed so far.
                    let entry = opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .flags(squeue::Flags::IO_DRAIN)
                        .user_data(SYNC_TAG);
                    // SAFETY: an fsync entry points at no memory.
                    if unsafe { sq.push(&entry) }.is_ok() {
                        sync_in_flight = Some(pieces_pushed);
                        in_flight += 1;
                    } else {
                        sync_error = Some(io::Error::from_raw_os_error(libc::EBUSY));
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            if let Err(error) = self.enter_and_wait() {
                self.poison_and_drain(in_flight);
                return Err(UringIoError::Enter(error));
            }
            for cqe in self.ring.completion() {
                let res = cqe.result();
                if cqe.user_data() == SYNC_TAG && sync_in_flight.is_some() {
                    in_flight -= 1;
                    let covered = sync_in_flight.take();
                    if res < 0 {
                        sync_error = Some(io::Error::from_raw_os_error(-res));
                    } else {
                        synced_upto = covered;
                    }
                    continue;
                }
                let slot = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                match slots.get_mut(slot).and_then(Option::take) {
                    Some(piece) => {
                        in_flight -= 1;
                        free_slots.push(slot);
                        plan.complete(piece, res);
                    }
                    None => {
                        // Not an entry in flight: the kernel broke the ring's contract. Keep
                        // waiting for our own.
                        log::error!(
                            "io_uring completion with unknown user_data {}; ignored",
                            cqe.user_data()
                        );
                    }
                }
            }
        }
        if let Some((piece, failure)) = plan.failure() {
            return Err(UringIoError::from_piece(direction, piece, failure));
        }
        if let Some(error) = sync_error {
            return Err(UringIoError::Sync(error));
        }
        Ok(())
    }

    /// Submit what is queued and wait for at least one completion, riding out interruptions
    /// and transient shortages. `Err` only for an error that will not go away.
    fn enter_and_wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    if !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                    std::thread::sleep(ENTER_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After a failed `io_uring_enter`: wait (without entering the ring again) for every entry
    /// the kernel had consumed, and mark the engine unusable so the entries it had not consumed
    /// are never submitted.
    fn poison_and_drain(&mut self, in_flight: usize) {
        self.poisoned = true;
        let unconsumed = self.ring.submission().len();
        let mut outstanding = in_flight.saturating_sub(unconsumed);
        log::error!(
            "io_uring_enter failed for good; waiting for {outstanding} entries in flight, then \
             this engine refuses every batch (the merge goes on with the synchronous engine)"
        );
        while outstanding > 0 {
            let reaped = self.ring.completion().count();
            outstanding = outstanding.saturating_sub(reaped);
            if reaped == 0 {
                // Completions that need task work arrive on the return from any syscall.
                std::thread::sleep(ENTER_BACKOFF);
            }
        }
    }
}

impl MergeIo for UringMergeIo {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        let buffers: Vec<(u64, RunBuffer)> = runs
            .iter_mut()
            .map(|run| {
                (
                    run.offset,
                    RunBuffer {
                        addr: run.buf.as_mut_ptr(),
                        len: run.buf.len(),
                    },
                )
            })
            .collect();
        let fd = self.source.as_raw_fd();
        Ok(self.run_batch(Direction::Read, fd, &buffers, false)?)
    }

    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        let rest = self.write_direct_runs(runs)?;
        let fd = self.base.as_raw_fd();
        Ok(self.run_batch(Direction::Write, fd, &rest, false)?)
    }

    fn sync_base(&mut self) -> io::Result<()> {
        let fd = self.base.as_raw_fd();
        Ok(self.run_batch(Direction::Write, fd, &[], true)?)
    }

    fn write_base_durably(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        let rest = self.write_direct_runs(runs)?;
        let fd = self.base.as_raw_fd();
        Ok(self.run_batch(Direction::Write, fd, &rest, true)?)
    }
}

impl UringMergeIo {
    /// Write the runs the base's `O_DIRECT` descriptor takes, synchronously, and return the
    /// ring's view of the others (written buffered through the ring).
    fn write_direct_runs(&mut self, runs: &[WriteRun<'_>]) -> io::Result<Vec<(u64, RunBuffer)>> {
        let mut rest = Vec::new();
        for run in runs {
            if !write_direct(&mut self.direct.base, run.offset, run.buf)? {
                rest.extend(write_buffers(std::slice::from_ref(run)));
            }
        }
        Ok(rest)
    }
}

/// The ring's view of write runs. The pointers are only ever read through (WRITE entries).
fn write_buffers(runs: &[WriteRun<'_>]) -> Vec<(u64, RunBuffer)> {
    runs.iter()
        .map(|run| {
            (
                run.offset,
                RunBuffer {
                    addr: run.buf.as_ptr().cast_mut(),
                    len: run.buf.len(),
                },
            )
        })
        .collect()
}

/// The io_uring engine over `source` and `base`, or — when io_uring is unavailable here — the
/// engine `fallback` builds (the synchronous one), with a log line saying why.
///
/// Errors other than unavailability (bad options, a failed `dup`) are returned: they would
/// fail the synchronous engine too, or are the caller's bug.
pub fn uring_or_fallback(
    source: &File,
    base: &File,
    direct: DirectDescriptors,
    options: &UringOptions,
    fallback: impl FnOnce() -> io::Result<Box<dyn MergeIo>>,
) -> io::Result<Box<dyn MergeIo>> {
    match UringMergeIo::new(source, base, options) {
        Ok(engine) => Ok(Box::new(engine.with_direct(direct))),
        Err(UringEngineError::Unavailable(why)) => {
            log::warn!(
                "merge I/O: io_uring unavailable ({}); using the synchronous engine",
                crate::error_chain::ErrorChain(&why)
            );
            fallback()
        }
        Err(other) => Err(io::Error::other(other)),
    }
}
