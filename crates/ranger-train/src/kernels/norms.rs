//! RMSNorm and LayerNorm over the last dimension, fused on the CPU (backprop keeps only the
//! input, not the op-by-op version's intermediates), op by op elsewhere.

use candle_core::{Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu_op::{Fused, FusedOp2, FusedOp3, Grads3, Input, Out};
use super::dtype::compute_dtype;
use super::float::Float;
use super::path::fused_ok;

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight` (Llama's `LlamaRMSNorm`:
/// normalised in f32, cast back, then scaled).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) && weight.dtype() == x.dtype() {
        return x.contiguous()?.apply_op2(&weight.contiguous()?, Fused(RmsNorm { eps }));
    }
    rms_norm_ops(x, weight, eps)
}

/// Gemma's RMSNorm, `x / sqrt(mean(x²) + eps) * (1 + weight)`, with the weight stored as its
/// offset from 1. As transformers' `Gemma3RMSNorm`: normalised and scaled in f32, then cast back
/// (so in bf16 the `1 + w` is not rounded to bf16 first). The fused kernel on CPU in f32/f64.
pub fn rms_norm_offset(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) && weight.dtype() == x.dtype() {
        return rms_norm(x, &(weight + 1.0)?, eps);
    }
    let dt = x.dtype();
    let cdt = compute_dtype(dt);
    let xf = x.to_dtype(cdt)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(&(weight.to_dtype(cdt)? + 1.0)?)?.to_dtype(dt)
}

/// [`rms_norm`] from tensor ops.
pub fn rms_norm_ops(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(compute_dtype(dt))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    normed.broadcast_mul(weight)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, normalised
/// in f32 (or f64) whatever the model dtype; fused on CPU.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) && weight.dtype() == x.dtype() && bias.dtype() == x.dtype() {
        return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Fused(LayerNorm { eps }));
    }
    layer_norm_ops(x, weight, bias, eps)
}

/// [`layer_norm`] from tensor ops.
pub fn layer_norm_ops(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(compute_dtype(dt))?;
    let xc = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// RMSNorm `x / sqrt(mean(x²) + eps) * w` over the last dimension (f32/f64). Backprop needs only
/// its input (kept anyway), not the op-by-op version's intermediates.
pub struct RmsNorm {
    /// Epsilon.
    pub eps: f64,
}

// x: [rows, C], w: [C] -> out: [rows, C]
fn rms_rows<T: Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| {
        let ms = r.iter().fold(T::zero(), |s, &v| s + v * v) / T::from_usize(n);
        let inv = T::one() / (ms + eps).sqrt();
        for ((o, &v), &wv) in o.iter_mut().zip(r).zip(w) {
            *o = v * inv * wv;
        }
    });
    out
}

impl FusedOp2 for RmsNorm {
    const NAME: &'static str = "ranger-rms-norm";

    fn cpu<T: Float>(&self, x: Input<'_>, w: Input<'_>) -> Out<T> {
        Ok((rms_rows(x.floats()?, w.floats()?, T::from_f64(self.eps)), x.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, stacked as [dx (all of x) | dw]; the parts are views.
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &Fused(RmsNormGrad { eps: self.eps }))?;
        let n = x.elem_count();
        Ok((
            Some(both.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(both.narrow(0, n, w.elem_count())?.reshape(w.shape())?),
        ))
    }
}

/// The gradients of [`RmsNorm`]: with `r = 1 / sqrt(mean(x²) + eps)` and `n = x r` per row,
/// `dx = r (g w - n mean(g w n))` and `dw = sum over rows of g n`, flattened as `[dx | dw]`.
struct RmsNormGrad {
    eps: f64,
}

// x: [rows, C], w: [C], g: [rows, C] -> [dx: rows * C | dw: C]
fn rms_grad_rows<T: Float>(x: &[T], w: &[T], g: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    let mut out = vec![T::zero(); x.len() + h];
    let (dx, dw) = out.split_at_mut(x.len());
    // Rows in chunks: each chunk writes its rows of dx and returns its share of dw.
    const ROWS: usize = 64;
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut(ROWS * h)
        .zip(x.par_chunks(ROWS * h).zip(g.par_chunks(ROWS * h)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::zero(); h];
            for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                let ms = x.iter().fold(T::zero(), |s, &v| s + v * v) / T::from_usize(h);
                let r = T::one() / (ms + eps).sqrt();
                let mut dot = T::zero();
                for j in 0..h {
                    let n = x[j] * r;
                    dot += g[j] * w[j] * n;
                    dw[j] += g[j] * n;
                }
                let mean = dot / T::from_usize(h);
                for j in 0..h {
                    dx[j] = r * (g[j] * w[j] - x[j] * r * mean);
                }
            }
            dw
        })
        .collect();
    for p in partial {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    out
}

impl FusedOp3 for RmsNormGrad {
    const NAME: &'static str = "ranger-rms-norm-grad";

    fn cpu<T: Float>(&self, x: Input<'_>, w: Input<'_>, g: Input<'_>) -> Out<T> {
        let dx_dw = rms_grad_rows(x.floats()?, w.floats()?, g.floats()?, T::from_f64(self.eps));
        Ok((dx_dw, Shape::from(x.shape().elem_count() + w.shape().elem_count())))
    }
}

/// LayerNorm `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (f32/f64), as
/// BERT-family encoders use it. Like [`RmsNorm`], backprop needs only the input.
pub struct LayerNorm {
    /// Epsilon.
    pub eps: f64,
}

// x: [rows, C], w: [C], b: [C] -> out: [rows, C]
fn layer_norm_rows<T: Float>(x: &[T], w: &[T], b: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| {
        let mean = r.iter().fold(T::zero(), |s, &v| s + v) / T::from_usize(n);
        let var = r.iter().fold(T::zero(), |s, &v| s + (v - mean) * (v - mean)) / T::from_usize(n);
        let inv = T::one() / (var + eps).sqrt();
        for (((o, &v), &wv), &bv) in o.iter_mut().zip(r).zip(w).zip(b) {
            *o = (v - mean) * inv * wv + bv;
        }
    });
    out
}

impl FusedOp3 for LayerNorm {
    const NAME: &'static str = "ranger-layer-norm";

    fn cpu<T: Float>(&self, x: Input<'_>, w: Input<'_>, b: Input<'_>) -> Out<T> {
        Ok((layer_norm_rows(x.floats()?, w.floats()?, b.floats()?, T::from_f64(self.eps)), x.shape().clone()))
    }

    // x: [rows, C], w: [C], b: [C], g: [rows, C] -> dx: [rows, C], dw: [C], db: [C]
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Grads3> {
        // n = (x - mean) r, y = n w + b:  dw = sum(g n),  db = sum(g),
        // dx = r (g w - mean(g w) - n mean(g w n)).
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let n = xc.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(w)?;
        let dot = (&gw * &n)?.mean_keepdim(D::Minus1)?;
        let dx = gw.broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?.sub(&n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        let rows = x.elem_count() / w.elem_count();
        let dw = (g * &n)?.reshape((rows, ()))?.sum(0)?.reshape(w.shape())?;
        let db = g.reshape((rows, ()))?.sum(0)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
