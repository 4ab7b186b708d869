//! Which path an op takes: the fused CPU kernel (CPU, f32/f64), or the portable op-by-op
//! version that CUDA, Metal and half precision run, and that tests run on the CPU too.

use candle_core::{DType, Tensor};

/// Whether the fused CPU kernels apply (CPU, f32 or f64, and not turned off by
/// [`without_fused_kernels`]).
pub(crate) fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && !UNFUSED.with(|u| u.get())
}

thread_local! {
    static UNFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused CPU kernels turned off on this thread: models then take the
/// op-by-op path that other devices (CUDA, Metal) and dtypes take, so tests can check that
/// path on the CPU against the fused one.
pub fn without_fused_kernels<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag even when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNFUSED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNFUSED.with(|u| u.replace(true)));
    f()
}
