//! Softmax over the last dimension, plain and with an additive attention mask, keeping only
//! its output for backprop; and log-softmax (op by op only).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::dtype::{dtype, float_dispatch, slice};
use super::float::Float;
use super::path::fused_ok;

/// Softmax over the last dimension: the fused CPU kernel (which keeps only its output for
/// backprop) on CPU, [`softmax_last_dim_ops`] elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        softmax_last_dim_ops(x)
    }
}

/// Softmax over the last dimension from tensor ops. The max is detached: subtracting a per-row
/// constant does not change softmax, so its gradient is exactly zero and needs no graph.
pub fn softmax_last_dim_ops(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `softmax(scores + mask)` over the last dimension for attention (`scores: [b, h, s, t]`,
/// `mask: [b, 1, s, t]`): fused on CPU, op by op elsewhere.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if fused_ok(scores) && scores.dtype() == mask.dtype() {
        scores.contiguous()?.apply_op2(&mask.contiguous()?, MaskedSoftmax)
    } else {
        softmax_last_dim_ops(&scores.broadcast_add(mask)?)
    }
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last_dim_ops`]).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Softmax over the last dimension; backward `y * (g - sum(g * y))` from the saved output.
pub struct SoftmaxLastDim;

// x: [rows, n] -> out: [rows, n]
fn softmax_rows<T: Float>(x: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| {
        let max = r.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for (o, &v) in o.iter_mut().zip(r) {
            *o = (v - max).exp();
            sum = sum + *o;
        }
        let inv = T::one() / sum;
        o.iter_mut().for_each(|v| *v = *v * inv);
    });
    out
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ranger-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let n = *l.shape().dims().last().unwrap_or(&1);
        let out = float_dispatch!(op, dtype(s), |T| T::into_storage(softmax_rows::<T>(slice(op, s, l)?, n)));
        Ok((out, l.shape().clone()))
    }

    // y: [.., n], g: [.., n] -> dx: [.., n]
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

/// `softmax(scores + mask)` over the last dimension, with `scores: [b, h, s, t]` and the
/// additive `mask: [b, 1, s, t]` broadcast over heads: the masked scores are never stored.
pub struct MaskedSoftmax;

// x: [b, heads, s, t], mask: [b, 1, s, t] -> out: [b, heads, s, t]
fn masked_softmax_rows<T: Float>(x: &[T], mask: &[T], heads: usize, s: usize, t: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(r, (o, row))| {
        let (b, i) = (r / (heads * s), r % s);
        let m = &mask[(b * s + i) * t..(b * s + i + 1) * t];
        let max = row.iter().zip(m).fold(T::neg_infinity(), |acc, (&v, &mv)| acc.max(v + mv));
        let mut sum = T::zero();
        for ((o, &v), &mv) in o.iter_mut().zip(row).zip(m) {
            *o = (v + mv - max).exp();
            sum = sum + *o;
        }
        let inv = T::one() / sum;
        o.iter_mut().for_each(|v| *v = *v * inv);
    });
    out
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "ranger-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (b, h, s, t) = l1.shape().dims4()?;
        if l2.shape().dims() != [b, 1, s, t] {
            candle_core::bail!("ranger-masked-softmax: mask shape {:?} for scores {:?}", l2.shape(), l1.shape());
        }
        let out = float_dispatch!(op, dtype(s1), |T| {
            T::into_storage(masked_softmax_rows::<T>(slice(op, s1, l1)?, slice(op, s2, l2)?, h, s, t))
        });
        Ok((out, l1.shape().clone()))
    }

    // y: [b, h, s, t], g: [b, h, s, t] -> d_scores: [b, h, s, t] (the mask gets none)
    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok((Some(res.mul(&grad_res.broadcast_sub(&dot)?)?), None))
    }
}
