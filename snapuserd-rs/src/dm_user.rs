//! dm-user channel: message framing on a `/dev/dm-user/<name>` misc device.
//!
//! Each `open()` of the misc node is one channel. The kernel hands queued
//! requests to whichever channel reads first; a request read on a channel must
//! be answered on that same channel, matched by `seq`, in any order.
//!
//! One `read()` returns header bytes or payload bytes, never both, and may be
//! short; [`Channel::receive`] hides that. A response is the 40-byte header
//! followed (for a successful READ) by the data, sent with a single `writev()`
//! where possible. A large READ answer is spliced instead when the module
//! accepts `splice()` (target 1.3.0): header and data go through a pipe, the
//! data vmspliced from the caller's buffer, so the kernel copies it into the
//! bio with its own `memcpy` rather than a copy from user memory; on a module
//! that refuses it (ACK's) the channel falls back to `writev()` for good. Once the target is gone the kernel answers `ENOTBLK`, which
//! surfaces as [`Received::TargetGone`] / [`ChannelError::TargetGone`].
//!
//! The constants mirror `kernel/include/uapi/linux/dm-user.h`, the single
//! source of truth; a unit test checks every value against that header.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// Size of [`MessageHeader`] on the wire, in bytes.
pub const HEADER_SIZE: usize = 40;
/// Directory under `/dev` holding the dm-user misc nodes.
pub const DEV_DIR: &str = "/dev/dm-user";
/// Default upper bound on a single request payload accepted by [`Channel`].
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;
/// Smallest READ answer [`Channel::respond`] splices rather than writes: below it the two
/// extra system calls (`vmsplice`, `splice`) cost more than the user-memory copy they
/// replace.
pub const SPLICE_MIN_PAYLOAD: usize = 64 << 10;
/// Pipe capacity asked for the splice path: a whole 1 MiB answer and its header in one go
/// (the kernel may grant less; the answer is then spliced in several pieces).
const SPLICE_PIPE_BYTES: i32 = 2 << 20;
/// Bytes of one pipe slot (a page).
const PAGE_BYTES: usize = 4096;

/// Request type: read `len` bytes at `sector`; data flows back in the response.
pub const DM_USER_REQ_MAP_READ: u64 = 0;
/// Request type: write; `len` payload bytes follow the header.
pub const DM_USER_REQ_MAP_WRITE: u64 = 1;
/// Request type: flush (request-based flush op; DM usually sends an empty WRITE with PREFLUSH).
pub const DM_USER_REQ_MAP_FLUSH: u64 = 2;
/// Request type: discard `len` bytes at `sector`.
pub const DM_USER_REQ_MAP_DISCARD: u64 = 3;
/// Request type: secure erase.
pub const DM_USER_REQ_MAP_SECURE_ERASE: u64 = 4;
/// Request type: write same (old kernels only).
pub const DM_USER_REQ_MAP_WRITE_SAME: u64 = 5;
/// Request type: write zeroes.
pub const DM_USER_REQ_MAP_WRITE_ZEROES: u64 = 6;
/// Request type: zone open.
pub const DM_USER_REQ_MAP_ZONE_OPEN: u64 = 7;
/// Request type: zone close.
pub const DM_USER_REQ_MAP_ZONE_CLOSE: u64 = 8;
/// Request type: zone finish.
pub const DM_USER_REQ_MAP_ZONE_FINISH: u64 = 9;
/// Request type: zone append.
pub const DM_USER_REQ_MAP_ZONE_APPEND: u64 = 10;
/// Request type: zone reset.
pub const DM_USER_REQ_MAP_ZONE_RESET: u64 = 11;
/// Request type: zone reset all.
pub const DM_USER_REQ_MAP_ZONE_RESET_ALL: u64 = 12;

/// Request flag: fail fast on device errors.
pub const DM_USER_REQ_MAP_FLAG_FAILFAST_DEV: u64 = 0x00001;
/// Request flag: fail fast on transport errors.
pub const DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT: u64 = 0x00002;
/// Request flag: fail fast on driver errors.
pub const DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER: u64 = 0x00004;
/// Request flag: synchronous I/O.
pub const DM_USER_REQ_MAP_FLAG_SYNC: u64 = 0x00008;
/// Request flag: metadata I/O.
pub const DM_USER_REQ_MAP_FLAG_META: u64 = 0x00010;
/// Request flag: priority metadata I/O.
pub const DM_USER_REQ_MAP_FLAG_PRIO: u64 = 0x00020;
/// Request flag: do not merge.
pub const DM_USER_REQ_MAP_FLAG_NOMERGE: u64 = 0x00040;
/// Request flag: more I/O is not expected soon.
pub const DM_USER_REQ_MAP_FLAG_IDLE: u64 = 0x00080;
/// Request flag: integrity metadata attached.
pub const DM_USER_REQ_MAP_FLAG_INTEGRITY: u64 = 0x00100;
/// Request flag: forced unit access (data must be durable on completion).
pub const DM_USER_REQ_MAP_FLAG_FUA: u64 = 0x00200;
/// Request flag: flush the volatile cache before this request.
pub const DM_USER_REQ_MAP_FLAG_PREFLUSH: u64 = 0x00400;
/// Request flag: read-ahead.
pub const DM_USER_REQ_MAP_FLAG_RAHEAD: u64 = 0x00800;
/// Request flag: background I/O.
pub const DM_USER_REQ_MAP_FLAG_BACKGROUND: u64 = 0x01000;
/// Request flag: do not wait.
pub const DM_USER_REQ_MAP_FLAG_NOWAIT: u64 = 0x02000;
/// Request flag: cgroup punt.
pub const DM_USER_REQ_MAP_FLAG_CGROUP_PUNT: u64 = 0x04000;
/// Request flag: do not unmap on write zeroes.
pub const DM_USER_REQ_MAP_FLAG_NOUNMAP: u64 = 0x08000;
/// Request flag: polled I/O.
pub const DM_USER_REQ_MAP_FLAG_HIPRI: u64 = 0x10000;
/// Request flag: driver-private.
pub const DM_USER_REQ_MAP_FLAG_DRV: u64 = 0x20000;
/// Request flag: swap I/O.
pub const DM_USER_REQ_MAP_FLAG_SWAP: u64 = 0x40000;

/// Response code: the request succeeded (READ data follows the header).
pub const DM_USER_RESP_SUCCESS: u64 = 0;
/// Response code: the request failed (the bio completes with an I/O error).
pub const DM_USER_RESP_ERROR: u64 = 1;
/// Response code: the request type is not supported (the bio completes with an I/O error).
pub const DM_USER_RESP_UNSUPPORTED: u64 = 2;

