//! Device-mapper control through the `DM_*` ioctls on `/dev/mapper/control`.
//!
//! Enough of libdevmapper to create a device, load a table, suspend/resume
//! (which swaps in the inactive table), read status and table lines, wait for
//! events and remove the device, so nothing on the target needs `dmsetup`.
//! The wire structs are our own definitions of the layouts in the kernel's
//! `include/uapi/linux/dm-ioctl.h` (interface version 4), size-asserted below.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// Path of the device-mapper control node.
pub const CONTROL_PATH: &str = "/dev/mapper/control";
/// Maximum device name length including the terminating NUL.
pub const DM_NAME_LEN: usize = 128;
/// Maximum UUID length including the terminating NUL.
pub const DM_UUID_LEN: usize = 129;
/// Maximum target type name length including the terminating NUL.
pub const DM_MAX_TYPE_NAME: usize = 16;

const DM_IOCTL_TYPE: u8 = 0xfd;
const DM_VERSION_MAJOR: u32 = 4;
const DM_VERSION_MINOR: u32 = 0;
const DM_VERSION_PATCH: u32 = 0;

/// `DM_READONLY_FLAG`.
pub const DM_READONLY_FLAG: u32 = 1 << 0;
/// `DM_SUSPEND_FLAG`: set to suspend, clear to resume; reported when suspended.
pub const DM_SUSPEND_FLAG: u32 = 1 << 1;
/// `DM_STATUS_TABLE_FLAG`: DM_TABLE_STATUS returns table lines instead of status.
pub const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
/// `DM_ACTIVE_PRESENT_FLAG`: the device has a live table.
pub const DM_ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
/// `DM_INACTIVE_PRESENT_FLAG`: the device has an inactive (loaded, not resumed) table.
pub const DM_INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
/// `DM_BUFFER_FULL_FLAG`: the result did not fit; retry with a bigger buffer.
pub const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
/// `DM_NOFLUSH_FLAG`: suspend without flushing queued I/O.
pub const DM_NOFLUSH_FLAG: u32 = 1 << 11;

/// `struct dm_ioctl`: the header of every DM ioctl buffer (312 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DmIoctl {
    /// Interface version in/out.
    pub version: [u32; 3],
    /// Total size of the buffer including this header.
    pub data_size: u32,
    /// Offset of the payload from the start of this header.
    pub data_start: u32,
    /// Number of targets (in/out).
    pub target_count: u32,
    /// Open count of the device (out).
    pub open_count: i32,
    /// `DM_*_FLAG` bits (in/out).
    pub flags: u32,
    /// Event number (in/out) or udev cookie (in).
    pub event_nr: u32,
    /// Unused.
    pub padding: u32,
    /// Device number (in/out), in the kernel's `huge_encode_dev` form.
    pub dev: u64,
    /// Device name, NUL-terminated.
    pub name: [u8; DM_NAME_LEN],
    /// Device UUID, NUL-terminated.
    pub uuid: [u8; DM_UUID_LEN],
    /// Padding up to an 8-byte boundary.
    pub data: [u8; 7],
}

/// `struct dm_target_spec`: one table entry header (40 bytes), parameters follow.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DmTargetSpec {
    /// First sector covered by this target.
    pub sector_start: u64,
    /// Number of sectors covered.
    pub length: u64,
    /// Status (out only).
    pub status: i32,
    /// Offset to the next spec (meaning differs between load and status, see dm-ioctl.h).
    pub next: u32,
    /// Target type name, NUL-terminated.
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

const _: () = assert!(std::mem::size_of::<DmIoctl>() == 312);
const _: () = assert!(std::mem::size_of::<DmTargetSpec>() == 40);
const _: () = assert!(std::mem::offset_of!(DmIoctl, dev) == 40);
const _: () = assert!(std::mem::offset_of!(DmIoctl, name) == 48);
const _: () = assert!(std::mem::offset_of!(DmIoctl, uuid) == 176);

