//! `config.json` of the Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Gemma 2
//! and 3, Phi-3, GPT-2) and of ModernBERT, the encoder built from the same pieces.

use serde::Deserialize;
use serde_json::Value;

use super::llama_names::{
    self as names, bias_of, Names, DOWN, FUSED_DOWN, FUSED_GATE_UP, FUSED_O, FUSED_PROJECTIONS, FUSED_QKV, GATE,
    GPT2_PROJECTIONS, K, MODERNBERT_PROJECTIONS, O, PROJECTIONS, Q, UP, V,
};
use crate::error::{Result, TrainError};

/// The supported `model_type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM/SmolLM2 and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// `MistralForCausalLM` (sliding-window attention honoured).
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): biases on the q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on queries and keys per head.
    Qwen3,
    /// `SmolLM3ForCausalLM`: the Llama stack with rotary embeddings off on some layers
    /// (`no_rope_layers`).
    SmolLM3,
    /// `Gemma3ForCausalLM` (`gemma3_text`): `(1 + w)` RMSNorms before and after attention and
    /// the MLP, q/k norms, embeddings scaled by √hidden, GeGLU (tanh GELU),
    /// `query_pre_attn_scalar`, sliding-window layers with their own rotary base.
    Gemma3,
    /// `Gemma2ForCausalLM`: Gemma 3's layout without q/k norms, one rotary base, and
    /// attention-logit and final-logit soft-capping.
    Gemma2,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini): fused `qkv_proj` and `gate_up_proj`,
    /// LongRoPE, partial rotary embeddings, a sliding window where configured.
    Phi3,
    /// `GPT2LMHeadModel`: learned positions, LayerNorm with biases, fused `c_attn`, a plain
    /// (ungated) MLP with the tanh GELU, `Conv1D` weights stored transposed, tied head.
    Gpt2,
    /// `ModernBertForSequenceClassification`: a bidirectional encoder of pre-norm layers
    /// (LayerNorms without biases, the first layer without its attention norm), fused `Wqkv`,
    /// rotary embeddings with a global and a local base, alternating global and local
    /// (`|i - j| <= local_attention / 2`) attention, GeGLU with the exact GELU.
    ModernBert,
}

impl Architecture {
    /// Parses a `model_type`.
    pub fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "smollm3" => Some(Self::SmolLM3),
            "gemma3_text" => Some(Self::Gemma3),
            "gemma2" => Some(Self::Gemma2),
            "phi3" => Some(Self::Phi3),
            "gpt2" => Some(Self::Gpt2),
            "modernbert" => Some(Self::ModernBert),
            _ => None,
        }
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::SmolLM3 => "smollm3",
            Self::Gemma3 => "gemma3_text",
            Self::Gemma2 => "gemma2",
            Self::Phi3 => "phi3",
            Self::Gpt2 => "gpt2",
            Self::ModernBert => "modernbert",
        }
    }
}

/// Rotary-embedding frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
    /// Phi-3's LongRoPE: per-frequency divisors, `short_factor` while a forward pass's
    /// positions stay within the pretraining context and `long_factor` past it, and cos/sin
    /// scaled by `attention_factor`.
    LongRope {
        /// Divisors of the inverse frequencies within the pretraining context.
        short_factor: Vec<f64>,
        /// Divisors past it.
        long_factor: Vec<f64>,
        /// The pretraining context length.
        original_max_position_embeddings: usize,
        /// The factor on cos and sin (`sqrt(1 + ln(factor) / ln(original))` unless configured).
        attention_factor: f64,
    },
}

/// ModernBERT's `config.json` fields.
#[derive(Deserialize)]
struct RawModernBert {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    vocab_size: usize,
    norm_eps: Option<f64>,
    norm_bias: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_activation: Option<String>,
    max_position_embeddings: Option<usize>,
    local_attention: Option<usize>,
    layer_types: Option<Vec<String>>,
    global_attn_every_n_layers: Option<usize>,
    rope_parameters: Option<Value>,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
}

