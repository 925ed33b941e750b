//! `ota-tools create` on random and adversarial image pairs, for v2 and v3 and every
//! compression. Each COW is checked three ways, and each must give the target byte for
//! byte:
//! * a test-side in-place merge through the cow-format reader (snapuserd's merge order,
//!   each op reading the partly merged device);
//! * `apply` into a separate output, and `apply` in place on a copy of the source (ops
//!   applied one by one in merge order, as a device merge does);
//! * `verify` (merge-order safety + block comparison), which must also reject unsafe
//!   orders and wrong targets.

mod create_common;

use std::fs::{self, File};
use std::path::Path;

use cow_format::{Compression, CowReader, CowVersion, CowWriter, OpKind, WriterOptions};
use create_common::{merge_in_place, pairs, texty_blocks, Rng, BS};
use ota_tools::apply::{apply, ApplyOptions};
use ota_tools::create::command::{create_cow, CreateOptions};
use ota_tools::verify::{verify, VerifyError};

/// `apply` to a separate file, then in place on a copy of the source; returns both.
fn apply_both(d: &Path, cow: &Path, target_len: usize) -> (Vec<u8>, Vec<u8>) {
    let run = |source: &Path, output: &Path| {
        apply(&ApplyOptions {
            source: source.to_path_buf(),
            cow: cow.to_path_buf(),
            output: output.to_path_buf(),
            size: Some(target_len as u64),
            progress: false,
            threads: 2,
        })
        .unwrap();
        fs::read(output).unwrap()
    };
    let _ = fs::remove_file(d.join("applied.img"));
    let separate = run(&d.join("src.img"), &d.join("applied.img"));
    fs::copy(d.join("src.img"), d.join("inplace.img")).unwrap();
    let in_place = run(&d.join("inplace.img"), &d.join("inplace.img"));
    (separate, in_place)
}

const COMPRESSIONS: [&str; 5] = ["none", "gz", "brotli,5", "lz4", "zstd"];
const FACTORS: [u32; 4] = [4096, 16384, 65536, 262144];

#[test]
fn every_pair_version_and_compression_merges_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, (name, s, t)) in pairs().into_iter().enumerate() {
        fs::write(d.join("src.img"), &s).unwrap();
        fs::write(d.join("tgt.img"), &t).unwrap();
        for version in [CowVersion::V2, CowVersion::V3] {
            for (j, comp) in COMPRESSIONS.iter().enumerate() {
                let opts = CreateOptions {
                    version,
                    compression: comp.parse::<Compression>().unwrap(),
                    compression_factor: FACTORS[(i + j) % FACTORS.len()],
                    threads: Some(2),
                    ..CreateOptions::default()
                };
                let cow = d.join("out.cow");
                let summary = create_cow(&opts, &d.join("src.img"), &d.join("tgt.img"), &cow)
                    .unwrap_or_else(|e| panic!("{name} {version:?} {comp}: {e}"));
                assert_eq!(summary.cow_size, fs::metadata(&cow).unwrap().len());
                if name == "byte-shifted" && *comp != "none" {
                    let reader = CowReader::open(File::open(&cow).unwrap()).unwrap();
                    let unaligned = reader
                        .ops()
                        .iter()
                        .filter(|op| op.kind == OpKind::Xor && op.source % BS as u64 != 0)
                        .count();
                    assert!(
                        unaligned > 50,
                        "{version:?} {comp}: {unaligned} unaligned XORs"
                    );
                }
                if version == CowVersion::V3 {
                    // op_count_max is computed exactly: no unused op slots.
                    let reader = CowReader::open(File::open(&cow).unwrap()).unwrap();
                    let cow_format::reader::CowHeader::V3(h) = reader.header() else {
                        panic!("not a v3 header");
                    };
                    assert_eq!(h.op_count_max, h.op_count, "{name} {comp}");
                    assert_eq!(h.op_count, summary.write.op_records, "{name} {comp}");
                }
                let merged = merge_in_place(&s, t.len(), &cow);
                assert!(
                    merged == t,
                    "{name} {version:?} {comp}: in-place merge differs"
                );
                let (separate, in_place) = apply_both(d, &cow, t.len());
                assert!(separate == t, "{name} {version:?} {comp}: apply differs");
                assert!(
                    in_place == t,
                    "{name} {version:?} {comp}: in-place apply differs"
                );
                verify(&d.join("src.img"), &d.join("tgt.img"), &cow)
                    .unwrap_or_else(|e| panic!("{name} {version:?} {comp}: verify: {e}"));
            }
        }
    }
}

