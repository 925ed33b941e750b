//! `verify_device` (the `update-verify` reader) at AOSP's parameters and others, against a plain
//! `O_DIRECT` `pread` loop of 1 MiB, over a file on a disk file system.
//!
//! `cargo bench -p snapuserd --bench verify_device` (environment: `VERIFY_BENCH_MIB`, default
//! 256; `VERIFY_BENCH_ROUNDS`, default 5; `VERIFY_BENCH_DIR`, default /var/tmp). Passes take
//! turns in each round; figures are medians over the rounds.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use snapuserd::uring::{verify_device, VerifyOptions};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds for one `O_DIRECT` pread pass in 1 MiB reads.
fn pread_pass(path: &Path, bytes: usize) -> f64 {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT");
    let mut buf = memmap2::MmapMut::map_anon(1 << 20).expect("buffer");
    let start = Instant::now();
    let mut offset = 0usize;
    while offset < bytes {
        let n = file.read_at(&mut buf[..], offset as u64).expect("pread");
        assert!(n > 0, "unexpected end of file");
        offset += n;
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let mib = env_usize("VERIFY_BENCH_MIB", 256);
    let rounds = env_usize("VERIFY_BENCH_ROUNDS", 5).max(1);
    let dir_root = std::env::var("VERIFY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("verify-bench")
        .tempdir_in(&dir_root)
        .expect("bench dir");
    let path = dir.path().join("device");
    let bytes = mib << 20;
    {
        let mut file = std::fs::File::create(&path).expect("create");
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..mib {
            file.write_all(&chunk).expect("fill");
        }
        file.sync_all().expect("sync");
    }
    println!("verify_device bench: {mib} MiB file in {dir_root}, {rounds} rounds");

    let configs: [(&str, Option<(u32, u32)>); 5] = [
        ("pread O_DIRECT 1 MiB, depth 1", None),
        ("io_uring 256 KiB x 2 (AOSP < 2 GiB)", Some((256 << 10, 2))),
        ("io_uring 1 MiB x 4 (AOSP >= 2 GiB)", Some((1 << 20, 4))),
        ("io_uring 1 MiB x 8", Some((1 << 20, 8))),
        ("io_uring 256 KiB x 8", Some((256 << 10, 8))),
    ];
    let stop = AtomicBool::new(false);
    let mut times = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let seconds = match configs[i].1 {
                None => pread_pass(&path, bytes),
                Some((chunk, depth)) => {
                    let options = VerifyOptions {
                        chunk_bytes: Some(chunk),
                        queue_depth: Some(depth),
                        allow_buffered: false,
                    };
                    let start = Instant::now();
                    let report = verify_device(&path, &options, &stop).expect("verify");
                    assert_eq!(report.bytes_read, bytes as u64);
                    assert!(report.direct_io);
                    start.elapsed().as_secs_f64()
                }
            };
            times[i].push(seconds);
        }
    }
    let mb = bytes as f64 / 1e6;
    for (i, (name, _)) in configs.iter().enumerate() {
        let t = &mut times[i];
        t.sort_by(f64::total_cmp);
        println!(
            "{name:<38} {:>6.0} MB/s median ({:.0}-{:.0})",
            mb / t[t.len() / 2],
            mb / t[t.len() - 1],
            mb / t[0]
        );
    }
}
