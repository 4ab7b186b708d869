//! Trainable models: the Llama family (Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3) as causal
//! LMs or classifiers, and BERT-family encoders (BERT, MiniLM, RoBERTa, DistilBERT) as
//! classifiers.

pub mod bert;
pub mod classifier;
pub mod config;
pub mod llama;
pub mod lora;

pub use bert::{Encoder, EncoderConfig, EncoderFamily};
pub use classifier::{BackboneConfig, ClassifierBatch, SequenceClassifier};
pub use config::{Architecture, LlamaConfig, RopeScaling};
pub use llama::{causal_mask, Batch, KvCache, LlamaModel, Proj};
pub use lora::{peft_magnitude_name, peft_name, DropoutSeed, LoraAdapter, LoraConfig};

/// The configuration of any supported model, told apart by `model_type`.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// A Llama-family decoder.
    Decoder(LlamaConfig),
    /// A BERT-family encoder.
    Encoder(EncoderConfig),
}

impl ModelConfig {
    /// Parses a `config.json` value; `source` names the file in errors.
    pub fn from_json(raw: serde_json::Value, source: &str) -> crate::Result<Self> {
        let mt = raw.get("model_type").and_then(serde_json::Value::as_str).unwrap_or_default();
        if EncoderFamily::from_model_type(mt).is_some() {
            Ok(Self::Encoder(EncoderConfig::from_json(raw, source)?))
        } else {
            Ok(Self::Decoder(LlamaConfig::from_json(raw, source)?))
        }
    }

    /// The decoder configuration; an encoder is an error naming `origin` (encoders can only be
    /// trained as classifiers).
    pub fn decoder(&self, origin: &str) -> crate::Result<&LlamaConfig> {
        match self {
            Self::Decoder(c) => Ok(c),
            Self::Encoder(c) => Err(crate::TrainError::Config {
                origin: origin.to_string(),
                message: format!(
                    "a {} encoder has no language-model head; train it with --task classify",
                    c.family.prefix()
                ),
            }),
        }
    }

    /// As the backbone of a classifier.
    pub fn backbone(&self) -> BackboneConfig {
        match self {
            Self::Decoder(c) => BackboneConfig::Decoder(c.clone()),
            Self::Encoder(c) => BackboneConfig::Encoder(c.clone()),
        }
    }

    /// The `config.json` as read.
    pub fn raw(&self) -> &serde_json::Value {
        match self {
            Self::Decoder(c) => &c.raw,
            Self::Encoder(c) => &c.raw,
        }
    }
}

use candle_core::{DType, Result, Tensor};

use crate::kernels::compute_dtype;
use crate::kernels::cross_entropy::cross_entropy_rows;

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

/// Mean loss of a batch as an f64 (for evaluation).
pub fn mean_loss(model: &LlamaModel, batch: &Batch) -> Result<(f64, usize)> {
    let sum = model.loss_sum(batch, false)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((sum, batch.n_targets))
}
