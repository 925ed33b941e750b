//! The synchronous merge engine: `pread`, `pwrite` and `fdatasync`, one run at a time. It
//! is the fallback of every other engine: when one fails mid-step, the step is redone here.
//!
//! Runs whose buffer, length and offset are page-aligned go through the `O_DIRECT`
//! descriptors the engine was given ([`SyncMergeIo::with_direct`]; writes through
//! [`write_direct`], as every engine's); if the kernel refuses an `O_DIRECT` transfer, the
//! engine logs it, drops that descriptor and redoes the run buffered.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::direct_io::{direct_capable, direct_refused, write_direct, DirectDescriptors};
use super::merge_io::{MergeIo, ReadRun, WriteRun};

/// [`MergeIo`] with plain positioned system calls.
#[derive(Debug)]
pub struct SyncMergeIo {
    source: File,
    base: File,
    direct: DirectDescriptors,
}

impl SyncMergeIo {
    /// An engine reading `source` and writing `base` (descriptors it keeps), buffered.
    pub fn new(source: File, base: File) -> Self {
        Self {
            source,
            base,
            direct: DirectDescriptors::default(),
        }
    }

    /// Move aligned runs through `direct`, `O_DIRECT` descriptors of the same files.
    pub fn with_direct(mut self, direct: DirectDescriptors) -> Self {
        self.direct = direct;
        self
    }
}

/// Log a refused `O_DIRECT` read; the caller drops the descriptor and goes on buffered.
fn log_refused(len: usize, offset: u64, error: &io::Error) {
    log::warn!(
        "merge I/O: the source device refused an O_DIRECT read of {len} bytes at byte \
         {offset} ({error}); going on with buffered reads of it"
    );
}

impl MergeIo for SyncMergeIo {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        for run in runs.iter_mut() {
            let direct = self
                .direct
                .source
                .as_ref()
                .filter(|_| direct_capable(run.buf.as_ptr(), run.buf.len(), run.offset));
            if let Some(direct) = direct {
                match direct.read_exact_at(run.buf, run.offset) {
                    Ok(()) => continue,
                    Err(e) if direct_refused(&e) => {
                        log_refused(run.buf.len(), run.offset, &e);
                        self.direct.source = None;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.source.read_exact_at(run.buf, run.offset)?;
        }
        Ok(())
    }

    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        for run in runs {
            if !write_direct(&mut self.direct.base, run.offset, run.buf)? {
                self.base.write_all_at(run.buf, run.offset)?;
            }
        }
        Ok(())
    }

    fn sync_base(&mut self) -> io::Result<()> {
        self.base.sync_data()
    }
}
