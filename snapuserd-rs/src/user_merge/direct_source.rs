//! The source device read with `O_DIRECT` (AOSP `-o_direct`): each read goes through an
//! aligned bounce buffer covering the aligned pages around the bytes asked for, so source
//! reads on the read path do not fill the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use cow_format::SourceImage;

/// Alignment of `O_DIRECT` buffers, offsets and lengths (the largest logical block size).
const ALIGN: usize = 4096;

#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A source device opened with `O_DIRECT`.
#[derive(Debug)]
pub(crate) struct DirectSource {
    file: File,
}

impl DirectSource {
    /// Open `path` read-only with `O_DIRECT`.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        Ok(Self { file })
    }

    /// Fill `page` from aligned offset `offset`; the bytes read (fewer at the end).
    fn read_page(&self, page: &mut Page, offset: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < ALIGN {
            match self.file.read_at(&mut page.0[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

impl SourceImage for DirectSource {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        let first = byte_offset / ALIGN as u64 * ALIGN as u64;
        let end = byte_offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))?;
        let mut page = Page([0u8; ALIGN]);
        let mut filled = 0usize;
        let mut page_at = first;
        while page_at < end {
            let got = self.read_page(&mut page, page_at)?;
            // Bytes of this page that `buf` wants.
            let lo = byte_offset.max(page_at);
            let hi = end.min(page_at + ALIGN as u64);
            let (lo_in, hi_in) = ((lo - page_at) as usize, (hi - page_at) as usize);
            if hi_in > got {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("source ends before byte {hi}"),
                ));
            }
            buf[filled..filled + (hi_in - lo_in)].copy_from_slice(&page.0[lo_in..hi_in]);
            filled += hi_in - lo_in;
            page_at += ALIGN as u64;
        }
        Ok(())
    }
}
