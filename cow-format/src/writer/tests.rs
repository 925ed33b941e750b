//! Behaviour of the writer that the golden and round-trip tests do not pin down.

use std::fs::File;
use std::io::Read;

use super::*;
use crate::layout::{CowHeaderV3, CowOpV2, ResumePoint};

fn contents(file: &File) -> Vec<u8> {
    let mut f = file.try_clone().unwrap();
    let mut v = Vec::new();
    std::io::Seek::rewind(&mut f).unwrap();
    f.read_to_end(&mut v).unwrap();
    v
}

fn v3(op_count_max: u64) -> WriterOptions {
    WriterOptions {
        version: CowVersion::V3,
        scratch: false,
        op_count_max: Some(op_count_max),
        ..WriterOptions::default()
    }
}

fn new_writer(opts: WriterOptions) -> (File, CowWriter) {
    let file = tempfile::tempfile().unwrap();
    let w = CowWriter::create(file.try_clone().unwrap(), opts).unwrap();
    (file, w)
}

fn header3(bytes: &[u8]) -> CowHeaderV3 {
    CowHeaderV3::decode(bytes[..78].try_into().unwrap())
}

fn resume_points(bytes: &[u8]) -> Vec<ResumePoint> {
    let h = header3(bytes);
    let off = h.regions().unwrap().resume_offset as usize;
    (0..h.resume_point_count as usize)
        .map(|i| ResumePoint::decode(bytes[off + 16 * i..off + 16 * i + 16].try_into().unwrap()))
        .collect()
}

#[test]
fn v3_resume_points_are_pruned_and_counted_honestly() {
    let (file, mut w) = new_writer(v3(100));
    for label in [10u64, 20, 30, 40, 50, 60] {
        w.add_zero(label, 1).unwrap();
        w.add_label(label).unwrap();
    }
    let bytes = contents(&file);
    assert_eq!(header3(&bytes).resume_point_count, 4);
    let labels: Vec<(u64, u64)> = resume_points(&bytes)
        .iter()
        .map(|p| (p.label, p.op_index))
        .collect();
    assert_eq!(labels, vec![(30, 3), (40, 4), (50, 5), (60, 6)]);
    // A smaller label drops every point with a label ≥ it.
    w.add_label(35).unwrap();
    let bytes = contents(&file);
    let labels: Vec<u64> = resume_points(&bytes).iter().map(|p| p.label).collect();
    assert_eq!(labels, vec![30, 35]);
    assert_eq!(header3(&bytes).op_count, 6);
    w.finalize().unwrap();
}

#[test]
fn v3_header_is_only_rewritten_at_commit_points() {
    let (file, mut w) = new_writer(v3(10));
    w.add_zero(0, 2).unwrap();
    assert_eq!(header3(&contents(&file)).op_count, 0);
    w.add_label(1).unwrap();
    assert_eq!(header3(&contents(&file)).op_count, 2);
    w.add_copy(5, 6).unwrap();
    let s = w.finalize().unwrap();
    assert_eq!(header3(&contents(&file)).op_count, 3);
    assert_eq!((s.op_records, s.data_ops, s.blocks), (3, 3, 3));
}

#[test]
fn v3_capacity_is_checked_before_writing() {
    let (file, mut w) = new_writer(WriterOptions {
        compression_factor: 8192,
        ..v3(3)
    });
    assert!(matches!(
        w.add_zero(0, 4),
        Err(WriteError::OpCapacityExceeded {
            op_count: 0,
            adding: 4,
            op_count_max: 3
        })
    ));
    // 3 blocks at 8K = 2 ops; then 2 more ops do not fit.
    w.add_replace(0, &[7u8; 3 * 4096]).unwrap();
    assert_eq!(w.op_records(), 2);
    assert!(matches!(
        w.add_replace(10, &[7u8; 3 * 4096]),
        Err(WriteError::OpCapacityExceeded { adding: 2, .. })
    ));
    // The writer is still usable and the failed calls left no trace.
    w.add_zero(9, 1).unwrap();
    w.finalize().unwrap();
    let bytes = contents(&file);
    let h = header3(&bytes);
    assert_eq!(h.op_count, 3);
    let data_off = h.regions().unwrap().data_offset as usize;
    assert_eq!(bytes.len(), data_off + 3 * 4096);
}

