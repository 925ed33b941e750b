//! io_uring I/O: the merge's [`MergeIo`](crate::user_merge::merge_io::MergeIo) engine and the
//! `O_DIRECT` device verifier of `update-verify`.
//!
//! * [`probe`](mod@probe) — whether io_uring can be used here, and why not ([`UringUnavailable`]);
//! * [`engine`] — [`UringMergeIo`]: batched source reads, base writes and the base device's
//!   barrier, with short I/O resubmitted; [`uring_or_fallback`] picks the synchronous engine
//!   when io_uring is unavailable;
//! * [`verify`] — [`verify_device`]: read a whole device with `O_DIRECT` through registered
//!   buffers, AOSP's chunk sizes and depths.
//!
//! Both own their ring and use it from one thread. Neither returns while an entry it
//! submitted may still touch memory: buffers outlive their entries on every path.

mod batch;
pub mod engine;
pub mod probe;
pub mod verify;

pub use engine::{uring_or_fallback, UringEngineError, UringIoError, UringMergeIo, UringOptions};
pub use probe::{probe, UringUnavailable};
pub use verify::{verify_device, VerifyError, VerifyOptions, VerifyReport};
