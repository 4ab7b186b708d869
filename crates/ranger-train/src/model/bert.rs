//! Trainable BERT-family encoders: BERT (and MiniLM, which is a BERT), RoBERTa / XLM-RoBERTa
//! (position ids offset past the padding index) and DistilBERT. All are post-LayerNorm
//! transformer encoders; this is one implementation with each family's Hugging Face names.
//! Norms, softmax, GELU and the projections run on the fused CPU kernels (with their own
//! backward passes) where they apply, on differentiable Candle ops elsewhere; both are
//! gradient-checked.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::linear::Proj;
use super::lora::DropoutSeed;
use crate::error::TrainError;
use crate::kernels::activations::gelu_erf;
use crate::kernels::checkpoint::{checkpoint, LayerFn};
use crate::kernels::chunked_attention::chunked_attention;
use crate::kernels::compute_dtype;
use crate::kernels::fused_ok;
use crate::kernels::norms::layer_norm;
use crate::kernels::softmax::masked_softmax;

/// Which encoder family (decides tensor names and position ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderFamily {
    /// `BertModel` checkpoints (BERT, MiniLM, …).
    Bert,
    /// RoBERTa, XLM-RoBERTa, CamemBERT: positions start after the padding index.
    Roberta,
    /// DistilBERT: no token types, its own tensor names.
    DistilBert,
}

impl EncoderFamily {
    /// Parses a `model_type`.
    pub fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "bert" => Some(Self::Bert),
            "roberta" | "xlm-roberta" | "camembert" => Some(Self::Roberta),
            "distilbert" => Some(Self::DistilBert),
            _ => None,
        }
    }

    /// The attribute the encoder lives under in `*ForSequenceClassification` models (and the
    /// prefix of its tensor names there).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
            Self::DistilBert => "distilbert",
        }
    }
}

/// The feed-forward activation (`hidden_act` / `activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`gelu`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    Silu,
}

impl Activation {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// Applies the activation (each has a backward pass in Candle).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// The configuration of a BERT-family encoder, with the original `config.json` kept.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Which family.
    pub family: EncoderFamily,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Rows of the position-embedding table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (0: none, DistilBERT).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding token id (RoBERTa's positions start at `pad_token_id + 1`).
    pub pad_token_id: u32,
    /// Feed-forward activation.
    pub activation: Activation,
    /// The `config.json` as read.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawBert {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    pad_token_id: Option<u32>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
}

#[derive(Deserialize)]
struct RawDistil {
    vocab_size: usize,
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    hidden_dim: usize,
    max_position_embeddings: usize,
    pad_token_id: Option<u32>,
    activation: Option<String>,
}

impl EncoderConfig {
    /// Parses a `config.json` value of a BERT-family model; `source` names the file in errors.
    pub fn from_json(raw: Value, source: &str) -> std::result::Result<Self, TrainError> {
        let bad = |m: String| TrainError::Config { origin: source.to_string(), message: m };
        let mt = raw.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
        let family = EncoderFamily::from_model_type(&mt).ok_or_else(|| TrainError::UnsupportedArchitecture {
            origin: source.to_string(),
            model_type: mt.clone(),
        })?;
        let act = |s: Option<String>| -> std::result::Result<Activation, TrainError> {
            let s = s.unwrap_or_else(|| "gelu".into());
            Activation::parse(&s)
                .ok_or_else(|| bad(format!("activation {s:?} is not supported (gelu, gelu_new, relu, silu)")))
        };
        let cfg = match family {
            EncoderFamily::DistilBert => {
                let r: RawDistil = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
                if raw.get("sinusoidal_pos_embds").and_then(Value::as_bool) == Some(true) {
                    return Err(bad("sinusoidal_pos_embds=true is not supported".into()));
                }
                Self {
                    family,
                    vocab_size: r.vocab_size,
                    hidden_size: r.dim,
                    num_hidden_layers: r.n_layers,
                    num_attention_heads: r.n_heads,
                    intermediate_size: r.hidden_dim,
                    max_position_embeddings: r.max_position_embeddings,
                    type_vocab_size: 0,
                    layer_norm_eps: 1e-12,
                    pad_token_id: r.pad_token_id.unwrap_or(0),
                    activation: act(r.activation)?,
                    raw,
                }
            }
            _ => {
                let r: RawBert = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
                if let Some(p) = r.position_embedding_type.as_deref().filter(|p| *p != "absolute") {
                    return Err(bad(format!("position_embedding_type {p:?} is not supported (absolute only)")));
                }
                Self {
                    family,
                    vocab_size: r.vocab_size,
                    hidden_size: r.hidden_size,
                    num_hidden_layers: r.num_hidden_layers,
                    num_attention_heads: r.num_attention_heads,
                    intermediate_size: r.intermediate_size,
                    max_position_embeddings: r.max_position_embeddings,
                    type_vocab_size: r.type_vocab_size.unwrap_or(2),
                    layer_norm_eps: r.layer_norm_eps.unwrap_or(1e-12),
                    pad_token_id: r.pad_token_id.unwrap_or(if family == EncoderFamily::Roberta { 1 } else { 0 }),
                    activation: act(r.hidden_act)?,
                    raw,
                }
            }
        };
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden size {} is not a multiple of the {} attention heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.max_position_embeddings <= cfg.position_offset() {
            return Err(bad("max_position_embeddings is too small".into()));
        }
        Ok(cfg)
    }

