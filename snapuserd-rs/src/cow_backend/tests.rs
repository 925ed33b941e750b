//! End-to-end tests over REAL COW files written with `cow_format`'s writer: the core's
//! dm-snapshot model reads and merges through the real backends (reader-based block source,
//! file-backed merge-state store). A crash drops every in-memory object; the restart
//! reopens the COW file and the base image from disk.
//!
//! Targets are computed independently from the pristine source and the op list.

use std::fs;
use std::path::{Path, PathBuf};

use cow_format::{Compression, CompressionAlgorithm, CowReader, CowVersion, CowWriter};
use cow_format::{MergeOrderOptions, WriterOptions};

use super::handle::{CowSnapshot, SnapshotOpenError};
use super::merge_store::CowMergeStore;
use super::source_file::FileSource;
use crate::snapshot::dm_snapshot_model::{
    crash_sweep, CowDevice, CrashMode, DmSnapshot, MergeStep, ModelError, Origin, OriginDevice,
    ServerCow,
};
use crate::snapshot::merge_plan::BLOCK_SIZE;
use crate::snapshot::merge_tracker::{MergeStateStore, ScratchState, ScratchWindow};
use crate::snapshot::test_support::CrashClock;

/// The COW file's store with a crash clock in front of each durable step: a wrapper, so the
/// real store carries no test hook.
#[derive(Debug)]
struct CrashingCowStore {
    inner: CowMergeStore,
    clock: CrashClock,
}

impl MergeStateStore for CrashingCowStore {
    fn num_merge_ops(&self) -> u64 {
        self.inner.num_merge_ops()
    }

    fn scratch_state(&self) -> ScratchState {
        self.inner.scratch_state()
    }

    fn scratch_capacity_blocks(&self) -> usize {
        self.inner.scratch_capacity_blocks()
    }

    fn read_window(&self) -> std::io::Result<ScratchWindow> {
        self.inner.read_window()
    }

    fn commit(&mut self, num_merge_ops: u64) -> std::io::Result<()> {
        self.clock.step("commit num_merge_ops")?;
        self.inner.commit(num_merge_ops)
    }

    fn commit_window(&mut self, num_merge_ops: u64) -> std::io::Result<()> {
        self.clock.step("commit window")?;
        self.inner.commit_window(num_merge_ops)
    }

    fn write_window(&mut self, window: &ScratchWindow) -> std::io::Result<()> {
        self.clock.step("write scratch data")?;
        self.inner.stage_window(window)?;
        self.clock.step("set scratch state Done")?;
        self.inner.mark_window_done()
    }

    fn reload(&mut self) -> std::io::Result<()> {
        self.inner.reload()
    }
}

/// A snapshot whose store obeys a crash clock.
type TestSnapshot = CowSnapshot<Origin, CrashingCowStore>;

/// Deterministic bytes (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
    /// A block that compresses: a short random phrase repeated, with a few random bytes.
    fn compressible_block(&mut self) -> Vec<u8> {
        let phrase = self.bytes(48);
        let mut b: Vec<u8> = phrase.iter().copied().cycle().take(BLOCK_SIZE).collect();
        for _ in 0..16 {
            let at = (self.next() % BLOCK_SIZE as u64) as usize;
            b[at] = (self.next() >> 56) as u8;
        }
        b
    }
}

/// One op of a test COW.
#[derive(Debug, Clone)]
enum TestOp {
    Copy {
        new: u64,
        old: u64,
    },
    Xor {
        new: u64,
        src_off: u64,
        mask: Vec<u8>,
    },
    Replace {
        new: u64,
        data: Vec<u8>,
    },
    Zero {
        new: u64,
        count: u64,
    },
}

#[derive(Debug, Clone)]
struct Case {
    source: Vec<u8>,
    /// COPY/XOR in merge order.
    ordered: Vec<TestOp>,
    /// REPLACE/ZERO.
    others: Vec<TestOp>,
    opts: WriterOptions,
}

fn opts(version: CowVersion, alg: CompressionAlgorithm, scratch: bool) -> WriterOptions {
    WriterOptions {
        version,
        compression: Compression {
            algorithm: alg,
            level: None,
        },
        scratch,
        op_count_max: (version == CowVersion::V3).then_some(100_000),
        ..WriterOptions::default()
    }
}

impl Case {
    fn new(blocks: usize, seed: u64, opts: WriterOptions) -> Self {
        let mut rng = Rng(seed | 1);
        Case {
            source: rng.bytes(blocks * BLOCK_SIZE),
            ordered: Vec::new(),
            others: Vec::new(),
            opts,
        }
    }

    fn target(&self) -> Vec<u8> {
        let src = &self.source;
        let mut img = src.clone();
        let mut put = |block: u64, data: &[u8]| {
            let at = block as usize * BLOCK_SIZE;
            img[at..at + data.len()].copy_from_slice(data);
        };
        for op in self.ordered.iter().chain(&self.others) {
            match op {
                TestOp::Copy { new, old } => {
                    let at = *old as usize * BLOCK_SIZE;
                    put(*new, &src[at..at + BLOCK_SIZE]);
                }
                TestOp::Xor { new, src_off, mask } => {
                    let at = *src_off as usize;
                    let b: Vec<u8> = src[at..at + BLOCK_SIZE]
                        .iter()
                        .zip(mask)
                        .map(|(a, m)| a ^ m)
                        .collect();
                    put(*new, &b);
                }
                TestOp::Replace { new, data } => put(*new, data),
                TestOp::Zero { new, count } => put(*new, &vec![0u8; *count as usize * BLOCK_SIZE]),
            }
        }
        img
    }

