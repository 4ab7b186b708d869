//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors` (written by
//! ranger-tune or by `peft` itself) onto a model, with a classifier's saved head.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::model::{attach_lora, DropoutSeed, LlamaModel, LoraConfig, Proj};

/// The parts of a PEFT `adapter_config.json` that ranger-tune uses.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Rank, alpha and target modules.
    pub lora: LoraConfig,
    /// PEFT's task type (`CAUSAL_LM`, `SEQ_CLS`, …).
    pub task_type: String,
    /// Modules saved whole next to the adapters (a classifier head, embeddings, …).
    pub modules_to_save: Vec<String>,
    /// PEFT's `ensure_weight_tying`: saved modules of tied embeddings stay tied.
    pub ensure_weight_tying: bool,
    /// PEFT's `fan_in_fan_out`: the targets are `Conv1D` layers (GPT-2). The adapter matrices
    /// have the same shapes either way; only merging transposes.
    pub fan_in_fan_out: bool,
}

/// Whether PEFT's `modules_to_save` entries select the weight named `tensor`: its module path
/// (the name without `.weight` / `.bias`) ends with an entry, PEFT's plain suffix test.
pub fn saves_module(modules: &[String], tensor: &str) -> bool {
    let module = tensor.rsplit_once('.').map_or(tensor, |(m, _)| m);
    modules.iter().any(|t| module.ends_with(t.as_str()))
}

/// Makes the weights of `model` that `modules` selects trainable (PEFT's `modules_to_save`) and
/// returns them named `base_model.model.<name>`. With tied embeddings, `lm_head` selects the
/// shared embedding matrix. An entry that selects nothing is an error naming it.
pub fn train_modules(model: &mut LlamaModel, modules: &[String]) -> Result<Vec<(String, Var)>> {
    let tied = model.config.tie_word_embeddings;
    let embed = model.config.names.embed;
    let mut vars = Vec::new();
    let mut used = vec![false; modules.len()];
    let raw = model.config.raw.clone();
    for (name, slot) in model.weights_mut() {
        let mut selected = false;
        for (i, t) in modules.iter().enumerate() {
            let t = std::slice::from_ref(t);
            if saves_module(t, &name) || (tied && name == embed && saves_module(t, "lm_head.weight")) {
                used[i] = true;
                selected = true;
            }
        }
        if selected && crate::model::hf_layout::stored_transposed(&raw, &name) {
            return Err(TrainError::Config {
                origin: "modules_to_save".into(),
                message: format!("{name} is a GPT-2 Conv1D projection: train it with LoRA (--lora-targets) instead"),
            });
        }
        if selected {
            let v = Var::from_tensor(slot)?;
            *slot = v.as_tensor().clone();
            vars.push((format!("base_model.model.{name}"), v));
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(TrainError::UnknownModule { entry: modules[i].clone() });
    }
    Ok(vars)
}

/// Whether the trainable `vars` include the embedding matrix of a model with tied embeddings,
/// which PEFT then saves as both `embed_tokens` and `lm_head` with `ensure_weight_tying`.
pub fn trains_tied_embeddings(model: &LlamaModel, vars: &[(String, Var)]) -> bool {
    let name = format!("base_model.model.{}", model.config.names.embed);
    model.config.tie_word_embeddings && vars.iter().any(|(n, _)| *n == name)
}

/// Reads and checks `adapter_config.json`: LoRA, with or without DoRA and rsLoRA, is accepted;
/// rank or alpha patterns and trained biases are refused by name (`fan_in_fan_out`, GPT-2's,
/// is checked against the model by the loaders).
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let cp = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cp).map_err(TrainError::io(&cp))?;
    let c: Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config { origin: cp.display().to_string(), message: e.to_string() })?;
    let bad = |m: String| TrainError::Config { origin: cp.display().to_string(), message: m };
    if c["peft_type"] != "LORA" {
        return Err(bad(format!("peft_type {} is not LORA", c["peft_type"])));
    }
    for flag in ["use_qalora", "use_bdlora"] {
        if c[flag] == true {
            return Err(bad(format!("{flag} adapters are not supported")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if c[key].as_object().is_some_and(|o| !o.is_empty()) {
            return Err(bad(format!("{key} is not supported")));
        }
    }
    if c["bias"].as_str().is_some_and(|b| b != "none") {
        return Err(bad("adapters with trained biases are not supported".into()));
    }
    let rank = c["r"].as_u64().ok_or_else(|| bad("r missing".into()))? as usize;
    let alpha = c["lora_alpha"].as_f64().ok_or_else(|| bad("lora_alpha missing".into()))?;
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            Value::String(s) => vec![s.clone()],
            _ => vec![],
        }
    };
    let targets = strings(&c["target_modules"]);
    if targets.is_empty() {
        return Err(bad("target_modules missing".into()));
    }
    Ok(AdapterConfig {
        lora: LoraConfig {
            rank,
            alpha,
            targets,
            dropout: c["lora_dropout"].as_f64().unwrap_or(0.0),
            use_dora: c["use_dora"] == true,
            use_rslora: c["use_rslora"] == true,
        },
        task_type: c["task_type"].as_str().unwrap_or("CAUSAL_LM").to_string(),
        modules_to_save: strings(&c["modules_to_save"]),
        ensure_weight_tying: c["ensure_weight_tying"] == true,
        fan_in_fan_out: c["fan_in_fan_out"] == true,
    })
}

