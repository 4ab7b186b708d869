//! Rotary position embedding in Hugging Face's "rotate half" layout, fused on the CPU (only its
//! output kept for backprop; backward is the transposed rotation), op by op elsewhere.

use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

use super::cpu_op::{Fused, FusedOp3, Grads3, Input, Out};
use super::float::Float;
use super::path::fused_ok;

/// Rotary position embedding in Hugging Face's "rotate half" layout:
/// `x * cos + rotate_half(x) * sin`, with `x: [b, heads, seq, head_dim]` and
/// `cos`/`sin: [b, 1, seq, head_dim]` (per-sequence positions, so packed examples restart at 0).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() && cos.dims().get(1) == Some(&1) {
        let head_dim = x.dim(D::Minus1)?;
        return x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Fused(Rotary { rows: false, head_dim }),
        );
    }
    apply_rotary_ops(x, cos, sin)
}

/// [`apply_rotary`] for token rows `x: [n, heads * head_dim]` (the projections' own layout),
/// with `cos`/`sin: [n, rotary_dim]` (each row's position): the first `rotary_dim` values of
/// each head are rotated and the rest pass unchanged (Phi's partial rotary embeddings when
/// `rotary_dim < head_dim`).
pub fn apply_rotary_rows(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() {
        let op = Fused(Rotary { rows: true, head_dim });
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op);
    }
    let (n, cols) = x.dims2()?;
    let d = cos.dim(1)?;
    let heads = x.reshape((n, cols / head_dim, head_dim))?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    if d == head_dim {
        return apply_rotary_ops(&heads, &cos, &sin)?.reshape((n, cols));
    }
    let rotated = apply_rotary_ops(&heads.narrow(2, 0, d)?, &cos, &sin)?;
    Tensor::cat(&[&rotated, &heads.narrow(2, d, head_dim - d)?], 2)?.reshape((n, cols))
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
/// `x: [n, h * head_dim]` (the projections' layout, no transpose needed) with `cos`,
/// `sin: [n, d]`, `d <= head_dim` (the rest of each head passes unchanged).
pub struct Rotary {
    /// Whether `x` is token rows `[n, heads * head_dim]` with `cos`/`sin: [n, d]`, rather
    /// than `[b, heads, s, head_dim]` with `cos`/`sin: [b, 1, s, head_dim]`.
    pub rows: bool,
    /// The width of a head (the rotated `d` of it is the width of `cos`).
    pub head_dim: usize,
}

/// The gradient of [`Rotary`] (the transposed rotation), one pass over the output gradient.
struct RotaryGrad {
    rows: bool,
    head_dim: usize,
}

/// The forward pass or, with `transpose`, the backward pass (of the output gradient in `x`).
// x: [b, h, s, hd] (or [n, h * hd]), cos, sin: [b, 1, s, hd] (or [n, d], d <= hd) -> out: as x
fn rotary<T: Float>(
    rows: bool,
    head_dim: usize,
    transpose: bool,
    x: Input<'_>,
    cos: Input<'_>,
    sin: Input<'_>,
) -> Out<T> {
    let (h, s, d, cs) = if rows {
        let (n, cols) = x.shape().dims2()?;
        let d = cos.dims().last().copied().unwrap_or(0);
        if d == 0 || d > head_dim || !d.is_multiple_of(2) || !cols.is_multiple_of(head_dim) {
            candle_core::bail!("ranger-rotary: cos/sin shape {:?} for x {:?}", cos.shape(), x.shape());
        }
        (cols / head_dim, n, d, vec![n, d])
    } else {
        let (b, h, s, d) = x.shape().dims4()?;
        (h, s, d, vec![b, 1, s, d])
    };
    if cos.dims() != cs || sin.dims() != cs {
        candle_core::bail!("ranger-rotary: cos/sin shape {:?} for x {:?}", cos.shape(), x.shape());
    }
    let hd = if rows { head_dim } else { d };
    let out = rotary_rows(x.floats()?, cos.floats()?, sin.floats()?, Dims { h, s, d, hd }, rows, transpose);
    Ok((out, x.shape().clone()))
}

/// The shape [`rotary_rows`] works on: `h` heads of width `hd`, the first `d` of which rotate,
/// over sequences of `s` positions.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    s: usize,
    d: usize,
    hd: usize,
}

/// `x * cos + rotate_half(x) * sin` per head row or, with `transpose` (the backward pass),
/// `x * cos + rotate_half^T(x * sin)`, where `rotate_half^T(u) = [u2, -u1]`.
fn rotary_rows<T: Float>(x: &[T], cos: &[T], sin: &[T], dims: Dims, rows: bool, transpose: bool) -> Vec<T> {
    let Dims { h, s, d, hd } = dims;
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(hd).zip(x.par_chunks(hd)).enumerate().for_each(|(r, (o, row))| {
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
        // Partial rotary embeddings: the rest of the head passes through.
        o[d..].copy_from_slice(&row[d..]);
    });
    out
}

impl FusedOp3 for Rotary {
    const NAME: &'static str = "ranger-rotary";

    fn cpu<T: Float>(&self, x: Input<'_>, cos: Input<'_>, sin: Input<'_>) -> Out<T> {
        rotary(self.rows, self.head_dim, false, x, cos, sin)
    }

    // g: as x -> dx: as x (cos and sin get none)
    fn bwd(&self, _x: &Tensor, cos: &Tensor, sin: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Grads3> {
        let grad = Fused(RotaryGrad { rows: self.rows, head_dim: self.head_dim });
        Ok((Some(g.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &grad)?), None, None))
    }
}

impl FusedOp3 for RotaryGrad {
    const NAME: &'static str = "ranger-rotary-grad";

    fn cpu<T: Float>(&self, g: Input<'_>, cos: Input<'_>, sin: Input<'_>) -> Out<T> {
        rotary(self.rows, self.head_dim, true, g, cos, sin)
    }
}
