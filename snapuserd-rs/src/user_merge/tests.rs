//! Host tests of the user-space merge: the read path against target images, the merge on
//! real files, crashes at every durable step, and equivalents of AOSP's snapuserd tests.

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cow_format::{CompressionAlgorithm, CowVersion, MergeState};

use super::test_support::*;
use super::*;
use crate::dm_user::{AnswerPiece, DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE};
use crate::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_DISCARD, DM_USER_REQ_MAP_FLUSH};
use crate::snapshot::test_support::CrashClock;

const ALGOS: [CompressionAlgorithm; 5] = [
    CompressionAlgorithm::None,
    CompressionAlgorithm::Gz,
    CompressionAlgorithm::Brotli,
    CompressionAlgorithm::Lz4,
    CompressionAlgorithm::Zstd,
];

fn assert_reads_target(snap: &UserSnapshot, target: &[u8], what: &str) {
    for chunk in [1 << 20, 4096 * 3 + 512] {
        let got = read_all(snap, chunk);
        assert!(
            got == target,
            "{what}: read in {chunk}-byte requests differs at block {:?}",
            first_diff(&got, target)
        );
        let got = read_all_in_pieces(snap, chunk);
        assert!(
            got == target,
            "{what}: read in {chunk}-byte requests answered in pieces differs at block {:?}",
            first_diff(&got, target)
        );
    }
}

fn merge_sync(snap: &UserSnapshot) -> MergeOutcome {
    snap.merge(snap.sync_io().unwrap(), &MergeControl::new())
        .unwrap()
}

#[test]
fn reads_and_merge_match_the_target_for_every_version_and_compression() {
    for version in [CowVersion::V2, CowVersion::V3] {
        for algo in ALGOS {
            let case = Case::rich(300, 7);
            let files = Files::create(&case, writer_opts(version, algo, true), false);
            let snap = files.open();
            let what = format!("{version:?}/{algo:?}");
            assert_eq!(snap.base_sectors() as usize * 512, case.source.len());
            assert_eq!(snap.progress().state, MergePhase::NotStarted);
            assert_reads_target(&snap, &case.target, &format!("{what} before merge"));
            assert_eq!(
                files.base_image(),
                case.source,
                "{what}: nothing merged on open or read"
            );
            assert_eq!(merge_sync(&snap), MergeOutcome::Complete);
            let p = snap.progress();
            assert_eq!((p.merged_ops, p.state), (p.total_ops, MergePhase::Complete));
            assert_reads_target(&snap, &case.target, &format!("{what} after merge"));
            assert!(files.base_image() == case.target, "{what}: merged base");
            assert_eq!(files.durable().num_merge_ops, p.total_ops);
            drop(snap);
            let again = files.open();
            assert_eq!(again.progress().state, MergePhase::Complete);
            assert_reads_target(&again, &case.target, &format!("{what} reopened"));
        }
    }
}

#[test]
fn separate_source_device_and_cow_without_scratch() {
    for (separate, scratch) in [(true, true), (false, false), (true, false)] {
        let mut case = Case::rich(300, 11);
        if !scratch {
            // Without scratch an XOR that reads its own destination cannot be replayed.
            case = Case::new(1100, 3);
            for b in 0..300 {
                case.copy(b, b + 1);
            }
            for b in (400..700).rev() {
                case.copy(b, b - 1);
            }
            for b in 800..850 {
                case.xor(b, (b + 100) * 4096 + 77, b);
            }
            case.replace(1000, 30, 9);
        }
        let files = Files::create(
            &case,
            writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, scratch),
            separate,
        );
        let snap = files.open();
        assert_reads_target(&snap, &case.target, "before");
        merge_sync(&snap);
        assert_reads_target(&snap, &case.target, "after");
        assert!(
            files.base_image() == case.target,
            "separate {separate} scratch {scratch}"
        );
    }
}

#[test]
fn a_self_reading_xor_without_scratch_is_refused() {
    let mut case = Case::new(20, 1);
    case.xor(5, 5 * 4096 + 10, 1);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::None, false),
        false,
    );
    let err = UserSnapshot::open(&files.cow, &files.source, &files.base, &Default::default())
        .unwrap_err();
    assert!(
        matches!(err, UserSnapshotError::XorNeedsScratch { block: 5, .. }),
        "{err}"
    );
}

#[test]
fn pass_through_only_blocks_1_and_3_changed() {
    let mut case = Case::new(64, 5);
    case.replace(1, 1, 1);
    case.zero(3, 1);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = files.open();
    let mut out = vec![0u8; 4096];
    for b in [0u64, 2, 4, 63] {
        snap.read(b * 8, &mut out).unwrap();
        assert_eq!(out, case.source[b as usize * 4096..][..4096], "block {b}");
    }
    assert_reads_target(&snap, &case.target, "pass-through");
}

#[test]
fn unaligned_sector_and_single_sector_reads() {
    let case = Case::rich(40, 21);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Zstd, true),
        false,
    );
    let snap = files.open();
    let sectors = snap.base_sectors();
    for (sector, len) in [(1u64, 4096usize), (7, 512), (3, 3 * 4096 + 1024), (0, 512)] {
        let mut out = vec![0u8; len];
        snap.read(sector, &mut out).unwrap();
        let at = sector as usize * 512;
        assert_eq!(out, case.target[at..at + len], "sector {sector} len {len}");
    }
    // Every sector of the changed region, one at a time.
    for sector in (0..sectors).step_by(37) {
        let mut out = [0u8; 512];
        snap.read(sector, &mut out).unwrap();
        let at = sector as usize * 512;
        assert_eq!(out[..], case.target[at..at + 512], "sector {sector}");
    }
    let mut out = vec![0u8; 1024];
    assert!(matches!(
        snap.read(sectors - 1, &mut out),
        Err(UserReadError::BadRange { .. })
    ));
    assert!(matches!(
        snap.read(0, &mut out[..100]),
        Err(UserReadError::BadRange { .. })
    ));
}

#[test]
fn handle_answers_reads_refuses_writes_acknowledges_flushes() {
    let case = Case::rich(20, 2);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = files.open();
    let req = |kind, sector, len| Request {
        kind,
        flags: 0,
        sector,
        len,
    };
    let mut out = vec![7u8; 10];
    assert_eq!(
        snap.handle(&req(DM_USER_REQ_MAP_READ, 8, 8192), &[], &mut out),
        ResponseCode::Success
    );
    assert_eq!(out, case.target[4096..3 * 4096]);
    assert_eq!(
        snap.handle(
            &req(DM_USER_REQ_MAP_READ, snap.base_sectors(), 512),
            &[],
            &mut out
        ),
        ResponseCode::Error
    );
    assert!(out.is_empty());
    let too_long = crate::snapshot::block_server::MAX_REQUEST_BYTES + 512;
    assert_eq!(
        snap.handle(&req(DM_USER_REQ_MAP_READ, 0, too_long), &[], &mut out),
        ResponseCode::Error
    );
    assert_eq!(
        snap.handle(&req(DM_USER_REQ_MAP_WRITE, 0, 4096), &[0u8; 4096], &mut out),
        ResponseCode::Error
    );
    assert_eq!(
        snap.handle(&req(DM_USER_REQ_MAP_WRITE, 0, 0), &[], &mut out),
        ResponseCode::Success
    );
    assert_eq!(
        snap.handle(&req(DM_USER_REQ_MAP_FLUSH, 0, 0), &[], &mut out),
        ResponseCode::Success
    );
    assert_eq!(
        snap.handle(&req(DM_USER_REQ_MAP_DISCARD, 0, 4096), &[], &mut out),
        ResponseCode::Unsupported
    );
    assert_eq!(files.base_image(), case.source, "nothing written");
}

