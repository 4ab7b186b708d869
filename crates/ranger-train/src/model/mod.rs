//! Trainable models: the Llama family (Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3).

pub mod config;
pub mod llama;
pub mod ops;

pub use config::{Architecture, LlamaConfig, RopeScaling};
pub use llama::{causal_mask, Batch, KvCache, LlamaModel, Proj};

use candle_core::{DType, Result, Tensor, D};

/// Sum of the negative log-likelihoods of the target tokens of `batch` (a scalar, f32 or f64),
/// from `logits: [b, s, vocab]`: position `i` predicts token `i + 1` where `loss_mask[i + 1]`.
pub fn causal_lm_loss_sum(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (_, s, _) = logits.dims3()?;
    let cdt = ops::compute_dtype(logits.dtype());
    let logits = logits.narrow(1, 0, s - 1)?.to_dtype(cdt)?;
    let targets = batch.input_ids.narrow(1, 1, s - 1)?.contiguous()?;
    let mask = batch.loss_mask.narrow(1, 1, s - 1)?.to_dtype(cdt)?;
    let log_probs = ops::log_softmax_last_dim(&logits)?;
    let picked = log_probs.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?;
    picked.mul(&mask)?.sum_all()?.neg()
}

/// Mean loss of a batch as an f64 (for evaluation).
pub fn mean_loss(model: &LlamaModel, batch: &Batch) -> Result<(f64, usize)> {
    let logits = model.forward(batch)?;
    let sum = causal_lm_loss_sum(&logits, batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((sum, batch.n_targets))
}
