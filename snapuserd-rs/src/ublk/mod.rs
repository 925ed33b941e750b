//! The snapshot device over ublk: the kernel's upstream user-space block device driver
//! (Linux 6.0+), beside the dm-user transport.
//!
//! One [`UblkDevice`] serves one [`crate::daemon::transport::RequestHandler`] (the
//! user-space-merge handler in the daemon) as `/dev/ublkb<N>`: one hardware queue per
//! worker thread, READ served, WRITE failed, FLUSH completed, everything else not
//! supported. The device is created with user recovery: if the daemon dies, the kernel
//! keeps the device and parks its I/O until a new daemon re-attaches
//! ([`UblkDevice::recover`]). See `DESIGN.md` beside this file.
//!
//! * [`abi`] — the kernel ABI, written out by hand;
//! * [`control`] — `/dev/ublk-control` commands;
//! * [`descriptor`] — deciding one request from its untrusted descriptor;
//! * [`queue`] — one queue's serving thread;
//! * [`device`] — creation, recovery and removal of a device;
//! * [`node_request`] — asking init for a device's nodes (`-fd_num`);
//! * [`stale_server`] — stopping an old server that holds a device it no longer serves.

pub mod abi;
pub mod control;
pub mod descriptor;
pub mod device;
pub mod node_request;
pub mod queue;
pub mod stale_server;

pub use control::{available, Control, ControlError};
pub use device::{identity_of, DeviceError, UblkDevice, UblkOptions, UserCopy};
pub use node_request::{NodeKind, NodeRequestHook};
