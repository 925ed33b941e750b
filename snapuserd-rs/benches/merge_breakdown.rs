//! Where the user-space merge spends its time, on a real image pair, against a plain copy of
//! the changed bytes measured in the same run.
//!
//! It merges the demo's COW (`cargo xtask demo` leaves `build/demo/source.img`,
//! `target.img` and `update.cow`) into a file copy of the source image with
//! [`UserSnapshot::merge`], through an engine wrapper that times and counts every call of
//! the [`MergeIo`] seam: window source reads, base writes of a window's first batches, the
//! durable batches (writes then `fdatasync`), and counts the runs and bytes of each. The rest
//! of the merge's wall time is the block production (decompression, XOR, copies) and the
//! durable progress steps (scratch staging, state Done, commits), which `strace -c -f` splits
//! by system call. Rounds alternate the merge and a plain `O_DIRECT` copy with `fdatasync` of
//! the changed bytes (the demo's reference), each on fresh copies of base and COW with the
//! page cache of both dropped, and print medians.
//!
//! It also says how many read-ahead windows read a block another op of the same window writes
//! (those must be staged in scratch before any destination is written).
//!
//! `cargo bench -p snapuserd --bench merge_breakdown` (environment: `MERGE_BREAKDOWN_DEMO`,
//! the folder with the three files, default `build/demo` of the workspace;
//! `MERGE_BREAKDOWN_DIR`, default /var/tmp; `MERGE_BREAKDOWN_ROUNDS`, default 3;
//! `MERGE_BREAKDOWN_ENGINE`, `uring` (default) or `sync`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cow_format::{CowReader, MergeMode, OpKind};
use snapuserd::uring::{UringMergeIo, UringOptions};
use snapuserd::user_merge::{
    MergeControl, MergeIo, MergeOutcome, ReadRun, UserSnapshot, UserSnapshotOptions, WriteRun,
};

const BLOCK: usize = 4096;
const WINDOW: usize = cow_format::layout::READ_AHEAD_WINDOW_BLOCKS;

/// Time and volume of the calls of one kind.
#[derive(Default, Clone, Copy)]
struct Tally {
    calls: u64,
    runs: u64,
    bytes: u64,
    time: Duration,
}

impl Tally {
    fn add(&mut self, runs: usize, bytes: usize, time: Duration) {
        self.calls += 1;
        self.runs += runs as u64;
        self.bytes += bytes as u64;
        self.time += time;
    }
}

/// What one merge did through the engine seam.
#[derive(Default, Clone, Copy)]
struct Seam {
    reads: Tally,
    writes: Tally,
    durable: Tally,
    syncs: Tally,
}

/// Run `call`, then add its time, `runs` and `bytes` to the tally `pick` chooses.
fn timed(
    seam: &Mutex<Seam>,
    pick: fn(&mut Seam) -> &mut Tally,
    runs: usize,
    bytes: usize,
    call: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let start = Instant::now();
    let r = call();
    let mut seam = seam.lock().expect("tally lock");
    pick(&mut seam).add(runs, bytes, start.elapsed());
    r
}

/// A [`MergeIo`] that times and counts the calls of the engine it wraps.
struct Timed {
    inner: Box<dyn MergeIo>,
    seam: Arc<Mutex<Seam>>,
}

