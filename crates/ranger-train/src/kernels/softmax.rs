//! Softmax over the last dimension, plain and with an additive attention mask, keeping only
//! its output for backprop; and log-softmax (op by op only).

use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

use super::cpu_op::{Fused, FusedOp1, FusedOp2, Input, Out};
use super::float::Float;
use super::path::fused_ok;

/// Softmax over the last dimension: the fused CPU kernel (which keeps only its output for
/// backprop) on CPU, [`softmax_last_dim_ops`] elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Fused(SoftmaxLastDim))
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
        scores.contiguous()?.apply_op2(&mask.contiguous()?, Fused(MaskedSoftmax))
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

/// Softmax of one row in place: `exp(x - max) / sum`.
fn softmax_in_place<T: Float>(row: &mut [T]) {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    let mut sum = T::zero();
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = T::one() / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The softmax backward pass `y * (g - sum(g * y))` from the output `y`.
// y: [.., n], g: [.., n] -> dx: [.., n]
fn softmax_grad(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dot = (g * y)?.sum_keepdim(D::Minus1)?;
    y.mul(&g.broadcast_sub(&dot)?)
}

// x: [rows, n] -> out: [rows, n]
fn softmax_rows<T: Float>(x: &[T], n: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(n).for_each(softmax_in_place);
    out
}

impl FusedOp1 for SoftmaxLastDim {
    const NAME: &'static str = "ranger-softmax-last-dim";

    fn cpu<T: Float>(&self, x: Input<'_>) -> Out<T> {
        let n = *x.dims().last().unwrap_or(&1);
        Ok((softmax_rows(x.floats()?, n), x.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_grad(res, grad_res)?))
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
        for ((o, &v), &mv) in o.iter_mut().zip(row).zip(m) {
            *o = v + mv;
        }
        softmax_in_place(o);
    });
    out
}

impl FusedOp2 for MaskedSoftmax {
    const NAME: &'static str = "ranger-masked-softmax";

    fn cpu<T: Float>(&self, scores: Input<'_>, mask: Input<'_>) -> Out<T> {
        let (b, h, s, t) = scores.shape().dims4()?;
        if mask.dims() != [b, 1, s, t] {
            candle_core::bail!("ranger-masked-softmax: mask shape {:?} for scores {:?}", mask.shape(), scores.shape());
        }
        Ok((masked_softmax_rows(scores.floats()?, mask.floats()?, h, s, t), scores.shape().clone()))
    }

    // y: [b, h, s, t], g: [b, h, s, t] -> d_scores: [b, h, s, t] (the mask gets none)
    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_grad(res, grad_res)?), None))
    }
}
