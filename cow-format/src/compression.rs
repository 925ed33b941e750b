//! Payload compression: the algorithms of fact sheet §7 with AOSP's framing,
//! and the per-version "stored raw" rules (§7.2).
//!
//! * gz: zlib stream (RFC 1950), default level 9.
//! * brotli: raw brotli stream, quality 11, window 22 by default.
//! * lz4: raw LZ4 block (no frame, no size prefix).
//! * zstd: zstd frame with content size and no checksum; default level 3.
//!
//! Decompression is bounded by the caller's output buffer: it never writes or
//! allocates beyond `out.len()`, and succeeds only if it produces exactly
//! `out.len()` bytes. lz4/zstd input must decode to exactly that size; gz and
//! brotli streams may carry trailing input once the output is full (AOSP's
//! stream decoders stop there too), but a stream that ends early, or input
//! that runs out before the output is full, is an error.

use std::cell::RefCell;
use std::fmt;
use std::io::Read;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::op::CowVersion;

/// Compression algorithm ids as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionAlgorithm {
    /// Stored uncompressed.
    #[default]
    None = 0,
    /// zlib stream.
    Gz = 1,
    /// Raw brotli stream.
    Brotli = 2,
    /// Raw LZ4 block.
    Lz4 = 3,
    /// zstd frame.
    Zstd = 4,
}

impl CompressionAlgorithm {
    /// Every algorithm, in id order.
    pub const ALL: [CompressionAlgorithm; 5] =
        [Self::None, Self::Gz, Self::Brotli, Self::Lz4, Self::Zstd];

    /// Decode an on-disk id.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Self::None),
            1 => Some(Self::Gz),
            2 => Some(Self::Brotli),
            3 => Some(Self::Lz4),
            4 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The on-disk id.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The option-string name ("none", "gz", "brotli", "lz4", "zstd").
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gz => "gz",
            Self::Brotli => "brotli",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }

    /// AOSP's default level for this algorithm (none/lz4: 0, meaning "no level").
    pub fn default_level(self) -> i32 {
        match self {
            Self::None | Self::Lz4 => 0,
            Self::Gz => 9,
            Self::Brotli => 11,
            Self::Zstd => 3,
        }
    }

    /// Check that `level` is valid for this algorithm.
    pub fn check_level(self, level: i32) -> Result<(), CompressionError> {
        let ok = match self {
            // No level exists; any value is accepted and ignored, as AOSP does.
            Self::None | Self::Lz4 => true,
            Self::Gz => (0..=9).contains(&level),
            Self::Brotli => (0..=11).contains(&level),
            Self::Zstd => zstd::compression_level_range().contains(&level),
        };
        if ok {
            Ok(())
        } else {
            Err(CompressionError::BadLevel {
                algorithm: self,
                level,
            })
        }
    }
}

impl fmt::Display for CompressionAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An algorithm plus an optional level (None = the algorithm's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Compression {
    /// The algorithm.
    pub algorithm: CompressionAlgorithm,
    /// The level, if one was given.
    pub level: Option<i32>,
}

impl Compression {
    /// The level to use: the given one or the algorithm's default.
    pub fn effective_level(&self) -> i32 {
        self.level.unwrap_or_else(|| self.algorithm.default_level())
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level {
            Some(l) => write!(f, "{},{}", self.algorithm, l),
            None => write!(f, "{}", self.algorithm),
        }
    }
}

impl FromStr for Compression {
    type Err = CompressionError;

    /// Parse AOSP's option syntax: `""`, `"none"`, `"gz"`, `"brotli"`, `"lz4"`,
    /// `"zstd"`, each optionally followed by `",LEVEL"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, level) = match s.split_once(',') {
            Some((n, l)) => {
                let level = l
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| CompressionError::BadSpec(s.to_string()))?;
                (n.trim(), Some(level))
            }
            None => (s.trim(), None),
        };
        let algorithm = match name {
            "" | "none" => CompressionAlgorithm::None,
            "gz" => CompressionAlgorithm::Gz,
            "brotli" => CompressionAlgorithm::Brotli,
            "lz4" => CompressionAlgorithm::Lz4,
            "zstd" => CompressionAlgorithm::Zstd,
            _ => return Err(CompressionError::BadSpec(s.to_string())),
        };
        if let Some(l) = level {
            algorithm.check_level(l)?;
        }
        Ok(Self { algorithm, level })
    }
}

