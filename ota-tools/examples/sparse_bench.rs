//! Read throughput of a sparse image through `ota_tools::sparse::ImageSource`, against the
//! same image raw.
//!
//! ```sh
//! cargo run --release -p ota-tools --example sparse_bench -- [MIB]
//! ```
//!
//! Writes a MIB-mebibyte raw image (default 256; a quarter random, the rest alternating
//! zero and pattern runs of 1 to 64 blocks) to a temporary directory, converts it with
//! `img2simg` (Debian `android-sdk-libsparse-utils`), then reads both images through
//! `ImageSource` sequentially in 1 MiB reads and at 20,000 random 4 KiB blocks, and prints
//! MB/s (best of 3; the page cache holds both files).

use std::process::Command;
use std::time::Instant;

use ota_tools::create::image::BlockImage;
use ota_tools::sparse::ImageSource;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let blocks = mib * 256;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut raw = vec![0u8; blocks * 4096];
    let mut b = 0;
    while b < blocks {
        let run = (1 + next() % 64) as usize;
        let end = (b + run).min(blocks);
        match next() % 4 {
            0 => raw[b * 4096..end * 4096]
                .chunks_exact_mut(8)
                .for_each(|w| w.copy_from_slice(&next().to_le_bytes())),
            1 => raw[b * 4096..end * 4096]
                .chunks_exact_mut(4)
                .for_each(|w| w.copy_from_slice(&[0xde, 0xad, 0xbe, 0xef])),
            _ => {}
        }
        b = end;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let raw_path = dir.path().join("raw.img");
    let sparse_path = dir.path().join("sparse.img");
    std::fs::write(&raw_path, &raw).expect("write raw image");
    let status = Command::new("img2simg")
        .arg(&raw_path)
        .arg(&sparse_path)
        .status()
        .expect("run img2simg (apt-get install android-sdk-libsparse-utils)");
    assert!(status.success(), "img2simg failed");
    let sparse = ImageSource::open(&sparse_path).expect("open sparse image");
    let plain = ImageSource::open(&raw_path).expect("open raw image");
    let ImageSource::Sparse { image, .. } = &sparse else {
        panic!("img2simg output not detected as sparse")
    };
    println!(
        "{mib} MiB image, sparse file {} bytes, {:?}",
        std::fs::metadata(&sparse_path)
            .map(|m| m.len())
            .unwrap_or(0),
        image.chunk_counts()
    );
    let offsets: Vec<u64> = (0..20_000)
        .map(|_| (next() % blocks as u64) * 4096)
        .collect();
    for (name, img) in [("raw", &plain), ("sparse", &sparse)] {
        let mut buf = vec![0u8; 1 << 20];
        let seq = best_of_3(|| {
            for off in (0..raw.len()).step_by(buf.len()) {
                let n = buf.len().min(raw.len() - off);
                img.read_exact_at(&mut buf[..n], off as u64).expect("read");
            }
        });
        let mut block = vec![0u8; 4096];
        let rand = best_of_3(|| {
            for &off in &offsets {
                img.read_exact_at(&mut block, off).expect("read");
            }
        });
        println!(
            "{name:<7} sequential {:>8.1} MB/s   random 4 KiB {:>8.1} MB/s",
            raw.len() as f64 / seq / 1e6,
            offsets.len() as f64 * 4096.0 / rand / 1e6
        );
        assert_eq!(img.len_bytes(), raw.len() as u64);
    }
}

fn best_of_3(mut run: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}
