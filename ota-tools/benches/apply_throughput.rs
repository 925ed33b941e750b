//! Throughput of `ota_tools::apply::apply` (separate-output mode), in MB/s of
//! output image, for COW files written by `cow_format`'s writer.
//!
//! `cargo bench -p ota-tools --bench apply_throughput [-- BLOCKS]`
//! (default 16384 blocks = 64 MiB image). The image is half REPLACE (text-like
//! data, compresses about 3x), a quarter COPY, a quarter unchanged. Files live
//! in a temporary directory, so the page cache serves most reads: the figure
//! is the CPU-bound rate (decompression, copying, syscalls), not disk speed.

use std::path::Path;
use std::time::Instant;

use cow_format::writer::{CowWriter, WriterOptions};
use cow_format::CowVersion;
use ota_tools::apply::{apply, ApplyOptions};

const BS: usize = 4096;

fn block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BS)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 4 == 0 {
                x as u8
            } else {
                b"abcdefgh"[(x % 8) as usize]
            }
        })
        .collect()
}

fn make(dir: &Path, blocks: u64, opts: WriterOptions) -> u64 {
    let source: Vec<u8> = (0..blocks).flat_map(block).collect();
    std::fs::write(dir.join("source.img"), &source).unwrap();
    let file = std::fs::File::create(dir.join("update.cow")).unwrap();
    let mut w = CowWriter::create(file, opts).unwrap();
    let q = blocks / 4;
    w.add_copy_range(0, 3 * q, q).unwrap();
    // Add REPLACE data in 1 MiB pieces to bound memory.
    let mut b = q;
    while b < 3 * q {
        let n = 256.min(3 * q - b);
        let data: Vec<u8> = (b..b + n).flat_map(|i| block(i + 1_000_000)).collect();
        w.add_replace(b, &data).unwrap();
        b += n;
    }
    w.finalize().unwrap().file_size
}

fn main() {
    let blocks: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(16384);
    let dir = tempfile::tempdir().unwrap();
    let mb = (blocks as f64 * BS as f64) / 1e6;
    println!("apply throughput, {blocks} blocks ({mb:.1} MB image), best of 3 runs");
    let cases: Vec<(&str, WriterOptions)> = vec![
        ("v2 none", WriterOptions::default()),
        (
            "v2 lz4",
            WriterOptions {
                compression: "lz4".parse().unwrap(),
                ..WriterOptions::default()
            },
        ),
        (
            "v2 zstd",
            WriterOptions {
                compression: "zstd".parse().unwrap(),
                ..WriterOptions::default()
            },
        ),
        (
            "v3 lz4 64K",
            WriterOptions {
                version: CowVersion::V3,
                compression: "lz4".parse().unwrap(),
                op_count_max: Some(blocks),
                ..WriterOptions::default()
            },
        ),
        (
            "v3 zstd 256K",
            WriterOptions {
                version: CowVersion::V3,
                compression: "zstd".parse().unwrap(),
                compression_factor: 262144,
                op_count_max: Some(blocks),
                ..WriterOptions::default()
            },
        ),
    ];
    for (name, opts) in cases {
        let cow_size = make(dir.path(), blocks, opts);
        for threads in [1usize, 0] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let out = dir.path().join("out.img");
                let _ = std::fs::remove_file(&out);
                let t = Instant::now();
                apply(&ApplyOptions {
                    source: dir.path().join("source.img"),
                    cow: dir.path().join("update.cow"),
                    output: out,
                    size: None,
                    progress: false,
                    threads,
                })
                .unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{name:<14} cow {:>6.1} MB  threads {:<4} {:>8.1} MB/s",
                cow_size as f64 / 1e6,
                if threads == 0 {
                    "all".to_string()
                } else {
                    threads.to_string()
                },
                mb / best
            );
        }
    }
}
