//! Host benchmark of the user-space-merge read path: random 4 KiB READ requests through
//! `UserSnapshot::handle` (block map lookup, op lookup, decompression of the payload read
//! with `pread` (the daemon's default) or straight from the mapped COW into the response
//! buffer) over a real v3 lz4 COW that replaces every block, against bare `lz4_flex`
//! decompression of the very same payloads held in memory, in the same run.
//!
//! The image is real file content (see `cow-format/benches/support/real_data.rs`). Two
//! COWs: compression factor 4 KiB (one payload per block) and 64 KiB (each random read
//! decompresses its whole 16-block op, and so does the bare side). Run:
//!
//! ```sh
//! cargo bench -p snapuserd --bench user_merge_read
//! ```
//!
//! A summary from interleaved passes (fresh random blocks per pass, the side that goes
//! first rotating) is printed first, then the criterion groups. `SNAPUSERD_BENCH_MIB` sets
//! the image size (default 32), `SNAPUSERD_BENCH_ROUNDS` the passes (default 400);
//! `SNAPUSERD_BENCH_ONLY_SUMMARY=1` skips the criterion groups.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "../../cow-format/benches/support/real_data.rs"]
mod real_data;
use real_data::real_data;

use criterion::{criterion_group, Criterion, Throughput};
use snapuserd::dm_user::{Request, ResponseCode, DM_USER_REQ_MAP_READ};
use snapuserd::user_merge::{UserSnapshot, UserSnapshotOptions};

mod support;
use support::{env_usize, print_versus_bare, random_blocks, Lz4Cow, BS, PASS};

struct Setup {
    snap: UserSnapshot,
    cow: Lz4Cow,
}

/// The snapshot over a COW of `data`; `mmap_cow` picks the COW's storage (the daemon's
/// default is `pread`, see `UserSnapshotOptions::mmap_cow`).
fn setup(data: &[u8], factor: u32, mmap_cow: bool) -> Setup {
    let cow = Lz4Cow::write(data, factor);
    let snap = UserSnapshot::open(
        &cow.cow,
        &cow.base,
        &cow.base,
        &UserSnapshotOptions {
            mmap_cow,
            ..UserSnapshotOptions::default()
        },
    )
    .expect("snapshot");
    Setup { snap, cow }
}

fn read_user(s: &Setup, blocks: &[usize], out: &mut Vec<u8>) -> u64 {
    let mut acc = 0u64;
    for &b in blocks {
        let req = Request {
            kind: DM_USER_REQ_MAP_READ,
            flags: 0,
            sector: b as u64 * 8,
            len: BS as u64,
        };
        assert_eq!(s.snap.handle(&req, &[], out), ResponseCode::Success);
        acc = acc.wrapping_add(u64::from(out[b % BS]));
    }
    acc
}

fn summary(name: &str, s: &Setup, rounds: usize) {
    let mut out = Vec::with_capacity(BS);
    let mut unit = vec![0u8; 1 << 20];
    let (mut t_user, mut t_bare) = (Duration::ZERO, Duration::ZERO);
    for r in 0..rounds {
        let blocks = random_blocks(PASS, s.cow.blocks, r as u64 * 7919 + 1);
        let mut run_user = || {
            let t = Instant::now();
            black_box(read_user(s, &blocks, &mut out));
            t.elapsed()
        };
        if r % 2 == 0 {
            t_user += run_user();
            let t = Instant::now();
            black_box(s.cow.read_bare(&blocks, &mut unit));
            t_bare += t.elapsed();
        } else {
            let t = Instant::now();
            black_box(s.cow.read_bare(&blocks, &mut unit));
            t_bare += t.elapsed();
            t_user += run_user();
        }
    }
    print_versus_bare(name, "user-space read path", rounds, t_user, t_bare);
}

fn bench(c: &mut Criterion) {
    let mib = env_usize("SNAPUSERD_BENCH_MIB", 32);
    let rounds = env_usize("SNAPUSERD_BENCH_ROUNDS", 400);
    let data = real_data(mib);
    for factor in [4096u32, 65536] {
        // The daemon's storage (pread) and the mapped COW, each against bare decompression.
        let mapped = setup(&data, factor, true);
        summary(
            &format!("v3 lz4 factor {}K, {mib} MiB, COW mapped", factor / 1024),
            &mapped,
            rounds,
        );
        drop(mapped);
        let s = setup(&data, factor, false);
        summary(
            &format!("v3 lz4 factor {}K, {mib} MiB, COW pread", factor / 1024),
            &s,
            rounds,
        );
        if std::env::var_os("SNAPUSERD_BENCH_ONLY_SUMMARY").is_some() {
            continue;
        }
        let blocks = random_blocks(PASS, s.cow.blocks, 42);
        let mut g = c.benchmark_group(format!("user_merge_random_4k_factor_{}k", factor / 1024));
        g.throughput(Throughput::Bytes((PASS * BS) as u64));
        let mut out = Vec::with_capacity(BS);
        g.bench_function("user_snapshot_handle", |b| {
            b.iter(|| read_user(&s, &blocks, &mut out))
        });
        let mut unit = vec![0u8; 1 << 20];
        g.bench_function("bare_lz4_flex", |b| {
            b.iter(|| s.cow.read_bare(&blocks, &mut unit))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
