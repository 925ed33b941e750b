//! Files whose bytes or offsets are known from AOSP's writer (fact sheet
//! §5.1.2, §5.2.1, §11.1), reproduced with this crate's writer.

mod common;

use std::fs::File;
use std::io::Read;

use cow_format::layout::{CowHeaderV3, CowOpV2, CowOpV3, ResumePoint};
use cow_format::writer::{CowWriter, WriterOptions};
use cow_format::CowVersion;
use sha2::{Digest, Sha256};

const COW_V2_SHA256: &str = "afd7288855d0d9afd55e87910cc1886d7e73b97876cc4d15b85303d8027c8e2f";
const BS: usize = 4096;

fn payload() -> Vec<u8> {
    let mut v = b"This is some data, believe it".to_vec();
    v.resize(BS, 0);
    v
}

fn read_all(f: &mut File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// The recipe of `write_legacy_cow_v2()` (fact sheet §11.1), with `zeros`
/// ZERO blocks from block 5 on.
fn cow_v2_recipe(w: &mut CowWriter, zeros: u64) {
    w.add_copy(0, 5).unwrap();
    w.add_replace(2, &payload()).unwrap();
    w.add_label(1).unwrap();
    w.add_xor(50, &payload(), 24 * 4096 + 10).unwrap();
    w.add_zero(5, zeros).unwrap();
    w.add_label(2).unwrap();
}

fn write_to_vec(opts: WriterOptions, build: impl FnOnce(&mut CowWriter)) -> Vec<u8> {
    let file = tempfile::tempfile().unwrap();
    let mut w = CowWriter::create(file.try_clone().unwrap(), opts).unwrap();
    build(&mut w);
    w.finalize().unwrap();
    let mut f = file;
    read_all(&mut f)
}

fn v2_op(bytes: &[u8], off: usize) -> CowOpV2 {
    CowOpV2::decode(bytes[off..off + 20].try_into().unwrap())
}

fn v3_op(bytes: &[u8], off: usize) -> CowOpV3 {
    CowOpV3::decode(bytes[off..off + 16].try_into().unwrap())
}

#[test]
fn cow_v2_is_byte_identical_to_aosp() {
    let opts = WriterOptions {
        cluster_ops: 5,
        num_merge_ops: 1,
        ..WriterOptions::default()
    };
    let bytes = write_to_vec(opts, |w| cow_v2_recipe(w, 10));
    assert_eq!(bytes.len(), 2_105_826);
    // Spot checks that point at the culprit if the hash ever differs.
    assert_eq!(
        &bytes[..28],
        &[
            0x21, 0x21, 0x57, 0x4F, 0x63, 0x77, 0x6F, 0x43, 0x02, 0x00, 0x00, 0x00, 0x26, 0x00,
            0x54, 0x00, 0x14, 0x00, 0x00, 0x10, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x01, 0x00
        ]
    );
    let cluster = v2_op(&bytes, 0x200076);
    assert_eq!((cluster.op_type, cluster.source), (5, 8192));
    let replace = v2_op(&bytes, 0x20003A);
    assert_eq!((replace.new_block, replace.source), (2, 0x20008A));
    assert_eq!(&bytes[0x20008A..0x20008A + BS], &payload()[..]);
    assert_eq!(&bytes[0x20108A..0x20108A + BS], &payload()[..]);
    let footer = v2_op(&bytes, 0x20218E);
    assert_eq!(
        (footer.op_type, footer.new_block, footer.source),
        (255, 360, 18)
    );
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, COW_V2_SHA256);
}

#[test]
fn v2_single_replace_gets_cluster_op_and_footer_in_new_cluster() {
    let opts = WriterOptions {
        cluster_ops: 5,
        scratch: false,
        ..WriterOptions::default()
    };
    let bytes = write_to_vec(opts, |w| w.add_replace(7, &payload()).unwrap());
    let ops_start = 38;
    let replace = v2_op(&bytes, ops_start);
    assert_eq!((replace.op_type, replace.new_block), (2, 7));
    assert_eq!(replace.source, (ops_start + 100) as u64);
    let cluster = v2_op(&bytes, ops_start + 20);
    assert_eq!((cluster.op_type, cluster.source), (5, 4156));
    // Unused slots 2..5 are zero.
    assert!(bytes[ops_start + 40..ops_start + 100]
        .iter()
        .all(|b| *b == 0));
    let footer_at = ops_start + 100 + BS;
    let footer = v2_op(&bytes, footer_at);
    assert_eq!(
        (footer.op_type, footer.source, footer.new_block),
        (255, 2, 40)
    );
    assert_eq!(bytes.len(), footer_at + 84);
}

fn v3_opts(op_count_max: u64, scratch: bool, factor: u32) -> WriterOptions {
    WriterOptions {
        version: CowVersion::V3,
        scratch,
        op_count_max: Some(op_count_max),
        compression_factor: factor,
        ..WriterOptions::default()
    }
}

fn v3_header(bytes: &[u8]) -> CowHeaderV3 {
    CowHeaderV3::decode(bytes[..78].try_into().unwrap())
}

