//! The held-out loss of a causal LM: the mean cross-entropy per target token over sequences,
//! in batches. The trainer's evaluation and `ranger-tune eval` both go through
//! [`mean_token_loss`], so a model scored after training and the run's own last evaluation agree.

use std::path::Path;

use serde::Serialize;

use crate::data::{collate, load_file, to_sequences, DataOptions, Sequence};
use crate::error::Result;
use crate::kernels::compute_dtype;
use crate::model::LlamaModel;
use crate::tokenizer::TextTokenizer;

/// The summed loss and the number of target tokens of `seqs`, at most `limit` batches of
/// `batch_size` (right-padded with `pad_id`), without gradients.
pub fn token_loss_sum(
    model: &LlamaModel,
    seqs: &[Sequence],
    batch_size: usize,
    limit: usize,
    pad_id: u32,
) -> Result<(f64, usize)> {
    let mdt = compute_dtype(model.dtype());
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in seqs.chunks(batch_size.max(1)).take(limit) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, model.config.sliding_window, mdt, model.device())?;
        sum += candle_ranger::to_host_f64(&model.loss_sum(&batch, false)?)?;
        n += batch.n_targets;
    }
    Ok((sum, n))
}

/// The mean loss per target token of `seqs` ([`token_loss_sum`]); 0 when nothing is a target.
pub fn mean_token_loss(
    model: &LlamaModel,
    seqs: &[Sequence],
    batch_size: usize,
    limit: usize,
    pad_id: u32,
) -> Result<f64> {
    let (sum, n) = token_loss_sum(model, seqs, batch_size, limit, pad_id)?;
    Ok(sum / n.max(1) as f64)
}

/// A causal LM scored on a data file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileLoss {
    /// Mean loss per target token (natural log).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens scored.
    pub target_tokens: usize,
    /// Examples scored.
    pub examples: usize,
    /// Examples cut to the longest sequence.
    pub truncated: usize,
    /// Examples skipped: nothing left to score after truncation.
    pub dropped: usize,
}

/// Scores `model` on `path`, read as training reads data (`.jsonl` records with their prompt
/// masking, or plain text cut into `max_seq_len` blocks), one example per sequence (`opts.pack`
/// is ignored), in batches of `batch_size`.
pub fn file_loss(
    model: &LlamaModel,
    tokenizer: &TextTokenizer,
    path: &Path,
    opts: &DataOptions,
    batch_size: usize,
) -> Result<FileLoss> {
    let opts = DataOptions { pack: false, ..*opts };
    let data = load_file(path, tokenizer, &opts)?;
    let seqs = to_sequences(&data.examples, &opts);
    let (sum, n) = token_loss_sum(model, &seqs, batch_size, usize::MAX, tokenizer.pad_id)?;
    let loss = sum / n.max(1) as f64;
    Ok(FileLoss {
        loss,
        perplexity: loss.exp(),
        target_tokens: n,
        examples: seqs.len(),
        truncated: data.truncated,
        dropped: data.dropped,
    })
}