    /// Write the COW: sequence = ordered destinations, then the ops.
    fn write(&self, path: &Path) {
        let file = fs::File::create(path).unwrap();
        let mut w = CowWriter::create(file, self.opts).unwrap();
        let seq: Vec<u32> = self
            .ordered
            .iter()
            .map(|op| match op {
                TestOp::Copy { new, .. } | TestOp::Xor { new, .. } => *new as u32,
                _ => unreachable!("ordered ops are COPY/XOR"),
            })
            .collect();
        if !seq.is_empty() {
            w.add_sequence(&seq).unwrap();
        }
        for op in self.ordered.iter().chain(&self.others) {
            match op {
                TestOp::Copy { new, old } => w.add_copy(*new, *old).unwrap(),
                TestOp::Xor { new, src_off, mask } => w.add_xor(*new, mask, *src_off).unwrap(),
                TestOp::Replace { new, data } => w.add_replace(*new, data).unwrap(),
                TestOp::Zero { new, count } => w.add_zero(*new, *count).unwrap(),
            }
        }
        w.finalize().unwrap();
    }
}

/// A COW file and a base image on disk.
struct Files {
    _dir: tempfile::TempDir,
    cow: PathBuf,
    base: PathBuf,
}

fn files(case: &Case) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("test.cow");
    let base = dir.path().join("base.img");
    case.write(&cow);
    fs::write(&base, &case.source).unwrap();
    Files {
        _dir: dir,
        cow,
        base,
    }
}

fn assert_images_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got != want {
        let bad: Vec<usize> = (0..want.len() / BLOCK_SIZE)
            .filter(|&b| {
                got[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
                    != want[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
            })
            .take(10)
            .collect();
        panic!("{what}: blocks differ from the target, first ones: {bad:?}");
    }
}

fn view_of(snap: &DmSnapshot, origin: &Origin, cow: &mut dyn CowDevice) -> Vec<u8> {
    let mut img = Vec::with_capacity(origin.blocks() as usize * BLOCK_SIZE);
    let mut buf = [0u8; BLOCK_SIZE];
    for b in 0..origin.blocks() {
        snap.read_block(origin, cow, b, &mut buf).unwrap();
        img.extend_from_slice(&buf);
    }
    img
}

/// Boot on the on-disk state: the origin model holds the base file's bytes, the daemon
/// reads the source through it (dm-snapshot-merge's source is the base being merged).
fn boot(f: &Files, clock: &CrashClock) -> (Origin, Result<TestSnapshot, SnapshotOpenError>) {
    let origin = OriginDevice::create(fs::read(&f.base).unwrap(), clock.clone());
    let c = clock.clone();
    let snap = CowSnapshot::build(&f.cow, origin.clone(), use_mmap(), move |store| {
        CrashingCowStore {
            inner: store,
            clock: c,
        }
    });
    (origin, snap)
}

/// Alternate the COW storage between runs so both are covered.
fn use_mmap() -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FLIP: AtomicBool = AtomicBool::new(false);
    FLIP.fetch_xor(true, Ordering::Relaxed)
}

fn merge(snap: &TestSnapshot, origin: &Origin) -> Result<usize, ModelError> {
    let server = snap.server();
    let mut cow = ServerCow { server };
    let mut dm = DmSnapshot::load(&mut cow)?;
    let mut batches = 0;
    loop {
        match dm.merge_step(origin, &mut cow)? {
            MergeStep::Done => return Ok(batches),
            MergeStep::Merged(_) => batches += 1,
        }
    }
}

fn durable_num_merge_ops(cow: &Path) -> (u64, u64) {
    let r = CowReader::open(fs::File::open(cow).unwrap()).unwrap();
    let total = r.merge_order(MergeOrderOptions::default()).count() as u64;
    (r.num_merge_ops(), total)
}

/// Snapshot view through `FileSource` (no merge) equals the target.
fn check_view_with_file_source(case: &Case, f: &Files) {
    check_view(case, CowSnapshot::open(&f.cow, &f.base).unwrap());
    let src = FileSource::open(&f.base).unwrap();
    check_view(
        case,
        CowSnapshot::open_with_source_pread(&f.cow, src).unwrap(),
    );
}

fn check_view(case: &Case, snap: CowSnapshot) {
    check_reused_buffers(&snap);
    assert!(snap.device_sectors() >= 8 && snap.device_bytes() % 4096 == 0);
    let origin = OriginDevice::create(case.source.clone(), CrashClock::never());
    let mut cow = ServerCow {
        server: snap.server(),
    };
    let dm = DmSnapshot::load(&mut cow).unwrap();
    assert_images_eq(
        &view_of(&dm, &origin, &mut cow),
        &case.target(),
        "snapshot view (file source)",
    );
}

/// View, clean merge, base == target, durable num_merge_ops == all entries, empty after.
fn run_clean(case: &Case) -> usize {
    let f = files(case);
    check_view_with_file_source(case, &f);
    let (origin, snap) = boot(&f, &CrashClock::never());
    let snap = snap.unwrap();
    let batches = merge(&snap, &origin).unwrap();
    assert!(snap.server().merge_complete().unwrap());
    assert_images_eq(&origin.image(), &case.target(), "merged base");
    let (done, total) = durable_num_merge_ops(&f.cow);
    assert_eq!(done, total, "durable num_merge_ops");
    drop(snap);
    fs::write(&f.base, origin.image()).unwrap();
    let (_, again) = boot(&f, &CrashClock::never());
    assert_eq!(again.unwrap().server().exceptions().num_exceptions(), 0);
    batches
}

