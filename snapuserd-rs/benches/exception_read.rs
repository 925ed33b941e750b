//! Host benchmark of the exception-store read path: random 4 KiB READ requests through
//! `BlockServer::handle` (chunk lookup, op lookup, lz4 decompression of the payload straight
//! from the mapped COW into the response buffer) over a real v3 lz4 COW, against bare `lz4_flex`
//! decompression of the very same payloads held in memory, in the same run.
//!
//! The image is real file content (from /usr/lib and /usr/share, sorted path order; a
//! synthetic compressible pattern if those are missing). Two COWs are measured: compression
//! factor 4 KiB (one payload per block) and 64 KiB (the writer's default; each random read
//! decompresses its whole 16-block op, and so does the bare baseline). Run:
//!
//! ```sh
//! cargo bench -p snapuserd --bench exception_read
//! ```
//!
//! A summary (ns per read, MB/s, exception path as % of bare) from interleaved passes is
//! printed first, then the criterion groups. The summary draws fresh random blocks for
//! every pass; a criterion group repeats one set of 256 blocks, so its payloads are
//! cache-hot and the fixed per-read costs weigh more there. `SNAPUSERD_BENCH_MIB` sets the image size
//! (default 32), `SNAPUSERD_BENCH_ROUNDS` the interleaved passes (default 400);
//! `SNAPUSERD_BENCH_ONLY_SUMMARY=1` skips the criterion groups. `SNAPUSERD_BENCH_BREAKDOWN=1`
//! adds two sides to both: `cow_format::compression::decompress` on the in-memory payloads,
//! and the mapped `CowReader::read_op_data` alone (no exception store).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::fs;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "../../cow-format/benches/support/real_data.rs"]
mod real_data;
use real_data::real_data;

use cow_format::{CompressionAlgorithm, CowReader};
use criterion::{criterion_group, Criterion, Throughput};
use snapuserd::cow_backend::CowSnapshot;
use snapuserd::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ};

mod support;
use support::{env_usize, ns_per_read, print_versus_bare, random_blocks, Lz4Cow, BS, PASS};

struct Setup {
    snap: CowSnapshot,
    /// Sector of the data chunk of each image block.
    sector_of_block: Vec<u64>,
    /// The COW and its in-memory payloads.
    cow: Lz4Cow,
    /// The same COW opened through `cow_format` alone (mapped), for the breakdown groups.
    mapped: CowReader<cow_format::reader::MappedFile>,
}

fn setup(data: &[u8], factor: u32) -> Setup {
    let lz4 = Lz4Cow::write(data, factor);
    let blocks = lz4.blocks;
    let (cow, base) = (&lz4.cow, &lz4.base);
    let snap = CowSnapshot::open(cow, base).expect("snapshot");
    let ex = snap.server().exceptions();
    let plan = snap.server().plan();
    let mut sector_of_block = vec![0u64; blocks];
    for (op_index, op) in plan.ops().iter().enumerate() {
        let e = ex.exception_of_op(op_index).expect("exception");
        sector_of_block[op.new_block as usize] = ex.new_chunk(e).expect("chunk") * 8;
    }
    let mapped = CowReader::open_mapped(fs::File::open(cow).expect("open")).expect("mapped");
    Setup {
        mapped,
        snap,
        sector_of_block,
        cow: lz4,
    }
}

fn read_via_server(s: &Setup, blocks: &[usize], out: &mut Vec<u8>) -> u64 {
    let mut acc = 0u64;
    for &b in blocks {
        let req = Request {
            kind: DM_USER_REQ_MAP_READ,
            flags: 0,
            sector: s.sector_of_block[b],
            len: BS as u64,
        };
        let st = s.snap.server().handle(&req, &[], out);
        assert_eq!(st, ResponseCode::Success);
        acc = acc.wrapping_add(u64::from(out[b % BS]));
    }
    acc
}

/// Breakdown: `cow_format`'s decompress on the in-memory payloads (no reader, no server).
fn read_bare_cow_format(s: &Setup, blocks: &[usize], unit: &mut [u8]) -> u64 {
    let mut acc = 0u64;
    for &b in blocks {
        let op = s.cow.op_of_block[b];
        let (p, raw) = &s.cow.payloads[op];
        let n = s.cow.unit_bytes[op];
        let alg = if *raw {
            CompressionAlgorithm::None
        } else {
            CompressionAlgorithm::Lz4
        };
        cow_format::compression::decompress(alg, p, &mut unit[..n]).expect("decompress");
        acc = acc.wrapping_add(u64::from(unit[b % BS]));
    }
    acc
}

