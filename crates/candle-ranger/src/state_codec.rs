//! Packed optimizer state: bf16 ([`crate::StatePrecision::Bf16`], [`encode_state16`]) and 8-bit
//! ([`encode_state_q8`]).
//!
//! 8-bit ([`crate::StatePrecision::Int8`]): values stored as one byte each, in
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

/// bf16 bits to f32 (exact).
#[inline(always)]
pub(crate) fn decode16(bits: &[u16]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bits.len());
    decode16_into(bits, &mut out);
    out
}

/// bf16 bits to f32 into `out` (cleared first; its capacity is reused).
#[inline(always)]
pub(crate) fn decode16_into(bits: &[u16], out: &mut Vec<f32>) {
    out.clear();
    out.extend(bits.iter().map(|&b| from_bf16_bits(b)));
}

/// One bf16 value's bits as f32 (exact).
#[inline(always)]
pub(crate) fn from_bf16_bits(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, rounded stochastically (random bits below the kept 16, then truncation:
/// unbiased, so Adam's small per-step changes survive bf16's 8-bit mantissa), with bits from
/// `seed` and each value's index `first + i`. Zero stays zero, of either sign. (One buffer
/// alone, for the tests; the step encodes its buffers together, [`encode_state16`].)
#[cfg(test)]
pub(crate) fn encode16(values: &[f32], bits: &mut [u16], seed: u64, first: u64) {
    let seed = (seed ^ (seed >> 32)) as u32;
    let first = first as u32;
    for (i, (&x, b)) in values.iter().zip(bits.iter_mut()).enumerate() {
        let r = hash32(seed, first.wrapping_add(i as u32)) & 0xFFFF;
        *b = (x.to_bits().wrapping_add(r) >> 16) as u16;
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

/// 32 random bits for element `i` of a stream (a 32-bit integer hash, lowbias32: cheap enough
/// to run per element in vector registers, which a 64-bit multiply is not on AVX2).
#[inline(always)]
fn hash32(seed: u32, i: u32) -> u32 {
    let mut h = i ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// The byte of `x` (with `inv_scale = 1 / scale`, `x` finite), rounded stochastically by the
/// random bits `r`. Written without branches, so a block's loop vectorizes.
#[inline(always)]
pub(crate) fn encode(code: Code, x: f32, inv_scale: f32, r: u32) -> u8 {
    let y = (x * inv_scale).abs();
    // Random bits below the 3 kept mantissa bits, then truncation: rounds up with probability
    // equal to the dropped fraction (a carry moves into the exponent as it should).
    let bits = y.to_bits().wrapping_add(r & 0xF_FFFF);
    // The exponent and the 3 kept mantissa bits lie side by side in the f32 as in the byte, so
    // one shift and one subtraction give the byte's 7 or 8 low bits: `exponent << 3 | mantissa`,
    // the exponent rebased so that the code's exponent 1 (the smallest) is 8.
    let field = (bits >> 20) as i32 - ((127 - code.bias()) << 3);
    match code {
        Code::Signed => {
            let sign = (x.to_bits() >> 24) & 0x80;
            let byte = sign | field.clamp(0, 127) as u32;
            // Below the smallest exponent (and 0 itself): 0.
            (if field < 8 { 0 } else { byte }) as u8
        }
        Code::Positive => {
            // Never 0 for a non-zero value: the smallest code instead.
            let byte = field.clamp(8, 255) as u32;
            (if y == 0.0 { 0 } else { byte }) as u8
        }
    }
}

/// The value of byte `b` in a block of scale `scale` (without branches).
#[inline(always)]
pub(crate) fn decode(code: Code, b: u8, scale: f32) -> f32 {
    let b = b as u32;
    let (sign, field) = match code {
        Code::Signed => ((b & 0x80) << 24, b & 0x7F),
        Code::Positive => (0, b),
    };
    // `exponent << 3 | mantissa` back into the f32's bits in one shift ([`encode`]).
    let bits = sign | ((field + ((127 - code.bias()) << 3) as u32) << 20);
    let y = f32::from_bits(bits) * scale;
    // Exponent 0 is the value 0.
    if field < 8 {
        0.0
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

    /// The whole buffer, to be written.
    #[cfg(test)]
    pub(crate) fn out(&mut self) -> Q8Out<'_> {
        Q8Out { bytes: &mut self.bytes, scales: &mut self.scales }
    }

    /// Every value as f32.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        decoded(self.code, &self.bytes, &self.scales)
    }
}

/// Decodes `bytes` (whole blocks from a block boundary, the last may be short) with their
/// `scales` into a new vector.
pub(crate) fn decoded(code: Code, bytes: &[u8], scales: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len());
    decoded_into(code, bytes, scales, &mut out);
    out
}

/// [`decoded`] into `out` (cleared first; its capacity is reused).
pub(crate) fn decoded_into(code: Code, bytes: &[u8], scales: &[f32], out: &mut Vec<f32>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { decode_avx2(code, bytes, scales, out) };
    }
    decode_into(code, bytes, scales, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_avx2(code: Code, bytes: &[u8], scales: &[f32], out: &mut Vec<f32>) {
    decode_into(code, bytes, scales, out)
}

/// [`decoded_into`] for a caller that chooses the instruction set (inlined into it).
#[inline(always)]
pub(crate) fn decode_into(code: Code, bytes: &[u8], scales: &[f32], out: &mut Vec<f32>) {
    for (b, &s) in bytes.chunks(BLOCK).zip(scales) {
        let start = out.len();
        out.resize(start + b.len(), 0.0);
        decode_block(code, b, s, &mut out[start..]);
    }
}

/// One block's `bytes` with its `scale` into `out` (as long as `bytes`). Inlined into the
/// caller, which chooses the instruction set.
#[inline(always)]
pub(crate) fn decode_block(code: Code, bytes: &[u8], scale: f32, out: &mut [f32]) {
    let pairs = out.iter_mut().zip(bytes);
    match code {
        Code::Signed => pairs.for_each(|(o, &b)| *o = decode(Code::Signed, b, scale)),
        Code::Positive => pairs.for_each(|(o, &b)| *o = decode(Code::Positive, b, scale)),
    }
}

/// Encodes `values` (whole blocks from a block boundary) into `bytes` and `scales`, rounding
/// stochastically with bits from `seed` and each value's index `first + i`. (One buffer alone,
/// for the tests; the step encodes its buffers together, [`encode_state_q8`].)
#[cfg(test)]
pub(crate) fn encode_into(code: Code, values: &[f32], bytes: &mut [u8], scales: &mut [f32], seed: u64, first: u64) {
    // Indices wrap at 2^32: streams of tensors above 4G elements repeat, harmlessly.
    let seed = (seed ^ (seed >> 32)) as u32;
    let blocks = values.chunks(BLOCK).zip(bytes.chunks_mut(BLOCK)).zip(scales.iter_mut());
    for (bi, ((v, b), s)) in blocks.enumerate() {
        let (scale, inv) = block_scale(v);
        *s = scale;
        let base = (first + (bi * BLOCK) as u64) as u32;
        match code {
            Code::Signed => {
                v.iter().zip(b.iter_mut()).enumerate().for_each(|(i, (&x, b))| {
                    *b = encode(Code::Signed, x, inv, hash32(seed, base.wrapping_add(i as u32)))
                })
            }
            Code::Positive => v.iter().zip(b.iter_mut()).enumerate().for_each(|(i, (&x, b))| {
                *b = encode(Code::Positive, x, inv, hash32(seed, base.wrapping_add(i as u32)))
            }),
        }
    }
}

/// One block's scale (its largest magnitude, at least `f32::MIN_POSITIVE`) and the scale's
/// inverse (both 0 for an all-zero block).
#[inline(always)]
pub(crate) fn block_scale(v: &[f32]) -> (f32, f32) {
    // The largest magnitude bits (the order of non-negative floats' bits is theirs): an integer
    // max vectorizes, a float max fold does not.
    let largest = v.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
    if largest == 0 {
        return (0.0, 0.0);
    }
    // A subnormal scale's inverse overflows (and `0 * inf` is NaN): a block of subnormals is
    // coded relative to the smallest normal float instead, as `packed_tensor` does.
    let scale = f32::from_bits(largest).max(f32::MIN_POSITIVE);
    (scale, 1.0 / scale)
}

/// Whole blocks of one 8-bit buffer, to be written: a byte per value, a scale per block.
pub(crate) struct Q8Out<'a> {
    /// One byte per value.
    pub(crate) bytes: &'a mut [u8],
    /// One scale per [`BLOCK`] values.
    pub(crate) scales: &'a mut [f32],
}

/// The 8-bit state of a step, encoded together from the same whole blocks: the moments m
/// ([`Code::Signed`]) and v ([`Code::Positive`]) and, between Lookahead syncs, the delta u
/// ([`Code::Signed`]). One 32-bit hash per element gives all the random bits: its low half
/// rounds m, its high half v, and the middle 16 bits (rotated) u; each value's 16 bits are
/// uniform and drawn afresh every step, so each rounding is unbiased (to 2^-16 of a code step),
/// although the three roundings of one element are not independent of each other. Inlined into
/// the caller, which chooses the instruction set.
#[inline(always)]
pub(crate) fn encode_state_q8(
    (m, m_out): (&[f32], Q8Out<'_>),
    (v, v_out): (&[f32], Q8Out<'_>),
    u: Option<(&[f32], Q8Out<'_>)>,
    seed: u64,
    first: u64,
) {
    let seed = (seed ^ (seed >> 32)) as u32;
    let (mb, ms, vb, vs) = (m_out.bytes, m_out.scales, v_out.bytes, v_out.scales);
    let (u, mut u_out) = match u {
        Some((u, out)) => (u, Some(out)),
        None => (&[][..], None),
    };
    for (bi, range) in (0..m.len()).step_by(BLOCK).map(|s| s..(s + BLOCK).min(m.len())).enumerate() {
        let (sm, im) = block_scale(&m[range.clone()]);
        let (sv, iv) = block_scale(&v[range.clone()]);
        (ms[bi], vs[bi]) = (sm, sv);
        let base = (first + range.start as u64) as u32;
        let hash = |i: usize| hash32(seed, base.wrapping_add(i as u32));
        let (mb, vb) = (&mut mb[range.clone()], &mut vb[range.clone()]);
        let (mx, vx) = (&m[range.clone()], &v[range.clone()]);
        match &mut u_out {
            None => {
                for (i, ((mb, vb), (&x, &y))) in mb.iter_mut().zip(vb.iter_mut()).zip(mx.iter().zip(vx)).enumerate() {
                    let r = hash(i);
                    *mb = encode(Code::Signed, x, im, (r & 0xFFFF) << 4);
                    *vb = encode(Code::Positive, y, iv, (r >> 16) << 4);
                }
            }
            Some(out) => {
                let ux = &u[range.clone()];
                let (su, iu) = block_scale(ux);
                out.scales[bi] = su;
                let ub = &mut out.bytes[range];
                let elements = mb.iter_mut().zip(vb.iter_mut()).zip(ub.iter_mut()).zip(mx.iter().zip(vx).zip(ux));
                for (i, (((mb, vb), ub), ((&x, &y), &z))) in elements.enumerate() {
                    let r = hash(i);
                    *mb = encode(Code::Signed, x, im, (r & 0xFFFF) << 4);
                    *vb = encode(Code::Positive, y, iv, (r >> 16) << 4);
                    *ub = encode(Code::Signed, z, iu, (r.rotate_left(8) & 0xFFFF) << 4);
                }
            }
        }
    }
}

/// The bf16 state of a step, encoded together, with one hash per element as in
/// [`encode_state_q8`] (16 random bits each, as [`encode16`] uses).
#[inline(always)]
pub(crate) fn encode_state16(
    (m, m_bits): (&[f32], &mut [u16]),
    (v, v_bits): (&[f32], &mut [u16]),
    u: Option<(&[f32], &mut [u16])>,
    seed: u64,
    first: u64,
) {
    let seed = (seed ^ (seed >> 32)) as u32;
    let first = first as u32;
    let round = |x: f32, r: u32| (x.to_bits().wrapping_add(r) >> 16) as u16;
    let pairs = m_bits.iter_mut().zip(v_bits.iter_mut()).zip(m.iter().zip(v));
    match u {
        None => {
            for (i, ((mb, vb), (&x, &y))) in pairs.enumerate() {
                let r = hash32(seed, first.wrapping_add(i as u32));
                (*mb, *vb) = (round(x, r & 0xFFFF), round(y, r >> 16));
            }
        }
        Some((u, u_bits)) => {
            for (i, (((mb, vb), (&x, &y)), (ub, &z))) in pairs.zip(u_bits.iter_mut().zip(u)).enumerate() {
                let r = hash32(seed, first.wrapping_add(i as u32));
                (*mb, *vb, *ub) = (round(x, r & 0xFFFF), round(y, r >> 16), round(z, r.rotate_left(8) & 0xFFFF));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(code: Code, values: &[f32], seed: u64) -> Vec<f32> {
        let mut q = Q8Buf::zeros(code, values.len());
        encode_into(code, values, &mut q.bytes, &mut q.scales, seed, 0);
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
    fn a_step_s_buffers_encoded_together_round_without_bias() {
        // m, v and u take the low, high and (rotated) middle 16 bits of one hash: each must be
        // unbiased alone.
        let n = 20_000;
        let (x, y, z) = (0.3f32, 0.7f32, -0.45f32);
        let (mut m, mut v, mut u) = (vec![x; n], vec![y; n], vec![z; n]);
        for i in (0..n).step_by(BLOCK) {
            (m[i], v[i], u[i]) = (1.0, 1.0, -1.0); // each block's scale
        }
        let mean = |back: &[f32]| {
            let kept: Vec<f64> =
                back.iter().enumerate().filter(|(i, _)| i % BLOCK != 0).map(|(_, &z)| z as f64).collect();
            kept.iter().sum::<f64>() / kept.len() as f64
        };
        for with_u in [true, false] {
            let zeros = |code| Q8Buf::zeros(code, n);
            let (mut qm, mut qv, mut qu) = (zeros(Code::Signed), zeros(Code::Positive), zeros(Code::Signed));
            let delta = with_u.then(|| (&u[..], qu.out()));
            encode_state_q8((&m, qm.out()), (&v, qv.out()), delta, 9, 0);
            assert!((mean(&qm.to_f32()) - x as f64).abs() < 2e-3, "8-bit m: {}", mean(&qm.to_f32()));
            assert!((mean(&qv.to_f32()) - y as f64).abs() < 4e-3, "8-bit v: {}", mean(&qv.to_f32()));
            if with_u {
                assert!((mean(&qu.to_f32()) - z as f64).abs() < 3e-3, "8-bit u: {}", mean(&qu.to_f32()));
            } else {
                assert!(qu.bytes.iter().all(|&b| b == 0), "no delta, nothing written");
            }
        }
        let (x, y, z) = (1.0f32 + 1.0 / 1024.0, 1.0f32 + 3.0 / 1024.0, -(1.0f32 + 5.0 / 1024.0));
        let (mut bm, mut bv, mut bu) = (vec![0u16; n], vec![0u16; n], vec![0u16; n]);
        let (mx, vx, ux) = (vec![x; n], vec![y; n], vec![z; n]);
        encode_state16((&mx, &mut bm), (&vx, &mut bv), Some((&ux, &mut bu)), 9, 0);
        let avg = |b: &[u16]| decode16(b).iter().map(|&z| z as f64).sum::<f64>() / n as f64;
        assert!((avg(&bm) - x as f64).abs() < 2e-4, "bf16 m: {}", avg(&bm));
        assert!((avg(&bv) - y as f64).abs() < 2e-4, "bf16 v: {}", avg(&bv));
        assert!((avg(&bu) - z as f64).abs() < 2e-4, "bf16 u: {}", avg(&bu));
    }

    #[test]
    fn a_block_of_subnormals_is_coded_against_the_smallest_normal() {
        // 1 / scale would overflow for these (and 0 * inf is NaN): coded relative to
        // f32::MIN_POSITIVE, they come back close, and 0 stays 0.
        let values = [1e-39f32, -5e-40, 0.0, 2e-40];
        let back = roundtrip(Code::Signed, &values, 4);
        assert_eq!(back[2], 0.0);
        for (x, y) in values.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() * 0.13 + 1e-45, "{x} came back as {y}");
        }
        let back = roundtrip(Code::Positive, &[1e-39, 0.0, 3e-40], 4);
        assert_eq!(back[1], 0.0);
        assert!(back[0] > 0.8e-39 && back[2] > 2e-40, "{back:?}");
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
    fn bf16_rounding_is_unbiased_and_keeps_zero() {
        let x = 1.0f32 + 1.0 / 1024.0; // between two bf16 values (steps of 1/128)
        let n = 20_000;
        let mut bits = vec![0u16; n];
        encode16(&vec![x; n], &mut bits, 3, 0);
        let back = decode16(&bits);
        let mean = back.iter().map(|&y| y as f64).sum::<f64>() / n as f64;
        assert!((mean - x as f64).abs() < 2e-4, "mean {mean} for {x}");
        assert!(back.iter().all(|&y| y == 1.0 || y == 1.0 + 1.0 / 128.0));
        let mut z = [7u16; 2];
        encode16(&[0.0, -0.0], &mut z, 3, 0);
        assert_eq!(decode16(&z), [0.0, -0.0]);
    }

    #[test]
    fn rounding_is_reproducible_from_the_seed() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_eq!(roundtrip(Code::Signed, &values, 5), roundtrip(Code::Signed, &values, 5));
        assert_ne!(roundtrip(Code::Signed, &values, 5), roundtrip(Code::Signed, &values, 6));
    }
}
