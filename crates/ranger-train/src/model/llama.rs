//! A trainable Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Gemma 2 and 3, Phi-3,
//! and, through the configuration's layout flags, GPT-2 and the bidirectional ModernBERT encoder):
//! differentiable tensor ops,
//! with the fused CPU kernels for attention and the LM head + loss where they apply.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::batch::{causal_mask, Batch};
use super::config::{Activation, LlamaConfig};
use super::linear::Proj;
use super::llama_names::{
    self as names, bias_of, DOWN, FUSED_DOWN, FUSED_GATE_UP, FUSED_O, FUSED_QKV, GATE, K, O, Q, UP, V,
};
use super::lora::{DropoutSeed, LoraConfig};
use crate::kernels::activations::{geglu, gelu_erf, gelu_tanh, swiglu};
use crate::kernels::attention::{repeat_kv, FusedAttention};
use crate::kernels::checkpoint::{checkpoint, LayerFn};
use crate::kernels::chunked_attention::chunked_attention_capped;
use crate::kernels::chunked_lm_loss::chunked_linear_cross_entropy_capped;
use crate::kernels::lm_head::{LinearCrossEntropy, IGNORE_TARGET};
use crate::kernels::norms::{layer_norm, rms_norm, rms_norm_offset};
use crate::kernels::quantized::{quantized_linear, QuantizedWeight};
use crate::kernels::quantized_lm_head::QuantizedLinearCrossEntropy;
use crate::kernels::rotary::apply_rotary_rows;
use crate::kernels::weight::Weight;
use crate::kernels::Fused;
use crate::kernels::{compute_dtype, embedding::embedding, fused_ok};

#[derive(Debug, Clone)]
struct Layer {
    /// The norm before attention (none on ModernBERT's first layer).
    input_norm: Option<Tensor>,
    /// LayerNorm biases (of `input_norm` and `post_norm`), where the model has them.
    input_norm_bias: Option<Tensor>,
    post_norm_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    /// Gemma's norms before and after the MLP (`sandwich_norms`).
    pre_ff_norm: Option<Tensor>,
    post_ff_norm: Option<Tensor>,
    /// In [`LlamaConfig::projections`] order: indexed with [`Q`], [`K`], … or, when `fused`
    /// (Phi-3), with [`FUSED_QKV`], [`FUSED_O`], ….
    projs: Vec<Proj>,
    /// Phi-3's, GPT-2's and ModernBERT's layout: one query/key/value projection and one
    /// gate/up (GPT-2: up) projection.
    fused: bool,
    /// The projections' module paths, in `projs` order.
    proj_names: &'static [&'static str],
    /// Whether the MLP is gated (GPT-2's is not: `act(up)`).
    gated: bool,
    /// Whether queries and keys are rotated (false on SmolLM3's NoPE layers).
    rope: bool,
    /// Gemma 3: attends within the local window, with the local rotary tables.
    sliding: bool,
}

impl Layer {
    /// The attention output projection.
    fn o_proj(&self) -> &Proj {
        &self.projs[if self.fused { FUSED_O } else { O }]
    }

    /// The feed-forward down projection.
    fn down_proj(&self) -> &Proj {
        &self.projs[if self.fused { FUSED_DOWN } else { DOWN }]
    }

    /// Queries, keys and values of token rows `x: [n, hidden]`, as `[n, heads * head_dim]`
    /// each (Phi-3: column ranges of one fused product).
    fn qkv(&self, c: &LlamaConfig, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if !self.fused {
            return Ok((
                self.projs[Q].forward_rows(x)?,
                self.projs[K].forward_rows(x)?,
                self.projs[V].forward_rows(x)?,
            ));
        }
        let qkv = self.projs[FUSED_QKV].forward_rows(x)?;
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        Ok((qkv.narrow(1, 0, q)?, qkv.narrow(1, q, kv)?, qkv.narrow(1, q + kv, kv)?))
    }

    /// The MLP's activation of token rows `h` (before the down projection).
    fn mlp_act(&self, c: &LlamaConfig, h: &Tensor) -> Result<Tensor> {
        if !self.gated {
            // GPT-2: `gelu_new(c_fc h)`.
            return gelu_tanh(&self.projs[FUSED_GATE_UP].forward_rows(h)?);
        }
        let (gate, up) = self.gate_up(h)?;
        match c.activation {
            Activation::Silu => swiglu(&gate, &up),
            Activation::GeluTanh => geglu(&gate, &up),
            Activation::GeluErf => gelu_erf(&gate)? * up,
        }
    }