    /// First position id of a sequence: `pad_token_id + 1` for RoBERTa, 0 otherwise.
    pub fn position_offset(&self) -> usize {
        if self.family == EncoderFamily::Roberta {
            self.pad_token_id as usize + 1
        } else {
            0
        }
    }

    /// Longest input (special tokens included) the position table allows.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }

    /// Module paths of layer `i` (with the family prefix).
    fn layer_names(&self, i: usize) -> LayerNames {
        let p = self.family.prefix();
        match self.family {
            EncoderFamily::DistilBert => {
                let l = format!("{p}.transformer.layer.{i}");
                LayerNames {
                    q: format!("{l}.attention.q_lin"),
                    k: format!("{l}.attention.k_lin"),
                    v: format!("{l}.attention.v_lin"),
                    o: format!("{l}.attention.out_lin"),
                    attn_norm: format!("{l}.sa_layer_norm"),
                    inter: format!("{l}.ffn.lin1"),
                    out: format!("{l}.ffn.lin2"),
                    out_norm: format!("{l}.output_layer_norm"),
                }
            }
            _ => {
                let l = format!("{p}.encoder.layer.{i}");
                LayerNames {
                    q: format!("{l}.attention.self.query"),
                    k: format!("{l}.attention.self.key"),
                    v: format!("{l}.attention.self.value"),
                    o: format!("{l}.attention.output.dense"),
                    attn_norm: format!("{l}.attention.output.LayerNorm"),
                    inter: format!("{l}.intermediate.dense"),
                    out: format!("{l}.output.dense"),
                    out_norm: format!("{l}.output.LayerNorm"),
                }
            }
        }
    }

    /// Every encoder weight with its Hugging Face name (family prefix included, as in
    /// `*ForSequenceClassification` checkpoints) and shape, in a stable order.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let p = self.family.prefix();
        let mut out = vec![
            (format!("{p}.embeddings.word_embeddings.weight"), vec![self.vocab_size, h]),
            (format!("{p}.embeddings.position_embeddings.weight"), vec![self.max_position_embeddings, h]),
        ];
        if self.type_vocab_size > 0 {
            out.push((format!("{p}.embeddings.token_type_embeddings.weight"), vec![self.type_vocab_size, h]));
        }
        out.push((format!("{p}.embeddings.LayerNorm.weight"), vec![h]));
        out.push((format!("{p}.embeddings.LayerNorm.bias"), vec![h]));
        for i in 0..self.num_hidden_layers {
            let n = self.layer_names(i);
            for (m, o, inp) in [(&n.q, h, h), (&n.k, h, h), (&n.v, h, h), (&n.o, h, h)] {
                out.push((format!("{m}.weight"), vec![o, inp]));
                out.push((format!("{m}.bias"), vec![o]));
            }
            out.push((format!("{}.weight", n.attn_norm), vec![h]));
            out.push((format!("{}.bias", n.attn_norm), vec![h]));
            out.push((format!("{}.weight", n.inter), vec![f, h]));
            out.push((format!("{}.bias", n.inter), vec![f]));
            out.push((format!("{}.weight", n.out), vec![h, f]));
            out.push((format!("{}.bias", n.out), vec![h]));
            out.push((format!("{}.weight", n.out_norm), vec![h]));
            out.push((format!("{}.bias", n.out_norm), vec![h]));
        }
        out
    }

    /// The names of the projections LoRA can adapt, by module path.
    pub fn projection_modules(&self) -> Vec<String> {
        (0..self.num_hidden_layers)
            .flat_map(|i| {
                let n = self.layer_names(i);
                [n.q, n.k, n.v, n.o, n.inter, n.out]
            })
            .collect()
    }
}

