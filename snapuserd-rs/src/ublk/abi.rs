//! The ublk kernel ABI (`include/uapi/linux/ublk_cmd.h`): command numbers, feature bits and
//! the shared structures, written out by hand so that no build step needs bindgen.
//!
//! Every structure is `#[repr(C)]` with the exact field order of the C header; a unit test
//! pins each size, and the command numbers are computed with the kernel's `_IOR`/`_IOWR`
//! encoding.

/// Path of the ublk control node.
pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// Prefix of a ublk device's character node (`/dev/ublkc<N>`).
pub const CHAR_PREFIX: &str = "/dev/ublkc";
/// Prefix of a ublk device's block node (`/dev/ublkb<N>`).
pub const BLOCK_PREFIX: &str = "/dev/ublkb";

/// `ioctl` type byte of every ublk command.
const IOC_TYPE: u32 = b'u' as u32;
/// `_IOC_READ`.
const IOC_READ: u32 = 2;
/// `_IOC_READ | _IOC_WRITE`.
const IOC_READ_WRITE: u32 = 3;

/// The kernel's `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (IOC_TYPE << 8) | nr
}

/// Size of [`CtrlCmd`], the payload of every control command.
const CTRL_SIZE: usize = std::mem::size_of::<CtrlCmd>();
/// Size of [`IoCmd`], the payload of every I/O command.
const IO_SIZE: usize = std::mem::size_of::<IoCmd>();

/// `UBLK_U_CMD_GET_QUEUE_AFFINITY`: the CPUs whose requests a queue receives.
pub const CMD_GET_QUEUE_AFFINITY: u32 = ioc(IOC_READ, 0x01, CTRL_SIZE);
/// `UBLK_U_CMD_GET_DEV_INFO`.
pub const CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL_SIZE);
/// `UBLK_U_CMD_ADD_DEV`.
pub const CMD_ADD_DEV: u32 = ioc(IOC_READ_WRITE, 0x04, CTRL_SIZE);
/// `UBLK_U_CMD_DEL_DEV`.
pub const CMD_DEL_DEV: u32 = ioc(IOC_READ_WRITE, 0x05, CTRL_SIZE);
/// `UBLK_U_CMD_START_DEV`.
pub const CMD_START_DEV: u32 = ioc(IOC_READ_WRITE, 0x06, CTRL_SIZE);
/// `UBLK_U_CMD_STOP_DEV`.
pub const CMD_STOP_DEV: u32 = ioc(IOC_READ_WRITE, 0x07, CTRL_SIZE);
/// `UBLK_U_CMD_SET_PARAMS`.
pub const CMD_SET_PARAMS: u32 = ioc(IOC_READ_WRITE, 0x08, CTRL_SIZE);
/// `UBLK_U_CMD_GET_PARAMS`.
pub const CMD_GET_PARAMS: u32 = ioc(IOC_READ, 0x09, CTRL_SIZE);
/// `UBLK_U_CMD_START_USER_RECOVERY`.
pub const CMD_START_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, 0x10, CTRL_SIZE);
/// `UBLK_U_CMD_END_USER_RECOVERY`.
pub const CMD_END_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, 0x11, CTRL_SIZE);
/// `UBLK_U_CMD_GET_FEATURES`.
pub const CMD_GET_FEATURES: u32 = ioc(IOC_READ, 0x13, CTRL_SIZE);