/// Errors from compressing or decompressing a payload.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CompressionError {
    /// A compression option string could not be parsed.
    #[error("invalid compression spec {0:?} (expected none|gz|brotli|lz4|zstd[,LEVEL])")]
    BadSpec(String),
    /// A level outside the algorithm's range.
    #[error("compression level {level} is not valid for {algorithm}")]
    BadLevel {
        /// Algorithm.
        algorithm: CompressionAlgorithm,
        /// Level given.
        level: i32,
    },
    /// An algorithm id that is not defined.
    #[error("unknown compression algorithm id {0}")]
    UnknownAlgorithm(u32),
    /// The compressor failed.
    #[error("{algorithm} compression failed")]
    Compress {
        /// Algorithm.
        algorithm: CompressionAlgorithm,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// The payload is not a valid stream for the algorithm.
    #[error("{algorithm} payload is corrupt")]
    Corrupt {
        /// Algorithm.
        algorithm: CompressionAlgorithm,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// A brotli stream whose window is larger than AOSP's 22 bits (or the large-window
    /// extension): decoding it could allocate more than 4 MiB.
    #[error("brotli stream declares a window of {bits:?} bits (at most {max} accepted)")]
    BrotliWindow {
        /// Window bits declared (`None`: empty stream or large-window marker).
        bits: Option<u32>,
        /// Largest window accepted.
        max: u32,
    },
    /// The zlib decoder reported a position outside its buffers.
    #[error("gz decoder position out of range")]
    ZlibPosition,
    /// This thread's zstd decompression context could not be kept.
    #[error("no zstd decompression context")]
    NoZstdContext,
    /// The payload decoded to a different size than declared.
    #[error("{algorithm} payload decoded to {got} bytes, expected {expected}")]
    SizeMismatch {
        /// Algorithm.
        algorithm: CompressionAlgorithm,
        /// Bytes produced (a lower bound when the stream was too long).
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// An uncompressed payload whose length is not the declared size.
    #[error("raw payload is {got} bytes, expected {expected}")]
    RawSizeMismatch {
        /// Payload length.
        got: usize,
        /// Expected length.
        expected: usize,
    },
}

/// A codec library's own error, shared so that [`CompressionError`] stays `Clone`. Two are
/// equal when they print the same.
#[derive(Debug, Clone)]
pub struct CodecError(Arc<dyn std::error::Error + Send + Sync>);

impl CodecError {
    fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        CodecError(Arc::new(e))
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for CodecError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.to_string() == other.to_string()
    }
}

impl Eq for CodecError {}

/// Compress `input` with `algorithm` at `level` (None = default), appending
/// the stored stream to `out`. zstd uses a window of the smallest power of two
/// ≥ `input.len()` (AOSP: log2 of the uncompressed unit); use
/// [`compress_with_window`] to set it explicitly.
///
/// Deterministic: the same input and level always give the same bytes.
pub fn compress(
    algorithm: CompressionAlgorithm,
    level: Option<i32>,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CompressionError> {
    compress_with_window(algorithm, level, None, input, out)
}

/// Smallest windowLog zstd supports.
const ZSTD_MIN_WINDOW_LOG: u32 = 10;
/// Largest windowLog we use or accept when decoding (256 KiB units need 18).
const ZSTD_MAX_WINDOW_LOG: u32 = 27;
/// Brotli window (lgwin) AOSP uses.
const BROTLI_WINDOW: u32 = 22;

/// Like [`compress`], with an explicit zstd windowLog (ignored by the other
/// algorithms). `None` picks log2 of `input.len()` rounded up.
pub fn compress_with_window(
    algorithm: CompressionAlgorithm,
    level: Option<i32>,
    zstd_window_log: Option<u32>,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CompressionError> {
    let level = level.unwrap_or_else(|| algorithm.default_level());
    algorithm.check_level(level)?;
    let fail = |e: CodecError| CompressionError::Compress {
        algorithm,
        source: e,
    };
    match algorithm {
        CompressionAlgorithm::None => out.extend_from_slice(input),
        CompressionAlgorithm::Gz => {
            // Level is 0..=9 (checked above).
            let level = u32::try_from(level).map_err(|e| fail(CodecError::new(e)))?;
            let mut enc = flate2::write::ZlibEncoder::new(
                std::mem::take(out),
                flate2::Compression::new(level),
            );
            std::io::Write::write_all(&mut enc, input).map_err(|e| fail(CodecError::new(e)))?;
            *out = enc.finish().map_err(|e| fail(CodecError::new(e)))?;
        }
        CompressionAlgorithm::Brotli => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: level,
                lgwin: BROTLI_WINDOW as i32,
                mode: brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_GENERIC,
                size_hint: input.len(),
                ..Default::default()
            };
            let mut reader = input;
            brotli::BrotliCompress(&mut reader, out, &params)
                .map_err(|e| fail(CodecError::new(e)))?;
        }
        CompressionAlgorithm::Lz4 => {
            let start = out.len();
            let bound = lz4_flex::block::get_maximum_output_size(input.len());
            out.resize(start + bound, 0);
            let n = lz4_flex::block::compress_into(input, &mut out[start..])
                .map_err(|e| fail(CodecError::new(e)))?;
            out.truncate(start + n);
        }
        CompressionAlgorithm::Zstd => {
            let window = match zstd_window_log {
                Some(w) => w,
                None => usize::BITS - input.len().saturating_sub(1).leading_zeros(),
            }
            .clamp(ZSTD_MIN_WINDOW_LOG, ZSTD_MAX_WINDOW_LOG);
            let mut c = zstd::bulk::Compressor::new(level).map_err(|e| fail(CodecError::new(e)))?;
            use zstd::zstd_safe::CParameter;
            c.set_parameter(CParameter::WindowLog(window))
                .map_err(|e| fail(CodecError::new(e)))?;
            c.set_parameter(CParameter::ContentSizeFlag(true))
                .map_err(|e| fail(CodecError::new(e)))?;
            c.set_parameter(CParameter::ChecksumFlag(false))
                .map_err(|e| fail(CodecError::new(e)))?;
            let start = out.len();
            out.resize(start + zstd::zstd_safe::compress_bound(input.len()), 0);
            let n = c
                .compress_to_buffer(input, &mut out[start..])
                .map_err(|e| fail(CodecError::new(e)))?;
            out.truncate(start + n);
        }
    }
    Ok(())
}

thread_local! {
    static ZSTD_DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompress `input` into exactly `out.len()` bytes.
///
/// `CompressionAlgorithm::None` copies `input`, which must be exactly
/// `out.len()` bytes. Never writes past `out` and never allocates in
/// proportion to `input` or to sizes claimed inside the stream.
pub fn decompress(
    algorithm: CompressionAlgorithm,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), CompressionError> {
    let expected = out.len();
    let corrupt = |e: CodecError| CompressionError::Corrupt {
        algorithm,
        source: e,
    };
    let short = |got: usize| CompressionError::SizeMismatch {
        algorithm,
        got,
        expected,
    };
    match algorithm {
        CompressionAlgorithm::None => {
            if input.len() != expected {
                return Err(CompressionError::RawSizeMismatch {
                    got: input.len(),
                    expected,
                });
            }
            out.copy_from_slice(input);
        }
        CompressionAlgorithm::Lz4 => {
            let n = lz4_flex::block::decompress_into(input, out)
                .map_err(|e| corrupt(CodecError::new(e)))?;
            if n != expected {
                return Err(short(n));
            }
        }
        CompressionAlgorithm::Zstd => {
            let n = ZSTD_DCTX.with(|cell| -> Result<usize, CompressionError> {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    let mut d =
                        zstd::bulk::Decompressor::new().map_err(|e| corrupt(CodecError::new(e)))?;
                    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                        ZSTD_MAX_WINDOW_LOG,
                    ))
                    .map_err(|e| corrupt(CodecError::new(e)))?;
                    *slot = Some(d);
                }
                match slot.as_mut() {
                    Some(d) => d
                        .decompress_to_buffer(input, out)
                        .map_err(|e| corrupt(CodecError::new(e))),
                    None => Err(CompressionError::NoZstdContext),
                }
            })?;
            if n != expected {
                return Err(short(n));
            }
        }
        CompressionAlgorithm::Gz => inflate_zlib(input, out)?,
        CompressionAlgorithm::Brotli => {
            // The decoder sizes its ring buffer from the stream's window, not
            // from our output: refuse windows above AOSP's 22 bits so a hostile
            // payload cannot make it allocate more than 4 MiB.
            match brotli_window_bits(input) {
                Some(bits) if bits <= BROTLI_WINDOW => {}
                other => {
                    return Err(CompressionError::BrotliWindow {
                        bits: other,
                        max: BROTLI_WINDOW,
                    })
                }
            }
            let mut dec = brotli::Decompressor::new(input, 4096);
            let mut filled = 0;
            while filled < expected {
                match dec.read(&mut out[filled..]) {
                    Ok(0) => return Err(short(filled)),
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(corrupt(CodecError::new(e))),
                }
            }
        }
    }
    Ok(())
}

