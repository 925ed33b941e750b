//! The reader against hand-assembled files whose layout and expected reading
//! come from the fact sheet (§5.2.1, §6.2, §7, §11): AOSP's `cow_v2` test file
//! byte for byte, and the v3 worked examples.

mod common;

use common::*;
use cow_format::{
    CompressionAlgorithm, CowReader, CowVersion, MergeOrderOptions, OpKind, OtherOpsOrder,
    ReadError,
};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn blocks(it: impl Iterator<Item = u64>) -> Vec<u64> {
    it.collect()
}

const ASC: MergeOrderOptions = MergeOrderOptions {
    other_ops: OtherOpsOrder::Ascending,
    skip_merged: false,
};
const DESC: MergeOrderOptions = MergeOrderOptions {
    other_ops: OtherOpsOrder::Descending,
    skip_merged: false,
};

#[test]
fn cow_v2_is_byte_identical_to_aosp_testdata() {
    let file = cow_v2();
    assert_eq!(file.len(), 2_105_826);
    assert_eq!(hex(&Sha256::digest(&file)), COW_V2_SHA256);
}

#[test]
fn cow_v2_parses_as_the_fact_sheet_says() {
    let r = CowReader::from_storage(cow_v2()).unwrap();
    assert_eq!(r.version(), CowVersion::V2);
    assert_eq!(r.block_size(), 4096);
    assert_eq!(r.num_merge_ops(), 1);
    assert_eq!(r.header().buffer_size(), 2 * 1024 * 1024);
    assert_eq!(r.record_count(), 18);
    assert_eq!(r.last_label(), Some(2));
    let footer = r.footer().unwrap();
    assert_eq!((footer.num_ops, footer.ops_size), (18, 360));
    assert_eq!(r.compression(), CompressionAlgorithm::None);

    let ops = r.ops();
    let summary: Vec<(OpKind, u64, u64)> = ops
        .iter()
        .map(|o| (o.kind, o.new_block, o.source))
        .collect();
    let mut expect = vec![
        (OpKind::Copy, 0, 5),
        (OpKind::Replace, 2, 0x20008A),
        (OpKind::Xor, 50, 98_314),
    ];
    expect.extend((5..=14).map(|b| (OpKind::Zero, b, 0)));
    assert_eq!(summary, expect);
    // File-order record indices (metadata records count).
    let idx: Vec<u64> = ops.iter().map(|o| o.index).collect();
    assert_eq!(idx, vec![0, 1, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16]);
    assert_eq!(ops[1].data_offset, 0x20008A);
    assert_eq!(ops[2].data_offset, 0x20108A);
    assert!(ops[1].stored_raw && ops[2].stored_raw);

    // Merge view.
    assert_eq!(r.num_total_data_ops(), 13);
    assert_eq!(r.num_ordered_ops_to_merge(), 1);
    let snapuserd: Vec<u64> = blocks(r.merge_order(ASC).map(|o| o.new_block));
    let mut want = vec![0, 50, 2];
    want.extend(5..=14);
    assert_eq!(snapuserd, want);
    let default: Vec<u64> = blocks(r.merge_order(DESC).map(|o| o.new_block));
    let mut want = vec![0, 50];
    want.extend((5..=14).rev());
    want.push(2);
    assert_eq!(default, want);
    // num_merge_ops = 1: block 0 already merged.
    let skipped: Vec<u64> = blocks(
        r.merge_order(MergeOrderOptions {
            skip_merged: true,
            ..ASC
        })
        .map(|o| o.new_block),
    );
    assert_eq!(skipped[0], 50);
    assert_eq!(skipped.len(), 12);
}

