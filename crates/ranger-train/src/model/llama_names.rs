//! The Hugging Face names of a Llama-family checkpoint's tensors, written once: loading,
//! the expected shapes, saving, LoRA targeting and GGUF import all take them from here. GPT-2
//! names its tensors its own way ([`Names::GPT2`]).

/// The names of the tensors every decoder has, per naming scheme (the constants below are
/// Llama's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    /// The token embedding (also the LM head when tied).
    pub embed: &'static str,
    /// The learned position embedding (GPT-2), if any.
    pub positions: Option<&'static str>,
    /// The final norm's weight (its bias, for a LayerNorm, is the same name ending in `.bias`).
    pub final_norm: &'static str,
    /// The module path of the layer list (`model.layers`).
    pub layers: &'static str,
    /// A layer's norm before attention, under its prefix.
    pub input_norm: &'static str,
    /// A layer's norm before the feed-forward block (Gemma: of the attention output).
    pub post_norm: &'static str,
    /// ModernBERT's norm of the embeddings, if any.
    pub embed_norm: Option<&'static str>,
}

impl Names {
    /// Llama's names (every family but GPT-2).
    pub const LLAMA: Names = Names {
        embed: EMBED,
        positions: None,
        final_norm: FINAL_NORM,
        layers: "model.layers",
        input_norm: INPUT_NORM,
        post_norm: POST_NORM,
        embed_norm: None,
    };

    /// GPT-2's names (`transformer.h.{i}.ln_1`, …), as transformers saves them.
    pub const GPT2: Names = Names {
        embed: "transformer.wte.weight",
        positions: Some("transformer.wpe.weight"),
        final_norm: "transformer.ln_f.weight",
        layers: "transformer.h",
        input_norm: "ln_1.weight",
        post_norm: "ln_2.weight",
        embed_norm: None,
    };

    /// ModernBERT's names (`model.layers.{i}.attn_norm`, …; the first layer has no
    /// `attn_norm`).
    pub const MODERNBERT: Names = Names {
        embed: "model.embeddings.tok_embeddings.weight",
        positions: None,
        final_norm: "model.final_norm.weight",
        layers: "model.layers",
        input_norm: "attn_norm.weight",
        post_norm: "mlp_norm.weight",
        embed_norm: Some("model.embeddings.norm.weight"),
    };

    /// `{layers}.{i}`: the module path of layer `i`.
    pub fn layer(&self, i: usize) -> String {
        format!("{}.{i}", self.layers)
    }
}

/// The bias beside a LayerNorm weight named `weight_name` (`….weight` → `….bias`).
pub fn bias_of(weight_name: &str) -> String {
    format!("{}.bias", weight_name.strip_suffix(".weight").unwrap_or(weight_name))
}

/// The token embedding (also the LM head when the embeddings are tied).
pub const EMBED: &str = "model.embed_tokens.weight";
/// The final norm.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The LM head of an untied model.
pub const LM_HEAD: &str = "lm_head.weight";

/// A decoder layer's norm before attention (names below are under [`layer_prefix`]).
pub const INPUT_NORM: &str = "input_layernorm.weight";
/// A decoder layer's norm before the feed-forward block (Gemma: of the attention output).
pub const POST_NORM: &str = "post_attention_layernorm.weight";
/// Gemma's norm before the feed-forward block.
pub const PRE_FF_NORM: &str = "pre_feedforward_layernorm.weight";
/// Gemma's norm of the feed-forward output.
pub const POST_FF_NORM: &str = "post_feedforward_layernorm.weight";
/// Qwen3's per-head RMSNorm of the queries.
pub const Q_NORM: &str = "self_attn.q_norm.weight";
/// Qwen3's per-head RMSNorm of the keys.
pub const K_NORM: &str = "self_attn.k_norm.weight";

/// Index of the query projection in [`PROJECTIONS`].
pub const Q: usize = 0;
/// Index of the key projection.
pub const K: usize = 1;
/// Index of the value projection.
pub const V: usize = 2;
/// Index of the attention output projection.
pub const O: usize = 3;
/// Index of the SwiGLU gate projection.
pub const GATE: usize = 4;
/// Index of the SwiGLU up projection.
pub const UP: usize = 5;
/// Index of the feed-forward down projection.
pub const DOWN: usize = 6;

/// The projections of a decoder layer by module path under [`layer_prefix`] (their weights are
/// `<path>.weight`, their biases `<path>.bias`), in the order of the indices above.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Index of Phi-3's fused query/key/value projection in [`FUSED_PROJECTIONS`].
pub const FUSED_QKV: usize = 0;
/// Index of the attention output projection in [`FUSED_PROJECTIONS`].
pub const FUSED_O: usize = 1;
/// Index of Phi-3's fused gate/up projection (gate rows first) in [`FUSED_PROJECTIONS`].
pub const FUSED_GATE_UP: usize = 2;
/// Index of the feed-forward down projection in [`FUSED_PROJECTIONS`].
pub const FUSED_DOWN: usize = 3;

/// Phi-3's projections, queries, keys and values in one matrix and gate and up in another
/// (PEFT targets them by these names too), in the order of the `FUSED_*` indices.
pub const FUSED_PROJECTIONS: [&str; 4] =
    ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"];

/// GPT-2's projections, in the order of the `FUSED_*` indices (`mlp.c_fc` is the feed-forward
/// up projection: GPT-2's MLP has no gate). Their weights are stored transposed (`Conv1D`).
pub const GPT2_PROJECTIONS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// ModernBERT's projections, in the order of the `FUSED_*` indices (`mlp.Wi` is the gated
/// input and gate, the activated half first).
pub const MODERNBERT_PROJECTIONS: [&str; 4] = ["attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"];

/// Every projection name of every layout: what QLoRA may keep quantized.
pub fn all_projections() -> impl Iterator<Item = &'static str> {
    PROJECTIONS
        .iter()
        .chain(FUSED_PROJECTIONS.iter().filter(|p| !PROJECTIONS.contains(p)))
        .chain(GPT2_PROJECTIONS.iter())
        .chain(MODERNBERT_PROJECTIONS.iter())
        .copied()
}

/// `model.layers.{i}`: the module path of decoder layer `i`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The short names PEFT targets the projections `paths` by (`q_proj`, …, `down_proj`), each
/// once (GPT-2's `attn.c_proj` and `mlp.c_proj` are both `c_proj`).
pub fn projection_targets(paths: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in paths {
        let short = p.rsplit('.').next().unwrap_or(p).to_string();
        if !out.contains(&short) {
            out.push(short);
        }
    }
    out
}
