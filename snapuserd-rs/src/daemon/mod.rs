//! The snapuserd daemon: dm-user workers, the handler registry, the merge monitor and the
//! control socket.
//!
//! * [`transport`] — worker threads answering dm-user requests through the block server;
//! * [`answer_buffers`] — the buffers a handler's workers produce READ answers into;
//! * [`handlers`] — the registry behind the control commands (`init`, `start`, `delete`, …);
//! * [`events`] — the stop request and wake-ups the daemon's waiting loops sleep on;
//! * [`control_protocol`] — the control socket's commands and replies, and the daemon's command line;
//! * [`control_server`] — the control socket speaking AOSP's text protocol;
//! * [`handoff`] — the second-stage socket handoff (proxy and receiving side);
//! * [`sockets`] — checks on socket fds handed to the daemon;
//! * [`init_uevents`] — `-fd_num`: asking init for ublk device nodes after the SELinux transition;
//! * [`user_target`] — what the registry needs of a user-space-merge snapshot;
//! * [`user_snapshots`] — that, on real files ([`crate::user_merge::UserSnapshot`]);
//! * [`merge_monitor`] — the FIFO of requested merges and the merge threads;
//! * [`update_verify`] — reading the whole snapshot device once after the handoff.

pub mod answer_buffers;
pub mod control_protocol;
pub mod control_server;
pub mod events;
pub mod handlers;
pub mod handoff;
pub mod init_uevents;
pub mod merge_monitor;
pub mod sockets;
pub mod transport;
pub mod update_verify;
pub mod user_snapshots;
pub mod user_target;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod user_registry_tests;
