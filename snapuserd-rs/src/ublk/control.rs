//! `/dev/ublk-control`: the device-level commands (add, parameters, start, stop, delete,
//! recovery), each one io_uring `URING_CMD` on a ring with 128-byte entries.
//!
//! A command is submitted and waited for on the calling thread. START_DEV and
//! END_USER_RECOVERY block in the kernel until every queue has fetched all of its tags, so
//! they are issued only once the queue threads have submitted their fetches.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use thiserror::Error;

use super::abi::{
    CtrlCmd, DevInfo, Params, CMD_ADD_DEV, CMD_DEL_DEV, CMD_END_USER_RECOVERY, CMD_GET_DEV_INFO,
    CMD_GET_FEATURES, CMD_GET_PARAMS, CMD_GET_QUEUE_AFFINITY, CMD_SET_PARAMS, CMD_START_DEV,
    CMD_START_USER_RECOVERY, CMD_STOP_DEV, CONTROL_PATH,
};

/// Errors of the control node.
#[derive(Debug, Error)]
pub enum ControlError {
    /// `/dev/ublk-control` could not be opened (no `ublk_drv`, or no permission).
    #[error("opening {CONTROL_PATH} (is ublk_drv loaded?)")]
    Open {
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The control ring could not be set up.
    #[error("setting up the ublk control io_uring")]
    Ring {
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Submitting or waiting for a command failed.
    #[error("submitting ublk command {command} for device {dev_id}")]
    Submit {
        /// Command name.
        command: &'static str,
        /// Device id.
        dev_id: u32,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered a command with an error.
    #[error("ublk command {command} for device {dev_id} failed")]
    Command {
        /// Command name.
        command: &'static str,
        /// Device id.
        dev_id: u32,
        /// The kernel's errno.
        #[source]
        source: std::io::Error,
    },
}

impl ControlError {
    /// The errno the kernel answered a command with, if this is such an error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Command { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// CPUs a queue affinity answer can name (a 1024-bit mask, the kernel's usual `NR_CPUS`
/// bound for the machines this runs on; CPUs beyond it are not reported).
pub const AFFINITY_CPUS: usize = 1024;

/// The CPU numbers set in a kernel CPU mask of 64-bit words (bit `i` of word `w` is CPU
/// `64 * w + i`).
fn cpus_of_mask(mask: &[u64]) -> Vec<usize> {
    mask.iter()
        .enumerate()
        .flat_map(|(w, bits)| {
            (0..64usize)
                .filter(move |i| bits & (1u64 << i) != 0)
                .map(move |i| w * 64 + i)
        })
        .collect()
}

/// An open `/dev/ublk-control` with its command ring.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("fd", &self.file.as_raw_fd())
            .finish_non_exhaustive()
    }
}

/// Whether this machine offers ublk (the control node exists).
pub fn available() -> bool {
    std::path::Path::new(CONTROL_PATH).exists()
}

impl Control {
    /// Open the control node.
    pub fn open() -> Result<Self, ControlError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|source| ControlError::Open { source })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|source| ControlError::Ring { source })?;
        Ok(Self { file, ring })
    }

    /// Submit one command and wait for its result (>= 0).
    fn command(
        &mut self,
        command: &'static str,
        op: u32,
        cmd: CtrlCmd,
    ) -> Result<i32, ControlError> {
        let dev_id = cmd.dev_id;
        let submit = |source| ControlError::Submit {
            command,
            dev_id,
            source,
        };
        let mut payload = [0u8; 80];
        payload[..32].copy_from_slice(&cmd.to_bytes());
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(payload)
            .build()
            .user_data(u64::from(op));
        // SAFETY: the buffer `cmd.addr` points to (if any) is owned by the caller and stays
        // alive and unmoved until this function returns, after the completion is reaped.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| submit(std::io::Error::other("control submission queue full")))?;
        let cqe = loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(submit(e)),
            }
            if let Some(cqe) = self.ring.completion().next() {
                break cqe;
            }
        };
        let res = cqe.result();
        if res < 0 {
            return Err(ControlError::Command {
                command,
                dev_id,
                source: std::io::Error::from_raw_os_error(-res),
            });
        }
        Ok(res)
    }

    /// The feature bits this kernel's ublk offers (`GET_FEATURES`).
    pub fn features(&mut self) -> Result<u64, ControlError> {
        let mut features = 0u64;
        self.command_with("GET_FEATURES", CMD_GET_FEATURES, u32::MAX, &mut features)?;
        Ok(features)
    }

    /// Add a device shaped by `info` (`dev_id` `u32::MAX` lets the kernel choose); the
    /// kernel's view (the chosen id, the rounded I/O limit) is written back into `info`.
    pub fn add(&mut self, info: &mut DevInfo) -> Result<(), ControlError> {
        self.command_with("ADD_DEV", CMD_ADD_DEV, info.dev_id, info)
            .map(drop)
    }

    /// Read device `dev_id`'s shape and state.
    pub fn info(&mut self, dev_id: u32) -> Result<DevInfo, ControlError> {
        let mut info = DevInfo::default();
        self.command_with("GET_DEV_INFO", CMD_GET_DEV_INFO, dev_id, &mut info)?;
        Ok(info)
    }

    /// Set the parameters of device `dev_id` (before it is started).
    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<(), ControlError> {
        let mut params = *params;
        params.len = std::mem::size_of::<Params>() as u32;
        self.command_with("SET_PARAMS", CMD_SET_PARAMS, dev_id, &mut params)
            .map(drop)
    }

    /// Read the parameters of device `dev_id`.
    pub fn params(&mut self, dev_id: u32) -> Result<Params, ControlError> {
        let mut params = Params {
            len: std::mem::size_of::<Params>() as u32,
            ..Params::default()
        };
        self.command_with("GET_PARAMS", CMD_GET_PARAMS, dev_id, &mut params)?;
        Ok(params)
    }

    /// The CPUs whose requests queue `q_id` of device `dev_id` receives (the blk-mq mapping),
    /// as CPU numbers below [`AFFINITY_CPUS`].
    pub fn queue_affinity(&mut self, dev_id: u32, q_id: u16) -> Result<Vec<usize>, ControlError> {
        let mut mask = [0u64; AFFINITY_CPUS / 64];
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            // 128 bytes: a multiple of the kernel's word, as it requires.
            len: u16::try_from(std::mem::size_of_val(&mask)).unwrap_or(0),
            addr: mask.as_mut_ptr() as u64,
            // The kernel takes the queue from the inline argument.
            data: u64::from(q_id),
            ..CtrlCmd::default()
        };
        self.command("GET_QUEUE_AFFINITY", CMD_GET_QUEUE_AFFINITY, cmd)?;
        Ok(cpus_of_mask(&mask))
    }

    /// Start device `dev_id` served by process `pid` (waits for every tag to be fetched).
    pub fn start(&mut self, dev_id: u32, pid: i32) -> Result<(), ControlError> {
        self.simple("START_DEV", CMD_START_DEV, dev_id, pid)
    }

    /// Stop device `dev_id`: its block node goes, and every fetch completes with ABORT.
    pub fn stop(&mut self, dev_id: u32) -> Result<(), ControlError> {
        self.simple("STOP_DEV", CMD_STOP_DEV, dev_id, 0)
    }

    /// Delete stopped device `dev_id`.
    pub fn delete(&mut self, dev_id: u32) -> Result<(), ControlError> {
        self.simple("DEL_DEV", CMD_DEL_DEV, dev_id, 0)
    }

    /// Begin recovering device `dev_id` whose server died. `EBUSY` while the dead server's
    /// node is still open or the device is not quiesced yet.
    pub fn start_recovery(&mut self, dev_id: u32) -> Result<(), ControlError> {
        self.simple("START_USER_RECOVERY", CMD_START_USER_RECOVERY, dev_id, 0)
    }

    /// End the recovery of device `dev_id` with process `pid` serving it (waits for every tag
    /// to be fetched, then releases the waiting I/O).
    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> Result<(), ControlError> {
        self.simple("END_USER_RECOVERY", CMD_END_USER_RECOVERY, dev_id, pid)
    }

    /// Send control command `op` of device `dev_id` whose payload is `buf` (the kernel reads
    /// it, fills it, or both); `buf` stays borrowed until the completion is reaped.
    fn command_with<T>(
        &mut self,
        command: &'static str,
        op: u32,
        dev_id: u32,
        buf: &mut T,
    ) -> Result<i32, ControlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            // Never more than `buf` holds (the payloads here are a few dozen bytes).
            len: u16::try_from(std::mem::size_of::<T>()).unwrap_or(0),
            addr: std::ptr::from_mut(buf) as u64,
            ..CtrlCmd::default()
        };
        self.command(command, op, cmd)
    }

    fn simple(
        &mut self,
        command: &'static str,
        op: u32,
        dev_id: u32,
        pid: i32,
    ) -> Result<(), ControlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            data: u64::try_from(pid).unwrap_or(0),
            ..CtrlCmd::default()
        };
        self.command(command, op, cmd).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_read_as_cpu_numbers() {
        assert_eq!(cpus_of_mask(&[0, 0]), Vec::<usize>::new());
        assert_eq!(cpus_of_mask(&[0b1011]), vec![0, 1, 3]);
        assert_eq!(cpus_of_mask(&[1 << 63, 1, 1 << 5]), vec![63, 64, 133]);
    }
}
