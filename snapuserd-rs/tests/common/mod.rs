//! Fixtures shared by the integration tests.

use std::path::{Path, PathBuf};

use cow_format::{CowWriter, WriterOptions};

/// Bytes per block.
pub const BLOCK: usize = 4096;

/// A small update in `dir`. The source has 16 blocks, block i filled with i. The target
/// replaces block 3 with 0xAA, zeroes block 5 and copies block 12 to block 7.
/// Returns (COW path, source path, target image).
pub fn write_small_update(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let mut source = Vec::new();
    for i in 0..16u8 {
        source.extend(std::iter::repeat_n(i, BLOCK));
    }
    let mut target = source.clone();
    target[3 * BLOCK..4 * BLOCK].fill(0xAA);
    target[5 * BLOCK..6 * BLOCK].fill(0);
    target.copy_within(12 * BLOCK..13 * BLOCK, 7 * BLOCK);
    let src = dir.join("source.img");
    std::fs::write(&src, &source).unwrap();
    let cow = dir.join("system.cow");
    let mut w = CowWriter::create(
        std::fs::File::create(&cow).unwrap(),
        WriterOptions::default(),
    )
    .unwrap();
    w.add_copy(7, 12).unwrap();
    w.add_replace(3, &[0xAA; BLOCK]).unwrap();
    w.add_zero(5, 1).unwrap();
    w.finalize().unwrap();
    (cow, src, target)
}