/// Crash after `budget` durable steps (origin writes and flushes, COW store writes), then
/// reboot from the files and finish. Returns false when the run ended without crashing.
fn run_one_crash(case: &Case, budget: u64, mode: CrashMode, check_view: bool) -> bool {
    let f = files(case);
    let target = case.target();
    let clock = CrashClock::after(budget);
    let (origin, snap) = boot(&f, &clock);
    let result = match &snap {
        Ok(s) => merge(s, &origin).map(|_| ()),
        Err(e) => Err(ModelError::BadTable(e.to_string())),
    };
    if !clock.crashed() {
        result.unwrap();
        assert_images_eq(&origin.image(), &target, "merged base (no crash)");
        return false;
    }
    assert!(result.is_err(), "a crash must surface as an error");
    // Everything in memory is gone; only the files survive.
    let crash_image = origin.crash_image(mode);
    drop(snap);
    drop(origin);
    fs::write(&f.base, crash_image).unwrap();
    let (origin, snap) = boot(&f, &CrashClock::never());
    let snap = snap.unwrap_or_else(|e| panic!("reboot after crash at step {budget}: {e}"));
    if check_view {
        let mut cow = ServerCow {
            server: snap.server(),
        };
        let dm = DmSnapshot::load(&mut cow).unwrap();
        assert_images_eq(
            &view_of(&dm, &origin, &mut cow),
            &target,
            "snapshot view after restart",
        );
    }
    merge(&snap, &origin).unwrap();
    assert_images_eq(&origin.image(), &target, "merged base after restart");
    let (done, total) = durable_num_merge_ops(&f.cow);
    assert_eq!(done, total, "durable num_merge_ops after restart");
    true
}

/// Crash at budgets 0, stride, 2·stride, … until a run completes, in every crash mode.
fn crash_everywhere(case: &Case, stride: u64, check_view: bool) -> u64 {
    crash_sweep(stride, |budget, mode| {
        run_one_crash(case, budget, mode, check_view)
    })
}

/// Copies highest first: `start+i+shift ← start+i`.
fn chain_up(case: &mut Case, start: u64, len: u64, shift: u64) {
    for i in (0..len).rev() {
        case.ordered.push(TestOp::Copy {
            new: start + i + shift,
            old: start + i,
        });
    }
}

/// Copies lowest first: `start+i ← start+i+shift`.
fn chain_down(case: &mut Case, start: u64, len: u64, shift: u64) {
    for i in 0..len {
        case.ordered.push(TestOp::Copy {
            new: start + i,
            old: start + i + shift,
        });
    }
}

/// A mixed case: overlapping copies, unaligned and in-place XORs, REPLACE runs (multi-block
/// in v3), ZERO runs.
fn mixed(version: CowVersion, alg: CompressionAlgorithm, scratch: bool, seed: u64) -> Case {
    let mut c = Case::new(160, seed, opts(version, alg, scratch));
    let mut rng = Rng(seed.wrapping_mul(7) | 1);
    chain_up(&mut c, 10, 12, 3);
    // Unaligned XORs, overlapping upwards (reads start+i and start+i+1, writes start+i+3).
    for i in (0..8u64).rev() {
        c.ordered.push(TestOp::Xor {
            new: 40 + i + 3,
            src_off: (40 + i) * 4096 + 1 + 97 * i,
            mask: rng.compressible_block(),
        });
    }
    if scratch {
        // In-place XORs reading their own block (and the next one).
        for b in [70u64, 72, 74] {
            c.ordered.push(TestOp::Xor {
                new: b,
                src_off: b * 4096 + 33,
                mask: rng.bytes(BLOCK_SIZE),
            });
        }
    }
    // REPLACE runs: compressible and incompressible, lengths that split into 2^k ops.
    let mut run = Vec::new();
    for k in 0..13 {
        if k % 3 == 0 {
            run.extend(rng.bytes(BLOCK_SIZE));
        } else {
            run.extend(rng.compressible_block());
        }
    }
    c.others.push(TestOp::Replace { new: 90, data: run });
    c.others.push(TestOp::Replace {
        new: 120,
        data: rng.compressible_block(),
    });
    c.others.push(TestOp::Zero { new: 130, count: 5 });
    c.others.push(TestOp::Zero { new: 0, count: 2 });
    c
}

const ALL_ALGS: [CompressionAlgorithm; 5] = [
    CompressionAlgorithm::None,
    CompressionAlgorithm::Gz,
    CompressionAlgorithm::Brotli,
    CompressionAlgorithm::Lz4,
    CompressionAlgorithm::Zstd,
];

#[test]
fn no_ops_v2_and_v3() {
    for v in [CowVersion::V2, CowVersion::V3] {
        let c = Case::new(8, 1, opts(v, CompressionAlgorithm::Lz4, true));
        assert_eq!(run_clean(&c), 0);
    }
}

#[test]
fn all_zero_across_two_areas() {
    for v in [CowVersion::V2, CowVersion::V3] {
        let mut c = Case::new(320, 2, opts(v, CompressionAlgorithm::None, true));
        c.others.push(TestOp::Zero { new: 5, count: 300 });
        assert!(run_clean(&c) >= 2);
    }
}

#[test]
fn every_compression_v2_and_v3_clean() {
    for v in [CowVersion::V2, CowVersion::V3] {
        for alg in ALL_ALGS {
            for scratch in [true, false] {
                run_clean(&mixed(v, alg, scratch, 3 + alg.id() as u64));
            }
        }
    }
}

