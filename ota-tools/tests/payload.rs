//! `ota-tools payload`: the sample payloads made by AOSP's delta_generator,
//! payloads from `create` round-tripping through `extract` and
//! `to-cow` + `apply`, and hostile payloads.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ota_tools::apply::{apply, ApplyOptions};
use ota_tools::payload::create::{create, CreateOptions, DiffMode, ReplaceMode};
use ota_tools::payload::extract::{extract, ExtractError, ExtractOptions};
use ota_tools::payload::install::InstallError;
use ota_tools::payload::operation::OpError;
use ota_tools::payload::partition::PartitionError;
use ota_tools::payload::proto::{
    merge_type, op_type, CowMergeOperation, DeltaArchiveManifest, Extent, InstallOperation,
    PartitionInfo, PartitionUpdate,
};
use ota_tools::payload::reader::{Payload, PayloadReadError};
use ota_tools::payload::to_cow::{to_cow, ToCowOptions};
use ota_tools::payload::verity_regions::VerityRegionError;
use ota_tools::payload::writer::PayloadWriter;
use sha2::{Digest, Sha256};

const BS: usize = 4096;

/// `shared/testdata/update_engine`, beside the repository (or named by
/// `OTA_TESTDATA_DIR`).
fn testdata() -> PathBuf {
    if let Some(d) = std::env::var_os("OTA_TESTDATA_DIR") {
        return PathBuf::from(d);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for up in ["../shared", "../../shared"] {
        let d = root.join(up).join("testdata/update_engine");
        if d.join("sample_payloads.tar.xz").exists() {
            return d;
        }
    }
    panic!("shared/testdata/update_engine not found beside the repository; set OTA_TESTDATA_DIR");
}

/// The sample payloads and images, unpacked into a temporary directory.
fn samples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for tarball in ["sample_payloads.tar.xz", "sample_images.tar.bz2"] {
        let st = Command::new("tar")
            .arg("xf")
            .arg(testdata().join(tarball))
            .arg("-C")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "tar xf {tarball}");
    }
    let old = dir.path().join("old");
    fs::create_dir(&old).unwrap();
    fs::copy(
        dir.path().join("disk_ext2_4k_empty.img"),
        old.join("kernel.img"),
    )
    .unwrap();
    fs::copy(dir.path().join("disk_sqfs_empty.img"), old.join("root.img")).unwrap();
    dir
}

fn extract_opts(payload: &Path, out: &Path, source: Option<&Path>) -> ExtractOptions {
    ExtractOptions {
        payload: payload.to_path_buf(),
        output_dir: out.to_path_buf(),
        source_dir: source.map(Path::to_path_buf),
        partitions: None,
        threads: 2,
        progress: false,
    }
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x == y, "{} differs from {}", a.display(), b.display());
}

#[test]
fn sample_full_payload_extracts_byte_exact() {
    let d = samples();
    let out = d.path().join("full");
    let parts = extract(&extract_opts(
        &d.path().join("full_payload.bin"),
        &out,
        None,
    ))
    .unwrap();
    assert_eq!(parts.len(), 2);
    assert_same_file(&out.join("kernel.img"), &d.path().join("disk_ext2_4k.img"));
    assert_same_file(
        &out.join("root.img"),
        &d.path().join("disk_sqfs_default.img"),
    );
    // And the manifest's hashes are those of the images.
    let p = Payload::open(&d.path().join("full_payload.bin")).unwrap();
    for part in &p.manifest.partitions {
        let img = fs::read(out.join(format!("{}.img", part.partition_name))).unwrap();
        let want = part
            .new_partition_info
            .as_ref()
            .unwrap()
            .hash
            .clone()
            .unwrap();
        assert_eq!(Sha256::digest(&img).to_vec(), want);
    }
}

#[test]
fn sample_delta_payload_extracts_byte_exact_on_the_old_images() {
    let d = samples();
    let out = d.path().join("delta");
    let payload = d.path().join("delta_payload.bin");
    let p = Payload::open(&payload).unwrap();
    let types: BTreeSet<i32> = p.manifest.partitions[0]
        .operations
        .iter()
        .map(|o| o.r#type)
        .collect();
    // The sample exercises the BSDF2 brotli container.
    assert!(types.contains(&op_type::BROTLI_BSDIFF));
    assert!(types.contains(&op_type::SOURCE_COPY));
    extract(&extract_opts(&payload, &out, Some(&d.path().join("old")))).unwrap();
    assert_same_file(&out.join("kernel.img"), &d.path().join("disk_ext2_4k.img"));
    assert_same_file(
        &out.join("root.img"),
        &d.path().join("disk_sqfs_default.img"),
    );
}

#[test]
fn sample_delta_needs_the_right_old_image() {
    let d = samples();
    let payload = d.path().join("delta_payload.bin");
    let err = extract(&extract_opts(&payload, &d.path().join("x"), None)).unwrap_err();
    assert!(
        matches!(err, ExtractError::Install(InstallError::NoSource { .. })),
        "{err}"
    );
    // A wrong old kernel: the first source-reading operation's hash check fails.
    let wrong = d.path().join("wrong");
    fs::create_dir(&wrong).unwrap();
    fs::copy(d.path().join("disk_ext2_4k.img"), wrong.join("kernel.img")).unwrap();
    fs::copy(d.path().join("old/root.img"), wrong.join("root.img")).unwrap();
    let out = d.path().join("y");
    let err = extract(&extract_opts(&payload, &out, Some(&wrong))).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ExtractError::Install(InstallError::SourceHash { .. })),
        "{msg}"
    );
    assert!(msg.contains("partition `kernel` operation #"), "{msg}");
    // Nothing left under the final name.
    assert!(!out.join("kernel.img").exists());
}