/// GPT-2's `config.json` fields.
#[derive(Deserialize)]
struct RawGpt2 {
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    n_positions: Option<usize>,
    vocab_size: usize,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    rope_scaling: Option<Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling here.
    rope_parameters: Option<Value>,
    /// SmolLM3: 1 where a layer applies rotary embeddings, 0 where it does not.
    no_rope_layers: Option<Vec<u8>>,
    /// SmolLM3: without `no_rope_layers`, every this many layers one has no rotary embeddings.
    no_rope_layer_interval: Option<usize>,
    /// Gemma: the attention scale is `query_pre_attn_scalar^-0.5`.
    query_pre_attn_scalar: Option<f64>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    /// Gemma 3: `sliding_attention` / `full_attention` per layer.
    layer_types: Option<Vec<String>>,
    /// Gemma 3 before `layer_types`: every this many layers one is global.
    sliding_window_pattern: Option<usize>,
    /// Gemma 3 before `rope_parameters`: the sliding layers' rotary base.
    rope_local_base_freq: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    /// Phi-3 (Phi-4-mini 0.75): the share of each head that is rotated.
    partial_rotary_factor: Option<f64>,
    /// Phi-3: the pretraining context of LongRoPE.
    original_max_position_embeddings: Option<usize>,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen, SmolLM3.
    Silu,
    /// The tanh approximation of GELU (GeGLU, `gelu_pytorch_tanh`): Gemma.
    GeluTanh,
    /// The exact GELU (GeGLU with `gelu`): ModernBERT.
    GeluErf,
}

