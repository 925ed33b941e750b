//! A whole user-space merge driven through the io_uring engine: a real COW (COPY, REPLACE,
//! ZERO), the base starting as the source, and the snapshot read back before and after.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cow_format::{CowWriter, WriterOptions};
use snapuserd::uring::{UringMergeIo, UringOptions};
use snapuserd::user_merge::merge_io::{MergeIo, ReadRun, WriteRun};
use snapuserd::user_merge::{
    MergeControl, MergeOutcome, MergePhase, UserSnapshot, UserSnapshotOptions,
};

const BLOCK: usize = 4096;
const BLOCKS: usize = 2048;

fn block_fill(i: usize) -> Vec<u8> {
    (0..BLOCK).map(|b| (i * 31 + b / 64) as u8).collect()
}

/// Writes source.img, base.img (a copy of the source) and system.cow in `dir`; returns the
/// target image. COPYs read blocks 0..600 into 1024..1624 (no COPY destination is another
/// COPY's source), REPLACEs rewrite 1700..1900, ZEROs clear 1950..2000.
fn write_update(dir: &Path, scratch: bool) -> Vec<u8> {
    let source: Vec<u8> = (0..BLOCKS).flat_map(block_fill).collect();
    std::fs::write(dir.join("source.img"), &source).expect("source");
    std::fs::write(dir.join("base.img"), &source).expect("base");

    let mut target = source.clone();
    let mut writer = CowWriter::create(
        File::create(dir.join("system.cow")).expect("cow file"),
        WriterOptions {
            scratch,
            ..WriterOptions::default()
        },
    )
    .expect("writer");
    for i in 0..600usize {
        let (new, old) = (1024 + i, i);
        writer.add_copy(new as u64, old as u64).expect("copy");
        target.copy_within(old * BLOCK..(old + 1) * BLOCK, new * BLOCK);
    }
    for new in 1700..1900usize {
        let data: Vec<u8> = (0..BLOCK).map(|b| (new ^ b) as u8 ^ 0x5a).collect();
        writer.add_replace(new as u64, &data).expect("replace");
        target[new * BLOCK..(new + 1) * BLOCK].copy_from_slice(&data);
    }
    writer.add_zero(1950, 50).expect("zero");
    target[1950 * BLOCK..2000 * BLOCK].fill(0);
    writer.finalize().expect("finalize");
    target
}

/// Calls and failures seen by the engine, so the test knows io_uring did the merge (the merge
/// would redo a failed step with the synchronous engine and still succeed).
#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    failures: AtomicUsize,
}

struct Tallied {
    inner: UringMergeIo,
    tally: Arc<Tally>,
}

impl Tallied {
    fn count<T>(&self, result: io::Result<T>) -> io::Result<T> {
        self.tally.calls.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.tally.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl MergeIo for Tallied {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        let result = self.inner.read_source(runs);
        self.count(result)
    }
    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        let result = self.inner.write_base(runs);
        self.count(result)
    }
    fn sync_base(&mut self) -> io::Result<()> {
        let result = self.inner.sync_base();
        self.count(result)
    }
    fn write_base_durably(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        let result = self.inner.write_base_durably(runs);
        self.count(result)
    }
}

fn read_snapshot(snapshot: &UserSnapshot) -> Vec<u8> {
    let mut image = vec![0u8; BLOCKS * BLOCK];
    for (i, chunk) in image.chunks_mut(64 * BLOCK).enumerate() {
        snapshot
            .read((i * 64 * BLOCK / 512) as u64, chunk)
            .expect("snapshot read");
    }
    image
}

fn merge_through_io_uring(scratch: bool) {
    let dir = tempfile::Builder::new()
        .prefix("uring-user-merge")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let target = write_update(dir.path(), scratch);
    let snapshot = UserSnapshot::open(
        &dir.path().join("system.cow"),
        &dir.path().join("source.img"),
        &dir.path().join("base.img"),
        &UserSnapshotOptions::default(),
    )
    .expect("open snapshot");
    assert!(
        read_snapshot(&snapshot) == target,
        "snapshot reads the target before the merge"
    );

    let io = UringMergeIo::new(
        snapshot.source_file(),
        snapshot.base_file(),
        &UringOptions::default(),
    )
    .expect("io_uring engine");
    let tally = Arc::new(Tally::default());
    let io = Tallied {
        inner: io,
        tally: Arc::clone(&tally),
    };
    let outcome = snapshot
        .merge(Box::new(io), &MergeControl::new())
        .expect("merge");
    assert!(matches!(outcome, MergeOutcome::Complete));
    assert!(
        tally.calls.load(Ordering::Relaxed) > 0,
        "the merge used the engine"
    );
    assert_eq!(
        tally.failures.load(Ordering::Relaxed),
        0,
        "no step fell back to the synchronous engine"
    );
    let progress = snapshot.progress();
    assert_eq!(progress.state, MergePhase::Complete);
    assert_eq!(progress.merged_ops, progress.total_ops);

    assert!(
        read_snapshot(&snapshot) == target,
        "snapshot reads the target after the merge"
    );
    drop(snapshot);
    let base = std::fs::read(dir.path().join("base.img")).expect("base");
    assert!(
        base == target,
        "the base holds the target after an io_uring merge"
    );
}

#[test]
fn a_merge_through_io_uring_leaves_the_target_in_the_base() {
    merge_through_io_uring(false);
}

#[test]
fn a_merge_with_read_ahead_through_io_uring_leaves_the_target_in_the_base() {
    merge_through_io_uring(true);
}