#[test]
fn cow_v2_blocks_read_correctly() {
    let r = CowReader::from_storage(cow_v2()).unwrap();
    let src = source_image(64, 4096);
    let text = test_text(4096);
    let mut out = vec![0u8; 4096];
    r.read_block(0, &src, &mut out).unwrap();
    assert_eq!(out, src[5 * 4096..6 * 4096]);
    r.read_block(2, &src, &mut out).unwrap();
    assert_eq!(out, text);
    r.read_block(50, &src, &mut out).unwrap();
    let want: Vec<u8> = text
        .iter()
        .zip(&src[98_314..98_314 + 4096])
        .map(|(a, b)| a ^ b)
        .collect();
    assert_eq!(out, want);
    for b in 5..=14 {
        out.fill(0xAA);
        r.read_block(b, &src, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
    }
    r.read_block(1, &src, &mut out).unwrap();
    assert_eq!(
        out,
        src[4096..8192],
        "unchanged block comes from the source"
    );
}

#[test]
fn cow_v2_labels_and_torn_tails() {
    let file = cow_v2();
    let at1 = CowReader::from_storage_at_label(file.clone(), 1).unwrap();
    assert_eq!(at1.ops().len(), 2);
    assert_eq!(at1.last_label(), Some(1));
    assert!(at1.footer().is_none());
    let at2 = CowReader::from_storage_at_label(file.clone(), 2).unwrap();
    assert_eq!(at2.ops().len(), 13);
    assert!(matches!(
        CowReader::from_storage_at_label(file.clone(), 3),
        Err(ReadError::LabelNotFound {
            label: 3,
            last: Some(2)
        })
    ));

    // Torn before the footer: needs a label.
    let torn = file[..0x20218E].to_vec();
    assert!(matches!(
        CowReader::from_storage(torn.clone()),
        Err(ReadError::NoFooter)
    ));
    assert_eq!(
        CowReader::from_storage_at_label(torn, 2)
            .unwrap()
            .ops()
            .len(),
        13
    );
    // Torn inside the LABEL 2 record: only whole records count.
    let torn = file[..0x202180].to_vec();
    assert!(CowReader::from_storage_at_label(torn.clone(), 2).is_err());
    let r = CowReader::from_storage_at_label(torn, 1).unwrap();
    assert_eq!(r.ops().len(), 2);
}

#[test]
fn v3_form_of_cow_v2_recipe() {
    // §5.2.1 first example: resume at 78, ops at 142, data at 462.
    let text = test_text(4096);
    let layout = V3File {
        op_count_max: 20,
        resume_points: vec![(1, 2), (2, 6)],
        ..V3File::default()
    };
    assert_eq!(layout.data_offset(), 462);
    let file = layout.assemble(&[
        V3Rec::copy(0, 5),
        V3Rec::replace(2, 0, text.clone()),
        V3Rec::xor(50, text.clone(), 98_314),
        V3Rec::zero(5),
        V3Rec::zero(6),
        V3Rec::zero(7),
    ]);
    // The REPLACE record at op slot 1 carries source 462 with type 2.
    assert_eq!(
        &file[142 + 16 + 8..142 + 32],
        &(0x2000_0000_0000_01CEu64).to_le_bytes()
    );
    let r = CowReader::from_storage(file.clone()).unwrap();
    assert_eq!(r.version(), CowVersion::V3);
    let order: Vec<u64> = blocks(r.merge_order(ASC).map(|o| o.new_block));
    assert_eq!(order, vec![0, 2, 50, 5, 6, 7]);
    assert_eq!(r.num_ordered_ops_to_merge(), 6);
    assert_eq!(r.num_total_data_ops(), 6);
    assert_eq!(r.ops()[1].data_offset, 462);
    assert_eq!(r.ops()[2].data_offset, 462 + 4096);
    assert_eq!(r.resume_points().len(), 2);
    assert_eq!(r.last_label(), None);

    let at1 = CowReader::from_storage_at_label(file.clone(), 1).unwrap();
    assert_eq!(at1.ops().len(), 2);
    let at2 = CowReader::from_storage_at_label(file.clone(), 2).unwrap();
    assert_eq!(at2.ops().len(), 6);
    assert!(CowReader::from_storage_at_label(file, 3).is_err());

    let src = source_image(64, 4096);
    let mut out = vec![0u8; 4096];
    at2.read_block(50, &src, &mut out).unwrap();
    let want: Vec<u8> = text
        .iter()
        .zip(&src[98_314..98_314 + 4096])
        .map(|(a, b)| a ^ b)
        .collect();
    assert_eq!(out, want);
}

#[test]
fn v3_with_scratch_places_data_after_it() {
    let layout = V3File {
        op_count_max: 20,
        buffer_size: 2 * 1024 * 1024,
        ..V3File::default()
    };
    assert_eq!(layout.data_offset(), 2_097_614);
    let file = layout.assemble(&[V3Rec::replace(3, 0, test_text(4096))]);
    let r = CowReader::from_storage(file).unwrap();
    assert_eq!(r.ops()[0].data_offset, 2_097_614);
}

#[test]
fn v3_sequence_example_merge_orders() {
    // §5.2.1 second example / §6.2: S=2, M=8, sequence [3,1].
    let layout = V3File {
        op_count_max: 8,
        sequence: vec![3, 1],
        ..V3File::default()
    };
    assert_eq!(layout.data_offset(), 278);
    let file = layout.assemble(&[
        V3Rec::copy(1, 3),
        V3Rec::copy(3, 7),
        V3Rec::zero(9),
        V3Rec::replace(4, 0, test_text(4096)),
        V3Rec::zero(2),
    ]);
    let r = CowReader::from_storage(file).unwrap();
    assert_eq!(r.sequence(), &[3, 1]);
    assert_eq!(r.ops()[3].data_offset, 278);
    let snapuserd: Vec<u64> = blocks(r.merge_order(ASC).map(|o| o.new_block));
    assert_eq!(snapuserd, vec![3, 1, 2, 4, 9]);
    let default: Vec<u64> = blocks(r.merge_order(DESC).map(|o| o.new_block));
    assert_eq!(default, vec![3, 1, 9, 4, 2]);
    assert_eq!(r.num_ordered_ops_to_merge(), 2);
}

#[test]
fn v3_resume_point_count_above_max() {
    // §5.2.4: after 6 labels count=6 and the buffer holds 30,40,50,60.
    let recs: Vec<V3Rec> = (0..6).map(V3Rec::zero).collect();
    let file = V3File {
        resume_points: vec![(30, 3), (40, 4), (50, 5), (60, 6)],
        resume_point_count: Some(6),
        ..V3File::default()
    }
    .assemble(&recs);
    let r = CowReader::from_storage(file.clone()).unwrap();
    assert_eq!(r.resume_points().len(), 4);
    assert_eq!(
        CowReader::from_storage_at_label(file.clone(), 60)
            .unwrap()
            .ops()
            .len(),
        6
    );
    assert_eq!(
        CowReader::from_storage_at_label(file.clone(), 30)
            .unwrap()
            .ops()
            .len(),
        3
    );
    assert!(
        CowReader::from_storage_at_label(file.clone(), 10).is_err(),
        "evicted label"
    );
    // AOSP would read op records as resume points here; we do not.
    assert!(CowReader::from_storage_at_label(file, 1u64 << 32).is_err());
}

#[test]
fn v3_multi_block_replace_with_each_compression() {
    // §7.3: 7 blocks with F=16K become ops of 4, 2 and 1 blocks.
    let data = {
        let mut d = Vec::new();
        for i in 0..7u8 {
            let mut b = test_text(4096);
            b[100] = i;
            b[4000] = i.wrapping_mul(7);
            d.extend_from_slice(&b);
        }
        d
    };
    for alg in CompressionAlgorithm::ALL {
        let mut recs = Vec::new();
        let mut at = 0usize;
        for (blocks_n, k) in [(4usize, 2u8), (2, 1), (1, 0)] {
            let chunk = &data[at * 4096..(at + blocks_n) * 4096];
            let mut payload = Vec::new();
            cow_format::compression::compress(alg, None, chunk, &mut payload).unwrap();
            if payload.len() >= chunk.len() {
                payload = chunk.to_vec();
            }
            recs.push(V3Rec::replace(10 + at as u32, k, payload));
            at += blocks_n;
        }
        let file = V3File {
            compression: u32::from(alg.id()),
            compression_factor: 16384,
            ..V3File::default()
        }
        .assemble(&recs);
        let r = CowReader::from_storage(file).unwrap();
        let nb: Vec<u64> = r.ops().iter().map(|o| o.num_blocks).collect();
        assert_eq!(nb, vec![4, 2, 1]);
        assert_eq!(r.ops()[0].stored_raw, alg == CompressionAlgorithm::None);
        let src = source_image(4, 4096);
        let mut out = vec![0u8; 4096];
        for b in 0..7u64 {
            r.read_block(10 + b, &src, &mut out).unwrap();
            assert_eq!(
                out,
                data[b as usize * 4096..(b as usize + 1) * 4096],
                "{alg} block {b}"
            );
        }
        // Merge order has one entry per op, keyed by its first block.
        let order: Vec<u64> = blocks(r.merge_order(ASC).map(|o| o.new_block));
        assert_eq!(order, vec![10, 14, 16]);
    }
}

#[test]
fn v3_rejects_bad_shift_and_replace_source() {
    let base = V3File {
        compression_factor: 8192,
        ..V3File::default()
    };
    // k=2 (16K) exceeds a factor of 8K.
    let file = base.assemble(&[V3Rec::replace(0, 2, vec![0u8; 16384])]);
    assert!(CowReader::from_storage(file).is_err());
    // REPLACE source not equal to the running data offset.
    let mut file = base.assemble(&[V3Rec::replace(0, 0, vec![1u8; 4096])]);
    let rec = 78 + 64 + 8;
    let bumped = u64::from_le_bytes(file[rec..rec + 8].try_into().unwrap()) + 1;
    file[rec..rec + 8].copy_from_slice(&bumped.to_le_bytes());
    assert!(matches!(
        CowReader::from_storage(file),
        Err(ReadError::BadOp { index: 0, .. })
    ));
    // k = 7 is never valid.
    let mut file = base.assemble(&[V3Rec::replace(0, 0, vec![1u8; 4096])]);
    let info = u64::from_le_bytes(file[rec..rec + 8].try_into().unwrap()) | (7 << 57);
    file[rec..rec + 8].copy_from_slice(&info.to_le_bytes());
    assert!(CowReader::from_storage(file).is_err());
}

#[test]
fn duplicate_blocks_merge_as_the_first_op() {
    // §6.2 quirk: ZERO(7), REPLACE(7), COPY(3←9), COPY(3←10) merge as
    // ZERO, ZERO, COPY←9, COPY←9 (v3, no sequence: file order).
    let file = V3File::default().assemble(&[
        V3Rec::zero(7),
        V3Rec::replace(7, 0, test_text(4096)),
        V3Rec::copy(3, 9),
        V3Rec::copy(3, 10),
    ]);
    let r = CowReader::from_storage(file).unwrap();
    let merged: Vec<(OpKind, u64)> = r.merge_order(ASC).map(|o| (o.kind, o.source)).collect();
    assert_eq!(
        merged,
        vec![
            (OpKind::Zero, 0),
            (OpKind::Zero, 0),
            (OpKind::Copy, 9),
            (OpKind::Copy, 9)
        ]
    );
    // Block reads agree with the merge: the first op wins.
    let src = source_image(16, 4096);
    let mut out = vec![1u8; 4096];
    r.read_block(7, &src, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0));
    r.read_block(3, &src, &mut out).unwrap();
    assert_eq!(out, src[9 * 4096..10 * 4096]);
}

