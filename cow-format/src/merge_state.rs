//! Durable merge state of a COW file (fact sheet §5.3, §6.3): the header's `num_merge_ops`
//! and the scratch region (read-ahead state byte, metadata list, window data).
//!
//! [`MergeState`] owns the durable operations a merging daemon performs, each written with
//! `pwrite` and `fdatasync`ed before it returns, so `Ok` means the bytes are on stable
//! storage:
//!
//! * [`MergeState::write_window`]: save a read-ahead window. The data slots and the metadata
//!   list (zero-terminated) are written and synced ([`MergeState::stage_window`]), then the
//!   state byte is set to Done and synced ([`MergeState::mark_window_done`]). A crash between
//!   the two leaves the previous state, never a Done window with missing bytes.
//! * [`MergeState::commit_window`]: `num_merge_ops` and state InProgress in **one** write of
//!   header bytes `0..=header_size` (inside the first sector, so it is atomic) and one sync.
//! * [`MergeState::commit_merged`]: `num_merge_ops` alone (8 bytes at offset 26), synced: the
//!   commit of a COW without scratch, and of ops whose replay is harmless.
//!
//! Reading back: [`MergeState::progress`] (both durable values) and
//! [`MergeState::read_window`]. A window holds at most [`MergeState::window_capacity`]
//! blocks ([`READ_AHEAD_WINDOW_BLOCKS`] for the default region), stored in consecutive slots
//! from the start of the data area.
//!
//! Only these byte ranges are ever written; the op area and payloads are never touched. The
//! header and the scratch region's bounds are validated once, at open.
//!
//! Given an `O_DIRECT` descriptor of the same file ([`MergeState::set_direct_writes`]), a
//! window's save sends the page-aligned middle of the scratch region through it (the
//! `direct_scratch` module); the `fdatasync` of the buffered descriptor covers both.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::direct_scratch::{direct_refused, DirectScratch, DirectSpan};
#[cfg(doc)]
use crate::layout::READ_AHEAD_WINDOW_BLOCKS;
use crate::layout::{
    BufferState, ScratchLayout, ScratchMetadata, ATOMIC_WRITE_SECTOR, NUM_MERGE_OPS_OFFSET,
    SCRATCH_METADATA_SIZE,
};
use crate::reader::{read_header, CowHeader, CowStorage, ReadError};

/// Errors from reading or updating the merge state.
#[derive(Debug, Error)]
pub enum MergeStateError {
    /// The header could not be read or is invalid.
    #[error(transparent)]
    Header(#[from] ReadError),
    /// An I/O error at a byte offset of the COW file.
    #[error("{op} of {len} bytes at byte {offset} of the COW file failed")]
    Io {
        /// "read", "write", "O_DIRECT write" or "sync".
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file has no scratch region (buffer_size 0).
    #[error("the COW file has no scratch region (buffer_size is 0)")]
    NoScratch,
    /// The header is too large for the one-sector window commit.
    #[error(
        "COW header of {header_size} bytes puts the scratch state byte outside the first sector"
    )]
    HeaderTooLarge {
        /// Header size.
        header_size: u64,
    },
    /// The state byte holds an undefined value.
    #[error("scratch state byte at byte {offset} is {value}, expected 0, 1 or 2")]
    BadBufferState {
        /// Offset of the state byte.
        offset: u64,
        /// Value found.
        value: u8,
    },
    /// A window larger than the scratch region holds (given, or found on disk without a
    /// terminator).
    #[error("a read-ahead window of {blocks} blocks exceeds the scratch capacity of {capacity}")]
    WindowTooLarge {
        /// Blocks given or found.
        blocks: usize,
        /// Capacity in blocks.
        capacity: u64,
    },
    /// A metadata entry on disk points outside the scratch data area or between blocks.
    #[error("scratch metadata entry {index} (block {new_block}): file offset {file_offset} is not a block of the data area [{start}, {end})")]
    BadScratchOffset {
        /// Entry index.
        index: usize,
        /// The entry's block.
        new_block: u64,
        /// The offset.
        file_offset: u64,
        /// Start of the data area.
        start: u64,
        /// End of the window slots.
        end: u64,
    },
    /// Window data whose length is not one block per listed block.
    #[error("a window of {blocks} blocks carries {got} data bytes, expected {expected}")]
    WindowDataSize {
        /// Blocks listed.
        blocks: usize,
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: u64,
    },
}

