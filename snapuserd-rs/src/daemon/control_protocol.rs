//! snapuserd's control protocol (reference §C.1-C.3): the text commands a client sends on
//! the control socket, the replies, and the daemon's command line.
//!
//! A message is what one `recv()` of at most [`MAX_MESSAGE_SIZE`] bytes returns: ASCII
//! fields joined by ','. Parsing borrows from the message and allocates nothing; anything
//! malformed or unknown is a [`ControlError`], which the server answers with `fail` before
//! carrying on.

use std::fmt;

use thiserror::Error;

/// Largest control message (AOSP's `kMaxPacketSize`, the client's `PACKET_SIZE`).
pub const MAX_MESSAGE_SIZE: usize = 512;
/// The only feature `supports,` answers `success` for.
pub const FEATURE_SOCKET_HANDOFF: &str = "second_stage_socket_handoff";
/// Default `-socket=` name.
pub const DEFAULT_SOCKET_NAME: &str = "snapuserd";
/// Default `-worker_count=`.
pub const DEFAULT_WORKER_COUNT: u32 = 4;
/// Largest accepted `-worker_count=` (threads per partition).
pub const MAX_WORKER_COUNT: u32 = 64;
/// Largest accepted `-num_merge_threads=`.
pub const MAX_MERGE_THREADS: u32 = 64;

/// Errors of the control protocol and command-line parsing.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ControlError {
    /// The message is empty.
    #[error("empty control message")]
    Empty,
    /// The message exceeds [`MAX_MESSAGE_SIZE`].
    #[error("control message of {len} bytes exceeds {MAX_MESSAGE_SIZE}")]
    TooLong {
        /// Length received.
        len: usize,
    },
    /// The message is not ASCII text.
    #[error("control message has a non-printable or non-ASCII byte at offset {offset}")]
    NotText {
        /// Offset of the first bad byte.
        offset: usize,
    },
    /// The command word is unknown.
    #[error("unknown control command {command:?}")]
    UnknownCommand {
        /// The first field (truncated to 64 bytes).
        command: String,
    },
    /// A command has the wrong number of fields.
    #[error("command {command} takes {expected} fields, got {got}")]
    WrongArity {
        /// Command word.
        command: &'static str,
        /// Accepted field counts, e.g. "4 or 5".
        expected: &'static str,
        /// Fields received (command word included).
        got: usize,
    },
    /// A field is empty.
    #[error("command {command}: field {index} is empty")]
    EmptyField {
        /// Command word.
        command: &'static str,
        /// Field index (0 is the command word).
        index: usize,
    },
    /// A command-line flag is unknown.
    #[error("unknown command-line flag {flag:?}")]
    UnknownFlag {
        /// The argument as given.
        flag: String,
    },
    /// A command-line flag needs a value and has none.
    #[error("command-line flag -{flag} needs a value")]
    MissingValue {
        /// Flag name.
        flag: &'static str,
    },
    /// A command-line flag value does not parse or is out of range.
    #[error("command-line flag -{flag}: bad value {value:?} ({reason})")]
    BadValue {
        /// Flag name.
        flag: &'static str,
        /// Value given.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A positional handler argument is malformed.
    #[error(
        "handler argument {index} {arg:?}: expected misc,cow,source[,base] with no empty field"
    )]
    BadHandler {
        /// Position among the positional arguments.
        index: usize,
        /// The argument.
        arg: String,
    },
    /// Handlers given without `-no_socket`, or `-no_socket` without handlers.
    #[error("{0}")]
    Inconsistent(&'static str),
    /// A legacy 3-field handler given to a `-user_snapshot` daemon.
    #[error(
        "handler argument {index} {arg:?} is a legacy dm-snapshot handler (misc,cow,source) \
         but -user_snapshot asks for user-space snapshots: give misc,cow,source,base, or \
         drop -user_snapshot"
    )]
    ModeMismatch {
        /// Position among the positional arguments.
        index: usize,
        /// The argument.
        arg: String,
    },
}

/// One parsed control command, borrowing from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `init,<misc>,<cow>,<source>,<base>`; the legacy 4-field form has no base.
    Init {
        /// dm-user misc name.
        misc_name: &'a str,
        /// COW device path.
        cow_device: &'a str,
        /// Source device path.
        source_device: &'a str,
        /// Base device to merge into (absent in the legacy form).
        base_device: Option<&'a str>,
    },
    /// `start,<misc>`.
    Start {
        /// dm-user misc name.
        misc_name: &'a str,
    },
    /// `query`.
    Query,
    /// `stop` (no reply).
    Stop,
    /// `delete,<misc>`.
    Delete {
        /// dm-user misc name.
        misc_name: &'a str,
    },
    /// `detach` (no reply).
    Detach,
    /// `supports,<feature>`.
    Supports {
        /// Feature name.
        feature: &'a str,
    },
    /// `initiate_merge,<misc>`.
    InitiateMerge {
        /// dm-user misc name.
        misc_name: &'a str,
    },
    /// `merge_percent`.
    MergePercent,
    /// `getstatus,<misc>`.
    GetStatus {
        /// dm-user misc name.
        misc_name: &'a str,
    },
    /// `update-verify`.
    UpdateVerify,
    /// `pause_merge`.
    PauseMerge,
    /// `resume_merge`.
    ResumeMerge,
    /// `get_device_name,<misc>`: the ublk block node serving the handler.
    GetDeviceName {
        /// Misc name of the handler.
        misc_name: &'a str,
    },
    /// `create,<misc>,<sectors>`: create (or re-attach) the handler's ublk device of that
    /// size.
    Create {
        /// Misc name of the handler.
        misc_name: &'a str,
        /// Device size in 512-byte sectors (a decimal number).
        sectors: &'a str,
    },
}

/// Split `msg` into at most `N` fields without allocating; `None` when there are more.
fn split_fields<const N: usize>(msg: &str) -> Option<([&str; N], usize)> {
    let mut fields = [""; N];
    let mut count = 0;
    for field in msg.split(',') {
        if count == N {
            return None;
        }
        fields[count] = field;
        count += 1;
    }
    Some((fields, count))
}

