//! Using a trained classifier: loading it (a Hugging Face `*ForSequenceClassification` folder, or
//! a base model plus a PEFT `SEQ_CLS` adapter) and classifying texts in batches.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::build::{ModelBuilder, Tuning};
use crate::classify::{argmax_and_probs, collate, encode_records, Record};
use crate::error::{Result, TrainError};
use crate::loaded::LoadedModel;
use crate::model::classifier::labels_from_config;
use crate::model::{BackboneConfig, SequenceClassifier};
use crate::source::read_json;
use crate::tokenizer::TextTokenizer;

/// The file next to a classifier's LoRA adapter that keeps its labels (PEFT adapters have no
/// `config.json`): the classifier's `config.json` content.
pub const ADAPTER_CLASSIFIER_CONFIG: &str = "classifier_config.json";

/// A classifier ready to use.
pub struct Classifier {
    /// The model (LoRA adapters attached, unmerged, when loaded with one).
    pub model: SequenceClassifier,
    /// Label names in id order.
    pub labels: Vec<String>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
}

/// One prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The predicted label.
    pub label: String,
    /// Its id.
    pub label_id: u32,
    /// The probability of every label.
    pub scores: BTreeMap<String, f32>,
}

/// Builds a classifier from `loaded` (a classifier checkpoint, or with `adapter` a base model
/// plus a PEFT `SEQ_CLS` LoRA adapter whose saved head and labels are used), frozen, in `dtype`
/// on `device`.
pub fn load_classifier(
    mut loaded: LoadedModel,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Classifier> {
    // Classifiers compute over dense weights.
    loaded.dequantize_all()?;
    let LoadedModel { config, weights, tokenizer, origin, .. } = loaded;
    let backbone: BackboneConfig = config.backbone();
    let labels_origin;
    let labels = match adapter {
        Some(dir) => {
            let p = dir.join(ADAPTER_CLASSIFIER_CONFIG);
            labels_origin = p.display().to_string();
            labels_from_config(&read_json(&p)?)
        }
        None => {
            labels_origin = origin.clone();
            labels_from_config(config.raw())
        }
    }
    .ok_or_else(|| TrainError::Config {
        origin: labels_origin,
        message: "no id2label: this is not a sequence classifier".into(),
    })?;
    let tuning = adapter.map_or(Tuning::Frozen, Tuning::WithAdapter);
    let builder = ModelBuilder { dtype, device, tuning };
    let model = builder.classifier(backbone, labels.len(), weights, None, &origin)?.model;
    Ok(Classifier { model, labels, tokenizer })
}

impl Classifier {
    /// The longest input the model takes (the encoders' position table), capped at `wanted`.
    pub fn max_tokens(&self, wanted: usize) -> usize {
        match &self.model.config {
            BackboneConfig::Encoder(e) => wanted.min(e.max_tokens()),
            BackboneConfig::Decoder(_) => wanted,
        }
    }

    /// Classifies `records` (labels ignored) in batches of `batch_size`, truncating texts to
    /// `max_len` tokens; `path` names the file in errors.
    pub fn predict(
        &self,
        records: &[Record],
        max_len: usize,
        batch_size: usize,
        path: &Path,
    ) -> Result<Vec<Prediction>> {
        let unlabelled: Vec<Record> = records.iter().map(|r| Record { label: None, ..r.clone() }).collect();
        let examples = encode_records(&unlabelled, &self.tokenizer, &self.labels, self.max_tokens(max_len), path)?;
        let mut out = Vec::with_capacity(examples.len());
        let (pad, mdt) = (self.tokenizer.pad_id, self.model.mask_dtype());
        for chunk in examples.chunks(batch_size.max(1)) {
            let refs: Vec<_> = chunk.iter().collect();
            let batch = collate(&refs, pad, self.model.mask_kind(), mdt, self.model.device())?;
            let (ids, probs) = argmax_and_probs(&self.model.forward(&batch)?)?;
            for (id, p) in ids.into_iter().zip(probs) {
                out.push(Prediction {
                    label: self.labels[id as usize].clone(),
                    label_id: id,
                    scores: self.labels.iter().cloned().zip(p).collect(),
                });
            }
        }
        Ok(out)
    }
}