#[test]
fn v3_compression_factors_expand_multi_block_replace() {
    for factor in [4096u32, 8192, 16384, 65536, 262144] {
        let mut o = opts(CowVersion::V3, CompressionAlgorithm::Lz4, true);
        o.compression_factor = factor;
        let c = mixed(CowVersion::V3, CompressionAlgorithm::Lz4, true, 11);
        let c = Case { opts: o, ..c };
        let f = files(&c);
        let r = CowReader::open(fs::File::open(&f.cow).unwrap()).unwrap();
        let widest = r.ops().iter().map(|op| op.num_blocks).max().unwrap();
        assert_eq!(widest, u64::from(factor / 4096).min(8), "factor {factor}");
        run_clean(&c);
    }
}

/// Adjacent REPLACE blocks merge as one batch whatever the compression factor: a v3
/// multi-block REPLACE is expanded in the same descending order as the entries around it,
/// so dm-snapshot-merge sees one run of consecutive exceptions (one metadata commit)
/// instead of one batch per block.
#[test]
fn adjacent_replace_blocks_merge_in_one_batch_at_every_factor() {
    for (version, factor) in [
        (CowVersion::V2, 4096u32),
        (CowVersion::V3, 4096),
        (CowVersion::V3, 16384),
        (CowVersion::V3, 65536),
    ] {
        let mut o = opts(version, CompressionAlgorithm::Lz4, false);
        o.compression_factor = factor;
        let mut c = Case::new(200, 31, o);
        let mut rng = Rng(77);
        // One COPY, so that the COW carries sequence data: a v3 file without any puts
        // every op in file order (cow-format.md §6.2) and its REPLACEs stay ascending.
        c.ordered.push(TestOp::Copy { new: 190, old: 191 });
        // Two runs of adjacent blocks, 48 and 20 long, written as whole ranges.
        for (start, len) in [(10u64, 48usize), (120, 20)] {
            let mut data = rng.bytes(len * BLOCK_SIZE);
            data[..BLOCK_SIZE].fill(0x11);
            c.others.push(TestOp::Replace { new: start, data });
        }
        let f = files(&c);
        let widest = CowReader::open(fs::File::open(&f.cow).unwrap())
            .unwrap()
            .ops()
            .iter()
            .map(|op| op.num_blocks)
            .max()
            .unwrap();
        assert_eq!(
            widest,
            u64::from(factor / 4096),
            "{version:?} factor {factor}"
        );
        let batches = run_clean(&c);
        assert_eq!(
            batches, 3,
            "{version:?} factor {factor}: the COPY, then one batch per run"
        );
    }
}

#[test]
fn long_overlapping_chains_both_ways() {
    for v in [CowVersion::V2, CowVersion::V3] {
        for scratch in [true, false] {
            let mut c = Case::new(200, 5, opts(v, CompressionAlgorithm::Zstd, scratch));
            chain_up(&mut c, 0, 60, 1);
            chain_down(&mut c, 100, 60, 2);
            run_clean(&c);
        }
    }
}

#[test]
fn crash_at_every_step_small_scenarios() {
    let mut tried = 0;
    for scratch in [true, false] {
        let mut c = Case::new(
            40,
            6,
            opts(CowVersion::V2, CompressionAlgorithm::Lz4, scratch),
        );
        chain_up(&mut c, 0, 6, 1);
        chain_down(&mut c, 20, 6, 2);
        tried += crash_everywhere(&c, 1, true);
    }
    assert!(tried > 30, "only {tried} crash points");
}

#[test]
fn crash_at_every_step_mixed_v3_multi_block() {
    let mut o = opts(CowVersion::V3, CompressionAlgorithm::Lz4, true);
    o.compression_factor = 16384;
    let c = Case {
        opts: o,
        ..mixed(CowVersion::V3, CompressionAlgorithm::Lz4, true, 21)
    };
    assert!(crash_everywhere(&c, 1, false) > 30);
    let c = mixed(CowVersion::V2, CompressionAlgorithm::Gz, false, 22);
    assert!(crash_everywhere(&c, 1, false) > 30);
}

#[test]
fn more_ordered_ops_than_one_window_with_sampled_crashes() {
    // 1100 overlapping copies: three scratch windows of up to 510.
    let mut c = Case::new(
        1110,
        7,
        opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
    );
    chain_up(&mut c, 0, 1100, 3);
    let f = files(&c);
    {
        let r = CowReader::open(fs::File::open(&f.cow).unwrap()).unwrap();
        assert_eq!(r.num_ordered_ops_to_merge(), 1100);
    }
    drop(f);
    run_clean(&c);
    // Sampled crash points spread over the whole merge (each run is a full merge).
    // Count the durable steps of a whole merge; batches are uniform here, so the ends of
    // windows 1 and 2 (ops 510 and 1020) lie near 510/1100 and 1020/1100 of them. Those
    // neighbourhoods are crashed at every step, the rest sampled.
    let total = {
        let f = files(&c);
        let clock = CrashClock::never();
        let (origin, snap) = boot(&f, &clock);
        merge(&snap.unwrap(), &origin).unwrap();
        clock.steps()
    };
    let near = |op: u64| {
        let at = total * op / 1100;
        at.saturating_sub(8)..at + 8
    };
    let mut crashed = 0;
    let budgets = [0u64, 1, 2, total / 3, total - 2, total - 1]
        .into_iter()
        .chain(near(510))
        .chain(near(1020));
    for budget in budgets {
        crashed += usize::from(run_one_crash(&c, budget, CrashMode::KeepOlderHalf, false));
    }
    assert!(
        crashed >= 36,
        "only {crashed} of 38 runs crashed ({total} steps)"
    );
}

