//! `ota-tools create` on a recompiled, relocated "shared library": machine-code-like data
//! in which instructions were inserted (so everything after them moves by a few bytes)
//! and every call crossing an insertion has a new displacement, placed elsewhere in the
//! image, while other data is copied over the library's old location. XOR bases then sit
//! at unaligned byte offsets, read two source blocks, and lie where COPYs (and other XORs)
//! write, so they must be merged first, or, when that closes a cycle, converted.
//!
//! For v2 and v3 and every compression, the COW must rebuild the target through the
//! cow-format reader (in-place merge in snapuserd's order, each op reading the partly
//! merged device), through `apply` in place, and pass `verify` (AOSP's merge-sequence
//! rule and a block comparison).

mod create_common;

use std::fs::{self, File};

use cow_format::{Compression, CowReader, CowVersion, OpKind};
use create_common::{merge_in_place, texty_blocks, Rng, BS};
use ota_tools::apply::{apply, ApplyOptions};
use ota_tools::create::command::{create_cow, CreateOptions};
use ota_tools::verify::verify;

enum Instr {
    /// Bytes with no address in them.
    Plain(Vec<u8>),
    /// `0xE8` and a 32-bit displacement to instruction `target`.
    Call(usize),
}

/// Lays instructions out and fills in call displacements (relative to the next
/// instruction, as x86 does).
fn layout(code: &[Instr]) -> Vec<u8> {
    let mut pos = Vec::with_capacity(code.len() + 1);
    let mut p = 0usize;
    for i in code {
        pos.push(p);
        p += match i {
            Instr::Plain(b) => b.len(),
            Instr::Call(_) => 5,
        };
    }
    let mut out = Vec::with_capacity(p);
    for (k, i) in code.iter().enumerate() {
        match i {
            Instr::Plain(b) => out.extend_from_slice(b),
            Instr::Call(t) => {
                let disp = pos[*t] as i64 - (pos[k] + 5) as i64;
                out.push(0xE8);
                out.extend_from_slice(&(disp as i32).to_le_bytes());
            }
        }
    }
    out
}

fn plain(rng: &mut Rng) -> Instr {
    // A small alphabet of opcodes and operands, as compiled code has.
    const OPS: [u8; 12] = [
        0x48, 0x89, 0x8B, 0x83, 0xC3, 0x0F, 0x85, 0x74, 0x31, 0xFF, 0x41, 0x5D,
    ];
    let len = 1 + rng.below(6) as usize;
    Instr::Plain(
        (0..len)
            .map(|_| {
                if rng.below(3) == 0 {
                    rng.below(256) as u8
                } else {
                    OPS[rng.below(12) as usize]
                }
            })
            .collect(),
    )
}

/// A library of `blocks` blocks and its "recompiled" version (about one inserted
/// instruction per 7 KB; almost every call gets a new displacement), both padded to whole
/// blocks.
fn library(rng: &mut Rng, blocks: usize) -> (Vec<u8>, Vec<u8>) {
    let mut code: Vec<Instr> = Vec::new();
    let mut len = 0usize;
    while len < blocks * BS - 64 {
        let i = if rng.below(16) == 0 {
            Instr::Call(0)
        } else {
            plain(rng)
        };
        len += match &i {
            Instr::Plain(b) => b.len(),
            Instr::Call(_) => 5,
        };
        code.push(i);
    }
    let n = code.len();
    for i in code.iter_mut() {
        if let Instr::Call(t) = i {
            *t = rng.below(n as u64) as usize;
        }
    }
    let mut old = layout(&code);
    // Recompile: insert instructions; calls keep their targets (indices remapped).
    let mut map = Vec::with_capacity(n);
    let mut new_code: Vec<Instr> = Vec::new();
    for i in code {
        if rng.below(2000) == 0 {
            new_code.push(plain(rng));
        }
        map.push(new_code.len());
        new_code.push(i);
    }
    for i in new_code.iter_mut() {
        if let Instr::Call(t) = i {
            *t = map[*t];
        }
    }
    let mut new = layout(&new_code);
    old.resize(blocks * BS, 0xCC);
    new.resize(blocks * BS, 0xCC);
    (old, new)
}

