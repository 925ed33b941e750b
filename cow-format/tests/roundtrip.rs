//! Property tests: random op lists written with every version, compression
//! and (v3) compression factor, read back through the reader. The ops, the
//! merge sequence, the labels / resume points and every produced block must
//! match what was written.

use std::fs::File;

use cow_format::reader::CowReader;
use cow_format::writer::{CowWriter, WriterOptions};
use cow_format::{CowVersion, OpKind};
use proptest::prelude::*;

const BS: usize = 4096;
const SOURCE_BLOCKS: u64 = 48;

/// One call to the writer.
#[derive(Debug, Clone)]
enum Spec {
    Copy {
        old: u64,
        n: u64,
    },
    Replace {
        n: u64,
        seed: u64,
        compressible: bool,
    },
    Zero {
        n: u64,
    },
    Xor {
        n: u64,
        seed: u64,
        src_off: u64,
    },
    Label(u64),
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (0..SOURCE_BLOCKS - 4, 1..4u64).prop_map(|(old, n)| Spec::Copy { old, n }),
        (1..10u64, any::<u64>(), any::<bool>()).prop_map(|(n, seed, compressible)| {
            Spec::Replace {
                n,
                seed,
                compressible,
            }
        }),
        (1..4u64).prop_map(|n| Spec::Zero { n }),
        (1..3u64, any::<u64>(), 0..(SOURCE_BLOCKS - 3) * BS as u64)
            .prop_map(|(n, seed, src_off)| Spec::Xor { n, seed, src_off }),
        (0..20u64).prop_map(Spec::Label),
    ]
}

/// A case: specs with a gap (in blocks) before each, and whether to add a
/// merge sequence.
#[derive(Debug, Clone)]
struct Case {
    specs: Vec<(u64, Spec)>,
    with_sequence: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0..3u64, spec()), 0..14),
        any::<bool>(),
    )
        .prop_map(|(specs, with_sequence)| Case {
            specs,
            with_sequence,
        })
}

fn bytes(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if compressible && i % 8 != 0 {
                b"cowdata!"[i % 8]
            } else {
                x as u8
            }
        })
        .collect()
}

/// What one written data op should read back as (per block).
#[derive(Debug, Clone)]
struct Expected {
    kind: OpKind,
    new_block: u64,
    /// COPY: old block; XOR: source byte offset.
    source: u64,
    content: Vec<u8>,
}

fn option_sets() -> Vec<WriterOptions> {
    let mut sets = Vec::new();
    for comp in ["none", "gz,1", "brotli,1", "lz4", "zstd,1"] {
        for cluster_ops in [0u32, 2, 5, 1024] {
            sets.push(WriterOptions {
                compression: comp.parse().unwrap(),
                cluster_ops,
                scratch: cluster_ops == 5,
                ..WriterOptions::default()
            });
        }
        for factor in [4096u32, 8192, 16384, 32768, 65536, 131072, 262144] {
            sets.push(WriterOptions {
                version: CowVersion::V3,
                compression: comp.parse().unwrap(),
                compression_factor: factor,
                op_count_max: Some(200),
                scratch: factor == 8192,
                ..WriterOptions::default()
            });
        }
    }
    sets
}

/// v3 chunk sizes for n blocks at `max` blocks per op.
fn chunks(n: u64, max: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let fit = left.min(max);
        let c = 1u64 << (63 - fit.leading_zeros());
        out.push(c);
        left -= c;
    }
    out
}