/// Breakdown: the mapped `CowReader` alone (`read_op_data`, no exception store).
fn read_reader(s: &Setup, blocks: &[usize], unit: &mut [u8]) -> u64 {
    let mut acc = 0u64;
    let ops = s.mapped.ops();
    for &b in blocks {
        let op = &ops[s.cow.op_of_block[b]];
        let n = s.cow.unit_bytes[s.cow.op_of_block[b]];
        s.mapped
            .read_op_data(op, &mut unit[..n])
            .expect("read_op_data");
        acc = acc.wrapping_add(u64::from(unit[b % BS]));
    }
    acc
}

/// One side of the interleaved summary.
type Side = fn(&Setup, &[usize], &mut Vec<u8>, &mut [u8]) -> u64;

fn side_server(s: &Setup, blocks: &[usize], out: &mut Vec<u8>, _: &mut [u8]) -> u64 {
    read_via_server(s, blocks, out)
}

fn side_bare(s: &Setup, blocks: &[usize], _: &mut Vec<u8>, unit: &mut [u8]) -> u64 {
    s.cow.read_bare(blocks, unit)
}

fn side_cow_decompress(s: &Setup, blocks: &[usize], _: &mut Vec<u8>, unit: &mut [u8]) -> u64 {
    read_bare_cow_format(s, blocks, unit)
}

fn side_reader(s: &Setup, blocks: &[usize], _: &mut Vec<u8>, unit: &mut [u8]) -> u64 {
    read_reader(s, blocks, unit)
}

fn summary(name: &str, s: &Setup, rounds: usize, breakdown: bool) {
    let nblocks = s.sector_of_block.len();
    let mut out = Vec::with_capacity(BS);
    let mut unit = vec![0u8; 1 << 20];
    let mut sides: Vec<(&str, Side, Duration)> = vec![
        ("exception path", side_server, Duration::ZERO),
        ("bare lz4_flex", side_bare, Duration::ZERO),
    ];
    if breakdown {
        sides.push((
            "cow_format::compression::decompress",
            side_cow_decompress,
            Duration::ZERO,
        ));
        sides.push((
            "mapped CowReader::read_op_data",
            side_reader,
            Duration::ZERO,
        ));
    }
    let n = sides.len();
    for r in 0..rounds {
        let blocks = random_blocks(PASS, nblocks, r as u64 * 7919 + 1);
        // Rotate which side goes first so cache effects hit all alike.
        for k in 0..n {
            let (_, f, total) = &mut sides[(k + r) % n];
            let t = Instant::now();
            black_box(f(s, &blocks, &mut out, &mut unit));
            *total += t.elapsed();
        }
    }
    let (t_srv, t_bare) = (sides[0].2, sides[1].2);
    print_versus_bare(name, "exception path", rounds, t_srv, t_bare);
    for (label, _, t) in &sides[2..] {
        println!(
            "    breakdown: {label} {:.0} ns/read: bare = {:.1}% of it",
            ns_per_read(*t, rounds),
            100.0 * t_bare.as_secs_f64() / t.as_secs_f64()
        );
    }
}

fn bench(c: &mut Criterion) {
    let mib = env_usize("SNAPUSERD_BENCH_MIB", 32);
    let rounds = env_usize("SNAPUSERD_BENCH_ROUNDS", 400);
    let data = real_data(mib);
    for factor in [4096u32, 65536] {
        let s = setup(&data, factor);
        let name = format!("v3 lz4 factor {}K, {mib} MiB", factor / 1024);
        let breakdown = std::env::var_os("SNAPUSERD_BENCH_BREAKDOWN").is_some();
        summary(&name, &s, rounds, breakdown);
        if std::env::var_os("SNAPUSERD_BENCH_ONLY_SUMMARY").is_some() {
            continue;
        }
        let nblocks = s.sector_of_block.len();
        let blocks = random_blocks(PASS, nblocks, 42);
        let mut g = c.benchmark_group(format!("random_4k_factor_{}k", factor / 1024));
        g.throughput(Throughput::Bytes((PASS * BS) as u64));
        let mut out = Vec::with_capacity(BS);
        g.bench_function("exception_store_handle", |b| {
            b.iter(|| read_via_server(&s, &blocks, &mut out))
        });
        let mut unit = vec![0u8; 1 << 20];
        g.bench_function("bare_lz4_flex", |b| {
            b.iter(|| s.cow.read_bare(&blocks, &mut unit))
        });
        if std::env::var_os("SNAPUSERD_BENCH_BREAKDOWN").is_some() {
            g.bench_function("breakdown_cow_format_decompress", |b| {
                b.iter(|| read_bare_cow_format(&s, &blocks, &mut unit))
            });
            g.bench_function("breakdown_mapped_reader", |b| {
                b.iter(|| read_reader(&s, &blocks, &mut unit))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
