//! Android OTA payloads (`payload.bin`, update_engine's `CrAU` format): read,
//! extract to partition images, turn into the COW files a Virtual A/B
//! device writes, and create. Design: `ota-tools/PAYLOAD.md`.
//!
//! * [`proto`]: the manifest's protobuf messages.
//! * [`reader`]: header, manifest and blobs by offset.
//! * [`bspatch`]: BSDIFF40 and BSDF2 patches.
//! * [`operation`]: one install operation's new bytes.
//! * [`install`]: one operation end to end with its hash checks.
//! * [`partition`]: checks on a partition's update before writing.
//! * [`verity_regions`]: dm-verity hash tree and FEC regions.
//! * [`inspect`]: `payload inspect`.
//! * [`extract`]: `payload extract`.
//! * [`to_cow`]: `payload to-cow`, the COW update_engine's VABC writer produces.
//! * [`writer`]: writing a payload file.
//! * [`file_error`]: the error of a failed file operation.
//! * [`worker_pool`]: the worker threads and their start-up error.
//! * [`create`]: `payload create`, the payload generator.
//! * [`cli`]: the `ota-tools payload` subcommands.

pub mod bspatch;
pub mod cli;
pub mod create;
pub mod extract;
pub mod file_error;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod inspect;
pub mod install;
pub mod operation;
pub mod partition;
pub mod proto;
pub mod reader;
pub mod to_cow;
pub mod verity_regions;
pub mod worker_pool;
pub mod writer;
