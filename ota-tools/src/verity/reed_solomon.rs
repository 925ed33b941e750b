//! Systematic Reed-Solomon parity over GF(2^8) with the parameters AOSP's libfec uses:
//! field polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator roots alpha^0 ..
//! alpha^(roots-1) with alpha = x, codewords of 255 bytes (no shortening).
//!
//! Parity is the remainder of `message(x) * x^roots` divided by the generator, the first
//! message byte being the highest-degree coefficient and the first parity byte the
//! highest-degree coefficient of the remainder.

/// Field polynomial of GF(2^8), including the x^8 term.
const FIELD_POLY: u16 = 0x11d;

/// Multiplies two field elements (shift-and-add; only used to build tables).
fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= (FIELD_POLY & 0xff) as u8;
        }
        b >>= 1;
    }
    product
}

/// An encoder for a fixed number of parity bytes per codeword.
#[derive(Debug, Clone)]
pub struct RsEncoder {
    /// `multiply[t][x]` is `x` times the generator's coefficient of degree
    /// `roots - 1 - t` (the generator is monic of degree `roots`).
    multiply: Vec<[u8; 256]>,
}

impl RsEncoder {
    /// An encoder producing `roots` parity bytes (1 to 254) per codeword.
    pub fn new(roots: usize) -> Self {
        debug_assert!((1..=254).contains(&roots));
        // generator[d] is the coefficient of x^d; start from g(x) = 1.
        let mut generator = vec![0u8; roots + 1];
        generator[0] = 1;
        let mut root = 1u8; // alpha^0
        for i in 0..roots {
            // Multiply by (x + root): new[d] = old[d - 1] + root * old[d].
            for d in (0..=i + 1).rev() {
                let shifted = if d > 0 { generator[d - 1] } else { 0 };
                generator[d] = shifted ^ gf_mul(root, generator[d]);
            }
            root = gf_mul(root, 2);
        }
        let multiply = (0..roots)
            .map(|t| {
                let coefficient = generator[roots - 1 - t];
                let mut table = [0u8; 256];
                for (x, cell) in table.iter_mut().enumerate() {
                    *cell = gf_mul(coefficient, x as u8);
                }
                table
            })
            .collect();
        Self { multiply }
    }

    /// Number of parity bytes per codeword.
    pub fn roots(&self) -> usize {
        self.multiply.len()
    }

    /// Feeds one message byte into `parity` (the running remainder, `roots` bytes, all
    /// zero before the first byte of a codeword).
    #[cfg(test)]
    pub fn push(&self, parity: &mut [u8], byte: u8) {
        let roots = self.roots();
        let feedback = usize::from(byte ^ parity[0]);
        for t in 0..roots - 1 {
            parity[t] = parity[t + 1] ^ self.multiply[t][feedback];
        }
        parity[roots - 1] = self.multiply[roots - 1][feedback];
    }

    /// Parity of one whole message.
    #[cfg(test)]
    pub fn encode(&self, message: &[u8]) -> Vec<u8> {
        let mut parity = vec![0u8; self.roots()];
        for &b in message {
            self.push(&mut parity, b);
        }
        parity
    }
}

/// Encodes `width` codewords at once, codeword `k` taking byte `k` of every row fed in.
///
/// The remainders are kept as `roots` planes of `width` bytes (plane `t` holds remainder
/// byte `t` of every codeword) used as a ring, so feeding a row costs one table lookup per
/// byte and plane and moves no data.
pub struct ColumnEncoder<'a> {
    encoder: &'a RsEncoder,
    width: usize,
    /// `roots` planes of `width` bytes.
    planes: Vec<u8>,
    /// Plane holding remainder byte 0 (the highest-degree one).
    head: usize,
    feedback: Vec<u8>,
}

impl<'a> ColumnEncoder<'a> {
    /// Starts `width` empty codewords.
    pub fn new(encoder: &'a RsEncoder, width: usize) -> Self {
        Self {
            encoder,
            width,
            planes: vec![0u8; encoder.roots() * width],
            head: 0,
            feedback: vec![0u8; width],
        }
    }

    /// Feeds one message byte to every codeword (`row.len()` must be `width`).
    pub fn push_row(&mut self, row: &[u8]) {
        let roots = self.encoder.roots();
        let width = self.width;
        let head = &self.planes[self.head * width..(self.head + 1) * width];
        for ((f, &r), &h) in self.feedback.iter_mut().zip(row).zip(head) {
            *f = r ^ h;
        }
        for t in 0..roots - 1 {
            let plane = (self.head + t + 1) % roots;
            let table = &self.encoder.multiply[t];
            let dst = &mut self.planes[plane * width..(plane + 1) * width];
            for (d, &f) in dst.iter_mut().zip(&self.feedback) {
                *d ^= table[usize::from(f)];
            }
        }
        let table = &self.encoder.multiply[roots - 1];
        let dst = &mut self.planes[self.head * width..(self.head + 1) * width];
        for (d, &f) in dst.iter_mut().zip(&self.feedback) {
            *d = table[usize::from(f)];
        }
        self.head = (self.head + 1) % roots;
    }

    /// Writes the parity, codeword after codeword (`roots` bytes each), into `out`
    /// (`width * roots` bytes).
    pub fn finish(self, out: &mut [u8]) {
        let roots = self.encoder.roots();
        let width = self.width;
        for (k, parity) in out.chunks_exact_mut(roots).enumerate().take(width) {
            for (t, byte) in parity.iter_mut().enumerate() {
                let plane = (self.head + t) % roots;
                *byte = self.planes[plane * width + k];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polynomial long division, written independently of the LFSR above.
    fn remainder_by_division(message: &[u8], roots: usize) -> Vec<u8> {
        let mut generator = vec![1u8]; // highest degree first
        let mut root = 1u8;
        for _ in 0..roots {
            let mut next = vec![0u8; generator.len() + 1];
            for (i, &c) in generator.iter().enumerate() {
                next[i] ^= c;
                next[i + 1] ^= gf_mul(c, root);
            }
            generator = next;
            root = gf_mul(root, 2);
        }
        let mut work: Vec<u8> = message.to_vec();
        work.extend(std::iter::repeat_n(0u8, roots));
        for i in 0..message.len() {
            let c = work[i];
            if c != 0 {
                for (j, &g) in generator.iter().enumerate() {
                    work[i + j] ^= gf_mul(g, c);
                }
            }
        }
        work[message.len()..].to_vec()
    }

    /// Evaluates a polynomial (highest degree first) at `x`.
    fn eval(poly: &[u8], x: u8) -> u8 {
        poly.iter().fold(0u8, |acc, &c| gf_mul(acc, x) ^ c)
    }

    #[test]
    fn field_has_order_255() {
        let mut x = 1u8;
        for i in 1..=255 {
            x = gf_mul(x, 2);
            assert_eq!(x == 1, i == 255, "alpha^{i} = {x}");
        }
    }

    #[test]
    fn lfsr_matches_long_division_and_codewords_vanish_at_roots() {
        let mut seed = 0x1234_5678u32;
        for roots in [1usize, 2, 3, 8, 16, 24, 254] {
            let enc = RsEncoder::new(roots);
            let message: Vec<u8> = (0..255 - roots)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            let parity = enc.encode(&message);
            assert_eq!(
                parity,
                remainder_by_division(&message, roots),
                "roots {roots}"
            );
            let codeword: Vec<u8> = message.iter().chain(&parity).copied().collect();
            let mut root = 1u8;
            for i in 0..roots {
                assert_eq!(eval(&codeword, root), 0, "roots {roots}, alpha^{i}");
                root = gf_mul(root, 2);
            }
        }
    }
}
