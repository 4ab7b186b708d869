//! What a run trains: a causal LM on token sequences, or a sequence classifier on labelled
//! texts. The trainer drives either through this one interface (batches, loss, evaluation).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::classify::{self, argmax_and_probs, ClassMetrics, LabeledText};
use crate::data::{collate, Loader, Sequence};
use crate::error::Result;
use crate::held_out::mean_token_loss;
use crate::kernels::compute_dtype;
use crate::model::classifier::ClassifierBatch;
use crate::model::{Batch, LlamaModel, SequenceClassifier};

/// The model and data of a run.
// One per run, never moved in a hot loop: boxing a variant would only add indirection.
#[allow(clippy::large_enum_variant)]
pub enum Task {
    /// Next-token prediction.
    CausalLm {
        /// The model.
        model: LlamaModel,
        /// Training batches.
        train: Loader<Sequence>,
        /// Validation sequences.
        val: Vec<Sequence>,
    },
    /// Sequence classification.
    Classify {
        /// The model.
        model: SequenceClassifier,
        /// Training batches.
        train: Loader<LabeledText>,
        /// Validation examples.
        val: Vec<LabeledText>,
        /// Label names in id order.
        labels: Vec<String>,
    },
}

/// A collated micro-batch of either task.
pub enum TaskBatch {
    /// Token sequences.
    Lm(Batch),
    /// Labelled texts.
    Cls(ClassifierBatch),
}

impl TaskBatch {
    /// What the loss is averaged over: target tokens, or examples.
    pub fn n_targets(&self) -> usize {
        match self {
            Self::Lm(b) => b.n_targets,
            Self::Cls(b) => b.n_examples,
        }
    }

    /// Non-padding tokens.
    pub fn n_tokens(&self) -> usize {
        match self {
            Self::Lm(b) => b.n_tokens,
            Self::Cls(b) => b.n_tokens,
        }
    }
}

/// The result of an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean loss (per target token, or per example).
    pub loss: f64,
    /// Classification metrics (classification only).
    pub classes: Option<ClassMetrics>,
}

fn fnv(h: &mut u64, values: impl Iterator<Item = u32>) {
    for t in values.chain(std::iter::once(u32::MAX)) {
        for b in t.to_le_bytes() {
            *h ^= b as u64;
            *h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl Task {
    /// The causal LM, if that is the task.
    pub fn causal_lm(&self) -> Option<&LlamaModel> {
        match self {
            Self::CausalLm { model, .. } => Some(model),
            Self::Classify { .. } => None,
        }
    }

    /// The classifier, if that is the task.
    pub fn classifier(&self) -> Option<&SequenceClassifier> {
        match self {
            Self::Classify { model, .. } => Some(model),
            Self::CausalLm { .. } => None,
        }
    }

    /// Training rows (sequences or examples).
    pub fn n_train(&self) -> usize {
        match self {
            Self::CausalLm { train, .. } => train.sequences.len(),
            Self::Classify { train, .. } => train.sequences.len(),
        }
    }

    /// Validation rows.
    pub fn n_val(&self) -> usize {
        match self {
            Self::CausalLm { val, .. } => val.len(),
            Self::Classify { val, .. } => val.len(),
        }
    }

    /// Micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        match self {
            Self::CausalLm { train, .. } => train.batches_per_epoch(),
            Self::Classify { train, .. } => train.batches_per_epoch(),
        }
    }

    /// Identifies the training data (FNV-1a over every token id and label), so a resume on
    /// other data is refused.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let n = match self {
            Self::CausalLm { train, .. } => {
                train.sequences.iter().for_each(|s| fnv(&mut h, s.ids.iter().copied()));
                train.sequences.len()
            }
            Self::Classify { train, .. } => {
                train
                    .sequences
                    .iter()
                    .for_each(|e| fnv(&mut h, e.ids.iter().chain(&e.type_ids).copied().chain([e.label])));
                train.sequences.len()
            }
        };
        format!("{n}-seq-{h:016x}")
    }

    fn mask_dtype(&self) -> DType {
        match self {
            Self::CausalLm { model, .. } => compute_dtype(model.dtype()),
            Self::Classify { model, .. } => model.mask_dtype(),
        }
    }

    /// Training micro-batch `index` (counted from the start of training), collated.
    pub fn train_batch(&self, index: usize, pad_id: u32) -> Result<TaskBatch> {
        let mdt = self.mask_dtype();
        Ok(match self {
            Self::CausalLm { model, train, .. } => {
                TaskBatch::Lm(collate(&train.batch(index), pad_id, model.config.sliding_window, mdt, model.device())?)
            }
            Self::Classify { model, train, .. } => {
                TaskBatch::Cls(classify::collate(&train.batch(index), pad_id, model.mask_kind(), mdt, model.device())?)
            }
        })
    }

    /// The summed loss of a batch (a scalar in the compute dtype, with gradients).
    pub fn loss_sum(&self, batch: &TaskBatch) -> Result<Tensor> {
        Ok(match (self, batch) {
            (Self::CausalLm { model, .. }, TaskBatch::Lm(b)) => model.loss_sum(b, true)?,
            (Self::Classify { model, .. }, TaskBatch::Cls(b)) => model.loss_sum(&model.forward(b)?, &b.labels)?,
            _ => return Err(crate::TrainError::BatchOfOtherTask),
        })
    }

    /// Evaluates the validation set (at most `limit` batches of `batch_size`), `None` without
    /// validation data.
    pub fn evaluate(&self, batch_size: usize, limit: usize, pad_id: u32) -> Result<Option<Evaluation>> {
        if self.n_val() == 0 {
            return Ok(None);
        }
        let mdt = self.mask_dtype();
        let scalar = |t: Tensor| -> Result<f64> { Ok(candle_ranger::to_host_f64(&t)?) };
        match self {
            Self::CausalLm { model, val, .. } => {
                let loss = mean_token_loss(model, val, batch_size, limit, pad_id)?;
                Ok(Some(Evaluation { loss, classes: None }))
            }
            Self::Classify { model, val, labels, .. } => {
                let (mut sum, mut preds, mut gold) = (0f64, Vec::new(), Vec::new());
                for chunk in val.chunks(batch_size).take(limit) {
                    let refs: Vec<&LabeledText> = chunk.iter().collect();
                    let batch = classify::collate(&refs, pad_id, model.mask_kind(), mdt, model.device())?;
                    let logits = model.forward(&batch)?;
                    sum += scalar(model.loss_sum(&logits, &batch.labels)?)?;
                    preds.extend(argmax_and_probs(&logits)?.0);
                    gold.extend(chunk.iter().map(|e| e.label));
                }
                let metrics = ClassMetrics::compute(&preds, &gold, labels);
                Ok(Some(Evaluation { loss: sum / gold.len().max(1) as f64, classes: Some(metrics) }))
            }
        }
    }
}
