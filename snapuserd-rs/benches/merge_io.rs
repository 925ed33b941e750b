//! The merge's I/O engines on a merge-shaped workload: the synchronous engine against io_uring
//! at several queue depths and piece sizes.
//!
//! Workload: runs of 1..=256 contiguous 4 KiB blocks scattered over a preallocated base file,
//! cut into windows of 510 blocks (the merge's read-ahead window). Per window the writes go
//! out as one `write_base_durably` batch (writes, then `fdatasync`); the reads go out as one
//! `read_source` batch of the same shapes from a source file evicted from the page cache.
//! Rounds alternate between engines; each figure is the median over the rounds.
//!
//! `cargo bench -p snapuserd --bench merge_io` (environment: `MERGE_IO_BENCH_MIB`, default 64;
//! `MERGE_IO_BENCH_ROUNDS`, default 5; `MERGE_IO_BENCH_DIR`, default /var/tmp).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
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

/// Windows of runs covering `total_blocks` blocks, spread over a device of `2 * total_blocks`.
fn workload(total_blocks: usize) -> Vec<Vec<Run>> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut windows = Vec::new();
    let mut window: Vec<Run> = Vec::new();
    let mut in_window = 0usize;
    let mut placed = 0usize;
    let mut next_block = 0u64;
    while placed < total_blocks {
        let mut blocks = (1 + rng.next() % 256) as usize;
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

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
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

fn evict(file: &File) {
    // SAFETY: posix_fadvise takes a descriptor this process owns and integers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise DONTNEED");
}

/// Seconds to write every window durably.
fn time_writes(io: &mut dyn MergeIo, windows: &[Vec<Run>], payload: &[u8]) -> f64 {
    let start = Instant::now();
    for window in windows {
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
        io.write_base_durably(&runs).expect("durable window");
    }
    start.elapsed().as_secs_f64()
}

/// Seconds to read every window's runs from the (evicted) source.
fn time_reads(io: &mut dyn MergeIo, windows: &[Vec<Run>], scratch: &mut [u8]) -> f64 {
    let start = Instant::now();
    for window in windows {
        let mut rest = &mut scratch[..];
        let mut runs: Vec<ReadRun<'_>> = Vec::with_capacity(window.len());
        for run in window {
            let (buf, tail) = rest.split_at_mut(run.blocks * BLOCK);
            rest = tail;
            runs.push(ReadRun {
                offset: run.block * BLOCK as u64,
                buf,
            });
        }
        io.read_source(&mut runs).expect("read window");
    }
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
    let windows = workload(total_blocks);
    let device_blocks = windows
        .iter()
        .flatten()
        .map(|run| run.block + run.blocks as u64)
        .max()
        .unwrap_or(0) as usize;
    let device_bytes = device_blocks * BLOCK;
    let runs: usize = windows.iter().map(Vec::len).sum();
    println!(
        "merge_io bench: {mib} MiB in {runs} runs of 1..=256 blocks, {} windows of <= {WINDOW_BLOCKS} blocks, device {} MiB, {rounds} rounds, dir {dir_root}",
        windows.len(),
        device_bytes >> 20
    );

    let source_path = dir.path().join("source");
    let base_path = dir.path().join("base");
    preallocate(&source_path, device_bytes, 0x5a);
    preallocate(&base_path, device_bytes, 0);
    let source = open_rw(&source_path);
    let base = open_rw(&base_path);
    let payload: Vec<u8> = {
        let mut rng = Rng(42);
        (0..total_blocks * BLOCK)
            .map(|_| rng.next() as u8)
            .collect()
    };
    let mut scratch = vec![0u8; WINDOW_BLOCKS * BLOCK];

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
    let mut write_s = vec![Vec::new(); configs.len()];
    let mut read_s = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, (_, options)) in configs.iter().enumerate() {
            let mut io: Box<dyn MergeIo> = match options {
                None => Box::new(SyncMergeIo::new(
                    source.try_clone().expect("dup"),
                    base.try_clone().expect("dup"),
                )),
                Some(options) => {
                    Box::new(UringMergeIo::new(&source, &base, options).expect("io_uring engine"))
                }
            };
            write_s[i].push(time_writes(io.as_mut(), &windows, &payload));
            evict(&source);
            read_s[i].push(time_reads(io.as_mut(), &windows, &mut scratch));
        }
    }

    let written_mb = (total_blocks * BLOCK) as f64 / 1e6;
    let sync_write = median(&mut write_s[0].clone());
    let sync_read = median(&mut read_s[0].clone());
    println!(
        "{:<32} {:>12} {:>10} {:>12} {:>10}",
        "engine", "write+fsync", "vs sync", "cold read", "vs sync"
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let w = median(&mut write_s[i]);
        let r = median(&mut read_s[i]);
        println!(
            "{name:<32} {:>8.0} MB/s {:>9.2}x {:>8.0} MB/s {:>9.2}x",
            written_mb / w,
            sync_write / w,
            written_mb / r,
            sync_read / r
        );
    }
}