#[test]
fn resume_from_a_cow_with_progress_in_its_header() {
    let mut o = opts(CowVersion::V2, CompressionAlgorithm::Lz4, false);
    o.num_merge_ops = 0;
    let mut c = Case::new(40, 8, o);
    chain_down(&mut c, 0, 10, 1);
    c.others.push(TestOp::Zero { new: 30, count: 3 });
    let f = files(&c);
    // Merge part of it by hand from the pristine source (the first 4 entries), and record it.
    let mut base = c.source.clone();
    let target = c.target();
    for b in 0..4usize {
        base[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
            .copy_from_slice(&target[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]);
    }
    fs::write(&f.base, &base).unwrap();
    {
        let rw = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.cow)
            .unwrap();
        let mut ms = cow_format::MergeState::open(rw).unwrap();
        ms.commit_merged(4).unwrap();
    }
    let (origin, snap) = boot(&f, &CrashClock::never());
    let snap = snap.unwrap();
    assert_eq!(snap.server().exceptions().num_exceptions(), 13 - 4);
    merge(&snap, &origin).unwrap();
    assert_images_eq(&origin.image(), &target, "merged base");
}

/// An error's message followed by its causes' (each error prints its own context only).
fn chain(err: &dyn std::error::Error) -> String {
    crate::error_chain::ErrorChain(err).to_string()
}

#[test]
fn bad_cows_are_refused_clearly() {
    // Duplicate destinations.
    let mut o = opts(CowVersion::V2, CompressionAlgorithm::None, false);
    o.allow_duplicate_blocks = true;
    let mut c = Case::new(16, 9, o);
    c.others.push(TestOp::Zero { new: 3, count: 1 });
    c.others.push(TestOp::Zero { new: 3, count: 1 });
    let f = files(&c);
    let err = CowSnapshot::open(&f.cow, &f.base).unwrap_err();
    assert!(
        chain(&err).contains("both write block 3"),
        "{}",
        chain(&err)
    );
    // A self-reading XOR without scratch.
    let mut c = Case::new(
        16,
        10,
        opts(CowVersion::V2, CompressionAlgorithm::None, false),
    );
    c.ordered.push(TestOp::Xor {
        new: 4,
        src_off: 4 * 4096,
        mask: vec![1u8; BLOCK_SIZE],
    });
    let f = files(&c);
    let err = CowSnapshot::open(&f.cow, &f.base).unwrap_err();
    let chain = crate::error_chain::ErrorChain(&err).to_string();
    assert!(chain.contains("needs scratch space"), "{chain}");
    // A truncated COW.
    let c = mixed(CowVersion::V2, CompressionAlgorithm::Lz4, true, 12);
    let f = files(&c);
    let len = fs::metadata(&f.cow).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&f.cow)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    assert!(CowSnapshot::open(&f.cow, &f.base).is_err());
    // A missing source.
    let err =
        CowSnapshot::<FileSource>::open(&f.cow, &f.base.with_extension("missing")).unwrap_err();
    assert!(matches!(err, SnapshotOpenError::Open { .. }), "{err}");
}

/// Real file content (sorted /usr/lib files), padded with a pattern; `blocks` blocks.
fn real_content(blocks: usize) -> Vec<u8> {
    let want = blocks * BLOCK_SIZE;
    let mut data = Vec::with_capacity(want);
    let mut stack = vec![PathBuf::from("/usr/lib/x86_64-linux-gnu")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            if p.is_symlink() {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if data.len() < want {
                if let Ok(b) = fs::read(&p) {
                    data.extend_from_slice(&b[..b.len().min(want - data.len())]);
                }
            }
        }
    }
    let mut rng = Rng(99);
    while data.len() < want {
        data.extend(rng.compressible_block());
    }
    data.truncate(want);
    data
}

/// An "upgrade": moved ranges (both directions, overlapping), byte-shifted content,
/// small edits, zeroed and fresh blocks.
fn upgraded(source: &[u8]) -> Vec<u8> {
    let bs = BLOCK_SIZE;
    let mut t = source.to_vec();
    // Move 300 blocks up by 7 (overlapping), and 200 blocks down by 5.
    t[(100 + 7) * bs..(400 + 7) * bs].copy_from_slice(&source[100 * bs..400 * bs]);
    t[600 * bs..800 * bs].copy_from_slice(&source[605 * bs..805 * bs]);
    // Byte-shifted region (an insertion of 13 bytes).
    t[900 * bs + 13..1000 * bs].copy_from_slice(&source[900 * bs..1000 * bs - 13]);
    // Edits.
    for b in (1100..1300).step_by(3) {
        t[b * bs + 100] ^= 0x5a;
        t[b * bs + 2000] = t[b * bs + 2000].wrapping_add(1);
    }
    // Zeroed and fresh blocks.
    t[1400 * bs..1450 * bs].fill(0);
    let mut rng = Rng(5);
    for b in 1500..1530 {
        t[b * bs..(b + 1) * bs].copy_from_slice(&rng.compressible_block());
    }
    t
}

