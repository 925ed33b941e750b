//! Saving a read-ahead window with one `O_DIRECT` write: the page-aligned middle of the
//! scratch region goes to the device straight from a page-aligned buffer, so the window's
//! 2 MiB are neither copied into the page cache nor written back from it at the sync.
//!
//! The scratch data area starts at `header_size + metadata_size` (8,270 bytes into a v3 COW
//! with a 78-byte header), which no `O_DIRECT` transfer can address. So the direct span starts
//! on the page boundary before the data area and ends on the page boundary after the window's
//! last byte (never past the last whole page of the scratch region); its first bytes are the
//! end of the metadata list and the few bytes between list and data, its last bytes are the
//! unused remainder of the last page. Bytes of the span that the window does not define are
//! read from the file first and written back unchanged. Whatever lies outside the span (the
//! list's start, in the header's pages; a full window's last bytes, in the page shared with
//! the sequence data) is written buffered, so no page is written both ways.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::layout::ScratchLayout;

/// Page size of the `O_DIRECT` transfers (the largest logical block size of the devices a
/// COW file lives on).
pub(crate) const DIRECT_ALIGN: u64 = 4096;

/// The file range of a window save that goes through `O_DIRECT`, and what lies on either
/// side of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirectSpan {
    /// Page-aligned file range written with `O_DIRECT`.
    pub(crate) span: Range<u64>,
    /// Bytes of the metadata list before the span (written buffered).
    pub(crate) list_before: usize,
    /// Bytes of window data after the span (written buffered at `span.end`).
    pub(crate) data_after: usize,
}

impl DirectSpan {
    /// The span of a save of `list_len` metadata bytes and `data_len` data bytes into
    /// `layout`; `None` when no page-aligned span can hold the data's start without
    /// touching the header's page (a small scratch region), or there is no data.
    pub(crate) fn plan(layout: &ScratchLayout, list_len: u64, data_len: u64) -> Option<Self> {
        let start = layout.data_offset / DIRECT_ALIGN * DIRECT_ALIGN;
        let data_end = layout.data_offset.checked_add(data_len)?;
        let list_end = layout.metadata_offset.checked_add(list_len)?;
        let region_pages_end = layout.end / DIRECT_ALIGN * DIRECT_ALIGN;
        let end = data_end.div_ceil(DIRECT_ALIGN).checked_mul(DIRECT_ALIGN)?;
        let end = end.min(region_pages_end);
        // The header's page stays buffered (its commits are buffered one-sector writes),
        // and the list must not start inside the span (it would need a third piece).
        if data_len == 0
            || start < DIRECT_ALIGN
            || start < layout.metadata_offset
            || end <= layout.data_offset
            || list_end > layout.data_offset
        {
            return None;
        }
        Some(Self {
            span: start..end,
            list_before: usize::try_from(list_end.min(start) - layout.metadata_offset).ok()?,
            data_after: usize::try_from(data_end.saturating_sub(end)).ok()?,
        })
    }
}

/// An `O_DIRECT` descriptor of a COW file and the page-aligned buffer its window saves are
/// composed in (allocated at the first save, kept for the next).
#[derive(Debug)]
pub(crate) struct DirectScratch {
    file: File,
    mem: Vec<u8>,
}

impl DirectScratch {
    /// Saves through `file`, an `O_DIRECT` descriptor of the COW file.
    pub(crate) fn new(file: File) -> Self {
        Self {
            file,
            mem: Vec::new(),
        }
    }

    /// Write `span` of a window save: the list bytes after `plan.list_before`, the gap and
    /// tail bytes as `buffered` holds them now, and the data up to the span's end. The
    /// caller writes the rest buffered. Errors are the `O_DIRECT` write's (or the read of
    /// the preserved bytes', through `buffered`).
    pub(crate) fn write_span(
        &mut self,
        buffered: &File,
        layout: &ScratchLayout,
        plan: &DirectSpan,
        list: &[u8],
        data: &[u8],
    ) -> io::Result<()> {
        let Range { start, end } = plan.span.clone();
        let len = usize::try_from(end - start).map_err(|_| io::ErrorKind::InvalidInput)?;
        let page = DIRECT_ALIGN as usize;
        if self.mem.len() < len + page {
            self.mem = vec![0u8; len + page];
        }
        let skew = self.mem.as_ptr().align_offset(page);
        if skew >= page {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let buf = &mut self.mem[skew..skew + len];
        // Offsets inside the span; all below `len` by construction of the plan.
        let rel = |offset: u64| (offset - start) as usize;
        let data_at = rel(layout.data_offset);
        let list_end = (layout.metadata_offset + list.len() as u64).max(start);
        // The list's last bytes, then the bytes between list and data as they are.
        let list_in = &list[plan.list_before..];
        buf[..list_in.len()].copy_from_slice(list_in);
        buffered.read_exact_at(&mut buf[list_in.len()..data_at], list_end)?;
        // The data, then the rest of the last page as it is.
        let data_in = data.len() - plan.data_after;
        buf[data_at..data_at + data_in].copy_from_slice(&data[..data_in]);
        let tail = data_at + data_in;
        if tail < len {
            buffered.read_exact_at(&mut buf[tail..], start + tail as u64)?;
        }
        self.file.write_all_at(buf, start)
    }
}

/// True when an `O_DIRECT` error means "not this way" (the file or device wants another
/// alignment, or does no direct I/O): the save should be redone buffered.
pub(crate) fn direct_refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    ) || error.kind() == io::ErrorKind::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::BUFFER_REGION_DEFAULT_SIZE;

    #[test]
    fn v3_full_window_span_leaves_the_header_page_and_the_last_bytes_buffered() {
        let l = ScratchLayout::new(78, BUFFER_REGION_DEFAULT_SIZE).unwrap();
        let p = DirectSpan::plan(&l, 511 * 16, 510 * 4096).unwrap();
        assert_eq!(p.span, 8192..2_097_152);
        assert_eq!(p.list_before, 8192 - 79);
        // A full window ends at the region's end, 78 bytes into a page it shares.
        assert_eq!(p.data_after, 78);
    }

    #[test]
    fn short_window_span_ends_on_the_page_after_its_data() {
        let l = ScratchLayout::new(38, BUFFER_REGION_DEFAULT_SIZE).unwrap();
        let p = DirectSpan::plan(&l, 511 * 16, 3 * 4096).unwrap();
        assert_eq!(p.span.start, 8192);
        assert_eq!(p.span.end, (8230u64 + 3 * 4096).div_ceil(4096) * 4096);
        assert_eq!(p.data_after, 0);
    }

    #[test]
    fn small_regions_and_empty_windows_have_no_span() {
        let l = ScratchLayout::new(78, 64 * 1024).unwrap();
        assert_eq!(DirectSpan::plan(&l, 17 * 16, 4096), None);
        let l = ScratchLayout::new(78, BUFFER_REGION_DEFAULT_SIZE).unwrap();
        assert_eq!(DirectSpan::plan(&l, 16, 0), None);
    }
}