struct LayerNames {
    q: String,
    k: String,
    v: String,
    o: String,
    attn_norm: String,
    inter: String,
    out: String,
    out_norm: String,
}

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    attn_norm: Norm,
    inter: Proj,
    out: Proj,
    out_norm: Norm,
}

impl EncoderLayer {
    /// The layer over hidden states `x: [b, s, hidden]` under the additive `mask: [b, 1, s, s]`.
    fn forward(&self, c: &EncoderConfig, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (heads, hd) = (c.num_attention_heads, c.hidden_size / c.num_attention_heads);
        let eps = c.layer_norm_eps;
        let split = |t: Tensor| t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous();
        // Scaling q (s x d) rather than the scores (s x s) keeps one fewer large tensor.
        let q = (split(self.q.forward(x)?)? * (1.0 / (hd as f64).sqrt()))?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let attn = if fused_ok(&q) {
            let scores = q.matmul(&k.t()?)?.to_dtype(compute_dtype(q.dtype()))?;
            masked_softmax(&scores, mask)?.to_dtype(q.dtype())?.matmul(&v)?
        } else {
            // Devices and half precision: query chunks, scores never [b, h, s, s] whole.
            chunked_attention(&q, &k, &v, mask, None)?
        };
        let attn = attn.transpose(1, 2)?.reshape((b, s, c.hidden_size))?;
        let x = layer_norm(&(x + self.o.forward(&attn)?)?, &self.attn_norm.weight, &self.attn_norm.bias, eps)?;
        let ff = self.out.forward(&c.activation.apply(&self.inter.forward(&x)?)?)?;
        layer_norm(&(x + ff)?, &self.out_norm.weight, &self.out_norm.bias, eps)
    }

    /// Every tensor the layer computes with.
    fn tensors(&self) -> Vec<Tensor> {
        let projs = [&self.q, &self.k, &self.v, &self.o, &self.inter, &self.out];
        let mut out: Vec<Tensor> = projs.iter().flat_map(|p| p.tensors()).collect();
        for n in [&self.attn_norm, &self.out_norm] {
            out.extend([n.weight.clone(), n.bias.clone()]);
        }
        out
    }

    /// The dropout switch of its LoRA adapters, if any has dropout.
    fn dropout_seed(&self) -> Option<DropoutSeed> {
        [&self.q, &self.k, &self.v, &self.o, &self.inter, &self.out]
            .iter()
            .find_map(|p| Some(p.lora.as_ref()?.dropout.as_ref()?.seed.clone()))
    }
}

