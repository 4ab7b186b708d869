//! Sequence classification: a BERT-family encoder, a Llama-family decoder, or ModernBERT (built
//! on the decoder's layers, bidirectional) with the classification head of the matching
//! `transformers` `*ForSequenceClassification` class, under the same tensor names, so
//! checkpoints move between ranger-tune and transformers unchanged.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use serde_json::{json, Value};

use super::bert::{Encoder, EncoderConfig, EncoderFamily};
use super::linear::Proj;
use super::llama::LlamaModel;
use super::LlamaConfig;
use crate::error::TrainError;
use crate::kernels::activations::gelu_erf;
use crate::kernels::compute_dtype;
use crate::kernels::cross_entropy::cross_entropy_rows;
use crate::kernels::norms::layer_norm;

/// The attention mask of a classifier's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// Every real token sees every other (encoders).
    Padding,
    /// Each token sees itself and the tokens before it, within `window` if set (decoders).
    Causal {
        /// The sliding attention window (Mistral, Phi-3), if any.
        window: Option<usize>,
    },
}

/// The configuration of the model under the head.
// A configuration is built once per model: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum BackboneConfig {
    /// BERT, RoBERTa or DistilBERT.
    Encoder(EncoderConfig),
    /// Llama, Mistral, Qwen2, Qwen3 or SmolLM3 (pooled at the last non-padding token).
    Decoder(LlamaConfig),
}

impl BackboneConfig {
    /// The `transformers` class of the classifier.
    pub fn architecture(&self) -> String {
        match self {
            Self::Encoder(c) => match c.family {
                EncoderFamily::Bert => "BertForSequenceClassification".into(),
                EncoderFamily::Roberta => match c.raw.get("model_type").and_then(Value::as_str) {
                    Some("xlm-roberta") => "XLMRobertaForSequenceClassification".into(),
                    Some("camembert") => "CamembertForSequenceClassification".into(),
                    _ => "RobertaForSequenceClassification".into(),
                },
                EncoderFamily::DistilBert => "DistilBertForSequenceClassification".into(),
            },
            Self::Decoder(c) => {
                let name = match c.arch {
                    super::Architecture::Llama => "Llama",
                    super::Architecture::Mistral => "Mistral",
                    super::Architecture::Qwen2 => "Qwen2",
                    super::Architecture::Qwen3 => "Qwen3",
                    super::Architecture::SmolLM3 => "SmolLM3",
                    super::Architecture::Gemma3 => "Gemma3Text",
                    super::Architecture::Gemma2 => "Gemma2",
                    super::Architecture::Phi3 => "Phi3",
                    super::Architecture::Gpt2 => "GPT2",
                    super::Architecture::ModernBert => "ModernBert",
                };
                format!("{name}ForSequenceClassification")
            }
        }
    }

