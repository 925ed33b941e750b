//! Cross-checks of `ota_tools::verity` against independent implementations:
//!
//! * the hash tree and root against `veritysetup format` (Debian `cryptsetup-bin`), which
//!   writes the same top-down, block-padded, salted format-1 tree;
//! * the FEC parity against Phil Karn's Reed-Solomon library (Debian `libfec-dev`) driven
//!   with the parameters and interleaving of AOSP's libfec header (Debian
//!   `android-libfec-dev`), through the small C program in `tests/verity_ref/`.
//!
//! Each test prints why it skips when its tool is missing; `.ci/run` installs them all.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ota_tools::verity::{self, VerityError};
use sha2::{Digest, Sha256};

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Runs `veritysetup format` on `data` and returns (hash device bytes, root hash hex).
fn veritysetup(
    bin: &Path,
    data: &[u8],
    block_size: u32,
    algorithm: &str,
    salt: &[u8],
) -> (Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data.img");
    let hash_path = dir.path().join("hash.img");
    std::fs::write(&data_path, data).unwrap();
    let salt_arg = if salt.is_empty() {
        "-".to_string()
    } else {
        hex(salt)
    };
    let out = Command::new(bin)
        .args([
            "format",
            "--no-superblock",
            "--format=1",
            &format!("--hash={algorithm}"),
            &format!("--salt={salt_arg}"),
            &format!("--data-block-size={block_size}"),
            &format!("--hash-block-size={block_size}"),
        ])
        .arg(&data_path)
        .arg(&hash_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "veritysetup failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|r| r.trim().to_string())
        .expect("veritysetup printed no root hash");
    (std::fs::read(&hash_path).unwrap(), root)
}

#[test]
fn hash_tree_matches_veritysetup() {
    let Some(bin) = tool("veritysetup") else {
        eprintln!("SKIP: veritysetup not found (apt-get install cryptsetup-bin)");
        return;
    };
    // (blocks, block size, algorithm, salt): one, two and three levels, every algorithm,
    // with and without salt.
    let cases: &[(usize, u32, &str, &[u8])] = &[
        (2, 4096, "sha256", b"\x01\x02\x03"),
        (128, 4096, "sha256", b""),
        (200, 4096, "sha256", &[0xaa; 32]),
        (200, 4096, "sha1", b"salt"),
        (300, 4096, "sha512", &[0x5a; 64]),
        (300, 512, "sha256", b"\xde\xad\xbe\xef"),
        (70, 1024, "sha1", b""),
    ];
    for (i, &(blocks, bs, algorithm, salt)) in cases.iter().enumerate() {
        let data = pseudo_random(blocks * bs as usize, i as u64 + 1);
        let ours = verity::hash_tree_with_root(&data, bs, algorithm, salt).unwrap();
        let (theirs, root) = veritysetup(&bin, &data, bs, algorithm, salt);
        assert_eq!(
            ours.tree.len(),
            theirs.len(),
            "case {i}: tree length ({blocks} blocks of {bs}, {algorithm})"
        );
        assert!(ours.tree == theirs, "case {i}: tree bytes differ");
        assert_eq!(hex(&ours.root), root, "case {i}: root hash");
        assert_eq!(
            verity::hash_tree_size(data.len() as u64, bs, algorithm).unwrap(),
            theirs.len() as u64,
            "case {i}: hash_tree_size"
        );
        // The agreed entry point returns the same bytes.
        assert!(verity::hash_tree(&data, bs, algorithm, salt).unwrap() == ours.tree);
    }
}

#[test]
fn single_block_tree_is_one_padded_digest() {
    // update_engine's tree builder keeps one level even for one data block (the kernel
    // would hash that block directly); computed here by hand.
    let data = pseudo_random(4096, 99);
    let salt = b"pepper";
    let leaf = Sha256::new()
        .chain_update(salt)
        .chain_update(&data)
        .finalize();
    let mut want = vec![0u8; 4096];
    want[..32].copy_from_slice(&leaf);
    let root = Sha256::new()
        .chain_update(salt)
        .chain_update(&want)
        .finalize();
    let got = verity::hash_tree_with_root(&data, 4096, "SHA256", salt).unwrap();
    assert!(got.tree == want);
    assert_eq!(got.root, root.to_vec());
}

#[test]
fn tree_sizes_follow_update_engine() {
    // 1 GiB of 4 KiB blocks: 262144 leaves -> 2048 + 16 + 1 blocks.
    assert_eq!(
        verity::hash_tree_size(1 << 30, 4096, "sha256").unwrap(),
        2065 * 4096
    );
    // SHA-1 digests take 32-byte slots, so the tree is the same size as SHA-256's.
    assert_eq!(
        verity::hash_tree_size(1 << 30, 4096, "sha1").unwrap(),
        2065 * 4096
    );
    // SHA-512: 64 slots per block: 4096 + 64 + 1.
    assert_eq!(
        verity::hash_tree_size(1 << 30, 4096, "sha512").unwrap(),
        4161 * 4096
    );
}

#[test]
fn hash_tree_rejects_bad_arguments() {
    let data = vec![0u8; 8192];
    assert!(matches!(
        verity::hash_tree(&data, 4096, "md5", b""),
        Err(VerityError::UnknownAlgorithm { .. })
    ));
    assert!(matches!(
        verity::hash_tree(&data[..4000], 4096, "sha256", b""),
        Err(VerityError::PartialBlock { len: 4000, .. })
    ));
    assert!(matches!(
        verity::hash_tree(&[], 4096, "sha256", b""),
        Err(VerityError::Empty)
    ));
    for bs in [0u32, 3000, 64] {
        assert!(
            matches!(
                verity::hash_tree(&data, bs, "sha256", b""),
                Err(VerityError::BlockSize { .. })
            ),
            "block size {bs}"
        );
    }
}

/// Builds the C reference encoder, or says why it cannot.
fn build_fec_reference(dir: &Path) -> Result<PathBuf, String> {
    if !Path::new("/usr/include/fec.h").exists() {
        return Err("Karn's libfec not found (apt-get install libfec-dev)".into());
    }
    if !Path::new("/usr/include/android/fec/ecc.h").exists() {
        return Err("AOSP libfec header not found (apt-get install android-libfec-dev)".into());
    }
    // <fec/io.h> includes <crypto_utils/android_pubkey.h> for one constant the encoder
    // does not use; supply it when the Android crypto headers are absent.
    let stub = dir.join("stub");
    std::fs::create_dir_all(stub.join("crypto_utils")).map_err(|e| e.to_string())?;
    std::fs::write(
        stub.join("crypto_utils/android_pubkey.h"),
        "#ifndef ANDROID_PUBKEY_MODULUS_SIZE\n#define ANDROID_PUBKEY_MODULUS_SIZE 256\n#endif\n",
    )
    .map_err(|e| e.to_string())?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/verity_ref/fec_encode.c");
    let exe = dir.join("fec_encode");
    let out = Command::new("cc")
        .args(["-O2", "-fgnu89-inline", "-I/usr/include/android"])
        .arg("-I")
        .arg(&stub)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .arg("-lfec")
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot build the reference encoder: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(exe)
}

fn reference_fec(exe: &Path, data: &[u8], roots: u32) -> Vec<u8> {
    let mut child = Command::new(exe)
        .args([roots.to_string(), "4096".to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "reference encoder failed");
    out.stdout
}

#[test]
fn fec_matches_libfec_reference() {
    let dir = tempfile::tempdir().unwrap();
    let exe = match build_fec_reference(dir.path()) {
        Ok(exe) => exe,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    // (blocks, roots): one round, exactly full rounds, a partial last round, many roots.
    let cases = [
        (1usize, 2u32),
        (253, 2),
        (254, 2),
        (600, 2),
        (1000, 8),
        (300, 24),
    ];
    for (i, &(blocks, roots)) in cases.iter().enumerate() {
        let data = pseudo_random(blocks * 4096, 1000 + i as u64);
        let ours = verity::fec(&data, roots, 4096).unwrap();
        let theirs = reference_fec(&exe, &data, roots);
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{blocks} blocks, {roots} roots: length"
        );
        let first_diff = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "{blocks} blocks, {roots} roots");
        assert_eq!(
            verity::fec_size(data.len() as u64, roots, 4096).unwrap(),
            ours.len() as u64
        );
    }
}

/// An image whose reads fail from byte `fail_from` on.
struct FailingImage {
    data: Vec<u8>,
    fail_from: u64,
}

impl ota_tools::create::image::BlockImage for FailingImage {
    fn len_bytes(&self) -> u64 {
        self.data.len() as u64
    }
    fn name(&self) -> String {
        "failing".into()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.fail_from {
            return Err(std::io::Error::other("injected read error"));
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

#[test]
fn image_regions_give_the_same_bytes_as_slices() {
    use ota_tools::create::image::FileImage;
    use ota_tools::verity::ImageRegion;

    // A file with 3 leading blocks that are not part of the region (as a partition whose
    // verity data starts at an offset), then 600 data blocks, then a tail.
    let data = pseudo_random(600 * 4096, 42);
    let mut file_bytes = pseudo_random(3 * 4096, 1);
    file_bytes.extend_from_slice(&data);
    file_bytes.extend_from_slice(&[0xee; 4096]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("part.img");
    std::fs::write(&path, &file_bytes).unwrap();
    let image = FileImage::open(&path).unwrap();
    let region = ImageRegion::new(&image, 3 * 4096, data.len() as u64).unwrap();

    let from_slice = verity::hash_tree_with_root(&data, 4096, "sha256", b"s").unwrap();
    let from_file = verity::hash_tree_of(&region, 4096, "sha256", b"s").unwrap();
    assert!(from_slice == from_file, "hash tree differs");
    assert!(
        verity::fec(&data, 2, 4096).unwrap() == verity::fec_of(&region, 2, 4096).unwrap(),
        "FEC differs"
    );

    assert!(matches!(
        ImageRegion::new(&image, 5 * 4096, data.len() as u64),
        Err(VerityError::RegionOutside { .. })
    ));
    assert!(matches!(
        ImageRegion::new(&image, u64::MAX, 2),
        Err(VerityError::RegionOutside { .. })
    ));

    // A read error surfaces with the offset it happened at.
    let failing = FailingImage {
        data: data.clone(),
        fail_from: 300 * 4096 + 1,
    };
    let region = ImageRegion::new(&failing, 0, data.len() as u64).unwrap();
    match verity::hash_tree_of(&region, 4096, "sha256", b"") {
        Err(VerityError::Read { offset, .. }) => assert!(offset >= 300 * 4096, "{offset}"),
        other => panic!("expected a read error, got {other:?}"),
    }
    match verity::fec_of(&region, 2, 4096) {
        Err(VerityError::Read { offset, .. }) => assert!(offset >= 300 * 4096, "{offset}"),
        other => panic!("expected a read error, got {other:?}"),
    }
}