#[test]
fn sequence_rules() {
    let (_f, mut w) = new_writer(v3(10));
    w.add_zero(0, 1).unwrap();
    assert!(matches!(
        w.add_sequence(&[0]),
        Err(WriteError::SequenceOrder { .. })
    ));
    let (_f, mut w) = new_writer(v3(10));
    w.add_label(1).unwrap();
    assert!(w.add_sequence(&[0]).is_err());
    let (_f, mut w) = new_writer(v3(10));
    w.add_sequence(&[0]).unwrap();
    assert!(w.add_sequence(&[0]).is_err());
    let (_f, mut w) = new_writer(WriterOptions {
        cluster_ops: 0,
        ..WriterOptions::default()
    });
    assert!(matches!(
        w.add_sequence(&[1]),
        Err(WriteError::SequenceUnsupported { .. })
    ));
}

#[test]
fn v2_sequence_is_split_at_two_blocks_of_entries() {
    let (file, mut w) = new_writer(WriterOptions {
        scratch: false,
        cluster_ops: 4,
        ..WriterOptions::default()
    });
    let order: Vec<u32> = (0..2049).collect();
    w.add_sequence(&order).unwrap();
    w.add_zero(0, 2049).unwrap();
    w.finalize().unwrap();
    let bytes = contents(&file);
    let op = |off: usize| CowOpV2::decode(bytes[off..off + 20].try_into().unwrap());
    let first = op(38);
    assert_eq!((first.op_type, first.data_length), (7, 8192));
    assert_eq!(first.source, 38 + 80);
    let second = op(58);
    assert_eq!((second.op_type, second.data_length), (7, 4));
    assert_eq!(second.source, 38 + 80 + 8192);
    assert_eq!(
        &bytes[38 + 80 + 8192..38 + 80 + 8196],
        &2048u32.to_le_bytes()
    );
}

#[test]
fn v2_unclustered_places_payload_after_each_record() {
    let (file, mut w) = new_writer(WriterOptions {
        scratch: false,
        cluster_ops: 0,
        ..WriterOptions::default()
    });
    w.add_replace(3, &[9u8; 4096]).unwrap();
    w.add_copy(4, 1).unwrap();
    w.finalize().unwrap();
    let bytes = contents(&file);
    let op = |off: usize| CowOpV2::decode(bytes[off..off + 20].try_into().unwrap());
    assert_eq!(op(38).source, 58);
    assert!(bytes[58..58 + 4096].iter().all(|b| *b == 9));
    let copy = op(58 + 4096);
    assert_eq!((copy.op_type, copy.new_block, copy.source), (1, 4, 1));
    let footer = op(78 + 4096);
    assert_eq!((footer.op_type, footer.source), (255, 2));
    assert_eq!(bytes.len(), 78 + 4096 + 84);
}

#[test]
fn v2_label_makes_the_cluster_so_far_durable() {
    let (file, mut w) = new_writer(WriterOptions {
        scratch: false,
        ..WriterOptions::default()
    });
    w.add_replace(1, &[5u8; 4096]).unwrap();
    w.add_label(77).unwrap();
    let bytes = contents(&file);
    let label = CowOpV2::decode(bytes[58..78].try_into().unwrap());
    assert_eq!((label.op_type, label.source), (4, 77));
    let data = 38 + 1024 * 20;
    assert!(bytes[data..data + 4096].iter().all(|b| *b == 5));
    drop(w);
}

#[test]
fn range_checks() {
    let (_f, mut w) = new_writer(WriterOptions::default());
    assert!(matches!(
        w.add_zero(u64::from(u32::MAX), 2),
        Err(WriteError::BlockOutOfRange { .. })
    ));
    assert!(matches!(
        w.add_copy(0, 1 << 48),
        Err(WriteError::SourceOutOfRange { .. })
    ));
    assert!(matches!(
        w.add_replace(0, &[0u8; 10]),
        Err(WriteError::DataLength { .. })
    ));
    w.add_copy(u64::from(u32::MAX), (1 << 48) - 1).unwrap();
    w.finalize().unwrap();
}

