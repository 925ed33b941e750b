//! A small hand assembler for COW files, independent of the crate's writer and
//! of its `layout` module: every byte is placed here from the fact sheet's
//! tables, so tests built on it check the reader (and the writer) against the
//! format itself.
#![allow(dead_code)]

/// Magic bytes as they appear on disk.
pub const MAGIC: [u8; 8] = *b"!!WOcwoC";

/// Op type ids (fact sheet §1).
pub const COPY: u8 = 1;
/// REPLACE.
pub const REPLACE: u8 = 2;
/// ZERO.
pub const ZERO: u8 = 3;
/// LABEL.
pub const LABEL: u8 = 4;
/// CLUSTER.
pub const CLUSTER: u8 = 5;
/// XOR.
pub const XOR: u8 = 6;
/// SEQUENCE.
pub const SEQUENCE: u8 = 7;
/// FOOTER.
pub const FOOTER: u8 = 255;

/// SHA-256 of AOSP's `tools/testdata/cow_v2`.
pub const COW_V2_SHA256: &str = "afd7288855d0d9afd55e87910cc1886d7e73b97876cc4d15b85303d8027c8e2f";

/// "This is some data, believe it" zero-padded to `size` bytes.
pub fn test_text(size: usize) -> Vec<u8> {
    let mut v = b"This is some data, believe it".to_vec();
    v.resize(size, 0);
    v
}

/// A v2 header as raw bytes (38 bytes).
#[allow(clippy::too_many_arguments)]
pub fn v2_header(
    major: u16,
    header_size: u16,
    block_size: u32,
    cluster_ops: u32,
    num_merge_ops: u64,
    buffer_size: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(38);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&major.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&header_size.to_le_bytes());
    h.extend_from_slice(&84u16.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes());
    h.extend_from_slice(&block_size.to_le_bytes());
    h.extend_from_slice(&cluster_ops.to_le_bytes());
    h.extend_from_slice(&num_merge_ops.to_le_bytes());
    h.extend_from_slice(&buffer_size.to_le_bytes());
    assert_eq!(h.len(), 38);
    h
}

/// A v2 op record (20 bytes).
pub fn v2_op(
    op_type: u8,
    compression: u8,
    data_length: u16,
    new_block: u64,
    source: u64,
) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[0] = op_type;
    r[1] = compression;
    r[2..4].copy_from_slice(&data_length.to_le_bytes());
    r[4..12].copy_from_slice(&new_block.to_le_bytes());
    r[12..20].copy_from_slice(&source.to_le_bytes());
    r
}

/// One v2 op to assemble; REPLACE/SEQUENCE sources are filled in by the assembler.
#[derive(Debug, Clone)]
pub struct V2Rec {
    /// Op type.
    pub op_type: u8,
    /// Compression byte.
    pub compression: u8,
    /// new_block field.
    pub new_block: u64,
    /// source field (COPY block, XOR byte offset, LABEL value); ignored for REPLACE/SEQUENCE.
    pub source: u64,
    /// Payload stored in the data region.
    pub payload: Vec<u8>,
}

impl V2Rec {
    /// COPY new ← old.
    pub fn copy(new_block: u64, old_block: u64) -> Self {
        Self {
            op_type: COPY,
            compression: 0,
            new_block,
            source: old_block,
            payload: vec![],
        }
    }
    /// REPLACE with a stored payload.
    pub fn replace(new_block: u64, compression: u8, payload: Vec<u8>) -> Self {
        Self {
            op_type: REPLACE,
            compression,
            new_block,
            source: 0,
            payload,
        }
    }
    /// XOR with a stored payload against source byte offset `source`.
    pub fn xor(new_block: u64, compression: u8, payload: Vec<u8>, source: u64) -> Self {
        Self {
            op_type: XOR,
            compression,
            new_block,
            source,
            payload,
        }
    }
    /// ZERO.
    pub fn zero(new_block: u64) -> Self {
        Self {
            op_type: ZERO,
            compression: 0,
            new_block,
            source: 0,
            payload: vec![],
        }
    }
    /// LABEL.
    pub fn label(label: u64) -> Self {
        Self {
            op_type: LABEL,
            compression: 0,
            new_block: 0,
            source: label,
            payload: vec![],
        }
    }
    /// SEQUENCE with these block numbers.
    pub fn sequence(blocks: &[u32]) -> Self {
        let payload = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
        Self {
            op_type: SEQUENCE,
            compression: 0,
            new_block: 0,
            source: 0,
            payload,
        }
    }
}

