//! Deciding one ublk request from its descriptor, without trusting it.
//!
//! The kernel writes each request's descriptor into memory the daemon only reads; this
//! module checks it against the documented ranges before anything is done with it: the tag
//! against the queue depth, the op against the ones served, the length against the device's
//! I/O limit, and the sector range against the device size. A descriptor outside them gets
//! an error completion (`-EINVAL`); nothing is read for it. The result of a request is what
//! the COMMIT command carries: the bytes done, or a negative errno.

use crate::daemon::transport::RequestHandler;
use crate::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ};
use crate::user_merge::direct_io::AlignedBuf;

use super::abi::{
    IoDesc, IO_OP_DISCARD, IO_OP_FLUSH, IO_OP_READ, IO_OP_WRITE, IO_OP_WRITE_SAME,
    IO_OP_WRITE_ZEROES,
};

/// Bytes in a sector.
pub const SECTOR: u64 = 512;

/// The ranges a queue's descriptors must stay in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// Largest request in bytes (the device's `max_io_buf_bytes`).
    pub max_io_bytes: u32,
    /// Tags of the queue.
    pub depth: u16,
}

/// What to do with one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `sector` through the handler.
    Read {
        /// First sector.
        sector: u64,
        /// Length in bytes, at least one sector and at most the I/O limit.
        len: u32,
    },
    /// Complete with this result at once (0 for a flush, a negative errno otherwise).
    Complete(i32),
}

/// The tag of a completion's `user_data`, if it is one of the queue's tags.
pub fn tag_of(user_data: u64, limits: &QueueLimits) -> Option<u16> {
    u16::try_from(user_data)
        .ok()
        .filter(|&tag| tag < limits.depth)
}

/// Decide `desc` against `limits`: a READ inside the device and the I/O limit is served; a
/// flush succeeds; writes fail with `EIO` (the snapshot device is read-only); discard and
/// write-zeroes are not supported (`EOPNOTSUPP`), nor is any other op; a READ outside the
/// ranges fails with `EINVAL`.
pub fn decide(desc: &IoDesc, limits: &QueueLimits) -> Action {
    match desc.op() {
        IO_OP_READ => {
            let sectors = u64::from(desc.nr_sectors);
            let Some(len) = sectors
                .checked_mul(SECTOR)
                .filter(|&l| l > 0 && l <= u64::from(limits.max_io_bytes))
                .and_then(|l| u32::try_from(l).ok())
            else {
                return Action::Complete(-libc::EINVAL);
            };
            let inside = desc
                .start_sector
                .checked_add(sectors)
                .is_some_and(|end| end <= limits.dev_sectors);
            if !inside {
                return Action::Complete(-libc::EINVAL);
            }
            Action::Read {
                sector: desc.start_sector,
                len,
            }
        }
        IO_OP_FLUSH => Action::Complete(0),
        IO_OP_WRITE | IO_OP_WRITE_SAME => Action::Complete(-libc::EIO),
        IO_OP_DISCARD | IO_OP_WRITE_ZEROES => Action::Complete(-libc::EOPNOTSUPP),
        _ => Action::Complete(-libc::EOPNOTSUPP),
    }
}

/// The READ request `desc` is (what [`serve`] asks the handler for), or the completion
/// result of a descriptor that is not a valid READ.
pub fn read_request(desc: &IoDesc, limits: &QueueLimits) -> Result<Request, i32> {
    match decide(desc, limits) {
        Action::Read { sector, len } => Ok(Request {
            kind: DM_USER_REQ_MAP_READ,
            flags: 0,
            sector,
            len: u64::from(len),
        }),
        Action::Complete(result) => Err(result),
    }
}