impl From<MergeStateError> for io::Error {
    /// An `io::Error` carrying the typed error (as its inner error); the kind is the
    /// underlying OS error's for I/O failures, `InvalidData` otherwise.
    fn from(e: MergeStateError) -> Self {
        let kind = match &e {
            MergeStateError::Io { source, .. } => source.kind(),
            MergeStateError::Header(ReadError::Io { source, .. }) => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// A read-ahead window: the blocks whose source bytes were saved, and those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScratchWindow {
    /// `new_block` of each saved op, in merge order.
    pub new_blocks: Vec<u64>,
    /// One block of saved bytes per entry of `new_blocks`, concatenated in the same order.
    pub data: Vec<u8>,
}

impl ScratchWindow {
    /// Check that this saved window belongs to the pending position: it lists exactly the
    /// `expected` blocks (the destinations of the ordered ops of the window the progress
    /// points at), in order, with one block of `block_size` bytes each. A Done window is
    /// only ever replayed after this check. The error says what differs.
    pub fn check_blocks(
        &self,
        expected: impl IntoIterator<Item = u64>,
        block_size: usize,
    ) -> Result<(), String> {
        let mut listed = 0usize;
        for (slot, want) in expected.into_iter().enumerate() {
            match self.new_blocks.get(slot) {
                Some(&have) if have == want => listed += 1,
                Some(&have) => {
                    return Err(format!(
                        "scratch slot {slot} holds block {have}, the pending op writes block {want}"
                    ))
                }
                None => {
                    return Err(format!(
                    "scratch lists {} blocks, more ops are pending (the next writes block {want})",
                    self.new_blocks.len()
                ))
                }
            }
        }
        if listed != self.new_blocks.len() {
            return Err(format!(
                "scratch lists {} blocks, {listed} ops are pending",
                self.new_blocks.len()
            ));
        }
        if Some(self.data.len()) != listed.checked_mul(block_size) {
            return Err(format!(
                "{} data bytes for {listed} blocks of {block_size} bytes",
                self.data.len()
            ));
        }
        Ok(())
    }
}

/// Both durable merge-progress values, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableProgress {
    /// The header's `num_merge_ops` (merge-order entries merged).
    pub num_merge_ops: u64,
    /// The scratch state byte; `NotStarted` for a file without scratch region.
    pub state: BufferState,
}

/// Handle on a COW file opened read-write for merge-state updates.
#[derive(Debug)]
pub struct MergeState {
    file: File,
    header: CowHeader,
    scratch: Option<ScratchLayout>,
    /// `O_DIRECT` descriptor for window saves, until the file refuses a direct write.
    direct: Option<DirectScratch>,
}

impl MergeState {
    /// Validate the header of `file` (opened read-write) and locate the `num_merge_ops`
    /// field and the scratch region (which must lie inside the file, with its state byte in
    /// the first sector).
    pub fn open(file: File) -> Result<Self, MergeStateError> {
        let size = file.size().map_err(ReadError::Size)?;
        let header = read_header(&file, size)?;
        let scratch = ScratchLayout::new(header.header_size().into(), header.buffer_size());
        if let Some(s) = &scratch {
            if s.end > size {
                return Err(ReadError::OutOfBounds {
                    what: "scratch region",
                    offset: s.state_offset,
                    len: s.end - s.state_offset,
                    file_size: size,
                }
                .into());
            }
            if s.state_offset >= ATOMIC_WRITE_SECTOR {
                return Err(MergeStateError::HeaderTooLarge {
                    header_size: s.state_offset,
                });
            }
        }
        Ok(Self {
            file,
            header,
            scratch,
            direct: None,
        })
    }

    /// Save windows through `direct`, a descriptor of the same file opened with `O_DIRECT`:
    /// the page-aligned part of each save skips the page cache (2 MiB per full window).
    /// Should the file refuse a direct write (alignment, filesystem), the save is redone
    /// buffered, logged once, and later saves stay buffered.
    pub fn set_direct_writes(&mut self, direct: File) {
        self.direct = Some(DirectScratch::new(direct));
    }