    /// Model width.
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Encoder(c) => c.hidden_size,
            Self::Decoder(c) => c.hidden_size,
        }
    }

    /// The `config.json` as read.
    pub fn raw(&self) -> &Value {
        match self {
            Self::Encoder(c) => &c.raw,
            Self::Decoder(c) => &c.raw,
        }
    }

    /// The head's weights and shapes for `num_labels` classes (Hugging Face names).
    pub fn head_shapes(&self, num_labels: usize) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size();
        let pair = |m: &str, o: usize| vec![(format!("{m}.weight"), vec![o, h]), (format!("{m}.bias"), vec![o])];
        match self {
            Self::Encoder(c) => match c.family {
                EncoderFamily::Bert => [pair("bert.pooler.dense", h), pair("classifier", num_labels)].concat(),
                EncoderFamily::Roberta => {
                    [pair("classifier.dense", h), pair("classifier.out_proj", num_labels)].concat()
                }
                EncoderFamily::DistilBert => [pair("pre_classifier", h), pair("classifier", num_labels)].concat(),
            },
            // ModernBERT: `classifier(norm(gelu(head.dense(pooled))))`.
            Self::Decoder(c) if c.bidirectional => {
                let flag = |k: &str| c.raw.get(k).and_then(Value::as_bool).unwrap_or(false);
                let mut out = vec![("head.dense.weight".to_string(), vec![h, h])];
                if flag("classifier_bias") {
                    out.push(("head.dense.bias".into(), vec![h]));
                }
                out.push(("head.norm.weight".into(), vec![h]));
                if c.norm_bias {
                    out.push(("head.norm.bias".into(), vec![h]));
                }
                out.extend(pair("classifier", num_labels));
                out
            }
            Self::Decoder(_) => vec![("score.weight".into(), vec![num_labels, h])],
        }
    }

    /// Every weight of the classifier (backbone, then head) with its shape.
    pub fn weight_shapes(&self, num_labels: usize) -> Vec<(String, Vec<usize>)> {
        let mut out = match self {
            Self::Encoder(c) => c.weight_shapes(),
            Self::Decoder(c) => c.backbone_weight_shapes(),
        };
        out.extend(self.head_shapes(num_labels));
        out
    }

    /// Module names PEFT must save whole next to a LoRA adapter (the head).
    pub fn head_modules(&self) -> Vec<String> {
        match self {
            Self::Encoder(c) => match c.family {
                EncoderFamily::Bert => vec!["bert.pooler.dense".into(), "classifier".into()],
                EncoderFamily::Roberta => vec!["classifier".into()],
                EncoderFamily::DistilBert => vec!["pre_classifier".into(), "classifier".into()],
            },
            Self::Decoder(c) if c.bidirectional => vec!["head".into(), "classifier".into()],
            Self::Decoder(_) => vec!["score".into()],
        }
    }

    /// Default LoRA targets: every attention and feed-forward projection of the backbone.
    pub fn default_lora_targets(&self) -> Vec<String> {
        let t: &[&str] = match self {
            Self::Encoder(c) if c.family == EncoderFamily::DistilBert => {
                &["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
            }
            Self::Encoder(_) => &["query", "key", "value", "output.dense", "intermediate.dense"],
            Self::Decoder(c) => return c.lora_targets(),
        };
        t.iter().map(|s| s.to_string()).collect()
    }

    /// `config.json` of the classifier: the backbone's, with the architecture, the label maps,
    /// `problem_type` and (for decoders, which pool at the last non-padding token) the
    /// padding id set.
    pub fn classifier_json(&self, labels: &[String], pad_token_id: u32, dtype: DType) -> Value {
        let mut cfg = self.raw().clone();
        if let Value::Object(o) = &mut cfg {
            o.insert("architectures".into(), json!([self.architecture()]));
            let id2label: serde_json::Map<String, Value> =
                labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect();
            let label2id: serde_json::Map<String, Value> =
                labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
            o.insert("id2label".into(), Value::Object(id2label));
            o.insert("label2id".into(), Value::Object(label2id));
            o.insert("num_labels".into(), json!(labels.len()));
            o.insert("problem_type".into(), json!("single_label_classification"));
            o.insert("torch_dtype".into(), json!(crate::output::torch_dtype(dtype)));
            if matches!(self, Self::Decoder(_)) && o.get("pad_token_id").is_none_or(Value::is_null) {
                o.insert("pad_token_id".into(), json!(pad_token_id));
            }
        }
        cfg
    }
}

/// The labels in a `config.json` (`id2label`), in id order, when it names a classifier.
pub fn labels_from_config(raw: &Value) -> Option<Vec<String>> {
    let map = raw.get("id2label")?.as_object()?;
    let mut pairs: Vec<(usize, String)> =
        map.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string()))).collect();
    pairs.sort();
    (pairs.iter().enumerate().all(|(i, (k, _))| i == *k) && !pairs.is_empty())
        .then(|| pairs.into_iter().map(|(_, l)| l).collect())
}

/// The head on top of the pooled representation.
#[derive(Debug, Clone)]
enum Head {
    /// `classifier(tanh(dense(h[CLS])))`: BERT's pooler + classifier, RoBERTa's classification head.
    Tanh { dense: Proj, out: Proj },
    /// `classifier(relu(pre_classifier(h[CLS])))`: DistilBERT.
    Relu { dense: Proj, out: Proj },
    /// `score(h[last non-padding token])`, no bias: the decoders.
    Score { score: Proj },
    /// `classifier(LayerNorm(gelu(dense(pooled))))` over the first token or the mean of the
    /// tokens (`classifier_pooling`): ModernBERT.
    ModernBert { dense: Proj, norm: Tensor, norm_bias: Option<Tensor>, out: Proj, mean: bool, eps: f64 },
}

