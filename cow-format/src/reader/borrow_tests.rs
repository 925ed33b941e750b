//! Tests of the borrowing payload path ([`CowReader::with_op_payload`],
//! [`CowStorage::visit_at`]): the same bytes from every storage, re-entrancy, and the
//! SIGBUS guard covering a decompression that reads straight from the mapping.

use std::fs::File;
use std::io::Write;

use super::*;
use crate::compression::Compression;
use crate::writer::{CowWriter, WriterOptions};

const BS: usize = 4096;

/// Compressible, block-distinct text-like content.
fn image(blocks: usize) -> Vec<u8> {
    (0..blocks * BS)
        .map(|i| {
            let (b, o) = (i / BS, i % BS);
            b"the quick brown fox jumps over the lazy dog "[(o + b * 7) % 44] ^ (b as u8 & 0x3)
        })
        .collect()
}

/// A v3 lz4 COW of `data` (one REPLACE per block) in a temporary file.
fn cow_file(data: &[u8]) -> File {
    let file = tempfile::tempfile().unwrap();
    let opts = WriterOptions {
        version: CowVersion::V3,
        compression: Compression {
            algorithm: CompressionAlgorithm::Lz4,
            level: None,
        },
        compression_factor: 4096,
        op_count_max: Some((data.len() / BS) as u64 + 4),
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(file.try_clone().unwrap(), opts).unwrap();
    w.add_replace(0, data).unwrap();
    w.finalize().unwrap();
    file
}

fn file_bytes(file: &File) -> Vec<u8> {
    let len = CowStorage::size(file).unwrap();
    let mut bytes = vec![0u8; len as usize];
    SourceImage::read_exact_at(file, &mut bytes, 0).unwrap();
    bytes
}

#[test]
fn every_storage_lends_the_stored_payload() {
    let data = image(24);
    let file = cow_file(&data);
    let bytes = file_bytes(&file);
    let pread = CowReader::open(file.try_clone().unwrap()).unwrap();
    let mapped = CowReader::open_mapped(file).unwrap();
    let memory = CowReader::from_storage(bytes.clone()).unwrap();
    assert_eq!(pread.ops().len(), 24);
    let mut out = vec![0u8; BS];
    for op in pread.ops() {
        assert!(!op.stored_raw, "the test image must compress");
        let start = op.data_offset as usize;
        let want = &bytes[start..start + op.data_length as usize];
        for got in [
            pread.with_op_payload(op, <[u8]>::to_vec).unwrap(),
            mapped.with_op_payload(op, <[u8]>::to_vec).unwrap(),
            memory.with_op_payload(op, <[u8]>::to_vec).unwrap(),
        ] {
            assert_eq!(got, want, "op {}", op.index);
        }
        let block = op.new_block as usize;
        let want = &data[block * BS..(block + 1) * BS];
        out.fill(0xEE);
        pread.read_op_data(op, &mut out).unwrap();
        assert_eq!(out, want, "pread op {}", op.index);
        out.fill(0xEE);
        mapped.read_op_data(op, &mut out).unwrap();
        assert_eq!(out, want, "mapped op {}", op.index);
        out.fill(0xEE);
        memory.read_op_data(op, &mut out).unwrap();
        assert_eq!(out, want, "memory op {}", op.index);
    }
}

#[test]
fn a_payload_read_inside_another_gets_its_own_staging() {
    let data = image(4);
    let file = cow_file(&data);
    let pread = CowReader::open(file).unwrap();
    let (a, b) = (pread.ops()[0], pread.ops()[3]);
    let outer = pread
        .with_op_payload(&a, |pa| {
            // The pread path stages `a` in the per-thread buffer; `b` must not clobber it.
            let inner = pread.with_op_payload(&b, <[u8]>::to_vec).unwrap();
            let mut block = vec![0u8; BS];
            pread.read_op_data(&b, &mut block).unwrap();
            assert_eq!(block, data[3 * BS..4 * BS]);
            (pa.to_vec(), inner)
        })
        .unwrap();
    assert_eq!(outer.0, pread.with_op_payload(&a, <[u8]>::to_vec).unwrap());
    assert_eq!(outer.1, pread.with_op_payload(&b, <[u8]>::to_vec).unwrap());
    assert_ne!(outer.0, outer.1);
}

#[test]
fn ops_without_payload_and_payloads_past_the_end_are_errors() {
    let mut f = CowHeaderV2::new(4096, 0, 0).encode().to_vec();
    let copy = crate::layout::CowOpV2 {
        op_type: crate::layout::op_type::COPY,
        new_block: 1,
        source: 2,
        ..Default::default()
    };
    f.extend_from_slice(&copy.encode());
    f.extend_from_slice(&CowFooterV2::new(1).unwrap().encode());
    let r = CowReader::from_storage(f.clone()).unwrap();
    let op = r.ops()[0];
    let mut called = false;
    assert!(matches!(
        r.with_op_payload(&op, |_| called = true),
        Err(ReadError::BadOp { .. })
    ));
    assert!(!called);

    // In-memory storage refuses ranges past its end without calling the visitor.
    let mut staging = Vec::new();
    let mut seen = 0usize;
    let e = f
        .visit_at(f.len() as u64 - 2, 4, &mut staging, &mut |b| {
            seen += b.len()
        })
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(f
        .visit_at(u64::MAX, 1, &mut staging, &mut |_| seen += 1)
        .is_err());
    assert_eq!(seen, 0);
    f.visit_at(2, 3, &mut staging, &mut |b| seen += b.len())
        .unwrap();
    assert_eq!(seen, 3);
}

/// The guard must cover a decoder reading the mapping in place: after the file shrinks,
/// the decoder runs on zero pages and its result is thrown away for an I/O error.
#[test]
fn decoding_from_a_shrunk_mapping_is_an_error() {
    let data = image(64);
    let file = cow_file(&data);
    let mapped = CowReader::open_mapped(file.try_clone().unwrap()).unwrap();
    let last = *mapped.ops().last().unwrap();
    let mut out = vec![0u8; BS];
    mapped.read_op_data(&last, &mut out).unwrap();
    assert_eq!(out, data[63 * BS..]);
    // Keep the header page; the last payload now lies wholly past the end of the file.
    assert!(last.data_offset > 2 * BS as u64);
    file.set_len(BS as u64).unwrap();

    let mut saw_zeros = None;
    let e = mapped
        .with_op_payload(&last, |p| saw_zeros = Some(p.iter().all(|&b| b == 0)))
        .unwrap_err();
    assert!(matches!(e, ReadError::Io { .. }), "{e}");
    assert_eq!(saw_zeros, Some(true), "the visitor ran on the zero page");
    let e = mapped.read_op_data(&last, &mut out).unwrap_err();
    assert!(matches!(e, ReadError::Io { .. }), "{e}");
    // Once faulted, the mapping refuses every payload, even ones still backed.
    let first = mapped.ops()[0];
    assert!(mapped.read_op_data(&first, &mut out).is_err());
}

#[test]
fn mapped_file_lends_the_same_bytes_it_copies() {
    let mut f = tempfile::tempfile().unwrap();
    let bytes: Vec<u8> = (0..3 * BS).map(|i| (i % 251) as u8).collect();
    f.write_all(&bytes).unwrap();
    let m = MappedFile::new(f).unwrap();
    let mut staging = Vec::new();
    let mut got = Vec::new();
    m.visit_at(BS as u64 - 5, 100, &mut staging, &mut |b| got = b.to_vec())
        .unwrap();
    assert_eq!(got, bytes[BS - 5..BS + 95]);
    assert!(staging.is_empty(), "the mapping lends in place");
    let mut calls = 0;
    assert!(m
        .visit_at(3 * BS as u64 - 1, 2, &mut staging, &mut |_| calls += 1)
        .is_err());
    assert_eq!(calls, 0);
    m.visit_at(3 * BS as u64, 0, &mut staging, &mut |b| {
        calls += b.len() + 1
    })
    .unwrap();
    assert_eq!(calls, 1);
}