#[test]
fn corrupt_blob_is_reported_with_its_operation() {
    let d = samples();
    let payload = d.path().join("full_payload.bin");
    let mut bytes = fs::read(&payload).unwrap();
    let p = Payload::open(&payload).unwrap();
    let op = &p.manifest.partitions[1].operations[0];
    let at = (p.data_start + op.data_offset.unwrap() + 10) as usize;
    bytes[at] ^= 0xff;
    let bad = d.path().join("bad.bin");
    fs::write(&bad, &bytes).unwrap();
    let err = extract(&extract_opts(&bad, &d.path().join("o"), None)).unwrap_err();
    assert!(
        matches!(err, ExtractError::Install(InstallError::BlobHash { .. })),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("partition `root` operation #0 (REPLACE_XZ)"));
}

fn cow_roundtrip(payload: &Path, old_dir: &Path, new_dir: &Path, work: &Path, version: &str) {
    let cows = work.join(format!("cow{version}"));
    let reports = to_cow(&ToCowOptions {
        payload: payload.to_path_buf(),
        source_dir: old_dir.to_path_buf(),
        output_dir: cows.clone(),
        partitions: None,
        cow_version: Some(
            version
                .parse::<u8>()
                .map_or(cow_format::CowVersion::V3, |v| {
                    if v == 2 {
                        cow_format::CowVersion::V2
                    } else {
                        cow_format::CowVersion::V3
                    }
                }),
        ),
        compression: None,
        compression_factor: None,
        progress: false,
    })
    .unwrap();
    for r in reports {
        let new = new_dir.join(format!("{}.img", r.name));
        let mut old = old_dir.join(format!("{}.img", r.name));
        if !old.exists() {
            old = work.join("empty.img");
            fs::write(&old, b"").unwrap();
        }
        let out = work.join(format!("{}.applied", r.name));
        apply(&ApplyOptions {
            source: old.clone(),
            cow: r.path.clone(),
            output: out.clone(),
            size: Some(fs::metadata(&new).unwrap().len()),
            progress: false,
            threads: 1,
        })
        .unwrap();
        assert_same_file(&out, &new);
        ota_tools::verify::verify(&old, &new, &r.path).unwrap();
    }
}

#[test]
fn sample_delta_to_cow_applies_and_verifies() {
    let d = samples();
    let new = d.path().join("new");
    fs::create_dir(&new).unwrap();
    fs::copy(d.path().join("disk_ext2_4k.img"), new.join("kernel.img")).unwrap();
    fs::copy(d.path().join("disk_sqfs_default.img"), new.join("root.img")).unwrap();
    for v in ["2", "3"] {
        cow_roundtrip(
            &d.path().join("delta_payload.bin"),
            &d.path().join("old"),
            &new,
            d.path(),
            v,
        );
    }
}

/// A small deterministic generator (xorshift) for test images.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn random_block(&mut self) -> Vec<u8> {
        (0..BS / 8)
            .flat_map(|_| self.next().to_le_bytes())
            .collect()
    }
    fn text_block(&mut self) -> Vec<u8> {
        const WORDS: [&[u8]; 8] = [
            b"alpha ", b"beta ", b"gamma ", b"delta ", b"system ", b"vendor ", b"lib", b".so\n",
        ];
        let mut v = Vec::with_capacity(BS + 8);
        while v.len() < BS {
            v.extend_from_slice(WORDS[(self.next() % 8) as usize]);
        }
        v.truncate(BS);
        v
    }
}

