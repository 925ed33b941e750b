//! [`MergeStateStore`] on the COW file itself: a thin adapter over
//! [`cow_format::MergeState`], which owns the durable operations (window write, window
//! commit, plain commit) and the scratch layout.
//!
//! What the adapter adds: `num_merge_ops` in the COW counts merge-order **entries**, the core
//! counts planned ops. [`ProgressMap`] converts (a commit that ends inside a multi-block
//! REPLACE is rounded down to the entries fully merged; replaying a REPLACE reads nothing).
//! The durable values are cached after open and after each commit, so the core's getters
//! do no I/O.

use std::fs::File;
use std::io;

use cow_format::merge_state::DurableProgress;
use cow_format::{MergeState, MergeStateError};
use thiserror::Error;

use super::plan::ProgressMap;
use crate::snapshot::merge_tracker::{MergeStateStore, ScratchState, ScratchWindow};

/// Errors of the durable merge state in the COW file.
#[derive(Debug, Error)]
pub enum CowMergeStoreError {
    /// The header or scratch region is invalid, or reading or writing it failed.
    #[error(transparent)]
    MergeState(#[from] MergeStateError),
    /// The durable `num_merge_ops` names more entries than the merge order has.
    #[error("durable num_merge_ops {num_merge_ops} exceeds the {entries} merge-order entries")]
    MergedBeyondEnd {
        /// Durable value.
        num_merge_ops: u64,
        /// Entries.
        entries: usize,
    },
}

impl From<CowMergeStoreError> for io::Error {
    fn from(e: CowMergeStoreError) -> Self {
        match e {
            CowMergeStoreError::MergeState(e) => e.into(),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Durable merge progress kept in the COW file.
#[derive(Debug)]
pub struct CowMergeStore {
    state: MergeState,
    progress: ProgressMap,
    /// Durable values as last written (or read).
    durable: DurableProgress,
    /// Last committed progress, in planned ops.
    planned: u64,
}

/// The durable values found at open, before the plan exists.
#[derive(Debug)]
pub struct OpenedMergeState {
    state: MergeState,
    durable: DurableProgress,
}

impl OpenedMergeState {
    /// Durable `num_merge_ops` (merge-order entries): build the plan with it.
    pub fn num_merge_ops(&self) -> u64 {
        self.durable.num_merge_ops
    }

    /// Finish opening with the plan's entry/planned-op map.
    pub fn into_store(self, progress: ProgressMap) -> Result<CowMergeStore, CowMergeStoreError> {
        let planned = planned_ops(&progress, self.durable.num_merge_ops)?;
        Ok(CowMergeStore {
            state: self.state,
            progress,
            durable: self.durable,
            planned,
        })
    }
}

fn planned_ops(progress: &ProgressMap, entries: u64) -> Result<u64, CowMergeStoreError> {
    progress
        .planned_for_entries(entries)
        .ok_or(CowMergeStoreError::MergedBeyondEnd {
            num_merge_ops: entries,
            entries: progress.entries(),
        })
}

impl CowMergeStore {
    /// Read the durable merge state of the COW `file` (opened read-write).
    pub fn open(file: File) -> Result<OpenedMergeState, CowMergeStoreError> {
        let state = MergeState::open(file)?;
        let durable = state.progress()?;
        log::debug!(
            "COW merge state: num_merge_ops {}, scratch window of {} blocks, state {:?}",
            durable.num_merge_ops,
            state.window_capacity(),
            durable.state
        );
        Ok(OpenedMergeState { state, durable })
    }

    /// Durable `num_merge_ops` in merge-order entries as last written (or read at open).
    pub fn durable_entries(&self) -> u64 {
        self.durable.num_merge_ops
    }

    /// First half of [`MergeStateStore::write_window`]: the window's data and metadata,
    /// written and synced; the state is not yet Done.
    pub fn stage_window(&mut self, window: &ScratchWindow) -> io::Result<()> {
        Ok(self.state.stage_window(window)?)
    }

    /// Second half of [`MergeStateStore::write_window`]: state Done, written and synced.
    pub fn mark_window_done(&mut self) -> io::Result<()> {
        self.state.mark_window_done()?;
        self.durable.state = ScratchState::Done;
        Ok(())
    }
}

impl MergeStateStore for CowMergeStore {
    fn num_merge_ops(&self) -> u64 {
        self.planned
    }

    fn scratch_state(&self) -> ScratchState {
        self.durable.state
    }

    fn scratch_capacity_blocks(&self) -> usize {
        self.state.window_capacity()
    }

    fn read_window(&self) -> io::Result<ScratchWindow> {
        Ok(self.state.read_window()?)
    }

    fn commit(&mut self, num_merge_ops: u64) -> io::Result<()> {
        let entries = self.progress.entries_for_planned(num_merge_ops);
        self.state.commit_merged(entries)?;
        self.durable.num_merge_ops = entries;
        self.planned = num_merge_ops;
        Ok(())
    }

    fn commit_window(&mut self, num_merge_ops: u64) -> io::Result<()> {
        let entries = self.progress.entries_for_planned(num_merge_ops);
        self.state.commit_window(entries)?;
        self.durable = DurableProgress {
            num_merge_ops: entries,
            state: ScratchState::InProgress,
        };
        self.planned = num_merge_ops;
        Ok(())
    }

    fn write_window(&mut self, window: &ScratchWindow) -> io::Result<()> {
        self.stage_window(window)?;
        self.mark_window_done()
    }

    fn reload(&mut self) -> io::Result<()> {
        let durable = self.state.progress()?;
        self.planned = planned_ops(&self.progress, durable.num_merge_ops)?;
        self.durable = durable;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cow_format::layout::{BufferState, NUM_MERGE_OPS_OFFSET};
    use cow_format::{CowVersion, CowWriter, WriterOptions};
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

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
                data: (0..3 * 4096).map(|i| (i * 7 % 253) as u8).collect(),
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
            assert_eq!(
                ms.progress().unwrap(),
                DurableProgress {
                    num_merge_ops: 5,
                    state: BufferState::InProgress
                }
            );
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
        assert_eq!(
            MergeState::open(f)
                .unwrap()
                .progress()
                .unwrap()
                .num_merge_ops,
            4
        );
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