/// Window size (WBITS) declared by the first bits of a brotli stream
/// (RFC 7932 §9.1); `None` for an empty input or the large-window marker.
fn brotli_window_bits(input: &[u8]) -> Option<u32> {
    let b0 = u32::from(*input.first()?);
    if b0 & 1 == 0 {
        return Some(16);
    }
    let n = (b0 >> 1) & 0x7;
    if n != 0 {
        return Some(17 + n);
    }
    match (b0 >> 4) & 0x7 {
        0 => Some(17),
        1 => None,
        m => Some(8 + m),
    }
}

/// Inflate a zlib stream into exactly `out.len()` bytes, stopping when the
/// output is full (trailing input is tolerated, as in AOSP).
fn inflate_zlib(input: &[u8], out: &mut [u8]) -> Result<(), CompressionError> {
    let algorithm = CompressionAlgorithm::Gz;
    let expected = out.len();
    let mut z = flate2::Decompress::new(true);
    loop {
        let in_pos = usize::try_from(z.total_in()).unwrap_or(usize::MAX);
        let out_pos = usize::try_from(z.total_out()).unwrap_or(usize::MAX);
        let (Some(src), Some(dst)) = (input.get(in_pos..), out.get_mut(out_pos..)) else {
            return Err(CompressionError::ZlibPosition);
        };
        if dst.is_empty() {
            return Ok(());
        }
        let status = z
            .decompress(src, dst, flate2::FlushDecompress::None)
            .map_err(|e| CompressionError::Corrupt {
                algorithm,
                source: CodecError::new(e),
            })?;
        let new_out = usize::try_from(z.total_out()).unwrap_or(usize::MAX);
        let new_in = usize::try_from(z.total_in()).unwrap_or(usize::MAX);
        match status {
            flate2::Status::StreamEnd => {
                if new_out == expected {
                    return Ok(());
                }
                return Err(CompressionError::SizeMismatch {
                    algorithm,
                    got: new_out,
                    expected,
                });
            }
            _ if new_out == out_pos && new_in == in_pos => {
                // No progress: input exhausted (or stalled) before the output filled.
                return Err(CompressionError::SizeMismatch {
                    algorithm,
                    got: new_out,
                    expected,
                });
            }
            _ => {}
        }
    }
}

