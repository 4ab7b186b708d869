//! Differentiable building blocks.
//!
//! Candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rotary_emb` kernels have no
//! backward pass: a model using them trains with missing or wrong gradients and no error. These
//! are written with plain tensor ops that all have one, and computed in f32 (or f64) whatever
//! the model dtype, as the Hugging Face implementations do.

use candle_core::{DType, Result, Tensor, D};

/// The dtype normalisation and softmax are computed in: f64 stays f64, everything else is f32.
pub fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight` (Llama's `LlamaRMSNorm`:
/// normalised in f32, cast back, then scaled).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) && weight.dtype() == x.dtype() {
        return x.contiguous()?.apply_op2(&weight.contiguous()?, super::fused::RmsNorm { eps });
    }
    rms_norm_ops(x, weight, eps)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, normalised
/// in f32 (or f64) whatever the model dtype; fused on CPU.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) && weight.dtype() == x.dtype() && bias.dtype() == x.dtype() {
        return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, super::fused::LayerNorm { eps });
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

/// Whether the fused CPU kernels apply (CPU, f32 or f64, and not turned off by
/// [`without_fused_kernels`]).
pub(crate) fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && !UNFUSED.with(|u| u.get())
}

thread_local! {
    static UNFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused CPU kernels turned off on this thread: models then take the
/// op-by-op path that other devices (CUDA, Metal) and dtypes take, so tests can check that
/// path on the CPU against the fused one.
pub fn without_fused_kernels<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag even when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNFUSED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNFUSED.with(|u| u.replace(true)));
    f()
}

/// [`rms_norm`] from tensor ops.
pub fn rms_norm_ops(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(compute_dtype(dt))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    normed.broadcast_mul(weight)
}

/// Softmax over the last dimension: the fused CPU kernel (which keeps only its output for
/// backprop) on CPU, [`softmax_last_dim_ops`] elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(super::fused::SoftmaxLastDim)
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
        scores.contiguous()?.apply_op2(&mask.contiguous()?, super::fused::MaskedSoftmax)
    } else {
        softmax_last_dim_ops(&scores.broadcast_add(mask)?)
    }
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last_dim`]).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Exact GELU (`hidden_act: gelu`): fused on CPU (one-pass backward), Candle's op elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(super::fused::GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// SiLU, `x * sigmoid(x)`: Candle's unary op, which has a backward pass (checked by the
/// gradient tests) and keeps a single intermediate.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// `x W^T` for `x: [n, in]` and `W: [out, in]`. On CPU (f32/f64, contiguous) through ops whose
/// backward keeps no activation alive and computes no gradient for a frozen (non-variable)
/// weight; Candle's matmul elsewhere.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && w.dtype() == x.dtype() && x.is_contiguous() && w.is_contiguous() && w.device().is_cpu() {
        if w.is_variable() {
            return x.apply_op2(w, super::fused::Linear { sink: super::grad_sink::GradSink::current() });
        }
        return x.apply_op1(super::fused::FrozenLinear { weight: w.clone() });
    }
    x.matmul(&w.t()?)
}

/// Rows `table[ids]` of an embedding table (`ids: [n]` u32): with a
/// [`super::grad_sink::GradSink`] active and a trainable f32/f64 table on the CPU, through an
/// op that adds the table's gradient into the sink; `index_select` otherwise.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if let Some(sink) = super::grad_sink::GradSink::current() {
        if fused_ok(table)
            && table.is_variable()
            && table.is_contiguous()
            && ids.dtype() == DType::U32
            && ids.device().is_cpu()
        {
            return table.apply_op2(ids, super::fused::Embedding { sink });
        }
    }
    table.index_select(ids, 0)
}

/// SwiGLU `silu(gate) * up`: the fused CPU kernel (keeping no intermediate for backprop) on CPU,
/// [`swiglu_ops`] elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) && gate.dtype() == up.dtype() && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, super::fused::SwiGlu);
    }
    swiglu_ops(gate, up)
}

/// [`swiglu`] from tensor ops.
pub fn swiglu_ops(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu(gate)? * up
}

/// Rotary position embedding in Hugging Face's "rotate half" layout:
/// `x * cos + rotate_half(x) * sin`, with `x: [b, heads, seq, head_dim]` and
/// `cos`/`sin: [b, 1, seq, head_dim]` (per-sequence positions, so packed examples restart at 0).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() && cos.dims().get(1) == Some(&1) {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, super::fused::Rotary { rows: false });
    }
    apply_rotary_ops(x, cos, sin)
}

/// [`apply_rotary`] for token rows `x: [n, heads * head_dim]` (the projections' own layout),
/// with `cos`/`sin: [n, head_dim]` (each row's position).
pub fn apply_rotary_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, super::fused::Rotary { rows: true });
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

