//! Applying bsdiff patches: classic `BSDIFF40` (three bzip2 streams) and
//! Android's `BSDF2` container (one compressor byte per stream: none, bzip2
//! or brotli). Both carry the same control triples; every 64-bit integer is
//! little-endian sign-magnitude.
//!
//! Streams are decoded incrementally, so a patch never expands past the
//! declared new size (which the caller bounds).

use std::io::Read;

/// Errors applying a bsdiff patch.
#[derive(Debug, thiserror::Error)]
pub enum BsPatchError {
    /// The patch is shorter than its header or its declared streams.
    #[error("patch is truncated ({what})")]
    Truncated {
        /// What was missing.
        what: &'static str,
    },
    /// Unknown magic.
    #[error("patch magic is neither BSDIFF40 nor BSDF2")]
    BadMagic,
    /// A BSDF2 compressor byte other than 0, 1, 2.
    #[error("BSDF2 stream {stream} uses unknown compressor {id}")]
    UnknownCompressor {
        /// Which stream (0 control, 1 diff, 2 extra).
        stream: usize,
        /// The byte found.
        id: u8,
    },
    /// A header or control value is out of range.
    #[error("patch {what} is invalid: {value}")]
    BadValue {
        /// Which value.
        what: &'static str,
        /// The value.
        value: i64,
    },
    /// The patch declares a new size other than the expected one.
    #[error("patch writes {declared} bytes, the operation expects {expected}")]
    SizeMismatch {
        /// Declared by the patch.
        declared: u64,
        /// Expected by the operation.
        expected: u64,
    },
    /// A stream failed to decode.
    #[error("the {stream} stream does not decode")]
    Stream {
        /// Which stream.
        stream: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Stream compressors of the BSDF2 container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCompressor {
    /// Stored.
    None,
    /// bzip2.
    Bzip2,
    /// brotli.
    Brotli,
}

impl StreamCompressor {
    fn from_id(stream: usize, id: u8) -> Result<Self, BsPatchError> {
        match id {
            0 => Ok(Self::None),
            1 => Ok(Self::Bzip2),
            2 => Ok(Self::Brotli),
            _ => Err(BsPatchError::UnknownCompressor { stream, id }),
        }
    }

    /// BSDF2 id byte.
    pub fn id(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Bzip2 => 1,
            Self::Brotli => 2,
        }
    }

    fn reader<'a>(self, data: &'a [u8]) -> Box<dyn Read + 'a> {
        match self {
            Self::None => Box::new(data),
            Self::Bzip2 => Box::new(bzip2::read::BzDecoder::new(data)),
            Self::Brotli => Box::new(brotli::Decompressor::new(data, 4096)),
        }
    }
}

/// Decode a little-endian sign-magnitude 64-bit integer.
pub fn decode_int64(b: &[u8; 8]) -> i64 {
    let raw = u64::from_le_bytes(*b);
    let magnitude = (raw & !(1u64 << 63)) as i64;
    if raw >> 63 == 1 {
        -magnitude
    } else {
        magnitude
    }
}

/// Encode a little-endian sign-magnitude 64-bit integer.
pub fn encode_int64(v: i64) -> [u8; 8] {
    let magnitude = v.unsigned_abs() & !(1u64 << 63);
    let raw = if v < 0 {
        magnitude | (1u64 << 63)
    } else {
        magnitude
    };
    raw.to_le_bytes()
}

/// A parsed patch header.
#[derive(Debug, Clone, Copy)]
pub struct PatchHeader {
    /// Compressor of the control, diff and extra streams.
    pub compressors: [StreamCompressor; 3],
    /// Control stream length.
    pub ctrl_len: u64,
    /// Diff stream length.
    pub diff_len: u64,
    /// Size of the patched output.
    pub new_size: u64,
}

/// Header size of both containers.
pub const PATCH_HEADER_SIZE: usize = 32;

/// Parse the 32-byte header of a BSDIFF40 or BSDF2 patch.
pub fn parse_header(patch: &[u8]) -> Result<PatchHeader, BsPatchError> {
    let header: &[u8; PATCH_HEADER_SIZE] = patch
        .get(..PATCH_HEADER_SIZE)
        .and_then(|h| h.try_into().ok())
        .ok_or(BsPatchError::Truncated { what: "header" })?;
    let compressors = if &header[..8] == b"BSDIFF40" {
        [StreamCompressor::Bzip2; 3]
    } else if &header[..5] == b"BSDF2" {
        [
            StreamCompressor::from_id(0, header[5])?,
            StreamCompressor::from_id(1, header[6])?,
            StreamCompressor::from_id(2, header[7])?,
        ]
    } else {
        return Err(BsPatchError::BadMagic);
    };
    let field = |i: usize, what: &'static str| -> Result<u64, BsPatchError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[8 + 8 * i..16 + 8 * i]);
        let v = decode_int64(&b);
        u64::try_from(v).map_err(|_| BsPatchError::BadValue { what, value: v })
    };
    Ok(PatchHeader {
        compressors,
        ctrl_len: field(0, "control stream length")?,
        diff_len: field(1, "diff stream length")?,
        new_size: field(2, "new size")?,
    })
}

