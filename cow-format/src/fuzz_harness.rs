//! The body of the `cow_parse` fuzz target, kept in the library so that a
//! normal `cargo test` can run it over a seed corpus and deterministic
//! mutations. Not part of the public API.

use crate::reader::{CowReader, MergeOrderOptions, OtherOpsOrder};

/// Most block reads per input, so one input cannot take unbounded time.
const MAX_BLOCK_READS: usize = 512;
/// Blocks in the synthetic source image.
const SOURCE_BLOCKS: u64 = 64;
/// Repeating content of the source image (prime length, so blocks differ).
const PATTERN: [u8; 251] = {
    let mut p = [0u8; 251];
    let mut i = 0;
    while i < 251 {
        p[i] = (i as u8).wrapping_mul(17).wrapping_add(3);
        i += 1;
    }
    p
};

/// Open `data` as a COW file (complete, and at each label it mentions), walk
/// its ops in file and merge order, and read blocks against a small source
/// image. Any outcome other than a panic, hang or abort is acceptable.
pub fn run(data: &[u8]) {
    let Ok(reader) = CowReader::from_storage(data) else {
        // Still exercise label recovery on files without a footer.
        for label in [0u64, 1, 2, 3] {
            if let Ok(r) = CowReader::from_storage_at_label(data, label) {
                exercise(&r);
            }
        }
        return;
    };
    exercise(&reader);
    let mut labels: Vec<u64> = reader.resume_points().iter().map(|p| p.label).collect();
    labels.extend(reader.last_label());
    for label in labels {
        if let Ok(r) = CowReader::from_storage_at_label(data, label) {
            exercise(&r);
        }
    }
}

fn exercise(reader: &CowReader<&[u8]>) {
    let bs = u64::from(reader.block_size());
    let mut source = vec![0u8; (SOURCE_BLOCKS * bs) as usize];
    for chunk in source.chunks_mut(PATTERN.len()) {
        chunk.copy_from_slice(&PATTERN[..chunk.len()]);
    }
    for other_ops in [OtherOpsOrder::Ascending, OtherOpsOrder::Descending] {
        for skip_merged in [false, true] {
            let opts = MergeOrderOptions {
                other_ops,
                skip_merged,
            };
            let n = reader.merge_order(opts).count();
            let back = reader.merge_order(opts).rev().count();
            assert_eq!(n, back, "merge order length differs by direction");
            assert!(n as u64 <= reader.num_total_data_ops());
        }
    }
    let _ = reader.num_ordered_ops_to_merge();
    let mut out = vec![0u8; reader.block_size() as usize];
    let mut reads = 0usize;
    'ops: for op in reader.ops() {
        for i in 0..op.num_blocks {
            if reads >= MAX_BLOCK_READS {
                break 'ops;
            }
            reads += 1;
            let Some(block) = op.new_block.checked_add(i) else {
                continue;
            };
            let _ = reader.read_block(block, &source, &mut out);
        }
        if op.kind.has_payload() {
            let mut buf = vec![0u8; reader.payload_size(op) as usize];
            let _ = reader.read_op_data(op, &mut buf);
        }
    }
    // A block no op writes comes from the source image.
    let _ = reader.read_block(u64::from(u32::MAX) + 1, &source, &mut out);
}
