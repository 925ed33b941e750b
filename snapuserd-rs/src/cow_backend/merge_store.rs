//! [`MergeStateStore`] on the COW file itself (cow-format.md §5.3, §6.3).
//!
//! * `num_merge_ops` (header offset 26) counts merge-order **entries**; the core counts
//!   planned ops. [`ProgressMap`] converts (a commit that ends inside a multi-block REPLACE
//!   is rounded down to the entries fully merged; replaying a REPLACE reads nothing).
//! * The scratch region (state byte, metadata list, data slots) is laid out by
//!   [`ScratchGeometry`].
//!
//! Durability: every mutating call writes with `pwrite` and `fdatasync`s before returning.
//! `write_window` writes the data slots and the metadata list, syncs, then writes state Done
//! and syncs. `commit_window` writes `num_merge_ops` and state InProgress with **one**
//! `pwrite` of the header bytes `0..=header_size` (inside the first sector) and syncs.
//!
//! The header and the scratch region bounds are validated once at open through
//! [`cow_format::MergeState`], which also supplies the durable values read at open.
//! Window data is written here directly so a 510-block window costs one data write and
//! two syncs, not one sync per block.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use cow_format::layout::BufferState;
use cow_format::{MergeState, MergeStateError};
use thiserror::Error;

use super::plan::ProgressMap;
use crate::snapshot::merge_plan::BLOCK_SIZE;
use crate::snapshot::merge_tracker::{MergeStateStore, ScratchState, ScratchWindow};
use crate::snapshot::scratch_layout::{ScratchGeometry, ScratchLayoutError};

/// Byte offset of `num_merge_ops` in every COW header version.
const NUM_MERGE_OPS_OFFSET: u64 = 26;
/// `commit_window` rewrites header bytes `0..=header_size` in one write, which is atomic
/// only inside one sector.
const SECTOR: u64 = 512;

/// Errors opening the durable merge state.
#[derive(Debug, Error)]
pub enum CowMergeStoreError {
    /// The header or scratch region is invalid, or reading it failed.
    #[error("COW merge state: {0}")]
    MergeState(#[from] MergeStateError),
    /// The scratch region cannot hold a window.
    #[error("COW scratch region: {0}")]
    Geometry(#[from] ScratchLayoutError),
    /// The header is too large for the one-sector window commit.
    #[error(
        "COW header of {header_size} bytes leaves the scratch state byte outside the first sector"
    )]
    HeaderTooLarge {
        /// Header size.
        header_size: u64,
    },
    /// The durable `num_merge_ops` names more entries than the merge order has.
    #[error("durable num_merge_ops {num_merge_ops} exceeds the {entries} merge-order entries")]
    MergedBeyondEnd {
        /// Durable value.
        num_merge_ops: u64,
        /// Entries.
        entries: usize,
    },
}

/// Durable merge progress kept in the COW file.
#[derive(Debug)]
pub struct CowMergeStore {
    file: File,
    header_size: u64,
    geometry: Option<ScratchGeometry>,
    progress: ProgressMap,
    /// Durable `num_merge_ops` in merge-order entries, as read at open.
    durable_entries: u64,
    /// Last committed progress, in planned ops.
    planned: u64,
    state: ScratchState,
    #[cfg(test)]
    clock: Option<crate::snapshot::test_support::CrashClock>,
}

/// The durable values found at open, before the plan exists.
#[derive(Debug)]
pub struct OpenedMergeState {
    file: File,
    header_size: u64,
    geometry: Option<ScratchGeometry>,
    durable_entries: u64,
    state: ScratchState,
}

impl OpenedMergeState {
    /// Durable `num_merge_ops` (merge-order entries): build the plan with it.
    pub fn num_merge_ops(&self) -> u64 {
        self.durable_entries
    }

