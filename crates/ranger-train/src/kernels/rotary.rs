//! Rotary position embedding in Hugging Face's "rotate half" layout, fused on the CPU (only its
//! output kept for backprop; backward is the transposed rotation), op by op elsewhere.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::dtype::{dtype, float_dispatch, slice};
use super::float::Float;
use super::path::fused_ok;

/// Rotary position embedding in Hugging Face's "rotate half" layout:
/// `x * cos + rotate_half(x) * sin`, with `x: [b, heads, seq, head_dim]` and
/// `cos`/`sin: [b, 1, seq, head_dim]` (per-sequence positions, so packed examples restart at 0).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() && cos.dims().get(1) == Some(&1) {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary { rows: false });
    }
    apply_rotary_ops(x, cos, sin)
}

/// [`apply_rotary`] for token rows `x: [n, heads * head_dim]` (the projections' own layout),
/// with `cos`/`sin: [n, head_dim]` (each row's position).
pub fn apply_rotary_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary { rows: true });
    }
    let (n, cols) = x.dims2()?;
    let d = cos.dim(1)?;
    let heads = x.reshape((n, cols / d, d))?;
    apply_rotary_ops(&heads, &cos.unsqueeze(1)?, &sin.unsqueeze(1)?)?.reshape((n, cols))
}

/// [`apply_rotary`] from tensor ops.
pub fn apply_rotary_ops(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// Rotary embedding `x * cos + rotate_half(x) * sin` (f32/f64), keeping only its output for
/// backprop: `x: [b, h, s, d]` with `cos`, `sin: [b, 1, s, d]`, or with `rows` token rows
/// `x: [n, h * d]` (the projections' layout, no transpose needed) with `cos`, `sin: [n, d]`.
pub struct Rotary {
    /// Whether `x` is token rows `[n, heads * head_dim]` with `cos`/`sin: [n, head_dim]`, rather
    /// than `[b, heads, s, head_dim]` with `cos`/`sin: [b, 1, s, head_dim]`.
    pub rows: bool,
}

/// The gradient of [`Rotary`] (the transposed rotation), one pass over the output gradient.
struct RotaryGrad {
    rows: bool,
}

impl Rotary {
    /// The forward pass or, with `transpose`, the backward pass (of the output gradient in s1).
    // x: [b, h, s, d] (or [n, h * d]), cos, sin: [b, 1, s, d] (or [n, d]) -> out: as x
    #[allow(clippy::too_many_arguments)]
    fn run(
        op: &str,
        rows: bool,
        transpose: bool,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, s, d, cs) = if rows {
            let (n, cols) = l1.shape().dims2()?;
            let d = l2.dims().last().copied().unwrap_or(0);
            if d == 0 || cols % d != 0 {
                candle_core::bail!("ranger-rotary: cos/sin shape {:?} for x {:?}", l2.shape(), l1.shape());
            }
            (cols / d, n, d, vec![n, d])
        } else {
            let (b, h, s, d) = l1.shape().dims4()?;
            (h, s, d, vec![b, 1, s, d])
        };
        if l2.shape().dims() != cs || l3.shape().dims() != cs {
            candle_core::bail!("ranger-rotary: cos/sin shape {:?} for x {:?}", l2.shape(), l1.shape());
        }
        let out = float_dispatch!(op, dtype(s1), |T| {
            let (x, c, sn) = (slice(op, s1, l1)?, slice(op, s2, l2)?, slice(op, s3, l3)?);
            T::into_storage(rotary_rows::<T>(x, c, sn, h, s, d, rows, transpose))
        });
        Ok((out, l1.shape().clone()))
    }
}

/// `x * cos + rotate_half(x) * sin` per head row or, with `transpose` (the backward pass),
/// `x * cos + rotate_half^T(x * sin)`, where `rotate_half^T(u) = [u2, -u1]`.
#[allow(clippy::too_many_arguments)]
fn rotary_rows<T: Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    h: usize,
    s: usize,
    d: usize,
    rows: bool,
    transpose: bool,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(r, (o, row))| {
        // Head-row r's position (b * s + i).
        let pos = if rows { r / h } else { r / (h * s) * s + r % s };
        let (c, sn) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
        for j in 0..d {
            let rot = match (j < half, transpose) {
                (true, false) => T::zero() - row[j + half] * sn[j],
                (false, false) => row[j - half] * sn[j],
                (true, true) => row[j + half] * sn[j + half],
                (false, true) => T::zero() - row[j - half] * sn[j - half],
            };
            o[j] = row[j] * c[j] + rot;
        }
    });
    out
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "ranger-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::run(self.name(), self.rows, false, s1, l1, s2, l2, s3, l3)
    }

    // g: as x -> dx: as x (cos and sin get none)
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(g.contiguous()?.apply_op3_no_bwd(
                &cos.contiguous()?,
                &sin.contiguous()?,
                &RotaryGrad { rows: self.rows },
            )?),
            None,
            None,
        ))
    }
}

impl CustomOp3 for RotaryGrad {
    fn name(&self) -> &'static str {
        "ranger-rotary-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Rotary::run(self.name(), self.rows, true, s1, l1, s2, l2, s3, l3)
    }
}
