//! The I/O engine seam of the merge: positioned reads of the source device and writes of the
//! base device, in batches, plus the base device's durability barrier.
//!
//! The merge decides *what* to read and write and *when* a step is durable; an engine only
//! moves bytes. A synchronous engine (`pread`/`pwrite`/`fdatasync`) and an io_uring engine
//! implement it; a test double simulates a disk whose write cache loses unsynced writes.

use std::io;

/// One positioned read: fill `buf` from byte `offset` of the device.
#[derive(Debug)]
pub struct ReadRun<'a> {
    /// Byte offset on the device.
    pub offset: u64,
    /// Destination; filled completely, or the batch fails.
    pub buf: &'a mut [u8],
}

/// One positioned write: `buf` to byte `offset` of the device.
#[derive(Debug, Clone, Copy)]
pub struct WriteRun<'a> {
    /// Byte offset on the device.
    pub offset: u64,
    /// Bytes to write, completely, or the batch fails.
    pub buf: &'a [u8],
}

/// Moves the merge's bytes between the source device, memory and the base device.
///
/// Every call is a batch the engine may reorder and overlap internally; it returns only when
/// every run of the batch is complete (or with the first error). After an error nothing is
/// known of the batch's runs: the caller redoes the whole step (every step of the merge is
/// idempotent until its commit).
pub trait MergeIo: Send {
    /// A short name for logs and reports (`"sync"`, `"io_uring"`).
    fn name(&self) -> &'static str;

    /// Fill every run from the source device.
    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()>;

    /// Write every run to the base device (not yet durable).
    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()>;

    /// Make every completed write to the base device durable.
    fn sync_base(&mut self) -> io::Result<()>;

    /// Write every run, then make the base device durable: one step of the merge. Engines
    /// that can chain the barrier behind the writes (io_uring links) override this.
    fn write_base_durably(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        self.write_base(runs)?;
        self.sync_base()
    }
}