/// Every constant of this module with its C name, for the ABI cross-check.
pub const ABI_CONSTANTS: &[(&str, u64)] = &[
    ("DM_USER_REQ_MAP_READ", DM_USER_REQ_MAP_READ),
    ("DM_USER_REQ_MAP_WRITE", DM_USER_REQ_MAP_WRITE),
    ("DM_USER_REQ_MAP_FLUSH", DM_USER_REQ_MAP_FLUSH),
    ("DM_USER_REQ_MAP_DISCARD", DM_USER_REQ_MAP_DISCARD),
    ("DM_USER_REQ_MAP_SECURE_ERASE", DM_USER_REQ_MAP_SECURE_ERASE),
    ("DM_USER_REQ_MAP_WRITE_SAME", DM_USER_REQ_MAP_WRITE_SAME),
    ("DM_USER_REQ_MAP_WRITE_ZEROES", DM_USER_REQ_MAP_WRITE_ZEROES),
    ("DM_USER_REQ_MAP_ZONE_OPEN", DM_USER_REQ_MAP_ZONE_OPEN),
    ("DM_USER_REQ_MAP_ZONE_CLOSE", DM_USER_REQ_MAP_ZONE_CLOSE),
    ("DM_USER_REQ_MAP_ZONE_FINISH", DM_USER_REQ_MAP_ZONE_FINISH),
    ("DM_USER_REQ_MAP_ZONE_APPEND", DM_USER_REQ_MAP_ZONE_APPEND),
    ("DM_USER_REQ_MAP_ZONE_RESET", DM_USER_REQ_MAP_ZONE_RESET),
    (
        "DM_USER_REQ_MAP_ZONE_RESET_ALL",
        DM_USER_REQ_MAP_ZONE_RESET_ALL,
    ),
    (
        "DM_USER_REQ_MAP_FLAG_FAILFAST_DEV",
        DM_USER_REQ_MAP_FLAG_FAILFAST_DEV,
    ),
    (
        "DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT",
        DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT,
    ),
    (
        "DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER",
        DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER,
    ),
    ("DM_USER_REQ_MAP_FLAG_SYNC", DM_USER_REQ_MAP_FLAG_SYNC),
    ("DM_USER_REQ_MAP_FLAG_META", DM_USER_REQ_MAP_FLAG_META),
    ("DM_USER_REQ_MAP_FLAG_PRIO", DM_USER_REQ_MAP_FLAG_PRIO),
    ("DM_USER_REQ_MAP_FLAG_NOMERGE", DM_USER_REQ_MAP_FLAG_NOMERGE),
    ("DM_USER_REQ_MAP_FLAG_IDLE", DM_USER_REQ_MAP_FLAG_IDLE),
    (
        "DM_USER_REQ_MAP_FLAG_INTEGRITY",
        DM_USER_REQ_MAP_FLAG_INTEGRITY,
    ),
    ("DM_USER_REQ_MAP_FLAG_FUA", DM_USER_REQ_MAP_FLAG_FUA),
    (
        "DM_USER_REQ_MAP_FLAG_PREFLUSH",
        DM_USER_REQ_MAP_FLAG_PREFLUSH,
    ),
    ("DM_USER_REQ_MAP_FLAG_RAHEAD", DM_USER_REQ_MAP_FLAG_RAHEAD),
    (
        "DM_USER_REQ_MAP_FLAG_BACKGROUND",
        DM_USER_REQ_MAP_FLAG_BACKGROUND,
    ),
    ("DM_USER_REQ_MAP_FLAG_NOWAIT", DM_USER_REQ_MAP_FLAG_NOWAIT),
    (
        "DM_USER_REQ_MAP_FLAG_CGROUP_PUNT",
        DM_USER_REQ_MAP_FLAG_CGROUP_PUNT,
    ),
    ("DM_USER_REQ_MAP_FLAG_NOUNMAP", DM_USER_REQ_MAP_FLAG_NOUNMAP),
    ("DM_USER_REQ_MAP_FLAG_HIPRI", DM_USER_REQ_MAP_FLAG_HIPRI),
    ("DM_USER_REQ_MAP_FLAG_DRV", DM_USER_REQ_MAP_FLAG_DRV),
    ("DM_USER_REQ_MAP_FLAG_SWAP", DM_USER_REQ_MAP_FLAG_SWAP),
    ("DM_USER_RESP_SUCCESS", DM_USER_RESP_SUCCESS),
    ("DM_USER_RESP_ERROR", DM_USER_RESP_ERROR),
    ("DM_USER_RESP_UNSUPPORTED", DM_USER_RESP_UNSUPPORTED),
];

/// Errors of a dm-user channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The misc node did not appear within the allowed time.
    #[error("dm-user node {path} did not appear within {waited:?}")]
    NodeTimeout {
        /// Path that was waited for.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// Opening the misc node failed.
    #[error("opening {path}")]
    Open {
        /// Path of the node.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The dm-user target behind this channel has been destroyed (`ENOTBLK`).
    #[error("dm-user target is gone (ENOTBLK)")]
    TargetGone,
    /// The kernel rejected our response (`EINVAL`, e.g. unknown seq): the channel is poisoned.
    #[error("kernel rejected the response for seq {seq} (EINVAL); the channel is poisoned")]
    Rejected {
        /// Sequence number of the response being written.
        seq: u64,
    },
    /// A signal interrupted a read before any byte of a new message arrived.
    #[error("read interrupted by a signal")]
    Interrupted,
    /// Non-blocking channel with no message waiting (`EAGAIN`); poll and retry.
    #[error("no message waiting (EAGAIN)")]
    WouldBlock,
    /// The peer closed the stream (only on non-dm-user transports used in tests).
    #[error("end of stream after {got} of {want} bytes")]
    UnexpectedEof {
        /// Bytes received of the current unit.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A request announced a payload larger than this channel accepts. Its
    /// payload is still unread, so the channel is out of step: close it (the
    /// kernel then fails that request with EIO).
    #[error("request seq {seq} announces a {len}-byte payload, limit is {max}")]
    PayloadTooLarge {
        /// Sequence number of the request.
        seq: u64,
        /// Announced length.
        len: u64,
        /// Configured limit.
        max: usize,
    },
    /// Any other I/O error on the channel.
    #[error("{op} on dm-user channel")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// A request type the kernel can send, decoded from [`MessageHeader::msg_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// [`DM_USER_REQ_MAP_READ`].
    Read,
    /// [`DM_USER_REQ_MAP_WRITE`] (an empty one with PREFLUSH is a flush, see [`MessageHeader::is_flush`]).
    Write,
    /// [`DM_USER_REQ_MAP_FLUSH`].
    Flush,
    /// [`DM_USER_REQ_MAP_DISCARD`].
    Discard,
    /// [`DM_USER_REQ_MAP_SECURE_ERASE`].
    SecureErase,
    /// [`DM_USER_REQ_MAP_WRITE_SAME`].
    WriteSame,
    /// [`DM_USER_REQ_MAP_WRITE_ZEROES`].
    WriteZeroes,
    /// One of the zone operations (`DM_USER_REQ_MAP_ZONE_*`), carrying the raw value.
    Zone(u64),
}

impl RequestType {
    /// Decode a wire value; `None` for values the ABI does not define.
    pub fn from_wire(value: u64) -> Option<Self> {
        Some(match value {
            DM_USER_REQ_MAP_READ => Self::Read,
            DM_USER_REQ_MAP_WRITE => Self::Write,
            DM_USER_REQ_MAP_FLUSH => Self::Flush,
            DM_USER_REQ_MAP_DISCARD => Self::Discard,
            DM_USER_REQ_MAP_SECURE_ERASE => Self::SecureErase,
            DM_USER_REQ_MAP_WRITE_SAME => Self::WriteSame,
            DM_USER_REQ_MAP_WRITE_ZEROES => Self::WriteZeroes,
            DM_USER_REQ_MAP_ZONE_OPEN..=DM_USER_REQ_MAP_ZONE_RESET_ALL => Self::Zone(value),
            _ => return None,
        })
    }
}

/// A response code the daemon writes back in [`MessageHeader::msg_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseCode {
    /// [`DM_USER_RESP_SUCCESS`].
    Success,
    /// [`DM_USER_RESP_ERROR`].
    Error,
    /// [`DM_USER_RESP_UNSUPPORTED`].
    Unsupported,
}

impl ResponseCode {
    /// The wire value.
    pub fn to_wire(self) -> u64 {
        match self {
            Self::Success => DM_USER_RESP_SUCCESS,
            Self::Error => DM_USER_RESP_ERROR,
            Self::Unsupported => DM_USER_RESP_UNSUPPORTED,
        }
    }
}

/// The 40-byte dm-user message header (native endian, as `struct dm_user_message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageHeader {
    /// Sequence number chosen by the kernel; echoed in the response.
    pub seq: u64,
    /// Request type (kernel to user) or response code (user to kernel).
    pub msg_type: u64,
    /// Request flags (`DM_USER_REQ_MAP_FLAG_*`).
    pub flags: u64,
    /// Start sector (512-byte units) as DM handed it to the target.
    pub sector: u64,
    /// Length of the request in bytes.
    pub len: u64,
}