/// An old/new pair with moved, XOR-similar, zeroed, new and appended blocks;
/// `grow` > 0 appends blocks, < 0 truncates.
fn make_pair(seed: u64, blocks: usize, grow: isize) -> (Vec<u8>, Vec<u8>) {
    let mut r = Rng(seed);
    let old: Vec<Vec<u8>> = (0..blocks)
        .map(|i| {
            if i % 3 == 0 {
                r.random_block()
            } else {
                r.text_block()
            }
        })
        .collect();
    let mut new = old.clone();
    let q = blocks / 8;
    for i in q..2 * q {
        new[i] = old[i + 3 * q].clone(); // moved
    }
    for b in new.iter_mut().take(3 * q).skip(2 * q) {
        for k in (0..BS).step_by(97) {
            b[k] ^= 0x5a; // XOR-similar
        }
    }
    for b in new.iter_mut().take(4 * q).skip(3 * q + q / 2) {
        b.fill(0); // zeroed
    }
    for (n, b) in new.iter_mut().enumerate().take(5 * q).skip(4 * q) {
        *b = if n % 2 == 0 {
            r.text_block()
        } else {
            r.random_block()
        };
    }
    // Blocks that move onto each other's places (a swap: a merge cycle).
    new.swap(6 * q, 6 * q + 1);
    if grow > 0 {
        for _ in 0..grow {
            new.push(r.text_block());
        }
    } else {
        new.truncate((blocks as isize + grow) as usize);
    }
    (old.concat(), new.concat())
}