/// A BERT-family encoder over weights by Hugging Face name: trainable where they are the
/// tensors of `Var`s, frozen where they are plain tensors.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// The configuration.
    pub config: EncoderConfig,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    embed_norm: Norm,
    layers: Vec<EncoderLayer>,
    /// Module path of each projection (for LoRA), in layer order: q, k, v, o, inter, out.
    modules: Vec<String>,
    dtype: DType,
    device: Device,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl Encoder {
    /// Builds the encoder; the error names a missing tensor.
    pub fn new(config: EncoderConfig, weights: &HashMap<String, Tensor>) -> crate::Result<Self> {
        let get = |n: &str| weights.get(n).cloned().ok_or_else(|| TrainError::MissingTensor { tensor: n.into() });
        let proj = |m: &str| -> crate::Result<Proj> {
            Ok(Proj::dense(get(&format!("{m}.weight"))?, Some(get(&format!("{m}.bias"))?)))
        };
        let norm = |m: &str| -> crate::Result<Norm> {
            Ok(Norm { weight: get(&format!("{m}.weight"))?, bias: get(&format!("{m}.bias"))? })
        };
        let p = config.family.prefix();
        let word = get(&format!("{p}.embeddings.word_embeddings.weight"))?;
        let position = get(&format!("{p}.embeddings.position_embeddings.weight"))?;
        let token_type = if config.type_vocab_size > 0 {
            Some(get(&format!("{p}.embeddings.token_type_embeddings.weight"))?)
        } else {
            None
        };
        let embed_norm = norm(&format!("{p}.embeddings.LayerNorm"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let n = config.layer_names(i);
            layers.push(EncoderLayer {
                q: proj(&n.q)?,
                k: proj(&n.k)?,
                v: proj(&n.v)?,
                o: proj(&n.o)?,
                attn_norm: norm(&n.attn_norm)?,
                inter: proj(&n.inter)?,
                out: proj(&n.out)?,
                out_norm: norm(&n.out_norm)?,
            });
        }
        let (dtype, device) = (word.dtype(), word.device().clone());
        let modules = config.projection_modules();
        Ok(Self {
            config,
            word,
            position,
            token_type,
            embed_norm,
            layers,
            modules,
            dtype,
            device,
            gradient_checkpointing: false,
        })
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every projection with its module path (q, k, v, o, intermediate, output per layer).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let names = self.modules.clone();
        let projs =
            self.layers.iter_mut().flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.inter, &mut l.out]);
        names.into_iter().zip(projs).collect()
    }

    /// Every projection with its module path, read-only.
    pub fn projections(&self) -> Vec<(String, &Proj)> {
        let projs = self.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.inter, &l.out]);
        self.modules.iter().cloned().zip(projs).collect()
    }

    /// Hidden states `[b, s, hidden]` of `input_ids: [b, s]` (u32). `token_type_ids` defaults to
    /// zeros; `mask: [b, 1, s, s]` is additive (0 or a large negative value) in the compute
    /// dtype. Sequences are right-padded, so positions count from the family's offset; padding
    /// positions differ from Hugging Face's (RoBERTa gives them the padding index) but padding
    /// is never attended to or pooled.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>, mask: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, s) = input_ids.dims2()?;
        let lookup = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            table.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, ()))
        };
        let off = c.position_offset() as u32;
        let pos = Tensor::arange(off, off + s as u32, &self.device)?;
        let mut x =
            lookup(&self.word, input_ids)?.broadcast_add(&self.position.index_select(&pos, 0)?.unsqueeze(0)?)?;
        if let Some(tt) = &self.token_type {
            // A one-row table (RoBERTa) has only type 0, whatever a tokenizer says for pairs.
            let types = match token_type_ids {
                Some(t) if c.type_vocab_size > 1 => t.clone(),
                _ => input_ids.zeros_like()?,
            };
            x = (x + lookup(tt, &types)?)?;
        }
        let mut x = layer_norm(&x, &self.embed_norm.weight, &self.embed_norm.bias, c.layer_norm_eps)?;
        for (i, l) in self.layers.iter().enumerate() {
            // As the decoder's layers: one function of the input, run twice under activation
            // checkpointing with the LoRA dropout seed of now.
            let dropout = l.dropout_seed().map(|d| {
                let seed = d.get();
                (d, seed)
            });
            let (c, layer, mask) = (c.clone(), l.clone(), mask.clone());
            let run: LayerFn = Arc::new(move |x: &Tensor| match &dropout {
                Some((d, seed)) => d.replay(*seed, i as u64, x.device(), || layer.forward(&c, x, &mask)),
                None => layer.forward(&c, x, &mask),
            });
            x = if self.gradient_checkpointing { checkpoint(&x, &l.tensors(), run)? } else { run(&x)? };
        }
        Ok(x)
    }

    /// Activation checkpointing, as [`super::LlamaModel::set_gradient_checkpointing`]: each
    /// encoder layer keeps only its input and is recomputed in the backward pass.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Every weight by Hugging Face name (in [`EncoderConfig::weight_shapes`] order), with LoRA
    /// adapters merged into their projections.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        let p = self.config.family.prefix();
        by_name.insert(format!("{p}.embeddings.word_embeddings.weight"), self.word.clone());
        by_name.insert(format!("{p}.embeddings.position_embeddings.weight"), self.position.clone());
        if let Some(t) = &self.token_type {
            by_name.insert(format!("{p}.embeddings.token_type_embeddings.weight"), t.clone());
        }
        by_name.insert(format!("{p}.embeddings.LayerNorm.weight"), self.embed_norm.weight.clone());
        by_name.insert(format!("{p}.embeddings.LayerNorm.bias"), self.embed_norm.bias.clone());
        for (i, l) in self.layers.iter().enumerate() {
            let n = self.config.layer_names(i);
            for (m, norm) in [(&n.attn_norm, &l.attn_norm), (&n.out_norm, &l.out_norm)] {
                by_name.insert(format!("{m}.weight"), norm.weight.clone());
                by_name.insert(format!("{m}.bias"), norm.bias.clone());
            }
        }
        for (m, proj) in self.projections() {
            by_name.insert(format!("{m}.weight"), proj.merged_weight()?);
            if let Some(b) = &proj.bias {
                by_name.insert(format!("{m}.bias"), b.clone());
            }
        }
        self.config
            .weight_shapes()
            .into_iter()
            .map(|(n, _)| {
                by_name
                    .remove(&n)
                    .map(|t| (n.clone(), t.detach()))
                    .ok_or_else(|| candle_core::Error::msg(format!("weight {n} missing")))
            })
            .collect()
    }
}
