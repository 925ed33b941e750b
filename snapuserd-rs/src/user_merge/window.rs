//! A read-ahead window held in memory: the saved source bytes of the ordered ops of
//! merge-order entries `start..end`, shared by the merge and the readers.

use std::io;
use std::ops::Range;

use cow_format::SourceImage;

use super::direct_io::AlignedBuf;

/// Marks an entry of the window that saved no source bytes (a REPLACE/ZERO entry inside
/// the ordered part).
const NO_SLOT: u16 = u16::MAX;

/// Saved source bytes of one window.
#[derive(Debug)]
pub(crate) struct LoadedWindow {
    /// Entries covered.
    pub(crate) entries: Range<u64>,
    /// Slot of each entry (`NO_SLOT` if none), indexed by `entry - entries.start`.
    slots: Vec<u16>,
    /// What the scratch region's data area holds (or would hold): one block of saved source
    /// bytes per slot, page-aligned (the merge reads the sources into it, with `O_DIRECT`
    /// when asked).
    data: AlignedBuf,
    block_size: usize,
}

impl LoadedWindow {
    /// A window over `entries` whose entries with `true` in `has_slot` took the consecutive
    /// slots of `data`.
    pub(crate) fn new(
        entries: Range<u64>,
        has_slot: impl Iterator<Item = bool>,
        data: AlignedBuf,
        block_size: usize,
    ) -> Self {
        let mut next = 0u16;
        let slots = has_slot
            .map(|has| {
                if has {
                    next = next.saturating_add(1);
                    next - 1
                } else {
                    NO_SLOT
                }
            })
            .collect();
        Self {
            entries,
            slots,
            data,
            block_size,
        }
    }

    /// The saved bytes, slot by slot.
    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    /// The saved bytes' buffer, for the next window to reuse.
    pub(crate) fn into_data(self) -> AlignedBuf {
        self.data
    }

    /// True if `entry` is one of this window's.
    pub(crate) fn contains(&self, entry: u64) -> bool {
        self.entries.contains(&entry)
    }

    /// The saved source bytes of `entry`.
    pub(crate) fn saved_source(&self, entry: u64) -> Option<&[u8]> {
        let i = usize::try_from(entry.checked_sub(self.entries.start)?).ok()?;
        let slot = *self.slots.get(i)?;
        if slot == NO_SLOT {
            return None;
        }
        let at = usize::from(slot) * self.block_size;
        self.data.get(at..at + self.block_size)
    }
}

/// The saved bytes of one op presented as the source device around the offset the op
/// reads, so the one block producer (`CowReader::read_op_block`) can consume them.
pub(crate) struct SavedSource<'a> {
    /// Source byte offset the op reads.
    pub(crate) offset: u64,
    /// The bytes saved from there.
    pub(crate) bytes: &'a [u8],
}

impl SourceImage for SavedSource<'_> {
    fn read_exact_at(&self, buf: &mut [u8], byte_offset: u64) -> io::Result<()> {
        let part = byte_offset
            .checked_sub(self.offset)
            .and_then(|rel| usize::try_from(rel).ok())
            .and_then(|rel| self.bytes.get(rel..rel.checked_add(buf.len())?));
        match part {
            Some(p) => {
                buf.copy_from_slice(p);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes at source byte {byte_offset} are not among the saved bytes of the op",
                    buf.len()
                ),
            )),
        }
    }
}