/// Merge with a reader thread that reads the whole device in a loop and compares it with
/// the target; returns how many passes the reader completed.
fn merge_while_reading(snap: &UserSnapshot, io: Box<dyn MergeIo>, target: &[u8]) -> u64 {
    let done = AtomicBool::new(false);
    let passes = AtomicU64::new(0);
    std::thread::scope(|s| {
        let reader = s.spawn(|| loop {
            let finished = done.load(Ordering::Acquire);
            // Alternate the plain read path and answers in pieces (file runs read at the
            // time of sending, as a splice takes them).
            let in_pieces = passes.load(Ordering::Relaxed) % 2 == 1;
            let got = if in_pieces {
                read_all_in_pieces(snap, 64 << 10)
            } else {
                read_all(snap, 64 << 10)
            };
            assert!(
                got == target,
                "read during merge (in pieces: {in_pieces}) differs at block {:?}",
                first_diff(&got, target)
            );
            passes.fetch_add(1, Ordering::Relaxed);
            if finished {
                break;
            }
        });
        let outcome = snap.merge(io, &MergeControl::new());
        // Stop the reader before anything can panic here, or the scope waits for it forever.
        done.store(true, Ordering::Release);
        let read_result = reader.join();
        assert_eq!(outcome.unwrap(), MergeOutcome::Complete);
        read_result.unwrap();
    });
    passes.load(Ordering::Relaxed)
}

#[test]
fn io_during_merge_sees_only_target_data() {
    for version in [CowVersion::V2, CowVersion::V3] {
        let case = Case::rich(400, 31);
        let files = Files::create(
            &case,
            writer_opts(version, CompressionAlgorithm::Lz4, true),
            false,
        );
        let snap = files.open();
        let passes = merge_while_reading(&snap, snap.sync_io().unwrap(), &case.target);
        assert!(passes >= 1);
        assert!(files.base_image() == case.target);
    }
}

#[test]
fn pause_resume_and_stop_at_safe_points() {
    let case = Case::rich(400, 41);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = files.open();
    let control = MergeControl::new();
    control.pause();
    assert!(control.is_paused());
    std::thread::scope(|s| {
        let merge = s.spawn(|| snap.merge(snap.sync_io().unwrap(), &control).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Paused before the first step: nothing merged, reads right.
        assert_eq!(snap.progress().merged_ops, 0);
        assert_eq!(snap.progress().state, MergePhase::Merging);
        assert_reads_target(&snap, &case.target, "paused");
        assert!(matches!(
            snap.merge(snap.sync_io().unwrap(), &MergeControl::new()),
            Err(UserMergeError::AlreadyRunning)
        ));
        control.stop();
        assert_eq!(merge.join().unwrap(), MergeOutcome::Stopped);
    });
    assert!(control.is_stopped());
    // A stop while running lands on a committed point; the next merge resumes.
    let control = MergeControl::new();
    control.stop();
    assert_eq!(
        snap.merge(snap.sync_io().unwrap(), &control).unwrap(),
        MergeOutcome::Stopped
    );
    let control = MergeControl::new();
    control.pause();
    control.resume();
    assert_eq!(
        snap.merge(snap.sync_io().unwrap(), &control).unwrap(),
        MergeOutcome::Complete
    );
    assert!(files.base_image() == case.target);
}

/// Reopen after a crash, check every read, then finish the merge with a reader running.
fn recover_and_finish(files: &Files, case: &Case, what: &str) {
    let snap = files.open();
    let got = read_all(&snap, 1 << 20);
    assert!(
        got == case.target,
        "{what}: after restart, read differs at block {:?}",
        first_diff(&got, &case.target)
    );
    let got = read_all_in_pieces(&snap, 1 << 20);
    assert!(
        got == case.target,
        "{what}: after restart, read in pieces differs at block {:?}",
        first_diff(&got, &case.target)
    );
    merge_while_reading(&snap, snap.sync_io().unwrap(), &case.target);
    assert!(
        files.base_image() == case.target,
        "{what}: base after the resumed merge differs at block {:?}",
        first_diff(&files.base_image(), &case.target)
    );
    assert_eq!(snap.progress().merged_ops, snap.progress().total_ops);
}

/// Crash at step `k` of the merge; `lose` drops unsynced base writes. Returns false once
/// the merge finished within the budget.
fn crash_at(files: &Files, case: &Case, k: u64, lose: bool) -> bool {
    let clock = CrashClock::after(k);
    let snap = files.open_crashing(&clock);
    let (io, unsynced) = VolatileDiskIo::boxed(files, &clock);
    let result = snap.merge(io, &MergeControl::new());
    if result.is_ok() {
        assert!(files.base_image() == case.target);
        return false;
    }
    assert!(clock.crashed(), "step {k}: {:?}", result.err());
    assert_eq!(snap.progress().state, MergePhase::Failed);
    // Reads go on after the failure, right.
    let got = read_all(&snap, 1 << 20);
    assert!(
        got == case.target,
        "step {k}: read after the crash, same process"
    );
    drop(snap);
    if lose {
        lose_unsynced(&files.base, &unsynced);
    }
    true
}

fn crash_sweep(version: CowVersion, scratch: bool, case: &Case) -> u64 {
    let algo = CompressionAlgorithm::Lz4;
    let template = Files::create(case, writer_opts(version, algo, scratch), false);
    let pristine_cow = fs::read(&template.cow).unwrap();
    let mut k = 0;
    loop {
        let mut finished = false;
        for lose in [true, false] {
            fs::write(&template.cow, &pristine_cow).unwrap();
            fs::write(&template.base, &case.source).unwrap();
            let what = format!("{version:?} scratch {scratch} crash at step {k} lose {lose}");
            if crash_at(&template, case, k, lose) {
                recover_and_finish(&template, case, &what);
            } else {
                finished = true;
            }
        }
        if finished {
            return k;
        }
        k += 1;
    }
}

#[test]
fn crash_at_every_durable_step_then_reads_and_merge_are_right() {
    for version in [CowVersion::V2, CowVersion::V3] {
        let case = Case::rich(260, 51);
        let steps = crash_sweep(version, true, &case);
        // 2 windows x (read, stage, done, write, sync, commit) + batches x 3.
        assert!(steps >= 15, "{version:?}: only {steps} steps");
    }
    // Without scratch, overlapping chains cut windows down to one op each: short chains,
    // plus a long run of independent COPYs that fits one window.
    let mut case = Case::new(700, 9);
    for b in 0..12 {
        case.copy(b, b + 1);
    }
    for b in (30..42).rev() {
        case.copy(b, b - 1);
    }
    for b in 100..400 {
        case.copy(b, b + 300);
    }
    case.replace(650, 20, 4);
    let steps = crash_sweep(CowVersion::V2, false, &case);
    assert!(steps >= 10, "no scratch: {steps} steps");
}

/// A short chain of COPYs (one window), then a REPLACE/ZERO part of 730 blocks: three 1 MiB
/// batches, each produced while the previous one is written.
fn several_replace_batches(seed: u64) -> Case {
    let mut case = Case::new(900, seed);
    for b in (40..60).rev() {
        case.copy(b, b - 1);
    }
    case.replace(100, 300, seed ^ 5);
    case.zero(420, 100);
    case.replace(560, 330, seed ^ 6);
    case
}

/// A crash at any step of any batch of a REPLACE/ZERO part: reads and the resumed merge are
/// right.
#[test]
fn crash_at_every_step_of_a_replace_part_of_several_batches() {
    let case = several_replace_batches(23);
    let steps = crash_sweep(CowVersion::V3, true, &case);
    // One window (read, stage, done, write, sync, commit), then 3 batches of write, sync,
    // commit.
    assert!(steps >= 12, "only {steps} steps");
}

/// An engine error in any call of a REPLACE/ZERO part of several batches: the batch is redone
/// with the synchronous engine (not the one produced ahead of it) and the merge carries on.
#[test]
fn an_engine_error_in_a_replace_batch_is_redone_then_the_merge_carries_on() {
    let case = several_replace_batches(29);
    // One window (a read, a write and a sync), then 3 batches (a write and a sync each).
    for fail_at in 1..=9 {
        let (_, base) = merge_through_engine_failing_at(&case, fail_at);
        assert!(
            base == case.target,
            "fail at call {fail_at}: base differs at block {:?}",
            first_diff(&base, &case.target)
        );
    }
}

#[test]
fn resume_after_restarts_at_many_points() {
    // Snapshot_Merge_Resume / Crash_Fixed: restart repeatedly, each time a few steps on.
    let case = Case::rich(300, 61);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Zstd, true),
        false,
    );
    let mut restarts = 0;
    for budget in [3u64, 2, 4, 1, 5, 2, 3, 6, 2, 4, 3, 5, 1, 2] {
        let clock = CrashClock::after(budget);
        let snap = files.open_crashing(&clock);
        assert_reads_target(&snap, &case.target, "restart");
        let (io, unsynced) = VolatileDiskIo::boxed(&files, &clock);
        let result = snap.merge(io, &MergeControl::new());
        drop(snap);
        if result.is_ok() {
            break;
        }
        lose_unsynced(&files.base, &unsynced);
        restarts += 1;
    }
    assert!(
        restarts >= 5,
        "the merge finished after {restarts} restarts"
    );
    recover_and_finish(&files, &case, "after restarts");
}