#[derive(Debug, Clone)]
// One per classifier; which variant is larger depends on the build's features (CUDA adds to
// the encoder), so neither is boxed.
#[allow(clippy::large_enum_variant)]
enum Backbone {
    Encoder(Encoder),
    Decoder(LlamaModel),
}

/// One batch of labelled (or unlabelled) texts.
#[derive(Debug, Clone)]
pub struct ClassifierBatch {
    /// `[b, s]` u32 token ids, right-padded.
    pub input_ids: Tensor,
    /// `[b, s]` u32 token types (text pairs), encoders only.
    pub token_type_ids: Option<Tensor>,
    /// `[b, s]` u32 positions (0..len), decoders only.
    pub positions: Tensor,
    /// Additive attention mask `[b, 1, s, s]` in the compute dtype.
    pub mask: Tensor,
    /// `[b]` u32 index of the last non-padding token of each row within the flattened batch
    /// (`row * s + len - 1`), the decoders' pooling position.
    pub last_index: Tensor,
    /// `[b]` u32 label ids (zeros when unlabelled).
    pub labels: Tensor,
    /// Rows in the batch.
    pub n_examples: usize,
    /// Non-padding tokens.
    pub n_tokens: usize,
}

/// A sequence classifier: backbone plus head, producing `[b, num_labels]` logits.
#[derive(Debug, Clone)]
pub struct SequenceClassifier {
    /// The backbone's configuration.
    pub config: BackboneConfig,
    /// Number of classes.
    pub num_labels: usize,
    backbone: Backbone,
    head: Head,
}