impl<'a> Command<'a> {
    /// Parse one received message.
    pub fn parse(message: &'a [u8]) -> Result<Self, ControlError> {
        if message.is_empty() {
            return Err(ControlError::Empty);
        }
        if message.len() > MAX_MESSAGE_SIZE {
            return Err(ControlError::TooLong { len: message.len() });
        }
        if let Some(offset) = message.iter().position(|&b| !(0x20..0x7f).contains(&b)) {
            return Err(ControlError::NotText { offset });
        }
        let text = std::str::from_utf8(message).map_err(|e| ControlError::NotText {
            offset: e.valid_up_to(),
        })?;
        // 6 slots: one more than any command takes, so "too many" is detectable.
        let Some((f, n)) = split_fields::<6>(text) else {
            let command = command_name(text.split(',').next().unwrap_or(""));
            return Err(match command {
                Some(command) => ControlError::WrongArity {
                    command,
                    expected: arity_of(command),
                    got: 7,
                },
                None => unknown(text),
            });
        };
        let Some(command) = command_name(f[0]) else {
            return Err(unknown(f[0]));
        };
        let accepted: &[usize] = match command {
            "init" => &[4, 5],
            "create" => &[3],
            "start" | "delete" | "supports" | "initiate_merge" | "getstatus"
            | "get_device_name" => &[2],
            _ => &[1],
        };
        if !accepted.contains(&n) {
            return Err(ControlError::WrongArity {
                command,
                expected: arity_of(command),
                got: n,
            });
        }
        if let Some(index) = (1..n).find(|&i| f[i].is_empty()) {
            return Err(ControlError::EmptyField { command, index });
        }
        Ok(match command {
            "init" => Command::Init {
                misc_name: f[1],
                cow_device: f[2],
                source_device: f[3],
                base_device: (n == 5).then_some(f[4]),
            },
            "start" => Command::Start { misc_name: f[1] },
            "query" => Command::Query,
            "stop" => Command::Stop,
            "delete" => Command::Delete { misc_name: f[1] },
            "detach" => Command::Detach,
            "supports" => Command::Supports { feature: f[1] },
            "initiate_merge" => Command::InitiateMerge { misc_name: f[1] },
            "merge_percent" => Command::MergePercent,
            "getstatus" => Command::GetStatus { misc_name: f[1] },
            "update-verify" => Command::UpdateVerify,
            "pause_merge" => Command::PauseMerge,
            "get_device_name" => Command::GetDeviceName { misc_name: f[1] },
            "create" => Command::Create {
                misc_name: f[1],
                sectors: f[2],
            },
            _ => Command::ResumeMerge,
        })
    }
}

const COMMANDS: [&str; 15] = [
    "init",
    "start",
    "query",
    "stop",
    "delete",
    "detach",
    "supports",
    "initiate_merge",
    "merge_percent",
    "getstatus",
    "update-verify",
    "pause_merge",
    "resume_merge",
    "get_device_name",
    "create",
];

fn command_name(word: &str) -> Option<&'static str> {
    COMMANDS.iter().copied().find(|&c| c == word)
}

fn arity_of(command: &str) -> &'static str {
    match command {
        "init" => "4 or 5",
        "create" => "3",
        "start" | "delete" | "supports" | "initiate_merge" | "getstatus" | "get_device_name" => "2",
        _ => "1",
    }
}

fn unknown(word: &str) -> ControlError {
    let end = word.char_indices().nth(64).map_or(word.len(), |(i, _)| i);
    ControlError::UnknownCommand {
        command: word[..end].to_string(),
    }
}

/// The merge state reported by `getstatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeStatus {
    /// Serving the snapshot, no merge running.
    Snapshot,
    /// Merging.
    SnapshotMerge,
    /// Merge finished.
    SnapshotMergeComplete,
    /// Merge failed (also the answer for an unknown misc name).
    SnapshotMergeFailed,
}

/// A reply to a control command, formatted exactly as AOSP's server does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reply {
    /// `success`.
    Success,
    /// `success,<num_sectors>` (the `init` reply).
    SuccessSectors(u64),
    /// `fail`.
    Fail,
    /// `active`.
    Active,
    /// `passive`.
    Passive,
    /// The merge percentage, `%f`-style with six decimals (`42.500000`).
    MergePercent(f64),
    /// A `getstatus` answer.
    Status(MergeStatus),
    /// `success,<dir>/ublkb<N>` (the `get_device_name` reply): the block node's directory
    /// (`/dev/block` on Android) and the device id.
    SuccessDeviceName {
        /// Directory of the block node.
        dir: &'static str,
        /// ublk device id.
        dev_id: u32,
    },
    /// `fail,device_not_found` (`get_device_name` for a handler without a ublk device).
    FailDeviceNotFound,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Success => f.write_str("success"),
            Reply::SuccessSectors(n) => write!(f, "success,{n}"),
            Reply::Fail => f.write_str("fail"),
            Reply::Active => f.write_str("active"),
            Reply::Passive => f.write_str("passive"),
            Reply::MergePercent(p) => {
                let p = if p.is_finite() {
                    p.clamp(0.0, 100.0)
                } else {
                    0.0
                };
                // clamp keeps -0.0; print it as 0 like a fresh merge.
                let p = if p == 0.0 { 0.0 } else { p };
                write!(f, "{p:.6}")
            }
            Reply::Status(s) => f.write_str(match s {
                MergeStatus::Snapshot => "snapshot",
                MergeStatus::SnapshotMerge => "snapshot-merge",
                MergeStatus::SnapshotMergeComplete => "snapshot-merge-complete",
                MergeStatus::SnapshotMergeFailed => "snapshot-merge-failed",
            }),
            Reply::SuccessDeviceName { dir, dev_id } => write!(f, "success,{dir}/ublkb{dev_id}"),
            Reply::FailDeviceNotFound => f.write_str("fail,device_not_found"),
        }
    }
}

/// The reply to `supports,<feature>`.
pub fn supports_reply(feature: &str) -> Reply {
    if feature == FEATURE_SOCKET_HANDOFF || (feature == FEATURE_UBLK && crate::ublk::available()) {
        Reply::Success
    } else {
        Reply::Fail
    }
}

/// `supports,ublk`: answered `success` only where the kernel offers ublk
/// (`/dev/ublk-control` exists).
pub const FEATURE_UBLK: &str = "ublk";

/// One `-no_socket` positional handler: `misc,cow,source[,base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSpec {
    /// dm-user misc name.
    pub misc_name: String,
    /// COW device path.
    pub cow_device: String,
    /// Source device path.
    pub source_device: String,
    /// Base device path (absent in the legacy 3-field form).
    pub base_device: Option<String>,
}