#[test]
fn rev_merge_op_itr_example() {
    // §6.2 RevMergeOpItrTest: sequence [2,10,6,7,3,5], others descending
    // [12,11,9,8,4,1], num_merge_ops=1 → reverse order 1,4,8,9,11,12,5,3,7,6,10.
    let mut recs = vec![V2Rec::sequence(&[2, 10, 6, 7, 3, 5])];
    for b in 1..=12u64 {
        if [2, 10, 6, 7, 3, 5].contains(&b) {
            recs.push(V2Rec::copy(b, b + 100));
        } else {
            recs.push(V2Rec::replace(b, 0, test_text(4096)));
        }
    }
    let file = V2File {
        num_merge_ops: 1,
        cluster_ops: 4,
        ..V2File::default()
    }
    .assemble(&recs);
    let r = CowReader::from_storage(file).unwrap();
    let rev: Vec<u64> = blocks(
        r.merge_order(MergeOrderOptions {
            other_ops: OtherOpsOrder::Descending,
            skip_merged: true,
        })
        .rev()
        .map(|o| o.new_block),
    );
    assert_eq!(rev, vec![1, 4, 8, 9, 11, 12, 5, 3, 7, 6, 10]);
    assert_eq!(r.num_ordered_ops_to_merge(), 5);
    assert_eq!(r.num_total_data_ops(), 12);
}