    /// The gate and up projections of token rows `h` (Phi-3: the two halves of one product,
    /// gate first).
    fn gate_up(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.fused {
            return Ok((self.projs[GATE].forward_rows(h)?, self.projs[UP].forward_rows(h)?));
        }
        let both = self.projs[FUSED_GATE_UP].forward_rows(h)?;
        let i = both.dim(1)? / 2;
        Ok((both.narrow(1, 0, i)?, both.narrow(1, i, i)?))
    }

    /// Every weight slot by name under the layer's prefix (see [`names`]), projections'
    /// weights and biases in `projs` order.
    fn weights_mut(&mut self, n: &names::Names) -> Vec<(String, &mut Tensor)> {
        let proj_names = self.proj_names;
        let mut out: Vec<(String, &mut Tensor)> = vec![(n.post_norm.into(), &mut self.post_norm)];
        if let Some(w) = &mut self.input_norm {
            out.insert(0, (n.input_norm.into(), w));
        }
        if let Some(b) = &mut self.input_norm_bias {
            out.push((bias_of(n.input_norm), b));
        }
        if let Some(b) = &mut self.post_norm_bias {
            out.push((bias_of(n.post_norm), b));
        }
        if let Some(q) = &mut self.q_norm {
            out.push((names::Q_NORM.into(), q));
        }
        if let Some(k) = &mut self.k_norm {
            out.push((names::K_NORM.into(), k));
        }
        if let Some(n) = &mut self.pre_ff_norm {
            out.push((names::PRE_FF_NORM.into(), n));
        }
        if let Some(n) = &mut self.post_ff_norm {
            out.push((names::POST_FF_NORM.into(), n));
        }
        for (name, proj) in proj_names.iter().zip(self.projs.iter_mut()) {
            // A quantized weight is frozen: no slot to replace it.
            if let Weight::Dense(w) = &mut proj.weight {
                out.push((format!("{name}.weight"), w));
            }
            if let Some(b) = &mut proj.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        out
    }

    /// Every tensor the layer computes with (weights, biases, norms, adapters).
    fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.post_norm.clone()];
        out.extend(self.input_norm.iter().cloned());
        out.extend(self.input_norm_bias.iter().chain(&self.post_norm_bias).cloned());
        out.extend(self.q_norm.iter().chain(&self.k_norm).chain(&self.pre_ff_norm).chain(&self.post_ff_norm).cloned());
        out.extend(self.projs.iter().flat_map(Proj::tensors));
        out
    }

    /// The dropout switch of its LoRA adapters, if any has dropout.
    fn dropout_seed(&self) -> Option<DropoutSeed> {
        self.projs.iter().find_map(|p| Some(p.lora.as_ref()?.dropout.as_ref()?.seed.clone()))
    }
}

/// Per-layer key/value cache for generation.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<KvSlot>,
    /// Tokens already in the cache.
    pub len: usize,
}