impl SequenceClassifier {
    /// Builds the classifier over weights by Hugging Face name (see
    /// [`BackboneConfig::weight_shapes`]); trainable where they are `Var` tensors. The error
    /// names a missing tensor.
    pub fn new(config: BackboneConfig, num_labels: usize, weights: &HashMap<String, Tensor>) -> crate::Result<Self> {
        let get = |n: &str| weights.get(n).cloned().ok_or_else(|| TrainError::MissingTensor { tensor: n.into() });
        let proj = |m: &str| -> crate::Result<Proj> {
            Ok(Proj::dense(get(&format!("{m}.weight"))?, Some(get(&format!("{m}.bias"))?)))
        };
        let (backbone, head) = match &config {
            BackboneConfig::Encoder(c) => {
                let head = match c.family {
                    EncoderFamily::Bert => Head::Tanh { dense: proj("bert.pooler.dense")?, out: proj("classifier")? },
                    EncoderFamily::Roberta => {
                        Head::Tanh { dense: proj("classifier.dense")?, out: proj("classifier.out_proj")? }
                    }
                    EncoderFamily::DistilBert => {
                        Head::Relu { dense: proj("pre_classifier")?, out: proj("classifier")? }
                    }
                };
                (Backbone::Encoder(Encoder::new(c.clone(), weights)?), head)
            }
            BackboneConfig::Decoder(c) if c.bidirectional => {
                let mean = match c.raw.get("classifier_pooling").and_then(Value::as_str).unwrap_or("cls") {
                    "cls" => false,
                    "mean" => true,
                    other => {
                        return Err(TrainError::Config {
                            origin: "config.json".into(),
                            message: format!("classifier_pooling {other:?} is not supported (cls, mean)"),
                        })
                    }
                };
                let activation = c.raw.get("classifier_activation").and_then(Value::as_str).unwrap_or("gelu");
                if activation != "gelu" {
                    return Err(TrainError::Config {
                        origin: "config.json".into(),
                        message: format!("classifier_activation {activation:?} is not supported (gelu)"),
                    });
                }
                let head = Head::ModernBert {
                    dense: Proj::dense(get("head.dense.weight")?, weights.get("head.dense.bias").cloned()),
                    norm: get("head.norm.weight")?,
                    norm_bias: weights.get("head.norm.bias").cloned(),
                    out: proj("classifier")?,
                    mean,
                    eps: c.rms_norm_eps,
                };
                (Backbone::Decoder(LlamaModel::new_backbone(c.clone(), weights)?), head)
            }
            BackboneConfig::Decoder(c) => {
                let score = Proj::dense(get("score.weight")?, None);
                (Backbone::Decoder(LlamaModel::new_backbone(c.clone(), weights)?), Head::Score { score })
            }
        };
        Ok(Self { config, num_labels, backbone, head })
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        match &self.backbone {
            Backbone::Encoder(e) => e.dtype(),
            Backbone::Decoder(d) => d.dtype(),
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        match &self.backbone {
            Backbone::Encoder(e) => e.device(),
            Backbone::Decoder(d) => d.device(),
        }
    }

    /// The dtype attention masks must have.
    pub fn mask_dtype(&self) -> DType {
        compute_dtype(self.dtype())
    }

    /// Activation checkpointing of the backbone's layers (see
    /// [`LlamaModel::set_gradient_checkpointing`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        match &mut self.backbone {
            Backbone::Encoder(e) => e.set_gradient_checkpointing(on),
            Backbone::Decoder(d) => d.set_gradient_checkpointing(on),
        }
    }

    /// Whether the backbone is a decoder (causal mask, last-token pooling).
    pub fn is_decoder(&self) -> bool {
        matches!(self.backbone, Backbone::Decoder(_))
    }

    /// The attention mask its batches need: padding only for an encoder, causal (within the
    /// decoder's sliding window, if it has one) for a decoder.
    pub fn mask_kind(&self) -> MaskKind {
        match &self.backbone {
            Backbone::Encoder(_) => MaskKind::Padding,
            Backbone::Decoder(d) if d.config.bidirectional => MaskKind::Padding,
            Backbone::Decoder(d) => MaskKind::Causal { window: d.config.sliding_window },
        }
    }

    /// Every backbone projection LoRA can adapt, with its module path.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        match &mut self.backbone {
            Backbone::Encoder(e) => e.projections_mut(),
            Backbone::Decoder(d) => d.projections_mut(),
        }
    }

    /// Logits `[b, num_labels]` of a batch.
    pub fn forward(&self, batch: &ClassifierBatch) -> Result<Tensor> {
        let pooled = match &self.backbone {
            // The [CLS] row is a strided view; CUDA and Metal refuse such a matmul input.
            Backbone::Encoder(e) => e
                .forward(&batch.input_ids, batch.token_type_ids.as_ref(), &batch.mask)?
                .narrow(1, 0, 1)?
                .squeeze(1)?
                .contiguous()?,
            Backbone::Decoder(d) => {
                let h = d.hidden_states(&batch.input_ids, &batch.positions, &batch.mask)?;
                let (b, s, w) = h.dims3()?;
                match &self.head {
                    Head::ModernBert { mean: true, .. } => mean_pool(&h, &batch.last_index)?,
                    // The first token ([CLS]) of each row.
                    Head::ModernBert { mean: false, .. } => h.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?,
                    _ => h.reshape((b * s, w))?.index_select(&batch.last_index, 0)?,
                }
            }
        };
        match &self.head {
            Head::Tanh { dense, out } => out.forward(&dense.forward(&pooled)?.tanh()?),
            Head::Relu { dense, out } => out.forward(&dense.forward(&pooled)?.relu()?),
            Head::Score { score } => score.forward(&pooled),
            Head::ModernBert { dense, norm, norm_bias, out, eps, .. } => {
                let h = gelu_erf(&dense.forward(&pooled)?)?;
                let h = match norm_bias {
                    Some(b) => layer_norm(&h, norm, b, *eps)?,
                    None => layer_norm(&h, norm, &norm.zeros_like()?, *eps)?,
                };
                out.forward(&h)
            }
        }
    }

    /// Sum over the batch of the cross-entropy of the labels (a scalar in the compute dtype).
    pub fn loss_sum(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let cdt = compute_dtype(logits.dtype());
        cross_entropy_rows(&logits.to_dtype(cdt)?, labels)?.sum_all()
    }

    /// Every weight by Hugging Face name, LoRA adapters merged (backbone, then head).
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = match &self.backbone {
            Backbone::Encoder(e) => e.merged_weights()?,
            Backbone::Decoder(d) => d.merged_weights()?,
        };
        let names = self.config.head_shapes(self.num_labels);
        let tensors: Vec<Tensor> = match &self.head {
            Head::Tanh { dense, out } | Head::Relu { dense, out } => {
                vec![
                    dense.weight.dense()?,
                    dense.bias.clone().expect("bias"),
                    out.weight.dense()?,
                    out.bias.clone().expect("bias"),
                ]
            }
            Head::Score { score } => vec![score.weight.dense()?],
            // In `head_shapes` order: dense (bias), norm (bias), classifier.
            Head::ModernBert { dense, norm, norm_bias, out, .. } => {
                let mut v = vec![dense.weight.dense()?];
                v.extend(dense.bias.clone());
                v.push(norm.clone());
                v.extend(norm_bias.clone());
                v.extend([out.weight.dense()?, out.bias.clone().expect("bias")]);
                v
            }
        };
        out.extend(names.into_iter().map(|(n, _)| n).zip(tensors.into_iter().map(|t| t.detach())));
        Ok(out)
    }
}