/// The configuration of a Llama-family model, with the original `config.json` kept so the
/// output folder can write it back unchanged.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Which variant.
    pub arch: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// The norms' epsilon (RMSNorm; GPT-2's LayerNorm).
    pub rms_norm_eps: f64,
    /// Rotary base (unused by GPT-2, which has learned positions).
    pub rope_theta: f64,
    /// Rotary scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Maximum context length.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window (Mistral), if any.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it applies rotary embeddings (all do except SmolLM3's NoPE layers).
    pub rope_layers: Vec<bool>,
    /// Gemma: RMSNorms scale by `1 + w` (their weights are stored as offsets from 1).
    pub norm_offset: bool,
    /// Gemma 2/3: norms after attention and after the MLP as well (`post_attention_layernorm`
    /// then normalizes the attention output; `pre_feedforward_layernorm` and
    /// `post_feedforward_layernorm` wrap the MLP).
    pub sandwich_norms: bool,
    /// Gemma: the embeddings are multiplied by this (√hidden).
    pub embed_scale: Option<f64>,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// The attention scores' scale (`head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f64,
    /// Gemma 3: the window of the layers marked in [`LlamaConfig::sliding_layers`] (the mask of a
    /// batch is the full causal one; those layers narrow it).
    pub local_window: Option<usize>,
    /// Gemma 3: per layer, whether it attends within [`LlamaConfig::local_window`].
    pub sliding_layers: Vec<bool>,
    /// Gemma 3: the sliding layers' rotary base (unscaled).
    pub local_rope_theta: Option<f64>,
    /// Gemma 2: the attention scores `s` become `cap * tanh(s / cap)` before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: the logits `z` become `cap * tanh(z / cap)`.
    pub final_softcap: Option<f64>,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` ([`FUSED_PROJECTIONS`]) instead of
    /// [`PROJECTIONS`].
    pub fused_projections: bool,
    /// The leading part of each head that is rotated (`head_dim` unless Phi's
    /// `partial_rotary_factor` is below 1); even.
    pub rotary_dim: usize,
    /// The tensors' naming scheme ([`Names::LLAMA`], or [`Names::GPT2`]).
    pub names: Names,
    /// GPT-2: [`GPT2_PROJECTIONS`], stored transposed (`Conv1D`).
    pub gpt2_layout: bool,
    /// LayerNorms instead of RMSNorms (GPT-2, ModernBERT).
    pub layer_norm: bool,
    /// Whether the LayerNorms have biases (GPT-2; ModernBERT's `norm_bias`).
    pub norm_bias: bool,
    /// Whether the fused layouts' projections have biases (GPT-2; ModernBERT's
    /// `attention_bias` / `mlp_bias`).
    pub proj_bias: bool,
    /// ModernBERT: every token attends both ways (the mask is the padding mask; the local
    /// layers see `|i - j| <= local_window`), and there is no LM head.
    pub bidirectional: bool,
    /// Whether the first layer has its attention norm (ModernBERT's is the identity).
    pub first_input_norm: bool,
    /// Whether the MLP is gated (`act(gate) * up`; every family but GPT-2, whose MLP is
    /// `act(c_fc x)`).
    pub gated_mlp: bool,
    /// The `config.json` as read.
    pub raw: Value,
}

impl LlamaConfig {
    /// Parses a `config.json` value; `source` names the file in errors.
    pub fn from_json(raw: Value, source: &str) -> Result<Self> {
        let bad = |m: String| TrainError::Config { origin: source.to_string(), message: m };
        match raw.get("model_type").and_then(Value::as_str) {
            Some("gpt2") => return Self::from_gpt2_json(raw, source),
            Some("modernbert") => return Self::from_modernbert_json(raw, source),
            _ => {}
        }
        let r: Raw = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        let mt = r.model_type.clone().unwrap_or_default();
        let arch = Architecture::from_model_type(&mt).ok_or_else(|| TrainError::UnsupportedArchitecture {
            origin: source.to_string(),
            model_type: mt.clone(),
        })?;
        for (name, v) in [
            ("hidden_size", r.hidden_size),
            ("intermediate_size", r.intermediate_size),
            ("num_hidden_layers", r.num_hidden_layers),
            ("vocab_size", r.vocab_size),
            ("head_dim", r.head_dim.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be > 0")));
            }
        }
        if r.head_dim.is_some_and(|d| d % 2 != 0) {
            return Err(bad("head_dim must be even (rotary embeddings rotate pairs)".into()));
        }
        if r.num_attention_heads == 0 || !r.hidden_size.is_multiple_of(r.num_attention_heads) && r.head_dim.is_none() {
            return Err(bad("hidden_size must be a multiple of num_attention_heads".into()));
        }
        let kv = r.num_key_value_heads.unwrap_or(r.num_attention_heads);
        if kv == 0 || !r.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                r.num_attention_heads
            )));
        }
        let head_dim = r.head_dim.unwrap_or(r.hidden_size / r.num_attention_heads);
        // transformers >= 5 keeps `rope_theta` and the scaling in `rope_parameters`
        // (`rope_type: default` when unscaled); older configs have them at the top level.
        // Gemma 3 (transformers >= 5): one set per layer type; the global one is `full_attention`.
        let per_type = r.rope_parameters.as_ref().filter(|v| v.get("full_attention").is_some());
        let local_params = per_type.and_then(|v| v.get("sliding_attention"));
        let params = match per_type {
            Some(v) if arch == Architecture::Gemma3 => v.get("full_attention"),
            _ => r.rope_parameters.as_ref(),
        }
        .filter(|v| v.is_object());
        let rope_theta = match (r.rope_theta, params) {
            (Some(t), _) => t,
            (None, Some(p)) => p["rope_theta"]
                .as_f64()
                .ok_or_else(|| bad(format!("rope_parameters without rope_theta are not supported: {p}")))?,
            (None, None) => 10_000.0,
        };
        let scaling = match &r.rope_scaling {
            None | Some(Value::Null) => params.filter(|p| p["rope_type"].as_str().is_some_and(|t| t != "default")),
            Some(v) => Some(v),
        };
        let partial = r
            .partial_rotary_factor
            .or_else(|| params.and_then(|p| p["partial_rotary_factor"].as_f64()))
            .filter(|_| arch == Architecture::Phi3)
            .unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(bad(format!("partial_rotary_factor {partial} is not in (0, 1]")));
        }
        // As transformers: `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(bad(format!("the rotated part of a head ({rotary_dim} of {head_dim}) must be even and > 0")));
        }
        let rope_scaling = match scaling {
            None => None,
            Some(v) if v["rope_type"] == "default" || v["type"] == "default" => None,
            Some(v) => {
                let context = LongRopeContext {
                    original: r.original_max_position_embeddings,
                    max: r.max_position_embeddings,
                    pairs: rotary_dim / 2,
                };
                Some(parse_rope_scaling(v, arch, &context).map_err(bad)?)
            }
        };
        let sliding_window = match arch {
            Architecture::Mistral | Architecture::Phi3 => r.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::SmolLM3 if r.use_sliding_window == Some(true) => {
                return Err(bad(format!(
                    "use_sliding_window=true is not supported for {mt} models (per-layer sliding windows)"
                )))
            }
            _ => None,
        };
        let rope_layers = match (arch, &r.no_rope_layers) {
            (Architecture::SmolLM3, Some(flags)) => {
                if flags.len() != r.num_hidden_layers {
                    return Err(bad(format!(
                        "no_rope_layers has {} entries for {} layers",
                        flags.len(),
                        r.num_hidden_layers
                    )));
                }
                flags.iter().map(|&f| f != 0).collect()
            }
            // transformers' default: a NoPE layer every `no_rope_layer_interval` (4) layers.
            (Architecture::SmolLM3, None) => {
                let every = r.no_rope_layer_interval.unwrap_or(4).max(1);
                (0..r.num_hidden_layers).map(|l| (l + 1) % every != 0).collect()
            }
            _ => vec![true; r.num_hidden_layers],
        };
        let attention_bias = r.attention_bias.unwrap_or(false);
        let gemma = matches!(arch, Architecture::Gemma3 | Architecture::Gemma2);
        if arch != Architecture::Gemma2 {
            for (name, v) in [
                ("final_logit_softcapping", r.final_logit_softcapping),
                ("attn_logit_softcapping", r.attn_logit_softcapping),
            ] {
                if v.is_some() {
                    return Err(bad(format!("{name} is supported for gemma2 only")));
                }
            }
        }
        let act = r.hidden_activation.as_deref().or(r.hidden_act.as_deref()).unwrap_or(if gemma {
            "gelu_pytorch_tanh"
        } else {
            "silu"
        });
        let activation = match act {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            other => {
                return Err(bad(format!("hidden activation {other:?} is not supported (silu, gelu_pytorch_tanh)")))
            }
        };
        let (local_window, sliding_layers, local_rope_theta) = if gemma {
            let types: Vec<bool> = match (&r.layer_types, r.sliding_window_pattern) {
                (Some(t), _) if t.len() == r.num_hidden_layers => t.iter().map(|t| t == "sliding_attention").collect(),
                (Some(t), _) => {
                    return Err(bad(format!("layer_types has {} entries for {} layers", t.len(), r.num_hidden_layers)))
                }
                // Gemma 2 alternates from a sliding first layer; Gemma 3 has one global in six.
                (None, pattern) => {
                    let every = pattern.unwrap_or(if arch == Architecture::Gemma2 { 2 } else { 6 }).max(1);
                    (0..r.num_hidden_layers).map(|l| (l + 1) % every != 0).collect()
                }
            };
            let local_theta = match (local_params, r.rope_local_base_freq) {
                (Some(p), _) => {
                    if p["rope_type"].as_str().is_some_and(|t| t != "default") {
                        return Err(bad(format!("sliding-layer rope scaling is not supported: {p}")));
                    }
                    p["rope_theta"].as_f64().unwrap_or(10_000.0)
                }
                (None, Some(t)) => t,
                (None, None) => 10_000.0,
            };
            let window = r.sliding_window.ok_or_else(|| bad("sliding_window missing".into()))?;
            // Gemma 2's sliding layers share the global rotary base.
            (Some(window), types, (arch == Architecture::Gemma3).then_some(local_theta))
        } else {
            (None, vec![false; r.num_hidden_layers], None)
        };
        Ok(Self {
            arch,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: r.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: r.rms_norm_eps,
            rope_theta,
            rope_scaling,
            vocab_size: r.vocab_size,
            max_position_embeddings: r.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Architecture::Qwen2 || attention_bias,
            o_bias: attention_bias && arch != Architecture::Qwen2,
            qk_norm: matches!(arch, Architecture::Qwen3 | Architecture::Gemma3),
            sliding_window,
            rope_layers,
            norm_offset: gemma,
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (r.hidden_size as f64).sqrt()),
            activation,
            attn_scale: r.query_pre_attn_scalar.filter(|_| gemma).unwrap_or(head_dim as f64).powf(-0.5),
            local_window,
            sliding_layers,
            local_rope_theta,
            attn_softcap: r.attn_logit_softcapping.filter(|_| arch == Architecture::Gemma2),
            final_softcap: r.final_logit_softcapping.filter(|_| arch == Architecture::Gemma2),
            fused_projections: arch == Architecture::Phi3,
            rotary_dim,
            names: Names::LLAMA,
            gpt2_layout: false,
            layer_norm: false,
            norm_bias: false,
            proj_bias: false,
            bidirectional: false,
            first_input_norm: true,
            gated_mlp: true,
            raw,
        })
    }

    /// GPT-2's `config.json` (`n_embd`, `n_layer`, …).
    fn from_gpt2_json(raw: Value, source: &str) -> Result<Self> {
        let bad = |m: String| TrainError::Config { origin: source.to_string(), message: m };
        let r: RawGpt2 = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        for (name, v) in
            [("n_embd", r.n_embd), ("n_layer", r.n_layer), ("n_head", r.n_head), ("vocab_size", r.vocab_size)]
        {
            if v == 0 {
                return Err(bad(format!("{name} must be > 0")));
            }
        }
        if !r.n_embd.is_multiple_of(r.n_head) || !(r.n_embd / r.n_head).is_multiple_of(2) {
            return Err(bad(format!("n_embd {} must be an even multiple of n_head {}", r.n_embd, r.n_head)));
        }
        for (name, on) in [
            ("scale_attn_by_inverse_layer_idx", r.scale_attn_by_inverse_layer_idx),
            ("add_cross_attention", r.add_cross_attention),
        ] {
            if on == Some(true) {
                return Err(bad(format!("{name}: true is not supported")));
            }
        }
        match r.activation_function.as_deref().unwrap_or("gelu_new") {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => {}
            other => return Err(bad(format!("activation_function {other:?} is not supported (gelu_new)"))),
        }
        let head_dim = r.n_embd / r.n_head;
        let scale = if r.scale_attn_weights.unwrap_or(true) { (head_dim as f64).powf(-0.5) } else { 1.0 };
        Ok(Self {
            arch: Architecture::Gpt2,
            hidden_size: r.n_embd,
            intermediate_size: r.n_inner.unwrap_or(4 * r.n_embd),
            num_hidden_layers: r.n_layer,
            num_attention_heads: r.n_head,
            num_key_value_heads: r.n_head,
            head_dim,
            rms_norm_eps: r.layer_norm_epsilon.unwrap_or(1e-5),
            rope_theta: 10_000.0,
            rope_scaling: None,
            vocab_size: r.vocab_size,
            max_position_embeddings: r.n_positions.unwrap_or(1024),
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(true),
            qkv_bias: true,
            o_bias: true,
            qk_norm: false,
            sliding_window: None,
            rope_layers: vec![false; r.n_layer],
            norm_offset: false,
            sandwich_norms: false,
            embed_scale: None,
            activation: Activation::GeluTanh,
            attn_scale: scale,
            local_window: None,
            sliding_layers: vec![false; r.n_layer],
            local_rope_theta: None,
            attn_softcap: None,
            final_softcap: None,
            fused_projections: true,
            rotary_dim: head_dim,
            names: Names::GPT2,
            gpt2_layout: true,
            layer_norm: true,
            norm_bias: true,
            proj_bias: true,
            bidirectional: false,
            first_input_norm: true,
            gated_mlp: false,
            raw,
        })
    }

    /// ModernBERT's `config.json` (transformers 5's `layer_types` / `rope_parameters`, or the
    /// older `global_attn_every_n_layers` / `global_rope_theta` / `local_rope_theta`).
    fn from_modernbert_json(raw: Value, source: &str) -> Result<Self> {
        let bad = |m: String| TrainError::Config { origin: source.to_string(), message: m };
        let r: RawModernBert = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        if r.hidden_size == 0 || r.num_attention_heads == 0 || !r.hidden_size.is_multiple_of(r.num_attention_heads) {
            return Err(bad("hidden_size must be a multiple of num_attention_heads".into()));
        }
        let head_dim = r.hidden_size / r.num_attention_heads;
        if !head_dim.is_multiple_of(2) || r.num_hidden_layers == 0 || r.vocab_size == 0 {
            return Err(bad("head_dim must be even; num_hidden_layers and vocab_size > 0".into()));
        }
        let sliding: Vec<bool> = match &r.layer_types {
            Some(t) if t.len() == r.num_hidden_layers => t.iter().map(|t| t == "sliding_attention").collect(),
            Some(t) => {
                return Err(bad(format!("layer_types has {} entries for {} layers", t.len(), r.num_hidden_layers)))
            }
            None => {
                let every = r.global_attn_every_n_layers.unwrap_or(3).max(1);
                (0..r.num_hidden_layers).map(|l| l % every != 0).collect()
            }
        };
        let theta = |kind: &str, old: Option<f64>, default: f64| -> std::result::Result<f64, String> {
            match r.rope_parameters.as_ref().and_then(|p| p.get(kind)) {
                Some(p) => {
                    if p["rope_type"].as_str().is_some_and(|t| t != "default") {
                        return Err(format!("rope scaling is not supported for ModernBERT: {p}"));
                    }
                    Ok(p["rope_theta"].as_f64().or(old).unwrap_or(default))
                }
                None => Ok(old.unwrap_or(default)),
            }
        };
        let global_theta = theta("full_attention", r.global_rope_theta, 160_000.0).map_err(bad)?;
        let local_theta = theta("sliding_attention", r.local_rope_theta, 10_000.0).map_err(bad)?;
        let activation = match r.hidden_activation.as_deref().unwrap_or("gelu") {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => return Err(bad(format!("hidden_activation {other:?} is not supported (gelu)"))),
        };
        if r.attention_bias.unwrap_or(false) != r.mlp_bias.unwrap_or(false) {
            return Err(bad("attention_bias and mlp_bias must agree".into()));
        }
        Ok(Self {
            arch: Architecture::ModernBert,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: r.num_attention_heads,
            num_key_value_heads: r.num_attention_heads,
            head_dim,
            rms_norm_eps: r.norm_eps.unwrap_or(1e-5),
            rope_theta: global_theta,
            rope_scaling: None,
            vocab_size: r.vocab_size,
            max_position_embeddings: r.max_position_embeddings.unwrap_or(8192),
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            sliding_window: None,
            rope_layers: vec![true; r.num_hidden_layers],
            norm_offset: false,
            sandwich_norms: false,
            embed_scale: None,
            activation,
            attn_scale: (head_dim as f64).powf(-0.5),
            // transformers: a token sees keys within `local_attention // 2` either side.
            local_window: Some(r.local_attention.unwrap_or(128) / 2),
            sliding_layers: sliding,
            local_rope_theta: Some(local_theta),
            attn_softcap: None,
            final_softcap: None,
            fused_projections: true,
            rotary_dim: head_dim,
            names: Names::MODERNBERT,
            gpt2_layout: false,
            layer_norm: true,
            norm_bias: r.norm_bias.unwrap_or(false),
            proj_bias: r.attention_bias.unwrap_or(false),
            bidirectional: true,
            first_input_norm: false,
            gated_mlp: true,
            raw,
        })
    }

    /// The module paths of a layer's projections under [`Names::layer`]:
    /// [`FUSED_PROJECTIONS`] (Phi-3), [`GPT2_PROJECTIONS`] or [`PROJECTIONS`].
    pub fn projections(&self) -> &'static [&'static str] {
        match (self.gpt2_layout, self.fused_projections) {
            _ if self.arch == Architecture::ModernBert => &MODERNBERT_PROJECTIONS,
            (true, _) => &GPT2_PROJECTIONS,
            (false, true) => &FUSED_PROJECTIONS,
            (false, false) => &PROJECTIONS,
        }
    }

    /// The names PEFT targets every projection by (`q_proj`, …; Phi-3: `qkv_proj`, `o_proj`,
    /// `gate_up_proj`, `down_proj`): the default LoRA targets.
    pub fn lora_targets(&self) -> Vec<String> {
        names::projection_targets(self.projections())
    }

    /// Every weight the model has, with its Hugging Face name and shape, in a stable order.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let n = self.names;
        let mut out = vec![(n.embed.to_string(), vec![self.vocab_size, h])];
        if let Some(pos) = n.positions {
            out.push((pos.to_string(), vec![self.max_position_embeddings, h]));
        }
        if let Some(norm) = n.embed_norm {
            out.push((norm.to_string(), vec![h]));
            if self.norm_bias {
                out.push((bias_of(norm), vec![h]));
            }
        }
        if self.fused_projections {
            // `[out, in]` of each projection, in `FUSED_*` order (GPT-2: stored transposed on
            // disk, see `hf_layout`); GPT-2 has biases on all of them and on its LayerNorms.
            let up = if self.gated_mlp { 2 * i } else { i };
            let shape = [[q + 2 * kv, h], [h, q], [up, h], [h, i]];
            for l in 0..self.num_hidden_layers {
                let p = n.layer(l);
                let mut push = |name: String, s: Vec<usize>, bias: bool| {
                    if bias {
                        out.push((format!("{p}.{}", bias_of(&name)), vec![s[0]]));
                    }
                    out.push((format!("{p}.{name}"), s));
                };
                if l > 0 || self.first_input_norm {
                    push(n.input_norm.to_string(), vec![h], self.norm_bias);
                }
                for j in [FUSED_QKV, FUSED_O] {
                    push(format!("{}.weight", self.projections()[j]), shape[j].to_vec(), self.proj_bias);
                }
                push(n.post_norm.to_string(), vec![h], self.norm_bias);
                for j in [FUSED_GATE_UP, FUSED_DOWN] {
                    push(format!("{}.weight", self.projections()[j]), shape[j].to_vec(), self.proj_bias);
                }
            }
            return self.with_head(out);
        }
        // `[out, in]` of each projection, in `PROJECTIONS` order.
        let proj_shape = [[q, h], [kv, h], [kv, h], [h, q], [i, h], [i, h], [h, i]];
        for l in 0..self.num_hidden_layers {
            let p = names::layer_prefix(l);
            let mut push = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
            let weight = |j: usize| (format!("{}.weight", PROJECTIONS[j]), proj_shape[j].to_vec());
            let bias = |j: usize| (format!("{}.bias", PROJECTIONS[j]), vec![proj_shape[j][0]]);
            push(names::INPUT_NORM, vec![h]);
            for j in [Q, K, V, O] {
                let (n, s) = weight(j);
                push(&n, s);
            }
            for j in [Q, K, V, O] {
                let has_bias = if j == O { self.o_bias } else { self.qkv_bias };
                if has_bias {
                    let (n, s) = bias(j);
                    push(&n, s);
                }
            }
            if self.qk_norm {
                push(names::Q_NORM, vec![hd]);
                push(names::K_NORM, vec![hd]);
            }
            push(names::POST_NORM, vec![h]);
            if self.sandwich_norms {
                push(names::PRE_FF_NORM, vec![h]);
                push(names::POST_FF_NORM, vec![h]);
            }
            for j in [GATE, UP, DOWN] {
                let (n, s) = weight(j);
                push(&n, s);
            }
        }
        self.with_head(out)
    }

    /// `layers` followed by the final norm and, untied, the LM head.
    fn with_head(&self, mut out: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>)> {
        out.push((self.names.final_norm.to_string(), vec![self.hidden_size]));
        if self.norm_bias {
            out.push((bias_of(self.names.final_norm), vec![self.hidden_size]));
        }
        if !self.tie_word_embeddings && !self.bidirectional {
            out.push((names::LM_HEAD.to_string(), vec![self.vocab_size, self.hidden_size]));
        }
        out
    }

    /// [`LlamaConfig::weight_shapes`] without `lm_head.weight`: the backbone of a sequence
    /// classifier.
    pub fn backbone_weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.weight_shapes().into_iter().filter(|(n, _)| n != names::LM_HEAD).collect()
    }

    /// The sliding layers' rotary inverse frequencies (Gemma 3), unscaled.
    pub fn local_inv_freq(&self) -> Option<Vec<f32>> {
        Some(unscaled_inv_freq(self.local_rope_theta?, self.rotary_dim).into_iter().map(|f| f as f32).collect())
    }

    /// LongRoPE's inverse frequencies past the pretraining context (`long_factor`), with that
    /// context length: a forward pass whose last position is at or past it uses these.
    pub fn long_inv_freq(&self) -> Option<(Vec<f32>, usize)> {
        let Some(RopeScaling::LongRope { long_factor, original_max_position_embeddings, .. }) = &self.rope_scaling
        else {
            return None;
        };
        Some((long_rope_inv_freq(self.rope_theta, self.rotary_dim, long_factor), *original_max_position_embeddings))
    }

    /// The factor on the rotary cos and sin tables (LongRoPE's attention factor; else 1).
    pub fn rotary_scale(&self) -> f64 {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope { attention_factor, .. }) => *attention_factor,
            _ => 1.0,
        }
    }

    /// The rotary inverse frequencies (`rotary_dim / 2` values), scaling applied (LongRoPE:
    /// the short factors).
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = unscaled_inv_freq(self.rope_theta, self.rotary_dim);
        let scaled: Vec<f64> = match &self.rope_scaling {
            None => base,
            Some(RopeScaling::LongRope { short_factor, .. }) => {
                return long_rope_inv_freq(self.rope_theta, self.rotary_dim, short_factor)
            }
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

/// The rotary inverse frequencies of base `theta` over `head_dim`, `theta^(-2i / head_dim)`.
fn unscaled_inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect()
}

