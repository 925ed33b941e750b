//! The errors of the user-space-merge mode: opening a snapshot, reading it, merging it.

use std::io;
use std::path::PathBuf;

use cow_format::{MergeStateError, ReadError};
use thiserror::Error;

/// Opening a [`super::UserSnapshot`] failed.
#[derive(Debug, Error)]
pub enum UserSnapshotError {
    /// A file could not be opened or sized.
    #[error("cannot open the {role} device {path}")]
    Open {
        /// "COW", "source" or "base".
        role: &'static str,
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The COW file is not a valid COW.
    #[error("cannot parse the COW file {path}")]
    Cow {
        /// The path given.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: ReadError,
    },
    /// The durable merge state (header progress, scratch region) is unreadable or invalid.
    #[error("cannot read the merge state of the COW file {path}")]
    MergeState {
        /// The path given.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: MergeStateError,
    },
    /// Only 4 KiB blocks are served (as AOSP's snapuserd).
    #[error("the COW file has {block_size}-byte blocks; snapuserd serves 4096-byte blocks only")]
    BlockSize {
        /// The COW's block size.
        block_size: u32,
    },
    /// The base device is empty or not a whole number of sectors.
    #[error("the base device is {bytes} bytes, not a positive multiple of 512")]
    BaseSize {
        /// Its size.
        bytes: u64,
    },
    /// An op writes a block past the end of the base device.
    #[error("COW op {op_index} writes block {block}, past the {device_blocks} blocks of the base device")]
    OpBeyondDevice {
        /// The op's index in the COW file.
        op_index: u64,
        /// The block.
        block: u64,
        /// Blocks of the base device.
        device_blocks: u64,
    },
    /// More merge-order entries than this implementation indexes (2^32 - 1).
    #[error("the COW has {entries} merge-order entries; at most 4294967295 are supported")]
    TooManyEntries {
        /// Entries found.
        entries: u64,
    },
    /// `num_merge_ops` counts more entries than the merge order has.
    #[error(
        "the COW header says {num_merge_ops} ops are merged, but the merge order has only {total}"
    )]
    ProgressPastEnd {
        /// The header's value.
        num_merge_ops: u64,
        /// Entries of the merge order.
        total: u64,
    },
    /// The scratch region is marked Done but does not hold the window the progress points at.
    #[error("the scratch window (state Done) does not match the pending ops at merge-order entry {num_merge_ops}: {detail}")]
    ScratchMismatch {
        /// Durable progress.
        num_merge_ops: u64,
        /// What differed.
        detail: String,
    },
    /// The scratch region cannot hold a read-ahead window.
    #[error("the scratch region holds {capacity} blocks; a read-ahead window needs at least 1")]
    ScratchTooSmall {
        /// Its capacity in blocks.
        capacity: usize,
    },
    /// Without scratch space an XOR op that reads its own destination cannot be replayed
    /// after a crash.
    #[error("merge-order entry {entry} (XOR to block {block}) reads its own destination; merging it crash-safely needs the scratch region this COW lacks")]
    XorNeedsScratch {
        /// Merge-order entry.
        entry: u64,
        /// Its destination.
        block: u64,
    },
    /// The progress in the COW was made by a merge in the other mode.
    #[error("num_merge_ops {num_merge_ops} is inside the REPLACE/ZERO part, but block {block} (the last one the user-space merge would have written) does not hold its new data{}; the merge was probably begun in legacy (dm-snapshot) mode and cannot be resumed in user-space mode", if *.legacy_matches { ", while the legacy order's boundary block does" } else { "" })]
    ModeMismatch {
        /// Durable progress.
        num_merge_ops: u64,
        /// The boundary block checked.
        block: u64,
        /// True if the legacy order's boundary block holds its new data.
        legacy_matches: bool,
    },
    /// Reading a boundary block for the mode check failed.
    #[error("checking which merge mode made the progress: reading block {block}")]
    ModeCheck {
        /// The block.
        block: u64,
        /// The cause.
        #[source]
        source: Box<UserReadError>,
    },
}

/// Reading the snapshot device failed.
#[derive(Debug, Error)]
pub enum UserReadError {
    /// The range is not whole sectors, too long, or past the end of the device.
    #[error("read of {len} bytes at sector {sector} is outside the device ({device_sectors} sectors, at most {max} bytes per request, whole sectors)")]
    BadRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Sectors of the device.
        device_sectors: u64,
        /// Largest request.
        max: u64,
    },
    /// Reading the base device failed.
    #[error("reading {len} bytes at byte {offset} of the base device")]
    Base {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Producing a block from its op failed (payload, decompression, source read).
    #[error("producing block {block} from COW op {op_index}")]
    Produce {
        /// The block.
        block: u64,
        /// The op's index in the COW file.
        op_index: u64,
        /// The cause.
        #[source]
        source: ReadError,
    },
}

/// The merge failed (it is resumable from the durable state after the cause is fixed).
#[derive(Debug, Error)]
pub enum UserMergeError {
    /// Another `merge` call runs on this snapshot.
    #[error("a merge is already running on this snapshot")]
    AlreadyRunning,
    /// The synchronous engine could not be set up.
    #[error("cannot set up the synchronous merge engine")]
    SyncEngine(#[source] io::Error),
    /// Reading the sources of a read-ahead window failed.
    #[error("reading the sources of the read-ahead window of merge-order entries {start}..{end} (engine {engine})")]
    SourceRead {
        /// First entry of the window.
        start: u64,
        /// One past its last entry.
        end: u64,
        /// The engine.
        engine: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing or syncing merged blocks to the base device failed.
    #[error("writing merged blocks of merge-order entries {start}..{end} to the base device (engine {engine})")]
    BaseWrite {
        /// First entry.
        start: u64,
        /// One past the last.
        end: u64,
        /// The engine.
        engine: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Producing a block to merge failed (corrupt op, payload read, decompression).
    #[error("producing block {block} of merge-order entry {entry} (COW op {op_index})")]
    Produce {
        /// Merge-order entry.
        entry: u64,
        /// COW op index.
        op_index: u64,
        /// The block.
        block: u64,
        /// The cause.
        #[source]
        source: ReadError,
    },
    /// A durable progress update (scratch window, commit) failed.
    #[error("{operation} at merge-order entry {num_merge_ops}")]
    Progress {
        /// What was being done.
        operation: &'static str,
        /// The progress it concerned.
        num_merge_ops: u64,
        /// The cause.
        #[source]
        source: MergeStateError,
    },
    /// The durable state changed under this merge in a way it cannot follow.
    #[error("re-reading the durable progress before merging")]
    Reload(#[source] Box<UserSnapshotError>),
}