impl MergeIo for Timed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn read_source(&mut self, runs: &mut [ReadRun<'_>]) -> io::Result<()> {
        let bytes = runs.iter().map(|r| r.buf.len()).sum();
        let count = runs.len();
        timed(
            &self.seam,
            |s| &mut s.reads,
            count,
            bytes,
            || self.inner.read_source(runs),
        )
    }

    fn write_base(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        let bytes = runs.iter().map(|r| r.buf.len()).sum();
        timed(
            &self.seam,
            |s| &mut s.writes,
            runs.len(),
            bytes,
            || self.inner.write_base(runs),
        )
    }

    fn sync_base(&mut self) -> io::Result<()> {
        timed(
            &self.seam,
            |s| &mut s.syncs,
            0,
            0,
            || self.inner.sync_base(),
        )
    }

    fn write_base_durably(&mut self, runs: &[WriteRun<'_>]) -> io::Result<()> {
        let bytes = runs.iter().map(|r| r.buf.len()).sum();
        timed(
            &self.seam,
            |s| &mut s.durable,
            runs.len(),
            bytes,
            || self.inner.write_base_durably(runs),
        )
    }
}

/// The shape of the ordered part: windows, and those that read what they write.
fn window_shape(cow_path: &Path) -> Shape {
    let cow = CowReader::open(File::open(cow_path).expect("open COW")).expect("parse COW");
    let ordered = cow.num_ordered_ops() as usize;
    let mut walk = cow.merge_order(MergeMode::User.order_options(false));
    let mut entries = Vec::new();
    while let Some((_, op)) = walk.next_indexed() {
        entries.push(*op);
    }
    let total = entries.len();
    let ordered_part = &entries[..ordered.min(total)];
    let mut overlapping = 0usize;
    let mut windows = 0usize;
    let mut dest_runs = 0usize;
    let mut source_runs = 0usize;
    let mut shape = Shape::default();
    let (mut sorted_dest_runs, mut sorted_source_runs) = (0usize, 0usize);
    let (mut gap_blocks, mut joined) = (0u64, 0usize);
    // Runs joinable across gaps of up to 1, 2, 4, ... 64 blocks filled from saved sources.
    let mut fillable = [0usize; 7];
    for window in ordered_part.chunks(WINDOW) {
        windows += 1;
        let mut dests: Vec<u64> = Vec::new();
        let mut sources: Vec<u64> = Vec::new();
        for op in window {
            dests.extend(op.new_block..op.new_block + op.num_blocks);
            match op.kind {
                OpKind::Copy => sources.push(op.source),
                OpKind::Xor => {
                    let first = op.source / BLOCK as u64;
                    let last = op.source.div_ceil(BLOCK as u64);
                    sources.extend(first..=last);
                }
                _ => {}
            }
        }
        let count_runs = |list: &[u64]| {
            list.windows(2).filter(|w| w[1] != w[0] + 1).count() + usize::from(!list.is_empty())
        };
        dest_runs += count_runs(&dests);
        source_runs += count_runs(&sources);
        dests.sort_unstable();
        sources.sort_unstable();
        sources.dedup();
        dests.dedup();
        sorted_dest_runs += count_runs(&dests);
        sorted_source_runs += count_runs(&sources);
        shape.dest_runs.extend(runs_of(&dests));
        shape.source_runs.extend(runs_of(&sources));
        // How many blocks one would rewrite unchanged to join destination runs across
        // gaps of up to 4 blocks.
        for pair in dests.windows(2) {
            let gap = pair[1] - pair[0] - 1;
            if (1..=4).contains(&gap) {
                gap_blocks += gap;
                joined += 1;
            }
        }
        // Gaps the merge could fill from the window's own saved sources (blocks a COPY of
        // the window reads at a block boundary and no op of the window writes: the base
        // still holds those bytes), joining the runs around them.
        let aligned: Vec<u64> = {
            let mut v: Vec<u64> = window
                .iter()
                .filter_map(|op| match op.kind {
                    OpKind::Copy => Some(op.source),
                    OpKind::Xor if op.source % BLOCK as u64 == 0 => Some(op.source / BLOCK as u64),
                    _ => None,
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        for (g, count) in fillable.iter_mut().enumerate() {
            let max_gap = 1u64 << g;
            for pair in dests.windows(2) {
                let gap = pair[1] - pair[0] - 1;
                if (1..=max_gap).contains(&gap)
                    && (pair[0] + 1..pair[1]).all(|b| aligned.binary_search(&b).is_ok())
                {
                    *count += 1;
                }
            }
        }
        if sources.iter().any(|s| dests.binary_search(s).is_ok()) {
            overlapping += 1;
        }
    }
    let rest = &entries[ordered.min(total)..];
    let rest_blocks: u64 = rest.iter().map(|op| op.num_blocks).sum();
    let mut rest_dests: Vec<u64> = rest
        .iter()
        .flat_map(|op| op.new_block..op.new_block + op.num_blocks)
        .collect();
    rest_dests.sort_unstable();
    rest_dests.dedup();
    shape.dest_runs.extend(runs_of(&rest_dests));
    println!(
        "merge order: {total} entries, {ordered} ordered in {windows} windows of up to {WINDOW} \
         ({overlapping} read a block they write), {dest_runs} destination runs and {source_runs} \
         source runs in merge order; then {} REPLACE/ZERO entries of {rest_blocks} blocks",
        total - ordered.min(total)
    );
    println!(
        "per window in block order: {sorted_dest_runs} destination runs, {sorted_source_runs} \
         distinct source runs; joining destination gaps of 1-4 blocks would remove {joined} \
         runs and rewrite {gap_blocks} unchanged blocks"
    );
    println!(
        "destination runs joinable across gaps filled from the window's own saved sources, \
         for gaps of up to 1, 2, 4, 8, 16, 32, 64 blocks: {fillable:?}"
    );
    shape
}

/// Runs of contiguous blocks `(first, blocks)` of a sorted, deduplicated list.
fn runs_of(list: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in list {
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == b => last.1 += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

/// The I/O any merge of this COW must do at least: its source runs read and its
/// destination runs written (per window, in block order).
#[derive(Default)]
struct Shape {
    source_runs: Vec<(u64, u64)>,
    dest_runs: Vec<(u64, u64)>,
}

/// The floor of a merge with this layout: every source run read and every destination run
/// written (taken from the target) with `O_DIRECT`, then one `fdatasync`.
fn scattered_copy(shape: &Shape, target: &Path, base: &Path) -> Duration {
    let from = open_direct(target, false);
    let dest = open_direct(base, true);
    let longest = shape
        .source_runs
        .iter()
        .chain(&shape.dest_runs)
        .map(|r| r.1 as usize)
        .max()
        .unwrap_or(1);
    let layout = std::alloc::Layout::from_size_align(longest * BLOCK, 4096).expect("layout");
    let mut buf = AlignedBuf::new(layout);
    let start = Instant::now();
    for &(block, blocks) in &shape.source_runs {
        let len = blocks as usize * BLOCK;
        dest.read_exact_at(&mut buf.as_mut()[..len], block * BLOCK as u64)
            .expect("O_DIRECT source read");
    }
    for &(block, blocks) in &shape.dest_runs {
        let len = blocks as usize * BLOCK;
        let at = block * BLOCK as u64;
        from.read_exact_at(&mut buf.as_mut()[..len], at)
            .expect("O_DIRECT read");
        dest.write_all_at(&buf.as_mut()[..len], at)
            .expect("O_DIRECT write");
    }
    dest.sync_data().expect("fdatasync");
    start.elapsed()
}

/// `p` opened with `O_DIRECT`, for reading (and writing if `write`).
fn open_direct(p: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

fn fresh_copy(from: &Path, to: &Path) -> File {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(to)
        .expect("open copy");
    f.sync_all().expect("sync copy");
    drop_cache(&f);
    f
}

fn drop_cache(file: &File) {
    // SAFETY: posix_fadvise takes a descriptor this process owns and integers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise DONTNEED");
}

/// Blocks where the two images differ.
fn changed_blocks(a: &Path, b: &Path) -> u64 {
    let a = std::fs::read(a).expect("read source image");
    let b = std::fs::read(b).expect("read target image");
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .filter(|(x, y)| x != y)
        .count() as u64
}

/// The demo's reference: `changed` bytes of the target copied with `O_DIRECT` in 1 MiB
/// pieces onto `to`, then `fdatasync`.
fn plain_copy(target: &Path, to: &Path, changed: u64) -> Duration {
    let from = open_direct(target, false);
    let dest = open_direct(to, true);
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).expect("layout");
    let mut buf = AlignedBuf::new(layout);
    let start = Instant::now();
    let mut at = 0u64;
    while at < changed {
        let len = ((changed - at) as usize).min(1 << 20);
        from.read_exact_at(&mut buf.as_mut()[..len], at)
            .expect("O_DIRECT read");
        dest.write_all_at(&buf.as_mut()[..len], at)
            .expect("O_DIRECT write");
        at += len as u64;
    }
    dest.sync_data().expect("fdatasync");
    start.elapsed()
}

/// A page-aligned heap buffer for `O_DIRECT`.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(layout: std::alloc::Layout) -> Self {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        Self { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One merge on fresh copies; returns its wall time and what went through the seam.
fn one_merge(demo: &Demo, dir: &Path, engine: &str) -> (Duration, Seam) {
    let base = dir.join("base.img");
    let cow = dir.join("update.cow");
    drop(fresh_copy(&demo.source, &base));
    drop(fresh_copy(&demo.cow, &cow));
    let snap = UserSnapshot::open(&cow, &base, &base, &UserSnapshotOptions::default())
        .expect("open the snapshot");
    let seam = Arc::new(Mutex::new(Seam::default()));
    let inner: Box<dyn MergeIo> = match engine {
        "sync" => snap.sync_io().expect("sync engine"),
        _ => Box::new(
            UringMergeIo::new(
                snap.source_file(),
                snap.base_file(),
                &UringOptions::default(),
            )
            .expect("io_uring engine"),
        ),
    };
    let timed = Box::new(Timed {
        inner,
        seam: Arc::clone(&seam),
    });
    let start = Instant::now();
    let outcome = snap.merge(timed, &MergeControl::new()).expect("merge");
    let elapsed = start.elapsed();
    assert_eq!(outcome, MergeOutcome::Complete);
    let got = std::fs::read(&base).expect("read merged base");
    let want = std::fs::read(&demo.target).expect("read target");
    assert!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "merged base differs from the target"
    );
    let seam = *seam.lock().expect("tally lock");
    (elapsed, seam)
}

struct Demo {
    source: PathBuf,
    target: PathBuf,
    cow: PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: do nothing then.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let demo_dir = std::env::var_os("MERGE_BREAKDOWN_DEMO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/demo"));
    let demo = Demo {
        source: demo_dir.join("source.img"),
        target: demo_dir.join("target.img"),
        cow: demo_dir.join("update.cow"),
    };
    for p in [&demo.source, &demo.target, &demo.cow] {
        if !p.exists() {
            eprintln!(
                "{} is missing: run `cargo xtask demo` first, or set MERGE_BREAKDOWN_DEMO",
                p.display()
            );
            std::process::exit(2);
        }
    }
    let rounds: usize = std::env::var("MERGE_BREAKDOWN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let engine = std::env::var("MERGE_BREAKDOWN_ENGINE").unwrap_or_else(|_| "uring".into());
    let root = std::env::var("MERGE_BREAKDOWN_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("merge-breakdown")
        .tempdir_in(&root)
        .expect("bench dir");

    let shape = window_shape(&demo.cow);
    let changed = changed_blocks(&demo.source, &demo.target) * BLOCK as u64;
    println!(
        "changed bytes {changed} ({} blocks); engine {engine}; {rounds} rounds in {}",
        changed / BLOCK as u64,
        dir.path().display()
    );
    let copy_dest = dir.path().join("copy.img");
    let (mut merges, mut copies, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let do_copy = || {
            drop(fresh_copy(&demo.source, &copy_dest));
            plain_copy(&demo.target, &copy_dest, changed)
        };
        let (copy, (merge, seam)) = if round % 2 == 0 {
            let c = do_copy();
            (c, one_merge(&demo, dir.path(), &engine))
        } else {
            let m = one_merge(&demo, dir.path(), &engine);
            (do_copy(), m)
        };
        let seam_time = seam.reads.time + seam.writes.time + seam.durable.time + seam.syncs.time;
        println!(
            "round {round}: merge {:.1} ms, plain copy {:.1} ms ({:.1}x); seam: source reads {:.1} ms \
             ({} calls, {} runs, {} KiB), base writes {:.1} ms ({} calls, {} runs, {} KiB), \
             durable batches {:.1} ms ({} calls, {} runs, {} KiB), syncs {:.1} ms ({}); \
             outside the seam (production, scratch, commits) {:.1} ms",
            ms(merge),
            ms(copy),
            merge.as_secs_f64() / copy.as_secs_f64(),
            ms(seam.reads.time),
            seam.reads.calls,
            seam.reads.runs,
            seam.reads.bytes / 1024,
            ms(seam.writes.time),
            seam.writes.calls,
            seam.writes.runs,
            seam.writes.bytes / 1024,
            ms(seam.durable.time),
            seam.durable.calls,
            seam.durable.runs,
            seam.durable.bytes / 1024,
            ms(seam.syncs.time),
            seam.syncs.calls,
            ms(merge.saturating_sub(seam_time)),
        );
        drop(fresh_copy(&demo.source, &copy_dest));
        let floor = scattered_copy(&shape, &demo.target, &copy_dest);
        println!(
            "round {round}: scattered O_DIRECT floor ({} source reads, {} destination reads \
             and writes, one fdatasync) {:.1} ms; the destination reads from the target are \
             part of the floor's time",
            shape.source_runs.len(),
            shape.dest_runs.len(),
            ms(floor)
        );
        merges.push(merge.as_secs_f64());
        copies.push(copy.as_secs_f64());
        floors.push(floor.as_secs_f64());
    }
    let (m, c, f) = (median(merges), median(copies), median(floors));
    println!(
        "median merge {:.1} ms, median plain copy {:.1} ms, ratio {:.1}x; median scattered \
         floor {:.1} ms, merge / floor {:.1}x",
        m * 1e3,
        c * 1e3,
        m / c,
        f * 1e3,
        m / f
    );
}