/// Repeats key/value heads for grouped-query attention: `[b, kv, s, d] -> [b, kv * n_rep, s, d]`
/// with each kv head repeated `n_rep` times consecutively (as `repeat_kv` in transformers).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, s, d))?.reshape((b, kv * n_rep, s, d))
}

/// Per-row negative log-likelihood of `targets: [n]` (u32) under `logits: [n, vocab]`: the fused
/// CPU kernel on CPU, log-softmax and gather elsewhere.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(logits) {
        logits.contiguous()?.apply_op2(&targets.contiguous()?, super::fused::CrossEntropyRows)
    } else {
        cross_entropy_rows_ops(logits, targets)
    }
}

/// [`cross_entropy_rows`] from tensor ops.
pub fn cross_entropy_rows_ops(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lsm = log_softmax_last_dim(logits)?;
    lsm.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A fused function and its op-by-op counterpart.
    type Pair<'a> = (&'a dyn Fn(&Tensor) -> Tensor, &'a dyn Fn(&Tensor) -> Tensor);

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn fused_kernels_match_the_op_by_op_versions() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f64, 3.0, (6, 37), &dev).unwrap())).unwrap();
        let w = Tensor::randn(0f64, 1.0, (6, 37), &dev).unwrap();
        let t = Tensor::new(&[0u32, 5, 36, 7, 7, 12], &dev).unwrap();
        let frozen = Tensor::randn(0f64, 1.0, (5, 37), &dev).unwrap();
        let w5 = Tensor::randn(0f64, 1.0, (6, 5), &dev).unwrap();
        let pairs: [Pair; 4] = [
            (
                &|x| {
                    x.apply_op1(super::super::fused::FrozenLinear { weight: frozen.clone() })
                        .unwrap()
                        .mul(&w5)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                },
                &|x| x.matmul(&frozen.t().unwrap()).unwrap().mul(&w5).unwrap().sum_all().unwrap(),
            ),
            (&|x| gelu_erf(x).unwrap().mul(&w).unwrap().sum_all().unwrap(), &|x| {
                // x Φ(x) from erf, whose backward is exact (Candle's gelu_erf backward rounds 1/√(2π)).
                let phi = ((x * std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5;
                (x * phi.unwrap()).unwrap().mul(&w).unwrap().sum_all().unwrap()
            }),
            (&|x| softmax_last_dim(x).unwrap().mul(&w).unwrap().sum_all().unwrap(), &|x| {
                softmax_last_dim_ops(x).unwrap().mul(&w).unwrap().sum_all().unwrap()
            }),
            (&|x| cross_entropy_rows(x, &t).unwrap().sum_all().unwrap(), &|x| {
                cross_entropy_rows_ops(x, &t).unwrap().sum_all().unwrap()
            }),
        ];
        // RMSNorm and rotary, values and both gradients.
        let x4v = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::randn(1f64, 0.1, 8, &dev).unwrap()).unwrap();
        let cos = Tensor::randn(0f64, 1.0, (2, 1, 5, 8), &dev).unwrap();
        let sin = Tensor::randn(0f64, 1.0, (2, 1, 5, 8), &dev).unwrap();
        let w4 = Tensor::randn(0f64, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let bv = Var::from_tensor(&Tensor::randn(0f64, 0.1, 8, &dev).unwrap()).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let y = f(x4v.as_tensor()).mul(&w4).unwrap().sum_all().unwrap();
            let g = y.backward().unwrap();
            (y, g.get(&x4v).unwrap().clone(), g.get(&wv).cloned(), g.get(&bv).cloned())
        };
        let pairs4: [Pair; 5] = [
            (&|x| rms_norm(x, wv.as_tensor(), 1e-5).unwrap(), &|x| rms_norm_ops(x, wv.as_tensor(), 1e-5).unwrap()),
            (&|x| layer_norm(x, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap(), &|x| {
                layer_norm_ops(x, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap()
            }),
            (&|x| apply_rotary(x, &cos, &sin).unwrap(), &|x| apply_rotary_ops(x, &cos, &sin).unwrap()),
            (
                // [b, h, s, d] -> rows [b * s, h * d] and back.
                &|x| {
                    let rows = x.transpose(1, 2).unwrap().reshape((10, 24)).unwrap();
                    let (c, s) = (cos.reshape((10, 8)).unwrap(), sin.reshape((10, 8)).unwrap());
                    apply_rotary_rows(&rows, &c, &s).unwrap().reshape((2, 5, 3, 8)).unwrap().transpose(1, 2).unwrap()
                },
                &|x| apply_rotary_ops(x, &cos, &sin).unwrap(),
            ),
            (&|x| swiglu(x, &x.broadcast_mul(wv.as_tensor()).unwrap()).unwrap(), &|x| {
                swiglu_ops(x, &x.broadcast_mul(wv.as_tensor()).unwrap()).unwrap()
            }),
        ];
        for (fused, ops) in pairs4 {
            let (a, b) = (run(fused), run(ops));
            assert!(close(&a.0, &b.0) < 1e-10);
            assert!(close(&a.1, &b.1) < 1e-10);
            for (ga, gb) in [(&a.2, &b.2), (&a.3, &b.3)] {
                assert_eq!(ga.is_some(), gb.is_some());
                if let (Some(ga), Some(gb)) = (ga, gb) {
                    assert!(close(ga, gb) < 1e-10);
                }
            }
        }
        // The fused LM head + loss, in chunks of 3 rows (one with no target at all), against
        // matmul + cross-entropy: loss and both gradients.
        let hidden = Var::from_tensor(&Tensor::randn(0f64, 1.0, (10, 8), &dev).unwrap()).unwrap();
        let head = Var::from_tensor(&Tensor::randn(0f64, 1.0, (37, 8), &dev).unwrap()).unwrap();
        let ignore = super::super::fused::IGNORE_TARGET;
        let targets = [3u32, ignore, 36, ignore, ignore, ignore, 7, ignore, 12, 0];
        let keep = Tensor::new(&targets.map(|t| if t == ignore { 0f64 } else { 1.0 }), &dev).unwrap();
        let plain = Tensor::new(&targets.map(|t| if t == ignore { 0 } else { t }), &dev).unwrap();
        let reference = cross_entropy_rows_ops(&hidden.matmul(&head.t().unwrap()).unwrap(), &plain)
            .unwrap()
            .mul(&keep)
            .unwrap()
            .sum_all()
            .unwrap();
        for rows in [3, 4, 100] {
            let op = super::super::fused::LinearCrossEntropy::new(true, true).with_chunk_rows(rows);
            let fused = hidden.apply_op3(head.as_tensor(), &Tensor::new(&targets, &dev).unwrap(), op).unwrap();
            assert!(close(&fused, &reference) < 1e-12, "chunk {rows}");
            let (gf, gr) =
                ((&fused * 3.0).unwrap().backward().unwrap(), (&reference * 3.0).unwrap().backward().unwrap());
            for v in [&hidden, &head] {
                assert!(close(gf.get(v).unwrap(), gr.get(v).unwrap()) < 1e-12, "chunk {rows}");
            }
        }
        // A trainable linear layer: both gradients, and none of them tracked (they keep no
        // activation alive).
        let lw = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 37), &dev).unwrap()).unwrap();
        let lin = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let g = f(x.as_tensor(), lw.as_tensor()).mul(&w5).unwrap().sum_all().unwrap().backward().unwrap();
            (g.get(&x).unwrap().clone(), g.get(&lw).unwrap().clone())
        };
        let (a, b) = (lin(&|x, w| linear(x, w).unwrap()), lin(&|x, w| x.matmul(&w.t().unwrap()).unwrap()));
        assert!(close(&a.0, &b.0) < 1e-12 && close(&a.1, &b.1) < 1e-12);
        assert!(a.1.is_contiguous());
        // RMSNorm over more rows than one task of its backward takes (64).
        let xr = Var::from_tensor(&Tensor::randn(0f64, 1.0, (150, 8), &dev).unwrap()).unwrap();
        let wr = Tensor::randn(0f64, 1.0, (150, 8), &dev).unwrap();
        let rms_grads = |f: &dyn Fn(&Tensor) -> Tensor| {
            let g = f(xr.as_tensor()).mul(&wr).unwrap().sum_all().unwrap().backward().unwrap();
            (g.get(&xr).unwrap().clone(), g.get(&wv).unwrap().clone())
        };
        let (a, b) = (
            rms_grads(&|x| rms_norm(x, wv.as_tensor(), 1e-5).unwrap()),
            rms_grads(&|x| rms_norm_ops(x, wv.as_tensor(), 1e-5).unwrap()),
        );
        assert!(close(&a.0, &b.0) < 1e-10 && close(&a.1, &b.1) < 1e-10);
        let mask = Tensor::randn(0f64, 1.0, (2, 1, 3, 37), &dev).unwrap();
        let x4 = x.as_tensor().reshape((2, 1, 3, 37)).unwrap();
        let fused_m = masked_softmax(&x4, &mask).unwrap();
        let ops_m = softmax_last_dim_ops(&x4.broadcast_add(&mask).unwrap()).unwrap();
        assert!(close(&fused_m, &ops_m) < 1e-12);
        for (fused, ops) in pairs {
            let (a, b) = (fused(x.as_tensor()), ops(x.as_tensor()));
            assert!(close(&a, &b) < 1e-12);
            let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
            assert!(close(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-12);
        }
    }
}
