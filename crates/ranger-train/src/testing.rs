//! Tiny random models written as complete Hugging Face folders (config.json, safetensors,
//! a word-level tokenizer with a chat template), for tests, examples and quick experiments
//! that need no download.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::model::LlamaConfig;

/// Words of the tiny test vocabulary (ids follow this order after the 3 specials).
pub const WORDS: &[&str] = &[
    "<", ">", "user", "assistant", "system", "the", "cat", "dog", "sat", "on", "mat", "a", "is", "red", "blue", "what", "color",
    "sky", "grass", "green", "?", ".", "answer", "question", "my", "name", "ranger", "hello", "world", "one", "two", "three",
];

/// A word-level tokenizer.json over [`WORDS`] with `<unk>`=0, `<eos>`=1, `<pad>`=2.
pub fn tiny_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<eos>", "<pad>"].iter().chain(WORDS).enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 1, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Size of the tiny vocabulary.
pub const TINY_VOCAB: usize = 3 + WORDS.len();

/// A tiny config.json for `model_type` (llama, mistral, qwen2, qwen3).
pub fn tiny_config(model_type: &str) -> Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": model_type, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": TINY_VOCAB, "max_position_embeddings": 128, "tie_word_embeddings": false,
        "hidden_act": "silu", "bos_token_id": null, "eos_token_id": 1, "sliding_window": 4096, "max_window_layers": 2,
        "use_sliding_window": false, "attention_bias": false, "torch_dtype": "float32",
    });
    if model_type == "qwen3" {
        c["head_dim"] = json!(12);
    }
    if model_type == "qwen2" {
        c["tie_word_embeddings"] = json!(true);
    }
    c
}

/// Writes a complete tiny model folder (random weights for `seed`) and returns its configuration.
pub fn write_tiny_model(dir: &Path, config: &Value, seed: u64) -> crate::Result<LlamaConfig> {
    std::fs::create_dir_all(dir).map_err(crate::TrainError::io(dir))?;
    let cfg = LlamaConfig::from_json(config.clone(), "tiny model")?;
    let weights = crate::weights::random_weights(&cfg, seed, DType::F32)?;
    let mut list: Vec<(String, Tensor)> = weights.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    crate::weights::save_safetensors_dir(dir, &list, usize::MAX)?;
    crate::output::write_json(&dir.join("config.json"), config)?;
    crate::output::write_json(&dir.join("tokenizer.json"), &tiny_tokenizer_json())?;
    let tcfg = json!({
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}< {{ m.role }} > {{ m.content }} <eos> {% endfor %}{% if add_generation_prompt %}< assistant > {% endif %}"
    });
    crate::output::write_json(&dir.join("tokenizer_config.json"), &tcfg)?;
    Ok(cfg)
}

