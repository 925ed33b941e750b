//! The snapuserd daemon: dm-user workers, the handler registry and the control socket.
//!
//! * [`transport`] — worker threads answering dm-user requests through the block server;
//! * [`handlers`] — the registry behind the control commands (`init`, `start`, `delete`, …);
//! * [`control_server`] — the control socket speaking AOSP's text protocol.

pub mod control_server;
pub mod handlers;
pub mod transport;