    /// Finish opening with the plan's entry/planned-op map.
    pub fn into_store(self, progress: ProgressMap) -> Result<CowMergeStore, CowMergeStoreError> {
        let planned = progress.planned_for_entries(self.durable_entries).ok_or(
            CowMergeStoreError::MergedBeyondEnd {
                num_merge_ops: self.durable_entries,
                entries: progress.entries(),
            },
        )?;
        Ok(CowMergeStore {
            file: self.file,
            header_size: self.header_size,
            geometry: self.geometry,
            progress,
            durable_entries: self.durable_entries,
            planned,
            state: self.state,
            #[cfg(test)]
            clock: None,
        })
    }
}

fn state_from(b: BufferState) -> ScratchState {
    match b {
        BufferState::NotStarted => ScratchState::NotStarted,
        BufferState::InProgress => ScratchState::InProgress,
        BufferState::Done => ScratchState::Done,
    }
}

/// The header and scratch bounds of the COW `file`, validated ([`MergeState`]).
fn read_merge_state(file: &File) -> Result<MergeState, CowMergeStoreError> {
    let clone = file.try_clone().map_err(|source| MergeStateError::Io {
        op: "dup",
        offset: 0,
        len: 0,
        source,
    })?;
    Ok(MergeState::open(clone)?)
}

/// Durable `num_merge_ops` (entries) and scratch state (NotStarted without scratch).
fn durable_pair(ms: &MergeState) -> Result<(u64, ScratchState), MergeStateError> {
    let entries = ms.num_merge_ops()?;
    let state = if ms.header().buffer_size() == 0 {
        ScratchState::NotStarted
    } else {
        state_from(ms.buffer_state()?)
    };
    Ok((entries, state))
}

impl CowMergeStore {
    /// Read the durable merge state of the COW `file` (opened read-write).
    pub fn open(file: File) -> Result<OpenedMergeState, CowMergeStoreError> {
        let ms = read_merge_state(&file)?;
        let header_size = u64::from(ms.header().header_size());
        let buffer_size = u64::from(ms.header().buffer_size());
        let (durable_entries, state) = durable_pair(&ms)?;
        let geometry = if buffer_size == 0 {
            None
        } else {
            if header_size >= SECTOR {
                return Err(CowMergeStoreError::HeaderTooLarge { header_size });
            }
            Some(ScratchGeometry::new(header_size, buffer_size)?)
        };
        log::debug!(
            "COW merge state: num_merge_ops {durable_entries}, scratch {:?}, state {state:?}",
            geometry.map(|g| g.capacity_blocks())
        );
        Ok(OpenedMergeState {
            file,
            header_size,
            geometry,
            durable_entries,
            state,
        })
    }

    /// Durable `num_merge_ops` in merge-order entries as last written (or read at open).
    pub fn durable_entries(&self) -> u64 {
        self.durable_entries
    }

    #[cfg(test)]
    pub(crate) fn set_crash_clock(&mut self, clock: crate::snapshot::test_support::CrashClock) {
        self.clock = Some(clock);
    }

    fn step(&self, _what: &str) -> io::Result<()> {
        #[cfg(test)]
        if let Some(c) = &self.clock {
            c.step(_what)?;
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64, what: &str) -> io::Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "writing {what} ({} bytes at byte {offset}) of the COW: {e}",
                    buf.len()
                ),
            )
        })
    }

    fn sync(&self, what: &str) -> io::Result<()> {
        self.file
            .sync_data()
            .map_err(|e| io::Error::new(e.kind(), format!("syncing the COW after {what}: {e}")))
    }

    fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "reading {what} ({} bytes at byte {offset}) of the COW: {e}",
                    buf.len()
                ),
            )
        })
    }

    fn geometry(&self) -> io::Result<ScratchGeometry> {
        self.geometry
            .ok_or_else(|| io::Error::other("the COW has no scratch region (buffer_size 0)"))
    }
}

impl MergeStateStore for CowMergeStore {
    fn num_merge_ops(&self) -> u64 {
        self.planned
    }

    fn scratch_state(&self) -> ScratchState {
        self.state
    }

    fn scratch_capacity_blocks(&self) -> usize {
        self.geometry.map_or(0, |g| g.capacity_blocks())
    }

