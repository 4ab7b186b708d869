//! `exp` over f32 slices, eight lanes at a time with AVX2 + FMA where the CPU has them (checked
//! at run time), for the softmax-heavy fused kernels: libm's scalar `expf` was about 5 % of a
//! SmolLM2 training step.

/// `exp` of every element, in place. Within 2 ulp of libm's `expf` for inputs above -87.3;
/// smaller inputs (such as masked attention scores) give exactly 0. NaN, infinities and inputs
/// near overflow go through libm.
pub fn exp_in_place_f32(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { avx2::exp_in_place(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = scalar(*x));
}

/// Below this, `exp` is under f32's smallest normal number: the result is 0.
const MIN_INPUT: f32 = -87.3;

/// Above this, `2^round(x / ln 2)` no longer fits the exponent bits the vector path builds.
const MAX_FAST_INPUT: f32 = 88.37;

/// The same result for one element (the tail of a slice, lanes the vector path leaves to libm,
/// and CPUs without AVX2).
fn scalar(x: f32) -> f32 {
    if x < MIN_INPUT {
        return 0.0;
    }
    x.exp()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Cephes' `expf`: `x = n ln2 + r`, `exp(r)` by a degree-6 polynomial, `2^n` built in the
    /// exponent bits.
    ///
    /// # Safety
    /// The CPU running it must support AVX2 and FMA (check with `is_x86_feature_detected!`,
    /// as [`super::exp_in_place_f32`] does): it is compiled to their instructions, and
    /// running it on a CPU without them is undefined behaviour. The slice itself has no
    /// requirement.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 f32; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(c.as_ptr());
                // NaN or near overflow anywhere in the chunk: libm for the whole chunk.
                let odd = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x),
                    _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(super::MAX_FAST_INPUT)),
                );
                if _mm256_movemask_ps(odd) != 0 {
                    c.iter_mut().for_each(|x| *x = super::scalar(*x));
                } else {
                    _mm256_storeu_ps(c.as_mut_ptr(), exp8(x));
                }
            }
        }
        for x in chunks.into_remainder() {
            *x = super::scalar(*x);
        }
    }

    /// `exp` of eight lanes (safe to call only from code compiled with AVX2 and FMA, which the
    /// compiler enforces).
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let too_small = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(super::MIN_INPUT));
        // Inputs are at most MAX_FAST_INPUT here (the caller sends larger ones to libm).
        let x = _mm256_max_ps(x, _mm256_set1_ps(super::MIN_INPUT));
        // n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for precision).
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n from the exponent bits; n is in [-126, 127] for inputs in [MIN_INPUT, MAX_FAST_INPUT].
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(too_small, _mm256_mul_ps(e, pow2))
    }
}

#[cfg(test)]
mod tests {
    /// Against libm over the whole useful range, and 0 below it.
    #[test]
    fn matches_libm() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -88.0 + i as f32 * (177.0 / 200_000.0)).collect();
        xs.extend([
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            -87.2,
            -1e9,
            f32::NEG_INFINITY,
            88.3,
            88.37,
            88.38,
            88.7,
            88.8,
            f32::INFINITY,
            1.0,
        ]);
        xs.extend([f32::NAN, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]); // NaN inside a vector chunk
        let want: Vec<f32> = xs.iter().map(|&x| if x < super::MIN_INPUT { 0.0 } else { x.exp() }).collect();
        let mut got = xs.clone();
        super::exp_in_place_f32(&mut got);
        for ((&x, &w), &g) in xs.iter().zip(&want).zip(&got) {
            if w.is_nan() || w.is_infinite() {
                assert!(g.is_nan() == w.is_nan() && (g == w || w.is_nan()), "exp({x}): {g} vs libm {w}");
                continue;
            }
            let ulps = (w.to_bits() as i64 - g.to_bits() as i64).abs();
            assert!(ulps <= 2 || (w - g).abs() <= f32::MIN_POSITIVE, "exp({x}): {g} vs libm {w} ({ulps} ulp)");
        }
    }
}
