//! Android Virtual A/B compressed COW files (libsnapshot_cow), versions 2 and 3.
//!
//! The format facts this crate follows are in `shared/docs/cow-format.md`.
#![forbid(unsafe_code)]

/// The magic number at offset 0 of every COW file (`!!WOcwoC` on disk).
pub const COW_MAGIC: u64 = 0x436f_7763_4f57_2121;