/// `UBLK_U_IO_FETCH_REQ`.
pub const IO_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, 0x20, IO_SIZE);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`.
pub const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, 0x21, IO_SIZE);

/// FETCH/COMMIT completion: a request is waiting in the descriptor of this tag.
pub const IO_RES_OK: i32 = 0;
/// FETCH/COMMIT completion: the queue is going away; the tag is not fetched again.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Offset of the first queue's descriptor array in the character device's mmap space.
pub const CMD_BUF_OFFSET: u64 = 0;
/// Base of the USER_COPY data window in the character device's `pread`/`pwrite` space.
pub const IO_BUF_OFFSET: u64 = 0x8000_0000;
/// Most requests one queue may have in flight (tag field width).
pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// Bits of a USER_COPY offset that address bytes within one request.
pub const IO_BUF_BITS: u32 = 25;
/// Bit position of the tag in a USER_COPY offset.
pub const TAG_OFF: u32 = IO_BUF_BITS;
/// Bit position of the queue id in a USER_COPY offset.
pub const QID_OFF: u32 = TAG_OFF + 16;

/// Feature: zero copy (not offered by the kernels we run on).
pub const F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// Feature: complete io commands in task context.
pub const F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// Feature: WRITE data fetched by a separate NEED_GET_DATA command.
pub const F_NEED_GET_DATA: u64 = 1 << 2;
/// Feature: the device survives its server and waits for a new one.
pub const F_USER_RECOVERY: u64 = 1 << 3;
/// Feature: requests the dead server held are issued again to the new one.
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// Feature: unprivileged devices.
pub const F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// Feature: ioctl-encoded command numbers (`UBLK_U_*`).
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Feature: request data moved by `pread`/`pwrite` on the character node.
pub const F_USER_COPY: u64 = 1 << 7;

/// Device state: no server, or stopped.
pub const S_DEV_DEAD: u16 = 0;
/// Device state: served.
pub const S_DEV_LIVE: u16 = 1;
/// Device state: the server died; I/O waits for a recovering one.
pub const S_DEV_QUIESCED: u16 = 2;

/// I/O op: read.
pub const IO_OP_READ: u8 = 0;
/// I/O op: write.
pub const IO_OP_WRITE: u8 = 1;
/// I/O op: flush.
pub const IO_OP_FLUSH: u8 = 2;
/// I/O op: discard.
pub const IO_OP_DISCARD: u8 = 3;
/// I/O op: write same.
pub const IO_OP_WRITE_SAME: u8 = 4;
/// I/O op: write zeroes.
pub const IO_OP_WRITE_ZEROES: u8 = 5;

/// Parameter type: [`ParamBasic`].
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
/// Basic attribute: read-only device.
pub const ATTR_READ_ONLY: u32 = 1 << 0;

/// `struct ublksrv_ctrl_cmd`: the 32-byte payload of a control command (in the SQE's
/// command area).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    /// Target device id (`u32::MAX`: let ADD_DEV choose).
    pub dev_id: u32,
    /// Target queue, `u16::MAX` when the command is not per queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// Address of the command's in/out buffer.
    pub addr: u64,
    /// Inline argument (the server pid for START_DEV and END_USER_RECOVERY).
    pub data: u64,
    /// Length of the device path (unprivileged mode only).
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

impl CtrlCmd {
    /// The 32 bytes as they go into the SQE.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data.to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        b
    }
}

/// `struct ublksrv_ctrl_dev_info`: a device's shape and state.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevInfo {
    /// Number of hardware queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request in bytes (the kernel rounds it down to a page).
    pub max_io_buf_bytes: u32,
    /// Device id (`N` of `/dev/ublkbN`).
    pub dev_id: u32,
    /// Pid of the serving process.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `F_*` feature flags of this device.
    pub flags: u64,
    /// Server-private word, stored and returned by the kernel untouched.
    pub ublksrv_flags: u64,
    /// Owner uid (set by the kernel).
    pub owner_uid: u32,
    /// Owner gid (set by the kernel).
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, written by the kernel into the shared descriptor
/// array at its tag.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Op in bits 0-7, flags in bits 8-31.
    pub op_flags: u32,
    /// Length in 512-byte sectors.
    pub nr_sectors: u32,
    /// First sector.
    pub start_sector: u64,
    /// Buffer address (buffer path only; unused here).
    pub addr: u64,
}

impl IoDesc {
    /// Size in bytes.
    pub const SIZE: usize = 24;

    /// The op (`IO_OP_*`).
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// Decode a descriptor from its 24 native-endian bytes.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            u64::from_ne_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        Self {
            op_flags: u32_at(0),
            nr_sectors: u32_at(4),
            start_sector: u64_at(8),
            addr: u64_at(16),
        }
    }
}

/// `struct ublksrv_io_cmd`: the 16-byte payload of FETCH and COMMIT_AND_FETCH.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCmd {
    /// Queue id.
    pub q_id: u16,
    /// Tag.
    pub tag: u16,
    /// Result of the committed request: bytes done, or a negative errno.
    pub result: i32,
    /// Data buffer for the request (0 with USER_COPY).
    pub addr: u64,
}

impl IoCmd {
    /// The 16 bytes as they go into the SQE.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBasic {
    /// `ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size.
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors.
    pub max_sectors: u32,
    /// Chunk size in sectors (0: none).
    pub chunk_sectors: u32,
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    /// Discard alignment.
    pub discard_alignment: u32,
    /// Discard granularity.
    pub discard_granularity: u32,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Discard segments.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (read-only; filled by the kernel).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDevt {
    /// Character node major.
    pub char_major: u32,
    /// Character node minor.
    pub char_minor: u32,
    /// Block node major.
    pub disk_major: u32,
    /// Block node minor.
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamZoned {
    /// Open zones.
    pub max_open_zones: u32,
    /// Active zones.
    pub max_active_zones: u32,
    /// Largest zone append in sectors.
    pub max_zone_append_sectors: u32,
    /// Reserved.
    pub reserved: [u8; 20],
}

/// `struct ublk_params`: what SET_PARAMS sends.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    /// Size of this structure.
    pub len: u32,
    /// `PARAM_TYPE_*` present.
    pub types: u32,
    /// Basic parameters.
    pub basic: ParamBasic,
    /// Discard parameters.
    pub discard: ParamDiscard,
    /// Device numbers.
    pub devt: ParamDevt,
    /// Zoned parameters.
    pub zoned: ParamZoned,
}