/// The daemon's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// `-socket=<name>`: the control socket name.
    pub socket: String,
    /// `-no_socket`: serve the positional handlers without a control socket.
    pub no_socket: bool,
    /// `-socket_handoff` / `-socket-handoff`: act as the socket-handoff proxy.
    pub socket_handoff: bool,
    /// `-user_snapshot`: user-space snapshots only (a legacy 4-field `init` or 3-field
    /// handler is refused).
    pub user_snapshot: bool,
    /// `-io_uring`: merge through io_uring (default on; the synchronous engine is used
    /// where a ring cannot be built).
    pub io_uring: bool,
    /// `-o_direct`.
    pub o_direct: bool,
    /// `-merge_o_direct`: the merge writes the base device with `O_DIRECT` where it accepts
    /// it, synchronously (default on; `-nomerge_o_direct` for buffered writes; see
    /// user_merge/DESIGN.md "Merge I/O").
    pub merge_o_direct: bool,
    /// `-merge_direct_reads`: the merge reads window sources with `O_DIRECT` where the
    /// source accepts it (default on; `-nomerge_direct_reads` for buffered reads).
    pub merge_direct_reads: bool,
    /// `-merge_direct_scratch`: the merge saves read-ahead windows in the COW's scratch
    /// region with `O_DIRECT` where the COW file accepts it (default on;
    /// `-nomerge_direct_scratch` for buffered saves).
    pub merge_direct_scratch: bool,
    /// `-splice_reads`: large dm-user READs in user-space-merge mode are answered in pieces
    /// spliced from the page cache (default on; `-nosplice_reads`: produced in the daemon's
    /// buffer and sent whole).
    pub splice_reads: bool,
    /// `-read_prefetch`: a reader going through the device in order gets the base device
    /// read a few MiB ahead of it (default on; `-noread_prefetch` to leave it to the
    /// kernel's own read-ahead).
    pub read_prefetch: bool,
    /// `-read_prefetch_kib=N`: how far ahead of a sequential reader the base is advised,
    /// 512-262144 KiB (default 4096).
    pub read_prefetch_kib: u32,
    /// `-direct_read_ahead_kib=N`: how many KiB of the base the daemon itself reads ahead
    /// of a sequential reader, with `O_DIRECT`, into its own memory (user-space merge,
    /// before any merge; 0 turns it off, else 1024-16384). `None`: the transport's default,
    /// see [`DaemonConfig::direct_read_ahead_kib`].
    pub direct_read_ahead_kib: Option<u32>,
    /// `-direct_reads`: user-space merge: runs of 16 KiB or more of the base and source
    /// devices that a READ needs are read with `O_DIRECT` into the answer, not through the
    /// page cache (default off).
    pub direct_reads: bool,
    /// `-ublk`: serve user-space-merge handlers as ublk devices instead of dm-user.
    pub ublk: bool,
    /// `-ublk_stale_server_ms=N`: how long a re-attach waits for the old server to let its
    /// ublk device go before stopping it with `SIGKILL` (0: never stop it).
    pub ublk_stale_server_ms: u32,
    /// `-cow_op_merge_size=N` (0: default).
    pub cow_op_merge_size: u32,
    /// `-worker_count=N`.
    pub worker_count: u32,
    /// `-num_merge_threads=N`: most merges at once (`None`: the property
    /// `ro.virtual_ab.num_merge_threads`, else 2).
    pub num_merge_threads: Option<u32>,
    /// `-fd_num=N` (`--fd_num=N` from init): the inherited socketpair end over which the
    /// `-no_socket` daemon asks init for its ublk nodes, then sends `DONE` (`None`: not
    /// given, or AOSP's default -1).
    pub fd_num: Option<i32>,
    /// Positional handlers (`-no_socket` mode).
    pub handlers: Vec<HandlerSpec>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: DEFAULT_SOCKET_NAME.to_string(),
            no_socket: false,
            socket_handoff: false,
            user_snapshot: false,
            io_uring: true,
            o_direct: false,
            merge_o_direct: true,
            merge_direct_reads: true,
            merge_direct_scratch: true,
            splice_reads: true,
            read_prefetch: true,
            read_prefetch_kib: DEFAULT_READ_PREFETCH_KIB,
            direct_read_ahead_kib: None,
            direct_reads: false,
            ublk: false,
            ublk_stale_server_ms: DEFAULT_UBLK_STALE_SERVER_MS,
            cow_op_merge_size: 0,
            worker_count: DEFAULT_WORKER_COUNT,
            num_merge_threads: None,
            fd_num: None,
            handlers: Vec::new(),
        }
    }
}

/// `snapuserd --help`: every flag the daemon accepts, in AOSP's gflags spellings, including
/// the host-only paths `main.rs` takes out before [`DaemonConfig::parse`].
pub const DAEMON_USAGE: &str = "\
Usage: snapuserd [FLAGS]
       snapuserd -no_socket [FLAGS] MISC,COW,SOURCE[,BASE]...
       snapuserd -socket_handoff [FLAGS]

The Virtual A/B snapshot daemon over dm-user. Each handler runs in one of two modes:
user-space merge (Android 13+: the device is the partition, the daemon merges; the
5-field init,MISC,COW,SOURCE,BASE or a MISC,COW,SOURCE,BASE argument) or legacy
dm-snapshot (the 4-field init,MISC,COW,SOURCE or a MISC,COW,SOURCE argument). Without
-no_socket or -socket_handoff it serves AOSP's control protocol on its control socket.

