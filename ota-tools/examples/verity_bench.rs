//! Throughput of `ota_tools::verity` over a pseudo-random image held in memory.
//!
//! ```sh
//! cargo run --release -p ota-tools --example verity_bench -- [MIB] [THREADS]
//! ```
//!
//! Prints MB/s (10^6 bytes of input per second) for the hash tree (SHA-256 and SHA-1,
//! 4 KiB blocks) and the FEC parity (2 and 8 roots) over an image of MIB mebibytes
//! (default 256), with THREADS rayon workers (default: all cores). Each figure is the
//! best of three runs.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    let mut data = vec![0u8; mib << 20];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for word in data.chunks_exact_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        word.copy_from_slice(&seed.to_le_bytes());
    }
    println!(
        "input {mib} MiB, {} rayon threads",
        rayon::current_num_threads()
    );
    let salt = [0x5au8; 32];
    for algorithm in ["sha256", "sha1"] {
        report(&format!("hash_tree {algorithm}"), data.len(), || {
            ota_tools::verity::hash_tree(&data, 4096, algorithm, &salt)
                .expect("hash tree")
                .len()
        });
    }
    for roots in [2u32, 8] {
        report(&format!("fec roots={roots}"), data.len(), || {
            ota_tools::verity::fec(&data, roots, 4096)
                .expect("fec")
                .len()
        });
    }
}

fn report(name: &str, input: usize, mut run: impl FnMut() -> usize) {
    let mut best = f64::MAX;
    let mut out = 0;
    for _ in 0..3 {
        let start = Instant::now();
        out = run();
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "{name:<18} {:>8.1} MB/s  ({best:.3} s, output {out} bytes)",
        input as f64 / best / 1e6
    );
}
