//! Durable, in-place updates of a COW file's merge state (fact sheet §5.3, §6.3):
//! the header's `num_merge_ops` and the scratch region (read-ahead state byte,
//! metadata list, read-ahead data).
//!
//! Every mutating call writes with `pwrite` and then `fdatasync`s the file
//! before it returns, so a successful return means the bytes are on stable
//! storage. The order of calls is the caller's crash protocol; snapuserd's is:
//!
//! 1. [`MergeState::write_scratch_data`] for each read-ahead block, then
//!    [`MergeState::write_scratch_metadata`] with the list of saved blocks;
//! 2. [`MergeState::set_buffer_state`]`(Done)`;
//! 3. merge the blocks, then [`MergeState::set_num_merge_ops`] with the new
//!    count and [`MergeState::set_buffer_state`]`(InProgress)`.
//!
//! Only these byte ranges are ever written; the op area and payloads are never
//! touched. The header is validated once at open time.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::layout::{
    BufferState, ScratchLayout, ScratchMetadata, NUM_MERGE_OPS_OFFSET, SCRATCH_METADATA_SIZE,
};
use crate::reader::{read_header, CowHeader, CowStorage, ReadError};

/// Errors from reading or updating the merge state.
#[derive(Debug, Error)]
pub enum MergeStateError {
    /// The header could not be read or is invalid.
    #[error("invalid COW header: {0}")]
    Header(#[from] ReadError),
    /// An I/O error at a byte offset.
    #[error("{op} of {len} bytes at byte {offset} failed: {source}")]
    Io {
        /// "read", "write" or "sync".
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
    /// The state byte holds an undefined value.
    #[error("scratch state byte at byte {offset} is {value}, expected 0, 1 or 2")]
    BadBufferState {
        /// Offset of the state byte.
        offset: u64,
        /// Value found.
        value: u8,
    },
    /// More metadata entries than the metadata area holds.
    #[error("{count} scratch metadata entries do not fit (at most {max})")]
    TooManyEntries {
        /// Entries given.
        count: usize,
        /// Capacity.
        max: u64,
    },
    /// A metadata entry points outside the scratch data area.
    #[error("scratch metadata entry {index}: file offset {file_offset} is not a block inside the scratch data area [{start}, {end})")]
    BadScratchOffset {
        /// Entry index.
        index: usize,
        /// The offset.
        file_offset: u64,
        /// Start of the data area.
        start: u64,
        /// End of the data area.
        end: u64,
    },
    /// An all-zero entry in the middle of a list (it would end the list early).
    #[error("scratch metadata entry {index} is all zeroes, which terminates the list")]
    TerminatorEntry {
        /// Entry index.
        index: usize,
    },
    /// A buffer of the wrong length.
    #[error("buffer is {got} bytes, expected {expected}")]
    BufferSize {
        /// Given.
        got: usize,
        /// Expected.
        expected: u64,
    },
}

/// Handle on a COW file opened read-write for merge-state updates.
#[derive(Debug)]
pub struct MergeState {
    file: File,
    header: CowHeader,
    scratch: Option<ScratchLayout>,
}

impl MergeState {
    /// Validate the header of `file` (opened read-write) and locate the
    /// `num_merge_ops` field and the scratch region.
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
        }
        Ok(Self {
            file,
            header,
            scratch,
        })
    }

    /// The header as validated at open time (its `num_merge_ops` may be stale;
    /// use [`num_merge_ops`](Self::num_merge_ops)).
    pub fn header(&self) -> &CowHeader {
        &self.header
    }