    fn read_window(&self) -> io::Result<ScratchWindow> {
        let g = self.geometry()?;
        let mut meta = vec![0u8; g.metadata_len()];
        self.read(&mut meta, g.metadata_offset(), "scratch metadata")?;
        let entries = g
            .decode_metadata(&meta)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let mut window = ScratchWindow {
            new_blocks: Vec::with_capacity(entries.len()),
            data: vec![0u8; entries.len() * BLOCK_SIZE],
        };
        for ((block, offset), slot) in entries.iter().zip(window.data.chunks_exact_mut(BLOCK_SIZE))
        {
            self.read(slot, *offset, "scratch data")?;
            window.new_blocks.push(*block);
        }
        Ok(window)
    }

    fn commit(&mut self, num_merge_ops: u64) -> io::Result<()> {
        let entries = self.progress.entries_for_planned(num_merge_ops);
        self.step("commit num_merge_ops")?;
        self.write(
            &entries.to_le_bytes(),
            NUM_MERGE_OPS_OFFSET,
            "num_merge_ops",
        )?;
        self.sync("num_merge_ops")?;
        self.durable_entries = entries;
        self.planned = num_merge_ops;
        Ok(())
    }

    fn commit_window(&mut self, num_merge_ops: u64) -> io::Result<()> {
        let g = self.geometry()?;
        let entries = self.progress.entries_for_planned(num_merge_ops);
        let len = usize::try_from(g.state_offset() + 1)
            .map_err(|_| io::Error::other("header size overflow"))?;
        let mut head = vec![0u8; len];
        self.read(&mut head, 0, "header")?;
        let at = NUM_MERGE_OPS_OFFSET as usize;
        let field = head
            .get_mut(at..at + 8)
            .ok_or_else(|| io::Error::other("header too short for num_merge_ops"))?;
        field.copy_from_slice(&entries.to_le_bytes());
        let state = head
            .last_mut()
            .ok_or_else(|| io::Error::other("empty header"))?;
        *state = crate::snapshot::scratch_layout::encode_state(ScratchState::InProgress);
        debug_assert_eq!(g.state_offset(), self.header_size);
        self.step("commit window")?;
        self.write(&head, 0, "num_merge_ops and scratch state")?;
        self.sync("window commit")?;
        self.durable_entries = entries;
        self.planned = num_merge_ops;
        self.state = ScratchState::InProgress;
        Ok(())
    }

    fn write_window(&mut self, window: &ScratchWindow) -> io::Result<()> {
        let g = self.geometry()?;
        if window.data.len() != window.new_blocks.len() * BLOCK_SIZE {
            return Err(io::Error::other(format!(
                "window of {} blocks carries {} data bytes",
                window.new_blocks.len(),
                window.data.len()
            )));
        }
        let meta = g
            .encode_metadata(&window.new_blocks)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.step("write scratch data")?;
        self.write(&window.data, g.slot_offset(0), "scratch data")?;
        self.write(&meta, g.metadata_offset(), "scratch metadata")?;
        self.sync("scratch data and metadata")?;
        self.step("set scratch state Done")?;
        let done = crate::snapshot::scratch_layout::encode_state(ScratchState::Done);
        self.write(&[done], g.state_offset(), "scratch state")?;
        self.sync("scratch state")?;
        self.state = ScratchState::Done;
        Ok(())
    }

    fn reload(&mut self) -> io::Result<()> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        let ms = read_merge_state(&self.file).map_err(|e| invalid(e.to_string()))?;
        let (entries, state) = durable_pair(&ms).map_err(|e| invalid(e.to_string()))?;
        let planned = self.progress.planned_for_entries(entries).ok_or_else(|| {
            invalid(format!(
                "durable num_merge_ops {entries} exceeds the {} merge-order entries",
                self.progress.entries()
            ))
        })?;
        self.durable_entries = entries;
        self.planned = planned;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cow_format::{CowVersion, CowWriter, WriterOptions};
    use std::fs::OpenOptions;

