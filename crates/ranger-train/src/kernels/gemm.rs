//! Matrix products through the `gemm` crate, for the kernels that need strided operands, a
//! product accumulated in place, or a result written without zero-filling it first.

use candle_core::{Result, Tensor};

use super::dtype::{float_dispatch, storage_slice};
use super::float::Float;

/// `dst[m, n] = beta * lhs[m, k] rhs[k, n]`, plus the old `dst` when `accumulate`, with explicit
/// row and column strides (in elements); over rayon's threads when `parallel`.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of every element of the
/// `[m, n]` matrix at row stride `dst_rs`; `lhs` and `rhs` valid for reads of `[m, k]` and
/// `[k, n]` at their strides; `dst` must not overlap `lhs` or `rhs`, and no other thread may
/// touch those `dst` elements during the call. Without `accumulate`, `dst` may be
/// uninitialised: every element is written and none read.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
    beta: T,
    parallel: bool,
) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// A new `[m, n]` matrix `beta * lhs rhs` (operands as in [`gemm_strided`]), written by the
/// product alone: no zero-fill first.
///
/// # Safety
/// `lhs` and `rhs` must be valid for reads of `[m, k]` and `[k, n]` matrices at their strides.
pub(crate) unsafe fn gemm_new<T: Float>(
    (m, n, k): (usize, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: T,
    parallel: bool,
) -> Vec<T> {
    if k == 0 {
        return vec![T::zero(); m * n];
    }
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: dst has room for [m, n]; without `accumulate` gemm writes every element of dst
    // and reads none, so all m * n are set afterwards.
    unsafe {
        gemm_strided((m, n, k), dst.as_mut_ptr(), n, false, lhs, rhs, beta, parallel);
        dst.set_len(m * n);
    }
    dst
}

/// `a b` for 2-D CPU f32/f64 tensors of one dtype, as a new tensor outside the graph (for
/// backward passes), computed without zero-filling the result first.
// a: [m, k], b: [k, n] -> out: [m, n]
pub(crate) fn matmul_detached(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul";
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 {
        candle_core::bail!("matmul: {:?} x {:?}", a.dims(), b.dims());
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    float_dispatch!(OP, a.dtype(), |T| {
        let (x, y) = (storage_slice::<T>(OP, &sa, la)?, storage_slice::<T>(OP, &sb, lb)?);
        // SAFETY: a is [m, k] and b is [k, n], both contiguous.
        let out = unsafe { gemm_new((m, n, k), (x.as_ptr(), k, 1), (y.as_ptr(), n, 1), 1.0, true) };
        Tensor::from_vec(out, (m, n), &candle_core::Device::Cpu)
    })
}