#[test]
fn v3_cow_v2_recipe_offsets() {
    let bytes = write_to_vec(v3_opts(20, false, 4096), |w| cow_v2_recipe(w, 3));
    let h = v3_header(&bytes);
    let r = h.regions().unwrap();
    assert_eq!(
        (r.resume_offset, r.ops_offset, r.data_offset),
        (78, 142, 462)
    );
    assert_eq!(h.op_count, 6);
    assert_eq!(h.resume_point_count, 2);
    let rp = |i: usize| ResumePoint::decode(bytes[78 + 16 * i..94 + 16 * i].try_into().unwrap());
    assert_eq!(
        (rp(0), rp(1)),
        (
            ResumePoint {
                label: 1,
                op_index: 2
            },
            ResumePoint {
                label: 2,
                op_index: 6
            }
        )
    );
    assert_eq!(v3_op(&bytes, 142).source_info, 0x1000_0000_0000_0005);
    let replace = v3_op(&bytes, 158);
    assert_eq!(replace.source(), 462);
    assert_eq!(replace.data_length, 4096);
    assert_eq!(v3_op(&bytes, 174).source_info, 0x6000_0000_0001_800A);
    assert_eq!(&bytes[462..462 + BS], &payload()[..]);
    assert_eq!(&bytes[462 + BS..462 + 2 * BS], &payload()[..]);
    assert_eq!(bytes.len(), 462 + 2 * BS);

    let with_scratch = write_to_vec(v3_opts(20, true, 4096), |w| cow_v2_recipe(w, 3));
    let r = v3_header(&with_scratch).regions().unwrap();
    assert_eq!(r.data_offset, 2_097_614);
    assert_eq!(
        v3_op(&with_scratch, r.ops_offset as usize + 16).source(),
        2_097_614
    );
    assert!(with_scratch[78..78 + 2_097_152].iter().all(|b| *b == 0));
}

#[test]
fn v3_multi_block_replace_encoding() {
    // REPLACE of 4 blocks with a 16K factor at data offset 462.
    let bytes = write_to_vec(v3_opts(20, false, 16384), |w| {
        w.add_replace(0, &vec![0u8; 4 * BS]).unwrap();
    });
    assert_eq!(v3_op(&bytes, 142).source_info, 0x2400_0000_0000_01CE);
}

#[test]
fn v3_sequence_example_offsets() {
    let bytes = write_to_vec(v3_opts(8, false, 4096), |w| {
        w.add_sequence(&[3, 1]).unwrap();
        w.add_copy(1, 3).unwrap();
        w.add_copy(3, 7).unwrap();
        w.add_zero(9, 1).unwrap();
        w.add_replace(4, &payload()).unwrap();
        w.add_zero(2, 1).unwrap();
    });
    let h = v3_header(&bytes);
    assert_eq!(h.sequence_data_count, 2);
    let r = h.regions().unwrap();
    assert_eq!(
        (
            r.sequence_offset,
            r.resume_offset,
            r.ops_offset,
            r.data_offset
        ),
        (78, 86, 150, 278)
    );
    assert_eq!(&bytes[78..86], &[3, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(v3_op(&bytes, 150 + 3 * 16).source(), 278);
    assert_eq!(h.op_count, 5);
}

/// The writer's v3 files equal the test suite's independent hand assembler
/// (`tests/common`), byte for byte.
#[test]
fn v3_files_match_the_hand_assembler() {
    use common::{V3File, V3Rec};
    // §6.2 / §5.2.1 example: sequence [3,1], S=2, M=8.
    let text = payload();
    let bytes = write_to_vec(v3_opts(8, false, 4096), |w| {
        w.add_sequence(&[3, 1]).unwrap();
        w.add_copy(1, 3).unwrap();
        w.add_copy(3, 7).unwrap();
        w.add_zero(9, 1).unwrap();
        w.add_replace(4, &text).unwrap();
        w.add_zero(2, 1).unwrap();
    });
    let want = V3File {
        op_count_max: 8,
        compression_factor: 4096,
        sequence: vec![3, 1],
        ..V3File::default()
    }
    .assemble(&[
        V3Rec::copy(1, 3),
        V3Rec::copy(3, 7),
        V3Rec::zero(9),
        V3Rec::replace(4, 0, text.clone()),
        V3Rec::zero(2),
    ]);
    assert!(bytes == want, "sequence example differs");

    // cow_v2 recipe as v3 with labels and a 16K factor: 7 raw blocks → 4+2+1.
    let seven: Vec<u8> = (0..7u8).flat_map(|i| vec![i + 1; BS]).collect();
    let bytes = write_to_vec(v3_opts(20, true, 16384), |w| {
        w.add_copy(0, 5).unwrap();
        w.add_replace(2, &seven).unwrap();
        w.add_label(1).unwrap();
        w.add_xor(50, &text, 98314).unwrap();
        w.add_zero(20, 2).unwrap();
        w.add_label(2).unwrap();
    });
    let want = V3File {
        buffer_size: 2 * 1024 * 1024,
        op_count_max: 20,
        compression_factor: 16384,
        resume_points: vec![(1, 4), (2, 7)],
        ..V3File::default()
    }
    .assemble(&[
        V3Rec::copy(0, 5),
        V3Rec::replace(2, 2, seven[..4 * BS].to_vec()),
        V3Rec::replace(6, 1, seven[4 * BS..6 * BS].to_vec()),
        V3Rec::replace(8, 0, seven[6 * BS..].to_vec()),
        V3Rec::xor(50, text.clone(), 98314),
        V3Rec::zero(20),
        V3Rec::zero(21),
    ]);
    assert_eq!(bytes.len(), want.len());
    assert!(bytes == want, "labelled multi-block example differs");
}