/// Serve `desc`: decide it, and for a READ have `handler` fill `out` (page-aligned, set to
/// the request's length) through [`RequestHandler::read_into`]. Returns the completion
/// result; on a positive result `out` holds exactly that many bytes, otherwise none.
pub fn serve(
    handler: &dyn RequestHandler,
    desc: &IoDesc,
    limits: &QueueLimits,
    out: &mut AlignedBuf,
) -> i32 {
    out.set_len(0);
    let req = match read_request(desc, limits) {
        Ok(req) => req,
        Err(result) => return result,
    };
    // `decide` bounded the length by the queue's I/O size.
    let Ok(len) = usize::try_from(req.len) else {
        return -libc::EINVAL;
    };
    out.set_len(len);
    let result = match handler.read_into(&req, out) {
        ResponseCode::Success => i32::try_from(len).unwrap_or(-libc::EIO),
        ResponseCode::Error => -libc::EIO,
        ResponseCode::Unsupported => -libc::EOPNOTSUPP,
    };
    if result < 0 {
        out.set_len(0);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueueLimits = QueueLimits {
        dev_sectors: 2048,
        max_io_bytes: 64 << 10,
        depth: 32,
    };

    fn desc(op: u8, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | (1 << 8),
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    /// Answers READs with the low byte of each sector number.
    struct Pattern;

    impl RequestHandler for Pattern {
        fn handle(&self, req: &Request, _: &[u8], out: &mut Vec<u8>) -> ResponseCode {
            for s in 0..req.len / SECTOR {
                out.extend(std::iter::repeat_n((req.sector + s) as u8, 512));
            }
            ResponseCode::Success
        }
    }

    /// Answers every READ with one byte too few.
    struct Short;

    impl RequestHandler for Short {
        fn handle(&self, req: &Request, _: &[u8], out: &mut Vec<u8>) -> ResponseCode {
            out.resize(req.len as usize - 1, 0);
            ResponseCode::Success
        }
    }

    #[test]
    fn reads_inside_the_device_are_served() {
        let mut out = AlignedBuf::default();
        assert_eq!(
            serve(&Pattern, &desc(IO_OP_READ, 2040, 8), &LIMITS, &mut out),
            4096
        );
        assert_eq!(out.len(), 4096);
        assert_eq!((out[0], out[4095]), (2040u64 as u8, 2047u64 as u8));
        assert_eq!(
            serve(&Pattern, &desc(IO_OP_READ, 0, 128), &LIMITS, &mut out),
            65536
        );
    }

    #[test]
    fn out_of_range_descriptors_fail_with_einval() {
        let mut out = AlignedBuf::from_slice(&[1, 2, 3]);
        for d in [
            desc(IO_OP_READ, 2041, 8),
            desc(IO_OP_READ, 0, 0),
            desc(IO_OP_READ, 0, 129),
            desc(IO_OP_READ, u64::MAX, 1),
            desc(IO_OP_READ, 0, u32::MAX),
        ] {
            assert_eq!(
                serve(&Pattern, &d, &LIMITS, &mut out),
                -libc::EINVAL,
                "{d:?}"
            );
            assert!(out.is_empty(), "no data for {d:?}");
        }
    }

    #[test]
    fn ops_other_than_read_complete_without_the_handler() {
        let mut out = AlignedBuf::default();
        assert_eq!(
            serve(&Short, &desc(IO_OP_FLUSH, 0, 0), &LIMITS, &mut out),
            0
        );
        assert_eq!(
            serve(&Short, &desc(IO_OP_WRITE, 0, 8), &LIMITS, &mut out),
            -libc::EIO
        );
        assert_eq!(
            serve(&Short, &desc(IO_OP_DISCARD, 0, 8), &LIMITS, &mut out),
            -libc::EOPNOTSUPP
        );
        assert_eq!(
            serve(&Short, &desc(IO_OP_WRITE_ZEROES, 0, 8), &LIMITS, &mut out),
            -libc::EOPNOTSUPP
        );
        assert_eq!(
            serve(&Short, &desc(18, 0, 8), &LIMITS, &mut out),
            -libc::EOPNOTSUPP
        );
    }

    /// Fills its answer in place and checks the memory it was given.
    struct InPlace;

    impl RequestHandler for InPlace {
        fn handle(&self, _: &Request, _: &[u8], _: &mut Vec<u8>) -> ResponseCode {
            ResponseCode::Unsupported
        }

        fn read_into(&self, req: &Request, out: &mut [u8]) -> ResponseCode {
            assert_eq!(
                out.as_ptr() as usize % 4096,
                0,
                "page-aligned answer memory"
            );
            assert_eq!(out.len() as u64, req.len);
            out.fill(0x3C);
            ResponseCode::Success
        }
    }

    #[test]
    fn a_handler_fills_page_aligned_memory_in_place() {
        let mut out = AlignedBuf::default();
        assert_eq!(
            serve(&InPlace, &desc(IO_OP_READ, 8, 16), &LIMITS, &mut out),
            8192
        );
        assert_eq!(out.len(), 8192);
        assert!(out.iter().all(|&b| b == 0x3C));
    }

    #[test]
    fn a_short_answer_from_the_handler_fails_the_request() {
        let mut out = AlignedBuf::default();
        assert_eq!(
            serve(&Short, &desc(IO_OP_READ, 0, 8), &LIMITS, &mut out),
            -libc::EIO
        );
        assert!(out.is_empty());
    }

    #[test]
    fn tags_outside_the_queue_are_refused() {
        assert_eq!(tag_of(31, &LIMITS), Some(31));
        assert_eq!(tag_of(32, &LIMITS), None);
        assert_eq!(tag_of(1 << 40, &LIMITS), None);
    }
}