fn read_full(r: &mut dyn Read, buf: &mut [u8], stream: &'static str) -> Result<(), BsPatchError> {
    r.read_exact(buf)
        .map_err(|source| BsPatchError::Stream { stream, source })
}

/// Apply `patch` to `old`, producing exactly `expected_size` bytes.
pub fn apply(old: &[u8], patch: &[u8], expected_size: u64) -> Result<Vec<u8>, BsPatchError> {
    let h = parse_header(patch)?;
    if h.new_size != expected_size {
        return Err(BsPatchError::SizeMismatch {
            declared: h.new_size,
            expected: expected_size,
        });
    }
    let body = &patch[PATCH_HEADER_SIZE..];
    let ctrl_end = usize::try_from(h.ctrl_len)
        .ok()
        .filter(|&e| e <= body.len())
        .ok_or(BsPatchError::Truncated {
            what: "control stream",
        })?;
    let diff_end = usize::try_from(h.diff_len)
        .ok()
        .and_then(|d| ctrl_end.checked_add(d))
        .filter(|&e| e <= body.len())
        .ok_or(BsPatchError::Truncated {
            what: "diff stream",
        })?;
    let mut ctrl = h.compressors[0].reader(&body[..ctrl_end]);
    let mut diff = h.compressors[1].reader(&body[ctrl_end..diff_end]);
    let mut extra = h.compressors[2].reader(&body[diff_end..]);
    let new_len = usize::try_from(h.new_size).map_err(|_| BsPatchError::BadValue {
        what: "new size",
        value: i64::MAX,
    })?;
    let mut new = vec![0u8; new_len];
    let mut new_pos = 0usize;
    let mut old_pos: i64 = 0;
    let old_len = old.len() as i64;
    while new_pos < new_len {
        let mut triple = [0u8; 24];
        read_full(&mut *ctrl, &mut triple, "control")?;
        let get = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&triple[8 * i..8 * i + 8]);
            decode_int64(&b)
        };
        let (diff_n, extra_n, seek) = (get(0), get(1), get(2));
        let room = (new_len - new_pos) as i64;
        if !(0..=room).contains(&diff_n) {
            return Err(BsPatchError::BadValue {
                what: "diff length",
                value: diff_n,
            });
        }
        let diff_n = diff_n as usize;
        let out = &mut new[new_pos..new_pos + diff_n];
        read_full(&mut *diff, out, "diff")?;
        // Add the old bytes that exist under this window; bytes outside the
        // old data add nothing (as classic bspatch).
        let lo = old_pos.clamp(0, old_len);
        let hi = old_pos.saturating_add(diff_n as i64).clamp(0, old_len);
        if lo < hi {
            let out_off = (lo - old_pos) as usize;
            for (o, s) in out[out_off..]
                .iter_mut()
                .zip(&old[lo as usize..hi as usize])
            {
                *o = o.wrapping_add(*s);
            }
        }
        new_pos += diff_n;
        old_pos = old_pos.saturating_add(diff_n as i64);
        let room = (new_len - new_pos) as i64;
        if !(0..=room).contains(&extra_n) {
            return Err(BsPatchError::BadValue {
                what: "extra length",
                value: extra_n,
            });
        }
        let extra_n = extra_n as usize;
        read_full(&mut *extra, &mut new[new_pos..new_pos + extra_n], "extra")?;
        new_pos += extra_n;
        old_pos = old_pos.checked_add(seek).ok_or(BsPatchError::BadValue {
            what: "old seek",
            value: seek,
        })?;
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int64_sign_magnitude_round_trips_and_is_little_endian() {
        for v in [0i64, 1, -1, 300, -300, i64::MAX, -i64::MAX] {
            assert_eq!(decode_int64(&encode_int64(v)), v);
        }
        assert_eq!(encode_int64(-2), [2, 0, 0, 0, 0, 0, 0, 0x80]);
        assert_eq!(decode_int64(&[0x35, 0x02, 0, 0, 0, 0, 0, 0]), 0x235);
    }

    #[test]
    fn stored_bsdf2_patch_applies() {
        let old = b"hello world";
        // ctrl: diff 5 (against "hello"), extra 3 ("!!!"), seek 0.
        let mut ctrl = Vec::new();
        ctrl.extend(encode_int64(5));
        ctrl.extend(encode_int64(3));
        ctrl.extend(encode_int64(0));
        let diff = [0u8, 0, 0, 0, 1];
        let extra = b"!!!";
        let mut p = b"BSDF2\0\0\0".to_vec();
        p.extend(encode_int64(ctrl.len() as i64));
        p.extend(encode_int64(diff.len() as i64));
        p.extend(encode_int64(8));
        p.extend(&ctrl);
        p.extend(diff);
        p.extend(extra);
        assert_eq!(apply(old, &p, 8).unwrap(), b"hellp!!!");
        assert!(matches!(
            apply(old, &p, 9),
            Err(BsPatchError::SizeMismatch { .. })
        ));
        // A control entry asking for more than the new size is refused.
        let mut bad = p.clone();
        bad[32..40].copy_from_slice(&encode_int64(50));
        assert!(matches!(
            apply(old, &bad, 8),
            Err(BsPatchError::BadValue { .. })
        ));
    }
}