Flags are written as gflags does: -flag, --flag, -flag=VALUE or -flag VALUE; -noFLAG
turns a boolean flag off; '-' and '_' inside names are the same; -- ends the flags.

  -socket=NAME|PATH       the control socket. A value without '/' is the NAME of a
                          socket init created for the service (ANDROID_SOCKET_NAME);
                          default: snapuserd. A value with '/' is a PATH to bind
                          (hosts, tests), e.g. -socket=/tmp/snapuserd or -socket=./ctl
  -no_socket              start the MISC,COW,SOURCE[,BASE] handlers given as
                          arguments, then take the control socket over from the
                          handoff proxy (init's second stage)
  -socket_handoff         act as the handoff proxy (service snapuserd_proxy): pass
                          init's snapuserd socket to the -no_socket daemon and exit
  -worker_count=N         dm-user worker threads per handler, 1-64 (default: 4)
  -user_snapshot          user-space-merge handlers only: a legacy 4-field init (or
                          3-field argument) is refused with a message saying so
  -io_uring               merge through io_uring (default: on; -noio_uring or
                          -io_uring=false for the synchronous engine). Where a ring
                          cannot be built (old kernel, seccomp) the merge falls back
                          to the synchronous engine by itself
  -o_direct               O_DIRECT reads of the source device (user-space merge)
  -merge_o_direct         the merge writes the base device with O_DIRECT, one
                          synchronous write per run (default: on; -nomerge_o_direct
                          for buffered writes). A device that refuses O_DIRECT is
                          written buffered by itself
  -merge_direct_reads     the merge reads its sources with O_DIRECT (default: on;
                          -nomerge_direct_reads for buffered reads)
  -merge_direct_scratch   the merge saves its read-ahead windows in the COW's
                          scratch region with O_DIRECT (default: on;
                          -nomerge_direct_scratch for buffered saves)
  -splice_reads           large dm-user READs (user-space merge) go out in pieces:
                          unchanged and pending COPY runs spliced from the page cache,
                          the rest produced (default: on; -nosplice_reads to produce
                          every answer whole in the daemon's buffer)
  -read_prefetch          user-space merge: a reader going through the device in
                          order gets the base device read 4 MiB ahead of it
                          (default: on; -noread_prefetch to leave it to the kernel)
  -read_prefetch_kib=N    how far ahead of such a reader, 512-262144 KiB (default:
                          4096)
  -direct_read_ahead_kib=N
                          of that, how much the daemon reads itself with O_DIRECT
                          into its own memory instead of the page cache, before
                          any merge: 0 (off) or 1024-16384 KiB (default: 2048
                          with -ublk, else 0; a faster first pass, slower reads
                          of what a pass read before)
  -direct_reads           user-space merge: runs of 16 KiB or more of the base and
                          source devices that a READ needs are read with O_DIRECT
                          into the answer, bypassing the page cache (default: off)
  -ublk                   serve user-space-merge handlers as ublk devices
                          (/dev/ublkbN, one queue per worker) instead of dm-user; a
                          new daemon re-attaches to the device a dead one left
  -ublk_stale_server_ms=N with -ublk: an old daemon still holding a device N ms
                          after the re-attach began (stopped, stuck) gets SIGKILL,
                          if it holds that device's /dev/ublkcN (default: 2000;
                          0: never, the re-attach gives up after 30 s)
  -fd_num=N               with -no_socket: init's socketpair end (inherited fd N, a
                          Unix stream socket); each ublk node path the daemon needs
                          (/dev/ublkcN, /dev/block/ublkbN) is sent there for init
                          to create, then DONE once every handler has started
  -cow_op_merge_size=N    most ops per merge batch (user-space merge; 0: no cap)
  -num_merge_threads=N    most merges running at once, 1-64, FIFO in the order of
                          initiate_merge (default: the property
                          ro.virtual_ab.num_merge_threads where it is set, else 2)
  -h, -help, --help       print this text and exit

Host-only paths (development and tests), instead of Android's fixed ones:
  -proxy_socket=PATH            the handoff proxy's socket (/dev/socket/snapuserd_proxy)
  -property_socket=PATH         init's property service (/dev/socket/property_service)
  -daemon_alive_indicator=PATH  the indicator file (/metadata/ota/daemon-alive-indicator)
  -dm_user_dir=PATH             where the dm-user nodes appear (/dev/dm-user)
  -verify_device_dir=PATH       update verification reads PATH/MISC instead of the
                                partition's device-mapper device (/dev/block/dm-N)
";

/// Whether the command line asks for [`DAEMON_USAGE`]: `-h`, `-help` or `--help` (also
/// `--h`) before any `--`.
pub fn asks_for_help<I, A>(args: I) -> bool
where
    I: IntoIterator<Item = A>,
    A: AsRef<str>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_string())
        .take_while(|a| a != "--")
        .any(|a| matches!(a.as_str(), "-h" | "--h" | "-help" | "--help"))
}

const BOOL_FLAGS: [&str; 12] = [
    "no_socket",
    "socket_handoff",
    "user_snapshot",
    "io_uring",
    "o_direct",
    "merge_o_direct",
    "merge_direct_reads",
    "merge_direct_scratch",
    "splice_reads",
    "read_prefetch",
    "direct_reads",
    "ublk",
];
const VALUE_FLAGS: [&str; 8] = [
    "socket",
    "cow_op_merge_size",
    "worker_count",
    "num_merge_threads",
    "fd_num",
    "ublk_stale_server_ms",
    "read_prefetch_kib",
    "direct_read_ahead_kib",
];

/// Default of `-direct_read_ahead_kib` with `-ublk`: there a first pass over the device
/// gains much more than it costs (BENCHMARKS.md, "Session 10").
pub const DEFAULT_DIRECT_READ_AHEAD_KIB_UBLK: u32 = 2048;
/// Default of `-direct_read_ahead_kib` over dm-user: off (a first pass gains a few percent,
/// a second one loses a fifth; BENCHMARKS.md, "Session 10").
pub const DEFAULT_DIRECT_READ_AHEAD_KIB_DM_USER: u32 = 0;

/// Default of `-read_prefetch_kib`.
pub const DEFAULT_READ_PREFETCH_KIB: u32 = 4096;

/// Default of `-ublk_stale_server_ms`: [`crate::ublk::device::DEFAULT_STALE_SERVER_GRACE`].
pub const DEFAULT_UBLK_STALE_SERVER_MS: u32 =
    crate::ublk::device::DEFAULT_STALE_SERVER_GRACE.as_millis() as u32;

fn parse_bool(flag: &'static str, value: &str) -> Result<bool, ControlError> {
    match value {
        "true" | "t" | "yes" | "y" | "1" => Ok(true),
        "false" | "f" | "no" | "n" | "0" => Ok(false),
        _ => Err(ControlError::BadValue {
            flag,
            value: value.to_string(),
            reason: "not a boolean",
        }),
    }
}

fn parse_u32(flag: &'static str, value: &str) -> Result<u32, ControlError> {
    value.parse::<u32>().map_err(|_| ControlError::BadValue {
        flag,
        value: value.to_string(),
        reason: "not an unsigned 32-bit number",
    })
}

/// `-fd_num`'s value: a descriptor number, or -1 (AOSP's default: none).
fn parse_fd_num(value: &str) -> Result<Option<i32>, ControlError> {
    match value.parse::<i32>() {
        Ok(-1) => Ok(None),
        Ok(n) if n >= 0 => Ok(Some(n)),
        _ => Err(ControlError::BadValue {
            flag: "fd_num",
            value: value.to_string(),
            reason: "not a descriptor number (0 or more, or -1 for none)",
        }),
    }
}

