//! Writing a model as a Hugging Face folder: config.json, safetensors weights (sharded above a
//! size), tokenizer files, generation_config.json. Every file is written atomically.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::error::{Result, TrainError};
use crate::tokenizer::TextTokenizer;
use crate::weights::{save_safetensors_dir, write_atomic};

/// The `torch_dtype` string of a Candle dtype.
pub fn torch_dtype(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// `generation_config.json` for a causal LM whose source had none: its special-token ids.
pub fn default_generation_config(config: &Value) -> Value {
    let mut g = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            g.insert(key.into(), v.clone());
        }
    }
    Value::Object(g)
}

/// Writes a complete Hugging Face model folder: `config` (with `torch_dtype` set to the
/// weights' dtype), the weights, the tokenizer files, and `generation_config.json` when given.
pub fn save_hf_folder(
    dir: &Path,
    config: &Value,
    weights: &[(String, Tensor)],
    tokenizer: &TextTokenizer,
    generation_config: Option<&Value>,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    let dtype = weights.first().map(|(_, t)| t.dtype()).unwrap_or(DType::F32);
    let mut cfg = config.clone();
    if let Value::Object(o) = &mut cfg {
        o.insert("torch_dtype".into(), json!(torch_dtype(dtype)));
    }
    write_json(&dir.join("config.json"), &cfg)?;
    save_safetensors_dir(dir, &crate::model::hf_layout::to_disk(config, weights)?, max_shard_bytes)?;
    save_tokenizer(dir, tokenizer)?;
    match generation_config {
        Some(gen) => write_json(&dir.join("generation_config.json"), gen),
        None => Ok(()),
    }
}

/// Writes `tokenizer.json`, `tokenizer_config.json` (chat template included) and
/// `special_tokens_map.json`.
fn save_tokenizer(dir: &Path, tokenizer: &TextTokenizer) -> Result<()> {
    let tok_json = tokenizer.inner.to_string(true).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    let mut tcfg = tokenizer.config.clone();
    if let (Value::Object(o), Some(t)) = (&mut tcfg, &tokenizer.chat_template) {
        o.insert("chat_template".into(), json!(t));
    }
    if let Value::Object(o) = &mut tcfg {
        o.entry("tokenizer_class").or_insert(json!("PreTrainedTokenizerFast"));
    }
    write_json(&dir.join("tokenizer_config.json"), &tcfg)?;
    let mut special = serde_json::Map::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token"] {
        if let Some(v) = tokenizer.config.get(key).filter(|v| !v.is_null()) {
            special.insert(key.into(), v.clone());
        }
    }
    write_json(&dir.join("special_tokens_map.json"), &Value::Object(special))
}

/// Pretty JSON, written atomically.
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(v).expect("JSON").as_bytes())
}

/// Writes a LoRA adapter in PEFT's format: `adapter_config.json` and
/// `adapter_model.safetensors` (tensors named `base_model.model.<module>.lora_{A,B}.weight`,
/// `base_model.model.<module>.lora_magnitude_vector` for DoRA, and
/// `base_model.model.<name>` for the whole `modules_to_save`, such as a classifier head), which
/// `peft.PeftModel.from_pretrained(base_model, dir)` loads; plus the tokenizer files.
/// `task_type` is PEFT's (`CAUSAL_LM`, `SEQ_CLS`); `tie` sets PEFT's `ensure_weight_tying` (saved
/// embeddings of a tied-embedding model, written as both `embed_tokens` and `lm_head`);
/// `fan_in_fan_out` is PEFT's flag for GPT-2's `Conv1D` targets.
#[allow(clippy::too_many_arguments)]
pub fn save_peft_adapter(
    dir: &Path,
    cfg: &crate::TrainConfig,
    task_type: &str,
    modules_to_save: &[String],
    tie: bool,
    fan_in_fan_out: bool,
    weights: &[(String, Tensor)],
    tokenizer: &TextTokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    if let Some(src) = &cfg.lora_adapter {
        // Training went on from an existing adapter: keep its configuration, with the dropout
        // this run trained it with.
        let from = Path::new(src).join("adapter_config.json");
        let text = std::fs::read_to_string(&from).map_err(TrainError::io(&from))?;
        let mut c: Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Config { origin: from.display().to_string(), message: e.to_string() })?;
        c["lora_dropout"] = json!(cfg.lora_dropout);
        write_json(&dir.join("adapter_config.json"), &c)?;
    } else {
        let mut c = adapter_config(cfg, task_type, modules_to_save);
        c["fan_in_fan_out"] = json!(fan_in_fan_out);
        if tie {
            // Only when needed: PEFT versions older than the key may not accept it.
            c["ensure_weight_tying"] = json!(true);
        }
        write_json(&dir.join("adapter_config.json"), &c)?;
    }
    let path = dir.join("adapter_model.safetensors");
    crate::weights::save_safetensors_file(&path, weights)?;
    save_tokenizer(dir, tokenizer)
}

/// PEFT's `adapter_config.json` for the LoRA settings of a run.
fn adapter_config(cfg: &crate::TrainConfig, task_type: &str, modules_to_save: &[String]) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": cfg.model,
        "revision": cfg.revision,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": cfg.lora_targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": if modules_to_save.is_empty() { Value::Null } else { json!(modules_to_save) },
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
    })
}
