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
    let dt = x.dtype();
    let xf = x.to_dtype(compute_dtype(dt))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    normed.broadcast_mul(weight)
}

/// Softmax over the last dimension. The max is detached: subtracting a per-row constant does
/// not change softmax, so its gradient is exactly zero and needs no graph.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last_dim`]).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// SiLU, `x * sigmoid(x)`, from differentiable primitives.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.mul(&(x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Rotary position embedding in Hugging Face's "rotate half" layout:
/// `x * cos + rotate_half(x) * sin`, with `x: [b, heads, seq, head_dim]` and
/// `cos`/`sin: [b, 1, seq, head_dim]` (per-sequence positions, so packed examples restart at 0).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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
