//! Per-row cross-entropy of logits, fused on the CPU (backward `softmax - onehot` in one pass,
//! no log-probabilities kept), log-softmax and gather elsewhere. The LM head fused with its
//! loss, which never materialises the logits, is [`super::lm_head`].

use candle_core::{Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu_op::{Fused, FusedOp2, FusedOp3, Input, Out};
use super::float::Float;
use super::path::fused_ok;
use super::softmax::log_softmax_last_dim;

/// Per-row negative log-likelihood of `targets: [n]` (u32) under `logits: [n, vocab]`: the fused
/// CPU kernel on CPU, log-softmax and gather elsewhere.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(logits) {
        logits.contiguous()?.apply_op2(&targets.contiguous()?, Fused(CrossEntropyRows))
    } else {
        cross_entropy_rows_ops(logits, targets)
    }
}

/// [`cross_entropy_rows`] from tensor ops.
pub fn cross_entropy_rows_ops(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lsm = log_softmax_last_dim(logits)?;
    lsm.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?.neg()
}

/// Per-row negative log-likelihood `logsumexp(x) - x[target]` of `logits: [n, vocab]`
/// (f32/f64) and `targets: [n]` (u32); backward `(softmax(x) - onehot) * grad` in one pass.
pub struct CrossEntropyRows;

// x: [n, V], t: [n] -> nll: [n]
fn ce_rows<T: Float>(x: &[T], t: &[u32], v: usize) -> Vec<T> {
    x.par_chunks(v)
        .zip(t.par_iter())
        .map(|(r, &t)| {
            let max = r.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
            // Accumulated in f64: a vocabulary of small terms summed in f32 loses them.
            let sum = T::from_f64(r.iter().fold(0f64, |s, &x| s + (x - max).exp().to_f64()));
            max + sum.ln() - r[(t as usize).min(v - 1)]
        })
        .collect()
}

// x: [n, V], t: [n], g: [n] -> dx: [n, V]
fn ce_grad_rows<T: Float>(x: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(v).zip(x.par_chunks(v)).zip(t.par_iter().zip(g.par_iter())).for_each(|((o, r), (&t, &g))| {
        let max = r.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
        let mut sum = 0f64;
        for (o, &x) in o.iter_mut().zip(r) {
            *o = (x - max).exp();
            sum += o.to_f64();
        }
        let scale = g / T::from_f64(sum);
        o.iter_mut().for_each(|v| *v *= scale);
        let ti = (t as usize).min(v - 1);
        o[ti] -= g;
    });
    out
}

impl FusedOp2 for CrossEntropyRows {
    const NAME: &'static str = "ranger-cross-entropy";

    fn cpu<T: Float>(&self, logits: Input<'_>, targets: Input<'_>) -> Out<T> {
        let (n, v) = logits.shape().dims2()?;
        Ok((ce_rows(logits.floats()?, targets.ids("target", v, None)?, v), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = logits.apply_op3_no_bwd(targets, &grad_res.contiguous()?, &Fused(CrossEntropyGrad))?;
        Ok((Some(grad), None))
    }
}

/// The gradient of [`CrossEntropyRows`].
struct CrossEntropyGrad;

impl FusedOp3 for CrossEntropyGrad {
    const NAME: &'static str = "ranger-cross-entropy-grad";

    fn cpu<T: Float>(&self, logits: Input<'_>, targets: Input<'_>, g: Input<'_>) -> Out<T> {
        let (_, v) = logits.shape().dims2()?;
        let dx = ce_grad_rows(logits.floats()?, targets.ids("target", v, None)?, g.floats()?, v);
        Ok((dx, logits.shape().clone()))
    }
}