fn check(case: &Case, opts: WriterOptions, source: &[u8]) -> Result<(), TestCaseError> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let mut w = CowWriter::create(tmp.reopen().unwrap(), opts).unwrap();
    let mut expected: Vec<Expected> = Vec::new();
    // (new_block, num_blocks) of each op record, in file order.
    let mut records: Vec<(OpKind, u64, u64)> = Vec::new();
    let mut labels: Vec<(u64, u64)> = Vec::new();
    let mut next_block = 0u64;
    let use_sequence =
        case.with_sequence && !(opts.version == CowVersion::V2 && opts.cluster_ops == 0);
    // The sequence lists the ordered ops' blocks, last first.
    if use_sequence {
        let mut seq = Vec::new();
        let mut b = 0u64;
        for (gap, s) in &case.specs {
            b += gap;
            match s {
                Spec::Copy { n, .. } | Spec::Xor { n, .. } => {
                    seq.extend((b..b + n).map(|x| x as u32));
                    b += n;
                }
                Spec::Replace { n, .. } | Spec::Zero { n } => b += n,
                Spec::Label(_) => {}
            }
        }
        seq.reverse();
        w.add_sequence(&seq).unwrap();
    }
    for (gap, s) in &case.specs {
        next_block += gap;
        let nb = next_block;
        match s {
            Spec::Copy { old, n } => {
                w.add_copy_range(nb, *old, *n).unwrap();
                for i in 0..*n {
                    let o = ((old + i) as usize) * BS;
                    expected.push(Expected {
                        kind: OpKind::Copy,
                        new_block: nb + i,
                        source: old + i,
                        content: source[o..o + BS].to_vec(),
                    });
                    records.push((OpKind::Copy, nb + i, 1));
                }
                next_block += n;
            }
            Spec::Replace {
                n,
                seed,
                compressible,
            } => {
                let data = bytes(*seed, *n as usize * BS, *compressible);
                w.add_replace(nb, &data).unwrap();
                for i in 0..*n as usize {
                    expected.push(Expected {
                        kind: OpKind::Replace,
                        new_block: nb + i as u64,
                        source: 0,
                        content: data[i * BS..(i + 1) * BS].to_vec(),
                    });
                }
                let max = match opts.version {
                    CowVersion::V2 => 1,
                    CowVersion::V3 => u64::from(opts.compression_factor) / BS as u64,
                };
                let mut b = nb;
                for c in chunks(*n, max) {
                    records.push((OpKind::Replace, b, c));
                    b += c;
                }
                next_block += n;
            }
            Spec::Zero { n } => {
                w.add_zero(nb, *n).unwrap();
                for i in 0..*n {
                    expected.push(Expected {
                        kind: OpKind::Zero,
                        new_block: nb + i,
                        source: 0,
                        content: vec![0; BS],
                    });
                    records.push((OpKind::Zero, nb + i, 1));
                }
                next_block += n;
            }
            Spec::Xor { n, seed, src_off } => {
                let want = bytes(*seed, *n as usize * BS, true);
                let off = *src_off as usize;
                let xor: Vec<u8> = want
                    .iter()
                    .zip(&source[off..off + want.len()])
                    .map(|(a, b)| a ^ b)
                    .collect();
                w.add_xor(nb, &xor, *src_off).unwrap();
                for i in 0..*n {
                    expected.push(Expected {
                        kind: OpKind::Xor,
                        new_block: nb + i,
                        source: src_off + i * BS as u64,
                        content: want[i as usize * BS..(i as usize + 1) * BS].to_vec(),
                    });
                    records.push((OpKind::Xor, nb + i, 1));
                }
                next_block += n;
            }
            Spec::Label(l) => {
                w.add_label(*l).unwrap();
                labels.push((*l, records.len() as u64));
            }
        }
    }
    w.finalize().unwrap();

    let reader = CowReader::open(File::open(tmp.path()).unwrap())
        .map_err(|e| TestCaseError::fail(format!("{opts:?}: open failed: {e}")))?;
    let ops = reader.ops();
    let got: Vec<(OpKind, u64, u64)> = ops
        .iter()
        .map(|o| (o.kind, o.new_block, o.num_blocks))
        .collect();
    prop_assert_eq!(&got, &records, "{:?}", opts);
    for e in &expected {
        let op = reader.find_op(e.new_block).unwrap();
        prop_assert_eq!(op.kind, e.kind);
        if matches!(e.kind, OpKind::Copy | OpKind::Xor) {
            prop_assert_eq!(op.source, e.source);
        }
        let mut out = vec![0u8; BS];
        reader
            .read_block(e.new_block, &source.to_vec(), &mut out)
            .map_err(|err| TestCaseError::fail(format!("{opts:?} block {}: {err}", e.new_block)))?;
        prop_assert!(
            out == e.content,
            "{:?}: block {} differs",
            opts,
            e.new_block
        );
    }
    if use_sequence {
        let seq: Vec<u64> = reader.sequence().to_vec();
        let mut want: Vec<u64> = expected
            .iter()
            .filter(|e| e.kind.is_ordered())
            .map(|e| e.new_block)
            .collect();
        want.reverse();
        prop_assert_eq!(seq, want);
    }
    // Labels: v2 remembers the last one; v3 keeps AOSP-pruned resume points.
    match opts.version {
        CowVersion::V2 => prop_assert_eq!(reader.last_label(), labels.last().map(|l| l.0)),
        CowVersion::V3 => {
            let mut model: Vec<(u64, u64)> = Vec::new();
            for &(l, at) in &labels {
                model.retain(|p| p.0 < l);
                model.push((l, at));
                if model.len() > 4 {
                    model.remove(0);
                }
            }
            let got: Vec<(u64, u64)> = reader
                .resume_points()
                .iter()
                .map(|p| (p.label, p.op_index))
                .collect();
            prop_assert_eq!(got, model);
        }
    }
    // Opening at the last label sees exactly the ops written before it.
    // (With a sequence, entries for later ops make that view invalid, as in
    // AOSP: "every sequence entry must have an op".)
    if let Some(&(l, at)) = labels.last().filter(|_| !use_sequence) {
        let r = CowReader::open_at_label(File::open(tmp.path()).unwrap(), l)
            .map_err(|e| TestCaseError::fail(format!("{opts:?}: open at label {l}: {e}")))?;
        // For v2 the first LABEL with that value ends the read.
        let first_at = labels.iter().find(|p| p.0 == l).map(|p| p.1).unwrap_or(at);
        let want_ops = match opts.version {
            CowVersion::V2 => first_at,
            CowVersion::V3 => at,
        };
        prop_assert_eq!(r.ops().len() as u64, want_ops, "{:?}", opts);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    })]

    #[test]
    fn written_files_read_back(case in case()) {
        let source = bytes(0xC0FFEE, SOURCE_BLOCKS as usize * BS, false);
        for opts in option_sets() {
            check(&case, opts, &source)?;
        }
    }
}