    /// True while window saves go through an `O_DIRECT` descriptor.
    pub fn direct_writes(&self) -> bool {
        self.direct.is_some()
    }

    /// The header as validated at open time (its `num_merge_ops` may be stale: use
    /// [`progress`](Self::progress)).
    pub fn header(&self) -> &CowHeader {
        &self.header
    }

    /// Scratch region layout, if the file has one.
    pub fn scratch(&self) -> Option<&ScratchLayout> {
        self.scratch.as_ref()
    }

    /// Blocks one read-ahead window holds; 0 without scratch region.
    pub fn window_capacity(&self) -> usize {
        self.scratch.map_or(0, |s| {
            usize::try_from(s.window_capacity(self.header.block_size())).unwrap_or(usize::MAX)
        })
    }

    /// Give back the file.
    pub fn into_file(self) -> File {
        self.file
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), MergeStateError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| MergeStateError::Io {
                op: "read",
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), MergeStateError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| MergeStateError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    fn sync(&self, offset: u64, len: u64) -> Result<(), MergeStateError> {
        self.file.sync_data().map_err(|source| MergeStateError::Io {
            op: "sync",
            offset,
            len,
            source,
        })
    }

    fn write_durably(&self, buf: &[u8], offset: u64) -> Result<(), MergeStateError> {
        self.write(buf, offset)?;
        self.sync(offset, buf.len() as u64)
    }

    fn scratch_or_err(&self) -> Result<ScratchLayout, MergeStateError> {
        self.scratch.ok_or(MergeStateError::NoScratch)
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size())
    }

    /// Read both durable values now.
    pub fn progress(&self) -> Result<DurableProgress, MergeStateError> {
        let mut b = [0u8; 8];
        self.read(&mut b, NUM_MERGE_OPS_OFFSET)?;
        let state = match self.scratch {
            None => BufferState::NotStarted,
            Some(s) => {
                let mut byte = [0u8; 1];
                self.read(&mut byte, s.state_offset)?;
                BufferState::from_u8(byte[0]).ok_or(MergeStateError::BadBufferState {
                    offset: s.state_offset,
                    value: byte[0],
                })?
            }
        };
        Ok(DurableProgress {
            num_merge_ops: u64::from_le_bytes(b),
            state,
        })
    }

    /// Set `num_merge_ops` (8 bytes at header offset 26) and sync: the commit of a COW
    /// without scratch region, and of ops whose replay after a crash is harmless. The
    /// scratch state is left as it is.
    pub fn commit_merged(&mut self, num_merge_ops: u64) -> Result<(), MergeStateError> {
        self.write_durably(&num_merge_ops.to_le_bytes(), NUM_MERGE_OPS_OFFSET)
    }

    /// Set `num_merge_ops` and state InProgress with one write of header bytes
    /// `0..=header_size` (all inside the first sector, checked at open) and sync: the
    /// window's ops are merged and its saved bytes are no longer needed.
    pub fn commit_window(&mut self, num_merge_ops: u64) -> Result<(), MergeStateError> {
        let s = self.scratch_or_err()?;
        // state_offset < 512 (checked at open), so these casts cannot truncate.
        let mut head = vec![0u8; s.state_offset as usize + 1];
        self.read(&mut head, 0)?;
        let at = NUM_MERGE_OPS_OFFSET as usize;
        head[at..at + 8].copy_from_slice(&num_merge_ops.to_le_bytes());
        head[s.state_offset as usize] = BufferState::InProgress.as_u8();
        self.write_durably(&head, 0)
    }

    /// Save `window` (durable on return) and mark it Done: [`stage_window`](Self::stage_window)
    /// then [`mark_window_done`](Self::mark_window_done).
    pub fn write_window(&mut self, window: &ScratchWindow) -> Result<(), MergeStateError> {
        self.stage_window(window)?;
        self.mark_window_done()
    }

    /// First half of [`write_window`](Self::write_window): write the window's data into
    /// consecutive slots and its metadata list (zero-terminated), then sync once. The state
    /// byte is not touched, so a crash here leaves the previous state.
    pub fn stage_window(&mut self, window: &ScratchWindow) -> Result<(), MergeStateError> {
        self.stage_window_parts(&window.new_blocks, &window.data)
    }