/// LongRoPE's inverse frequencies as transformers computes them, in f32:
/// `1 / (factor_i * theta^(2i/d))`.
fn long_rope_inv_freq(theta: f64, rotary_dim: usize, factors: &[f64]) -> Vec<f32> {
    let d = rotary_dim as f32;
    factors.iter().enumerate().map(|(i, f)| 1.0 / (*f as f32 * (theta as f32).powf((2 * i) as f32 / d))).collect()
}

/// What LongRoPE reads outside `rope_scaling`: the top-level context lengths and how many
/// frequencies there are.
struct LongRopeContext {
    original: Option<usize>,
    max: Option<usize>,
    pairs: usize,
}

fn parse_rope_scaling(
    v: &Value,
    arch: Architecture,
    ctx: &LongRopeContext,
) -> std::result::Result<RopeScaling, String> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("");
    let num = |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| format!("rope_scaling.{k} missing"));
    // Phi-3 reads its older "su" and "yarn" names as LongRoPE.
    let kind = if arch == Architecture::Phi3 && matches!(kind, "su" | "yarn") { "longrope" } else { kind };
    match kind {
        "longrope" => {
            let factors = |k: &str| -> std::result::Result<Vec<f64>, String> {
                let list: Vec<f64> = v
                    .get(k)
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("rope_scaling.{k} missing"))?
                    .iter()
                    .map(|x| x.as_f64().ok_or_else(|| format!("rope_scaling.{k} holds a non-number")))
                    .collect::<std::result::Result<_, _>>()?;
                if list.len() != ctx.pairs {
                    return Err(format!(
                        "rope_scaling.{k} has {} entries for {} rotary frequencies",
                        list.len(),
                        ctx.pairs
                    ));
                }
                Ok(list)
            };
            // Phi-3 keeps the pretraining length at the top level, and it takes priority.
            let original = ctx
                .original
                .or_else(|| v.get("original_max_position_embeddings").and_then(Value::as_u64).map(|n| n as usize))
                .or(ctx.max)
                .ok_or("original_max_position_embeddings missing")?;
            let factor = match v.get("factor").and_then(Value::as_f64) {
                Some(f) => f,
                None => ctx.max.unwrap_or(original) as f64 / original as f64,
            };
            let attention_factor = match v.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            Ok(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!("rope_scaling type {other:?} is not supported (supported: linear, llama3, longrope)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small `config.json` (the models must not depend on the test fixtures in `testing`).
    fn small_config(model_type: &str) -> Value {
        json!({
            "model_type": model_type, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "vocab_size": 64, "max_position_embeddings": 128, "use_sliding_window": false,
        })
    }

    /// transformers >= 5 writes `rope_parameters` instead of `rope_theta` / `rope_scaling`; both
    /// layouts give the same rotary frequencies.
    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let mut old = small_config("llama");
        old["rope_theta"] = json!(500000.0);
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        old["rope_scaling"] = scaling.clone();
        let mut new = small_config("llama");
        new.as_object_mut().unwrap().remove("rope_theta");
        let mut params = scaling;
        params["rope_theta"] = json!(500000.0);
        new["rope_parameters"] = params;
        let (a, b) = (LlamaConfig::from_json(old, "old").unwrap(), LlamaConfig::from_json(new, "new").unwrap());
        assert_eq!(b.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.inv_freq(), b.inv_freq());
        // Unscaled: `rope_type: default`.
        let mut plain = small_config("qwen2");
        plain.as_object_mut().unwrap().remove("rope_theta");
        plain["rope_parameters"] = json!({"rope_theta": 1000000.0, "rope_type": "default"});
        let c = LlamaConfig::from_json(plain, "plain").unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1000000.0, None));
        // A form without rope_theta (per layer type) is refused rather than run with 10000.
        let mut per_layer = small_config("llama");
        per_layer.as_object_mut().unwrap().remove("rope_theta");
        per_layer["rope_parameters"] = json!({"full_attention": {"rope_theta": 1e6, "rope_type": "default"}});
        assert!(LlamaConfig::from_json(per_layer, "per-layer").is_err());
    }
}