/// A Llama / Mistral / Qwen2 / Qwen3 / SmolLM3 / Gemma 2 and 3 / Phi-3 causal LM.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// The configuration.
    pub config: LlamaConfig,
    embed: Weight,
    /// GPT-2's learned position embedding.
    positions: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The final LayerNorm's bias, where the model has one.
    norm_bias: Option<Tensor>,
    /// ModernBERT's norm of the embeddings (weight, and bias where the model has one).
    embed_norm: Option<(Tensor, Option<Tensor>)>,
    lm_head: Option<Weight>,
    /// False for a backbone built without its LM head (sequence classification).
    has_lm_head: bool,
    inv_freq: Tensor,
    /// LongRoPE's frequencies for a forward pass reaching past the pretraining context
    /// (that length alongside).
    long_inv_freq: Option<(Tensor, usize)>,
    /// Gemma 3's sliding layers' rotary frequencies.
    local_inv_freq: Option<Tensor>,
    dtype: DType,
    device: Device,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl LlamaModel {
    /// Builds the model over trainable variables taken from `vars` by Hugging Face name
    /// (see [`LlamaConfig::weight_shapes`]).
    pub fn from_vars(config: LlamaConfig, vars: &[(String, Var)]) -> crate::Result<Self> {
        let map: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        Self::new(config, &map)
    }

    /// Builds the model over weights by Hugging Face name: trainable when they are the tensors
    /// of [`Var`]s, frozen when they are plain tensors. The error names a missing tensor.
    pub fn new(config: LlamaConfig, weights: &HashMap<String, Tensor>) -> crate::Result<Self> {
        Self::build(config, weights, &HashMap::new(), true)
    }

    /// Like [`LlamaModel::new`], with the projection weights found in `quantized` kept frozen
    /// in their block format (QLoRA's base); every other weight comes from `weights`.
    pub fn with_quantized(
        config: LlamaConfig,
        weights: &HashMap<String, Tensor>,
        quantized: &HashMap<String, QuantizedWeight>,
    ) -> crate::Result<Self> {
        Self::build(config, weights, quantized, true)
    }

    /// Like [`LlamaModel::new`] without the LM head (`lm_head.weight` is neither needed nor
    /// used): the backbone of a sequence classifier, which only calls
    /// [`LlamaModel::hidden_states`].
    pub fn new_backbone(config: LlamaConfig, weights: &HashMap<String, Tensor>) -> crate::Result<Self> {
        Self::build(config, weights, &HashMap::new(), false)
    }

    fn build(
        config: LlamaConfig,
        weights: &HashMap<String, Tensor>,
        quantized: &HashMap<String, QuantizedWeight>,
        has_lm_head: bool,
    ) -> crate::Result<Self> {
        let get =
            |n: &str| weights.get(n).cloned().ok_or_else(|| crate::TrainError::MissingTensor { tensor: n.into() });
        let opt = |n: &str| weights.get(n).cloned();
        // The base's weights kept in GGUF blocks (QLoRA), else the tensors.
        let weight = |n: &str| -> crate::Result<Weight> {
            match quantized.get(n) {
                Some(q) => Ok(Weight::Quantized(q.clone())),
                None => Ok(Weight::Dense(get(n)?)),
            }
        };
        let n = config.names;
        let embed = weight(n.embed)?;
        let positions = n.positions.map(get).transpose()?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = n.layer(l);
            let norm_bias = |w: &str| {
                if config.norm_bias {
                    Some(get(&format!("{p}.{}", bias_of(w)))).transpose()
                } else {
                    Ok(None)
                }
            };
            let projs = config.projections().iter().map(|n| {
                Ok(Proj {
                    weight: weight(&format!("{p}.{n}.weight"))?,
                    bias: opt(&format!("{p}.{n}.bias")),
                    lora: None,
                })
            });
            layers.push(Layer {
                input_norm: if l > 0 || config.first_input_norm {
                    Some(get(&format!("{p}.{}", n.input_norm))?)
                } else {
                    None
                },
                input_norm_bias: if l > 0 || config.first_input_norm { norm_bias(n.input_norm)? } else { None },
                post_norm_bias: norm_bias(n.post_norm)?,
                q_norm: opt(&format!("{p}.{}", names::Q_NORM)),
                k_norm: opt(&format!("{p}.{}", names::K_NORM)),
                post_norm: get(&format!("{p}.{}", n.post_norm))?,
                pre_ff_norm: if config.sandwich_norms {
                    Some(get(&format!("{p}.{}", names::PRE_FF_NORM))?)
                } else {
                    None
                },
                post_ff_norm: if config.sandwich_norms {
                    Some(get(&format!("{p}.{}", names::POST_FF_NORM))?)
                } else {
                    None
                },
                projs: projs.collect::<crate::Result<Vec<_>>>()?,
                fused: config.fused_projections,
                proj_names: config.projections(),
                gated: config.gated_mlp,
                rope: config.rope_layers.get(l).copied().unwrap_or(true),
                sliding: config.sliding_layers.get(l).copied().unwrap_or(false),
            });
        }
        let norm = get(n.final_norm)?;
        let norm_bias = if config.norm_bias { Some(get(&bias_of(n.final_norm))?) } else { None };
        let embed_norm = match n.embed_norm {
            Some(w) => Some((get(w)?, if config.norm_bias { Some(get(&bias_of(w))?) } else { None })),
            None => None,
        };
        let lm_head = if config.tie_word_embeddings || !has_lm_head { None } else { Some(weight(names::LM_HEAD)?) };
        let device = embed.device();
        let dtype = embed.dtype();
        let inv_freq = Tensor::new(config.inv_freq(), &device)?;
        let long_inv_freq = config
            .long_inv_freq()
            .map(|(f, n)| Ok::<_, candle_core::Error>((Tensor::new(f, &device)?, n)))
            .transpose()?;
        let local_inv_freq = config.local_inv_freq().map(|f| Tensor::new(f, &device)).transpose()?;
        Ok(Self {
            config,
            embed,
            positions,
            layers,
            norm,
            norm_bias,
            embed_norm,
            lm_head,
            has_lm_head,
            inv_freq,
            long_inv_freq,
            local_inv_freq,
            dtype,
            device,
            gradient_checkpointing: false,
        })
    }

    /// Adds LoRA adapters to the targeted projections and returns them as trainable variables
    /// with their PEFT names (A: uniform in ±1/sqrt(in) as PEFT's Kaiming init, B: zeros).
    /// LoRA dropout, if configured, is driven by `dropout_seed`.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64, dropout_seed: &DropoutSeed) -> Result<Vec<(String, Var)>> {
        let (dtype, device) = (self.dtype, self.device.clone());
        super::attach::attach_lora(self.projections_mut(), cfg, seed, dtype, &device, dropout_seed)
    }

    /// Every projection with its module path (`model.layers.{i}.self_attn.q_proj`, …), in
    /// layer order: q, k, v, o, gate, up, down (Phi-3: qkv, o, gate_up, down).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let mut out = Vec::new();
        let names = self.config.names;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = names.layer(i);
            out.extend(layer.proj_names.iter().zip(layer.projs.iter_mut()).map(|(n, proj)| (format!("{p}.{n}"), proj)));
        }
        out
    }

    /// The weights kept in a GGUF block format (QLoRA's base: projections, embedding, LM
    /// head): per format, how many and their bytes.
    pub fn quantized_weights(&self) -> Vec<(candle_core::quantized::GgmlDType, usize, usize)> {
        let mut out: Vec<(candle_core::quantized::GgmlDType, usize, usize)> = Vec::new();
        let projs = self.layers.iter().flat_map(|l| &l.projs).map(|p| &p.weight);
        for q in std::iter::once(&self.embed).chain(&self.lm_head).chain(projs).filter_map(|w| match w {
            Weight::Quantized(q) => Some(q),
            Weight::Dense(_) => None,
        }) {
            match out.iter_mut().find(|(f, _, _)| *f == q.format()) {
                Some((_, n, bytes)) => {
                    *n += 1;
                    *bytes += q.size_in_bytes();
                }
                None => out.push((q.format(), 1, q.size_in_bytes())),
            }
        }
        out
    }

    /// Every weight slot by Hugging Face name (the tied LM head is `model.embed_tokens.weight`),
    /// to replace weights in place: PEFT's `modules_to_save` of an adapter.
    pub fn weights_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        // A quantized embedding or head is frozen: no slot to replace it.
        let n = self.config.names;
        let mut out: Vec<(String, &mut Tensor)> = vec![(n.final_norm.into(), &mut self.norm)];
        if let Some(b) = &mut self.norm_bias {
            out.push((bias_of(n.final_norm), b));
        }
        if let (Some(name), Some((w, b))) = (n.embed_norm, &mut self.embed_norm) {
            out.push((name.into(), w));
            if let Some(b) = b {
                out.push((bias_of(name), b));
            }
        }
        if let (Some(name), Some(t)) = (n.positions, &mut self.positions) {
            out.insert(0, (name.into(), t));
        }
        if let Weight::Dense(e) = &mut self.embed {
            out.insert(0, (n.embed.into(), e));
        }
        if let Some(Weight::Dense(h)) = &mut self.lm_head {
            out.push((names::LM_HEAD.into(), h));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = n.layer(i);
            out.extend(l.weights_mut(&n).into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
        }
        out
    }

    /// Every weight by Hugging Face name (in [`LlamaConfig::weight_shapes`] order), with LoRA
    /// adapters merged into their projections (`W + scale * B A`, computed in f32 or f64).
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        // A copy shares the tensors; only its projections' weights are replaced.
        let mut merged = self.clone();
        merged.embed = Weight::Dense(merged.embed.dense()?);
        merged.lm_head = merged.lm_head.map(|h| h.dense().map(Weight::Dense)).transpose()?;
        for (_, proj) in merged.projections_mut() {
            proj.weight = Weight::Dense(proj.merged_weight()?);
            proj.lora = None;
        }
        let mut by_name: HashMap<String, Tensor> =
            merged.weights_mut().into_iter().map(|(n, t)| (n, t.detach())).collect();
        let shapes = if self.has_lm_head { self.config.weight_shapes() } else { self.config.backbone_weight_shapes() };
        shapes
            .into_iter()
            .map(|(n, _)| {
                by_name
                    .remove(&n)
                    .map(|t| (n.clone(), t))
                    .ok_or_else(|| candle_core::Error::msg(format!("weight {n} missing")))
            })
            .collect()
    }

    /// Activation checkpointing: while training, each decoder layer keeps only its input and
    /// is recomputed in the backward pass ([`crate::kernels::checkpoint`]), so the backward
    /// pass holds one layer's activations instead of every layer's, for one more forward pass
    /// of each layer. The gradients are the same bit for bit. It applies to forward passes run
    /// under an active [`crate::kernels::grad_sink::GradSink`], which receives the weights'
    /// gradients: the trainer's training steps; a caller running its own backward pass
    /// activates one around the forward pass and merges it after backward. Evaluation and
    /// inference run as usual.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Whether activation checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `cos`, `sin` of shape `[b * s, rotary_dim]` (one row per token) for `positions: [b, s]`,
    /// in the model dtype.
    fn rotary(&self, positions: &Tensor, inv_freq: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.flatten_all()?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let (mut cos, mut sin) = (emb.cos()?, emb.sin()?);
        let scale = self.config.rotary_scale();
        if scale != 1.0 {
            // LongRoPE, as transformers: the f32 tables times the attention factor.
            (cos, sin) = ((cos * scale)?, (sin * scale)?);
        }
        Ok((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
    }

    /// The global layers' `cos`, `sin` for a forward pass at `positions`: with LongRoPE, the long
    /// factors' once the last position reaches the pretraining context (as transformers decides
    /// per forward pass), chosen on the device without reading the positions back.
    fn global_rotary(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let short = self.rotary(positions, &self.inv_freq)?;
        let Some((long_freq, original)) = &self.long_inv_freq else {
            return Ok(short);
        };
        let long = self.rotary(positions, long_freq)?;
        let last = positions.to_dtype(DType::F32)?.flatten_all()?.max_keepdim(0)?;
        // last + 1 > original  <=>  last >= original
        let is_long = last.ge(*original as f64)?.reshape((1, 1))?.broadcast_as(short.0.shape())?;
        Ok((is_long.where_cond(&long.0, &short.0)?, is_long.where_cond(&long.1, &short.1)?))
    }

    /// Gemma's sliding layers: their rotary tables and `mask` narrowed to the local window
    /// (a query at absolute index `past + i` sees keys `j` with `past + i - j < window`, where
    /// `past` is the number of cached keys before this call's queries).
    /// `global`: the global layers' rotary tables, which Gemma 2's sliding layers share.
    fn local(&self, positions: &Tensor, mask: &Tensor, global: (&Tensor, &Tensor)) -> Result<Option<Local>> {
        let Some(window) = self.config.local_window else {
            return Ok(None);
        };
        let (cos, sin) = match &self.local_inv_freq {
            Some(inv_freq) => self.rotary(positions, inv_freq)?,
            None => (global.0.clone(), global.1.clone()),
        };
        let (s, t) = (mask.dim(2)?, mask.dim(3)?);
        let past = (t - s) as f64;
        let i = Tensor::arange(0f32, s as f32, mask.device())?.reshape((s, 1))?;
        let j = Tensor::arange(0f32, t as f32, mask.device())?.reshape((1, t))?;
        let inside = if self.config.bidirectional {
            // ModernBERT: |i - j| <= window, both ways.
            i.broadcast_sub(&j)?.abs()?.le(window as f64)?
        } else {
            // past + i - j < window  <=>  i + past - window < j
            j.broadcast_gt(&(i + (past - window as f64))?)?
        };
        let zeros = Tensor::zeros((s, t), mask.dtype(), mask.device())?;
        let blocked = Tensor::full(-1e9f32, (s, t), mask.device())?.to_dtype(mask.dtype())?;
        let window_mask = inside.where_cond(&zeros, &blocked)?.reshape((1, 1, s, t))?;
        Ok(Some(Local { cos, sin, mask: mask.broadcast_minimum(&window_mask)?.contiguous()? }))
    }

    fn run(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if !self.has_lm_head {
            candle_core::bail!("this model was built without its LM head (a classifier backbone)");
        }
        let (b, s) = input_ids.dims2()?;
        let x = self.run_hidden(input_ids, positions, mask, cache)?;
        let mut logits = match self.lm_head.as_ref().unwrap_or(&self.embed) {
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Quantized(q) => quantized_linear(&x, q)?,
        };
        if let Some(cap) = self.config.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        logits.reshape((b, s, ()))
    }

    /// Final hidden states `[b, s, hidden]` (after the last norm) for `input_ids: [b, s]` at
    /// `positions: [b, s]` under the additive `mask: [b, 1, s, s]` (see [`causal_mask`]).
    pub fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.run_hidden(input_ids, positions, mask, None)?.reshape((b, s, ()))
    }

    /// Final hidden states as token rows `[b * s, hidden]`. The whole stack works on token rows:
    /// every reshape would be a node that backprop pays for with a zero-filled buffer and an add.
    fn run_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.global_rotary(positions)?;
        let local = self.local(positions, mask, (&cos, &sin))?;
        let (b, s) = input_ids.dims2()?;
        let mut x = match &self.embed {
            Weight::Dense(e) => embedding(e, &input_ids.flatten_all()?)?,
            Weight::Quantized(q) => q.rows(&input_ids.flatten_all()?)?,
        };
        if let Some(table) = &self.positions {
            // GPT-2: learned positions (each packed example's restart at 0).
            x = (x + embedding(table, &positions.flatten_all()?)?)?;
        }
        if let Some((w, b)) = &self.embed_norm {
            x = norm(&self.config, &x, w, b.as_ref())?;
        }
        if let Some(scale) = self.config.embed_scale {
            // As transformers: the scale rounded to the model dtype, then a product.
            x = (x * scale)?;
        }
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        let rows = Rows { b, s, cos: &cos, sin: &sin, mask, local: local.as_ref() };
        for (i, layer) in self.layers.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => layer_forward(&self.config, layer, &x, rows, Some(&mut c.layers[i]))?,
                None => {
                    let run = training_layer(&self.config, i, layer, rows);
                    if self.gradient_checkpointing {
                        checkpoint(&x, &layer.tensors(), run)?
                    } else {
                        run(&x)?
                    }
                }
            };
        }
        if let Some(c) = cache {
            c.len += s;
        }
        norm(&self.config, &x, &self.norm, self.norm_bias.as_ref())
    }

    /// The summed next-token loss of a batch, as [`super::loss::causal_lm_loss_sum`] computes it from
    /// the logits. On CPU in f32/f64 the LM head and the loss run as one op
    /// ([`LinearCrossEntropy`]) that never materialises the `[b * s, vocab]`
    /// logits; with `training` it computes the gradients of the head and the loss during the
    /// forward pass (so only pass it when backward follows).
    pub fn loss_sum(&self, batch: &Batch, training: bool) -> Result<Tensor> {
        if !self.has_lm_head {
            candle_core::bail!("this model was built without its LM head (a classifier backbone)");
        }
        let x = self.run_hidden(&batch.input_ids, &batch.positions, &batch.mask, None)?;
        let (b, s) = batch.input_ids.dims2()?;
        if !fused_ok(&x) {
            // Devices and half precision: the head and loss in chunks of rows, targets built
            // on the device (a quantized head dequantized whole for it, freed after).
            let targets = super::loss::shifted_targets(batch)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed).dense()?;
            let x = x.reshape((b * s, ()))?;
            return chunked_linear_cross_entropy_capped(&x, &head, &targets, training, None, self.config.final_softcap);
        }
        // Row i predicts token i + 1 where that token is a target.
        let ids = batch.input_ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
        let mask = batch.loss_mask.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut targets = vec![IGNORE_TARGET; b * s];
        for (bi, (ids, mask)) in ids.iter().zip(&mask).enumerate() {
            for i in 0..s.saturating_sub(1) {
                if mask[i + 1] != 0.0 {
                    targets[bi * s + i] = ids[i + 1];
                }
            }
        }
        let targets = Tensor::from_vec(targets, b * s, &Device::Cpu)?;
        let cap = self.config.final_softcap;
        match self.lm_head.as_ref().unwrap_or(&self.embed) {
            Weight::Dense(head) => {
                let op = Fused(LinearCrossEntropy::new(training, head.is_variable()).with_softcap(cap));
                x.apply_op3(&head.contiguous()?, &targets, op)
            }
            // The quantized head has no soft-capping: Gemma 2's is dequantized for the loss.
            head @ Weight::Quantized(_) if cap.is_some() => {
                let op = Fused(LinearCrossEntropy::new(training, false).with_softcap(cap));
                x.apply_op3(&head.dense()?, &targets, op)
            }
            Weight::Quantized(q) => x.apply_op2(&targets, Fused(QuantizedLinearCrossEntropy::new(q.clone(), training))),
        }
    }

    /// Logits `[b, s, vocab]` for every position of a training batch.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        self.run(&batch.input_ids, &batch.positions, &batch.mask, None)
    }

    /// An error naming the limit when positions `0..end` pass a learned position table (GPT-2).
    fn check_positions(&self, end: usize) -> Result<()> {
        match &self.positions {
            Some(table) if end > table.dim(0)? => candle_core::bail!(
                "this model has learned positions for {} tokens; the sequence reaches {end}",
                table.dim(0)?
            ),
            _ => Ok(()),
        }
    }

    /// Logits for every position of `ids: [b, s]` with plain causal attention (no padding).
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        self.check_positions(s)?;
        let positions = Tensor::arange(0u32, s as u32, &self.device)?.unsqueeze(0)?.repeat((b, 1))?;
        let mask =
            causal_mask(&vec![vec![1u32; s]; b], self.config.sliding_window, compute_dtype(self.dtype), &self.device)?;
        self.run(ids, &positions, &mask, None)
    }

    /// Generation step: logits `[b, s, vocab]` for `ids` appended after what `cache` holds.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let past = cache.len;
        self.check_positions(past + s)?;
        let positions = Tensor::arange(past as u32, (past + s) as u32, &self.device)?.unsqueeze(0)?.repeat((b, 1))?;
        // New tokens see every cached token and the new ones up to themselves.
        let total = past + s;
        let mut m = vec![0f32; s * total];
        for i in 0..s {
            for j in 0..total {
                let visible = j <= past + i && self.config.sliding_window.is_none_or(|w| past + i - j < w);
                if !visible {
                    m[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(m, (1, 1, s, total), &self.device)?.to_dtype(compute_dtype(self.dtype))?;
        self.run(ids, &positions, &mask, Some(cache))
    }
}

/// The model's RMSNorm of `x` with weight `w` (Gemma's scales by `1 + w`), or its LayerNorm
/// (GPT-2, ModernBERT) with bias `b` (none: ModernBERT's `norm_bias: false`).
fn norm(c: &LlamaConfig, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if c.layer_norm {
        match b {
            Some(b) => layer_norm(x, w, b, c.rms_norm_eps),
            None => layer_norm(x, w, &w.zeros_like()?, c.rms_norm_eps),
        }
    } else if c.norm_offset {
        rms_norm_offset(x, w, c.rms_norm_eps)
    } else {
        rms_norm(x, w, c.rms_norm_eps)
    }
}

/// Self-attention of one layer over token rows `x: [b * s, hidden]`.
fn attention(c: &LlamaConfig, layer: &Layer, x: &Tensor, rows: Rows<'_>, cache: Option<&mut KvSlot>) -> Result<Tensor> {
    let Rows { b, s, cos, sin, mask, local } = rows;
    let (cos, sin, mask) = match local.filter(|_| layer.sliding) {
        Some(l) => (&l.cos, &l.sin, &l.mask),
        None => (cos, sin, mask),
    };
    let hd = c.head_dim;
    let (hq, hk) = (c.num_attention_heads, c.num_key_value_heads);
    // Token rows [b * s, heads * head_dim]: the projections' own layout.
    let (mut q, mut k, mut v) = layer.qkv(c, x)?;
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        let per_head = |t: &Tensor, w: &Tensor, heads: usize| {
            norm(c, &t.reshape((b * s, heads, hd))?, w, None)?.reshape((b * s, heads * hd))
        };
        q = per_head(&q, qn, hq)?;
        k = per_head(&k, kn, hk)?;
    }
    if layer.rope {
        q = apply_rotary_rows(&q, cos, sin, hd)?;
        k = apply_rotary_rows(&k, cos, sin, hd)?;
    }
    if let Some(slot) = cache {
        // Cached keys and values are kept as [b, past, heads * head_dim].
        let (k3, v3) = (k.reshape((b, s, ()))?, v.reshape((b, s, ()))?);
        let (k3, v3) = match slot.as_ref() {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k3], 1)?, Tensor::cat(&[pv, &v3], 1)?),
            None => (k3, v3),
        };
        *slot = Some((k3.clone(), v3.clone()));
        k = k3.flatten(0, 1)?;
        v = v3.flatten(0, 1)?;
    }
    if fused_ok(&q) && mask.dtype() == q.dtype() && mask.device().is_cpu() {
        // One op that reads grouped heads in place, keeps only the log-sum-exp for
        // backprop and writes token rows for o_proj: no reshape or transpose in the graph.
        let op = Fused(FusedAttention::new(mask.clone(), c.attn_scale, hd).with_softcap(c.attn_softcap));
        return layer.o_proj().forward_rows(&q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
    }
    let t = k.dim(0)? / b;
    let heads_first = |x: &Tensor, n: usize, len: usize| x.reshape((b, len, n, hd))?.transpose(1, 2);
    let q = heads_first(&q, hq, s)?;
    let k = heads_first(&k, hk, t)?;
    let v = heads_first(&v, hk, t)?;
    let n_rep = hq / hk;
    let k = repeat_kv(&k, n_rep)?.contiguous()?;
    let v = repeat_kv(&v, n_rep)?.contiguous()?;
    // Scaling q (s x d) rather than the scores (s x s) keeps one fewer large tensor.
    let q = (q * c.attn_scale)?.contiguous()?;
    // Query chunks: the scores are never [b, h, s, s] whole, in forward or backward.
    let out =
        chunked_attention_capped(&q, &k, &v, mask, None, c.attn_softcap)?.transpose(1, 2)?.reshape((b * s, hq * hd))?;
    layer.o_proj().forward_rows(&out)
}

