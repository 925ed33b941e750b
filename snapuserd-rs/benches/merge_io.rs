//! The merge's I/O engines on a merge-shaped workload: the synchronous engine against io_uring
//! at several queue depths and piece sizes.
//!
//! Workload: runs of 1..=256 contiguous 4 KiB blocks scattered over a preallocated base file,
//! cut into windows of 510 blocks (the merge's read-ahead window). Per window the writes go
//! out as one `write_base_durably` batch (writes, then `fdatasync`); the reads go out as one
//! `read_source` batch of the same shapes from a source file evicted from the page cache.
//! Engines take turns window by window, in a rotating order, so that load from elsewhere on
//! the machine falls on all of them alike; each figure is the median over the rounds of an
//! engine's summed window times.
//!
//! `cargo bench -p snapuserd --bench merge_io` (environment: `MERGE_IO_BENCH_MIB`, default 64;
//! `MERGE_IO_BENCH_ROUNDS`, default 5; `MERGE_IO_BENCH_DIR`, default /var/tmp;
//! `MERGE_IO_BENCH_MAX_RUN`, the longest run in blocks, default 256; `MERGE_IO_BENCH_DIRECT=1`
//! opens both files with `O_DIRECT`).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use snapuserd::uring::{UringMergeIo, UringOptions};
use snapuserd::user_merge::merge_io::{MergeIo, ReadRun, WriteRun};
use snapuserd::user_merge::SyncMergeIo;

const BLOCK: usize = 4096;
const WINDOW_BLOCKS: usize = 510;

/// One run: first block on the device and length in blocks.
#[derive(Clone, Copy)]
struct Run {
    block: u64,
    blocks: usize,
}

/// xorshift64: a fixed, reproducible workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Windows of runs of 1..=`max_run` blocks covering `total_blocks` blocks, spread over a device of `2 * total_blocks`.
fn workload(total_blocks: usize, max_run: usize) -> Vec<Vec<Run>> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut windows = Vec::new();
    let mut window: Vec<Run> = Vec::new();
    let mut in_window = 0usize;
    let mut placed = 0usize;
    let mut next_block = 0u64;
    while placed < total_blocks {
        let mut blocks = (1 + rng.next() % max_run as u64) as usize;
        blocks = blocks.min(total_blocks - placed);
        // A gap of 0..=blocks keeps the device at about twice the written bytes.
        next_block += rng.next() % (blocks as u64 + 1);
        let mut run = Run {
            block: next_block,
            blocks,
        };
        next_block += blocks as u64;
        placed += blocks;
        // Cut the run at window boundaries, as the merge's windows do.
        while run.blocks > 0 {
            let take = run.blocks.min(WINDOW_BLOCKS - in_window);
            window.push(Run {
                block: run.block,
                blocks: take,
            });
            in_window += take;
            run.block += take as u64;
            run.blocks -= take;
            if in_window == WINDOW_BLOCKS {
                windows.push(std::mem::take(&mut window));
                in_window = 0;
            }
        }
    }
    if !window.is_empty() {
        windows.push(window);
    }
    windows
}

