//! Android Virtual A/B compressed COW files (libsnapshot_cow), versions 2 and 3.
//!
//! The format facts this crate follows are in `shared/docs/cow-format.md`.
//!
//! * [`layout`]: constants and on-disk records (encode/decode, field checks).
//! * [`compression`]: payload codecs and the "stored raw" rules.
//! * [`op`]: the version-independent op view.
#![forbid(unsafe_code)]

pub mod compression;
pub mod layout;
pub mod op;
pub mod writer;

pub use compression::{Compression, CompressionAlgorithm, CompressionError};
pub use layout::{LayoutError, COW_MAGIC};
pub use op::{CowOp, CowVersion, OpKind};
pub use writer::{CowWriter, WriteError, WriterOptions};
