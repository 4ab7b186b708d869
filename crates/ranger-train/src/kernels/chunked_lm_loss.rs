//! The LM head and its cross-entropy in chunks of rows, with tensor ops on any device (CUDA,
//! Metal, the CPU in half precision): the `[tokens, vocab]` logits are never whole, only
//! `[chunk, vocab]` at a time. In training each chunk's gradients are computed while its logits
//! are at hand (as the fused CPU kernel in [`super::lm_head`] does), and a small op hands them
//! to backprop: Candle's autograd over chunked logits would keep every chunk's softmax alive
//! until backward, which is the whole `[tokens, vocab]` again.

use candle_core::{CustomOp2, Result, Tensor, D};

use super::precomputed::precomputed_forwards;

use super::lm_head::IGNORE_TARGET;

/// Logits elements per chunk (32M: 128 MiB of f32 logits, and as much for their softmax).
const CHUNK_ELEMS: usize = 1 << 25;

/// `sum over rows of NLL(target | x W^T)` for `x: [n, h]`, `w: [vocab, h]` and `targets: [n]`
/// (u32, [`IGNORE_TARGET`] for rows without a target), computed in f32 (f64 for f64 inputs),
/// `chunk_rows` rows at a time (`None`: as many as fit in 32M logits). With `training` the
/// result has a backward pass (to `x`, and to `w` when `w` is a variable), computed here;
/// without it, it is a plain value.
pub fn chunked_linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    training: bool,
    chunk_rows: Option<usize>,
) -> Result<Tensor> {
    chunked_linear_cross_entropy_capped(x, w, targets, training, chunk_rows, None)
}

/// [`chunked_linear_cross_entropy`] with Gemma 2's final-logit soft-capping: the logits `z`
/// become `cap * tanh(z / cap)`.
pub fn chunked_linear_cross_entropy_capped(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    training: bool,
    chunk_rows: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    let (vocab, h2) = w.dims2()?;
    if h != h2 || targets.dims() != [n] {
        candle_core::bail!("chunked LM loss: hidden {:?}, head {:?}, targets {:?}", x.dims(), w.dims(), targets.dims());
    }
    let cdt = super::compute_dtype(x.dtype());
    let dev = x.device();
    let rows = chunk_rows.unwrap_or((CHUNK_ELEMS / vocab.max(1)).max(1));
    let (xd, wd) = (x.detach().contiguous()?, w.detach().contiguous()?);
    let wt = wd.t()?;
    // The head's gradient is wanted when it is a variable or computed from one.
    let want_w = training && w.track_op();
    let ids = Tensor::arange(0u32, vocab as u32, dev)?.unsqueeze(0)?; // [1, V]
    let mut loss = Tensor::zeros((), cdt, dev)?;
    let mut gx_parts = Vec::new();
    let mut gw = if want_w { Some(Tensor::zeros((vocab, h), cdt, dev)?) } else { None };
    let mut start = 0;
    while start < n {
        let c = rows.min(n - start);
        let xc = xd.narrow(0, start, c)?;
        let tc = targets.narrow(0, start, c)?.unsqueeze(1)?; // [c, 1]
                                                             // [c, V] logits; the one-hot row of an ignored target is all zero.
        let mut logits = xc.matmul(&wt)?.to_dtype(cdt)?;
        let mut tanh = None;
        if let Some(cap) = softcap {
            let t = (logits / cap)?.tanh()?;
            logits = (&t * cap)?;
            tanh = Some(t);
        }
        let onehot = ids.broadcast_eq(&tc)?.to_dtype(cdt)?;
        let valid = tc.ne(IGNORE_TARGET)?.to_dtype(cdt)?; // [c, 1]
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?;
        let lse = (sum_exp.log()? + &max)?; // [c, 1]
        let target_logit = (&logits * &onehot)?.sum_keepdim(D::Minus1)?;
        loss = (loss + ((lse.clone() - target_logit)? * &valid)?.sum_all()?)?;
        if training {
            // d loss / d logits = (softmax - onehot) on rows with a target.
            let p = logits.broadcast_sub(&lse)?.exp()?;
            let mut d = (p - onehot)?.broadcast_mul(&valid)?;
            if let Some(t) = &tanh {
                // Through the cap: 1 - tanh².
                d = (d * t.sqr()?.affine(-1.0, 1.0)?)?;
            }
            let dw = d.to_dtype(w.dtype())?;
            gx_parts.push(dw.matmul(&wd)?);
            if let Some(acc) = gw.as_mut() {
                *acc = (&*acc + dw.t()?.matmul(&xc)?.to_dtype(cdt)?)?;
            }
        }
        start += c;
    }
    let loss = loss.to_dtype(cdt)?;
    if !training {
        return Ok(loss);
    }
    let gx = if gx_parts.is_empty() { xd.zeros_like()? } else { Tensor::cat(&gx_parts, 0)? };
    let gw = gw.map(|g| g.to_dtype(w.dtype())).transpose()?;
    x.apply_op2(w, PrecomputedLoss { loss, gx, gw })
}

