//! End-to-end tests of the `ota-tools` binary on COW files written by
//! `cow_format`'s writer.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cow_format::writer::{CowWriter, WriterOptions};
use cow_format::CowVersion;

const BS: usize = 4096;
const SOURCE_BLOCKS: usize = 64;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ota-tools"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// `ota-tools apply --source SRC --cow COW --output OUT`.
fn apply(src: &Path, cow: &Path, out: &Path) -> Output {
    run(&[
        "apply",
        "--source",
        s(src),
        "--cow",
        s(cow),
        "--output",
        s(out),
    ])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic bytes: a mix of text-like (compressible) and noisy blocks.
fn block_bytes(seed: u64, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BS)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if compressible {
                b"snapuserd-rs "[(i + (x as usize % 3)) % 13]
            } else {
                x as u8
            }
        })
        .collect()
}

struct Scenario {
    source: Vec<u8>,
    target: Vec<u8>,
}

fn source_image() -> Vec<u8> {
    (0..SOURCE_BLOCKS as u64)
        .flat_map(|b| block_bytes(b + 1, b % 2 == 0))
        .collect()
}

/// Writes a COW (all op types) and returns what applying it must give.
fn write_cow(path: &Path, opts: WriterOptions) -> Scenario {
    let source = source_image();
    let mut target = source.clone();
    target.resize(72 * BS, 0);
    let file = fs::File::create(path).unwrap();
    let mut w = CowWriter::create(file, opts).unwrap();
    // COPY new 0..8 <- old 20..28
    w.add_copy_range(0, 20, 8).unwrap();
    for i in 0..8 {
        target.copy_within((20 + i) * BS..(21 + i) * BS, i * BS);
    }
    w.add_label(1).unwrap();
    // REPLACE 10..21 (11 blocks: multi-block chunks in v3)
    let replace: Vec<u8> = (0..11)
        .flat_map(|i| block_bytes(1000 + i, i % 3 != 2))
        .collect();
    w.add_replace(10, &replace).unwrap();
    target[10 * BS..21 * BS].copy_from_slice(&replace);
    // ZERO 30..33
    w.add_zero(30, 3).unwrap();
    target[30 * BS..33 * BS].fill(0);
    // XOR 40..44 against source bytes at block 50, offset 100
    let src_off = 50 * BS + 100;
    let wanted: Vec<u8> = (0..4).flat_map(|i| block_bytes(2000 + i, true)).collect();
    let xor: Vec<u8> = wanted
        .iter()
        .zip(&source[src_off..src_off + 4 * BS])
        .map(|(a, b)| a ^ b)
        .collect();
    w.add_xor(40, &xor, src_off as u64).unwrap();
    target[40 * BS..44 * BS].copy_from_slice(&wanted);
    // REPLACE past the end of the source: the image grows.
    let tail = block_bytes(3000, false);
    w.add_replace(71, &tail).unwrap();
    target[71 * BS..72 * BS].copy_from_slice(&tail);
    w.add_label(2).unwrap();
    w.finalize().unwrap();
    Scenario { source, target }
}

