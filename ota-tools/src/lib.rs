//! Host tools for Android Virtual A/B COW files.
//!
//! * [`inspect`]: describe a COW file (header and ops, file or merge order),
//!   as text or JSON.
//! * [`apply`]: build the image a completed merge of a COW file leaves.
//! * [`create`]: build a COW from a source and a target image (`ota-tools create`).
//! * [`verify`]: check that a COW merged in place turns a source into a target.
//! * [`payload`]: Android OTA payloads (`payload.bin`): inspect, extract,
//!   to-cow, create.
//! * [`sparse`]: Android sparse images, read as raw wherever an image is taken.
//! * [`verity`]: dm-verity hash trees and FEC parity, computed as a device does.
//! * [`progress`]: progress bars on stderr when it is a terminal.
//! * [`interrupt`]: temporary outputs removed when a signal ends the process.
//!
//! The `ota-tools` binary is a thin command-line front end over these modules.
#![forbid(unsafe_code)]

pub mod apply;
pub mod create;
pub mod inspect;
pub mod interrupt;
pub mod payload;
pub mod progress;
pub mod sparse;
pub mod verify;
pub mod verity;