const HEADER_LEN: usize = std::mem::size_of::<DmIoctl>();
const SPEC_LEN: usize = std::mem::size_of::<DmTargetSpec>();
/// Initial result buffer size for ioctls that return data.
const INITIAL_BUFFER: usize = 16 * 1024;
/// We never grow a result buffer beyond this.
const MAX_BUFFER: usize = 16 * 1024 * 1024;

/// Device-mapper ioctl command numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DmCommand {
    /// `DM_VERSION`.
    Version = 0,
    /// `DM_DEV_CREATE`.
    DevCreate = 3,
    /// `DM_DEV_REMOVE`.
    DevRemove = 4,
    /// `DM_DEV_SUSPEND` (suspend and resume).
    DevSuspend = 6,
    /// `DM_DEV_STATUS`.
    DevStatus = 7,
    /// `DM_DEV_WAIT`.
    DevWait = 8,
    /// `DM_TABLE_LOAD`.
    TableLoad = 9,
    /// `DM_TABLE_CLEAR`.
    TableClear = 10,
    /// `DM_TABLE_STATUS`.
    TableStatus = 12,
}

/// Errors of the device-mapper control library.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// Opening the control node failed.
    #[error("opening {path}")]
    OpenControl {
        /// Path of the control node.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{cmd:?} on device {name:?}: {errno}")]
    Ioctl {
        /// Which command.
        cmd: DmCommand,
        /// Device name (empty for global commands).
        name: String,
        /// Kernel error.
        errno: Errno,
    },
    /// A name, UUID, target type or parameter string is too long or has a NUL byte.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
        /// Why it is rejected.
        why: &'static str,
    },
    /// The kernel's reply is inconsistent (offsets out of bounds, etc.).
    #[error("malformed {cmd:?} reply for {name:?} at byte {offset}: {why}")]
    MalformedReply {
        /// Which command.
        cmd: DmCommand,
        /// Device name.
        name: String,
        /// Offset in the reply buffer.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The reply did not fit even in the largest buffer we allow.
    #[error("{cmd:?} reply for {name:?} exceeds {max} bytes")]
    ReplyTooLarge {
        /// Which command.
        cmd: DmCommand,
        /// Device name.
        name: String,
        /// Our limit.
        max: usize,
    },
    /// Creating a device node failed.
    #[error("creating node {path}")]
    MakeNode {
        /// Node path.
        path: PathBuf,
        /// Underlying error.
        source: nix::Error,
    },
}

/// One line of a device-mapper table: `<start> <length> <type> <params>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type, e.g. `user`, `linear`, `snapshot`.
    pub target_type: String,
    /// Target parameters (for status replies: the status or table text).
    pub params: String,
}

impl TableEntry {
    /// A new entry.
    pub fn new(start: u64, length: u64, target_type: &str, params: &str) -> Self {
        Self {
            start,
            length,
            target_type: target_type.to_string(),
            params: params.to_string(),
        }
    }

    /// A dm-user entry: `<start> <len> user <start> <len> <control name>`.
    pub fn dm_user(start: u64, length: u64, control_name: &str) -> Self {
        Self::new(
            start,
            length,
            "user",
            &format!("{start} {length} {control_name}"),
        )
    }

    /// A `linear` entry mapping onto `device` (`major:minor` or a path) at `offset` sectors.
    pub fn linear(start: u64, length: u64, device: &str, offset: u64) -> Self {
        Self::new(start, length, "linear", &format!("{device} {offset}"))
    }

    /// A persistent `snapshot` entry: `<origin> <cow> P <chunk sectors>`.
    pub fn snapshot(start: u64, length: u64, origin: &str, cow: &str, chunk_sectors: u32) -> Self {
        Self::new(
            start,
            length,
            "snapshot",
            &format!("{origin} {cow} P {chunk_sectors}"),
        )
    }

    /// A `snapshot-merge` entry: `<origin> <cow> P <chunk sectors>`.
    pub fn snapshot_merge(
        start: u64,
        length: u64,
        origin: &str,
        cow: &str,
        chunk_sectors: u32,
    ) -> Self {
        Self::new(
            start,
            length,
            "snapshot-merge",
            &format!("{origin} {cow} P {chunk_sectors}"),
        )
    }

