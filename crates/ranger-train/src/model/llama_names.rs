//! The Hugging Face names of a Llama-family checkpoint's tensors, written once: loading,
//! the expected shapes, saving, LoRA targeting and GGUF import all take them from here.

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

/// Every projection name of either layout: what QLoRA may keep quantized.
pub fn all_projections() -> impl Iterator<Item = &'static str> {
    PROJECTIONS.iter().chain(FUSED_PROJECTIONS.iter().filter(|p| !PROJECTIONS.contains(p))).copied()
}

/// `model.layers.{i}`: the module path of decoder layer `i`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The short names PEFT targets the projections `paths` by (`q_proj`, …, `down_proj`).
pub fn projection_targets(paths: &[&str]) -> Vec<String> {
    paths.iter().map(|p| p.rsplit('.').next().unwrap_or(p).to_string()).collect()
}
