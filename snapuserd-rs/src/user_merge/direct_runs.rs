//! Runs of the base and source devices read with `O_DIRECT` on the read path.
//!
//! A READ's unchanged (or merged) blocks and its COPY blocks not read ahead yet come in runs
//! of the base and source devices. Through the page cache each run is first brought into
//! the cache and then copied (or spliced) out of it; a device read once, as at boot, gains
//! nothing from the cached copy. With [`DirectRuns`] a run of at least [`DIRECT_RUN_MIN`]
//! bytes at block-aligned offsets is read with `O_DIRECT` straight into the answer's memory
//! instead, and never enters the page cache. Anything else (short runs, unaligned memory,
//! a device refusing `O_DIRECT`) is read buffered, as without it.
//!
//! Coherence: a direct read first writes back dirty cached pages of its range (the kernel
//! does this for every `O_DIRECT` read of a block device), so it sees what the merge wrote
//! buffered; the merge's own direct writes are seen as by any reader.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::direct_io::{direct_capable, direct_refused, reopen_direct, DIRECT_ALIGN};

/// The shortest run read with `O_DIRECT`: below it one device request per run costs more
/// than the page cache's read-ahead of the neighbouring blocks.
pub const DIRECT_RUN_MIN: usize = 16 * 1024;

/// `O_DIRECT` twins of a snapshot's base and source descriptors for the read path (each
/// `None` where that device refuses `O_DIRECT`).
#[derive(Debug, Default)]
pub(crate) struct DirectRuns {
    base: Option<File>,
    source: Option<File>,
}

/// Which device a run is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunDevice {
    /// The base device (unchanged and merged blocks).
    Base,
    /// The source device (COPY blocks not read ahead yet).
    Source,
}

impl DirectRuns {
    /// Open the twins of `base` and `source` (a refusal is logged; that device stays
    /// buffered).
    pub(crate) fn open(base: &File, source: &File) -> Self {
        Self {
            base: reopen_direct(base, "base", false, "read path"),
            source: reopen_direct(source, "source", false, "read path"),
        }
    }

    fn twin(&self, device: RunDevice) -> Option<&File> {
        match device {
            RunDevice::Base => self.base.as_ref(),
            RunDevice::Source => self.source.as_ref(),
        }
    }

    /// Whether a run of `len` bytes at device byte `offset` may be read directly (memory
    /// alignment aside).
    pub(crate) fn takes(&self, device: RunDevice, offset: u64, len: usize) -> bool {
        self.twin(device).is_some()
            && len >= DIRECT_RUN_MIN
            && len % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN as u64 == 0
    }