/// Parameters of an assembled v2 file.
#[derive(Debug, Clone)]
pub struct V2File {
    /// Major version (1 or 2).
    pub major: u16,
    /// header_size field (and bytes of header written).
    pub header_size: u16,
    /// Block size.
    pub block_size: u32,
    /// Ops per cluster (≥ 2, or 0 for unclustered).
    pub cluster_ops: u32,
    /// num_merge_ops field.
    pub num_merge_ops: u64,
    /// Scratch size (0 or 2 MiB).
    pub buffer_size: u32,
    /// Write a footer (AOSP Finalize) or stop after the last op (torn/unfinished).
    pub footer: bool,
}

impl Default for V2File {
    fn default() -> Self {
        Self {
            major: 2,
            header_size: 38,
            block_size: 4096,
            cluster_ops: 1024,
            num_merge_ops: 0,
            buffer_size: 0,
            footer: true,
        }
    }
}

impl V2File {
    /// Lay out `recs` the way AOSP's v2 writer does (fact sheet §5.1).
    pub fn assemble(&self, recs: &[V2Rec]) -> Vec<u8> {
        let mut out = v2_header(
            self.major,
            self.header_size,
            self.block_size,
            self.cluster_ops,
            self.num_merge_ops,
            self.buffer_size,
        );
        out.resize(usize::from(self.header_size), 0);
        out.resize(out.len() + self.buffer_size as usize, 0);
        let ops_start = out.len() as u64;
        if self.cluster_ops == 0 {
            return self.assemble_unclustered(out, recs);
        }
        let c = u64::from(self.cluster_ops);
        let mut cluster_start = ops_start;
        let mut slots: Vec<[u8; 20]> = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        let mut num_ops = 0u64;

        let flush =
            |out: &mut Vec<u8>, start: u64, slots: &mut Vec<[u8; 20]>, data: &mut Vec<u8>| {
                let start = start as usize;
                let end = start + c as usize * 20 + data.len();
                if out.len() < end {
                    out.resize(end, 0);
                }
                for (i, s) in slots.iter().enumerate() {
                    out[start + i * 20..start + i * 20 + 20].copy_from_slice(s);
                }
                let d = start + c as usize * 20;
                out[d..d + data.len()].copy_from_slice(data);
                let next = end as u64;
                slots.clear();
                data.clear();
                next
            };

        for r in recs {
            if slots.len() as u64 == c - 1 {
                let skip = data.len() as u64;
                slots.push(v2_op(CLUSTER, 0, 0, 0, skip));
                num_ops += 1;
                cluster_start = flush(&mut out, cluster_start, &mut slots, &mut data);
            }
            let data_pos = cluster_start + c * 20 + data.len() as u64;
            let source = match r.op_type {
                REPLACE | SEQUENCE => data_pos,
                _ => r.source,
            };
            slots.push(v2_op(
                r.op_type,
                r.compression,
                r.payload.len() as u16,
                r.new_block,
                source,
            ));
            data.extend_from_slice(&r.payload);
            num_ops += 1;
        }
        if !self.footer {
            flush(&mut out, cluster_start, &mut slots, &mut data);
            return out;
        }
        if !data.is_empty() {
            let used = slots.len() as u64 * 20;
            let skip = data.len() as u64 + c * 20 - used - 20;
            slots.push(v2_op(CLUSTER, 0, 0, 0, skip));
            num_ops += 1;
            cluster_start = flush(&mut out, cluster_start, &mut slots, &mut data);
        }
        let footer_at = (cluster_start + slots.len() as u64 * 20) as usize;
        flush(&mut out, cluster_start, &mut slots, &mut data);
        out.truncate(footer_at);
        out.resize(footer_at, 0);
        out.extend_from_slice(&v2_op(FOOTER, 0, 64, num_ops * 20, num_ops));
        out.extend_from_slice(&[0u8; 64]);
        out
    }

