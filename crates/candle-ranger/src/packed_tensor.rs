//! Packed optimizer state as tensors on the variable's device: the portable path of
//! [`crate::StatePrecision::Int8`] and [`crate::StatePrecision::Bf16`], for CUDA and Metal
//! variables (and the CPU cross-check of the fused step).
//!
//! The codes are [`crate::state_codec`]'s, written with Candle tensor ops that are exact on
//! every device: exponents are found with `log` and then corrected against a table of exact
//! powers of two, mantissas are taken by multiplying with exact powers of two and `floor`,
//! and the stochastic rounding bits come from an integer hash whose products never exceed
//! 32 bits. Decoding equals the fused CPU codec's bit for bit, and so does encoding with the
//! rounding turned off (unit tests check); the random numbers differ (the CPU hash uses xor and
//! shifts, which Candle does not have), so the two paths round differently, both without bias.

use candle_core::{DType, Device, Shape, Tensor, D};

use crate::state_codec::{Code, BLOCK};

/// One packed buffer on a device.
#[derive(Debug, Clone)]
pub(crate) enum PackedTensor {
    /// 8-bit codes: one byte per value (u8, flat) and one f32 scale per [`BLOCK`] values.
    Q8 { code: Code, bytes: Tensor, scales: Tensor },
    /// bf16 values, in the variable's shape.
    B16(Tensor),
}

/// The prime of the hash: below 2^16, so `x * y < 2^32` for residues, and `P - 1` is not a
/// multiple of 3, so cubing is a permutation of the residues.
const P: u32 = 65_519;

/// Smallest and largest exponent the tables hold; 8-bit codes need none below 2^-40 (the
/// positive code's smallest step is 2^-30 of the scale), bf16 keeps f32's whole range with
/// subnormals in the lowest binade, as the bit-level codec does.
const E_MIN: i32 = -126;
const E_MAX: i32 = 127;

impl PackedTensor {
    /// `n` zeros of the given kind on `device` (`shape` for bf16).
    pub(crate) fn zeros(q8: Option<Code>, shape: &Shape, device: &Device) -> candle_core::Result<Self> {
        let n = shape.elem_count();
        Ok(match q8 {
            Some(code) => PackedTensor::Q8 {
                code,
                bytes: Tensor::zeros(n, DType::U8, device)?,
                scales: Tensor::zeros(n.div_ceil(BLOCK), DType::F32, device)?,
            },
            None => PackedTensor::B16(Tensor::zeros(shape, DType::BF16, device)?),
        })
    }

    /// Zeros of the same kind and size (a signed code for 8-bit).
    pub(crate) fn zeros_like(&self) -> candle_core::Result<Self> {
        Ok(match self {
            PackedTensor::Q8 { bytes, scales, .. } => {
                PackedTensor::Q8 { code: Code::Signed, bytes: bytes.zeros_like()?, scales: scales.zeros_like()? }
            }
            PackedTensor::B16(t) => PackedTensor::B16(t.zeros_like()?),
        })
    }

    /// The values as f32, in `shape`.
    pub(crate) fn decode(&self, shape: &Shape) -> candle_core::Result<Tensor> {
        match self {
            PackedTensor::B16(t) => t.to_dtype(DType::F32)?.reshape(shape),
            PackedTensor::Q8 { code, bytes, scales } => {
                let n = shape.elem_count();
                let b = blocks(&bytes.to_dtype(DType::F32)?, n)?;
                let (sign, field) = match code {
                    Code::Signed => {
                        let sign = b.ge(128f64)?.to_dtype(DType::F32)?;
                        (Some(sign.affine(-2.0, 1.0)?), (&b - (sign * 128.0)?)?)
                    }
                    Code::Positive => (None, b),
                };
                let exp = (&field / 8.0)?.floor()?;
                let mant = (&field - (&exp * 8.0)?)?;
                // (1 + mant / 8) * 2^(exp - bias) * scale, and 0 where the exponent field is 0.
                let pow = powers(&exp.affine(1.0, -(code_bias(*code) as f64))?, false)?;
                let y = ((mant.affine(0.125, 1.0)? * pow)?.broadcast_mul(&scales.unsqueeze(1)?)?
                    * exp.ne(0f64)?.to_dtype(DType::F32)?)?;
                let y = match sign {
                    Some(s) => (y * s)?,
                    None => y,
                };
                y.flatten_all()?.narrow(0, 0, n)?.reshape(shape)
            }
        }
    }