    fn cow(dir: &std::path::Path, version: CowVersion, scratch: bool, zeros: u64) -> File {
        let path = dir.join("s.cow");
        let opts = WriterOptions {
            version,
            scratch,
            op_count_max: (version == CowVersion::V3).then_some(64),
            ..WriterOptions::default()
        };
        let mut w = CowWriter::create(File::create(&path).unwrap(), opts).unwrap();
        w.add_zero(1, zeros).unwrap();
        w.finalize().unwrap();
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
    }

    fn identity(entries: u64) -> ProgressMap {
        // A plan of `entries` single-block entries.
        super::super::plan::tests::identity_map(entries as usize)
    }

    #[test]
    fn window_and_commits_round_trip_through_the_file() {
        for version in [CowVersion::V2, CowVersion::V3] {
            let dir = tempfile::tempdir().unwrap();
            let f = cow(dir.path(), version, true, 8);
            let opened = CowMergeStore::open(f.try_clone().unwrap()).unwrap();
            assert_eq!(opened.num_merge_ops(), 0);
            let mut store = opened.into_store(identity(8)).unwrap();
            assert_eq!(store.scratch_capacity_blocks(), 510);
            assert_eq!(store.scratch_state(), ScratchState::NotStarted);
            let window = ScratchWindow {
                new_blocks: vec![5, 0, 9],
                data: (0..3 * BLOCK_SIZE).map(|i| (i * 7 % 253) as u8).collect(),
            };
            store.write_window(&window).unwrap();
            drop(store);
            // A restart finds the window, Done.
            let store = CowMergeStore::open(f.try_clone().unwrap())
                .unwrap()
                .into_store(identity(8))
                .unwrap();
            assert_eq!(store.scratch_state(), ScratchState::Done);
            assert_eq!(store.read_window().unwrap(), window);
            let mut store = store;
            store.commit_window(3).unwrap();
            store.commit(5).unwrap();
            drop(store);
            let ms = MergeState::open(f.try_clone().unwrap()).unwrap();
            assert_eq!(ms.num_merge_ops().unwrap(), 5);
            assert_eq!(ms.buffer_state().unwrap(), BufferState::InProgress);
            // The header is still a valid COW header.
            cow_format::CowReader::open(f).unwrap();
        }
    }

    #[test]
    fn without_scratch_only_commits_work() {
        let dir = tempfile::tempdir().unwrap();
        let f = cow(dir.path(), CowVersion::V2, false, 4);
        let mut store = CowMergeStore::open(f.try_clone().unwrap())
            .unwrap()
            .into_store(identity(4))
            .unwrap();
        assert_eq!(store.scratch_capacity_blocks(), 0);
        assert!(store.write_window(&ScratchWindow::default()).is_err());
        assert!(store.commit_window(1).is_err());
        store.commit(4).unwrap();
        assert_eq!(MergeState::open(f).unwrap().num_merge_ops().unwrap(), 4);
    }

    #[test]
    fn bad_durable_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = cow(dir.path(), CowVersion::V3, true, 4);
        let state_at = u64::from(
            MergeState::open(f.try_clone().unwrap())
                .unwrap()
                .header()
                .header_size(),
        );
        f.write_all_at(&[7], state_at).unwrap();
        assert!(matches!(
            CowMergeStore::open(f.try_clone().unwrap()),
            Err(CowMergeStoreError::MergeState(
                MergeStateError::BadBufferState { value: 7, .. }
            ))
        ));
        f.write_all_at(&[0], state_at).unwrap();
        f.write_all_at(&9u64.to_le_bytes(), NUM_MERGE_OPS_OFFSET)
            .unwrap();
        let opened = CowMergeStore::open(f).unwrap();
        assert!(matches!(
            opened.into_store(identity(4)),
            Err(CowMergeStoreError::MergedBeyondEnd {
                num_merge_ops: 9,
                entries: 4
            })
        ));
    }
}
