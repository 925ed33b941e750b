//! `O_DIRECT` writes of the base device for the merge: a page-aligned buffer the merge
//! produces its destinations into, a second descriptor of the base device opened with
//! `O_DIRECT`, and the rule deciding which descriptor a transfer takes.
//!
//! A transfer goes through the `O_DIRECT` descriptor only when its memory address, its
//! length and its device offset are all multiples of [`DIRECT_ALIGN`]; anything else goes
//! through the buffered descriptor of the same file. Both descriptors name the same inode,
//! so one `fdatasync` of either makes both kinds of writes durable.
//!
//! Direct writes are always issued synchronously ([`write_direct`], from every engine): the
//! kernel keeps the page cache coherent only for those. An `O_DIRECT` write first writes
//! back and drops cached pages of its range; a *synchronous* one drops them again once it
//! is complete (waiting for pages still being read in), so a page read ahead in the
//! meantime with the old bytes cannot survive it, and a later buffered read (the read path)
//! loads the new bytes. An asynchronous one (io_uring) skips that second drop on the 6.1 and
//! 6.12 kernels (DESIGN.md, "Merge I/O").

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Alignment of `O_DIRECT` addresses, lengths and offsets used by the merge (the largest
/// logical block size of the devices it writes, and the merge's block size).
pub const DIRECT_ALIGN: usize = 4096;

/// True when `len` bytes at address `addr` and device byte `offset` may go through an
/// `O_DIRECT` descriptor.
pub fn direct_capable(addr: *const u8, len: usize, offset: u64) -> bool {
    len > 0
        && (addr as usize) % DIRECT_ALIGN == 0
        && len % DIRECT_ALIGN == 0
        && offset % DIRECT_ALIGN as u64 == 0
}

/// A second descriptor of `file` opened with `O_DIRECT` (through `/proc/self/fd`, so it
/// names the same inode), read-write if `write`. `None`, with a log line naming `role` and
/// `user` (what would have used it), when the file or the system refuses it: `user` then
/// uses the buffered descriptor, which is correct but goes through the page cache.
pub fn reopen_direct(file: &File, role: &str, write: bool, user: &str) -> Option<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(direct) => Some(direct),
        Err(e) => {
            log::info!(
                "{user}: the {role} device refuses O_DIRECT ({e}); it is used buffered \
                 (correct, slower)"
            );
            None
        }
    }
}

/// Write `run` synchronously through `direct` (an `O_DIRECT` descriptor of the base device)
/// if it has one and the run is page-aligned: `Ok(true)` when written. `Ok(false)`: the
/// caller writes the run buffered, because there is no descriptor, the run is not aligned,
/// or the device refused the transfer (logged once; `direct` is dropped, so later runs go
/// buffered without trying).
pub fn write_direct(direct: &mut Option<File>, offset: u64, buf: &[u8]) -> io::Result<bool> {
    let Some(file) = direct
        .as_ref()
        .filter(|_| direct_capable(buf.as_ptr(), buf.len(), offset))
    else {
        return Ok(false);
    };
    match std::os::unix::fs::FileExt::write_all_at(file, buf, offset) {
        Ok(()) => Ok(true),
        Err(e) if direct_refused(&e) => {
            log::warn!(
                "merge I/O: the base device refused an O_DIRECT write of {} bytes at byte \
                 {offset} ({e}); going on with buffered writes on it",
                buf.len()
            );
            *direct = None;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// True when an error of an `O_DIRECT` transfer means "not this way" (the device wants a
/// larger alignment, or the filesystem does not do direct I/O on this file): the transfer
/// should be redone buffered.
pub fn direct_refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

/// One page of an [`AlignedBuf`]; its alignment is what `O_DIRECT` needs.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; DIRECT_ALIGN]);

/// A byte buffer starting on a [`DIRECT_ALIGN`] boundary. It grows by whole pages and keeps
/// its memory across uses, so the merge allocates it once.
#[derive(Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// `O_DIRECT` descriptors a merge engine uses for aligned transfers, beside the buffered
/// descriptors it always has; `None`: that device is used buffered only.
#[derive(Debug, Default)]
pub struct DirectDescriptors {
    /// Read-only `O_DIRECT` descriptor of the source device, for window source reads.
    pub source: Option<File>,
    /// Read-write `O_DIRECT` descriptor of the base device, for destination writes.
    pub base: Option<File>,
}

impl AlignedBuf {
    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::default();
        buf.set_len(bytes.len());
        buf.copy_from_slice(bytes);
        buf
    }

    /// Make the buffer `len` bytes long. Bytes from an earlier use are kept; new pages are
    /// zero.
    pub fn set_len(&mut self, len: usize) {
        let pages = len.div_ceil(DIRECT_ALIGN);
        if pages > self.pages.len() {
            self.pages.resize(pages, Page([0; DIRECT_ALIGN]));
        }
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` over a byte array (no padding), so the vector holds
        // `pages.len() * DIRECT_ALIGN` initialised, contiguous bytes; `len` never exceeds
        // that (`set_len` grows the vector first); the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the slice borrows `self` mutably, so it is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn aligned_buf_starts_on_a_page_and_keeps_its_bytes() {
        let mut buf = AlignedBuf::default();
        assert!(buf.is_empty());
        buf.set_len(2 * DIRECT_ALIGN + 3);
        assert_eq!(buf.len(), 2 * DIRECT_ALIGN + 3);
        assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN, 0);
        buf[2 * DIRECT_ALIGN + 2] = 9;
        buf.set_len(DIRECT_ALIGN);
        assert_eq!(buf.len(), DIRECT_ALIGN);
        buf.set_len(2 * DIRECT_ALIGN + 3);
        assert_eq!(buf[2 * DIRECT_ALIGN + 2], 9);
    }

    #[test]
    fn only_fully_aligned_transfers_qualify() {
        let mut buf = AlignedBuf::default();
        buf.set_len(2 * DIRECT_ALIGN);
        let p = buf.as_ptr();
        assert!(direct_capable(p, DIRECT_ALIGN, 2 * DIRECT_ALIGN as u64));
        assert!(!direct_capable(p, DIRECT_ALIGN, 512));
        assert!(!direct_capable(p, 512, 0));
        assert!(!direct_capable(p, 0, 0));
        assert!(!direct_capable(p.wrapping_add(512), DIRECT_ALIGN, 0));
    }

    #[test]
    fn a_direct_write_is_seen_by_a_buffered_read_of_a_cached_range() {
        let (_dir, file) = super::super::test_support::device_file(&[0x11; 4 * DIRECT_ALIGN]);
        // Cache the range through the buffered descriptor first.
        let mut before = vec![0u8; DIRECT_ALIGN];
        file.read_exact_at(&mut before, DIRECT_ALIGN as u64)
            .expect("read");
        assert!(before.iter().all(|&b| b == 0x11));
        let Some(direct) = reopen_direct(&file, "test", true, "test") else {
            // This filesystem has no O_DIRECT: nothing to check here.
            return;
        };
        let mut buf = AlignedBuf::default();
        buf.set_len(DIRECT_ALIGN);
        buf.fill(0xA5);
        match direct.write_all_at(&buf, DIRECT_ALIGN as u64) {
            Ok(()) => {}
            Err(e) if direct_refused(&e) => return,
            Err(e) => panic!("direct write: {e}"),
        }
        let mut after = vec![0u8; DIRECT_ALIGN];
        file.read_exact_at(&mut after, DIRECT_ALIGN as u64)
            .expect("read");
        assert!(after.iter().all(|&b| b == 0xA5), "stale cached page");
    }
}