fn op_types(payload: &Path) -> (BTreeSet<&'static str>, BTreeSet<&'static str>) {
    let p = Payload::open(payload).unwrap();
    let mut ops = BTreeSet::new();
    let mut merges = BTreeSet::new();
    for part in &p.manifest.partitions {
        for o in &part.operations {
            ops.insert(op_type::name(o.r#type));
        }
        for m in &part.merge_operations {
            merges.insert(merge_type::name(m.r#type.unwrap_or(0)));
        }
    }
    (ops, merges)
}

#[test]
fn created_payloads_round_trip_through_extract_and_to_cow() {
    let d = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (d.path().join("old"), d.path().join("new"));
    fs::create_dir(&old_dir).unwrap();
    fs::create_dir(&new_dir).unwrap();
    let (o, n) = make_pair(7, 256, 24);
    fs::write(old_dir.join("system.img"), &o).unwrap();
    fs::write(new_dir.join("system.img"), &n).unwrap();
    let (o, n) = make_pair(9, 128, -40);
    fs::write(old_dir.join("vendor.img"), &o).unwrap();
    fs::write(new_dir.join("vendor.img"), &n).unwrap();
    // A partition new in this update (no old image).
    fs::write(new_dir.join("odm.img"), make_pair(11, 16, 0).1).unwrap();

    let mut all_ops = BTreeSet::new();
    let mut all_merges = BTreeSet::new();
    let modes = [
        (ReplaceMode::None, DiffMode::Off),
        (ReplaceMode::Bz, DiffMode::Bsdiff),
        (ReplaceMode::Xz, DiffMode::Brotli),
        (ReplaceMode::Auto, DiffMode::Auto),
    ];
    for (i, (replace, diff)) in modes.into_iter().enumerate() {
        let payload = d.path().join(format!("p{i}.bin"));
        let mut opts = CreateOptions::new(new_dir.clone(), Some(old_dir.clone()), payload.clone());
        opts.replace = replace;
        opts.diff = diff;
        opts.threads = 2;
        opts.cow_version = if i % 2 == 0 { 2 } else { 3 };
        let summary = create(&opts).unwrap();
        let p = Payload::open(&payload).unwrap();
        let meta = p.manifest.dynamic_partition_metadata.as_ref().unwrap();
        assert_eq!(meta.vabc_enabled, Some(true));
        assert_eq!(meta.cow_version, Some(opts.cow_version));
        for part in &p.manifest.partitions {
            assert!(part.estimate_cow_size.unwrap() > 0);
        }
        assert_eq!(summary.partitions.len(), 3);
        let (ops, merges) = op_types(&payload);
        all_ops.extend(ops);
        all_merges.extend(merges);
        let out = d.path().join(format!("ex{i}"));
        extract(&extract_opts(&payload, &out, Some(&old_dir))).unwrap();
        for name in ["system", "vendor", "odm"] {
            assert_same_file(
                &out.join(format!("{name}.img")),
                &new_dir.join(format!("{name}.img")),
            );
        }
        let work = d.path().join(format!("w{i}"));
        fs::create_dir(&work).unwrap();
        cow_roundtrip(&payload, &old_dir, &new_dir, &work, "3");
        // The COW sizes match the estimate written by create.
        let reports = to_cow(&ToCowOptions {
            payload: payload.clone(),
            source_dir: old_dir.clone(),
            output_dir: work.join("est"),
            partitions: None,
            cow_version: None,
            compression: None,
            compression_factor: None,
            progress: false,
        })
        .unwrap();
        for r in reports {
            assert_eq!(Some(r.cow_size), r.estimate_cow_size, "{}", r.name);
        }
    }
    for t in [
        "REPLACE",
        "REPLACE_BZ",
        "REPLACE_XZ",
        "ZERO",
        "SOURCE_COPY",
        "SOURCE_BSDIFF",
        "BROTLI_BSDIFF",
    ] {
        assert!(all_ops.contains(t), "no {t} in {all_ops:?}");
    }
    assert!(all_merges.contains("COW_COPY") && all_merges.contains("COW_XOR"));
}

#[test]
fn created_payload_is_no_larger_than_the_cow_of_ota_tools_create() {
    let d = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (d.path().join("old"), d.path().join("new"));
    fs::create_dir(&old_dir).unwrap();
    fs::create_dir(&new_dir).unwrap();
    let (o, n) = make_pair(21, 512, 0);
    fs::write(old_dir.join("system.img"), &o).unwrap();
    fs::write(new_dir.join("system.img"), &n).unwrap();
    let payload = d.path().join("p.bin");
    let mut opts = CreateOptions::new(new_dir.clone(), Some(old_dir.clone()), payload.clone());
    opts.estimate = false;
    create(&opts).unwrap();
    let cow = d.path().join("c.cow");
    let st = Command::new(env!("CARGO_BIN_EXE_ota-tools"))
        .args(["create", "--source"])
        .arg(old_dir.join("system.img"))
        .arg("--target")
        .arg(new_dir.join("system.img"))
        .arg("--output")
        .arg(&cow)
        .status()
        .unwrap();
    assert!(st.success());
    let (p, c) = (
        fs::metadata(&payload).unwrap().len(),
        fs::metadata(&cow).unwrap().len(),
    );
    assert!(p <= c, "payload {p} bytes > COW {c} bytes");
}

// ---- hand-made payloads -------------------------------------------------

fn write_payload(path: &Path, parts: Vec<(PartitionUpdate, Vec<Vec<u8>>)>) {
    let mut w = PayloadWriter::new(path).unwrap();
    let mut partitions = Vec::new();
    for (mut p, blobs) in parts {
        let mut blobs = blobs.into_iter();
        for op in &mut p.operations {
            if op.data_length.is_none() && !matches!(op.r#type, 4 | 6 | 7) {
                let b = blobs.next().unwrap();
                let (off, len) = w.add_blob(&b).unwrap();
                op.data_offset = Some(off);
                op.data_length = Some(len);
                op.data_sha256_hash = Some(Sha256::digest(&b).to_vec());
            }
        }
        partitions.push(p);
    }
    w.finish(&DeltaArchiveManifest {
        block_size: Some(BS as u32),
        minor_version: Some(8),
        partitions,
        ..Default::default()
    })
    .unwrap();
}

fn part(name: &str, blocks: u64, ops: Vec<InstallOperation>) -> PartitionUpdate {
    PartitionUpdate {
        partition_name: name.to_string(),
        new_partition_info: Some(PartitionInfo {
            size: Some(blocks * BS as u64),
            hash: None,
        }),
        operations: ops,
        ..Default::default()
    }
}

fn op(t: i32, dst: &[(u64, u64)]) -> InstallOperation {
    InstallOperation {
        r#type: t,
        dst_extents: dst.iter().map(|&(s, n)| Extent::new(s, n)).collect(),
        ..Default::default()
    }
}

fn extract_err(parts: Vec<(PartitionUpdate, Vec<Vec<u8>>)>) -> (ExtractError, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let payload = d.path().join("p.bin");
    write_payload(&payload, parts);
    let out = d.path().join("out");
    let err = extract(&extract_opts(&payload, &out, None)).unwrap_err();
    (err, d)
}

#[test]
fn hostile_extents_lengths_and_names_are_refused() {
    // Extent past the partition.
    let (e, _d) = extract_err(vec![(
        part("a", 4, vec![op(op_type::REPLACE, &[(3, 2)])]),
        vec![vec![1; 2 * BS]],
    )]);
    assert!(
        matches!(
            e,
            ExtractError::Partition(PartitionError::Op(OpError::ExtentOutOfBounds { .. }))
        ),
        "{e}"
    );
    // Overlapping destinations.
    let (e, _d) = extract_err(vec![(
        part(
            "a",
            8,
            vec![op(op_type::ZERO, &[(0, 4)]), op(op_type::ZERO, &[(3, 1)])],
        ),
        vec![],
    )]);
    assert!(
        matches!(e, ExtractError::Partition(PartitionError::Overlap { .. })),
        "{e}"
    );
    // REPLACE data longer than its destination.
    let (e, _d) = extract_err(vec![(
        part("a", 4, vec![op(op_type::REPLACE, &[(0, 1)])]),
        vec![vec![1; 2 * BS]],
    )]);
    assert!(
        matches!(
            e,
            ExtractError::Install(InstallError::Op(OpError::LengthMismatch { .. }))
        ),
        "{e}"
    );
    // A decompression bomb: 64 MiB of zeros in xz for a one-block destination.
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
    std::io::Write::write_all(&mut enc, &vec![0u8; 64 << 20]).unwrap();
    let bomb = enc.finish().unwrap();
    let (e, _d) = extract_err(vec![(
        part("a", 4, vec![op(op_type::REPLACE_XZ, &[(0, 1)])]),
        vec![bomb],
    )]);
    assert!(
        matches!(
            e,
            ExtractError::Install(InstallError::Op(OpError::LengthMismatch { .. }))
        ),
        "{e}"
    );
    // A name that would escape the output directory: nothing is written.
    let (e, d) = extract_err(vec![(
        part("../evil", 1, vec![op(op_type::ZERO, &[(0, 1)])]),
        vec![],
    )]);
    assert!(
        matches!(e, ExtractError::Partition(PartitionError::BadName { .. })),
        "{e}"
    );
    assert!(!d.path().join("evil.img").exists());
    assert!(!d.path().join("out").exists());
    // Unsupported operation types name the operation and the partition.
    for t in [
        op_type::PUFFDIFF,
        op_type::ZUCCHINI,
        op_type::LZ4DIFF_BSDIFF,
        op_type::LZ4DIFF_PUFFDIFF,
    ] {
        let (e, _d) = extract_err(vec![(
            part("sys", 1, vec![op(t, &[(0, 1)])]),
            vec![vec![0]],
        )]);
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "partition `sys` operation #0 ({})",
                op_type::name(t)
            )),
            "{msg}"
        );
        assert!(msg.contains("not supported"), "{msg}");
    }
}

#[test]
fn blob_offsets_past_the_file_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let payload = d.path().join("p.bin");
    let mut o = op(op_type::REPLACE, &[(0, 1)]);
    o.data_offset = Some(1 << 40);
    o.data_length = Some(BS as u64);
    write_payload(&payload, vec![(part("a", 1, vec![o]), vec![])]);
    let err = extract(&extract_opts(&payload, &d.path().join("o"), None)).unwrap_err();
    assert!(
        matches!(
            err,
            ExtractError::Install(InstallError::Blob {
                source: PayloadReadError::BlobOutOfBounds { .. },
                ..
            })
        ),
        "{err}"
    );
    // Truncated header and bad magic.
    fs::write(&payload, b"CrAU\0\0").unwrap();
    assert!(matches!(
        Payload::open(&payload),
        Err(PayloadReadError::SizeOutOfBounds { .. })
    ));
    fs::write(&payload, [0u8; 64]).unwrap();
    assert!(matches!(
        Payload::open(&payload),
        Err(PayloadReadError::BadMagic { .. })
    ));
}

