//! Writer options and their validation.

use crate::compression::{Compression, CompressionAlgorithm};
use crate::layout::{
    self, BUFFER_REGION_DEFAULT_SIZE, DEFAULT_BLOCK_SIZE, DEFAULT_CLUSTER_OPS,
    MAX_COMPRESSION_FACTOR, MAX_COMPRESSION_SHIFT, MAX_V3_OP_COUNT_MAX, MIN_COMPRESSION_FACTOR,
};
use crate::op::CowVersion;

use super::WriteError;

/// Default v3 compression factor of this writer (64 KiB; AOSP's default is 4 KiB).
pub const DEFAULT_COMPRESSION_FACTOR: u32 = 65536;

/// How a COW file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriterOptions {
    /// Format version.
    pub version: CowVersion,
    /// Bytes per block: a power of two in 512..=32768 (4096 for snapuserd).
    pub block_size: u32,
    /// Payload compression (algorithm and optional level).
    pub compression: Compression,
    /// v3 only: largest uncompressed payload of one REPLACE op in bytes, a
    /// power of two in 4096..=262144, at least `block_size` and at most
    /// 64 blocks. Ignored for v2.
    pub compression_factor: u32,
    /// v2 only: op slots per cluster; 0 (unclustered) or ≥ 2. Ignored for v3.
    pub cluster_ops: u32,
    /// Reserve the 2 MiB scratch region (zero-filled) after the header.
    pub scratch: bool,
    /// v3 only, required there: capacity of the op area in records (< 2^32).
    /// Every COPY/ZERO/XOR block and every REPLACE chunk takes one record.
    pub op_count_max: Option<u64>,
    /// Initial `num_merge_ops` header value (0 in production; AOSP's test
    /// files use other values).
    pub num_merge_ops: u64,
    /// Accept several ops for the same new block (AOSP's writer does; its
    /// merge then applies the first op only). Off by default: a second op
    /// for a block is refused with `WriteError::DuplicateBlock`.
    pub allow_duplicate_blocks: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            version: CowVersion::V2,
            block_size: DEFAULT_BLOCK_SIZE,
            compression: Compression::default(),
            compression_factor: DEFAULT_COMPRESSION_FACTOR,
            cluster_ops: DEFAULT_CLUSTER_OPS,
            scratch: true,
            op_count_max: None,
            num_merge_ops: 0,
            allow_duplicate_blocks: false,
        }
    }
}

fn invalid(option: &'static str, value: impl ToString, reason: &'static str) -> WriteError {
    WriteError::InvalidOption {
        option,
        value: value.to_string(),
        reason,
    }
}

/// Parse a compression option given by a user (`none`, `gz`, `brotli`, `lz4` or `zstd`,
/// optionally `,LEVEL`), strictly: unlike the [`Compression`] `FromStr` (AOSP's option
/// syntax, where an empty string means none and a level for lz4 is ignored), an empty
/// option and a level for an algorithm without levels are errors, so nothing the user typed
/// is silently dropped.
pub fn parse_compression_option(spec: &str) -> Result<Compression, WriteError> {
    if spec.trim().is_empty() {
        return Err(invalid(
            "compression",
            spec,
            "empty; name an algorithm: none, gz, brotli, lz4 or zstd",
        ));
    }
    let compression: Compression = spec
        .parse()
        .map_err(|_| invalid("compression", spec, COMPRESSION_SYNTAX))?;
    if compression.level.is_some()
        && matches!(
            compression.algorithm,
            CompressionAlgorithm::None | CompressionAlgorithm::Lz4
        )
    {
        return Err(invalid(
            "compression",
            spec,
            "none and lz4 take no level (gz 0-9, brotli 0-11 and zstd up to 22 do)",
        ));
    }
    Ok(compression)
}

const COMPRESSION_SYNTAX: &str =
    "expected none, gz, brotli, lz4 or zstd, optionally with a level: gz,0-9 brotli,0-11 zstd,LEVEL (up to 22)";

