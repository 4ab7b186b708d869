//! The causal language-modelling loss computed from logits (the reference the fused LM head +
//! loss kernel is checked against, and the path for devices without it).

use candle_core::{Result, Tensor};

use super::batch::Batch;
use crate::kernels::lm_head::IGNORE_TARGET;
use crate::kernels::{compute_dtype, cross_entropy::cross_entropy_rows};

/// Sum of the negative log-likelihoods of the target tokens of `batch` (a scalar, f32 or f64),
/// from `logits: [b, s, vocab]`: position `i` predicts token `i + 1` where `loss_mask[i + 1]`.
/// Computed over all `b * s` rows with shifted targets (the last position's target is masked),
/// so f32/f64 logits are never copied (half-precision ones are converted to f32 once).
pub fn causal_lm_loss_sum(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let cdt = compute_dtype(logits.dtype());
    let dev = logits.device();
    let shift = |t: &Tensor| -> Result<Tensor> {
        Tensor::cat(&[&t.narrow(1, 1, s - 1)?, &t.narrow(1, 0, 1)?.zeros_like()?], 1)
    };
    let targets = shift(&batch.input_ids)?.flatten_all()?;
    let mask = shift(&batch.loss_mask)?.flatten_all()?.to_dtype(cdt)?.to_device(dev)?;
    let nll = cross_entropy_rows(&logits.reshape((b * s, v))?.to_dtype(cdt)?, &targets)?;
    nll.mul(&mask)?.sum_all()
}

/// The `[b * s]` u32 target of each position of `batch`, built on the batch's device: token
/// `i + 1` where `loss_mask[i + 1]`, [`IGNORE_TARGET`] elsewhere (and at the last position).
pub fn shifted_targets(batch: &Batch) -> Result<Tensor> {
    let (b, s) = batch.input_ids.dims2()?;
    let dev = batch.input_ids.device();
    let shift = |t: &Tensor| -> Result<Tensor> {
        Tensor::cat(&[&t.narrow(1, 1, s - 1)?, &t.narrow(1, 0, 1)?.zeros_like()?], 1)
    };
    let ids = shift(&batch.input_ids)?;
    let is_target = shift(&batch.loss_mask.to_device(dev)?)?.ne(0f32)?;
    let ignore = Tensor::full(IGNORE_TARGET, (b, s), dev)?;
    is_target.where_cond(&ids, &ignore)?.flatten_all()
}