fn all_option_sets() -> Vec<(String, WriterOptions)> {
    let mut sets = Vec::new();
    for comp in ["none", "gz", "brotli", "lz4", "zstd"] {
        sets.push((
            format!("v2-{comp}"),
            WriterOptions {
                compression: comp.parse().unwrap(),
                cluster_ops: 4,
                ..WriterOptions::default()
            },
        ));
        for factor in [4096u32, 8192, 16384, 32768, 65536, 131072, 262144] {
            sets.push((
                format!("v3-{comp}-{factor}"),
                WriterOptions {
                    version: CowVersion::V3,
                    compression: comp.parse().unwrap(),
                    compression_factor: factor,
                    op_count_max: Some(64),
                    scratch: factor == 4096,
                    ..WriterOptions::default()
                },
            ));
        }
    }
    sets
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("src.img"), dir.join("x.cow"), dir.join("out.img"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn apply_reproduces_the_target_for_every_version_compression_and_factor() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    for (name, opts) in all_option_sets() {
        let sc = write_cow(&cow, opts);
        fs::write(&src, &sc.source).unwrap();
        let _ = fs::remove_file(&out);
        let o = apply(&src, &cow, &out);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got = fs::read(&out).unwrap();
        assert_eq!(got.len(), sc.target.len(), "{name}");
        assert!(got == sc.target, "{name}: output differs from target");
        assert_eq!(
            fs::read(&src).unwrap(),
            sc.source,
            "{name}: source modified"
        );
    }
}

#[test]
fn apply_over_an_existing_larger_image_and_with_size() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    let sc = write_cow(&cow, WriterOptions::default());
    fs::write(&src, &sc.source).unwrap();
    // Existing output with junk, larger than needed: it is overwritten and resized.
    fs::write(&out, vec![0xEEu8; 100 * BS]).unwrap();
    let o = apply(&src, &cow, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&out).unwrap() == sc.target);
    // --size larger: zero tail.
    let size = (80 * BS).to_string();
    let o = run(&[
        "apply",
        "--source",
        s(&src),
        "--cow",
        s(&cow),
        "--output",
        s(&out),
        "--size",
        &size,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), 80 * BS);
    assert!(got[..72 * BS] == sc.target[..]);
    assert!(got[72 * BS..].iter().all(|b| *b == 0));
    // --size smaller than the ops need: refused.
    let o = run(&[
        "apply",
        "--source",
        s(&src),
        "--cow",
        s(&cow),
        "--output",
        s(&out),
        "--size",
        "4096",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--size 4096 is smaller"),
        "{}",
        stderr(&o)
    );
    // A refused run does not create the output.
    let fresh = dir.path().join("fresh.img");
    let o = run(&[
        "apply",
        "--source",
        s(&src),
        "--cow",
        s(&cow),
        "--output",
        s(&fresh),
        "--size",
        "4096",
    ]);
    assert!(!o.status.success());
    assert!(!fresh.exists());
}

#[test]
fn apply_in_place_follows_the_merge_order() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, _) = paths(dir.path());
    // A COW whose ops never read what another op writes: in place == target.
    let opts = WriterOptions {
        version: CowVersion::V3,
        compression: "lz4".parse().unwrap(),
        op_count_max: Some(64),
        ..WriterOptions::default()
    };
    let sc = write_cow(&cow, opts);
    fs::write(&src, &sc.source).unwrap();
    let o = apply(&src, &cow, &src);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&src).unwrap() == sc.target);

    // Chain 2<-1, 1<-0. File order (1<-0 first) is a wrong merge order.
    let chain = |sequence: Option<&[u32]>| {
        let file = fs::File::create(&cow).unwrap();
        let mut w = CowWriter::create(file, opts).unwrap();
        if let Some(seq) = sequence {
            w.add_sequence(seq).unwrap();
        }
        w.add_copy(1, 0).unwrap();
        w.add_copy(2, 1).unwrap();
        w.finalize().unwrap();
    };
    let source = source_image();
    let mut expected = source.clone();
    expected.copy_within(BS..2 * BS, 2 * BS);
    expected.copy_within(0..BS, BS);

    chain(Some(&[2, 1]));
    fs::write(&src, &source).unwrap();
    let o = apply(&src, &cow, &src);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        fs::read(&src).unwrap() == expected,
        "valid order must match"
    );

    chain(None);
    fs::write(&src, &source).unwrap();
    let o = apply(&src, &cow, &src);
    assert!(o.status.success(), "{}", stderr(&o));
    let in_place = fs::read(&src).unwrap();
    assert!(
        in_place != expected,
        "a wrong merge order must show in place"
    );
    // Block 2 got the already-overwritten block 1, i.e. source block 0.
    assert!(in_place[2 * BS..3 * BS] == source[..BS]);
}