#[test]
fn cow_from_ota_tools_create_on_a_realistic_pair() {
    use ota_tools::create::command::{create_cow, CreateOptions};
    let source = real_content(1600);
    let target = upgraded(&source);
    for version in [CowVersion::V2, CowVersion::V3] {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
        fs::write(&src, &source).unwrap();
        fs::write(&tgt, &target).unwrap();
        let f = Files {
            cow: dir.path().join("ota.cow"),
            base: dir.path().join("base.img"),
            _dir: dir,
        };
        let opts = CreateOptions {
            version,
            threads: Some(1),
            // The legacy daemon's order (descending runs batch under dm-snapshot-merge).
            merge_mode: cow_format::MergeMode::Legacy,
            ..CreateOptions::default()
        };
        create_cow(&opts, &src, &tgt, &f.cow).unwrap();
        fs::write(&f.base, &source).unwrap();
        {
            let r = CowReader::open(fs::File::open(&f.cow).unwrap()).unwrap();
            let kinds: std::collections::HashSet<_> = r.ops().iter().map(|o| o.kind).collect();
            assert!(kinds.len() >= 3, "{version:?}: op kinds {kinds:?}");
            assert!(r.num_ordered_ops_to_merge() > 400, "{version:?}");
        }
        // Snapshot view through the file source.
        let snap = CowSnapshot::open(&f.cow, &f.base).unwrap();
        let origin = OriginDevice::create(source.clone(), CrashClock::never());
        let mut cow = ServerCow {
            server: snap.server(),
        };
        let dm = DmSnapshot::load(&mut cow).unwrap();
        assert_images_eq(&view_of(&dm, &origin, &mut cow), &target, "ota-tools view");
        drop(snap);
        // Merge with a crash in the middle (a reboot from the files), then finish.
        let clock = CrashClock::after(700);
        let (origin, snap) = boot(&f, &clock);
        let snap = snap.unwrap();
        assert!(merge(&snap, &origin).is_err() && clock.crashed());
        let image = origin.crash_image(CrashMode::KeepOlderHalf);
        drop(snap);
        fs::write(&f.base, image).unwrap();
        let (origin, snap) = boot(&f, &CrashClock::never());
        let snap = snap.unwrap();
        merge(&snap, &origin).unwrap();
        assert_images_eq(&origin.image(), &target, "ota-tools merged base");
        let (done, total) = durable_num_merge_ops(&f.cow);
        assert_eq!(done, total);
    }
}

#[test]
fn v3_without_sequence_mixing_replace_before_copy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("mixed.cow");
    let base = dir.path().join("base.img");
    fs::write(&base, vec![7u8; 16 * BLOCK_SIZE]).unwrap();
    let o = opts(CowVersion::V3, CompressionAlgorithm::Lz4, true);
    let mut w = CowWriter::create(fs::File::create(&cow).unwrap(), o).unwrap();
    // No sequence: v3 merge order is file order, REPLACE first.
    w.add_replace(1, &vec![1u8; BLOCK_SIZE]).unwrap();
    w.add_copy(5, 9).unwrap();
    w.finalize().unwrap();
    let err = CowSnapshot::open(&cow, &base).unwrap_err();
    assert!(
        matches!(err, SnapshotOpenError::Plan { .. }) && chain(&err).contains("ordered"),
        "{}",
        chain(&err)
    );
    // The same ops with COPY first (still no sequence) are served and merged.
    let mut w = CowWriter::create(fs::File::create(&cow).unwrap(), o).unwrap();
    w.add_copy(5, 9).unwrap();
    w.add_replace(1, &vec![1u8; BLOCK_SIZE]).unwrap();
    w.finalize().unwrap();
    let f = Files {
        cow,
        base,
        _dir: dir,
    };
    let (origin, snap) = boot(&f, &CrashClock::never());
    let snap = snap.unwrap();
    assert_eq!(snap.server().plan().num_ordered(), 1);
    merge(&snap, &origin).unwrap();
    let img = origin.image();
    assert_eq!(&img[BLOCK_SIZE..2 * BLOCK_SIZE], &vec![1u8; BLOCK_SIZE][..]);
    assert_eq!(
        &img[5 * BLOCK_SIZE..6 * BLOCK_SIZE],
        &vec![7u8; BLOCK_SIZE][..]
    );
}

/// A random case with a valid merge order (cow-format.md §6.4: no op reads a block an
/// earlier op wrote). Candidates form dependency cycles at random; a cycle member that
/// cannot be placed becomes a REPLACE of its target content.
fn random_case(seed: u64, n_ops: usize, v3: bool, scratch: bool, blocks: u64) -> Case {
    let version = if v3 { CowVersion::V3 } else { CowVersion::V2 };
    let mut c = Case::new(
        blocks as usize,
        seed,
        opts(version, CompressionAlgorithm::Lz4, scratch),
    );
    let mut rng = Rng(seed.wrapping_mul(31) | 1);
    let mut dests: Vec<u64> = (0..blocks - 1).collect();
    for i in (1..dests.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        dests.swap(i, j);
    }
    // Candidates: (dest, reads) with their op.
    let mut pending: Vec<(u64, Vec<u64>, TestOp)> = Vec::new();
    for &d in dests.iter().take(n_ops) {
        let near = |rng: &mut Rng| (d + blocks - 4 + rng.next() % 8) % (blocks - 1);
        let op = match rng.next() % 6 {
            0 | 1 => {
                let old = near(&mut rng);
                (d, vec![old], TestOp::Copy { new: d, old })
            }
            2 => {
                let b = near(&mut rng);
                let off = if scratch { rng.next() % 4096 } else { 0 };
                let reads = if off == 0 { vec![b] } else { vec![b, b + 1] };
                if !scratch && reads.contains(&d) {
                    (d, vec![], TestOp::Zero { new: d, count: 1 })
                } else {
                    let mask = rng.compressible_block();
                    (
                        d,
                        reads,
                        TestOp::Xor {
                            new: d,
                            src_off: b * 4096 + off,
                            mask,
                        },
                    )
                }
            }
            3 => (d, vec![], TestOp::Zero { new: d, count: 1 }),
            _ => (
                d,
                vec![],
                TestOp::Replace {
                    new: d,
                    data: rng.compressible_block(),
                },
            ),
        };
        pending.push(op);
    }
    let (mut ordered, others): (Vec<_>, Vec<_>) =
        pending.into_iter().partition(|(_, r, _)| !r.is_empty());
    c.others = others.into_iter().map(|(_, _, op)| op).collect();
    // Place an ordered op once no other unplaced op reads its destination.
    while !ordered.is_empty() {
        let ready = ordered
            .iter()
            .position(|(d, _, _)| !ordered.iter().any(|(d2, r2, _)| d2 != d && r2.contains(d)));
        match ready {
            Some(i) => c.ordered.push(ordered.remove(i).2),
            None => {
                // Break a cycle: the first candidate becomes a REPLACE of what it would produce.
                let (d, _, op) = ordered.remove(0);
                let probe = Case {
                    ordered: vec![op],
                    others: vec![],
                    ..c.clone()
                };
                let t = probe.target();
                let at = d as usize * BLOCK_SIZE;
                c.others.push(TestOp::Replace {
                    new: d,
                    data: t[at..at + BLOCK_SIZE].to_vec(),
                });
            }
        }
    }
    c
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    #[test]
    fn random_valid_orders_survive_a_crash(
        seed in proptest::prelude::any::<u64>(),
        n_ops in 1usize..90,
        v3 in proptest::prelude::any::<bool>(),
        scratch in proptest::prelude::any::<bool>(),
        budget in 0u64..600,
    ) {
        let c = random_case(seed, n_ops, v3, scratch, 96);
        run_one_crash(&c, budget, CrashMode::KeepOlderHalf, true);
        run_one_crash(&c, budget / 3, CrashMode::DropUnflushed, false);
    }
}