#[test]
fn cffa413de_reads_of_a_resumed_window_come_from_scratch() {
    // Crash after the window is saved (Done) and some of its destinations are written;
    // then wipe every destination of that window in the base device (they also are its
    // sources). Reads must come from the saved window, not from the base device.
    let case = Case::rich(300, 71);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    // Steps: read sources, stage, mark Done, write base, ... — crash at the sync.
    let clock = CrashClock::after(4);
    let snap = files.open_crashing(&clock);
    let (io, _unsynced) = VolatileDiskIo::boxed(&files, &clock);
    assert!(snap.merge(io, &MergeControl::new()).is_err());
    drop(snap);
    let durable = files.durable();
    assert_eq!(durable.state, cow_format::layout::BufferState::Done);
    let window = MergeState::open(fs::File::open(&files.cow).unwrap())
        .unwrap()
        .read_window()
        .unwrap();
    assert!(!window.new_blocks.is_empty());
    let mut base = files.base_image();
    for &b in &window.new_blocks {
        base[b as usize * 4096..][..4096].fill(0);
    }
    fs::write(&files.base, &base).unwrap();
    recover_and_finish(&files, &case, "cffa413de");
}

/// An engine that fails its `fail_at`-th call, then works.
struct FlakyIo {
    inner: Box<dyn MergeIo>,
    calls: u64,
    fail_at: u64,
}

impl FlakyIo {
    fn tick(&mut self) -> std::io::Result<()> {
        self.calls += 1;
        if self.calls == self.fail_at {
            return Err(std::io::Error::other("injected engine failure"));
        }
        Ok(())
    }
}

impl MergeIo for FlakyIo {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> std::io::Result<()> {
        self.tick()?;
        self.inner.read_source(runs)
    }
    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> std::io::Result<()> {
        self.tick()?;
        // Half the runs reach the disk before the failure is reported.
        self.inner.write_base(runs)
    }
    fn sync_base(&mut self) -> std::io::Result<()> {
        self.tick()?;
        self.inner.sync_base()
    }
}

#[test]
fn an_engine_error_mid_step_is_redone_with_the_sync_engine() {
    let case = Case::rich(300, 81);
    for fail_at in 1..=8 {
        let (passes, base) = merge_through_engine_failing_at(&case, fail_at);
        assert!(passes >= 1);
        assert!(base == case.target, "fail at call {fail_at}");
    }
}