/// How a stored payload must be decoded (fact sheet §7.2).
///
/// `algorithm` is the op's (v2) or the header's (v3) algorithm,
/// `data_length` the stored length, `uncompressed` the size the payload
/// decodes to (`block_size` for v2, `block_size << k` for v3).
/// Returns the algorithm to decode with: `None` means "copy raw".
pub fn effective_algorithm(
    version: CowVersion,
    algorithm: CompressionAlgorithm,
    data_length: u64,
    uncompressed: u64,
) -> CompressionAlgorithm {
    use CompressionAlgorithm as A;
    match version {
        CowVersion::V2 => match algorithm {
            A::Lz4 | A::Zstd if data_length == uncompressed => A::None,
            other => other,
        },
        CowVersion::V3 => {
            if data_length == uncompressed {
                A::None
            } else {
                algorithm
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Vec<u8> {
        let mut v = b"This is some data, believe it".to_vec();
        v.resize(4096, 0);
        v
    }

    #[test]
    fn parse_specs() {
        let c: Compression = "zstd,-5".parse().unwrap();
        assert_eq!(c.algorithm, CompressionAlgorithm::Zstd);
        assert_eq!(c.level, Some(-5));
        assert_eq!(
            "".parse::<Compression>().unwrap().algorithm,
            CompressionAlgorithm::None
        );
        assert_eq!(
            "none".parse::<Compression>().unwrap(),
            Compression::default()
        );
        assert_eq!("gz".parse::<Compression>().unwrap().effective_level(), 9);
        assert_eq!("lz4,1".parse::<Compression>().unwrap().level, Some(1));
        assert!("gz,10".parse::<Compression>().is_err());
        assert!("brotli,12".parse::<Compression>().is_err());
        assert!("xz".parse::<Compression>().is_err());
        assert!("zstd,abc".parse::<Compression>().is_err());
        assert_eq!(
            "brotli,5".parse::<Compression>().unwrap().to_string(),
            "brotli,5"
        );
        for a in CompressionAlgorithm::ALL {
            assert_eq!(CompressionAlgorithm::from_id(a.id()), Some(a));
            assert_eq!(a.name().parse::<Compression>().unwrap().algorithm, a);
        }
        assert_eq!(CompressionAlgorithm::from_id(5), None);
    }

    #[test]
    fn fact_sheet_vectors_round_trip() {
        let input = vector();
        for a in CompressionAlgorithm::ALL {
            let mut c = Vec::new();
            compress(a, None, &input, &mut c).unwrap();
            let mut out = vec![0u8; 4096];
            decompress(a, &c, &mut out).unwrap();
            assert_eq!(out, input, "{a}");
            match a {
                // Same C library as AOSP: exact size.
                CompressionAlgorithm::Zstd => assert_eq!(c.len(), 47),
                CompressionAlgorithm::Gz => assert_eq!(&c[..2], &[0x78, 0xDA]),
                CompressionAlgorithm::None => assert_eq!(c.len(), 4096),
                _ => assert!(c.len() < 100, "{a}: {}", c.len()),
            }
        }
    }

    #[test]
    fn zstd_frame_has_content_size_and_no_checksum() {
        let mut c = Vec::new();
        compress(CompressionAlgorithm::Zstd, None, &vector(), &mut c).unwrap();
        assert_eq!(&c[..4], &[0x28, 0xB5, 0x2F, 0xFD]);
        let fhd = c[4];
        assert_ne!(fhd >> 6, 0, "content size flag");
        assert_eq!(fhd & 0x04, 0, "checksum flag");
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let input = vector();
        for a in CompressionAlgorithm::ALL {
            let mut c = Vec::new();
            compress(a, None, &input, &mut c).unwrap();
            let mut small = vec![0u8; 4095];
            let r = decompress(a, &c, &mut small);
            if matches!(a, CompressionAlgorithm::Gz | CompressionAlgorithm::Brotli) {
                // Stream decoders stop once the output is full (AOSP behaviour).
                assert!(r.is_ok(), "{a} small");
                assert_eq!(&small[..], &input[..4095]);
            } else {
                assert!(r.is_err(), "{a} small");
            }
            let mut big = vec![0u8; 4097];
            assert!(decompress(a, &c, &mut big).is_err(), "{a} big");
            if !c.is_empty() {
                let mut out = vec![0u8; 4096];
                let cut = &c[..c.len() / 2];
                assert!(decompress(a, cut, &mut out).is_err(), "{a} truncated");
            }
        }
    }

    #[test]
    fn gz_and_brotli_tolerate_trailing_input_once_full() {
        let input = vector();
        for a in [CompressionAlgorithm::Gz, CompressionAlgorithm::Brotli] {
            let mut c = Vec::new();
            compress(a, None, &input, &mut c).unwrap();
            c.extend_from_slice(b"trailing junk");
            let mut out = vec![0u8; 4096];
            decompress(a, &c, &mut out).unwrap();
            assert_eq!(out, input);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut seed = 0x1234_5678_u32;
        for len in [0usize, 1, 2, 5, 17, 100, 4096] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            for a in CompressionAlgorithm::ALL {
                let mut out = vec![0u8; 4096];
                let r = decompress(a, &junk, &mut out);
                if a != CompressionAlgorithm::None || len != 4096 {
                    assert!(r.is_err(), "{a} len {len}");
                }
            }
        }
    }

    #[test]
    fn incompressible_data_round_trips() {
        let mut seed = 7u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for a in CompressionAlgorithm::ALL {
            let mut c = Vec::new();
            compress(a, None, &data, &mut c).unwrap();
            let mut out = vec![0u8; data.len()];
            decompress(a, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn brotli_windows_above_22_bits_are_refused() {
        let input = vector();
        for (lgwin, ok) in [
            (10, true),
            (16, true),
            (17, true),
            (22, true),
            (23, false),
            (24, false),
        ] {
            let params = brotli::enc::BrotliEncoderParams {
                quality: 5,
                lgwin,
                ..Default::default()
            };
            let mut c = Vec::new();
            brotli::BrotliCompress(&mut &input[..], &mut c, &params).unwrap();
            assert_eq!(brotli_window_bits(&c), Some(lgwin as u32), "lgwin {lgwin}");
            let mut out = vec![0u8; 4096];
            let result = decompress(CompressionAlgorithm::Brotli, &c, &mut out);
            assert_eq!(result.is_ok(), ok, "lgwin {lgwin}");
            if !ok {
                assert_eq!(
                    result,
                    Err(CompressionError::BrotliWindow {
                        bits: Some(lgwin as u32),
                        max: 22
                    })
                );
            }
        }
    }

    #[test]
    fn corrupt_payloads_keep_the_codec_error_as_their_source() {
        use std::error::Error as _;
        let mut out = vec![0u8; 4096];
        for a in [CompressionAlgorithm::Lz4, CompressionAlgorithm::Zstd] {
            let err = decompress(a, &[0xFF; 64], &mut out).unwrap_err();
            assert!(
                matches!(&err, CompressionError::Corrupt { algorithm, .. } if *algorithm == a),
                "{err:?}"
            );
            let cause = err.source().expect("the codec error is the source");
            assert!(!err.to_string().contains(&cause.to_string()), "{err}");
        }
    }

    #[test]
    fn stored_raw_rules() {
        use CompressionAlgorithm as A;
        assert_eq!(
            effective_algorithm(CowVersion::V2, A::Lz4, 4096, 4096),
            A::None
        );
        assert_eq!(
            effective_algorithm(CowVersion::V2, A::Zstd, 4096, 4096),
            A::None
        );
        assert_eq!(
            effective_algorithm(CowVersion::V2, A::Gz, 4096, 4096),
            A::Gz
        );
        assert_eq!(
            effective_algorithm(CowVersion::V2, A::Brotli, 4096, 4096),
            A::Brotli
        );
        assert_eq!(
            effective_algorithm(CowVersion::V2, A::Lz4, 100, 4096),
            A::Lz4
        );
        assert_eq!(
            effective_algorithm(CowVersion::V3, A::Gz, 16384, 16384),
            A::None
        );
        assert_eq!(
            effective_algorithm(CowVersion::V3, A::Gz, 4096, 16384),
            A::Gz
        );
        assert_eq!(
            effective_algorithm(CowVersion::V3, A::None, 4096, 4096),
            A::None
        );
    }
}