#[test]
fn missing_sequence_op_is_rejected() {
    for v3 in [false, true] {
        let res = if v3 {
            CowReader::from_storage(
                V3File {
                    sequence: vec![1, 99],
                    ..V3File::default()
                }
                .assemble(&[V3Rec::copy(1, 3)]),
            )
        } else {
            CowReader::from_storage(
                V2File::default().assemble(&[V2Rec::sequence(&[1, 99]), V2Rec::copy(1, 3)]),
            )
        };
        assert!(
            matches!(
                res,
                Err(ReadError::SequenceWithoutOp {
                    entry: 1,
                    block: 99
                })
            ),
            "v3={v3}: {res:?}"
        );
    }
}

#[test]
fn v2_stored_raw_rules() {
    let text = test_text(4096);
    // gz payload exactly block_size long (compressed stream padded with
    // trailing bytes): must still be inflated (§7.2, §11.2).
    let mut gz = Vec::new();
    cow_format::compression::compress(CompressionAlgorithm::Gz, None, &text, &mut gz).unwrap();
    gz.resize(4096, 0xEE);
    // lz4 with data_length == block_size: raw.
    let raw_block = pseudo_random(9, 4096);
    let file = V2File::default().assemble(&[
        V2Rec::replace(0, 1, gz),
        V2Rec::replace(1, 1, {
            let mut c = Vec::new();
            cow_format::compression::compress(CompressionAlgorithm::Gz, None, &raw_block, &mut c)
                .unwrap();
            c
        }),
    ]);
    let r = CowReader::from_storage(file).unwrap();
    assert_eq!(r.compression(), CompressionAlgorithm::Gz);
    assert!(!r.ops()[0].stored_raw);
    let mut out = vec![0u8; 4096];
    r.read_block(0, &Vec::<u8>::new(), &mut out).unwrap();
    assert_eq!(out, text);
    r.read_block(1, &Vec::<u8>::new(), &mut out).unwrap();
    assert_eq!(out, raw_block);

    let mut lz = Vec::new();
    cow_format::compression::compress(CompressionAlgorithm::Lz4, None, &text, &mut lz).unwrap();
    let file = V2File::default().assemble(&[
        V2Rec::replace(0, 3, raw_block.clone()),
        V2Rec::replace(1, 3, lz),
    ]);
    let r = CowReader::from_storage(file).unwrap();
    assert!(r.ops()[0].stored_raw && !r.ops()[1].stored_raw);
    r.read_block(0, &Vec::<u8>::new(), &mut out).unwrap();
    assert_eq!(out, raw_block);
    r.read_block(1, &Vec::<u8>::new(), &mut out).unwrap();
    assert_eq!(out, text);

    // Mixed compression bytes are rejected.
    let file = V2File::default().assemble(&[
        V2Rec::replace(0, 3, raw_block.clone()),
        V2Rec::replace(1, 4, raw_block),
    ]);
    assert!(matches!(
        CowReader::from_storage(file),
        Err(ReadError::MixedCompression {
            first: 3,
            found: 4,
            ..
        })
    ));
}