/// Write up to label 2 and some ops after it, then "crash" (drop without
/// finalize). The reader recovers the labels; appending at label 1 discards
/// everything after it and continues.
fn torn_then_append(opts: WriterOptions, with_sequence: bool) -> Result<(), String> {
    let source = bytes(0xC0FFEE, SOURCE_BLOCKS as usize * BS, false);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let mut w = CowWriter::create(tmp.reopen().unwrap(), opts).unwrap();
    if with_sequence {
        w.add_sequence(&[2, 1, 0, 60]).unwrap();
    }
    let a = bytes(11, 5 * BS, true);
    w.add_copy_range(0, 10, 3).unwrap();
    w.add_replace(3, &a).unwrap();
    w.add_label(1).unwrap();
    let ops_at_1 = CowReader::open_at_label(File::open(tmp.path()).unwrap(), 1)
        .map(|r| r.ops().len())
        .ok();
    w.add_zero(20, 4).unwrap();
    w.add_xor(30, &bytes(12, 2 * BS, true), 7).unwrap();
    w.add_label(2).unwrap();
    w.add_replace(40, &bytes(13, 3 * BS, false)).unwrap();
    drop(w);

    if !with_sequence {
        let at1 = ops_at_1.ok_or("open at label 1 failed")?;
        let r = CowReader::open_at_label(File::open(tmp.path()).unwrap(), 2)
            .map_err(|e| format!("open at label 2: {e}"))?;
        if r.ops().len() != at1 + 6 {
            return Err(format!(
                "label 2 sees {} ops, want {}",
                r.ops().len(),
                at1 + 6
            ));
        }
        if opts.version == CowVersion::V2
            && CowReader::open(File::open(tmp.path()).unwrap()).is_ok()
        {
            return Err("a v2 file without footer opened without a label".into());
        }
    }

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path())
        .unwrap();
    let mut append_opts = opts;
    if opts.version == CowVersion::V3 {
        append_opts.op_count_max = None;
    }
    let mut w = CowWriter::open_for_append(file, append_opts, 1).map_err(|e| e.to_string())?;
    // The blocks before the label are still claimed.
    if !matches!(
        w.add_zero(4, 1),
        Err(cow_format::WriteError::DuplicateBlock { new_block: 4 })
    ) {
        return Err("block 4 not known as written after append".into());
    }
    let c = bytes(14, 2 * BS, true);
    w.add_replace(50, &c).unwrap();
    w.add_copy(60, 11).unwrap();
    w.add_zero(20, 1).unwrap();
    w.add_label(3).unwrap();
    w.finalize().map_err(|e| e.to_string())?;

    let r = CowReader::open(File::open(tmp.path()).unwrap()).map_err(|e| format!("open: {e}"))?;
    let mut want: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..3 {
        let o = (10 + i) * BS;
        want.push((i as u64, source[o..o + BS].to_vec()));
    }
    for i in 0..5 {
        want.push((3 + i as u64, a[i * BS..(i + 1) * BS].to_vec()));
    }
    for i in 0..2 {
        want.push((50 + i as u64, c[i * BS..(i + 1) * BS].to_vec()));
    }
    want.push((60, source[11 * BS..12 * BS].to_vec()));
    want.push((20, vec![0; BS]));
    let mut out = vec![0u8; BS];
    for (block, content) in &want {
        r.read_block(*block, &source, &mut out)
            .map_err(|e| format!("block {block}: {e}"))?;
        if &out != content {
            return Err(format!("block {block} differs after append"));
        }
    }
    for gone in [21u64, 30, 31, 40] {
        if r.find_op(gone).is_some() {
            return Err(format!(
                "block {gone} written after label 1 survived the append"
            ));
        }
    }
    if with_sequence && r.sequence() != [2, 1, 0, 60] {
        return Err(format!("sequence {:?}", r.sequence()));
    }
    Ok(())
}

#[test]
fn torn_files_recover_and_append_continues() {
    for opts in option_sets() {
        for with_sequence in [false, true] {
            if with_sequence && opts.version == CowVersion::V2 && opts.cluster_ops == 0 {
                continue;
            }
            if let Err(e) = torn_then_append(opts, with_sequence) {
                panic!("{opts:?} sequence={with_sequence}: {e}");
            }
        }
    }
}