#[test]
fn inspect_text_and_json_v2_and_v3() {
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("x.cow");
    for (version, opts) in [
        (
            "2.0",
            WriterOptions {
                compression: "zstd".parse().unwrap(),
                num_merge_ops: 2,
                ..WriterOptions::default()
            },
        ),
        (
            "3.0",
            WriterOptions {
                version: CowVersion::V3,
                compression: "gz".parse().unwrap(),
                compression_factor: 16384,
                op_count_max: Some(64),
                num_merge_ops: 2,
                ..WriterOptions::default()
            },
        ),
    ] {
        write_cow(&cow, opts);
        let o = run(&["inspect", s(&cow)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        assert!(text.contains(&format!("version: {version}")), "{text}");
        assert!(text.contains("block_size: 4096"), "{text}");
        assert!(text.contains("num_merge_ops: 2"), "{text}");
        // One line per data op: 8 COPY, REPLACE chunks, 3 ZERO, 4 XOR, 1 REPLACE.
        let op_lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("ops ("))
            .skip(2)
            .collect();
        let copies = op_lines.iter().filter(|l| l.contains(" COPY ")).count();
        let xors = op_lines.iter().filter(|l| l.contains(" XOR ")).count();
        let zeros = op_lines.iter().filter(|l| l.contains(" ZERO ")).count();
        assert_eq!((copies, xors, zeros), (8, 4, 3), "{text}");

        let o = run(&["inspect", "--json", s(&cow)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["header"]["block_size"], 4096);
        assert_eq!(v["header"]["num_merge_ops"], 2);
        let ops = v["ops"].as_array().unwrap();
        assert_eq!(ops.len(), op_lines.len());
        assert_eq!(ops[0]["type"], "COPY");
        assert_eq!(ops[0]["new_block"], 0);
        assert_eq!(ops[0]["source"], 20);
        let xor = ops.iter().find(|o| o["type"] == "XOR").unwrap();
        assert_eq!(xor["source"], 50 * 4096 + 100);
        assert_eq!(xor["new_block"], 40);
        if version == "3.0" {
            assert_eq!(v["header"]["max_compression_size"], 16384);
            let multi = ops.iter().filter(|o| o["num_blocks"] == 4).count();
            assert!(multi >= 2, "11 REPLACE blocks at 16K give 4+4+2+1");
        }

        let o = run(&["inspect", "--json", "--merge-order", s(&cow)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let ops = v["ops"].as_array().unwrap();
        assert_eq!(v["order"], "merge");
        assert_eq!(ops[0]["merged"], true);
        assert_eq!(ops[1]["merged"], true);
        assert_eq!(ops[2]["merged"], false);
        // Ordered ops (COPY/XOR) come first in v2's legacy order.
        if version == "2.0" {
            assert_eq!(ops[8]["type"], "XOR");
        }
        let o = run(&["inspect", "--merge-order", s(&cow)]);
        assert!(stdout(&o).contains("already_merged: 2"), "{}", stdout(&o));
    }
}

#[test]
fn errors_are_one_line_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    let missing = dir.path().join("missing.cow");
    let o = run(&["inspect", s(&missing)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("missing.cow") && e.contains("cannot open"),
        "{e}"
    );

    write_cow(&cow, WriterOptions::default());
    // Corrupt the magic.
    let mut bytes = fs::read(&cow).unwrap();
    bytes[0] ^= 0xFF;
    fs::write(&cow, &bytes).unwrap();
    let o = run(&["inspect", s(&cow)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("x.cow") && e.contains("magic"), "{e}");

    // Truncated COW (no footer).
    let sc = write_cow(&cow, WriterOptions::default());
    let bytes = fs::read(&cow).unwrap();
    fs::write(&cow, &bytes[..bytes.len() - 50]).unwrap();
    fs::write(&src, &sc.source).unwrap();
    let o = apply(&src, &cow, &out);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("x.cow"), "{e}");

    // A corrupt payload: the error names the op.
    let opts = WriterOptions {
        compression: "lz4".parse().unwrap(),
        scratch: false,
        ..WriterOptions::default()
    };
    write_cow(&cow, opts);
    let mut bytes = fs::read(&cow).unwrap();
    let data_start = 38 + 1024 * 20; // first cluster's data region
    for b in &mut bytes[data_start..data_start + 64] {
        *b = 0xFF;
    }
    fs::write(&cow, &bytes).unwrap();
    let o = apply(&src, &cow, &out);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("op ") && e.contains("new block"), "{e}");

    // Source too short for a COPY.
    write_cow(&cow, WriterOptions::default());
    fs::write(&src, vec![0u8; 4 * BS]).unwrap();
    let o = apply(&src, &cow, &out);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("source image"), "{e}");

    // Missing source.
    let o = run(&[
        "apply",
        "--source",
        s(&dir.path().join("nope.img")),
        "--cow",
        s(&cow),
        "--output",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope.img"), "{}", stderr(&o));

    // Output == COW.
    fs::write(&src, source_image()).unwrap();
    let o = apply(&src, &cow, &cow);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is the COW file itself"),
        "{}",
        stderr(&o)
    );

    // Output that is not a file or block device.
    let o = run(&[
        "apply",
        "--source",
        s(&src),
        "--cow",
        s(&cow),
        "--output",
        "/dev/null",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a regular file or block device"),
        "{}",
        stderr(&o)
    );
}

/// AOSP's `tools/testdata/cow_v2` (the writer reproduces it byte for byte;
/// `cow-format/tests/aosp_golden.rs` checks the SHA-256).
fn write_aosp_cow_v2(path: &Path) {
    let mut text = b"This is some data, believe it".to_vec();
    text.resize(BS, 0);
    let opts = WriterOptions {
        cluster_ops: 5,
        num_merge_ops: 1,
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(fs::File::create(path).unwrap(), opts).unwrap();
    w.add_copy(0, 5).unwrap();
    w.add_replace(2, &text).unwrap();
    w.add_label(1).unwrap();
    w.add_xor(50, &text, 24 * 4096 + 10).unwrap();
    w.add_zero(5, 10).unwrap();
    w.add_label(2).unwrap();
    w.finalize().unwrap();
}

#[test]
fn aosp_cow_v2_inspect_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    write_aosp_cow_v2(&cow);
    let o = run(&["inspect", "--json", "--merge-order", s(&cow)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["records"], 18);
    assert_eq!(v["summary"]["last_label"], 2);
    assert_eq!(v["summary"]["merge_ops_total"], 13);
    assert_eq!(v["summary"]["ordered_ops_to_merge"], 1);
    let order: Vec<u64> = v["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["new_block"].as_u64().unwrap())
        .collect();
    // snapuserd's order (fact sheet §11.1): 0, 50, 2, 5..14.
    let mut want = vec![0, 50, 2];
    want.extend(5..15);
    assert_eq!(order, want);
    assert_eq!(v["ops"][0]["merged"], true);
    assert_eq!(v["ops"][1]["merged"], false);

    let source = source_image();
    fs::write(&src, &source).unwrap();
    let o = apply(&src, &cow, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = fs::read(&out).unwrap();
    let mut text = b"This is some data, believe it".to_vec();
    text.resize(BS, 0);
    let mut want = source.clone();
    want.copy_within(5 * BS..6 * BS, 0);
    want[2 * BS..3 * BS].copy_from_slice(&text);
    want[5 * BS..15 * BS].fill(0);
    let x = 24 * BS + 10;
    let xored: Vec<u8> = text
        .iter()
        .zip(&source[x..x + BS])
        .map(|(a, b)| a ^ b)
        .collect();
    want[50 * BS..51 * BS].copy_from_slice(&xored);
    assert_eq!(got.len(), SOURCE_BLOCKS * BS);
    assert!(got[..] == want[..SOURCE_BLOCKS * BS]);
}

#[test]
fn apply_far_block_leaves_a_sparse_hole() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    let source = source_image();
    fs::write(&src, &source).unwrap();
    // Junk in an existing output must not survive in the hole.
    fs::write(&out, vec![0xAAu8; 200 * BS]).unwrap();
    let far = 2_000_000u64; // ~8 GB image
    let data = block_bytes(77, false);
    let mut w =
        CowWriter::create(fs::File::create(&cow).unwrap(), WriterOptions::default()).unwrap();
    w.add_replace(far, &data).unwrap();
    w.finalize().unwrap();
    let o = apply(&src, &cow, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), (far + 1) * BS as u64);
    // Allocated space is far below the apparent size.
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    let f = fs::File::open(&out).unwrap();
    let mut buf = vec![0u8; BS];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut buf, far * BS as u64).unwrap();
    assert!(buf == data);
    f.read_exact_at(&mut buf, 100 * BS as u64).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "old output bytes survived");
    f.read_exact_at(&mut buf, 3 * BS as u64).unwrap();
    assert!(buf[..] == source[3 * BS..4 * BS]);
}

#[test]
fn inspect_a_torn_file_at_a_label() {
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("torn.cow");
    let mut w =
        CowWriter::create(fs::File::create(&cow).unwrap(), WriterOptions::default()).unwrap();
    w.add_copy(0, 1).unwrap();
    w.add_label(5).unwrap();
    w.add_zero(1, 3).unwrap();
    drop(w); // no footer
    let o = run(&["inspect", s(&cow)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("footer"), "{}", stderr(&o));
    let o = run(&["inspect", "--json", "--label", "5", s(&cow)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ops"].as_array().unwrap().len(), 1);
    assert_eq!(v["summary"]["last_label"], 5);
    let o = run(&["inspect", "--label", "6", s(&cow)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("label 6 not found"), "{}", stderr(&o));
}

#[test]
fn apply_duplicate_blocks_take_the_first_op() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    let source = source_image();
    fs::write(&src, &source).unwrap();
    let opts = WriterOptions {
        version: CowVersion::V3,
        op_count_max: Some(8),
        allow_duplicate_blocks: true,
        ..WriterOptions::default()
    };
    let mut w = CowWriter::create(fs::File::create(&cow).unwrap(), opts).unwrap();
    w.add_zero(7, 1).unwrap();
    w.add_replace(7, &block_bytes(5, false)).unwrap();
    w.add_copy(3, 9).unwrap();
    w.add_copy(3, 10).unwrap();
    w.finalize().unwrap();
    let o = apply(&src, &cow, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = fs::read(&out).unwrap();
    assert!(got[7 * BS..8 * BS].iter().all(|b| *b == 0));
    assert!(got[3 * BS..4 * BS] == source[9 * BS..10 * BS]);
}

#[test]
fn a_failed_apply_leaves_an_existing_output_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cow, out) = paths(dir.path());
    let opts = WriterOptions {
        compression: "lz4".parse().unwrap(),
        scratch: false,
        ..WriterOptions::default()
    };
    let sc = write_cow(&cow, opts);
    fs::write(&src, &sc.source).unwrap();
    // A corrupt payload: the COW opens, and apply fails while producing blocks.
    let mut bytes = fs::read(&cow).unwrap();
    let data_start = 38 + 1024 * 20;
    for b in &mut bytes[data_start..data_start + 64] {
        *b = 0xFF;
    }
    fs::write(&cow, &bytes).unwrap();
    let previous: Vec<u8> = (0..3 * BS).map(|i| (i % 251) as u8).collect();
    fs::write(&out, &previous).unwrap();
    let o = apply(&src, &cow, &out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("op "), "{}", stderr(&o));
    assert_eq!(fs::read(&out).unwrap(), previous, "old output untouched");
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["out.img", "src.img", "x.cow"],
        "no temporary file left"
    );

    // A good COW replaces it, keeping its mode.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&out, fs::Permissions::from_mode(0o640)).unwrap();
    write_cow(&cow, WriterOptions::default());
    let o = apply(&src, &cow, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read(&out).unwrap(), sc.target);
    let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    // In place (output names the source) still merges into the file itself.
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let before = inode(&src);
    let o = apply(&src, &cow, &src);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        inode(&src),
        before,
        "in place writes the source file itself"
    );
    assert_eq!(fs::read(&src).unwrap(), sc.target);
}

#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("many.cow");
    // 20,000 ZERO ops: far more text than a pipe holds.
    let mut w =
        CowWriter::create(fs::File::create(&cow).unwrap(), WriterOptions::default()).unwrap();
    w.add_zero(0, 20_000).unwrap();
    w.finalize().unwrap();
    for json in [false, true] {
        let mut cmd = bin();
        cmd.arg("inspect");
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .arg(&cow)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read one line, like `head -1`, then close the pipe.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "json={json}: {:?} {}",
            o.status,
            stderr(&o)
        );
        assert_eq!(stderr(&o), "", "json={json}: nothing on stderr");
    }
}

#[test]
fn help_texts_match_the_commands() {
    let top = stdout(&run(&["--help"]));
    assert!(top.contains("Four commands"), "{top}");
    for cmd in ["create", "verify", "inspect", "apply"] {
        assert!(top.contains(&format!("  {cmd} ")), "{cmd} listed: {top}");
    }
    let apply_help = stdout(&run(&["apply", "--help"]));
    let threads_entry = apply_help
        .split("--threads")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_default();
    assert_eq!(
        threads_entry.matches("default").count(),
        1,
        "one default for --threads: {apply_help}"
    );
    let create_help = stdout(&run(&["create", "--help"]));
    assert!(
        !create_help.contains(".md"),
        "no source-tree paths: {create_help}"
    );
}