impl WriterOptions {
    /// Check every field against the format rules.
    pub fn validate(&self) -> Result<(), WriteError> {
        if layout::validate_block_size(self.block_size).is_err() {
            return Err(invalid(
                "block_size",
                self.block_size,
                "must be a power of two in 512..=32768",
            ));
        }
        let algorithm = self.compression.algorithm;
        if let Some(level) = self.compression.level {
            if algorithm.check_level(level).is_err() {
                return Err(invalid(
                    "compression level",
                    level,
                    "outside the algorithm's range",
                ));
            }
        }
        match self.version {
            CowVersion::V2 => {
                if self.cluster_ops == 1 {
                    return Err(invalid("cluster_ops", 1, "must be 0 or at least 2"));
                }
                // The cluster's op area must stay addressable.
                if u64::from(self.cluster_ops) * 20 > u64::from(u32::MAX) {
                    return Err(invalid("cluster_ops", self.cluster_ops, "too large"));
                }
            }
            CowVersion::V3 => {
                let f = self.compression_factor;
                if !f.is_power_of_two()
                    || !(MIN_COMPRESSION_FACTOR..=MAX_COMPRESSION_FACTOR).contains(&f)
                    || f < self.block_size
                    || f > self.block_size << MAX_COMPRESSION_SHIFT
                {
                    return Err(invalid(
                        "compression_factor",
                        f,
                        "must be a power of two in 4096..=262144, ≥ block_size and ≤ 64 blocks",
                    ));
                }
                match self.op_count_max {
                    None => {
                        return Err(invalid(
                            "op_count_max",
                            "none",
                            "a v3 file needs its op capacity up front",
                        ))
                    }
                    Some(m) if m > MAX_V3_OP_COUNT_MAX => {
                        return Err(invalid("op_count_max", m, "must be below 2^32"))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Size of the scratch region these options reserve.
    pub fn buffer_size(&self) -> u32 {
        if self.scratch {
            BUFFER_REGION_DEFAULT_SIZE
        } else {
            0
        }
    }

    /// Op records `add_replace` of `num_blocks` blocks produces with these
    /// options (v2: one per block; v3: the chunking of §7.3). COPY, ZERO and
    /// XOR take one record per block. Use it to size v3 `op_count_max`.
    pub fn replace_records(&self, num_blocks: u64) -> u64 {
        let max = self.max_blocks_per_op();
        // max is a power of two: full chunks, then one op per set bit of the rest.
        num_blocks / max + u64::from((num_blocks % max).count_ones())
    }

    /// Blocks one v3 REPLACE op may cover (compression factor / block size).
    pub(crate) fn max_blocks_per_op(&self) -> u64 {
        match self.version {
            CowVersion::V2 => 1,
            CowVersion::V3 => u64::from(self.compression_factor / self.block_size).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> WriterOptions {
        WriterOptions {
            version: CowVersion::V3,
            op_count_max: Some(10),
            ..WriterOptions::default()
        }
    }

    #[test]
    fn defaults_are_valid_v2() {
        WriterOptions::default().validate().unwrap();
        assert_eq!(WriterOptions::default().buffer_size(), 2 * 1024 * 1024);
    }

    #[test]
    fn cluster_ops_one_is_rejected() {
        let o = WriterOptions {
            cluster_ops: 1,
            ..WriterOptions::default()
        };
        assert!(matches!(
            o.validate(),
            Err(WriteError::InvalidOption {
                option: "cluster_ops",
                ..
            })
        ));
        let o = WriterOptions {
            cluster_ops: 0,
            ..WriterOptions::default()
        };
        o.validate().unwrap();
    }

    #[test]
    fn v3_needs_op_count_max_below_2_32() {
        let mut o = v3();
        o.validate().unwrap();
        o.op_count_max = None;
        assert!(o.validate().is_err());
        o.op_count_max = Some(1 << 32);
        assert!(o.validate().is_err());
        o.op_count_max = Some(u32::MAX.into());
        o.validate().unwrap();
    }

    #[test]
    fn v3_factor_rules() {
        for f in [4096u32, 8192, 16384, 32768, 65536, 131072, 262144] {
            let o = WriterOptions {
                compression_factor: f,
                ..v3()
            };
            o.validate().unwrap();
            assert_eq!(o.max_blocks_per_op(), u64::from(f / 4096));
        }
        for f in [0u32, 2048, 4095, 12288, 524288] {
            let o = WriterOptions {
                compression_factor: f,
                ..v3()
            };
            assert!(o.validate().is_err(), "factor {f} accepted");
        }
        // 512-byte blocks: 256 KiB would be 512 blocks, beyond k = 6.
        let o = WriterOptions {
            block_size: 512,
            compression_factor: 262144,
            ..v3()
        };
        assert!(o.validate().is_err());
    }

    #[test]
    fn replace_record_counts() {
        let o = WriterOptions {
            compression_factor: 16384,
            ..v3()
        };
        assert_eq!(o.replace_records(7), 3); // 4 + 2 + 1
        assert_eq!(o.replace_records(8), 2);
        assert_eq!(o.replace_records(0), 0);
        assert_eq!(WriterOptions::default().replace_records(7), 7);
        for n in 0..200u64 {
            let data = vec![0u8; n as usize * 4096];
            let p = super::super::prepare_replace(&o, 0, &data).unwrap();
            assert_eq!(p.op_count(), o.replace_records(n), "{n} blocks");
        }
    }

    #[test]
    fn compression_option_is_parsed_strictly() {
        let ok = |s: &str| parse_compression_option(s).unwrap().to_string();
        assert_eq!(ok("none"), "none");
        assert_eq!(ok("lz4"), "lz4");
        assert_eq!(ok("zstd,19"), "zstd,19");
        assert_eq!(ok("gz,1"), "gz,1");
        assert_eq!(ok("brotli"), "brotli");
        for bad in [
            "", "  ", "lz4,5", "none,1", "zstd,99", "gz,x", "lzma", "lz4,",
        ] {
            let e = parse_compression_option(bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    WriteError::InvalidOption {
                        option: "compression",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
        let msg = parse_compression_option("lz4,5").unwrap_err().to_string();
        assert!(msg.contains("take no level"), "{msg}");
        let msg = parse_compression_option("").unwrap_err().to_string();
        assert!(msg.contains("empty"), "{msg}");
    }

    #[test]
    fn bad_block_size_and_level() {
        let o = WriterOptions {
            block_size: 4097,
            ..WriterOptions::default()
        };
        assert!(o.validate().is_err());
        let o = WriterOptions {
            compression: "gz".parse().unwrap(),
            ..WriterOptions::default()
        };
        o.validate().unwrap();
        let mut o = o;
        o.compression.level = Some(42);
        assert!(o.validate().is_err());
    }
}