    /// `x` (f32) encoded as a buffer of the same kind as `self`, rounded stochastically with
    /// bits from `seed` (per variable, step and buffer).
    pub(crate) fn encode_like(&self, x: &Tensor, code: Code, seed: u64) -> candle_core::Result<Self> {
        let n = x.elem_count();
        let nb = n.div_ceil(BLOCK);
        let r = random_residues(nb, seed, x.device())?;
        match self {
            PackedTensor::B16(_) => {
                let flat = blocks(&x.flatten_all()?, n)?;
                let bf = encode_b16(&flat, &r)?.flatten_all()?.narrow(0, 0, n)?;
                Ok(PackedTensor::B16(bf.to_dtype(DType::BF16)?.reshape(x.shape())?))
            }
            PackedTensor::Q8 { .. } => {
                let (bytes, scales) = encode_q8(&blocks(&x.flatten_all()?, n)?, code, &r)?;
                Ok(PackedTensor::Q8 { code, bytes: bytes.flatten_all()?.narrow(0, 0, n)?, scales: scales.reshape(nb)? })
            }
        }
    }
}

/// The code's exponent bias (as [`crate::state_codec`] defines it).
fn code_bias(code: Code) -> i32 {
    match code {
        Code::Signed => 15,
        Code::Positive => 31,
    }
}

/// A flat tensor of `n` values as `[blocks, BLOCK]`, the last block padded with zeros.
fn blocks(flat: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let nb = n.div_ceil(BLOCK);
    let flat = flat.flatten_all()?;
    let flat = if nb * BLOCK > n { flat.pad_with_zeros(0, 0, nb * BLOCK - n)? } else { flat };
    flat.reshape((nb, BLOCK))
}

/// `2^e` (or `2^-e` when `inverse`) for integer-valued `e` (f32) in `[E_MIN, E_MAX]`, exactly,
/// from a table.
fn powers(e: &Tensor, inverse: bool) -> candle_core::Result<Tensor> {
    let table: Vec<f32> = (E_MIN..=E_MAX).map(|k| if inverse { 2f32.powi(-k) } else { 2f32.powi(k) }).collect();
    let table = Tensor::from_vec(table, (E_MAX - E_MIN + 1) as usize, e.device())?;
    let idx = e.clamp(E_MIN as f32, E_MAX as f32)?.affine(1.0, -(E_MIN as f64))?.to_dtype(DType::U32)?;
    table.index_select(&idx.flatten_all()?, 0)?.reshape(e.shape())
}

/// The binary exponent of each `y >= 0` (`floor(log2 y)`, clamped to `[E_MIN, E_MAX - 1]`):
/// `log` gives it to within one, the exact table corrects it.
fn exponent(y: &Tensor) -> candle_core::Result<Tensor> {
    let lo = E_MIN as f32;
    let hi = (E_MAX - 1) as f32;
    let e = (y.log()? * std::f64::consts::LOG2_E)?.floor()?.clamp(lo, hi)?;
    let pow = powers(&e, false)?;
    let below = y.lt(&pow)?.to_dtype(DType::F32)?;
    let above = y.ge(&(&pow * 2.0)?)?.to_dtype(DType::F32)?;
    ((e - below)? + above)?.clamp(lo, hi)
}

/// Whether to round up: `frac` is the dropped part in units of 2^-16 of a step (an integer
/// in [0, 65536), f32) and `r` a residue uniform in [0, P): up with probability `frac / 65536`
/// (to within 1/P), compared in u32 as `r * 65536 >= P * (65536 - frac)`.
fn carry(frac: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
    // Both sides below 2^32 (P * 65536 < 2^32), in integers.
    let threshold = frac.affine(-1.0, 65536.0)?.to_dtype(DType::U32)?.affine(P as f64, 0.0)?;
    r.affine(65536.0, 0.0)?.ge(&threshold)?.to_dtype(DType::F32)
}

/// bf16 values of `x` (`[blocks, BLOCK]` f32), as f32, rounded stochastically: 7 mantissa bits
/// kept, the 16 below decide.
fn encode_b16(x: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
    let y = x.abs()?;
    let e = exponent(&y)?;
    // t in [128, 256) (below for subnormals): the kept bits as an integer part, the dropped
    // ones as the fraction. Scaled by 2^-e, then 2^7, so every factor is a float.
    let t = ((y * powers(&e, true)?)? * 128.0)?;
    let kept = t.floor()?;
    let frac = ((t - &kept)? * 65536.0)?;
    let up = carry(&frac, r)?;
    let mag = (((kept + up)? * (1.0 / 128.0))? * powers(&e, false)?)?;
    mag * x.sign()?
}