impl MessageHeader {
    /// Serialise to the wire format.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        let fields = [self.seq, self.msg_type, self.flags, self.sector, self.len];
        for (chunk, value) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&value.to_ne_bytes());
        }
        out
    }

    /// Parse the wire format.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        let mut fields = [0u64; 5];
        for (field, chunk) in fields.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *field = u64::from_ne_bytes(word);
        }
        let [seq, msg_type, flags, sector, len] = fields;
        Self {
            seq,
            msg_type,
            flags,
            sector,
            len,
        }
    }

    /// Response header answering `self` with `code`.
    pub fn response(&self, code: u64) -> Self {
        Self {
            seq: self.seq,
            msg_type: code,
            flags: 0,
            sector: self.sector,
            len: self.len,
        }
    }

    /// The block request this header carries.
    pub fn request(&self) -> Request {
        Request {
            kind: self.msg_type,
            flags: self.flags,
            sector: self.sector,
            len: self.len,
        }
    }

    /// The decoded request type (`None` for a value the ABI does not define).
    pub fn request_type(&self) -> Option<RequestType> {
        RequestType::from_wire(self.msg_type)
    }

    /// True for an empty WRITE carrying PREFLUSH, the form DM uses for flushes.
    pub fn is_flush(&self) -> bool {
        self.msg_type == DM_USER_REQ_MAP_FLUSH
            || (self.msg_type == DM_USER_REQ_MAP_WRITE
                && self.len == 0
                && self.flags & DM_USER_REQ_MAP_FLAG_PREFLUSH != 0)
    }

    /// Byte offset of the request (`sector * 512`), if it does not overflow.
    pub fn byte_offset(&self) -> Option<u64> {
        self.sector.checked_mul(512)
    }
}

/// A block request as a handler sees it: the header of a request message without its
/// sequence number (which only the transport needs, to match the response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Request type (`DM_USER_REQ_MAP_*`).
    pub kind: u64,
    /// Request flags (`DM_USER_REQ_MAP_FLAG_*`).
    pub flags: u64,
    /// First sector (512 bytes).
    pub sector: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What [`Channel::receive`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A request; for WRITE the payload was placed in the caller's buffer.
    Request(MessageHeader),
    /// The target has been destroyed: the daemon should close this channel.
    TargetGone,
}

/// Readiness reported by [`Channel::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A message is waiting.
    Readable,
    /// The target is gone (hang-up).
    HangUp,
    /// Nothing happened within the timeout (or a signal ended the wait).
    TimedOut,
}

/// Whether the channel's file accepts `splice()` into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpliceSupport {
    /// Not tried yet.
    Unknown,
    /// A splice went through.
    Works,
    /// Refused (`EINVAL` before anything was consumed): answers go out with `writev()`.
    Refused,
}

/// The pipe a channel splices its answers through; empty between answers.
#[derive(Debug)]
struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl SplicePipe {
    fn new() -> nix::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // A larger pipe moves a whole answer per splice; the default (64 KiB) still works.
        if fcntl(&write, FcntlArg::F_SETPIPE_SZ(SPLICE_PIPE_BYTES)).is_err() {
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(SPLICE_PIPE_BYTES / 2));
        }
        Ok(Self { read, write })
    }
}

/// How a spliced answer went.
enum Spliced {
    /// Header and data reached the kernel.
    Sent,
    /// The file refused `splice()` before taking any byte: write the answer instead.
    Refused,
    /// No pipe could be made (e.g. out of file descriptors): write this answer instead.
    NoPipe,
}

/// What one splice of a pipe's contents into the channel did.
enum SpliceStep {
    /// This many bytes moved.
    Moved(usize),
    /// Nothing moved (interrupted, or waited for room): try again.
    Again,
    /// The file refused `splice()` before taking any byte of the answer.
    Refused,
}

/// One piece of a READ answer sent with [`Channel::respond_pieces`].
#[derive(Debug, Clone, Copy)]
pub enum AnswerPiece<'a> {
    /// `len` bytes of `file` at byte `offset`, taken from its page cache.
    File {
        /// The file the bytes are in.
        file: &'a File,
        /// Byte offset in `file`.
        offset: u64,
        /// Number of bytes.
        len: usize,
    },
    /// Bytes in memory the handler keeps unchanged until the answer is out.
    Memory {
        /// The bytes.
        bytes: &'a [u8],
    },
    /// `len` bytes of the produced buffer from byte `start`.
    Produced {
        /// Start in the produced buffer.
        start: usize,
        /// Number of bytes.
        len: usize,
    },
}