/// Every chunk read into a reused, dirty buffer equals the same read into a fresh one
/// (the server does not zero-fill reused READ buffers first).
fn check_reused_buffers(snap: &CowSnapshot) {
    use crate::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ};
    let server = snap.server();
    let mut dirty = vec![0xA5u8; 3 * BLOCK_SIZE];
    for chunk in 0..server.exceptions().device_chunks() {
        // Unaligned too: start one sector into the chunk.
        for (skip, len) in [(0u64, BLOCK_SIZE as u64), (1, 512 * 3)] {
            let req = Request {
                kind: DM_USER_REQ_MAP_READ,
                flags: 0,
                sector: chunk * 8 + skip,
                len,
            };
            let mut fresh = Vec::new();
            assert_eq!(server.handle(&req, &[], &mut fresh), ResponseCode::Success);
            assert_eq!(server.handle(&req, &[], &mut dirty), ResponseCode::Success);
            assert_eq!(dirty, fresh, "chunk {chunk}");
            dirty.resize(3 * BLOCK_SIZE, 0x5A);
        }
    }
}

/// A live handoff over a real COW file: dm-snapshot keeps its in-core table while daemon A
/// is replaced by daemon B, which opened the same file (and the same base) after
/// `opened_at` batches; B serves from batch `switch_at` on. B reads the durable progress A
/// left in the file when the kernel's first write shows more merged than B knew.
fn handoff_on_files(c: &Case, opened_at: usize, switch_at: usize, mmap: bool) {
    let target = c.target();
    let f = files(c);
    let origin = OriginDevice::create(fs::read(&f.base).unwrap(), CrashClock::never());
    let open = || CowSnapshot::build(&f.cow, origin.clone(), mmap, |s| s).unwrap();
    let a = open();
    let mut cow_a = ServerCow { server: a.server() };
    let mut dm = DmSnapshot::load(&mut cow_a).unwrap();
    let mut b = None;
    for batch in 0..switch_at {
        if batch == opened_at {
            b = Some(open());
        }
        assert!(matches!(
            dm.merge_step(&origin, &mut cow_a).unwrap(),
            MergeStep::Merged(_)
        ));
    }
    let b = b.unwrap_or_else(open);
    assert_eq!(b.device_sectors(), a.device_sectors());
    let mut cow_b = ServerCow { server: b.server() };
    let what = format!("handoff at batch {switch_at}, B opened at {opened_at}");
    assert_images_eq(
        &view_of(&dm, &origin, &mut cow_b),
        &target,
        &format!("snapshot view after {what}"),
    );
    loop {
        match dm.merge_step(&origin, &mut cow_b) {
            Ok(MergeStep::Done) => break,
            Ok(MergeStep::Merged(_)) => {}
            Err(e) => panic!("merge after {what}: {e}"),
        }
    }
    assert_images_eq(&origin.image(), &target, &format!("base after {what}"));
    let (merged, total) = durable_num_merge_ops(&f.cow);
    assert_eq!(merged, total, "{what}");
    assert!(b.server().merge_complete().unwrap(), "{what}");
}

#[test]
fn live_handoff_between_daemons_on_one_cow_file() {
    // 700 overlapping copies (two windows, three areas with the REPLACEs) then REPLACEs.
    let mut c = Case::new(
        760,
        21,
        opts(CowVersion::V3, CompressionAlgorithm::Lz4, true),
    );
    chain_up(&mut c, 0, 700, 1);
    let mut rng = Rng(77);
    for b in 710..740 {
        c.others.push(TestOp::Replace {
            new: b,
            data: rng.compressible_block(),
        });
    }
    // Sequential (B opened at the switch), B stale across an area end, across the first
    // window commit (510), and B opened before any batch but switched in the second window.
    for (i, (opened_at, switch_at)) in [(300, 300), (150, 260), (100, 600), (0, 690), (509, 511)]
        .into_iter()
        .enumerate()
    {
        handoff_on_files(&c, opened_at, switch_at, i % 2 == 0);
    }
    // v2 without scratch: immediate commits.
    let mut c2 = c.clone();
    c2.opts = opts(CowVersion::V2, CompressionAlgorithm::Zstd, false);
    handoff_on_files(&c2, 100, 400, true);
}