/// Merge `case` (v3, lz4, with scratch) through an engine whose `fail_at`-th call fails, a
/// reader looping over the device meanwhile: the reader's passes and the base image after.
fn merge_through_engine_failing_at(case: &Case, fail_at: u64) -> (u64, Vec<u8>) {
    let files = Files::create(
        case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = files.open();
    let io = Box::new(FlakyIo {
        inner: snap.sync_io().unwrap(),
        calls: 0,
        fail_at,
    });
    let passes = merge_while_reading(&snap, io, &case.target);
    (passes, files.base_image())
}

/// An engine whose source reads fail: the merge fails, reads go on.
struct NoSourceIo(Box<dyn MergeIo>);

impl MergeIo for NoSourceIo {
    fn name(&self) -> &'static str {
        "sync"
    }
    fn read_source(&mut self, _runs: &mut [ReadRun<'_>]) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    }
    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> std::io::Result<()> {
        self.0.write_base(runs)
    }
    fn sync_base(&mut self) -> std::io::Result<()> {
        self.0.sync_base()
    }
}

#[test]
fn a_failed_merge_reports_failed_and_reads_still_work() {
    let case = Case::rich(100, 91);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = files.open();
    let err = snap
        .merge(
            Box::new(NoSourceIo(snap.sync_io().unwrap())),
            &MergeControl::new(),
        )
        .unwrap_err();
    assert!(
        matches!(err, UserMergeError::SourceRead { start: 0, .. }),
        "{err}"
    );
    assert_eq!(snap.progress().state, MergePhase::Failed);
    assert_reads_target(&snap, &case.target, "after failure");
    // A later merge resumes from the durable state.
    assert_eq!(merge_sync(&snap), MergeOutcome::Complete);
    assert!(files.base_image() == case.target);
}

#[test]
fn legacy_progress_in_the_replace_part_is_refused() {
    let mut case = Case::new(64, 13);
    case.replace(10, 4, 1);
    case.zero(20, 2);
    case.replace(30, 1, 2);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    // The legacy merge walks REPLACE/ZERO from the top: blocks 30, 21, 20 merged.
    let mut base = files.base_image();
    for b in [30usize, 21, 20] {
        base[b * 4096..][..4096].copy_from_slice(&case.target[b * 4096..][..4096]);
    }
    fs::write(&files.base, &base).unwrap();
    let set_progress = |n| {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&files.cow)
            .unwrap();
        MergeState::open(f).unwrap().commit_merged(n).unwrap();
    };
    set_progress(3);
    let err = UserSnapshot::open(&files.cow, &files.source, &files.base, &Default::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            UserSnapshotError::ModeMismatch {
                num_merge_ops: 3,
                legacy_matches: true,
                ..
            }
        ),
        "{err}"
    );
    // The same count made by the user-space order (blocks 10..14 as one v2 op each, then
    // 20) opens.
    let mut base = case.source.clone();
    for b in 10..13usize {
        base[b * 4096..][..4096].copy_from_slice(&case.target[b * 4096..][..4096]);
    }
    fs::write(&files.base, &base).unwrap();
    let snap =
        UserSnapshot::open(&files.cow, &files.source, &files.base, &Default::default()).unwrap();
    assert_eq!(snap.progress().merged_ops, 3);
    assert_reads_target(&snap, &case.target, "user progress");
    merge_sync(&snap);
    assert!(files.base_image() == case.target);
}

#[test]
fn variable_block_sizes_v3_compression_factors() {
    for factor in [4096u32, 8192, 16384, 65536, 131072, 262144] {
        for algo in [
            CompressionAlgorithm::None,
            CompressionAlgorithm::Lz4,
            CompressionAlgorithm::Zstd,
            CompressionAlgorithm::Gz,
        ] {
            let mut case = Case::new(300, u64::from(factor));
            for b in 0..40 {
                case.copy(b, b + 1);
            }
            case.replace(64, 130, 3);
            case.replace(200, 7, 5);
            case.zero(210, 9);
            let mut opts = writer_opts(CowVersion::V3, algo, true);
            opts.compression_factor = factor;
            let files = Files::create(&case, opts, false);
            let snap = files.open();
            assert_reads_target(&snap, &case.target, &format!("factor {factor} {algo:?}"));
            merge_sync(&snap);
            assert!(
                files.base_image() == case.target,
                "factor {factor} {algo:?}"
            );
        }
    }
}

#[test]
fn cow_op_merge_size_caps_batches_and_still_merges_everything() {
    let mut case = Case::new(200, 17);
    case.replace(10, 100, 1);
    case.zero(150, 30);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    let opts = UserSnapshotOptions {
        cow_op_merge_size: Some(7),
        ..Default::default()
    };
    let snap = UserSnapshot::open(&files.cow, &files.source, &files.base, &opts).unwrap();
    let control = MergeControl::new();
    control.stop();
    // Nothing merged when stopped before the first step.
    assert_eq!(
        snap.merge(snap.sync_io().unwrap(), &control).unwrap(),
        MergeOutcome::Stopped
    );
    assert_eq!(snap.progress().merged_ops, 0);
    merge_sync(&snap);
    assert!(files.base_image() == case.target);
}

/// The merge with `O_DIRECT` source reads and/or base writes (`opts`), through `engine`:
/// reads during the merge see the target, the base ends equal to it (the buffered descriptor
/// reads back what the direct one wrote), and reads after the merge see the target.
fn merge_with_direct_io(opts: UserSnapshotOptions, engine: &str) {
    use std::os::unix::fs::FileExt;
    let case = Case::rich(60, 29);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = UserSnapshot::open(&files.cow, &files.source, &files.base, &opts).unwrap();
    let direct = snap.direct_descriptors();
    if direct.source.is_none() && direct.base.is_none() {
        // A filesystem without O_DIRECT: the buffered path is tested everywhere else.
        return;
    }
    // Cache every block of the base through the buffered descriptor first, so that the
    // direct transfers meet cached pages, as on a device the read path has read.
    let mut cached = vec![0u8; case.source.len()];
    snap.base_file().read_exact_at(&mut cached, 0).unwrap();
    let io = match engine {
        "sync" => snap.sync_io().unwrap(),
        _ => match crate::uring::UringMergeIo::new(
            snap.source_file(),
            snap.base_file(),
            &crate::uring::UringOptions::default(),
        ) {
            Ok(e) => Box::new(e.with_direct(direct)),
            // No io_uring here (seccomp, old kernel): the sync engine case covers the rest.
            Err(e) if e.is_unavailable() => return,
            Err(e) => panic!("{e}"),
        },
    };
    merge_while_reading(&snap, io, &case.target);
    let mut back = vec![0u8; case.target.len()];
    snap.base_file().read_exact_at(&mut back, 0).unwrap();
    assert!(
        back == case.target,
        "buffered view of the base after the merge"
    );
    assert!(files.base_image() == case.target);
    assert_reads_target(&snap, &case.target, "after a merge with O_DIRECT I/O");
}

const DIRECT_WRITES: UserSnapshotOptions = UserSnapshotOptions {
    merge_o_direct: true,
    merge_direct_reads: false,
    merge_direct_scratch: false,
    o_direct: false,
    cow_op_merge_size: None,
    mmap_cow: false,
    whole_reads: false,
    read_prefetch: true,
    read_prefetch_ahead: None,
    direct_reads: false,
    direct_read_ahead: 0,
};

const DIRECT_READS_AND_WRITES: UserSnapshotOptions = UserSnapshotOptions {
    merge_direct_reads: true,
    ..DIRECT_WRITES
};

/// Every merge transfer `O_DIRECT` where it can be: source reads, base writes, window saves.
const DIRECT_EVERYWHERE: UserSnapshotOptions = UserSnapshotOptions {
    merge_direct_scratch: true,
    ..DIRECT_READS_AND_WRITES
};

#[test]
fn merge_with_direct_window_saves_sync_engine() {
    merge_with_direct_io(DIRECT_EVERYWHERE, "sync");
}

#[test]
fn merge_with_direct_window_saves_io_uring_engine() {
    merge_with_direct_io(DIRECT_EVERYWHERE, "io_uring");
}

#[test]
fn merge_with_direct_base_writes_sync_engine() {
    merge_with_direct_io(DIRECT_WRITES, "sync");
}