/// 8-bit codes of `x` (`[blocks, BLOCK]` f32) and the blocks' scales (`[blocks, 1]`), as
/// [`crate::state_codec`] encodes them.
fn encode_q8(x: &Tensor, code: Code, r: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    // The largest magnitude, at least the smallest normal float (a subnormal scale's inverse
    // overflows): 0 only for an all-zero block, whose inverse is then 0 too.
    let largest = x.abs()?.max_keepdim(D::Minus1)?;
    let nonzero = largest.gt(0f64)?.to_dtype(DType::F32)?;
    let floored = largest.maximum(f32::MIN_POSITIVE)?;
    let inv = (&nonzero / &floored)?;
    let scale = (floored * nonzero)?;
    let y = x.broadcast_mul(&inv)?.abs()?;
    let e = exponent(&y)?;
    // t in [8, 16): the 3 kept mantissa bits (and the leading 1), the 20 below as the fraction;
    // the bit-level codec rounds with 16 random bits above the lowest 4, so the fraction here
    // is counted in 2^-16 steps and truncated the same way.
    let t = ((&y * powers(&e, true)?)? * 8.0)?;
    let kept = t.floor()?;
    let frac = ((t - &kept)? * 65536.0)?.floor()?;
    let kept = (kept + carry(&frac, r)?)?;
    // A carry out of the mantissa (kept == 16) moves into the exponent.
    let over = kept.ge(16f64)?.to_dtype(DType::F32)?;
    let mant = (kept.affine(1.0, -8.0)? - (&over * 8.0)?)?;
    let exp = ((e + over)? + code_bias(code) as f64)?;
    let byte = match code {
        Code::Signed => {
            // Below the smallest exponent (and 0 itself): 0.
            let sign = x.lt(0f64)?.to_dtype(DType::F32)?;
            let byte = (((sign * 128.0)? + (exp.clamp(0f32, 15f32)? * 8.0)?)? + &mant)?;
            (byte * exp.ge(1f64)?.to_dtype(DType::F32)?)?
        }
        Code::Positive => {
            // Never 0 for a non-zero value: the smallest code instead.
            let byte = exp
                .ge(1f64)?
                .where_cond(&((exp.minimum(31f32)? * 8.0)? + &mant)?, &exp.ones_like()?.affine(8.0, 0.0)?)?;
            (byte * y.gt(0f64)?.to_dtype(DType::F32)?)?
        }
    };
    Ok((byte.to_dtype(DType::U8)?, scale))
}

/// `x mod P` for u32 `x`.
fn modp(x: &Tensor) -> candle_core::Result<Tensor> {
    let p = Tensor::new(&[P], x.device())?;
    let q = x.broadcast_div(&p)?;
    x - q.broadcast_mul(&p)?
}

/// `x^3 mod P` for residues `x` (a permutation of the residues).
fn cube(x: &Tensor) -> candle_core::Result<Tensor> {
    modp(&(modp(&(x * x)?)? * x)?)
}

