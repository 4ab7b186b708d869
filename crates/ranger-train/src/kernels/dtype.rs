//! Dtypes: the one place the fused kernels go from a CPU storage of some dtype to a typed
//! slice and a generic kernel ([`float_dispatch!`]), and the dtype the portable versions
//! compute in.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Storage};

use super::float::Float;

/// The dtype normalisation and softmax are computed in: f64 stays f64, everything else is f32.
pub fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Runs `body` with the type alias `T` set to the Rust type of `dtype` (f32 or f64); any other
/// dtype is an error naming `op`. [`super::cpu_op::Fused`] dispatches every fused op this way,
/// once per call.
macro_rules! float_dispatch {
    ($op:expr, $dtype:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            dt => candle_core::bail!("{}: {dt:?} tensors are not supported (f32/f64 only)", $op),
        }
    };
}
pub(crate) use float_dispatch;

/// The elements `l` addresses in `s`, which must be contiguous; otherwise an error naming `op`.
fn contiguous<'a, T>(op: &str, s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: input not contiguous"),
    }
}

/// The contiguous elements of `s` under `l` as a `T` slice; another dtype is an error naming `op`.
#[inline]
pub(crate) fn slice<'a, T: Float>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match T::cpu_storage_as_slice(s) {
        Ok(v) => contiguous(op, v, l),
        Err(_) => candle_core::bail!("{op}: f32/f64 inputs of one dtype expected, got {:?}", s.dtype()),
    }
}

/// [`slice`] for a tensor's storage, which must be on the CPU.
#[inline]
pub(crate) fn storage_slice<'a, T: Float>(op: &str, s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(s) => slice(op, s, l),
        _ => candle_core::bail!("{op}: CPU tensors expected"),
    }
}

/// The contiguous elements of a u32 storage of token ids; another dtype is an error naming `op`
/// and `what` ("token", "target").
pub(crate) fn u32_slice<'a>(op: &str, what: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => contiguous(op, v, l),
        _ => candle_core::bail!("{op}: {what} ids must be u32"),
    }
}

/// [`u32_slice`] for a tensor's storage, which must be on the CPU.
pub(crate) fn storage_u32_slice<'a>(op: &str, what: &str, s: &'a Storage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        Storage::Cpu(s) => u32_slice(op, what, s, l),
        _ => candle_core::bail!("{op}: CPU tensors expected"),
    }
}