/// What every layer of one forward pass shares: the batch shape, the rotary tables (one row
/// per token) and the additive mask.
#[derive(Clone, Copy)]
struct Rows<'a> {
    b: usize,
    s: usize,
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: &'a Tensor,
    /// Gemma 3's sliding layers' tables and mask.
    local: Option<&'a Local>,
}

/// The rotary tables and mask of Gemma 3's sliding layers.
#[derive(Clone)]
struct Local {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// A layer's cached keys and values during generation.
type KvSlot = Option<(Tensor, Tensor)>;

/// One decoder layer over token rows `x: [b * s, hidden]`.
fn layer_forward(
    c: &LlamaConfig,
    layer: &Layer,
    x: &Tensor,
    rows: Rows<'_>,
    cache: Option<&mut KvSlot>,
) -> Result<Tensor> {
    // Gemma's norms have no biases; GPT-2's and ModernBERT's LayerNorms may.
    let gemma_norm = |x: &Tensor, w: &Tensor| norm(c, x, w, None);
    let mlp = |h: &Tensor| layer.down_proj().forward_rows(&layer.mlp_act(c, h)?);
    let h = match &layer.input_norm {
        Some(w) => norm(c, x, w, layer.input_norm_bias.as_ref())?,
        // ModernBERT's first layer: no norm before attention.
        None => x.clone(),
    };
    let attn = attention(c, layer, &h, rows, cache)?;
    match (&layer.pre_ff_norm, &layer.post_ff_norm) {
        // Gemma: each block's output is normalized before the residual add.
        (Some(pre), Some(post)) => {
            let x = (x + gemma_norm(&attn, &layer.post_norm)?)?;
            x.clone() + gemma_norm(&mlp(&gemma_norm(&x, pre)?)?, post)?
        }
        _ => {
            let x = (x + attn)?;
            x.clone() + mlp(&norm(c, &x, &layer.post_norm, layer.post_norm_bias.as_ref())?)?
        }
    }
}

/// [`layer_forward`] of layer `index` in training, as a function of its input that owns what it
/// needs: activation checkpointing runs it twice, the second time in the backward pass, when
/// the trainer has cleared the LoRA dropout seed, so it replays the seed of now (and on a GPU
/// seeds the device's generator per layer, so both runs draw the same masks).
fn training_layer(c: &LlamaConfig, index: usize, layer: &Layer, rows: Rows<'_>) -> LayerFn {
    let dropout = layer.dropout_seed().map(|d| {
        let seed = d.get();
        (d, seed)
    });
    let (c, layer, b, s) = (c.clone(), layer.clone(), rows.b, rows.s);
    let (cos, sin, mask) = (rows.cos.clone(), rows.sin.clone(), rows.mask.clone());
    let local = rows.local.cloned();
    Arc::new(move |x: &Tensor| {
        let rows = Rows { b, s, cos: &cos, sin: &sin, mask: &mask, local: local.as_ref() };
        match &dropout {
            Some((d, seed)) => d.replay(*seed, index as u64, x.device(), || layer_forward(&c, &layer, x, rows, None)),
            None => layer_forward(&c, &layer, x, rows, None),
        }
    })
}

/// Mean loss of a batch as an f64 (for evaluation).
pub fn mean_loss(model: &LlamaModel, batch: &Batch) -> Result<(f64, usize)> {
    let sum = candle_ranger::to_host_f64(&model.loss_sum(batch, false)?)?;
    Ok((sum, batch.n_targets))
}