    /// The `dmsetup table`-style line.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.start, self.length, self.target_type, self.params
        )
    }
}

/// Information about a device from DM_DEV_STATUS and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name.
    pub name: String,
    /// Major number of the block device.
    pub major: u32,
    /// Minor number of the block device.
    pub minor: u32,
    /// Open count.
    pub open_count: i32,
    /// Flags (DM_SUSPEND_FLAG, DM_ACTIVE_PRESENT_FLAG, ...).
    pub flags: u32,
    /// Event counter.
    pub event_nr: u32,
    /// Number of targets in the table.
    pub target_count: u32,
}

impl DeviceInfo {
    /// True if the device is suspended.
    pub fn suspended(&self) -> bool {
        self.flags & DM_SUSPEND_FLAG != 0
    }

    /// True if the device has an inactive table waiting for resume.
    pub fn has_inactive_table(&self) -> bool {
        self.flags & DM_INACTIVE_PRESENT_FLAG != 0
    }

    /// The devtmpfs node `/dev/dm-<minor>`.
    pub fn dev_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/dm-{}", self.minor))
    }
}

/// Status of a `snapshot` or `snapshot-merge` target, as dm-snapshot reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// `<allocated>/<total> <metadata>`, all in sectors.
    Active {
        /// Sectors allocated in the COW device (data and metadata).
        allocated: u64,
        /// Size of the COW device in sectors.
        total: u64,
        /// Sectors used by metadata; a merge is done when `allocated == metadata`.
        metadata: u64,
    },
    /// The snapshot was invalidated.
    Invalid,
    /// A merge stopped on an error.
    MergeFailed,
    /// The COW device filled up.
    Overflow,
}

impl SnapshotStatus {
    /// Parse a status line; `None` if it is not one of dm-snapshot's forms.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "Invalid" => return Some(Self::Invalid),
            "Merge failed" => return Some(Self::MergeFailed),
            "Overflow" => return Some(Self::Overflow),
            _ => {}
        }
        let mut words = text.split_whitespace();
        let (fraction, meta) = (words.next()?, words.next()?);
        if words.next().is_some() {
            return None;
        }
        let (allocated, total) = fraction.split_once('/')?;
        Some(Self::Active {
            allocated: allocated.parse().ok()?,
            total: total.parse().ok()?,
            metadata: meta.parse().ok()?,
        })
    }

    /// True when a snapshot-merge has nothing left to merge.
    pub fn merge_complete(&self) -> bool {
        matches!(self, Self::Active { allocated, metadata, .. } if allocated == metadata)
    }
}

/// Decode the kernel's `huge_encode_dev` 64-bit device number.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff_ff00)) as u32;
    (major, minor)
}

fn put_cstr(dst: &mut [u8], s: &str, what: &'static str) -> Result<(), DmError> {
    let invalid = |why| DmError::InvalidArgument {
        what,
        value: s.to_string(),
        why,
    };
    if s.as_bytes().contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    if s.len() >= dst.len() {
        return Err(invalid("too long"));
    }
    dst.fill(0);
    dst.get_mut(..s.len())
        .ok_or_else(|| invalid("too long"))?
        .copy_from_slice(s.as_bytes());
    Ok(())
}