#[test]
fn identical_images_give_a_cow_without_ops() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = texty_blocks(&mut Rng::new(1), 50);
    fs::write(d.join("a.img"), &s).unwrap();
    for version in [CowVersion::V2, CowVersion::V3] {
        let opts = CreateOptions {
            version,
            ..CreateOptions::default()
        };
        let summary = create_cow(
            &opts,
            &d.join("a.img"),
            &d.join("a.img"),
            &d.join("out.cow"),
        )
        .unwrap();
        assert_eq!(summary.write.data_ops, 0);
        assert_eq!(summary.counts.unchanged, 50);
        let reader = CowReader::open(File::open(d.join("out.cow")).unwrap()).unwrap();
        assert!(reader.ops().is_empty(), "{version:?}");
        verify(&d.join("a.img"), &d.join("a.img"), &d.join("out.cow")).unwrap();
    }
}

#[test]
fn swaps_cost_one_replace_not_two() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, s, t) = pairs().into_iter().find(|p| p.0 == "swap").unwrap();
    fs::write(d.join("src.img"), &s).unwrap();
    fs::write(d.join("tgt.img"), &t).unwrap();
    let summary = create_cow(
        &CreateOptions::default(),
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("out.cow"),
    )
    .unwrap();
    assert_eq!(summary.counts.copy, 1);
    assert_eq!(summary.counts.replace + summary.counts.xor, 1);
    assert_eq!(summary.cycle_breaks, 1);
}

fn write_cow(path: &Path, sequence: &[u32], copies: &[(u64, u64)]) {
    let opts = WriterOptions {
        version: CowVersion::V3,
        op_count_max: Some(copies.len() as u64),
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(File::create(path).unwrap(), opts).unwrap();
    if !sequence.is_empty() {
        w.add_sequence(sequence).unwrap();
    }
    for &(new, old) in copies {
        w.add_copy(new, old).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn verify_rejects_unsafe_orders_and_wrong_targets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = texty_blocks(&mut Rng::new(2), 8);
    let mut t = s.clone();
    create_common::copy_block(&mut t, 0, &s, 1);
    create_common::copy_block(&mut t, 1, &s, 0);
    fs::write(d.join("src.img"), &s).unwrap();
    fs::write(d.join("tgt.img"), &t).unwrap();
    // A swap as two COPYs: whatever the order, the second reads an overwritten block.
    write_cow(&d.join("swap.cow"), &[0, 1], &[(0, 1), (1, 0)]);
    let err = verify(&d.join("src.img"), &d.join("tgt.img"), &d.join("swap.cow")).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::UnsafeOrder(
                ota_tools::create::merge_check::MergeCheckError::ReadAfterWrite { block: 0, .. }
            )
        ),
        "{err}"
    );
    // A safe COW checked against the wrong target names the first bad block.
    let mut other = t.clone();
    other[5 * BS + 77] ^= 1;
    fs::write(d.join("other.img"), &other).unwrap();
    create_cow(
        &CreateOptions::default(),
        &d.join("src.img"),
        &d.join("tgt.img"),
        &d.join("ok.cow"),
    )
    .unwrap();
    verify(&d.join("src.img"), &d.join("tgt.img"), &d.join("ok.cow")).unwrap();
    let err = verify(&d.join("src.img"), &d.join("other.img"), &d.join("ok.cow")).unwrap_err();
    assert!(
        matches!(err, VerifyError::Mismatch { block: 5, byte: 77 }),
        "{err}"
    );
    // A target larger than what the COW covers: the first uncovered block is reported.
    let mut longer = t.clone();
    longer.extend(vec![0u8; 2 * BS]);
    fs::write(d.join("longer.img"), &longer).unwrap();
    let err = verify(&d.join("src.img"), &d.join("longer.img"), &d.join("ok.cow")).unwrap_err();
    assert!(matches!(err, VerifyError::Uncovered { block: 8 }), "{err}");
    // Missing COW.
    let err = verify(&d.join("src.img"), &d.join("tgt.img"), &d.join("none.cow")).unwrap_err();
    assert!(matches!(err, VerifyError::OpenCow { .. }), "{err}");
}