/// Two pairs: the library moved past the end of the source with other data copied over
/// its old place (XORs must merge before those COPYs), and the library moved up by 100
/// blocks while that data moves down over it (ordering closes cycles).
fn pairs() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let mut rng = Rng::new(2024);
    let (old, new) = library(&mut rng, 200);
    let other = texty_blocks(&mut rng, 100);
    let fresh = texty_blocks(&mut rng, 200);
    let mut src = old.clone();
    src.extend_from_slice(&other);
    // Target 1: other data over the library's first half, new data, library at 300.
    let mut t1 = other.clone();
    t1.extend_from_slice(&fresh);
    t1.extend_from_slice(&new);
    // Target 2: other data at 0..100, library at 100..300.
    let mut t2 = other.clone();
    t2.extend_from_slice(&new);
    vec![("moved-past-end", src.clone(), t1), ("moved-up", src, t2)]
}

#[test]
fn recompiled_relocated_library_rebuilds_for_every_version_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, s, t) in pairs() {
        fs::write(d.join("src.img"), &s).unwrap();
        fs::write(d.join("tgt.img"), &t).unwrap();
        for version in [CowVersion::V2, CowVersion::V3] {
            for comp in ["none", "gz", "brotli,5", "lz4", "zstd"] {
                let opts = CreateOptions {
                    version,
                    compression: comp.parse::<Compression>().unwrap(),
                    compression_factor: 65536,
                    threads: Some(2),
                    ..CreateOptions::default()
                };
                let cow = d.join("out.cow");
                let summary = create_cow(&opts, &d.join("src.img"), &d.join("tgt.img"), &cow)
                    .unwrap_or_else(|e| panic!("{name} {version:?} {comp}: {e}"));
                let reader = CowReader::open(File::open(&cow).unwrap()).unwrap();
                let ops = reader.ops();
                let unaligned: Vec<_> = ops
                    .iter()
                    .filter(|op| op.kind == OpKind::Xor && op.source % BS as u64 != 0)
                    .collect();
                if comp != "none" {
                    // Most library blocks find their moved, edited content.
                    assert!(
                        unaligned.len() >= 120,
                        "{name} {version:?} {comp}: {} unaligned XORs",
                        unaligned.len()
                    );
                    // Some of them read blocks that COPYs overwrite: ordering, not
                    // dropping, kept them.
                    let copy_targets: std::collections::HashSet<u64> = ops
                        .iter()
                        .filter(|op| op.kind == OpKind::Copy)
                        .map(|op| op.new_block)
                        .collect();
                    let over_copies = unaligned
                        .iter()
                        .filter(|op| copy_targets.contains(&(op.source / BS as u64)))
                        .count();
                    if name == "moved-past-end" {
                        assert!(over_copies >= 50, "{name} {comp}: {over_copies}");
                    } else {
                        assert!(summary.cycle_breaks > 0, "{name} {comp}: no cycle");
                    }
                    // And their payloads are far smaller than the blocks.
                    let xor_bytes: u64 = unaligned.iter().map(|op| u64::from(op.data_length)).sum();
                    assert!(
                        xor_bytes * 3 < (unaligned.len() * BS) as u64,
                        "{name} {version:?} {comp}: {xor_bytes} bytes for {} XORs",
                        unaligned.len()
                    );
                } else {
                    assert!(unaligned.is_empty());
                }
                drop(reader);
                let merged = merge_in_place(&s, t.len(), &cow);
                assert!(merged == t, "{name} {version:?} {comp}: in-place merge");
                fs::copy(d.join("src.img"), d.join("inplace.img")).unwrap();
                apply(&ApplyOptions {
                    source: d.join("inplace.img"),
                    cow: cow.clone(),
                    output: d.join("inplace.img"),
                    size: Some(t.len() as u64),
                    progress: false,
                    threads: 2,
                })
                .unwrap();
                assert!(
                    fs::read(d.join("inplace.img")).unwrap() == t,
                    "{name} {version:?} {comp}: in-place apply"
                );
                verify(&d.join("src.img"), &d.join("tgt.img"), &cow)
                    .unwrap_or_else(|e| panic!("{name} {version:?} {comp}: verify: {e}"));
            }
        }
    }
}
