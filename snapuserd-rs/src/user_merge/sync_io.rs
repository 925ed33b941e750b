//! The synchronous merge engine: `pread`, `pwrite` and `fdatasync`, one run at a time. It
//! is the fallback of every other engine: when one fails mid-step, the step is redone here.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::merge_io::{MergeIo, ReadRun, WriteRun};

/// [`MergeIo`] with plain positioned system calls.
#[derive(Debug)]
pub struct SyncMergeIo {
    source: File,
    base: File,
}

impl SyncMergeIo {
    /// An engine reading `source` and writing `base` (descriptors it keeps).
    pub fn new(source: File, base: File) -> Self {
        Self { source, base }
    }
}

impl MergeIo for SyncMergeIo {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        for run in runs.iter_mut() {
            self.source.read_exact_at(run.buf, run.offset)?;
        }
        Ok(())
    }

    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        for run in runs {
            self.base.write_all_at(run.buf, run.offset)?;
        }
        Ok(())
    }

    fn sync_base(&mut self) -> io::Result<()> {
        self.base.sync_data()
    }
}