    /// [`stage_window`](Self::stage_window) from the window's parts: `new_blocks` (one per
    /// saved slot, in merge order) and `data` (one block per slot, concatenated), so a
    /// caller keeping the bytes in its own buffer needs no copy.
    pub fn stage_window_parts(
        &mut self,
        new_blocks: &[u64],
        data: &[u8],
    ) -> Result<(), MergeStateError> {
        let s = self.scratch_or_err()?;
        let capacity = s.window_capacity(self.header.block_size());
        let blocks = new_blocks.len();
        if blocks as u64 > capacity {
            return Err(MergeStateError::WindowTooLarge { blocks, capacity });
        }
        let expected = blocks as u64 * self.block_size();
        if data.len() as u64 != expected {
            return Err(MergeStateError::WindowDataSize {
                blocks,
                got: data.len(),
                expected,
            });
        }
        // The whole list area of a full window (capacity entries plus the terminator, inside
        // the metadata area): the entries, then zeroes, so no stale entry survives.
        let mut meta = vec![0u8; (capacity as usize + 1) * SCRATCH_METADATA_SIZE];
        for ((slot, &new_block), raw) in new_blocks
            .iter()
            .enumerate()
            .zip(meta.chunks_exact_mut(SCRATCH_METADATA_SIZE))
        {
            let file_offset = s.data_offset + slot as u64 * self.block_size();
            raw.copy_from_slice(
                &ScratchMetadata {
                    new_block,
                    file_offset,
                }
                .encode(),
            );
        }
        if !self.stage_direct(&s, &meta, data)? {
            self.write(data, s.data_offset)?;
            self.write(&meta, s.metadata_offset)?;
        }
        self.sync(s.metadata_offset, s.end - s.metadata_offset)
    }

    /// Write a window save's list `meta` and `data` with the page-aligned span through the
    /// `O_DIRECT` descriptor and the rest buffered; `false` (nothing written) when there is
    /// no direct descriptor, no span, or the file refused the direct write.
    fn stage_direct(
        &mut self,
        s: &ScratchLayout,
        meta: &[u8],
        data: &[u8],
    ) -> Result<bool, MergeStateError> {
        let Some(direct) = self.direct.as_mut() else {
            return Ok(false);
        };
        let Some(plan) = DirectSpan::plan(s, meta.len() as u64, data.len() as u64) else {
            return Ok(false);
        };
        match direct.write_span(&self.file, s, &plan, meta, data) {
            Ok(()) => {}
            Err(e) if direct_refused(&e) => {
                log::warn!(
                    "the COW file refuses O_DIRECT writes of its scratch region ({e}); window \
                     saves go through the page cache from now on (correct, slower)"
                );
                self.direct = None;
                return Ok(false);
            }
            Err(source) => {
                return Err(MergeStateError::Io {
                    op: "O_DIRECT write",
                    offset: plan.span.start,
                    len: plan.span.end - plan.span.start,
                    source,
                })
            }
        }
        self.write(&meta[..plan.list_before], s.metadata_offset)?;
        if plan.data_after > 0 {
            self.write(&data[data.len() - plan.data_after..], plan.span.end)?;
        }
        Ok(true)
    }

    /// Second half of [`write_window`](Self::write_window): set the state byte to Done and
    /// sync.
    pub fn mark_window_done(&mut self) -> Result<(), MergeStateError> {
        let s = self.scratch_or_err()?;
        self.write_durably(&[BufferState::Done.as_u8()], s.state_offset)
    }

