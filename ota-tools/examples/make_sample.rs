//! Write a sample source image, COW file and expected target image, for
//! trying `ota-tools` by hand and for the README examples.
//!
//! `cargo run -p ota-tools --example make_sample -- DIR [v2|v3] [COMPRESSION] [BLOCKS]`
//! writes DIR/source.img, DIR/update.cow and DIR/target.img.

use std::path::PathBuf;

use cow_format::writer::{CowWriter, WriterOptions};
use cow_format::CowVersion;

fn block(seed: u64, bs: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..bs)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly text-like with some noise: compresses about 2-4x.
            if i % 4 == 0 {
                x as u8
            } else {
                b"abcdefgh"[(x % 8) as usize]
            }
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .ok_or("usage: make_sample DIR [v2|v3] [COMPRESSION] [BLOCKS]")?,
    );
    let version = match args.get(1).map(String::as_str) {
        Some("v3") => CowVersion::V3,
        _ => CowVersion::V2,
    };
    let compression = args.get(2).map_or("lz4", String::as_str).parse()?;
    let blocks: u64 = args.get(3).map_or(Ok(1024), |s| s.parse())?;
    let bs = 4096usize;
    std::fs::create_dir_all(&dir)?;
    let source: Vec<u8> = (0..blocks).flat_map(|b| block(b, bs)).collect();
    let mut target = source.clone();
    let opts = WriterOptions {
        version,
        compression,
        op_count_max: Some(blocks),
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(std::fs::File::create(dir.join("update.cow"))?, opts)?;
    // First quarter: COPY from the last quarter; second: REPLACE; a few ZERO
    // and XOR blocks; the rest unchanged.
    let q = blocks / 4;
    for b in 0..q {
        let old = 3 * q + b;
        w.add_copy(b, old)?;
        let (o, n) = (old as usize * bs, b as usize * bs);
        target.copy_within(o..o + bs, n);
    }
    let replace: Vec<u8> = (q..2 * q).flat_map(|b| block(b + 7_000_000, bs)).collect();
    w.add_replace(q, &replace)?;
    target[q as usize * bs..2 * q as usize * bs].copy_from_slice(&replace);
    w.add_label(1)?;
    let z = (2 * q, (q / 8).max(1));
    w.add_zero(z.0, z.1)?;
    target[z.0 as usize * bs..(z.0 + z.1) as usize * bs].fill(0);
    let x0 = z.0 + z.1;
    let xn = (q / 8).max(1);
    let src_off = 3 * q * bs as u64 + 123;
    let wanted: Vec<u8> = (0..xn).flat_map(|b| block(b + 9_000_000, bs)).collect();
    let xor: Vec<u8> = wanted
        .iter()
        .zip(&source[src_off as usize..src_off as usize + wanted.len()])
        .map(|(a, b)| a ^ b)
        .collect();
    w.add_xor(x0, &xor, src_off)?;
    target[x0 as usize * bs..(x0 + xn) as usize * bs].copy_from_slice(&wanted);
    w.add_label(2)?;
    let summary = w.finalize()?;
    std::fs::write(dir.join("source.img"), &source)?;
    std::fs::write(dir.join("target.img"), &target)?;
    println!(
        "wrote {}: {} op records, {} bytes",
        dir.join("update.cow").display(),
        summary.op_records,
        summary.file_size
    );
    Ok(())
}
