//! The snapuserd daemon: dm-user workers, the handler registry and the control socket.
//!
//! * [`transport`] — worker threads answering dm-user requests through the block server;
//! * [`handlers`] — the registry behind the control commands (`init`, `start`, `delete`, …);
//! * [`events`] — the stop request and wake-ups the daemon's waiting loops sleep on;
//! * [`control_protocol`] — the control socket's commands and replies, and the daemon's command line;
//! * [`control_server`] — the control socket speaking AOSP's text protocol;
//! * [`handoff`] — the second-stage socket handoff (proxy and receiving side);
//! * [`sockets`] — checks on socket fds handed to the daemon.

pub mod control_protocol;
pub mod control_server;
pub mod events;
pub mod handlers;
pub mod handoff;
pub mod sockets;
pub mod transport;