#[test]
fn v2_unclustered_v1_and_long_header() {
    let text = test_text(4096);
    let recs = [
        V2Rec::copy(0, 1),
        V2Rec::replace(1, 0, text.clone()),
        V2Rec::xor(2, 0, text.clone(), 4096 + 7),
        V2Rec::label(5),
        V2Rec::zero(3),
    ];
    let src = source_image(8, 4096);
    for params in [
        V2File {
            cluster_ops: 0,
            ..V2File::default()
        },
        V2File {
            major: 1,
            header_size: 34,
            ..V2File::default()
        },
        V2File {
            header_size: 78,
            cluster_ops: 2,
            ..V2File::default()
        },
        V2File {
            buffer_size: 2 * 1024 * 1024,
            cluster_ops: 3,
            ..V2File::default()
        },
    ] {
        let file = params.assemble(&recs);
        let r = CowReader::from_storage(file).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        assert_eq!(r.ops().len(), 4, "{params:?}");
        let mut out = vec![0u8; 4096];
        r.read_block(1, &src, &mut out).unwrap();
        assert_eq!(out, text);
        r.read_block(2, &src, &mut out).unwrap();
        let want: Vec<u8> = text
            .iter()
            .zip(&src[4103..4103 + 4096])
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(out, want, "{params:?}");
        assert_eq!(r.last_label(), Some(5));
    }
}

