//! A trainable Llama-family decoder written with differentiable tensor ops only.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};

use super::config::LlamaConfig;
pub use super::lora::{peft_name, DropoutSeed, LoraAdapter, LoraConfig};
use crate::kernels::activations::swiglu;
use crate::kernels::attention::{repeat_kv, FusedAttention};
use crate::kernels::lm_head::{LinearCrossEntropy, IGNORE_TARGET};
use crate::kernels::norms::rms_norm;
use crate::kernels::rotary::apply_rotary_rows;
use crate::kernels::softmax::masked_softmax;
use crate::kernels::{compute_dtype, embedding::embedding, fused_ok, linear::linear};

/// A linear projection `x W^T + b` (weights trainable [`Var`]s or frozen tensors), with an
/// optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Proj {
    /// `[out, in]` weight.
    pub weight: Tensor,
    /// Optional `[out]` bias.
    pub bias: Option<Tensor>,
    /// Optional low-rank adapter.
    pub lora: Option<LoraAdapter>,
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One [tokens, in] x [in, out] product: a batched `broadcast_matmul` would compute the
        // weight gradient as one product per batch row plus a reduction over a [b, in, out]
        // temporary.
        if x.rank() == 2 {
            return self.forward_rows(x);
        }
        let dims = x.dims();
        let inp = *dims.last().unwrap_or(&1);
        let y = self.forward_rows(&x.reshape(((), inp))?)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = y.dim(1)?;
        y.reshape(out_dims)
    }
}

impl Proj {
    /// The projection of token rows `x: [n, in]` to `[n, out]`.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = linear(x, &self.weight)?;
        if let Some(l) = &self.lora {
            y = l.apply(x, &self.weight, y)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// The weight with the LoRA/DoRA adapter merged in (see [`LoraAdapter::merge`]).
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.clone()),
            Some(l) => l.merge(&self.weight),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
}

/// One batch of token sequences, with what the model and the loss need to know about them.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, s]` u32 token ids.
    pub input_ids: Tensor,
    /// `[b, s]` u32 position of each token within its own example (restarts when packed).
    pub positions: Tensor,
    /// `[b, 1, s, s]` additive attention mask (0 or a large negative value), in the compute dtype.
    pub mask: Tensor,
    /// `[b, s]` f32: 1 where the token is a prediction target, 0 elsewhere (prompt, padding).
    pub loss_mask: Tensor,
    /// Number of target tokens (the sum of `loss_mask` after the shift).
    pub n_targets: usize,
    /// Number of non-padding tokens.
    pub n_tokens: usize,
}

/// Per-layer key/value cache for generation.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens already in the cache.
    pub len: usize,
}

/// A Llama / Mistral / Qwen2 / Qwen3 causal LM.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// The configuration.
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// False for a backbone built without its LM head (sequence classification).
    has_lm_head: bool,
    inv_freq: Tensor,
    dtype: DType,
    device: Device,
}

impl LlamaModel {
    /// Builds the model over trainable variables taken from `vars` by Hugging Face name
    /// (see [`LlamaConfig::weight_shapes`]).
    pub fn from_vars(config: LlamaConfig, vars: &[(String, Var)]) -> std::result::Result<Self, String> {
        let map: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        Self::new(config, &map)
    }

    /// Builds the model over weights by Hugging Face name: trainable when they are the tensors
    /// of [`Var`]s, frozen when they are plain tensors. The error names a missing tensor.
    pub fn new(config: LlamaConfig, weights: &HashMap<String, Tensor>) -> std::result::Result<Self, String> {
        Self::build(config, weights, true)
    }

    /// Like [`LlamaModel::new`] without the LM head (`lm_head.weight` is neither needed nor
    /// used): the backbone of a sequence classifier, which only calls
    /// [`LlamaModel::hidden_states`].
    pub fn new_backbone(config: LlamaConfig, weights: &HashMap<String, Tensor>) -> std::result::Result<Self, String> {
        Self::build(config, weights, false)
    }