#[test]
fn merge_with_direct_base_writes_io_uring_engine() {
    merge_with_direct_io(DIRECT_WRITES, "io_uring");
}

#[test]
fn merge_with_direct_source_reads_sync_engine() {
    merge_with_direct_io(DIRECT_READS_AND_WRITES, "sync");
}

#[test]
fn merge_with_direct_source_reads_io_uring_engine() {
    merge_with_direct_io(DIRECT_READS_AND_WRITES, "io_uring");
}

#[test]
fn whole_reads_plan_no_pieces_and_read_the_same() {
    let case = Case::rich(60, 29);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let opts = UserSnapshotOptions {
        whole_reads: true,
        ..Default::default()
    };
    let snap = UserSnapshot::open(&files.cow, &files.source, &files.base, &opts).unwrap();
    let req = Request {
        kind: DM_USER_REQ_MAP_READ,
        flags: 0,
        sector: 0,
        len: 1 << 20,
    };
    let mut produced = Vec::new();
    let mut called = false;
    let planned = snap.read_in_pieces(&req, &mut produced, &mut |_, _| {
        called = true;
        true
    });
    assert_eq!(planned, None);
    assert!(!called, "nothing is sent in pieces");
    assert!(read_all(&snap, 1 << 20) == case.target);
}

#[test]
fn o_direct_source_reads_give_the_same_bytes() {
    let case = Case::rich(60, 23);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        true,
    );
    let opts = UserSnapshotOptions {
        o_direct: true,
        ..Default::default()
    };
    let snap = match UserSnapshot::open(&files.cow, &files.source, &files.base, &opts) {
        Ok(s) => s,
        // A filesystem without O_DIRECT (tmpfs) refuses the open: nothing to test there.
        Err(UserSnapshotError::Open { source, .. })
            if source.raw_os_error() == Some(libc::EINVAL) =>
        {
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_reads_target(&snap, &case.target, "o_direct");
    // Unaligned ranges across pages, and the end of the device.
    let direct = super::direct_source::DirectSource::open(&files.source).unwrap();
    let mut buf = vec![0u8; 5000];
    cow_format::SourceImage::read_exact_at(&direct, &mut buf, 4000).unwrap();
    assert_eq!(buf, case.source[4000..9000]);
    let end = case.source.len() as u64;
    cow_format::SourceImage::read_exact_at(&direct, &mut buf[..100], end - 100).unwrap();
    assert_eq!(buf[..100], case.source[case.source.len() - 100..]);
    assert!(cow_format::SourceImage::read_exact_at(&direct, &mut buf[..100], end - 50).is_err());
}

#[test]
fn cows_from_ota_tools_create_merge_right() {
    use ota_tools::create::command::{create_cow, CreateOptions};
    let case = Case::rich(200, 97);
    // Shift a region by one block and sprinkle small edits: create finds COPY and XOR.
    let mut target = case.source.clone();
    let n = target.len();
    target.copy_within(8192..n / 2, 4096);
    for b in (0..n / 4096).step_by(9) {
        target[b * 4096 + 1000] ^= 0x5A;
    }
    target[n - 20 * 4096..].fill(0);
    for version in [CowVersion::V2, CowVersion::V3] {
        for algo in [
            CompressionAlgorithm::Lz4,
            CompressionAlgorithm::Zstd,
            CompressionAlgorithm::Gz,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (src, tgt, cow, base) = (
                dir.path().join("src"),
                dir.path().join("tgt"),
                dir.path().join("cow"),
                dir.path().join("base"),
            );
            fs::write(&src, &case.source).unwrap();
            fs::write(&tgt, &target).unwrap();
            fs::write(&base, &case.source).unwrap();
            let opts = CreateOptions {
                version,
                threads: Some(1),
                compression: cow_format::Compression {
                    algorithm: algo,
                    level: None,
                },
                ..CreateOptions::default()
            };
            create_cow(&opts, &src, &tgt, &cow).unwrap();
            let snap = UserSnapshot::open(&cow, &base, &base, &Default::default()).unwrap();
            assert!(
                read_all(&snap, 1 << 20) == target,
                "{version:?} {algo:?} read"
            );
            merge_while_reading(&snap, snap.sync_io().unwrap(), &target);
            assert!(
                fs::read(&base).unwrap() == target,
                "{version:?} {algo:?} merged"
            );
        }
    }
}

#[test]
fn block_map_of_a_4_gib_partition_costs_well_under_1_mib() {
    let mut case = Case::new(16, 3);
    case.replace(1, 1, 1);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    let r = cow_format::CowReader::open(fs::File::open(&files.cow).unwrap()).unwrap();
    let plan = super::plan::MergePlan::build(&r, 510).unwrap();
    let map = super::block_map::BlockMap::build(&r, &plan, 1 << 20).unwrap();
    assert!(map.heap_bytes() < 256 << 10, "{} bytes", map.heap_bytes());
    assert_eq!(map.entry(1), Some(0));
    assert_eq!(map.entry(0), None);
    assert_eq!(map.entry((1 << 20) - 1), None);
    assert_eq!(map.entry(1 << 21), None);
}

#[test]
fn ota_tools_apply_in_place_resumes_where_this_merge_left_off() {
    // `num_merge_ops` must mean the same entries here and in `ota-tools apply
    // --merge-mode user`: interrupt this merge, finish it with apply in place.
    use ota_tools::apply::{apply_with_mode, ApplyOptions};
    // Unsynced writes are lost at each crash, so the base holds exactly the committed
    // prefix, which is all apply in place assumes.
    let mut case = Case::new(800, 101);
    for b in 0..40 {
        case.copy(b, b + 1);
    }
    for b in (50..90).rev() {
        case.copy(b, b - 1);
    }
    // 600 REPLACE/ZERO blocks in runs with gaps: several 1 MiB batches.
    for run in 0..20 {
        let at = 150 + run * 32;
        if run % 3 == 0 {
            case.zero(at, 30);
        } else {
            case.replace(at, 30, run);
        }
    }
    let template = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let pristine_cow = fs::read(&template.cow).unwrap();
    let (ordered, total) = {
        let r = cow_format::CowReader::open(fs::File::open(&template.cow).unwrap()).unwrap();
        (r.num_ordered_ops(), r.num_total_data_ops())
    };
    let mut seen_replace_part = false;
    for k in 0.. {
        fs::write(&template.cow, &pristine_cow).unwrap();
        fs::write(&template.base, &case.source).unwrap();
        if !crash_at(&template, &case, k, true) {
            break;
        }
        let durable = template.durable();
        // apply does not read scratch: a window saved (Done) and partly written is for a
        // scratch-aware merge to finish, so only committed positions are handed over.
        if durable.state == cow_format::layout::BufferState::Done {
            continue;
        }
        let merged = durable.num_merge_ops;
        seen_replace_part |= merged > ordered && merged < total;
        let opts = ApplyOptions {
            source: template.base.clone(),
            cow: template.cow.clone(),
            output: template.base.clone(),
            size: None,
            progress: false,
            threads: 1,
        };
        apply_with_mode(&opts, cow_format::MergeMode::User).unwrap();
        assert!(
            template.base_image() == case.target,
            "crash at step {k} (num_merge_ops {merged}): apply in place differs at block {:?}",
            first_diff(&template.base_image(), &case.target)
        );
    }
    assert!(
        seen_replace_part,
        "no crash point inside the REPLACE/ZERO part"
    );
}

/// Read-ahead windows (510 entries each): windows 0 and 1 copy from blocks no op writes and
/// form one replayable run; window 2 is a chain that reads what it writes (saved in
/// scratch); window 3 copies independent blocks; window 4 writes blocks window 3 read, so
/// it cannot share window 3's commit. Then REPLACE and ZERO blocks.
fn replayable_windows_case(seed: u64) -> Case {
    let w = 510u64;
    let mut c = Case::new(3500, seed);
    for b in 0..2 * w {
        c.copy(b, b + 1620);
    }
    for b in 2 * w..3 * w {
        c.copy(b, b + 1);
    }
    for i in 0..w {
        c.copy(2700 + i, 2100 + i);
    }
    for i in 0..60 {
        c.copy(2100 + i, 3300 + i);
    }
    c.replace(3400, 30, seed ^ 0x11);
    c.zero(3450, 10);
    c
}

#[test]
fn windows_that_read_nothing_they_write_skip_scratch_and_share_a_commit() {
    let case = replayable_windows_case(81);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    // Steps: read window 0, write it, read window 1, write it, sync, commit both; then
    // window 2: read, stage, Done, write, sync, commit. Crash while writing window 1:
    // window 0's destinations are in the base device (not synced; they stay), nothing is
    // durable, nothing was saved in scratch.
    let clock = CrashClock::after(3);
    let snap = files.open_crashing(&clock);
    let (io, _unsynced) = VolatileDiskIo::boxed(&files, &clock);
    assert!(snap.merge(io, &MergeControl::new()).is_err());
    assert_reads_target(&snap, &case.target, "same process, crash inside the run");
    drop(snap);
    let durable = files.durable();
    assert_eq!(durable.num_merge_ops, 0);
    assert_eq!(
        durable.state,
        cow_format::layout::BufferState::NotStarted,
        "a replayable window must not be saved in scratch"
    );
    recover_and_finish(&files, &case, "crash inside a replayable run");

    // The run commits once, at its end, with state InProgress (what AOSP's daemon expects
    // of a committed window); the chain window after it is saved in scratch and marked
    // Done before any of its destinations is written.
    fs::write(&files.base, &case.source).unwrap();
    case.write_cow(
        &files.cow,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
    );
    let clock = CrashClock::after(6);
    let snap = files.open_crashing(&clock);
    let (io, _unsynced) = VolatileDiskIo::boxed(&files, &clock);
    assert!(snap.merge(io, &MergeControl::new()).is_err());
    drop(snap);
    let durable = files.durable();
    assert_eq!(durable.num_merge_ops, 1020);
    assert_eq!(durable.state, cow_format::layout::BufferState::InProgress);

    fs::write(&files.base, &case.source).unwrap();
    case.write_cow(
        &files.cow,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
    );
    let clock = CrashClock::after(9);
    let snap = files.open_crashing(&clock);
    let (io, unsynced) = VolatileDiskIo::boxed(&files, &clock);
    assert!(snap.merge(io, &MergeControl::new()).is_err());
    drop(snap);
    lose_unsynced(&files.base, &unsynced);
    let durable = files.durable();
    assert_eq!(durable.num_merge_ops, 1020);
    assert_eq!(durable.state, cow_format::layout::BufferState::Done);
    let saved = MergeState::open(fs::File::open(&files.cow).unwrap())
        .unwrap()
        .read_window()
        .unwrap();
    assert_eq!(saved.new_blocks, (1020..1530).collect::<Vec<u64>>());
    recover_and_finish(&files, &case, "crash inside the chain window");
}

#[test]
fn crash_at_every_step_of_replayable_windows_then_reads_and_merge_are_right() {
    let case = replayable_windows_case(91);
    for version in [CowVersion::V2, CowVersion::V3] {
        let steps = crash_sweep(version, true, &case);
        // Run 0-1: 6 steps; chain: 6; window 3: 4; window 4: 4; two REPLACE/ZERO batches
        // or one: 3 each.
        assert!(steps >= 20, "{version:?}: only {steps} steps");
    }
}

#[test]
fn replayable_runs_stop_at_a_window_that_reads_what_the_run_writes() {
    let case = replayable_windows_case(101);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
        false,
    );
    let snap = files.open();
    let run = |p: u64, max: u64| snap.plan.replayable_windows(&snap.cow, p, max);
    // Windows 0 and 1 together; at most one when asked for one.
    assert_eq!(run(0, 8), 1020);
    assert_eq!(run(0, 1), 510);
    // The chain window reads what it writes: no run.
    assert_eq!(run(1020, 8), 1020);
    // Window 3 alone: window 4 writes blocks window 3 reads.
    assert_eq!(run(1530, 8), 2040);
    assert_eq!(run(2040, 8), 2100);
    // Past the ordered part: nothing.
    assert_eq!(run(2100, 8), 2100);
    // Without scratch, windows are cut by `window_at` instead: no run.
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V2, CompressionAlgorithm::Lz4, false),
        false,
    );
    let snap = files.open();
    assert_eq!(snap.plan.replayable_windows(&snap.cow, 0, 8), 0);
}