/// One residue in [0, P) per element of `nb` blocks (`[nb, BLOCK]`, u32): a keyed hash of the
/// element's index, built from additions, products below 2^32, cubes and reductions mod P,
/// each a permutation of the residues, so every residue is equally likely.
fn random_residues(nb: usize, seed: u64, device: &Device) -> candle_core::Result<Tensor> {
    // Keys from the 64-bit seed: offsets in [0, P) and multipliers in [1, P).
    let key = |i: u64| crate::state_codec::stream_seed(seed, i);
    let off = |i: u64| (key(i) % P as u64) as f64;
    let mul = |i: u64| (1 + key(i) % (P as u64 - 1)) as f64;
    // Lanes and blocks are hashed apart (small tensors), then together.
    let lane = Tensor::arange(0u32, BLOCK as u32, device)?.unsqueeze(0)?;
    let lane = modp(&cube(&modp(&lane.affine(1.0, off(1))?)?)?.affine(mul(2), 0.0)?)?;
    let blk = Tensor::arange(0u32, nb as u32, device)?.unsqueeze(1)?;
    let (low, high) = (modp(&blk)?, blk.broadcast_div(&Tensor::new(&[P], device)?)?);
    let blk = modp(&cube(&modp(&(low.affine(1.0, off(3))? + high)?)?)?.affine(mul(4), 0.0)?)?;
    let h = modp(&lane.broadcast_add(&blk)?)?;
    let h = modp(&cube(&h)?.affine(mul(5), off(6))?)?;
    cube(&modp(&h.affine(1.0, off(7))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_codec::{block_scale, decode, encode};

    fn values(n: usize) -> Vec<f32> {
        // Magnitudes over 40 binades, both signs, zeros, and blocks of very different scales.
        (0..n)
            .map(|i| {
                let x = ((i as f32 * 0.61).sin() * 2f32.powi(-((i * 7 % 41) as i32)))
                    * 10f32.powi((i / BLOCK % 5) as i32 - 2);
                if i % 37 == 0 {
                    0.0
                } else {
                    x
                }
            })
            .collect()
    }

    #[test]
    fn decoding_equals_the_bit_level_codec() {
        let n = 3 * BLOCK + 17;
        let bytes: Vec<u8> = (0..n).map(|i| (i * 97 % 256) as u8).collect();
        let scales: Vec<f32> = (0..n.div_ceil(BLOCK)).map(|b| 0.37 * (b as f32 + 1.0)).collect();
        for code in [Code::Signed, Code::Positive] {
            let t = PackedTensor::Q8 {
                code,
                bytes: Tensor::new(bytes.as_slice(), &Device::Cpu).unwrap(),
                scales: Tensor::new(scales.as_slice(), &Device::Cpu).unwrap(),
            };
            let ours = t.decode(&Shape::from(n)).unwrap().to_vec1::<f32>().unwrap();
            let reference: Vec<f32> =
                bytes.iter().enumerate().map(|(i, &b)| decode(code, b, scales[i / BLOCK])).collect();
            assert_eq!(ours, reference, "{code:?}");
        }
    }

    #[test]
    fn encoding_without_rounding_equals_the_bit_level_codec() {
        // r = 0 never rounds up, as 0 random bits in the bit-level codec. The last block holds
        // subnormals only (coded against the smallest normal float).
        let n = 5 * BLOCK;
        let mut x = values(n);
        x[4 * BLOCK..].iter_mut().for_each(|v| *v *= 1e-41);
        assert!(x[4 * BLOCK..].iter().all(|v| v.abs() < f32::MIN_POSITIVE) && x[4 * BLOCK + 1] != 0.0);
        let xt = blocks(&Tensor::new(x.as_slice(), &Device::Cpu).unwrap(), n).unwrap();
        let r = Tensor::zeros((5, BLOCK), DType::U32, &Device::Cpu).unwrap();
        for code in [Code::Signed, Code::Positive] {
            let x: Vec<f32> = if code == Code::Positive { x.iter().map(|v| v.abs()).collect() } else { x.clone() };
            let xt = if code == Code::Positive { xt.abs().unwrap() } else { xt.clone() };
            let (bytes, scales) = encode_q8(&xt, code, &r).unwrap();
            let bytes = bytes.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let scales = scales.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (block, &s) in x.chunks(BLOCK).zip(&scales) {
                assert_eq!(s, block_scale(block).0, "{code:?} scale");
            }
            for (i, (&b, &v)) in bytes.iter().zip(&x).enumerate() {
                let s = scales[i / BLOCK];
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                assert_eq!(b, encode(code, v, inv, 0), "{code:?} value {i}: {v} (scale {s})");
            }
        }
        let ours = encode_b16(&xt, &r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (v, o) in x.iter().zip(&ours) {
            assert_eq!(o.abs().to_bits(), (v.abs().to_bits() >> 16) << 16, "bf16 of {v}");
        }
    }

    #[test]
    fn rounding_is_unbiased_and_the_residues_uniform() {
        let nb = 80;
        let r = random_residues(nb, 5, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
        assert!(r.iter().all(|&x| x < P));
        let mut bins = [0usize; 16];
        r.iter().for_each(|&x| bins[(x as usize * 16) / P as usize] += 1);
        let expected = r.len() as f64 / 16.0;
        let chi2: f64 = bins.iter().map(|&b| (b as f64 - expected).powi(2) / expected).sum();
        assert!(chi2 < 40.0, "residues not uniform: {bins:?}");
        let other = random_residues(nb, 6, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
        assert!(r.iter().zip(&other).filter(|(a, b)| a == b).count() < r.len() / 100, "seeds give other streams");
        // A value between two codes, many times over: the mean is the value.
        let n = nb * BLOCK;
        let mut x = vec![0.3f32; n];
        (0..n).step_by(BLOCK).for_each(|i| x[i] = 1.0);
        let xt = Tensor::new(x.as_slice(), &Device::Cpu).unwrap();
        for (code, kind) in
            [(Code::Signed, Some(Code::Signed)), (Code::Positive, Some(Code::Positive)), (Code::Signed, None)]
        {
            let z = PackedTensor::zeros(kind, &Shape::from(n), &Device::Cpu).unwrap();
            let back = z.encode_like(&xt, code, 11).unwrap().decode(&Shape::from(n)).unwrap().to_vec1::<f32>().unwrap();
            let kept: Vec<f64> =
                back.iter().enumerate().filter(|(i, _)| i % BLOCK != 0).map(|(_, &v)| v as f64).collect();
            let mean = kept.iter().sum::<f64>() / kept.len() as f64;
            let tol = if kind.is_some() { 2e-3 } else { 2e-4 };
            assert!((mean - 0.3).abs() < tol, "{code:?} {kind:?}: mean {mean}");
        }
    }
}