#[test]
fn v2_full_64_bit_labels() {
    let label = (1u64 << 48) + 5;
    let file = V2File {
        footer: false,
        ..V2File::default()
    }
    .assemble(&[V2Rec::zero(1), V2Rec::label(label), V2Rec::zero(2)]);
    assert!(CowReader::from_storage_at_label(file.clone(), 5).is_err());
    let r = CowReader::from_storage_at_label(file, label).unwrap();
    assert_eq!(r.last_label(), Some(label));
    assert_eq!(r.ops().len(), 1);
}

/// AOSP's v3 writer never writes unused op slots and only extends the file
/// with payloads, so a file with no ops ends after its resume buffer (or
/// scratch), and a file with only COPY/ZERO ops ends after its last record.
#[test]
fn v3_files_shorter_than_their_op_area_open_like_aosp() {
    // Empty: header + scratch, nothing else.
    let empty = V3File {
        buffer_size: 2 * 1024 * 1024,
        ..V3File::default()
    };
    let mut bytes = empty.assemble(&[]);
    bytes.truncate(78 + 2 * 1024 * 1024);
    let reader = CowReader::from_storage(bytes).expect("empty AOSP v3 file opens");
    assert_eq!(reader.ops().len(), 0);

    // COPY + ZERO only: the file ends right after op record 1.
    let no_payloads = V3File::default();
    let mut bytes = no_payloads.assemble(&[V3Rec::copy(0, 5), V3Rec::zero(1)]);
    let ops_end = 78 + 64 + 2 * 16;
    bytes.truncate(ops_end);
    let reader = CowReader::from_storage(bytes.clone()).expect("payload-free v3 file opens");
    assert_eq!(reader.ops().len(), 2);
    let source = common::source_image(8, 4096);
    let mut block = vec![0xAAu8; 4096];
    reader
        .read_block(1, &source, &mut block)
        .expect("zero block");
    assert!(block.iter().all(|&b| b == 0));
    reader
        .read_block(0, &source, &mut block)
        .expect("copy block");
    assert_eq!(&block[..], &source[5 * 4096..6 * 4096]);

    // Cutting into a committed op record is still an error.
    bytes.truncate(ops_end - 1);
    assert!(CowReader::from_storage(bytes).is_err());
}
