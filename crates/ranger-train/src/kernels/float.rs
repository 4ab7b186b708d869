//! The element types of the fused CPU kernels (f32 and f64) and the operations the kernels
//! write generically; [`super::grad_sink`] holds gradients of the same types.
//!
//! Candle's [`WithDType`] brings the arithmetic (`zero`, `one`, `+ - * /`, `PartialOrd`),
//! `max` (`f32::max` / `f64::max`), `from_f64` / `to_f64` and the conversions to and from
//! [`candle_core::CpuStorage`]; this trait adds the functions of `f32` / `f64` that it lacks.

use candle_core::WithDType;

/// A float type of the fused kernels: Candle's element type plus the transcendental functions.
pub(crate) trait Float: WithDType {
    /// `1 / √2` in this type's own constant (not a rounded f64).
    const FRAC_1_SQRT_2: Self;
    /// `2 / √π` in this type's own constant.
    const FRAC_2_SQRT_PI: Self;
    /// -∞.
    fn neg_infinity() -> Self;
    /// libm's `exp`.
    fn exp(self) -> Self;
    /// libm's `ln`.
    fn ln(self) -> Self;
    /// The square root.
    fn sqrt(self) -> Self;
    /// Candle's `erf` for this type.
    fn erf(self) -> Self;
    fn tanh(self) -> Self;
    /// `n` rounded to this type.
    fn from_usize(n: usize) -> Self;
    /// `exp` of every element, in place (vectorised for f32).
    fn exp_in_place(xs: &mut [Self]);
}

macro_rules! float {
    ($t:ident, $erf:path, $exp_in_place:expr) => {
        impl Float for $t {
            const FRAC_1_SQRT_2: Self = std::$t::consts::FRAC_1_SQRT_2;
            const FRAC_2_SQRT_PI: Self = std::$t::consts::FRAC_2_SQRT_PI;
            #[inline]
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn from_usize(n: usize) -> Self {
                n as $t
            }
            #[inline]
            fn exp_in_place(xs: &mut [Self]) {
                $exp_in_place(xs)
            }
        }
    };
}

float!(f32, candle_core::cpu::erf::erf_f32, super::exp::exp_in_place_f32);
float!(f64, candle_core::cpu::erf::erf_f64, |xs: &mut [f64]| xs.iter_mut().for_each(|x| *x = x.exp()));

/// The sum of `xs`, accumulated in f64 over eight independent lanes (so it vectorises). A
/// vocabulary-long row of exponentials summed one by one in f32 loses its many small terms:
/// over Gemma 3's 262,144 logits the loss came out 3.4e-4 low.
#[inline]
pub(crate) fn wide_sum<T: Float>(xs: &[T]) -> T {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x.to_f64();
        }
    }
    let sum = tail.iter().fold(lanes.iter().sum::<f64>(), |s, x| s + x.to_f64());
    T::from_f64(sum)
}
