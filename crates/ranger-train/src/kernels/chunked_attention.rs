//! Memory-efficient attention with tensor ops on any device (CUDA, Metal, the CPU in half
//! precision): `softmax(q k^T + mask) v` computed over chunks of query rows, so the scores are
//! only ever `[b, h, chunk, sk]`, never `[b, h, sq, sk]`. Backprop keeps only the inputs, the
//! output and the per-row log-sum-exp, and recomputes each chunk's probabilities, as
//! FlashAttention does (the fused CPU kernel, `attention::FusedAttention`, works the same way).
//! Candle's autograd over the eager version keeps the scores and the probabilities of every
//! layer until backward.

use candle_core::{CustomOp3, Result, Tensor, D};

use super::compute_dtype;
use super::precomputed::precomputed_forwards;

/// Score elements per chunk (16M: 64 MiB of f32 scores, as much again for the probabilities).
const CHUNK_ELEMS: usize = 1 << 24;

/// `softmax(q k^T + mask) v` for `q: [b, h, sq, d]` (already scaled), `k`, `v: [b, h, sk, d]`
/// (heads repeated to q's), the additive `mask: [b or 1, 1, sq, sk]`; softmax in f32 (f64 for
/// f64 inputs); `chunk_rows` query rows at a time (`None`: as many as fit in 16M scores).
/// Output `[b, h, sq, d]` in q's dtype, differentiable with respect to q, k and v.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    chunk_rows: Option<usize>,
) -> Result<Tensor> {
    chunked_attention_capped(q, k, v, mask, chunk_rows, None)
}

/// [`chunked_attention`] with Gemma 2's soft-capping: the scores `s` become
/// `cap * tanh(s / cap)` before the mask.
pub fn chunked_attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    chunk_rows: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, sq, _) = q.dims4()?;
    let sk = k.dim(2)?;
    let rows = chunk_rows.unwrap_or((CHUNK_ELEMS / (b * h * sk).max(1)).max(1));
    let op = ChunkedAttention {
        mask: mask.clone(),
        softcap,
        rows,
        out: std::sync::Mutex::new(None),
        lse: std::sync::Mutex::new(None),
    };
    let (qd, kd, vd) = (q.detach().contiguous()?, k.detach().contiguous()?, v.detach().contiguous()?);
    let (out, lse) = op.forward(&qd, &kd, &vd, sq)?;
    *op.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
    *op.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    q.apply_op3(k, v, op)
}

struct ChunkedAttention {
    mask: Tensor,
    /// Soft-capping of the scores, if any.
    softcap: Option<f64>,
    rows: usize,
    /// The output, handed over (and dropped here) by the op's forward; backward gets it back
    /// as the op's result.
    out: std::sync::Mutex<Option<Tensor>>,
    /// The log-sum-exp of each query row, `[b, h, sq, 1]`, for backward.
    lse: std::sync::Mutex<Option<Tensor>>,
}

impl ChunkedAttention {
    /// Scores of the query rows `[start, start + c)`: `[b, h, c, sk]` in the compute dtype,
    /// capped and masked; and, with a cap, `tanh(s / cap)` for backward.
    fn scores(&self, q: &Tensor, k: &Tensor, start: usize, c: usize) -> Result<(Tensor, Option<Tensor>)> {
        let qc = q.narrow(2, start, c)?;
        let mut s = qc.matmul(&k.t()?)?.to_dtype(compute_dtype(q.dtype()))?;
        let mut t = None;
        if let Some(cap) = self.softcap {
            let th = (s / cap)?.tanh()?;
            s = (&th * cap)?;
            t = Some(th);
        }
        Ok((s.broadcast_add(&self.mask.narrow(2, start, c)?.to_dtype(s.dtype())?)?, t))
    }

