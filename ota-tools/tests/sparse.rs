//! Android sparse images: images made by Debian's `img2simg` read back byte for byte, and
//! accepted by `create`, `verify` and `apply`; hand-made hostile images rejected with the
//! right error; the fuzz harness over seeds and deterministic mutations.
//!
//! Tests needing `img2simg` (package `android-sdk-libsparse-utils`, installed by
//! `.ci/run`) print why they skip when it is absent.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ota_tools::apply::{apply, ApplyError, ApplyOptions};
use ota_tools::create::command::{create_cow, CreateOptions};
use ota_tools::create::image::{BlockImage, ImageError};
use ota_tools::sparse::{fuzz_harness, ImageSource, SparseError, SparseImage, SPARSE_MAGIC};

const BS: usize = 4096;

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn img2simg() -> Option<PathBuf> {
    ["/usr/bin/img2simg", "/usr/local/bin/img2simg"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs `img2simg raw sparse [block_size]`.
fn make_sparse(tool: &Path, raw: &Path, sparse: &Path, block_size: Option<usize>) {
    let mut cmd = Command::new(tool);
    cmd.arg(raw).arg(sparse);
    if let Some(bs) = block_size {
        cmd.arg(bs.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "img2simg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw image with every kind of content img2simg distinguishes: random blocks, a
/// repeated 4-byte pattern, zero runs, and a hole at the end.
fn mixed_image(blocks: usize, seed: u64) -> Vec<u8> {
    let mut img = pseudo_random(blocks * BS, seed);
    for b in (0..blocks).filter(|b| b % 7 == 3 || b % 7 == 4) {
        let pattern = [0xab, 0xcd, (b % 5) as u8, 0x11];
        for (i, byte) in img[b * BS..(b + 1) * BS].iter_mut().enumerate() {
            *byte = pattern[i % 4];
        }
    }
    for b in (0..blocks).filter(|b| b % 11 >= 8) {
        img[b * BS..(b + 1) * BS].fill(0);
    }
    let tail = blocks.saturating_sub(5) * BS;
    img[tail..].fill(0);
    img
}

#[test]
fn img2simg_images_read_back_exactly() {
    let Some(tool) = img2simg() else {
        eprintln!("SKIP: img2simg not found (apt-get install android-sdk-libsparse-utils)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (blocks, sparse_bs) in [(300usize, None), (97, Some(1024)), (64, Some(65536))] {
        let raw = mixed_image(blocks, blocks as u64);
        let raw_path = dir.path().join("raw.img");
        let sparse_path = dir.path().join("sparse.img");
        fs::write(&raw_path, &raw).unwrap();
        make_sparse(&tool, &raw_path, &sparse_path, sparse_bs);

        let img = ImageSource::open(&sparse_path).unwrap();
        assert!(img.is_sparse(), "{blocks} blocks: not detected as sparse");
        assert_eq!(img.len_bytes(), raw.len() as u64);
        let ImageSource::Sparse { image, .. } = &img else {
            unreachable!()
        };
        let counts = image.chunk_counts();
        // Patterns and zeros are laid out per 4 KiB block, so only 4 KiB-or-smaller sparse
        // blocks turn them into FILL chunks.
        let kinds_ok = if sparse_bs.unwrap_or(BS) <= BS {
            counts.raw > 1 && counts.fill > 1
        } else {
            counts.raw >= 1
        };
        assert!(kinds_ok, "{blocks} blocks: img2simg made {counts:?}");
        let mut whole = vec![0u8; raw.len()];
        img.read_exact_at(&mut whole, 0).unwrap();
        assert!(whole == raw, "{blocks} blocks: whole read differs");
        // Odd offsets and lengths that straddle chunk boundaries.
        let mut offset = 1usize;
        while offset < raw.len() {
            let len = (offset * 31 % 20_000 + 1).min(raw.len() - offset);
            let mut buf = vec![0u8; len];
            img.read_exact_at(&mut buf, offset as u64).unwrap();
            assert!(buf == raw[offset..offset + len], "read at {offset}+{len}");
            offset += 7919;
        }
        let mut past = [0u8; 2];
        assert!(img.read_exact_at(&mut past, raw.len() as u64 - 1).is_err());
    }
    // A raw image is left raw.
    let raw_path = dir.path().join("raw.img");
    assert!(!ImageSource::open(&raw_path).unwrap().is_sparse());
}

#[test]
fn create_verify_and_apply_take_sparse_images() {
    let Some(tool) = img2simg() else {
        eprintln!("SKIP: img2simg not found (apt-get install android-sdk-libsparse-utils)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let source = mixed_image(256, 1);
    let mut target = source.clone();
    // Edit some blocks, move some, zero some, grow by a few blocks.
    target[10 * BS..12 * BS].copy_from_slice(&pseudo_random(2 * BS, 77));
    target.copy_within(100 * BS..110 * BS, 150 * BS);
    target[200 * BS..204 * BS].fill(0);
    target.extend_from_slice(&pseudo_random(6 * BS, 78));
    fs::write(d("src.raw"), &source).unwrap();
    fs::write(d("tgt.raw"), &target).unwrap();
    make_sparse(&tool, &d("src.raw"), &d("src.simg"), None);
    make_sparse(&tool, &d("tgt.raw"), &d("tgt.simg"), None);

    let opts = CreateOptions {
        threads: Some(2),
        ..CreateOptions::default()
    };
    create_cow(&opts, &d("src.simg"), &d("tgt.simg"), &d("sparse.cow")).unwrap();
    create_cow(&opts, &d("src.raw"), &d("tgt.raw"), &d("raw.cow")).unwrap();
    assert!(
        fs::read(d("sparse.cow")).unwrap() == fs::read(d("raw.cow")).unwrap(),
        "a COW made from sparse images differs from one made from the raw images"
    );

    // Every mix of sparse and raw inputs verifies.
    for (s, t) in [
        ("src.simg", "tgt.simg"),
        ("src.raw", "tgt.simg"),
        ("src.simg", "tgt.raw"),
    ] {
        ota_tools::verify::verify(&d(s), &d(t), &d("sparse.cow"))
            .unwrap_or_else(|e| panic!("verify {s} {t}: {e}"));
    }
    // A wrong target is caught through the sparse reader too.
    let mut wrong = target.clone();
    wrong[5 * BS + 17] ^= 1;
    fs::write(d("wrong.raw"), &wrong).unwrap();
    make_sparse(&tool, &d("wrong.raw"), &d("wrong.simg"), None);
    assert!(ota_tools::verify::verify(&d("src.simg"), &d("wrong.simg"), &d("sparse.cow")).is_err());

    // Apply from a sparse source to a separate output gives the raw target.
    let report = apply(&ApplyOptions {
        source: d("src.simg"),
        cow: d("sparse.cow"),
        output: d("out.img"),
        size: None,
        progress: false,
        threads: 2,
    })
    .unwrap();
    assert!(report.blocks_from_ops > 0);
    assert!(
        fs::read(d("out.img")).unwrap() == target,
        "applied image differs"
    );

    // In place on a sparse source is refused before anything is written.
    let before = fs::read(d("src.simg")).unwrap();
    let err = apply(&ApplyOptions {
        source: d("src.simg"),
        cow: d("sparse.cow"),
        output: d("src.simg"),
        size: None,
        progress: false,
        threads: 1,
    })
    .unwrap_err();
    assert!(matches!(err, ApplyError::SparseInPlace { .. }), "{err}");
    assert!(fs::read(d("src.simg")).unwrap() == before);
}

/// A hand-assembled sparse image.
struct Builder {
    block_size: u32,
    total_blocks: u32,
    chunks: Vec<(u16, u32, Vec<u8>)>,
    total_size_fix: Option<(usize, u32)>,
    total_chunks_fix: Option<u32>,
}

impl Builder {
    fn new(block_size: u32, total_blocks: u32) -> Self {
        Self {
            block_size,
            total_blocks,
            chunks: Vec::new(),
            total_size_fix: None,
            total_chunks_fix: None,
        }
    }
    fn chunk(mut self, kind: u16, blocks: u32, payload: Vec<u8>) -> Self {
        self.chunks.push((kind, blocks, payload));
        self
    }
    fn raw(self, data: &[u8]) -> Self {
        let blocks = (data.len() / self.block_size as usize) as u32;
        self.chunk(0xcac1, blocks, data.to_vec())
    }
    fn fill(self, blocks: u32, pattern: [u8; 4]) -> Self {
        self.chunk(0xcac2, blocks, pattern.to_vec())
    }
    fn dont_care(self, blocks: u32) -> Self {
        self.chunk(0xcac3, blocks, Vec::new())
    }
    fn crc(self, crc: u32) -> Self {
        self.chunk(0xcac4, 0, crc.to_le_bytes().to_vec())
    }
    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&SPARSE_MAGIC.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&28u16.to_le_bytes());
        out.extend_from_slice(&12u16.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.total_blocks.to_le_bytes());
        let n = self.total_chunks_fix.unwrap_or(self.chunks.len() as u32);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for (i, (kind, blocks, payload)) in self.chunks.iter().enumerate() {
            let mut total = 12 + payload.len() as u32;
            if let Some((at, t)) = self.total_size_fix {
                if at == i {
                    total = t;
                }
            }
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&blocks.to_le_bytes());
            out.extend_from_slice(&total.to_le_bytes());
            out.extend_from_slice(payload);
        }
        out
    }
}

fn open_bytes(bytes: &[u8]) -> Result<ImageSource, ImageError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.simg");
    fs::write(&path, bytes).unwrap();
    ImageSource::open(&path)
}

fn sparse_error(bytes: &[u8]) -> SparseError {
    match open_bytes(bytes) {
        Err(ImageError::Sparse { source, .. }) => source,
        Err(e) => panic!("expected a sparse error, got {e}"),
        Ok(_) => panic!("hostile image accepted"),
    }
}

#[test]
fn hand_made_image_with_every_chunk_type_reads_back() {
    let data = pseudo_random(2 * 512, 5);
    let mut want = data.clone();
    want.extend([1u8, 2, 3, 4].iter().cycle().take(3 * 512));
    want.extend(std::iter::repeat_n(0u8, 4 * 512));
    let crc = crc32fast::hash(&want);
    let bytes = Builder::new(512, 10)
        .crc(0)
        .raw(&data)
        .fill(3, [1, 2, 3, 4])
        .crc(crc32fast::hash(&want[..5 * 512]))
        .dont_care(4)
        .chunk(0xcac3, 0, Vec::new())
        .crc(crc)
        .fill(1, [9, 9, 9, 9])
        .build();
    want.extend([9u8; 512]);
    let img = open_bytes(&bytes).unwrap();
    let mut got = vec![0u8; want.len()];
    img.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want);
    let ImageSource::Sparse { image, .. } = &img else {
        panic!("not sparse")
    };
    let counts = image.chunk_counts();
    assert_eq!(
        (counts.raw, counts.fill, counts.dont_care, counts.crc32),
        (1, 2, 1, 3)
    );
    fuzz_harness::run(&bytes).unwrap();
}

#[test]
fn hand_made_images_expand_as_simg2img_expands_them() {
    let Some(simg2img) = ["/usr/bin/simg2img", "/usr/local/bin/simg2img"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!("SKIP: simg2img not found (apt-get install android-sdk-libsparse-utils)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 * 4096, 11);
    let images = [
        // DONT_CARE between data, a FILL with a non-symmetric pattern, DONT_CARE at the end.
        Builder::new(4096, 12)
            .raw(&data[..4096])
            .dont_care(2)
            .fill(3, [0x01, 0x80, 0xff, 0x00])
            .raw(&data[4096..])
            .dont_care(4)
            .build(),
        // 1 KiB blocks, leading DONT_CARE, a zero-block chunk.
        Builder::new(1024, 9)
            .dont_care(1)
            .chunk(0xcac1, 0, Vec::new())
            .raw(&data[..4 * 1024])
            .fill(4, [7, 7, 0, 0])
            .build(),
    ];
    for (i, bytes) in images.iter().enumerate() {
        let sparse = dir.path().join("in.simg");
        let raw = dir.path().join("out.raw");
        fs::write(&sparse, bytes).unwrap();
        let out = Command::new(&simg2img)
            .arg(&sparse)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "simg2img rejected image {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = fs::read(&raw).unwrap();
        let img = ImageSource::open(&sparse).unwrap();
        assert_eq!(img.len_bytes(), want.len() as u64, "image {i}");
        let mut got = vec![0u8; want.len()];
        img.read_exact_at(&mut got, 0).unwrap();
        assert!(got == want, "image {i} expands differently");
    }
}

#[test]
fn hostile_images_are_rejected_with_the_right_error() {
    let block = pseudo_random(4096, 9);
    // Chunks reach past the declared size.
    let e = sparse_error(&Builder::new(4096, 1).raw(&block).fill(1, [0; 4]).build());
    assert!(
        matches!(
            e,
            SparseError::PastEnd {
                index: 1,
                end_block: 2,
                ..
            }
        ),
        "{e}"
    );
    // Chunks cover less than declared.
    let e = sparse_error(&Builder::new(4096, 3).raw(&block).build());
    assert!(matches!(e, SparseError::Short { covered: 1, .. }), "{e}");
    // A RAW chunk whose total size disagrees with its block count (it would overlap the
    // next chunk, or leave a gap).
    for total in [12 + 4096 - 4, 12 + 4096 + 4, 12] {
        let mut b = Builder::new(4096, 2).raw(&block).raw(&block);
        b.total_size_fix = Some((0, total));
        let e = sparse_error(&b.build());
        assert!(matches!(e, SparseError::ChunkSize { index: 0, .. }), "{e}");
    }
    // A FILL chunk with a wrong size, a DONT_CARE chunk with a payload.
    let e = sparse_error(&Builder::new(4096, 1).chunk(0xcac2, 1, vec![0; 8]).build());
    assert!(
        matches!(e, SparseError::ChunkSize { kind: "FILL", .. }),
        "{e}"
    );
    let e = sparse_error(&Builder::new(4096, 1).chunk(0xcac3, 1, vec![0; 4]).build());
    assert!(
        matches!(
            e,
            SparseError::ChunkSize {
                kind: "DONT_CARE",
                ..
            }
        ),
        "{e}"
    );
    // The file ends inside a RAW payload, or before the declared chunks.
    let mut bytes = Builder::new(4096, 1).raw(&block).build();
    bytes.truncate(bytes.len() - 1);
    let e = sparse_error(&bytes);
    assert!(
        matches!(
            e,
            SparseError::Truncated {
                what: "chunk payload",
                ..
            }
        ),
        "{e}"
    );
    let mut b = Builder::new(4096, 1).raw(&block);
    b.total_chunks_fix = Some(u32::MAX);
    let e = sparse_error(&b.build());
    assert!(
        matches!(
            e,
            SparseError::Truncated {
                what: "chunk header",
                ..
            }
        ),
        "{e}"
    );
    // Bad CRC.
    let e = sparse_error(&Builder::new(4096, 1).raw(&block).crc(0x1234_5678).build());
    assert!(
        matches!(
            e,
            SparseError::Crc {
                index: 1,
                stored: 0x1234_5678,
                ..
            }
        ),
        "{e}"
    );
    let e = sparse_error(&Builder::new(4096, 0).chunk(0xcac4, 1, vec![0; 4]).build());
    assert!(matches!(e, SparseError::CrcChunkBlocks { .. }), "{e}");
    // Unknown chunk type, bad version, bad header sizes, bad block size.
    let e = sparse_error(&Builder::new(4096, 1).chunk(0xcac5, 1, vec![]).build());
    assert!(
        matches!(
            e,
            SparseError::ChunkType {
                chunk_type: 0xcac5,
                ..
            }
        ),
        "{e}"
    );
    let mut bytes = Builder::new(4096, 0).build();
    bytes[4] = 2;
    assert!(matches!(
        sparse_error(&bytes),
        SparseError::Version { major: 2, .. }
    ));
    let mut bytes = Builder::new(4096, 0).build();
    bytes[10] = 8;
    assert!(matches!(
        sparse_error(&bytes),
        SparseError::HeaderSize {
            chunk_header: 8,
            ..
        }
    ));
    for bs in [0u32, 4094] {
        let e = sparse_error(&Builder::new(bs, 0).build());
        assert!(matches!(e, SparseError::BlockSize { .. }), "{e}");
    }
    // A header cut short.
    let bytes = Builder::new(4096, 0).build();
    assert!(matches!(
        sparse_error(&bytes[..20]),
        SparseError::Truncated {
            what: "file header",
            ..
        }
    ));
    // Every message renders and names where the problem is.
    let e = sparse_error(&Builder::new(4096, 1).raw(&block).crc(7).build());
    assert!(e.to_string().contains("at byte 4136"), "{e}");
}

#[test]
fn absurd_declared_sizes_cost_nothing() {
    // 2^32 - 1 blocks of 4 GiB - 4 bytes, all DONT_CARE or FILL, in a 60-byte file: the
    // image parses without allocating, its CRC is checked in O(log n), reads of any
    // offset work, and `ImageSource` refuses it as larger than a COW can address.
    let huge_bs = u32::MAX - 3;
    // A CRC32 chunk after a 4 GiB FILL block: checking it must not hash 4 GiB byte by
    // byte (the test would time out), and the wrong value is caught.
    let bytes = Builder::new(huge_bs, u32::MAX)
        .fill(1, [7, 0, 0, 7])
        .crc(0x0bad_c0de)
        .dont_care(u32::MAX - 1)
        .build();
    let len = bytes.len() as u64;
    let err = SparseImage::new(bytes.as_slice(), len).unwrap_err();
    assert!(
        matches!(
            err,
            SparseError::Crc {
                index: 1,
                stored: 0x0bad_c0de,
                ..
            }
        ),
        "{err}"
    );
    let bytes = Builder::new(huge_bs, u32::MAX)
        .fill(1, [7, 0, 0, 7])
        .dont_care(u32::MAX - 1)
        .build();
    let len = bytes.len() as u64;
    let image = SparseImage::new(bytes.as_slice(), len).unwrap();
    assert_eq!(image.len(), u64::from(u32::MAX) * u64::from(huge_bs));
    let mut buf = [1u8; 8];
    image
        .read_exact_at(&mut buf, u64::from(huge_bs) - 4)
        .unwrap();
    assert_eq!(buf, [7, 0, 0, 7, 0, 0, 0, 0]);
    match open_bytes(&bytes) {
        Err(ImageError::TooLarge { .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn fuzz_harness_survives_seed_mutations() {
    let block = pseudo_random(512, 3);
    let mut before_crc = block.clone();
    before_crc.extend([1u8, 2, 3, 4].iter().cycle().take(1024));
    before_crc.extend([0u8; 1024]);
    let seeds = [
        Builder::new(512, 6)
            .raw(&block)
            .fill(2, [1, 2, 3, 4])
            .dont_care(2)
            .crc(crc32fast::hash(&before_crc))
            .raw(&block)
            .build(),
        Builder::new(64, 3)
            .fill(1, [0xff; 4])
            .raw(&block[..128])
            .build(),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for seed in &seeds {
        fuzz_harness::run(seed).expect("seeds are valid");
    }
    let mut accepted = 0;
    for round in 0..20_000 {
        let mut data = seeds[round % seeds.len()].clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % data.len();
            match next() % 4 {
                0 => data[at] ^= 1 << (next() % 8),
                1 => data[at] = next() as u8,
                2 => data.truncate(at.max(1)),
                _ if data.len() >= 4 => {
                    // Set a 32-bit field to an extreme value.
                    let v = [0u32, 1, u32::MAX, 0x8000_0000][(next() % 4) as usize];
                    let at = at.min(data.len().saturating_sub(4));
                    data[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        match fuzz_harness::run(&data) {
            Ok(()) => accepted += 1,
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    // Some mutants (payload bytes) stay valid, so the read-back path is exercised too.
    assert!(accepted > 100, "only {accepted} mutants accepted");
}

#[test]
fn fuzz_seed_corpus_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sparse_seed");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap();
        fuzz_harness::run(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 3, "seed corpus {} has {seen} files", dir.display());
}

#[test]
fn cli_names_the_sparse_problem_and_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.simg");
    let block = pseudo_random(4096, 21);
    fs::write(
        &bad,
        Builder::new(4096, 1).raw(&block).crc(0xdead_beef).build(),
    )
    .unwrap();
    let good = dir.path().join("good.raw");
    fs::write(&good, &block).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ota-tools"))
        .arg("create")
        .arg("--source")
        .arg(&bad)
        .arg("--target")
        .arg(&good)
        .arg("--output")
        .arg(dir.path().join("x.cow"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid Android sparse image")
            && stderr.contains("bad.simg")
            && stderr.contains("CRC32 chunk 1 at byte 4136")
            && stderr.contains("0xdeadbeef"),
        "{stderr}"
    );
    assert!(!dir.path().join("x.cow").exists());
}