/// READs carrying many multi-block REPLACE ops, each decoded once in place, read the
/// target, whole and in pieces, for every compression, before and after the merge.
#[test]
fn reads_of_many_whole_replace_ops_read_the_target() {
    for algorithm in ALGOS {
        let mut case = Case::new(700, 0x5EED_0042);
        case.replace(3, 400, 11);
        case.copy(450, 2);
        case.replace(451, 200, 12);
        case.zero(660, 8);
        let files = Files::create(&case, writer_opts(CowVersion::V3, algorithm, true), false);
        let snap = files.open();
        assert_reads_target(&snap, &case.target, "before the merge");
        assert_eq!(merge_sync(&snap), MergeOutcome::Complete);
        assert_reads_target(&snap, &case.target, "after the merge");
    }
}

/// With `direct_reads`, the long aligned runs of the base and of the source are read with
/// `O_DIRECT` into the answer (no such run is left as a file piece to splice), and every read,
/// whole or in pieces, sees the target before, during and after a merge that writes the base
/// buffered (so direct reads must see writes not yet synced); the source is the base or a
/// separate device.
#[test]
fn direct_reads_serve_the_target_before_during_and_after_the_merge() {
    use super::direct_runs::DIRECT_RUN_MIN;
    for separate_source in [false, true] {
        let case = Case::rich(400, 37);
        let files = Files::create(
            &case,
            writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
            separate_source,
        );
        let probe = fs::File::open(&files.base).unwrap();
        if super::direct_io::reopen_direct(&probe, "base", false, "test").is_none() {
            return; // a filesystem without O_DIRECT
        }
        let opts = UserSnapshotOptions {
            direct_reads: true,
            ..UserSnapshotOptions::default()
        };
        let snap = UserSnapshot::open(&files.cow, &files.source, &files.base, &opts).unwrap();
        assert_reads_target(&snap, &case.target, "direct reads before the merge");
        // What the pieces of 1 MiB READs are made of.
        let (mut produced_bytes, mut short_file_bytes, mut long_file_runs) = (0, 0, 0);
        let mut produced = Vec::new();
        let device = snap.base_sectors() * 512;
        for sector in (0..device).step_by(1 << 20).map(|b| b / 512) {
            let len = (device - sector * 512).min(1 << 20);
            let req = crate::dm_user::Request {
                kind: crate::dm_user::DM_USER_REQ_MAP_READ,
                flags: 0,
                sector,
                len,
            };
            snap.read_in_pieces(&req, &mut produced, &mut |pieces, _| {
                for piece in pieces {
                    match *piece {
                        AnswerPiece::File { offset, len, .. } => {
                            if len >= DIRECT_RUN_MIN && len % 4096 == 0 && offset % 4096 == 0 {
                                long_file_runs += 1;
                            } else {
                                short_file_bytes += len;
                            }
                        }
                        AnswerPiece::Produced { len, .. } => produced_bytes += len,
                        AnswerPiece::Memory { bytes } => produced_bytes += bytes.len(),
                    }
                }
                true
            })
            .expect("answered in pieces");
        }
        assert_eq!(
            long_file_runs, 0,
            "long runs are read directly, not spliced"
        );
        assert_eq!((produced_bytes + short_file_bytes) as u64, device);
        assert!(
            short_file_bytes < DIRECT_RUN_MIN * 4,
            "only a few short runs are left to splice: {short_file_bytes} bytes"
        );
        let passes = merge_while_reading(&snap, snap.sync_io().unwrap(), &case.target);
        assert!(passes >= 1);
        assert!(files.base_image() == case.target);
        assert_reads_target(&snap, &case.target, "direct reads after the merge");
    }
}