    fn assemble_unclustered(&self, mut out: Vec<u8>, recs: &[V2Rec]) -> Vec<u8> {
        let mut num_ops = 0u64;
        for r in recs {
            assert_ne!(
                r.op_type, SEQUENCE,
                "SEQUENCE is broken in unclustered v2 (AOSP quirk)"
            );
            let pos = out.len() as u64;
            let source = if r.op_type == REPLACE {
                pos + 20
            } else {
                r.source
            };
            out.extend_from_slice(&v2_op(
                r.op_type,
                r.compression,
                r.payload.len() as u16,
                r.new_block,
                source,
            ));
            out.extend_from_slice(&r.payload);
            num_ops += 1;
        }
        if self.footer {
            out.extend_from_slice(&v2_op(FOOTER, 0, 64, num_ops * 20, num_ops));
            out.extend_from_slice(&[0u8; 64]);
        }
        out
    }
}

/// AOSP's `tools/testdata/cow_v2`, assembled from the fact sheet's §11.1 table.
pub fn cow_v2() -> Vec<u8> {
    let text = test_text(4096);
    V2File {
        cluster_ops: 5,
        num_merge_ops: 1,
        buffer_size: 2 * 1024 * 1024,
        ..V2File::default()
    }
    .assemble(&[
        V2Rec::copy(0, 5),
        V2Rec::replace(2, 0, text.clone()),
        V2Rec::label(1),
        V2Rec::xor(50, 0, text, 24 * 4096 + 10),
        V2Rec::zero(5),
        V2Rec::zero(6),
        V2Rec::zero(7),
        V2Rec::zero(8),
        V2Rec::zero(9),
        V2Rec::zero(10),
        V2Rec::zero(11),
        V2Rec::zero(12),
        V2Rec::zero(13),
        V2Rec::zero(14),
        V2Rec::label(2),
    ])
}

/// One v3 op to assemble; REPLACE sources are filled in by the assembler.
#[derive(Debug, Clone)]
pub struct V3Rec {
    /// Op type nibble.
    pub op_type: u8,
    /// First new block.
    pub new_block: u32,
    /// Source (COPY block, XOR byte offset); ignored for REPLACE.
    pub source: u64,
    /// Compression-factor exponent k.
    pub shift: u8,
    /// Stored payload.
    pub payload: Vec<u8>,
}

impl V3Rec {
    /// COPY.
    pub fn copy(new_block: u32, old: u64) -> Self {
        Self {
            op_type: COPY,
            new_block,
            source: old,
            shift: 0,
            payload: vec![],
        }
    }
    /// REPLACE of 2^shift blocks.
    pub fn replace(new_block: u32, shift: u8, payload: Vec<u8>) -> Self {
        Self {
            op_type: REPLACE,
            new_block,
            source: 0,
            shift,
            payload,
        }
    }
    /// XOR.
    pub fn xor(new_block: u32, payload: Vec<u8>, source: u64) -> Self {
        Self {
            op_type: XOR,
            new_block,
            source,
            shift: 0,
            payload,
        }
    }
    /// ZERO.
    pub fn zero(new_block: u32) -> Self {
        Self {
            op_type: ZERO,
            new_block,
            source: 0,
            shift: 0,
            payload: vec![],
        }
    }
}