/// Pipe slots (pages) `pieces` occupy once queued, if they add up to `total` bytes and
/// every produced piece lies inside `produced`.
fn pipe_slots(pieces: &[AnswerPiece<'_>], produced: &[u8], total: u64) -> Option<u64> {
    let page = PAGE_BYTES as u64;
    let mut bytes = 0u64;
    let mut slots = 0u64;
    for piece in pieces {
        let (first, len) = match *piece {
            AnswerPiece::File { offset, len, .. } => (offset, len),
            AnswerPiece::Produced { start, len } => {
                let bytes = produced.get(start..start.checked_add(len)?)?;
                (bytes.as_ptr() as u64, len)
            }
            AnswerPiece::Memory { bytes } => (bytes.as_ptr() as u64, bytes.len()),
        };
        if len == 0 {
            return None;
        }
        let len = u64::try_from(len).ok()?;
        let end = first.checked_add(len)?;
        slots = slots.checked_add(end.div_ceil(page) - first / page)?;
        bytes = bytes.checked_add(len)?;
    }
    (bytes == total).then_some(slots)
}

/// Queue `pieces` whole into `pipe` (which has room for them), in order: each file piece
/// with `splice`, each run of pieces in memory (produced or lent) with one `vmsplice` of
/// all of them; false if they could not be.
fn fill_pipe(pipe: &SplicePipe, pieces: &[AnswerPiece<'_>], produced: &[u8]) -> bool {
    let mut in_memory: Vec<&[u8]> = Vec::new();
    for piece in pieces {
        match *piece {
            AnswerPiece::File { file, offset, len } => {
                if !vmsplice_all(pipe, &in_memory) || !splice_file(pipe, file, offset, len) {
                    return false;
                }
                in_memory.clear();
            }
            AnswerPiece::Produced { start, len } => {
                match start
                    .checked_add(len)
                    .and_then(|end| produced.get(start..end))
                {
                    Some(bytes) => in_memory.push(bytes),
                    None => return false,
                }
            }
            AnswerPiece::Memory { bytes } => in_memory.push(bytes),
        }
    }
    vmsplice_all(pipe, &in_memory)
}

/// Queue `len` bytes of `file` at `offset` into `pipe` from its page cache.
fn splice_file(pipe: &SplicePipe, file: &File, offset: u64, len: usize) -> bool {
    use nix::fcntl::{splice, SpliceFFlags};
    let Ok(mut position) = i64::try_from(offset) else {
        return false;
    };
    let mut filled = 0usize;
    while filled < len {
        match splice(
            file,
            Some(&mut position),
            &pipe.write,
            None,
            len - filled,
            SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Ok(n) if n > 0 => filled = filled.saturating_add(n),
            Err(Errno::EINTR) => {}
            // End of file, a read error, or a file without splice.
            _ => return false,
        }
    }
    true
}

/// Most buffers one `vmsplice` takes (the kernel's `UIO_MAXIOV`).
const VMSPLICE_MAX_PARTS: usize = 1024;

/// Queue all of `parts`, in order, into `pipe` (which has room for them) as references to
/// their pages, as few `vmsplice` calls as the kernel allows; false if it could not be.
fn vmsplice_all(pipe: &SplicePipe, parts: &[&[u8]]) -> bool {
    use nix::fcntl::{vmsplice, SpliceFFlags};
    // Position: part `i`, byte `at` of it.
    let (mut i, mut at) = (0usize, 0usize);
    loop {
        let iov: Vec<IoSlice<'_>> = parts
            .get(i..)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(k, p)| {
                if k == 0 {
                    p.get(at..).unwrap_or_default()
                } else {
                    p
                }
            })
            .filter(|p| !p.is_empty())
            .take(VMSPLICE_MAX_PARTS)
            .map(IoSlice::new)
            .collect();
        if iov.is_empty() {
            return true;
        }
        match vmsplice(&pipe.write, &iov, SpliceFFlags::SPLICE_F_NONBLOCK) {
            Ok(n) if n > 0 => {
                // Step over the `n` bytes taken.
                let mut left = n;
                while left > 0 {
                    let Some(part) = parts.get(i) else {
                        return false;
                    };
                    let rest = part.len().saturating_sub(at);
                    if left < rest {
                        at += left;
                        left = 0;
                    } else {
                        left -= rest;
                        i += 1;
                        at = 0;
                    }
                }
            }
            Err(Errno::EINTR) => {}
            _ => return false,
        }
    }
}

/// One dm-user channel (one open file description of the misc node).
#[derive(Debug)]
pub struct Channel {
    file: File,
    max_payload: usize,
    splice: SpliceSupport,
    pipe: Option<SplicePipe>,
    /// Time spent splicing answers in pieces into the channel (after the pipe was filled).
    drain_time: Duration,
}

impl Channel {
    /// Path of the misc node for control name `name`.
    pub fn node_path(name: &str) -> PathBuf {
        Path::new(DEV_DIR).join(name)
    }

    /// Open `/dev/dm-user/<name>`, waiting up to `timeout` for the node to appear.
    pub fn open(name: &str, timeout: Duration) -> Result<Self, ChannelError> {
        Self::open_path(&Self::node_path(name), timeout)
    }

    /// Open the misc node at `path`, waiting up to `timeout` for it to appear.
    pub fn open_path(path: &Path, timeout: Duration) -> Result<Self, ChannelError> {
        let start = Instant::now();
        loop {
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => return Ok(Self::from_file(file)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if start.elapsed() >= timeout {
                        return Err(ChannelError::NodeTimeout {
                            path: path.to_path_buf(),
                            waited: start.elapsed(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(source) => {
                    return Err(ChannelError::Open {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }

    /// Wrap an already open file (or any stream fd, for tests).
    pub fn from_file(file: File) -> Self {
        Self {
            file,
            max_payload: DEFAULT_MAX_PAYLOAD,
            splice: SpliceSupport::Unknown,
            pipe: None,
            drain_time: Duration::ZERO,
        }
    }

    /// Time [`Channel::respond_pieces`] has spent splicing filled pipes into the channel
    /// (header write and drain; the kernel's copy into the bio happens there).
    pub fn drain_time(&self) -> Duration {
        self.drain_time
    }

    /// Wrap an owned fd.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self::from_file(File::from(fd))
    }

    /// Switch the channel between blocking and non-blocking (`O_NONBLOCK`) mode.
    /// In non-blocking mode [`Channel::receive`] returns [`ChannelError::WouldBlock`]
    /// when no message waits; use [`Channel::poll`] (or epoll on the fd) to wait.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), ChannelError> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let io = |e: Errno| ChannelError::Io {
            op: "fcntl",
            source: e.into(),
        };
        let flags = OFlag::from_bits_truncate(fcntl(&self.file, FcntlArg::F_GETFL).map_err(io)?);
        let flags = if nonblocking {
            flags | OFlag::O_NONBLOCK
        } else {
            flags & !OFlag::O_NONBLOCK
        };
        fcntl(&self.file, FcntlArg::F_SETFL(flags)).map_err(io)?;
        Ok(())
    }

    /// Block until the fd reports `events` (or an error/hang-up, which the next call surfaces).
    fn wait_for(&self, events: PollFlags) -> Result<(), ChannelError> {
        let mut fds = [PollFd::new(self.file.as_fd(), events)];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(ChannelError::Io {
                op: "poll",
                source: e.into(),
            }),
        }
    }

    /// Change the largest WRITE payload this channel accepts.
    pub fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max;
    }

    /// The underlying file, for raw access (fault-injection tests).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read exactly `buf.len()` bytes. Returns `Ok(false)` if a signal
    /// interrupted before the first byte and `allow_interrupt` is set.
    fn read_exact_framed(
        &mut self,
        buf: &mut [u8],
        allow_interrupt: bool,
    ) -> Result<bool, ChannelError> {
        let mut got = 0usize;
        while got < buf.len() {
            let rest = buf.get_mut(got..).unwrap_or_default();
            match self.file.read(rest) {
                Ok(0) => {
                    return Err(ChannelError::UnexpectedEof {
                        got,
                        want: buf.len(),
                    })
                }
                Ok(n) => got = got.saturating_add(n),
                Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                    Errno::ENOTBLK => return Err(ChannelError::TargetGone),
                    Errno::EINTR if got == 0 && allow_interrupt => return Ok(false),
                    Errno::EAGAIN if got == 0 && allow_interrupt => {
                        return Err(ChannelError::WouldBlock)
                    }
                    Errno::EINTR => continue,
                    // Mid-message on a non-blocking fd: wait for the rest.
                    Errno::EAGAIN => self.wait_for(PollFlags::POLLIN)?,
                    _ => {
                        return Err(ChannelError::Io {
                            op: "read",
                            source: e,
                        })
                    }
                },
            }
        }
        Ok(true)
    }

    /// Read the next request. For WRITE requests the payload (`len` bytes) is
    /// read into `payload` (resized); for every other type `payload` is cleared.
    ///
    /// A signal arriving while waiting for a new request yields
    /// [`ChannelError::Interrupted`]; one arriving mid-message is retried. On a
    /// non-blocking channel with nothing waiting it yields [`ChannelError::WouldBlock`].
    pub fn receive(&mut self, payload: &mut Vec<u8>) -> Result<Received, ChannelError> {
        let mut raw = [0u8; HEADER_SIZE];
        match self.read_exact_framed(&mut raw, true) {
            Ok(true) => {}
            Ok(false) => return Err(ChannelError::Interrupted),
            Err(ChannelError::TargetGone) => return Ok(Received::TargetGone),
            Err(e) => return Err(e),
        }
        let header = MessageHeader::from_bytes(&raw);
        payload.clear();
        if header.msg_type == DM_USER_REQ_MAP_WRITE && header.len > 0 {
            let len = usize::try_from(header.len)
                .ok()
                .filter(|&l| l <= self.max_payload)
                .ok_or(ChannelError::PayloadTooLarge {
                    seq: header.seq,
                    len: header.len,
                    max: self.max_payload,
                })?;
            payload.resize(len, 0);
            match self.read_exact_framed(payload, false) {
                Ok(_) => {}
                Err(ChannelError::TargetGone) => return Ok(Received::TargetGone),
                Err(e) => return Err(e),
            }
        }
        Ok(Received::Request(header))
    }

    /// Answer `request` with `code`; `data` is the READ payload (empty otherwise).
    /// A successful READ answer of at least [`SPLICE_MIN_PAYLOAD`] bytes and exactly the
    /// requested length is spliced when the file accepts it; otherwise header and data go
    /// out in one `writev()` unless the kernel takes a short write.
    pub fn respond(
        &mut self,
        request: &MessageHeader,
        code: u64,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        let header = request.response(code).to_bytes();
        let spliceable = code == DM_USER_RESP_SUCCESS
            && request.msg_type == DM_USER_REQ_MAP_READ
            && data.len() >= SPLICE_MIN_PAYLOAD
            && u64::try_from(data.len()).is_ok_and(|len| len == request.len)
            && self.splice != SpliceSupport::Refused;
        if spliceable {
            match self.splice_parts(request.seq, &header, data)? {
                Spliced::Sent => return Ok(()),
                Spliced::Refused => {
                    log::info!(
                        "dm-user channel refuses splice() (module older than target 1.3.0): \
                         answering reads with writev() (the kernel copies them from user memory)"
                    );
                    self.splice = SpliceSupport::Refused;
                }
                Spliced::NoPipe => {}
            }
        }
        self.write_parts(request.seq, &header, data)
    }

    /// Allow or forbid splicing answers (allowed by default; forbidding it makes every
    /// answer a `writev()`, as on a module without splice support: benchmarks compare both).
    pub fn set_splice(&mut self, allowed: bool) {
        self.splice = if allowed {
            SpliceSupport::Unknown
        } else {
            SpliceSupport::Refused
        };
        if !allowed {
            self.pipe = None;
        }
    }

    /// Whether answers are being spliced (a splice into this channel went through).
    pub fn splices(&self) -> bool {
        self.splice == SpliceSupport::Works
    }

    /// Answer the READ `request` with SUCCESS and `request.len` bytes of `file` at byte
    /// `offset`, spliced: the file's page-cache pages go into the channel's pipe and the
    /// kernel copies them into the bio, with no copy through user memory. Returns as
    /// [`Channel::respond_pieces`] does.
    pub fn respond_from_file(
        &mut self,
        request: &MessageHeader,
        file: &File,
        offset: u64,
    ) -> Result<bool, ChannelError> {
        let Ok(len) = usize::try_from(request.len) else {
            return Ok(false);
        };
        self.respond_pieces(request, &[AnswerPiece::File { file, offset, len }], &[])
    }

    /// Answer the READ `request` with SUCCESS and the concatenation of `pieces`, spliced:
    /// file pieces go into the channel's pipe as the file's page-cache pages, produced
    /// pieces as references to `produced` (vmsplice), and the kernel copies each into the
    /// bio once. The caller keeps the bytes the pieces name unchanged until this returns.
    ///
    /// Returns `Ok(false)`, with nothing sent, when the answer cannot go this way: no answer
    /// has been spliced into this channel yet (so whether the module accepts splice is not
    /// known), the pieces do not add up to `request.len` or lie outside `produced`, the pipe
    /// cannot hold the whole answer, or a file could not supply every byte (a normal read
    /// then reports the problem); the caller answers the request as usual. The data is in
    /// the pipe before the header is written, so a failing file never leaves a half-sent
    /// answer.
    pub fn respond_pieces(
        &mut self,
        request: &MessageHeader,
        pieces: &[AnswerPiece<'_>],
        produced: &[u8],
    ) -> Result<bool, ChannelError> {
        use nix::fcntl::{fcntl, FcntlArg};
        if request.msg_type != DM_USER_REQ_MAP_READ
            || request.len == 0
            || self.splice != SpliceSupport::Works
        {
            return Ok(false);
        }
        let Some(slots) = pipe_slots(pieces, produced, request.len) else {
            return Ok(false);
        };
        let Some(pipe) = self.pipe.take() else {
            return Ok(false);
        };
        let capacity = fcntl(&pipe.write, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|c| u64::try_from(c).ok())
            .unwrap_or(0);
        if slots.saturating_mul(PAGE_BYTES as u64) > capacity {
            self.pipe = Some(pipe);
            return Ok(false);
        }
        // Pieces that cannot be queued whole drop the pipe with what it holds: nothing
        // reached the kernel.
        if !fill_pipe(&pipe, pieces, produced) {
            return Ok(false);
        }
        let Ok(len) = usize::try_from(request.len) else {
            return Ok(false);
        };
        let header = request.response(DM_USER_RESP_SUCCESS).to_bytes();
        let t = Instant::now();
        self.write_parts(request.seq, &header, &[])?;
        let drained = self.drain_pipe(&pipe, request.seq, len);
        self.drain_time += t.elapsed();
        match drained? {
            Spliced::Sent => {
                self.pipe = Some(pipe);
                Ok(true)
            }
            // Splice worked on this channel before, and the header is out: a refusal now is
            // the kernel rejecting this answer.
            Spliced::Refused | Spliced::NoPipe => Err(ChannelError::Rejected { seq: request.seq }),
        }
    }

    /// Splice the `queued` bytes of `pipe` (one whole answer) into the channel.
    fn drain_pipe(
        &mut self,
        pipe: &SplicePipe,
        seq: u64,
        mut queued: usize,
    ) -> Result<Spliced, ChannelError> {
        let mut first_splice = true;
        while queued > 0 {
            match self.splice_once(pipe, seq, queued, first_splice)? {
                SpliceStep::Moved(n) => {
                    queued = queued.saturating_sub(n);
                    first_splice = false;
                }
                SpliceStep::Again => {}
                SpliceStep::Refused => return Ok(Spliced::Refused),
            }
        }
        Ok(Spliced::Sent)
    }

    /// Splice up to `queued` bytes of `pipe` into the channel once; `first` says no byte of
    /// this answer has been spliced yet.
    fn splice_once(
        &mut self,
        pipe: &SplicePipe,
        seq: u64,
        queued: usize,
        first: bool,
    ) -> Result<SpliceStep, ChannelError> {
        use nix::fcntl::{splice, SpliceFFlags};
        let io = |e: Errno| ChannelError::Io {
            op: "splice",
            source: e.into(),
        };
        match splice(
            &pipe.read,
            None,
            &self.file,
            None,
            queued,
            SpliceFFlags::empty(),
        ) {
            Ok(0) => Err(io(Errno::EPIPE)),
            Ok(n) => {
                self.splice = SpliceSupport::Works;
                Ok(SpliceStep::Moved(n))
            }
            // Refused before a byte was taken: the caller writes the answer instead.
            Err(Errno::EINVAL) if first && self.splice == SpliceSupport::Unknown => {
                Ok(SpliceStep::Refused)
            }
            Err(Errno::ENOTBLK) => Err(ChannelError::TargetGone),
            Err(Errno::EINVAL) => Err(ChannelError::Rejected { seq }),
            Err(Errno::EINTR) => Ok(SpliceStep::Again),
            Err(Errno::EAGAIN) => {
                self.wait_for(PollFlags::POLLOUT)?;
                Ok(SpliceStep::Again)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Send `header` and `data` through the channel's pipe: the header written into it,
    /// the data vmspliced (the pipe refers to `data`'s pages, no copy), then spliced into
    /// the file, which copies them. The pipe is empty again before this returns `Sent`;
    /// on an error it is dropped with whatever it held, so no page of `data` stays
    /// referenced once the borrow ends.
    fn splice_parts(
        &mut self,
        seq: u64,
        header: &[u8],
        data: &[u8],
    ) -> Result<Spliced, ChannelError> {
        use nix::fcntl::{vmsplice, SpliceFFlags};
        let pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => match SplicePipe::new() {
                Ok(pipe) => pipe,
                Err(e) => {
                    log::warn!("no pipe for splicing a dm-user answer ({e}); writing it instead");
                    return Ok(Spliced::NoPipe);
                }
            },
        };
        let io = |op: &'static str, e: Errno| ChannelError::Io {
            op,
            source: e.into(),
        };
        // An empty pipe takes the whole header (fewer than PIPE_BUF bytes) at once.
        match nix::unistd::write(&pipe.write, header) {
            Ok(n) if n == header.len() => {}
            Ok(_) => return Err(io("write header into pipe", Errno::EAGAIN)),
            Err(e) => return Err(io("write header into pipe", e)),
        }
        let mut queued = header.len();
        let mut vmspliced = 0usize;
        let mut first_splice = true;
        while queued > 0 || vmspliced < data.len() {
            if let Some(rest) = data.get(vmspliced..).filter(|r| !r.is_empty()) {
                match vmsplice(
                    &pipe.write,
                    &[IoSlice::new(rest)],
                    SpliceFFlags::SPLICE_F_NONBLOCK,
                ) {
                    Ok(n) => {
                        vmspliced = vmspliced.saturating_add(n);
                        queued = queued.saturating_add(n);
                    }
                    // Pipe full: splice out what it holds first.
                    Err(Errno::EAGAIN | Errno::EINTR) if queued > 0 => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(io("vmsplice", e)),
                }
            }
            match self.splice_once(&pipe, seq, queued, first_splice)? {
                SpliceStep::Moved(n) => {
                    queued = queued.saturating_sub(n);
                    first_splice = false;
                }
                SpliceStep::Again => {}
                // Refused before a byte was taken: the pipe (and its references) go away.
                SpliceStep::Refused => return Ok(Spliced::Refused),
            }
        }
        self.pipe = Some(pipe);
        Ok(Spliced::Sent)
    }

    /// Write `header` then `data` completely, retrying short writes.
    fn write_parts(&mut self, seq: u64, header: &[u8], data: &[u8]) -> Result<(), ChannelError> {
        let total = header.len().saturating_add(data.len());
        let mut sent = 0usize;
        while sent < total {
            let result = if sent < header.len() {
                let h = header.get(sent..).unwrap_or_default();
                self.file
                    .write_vectored(&[IoSlice::new(h), IoSlice::new(data)])
            } else {
                let d = data.get(sent - header.len()..).unwrap_or_default();
                self.file.write(d)
            };
            match result {
                Ok(0) => {
                    return Err(ChannelError::Io {
                        op: "write",
                        source: std::io::Error::from(std::io::ErrorKind::WriteZero),
                    })
                }
                Ok(n) => sent = sent.saturating_add(n),
                Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                    Errno::ENOTBLK => return Err(ChannelError::TargetGone),
                    Errno::EINVAL => return Err(ChannelError::Rejected { seq }),
                    Errno::EINTR => continue,
                    Errno::EAGAIN => self.wait_for(PollFlags::POLLOUT)?,
                    _ => {
                        return Err(ChannelError::Io {
                            op: "write",
                            source: e,
                        })
                    }
                },
            }
        }
        Ok(())
    }

    /// Wait up to `timeout` for a message or a hang-up (needs the module's poll support;
    /// without it the kernel reports the fd always readable). A signal ends the wait early
    /// as [`Readiness::TimedOut`]: it is never an error.
    pub fn poll(&self, timeout: Duration) -> Result<Readiness, ChannelError> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        let n = match nix::poll::poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(n) => n,
            Err(Errno::EINTR) => return Ok(Readiness::TimedOut),
            Err(e) => {
                return Err(ChannelError::Io {
                    op: "poll",
                    source: e.into(),
                })
            }
        };
        if n == 0 {
            return Ok(Readiness::TimedOut);
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            Ok(Readiness::HangUp)
        } else {
            Ok(Readiness::Readable)
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::net::UnixStream;

    fn parse_c_defines(text: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("#define") {
                continue;
            }
            let (Some(name), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            if !name.starts_with("DM_USER_") {
                continue;
            }
            let value = value.trim_start_matches('(').trim_end_matches(')');
            let value = value.trim_end_matches(['U', 'L', 'u', 'l']);
            let parsed = if let Some(hex) = value.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).ok()
            } else {
                value.parse::<u64>().ok()
            };
            if let Some(v) = parsed {
                out.insert(name.to_string(), v);
            }
        }
        out
    }

    #[test]
    fn constants_match_the_uapi_header() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kernel/include/uapi/linux/dm-user.h"
        );
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("the ABI header {path} must exist: {e}"));
        let defines = parse_c_defines(&text);
        for (name, value) in ABI_CONSTANTS {
            assert_eq!(
                defines.get(*name),
                Some(value),
                "{name}: Rust value {value} differs from (or is missing in) {path}"
            );
        }
        for (name, value) in &defines {
            if name.starts_with("DM_USER_REQ_") || name.starts_with("DM_USER_RESP_") {
                assert!(
                    ABI_CONSTANTS.iter().any(|(n, v)| n == name && v == value),
                    "{name} = {value} is in the header but not in dm_user.rs"
                );
            }
        }
        assert!(
            text.contains("struct dm_user_message"),
            "header lacks struct dm_user_message"
        );
    }

    #[test]
    fn header_round_trips_and_is_native_endian() {
        let h = MessageHeader {
            seq: 7,
            msg_type: DM_USER_REQ_MAP_WRITE,
            flags: DM_USER_REQ_MAP_FLAG_FUA,
            sector: 0x1122_3344,
            len: 4096,
        };
        let bytes = h.to_bytes();
        assert_eq!(bytes.len(), HEADER_SIZE);
        assert_eq!(&bytes[0..8], &7u64.to_ne_bytes());
        assert_eq!(&bytes[24..32], &0x1122_3344u64.to_ne_bytes());
        assert_eq!(MessageHeader::from_bytes(&bytes), h);
    }

    #[test]
    fn request_types_decode() {
        let cases = [
            (DM_USER_REQ_MAP_READ, Some(RequestType::Read)),
            (DM_USER_REQ_MAP_WRITE, Some(RequestType::Write)),
            (DM_USER_REQ_MAP_FLUSH, Some(RequestType::Flush)),
            (DM_USER_REQ_MAP_DISCARD, Some(RequestType::Discard)),
            (DM_USER_REQ_MAP_SECURE_ERASE, Some(RequestType::SecureErase)),
            (DM_USER_REQ_MAP_WRITE_SAME, Some(RequestType::WriteSame)),
            (DM_USER_REQ_MAP_WRITE_ZEROES, Some(RequestType::WriteZeroes)),
            (
                DM_USER_REQ_MAP_ZONE_APPEND,
                Some(RequestType::Zone(DM_USER_REQ_MAP_ZONE_APPEND)),
            ),
            (13, None),
            (u64::MAX, None),
        ];
        for (wire, want) in cases {
            assert_eq!(RequestType::from_wire(wire), want, "{wire}");
        }
        assert_eq!(ResponseCode::Success.to_wire(), DM_USER_RESP_SUCCESS);
        assert_eq!(ResponseCode::Error.to_wire(), DM_USER_RESP_ERROR);
        assert_eq!(
            ResponseCode::Unsupported.to_wire(),
            DM_USER_RESP_UNSUPPORTED
        );
    }

    #[test]
    fn flush_detection() {
        let mut h = MessageHeader {
            msg_type: DM_USER_REQ_MAP_WRITE,
            flags: DM_USER_REQ_MAP_FLAG_PREFLUSH,
            ..Default::default()
        };
        assert!(h.is_flush());
        h.len = 512;
        assert!(!h.is_flush());
        h.msg_type = DM_USER_REQ_MAP_FLUSH;
        assert!(h.is_flush());
    }

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::from_fd(OwnedFd::from(a)), b)
    }

    #[test]
    fn receive_handles_short_reads_and_write_payload() {
        let (mut chan, mut peer) = pair();
        let h = MessageHeader {
            seq: 3,
            msg_type: DM_USER_REQ_MAP_WRITE,
            flags: 0,
            sector: 8,
            len: 10,
        };
        let bytes = h.to_bytes();
        let writer = std::thread::spawn(move || {
            for chunk in bytes.chunks(7) {
                peer.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            peer.write_all(b"0123456789").unwrap();
            peer
        });
        let mut payload = Vec::new();
        assert_eq!(chan.receive(&mut payload).unwrap(), Received::Request(h));
        assert_eq!(payload, b"0123456789");
        drop(writer.join().unwrap());
    }

    #[test]
    fn read_request_has_no_payload() {
        let (mut chan, mut peer) = pair();
        let h = MessageHeader {
            seq: 1,
            msg_type: DM_USER_REQ_MAP_READ,
            len: 4096,
            ..Default::default()
        };
        peer.write_all(&h.to_bytes()).unwrap();
        let mut payload = vec![1, 2, 3];
        assert_eq!(chan.receive(&mut payload).unwrap(), Received::Request(h));
        assert!(payload.is_empty());
    }

    #[test]
    fn oversized_payload_is_rejected_without_allocating() {
        let (mut chan, mut peer) = pair();
        chan.set_max_payload(1024);
        let h = MessageHeader {
            seq: 9,
            msg_type: DM_USER_REQ_MAP_WRITE,
            len: u64::MAX,
            ..Default::default()
        };
        peer.write_all(&h.to_bytes()).unwrap();
        let mut payload = Vec::new();
        match chan.receive(&mut payload) {
            Err(ChannelError::PayloadTooLarge {
                seq: 9,
                len,
                max: 1024,
            }) => assert_eq!(len, u64::MAX),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(payload.capacity(), 0);
    }

    #[test]
    fn truncated_header_is_eof_error() {
        let (mut chan, mut peer) = pair();
        peer.write_all(&[0u8; 13]).unwrap();
        drop(peer);
        let mut payload = Vec::new();
        match chan.receive(&mut payload) {
            Err(ChannelError::UnexpectedEof { got: 13, want: 40 }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn respond_sends_header_then_data() {
        let (mut chan, mut peer) = pair();
        let req = MessageHeader {
            seq: 42,
            msg_type: DM_USER_REQ_MAP_READ,
            sector: 2,
            len: 5,
            ..Default::default()
        };
        chan.respond(&req, DM_USER_RESP_SUCCESS, b"hello").unwrap();
        let mut got = [0u8; HEADER_SIZE + 5];
        peer.read_exact(&mut got).unwrap();
        let mut head = [0u8; HEADER_SIZE];
        head.copy_from_slice(&got[..HEADER_SIZE]);
        let resp = MessageHeader::from_bytes(&head);
        assert_eq!(resp.seq, 42);
        assert_eq!(resp.msg_type, DM_USER_RESP_SUCCESS);
        assert_eq!(&got[HEADER_SIZE..], b"hello");
    }

    /// A READ request for `len` bytes and an answer for it whose bytes depend on `seed`.
    fn large_read(seq: u64, len: usize, seed: u8) -> (MessageHeader, Vec<u8>) {
        let req = MessageHeader {
            seq,
            msg_type: DM_USER_REQ_MAP_READ,
            sector: 8,
            len: len as u64,
            ..Default::default()
        };
        let data = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        (req, data)
    }

    fn expect_answer(got: &[u8], seq: u64, data: &[u8]) {
        let mut head = [0u8; HEADER_SIZE];
        head.copy_from_slice(&got[..HEADER_SIZE]);
        let resp = MessageHeader::from_bytes(&head);
        assert_eq!(resp.seq, seq);
        assert_eq!(resp.msg_type, DM_USER_RESP_SUCCESS);
        assert_eq!(got.len(), HEADER_SIZE + data.len());
        assert!(got[HEADER_SIZE..] == *data, "answer data differs");
    }

    #[test]
    fn large_read_answers_are_spliced_and_arrive_whole() {
        let (mut chan, mut peer) = pair();
        // 1 MiB + 1 page, with a buffer not page-aligned: more pages than a 1 MiB pipe holds,
        // so the answer goes out in several splices.
        for (seq, len, seed) in [(7, (1 << 20) + 4096, 3u8), (8, SPLICE_MIN_PAYLOAD, 9)] {
            let (req, data) = large_read(seq, len, seed);
            let reader = read_answer(&peer, len);
            let unaligned = [&[0u8][..], &data].concat();
            chan.respond(&req, DM_USER_RESP_SUCCESS, &unaligned[1..])
                .unwrap();
            expect_answer(&reader.join().unwrap(), seq, &data);
            assert!(chan.splices(), "a socket accepts splice()");
        }
        // Nothing more was sent: the pipe was empty after each answer.
        peer.set_nonblocking(true).unwrap();
        let mut extra = [0u8; 1];
        assert_eq!(
            peer.read(&mut extra).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
    }

    /// A thread reading one answer of `len` data bytes (and its header) from `peer`.
    fn read_answer(peer: &UnixStream, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
        let mut peer = peer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = vec![0u8; HEADER_SIZE + len];
            peer.read_exact(&mut got).unwrap();
            got
        })
    }

    /// A channel over an O_APPEND file at `path`: splice() into it fails with EINVAL before
    /// taking a byte, as it does on a dm-user module without splice support.
    fn refusing_splice(path: &Path) -> Channel {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        Channel::from_file(file)
    }

    #[test]
    fn a_file_refusing_splice_gets_the_answer_written_once() {
        // splice() into an O_APPEND file fails with EINVAL before taking a byte, as it does
        // on a dm-user module without splice support.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers");
        let mut chan = refusing_splice(&path);
        let (req, data) = large_read(11, 256 << 10, 5);
        chan.respond(&req, DM_USER_RESP_SUCCESS, &data).unwrap();
        assert!(!chan.splices());
        let (req2, data2) = large_read(12, 128 << 10, 6);
        chan.respond(&req2, DM_USER_RESP_SUCCESS, &data2).unwrap();
        let got = std::fs::read(&path).unwrap();
        let (first, second) = got.split_at(HEADER_SIZE + data.len());
        expect_answer(first, 11, &data);
        expect_answer(second, 12, &data2);
    }

    #[test]
    fn answers_spliced_from_a_file_arrive_whole_and_short_files_send_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        let (_, content) = large_read(0, (1 << 20) + 8192, 4);
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let (mut chan, mut peer) = pair();
        // Until an answer was spliced into the channel, nothing comes from the file.
        let (first, data) = large_read(20, SPLICE_MIN_PAYLOAD, 1);
        assert!(!chan.respond_from_file(&first, &file, 0).unwrap());
        let reader = read_answer(&peer, SPLICE_MIN_PAYLOAD);
        chan.respond(&first, DM_USER_RESP_SUCCESS, &data).unwrap();
        expect_answer(&reader.join().unwrap(), 20, &data);
        // A whole 1 MiB answer at a page-aligned offset, one at an unaligned (sector) offset
        // where the pipe allows it, and a small one.
        for (seq, offset, len) in [
            (21u64, 4096usize, 1usize << 20),
            (22, 512, (1 << 20) - 8192),
            (23, 8192, 4096),
        ] {
            let (req, _) = large_read(seq, len, 0);
            let reader = read_answer(&peer, len);
            assert!(chan.respond_from_file(&req, &file, offset as u64).unwrap());
            expect_answer(&reader.join().unwrap(), seq, &content[offset..offset + len]);
        }
        // The file ends before the answer would: nothing is sent, the caller answers.
        let (req, _) = large_read(24, 16384, 0);
        let near_end = (content.len() - 4096) as u64;
        assert!(!chan.respond_from_file(&req, &file, near_end).unwrap());
        chan.respond(&req, DM_USER_RESP_ERROR, &[]).unwrap();
        let mut got = [0u8; HEADER_SIZE];
        peer.read_exact(&mut got).unwrap();
        let resp = MessageHeader::from_bytes(&got);
        assert_eq!((resp.seq, resp.msg_type), (24, DM_USER_RESP_ERROR));
        peer.set_nonblocking(true).unwrap();
        assert_eq!(
            peer.read(&mut got).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "nothing else was sent"
        );
    }

    #[test]
    fn answers_in_pieces_arrive_in_order_and_bad_plans_send_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        let (_, content) = large_read(0, 1 << 20, 9);
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let (_, produced) = large_read(0, 256 << 10, 3);
        let (mut chan, mut peer) = pair();
        // Splice is proven on this channel first, as on a live one.
        let (first, data) = large_read(40, SPLICE_MIN_PAYLOAD, 1);
        let reader = read_answer(&peer, SPLICE_MIN_PAYLOAD);
        chan.respond(&first, DM_USER_RESP_SUCCESS, &data).unwrap();
        expect_answer(&reader.join().unwrap(), 40, &data);
        // File runs (one unaligned), produced runs (one unaligned), interleaved.
        let pieces = [
            AnswerPiece::File {
                file: &file,
                offset: 8192,
                len: 12288,
            },
            AnswerPiece::Produced {
                start: 512,
                len: 4096,
            },
            AnswerPiece::File {
                file: &file,
                offset: 100_352,
                len: 1536,
            },
            AnswerPiece::Produced {
                start: 65536,
                len: 131_072,
            },
        ];
        let mut want = Vec::new();
        want.extend_from_slice(&content[8192..8192 + 12288]);
        want.extend_from_slice(&produced[512..512 + 4096]);
        want.extend_from_slice(&content[100_352..100_352 + 1536]);
        want.extend_from_slice(&produced[65536..65536 + 131_072]);
        let (req, _) = large_read(41, want.len(), 0);
        let reader = read_answer(&peer, want.len());
        assert!(chan.respond_pieces(&req, &pieces, &produced).unwrap());
        expect_answer(&reader.join().unwrap(), 41, &want);
        // Many small pieces, runs of memory pieces (produced and lent) between file pieces,
        // one unaligned: each run goes in one vmsplice, in order.
        let lent = &content[300_000..400_000];
        let mut many = Vec::new();
        let mut want_many = Vec::new();
        for k in 0..60usize {
            let at = k * 1024;
            many.push(AnswerPiece::Memory {
                bytes: &lent[at..at + 1024],
            });
            want_many.extend_from_slice(&lent[at..at + 1024]);
            many.push(AnswerPiece::Produced {
                start: at + 7,
                len: 512,
            });
            want_many.extend_from_slice(&produced[at + 7..at + 7 + 512]);
            if k % 10 == 9 {
                many.push(AnswerPiece::File {
                    file: &file,
                    offset: (k * 4096) as u64,
                    len: 4096,
                });
                want_many.extend_from_slice(&content[k * 4096..k * 4096 + 4096]);
            }
        }
        let (req, _) = large_read(45, want_many.len(), 0);
        let reader = read_answer(&peer, want_many.len());
        assert!(chan.respond_pieces(&req, &many, &produced).unwrap());
        expect_answer(&reader.join().unwrap(), 45, &want_many);
        // Pieces that do not add up to the request, a produced piece outside the buffer,
        // and a file piece past the end of the file: nothing is sent.
        let (short, _) = large_read(42, want.len() + 512, 0);
        assert!(!chan.respond_pieces(&short, &pieces, &produced).unwrap());
        let outside = [AnswerPiece::Produced {
            start: produced.len() - 4096,
            len: 8192,
        }];
        let (req, _) = large_read(43, 8192, 0);
        assert!(!chan.respond_pieces(&req, &outside, &produced).unwrap());
        let past_end = [
            AnswerPiece::Produced {
                start: 0,
                len: 4096,
            },
            AnswerPiece::File {
                file: &file,
                offset: (content.len() - 4096) as u64,
                len: 8192,
            },
        ];
        let (req, _) = large_read(44, 12288, 0);
        assert!(!chan.respond_pieces(&req, &past_end, &produced).unwrap());
        peer.set_nonblocking(true).unwrap();
        let mut got = [0u8; HEADER_SIZE];
        assert_eq!(
            peer.read(&mut got).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "nothing was sent for the refused plans"
        );
        // The channel still answers afterwards (a fresh pipe if the old one was dropped).
        peer.set_nonblocking(false).unwrap();
        let (req, data) = large_read(45, SPLICE_MIN_PAYLOAD, 5);
        let reader = read_answer(&peer, SPLICE_MIN_PAYLOAD);
        chan.respond(&req, DM_USER_RESP_SUCCESS, &data).unwrap();
        expect_answer(&reader.join().unwrap(), 45, &data);
    }

    #[test]
    fn a_channel_refusing_splice_sends_nothing_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, vec![7u8; 65536]).unwrap();
        let answers = dir.path().join("answers");
        let mut chan = refusing_splice(&answers);
        let (req, _) = large_read(31, 65536, 0);
        let file = File::open(&base).unwrap();
        assert!(!chan.respond_from_file(&req, &file, 0).unwrap());
        assert!(std::fs::read(&answers).unwrap().is_empty());
        // The first large answer finds splice refused; it and later ones are written, and
        // nothing comes from the file.
        chan.respond(&req, DM_USER_RESP_SUCCESS, &[7u8; 65536])
            .unwrap();
        assert!(!chan.respond_from_file(&req, &file, 0).unwrap());
        expect_answer(&std::fs::read(&answers).unwrap(), 31, &[7u8; 65536]);
    }

    #[test]
    fn small_and_error_answers_are_written() {
        let (mut chan, mut peer) = pair();
        let (req, _) = large_read(3, SPLICE_MIN_PAYLOAD, 1);
        chan.respond(&req, DM_USER_RESP_ERROR, &[]).unwrap();
        let (small, data) = large_read(4, 4096, 2);
        chan.respond(&small, DM_USER_RESP_SUCCESS, &data).unwrap();
        assert!(!chan.splices(), "neither answer is large enough to splice");
        let mut got = vec![0u8; 2 * HEADER_SIZE + 4096];
        peer.read_exact(&mut got).unwrap();
        expect_answer(&got[HEADER_SIZE..], 4, &data);
    }

    #[test]
    fn poll_reports_readable_and_timeout() {
        let (chan, mut peer) = pair();
        assert_eq!(
            chan.poll(Duration::from_millis(10)).unwrap(),
            Readiness::TimedOut
        );
        peer.write_all(&[0u8; 1]).unwrap();
        assert_eq!(
            chan.poll(Duration::from_millis(1000)).unwrap(),
            Readiness::Readable
        );
    }

    #[test]
    fn nonblocking_receive_would_block_then_reads() {
        let (mut chan, mut peer) = pair();
        chan.set_nonblocking(true).unwrap();
        let mut payload = Vec::new();
        assert!(matches!(
            chan.receive(&mut payload),
            Err(ChannelError::WouldBlock)
        ));
        let h = MessageHeader {
            seq: 5,
            msg_type: DM_USER_REQ_MAP_WRITE,
            len: 3,
            ..Default::default()
        };
        // Header now, payload a little later: the mid-message EAGAIN must wait, not fail.
        peer.write_all(&h.to_bytes()).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            peer.write_all(b"xyz").unwrap();
            peer
        });
        assert_eq!(chan.receive(&mut payload).unwrap(), Received::Request(h));
        assert_eq!(payload, b"xyz");
        drop(writer.join().unwrap());
    }

    #[test]
    fn open_times_out_on_missing_node() {
        let err = Channel::open_path(
            Path::new("/nonexistent/dm-user/x"),
            Duration::from_millis(20),
        )
        .unwrap_err();
        assert!(matches!(err, ChannelError::NodeTimeout { .. }), "{err:?}");
    }

    static SIGNALS_SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    extern "C" fn count_signal(_: libc::c_int) {
        SIGNALS_SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A response whose `write()` blocks (the kernel side is not reading) and is hit by
    /// signals, installed without SA_RESTART so that blocked calls return EINTR or a short
    /// count, still arrives whole and in order, on a blocking and a non-blocking channel.
    #[test]
    fn responses_survive_signals_while_the_kernel_is_not_reading() {
        use std::io::Read;
        // SAFETY: installs a handler that only bumps an atomic counter (async-signal-safe),
        // with an empty mask and no SA_RESTART; `sa` is fully initialised before the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = count_signal as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
        let data: Vec<u8> = (0..4usize << 20).map(|i| (i * 7 % 251) as u8).collect();
        for nonblocking in [false, true] {
            let before = SIGNALS_SEEN.load(std::sync::atomic::Ordering::Relaxed);
            let (mut kernel, daemon) = UnixStream::pair().unwrap();
            let mut channel = Channel::from_fd(daemon.into());
            channel.set_nonblocking(nonblocking).unwrap();
            let request = MessageHeader {
                seq: 42,
                msg_type: DM_USER_REQ_MAP_READ,
                flags: 0,
                sector: 8,
                len: data.len() as u64,
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let writer = std::thread::spawn({
                let data = data.clone();
                move || {
                    // SAFETY: pthread_self has no preconditions.
                    tx.send(unsafe { libc::pthread_self() }).unwrap();
                    channel.respond(&request, DM_USER_RESP_SUCCESS, &data)
                }
            });
            let thread = rx.recv().unwrap();
            for _ in 0..20 {
                std::thread::sleep(std::time::Duration::from_millis(5));
                // SAFETY: the writer thread is alive: it cannot finish a 4 MiB write
                // before this thread starts reading below.
                assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
            }
            let mut raw = [0u8; HEADER_SIZE];
            kernel.read_exact(&mut raw).unwrap();
            let response = MessageHeader::from_bytes(&raw);
            assert_eq!(
                (
                    response.seq,
                    response.msg_type,
                    response.sector,
                    response.len
                ),
                (42, DM_USER_RESP_SUCCESS, 8, data.len() as u64)
            );
            let mut got = vec![0u8; data.len()];
            kernel.read_exact(&mut got).unwrap();
            assert!(got == data, "payload damaged (nonblocking: {nonblocking})");
            writer.join().unwrap().unwrap();
            let seen = SIGNALS_SEEN.load(std::sync::atomic::Ordering::Relaxed) - before;
            // Standard signals do not queue: two sent before the thread runs count once.
            assert!(
                (1..=20).contains(&seen),
                "{seen} signals delivered (nonblocking: {nonblocking})"
            );
        }
    }
}