impl DaemonConfig {
    /// KiB of the base read ahead into the daemon's memory: `-direct_read_ahead_kib` if
    /// given, else the transport's default ([`DEFAULT_DIRECT_READ_AHEAD_KIB_UBLK`] with
    /// `-ublk`, [`DEFAULT_DIRECT_READ_AHEAD_KIB_DM_USER`] otherwise).
    pub fn direct_read_ahead_kib(&self) -> u32 {
        self.direct_read_ahead_kib.unwrap_or(if self.ublk {
            DEFAULT_DIRECT_READ_AHEAD_KIB_UBLK
        } else {
            DEFAULT_DIRECT_READ_AHEAD_KIB_DM_USER
        })
    }

    /// Parse the arguments after the program name, accepting gflags spellings: `-flag`,
    /// `--flag`, `-flag=value`, `-flag value` (non-boolean flags), `-noflag` (boolean false),
    /// and `-` or `_` inside names; `--` ends the flags.
    pub fn parse<I, A>(args: I) -> Result<Self, ControlError>
    where
        I: IntoIterator<Item = A>,
        A: AsRef<str>,
    {
        let mut cfg = DaemonConfig::default();
        let mut positional: Vec<String> = Vec::new();
        let mut args = args.into_iter();
        let mut flags_done = false;
        while let Some(arg) = args.next() {
            let arg = arg.as_ref();
            if flags_done || !arg.starts_with('-') || arg == "-" {
                positional.push(arg.to_string());
                continue;
            }
            if arg == "--" {
                flags_done = true;
                continue;
            }
            let body = arg.strip_prefix("--").unwrap_or(&arg[1..]);
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.replace('-', "_"), Some(v)),
                None => (body.replace('-', "_"), None),
            };
            if let Some(&flag) = BOOL_FLAGS.iter().find(|&&f| f == name) {
                let on = match value {
                    Some(v) => parse_bool(flag, v)?,
                    None => true,
                };
                cfg.set_bool(flag, on);
                continue;
            }
            if let Some(&flag) = BOOL_FLAGS
                .iter()
                .find(|&&f| name.strip_prefix("no") == Some(f))
            {
                if value.is_some() {
                    return Err(ControlError::UnknownFlag {
                        flag: arg.to_string(),
                    });
                }
                cfg.set_bool(flag, false);
                continue;
            }
            if let Some(&flag) = VALUE_FLAGS.iter().find(|&&f| f == name) {
                let value = match value {
                    Some(v) => v.to_string(),
                    None => match args.next() {
                        Some(v) => v.as_ref().to_string(),
                        None => return Err(ControlError::MissingValue { flag }),
                    },
                };
                match flag {
                    "socket" => {
                        if value.is_empty() || value.contains('/') {
                            return Err(ControlError::BadValue {
                                flag,
                                value,
                                reason: "empty or contains '/'",
                            });
                        }
                        cfg.socket = value;
                    }
                    "cow_op_merge_size" => cfg.cow_op_merge_size = parse_u32(flag, &value)?,
                    "ublk_stale_server_ms" => cfg.ublk_stale_server_ms = parse_u32(flag, &value)?,
                    "fd_num" => cfg.fd_num = parse_fd_num(&value)?,
                    "read_prefetch_kib" => {
                        let n = parse_u32(flag, &value)?;
                        if !(512..=262_144).contains(&n) {
                            return Err(ControlError::BadValue {
                                flag,
                                value,
                                reason: "must be 512..=262144",
                            });
                        }
                        cfg.read_prefetch_kib = n;
                    }
                    "direct_read_ahead_kib" => {
                        let n = parse_u32(flag, &value)?;
                        if n != 0 && !(1024..=16_384).contains(&n) {
                            return Err(ControlError::BadValue {
                                flag,
                                value,
                                reason: "must be 0 or 1024..=16384",
                            });
                        }
                        cfg.direct_read_ahead_kib = Some(n);
                    }
                    "num_merge_threads" => {
                        let n = parse_u32(flag, &value)?;
                        if n == 0 || n > MAX_MERGE_THREADS {
                            return Err(ControlError::BadValue {
                                flag,
                                value,
                                reason: "must be 1..=64",
                            });
                        }
                        cfg.num_merge_threads = Some(n);
                    }
                    _ => {
                        let n = parse_u32(flag, &value)?;
                        if n == 0 || n > MAX_WORKER_COUNT {
                            return Err(ControlError::BadValue {
                                flag,
                                value,
                                reason: "must be 1..=64",
                            });
                        }
                        cfg.worker_count = n;
                    }
                }
                continue;
            }
            return Err(ControlError::UnknownFlag {
                flag: arg.to_string(),
            });
        }
        for (index, arg) in positional.iter().enumerate() {
            let bad = || ControlError::BadHandler {
                index,
                arg: arg.clone(),
            };
            let fields: Vec<&str> = arg.split(',').collect();
            if !(3..=4).contains(&fields.len()) || fields.iter().any(|f| f.is_empty()) {
                return Err(bad());
            }
            if cfg.user_snapshot && fields.len() == 3 {
                return Err(ControlError::ModeMismatch {
                    index,
                    arg: arg.clone(),
                });
            }
            cfg.handlers.push(HandlerSpec {
                misc_name: fields[0].to_string(),
                cow_device: fields[1].to_string(),
                source_device: fields[2].to_string(),
                base_device: fields.get(3).map(|s| s.to_string()),
            });
        }
        if !cfg.handlers.is_empty() && !cfg.no_socket {
            return Err(ControlError::Inconsistent(
                "positional handlers need -no_socket",
            ));
        }
        if cfg.fd_num.is_some() && !cfg.no_socket {
            return Err(ControlError::Inconsistent(
                "-fd_num is init's uevent socket for a -no_socket daemon; give -no_socket too",
            ));
        }
        if cfg.no_socket && cfg.handlers.is_empty() {
            return Err(ControlError::Inconsistent(
                "-no_socket needs at least one misc,cow,source[,base] handler",
            ));
        }
        Ok(cfg)
    }

    fn set_bool(&mut self, flag: &str, on: bool) {
        match flag {
            "no_socket" => self.no_socket = on,
            "socket_handoff" => self.socket_handoff = on,
            "user_snapshot" => self.user_snapshot = on,
            "io_uring" => self.io_uring = on,
            "ublk" => self.ublk = on,
            "merge_o_direct" => self.merge_o_direct = on,
            "merge_direct_reads" => self.merge_direct_reads = on,
            "merge_direct_scratch" => self.merge_direct_scratch = on,
            "splice_reads" => self.splice_reads = on,
            "read_prefetch" => self.read_prefetch = on,
            "direct_reads" => self.direct_reads = on,
            _ => self.o_direct = on,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Command<'_>, ControlError> {
        Command::parse(s.as_bytes())
    }

    #[test]
    fn usage_lists_every_flag_and_help_is_recognised() {
        for flag in BOOL_FLAGS.iter().chain(VALUE_FLAGS.iter()) {
            assert!(
                DAEMON_USAGE.contains(&format!("  -{flag}")),
                "{flag} missing"
            );
        }
        for host_only in [
            "proxy_socket",
            "property_socket",
            "daemon_alive_indicator",
            "dm_user_dir",
            "verify_device_dir",
        ] {
            assert!(
                DAEMON_USAGE.contains(&format!("  -{host_only}=PATH")),
                "{host_only}"
            );
        }
        assert!(DAEMON_USAGE.contains(&format!("default: {DEFAULT_SOCKET_NAME}")));
        assert!(DAEMON_USAGE.contains(&format!(
            "1-{MAX_WORKER_COUNT} (default: {DEFAULT_WORKER_COUNT})"
        )));
        for help in [
            &["-h"][..],
            &["--help"],
            &["-help"],
            &["-worker_count=2", "--h"],
        ] {
            assert!(asks_for_help(help), "{help:?}");
        }
        for not_help in [&[][..], &["-hx"], &["--", "-h"], &["-socket=-h"]] {
            assert!(!asks_for_help(not_help), "{not_help:?}");
        }
    }

    #[test]
    fn parses_the_ublk_commands_and_flag() {
        assert_eq!(
            parse("get_device_name,system_b").unwrap(),
            Command::GetDeviceName {
                misc_name: "system_b"
            }
        );
        assert_eq!(
            parse("create,system_b,2097152").unwrap(),
            Command::Create {
                misc_name: "system_b",
                sectors: "2097152"
            }
        );
        assert!(matches!(
            parse("create,system_b"),
            Err(ControlError::WrongArity {
                command: "create",
                got: 2,
                ..
            })
        ));
        assert!(matches!(
            parse("get_device_name"),
            Err(ControlError::WrongArity { .. })
        ));
        assert_eq!(
            Reply::SuccessDeviceName {
                dir: "/dev/block",
                dev_id: 0
            }
            .to_string(),
            "success,/dev/block/ublkb0"
        );
        assert_eq!(
            Reply::FailDeviceNotFound.to_string(),
            "fail,device_not_found"
        );
        let cfg = DaemonConfig::parse(["-user_snapshot", "-ublk"]).unwrap();
        assert!(cfg.ublk && cfg.user_snapshot);
        assert_eq!(cfg.ublk_stale_server_ms, 2000);
        let cfg = DaemonConfig::parse(["-ublk", "-ublk_stale_server_ms=0"]).unwrap();
        assert_eq!(cfg.ublk_stale_server_ms, 0);
        let cfg = DaemonConfig::parse(["-ublk", "-ublk-stale-server-ms", "500"]).unwrap();
        assert_eq!(cfg.ublk_stale_server_ms, 500);
        assert!(DaemonConfig::parse(["-ublk_stale_server_ms=-1"]).is_err());
        assert!(DaemonConfig::parse(["-ublk_stale_server_ms=soon"]).is_err());
        assert!(!DaemonConfig::parse(["-user_snapshot"]).unwrap().ublk);
    }

    #[test]
    fn read_prefetch_distance_is_bounded() {
        assert_eq!(
            DaemonConfig::parse(["-user_snapshot"])
                .unwrap()
                .read_prefetch_kib,
            4096
        );
        let cfg = DaemonConfig::parse(["-read_prefetch_kib=16384"]).unwrap();
        assert_eq!(cfg.read_prefetch_kib, 16384);
        let cfg = DaemonConfig::parse(["-user_snapshot"]).unwrap();
        assert_eq!(cfg.direct_read_ahead_kib(), 0, "off over dm-user");
        let cfg = DaemonConfig::parse(["-user_snapshot", "-ublk"]).unwrap();
        assert_eq!(cfg.direct_read_ahead_kib(), 2048, "on over ublk");
        for (args, kib) in [
            (&["-direct_read_ahead_kib=0", "-ublk"][..], 0),
            (&["-direct_read_ahead_kib=4096"][..], 4096),
        ] {
            assert_eq!(
                DaemonConfig::parse(args.iter().copied())
                    .unwrap()
                    .direct_read_ahead_kib(),
                kib
            );
        }
        for bad in [
            "-direct_read_ahead_kib=512",
            "-direct_read_ahead_kib=16385",
            "-direct_read_ahead_kib=x",
        ] {
            assert!(DaemonConfig::parse([bad]).is_err(), "{bad}");
        }
        for bad in [
            "-read_prefetch_kib=0",
            "-read_prefetch_kib=511",
            "-read_prefetch_kib=262145",
        ] {
            assert!(DaemonConfig::parse([bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_fd_num_as_init_passes_it() {
        // AOSP's init: `snapuserd -no_socket <handlers> -ublk ... --fd_num=<n>`.
        let cfg = DaemonConfig::parse([
            "-no_socket",
            "-user_snapshot",
            "-ublk",
            "sys,c,s,b",
            "--fd_num=7",
        ])
        .unwrap();
        assert_eq!(cfg.fd_num, Some(7));
        let cfg = DaemonConfig::parse(["-no_socket", "-fd_num", "12", "sys,c,s,b"]).unwrap();
        assert_eq!(cfg.fd_num, Some(12));
        // -1 is gflags' default: no socket.
        let cfg = DaemonConfig::parse(["-no_socket", "-fd_num=-1", "sys,c,s,b"]).unwrap();
        assert_eq!(cfg.fd_num, None);
        assert_eq!(
            DaemonConfig::parse(["-no_socket", "sys,c,s,b"])
                .unwrap()
                .fd_num,
            None
        );
        for bad in ["-2", "x", "", "3.5", "99999999999"] {
            let arg = format!("-fd_num={bad}");
            let err = DaemonConfig::parse(["-no_socket", arg.as_str(), "sys,c,s,b"]).unwrap_err();
            assert!(
                matches!(err, ControlError::BadValue { flag: "fd_num", .. }),
                "{bad:?}: {err:?}"
            );
        }
        let err = DaemonConfig::parse(["-fd_num=5"]).unwrap_err();
        assert!(
            matches!(err, ControlError::Inconsistent(m) if m.contains("-no_socket")),
            "{err:?}"
        );
        assert!(matches!(
            DaemonConfig::parse(["-no_socket", "-fd_num"]).unwrap_err(),
            ControlError::MissingValue { flag: "fd_num" }
        ));
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse("init,system_b,/dev/block/dm-1,/dev/block/dm-2,/dev/block/dm-3").unwrap(),
            Command::Init {
                misc_name: "system_b",
                cow_device: "/dev/block/dm-1",
                source_device: "/dev/block/dm-2",
                base_device: Some("/dev/block/dm-3"),
            }
        );
        assert_eq!(
            parse("init,system_b-user-cow-init,/dev/cow,/dev/src").unwrap(),
            Command::Init {
                misc_name: "system_b-user-cow-init",
                cow_device: "/dev/cow",
                source_device: "/dev/src",
                base_device: None,
            }
        );
        assert_eq!(
            parse("start,vendor_b").unwrap(),
            Command::Start {
                misc_name: "vendor_b"
            }
        );
        assert_eq!(parse("query").unwrap(), Command::Query);
        assert_eq!(parse("stop").unwrap(), Command::Stop);
        assert_eq!(
            parse("delete,x").unwrap(),
            Command::Delete { misc_name: "x" }
        );
        assert_eq!(parse("detach").unwrap(), Command::Detach);
        assert_eq!(
            parse("supports,second_stage_socket_handoff").unwrap(),
            Command::Supports {
                feature: FEATURE_SOCKET_HANDOFF
            }
        );
        assert_eq!(
            parse("initiate_merge,x").unwrap(),
            Command::InitiateMerge { misc_name: "x" }
        );
        assert_eq!(parse("merge_percent").unwrap(), Command::MergePercent);
        assert_eq!(
            parse("getstatus,x").unwrap(),
            Command::GetStatus { misc_name: "x" }
        );
        assert_eq!(parse("update-verify").unwrap(), Command::UpdateVerify);
        assert_eq!(parse("pause_merge").unwrap(), Command::PauseMerge);
        assert_eq!(parse("resume_merge").unwrap(), Command::ResumeMerge);
    }

    #[test]
    fn rejects_malformed_messages() {
        assert_eq!(parse(""), Err(ControlError::Empty));
        assert!(matches!(
            parse("bogus,1"),
            Err(ControlError::UnknownCommand { .. })
        ));
        assert!(matches!(
            parse("Query"),
            Err(ControlError::UnknownCommand { .. })
        ));
        assert!(matches!(
            parse("query,extra"),
            Err(ControlError::WrongArity {
                command: "query",
                got: 2,
                ..
            })
        ));
        assert!(matches!(
            parse("start"),
            Err(ControlError::WrongArity {
                command: "start",
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            parse("init,a,b"),
            Err(ControlError::WrongArity {
                command: "init",
                got: 3,
                ..
            })
        ));
        assert!(matches!(
            parse("init,a,b,c,d,e"),
            Err(ControlError::WrongArity {
                command: "init",
                got: 6,
                ..
            })
        ));
        assert!(matches!(
            parse("init,a,b,c,d,e,f,g,h"),
            Err(ControlError::WrongArity {
                command: "init",
                ..
            })
        ));
        assert!(matches!(
            parse("start,"),
            Err(ControlError::EmptyField {
                command: "start",
                index: 1
            })
        ));
        assert!(matches!(
            parse("init,a,,c,d"),
            Err(ControlError::EmptyField { index: 2, .. })
        ));
        assert!(matches!(
            Command::parse(b"query\0"),
            Err(ControlError::NotText { offset: 5 })
        ));
        assert!(matches!(
            Command::parse(b"query\n"),
            Err(ControlError::NotText { offset: 5 })
        ));
        assert!(matches!(
            Command::parse("start,sys\u{e9}".as_bytes()),
            Err(ControlError::NotText { offset: 9 })
        ));
        let long = format!("start,{}", "a".repeat(MAX_MESSAGE_SIZE));
        assert!(matches!(parse(&long), Err(ControlError::TooLong { .. })));
        let max = format!("start,{}", "a".repeat(MAX_MESSAGE_SIZE - 6));
        assert!(parse(&max).is_ok());
        // Error text for a long unknown word is bounded.
        let junk = "x".repeat(500);
        match parse(&junk) {
            Err(ControlError::UnknownCommand { command }) => assert_eq!(command.len(), 64),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn merge_flags_and_handler_modes() {
        let cfg = DaemonConfig::parse(Vec::<String>::new()).unwrap();
        assert!(cfg.io_uring, "io_uring is on by default");
        assert!(
            cfg.merge_o_direct,
            "O_DIRECT merge writes are on by default"
        );
        assert!(
            cfg.merge_direct_reads,
            "O_DIRECT merge source reads are on by default"
        );
        assert!(cfg.splice_reads, "answers in pieces are on by default");
        assert!(
            cfg.merge_direct_scratch,
            "O_DIRECT window saves are on by default"
        );
        let cfg2 = DaemonConfig::parse([
            "-nomerge_o_direct",
            "-nomerge_direct_reads",
            "-nosplice_reads",
            "-nomerge_direct_scratch",
        ])
        .unwrap();
        assert!(!cfg2.merge_o_direct && !cfg2.merge_direct_reads && !cfg2.splice_reads);
        assert!(!cfg2.merge_direct_scratch);
        assert_eq!(cfg.num_merge_threads, None);
        let cfg = DaemonConfig::parse(["-noio_uring", "-num_merge_threads=1"]).unwrap();
        assert!(!cfg.io_uring);
        assert_eq!(cfg.num_merge_threads, Some(1));
        for bad in [
            "-num_merge_threads=0",
            "-num_merge_threads=65",
            "-num_merge_threads=x",
        ] {
            assert!(
                matches!(
                    DaemonConfig::parse([bad]),
                    Err(ControlError::BadValue {
                        flag: "num_merge_threads",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        // 4 fields: user-space merge; 3 fields: legacy, refused by -user_snapshot.
        let cfg = DaemonConfig::parse(["-no_socket", "-user_snapshot", "sys,c,s,b"]).unwrap();
        assert_eq!(cfg.handlers[0].base_device.as_deref(), Some("b"));
        let err = DaemonConfig::parse(["-no_socket", "-user_snapshot", "a,c,s,b", "sys,c,s"])
            .unwrap_err();
        assert_eq!(
            err,
            ControlError::ModeMismatch {
                index: 1,
                arg: "sys,c,s".into()
            }
        );
        assert!(err.to_string().contains("misc,cow,source,base"), "{err}");
        let cfg = DaemonConfig::parse(["-no_socket", "sys,c,s"]).unwrap();
        assert_eq!(cfg.handlers[0].base_device, None);
    }

    #[test]
    fn replies_match_aosp_text() {
        assert_eq!(Reply::Success.to_string(), "success");
        assert_eq!(
            Reply::SuccessSectors(2_097_152).to_string(),
            "success,2097152"
        );
        assert_eq!(Reply::Fail.to_string(), "fail");
        assert_eq!(Reply::Active.to_string(), "active");
        assert_eq!(Reply::Passive.to_string(), "passive");
        assert_eq!(Reply::MergePercent(42.5).to_string(), "42.500000");
        assert_eq!(Reply::MergePercent(0.0).to_string(), "0.000000");
        assert_eq!(Reply::MergePercent(100.0).to_string(), "100.000000");
        assert_eq!(Reply::MergePercent(1.0 / 3.0).to_string(), "0.333333");
        assert_eq!(Reply::MergePercent(f64::NAN).to_string(), "0.000000");
        assert_eq!(Reply::MergePercent(-0.0).to_string(), "0.000000");
        assert_eq!(Reply::Status(MergeStatus::Snapshot).to_string(), "snapshot");
        assert_eq!(
            Reply::Status(MergeStatus::SnapshotMerge).to_string(),
            "snapshot-merge"
        );
        assert_eq!(
            Reply::Status(MergeStatus::SnapshotMergeComplete).to_string(),
            "snapshot-merge-complete"
        );
        assert_eq!(
            Reply::Status(MergeStatus::SnapshotMergeFailed).to_string(),
            "snapshot-merge-failed"
        );
        assert_eq!(supports_reply(FEATURE_SOCKET_HANDOFF), Reply::Success);
        assert_eq!(supports_reply("other"), Reply::Fail);
    }

    #[test]
    fn command_line_spellings() {
        let cfg = DaemonConfig::parse(Vec::<String>::new()).unwrap();
        assert_eq!(cfg, DaemonConfig::default());
        let cfg = DaemonConfig::parse([
            "-socket=snapuserd_x",
            "-user_snapshot",
            "--io_uring",
            "-o_direct=true",
        ])
        .unwrap();
        assert_eq!(cfg.socket, "snapuserd_x");
        assert!(cfg.user_snapshot && cfg.io_uring && cfg.o_direct && !cfg.no_socket);
        let cfg = DaemonConfig::parse(["--socket", "s2", "-socket-handoff"]).unwrap();
        assert_eq!(cfg.socket, "s2");
        assert!(cfg.socket_handoff);
        let cfg = DaemonConfig::parse(["-socket_handoff", "-nosocket_handoff"]).unwrap();
        assert!(!cfg.socket_handoff);
        let cfg = DaemonConfig::parse([
            "-no_socket",
            "-cow_op_merge_size=16",
            "-worker_count=2",
            "system_b,/dev/cow,/dev/src,/dev/base",
            "vendor_b,/dev/cow2,/dev/src2",
        ])
        .unwrap();
        assert!(cfg.no_socket);
        assert_eq!((cfg.cow_op_merge_size, cfg.worker_count), (16, 2));
        assert_eq!(
            cfg.handlers,
            vec![
                HandlerSpec {
                    misc_name: "system_b".into(),
                    cow_device: "/dev/cow".into(),
                    source_device: "/dev/src".into(),
                    base_device: Some("/dev/base".into()),
                },
                HandlerSpec {
                    misc_name: "vendor_b".into(),
                    cow_device: "/dev/cow2".into(),
                    source_device: "/dev/src2".into(),
                    base_device: None,
                },
            ]
        );
        let cfg = DaemonConfig::parse(["-no_socket", "--", "-odd-misc,/c,/s"]).unwrap();
        assert_eq!(cfg.handlers[0].misc_name, "-odd-misc");
    }

    #[test]
    fn command_line_errors() {
        let err = |args: &[&str]| DaemonConfig::parse(args.iter().copied()).unwrap_err();
        assert!(matches!(err(&["-bogus"]), ControlError::UnknownFlag { .. }));
        assert!(matches!(
            err(&["-worker_count"]),
            ControlError::MissingValue {
                flag: "worker_count"
            }
        ));
        assert!(matches!(
            err(&["-worker_count=0"]),
            ControlError::BadValue {
                flag: "worker_count",
                ..
            }
        ));
        assert!(matches!(
            err(&["-worker_count=65"]),
            ControlError::BadValue { .. }
        ));
        assert!(matches!(
            err(&["-worker_count=-1"]),
            ControlError::BadValue { .. }
        ));
        assert!(matches!(
            err(&["-cow_op_merge_size=x"]),
            ControlError::BadValue { .. }
        ));
        assert!(matches!(
            err(&["-io_uring=maybe"]),
            ControlError::BadValue {
                flag: "io_uring",
                ..
            }
        ));
        assert!(matches!(
            err(&["-socket="]),
            ControlError::BadValue { flag: "socket", .. }
        ));
        assert!(matches!(
            err(&["-noio_uring=1"]),
            ControlError::UnknownFlag { .. }
        ));
        assert!(matches!(
            err(&["-no_socket"]),
            ControlError::Inconsistent(_)
        ));
        assert!(matches!(err(&["a,b,c"]), ControlError::Inconsistent(_)));
        assert!(matches!(
            err(&["-no_socket", "a,b"]),
            ControlError::BadHandler { index: 0, .. }
        ));
        assert!(matches!(
            err(&["-no_socket", "a,,c"]),
            ControlError::BadHandler { .. }
        ));
        assert!(matches!(
            err(&["-no_socket", "a,b,c,d,e"]),
            ControlError::BadHandler { .. }
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Command::parse(&bytes);
        }

        #[test]
        fn one_field_commands_roundtrip(name in "[a-z_]{1,20}", misc in "[A-Za-z0-9_.-]{1,100}") {
            let msg = format!("{name},{misc}");
            match Command::parse(msg.as_bytes()) {
                Ok(Command::Start { misc_name })
                | Ok(Command::Delete { misc_name })
                | Ok(Command::InitiateMerge { misc_name })
                | Ok(Command::GetStatus { misc_name }) => prop_assert_eq!(misc_name, misc.as_str()),
                Ok(Command::Supports { feature }) => prop_assert_eq!(feature, misc.as_str()),
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(_) => {}
            }
        }
    }
}
