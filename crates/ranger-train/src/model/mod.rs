//! Trainable models: the Llama family (Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3).

pub mod config;
pub mod fused;
pub mod llama;
pub mod ops;

pub use config::{Architecture, LlamaConfig, RopeScaling};
pub use llama::{causal_mask, peft_name, Batch, KvCache, LlamaModel, LoraAdapter, LoraConfig, Proj};

use candle_core::{DType, Result, Tensor};

/// Sum of the negative log-likelihoods of the target tokens of `batch` (a scalar, f32 or f64),
/// from `logits: [b, s, vocab]`: position `i` predicts token `i + 1` where `loss_mask[i + 1]`.
/// Computed over all `b * s` rows with shifted targets (the last position's target is masked),
/// so f32/f64 logits are never copied (half-precision ones are converted to f32 once).
pub fn causal_lm_loss_sum(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let cdt = ops::compute_dtype(logits.dtype());
    let dev = logits.device();
    let shift = |t: &Tensor| -> Result<Tensor> { Tensor::cat(&[&t.narrow(1, 1, s - 1)?, &t.narrow(1, 0, 1)?.zeros_like()?], 1) };
    let targets = shift(&batch.input_ids)?.flatten_all()?;
    let mask = shift(&batch.loss_mask)?.flatten_all()?.to_dtype(cdt)?.to_device(dev)?;
    let nll = ops::cross_entropy_rows(&logits.reshape((b * s, v))?.to_dtype(cdt)?, &targets)?;
    nll.mul(&mask)?.sum_all()
}

/// Mean loss of a batch as an f64 (for evaluation).
pub fn mean_loss(model: &LlamaModel, batch: &Batch) -> Result<(f64, usize)> {
    let logits = model.forward(batch)?;
    let sum = causal_lm_loss_sum(&logits, batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((sum, batch.n_targets))
}