/// Hands a loss and its gradients, computed beforehand, to backprop: the forward pass returns
/// `loss` (on any backend), the backward pass the saved gradients times the incoming one.
struct PrecomputedLoss {
    loss: Tensor,
    gx: Tensor,
    gw: Option<Tensor>,
}

impl PrecomputedLoss {
    /// The loss, the op's forward value.
    fn value(&self) -> Result<Tensor> {
        Ok(self.loss.clone())
    }
}

impl CustomOp2 for PrecomputedLoss {
    fn name(&self) -> &'static str {
        "ranger-chunked-lm-loss"
    }

    precomputed_forwards!(value; x xl, w wl);

    // g: [] -> dx: [n, h], dw: [vocab, h]
    fn bwd(&self, _x: &Tensor, _w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Scaled on the device: no read of `g` back to the host.
        let scale = |t: &Tensor| t.broadcast_mul(&g.to_dtype(t.dtype())?);
        Ok((Some(scale(&self.gx)?), self.gw.as_ref().map(scale).transpose()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cross_entropy::cross_entropy_rows_ops;
    use candle_core::{DType, Device, Var};

    /// Chunked (several chunk sizes, ignored rows included) against logits + cross-entropy +
    /// Candle's backprop: the same loss and gradients, for a trainable and a frozen head.
    #[test]
    fn chunked_loss_is_the_logits_loss() {
        let dev = Device::Cpu;
        let (n, h, v) = (7, 5, 11);
        let xv: Vec<f64> = (0..n * h).map(|i| (i as f64 * 0.37).sin()).collect();
        let wv: Vec<f64> = (0..v * h).map(|i| (i as f64 * 0.91).cos()).collect();
        let t: Vec<u32> = vec![3, IGNORE_TARGET, 0, 10, 5, IGNORE_TARGET, 7];
        let targets = Tensor::new(t.as_slice(), &dev).unwrap();
        for dt in [DType::F64, DType::F32] {
            let x =
                Var::from_tensor(&Tensor::from_vec(xv.clone(), (n, h), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::from_vec(wv.clone(), (v, h), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
            // Reference: whole logits, ignored rows masked out.
            let valid: Vec<f64> = t.iter().map(|&t| if t == IGNORE_TARGET { 0.0 } else { 1.0 }).collect();
            let valid = Tensor::new(valid.as_slice(), &dev).unwrap().to_dtype(dt).unwrap();
            let clamped: Vec<u32> = t.iter().map(|&t| t.min(v as u32 - 1)).collect();
            let clamped = Tensor::new(clamped.as_slice(), &dev).unwrap();
            // Plain, and with Gemma 2's final-logit soft-capping at 0.8 (logits of order 2 here).
            for cap in [None, Some(0.8)] {
                let mut logits = x.matmul(&w.t().unwrap()).unwrap();
                if let Some(cap) = cap {
                    logits = ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap();
                }
                let reference =
                    (cross_entropy_rows_ops(&logits, &clamped).unwrap() * &valid).unwrap().sum_all().unwrap();
                let gr = reference.backward().unwrap();
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
                let close = |a: &Tensor, b: &Tensor, what: &str| {
                    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
                    let d = d.to_scalar::<f64>().unwrap();
                    assert!(d < tol, "{dt:?} {what}: {d}");
                };
                for chunk in [None, Some(1), Some(3), Some(7)] {
                    let loss = chunked_linear_cross_entropy_capped(&x, &w, &targets, true, chunk, cap).unwrap();
                    close(&loss, &reference, "loss");
                    let g = (&loss * 2.0).unwrap().backward().unwrap();
                    close(g.get(&x).unwrap(), &(gr.get(&x).unwrap() * 2.0).unwrap(), "dx");
                    close(g.get(&w).unwrap(), &(gr.get(&w).unwrap() * 2.0).unwrap(), "dw");
                    let frozen =
                        chunked_linear_cross_entropy_capped(&x, &w.as_tensor().detach(), &targets, true, chunk, cap);
                    let g = frozen.unwrap().backward().unwrap();
                    close(g.get(&x).unwrap(), gr.get(&x).unwrap(), "dx (frozen head)");
                    let eval = chunked_linear_cross_entropy_capped(&x, &w, &targets, false, chunk, cap).unwrap();
                    close(&eval, &reference, "evaluation loss");
                }
            }
        }
    }
}
