//! snapuserd-rs: the userspace half of Android's Virtual A/B snapshot stack.
//!
//! This crate currently provides the kernel-facing building blocks that the
//! daemon is built from:
//!
//! * [`dm_user`] — a dm-user channel: the 40-byte message header and the
//!   request/response framing on `/dev/dm-user/<name>`;
//! * [`snapshot`] — the pure-logic legacy (dm-snapshot) core: exception store,
//!   merge tracking, block server;
//! * [`cow_backend`] — the core's backends on a real COW file and source image;
//! * [`user_merge`] — the Android 13+ user-space-merge mode: read path over the whole partition and the daemon-driven merge;
//! * [`ublk`] — the snapshot device over ublk, with recovery across daemon restarts;
//! * [`uring`] — io_uring: the merge's I/O engine and the `O_DIRECT` device verifier;
//! * [`daemon`] — dm-user workers, handler registry, control socket, socket handoff;
//! * [`error_chain`] — printing an error with each of its causes once;
//! * [`log_limit`] — rate limiting for log lines a peer can trigger per request;
//! * [`properties`] — setting Android system properties through init's property service;
//! * `fuzz_harness` — the fuzzing entry points for control messages and dm-user streams
//!   (with the `fuzz-harness` feature only).

pub mod cow_backend;
pub mod daemon;
pub mod dm_user;
pub use cow_format::error_chain;
#[cfg(feature = "fuzz-harness")]
pub mod fuzz_harness;
pub mod log_limit;
pub mod malloc_tuning;
pub mod properties;
pub mod snapshot;
pub mod ublk;
pub mod uring;
pub mod user_merge;