/// Parameters of an assembled v3 file.
#[derive(Debug, Clone)]
pub struct V3File {
    /// Block size.
    pub block_size: u32,
    /// Scratch size.
    pub buffer_size: u32,
    /// Capacity of the op area.
    pub op_count_max: u64,
    /// op_count header field; None = number of records given.
    pub op_count: Option<u64>,
    /// compression_algorithm field.
    pub compression: u32,
    /// max_compression_size field.
    pub compression_factor: u32,
    /// num_merge_ops field.
    pub num_merge_ops: u64,
    /// Sequence entries.
    pub sequence: Vec<u32>,
    /// Resume buffer content (label, op_index), at most 4 written.
    pub resume_points: Vec<(u64, u64)>,
    /// resume_point_count field; None = len(resume_points).
    pub resume_point_count: Option<u32>,
}

impl Default for V3File {
    fn default() -> Self {
        Self {
            block_size: 4096,
            buffer_size: 0,
            op_count_max: 16,
            op_count: None,
            compression: 0,
            compression_factor: 4096,
            num_merge_ops: 0,
            sequence: vec![],
            resume_points: vec![],
            resume_point_count: None,
        }
    }
}

/// A v3 op record (16 bytes).
pub fn v3_op(op_type: u8, new_block: u32, source: u64, shift: u8, data_length: u32) -> [u8; 16] {
    let info = (u64::from(op_type) << 60) | (u64::from(shift) << 57) | source;
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&data_length.to_le_bytes());
    r[4..8].copy_from_slice(&new_block.to_le_bytes());
    r[8..16].copy_from_slice(&info.to_le_bytes());
    r
}

impl V3File {
    /// Byte offset of the data area.
    pub fn data_offset(&self) -> u64 {
        78 + u64::from(self.buffer_size)
            + 4 * self.sequence.len() as u64
            + 64
            + 16 * self.op_count_max
    }

