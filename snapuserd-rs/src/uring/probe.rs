//! Whether this process may use io_uring at all, and why not.
//!
//! io_uring is missing on kernels before 5.1 or built without `CONFIG_IO_URING` (`ENOSYS`),
//! refused by the `kernel.io_uring_disabled` sysctl or a seccomp/LSM policy (`EPERM`), and
//! lacks the plain `READ`/`WRITE` opcodes before 5.6. Every one of these is an
//! [`UringUnavailable`] error: the caller falls back to the synchronous engine and logs why.

use std::io;

use io_uring::{opcode, IoUring, Probe};

/// Where the kernel says whether io_uring is disabled (Linux 6.6+): 0 allowed, 1 only for
/// `CAP_SYS_ADMIN` or the `kernel.io_uring_group`, 2 disabled for everyone.
const IO_URING_DISABLED_SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// io_uring cannot be used by this process; the synchronous engine must do the work.
#[derive(Debug, thiserror::Error)]
pub enum UringUnavailable {
    /// `io_uring_setup` does not exist: kernel before 5.1, or built without `CONFIG_IO_URING`.
    #[error("the kernel has no io_uring (io_uring_setup: ENOSYS; kernel before 5.1 or built without CONFIG_IO_URING)")]
    NotInKernel,
    /// The `kernel.io_uring_disabled` sysctl forbids io_uring to this process.
    #[error("io_uring is disabled by the kernel.io_uring_disabled sysctl (value {value})")]
    DisabledBySysctl {
        /// The sysctl's value (1: privileged users only, 2: nobody).
        value: u8,
    },
    /// `io_uring_setup` was refused with `EPERM` although the sysctl allows it: a seccomp
    /// filter or a security module.
    #[error("io_uring_setup was refused (EPERM) by a seccomp filter or a security module")]
    Denied,
    /// The kernel has io_uring but not an opcode the engine needs (kernel before 5.6).
    #[error("the kernel's io_uring lacks the {opcode} opcode (kernel before 5.6)")]
    MissingOpcode {
        /// Name of the missing opcode.
        opcode: &'static str,
    },
    /// Creating the ring failed for another reason (out of memory, locked-memory limit, ...).
    #[error("creating an io_uring with {entries} entries failed")]
    Setup {
        /// Entries asked for.
        entries: u32,
        /// The `io_uring_setup` error.
        #[source]
        source: io::Error,
    },
}

/// What `io_uring_setup`'s error means, given the sysctl's value (if the kernel has it).
pub(crate) fn classify_setup_error(
    entries: u32,
    error: io::Error,
    disabled_sysctl: Option<u8>,
) -> UringUnavailable {
    match error.raw_os_error() {
        Some(libc::ENOSYS) => UringUnavailable::NotInKernel,
        Some(libc::EPERM) => match disabled_sysctl {
            Some(value) if value != 0 => UringUnavailable::DisabledBySysctl { value },
            _ => UringUnavailable::Denied,
        },
        _ => UringUnavailable::Setup {
            entries,
            source: error,
        },
    }
}

/// The value of `kernel.io_uring_disabled`, or `None` when the kernel has no such sysctl.
fn read_disabled_sysctl() -> Option<u8> {
    std::fs::read_to_string(IO_URING_DISABLED_SYSCTL)
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// Create a ring of `entries` entries, or say why io_uring cannot be used.
pub(crate) fn new_ring(entries: u32) -> Result<IoUring, UringUnavailable> {
    IoUring::new(entries).map_err(|e| classify_setup_error(entries, e, read_disabled_sysctl()))
}

/// Check that `ring` supports every opcode the engines use (`READ`, `WRITE`, `READ_FIXED`,
/// `FSYNC`).
pub(crate) fn check_opcodes(ring: &IoUring) -> Result<(), UringUnavailable> {
    let mut probe = Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        // IORING_REGISTER_PROBE arrived in 5.6, with the READ and WRITE opcodes.
        return Err(UringUnavailable::MissingOpcode {
            opcode: "READ (no IORING_REGISTER_PROBE)",
        });
    }
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::ReadFixed::CODE, "READ_FIXED"),
        (opcode::Fsync::CODE, "FSYNC"),
    ];
    match needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some(&(_, name)) => Err(UringUnavailable::MissingOpcode { opcode: name }),
        None => Ok(()),
    }
}

/// Whether this process can use the io_uring engines: creates a small ring and checks its
/// opcodes. `Err` says why not, for the log line that announces the synchronous fallback.
pub fn probe() -> Result<(), UringUnavailable> {
    let ring = new_ring(2)?;
    check_opcodes(&ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn enosys_means_no_io_uring_in_the_kernel() {
        assert!(matches!(
            classify_setup_error(8, os(libc::ENOSYS), None),
            UringUnavailable::NotInKernel
        ));
    }

    #[test]
    fn eperm_is_the_sysctl_when_it_is_set_and_a_policy_otherwise() {
        assert!(matches!(
            classify_setup_error(8, os(libc::EPERM), Some(2)),
            UringUnavailable::DisabledBySysctl { value: 2 }
        ));
        assert!(matches!(
            classify_setup_error(8, os(libc::EPERM), Some(1)),
            UringUnavailable::DisabledBySysctl { value: 1 }
        ));
        assert!(matches!(
            classify_setup_error(8, os(libc::EPERM), Some(0)),
            UringUnavailable::Denied
        ));
        assert!(matches!(
            classify_setup_error(8, os(libc::EPERM), None),
            UringUnavailable::Denied
        ));
    }

    #[test]
    fn other_errors_keep_their_cause() {
        let err = classify_setup_error(8, os(libc::ENOMEM), Some(0));
        match err {
            UringUnavailable::Setup { entries, source } => {
                assert_eq!(entries, 8);
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