/// The mean of each row's hidden states `h: [b, s, w]` over its real tokens (the first
/// `last_index[r] - r * s + 1`), as ModernBERT's `mean` pooling: `[b, w]`.
fn mean_pool(h: &Tensor, last_index: &Tensor) -> Result<Tensor> {
    let (b, s, _) = h.dims3()?;
    let dev = h.device();
    let starts = (Tensor::arange(0u32, b as u32, dev)?.to_dtype(DType::F32)? * s as f64)?;
    let lens = ((last_index.to_dtype(DType::F32)? - starts)? + 1.0)?.reshape((b, 1))?;
    let j = Tensor::arange(0u32, s as u32, dev)?.to_dtype(DType::F32)?.reshape((1, s))?;
    let real = j.broadcast_lt(&lens)?.to_dtype(DType::F32)?;
    let weights = real.broadcast_div(&lens)?.to_dtype(h.dtype())?.unsqueeze(2)?;
    h.broadcast_mul(&weights)?.sum(1)
}

/// The classifier's weights by Hugging Face name from a checkpoint that may be a bare encoder
/// (`embeddings.…` rather than `bert.embeddings.…`) or a causal LM (no `score`): names are
/// completed, and a missing head is freshly initialised with `init_seed` (a pretrained pooler is
/// kept) or, without a seed, an error naming the missing tensor.
pub fn complete_classifier_weights(
    backbone: &BackboneConfig,
    num_labels: usize,
    mut weights: HashMap<String, Tensor>,
    init_seed: Option<u64>,
    origin: &str,
) -> crate::Result<HashMap<String, Tensor>> {
    for (name, _) in backbone.weight_shapes(num_labels) {
        if !weights.contains_key(&name) {
            if let Some(bare) =
                name.split_once('.').map(|(_, rest)| rest.to_string()).filter(|b| weights.contains_key(b))
            {
                let t = weights.remove(&bare).expect("checked");
                weights.insert(name, t);
            }
        }
    }
    let head = backbone.head_shapes(num_labels);
    match init_seed {
        Some(seed) => {
            for (name, t) in init_head(backbone, num_labels, seed) {
                weights.entry(name).or_insert(t);
            }
        }
        None => {
            if let Some((name, _)) = head.iter().find(|(n, _)| !weights.contains_key(n)) {
                return Err(TrainError::Weights {
                    origin: origin.to_string(),
                    tensor: name.clone(),
                    problem: "missing: this model has no trained classification head".into(),
                });
            }
        }
    }
    for (name, shape) in &head {
        let got = weights[name].dims().to_vec();
        if &got != shape {
            return Err(TrainError::Weights {
                origin: origin.to_string(),
                tensor: name.clone(),
                problem: format!("shape {got:?}, {shape:?} expected: the checkpoint's classifier has another number of labels than the {num_labels} wanted"),
            });
        }
    }
    Ok(weights)
}

/// A fresh head for `num_labels` classes as `transformers` initialises one: normal(0, 0.02)
/// matrices (`initializer_range`), zero biases. Deterministic for a seed.
pub fn init_head(config: &BackboneConfig, num_labels: usize, seed: u64) -> Vec<(String, Tensor)> {
    let std = config.raw().get("initializer_range").and_then(Value::as_f64).unwrap_or(0.02);
    let mut rng = crate::rng::Rng::new(seed ^ 0x4EAD);
    config
        .head_shapes(num_labels)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.ends_with("norm.weight") {
                // ModernBERT's head LayerNorm starts as the identity.
                vec![1.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches");
            (name, t)
        })
        .collect()
}