    // q: [b, h, sq, d], k, v: [b, h, sk, d] -> out: [b, h, sq, d], lse: [b, h, sq, 1]
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, sq: usize) -> Result<(Tensor, Tensor)> {
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < sq {
            let c = self.rows.min(sq - start);
            let (s, _) = self.scores(q, k, start, c)?;
            let max = s.max_keepdim(D::Minus1)?;
            let e = s.broadcast_sub(&max)?.exp()?;
            let sum = e.sum_keepdim(D::Minus1)?;
            let p = e.broadcast_div(&sum)?.to_dtype(q.dtype())?;
            outs.push(p.matmul(v)?);
            lses.push((sum.log()? + max)?);
            start += c;
        }
        Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
    }

    /// The computed output, the op's forward value, taken out of the op (backward gets it back
    /// as the op's result).
    fn value(&self) -> Result<Tensor> {
        match self.out.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(out) => Ok(out),
            None => candle_core::bail!("ranger-chunked-attention: run twice"),
        }
    }
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "ranger-chunked-attention"
    }

    precomputed_forwards!(value; q ql, k kl, v vl);

    // dO: [b, h, sq, d] -> dq: [b, h, sq, d], dk, dv: [b, h, sk, d]; per chunk, with
    // P = exp(S - lse): dv += P^T dO, dS = P * (dO v^T - rowsum(dO * O)), dq = dS k, dk += dS^T q.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("ranger-chunked-attention: backpropagated twice");
        };
        let (q, k, v, g) =
            (q.detach().contiguous()?, k.detach().contiguous()?, v.detach().contiguous()?, g.detach().contiguous()?);
        let ct = compute_dtype(q.dtype());
        let sq = q.dim(2)?;
        // rowsum(dO * O): [b, h, sq, 1]
        let delta = (g.to_dtype(ct)? * out.to_dtype(ct)?)?.sum_keepdim(D::Minus1)?;
        let (mut dqs, mut dk, mut dv) = (Vec::new(), k.zeros_like()?.to_dtype(ct)?, v.zeros_like()?.to_dtype(ct)?);
        let mut start = 0;
        while start < sq {
            let c = self.rows.min(sq - start);
            let (s, t) = self.scores(&q, &k, start, c)?;
            let p = s.broadcast_sub(&lse.narrow(2, start, c)?)?.exp()?; // [b, h, c, sk]
            let gc = g.narrow(2, start, c)?;
            dv = (dv + p.transpose(2, 3)?.matmul(&gc.to_dtype(ct)?)?)?;
            let dp = gc.matmul(&v.t()?)?.to_dtype(ct)?;
            let mut ds = (p * dp.broadcast_sub(&delta.narrow(2, start, c)?)?)?;
            if let Some(t) = t {
                // Through the cap: 1 - tanh².
                ds = (ds * t.sqr()?.affine(-1.0, 1.0)?)?;
            }
            dqs.push(ds.to_dtype(q.dtype())?.matmul(&k)?);
            dk = (dk + ds.transpose(2, 3)?.matmul(&q.narrow(2, start, c)?.to_dtype(ct)?)?)?;
            start += c;
        }
        Ok((Some(Tensor::cat(&dqs, 2)?), Some(dk.to_dtype(k.dtype())?), Some(dv.to_dtype(v.dtype())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::softmax::masked_softmax;
    use candle_core::{DType, Device, Var};

    /// Chunked (several chunk sizes, a per-batch mask with masked entries) against the eager
    /// attention under Candle's autograd: the same output and the same gradients of q, k and v.
    #[test]
    fn chunked_attention_is_eager_attention() {
        let dev = Device::Cpu;
        let (b, h, s, d) = (2, 3, 7, 4);
        let data = |n: usize, f: f64| (0..n).map(|i| (i as f64 * f).sin()).collect::<Vec<f64>>();
        let mask: Vec<f64> = (0..b * s * s)
            .map(|i| {
                let (bi, r, c) = (i / (s * s), i % (s * s) / s, i % s);
                if c <= r && !(bi == 1 && c < 2 && r >= 2) {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        for dt in [DType::F64, DType::F32] {
            let var = |f: f64| {
                Var::from_tensor(
                    &Tensor::from_vec(data(b * h * s * d, f), (b, h, s, d), &dev).unwrap().to_dtype(dt).unwrap(),
                )
                .unwrap()
            };
            let (q, k, v) = (var(0.31), var(0.77), var(1.13));
            let mask = Tensor::from_vec(mask.clone(), (b, 1, s, s), &dev).unwrap().to_dtype(dt).unwrap();
            // Plain, and with Gemma 2's soft-capping at 0.7 (scores of order 1 here).
            for cap in [None, Some(0.7)] {
                let mut scores = q.matmul(&k.t().unwrap()).unwrap();
                if let Some(cap) = cap {
                    scores = ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap();
                }
                let eager = masked_softmax(&scores, &mask).unwrap().matmul(&v).unwrap();
                let weights =
                    Tensor::from_vec(data(b * h * s * d, 0.05), (b, h, s, d), &dev).unwrap().to_dtype(dt).unwrap();
                let ge = (&eager * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
                let close = |a: &Tensor, b: &Tensor, what: &str| {
                    let d = (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    assert!(d < tol, "{dt:?} {what}: {d}");
                };
                for chunk in [None, Some(1), Some(3), Some(7)] {
                    let out = chunked_attention_capped(&q, &k, &v, &mask, chunk, cap).unwrap();
                    close(&out, &eager, "output");
                    let gc = (&out * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                    for (x, what) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                        close(gc.get(x).unwrap(), ge.get(x).unwrap(), what);
                    }
                }
            }
        }
    }
}
