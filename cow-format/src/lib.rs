//! Android Virtual A/B compressed COW files (libsnapshot_cow), versions 2 and 3.
//!
//! The format facts this crate follows are in `shared/docs/cow-format.md`.
//!
//! * [`layout`]: constants and on-disk records (encode/decode, field checks).
//! * [`compression`]: payload codecs and the "stored raw" rules.
//! * [`op`]: the version-independent op view.
//! * [`reader`]: open, validate, iterate and read COW files.
//! * [`merge_state`]: durable in-place updates of merge progress and scratch state.
// `unsafe` is confined to `reader::mapped` (mmap + SIGBUS guard).
#![deny(unsafe_code)]

pub mod compression;
mod direct_scratch;
pub mod error_chain;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod layout;
pub mod merge_state;
pub mod op;
pub mod reader;
pub mod writer;

pub use compression::{Compression, CompressionAlgorithm, CompressionError};
pub use layout::{LayoutError, COW_MAGIC};
pub use merge_state::{MergeState, MergeStateError};
pub use op::{CowOp, CowVersion, OpKind};
pub use reader::{
    BlockOrigin, CowHeader, CowReader, CowStorage, MergeMode, MergeOrderOptions, OtherOpsOrder,
    ReadError, SourceImage,
};
pub use writer::{CowWriter, WriteError, WriterOptions};