fn get_cstr(src: &[u8]) -> String {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(src.get(..end).unwrap_or_default()).into_owned()
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

impl DmIoctl {
    /// A header for device `name` with the compiled interface version.
    pub fn new(name: &str) -> Result<Self, DmError> {
        let mut io = Self {
            version: [DM_VERSION_MAJOR, DM_VERSION_MINOR, DM_VERSION_PATCH],
            data_size: HEADER_LEN as u32,
            data_start: HEADER_LEN as u32,
            target_count: 0,
            open_count: 0,
            flags: 0,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        put_cstr(&mut io.name, name, "device name")?;
        Ok(io)
    }

    /// Serialise into the first 312 bytes of `buf`.
    fn write_to(&self, buf: &mut [u8]) {
        use std::mem::offset_of;
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        for (i, v) in self.version.iter().enumerate() {
            put(offset_of!(DmIoctl, version) + 4 * i, &v.to_ne_bytes());
        }
        put(
            offset_of!(DmIoctl, data_size),
            &self.data_size.to_ne_bytes(),
        );
        put(
            offset_of!(DmIoctl, data_start),
            &self.data_start.to_ne_bytes(),
        );
        put(
            offset_of!(DmIoctl, target_count),
            &self.target_count.to_ne_bytes(),
        );
        put(
            offset_of!(DmIoctl, open_count),
            &self.open_count.to_ne_bytes(),
        );
        put(offset_of!(DmIoctl, flags), &self.flags.to_ne_bytes());
        put(offset_of!(DmIoctl, event_nr), &self.event_nr.to_ne_bytes());
        put(offset_of!(DmIoctl, dev), &self.dev.to_ne_bytes());
        put(offset_of!(DmIoctl, name), &self.name);
        put(offset_of!(DmIoctl, uuid), &self.uuid);
    }

    /// Parse from the first 312 bytes of `buf` (`None` if shorter).
    fn read_from(buf: &[u8]) -> Option<Self> {
        use std::mem::offset_of;
        if buf.len() < HEADER_LEN {
            return None;
        }
        let mut io = Self::new("").ok()?;
        for i in 0..3 {
            io.version[i] = read_u32(buf, offset_of!(DmIoctl, version) + 4 * i)?;
        }
        io.data_size = read_u32(buf, offset_of!(DmIoctl, data_size))?;
        io.data_start = read_u32(buf, offset_of!(DmIoctl, data_start))?;
        io.target_count = read_u32(buf, offset_of!(DmIoctl, target_count))?;
        io.open_count = read_u32(buf, offset_of!(DmIoctl, open_count))? as i32;
        io.flags = read_u32(buf, offset_of!(DmIoctl, flags))?;
        io.event_nr = read_u32(buf, offset_of!(DmIoctl, event_nr))?;
        io.dev = read_u64(buf, offset_of!(DmIoctl, dev))?;
        io.name
            .copy_from_slice(buf.get(offset_of!(DmIoctl, name)..offset_of!(DmIoctl, uuid))?);
        io.uuid
            .copy_from_slice(buf.get(offset_of!(DmIoctl, uuid)..offset_of!(DmIoctl, data))?);
        Some(io)
    }

    fn info(&self) -> DeviceInfo {
        let (major, minor) = decode_dev(self.dev);
        DeviceInfo {
            name: get_cstr(&self.name),
            major,
            minor,
            open_count: self.open_count,
            flags: self.flags,
            event_nr: self.event_nr,
            target_count: self.target_count,
        }
    }
}

/// Encode a DM_TABLE_LOAD payload (specs + NUL-terminated, 8-aligned params).
pub fn encode_table(entries: &[TableEntry]) -> Result<Vec<u8>, DmError> {
    let mut out = Vec::new();
    for e in entries {
        if e.params.as_bytes().contains(&0) {
            return Err(DmError::InvalidArgument {
                what: "target parameters",
                value: e.params.clone(),
                why: "contains a NUL byte",
            });
        }
        let mut ttype = [0u8; DM_MAX_TYPE_NAME];
        put_cstr(&mut ttype, &e.target_type, "target type")?;
        let params_len = e.params.len() + 1;
        let padded = (SPEC_LEN + params_len).div_ceil(8) * 8;
        let next = u32::try_from(padded).map_err(|_| DmError::InvalidArgument {
            what: "target parameters",
            value: e.params.clone(),
            why: "too long",
        })?;
        out.extend_from_slice(&e.start.to_ne_bytes());
        out.extend_from_slice(&e.length.to_ne_bytes());
        out.extend_from_slice(&0i32.to_ne_bytes());
        out.extend_from_slice(&next.to_ne_bytes());
        out.extend_from_slice(&ttype);
        out.extend_from_slice(e.params.as_bytes());
        out.resize(out.len() + (padded - SPEC_LEN - e.params.len()), 0);
    }
    Ok(out)
}

/// Decode a DM_TABLE_STATUS payload: `count` specs where `next` is relative to
/// the first spec. `data` starts at the first spec and ends at the end of valid data.
pub fn decode_table(data: &[u8], count: u32) -> Result<Vec<TableEntry>, (usize, &'static str)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let spec_end = at.checked_add(SPEC_LEN).ok_or((at, "offset overflow"))?;
        let spec = data
            .get(at..spec_end)
            .ok_or((at, "target spec past end of reply"))?;
        let start = read_u64(spec, 0).ok_or((at, "short spec"))?;
        let length = read_u64(spec, 8).ok_or((at, "short spec"))?;
        let next = read_u32(spec, 20).ok_or((at, "short spec"))? as usize;
        let target_type = get_cstr(spec.get(24..40).ok_or((at, "short spec"))?);
        let rest = data.get(spec_end..).unwrap_or_default();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or((spec_end, "unterminated parameter string"))?;
        let params = String::from_utf8_lossy(rest.get(..nul).unwrap_or_default()).into_owned();
        out.push(TableEntry {
            start,
            length,
            target_type,
            params,
        });
        if next <= at && out.len() < count as usize {
            return Err((at, "next offset does not advance"));
        }
        at = next;
    }
    Ok(out)
}

/// Handle on `/dev/mapper/control`.
#[derive(Debug)]
pub struct DmControl {
    file: File,
}

impl DmControl {
    /// Open the default control node.
    pub fn open() -> Result<Self, DmError> {
        Self::open_path(Path::new(CONTROL_PATH))
    }

    /// Open a control node at `path`.
    pub fn open_path(path: &Path) -> Result<Self, DmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DmError::OpenControl {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self { file })
    }

    /// Run `cmd` with `header` and `payload`; grow the buffer while the kernel
    /// reports DM_BUFFER_FULL_FLAG. Returns the reply header and whole buffer.
    fn run(
        &self,
        cmd: DmCommand,
        mut header: DmIoctl,
        payload: &[u8],
    ) -> Result<(DmIoctl, Vec<u8>), DmError> {
        let name = get_cstr(&header.name);
        log::debug!(
            "device-mapper {cmd:?} on {name:?} ({} payload bytes)",
            payload.len()
        );
        let mut size = HEADER_LEN
            .checked_add(payload.len())
            .ok_or_else(|| DmError::ReplyTooLarge {
                cmd,
                name: name.clone(),
                max: MAX_BUFFER,
            })?
            .max(INITIAL_BUFFER);
        loop {
            let data_size = u32::try_from(size).map_err(|_| DmError::ReplyTooLarge {
                cmd,
                name: name.clone(),
                max: MAX_BUFFER,
            })?;
            header.data_size = data_size;
            header.data_start = HEADER_LEN as u32;
            let mut buf = vec![0u8; size];
            header.write_to(&mut buf);
            if let Some(dst) = buf.get_mut(HEADER_LEN..HEADER_LEN + payload.len()) {
                dst.copy_from_slice(payload);
            }
            let request = nix::request_code_readwrite!(
                DM_IOCTL_TYPE,
                cmd as u8,
                std::mem::size_of::<DmIoctl>()
            );
            // SAFETY: `buf` is a live, exclusively borrowed allocation of
            // `size` bytes and the header inside it declares `data_size ==
            // size`; the kernel copies at most `data_size` bytes in and out of
            // it and does not keep the pointer after the call returns. The fd
            // is owned by `self.file` and open for the whole call.
            let rc =
                unsafe { nix::libc::ioctl(self.file.as_raw_fd(), request as _, buf.as_mut_ptr()) };
            if rc < 0 {
                return Err(DmError::Ioctl {
                    cmd,
                    name,
                    errno: Errno::last(),
                });
            }
            let reply = DmIoctl::read_from(&buf).ok_or(DmError::MalformedReply {
                cmd,
                name: name.clone(),
                offset: 0,
                why: "reply shorter than the header",
            })?;
            if reply.flags & DM_BUFFER_FULL_FLAG != 0 {
                if size >= MAX_BUFFER {
                    return Err(DmError::ReplyTooLarge {
                        cmd,
                        name,
                        max: MAX_BUFFER,
                    });
                }
                size = size.saturating_mul(4).min(MAX_BUFFER);
                continue;
            }
            return Ok((reply, buf));
        }
    }

    /// The kernel's DM interface version.
    pub fn version(&self) -> Result<[u32; 3], DmError> {
        let (reply, _) = self.run(DmCommand::Version, DmIoctl::new("")?, &[])?;
        Ok(reply.version)
    }

    /// Create device `name` (no table yet). Returns its info (device number).
    pub fn create(&self, name: &str, uuid: Option<&str>) -> Result<DeviceInfo, DmError> {
        let mut header = DmIoctl::new(name)?;
        if let Some(uuid) = uuid {
            put_cstr(&mut header.uuid, uuid, "uuid")?;
        }
        let (reply, _) = self.run(DmCommand::DevCreate, header, &[])?;
        Ok(reply.info())
    }

    /// Load `entries` as the inactive table of `name`.
    pub fn load_table(&self, name: &str, entries: &[TableEntry]) -> Result<DeviceInfo, DmError> {
        let mut header = DmIoctl::new(name)?;
        header.target_count =
            u32::try_from(entries.len()).map_err(|_| DmError::InvalidArgument {
                what: "table",
                value: name.to_string(),
                why: "too many targets",
            })?;
        let payload = encode_table(entries)?;
        let (reply, _) = self.run(DmCommand::TableLoad, header, &payload)?;
        Ok(reply.info())
    }

    /// Clear the inactive table of `name`.
    pub fn clear_table(&self, name: &str) -> Result<DeviceInfo, DmError> {
        let (reply, _) = self.run(DmCommand::TableClear, DmIoctl::new(name)?, &[])?;
        Ok(reply.info())
    }

    /// Suspend `name` (flushing queued I/O unless `noflush`).
    pub fn suspend(&self, name: &str, noflush: bool) -> Result<DeviceInfo, DmError> {
        let mut header = DmIoctl::new(name)?;
        header.flags = DM_SUSPEND_FLAG | if noflush { DM_NOFLUSH_FLAG } else { 0 };
        let (reply, _) = self.run(DmCommand::DevSuspend, header, &[])?;
        Ok(reply.info())
    }

    /// Resume `name`, making a loaded inactive table live.
    pub fn resume(&self, name: &str) -> Result<DeviceInfo, DmError> {
        let (reply, _) = self.run(DmCommand::DevSuspend, DmIoctl::new(name)?, &[])?;
        Ok(reply.info())
    }

    /// Create `name`, load `entries` and resume: the usual one-shot setup.
    pub fn create_device(&self, name: &str, entries: &[TableEntry]) -> Result<DeviceInfo, DmError> {
        self.create(name, None)?;
        let result = self
            .load_table(name, entries)
            .and_then(|_| self.resume(name));
        if result.is_err() {
            let _ = self.remove(name);
        }
        result
    }

    /// Device status (DM_DEV_STATUS).
    pub fn info(&self, name: &str) -> Result<DeviceInfo, DmError> {
        let (reply, _) = self.run(DmCommand::DevStatus, DmIoctl::new(name)?, &[])?;
        Ok(reply.info())
    }

    fn table_query(&self, name: &str, flags: u32) -> Result<Vec<TableEntry>, DmError> {
        let mut header = DmIoctl::new(name)?;
        header.flags = flags;
        let (reply, buf) = self.run(DmCommand::TableStatus, header, &[])?;
        let start = reply.data_start as usize;
        let end = (reply.data_size as usize).min(buf.len());
        let data = buf.get(start..end).ok_or(DmError::MalformedReply {
            cmd: DmCommand::TableStatus,
            name: name.to_string(),
            offset: start,
            why: "data_start beyond data_size",
        })?;
        decode_table(data, reply.target_count).map_err(|(offset, why)| DmError::MalformedReply {
            cmd: DmCommand::TableStatus,
            name: name.to_string(),
            offset: start.saturating_add(offset),
            why,
        })
    }

    /// Per-target status lines (`dmsetup status`).
    pub fn status(&self, name: &str) -> Result<Vec<TableEntry>, DmError> {
        self.table_query(name, 0)
    }

    /// Live table lines (`dmsetup table`).
    pub fn table(&self, name: &str) -> Result<Vec<TableEntry>, DmError> {
        self.table_query(name, DM_STATUS_TABLE_FLAG)
    }

    /// Block until the event counter of `name` passes `event_nr` (DM_DEV_WAIT).
    pub fn wait_event(&self, name: &str, event_nr: u32) -> Result<DeviceInfo, DmError> {
        let mut header = DmIoctl::new(name)?;
        header.event_nr = event_nr;
        let (reply, _) = self.run(DmCommand::DevWait, header, &[])?;
        Ok(reply.info())
    }

    /// Remove device `name`.
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        self.run(DmCommand::DevRemove, DmIoctl::new(name)?, &[])?;
        Ok(())
    }

    /// Return a usable block node for `info`: `/dev/dm-N` if devtmpfs made it,
    /// else a node created at `/dev/mapper/<name>`.
    pub fn ensure_node(&self, info: &DeviceInfo) -> Result<PathBuf, DmError> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        let devtmpfs = info.dev_path();
        let want = makedev(u64::from(info.major), u64::from(info.minor));
        if let Ok(st) = nix::sys::stat::stat(&devtmpfs) {
            if st.st_rdev == want {
                return Ok(devtmpfs);
            }
        }
        let path = PathBuf::from(format!("/dev/mapper/{}", info.name));
        match mknod(&path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), want) {
            Ok(()) | Err(Errno::EEXIST) => Ok(path),
            Err(source) => Err(DmError::MakeNode { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_dm_ioctl_h() {
        assert_eq!(std::mem::size_of::<DmIoctl>(), 312);
        assert_eq!(std::mem::size_of::<DmTargetSpec>(), 40);
        assert_eq!(std::mem::offset_of!(DmTargetSpec, next), 20);
        assert_eq!(std::mem::offset_of!(DmTargetSpec, target_type), 24);
        assert_eq!(std::mem::offset_of!(DmIoctl, flags), 28);
    }

    #[test]
    fn request_codes_match_the_c_macros() {
        // _IOWR(0xfd, 0, struct dm_ioctl) == 0xc138fd00
        let code = nix::request_code_readwrite!(DM_IOCTL_TYPE, 0u8, 312usize);
        assert_eq!(u64::from(code as u32), 0xc138_fd00);
        let code =
            nix::request_code_readwrite!(DM_IOCTL_TYPE, DmCommand::TableLoad as u8, 312usize);
        assert_eq!(u64::from(code as u32), 0xc138_fd09);
    }

    #[test]
    fn header_round_trip() {
        let mut h = DmIoctl::new("snap").unwrap();
        h.flags = DM_SUSPEND_FLAG;
        h.dev = (253 << 8) | 3;
        h.target_count = 2;
        let mut buf = vec![0u8; 400];
        h.write_to(&mut buf);
        let back = DmIoctl::read_from(&buf).unwrap();
        assert_eq!(back.flags, DM_SUSPEND_FLAG);
        let info = back.info();
        assert_eq!(info.name, "snap");
        assert_eq!((info.major, info.minor), (253, 3));
        assert_eq!(info.target_count, 2);
        assert!(info.suspended());
    }

    #[test]
    fn names_are_validated() {
        assert!(DmIoctl::new(&"x".repeat(128)).is_err());
        assert!(DmIoctl::new(&"x".repeat(127)).is_ok());
        assert!(DmIoctl::new("a\0b").is_err());
    }

    #[test]
    fn dev_decoding_handles_large_minors() {
        // huge_encode_dev: minor low 8 bits | major << 8 | (minor & ~0xff) << 12
        let major = 253u64;
        let minor = 0x1234u64;
        let dev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        assert_eq!(decode_dev(dev), (253, 0x1234));
    }

    #[test]
    fn table_line_and_encoding() {
        let e = TableEntry::dm_user(0, 2048, "ctl0");
        assert_eq!(e.to_line(), "0 2048 user 0 2048 ctl0");
        let bytes = encode_table(&[e.clone(), TableEntry::new(2048, 8, "zero", "")]).unwrap();
        // first spec: 40 + "0 2048 ctl0\0" (12) = 52 -> padded 56
        assert_eq!(read_u32(&bytes, 20), Some(56));
        assert_eq!(&bytes[24..28], b"user");
        assert_eq!(&bytes[40..51], b"0 2048 ctl0");
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(bytes.len(), 56 + 48);
        assert!(encode_table(&[TableEntry::new(0, 1, "a-very-long-target-type", "")]).is_err());
    }

    #[test]
    fn snapshot_table_lines() {
        assert_eq!(
            TableEntry::snapshot(0, 2048, "253:1", "253:2", 8).to_line(),
            "0 2048 snapshot 253:1 253:2 P 8"
        );
        assert_eq!(
            TableEntry::snapshot_merge(0, 2048, "/dev/vda", "/dev/dm-3", 8).to_line(),
            "0 2048 snapshot-merge /dev/vda /dev/dm-3 P 8"
        );
        assert_eq!(
            TableEntry::linear(8, 16, "7:0", 32).to_line(),
            "8 16 linear 7:0 32"
        );
    }

    #[test]
    fn snapshot_status_parsing() {
        let s = SnapshotStatus::parse("16/2048 16").unwrap();
        assert_eq!(
            s,
            SnapshotStatus::Active {
                allocated: 16,
                total: 2048,
                metadata: 16
            }
        );
        assert!(s.merge_complete());
        assert!(!SnapshotStatus::parse("24/2048 16")
            .unwrap()
            .merge_complete());
        assert_eq!(
            SnapshotStatus::parse("Invalid"),
            Some(SnapshotStatus::Invalid)
        );
        assert_eq!(
            SnapshotStatus::parse("Merge failed"),
            Some(SnapshotStatus::MergeFailed)
        );
        assert_eq!(
            SnapshotStatus::parse("Overflow"),
            Some(SnapshotStatus::Overflow)
        );
        for bad in [
            "",
            "16/2048",
            "16 2048 16",
            "x/2048 16",
            "16/2048 16 9",
            "99999999999999999999/1 1",
        ] {
            assert_eq!(SnapshotStatus::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_decoding_uses_offsets_from_first_spec() {
        // Build a reply the way the kernel lays it out: `next` relative to the first spec.
        let mut data = Vec::new();
        let push = |data: &mut Vec<u8>, start: u64, len: u64, ty: &str, params: &str, next: u32| {
            data.extend_from_slice(&start.to_ne_bytes());
            data.extend_from_slice(&len.to_ne_bytes());
            data.extend_from_slice(&0i32.to_ne_bytes());
            data.extend_from_slice(&next.to_ne_bytes());
            let mut t = [0u8; 16];
            t[..ty.len()].copy_from_slice(ty.as_bytes());
            data.extend_from_slice(&t);
            data.extend_from_slice(params.as_bytes());
            data.push(0);
            while data.len() % 8 != 0 {
                data.push(0);
            }
        };
        push(&mut data, 0, 100, "snapshot", "16/2048 16", 56);
        assert_eq!(data.len(), 56);
        push(&mut data, 100, 50, "linear", "253:1 0", 0);
        let t = decode_table(&data, 2).unwrap();
        assert_eq!(t[0].params, "16/2048 16");
        assert_eq!(t[1].target_type, "linear");
        assert_eq!(t[1].start, 100);
        // Truncated and non-advancing replies are typed errors, not panics.
        assert!(decode_table(&data[..30], 1).is_err());
        let mut bad = data.clone();
        bad[20..24].copy_from_slice(&0u32.to_ne_bytes());
        assert!(decode_table(&bad, 2).is_err());
        let mut unterminated = data[..48].to_vec();
        unterminated.extend_from_slice(b"abc");
        assert!(decode_table(&unterminated, 1).is_err());
    }
}
