//! 8-bit optimizer state ([`crate::StatePrecision::Int8`]): values stored as one byte each, in
//! blocks of [`BLOCK`] with an f32 scale (the block's largest magnitude), as bitsandbytes'
//! and torchao's blockwise 8-bit optimizers store theirs.
//!
//! A byte is a small float relative to the block's scale, so small values keep their relative
//! precision (a linear code would round every value below `scale / 255` to zero):
//! - [`Code::Signed`] (the first moment, the Lookahead delta): sign, 4 exponent bits, 3
//!   mantissa bits; magnitudes from `scale * 2^-14` up, smaller ones are 0.
//! - [`Code::Positive`] (the second moment): 5 exponent bits, 3 mantissa bits; magnitudes from
//!   `scale * 2^-30` up, and a non-zero value never becomes 0 (it is raised to the smallest
//!   code instead), since a second moment of 0 under a non-zero first moment would turn the
//!   update into `m / eps`.
//!
//! Three mantissa bits round to 6–12 % steps, so rounding to nearest would lose Adam's small
//! per-step changes (with β2 = 0.999 the second moment moves 0.1 % a step) and the state would
//! freeze. Rounding is stochastic instead, unbiased in value: random bits below the kept
//! mantissa, from a hash of a seed and the element's index, so a step is reproducible and a
//! resumed run draws the same bits.

/// Values per block (per f32 scale).
pub(crate) const BLOCK: usize = 256;

/// How a buffer's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// Sign, 4 exponent bits, 3 mantissa bits.
    Signed,
    /// 5 exponent bits, 3 mantissa bits; non-negative values only.
    Positive,
}

impl Code {
    /// Exponent bits below the scale that the code spans (exponent field 1 is
    /// `scale * 2^(1 - BIAS)`; field 0 is zero).
    const fn bias(self) -> i32 {
        match self {
            Code::Signed => 15,
            Code::Positive => 31,
        }
    }
}

/// One buffer of 8-bit values with one scale per block.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Q8Buf {
    pub(crate) code: Code,
    /// One byte per value.
    pub(crate) bytes: Vec<u8>,
    /// One scale per [`BLOCK`] values (the last block may be shorter).
    pub(crate) scales: Vec<f32>,
}

/// SplitMix64's output function.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the rounding of variable number `var` at its step `step`.
pub(crate) fn stream_seed(var: u64, step: u64) -> u64 {
    mix(mix(var ^ 0x5851_f42d_4c95_7f2d) ^ step)
}

/// The byte of `x` (with `inv_scale = 1 / scale`, `x` finite), rounded stochastically by the
/// 20 random bits `r`.
#[inline(always)]
fn encode(code: Code, x: f32, inv_scale: f32, r: u32) -> u8 {
    let y = (x * inv_scale).abs();
    if y == 0.0 {
        return 0;
    }
    // Random bits below the 3 kept mantissa bits, then truncation: rounds up with probability
    // equal to the dropped fraction (a carry moves into the exponent as it should).
    let bits = y.to_bits() + (r & 0xF_FFFF);
    let exp = ((bits >> 23) & 0xFF) as i32 - 127 + code.bias();
    let mant = ((bits >> 20) & 7) as u8;
    match code {
        Code::Signed => {
            if exp < 1 {
                return 0;
            }
            let sign = if x < 0.0 { 0x80 } else { 0 };
            sign | ((exp.min(15) as u8) << 3) | mant
        }
        // Never 0 for a non-zero value; never above the largest code.
        Code::Positive if exp < 1 => 1 << 3,
        Code::Positive => ((exp.min(31) as u8) << 3) | mant,
    }
}

/// The value of byte `b` in a block of scale `scale`.
#[inline(always)]
fn decode(code: Code, b: u8, scale: f32) -> f32 {
    let (sign, field) = match code {
        Code::Signed => (b & 0x80 != 0, b & 0x7F),
        Code::Positive => (false, b),
    };
    let exp = (field >> 3) as i32;
    if exp == 0 {
        return 0.0;
    }
    let bits = (((exp - code.bias() + 127) as u32) << 23) | (((field & 7) as u32) << 20);
    let y = f32::from_bits(bits) * scale;
    if sign {
        -y
    } else {
        y
    }
}