/// One READ of `len` bytes at byte `at`, answered in pieces and followed by the transport's
/// `answered` call: the bytes, and how many of them went out as memory pieces (chunks of
/// the base's direct read-ahead).
fn read_in_order_step(snap: &UserSnapshot, at: u64, len: usize) -> (Vec<u8>, usize) {
    let req = crate::dm_user::Request {
        kind: crate::dm_user::DM_USER_REQ_MAP_READ,
        flags: 0,
        sector: at / 512,
        len: len as u64,
    };
    let mut got = vec![0u8; len];
    let mut from_memory = 0usize;
    let mut produced = Vec::new();
    let sent = snap.read_in_pieces(&req, &mut produced, &mut |pieces, bytes| {
        let mut pos = 0usize;
        for piece in pieces {
            let n = match *piece {
                AnswerPiece::File { file, offset, len } => {
                    std::os::unix::fs::FileExt::read_exact_at(
                        file,
                        &mut got[pos..pos + len],
                        offset,
                    )
                    .unwrap();
                    len
                }
                AnswerPiece::Produced { start, len } => {
                    got[pos..pos + len].copy_from_slice(&bytes[start..start + len]);
                    len
                }
                AnswerPiece::Memory { bytes } => {
                    got[pos..pos + bytes.len()].copy_from_slice(bytes);
                    from_memory += bytes.len();
                    bytes.len()
                }
            };
            pos += n;
        }
        assert_eq!(pos, len, "the pieces add up to the request");
        true
    });
    assert_eq!(sent, Some(true));
    snap.answered(&req);
    (got, from_memory)
}

