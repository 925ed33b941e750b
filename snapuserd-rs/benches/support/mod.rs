//! What the read-path benches share: a v3 lz4 COW that replaces every block of an image,
//! its payloads held in memory for the bare-decompression side, random block picks and the
//! environment knobs.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use cow_format::WriterOptions;
use cow_format::{Compression, CompressionAlgorithm, CowReader, CowVersion, CowWriter};

/// Block size.
pub const BS: usize = 4096;
/// Reads per criterion iteration and per summary pass.
pub const PASS: usize = 256;

/// A v3 lz4 COW replacing every block of an image over an all-zero base, in a temporary
/// folder, with each op's payload read back into memory.
pub struct Lz4Cow {
    /// The COW file.
    pub cow: PathBuf,
    /// The base image (zeros, as large as the image).
    pub base: PathBuf,
    /// Blocks of the image.
    pub blocks: usize,
    /// Compressed payload and "stored raw" of each op.
    pub payloads: Vec<(Vec<u8>, bool)>,
    /// Op index of each block.
    pub op_of_block: Vec<usize>,
    /// Bytes each op decompresses to.
    pub unit_bytes: Vec<usize>,
    _dir: tempfile::TempDir,
}

impl Lz4Cow {
    /// Write the COW of `data` with compression factor `factor` and load its payloads.
    pub fn write(data: &[u8], factor: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cow = dir.path().join("bench.cow");
        let base = dir.path().join("base.img");
        let blocks = data.len() / BS;
        fs::write(&base, vec![0u8; data.len()]).expect("base");
        let opts = WriterOptions {
            version: CowVersion::V3,
            compression: Compression {
                algorithm: CompressionAlgorithm::Lz4,
                level: None,
            },
            compression_factor: factor,
            op_count_max: Some(blocks as u64 + 16),
            ..WriterOptions::default()
        };
        let mut w = CowWriter::create(fs::File::create(&cow).expect("cow"), opts).expect("writer");
        w.add_replace(0, data).expect("replace");
        w.finalize().expect("finalize");

        let reader = CowReader::open(fs::File::open(&cow).expect("open")).expect("reader");
        let file = fs::File::open(&cow).expect("open");
        let mut payloads = Vec::new();
        let mut unit_bytes = Vec::new();
        let mut op_of_block = vec![usize::MAX; blocks];
        for (i, op) in reader.ops().iter().enumerate() {
            let mut p = vec![0u8; op.data_length as usize];
            file.read_exact_at(&mut p, op.data_offset).expect("payload");
            payloads.push((p, op.stored_raw));
            unit_bytes.push(op.num_blocks as usize * BS);
            for b in op.new_block..op.new_block + op.num_blocks {
                op_of_block[b as usize] = i;
            }
        }
        Self {
            cow,
            base,
            blocks,
            payloads,
            op_of_block,
            unit_bytes,
            _dir: dir,
        }
    }

    /// The bare side: decompress (`lz4_flex`) the in-memory payload of each block's op.
    pub fn read_bare(&self, blocks: &[usize], unit: &mut [u8]) -> u64 {
        let mut acc = 0u64;
        for &b in blocks {
            let op = self.op_of_block[b];
            let (p, raw) = &self.payloads[op];
            let n = self.unit_bytes[op];
            if *raw {
                unit[..n].copy_from_slice(p);
            } else {
                let got = lz4_flex::block::decompress_into(p, &mut unit[..n]).expect("lz4");
                assert_eq!(got, n);
            }
            acc = acc.wrapping_add(u64::from(unit[b % BS]));
        }
        acc
    }
}

/// `n` pseudo-random block indexes below `blocks`, from `seed`.
pub fn random_blocks(n: usize, blocks: usize, seed: u64) -> Vec<usize> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks as u64) as usize
        })
        .collect()
}

/// Nanoseconds per read of `d` over `rounds` summary passes.
pub fn ns_per_read(d: Duration, rounds: usize) -> f64 {
    d.as_nanos() as f64 / (rounds * PASS) as f64
}

/// Print the summary line of `name`: the read path `path` (took `t_path`) against bare
/// lz4_flex (took `t_bare`) over `rounds` passes, with the bare time as a share of it.
pub fn print_versus_bare(
    name: &str,
    path: &str,
    rounds: usize,
    t_path: Duration,
    t_bare: Duration,
) {
    let mbs = |d: Duration| (rounds * PASS * BS) as f64 / d.as_secs_f64() / 1e6;
    println!(
        "{name}: {path} {:.0} ns/read ({:.0} MB/s), bare lz4_flex {:.0} ns/read ({:.0} MB/s): {path} = {:.1}% of bare",
        ns_per_read(t_path, rounds),
        mbs(t_path),
        ns_per_read(t_bare, rounds),
        mbs(t_bare),
        100.0 * t_bare.as_secs_f64() / t_path.as_secs_f64()
    );
}

/// The environment variable `name` as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
