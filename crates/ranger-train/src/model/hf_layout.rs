//! How a decoder's tensors are stored in a Hugging Face folder when that differs from how the
//! model holds them: GPT-2's `Conv1D` projections are stored `[in, out]` (the model's
//! projections are `[out, in]`, like `nn.Linear`), and GPT-2 checkpoints saved from the bare
//! `GPT2Model` (the Hub's `gpt2` among them) name the tensors without the `transformer.` prefix.
//! Loading goes through [`from_disk`], every folder writer through [`to_disk`].

use candle_core::{Result, Tensor};
use serde_json::Value;

use super::llama_names::GPT2_PROJECTIONS;

/// Whether a `config.json` is GPT-2's.
fn is_gpt2(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("gpt2")
}

/// Whether `name` is the weight of one of GPT-2's `Conv1D` projections.
fn is_conv1d(name: &str) -> bool {
    GPT2_PROJECTIONS.iter().any(|p| name.strip_suffix(".weight").is_some_and(|m| m.ends_with(&format!(".{p}"))))
}

/// A tensor as read from a folder of the model `config` describes, as the model holds it:
/// GPT-2's `Conv1D` weights transposed, and its unprefixed names (`h.0.ln_1.weight`) given the
/// `transformer.` prefix.
pub fn from_disk(config: &Value, name: String, t: Tensor) -> Result<(String, Tensor)> {
    if !is_gpt2(config) {
        return Ok((name, t));
    }
    let bare = ["h.", "wte.", "wpe.", "ln_f."].iter().any(|p| name.starts_with(p));
    let name = if bare { format!("transformer.{name}") } else { name };
    let t = if is_conv1d(&name) && t.rank() == 2 { t.t()?.contiguous()? } else { t };
    Ok((name, t))
}

/// The tensors of a model `config` describes as a folder stores them (the inverse of
/// [`from_disk`] for names the model produces).
pub fn to_disk(config: &Value, weights: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    weights
        .iter()
        .map(|(n, t)| {
            let t = if is_gpt2(config) && is_conv1d(n) && t.rank() == 2 { t.t()?.contiguous()? } else { t.clone() };
            Ok((n.clone(), t))
        })
        .collect()
}

/// Whether `name` is a GPT-2 `Conv1D` weight of a model with this `config` (a module PEFT would
/// save in the other layout).
pub fn stored_transposed(config: &Value, name: &str) -> bool {
    is_gpt2(config) && is_conv1d(name)
}
