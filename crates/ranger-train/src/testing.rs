//! Tiny random models written as complete Hugging Face folders (config.json, safetensors,
//! a word-level tokenizer with a chat template), for tests, examples and quick experiments
//! that need no download; and a temporary folder that cleans up after itself.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::model::{BackboneConfig, EncoderConfig, LlamaConfig};

/// Words of the tiny test vocabulary (ids follow this order after the 3 specials).
pub const WORDS: &[&str] = &[
    "<",
    ">",
    "user",
    "assistant",
    "system",
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "a",
    "is",
    "red",
    "blue",
    "what",
    "color",
    "sky",
    "grass",
    "green",
    "?",
    ".",
    "answer",
    "question",
    "my",
    "name",
    "ranger",
    "hello",
    "world",
    "one",
    "two",
    "three",
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

/// A tiny config.json for `model_type` (llama, mistral, qwen2, qwen3, smollm3, gemma3_text, gemma2,
/// phi3, gpt2, modernbert).
pub fn tiny_config(model_type: &str) -> Value {
    if model_type == "modernbert" {
        // Global, local (2 tokens either side), global; mean pooling over the real tokens.
        return json!({
            "architectures": ["ModernBertForSequenceClassification"], "model_type": "modernbert", "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": TINY_VOCAB,
            "local_attention": 4, "global_attn_every_n_layers": 2, "norm_eps": 1e-5, "classifier_pooling": "mean",
            "pad_token_id": 2, "torch_dtype": "float32",
        });
    }
    if model_type == "gpt2" {
        // GPT-2 names its fields its own way; an MLP width that is not 4x the model's.
        return json!({
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
            "n_inner": 48, "n_positions": 128, "vocab_size": TINY_VOCAB, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new", "bos_token_id": null, "eos_token_id": 1, "tie_word_embeddings": true,
            "torch_dtype": "float32",
        });
    }
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
    if model_type == "gemma3_text" {
        // A 4-token sliding window on the first layer, global attention on the second (with
        // linear rope scaling), and an attention scale that is not head_dim's.
        c["architectures"] = json!(["Gemma3ForCausalLM"]);
        c["head_dim"] = json!(12);
        c["query_pre_attn_scalar"] = json!(20);
        c["sliding_window"] = json!(4);
        c["layer_types"] = json!(["sliding_attention", "full_attention"]);
        c["rope_parameters"] = json!({"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}});
        c["hidden_activation"] = json!("gelu_pytorch_tanh");
        c["tie_word_embeddings"] = json!(true);
        c.as_object_mut().expect("an object").remove("rope_theta");
    }
    if model_type == "gemma2" {
        // Sliding first layer (4 tokens), global second; soft-caps small enough to bend.
        c["architectures"] = json!(["Gemma2ForCausalLM"]);
        c["head_dim"] = json!(12);
        c["query_pre_attn_scalar"] = json!(20);
        c["sliding_window"] = json!(4);
        c["attn_logit_softcapping"] = json!(2.0);
        c["final_logit_softcapping"] = json!(3.0);
        c["hidden_activation"] = json!("gelu_pytorch_tanh");
        c["tie_word_embeddings"] = json!(true);
    }
    if model_type == "phi3" {
        // Fused projections; half of each 8-wide head rotated (Phi-4-mini rotates 3/4);
        // LongRoPE with a pretraining context of 4 tokens, so batches reaching position 4 take
        // the long factors; a 6-token sliding window.
        c["architectures"] = json!(["Phi3ForCausalLM"]);
        c["partial_rotary_factor"] = json!(0.5);
        c["original_max_position_embeddings"] = json!(4);
        c["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]});
        c["sliding_window"] = json!(6);
    }
    if model_type == "smollm3" {
        // The second layer without rotary embeddings (NoPE), tied embeddings as released.
        c["no_rope_layers"] = json!([1, 0]);
        c["tie_word_embeddings"] = json!(true);
    }
    c
}

/// Writes a complete tiny model folder (random weights for `seed`) and returns its configuration.
pub fn write_tiny_model(dir: &Path, config: &Value, seed: u64) -> crate::Result<LlamaConfig> {
    std::fs::create_dir_all(dir).map_err(crate::TrainError::io(dir))?;
    let cfg = LlamaConfig::from_json(config.clone(), "tiny model")?;
    let weights = crate::model::random_weights(&cfg, seed, DType::F32)?;
    let mut list: Vec<(String, Tensor)> = weights.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    let list = crate::model::hf_layout::to_disk(config, &list)?;
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

/// Vocabulary of the tiny encoder tokenizer: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, then
/// [`WORDS`].
pub const TINY_ENCODER_VOCAB: usize = 4 + WORDS.len();

/// A word-level BERT-style tokenizer.json over [`WORDS`]: `[CLS] a [SEP]` for one text,
/// `[CLS] a [SEP] b [SEP]` (token types 0 then 1) for a pair.
pub fn tiny_encoder_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().chain(WORDS).enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let special = |id: usize, t: &str| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// A tiny encoder config.json for `model_type` (bert, roberta, distilbert).
pub fn tiny_encoder_config(model_type: &str) -> Value {
    match model_type {
        "distilbert" => json!({
            "architectures": ["DistilBertModel"], "model_type": "distilbert", "vocab_size": TINY_ENCODER_VOCAB, "dim": 24,
            "n_layers": 2, "n_heads": 4, "hidden_dim": 40, "max_position_embeddings": 64, "activation": "gelu",
            "pad_token_id": 0, "sinusoidal_pos_embds": false, "initializer_range": 0.02,
        }),
        _ => json!({
            "architectures": [if model_type == "roberta" { "RobertaModel" } else { "BertModel" }], "model_type": model_type,
            "vocab_size": TINY_ENCODER_VOCAB, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 40, "hidden_act": "gelu", "max_position_embeddings": 64,
            "type_vocab_size": if model_type == "roberta" { 1 } else { 2 }, "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "position_embedding_type": "absolute", "initializer_range": 0.02,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        }),
    }
}

/// Writes a tiny encoder model folder (random weights for `seed`, with the bare-encoder tensor
/// names of a base checkpoint: `embeddings.…`, no head) and its tokenizer.
pub fn write_tiny_encoder(dir: &Path, config: &Value, seed: u64) -> crate::Result<EncoderConfig> {
    std::fs::create_dir_all(dir).map_err(crate::TrainError::io(dir))?;
    let cfg = EncoderConfig::from_json(config.clone(), "tiny encoder")?;
    let prefix = format!("{}.", cfg.family.prefix());
    let weights = crate::weights::random_tensors(cfg.weight_shapes(), seed, DType::F32)?;
    let mut list: Vec<(String, Tensor)> =
        weights.into_iter().map(|(n, t)| (n.strip_prefix(&prefix).unwrap_or(&n).to_string(), t)).collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    let list = crate::model::hf_layout::to_disk(config, &list)?;
    crate::weights::save_safetensors_dir(dir, &list, usize::MAX)?;
    crate::output::write_json(&dir.join("config.json"), config)?;
    crate::output::write_json(&dir.join("tokenizer.json"), &tiny_encoder_tokenizer_json())?;
    let tcfg = json!({ "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "model_max_length": 64 });
    crate::output::write_json(&dir.join("tokenizer_config.json"), &tcfg)?;
    Ok(cfg)
}

/// Random weights (f64 then converted to `dtype`) for a whole classifier: backbone and head.
pub fn random_classifier_weights(
    backbone: &BackboneConfig,
    num_labels: usize,
    seed: u64,
    dtype: DType,
) -> crate::Result<std::collections::HashMap<String, Tensor>> {
    let mut w = crate::weights::random_tensors(backbone.weight_shapes(num_labels), seed, DType::F64)?;
    for t in w.values_mut() {
        *t = t.to_dtype(dtype)?;
    }
    Ok(w)
}

/// A temporary folder removed when dropped (checkpoints of real models are gigabytes).
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the chat template from the `tokenizer_config.json` of the model folder `dir` (as a
/// base model without one has it) and returns it (panics if there is none: this is for tests).
pub fn take_chat_template(dir: &Path) -> Value {
    let path = dir.join("tokenizer_config.json");
    let read = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut config: Value = serde_json::from_str(&read).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let template = config.as_object_mut().and_then(|c| c.remove("chat_template")).expect("a chat template");
    std::fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    template
}

/// An empty folder `ranger-test-<name>-<pid>` in the system's temporary folder, removed when
/// dropped (panics if it cannot be made: this is for tests).
pub fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("ranger-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    TempDir(d)
}