fn sys_payload_with_merge_ops(
    d: &Path,
    old: &[u8],
    new: &[u8],
    ops: Vec<InstallOperation>,
    merge: Vec<CowMergeOperation>,
    blobs: Vec<Vec<u8>>,
) -> PathBuf {
    let blocks = (new.len() / BS) as u64;
    let mut p = part("sys", blocks, ops);
    p.new_partition_info.as_mut().unwrap().hash = Some(Sha256::digest(new).to_vec());
    p.old_partition_info = Some(PartitionInfo {
        size: Some(old.len() as u64),
        hash: None,
    });
    p.merge_operations = merge;
    let payload = d.join("p.bin");
    write_payload(&payload, vec![(p, blobs)]);
    payload
}

fn merge_op(t: i32, src: (u64, u64), dst: (u64, u64), offset: u32) -> CowMergeOperation {
    CowMergeOperation {
        r#type: Some(t),
        src_extent: Some(Extent::new(src.0, src.1)),
        dst_extent: Some(Extent::new(dst.0, dst.1)),
        src_offset: Some(offset),
    }
}

fn source_copy(src: (u64, u64), dst: (u64, u64), old: &[u8]) -> InstallOperation {
    let mut o = op(op_type::SOURCE_COPY, &[dst]);
    o.src_extents = vec![Extent::new(src.0, src.1)];
    let (a, b) = (src.0 as usize * BS, (src.0 + src.1) as usize * BS);
    o.src_sha256_hash = Some(Sha256::digest(&old[a..b]).to_vec());
    o
}

fn cow_opts(
    payload: &Path,
    old_dir: &Path,
    out: PathBuf,
    v: cow_format::CowVersion,
) -> ToCowOptions {
    ToCowOptions {
        payload: payload.to_path_buf(),
        source_dir: old_dir.to_path_buf(),
        output_dir: out,
        partitions: None,
        cow_version: Some(v),
        compression: None,
        compression_factor: None,
        progress: false,
    }
}