/// Offset of queue `q_id`'s descriptor array in the character node's mmap space: each
/// queue's slot is sized for the largest depth, rounded up to a page.
pub fn desc_mmap_offset(q_id: u16, page_size: u64) -> u64 {
    let per_queue =
        (u64::from(MAX_QUEUE_DEPTH) * IoDesc::SIZE as u64).div_ceil(page_size) * page_size;
    CMD_BUF_OFFSET + u64::from(q_id) * per_queue
}

/// Length of the descriptor array of a queue of `depth` tags, rounded up to a page.
pub fn desc_mmap_len(depth: u16, page_size: u64) -> u64 {
    (u64::from(depth) * IoDesc::SIZE as u64).div_ceil(page_size) * page_size
}

/// Position of byte `offset` of request `tag` of queue `q_id` in the USER_COPY window.
pub fn user_copy_pos(q_id: u16, tag: u16, offset: u64) -> u64 {
    IO_BUF_OFFSET + (u64::from(q_id) << QID_OFF) + (u64::from(tag) << TAG_OFF) + offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_sizes_match_the_c_header() {
        assert_eq!(std::mem::size_of::<CtrlCmd>(), 32);
        assert_eq!(std::mem::size_of::<DevInfo>(), 64);
        assert_eq!(std::mem::size_of::<IoDesc>(), IoDesc::SIZE);
        assert_eq!(std::mem::size_of::<IoCmd>(), 16);
        assert_eq!(std::mem::size_of::<ParamBasic>(), 32);
        assert_eq!(std::mem::size_of::<ParamDiscard>(), 20);
        assert_eq!(std::mem::size_of::<ParamDevt>(), 16);
        assert_eq!(std::mem::size_of::<ParamZoned>(), 32);
        assert_eq!(std::mem::size_of::<Params>(), 112);
    }

    #[test]
    fn command_numbers_use_the_ioctl_encoding() {
        // Values of UBLK_U_CMD_ADD_DEV, UBLK_U_CMD_GET_DEV_INFO and UBLK_U_IO_FETCH_REQ as
        // the C preprocessor computes them on x86_64.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn byte_images_follow_the_field_order() {
        let c = CtrlCmd {
            dev_id: 7,
            queue_id: u16::MAX,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: 42,
            ..CtrlCmd::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[16..24], &42u64.to_ne_bytes());
        let mut raw = [0u8; IoDesc::SIZE];
        raw[0..4].copy_from_slice(&0x0000_0100u32.to_ne_bytes());
        raw[4..8].copy_from_slice(&8u32.to_ne_bytes());
        raw[8..16].copy_from_slice(&99u64.to_ne_bytes());
        let d = IoDesc::from_bytes(&raw);
        assert_eq!((d.op(), d.nr_sectors, d.start_sector), (IO_OP_READ, 8, 99));
    }

    #[test]
    fn mmap_and_user_copy_positions() {
        assert_eq!(desc_mmap_offset(0, 4096), 0);
        assert_eq!(desc_mmap_offset(1, 4096), 98_304);
        assert_eq!(desc_mmap_len(32, 4096), 4096);
        assert_eq!(desc_mmap_len(200, 4096), 8192);
        assert_eq!(
            user_copy_pos(1, 2, 512),
            0x8000_0000 + (1 << 41) + (2 << 25) + 512
        );
    }
}