impl Q8Buf {
    /// `n` zeros.
    pub(crate) fn zeros(code: Code, n: usize) -> Self {
        Self { code, bytes: vec![0; n], scales: vec![0.0; n.div_ceil(BLOCK)] }
    }

    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Every value as f32.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        decode_blocks(self.code, &self.bytes, &self.scales, &mut out);
        out
    }
}

/// Decodes `bytes` (whole blocks from a block boundary, the last may be short) with their
/// `scales` into `out`.
pub(crate) fn decode_blocks(code: Code, bytes: &[u8], scales: &[f32], out: &mut [f32]) {
    for ((b, &s), o) in bytes.chunks(BLOCK).zip(scales).zip(out.chunks_mut(BLOCK)) {
        for (&b, o) in b.iter().zip(o) {
            *o = decode(code, b, s);
        }
    }
}

/// Encodes `values` (whole blocks from a block boundary) into `bytes` and `scales`, rounding
/// stochastically with bits from `seed` and each value's index `first + i`.
pub(crate) fn encode_blocks(code: Code, values: &[f32], bytes: &mut [u8], scales: &mut [f32], seed: u64, first: u64) {
    let blocks = values.chunks(BLOCK).zip(bytes.chunks_mut(BLOCK)).zip(scales.iter_mut());
    for (bi, ((v, b), s)) in blocks.enumerate() {
        let scale = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        *s = scale;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let base = first + (bi * BLOCK) as u64;
        for (i, (&x, b)) in v.iter().zip(b.iter_mut()).enumerate() {
            *b = encode(code, x, inv, mix(seed ^ (base + i as u64)) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(code: Code, values: &[f32], seed: u64) -> Vec<f32> {
        let mut q = Q8Buf::zeros(code, values.len());
        encode_blocks(code, values, &mut q.bytes, &mut q.scales, seed, 0);
        q.to_f32()
    }

    #[test]
    fn values_keep_their_relative_precision_across_the_range() {
        // One block from the scale down to 2^-13 of it, both signs.
        let values: Vec<f32> =
            (0..BLOCK).map(|i| (if i % 2 == 0 { 1.0 } else { -1.0 }) * 0.5f32.powf(i as f32 / 20.0)).collect();
        for (code, values) in
            [(Code::Signed, values.clone()), (Code::Positive, values.iter().map(|x| x.abs()).collect())]
        {
            let back = roundtrip(code, &values, 3);
            for (x, y) in values.iter().zip(&back) {
                // Between the two neighbouring codes: at most one 1/8-binade step away.
                assert!((x - y).abs() <= x.abs() * 0.126, "{code:?}: {x} came back as {y}");
                assert_eq!(x.signum(), y.signum());
            }
        }
    }

    #[test]
    fn rounding_is_unbiased() {
        // A value between two codes, rounded 20,000 times with different bits: the mean is the value.
        let x = 0.3f32;
        let n = 20_000;
        let values = vec![x; n];
        let mut scaled = values.clone();
        scaled[0] = 1.0; // each block's scale
        for code in [Code::Signed, Code::Positive] {
            let back = roundtrip(code, &scaled, 11);
            let mean: f64 =
                back.iter().enumerate().filter(|(i, _)| i % BLOCK != 0).map(|(_, &y)| y as f64).sum::<f64>()
                    / (n - n.div_ceil(BLOCK)) as f64;
            assert!((mean - x as f64).abs() < 2e-3, "{code:?}: mean {mean} for {x}");
        }
    }

    #[test]
    fn small_values_flush_or_stay_and_zero_is_exact() {
        let values = [1.0f32, 1e-12, 0.0, -1e-12];
        assert_eq!(roundtrip(Code::Signed, &values, 1), [1.0, 0.0, 0.0, 0.0]);
        let back = roundtrip(Code::Positive, &[1.0, 1e-12, 0.0], 1);
        assert_eq!(back[2], 0.0);
        assert_eq!(back[1], 2f32.powi(-30), "a non-zero second moment never becomes 0");
        assert_eq!(roundtrip(Code::Signed, &[0.0; 5], 1), [0.0; 5]);
    }

    #[test]
    fn rounding_is_reproducible_from_the_seed() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_eq!(roundtrip(Code::Signed, &values, 5), roundtrip(Code::Signed, &values, 5));
        assert_ne!(roundtrip(Code::Signed, &values, 5), roundtrip(Code::Signed, &values, 6));
    }
}