#[test]
fn discard_extracts_as_zero_and_xor_with_offset_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (d.path().join("old"), d.path().join("new"));
    fs::create_dir(&old_dir).unwrap();
    fs::create_dir(&new_dir).unwrap();
    let mut r = Rng(5);
    let old: Vec<u8> = (0..8).flat_map(|_| r.text_block()).collect();
    // New: block 0 DISCARD; block 1 = old 1; blocks 2..4 = the old bytes 100
    // bytes into block 4, slightly edited (XOR at offset 100, reading old
    // 4..7); blocks 4..6 zero; blocks 6..8 = old 0..2 (COPY). The XOR merges
    // before the COPY overwrites block 6.
    let mut new = vec![0u8; 8 * BS];
    new[BS..2 * BS].copy_from_slice(&old[BS..2 * BS]);
    new[2 * BS..4 * BS].copy_from_slice(&old[4 * BS + 100..6 * BS + 100]);
    new[2 * BS + 7] ^= 1;
    new[6 * BS..8 * BS].copy_from_slice(&old[..2 * BS]);
    fs::write(old_dir.join("sys.img"), &old).unwrap();
    fs::write(new_dir.join("sys.img"), &new).unwrap();
    let ops = vec![
        op(op_type::DISCARD, &[(0, 1)]),
        source_copy((1, 1), (1, 1), &old),
        op(op_type::REPLACE, &[(2, 2)]),
        op(op_type::ZERO, &[(4, 2)]),
        source_copy((0, 2), (6, 2), &old),
    ];
    let merge = vec![
        merge_op(merge_type::COW_XOR, (4, 3), (2, 2), 100),
        merge_op(merge_type::COW_COPY, (0, 2), (6, 2), 0),
        merge_op(merge_type::COW_COPY, (1, 1), (1, 1), 0),
    ];
    let payload = sys_payload_with_merge_ops(
        d.path(),
        &old,
        &new,
        ops,
        merge,
        vec![new[2 * BS..4 * BS].to_vec()],
    );
    let out = d.path().join("ex");
    extract(&extract_opts(&payload, &out, Some(&old_dir))).unwrap();
    assert_same_file(&out.join("sys.img"), &new_dir.join("sys.img"));
    for v in [cow_format::CowVersion::V2, cow_format::CowVersion::V3] {
        let reports = to_cow(&cow_opts(
            &payload,
            &old_dir,
            d.path().join(format!("c{v:?}")),
            v,
        ))
        .unwrap();
        assert_eq!(reports[0].xor_blocks, 2);
        assert_eq!(reports[0].copy_blocks, 2);
        // Block 1 is copied onto itself: not written at all.
        assert_eq!(reports[0].replace_blocks, 0);
        assert_eq!(reports[0].zero_blocks, 3);
    }
    let work = d.path().join("w");
    fs::create_dir(&work).unwrap();
    cow_roundtrip(&payload, &old_dir, &new_dir, &work, "2");
    cow_roundtrip(&payload, &old_dir, &new_dir, &work, "3");
}

