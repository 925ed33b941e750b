//! Fixtures shared by the integration tests.

pub mod control;

use std::path::{Path, PathBuf};

use cow_format::{CowWriter, WriterOptions};

/// Bytes per block.
pub const BLOCK: usize = 4096;

/// A small update in `dir`. The source has 16 blocks, block i filled with i. The target
/// replaces block 3 with 0xAA, zeroes block 5 and copies block 12 to block 7.
/// Returns (COW path, source path, target image).
#[allow(dead_code)]
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

/// The files of a user-space-merge update: the COW, the source (old slot, read-only), the
/// base device (the partition being updated, holding the old contents until merged) and
/// the target image.
#[allow(dead_code)]
pub struct UserUpdate {
    /// The COW file.
    pub cow: PathBuf,
    /// The source image.
    pub source: PathBuf,
    /// The base device image.
    pub base: PathBuf,
    /// What the device reads as, and what the base holds after the merge.
    pub target: Vec<u8>,
}

/// A user-space-merge update of `blocks` 4 KiB blocks in `dir`, files named after `name`,
/// made by `ota-tools create` (v3, lz4, user-space merge order): a run of blocks moved by
/// one (overlapping COPY ops), new data, zeroed blocks and a block moved far away.
#[allow(dead_code)]
pub fn write_user_update(dir: &Path, name: &str, blocks: usize) -> UserUpdate {
    assert!(blocks >= 64, "the update needs room");
    let mut source = Vec::with_capacity(blocks * BLOCK);
    for i in 0..blocks {
        let mut block = vec![0u8; BLOCK];
        for (j, b) in block.iter_mut().enumerate() {
            // Every block distinct, and not compressible to nothing.
            *b = (i.wrapping_mul(31) ^ j.wrapping_mul(7) ^ (j >> 5)) as u8;
        }
        source.extend_from_slice(&block);
    }
    let mut target = source.clone();
    // Shift blocks 4..blocks/4 up by one: a chain of overlapping COPY ops.
    let q = blocks / 4;
    target.copy_within(4 * BLOCK..q * BLOCK, 5 * BLOCK);
    // New data.
    for (k, b) in target[(q + 4) * BLOCK..(q + 12) * BLOCK]
        .iter_mut()
        .enumerate()
    {
        *b = (k % 251) as u8 ^ 0x5a;
    }
    // Zeroes.
    target[(2 * q) * BLOCK..(2 * q + 5) * BLOCK].fill(0);
    // A block from the end to the middle.
    target.copy_within((blocks - 1) * BLOCK..blocks * BLOCK, (2 * q + 9) * BLOCK);
    let src = dir.join(format!("{name}-source.img"));
    let tgt = dir.join(format!("{name}-target.img"));
    let base = dir.join(format!("{name}-base.img"));
    let cow = dir.join(format!("{name}.cow"));
    std::fs::write(&src, &source).unwrap();
    std::fs::write(&tgt, &target).unwrap();
    std::fs::write(&base, &source).unwrap();
    let opts = ota_tools::create::command::CreateOptions {
        threads: Some(1),
        ..Default::default()
    };
    ota_tools::create::command::create_cow(&opts, &src, &tgt, &cow).unwrap();
    UserUpdate {
        cow,
        source: src,
        base,
        target,
    }
}