    /// Scratch region layout, if the file has one.
    pub fn scratch(&self) -> Option<&ScratchLayout> {
        self.scratch.as_ref()
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

    fn write_durably(&self, buf: &[u8], offset: u64) -> Result<(), MergeStateError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| MergeStateError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source,
            })?;
        self.sync(offset, buf.len() as u64)
    }

    fn sync(&self, offset: u64, len: u64) -> Result<(), MergeStateError> {
        self.file.sync_data().map_err(|source| MergeStateError::Io {
            op: "sync",
            offset,
            len,
            source,
        })
    }

    fn scratch_or_err(&self) -> Result<&ScratchLayout, MergeStateError> {
        self.scratch.as_ref().ok_or(MergeStateError::NoScratch)
    }

    /// Read `num_merge_ops` from disk now.
    pub fn num_merge_ops(&self) -> Result<u64, MergeStateError> {
        let mut b = [0u8; 8];
        self.read(&mut b, NUM_MERGE_OPS_OFFSET)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write `num_merge_ops` (header offset 26) and sync before returning.
    pub fn set_num_merge_ops(&mut self, value: u64) -> Result<(), MergeStateError> {
        self.write_durably(&value.to_le_bytes(), NUM_MERGE_OPS_OFFSET)
    }

    /// Read the scratch state byte.
    pub fn buffer_state(&self) -> Result<BufferState, MergeStateError> {
        let s = self.scratch_or_err()?;
        let mut b = [0u8; 1];
        self.read(&mut b, s.state_offset)?;
        BufferState::from_u8(b[0]).ok_or(MergeStateError::BadBufferState {
            offset: s.state_offset,
            value: b[0],
        })
    }

    /// Write the scratch state byte and sync before returning.
    pub fn set_buffer_state(&mut self, state: BufferState) -> Result<(), MergeStateError> {
        let off = self.scratch_or_err()?.state_offset;
        self.write_durably(&[state.as_u8()], off)
    }

    fn check_data_offset(&self, index: usize, file_offset: u64) -> Result<(), MergeStateError> {
        let s = self.scratch_or_err()?;
        let bs = u64::from(self.header.block_size());
        let ok = file_offset >= s.data_offset
            && file_offset.checked_add(bs).is_some_and(|end| end <= s.end)
            && (file_offset - s.data_offset) % bs == 0;
        if ok {
            Ok(())
        } else {
            Err(MergeStateError::BadScratchOffset {
                index,
                file_offset,
                start: s.data_offset,
                end: s.end,
            })
        }
    }

    /// Read the metadata list: entries up to (not including) the first
    /// all-zero entry, or the whole area if there is none. Entries are
    /// checked to point at whole blocks inside the scratch data area.
    pub fn read_scratch_metadata(&self) -> Result<Vec<ScratchMetadata>, MergeStateError> {
        let s = *self.scratch_or_err()?;
        let n = s.max_entries();
        let len = usize::try_from(n * SCRATCH_METADATA_SIZE as u64).map_err(|_| {
            MergeStateError::TooManyEntries {
                count: usize::MAX,
                max: n,
            }
        })?;
        let mut buf = vec![0u8; len];
        self.read(&mut buf, s.metadata_offset)?;
        let mut out = Vec::new();
        for (i, c) in buf.chunks_exact(SCRATCH_METADATA_SIZE).enumerate() {
            let mut a = [0u8; SCRATCH_METADATA_SIZE];
            a.copy_from_slice(c);
            let e = ScratchMetadata::decode(&a);
            if e.is_terminator() {
                break;
            }
            self.check_data_offset(i, e.file_offset)?;
            out.push(e);
        }
        Ok(out)
    }

    /// Write the metadata list followed by an all-zero terminator (when it
    /// fits) and sync before returning.
    pub fn write_scratch_metadata(
        &mut self,
        entries: &[ScratchMetadata],
    ) -> Result<(), MergeStateError> {
        let s = *self.scratch_or_err()?;
        let max = s.max_entries();
        if entries.len() as u64 > max {
            return Err(MergeStateError::TooManyEntries {
                count: entries.len(),
                max,
            });
        }
        let mut buf = Vec::with_capacity((entries.len() + 1) * SCRATCH_METADATA_SIZE);
        for (i, e) in entries.iter().enumerate() {
            if e.is_terminator() {
                return Err(MergeStateError::TerminatorEntry { index: i });
            }
            self.check_data_offset(i, e.file_offset)?;
            buf.extend_from_slice(&e.encode());
        }
        if (entries.len() as u64) < max {
            buf.extend_from_slice(&ScratchMetadata::default().encode());
        }
        self.write_durably(&buf, s.metadata_offset)
    }

    /// Write one block of read-ahead data at `file_offset` (inside the
    /// scratch data area, block-aligned relative to it) and sync.
    pub fn write_scratch_data(
        &mut self,
        file_offset: u64,
        data: &[u8],
    ) -> Result<(), MergeStateError> {
        self.check_block_buffer(data.len())?;
        self.check_data_offset(0, file_offset)?;
        self.write_durably(data, file_offset)
    }

    /// Read one block of read-ahead data at `file_offset`.
    pub fn read_scratch_data(
        &self,
        file_offset: u64,
        out: &mut [u8],
    ) -> Result<(), MergeStateError> {
        self.check_block_buffer(out.len())?;
        self.check_data_offset(0, file_offset)?;
        self.read(out, file_offset)
    }

    fn check_block_buffer(&self, len: usize) -> Result<(), MergeStateError> {
        let bs = u64::from(self.header.block_size());
        if len as u64 != bs {
            return Err(MergeStateError::BufferSize {
                got: len,
                expected: bs,
            });
        }
        Ok(())
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

    #[test]
    fn num_merge_ops_round_trips_through_the_file() {
        let mut m = MergeState::open(v2_file(0)).unwrap();
        assert_eq!(m.num_merge_ops().unwrap(), 0);
        m.set_num_merge_ops(0x0102_0304_0506_0708).unwrap();
        let f = m.into_file();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 26).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x0102_0304_0506_0708);
        // The rest of the header is untouched and still valid.
        let m = MergeState::open(f).unwrap();
        assert_eq!(m.header().num_merge_ops(), 0x0102_0304_0506_0708);
        assert!(matches!(m.buffer_state(), Err(MergeStateError::NoScratch)));
    }

    #[test]
    fn scratch_state_metadata_and_data() {
        let mut m = MergeState::open(v2_file(BUFFER_REGION_DEFAULT_SIZE)).unwrap();
        let s = *m.scratch().unwrap();
        assert_eq!(
            (s.state_offset, s.metadata_offset, s.data_offset),
            (38, 39, 38 + 8192)
        );
        assert_eq!(m.buffer_state().unwrap(), BufferState::NotStarted);
        assert!(m.read_scratch_metadata().unwrap().is_empty());

        let block = vec![0x5Au8; 4096];
        let at = s.data_offset + 4096;
        m.write_scratch_data(at, &block).unwrap();
        let entries = [
            ScratchMetadata {
                new_block: 9,
                file_offset: at,
            },
            ScratchMetadata {
                new_block: 0,
                file_offset: s.data_offset,
            },
        ];
        m.write_scratch_metadata(&entries).unwrap();
        m.set_buffer_state(BufferState::Done).unwrap();

        let m = MergeState::open(m.into_file()).unwrap();
        assert_eq!(m.buffer_state().unwrap(), BufferState::Done);
        assert_eq!(m.read_scratch_metadata().unwrap(), entries);
        let mut out = vec![0u8; 4096];
        m.read_scratch_data(at, &mut out).unwrap();
        assert_eq!(out, block);

        // A shorter list overwrites with a terminator.
        let mut m = m;
        m.write_scratch_metadata(&entries[..1]).unwrap();
        assert_eq!(m.read_scratch_metadata().unwrap(), entries[..1]);
    }

    #[test]
    fn scratch_rules_are_enforced() {
        let mut m = MergeState::open(v2_file(BUFFER_REGION_DEFAULT_SIZE)).unwrap();
        let s = *m.scratch().unwrap();
        let block = vec![1u8; 4096];
        assert!(m.write_scratch_data(s.data_offset - 4096, &block).is_err());
        assert!(m.write_scratch_data(s.data_offset + 1, &block).is_err());
        assert!(m.write_scratch_data(s.end - 4095, &block).is_err());
        assert!(m.write_scratch_data(s.data_offset, &block[..100]).is_err());
        let too_many: Vec<ScratchMetadata> = (0..512)
            .map(|i| ScratchMetadata {
                new_block: i + 1,
                file_offset: s.data_offset,
            })
            .collect();
        assert!(matches!(
            m.write_scratch_metadata(&too_many),
            Err(MergeStateError::TooManyEntries { .. })
        ));
        assert!(m.write_scratch_metadata(&too_many[..511]).is_ok());
        assert_eq!(m.read_scratch_metadata().unwrap().len(), 511);
        assert!(matches!(
            m.write_scratch_metadata(&[ScratchMetadata::default()]),
            Err(MergeStateError::TerminatorEntry { index: 0 })
        ));
        // A bad state byte on disk is reported.
        m.file.write_all_at(&[7], s.state_offset).unwrap();
        assert!(matches!(
            m.buffer_state(),
            Err(MergeStateError::BadBufferState { value: 7, .. })
        ));
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
        m.set_num_merge_ops(3).unwrap();
        assert_eq!(m.num_merge_ops().unwrap(), 3);
        m.set_buffer_state(BufferState::InProgress).unwrap();
        assert_eq!(m.buffer_state().unwrap(), BufferState::InProgress);
    }
}