#[test]
fn to_cow_refuses_unsafe_or_wrong_merge_operations() {
    let d = tempfile::tempdir().unwrap();
    let old_dir = d.path().join("old");
    fs::create_dir(&old_dir).unwrap();
    let mut r = Rng(6);
    let old: Vec<u8> = (0..4).flat_map(|_| r.text_block()).collect();
    fs::write(old_dir.join("sys.img"), &old).unwrap();
    // A swap of blocks 0 and 1 as two COPYs: whichever merges first
    // overwrites what the other reads.
    let mut new = old.clone();
    new[..BS].copy_from_slice(&old[BS..2 * BS]);
    new[BS..2 * BS].copy_from_slice(&old[..BS]);
    let ops = vec![
        source_copy((1, 1), (0, 1), &old),
        source_copy((0, 1), (1, 1), &old),
        source_copy((2, 2), (2, 2), &old),
    ];
    let merge = vec![
        merge_op(merge_type::COW_COPY, (1, 1), (0, 1), 0),
        merge_op(merge_type::COW_COPY, (0, 1), (1, 1), 0),
    ];
    let payload = sys_payload_with_merge_ops(d.path(), &old, &new, ops.clone(), merge, vec![]);
    let err = to_cow(&cow_opts(
        &payload,
        &old_dir,
        d.path().join("c"),
        cow_format::CowVersion::V3,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("merge order is unsafe"), "{err}");
    assert!(!d.path().join("c/sys.cow").exists());
    // A COW_COPY that disagrees with what the operation writes.
    let merge = vec![merge_op(merge_type::COW_COPY, (3, 1), (0, 1), 0)];
    let payload = sys_payload_with_merge_ops(d.path(), &old, &new, ops, merge, vec![]);
    let err = to_cow(&cow_opts(
        &payload,
        &old_dir,
        d.path().join("c"),
        cow_format::CowVersion::V3,
    ))
    .unwrap_err();
    assert!(
        err.to_string().contains("differs from old block 3"),
        "{err}"
    );
}

#[test]
fn cli_inspect_prints_the_sample_manifest() {
    let d = samples();
    let out = Command::new(env!("CARGO_BIN_EXE_ota-tools"))
        .args(["payload", "inspect", "--json"])
        .arg(d.path().join("delta_payload.bin"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["minor_version"], 6);
    assert_eq!(v["kind"], "incremental");
    assert_eq!(v["partitions"][0]["name"], "kernel");
    assert_eq!(
        v["partitions"][0]["operations"]["BROTLI_BSDIFF"]["count"],
        1
    );
    assert_eq!(v["payload_signatures"], 0);
}

#[test]
fn verity_regions_are_computed_from_the_new_data() {
    let d = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (d.path().join("old"), d.path().join("new"));
    fs::create_dir(&old_dir).unwrap();
    fs::create_dir(&new_dir).unwrap();
    let mut r = Rng(17);
    let data_blocks = 40u64;
    let data: Vec<u8> = (0..data_blocks).flat_map(|_| r.text_block()).collect();
    let salt = b"0123456789abcdef".to_vec();
    let tree_len =
        ota_tools::verity::hash_tree_size(data.len() as u64, BS as u32, "sha256").unwrap();
    let tree_blocks = tree_len / BS as u64;
    let fec_len = ota_tools::verity::fec_size(data.len() as u64 + tree_len, 2, BS as u32).unwrap();
    let fec_blocks = fec_len / BS as u64;
    let mut image = data.clone();
    image.extend(ota_tools::verity::hash_tree(&data, BS as u32, "sha256", &salt).unwrap());
    let fec = ota_tools::verity::fec(&image, 2, BS as u32).unwrap();
    image.extend(fec);
    let blocks = data_blocks + tree_blocks + fec_blocks;
    assert_eq!(image.len() as u64, blocks * BS as u64);
    fs::write(new_dir.join("sys.img"), &image).unwrap();
    fs::write(old_dir.join("sys.img"), vec![0u8; BS]).unwrap();

    let mut p = part(
        "sys",
        blocks,
        vec![op(op_type::REPLACE, &[(0, data_blocks)])],
    );
    p.new_partition_info.as_mut().unwrap().hash = Some(Sha256::digest(&image).to_vec());
    p.hash_tree_data_extent = Some(Extent::new(0, data_blocks));
    p.hash_tree_extent = Some(Extent::new(data_blocks, tree_blocks));
    p.hash_tree_algorithm = Some("sha256".into());
    p.hash_tree_salt = Some(salt);
    p.fec_data_extent = Some(Extent::new(0, data_blocks + tree_blocks));
    p.fec_extent = Some(Extent::new(data_blocks + tree_blocks, fec_blocks));
    p.fec_roots = Some(2);
    // A hash tree extent one block too long is refused before computing.
    let mut bad = p.clone();
    bad.hash_tree_extent = Some(Extent::new(data_blocks, tree_blocks + 1));
    bad.fec_data_extent = None;
    bad.fec_extent = None;
    let bad_payload = d.path().join("bad.bin");
    write_payload(&bad_payload, vec![(bad, vec![data.clone()])]);
    let err = extract(&extract_opts(&bad_payload, &d.path().join("bad"), None)).unwrap_err();
    assert!(
        matches!(
            err,
            ExtractError::Verity(VerityRegionError::SizeMismatch { .. })
        ),
        "{err}"
    );

    let payload = d.path().join("p.bin");
    write_payload(&payload, vec![(p, vec![data])]);

    let out = d.path().join("ex");
    let parts = extract(&extract_opts(&payload, &out, None)).unwrap();
    assert_eq!(parts[0].verity_regions, 2);
    assert_same_file(&out.join("sys.img"), &new_dir.join("sys.img"));
    let reports = to_cow(&cow_opts(
        &payload,
        &old_dir,
        d.path().join("c"),
        cow_format::CowVersion::V3,
    ))
    .unwrap();
    assert_eq!(reports[0].verity_blocks, tree_blocks + fec_blocks);
    let work = d.path().join("w");
    fs::create_dir(&work).unwrap();
    cow_roundtrip(&payload, &old_dir, &new_dir, &work, "2");
}

fn img2simg() -> Option<PathBuf> {
    ["/usr/bin/img2simg", "/usr/local/bin/img2simg"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn sparse_images_are_accepted_as_old_and_target_images() {
    let Some(tool) = img2simg() else {
        eprintln!("skipped: img2simg not installed (Debian package android-sdk-libsparse-utils)");
        return;
    };
    let d = samples();
    let sparse_old = d.path().join("sparse_old");
    fs::create_dir(&sparse_old).unwrap();
    for name in ["kernel", "root"] {
        let st = Command::new(&tool)
            .arg(d.path().join(format!("old/{name}.img")))
            .arg(sparse_old.join(format!("{name}.img")))
            .status()
            .unwrap();
        assert!(st.success());
    }
    // The kernel image is mostly zero: really sparse on disk.
    assert!(fs::metadata(sparse_old.join("kernel.img")).unwrap().len() < 4 << 20);
    let out = d.path().join("ex");
    extract(&extract_opts(
        &d.path().join("delta_payload.bin"),
        &out,
        Some(&sparse_old),
    ))
    .unwrap();
    assert_same_file(&out.join("kernel.img"), &d.path().join("disk_ext2_4k.img"));
    to_cow(&cow_opts(
        &d.path().join("delta_payload.bin"),
        &sparse_old,
        d.path().join("c"),
        cow_format::CowVersion::V2,
    ))
    .unwrap();
    // create with sparse targets and sources.
    let sparse_new = d.path().join("sparse_new");
    fs::create_dir(&sparse_new).unwrap();
    let st = Command::new(&tool)
        .arg(d.path().join("disk_ext2_4k.img"))
        .arg(sparse_new.join("kernel.img"))
        .status()
        .unwrap();
    assert!(st.success());
    let payload = d.path().join("mine.bin");
    let opts = CreateOptions::new(sparse_new, Some(sparse_old.clone()), payload.clone());
    create(&opts).unwrap();
    let out = d.path().join("ex2");
    extract(&extract_opts(&payload, &out, Some(&sparse_old))).unwrap();
    assert_same_file(&out.join("kernel.img"), &d.path().join("disk_ext2_4k.img"));
}

/// The fuzz harness over the seed corpus (`fuzz/corpus/payload_seed`, payloads
/// made by `payload create`) and deterministic mutations of it: every input
/// must end in a clean error or success.
#[test]
fn fuzz_harness_over_seed_mutations() {
    let seed_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/payload_seed");
    let mut seeds: Vec<Vec<u8>> = fs::read_dir(&seed_dir)
        .unwrap()
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 3);
    let mut r = Rng(0x5eed);
    for s in &seeds {
        ota_tools::payload::fuzz_harness::run(s);
    }
    for i in 0..600 {
        let mut m = seeds[i % seeds.len()].clone();
        let n = m.len() as u64;
        match r.next() % 4 {
            // Flip bytes, mostly in the header and manifest.
            0 | 1 => {
                for _ in 0..1 + r.next() % 4 {
                    let span = if r.next() % 2 == 0 { n.min(400) } else { n };
                    let at = (r.next() % span) as usize;
                    m[at] ^= 1 << (r.next() % 8);
                }
            }
            // Overwrite with an extreme value.
            2 => {
                let at = (r.next() % n.min(400)) as usize;
                let v = [0xffu8, 0x00, 0x7f, 0x80][(r.next() % 4) as usize];
                m[at] = v;
            }
            // Truncate.
            _ => m.truncate((r.next() % n) as usize),
        }
        ota_tools::payload::fuzz_harness::run(&m);
    }
}

#[test]
fn cli_extract_to_cow_and_errors() {
    let d = samples();
    let bin = env!("CARGO_BIN_EXE_ota-tools");
    let payload = d.path().join("delta_payload.bin");
    let out = Command::new(bin)
        .args(["payload", "extract"])
        .arg(&payload)
        .arg("--output-dir")
        .arg(d.path().join("ex"))
        .arg("--source-dir")
        .arg(d.path().join("old"))
        .args(["--partitions", "root", "--threads", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(
        &d.path().join("ex/root.img"),
        &d.path().join("disk_sqfs_default.img"),
    );
    assert!(!d.path().join("ex/kernel.img").exists());
    let out = Command::new(bin)
        .args(["payload", "to-cow"])
        .arg(&payload)
        .arg("--source-dir")
        .arg(d.path().join("old"))
        .arg("--output-dir")
        .arg(d.path().join("cow"))
        .args(["--cow-version", "2", "--compression", "zstd"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("kernel: ") && stdout.contains("no estimate_cow_size"),
        "{stdout}"
    );
    assert!(d.path().join("cow/kernel.cow").exists());
    // Errors: one line with the cause chain, exit status 1.
    let out = Command::new(bin)
        .args(["payload", "extract"])
        .arg(&payload)
        .arg("--output-dir")
        .arg(d.path().join("ex2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("partition `kernel` operation #") && stderr.contains("--source-dir"),
        "{stderr}"
    );
    let out = Command::new(bin)
        .args(["payload", "inspect"])
        .arg(d.path().join("disk_sqfs_empty.img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("magic is not CrAU"));
}

#[test]
fn hostile_block_size_and_partition_size_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let payload = d.path().join("p.bin");
    for bs in [0u32, 3000, 1 << 24] {
        let w = PayloadWriter::new(&payload).unwrap();
        w.finish(&DeltaArchiveManifest {
            block_size: Some(bs),
            partitions: vec![part("a", 1, vec![op(op_type::ZERO, &[(0, 1)])])],
            ..Default::default()
        })
        .unwrap();
        let err = Payload::open(&payload).unwrap_err();
        assert!(
            matches!(err, PayloadReadError::BadBlockSize { block_size, .. } if block_size == bs),
            "{err}"
        );
    }
    // A 2 TiB partition is refused before anything is created.
    write_payload(
        &payload,
        vec![(
            part("a", 1 << 29, vec![op(op_type::ZERO, &[(0, 1)])]),
            vec![],
        )],
    );
    let out = d.path().join("out");
    let err = extract(&extract_opts(&payload, &out, None)).unwrap_err();
    assert!(
        matches!(err, ExtractError::Partition(PartitionError::BadSize { .. })),
        "{err}"
    );
    assert!(!out.exists());
}