    fn build(
        config: LlamaConfig,
        weights: &HashMap<String, Tensor>,
        has_lm_head: bool,
    ) -> std::result::Result<Self, String> {
        let get =
            |n: &str| -> std::result::Result<Tensor, String> { weights.get(n).cloned().ok_or_else(|| n.to_string()) };
        let opt = |n: &str| weights.get(n).cloned();
        let proj = |n: &str| -> std::result::Result<Proj, String> {
            Ok(Proj { weight: get(&format!("{n}.weight"))?, bias: opt(&format!("{n}.bias")), lora: None })
        };
        let embed = get("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: proj(&format!("{p}.self_attn.q_proj"))?,
                k: proj(&format!("{p}.self_attn.k_proj"))?,
                v: proj(&format!("{p}.self_attn.v_proj"))?,
                o: proj(&format!("{p}.self_attn.o_proj"))?,
                q_norm: opt(&format!("{p}.self_attn.q_norm.weight")),
                k_norm: opt(&format!("{p}.self_attn.k_norm.weight")),
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: proj(&format!("{p}.mlp.gate_proj"))?,
                up: proj(&format!("{p}.mlp.up_proj"))?,
                down: proj(&format!("{p}.mlp.down_proj"))?,
            });
        }
        let norm = get("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings || !has_lm_head { None } else { Some(get("lm_head.weight")?) };
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let inv_freq = Tensor::new(config.inv_freq(), &device).map_err(|e| e.to_string())?;
        Ok(Self { config, embed, layers, norm, lm_head, has_lm_head, inv_freq, dtype, device })
    }

    /// Adds LoRA adapters to the targeted projections and returns them as trainable variables
    /// with their PEFT names (A: uniform in ±1/sqrt(in) as PEFT's Kaiming init, B: zeros).
    /// LoRA dropout, if configured, is driven by `dropout_seed`.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64, dropout_seed: &DropoutSeed) -> Result<Vec<(String, Var)>> {
        let (dtype, device) = (self.dtype, self.device.clone());
        super::lora::attach_lora(self.projections_mut(), cfg, seed, dtype, &device, dropout_seed)
    }

    /// Every projection with its module path (`model.layers.{i}.self_attn.q_proj`, …), in
    /// layer order: q, k, v, o, gate, up, down.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let projs: [(&str, &str, &mut Proj); 7] = [
                ("self_attn", "q_proj", &mut layer.q),
                ("self_attn", "k_proj", &mut layer.k),
                ("self_attn", "v_proj", &mut layer.v),
                ("self_attn", "o_proj", &mut layer.o),
                ("mlp", "gate_proj", &mut layer.gate),
                ("mlp", "up_proj", &mut layer.up),
                ("mlp", "down_proj", &mut layer.down),
            ];
            for (block, name, proj) in projs {
                out.push((format!("model.layers.{i}.{block}.{name}"), proj));
            }
        }
        out
    }

    /// Every weight slot by Hugging Face name (the tied LM head is `model.embed_tokens.weight`),
    /// to replace weights in place: PEFT's `modules_to_save` of an adapter.
    pub fn weights_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> =
            vec![("model.embed_tokens.weight".into(), &mut self.embed), ("model.norm.weight".into(), &mut self.norm)];
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &mut l.input_norm));
            out.push((format!("{p}.post_attention_layernorm.weight"), &mut l.post_norm));
            if let Some(q) = &mut l.q_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), q));
            }
            if let Some(k) = &mut l.k_norm {
                out.push((format!("{p}.self_attn.k_norm.weight"), k));
            }
            for (name, proj) in [
                ("self_attn.q_proj", &mut l.q),
                ("self_attn.k_proj", &mut l.k),
                ("self_attn.v_proj", &mut l.v),
                ("self_attn.o_proj", &mut l.o),
                ("mlp.gate_proj", &mut l.gate),
                ("mlp.up_proj", &mut l.up),
                ("mlp.down_proj", &mut l.down),
            ] {
                out.push((format!("{p}.{name}.weight"), &mut proj.weight));
                if let Some(b) = &mut proj.bias {
                    out.push((format!("{p}.{name}.bias"), b));
                }
            }
        }
        out
    }

    /// Every weight by Hugging Face name (in [`LlamaConfig::weight_shapes`] order), with LoRA
    /// adapters merged into their projections (`W + scale * B A`, computed in f32 or f64).
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        by_name.insert("model.embed_tokens.weight".into(), self.embed.clone());
        by_name.insert("model.norm.weight".into(), self.norm.clone());
        if let Some(h) = &self.lm_head {
            by_name.insert("lm_head.weight".into(), h.clone());
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            by_name.insert(format!("{p}.input_layernorm.weight"), l.input_norm.clone());
            by_name.insert(format!("{p}.post_attention_layernorm.weight"), l.post_norm.clone());
            for (name, proj) in [
                ("self_attn.q_proj", &l.q),
                ("self_attn.k_proj", &l.k),
                ("self_attn.v_proj", &l.v),
                ("self_attn.o_proj", &l.o),
                ("mlp.gate_proj", &l.gate),
                ("mlp.up_proj", &l.up),
                ("mlp.down_proj", &l.down),
            ] {
                by_name.insert(format!("{p}.{name}.weight"), proj.merged_weight()?);
                if let Some(b) = &proj.bias {
                    by_name.insert(format!("{p}.{name}.bias"), b.clone());
                }
            }
            if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
                by_name.insert(format!("{p}.self_attn.q_norm.weight"), q.clone());
                by_name.insert(format!("{p}.self_attn.k_norm.weight"), k.clone());
            }
        }
        let shapes = if self.has_lm_head { self.config.weight_shapes() } else { self.config.backbone_weight_shapes() };
        shapes
            .into_iter()
            .map(|(n, _)| {
                by_name
                    .remove(&n)
                    .map(|t| (n.clone(), t.detach()))
                    .ok_or_else(|| candle_core::Error::msg(format!("weight {n} missing")))
            })
            .collect()
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `cos`, `sin` of shape `[b * s, head_dim]` (one row per token) for `positions: [b, s]`,
    /// in the model dtype.
    fn rotary(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.flatten_all()?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok((emb.cos()?.to_dtype(self.dtype)?, emb.sin()?.to_dtype(self.dtype)?))
    }

    /// Self-attention of one layer over token rows `x: [b * s, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        (b, s): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let hd = c.head_dim;
        let (hq, hk) = (c.num_attention_heads, c.num_key_value_heads);
        // Token rows [b * s, heads * head_dim]: the projections' own layout.
        let mut q = layer.q.forward_rows(x)?;
        let mut k = layer.k.forward_rows(x)?;
        let mut v = layer.v.forward_rows(x)?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let per_head = |t: &Tensor, w: &Tensor, heads: usize| {
                rms_norm(&t.reshape((b * s, heads, hd))?, w, c.rms_norm_eps)?.reshape((b * s, heads * hd))
            };
            q = per_head(&q, qn, hq)?;
            k = per_head(&k, kn, hk)?;
        }
        q = apply_rotary_rows(&q, cos, sin)?;
        k = apply_rotary_rows(&k, cos, sin)?;
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
            let op = FusedAttention::new(mask.clone(), 1.0 / (hd as f64).sqrt(), hd);
            return layer.o.forward_rows(&q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
        }
        let t = k.dim(0)? / b;
        let heads_first = |x: &Tensor, n: usize, len: usize| x.reshape((b, len, n, hd))?.transpose(1, 2);
        let q = heads_first(&q, hq, s)?;
        let k = heads_first(&k, hk, t)?;
        let v = heads_first(&v, hk, t)?;
        let n_rep = hq / hk;
        let k = repeat_kv(&k, n_rep)?.contiguous()?;
        let v = repeat_kv(&v, n_rep)?.contiguous()?;
        let cdt = compute_dtype(self.dtype);
        // Scaling q (s x d) rather than the scores (s x s) keeps one fewer large tensor.
        let q = (q * (1.0 / (hd as f64).sqrt()))?.contiguous()?;
        let scores = q.matmul(&k.t()?)?.to_dtype(cdt)?;
        let probs = masked_softmax(&scores, mask)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * s, hq * hd))?;
        layer.o.forward_rows(&out)
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
        x.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed).t()?)?.reshape((b, s, ()))
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
        let (cos, sin) = self.rotary(positions)?;
        let (b, s) = input_ids.dims2()?;
        let mut x = embedding(&self.embed, &input_ids.flatten_all()?)?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = rms_norm(&x, &layer.input_norm, self.config.rms_norm_eps)?;
            x = (x + self.attention(layer, &h, (b, s), &cos, &sin, mask, slot)?)?;
            let h = rms_norm(&x, &layer.post_norm, self.config.rms_norm_eps)?;
            let mlp = layer.down.forward_rows(&swiglu(&layer.gate.forward_rows(&h)?, &layer.up.forward_rows(&h)?)?)?;
            x = (x + mlp)?;
        }
        if let Some(c) = cache {
            c.len += s;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// The summed next-token loss of a batch, as [`super::causal_lm_loss_sum`] computes it from
    /// the logits. On CPU in f32/f64 the LM head and the loss run as one op
    /// ([`LinearCrossEntropy`]) that never materialises the `[b * s, vocab]`
    /// logits; with `training` it computes the gradients of the head and the loss during the
    /// forward pass (so only pass it when backward follows).
    pub fn loss_sum(&self, batch: &Batch, training: bool) -> Result<Tensor> {
        if !self.has_lm_head {
            candle_core::bail!("this model was built without its LM head (a classifier backbone)");
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let x = self.run_hidden(&batch.input_ids, &batch.positions, &batch.mask, None)?;
        let (b, s) = batch.input_ids.dims2()?;
        if !fused_ok(&x) {
            return super::causal_lm_loss_sum(&x.matmul(&head.t()?)?.reshape((b, s, ()))?, batch);
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
        let op = LinearCrossEntropy::new(training, head.is_variable());
        x.apply_op3(&head.contiguous()?, &targets, op)
    }

    /// Logits `[b, s, vocab]` for every position of a training batch.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        self.run(&batch.input_ids, &batch.positions, &batch.mask, None)
    }

    /// Logits for every position of `ids: [b, s]` with plain causal attention (no padding).
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let positions = Tensor::arange(0u32, s as u32, &self.device)?.unsqueeze(0)?.repeat((b, 1))?;
        let mask =
            causal_mask(&vec![vec![1u32; s]; b], self.config.sliding_window, compute_dtype(self.dtype), &self.device)?;
        self.run(ids, &positions, &mask, None)
    }

    /// Generation step: logits `[b, s, vocab]` for `ids` appended after what `cache` holds.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let past = cache.len;
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

/// Additive attention mask `[b, 1, s, s]`: token `i` sees token `j` when `j <= i`, both belong
/// to the same segment (packed examples never attend to each other; padding is its own segment)
/// and, with a sliding window, `i - j < window`.
pub fn causal_mask(segments: &[Vec<u32>], window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = segments.len();
    let s = segments.first().map_or(0, Vec::len);
    let mut m = vec![0f32; b * s * s];
    for (bi, seg) in segments.iter().enumerate() {
        for i in 0..s {
            for j in 0..s {
                let visible = j <= i && seg[i] == seg[j] && window.is_none_or(|w| i - j < w);
                if !visible {
                    // Large and finite, so that no row can turn into NaN in any dtype.
                    m[(bi * s + i) * s + j] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, s), device)?.to_dtype(dtype)
}
