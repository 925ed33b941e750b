//! Image pairs shared by the `create` integration tests.
#![allow(dead_code)]

/// Block size of every image.
pub const BS: usize = 4096;

/// Small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fill with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Blocks of "text-like" data (compressible but distinct per block).
pub fn texty_blocks(rng: &mut Rng, n: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"lorem ",
        b"ipsum ",
        b"block ",
        b"merge ",
        b"android ",
        b"snapshot ",
        b"cow ",
        b"\n",
    ];
    let mut v = Vec::with_capacity(n * BS);
    while v.len() < n * BS {
        if rng.below(16) == 0 {
            v.extend_from_slice(format!("{} ", rng.next_u64()).as_bytes());
        } else {
            v.extend_from_slice(words[rng.below(8) as usize]);
        }
    }
    v.truncate(n * BS);
    v
}

/// Copy block `s` of `src` to block `d` of `dst`.
pub fn copy_block(dst: &mut [u8], d: usize, src: &[u8], s: usize) {
    dst[d * BS..(d + 1) * BS].copy_from_slice(&src[s * BS..(s + 1) * BS]);
}

/// Named adversarial and random (source, target) pairs.
pub fn pairs() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let mut rng = Rng::new(42);
    let mut out = Vec::new();
    let s = texty_blocks(&mut rng, 300);

    out.push(("identical", s.clone(), s.clone()));
    out.push(("all-zero", vec![0u8; 64 * BS], vec![0u8; 64 * BS]));
    out.push(("zero-to-data", vec![0u8; 64 * BS], s[..64 * BS].to_vec()));

    // Every source block has the same content; the target changes a few of them.
    let uniform: Vec<u8> = s[..BS].repeat(80);
    let mut t = uniform.clone();
    for n in [3usize, 40, 79] {
        t[n * BS + 100] ^= 0x11;
    }
    copy_block(&mut t, 50, &s, 7);
    out.push(("uniform", uniform, t));

    let mut t = s.clone();
    copy_block(&mut t, 10, &s, 200);
    copy_block(&mut t, 200, &s, 10);
    out.push(("swap", s.clone(), t));

    let mut t = s.clone();
    copy_block(&mut t, 1, &s, 2);
    copy_block(&mut t, 2, &s, 3);
    copy_block(&mut t, 3, &s, 1);
    for n in 100..150 {
        copy_block(&mut t, n, &s, if n == 149 { 100 } else { n + 1 });
    }
    out.push(("3-cycle-and-rotation", s.clone(), t));

    for (name, shift, lo, hi) in [
        ("shift-up", 7i64, 20i64, 170i64),
        ("shift-down", -7, 20, 170),
        ("shift-far", 120, 130, 290),
    ] {
        let mut t = s.clone();
        for n in lo..hi {
            copy_block(&mut t, n as usize, &s, (n - shift) as usize);
        }
        out.push((name, s.clone(), t));
    }

    let mut t = s.clone();
    for n in (0..300).step_by(5) {
        copy_block(&mut t, n, &s, 33);
    }
    out.push(("copied-to-many", s.clone(), t));

    let mut t = s.clone();
    for n in (0..300).step_by(7) {
        let off = rng.below((BS - 100) as u64) as usize;
        t[n * BS + off..n * BS + off + 40].fill(b'#');
    }
    for n in 250..260 {
        copy_block(&mut t, n, &s, n - 200);
        t[n * BS + 5] ^= 0x20;
    }
    out.push(("edited", s.clone(), t));

    // Bytes inserted and removed: content after them moves by a non-multiple of 4096.
    let mut t = s[..50_000].to_vec();
    t.extend_from_slice(&[b'+'; 777]);
    t.extend_from_slice(&s[50_000..600_000]);
    t.extend_from_slice(&s[600_000 + 1500..]);
    t.resize(s.len(), b'-');
    out.push(("byte-shifted", s.clone(), t));

    let mut t = s.clone();
    t.extend(vec![0u8; 8 * BS]);
    t.extend_from_slice(&s[..20 * BS]);
    t.extend(texty_blocks(&mut rng, 9));
    out.push(("target-larger", s.clone(), t));

    let mut t = s[..150 * BS].to_vec();
    copy_block(&mut t, 0, &s, 299);
    out.push(("target-smaller", s.clone(), t));

    for seed in 0..4u64 {
        let mut rng = Rng::new(seed + 7);
        let src = texty_blocks(&mut rng, 120 + seed as usize * 10);
        let sb = src.len() / BS;
        let tb = sb + 12 - seed as usize * 6;
        let mut t = vec![0u8; tb * BS];
        for n in 0..tb {
            match rng.below(10) {
                0..=3 if n < sb => copy_block(&mut t, n, &src, n),
                4..=6 => {
                    let x = rng.below(sb as u64) as usize;
                    copy_block(&mut t, n, &src, x);
                }
                7 => {
                    let x = rng.below(sb as u64) as usize;
                    copy_block(&mut t, n, &src, x);
                    t[n * BS + 9] ^= 0xFF;
                }
                8 => {}
                _ => rng.fill(&mut t[n * BS..(n + 1) * BS]),
            }
        }
        out.push(("random", src, t));
    }
    out
}

/// Merges the first `count` entries (all of them with `None`) of `mode`'s merge order of
/// `cow` into `dev`, as a device does: each op reads the partly merged device.
pub fn merge_prefix(
    cow: &std::path::Path,
    dev: &mut [u8],
    mode: cow_format::MergeMode,
    count: Option<usize>,
) {
    use cow_format::OpKind;
    let reader = cow_format::CowReader::open(std::fs::File::open(cow).unwrap()).unwrap();
    let order = reader.merge_order(mode.order_options(false));
    for op in order.take(count.unwrap_or(usize::MAX)) {
        let start = op.new_block as usize * BS;
        let len = op.num_blocks as usize * BS;
        let mut out = vec![0u8; len];
        match op.kind {
            OpKind::Zero => {}
            OpKind::Copy => {
                let s = op.source as usize * BS;
                out.copy_from_slice(&dev[s..s + len]);
            }
            OpKind::Replace => reader.read_op_data(op, &mut out).unwrap(),
            OpKind::Xor => {
                reader.read_op_data(op, &mut out).unwrap();
                let s = op.source as usize;
                for (o, x) in out.iter_mut().zip(&dev[s..s + len]) {
                    *o ^= x;
                }
            }
        }
        dev[start..start + len].copy_from_slice(&out);
    }
}

/// Merges `cow` in place, in the user-space merge order, over `source` (grown with junk to
/// the target size), and returns the device cut to `target_len`.
pub fn merge_in_place(source: &[u8], target_len: usize, cow: &std::path::Path) -> Vec<u8> {
    let mut dev = source.to_vec();
    if dev.len() < target_len {
        dev.resize(target_len, 0xA5);
    }
    merge_prefix(cow, &mut dev, cow_format::MergeMode::User, None);
    dev.truncate(target_len);
    dev
}