/// A daemon opening a COW that another daemon is merging (libsnapshot's second-stage
/// handoff): while a second thread commits window after window into the file exactly as a
/// merging daemon does (commit, then the next window saved and marked Done), every
/// `CowSnapshot::open` must succeed and must write nothing: the merging daemon's saved
/// window is what a crash would resume from. (Before opening was made write-free, an open
/// that found the state between a commit and its Done mark saved a window of its own over
/// the other daemon's.)
#[test]
fn open_while_another_daemon_commits_windows() {
    use crate::cow_backend::merge_store::CowMergeStore;
    use crate::cow_backend::plan::CowMergePlan;
    use crate::snapshot::merge_tracker::{MergeStateStore, ScratchWindow};
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    // 8 windows of independent copies (sources far below the destinations).
    let n_ops = 510 * 8;
    let mut c = Case::new(
        2 * n_ops as usize + 8,
        31,
        opts(CowVersion::V2, CompressionAlgorithm::None, true),
    );
    for i in (0..n_ops).rev() {
        c.ordered.push(TestOp::Copy {
            new: n_ops + 4 + i,
            old: i,
        });
    }
    let f = files(&c);
    let plan = {
        let r = CowReader::open(fs::File::open(&f.cow).unwrap()).unwrap();
        CowMergePlan::build(&r).unwrap()
    };
    let base = fs::File::open(&f.base).unwrap();
    let window = |start: usize| {
        let end = (start + 510).min(plan.plan.len());
        let mut w = ScratchWindow::default();
        for op in &plan.plan.ops()[start..end] {
            let mut block = vec![0u8; BLOCK_SIZE];
            base.read_exact_at(&mut block, op.source * BLOCK_SIZE as u64)
                .unwrap();
            w.new_blocks.push(op.new_block);
            w.data.extend_from_slice(&block);
        }
        w
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let merger = s.spawn(|| {
            let rw = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&f.cow)
                .unwrap();
            let mut store = CowMergeStore::open(rw)
                .unwrap()
                .into_store(plan.progress.clone())
                .unwrap();
            store.write_window(&window(0)).unwrap();
            for start in (510..n_ops as usize).step_by(510) {
                store.commit_window(start as u64).unwrap();
                store.write_window(&window(start)).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done.store(true, Ordering::Relaxed);
        });
        let mut opens = 0;
        while !done.load(Ordering::Relaxed) {
            match CowSnapshot::open(&f.cow, &f.base) {
                Ok(snap) => {
                    let committed = snap.server().committed().unwrap();
                    assert_eq!(committed % 510, 0, "opened at {committed}");
                }
                Err(e) => panic!("open {opens} while another daemon merges: {e}"),
            }
            opens += 1;
        }
        merger.join().unwrap();
        assert!(opens > 0);
    });
    // The durable state is exactly what the merging daemon left: its last window, Done.
    let last = (n_ops as usize / 510 - 1) * 510;
    let rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.cow)
        .unwrap();
    let store = CowMergeStore::open(rw)
        .unwrap()
        .into_store(plan.progress.clone())
        .unwrap();
    assert_eq!(store.num_merge_ops(), last as u64);
    assert_eq!(
        store.scratch_state(),
        crate::snapshot::merge_tracker::ScratchState::Done
    );
    assert!(
        store.read_window().unwrap() == window(last),
        "the saved window was overwritten by an opening daemon"
    );
}

/// Opening writes nothing, even when the durable state asks for a new read-ahead window
/// (state InProgress after a window commit): the window is saved at the first dm-user
/// request, when this daemon is the one the kernel talks to.
#[test]
fn open_writes_nothing_and_the_first_request_saves_the_window() {
    use crate::cow_backend::merge_store::CowMergeStore;
    use crate::cow_backend::plan::CowMergePlan;
    use crate::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ};
    use crate::snapshot::merge_tracker::{MergeStateStore, ScratchState};

    let mut c = Case::new(
        40,
        41,
        opts(CowVersion::V2, CompressionAlgorithm::Lz4, true),
    );
    chain_up(&mut c, 0, 20, 1);
    let f = files(&c);
    let progress = {
        let r = CowReader::open(fs::File::open(&f.cow).unwrap()).unwrap();
        CowMergePlan::build(&r).unwrap().progress
    };
    let rw = || {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.cow)
            .unwrap()
    };
    // The state a window commit leaves: num_merge_ops 0, InProgress, no window saved.
    let mut store = CowMergeStore::open(rw())
        .unwrap()
        .into_store(progress.clone())
        .unwrap();
    store.commit_window(0).unwrap();
    drop(store);
    let before = fs::read(&f.cow).unwrap();

    let snap = CowSnapshot::open(&f.cow, &f.base).unwrap();
    assert!(
        fs::read(&f.cow).unwrap() == before,
        "opening the snapshot wrote to the COW"
    );
    let state = || {
        CowMergeStore::open(rw())
            .unwrap()
            .into_store(progress.clone())
            .unwrap()
            .scratch_state()
    };
    assert_eq!(state(), ScratchState::InProgress);

    let header = Request {
        kind: DM_USER_REQ_MAP_READ,
        flags: 0,
        sector: 0,
        len: BLOCK_SIZE as u64,
    };
    let mut out = Vec::new();
    assert_eq!(
        snap.server().handle(&header, &[], &mut out),
        ResponseCode::Success
    );
    assert_eq!(
        state(),
        ScratchState::Done,
        "the first request saves the window"
    );
    // And the snapshot still reads as the target through the model.
    check_view(&c, snap);
}