    /// Lay out the file (fact sheet §5.2).
    pub fn assemble(&self, recs: &[V3Rec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&3u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&78u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.num_merge_ops.to_le_bytes());
        out.extend_from_slice(&self.buffer_size.to_le_bytes());
        out.extend_from_slice(&(self.sequence.len() as u64).to_le_bytes());
        let rpc = self
            .resume_point_count
            .unwrap_or(self.resume_points.len() as u32);
        out.extend_from_slice(&rpc.to_le_bytes());
        out.extend_from_slice(&4u32.to_le_bytes());
        let op_count = self.op_count.unwrap_or(recs.len() as u64);
        out.extend_from_slice(&op_count.to_le_bytes());
        out.extend_from_slice(&self.op_count_max.to_le_bytes());
        out.extend_from_slice(&self.compression.to_le_bytes());
        out.extend_from_slice(&self.compression_factor.to_le_bytes());
        assert_eq!(out.len(), 78);
        out.resize(78 + self.buffer_size as usize, 0);
        for s in &self.sequence {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let resume_at = out.len();
        for (l, i) in self.resume_points.iter().take(4) {
            out.extend_from_slice(&l.to_le_bytes());
            out.extend_from_slice(&i.to_le_bytes());
        }
        let ops_at = resume_at + 64;
        let data_at = ops_at + 16 * self.op_count_max as usize;
        let mut data_pos = data_at as u64;
        let mut data = Vec::new();
        out.resize(data_at, 0);
        for (i, r) in recs.iter().enumerate() {
            let source = if r.op_type == REPLACE {
                data_pos
            } else {
                r.source
            };
            let rec = v3_op(
                r.op_type,
                r.new_block,
                source,
                r.shift,
                r.payload.len() as u32,
            );
            out[ops_at + 16 * i..ops_at + 16 * i + 16].copy_from_slice(&rec);
            data.extend_from_slice(&r.payload);
            data_pos += r.payload.len() as u64;
        }
        out.extend_from_slice(&data);
        out
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for tests.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// A source image of `blocks` blocks whose every byte depends on its offset.
pub fn source_image(blocks: u64, block_size: u32) -> Vec<u8> {
    pseudo_random(0x5eed, (blocks * u64::from(block_size)) as usize)
}

/// Compress with the crate's codec (not its writer), falling back to the raw
/// data when compression does not help, as both AOSP writers do for lz4/zstd.
pub fn packed(alg: cow_format::CompressionAlgorithm, data: &[u8]) -> Vec<u8> {
    let mut c = Vec::new();
    cow_format::compression::compress(alg, None, data, &mut c).unwrap();
    if c.len() >= data.len()
        && alg != cow_format::CompressionAlgorithm::Gz
        && alg != cow_format::CompressionAlgorithm::Brotli
    {
        data.to_vec()
    } else {
        c
    }
}

/// Block `i` of a compressible test pattern.
pub fn pattern_block(i: u32, block_size: u32) -> Vec<u8> {
    let mut b = test_text(block_size as usize);
    b[40] = i as u8;
    b[block_size as usize - 1] = (i >> 8) as u8;
    b
}

/// Small, valid COW files covering both versions, every compression, labels,
/// sequences, multi-block REPLACE and XOR: the fuzz seed corpus.
pub fn seed_corpus() -> Vec<(String, Vec<u8>)> {
    use cow_format::CompressionAlgorithm as A;
    let mut out = Vec::new();
    for alg in A::ALL {
        let bs = 512u32;
        let id = alg.id();
        let recs = vec![
            V2Rec::sequence(&[3, 1]),
            V2Rec::copy(1, 3),
            V2Rec::copy(3, 7),
            V2Rec::replace(4, id, packed(alg, &pattern_block(4, bs))),
            V2Rec::label(1),
            V2Rec::xor(
                5,
                id,
                packed(alg, &pattern_block(5, bs)),
                2 * u64::from(bs) + 9,
            ),
            V2Rec::zero(9),
            V2Rec::label(2),
        ];
        let f = V2File {
            block_size: bs,
            cluster_ops: 4,
            ..V2File::default()
        };
        out.push((format!("v2_{}_clustered", alg.name()), f.assemble(&recs)));
        let torn = V2File {
            footer: false,
            ..f.clone()
        }
        .assemble(&recs[..5]);
        out.push((format!("v2_{}_no_footer", alg.name()), torn));
        if alg == A::None {
            let plain: Vec<V2Rec> = recs
                .iter()
                .filter(|r| r.op_type != SEQUENCE)
                .cloned()
                .collect();
            let f0 = V2File {
                block_size: bs,
                cluster_ops: 0,
                ..V2File::default()
            };
            out.push(("v2_none_unclustered".into(), f0.assemble(&plain)));
        }

        let factor = 4096u32;
        let mut multi = Vec::new();
        for i in 0..4 {
            multi.extend_from_slice(&pattern_block(20 + i, bs));
        }
        let v3recs = vec![
            V3Rec::copy(1, 3),
            V3Rec::copy(3, 7),
            V3Rec::replace(4, 0, packed(alg, &pattern_block(4, bs))),
            V3Rec::xor(5, packed(alg, &pattern_block(5, bs)), 2 * u64::from(bs) + 9),
            V3Rec::replace(20, 2, packed(alg, &multi)),
            V3Rec::zero(9),
        ];
        let f3 = V3File {
            block_size: bs,
            op_count_max: 8,
            compression: u32::from(id),
            compression_factor: factor,
            sequence: vec![3, 1],
            resume_points: vec![(1, 2), (2, 6)],
            num_merge_ops: 1,
            ..V3File::default()
        };
        out.push((format!("v3_{}_sequence", alg.name()), f3.assemble(&v3recs)));
        let f3b = V3File {
            sequence: vec![],
            ..f3
        };
        out.push((
            format!("v3_{}_file_order", alg.name()),
            f3b.assemble(&v3recs),
        ));
    }
    out
}