    /// Fill `out` from `offset` of `device` with `O_DIRECT` if the run qualifies: `Ok(true)`
    /// when read, `Ok(false)` when the caller must read it buffered (not eligible, or the
    /// device refused this transfer), `Err` for an I/O error.
    pub(crate) fn read_into(
        &self,
        device: RunDevice,
        out: &mut [u8],
        offset: u64,
    ) -> io::Result<bool> {
        let Some(file) = self.twin(device) else {
            return Ok(false);
        };
        if !self.takes(device, offset, out.len())
            || !direct_capable(out.as_ptr(), out.len(), offset)
        {
            return Ok(false);
        }
        match file.read_exact_at(out, offset) {
            Ok(()) => Ok(true),
            Err(e) if direct_refused(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Append `len` bytes at `offset` of `device`, read with `O_DIRECT`, to `buf`, starting
    /// at the first page-aligned address after its current end (the gap zero-filled): the
    /// index in `buf` where the bytes start. `Ok(None)` (and `buf` as it was) when the run
    /// does not qualify or the device refused it.
    pub(crate) fn append(
        &self,
        device: RunDevice,
        buf: &mut Vec<u8>,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<usize>> {
        let Some(file) = self.twin(device) else {
            return Ok(None);
        };
        if !self.takes(device, offset, len) {
            return Ok(None);
        }
        let before = buf.len();
        let room = len
            .checked_add(DIRECT_ALIGN)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        buf.reserve(room);
        let end_addr = buf.as_ptr() as usize + before;
        let start = before + (end_addr.next_multiple_of(DIRECT_ALIGN) - end_addr);
        buf.resize(start, 0);
        match read_spare(file, buf, len, offset) {
            Ok(()) => Ok(Some(start)),
            Err(e) => {
                buf.truncate(before);
                if direct_refused(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// Read exactly `len` bytes at `offset` of `file` into the spare capacity right after the
/// end of `buf` (at least `len` bytes of it, page-aligned), then count them in its length.
/// On error `buf`'s length is unchanged. Reading into the spare capacity, rather than into
/// zero-filled bytes, saves writing every byte twice.
fn read_spare(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
    if buf.capacity() - buf.len() < len {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut got = 0usize;
    while got < len {
        let at = offset
            .checked_add(got as u64)
            .and_then(|a| libc::off_t::try_from(a).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let spare = buf.spare_capacity_mut();
        // SAFETY: the destination is `len - got` bytes of `buf`'s spare capacity (checked
        // above to hold `len` bytes), which `pread` only writes; `buf` is borrowed mutably,
        // so nothing else touches it; `file` is an open descriptor for the whole call.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare[got..len].as_mut_ptr().cast(),
                len - got,
                at,
            )
        };
        match n {
            n if n > 0 => got += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: the loop above had `pread` write all `len` bytes after the old length, all
    // inside the capacity, so they are initialised.
    unsafe { buf.set_len(buf.len() + len) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::device_file as device;
    use super::*;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn a_long_aligned_run_is_appended_on_a_page_and_short_or_unaligned_ones_are_not() {
        let data = bytes(256 * 1024);
        let (_dir, file) = device(&data);
        let runs = DirectRuns::open(&file, &file);
        if runs.base.is_none() {
            return; // no O_DIRECT on this filesystem: nothing to check
        }
        let mut buf = vec![0xEEu8; 100];
        let start = runs
            .append(RunDevice::Base, &mut buf, 8192, 64 * 1024)
            .expect("read")
            .expect("taken");
        assert_eq!(buf.as_ptr().wrapping_add(start) as usize % DIRECT_ALIGN, 0);
        assert_eq!(buf.len(), start + 64 * 1024);
        assert_eq!(&buf[start..], &data[8192..8192 + 64 * 1024]);
        assert!(buf[..100].iter().all(|&b| b == 0xEE), "earlier bytes kept");
        let len = buf.len();
        for (offset, n) in [(8192, 4096), (512, 64 * 1024), (0, 64 * 1024 + 512)] {
            let got = runs.append(RunDevice::Source, &mut buf, offset, n);
            assert!(matches!(got, Ok(None)), "{offset} {n}");
            assert_eq!(buf.len(), len);
        }
    }

    #[test]
    fn a_run_past_the_end_is_an_error_and_leaves_the_buffer_as_it_was() {
        let data = bytes(64 * 1024);
        let (_dir, file) = device(&data);
        let runs = DirectRuns::open(&file, &file);
        if runs.base.is_none() {
            return;
        }
        let mut buf = vec![1u8; 10];
        let got = runs.append(RunDevice::Base, &mut buf, 32 * 1024, 64 * 1024);
        assert!(got.is_err(), "{got:?}");
        assert_eq!(buf, vec![1u8; 10]);
    }

    #[test]
    fn read_into_fills_aligned_memory_and_declines_the_rest() {
        let data = bytes(128 * 1024);
        let (_dir, file) = device(&data);
        let runs = DirectRuns::open(&file, &file);
        if runs.base.is_none() {
            return;
        }
        let mut page = super::super::direct_io::AlignedBuf::default();
        page.set_len(32 * 1024);
        assert!(runs
            .read_into(RunDevice::Base, &mut page, 16 * 1024)
            .expect("read"));
        assert_eq!(&page[..], &data[16 * 1024..48 * 1024]);
        assert!(!runs
            .read_into(RunDevice::Base, &mut page[..8192], 0)
            .expect("short run"));
        assert!(!runs
            .read_into(RunDevice::Base, &mut page[512..512 + 16 * 1024], 0)
            .expect("unaligned memory"));
        assert!(!DirectRuns::default()
            .read_into(RunDevice::Base, &mut page, 0)
            .expect("no twin"));
    }

    #[test]
    fn a_direct_read_sees_what_was_written_buffered_and_not_yet_synced() {
        let (_dir, file) = device(&vec![0u8; 64 * 1024]);
        let runs = DirectRuns::open(&file, &file);
        if runs.base.is_none() {
            return;
        }
        file.write_all_at(&[0x5A; 16 * 1024], 16 * 1024)
            .expect("buffered write");
        let mut page = super::super::direct_io::AlignedBuf::default();
        page.set_len(16 * 1024);
        assert!(runs
            .read_into(RunDevice::Base, &mut page, 16 * 1024)
            .expect("read"));
        assert!(
            page.iter().all(|&b| b == 0x5A),
            "dirty pages written back first"
        );
    }
}