    /// Read the saved window: metadata entries up to the all-zero terminator (each checked
    /// to name a slot inside the window capacity) and the data of each. Meaningful when the
    /// state is Done.
    pub fn read_window(&self) -> Result<ScratchWindow, MergeStateError> {
        let s = self.scratch_or_err()?;
        let bs = self.block_size();
        let capacity = s.window_capacity(self.header.block_size());
        // capacity ≤ 511 (the metadata area of a ≤ 4 GiB region / 4096 * 16 / 16).
        let listed = capacity as usize + 1;
        let mut meta = vec![0u8; listed * SCRATCH_METADATA_SIZE];
        self.read(&mut meta, s.metadata_offset)?;
        let slots_end = s.data_offset + capacity * bs;
        let mut window = ScratchWindow::default();
        let mut offsets = Vec::new();
        for (index, raw) in meta.chunks_exact(SCRATCH_METADATA_SIZE).enumerate() {
            let mut a = [0u8; SCRATCH_METADATA_SIZE];
            a.copy_from_slice(raw);
            let e = ScratchMetadata::decode(&a);
            if e.is_terminator() {
                break;
            }
            if index as u64 >= capacity {
                return Err(MergeStateError::WindowTooLarge {
                    blocks: index + 1,
                    capacity,
                });
            }
            let in_slot = e
                .file_offset
                .checked_sub(s.data_offset)
                .is_some_and(|rel| rel % bs == 0)
                && e.file_offset < slots_end;
            if !in_slot {
                return Err(MergeStateError::BadScratchOffset {
                    index,
                    new_block: e.new_block,
                    file_offset: e.file_offset,
                    start: s.data_offset,
                    end: slots_end,
                });
            }
            window.new_blocks.push(e.new_block);
            offsets.push(e.file_offset);
        }
        // bs ≤ 65535 and at most 510 entries: no overflow.
        window.data = vec![0u8; offsets.len() * bs as usize];
        for (slot, offset) in window.data.chunks_exact_mut(bs as usize).zip(offsets) {
            self.read(slot, offset)?;
        }
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{CowHeaderV2, CowHeaderV3, BUFFER_REGION_DEFAULT_SIZE};
    use std::io::Write;

    fn v2_file(buffer_size: u32) -> File {
        let mut f = tempfile::tempfile().unwrap();
        let h = CowHeaderV2::new(4096, 1024, buffer_size);
        f.write_all(&h.encode()).unwrap();
        f.set_len(38 + u64::from(buffer_size) + 84).unwrap();
        f
    }

    fn window(blocks: &[u64]) -> ScratchWindow {
        ScratchWindow {
            new_blocks: blocks.to_vec(),
            data: (0..blocks.len() * 4096)
                .map(|i| (i * 7 % 253) as u8)
                .collect(),
        }
    }

    #[test]
    fn check_blocks_names_what_differs() {
        let w = window(&[5, 9, 2]);
        assert_eq!(w.check_blocks([5, 9, 2], 4096), Ok(()));
        let slot = w.check_blocks([5, 8, 2], 4096).unwrap_err();
        assert!(slot.contains("slot 1 holds block 9"), "{slot}");
        let short = w.check_blocks([5, 9, 2, 7], 4096).unwrap_err();
        assert!(short.contains("next writes block 7"), "{short}");
        let long = w.check_blocks([5, 9], 4096).unwrap_err();
        assert!(long.contains("2 ops are pending"), "{long}");
        let mut torn = w.clone();
        torn.data.truncate(100);
        assert!(torn.check_blocks([5, 9, 2], 4096).is_err());
    }

    #[test]
    fn commit_merged_writes_only_num_merge_ops() {
        let mut m = MergeState::open(v2_file(0)).unwrap();
        assert_eq!(m.window_capacity(), 0);
        assert_eq!(
            m.progress().unwrap(),
            DurableProgress {
                num_merge_ops: 0,
                state: BufferState::NotStarted
            }
        );
        m.commit_merged(0x0102_0304_0506_0708).unwrap();
        let f = m.into_file();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 26).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x0102_0304_0506_0708);
        // The rest of the header is untouched and still valid.
        let mut m = MergeState::open(f).unwrap();
        assert_eq!(m.header().num_merge_ops(), 0x0102_0304_0506_0708);
        assert!(matches!(
            m.write_window(&window(&[1])),
            Err(MergeStateError::NoScratch)
        ));
        assert!(matches!(
            m.commit_window(1),
            Err(MergeStateError::NoScratch)
        ));
        assert!(matches!(m.read_window(), Err(MergeStateError::NoScratch)));
    }

    #[test]
    fn window_round_trips_and_commit_sets_in_progress() {
        let mut m = MergeState::open(v2_file(BUFFER_REGION_DEFAULT_SIZE)).unwrap();
        assert_eq!(m.window_capacity(), 510);
        let s = *m.scratch().unwrap();
        assert_eq!(
            (s.state_offset, s.metadata_offset, s.data_offset),
            (38, 39, 38 + 8192)
        );
        assert_eq!(m.progress().unwrap().state, BufferState::NotStarted);
        assert_eq!(m.read_window().unwrap(), ScratchWindow::default());

        // Block 0 in slot 0 is an entry, not the terminator (its offset is not 0).
        let w = window(&[9, 0, 5]);
        m.stage_window(&w).unwrap();
        assert_eq!(m.progress().unwrap().state, BufferState::NotStarted);
        m.mark_window_done().unwrap();
        let m = MergeState::open(m.into_file()).unwrap();
        assert_eq!(m.progress().unwrap().state, BufferState::Done);
        assert_eq!(m.read_window().unwrap(), w);
        let mut raw = [0u8; 16];
        m.file.read_exact_at(&mut raw, 39 + 16).unwrap();
        assert_eq!(
            ScratchMetadata::decode(&raw),
            ScratchMetadata {
                new_block: 0,
                file_offset: s.data_offset + 4096
            }
        );

        // A shorter window ends with a terminator over the old list.
        let mut m = m;
        let w = window(&[4]);
        m.write_window(&w).unwrap();
        assert_eq!(m.read_window().unwrap(), w);

        let before: Vec<u8> = {
            let mut b = vec![0u8; 38];
            m.file.read_exact_at(&mut b, 0).unwrap();
            b
        };
        m.commit_window(77).unwrap();
        assert_eq!(
            m.progress().unwrap(),
            DurableProgress {
                num_merge_ops: 77,
                state: BufferState::InProgress
            }
        );
        let mut after = vec![0u8; 38];
        m.file.read_exact_at(&mut after, 0).unwrap();
        assert_eq!(after[..26], before[..26]);
        assert_eq!(after[34..], before[34..]);
    }

    #[test]
    fn window_limits_are_enforced() {
        let mut m = MergeState::open(v2_file(BUFFER_REGION_DEFAULT_SIZE)).unwrap();
        let blocks: Vec<u64> = (1..=511).collect();
        assert!(matches!(
            m.write_window(&window(&blocks)),
            Err(MergeStateError::WindowTooLarge {
                blocks: 511,
                capacity: 510
            })
        ));
        let full = window(&blocks[..510]);
        m.write_window(&full).unwrap();
        assert_eq!(m.read_window().unwrap(), full);
        let mut short = window(&[1, 2]);
        short.data.truncate(4096);
        assert!(matches!(
            m.write_window(&short),
            Err(MergeStateError::WindowDataSize { got: 4096, .. })
        ));

        // On disk: a list without terminator, a misaligned offset, a slot past capacity.
        let s = *m.scratch().unwrap();
        let entry = |block: u64, off: u64| {
            ScratchMetadata {
                new_block: block,
                file_offset: off,
            }
            .encode()
        };
        m.file
            .write_all_at(&entry(600, s.data_offset), s.metadata_offset + 510 * 16)
            .unwrap();
        assert!(matches!(
            m.read_window(),
            Err(MergeStateError::WindowTooLarge { blocks: 511, .. })
        ));
        m.write_window(&window(&[3])).unwrap();
        m.file
            .write_all_at(&entry(3, s.data_offset + 1), s.metadata_offset)
            .unwrap();
        assert!(matches!(
            m.read_window(),
            Err(MergeStateError::BadScratchOffset { index: 0, .. })
        ));
        m.file
            .write_all_at(&entry(3, s.data_offset + 510 * 4096), s.metadata_offset)
            .unwrap();
        assert!(matches!(
            m.read_window(),
            Err(MergeStateError::BadScratchOffset { index: 0, .. })
        ));
        // A bad state byte on disk is reported, and converts to an InvalidData io::Error.
        m.file.write_all_at(&[7], s.state_offset).unwrap();
        let err = m.progress().unwrap_err();
        assert!(matches!(
            err,
            MergeStateError::BadBufferState { value: 7, .. }
        ));
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn v3_header_and_truncated_scratch() {
        let mut f = tempfile::tempfile().unwrap();
        let h = CowHeaderV3::new(4096, BUFFER_REGION_DEFAULT_SIZE, 4, 0, 4096);
        f.write_all(&h.encode()).unwrap();
        // Scratch region cut short: refused at open.
        f.set_len(78 + 1000).unwrap();
        assert!(MergeState::open(f.try_clone().unwrap()).is_err());
        f.set_len(78 + u64::from(BUFFER_REGION_DEFAULT_SIZE) + 64 + 64)
            .unwrap();
        let mut m = MergeState::open(f).unwrap();
        assert_eq!(m.scratch().unwrap().data_offset, 78 + 8192);
        m.commit_merged(3).unwrap();
        assert_eq!(m.progress().unwrap().num_merge_ops, 3);
        m.commit_window(4).unwrap();
        assert_eq!(
            m.progress().unwrap(),
            DurableProgress {
                num_merge_ops: 4,
                state: BufferState::InProgress
            }
        );
    }

    /// A v3 COW file (78-byte header, default scratch region) whose bytes outside the header
    /// are a pattern (so a write that clobbers a byte it should keep shows), and a second
    /// descriptor of it opened with `O_DIRECT`; `None` where the filesystem has no `O_DIRECT`.
    fn v3_patterned_with_direct() -> Option<(File, File)> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = tempfile::tempfile().unwrap();
        let h = CowHeaderV3::new(4096, BUFFER_REGION_DEFAULT_SIZE, 4, 0, 4096);
        let len = 78 + BUFFER_REGION_DEFAULT_SIZE as usize + 3 * 4096 + 11;
        let mut bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8 + 1).collect();
        bytes[..78].copy_from_slice(&h.encode());
        bytes[78] = 0; // state NotStarted
        f.write_all(&bytes).unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .ok()?;
        Some((f, direct))
    }

    fn whole(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn a_direct_save_writes_exactly_what_a_buffered_save_writes() {
        // Full window (its last bytes share a page with what follows the region), a short
        // one (its last page keeps the unused slots' bytes), one block, then a short one
        // over a full one (stale entries cleared by the list's zeroes).
        let full: Vec<u64> = (1000..1510).collect();
        let cases: [&[&[u64]]; 4] = [&[&full], &[&[7, 3, 9]], &[&[42]], &[&full, &[5, 6]]];
        for saves in cases {
            let Some((f_direct, direct)) = v3_patterned_with_direct() else {
                return; // no O_DIRECT here: the buffered path is tested everywhere else
            };
            let (f_buffered, _) = v3_patterned_with_direct().unwrap();
            let mut a = MergeState::open(f_direct).unwrap();
            a.set_direct_writes(direct);
            let mut b = MergeState::open(f_buffered).unwrap();
            for blocks in saves {
                let w = window(blocks);
                a.write_window(&w).unwrap();
                b.write_window(&w).unwrap();
                assert!(a.direct_writes(), "the direct descriptor was given up");
                assert_eq!(a.read_window().unwrap(), w);
            }
            let (fa, fb) = (a.into_file(), b.into_file());
            let (da, db) = (whole(&fa), whole(&fb));
            assert_eq!(da.len(), db.len());
            let first = da.iter().zip(&db).position(|(x, y)| x != y);
            assert_eq!(
                first, None,
                "files differ at byte {first:?} after {saves:?}"
            );
        }
    }

    #[test]
    fn a_refused_direct_write_is_redone_buffered_and_stays_buffered() {
        let Some((f, _)) = v3_patterned_with_direct() else {
            return;
        };
        // A read-only descriptor refuses writes with EBADF, which is not a refusal of
        // O_DIRECT: the save fails and names the direct write.
        let ro = File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&f)
        ))
        .unwrap();
        let mut m = MergeState::open(f.try_clone().unwrap()).unwrap();
        m.set_direct_writes(ro);
        let err = m.write_window(&window(&[1, 2])).unwrap_err();
        assert!(
            matches!(
                err,
                MergeStateError::Io {
                    op: "O_DIRECT write",
                    ..
                }
            ),
            "{err:?}"
        );
        // The span logic does not depend on O_DIRECT: any writable descriptor of the file
        // in that role saves the window right.
        let mut m = MergeState::open(f.try_clone().unwrap()).unwrap();
        m.set_direct_writes(f.try_clone().unwrap());
        m.write_window(&window(&[1, 2])).unwrap();
        assert_eq!(m.read_window().unwrap(), window(&[1, 2]));
    }
}
