//! The element types of the fused CPU kernels (f32 and f64) and the operations the kernels
//! write generically; [`super::grad_sink`] holds gradients of the same types.

use candle_core::CpuStorage;

/// The float operations the kernels need, and the CPU storage variant that holds the type.
pub(crate) trait Float:
    'static
    + Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + PartialOrd
{
    /// `1 / √2` in this type's own constant (not a rounded f64).
    const FRAC_1_SQRT_2: Self;
    /// `2 / √π` in this type's own constant.
    const FRAC_2_SQRT_PI: Self;
    /// 0.
    fn zero() -> Self;
    /// 1.
    fn one() -> Self;
    /// -∞.
    fn neg_infinity() -> Self;
    /// The larger of the two.
    fn max(self, o: Self) -> Self;
    /// libm's `exp`.
    fn exp(self) -> Self;
    /// libm's `ln`.
    fn ln(self) -> Self;
    /// The square root.
    fn sqrt(self) -> Self;
    /// Candle's `erf` for this type.
    fn erf(self) -> Self;
    /// `n` rounded to this type.
    fn from_usize(n: usize) -> Self;
    /// `x` rounded to this type.
    fn from_f64(x: f64) -> Self;
    /// `exp` of every element, in place (vectorised for f32).
    fn exp_in_place(xs: &mut [Self]);
    /// The values of `s` if it holds this type.
    fn of_storage(s: &CpuStorage) -> Option<&[Self]>;
    /// `v` as CPU storage (no copy).
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! float {
    ($t:ident, $variant:ident, $erf:path, $exp_in_place:expr) => {
        impl Float for $t {
            const FRAC_1_SQRT_2: Self = std::$t::consts::FRAC_1_SQRT_2;
            const FRAC_2_SQRT_PI: Self = std::$t::consts::FRAC_2_SQRT_PI;
            #[inline]
            fn exp_in_place(xs: &mut [Self]) {
                $exp_in_place(xs)
            }
            #[inline]
            fn zero() -> Self {
                0.0
            }
            #[inline]
            fn one() -> Self {
                1.0
            }
            #[inline]
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
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
            fn from_usize(n: usize) -> Self {
                n as $t
            }
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn of_storage(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            #[inline]
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

float!(f32, F32, candle_core::cpu::erf::erf_f32, super::exp::exp_in_place_f32);
float!(f64, F64, candle_core::cpu::erf::erf_f64, |xs: &mut [f64]| xs.iter_mut().for_each(|x| *x = x.exp()));