#[test]
fn prepared_ops_must_match_the_writer_options() {
    let (_f, mut w) = new_writer(WriterOptions::default());
    let other = WriterOptions {
        compression: "lz4".parse().unwrap(),
        ..WriterOptions::default()
    };
    let p = prepare_replace(&other, 0, &[1u8; 4096]).unwrap();
    assert!(matches!(
        w.add_prepared(p),
        Err(WriteError::PreparedMismatch { new_block: 0 })
    ));
}

#[test]
fn parallel_preparation_gives_identical_files() {
    for opts in [
        WriterOptions {
            compression: "zstd".parse().unwrap(),
            ..WriterOptions::default()
        },
        WriterOptions {
            compression: "lz4".parse().unwrap(),
            compression_factor: 16384,
            ..v3(1000)
        },
    ] {
        let chunks: Vec<Vec<u8>> = (0..16u8)
            .map(|i| (0..5 * 4096).map(|j| (j as u8 / 7) ^ i).collect())
            .collect();
        let (f1, mut w1) = new_writer(opts);
        for (i, c) in chunks.iter().enumerate() {
            w1.add_replace(i as u64 * 5, c).unwrap();
            w1.add_xor(200 + i as u64 * 5, c, 4096 * i as u64 + 3)
                .unwrap();
        }
        w1.finalize().unwrap();

        let prepared: Vec<(PreparedOp, PreparedOp)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    s.spawn(move || {
                        (
                            prepare_replace(&opts, i as u64 * 5, c).unwrap(),
                            prepare_xor(&opts, 200 + i as u64 * 5, c, 4096 * i as u64 + 3).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (f2, mut w2) = new_writer(opts);
        for (r, x) in prepared {
            w2.add_prepared(r).unwrap();
            w2.add_prepared(x).unwrap();
        }
        w2.finalize().unwrap();
        assert_eq!(contents(&f1), contents(&f2));
    }
}

#[test]
fn one_op_per_block_unless_allowed() {
    let (_f, mut w) = new_writer(WriterOptions {
        compression_factor: 16384,
        ..v3(100)
    });
    w.add_replace(10, &[1u8; 4 * 4096]).unwrap();
    assert!(matches!(
        w.add_zero(8, 3),
        Err(WriteError::DuplicateBlock { new_block: 10 })
    ));
    assert!(matches!(
        w.add_copy(13, 0),
        Err(WriteError::DuplicateBlock { new_block: 13 })
    ));
    assert!(matches!(
        w.add_xor(12, &[0u8; 4096], 0),
        Err(WriteError::DuplicateBlock { new_block: 12 })
    ));
    // Nothing was written by the refused calls.
    assert_eq!(w.op_records(), 1);
    w.add_zero(8, 2).unwrap();
    w.add_copy(14, 0).unwrap();
    w.finalize().unwrap();

    // AOSP's duplicate example (fact sheet §6.2) can still be written on purpose.
    let (_f, mut w) = new_writer(WriterOptions {
        allow_duplicate_blocks: true,
        ..v3(100)
    });
    w.add_zero(7, 1).unwrap();
    w.add_replace(7, &[1u8; 4096]).unwrap();
    w.add_copy(3, 9).unwrap();
    w.add_copy(3, 10).unwrap();
    assert_eq!(w.finalize().unwrap().data_ops, 4);
}

#[test]
fn sequence_entries_need_an_op_by_finalize() {
    let (_f, mut w) = new_writer(v3(10));
    w.add_sequence(&[3, 1]).unwrap();
    w.add_copy(1, 3).unwrap();
    assert!(matches!(
        w.finalize(),
        Err(WriteError::SequenceWithoutOp { block: 3 })
    ));
}

fn labelled_file(opts: WriterOptions) -> Vec<u8> {
    let (file, mut w) = new_writer(opts);
    w.add_sequence(&[1, 0]).unwrap();
    w.add_copy(0, 4).unwrap();
    w.add_replace(5, &[3u8; 3 * 4096]).unwrap();
    w.add_label(7).unwrap();
    w.add_copy(1, 9).unwrap();
    w.add_xor(9, &[1u8; 4096], 100).unwrap();
    w.add_label(8).unwrap();
    w.finalize().unwrap();
    contents(&file)
}

fn append_to(bytes: &[u8], opts: WriterOptions, label: u64) -> Result<CowWriter, WriteError> {
    let mut f = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    CowWriter::open_for_append(f, opts, label)
}

#[test]
fn append_refuses_mismatched_options_and_unknown_labels() {
    let v2 = WriterOptions {
        cluster_ops: 4,
        compression: "lz4".parse().unwrap(),
        ..WriterOptions::default()
    };
    let bytes = labelled_file(v2);
    append_to(&bytes, v2, 7).unwrap();
    append_to(&bytes, v2, 8).unwrap();
    assert!(matches!(
        append_to(&bytes, v2, 9),
        Err(WriteError::AppendLabelNotFound { label: 9 })
    ));
    for other in [
        WriterOptions {
            cluster_ops: 5,
            ..v2
        },
        WriterOptions {
            scratch: false,
            ..v2
        },
        WriterOptions {
            compression: "zstd".parse().unwrap(),
            ..v2
        },
    ] {
        assert!(
            matches!(
                append_to(&bytes, other, 7),
                Err(WriteError::NotAppendable { .. })
            ),
            "{other:?}"
        );
    }
    let v3o = WriterOptions {
        compression: "zstd".parse().unwrap(),
        compression_factor: 8192,
        ..v3(20)
    };
    let bytes = labelled_file(v3o);
    append_to(
        &bytes,
        WriterOptions {
            op_count_max: None,
            ..v3o
        },
        7,
    )
    .unwrap();
    assert!(matches!(
        append_to(&bytes, v3o, 1),
        Err(WriteError::AppendLabelNotFound { label: 1 })
    ));
    for other in [
        WriterOptions {
            op_count_max: Some(21),
            ..v3o
        },
        WriterOptions {
            compression_factor: 16384,
            ..v3o
        },
        WriterOptions {
            compression: "lz4".parse().unwrap(),
            ..v3o
        },
    ] {
        assert!(
            matches!(
                append_to(&bytes, other, 7),
                Err(WriteError::NotAppendable { .. })
            ),
            "{other:?}"
        );
    }
    // A v2 file is not appendable as v3 and vice versa.
    assert!(append_to(&labelled_file(v2), v3o, 7).is_err());
    assert!(append_to(&bytes, v2, 7).is_err());
}

#[test]
fn append_survives_truncated_and_corrupted_files() {
    let sets = [
        WriterOptions {
            cluster_ops: 4,
            scratch: false,
            ..WriterOptions::default()
        },
        WriterOptions {
            cluster_ops: 0,
            scratch: false,
            ..WriterOptions::default()
        },
        WriterOptions {
            compression_factor: 8192,
            ..v3(12)
        },
    ];
    for o in sets {
        if o.version == CowVersion::V2 && o.cluster_ops == 0 {
            // No sequence without clusters: build the file by hand.
            let (file, mut w) = new_writer(o);
            w.add_copy(0, 4).unwrap();
            w.add_label(7).unwrap();
            w.add_replace(5, &[3u8; 4096]).unwrap();
            w.finalize().unwrap();
            let bytes = contents(&file);
            for len in 0..bytes.len() {
                let _ = append_to(&bytes[..len], o, 7);
            }
            continue;
        }
        let bytes = labelled_file(o);
        // Every truncation: an error or a usable writer, never a panic.
        for len in 0..bytes.len() {
            if let Ok(w) = append_to(&bytes[..len], o, 7) {
                drop(w);
            }
        }
        // Bit flips in the header and metadata.
        let meta_end = bytes.len().min(400);
        for i in 0..meta_end {
            for bit in [0u8, 3, 7] {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(mut w) = append_to(&b, o, 7) {
                    let _ = w.add_zero(30, 1);
                    let _ = w.finalize();
                }
            }
        }
    }
}