fn open_rw(path: &Path, direct: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn preallocate(path: &Path, bytes: usize, fill: u8) {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![fill; 1 << 20];
    let mut offset = 0usize;
    while offset < bytes {
        let len = chunk.len().min(bytes - offset);
        file.write_all_at(&chunk[..len], offset as u64)
            .expect("preallocate");
        offset += len;
    }
    file.sync_all().expect("sync preallocated file");
}

/// Drop the whole file from the page cache, so the next read goes to the disk. (Dropping only
/// a window's ranges left pages read by io_uring's workers behind.)
fn evict(file: &File) {
    // SAFETY: posix_fadvise takes a descriptor this process owns and integers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise DONTNEED");
}

/// Seconds to write one window durably (one `write_base_durably` batch).
fn time_write_window(io: &mut dyn MergeIo, window: &[Run], payload: &[u8]) -> f64 {
    let mut at = 0usize;
    let runs: Vec<WriteRun<'_>> = window
        .iter()
        .map(|run| {
            let len = run.blocks * BLOCK;
            let buf = &payload[at..at + len];
            at += len;
            WriteRun {
                offset: run.block * BLOCK as u64,
                buf,
            }
        })
        .collect();
    let start = Instant::now();
    io.write_base_durably(&runs).expect("durable window");
    start.elapsed().as_secs_f64()
}

/// Seconds to read one window's runs (one `read_source` batch).
fn time_read_window(io: &mut dyn MergeIo, window: &[Run], scratch: &mut [u8]) -> f64 {
    let mut rest = scratch;
    let mut runs: Vec<ReadRun<'_>> = Vec::with_capacity(window.len());
    for run in window {
        let (buf, tail) = rest.split_at_mut(run.blocks * BLOCK);
        rest = tail;
        runs.push(ReadRun {
            offset: run.block * BLOCK as u64,
            buf,
        });
    }
    let start = Instant::now();
    io.read_source(&mut runs).expect("read window");
    start.elapsed().as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`-less arguments: do nothing then.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let mib = env_usize("MERGE_IO_BENCH_MIB", 64);
    let rounds = env_usize("MERGE_IO_BENCH_ROUNDS", 5).max(1);
    let dir_root = std::env::var("MERGE_IO_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("merge-io-bench")
        .tempdir_in(&dir_root)
        .expect("bench dir");

    let total_blocks = mib * (1 << 20) / BLOCK;
    let direct = env_usize("MERGE_IO_BENCH_DIRECT", 0) != 0;
    let max_run = env_usize("MERGE_IO_BENCH_MAX_RUN", 256).clamp(1, WINDOW_BLOCKS);
    let windows = workload(total_blocks, max_run);
    let device_blocks = windows
        .iter()
        .flatten()
        .map(|run| run.block + run.blocks as u64)
        .max()
        .unwrap_or(0) as usize;
    let device_bytes = device_blocks * BLOCK;
    let runs: usize = windows.iter().map(Vec::len).sum();
    println!(
        "merge_io bench: {mib} MiB in {runs} runs of 1..={max_run} blocks, {} windows of <= {WINDOW_BLOCKS} blocks, device {} MiB, {rounds} rounds, dir {dir_root}, O_DIRECT {direct}",
        windows.len(),
        device_bytes >> 20
    );

    let source_path = dir.path().join("source");
    let base_path = dir.path().join("base");
    preallocate(&source_path, device_bytes, 0x5a);
    preallocate(&base_path, device_bytes, 0);
    let source = open_rw(&source_path, direct);
    let base = open_rw(&base_path, direct);
    // Page-aligned buffers (anonymous mappings), as O_DIRECT needs.
    let mut payload = memmap2::MmapMut::map_anon(WINDOW_BLOCKS * BLOCK).expect("payload buffer");
    let mut rng = Rng(42);
    payload.iter_mut().for_each(|b| *b = rng.next() as u8);
    let mut scratch = memmap2::MmapMut::map_anon(WINDOW_BLOCKS * BLOCK).expect("read buffer");

    let configs: Vec<(String, Option<UringOptions>)> = {
        let mut c = vec![("sync".to_string(), None)];
        for depth in [1u32, 4, 8, 16, 32] {
            c.push((
                format!("io_uring depth {depth:>2}, piece 256K"),
                Some(UringOptions {
                    queue_depth: depth,
                    max_piece_bytes: 256 << 10,
                }),
            ));
        }
        for piece in [64u32 << 10, 1 << 20] {
            c.push((
                format!("io_uring depth 16, piece {}K", piece >> 10),
                Some(UringOptions {
                    queue_depth: 16,
                    max_piece_bytes: piece,
                }),
            ));
        }
        c
    };
    // One engine per configuration for the whole run, as the merge keeps one.
    let mut engines: Vec<Box<dyn MergeIo>> = configs
        .iter()
        .map(|(_, options)| -> Box<dyn MergeIo> {
            match options {
                None => Box::new(SyncMergeIo::new(
                    source.try_clone().expect("dup"),
                    base.try_clone().expect("dup"),
                )),
                Some(options) => {
                    Box::new(UringMergeIo::new(&source, &base, options).expect("io_uring engine"))
                }
            }
        })
        .collect();
    // Engines take turns window by window (in a rotating order), so a burst of load from
    // elsewhere on the machine falls on all of them alike.
    let mut write_s = vec![Vec::new(); configs.len()];
    let mut read_s = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        let mut write_round = vec![0f64; configs.len()];
        let mut read_round = vec![0f64; configs.len()];
        for (w, window) in windows.iter().enumerate() {
            for k in 0..engines.len() {
                let i = (k + w + round) % engines.len();
                write_round[i] += time_write_window(engines[i].as_mut(), window, &payload);
                evict(&source);
                read_round[i] += time_read_window(engines[i].as_mut(), window, &mut scratch);
            }
        }
        for i in 0..configs.len() {
            write_s[i].push(write_round[i]);
            read_s[i].push(read_round[i]);
        }
    }

    let written_mb = (total_blocks * BLOCK) as f64 / 1e6;
    let sync_write = median(&mut write_s[0].clone());
    let sync_read = median(&mut read_s[0].clone());
    println!("MB/s: median of the rounds (slowest-fastest round); ratio: sync's median time / this one's");
    println!(
        "{:<32} {:>24} {:>8} {:>24} {:>8}",
        "engine", "write+fdatasync MB/s", "vs sync", "cold read MB/s", "vs sync"
    );
    let spread = |times: &[f64]| {
        let slowest = times.iter().copied().fold(f64::MIN, f64::max);
        let fastest = times.iter().copied().fold(f64::MAX, f64::min);
        format!("({:.0}-{:.0})", written_mb / slowest, written_mb / fastest)
    };
    for (i, (name, _)) in configs.iter().enumerate() {
        let w = median(&mut write_s[i]);
        let r = median(&mut read_s[i]);
        println!(
            "{name:<32} {:>6.0} {:>17} {:>7.2}x {:>6.0} {:>17} {:>7.2}x",
            written_mb / w,
            spread(&write_s[i]),
            sync_write / w,
            written_mb / r,
            spread(&read_s[i]),
            sync_read / r
        );
    }
}
