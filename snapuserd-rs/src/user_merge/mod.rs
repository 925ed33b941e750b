//! The Android 13+ user-space-merge mode: the dm-user (or ublk) device *is* the partition.
//!
//! Reads of blocks the COW does not change, and of blocks already merged, come from the base
//! device; changed blocks are produced from the COW (REPLACE, ZERO) or from the source
//! device and the read-ahead scratch window (COPY, XOR). The daemon itself merges: it copies
//! the new blocks into the base device, window by window, crash-safely, through a
//! [`merge_io::MergeIo`] engine (synchronous, or io_uring).
pub mod merge_io;