fn read_tensors(dir: &Path) -> Result<(std::path::PathBuf, HashMap<String, Tensor>)> {
    let wp = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&wp, &Device::Cpu)
        .map_err(|e| TrainError::Format { path: wp.clone(), message: e.to_string() })?;
    Ok((wp, tensors))
}

/// Adds the adapters of `dir` to the projections `projs` (module path, projection) and returns
/// them as trainable variables with their PEFT names. `training` gives the dropout of a run that
/// trains them further and its seed switch (dropout is a choice of the run, not part of the
/// adapter); `None` for inference.
pub fn load_lora(
    projs: Vec<(String, &mut Proj)>,
    dtype: DType,
    device: &Device,
    dir: &Path,
    training: Option<(f64, &DropoutSeed)>,
) -> Result<Vec<(String, Var)>> {
    let mut cfg = read_adapter_config(dir)?;
    // PEFT sets it for GPT-2's Conv1D layers (the only ones with a `c_attn`), whatever the file
    // says; on nn.Linear layers it would transpose the merged update.
    let conv1d = projs.first().is_some_and(|(n, _)| n.starts_with(crate::model::llama_names::Names::GPT2.layers));
    if cfg.fan_in_fan_out && !conv1d {
        return Err(TrainError::Config {
            origin: dir.join("adapter_config.json").display().to_string(),
            message: "fan_in_fan_out adapters are for GPT-2's Conv1D layers, not this model's".into(),
        });
    }
    let off = DropoutSeed::default();
    let seed = match training {
        Some((p, seed)) => {
            cfg.lora.dropout = p;
            seed
        }
        None => {
            cfg.lora.dropout = 0.0;
            &off
        }
    };
    let vars = attach_lora(projs, &cfg.lora, 0, dtype, device, seed)?;
    let (wp, tensors) = read_tensors(dir)?;
    for (name, var) in &vars {
        // PEFT may save names with or without the adapter name ("default").
        let t = tensors
            .get(name)
            .or_else(|| tensors.get(&name.replace(".weight", ".default.weight")))
            // Older PEFT versions saved DoRA magnitudes as `lora_magnitude_vector.default.weight`.
            .or_else(|| tensors.get(&format!("{name}.default.weight")))
            .or_else(|| tensors.get(&format!("{name}.weight")))
            .ok_or_else(|| TrainError::Weights {
                origin: wp.display().to_string(),
                tensor: name.clone(),
                problem: "missing".into(),
            })?;
        if t.shape() != var.shape() {
            return Err(TrainError::Weights {
                origin: wp.display().to_string(),
                tensor: name.clone(),
                problem: format!("shape {:?}, {:?} expected", t.dims(), var.dims()),
            });
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(vars)
}

/// The whole modules saved with the adapter in `dir` (PEFT's `modules_to_save`, e.g. a
/// classifier head), by their names in the base model.
pub fn load_saved_modules(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let cfg = read_adapter_config(dir)?;
    let (_, tensors) = read_tensors(dir)?;
    let mut out: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter(|(n, _)| !n.contains(".lora_"))
        .map(|(n, t)| {
            let n = n
                .strip_prefix("base_model.model.")
                .unwrap_or(&n)
                .replace(".modules_to_save.default.", ".")
                .replace(".modules_to_save.", ".");
            (n, t)
        })
        .collect();
    if out.is_empty() && !cfg.modules_to_save.is_empty() {
        return Err(TrainError::Format {
            path: dir.join("adapter_model.safetensors"),
            message: format!("modules_to_save {:?} are not in it", cfg.modules_to_save),
        });
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The saved modules of the causal-LM adapter in `dir` by base-model tensor name. On a model
/// with tied embeddings a saved `embed_tokens` / `lm_head` is accepted only when PEFT keeps them
/// tied (`ensure_weight_tying`, or both saved and equal); otherwise PEFT would run the input
/// embeddings and the head apart, which a tied model cannot represent, and it is refused.
fn causal_lm_saved_modules(dir: &Path, cfg: &AdapterConfig, tied: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    if cfg.modules_to_save.is_empty() {
        return Ok(vec![]);
    }
    let mut saved = load_saved_modules(dir)?;
    if let Some(embed_name) = tied {
        let take = |saved: &mut Vec<(String, Tensor)>, n: &str| {
            saved.iter().position(|(m, _)| m == n).map(|i| saved.remove(i).1)
        };
        let head = take(&mut saved, "lm_head.weight");
        let embed = take(&mut saved, embed_name);
        let equal = |a: &Tensor, b: &Tensor| -> Result<bool> {
            Ok(a.shape() == b.shape()
                && a.to_dtype(DType::F32)?
                    .ne(&b.to_dtype(DType::F32)?)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    == 0.0)
        };
        let shared = match (embed, head) {
            (None, None) => None,
            (Some(e), Some(h)) if cfg.ensure_weight_tying || equal(&e, &h)? => Some(e),
            (Some(t), None) | (None, Some(t)) if cfg.ensure_weight_tying => Some(t),
            _ => {
                return Err(TrainError::Config {
                    origin: dir.join("adapter_config.json").display().to_string(),
                    message: "the adapter trains the input embeddings and the LM head of a tied-embedding model apart (no ensure_weight_tying); ranger-tune keeps them tied".into(),
                })
            }
        };
        if let Some(t) = shared {
            saved.push((embed_name.into(), t));
        }
    }
    Ok(saved)
}

/// Adds the causal-LM adapter in `dir` to `model` — its LoRA matrices and the modules it saved
/// whole (PEFT's `modules_to_save`, e.g. embeddings), which replace the model's — and returns
/// the trainable variables (PEFT names), so it can be used for generation or trained further
/// (`training`: see [`load_lora`]; saved modules are trainable then too).
pub fn load_peft_adapter(
    model: &mut LlamaModel,
    dir: &Path,
    training: Option<(f64, &DropoutSeed)>,
) -> Result<Vec<(String, Var)>> {
    let cfg = read_adapter_config(dir)?;
    let wp = dir.join("adapter_model.safetensors");
    let (dtype, device) = (model.dtype(), model.device().clone());
    let mut vars = Vec::new();
    let tied = model.config.tie_word_embeddings.then_some(model.config.names.embed);
    let saved = causal_lm_saved_modules(dir, &cfg, tied)?;
    let mut slots = model.weights_mut();
    for (name, t) in saved {
        let Some((_, slot)) = slots.iter_mut().find(|(n, _)| *n == name) else {
            return Err(TrainError::Weights {
                origin: wp.display().to_string(),
                tensor: name,
                problem: "not a weight of this model".into(),
            });
        };
        if t.shape() != slot.shape() {
            return Err(TrainError::Weights {
                origin: wp.display().to_string(),
                tensor: name,
                problem: format!("shape {:?}, {:?} expected", t.dims(), slot.dims()),
            });
        }
        let t = t.to_dtype(dtype)?.to_device(&device)?;
        if training.is_some() {
            let v = Var::from_tensor(&t)?;
            **slot = v.as_tensor().clone();
            vars.push((format!("base_model.model.{name}"), v));
        } else {
            **slot = t;
        }
    }
    vars.extend(load_lora(model.projections_mut(), dtype, &device, dir, training)?);
    Ok(vars)
}