/// `case` as files (the source is the base) and a snapshot of them with 2 MiB of direct
/// read-ahead; `None` on a filesystem without `O_DIRECT`.
fn with_direct_read_ahead(case: &Case) -> Option<(Files, UserSnapshot)> {
    let files = Files::create(
        case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let probe = fs::File::open(&files.base).unwrap();
    super::direct_io::reopen_direct(&probe, "base", false, "test")?;
    let opts = UserSnapshotOptions {
        read_prefetch: true,
        direct_read_ahead: 2 << 20,
        ..UserSnapshotOptions::default()
    };
    let snap = UserSnapshot::open(&files.cow, &files.source, &files.base, &opts).unwrap();
    Some((files, snap))
}

/// With the base's `O_DIRECT` read-ahead, a reader going through the device in order gets
/// most of its base bytes (unchanged blocks, COPY sources: the source is the base) from the
/// read-ahead's chunks, and every read, in pieces or whole, sees the target. Chunks loaded
/// before a merge are never used once it starts: reads during and after it see the target
/// (a merged block read from a chunk would be the old data).
#[test]
fn direct_read_ahead_serves_an_in_order_reader_until_the_merge_starts() {
    let case = Case::rich(400, 43);
    let Some((files, snap)) = with_direct_read_ahead(&case) else {
        return; // a filesystem without O_DIRECT
    };
    let device = snap.base_sectors() * 512;
    let step = 256 << 10;
    let mut from_memory = 0usize;
    for at in (0..device).step_by(step) {
        let len = (device - at).min(step as u64) as usize;
        let (got, memory) = read_in_order_step(&snap, at, len);
        assert!(
            got[..] == case.target[at as usize..at as usize + len],
            "in-order read at {at} differs at block {:?}",
            first_diff(&got, &case.target[at as usize..at as usize + len])
        );
        from_memory += memory;
    }
    // The first two requests start the run; from then on the base's bytes are in chunks.
    assert!(
        from_memory as u64 > device / 4,
        "only {from_memory} of {device} bytes came from the read-ahead"
    );
    // The whole-answer path (ublk, dm-user without splice) reads through the chunks too.
    assert_reads_target(
        &snap,
        &case.target,
        "with direct read-ahead, before the merge",
    );
    // Load the chunks of the first half again, then merge while reading without moving
    // them on: blocks merged there must come from the base, not from the chunks.
    for at in (0..device / 2).step_by(step) {
        read_in_order_step(&snap, at, step);
    }
    let passes = merge_while_reading(&snap, snap.sync_io().unwrap(), &case.target);
    assert!(passes >= 1);
    assert!(files.base_image() == case.target);
    for at in (0..device).step_by(step) {
        let len = (device - at).min(step as u64) as usize;
        let (got, memory) = read_in_order_step(&snap, at, len);
        assert_eq!(memory, 0, "no chunk is used once a merge ran");
        assert!(got[..] == case.target[at as usize..at as usize + len]);
    }
}

/// A daemon whose base read-ahead holds chunks, when another daemon has merged meanwhile
/// (the handoff) and it follows the durable progress: it stops using the chunks (they hold
/// the base from before the merge) and reads the target.
#[test]
fn following_another_daemons_merge_stops_the_direct_read_ahead() {
    let case = Case::rich(400, 47);
    let Some((files, first)) = with_direct_read_ahead(&case) else {
        return; // a filesystem without O_DIRECT
    };
    let step = 256 << 10;
    let mut from_memory = 0;
    for at in (0..4 * step as u64).step_by(step) {
        from_memory += read_in_order_step(&first, at, step).1;
    }
    assert!(from_memory > 0, "the chunks were in use");
    // The other daemon merges everything.
    let second = files.open();
    assert_eq!(merge_sync(&second), MergeOutcome::Complete);
    drop(second);
    first.follow_durable_progress().unwrap();
    for at in (0..4 * step as u64).step_by(step) {
        let (got, memory) = read_in_order_step(&first, at, step);
        assert_eq!(memory, 0, "no chunk used after another daemon's merge");
        assert!(
            got[..] == case.target[at as usize..at as usize + step],
            "read at {at} after the handoff differs at block {:?}",
            first_diff(&got, &case.target[at as usize..at as usize + step])
        );
    }
    assert_reads_target(
        &first,
        &case.target,
        "after following the other daemon's merge",
    );
}

/// Requests of an in-order reader answered out of order (several in flight) keep the base's
/// read-ahead going (a jump far away drops it: `DirectPrefetch::near`), and every read sees
/// the target.
#[test]
fn direct_read_ahead_survives_requests_answered_out_of_order() {
    let case = Case::rich(400, 53);
    let Some((_files, snap)) = with_direct_read_ahead(&case) else {
        return; // a filesystem without O_DIRECT
    };
    let step = 64usize << 10;
    // Pairs swapped: 0, 1, 3, 2, 5, 4, ... (in steps of 64 KiB).
    let mut order: Vec<u64> = (0..40u64).collect();
    for pair in order[2..].chunks_mut(2) {
        pair.reverse();
    }
    let mut late_memory = 0usize;
    for (n, k) in order.into_iter().enumerate() {
        let at = k * step as u64;
        let (got, memory) = read_in_order_step(&snap, at, step);
        assert!(got[..] == case.target[at as usize..at as usize + step]);
        if n >= 20 {
            late_memory += memory;
        }
    }
    assert!(late_memory > 0, "the chunks survived the reordering");
}

/// A progress store whose first `mark_window_done` fails (an I/O error, not a crash: the
/// process goes on), recording the blocks of each window staged.
struct DoneFailsOnce {
    inner: MergeState,
    failed: bool,
    stages: std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>,
}

impl progress_store::ProgressStore for DoneFailsOnce {
    fn progress(
        &self,
    ) -> Result<cow_format::merge_state::DurableProgress, cow_format::MergeStateError> {
        self.inner.progress()
    }
    fn window_capacity(&self) -> usize {
        self.inner.window_capacity()
    }
    fn stage_window(&mut self, b: &[u64], d: &[u8]) -> Result<(), cow_format::MergeStateError> {
        self.stages.lock().unwrap().push(b.to_vec());
        self.inner.stage_window_parts(b, d)
    }
    fn mark_window_done(&mut self) -> Result<(), cow_format::MergeStateError> {
        if !self.failed {
            self.failed = true;
            return Err(cow_format::MergeStateError::Io {
                op: "write",
                offset: 0,
                len: 1,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.inner.mark_window_done()
    }
    fn read_window(
        &self,
    ) -> Result<cow_format::merge_state::ScratchWindow, cow_format::MergeStateError> {
        self.inner.read_window()
    }
    fn commit_window(&mut self, n: u64) -> Result<(), cow_format::MergeStateError> {
        self.inner.commit_window(n)
    }
    fn commit_merged(&mut self, n: u64) -> Result<(), cow_format::MergeStateError> {
        self.inner.commit_merged(n)
    }
}

#[test]
fn a_window_whose_save_failed_is_saved_again_before_its_destinations_are_written() {
    // The window is installed for readers before its save (which runs beside the
    // producing); a failed save must take it back, or the next merge call in this process
    // would find it loaded and write its destinations with no durable copy to replay.
    let case = Case::rich(260, 51);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let stages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let counter = stages.clone();
    let snap = files.open_with_store(|inner| {
        Box::new(DoneFailsOnce {
            inner,
            failed: false,
            stages: counter,
        })
    });
    let err = snap
        .merge(snap.sync_io().unwrap(), &MergeControl::new())
        .unwrap_err();
    assert!(err.to_string().contains("Done"), "{err}");
    assert_eq!(stages.lock().unwrap().len(), 1);
    assert!(
        files.base_image() == case.source,
        "a destination was written"
    );
    assert_reads_target(&snap, &case.target, "after the failed save");
    merge_while_reading(&snap, snap.sync_io().unwrap(), &case.target);
    assert!(files.base_image() == case.target);
    let stages = stages.lock().unwrap();
    assert!(stages.len() >= 2, "{} saves", stages.len());
    assert_eq!(
        stages[1], stages[0],
        "the failed window was not saved again first"
    );
}

#[test]
fn a_block_that_cannot_be_produced_fails_the_merge_before_its_window_writes() {
    // The XOR op with the highest destination is produced late in its window (by the
    // second producing thread): its garbled payload must fail the merge with an error that
    // names it, before any destination of the window reaches the base.
    let case = Case::rich(260, 51);
    let files = Files::create(
        &case,
        writer_opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
        false,
    );
    let op = {
        let snap = files.open();
        *snap
            .cow
            .ops()
            .iter()
            .filter(|op| op.kind == cow_format::OpKind::Xor)
            .max_by_key(|op| op.new_block)
            .unwrap()
    };
    let mut cow = fs::read(&files.cow).unwrap();
    let at = op.data_offset as usize;
    cow[at..at + op.data_length as usize].fill(0xFF);
    fs::write(&files.cow, &cow).unwrap();
    let snap = files.open();
    let err = merge_err(&snap);
    let text = crate::error_chain::ErrorChain(&err).to_string();
    assert!(
        text.contains(&format!("producing block {}", op.new_block)),
        "{text}"
    );
    assert_eq!(snap.progress().state, MergePhase::Failed);
    let base = files.base_image();
    let block =
        |image: &[u8], b: u64| image[b as usize * snapshot::BLOCK..][..snapshot::BLOCK].to_vec();
    // Every op of the failing window is unwritten; the windows before it are merged.
    let durable = files.durable().num_merge_ops;
    let failing = snap.plan.window_at(&snap.cow, durable);
    for entry in failing {
        let (_, o) = snap.plan.op(&snap.cow, entry).unwrap();
        assert!(
            block(&base, o.new_block) == block(&case.source, o.new_block),
            "block {} of the failing window was written",
            o.new_block
        );
    }
}

fn merge_err(snap: &UserSnapshot) -> UserMergeError {
    snap.merge(snap.sync_io().unwrap(), &MergeControl::new())
        .unwrap_err()
}
