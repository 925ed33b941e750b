//! The synchronous merge engine: `pread`, `pwrite` and `fdatasync`, one run at a time. It
//! is the fallback of every other engine: when one fails mid-step, the step is redone here.
//!
//! Base writes whose buffer, length and offset are page-aligned go through an `O_DIRECT`
//! descriptor of the base device when the engine has one ([`SyncMergeIo::with_direct_base`]);
//! if the kernel refuses an `O_DIRECT` write, the engine logs it, drops that descriptor and
//! redoes the run buffered.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::direct_io::{direct_capable, direct_refused};
use super::merge_io::{MergeIo, ReadRun, WriteRun};

/// [`MergeIo`] with plain positioned system calls.
#[derive(Debug)]
pub struct SyncMergeIo {
    source: File,
    base: File,
    /// `O_DIRECT` descriptor of the base device, for aligned writes.
    direct_base: Option<File>,
}

impl SyncMergeIo {
    /// An engine reading `source` and writing `base` (descriptors it keeps), buffered.
    pub fn new(source: File, base: File) -> Self {
        Self {
            source,
            base,
            direct_base: None,
        }
    }

    /// Write aligned runs through `direct`, an `O_DIRECT` descriptor of the base device's
    /// file (`None` keeps every write buffered).
    pub fn with_direct_base(mut self, direct: Option<File>) -> Self {
        self.direct_base = direct;
        self
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
            let direct = self
                .direct_base
                .as_ref()
                .filter(|_| direct_capable(run.buf.as_ptr(), run.buf.len(), run.offset));
            if let Some(direct) = direct {
                match direct.write_all_at(run.buf, run.offset) {
                    Ok(()) => continue,
                    Err(e) if direct_refused(&e) => {
                        log::warn!(
                            "merge I/O: the base device refused an O_DIRECT write of {} bytes at \
                             byte {} ({e}); going on with buffered writes",
                            run.buf.len(),
                            run.offset
                        );
                        self.direct_base = None;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.base.write_all_at(run.buf, run.offset)?;
        }
        Ok(())
    }

    fn sync_base(&mut self) -> io::Result<()> {
        self.base.sync_data()
    }
}
