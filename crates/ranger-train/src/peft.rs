//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors` (written by
//! ranger-tune or by `peft` itself) onto a model, with a classifier's saved head.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::model::lora::{attach_lora, DropoutSeed};
use crate::model::{LlamaModel, LoraConfig, Proj};

/// The parts of a PEFT `adapter_config.json` that ranger-tune uses.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Rank, alpha and target modules.
    pub lora: LoraConfig,
    /// PEFT's task type (`CAUSAL_LM`, `SEQ_CLS`, …).
    pub task_type: String,
    /// Modules saved whole next to the adapters (a classifier head).
    pub modules_to_save: Vec<String>,
}

/// Reads and checks `adapter_config.json`: LoRA, with or without DoRA and rsLoRA, is accepted;
/// rank or alpha patterns, trained biases and transposed (`fan_in_fan_out`) weights are refused
/// by name.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let cp = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cp).map_err(TrainError::io(&cp))?;
    let c: Value = serde_json::from_str(&text).map_err(|e| TrainError::Config { origin: cp.display().to_string(), message: e.to_string() })?;
    let bad = |m: String| TrainError::Config { origin: cp.display().to_string(), message: m };
    if c["peft_type"] != "LORA" {
        return Err(bad(format!("peft_type {} is not LORA", c["peft_type"])));
    }
    for flag in ["fan_in_fan_out", "use_qalora", "use_bdlora"] {
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
    })
}

fn read_tensors(dir: &Path) -> Result<(std::path::PathBuf, HashMap<String, Tensor>)> {
    let wp = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&wp, &Device::Cpu).map_err(|e| TrainError::Msg(format!("{}: {e}", wp.display())))?;
    Ok((wp, tensors))
}

/// Adds the adapters of `dir` to the projections `projs` (module path, projection) and returns
/// them as trainable variables with their PEFT names. `training` gives the dropout of a run that
/// trains them further and its seed switch (dropout is a choice of the run, not part of the
/// adapter); `None` for inference.
pub fn load_lora(projs: Vec<(String, &mut Proj)>, dtype: DType, device: &Device, dir: &Path, training: Option<(f64, &DropoutSeed)>) -> Result<Vec<(String, Var)>> {
    let mut cfg = read_adapter_config(dir)?;
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
            .ok_or_else(|| TrainError::Weights { origin: wp.display().to_string(), tensor: name.clone(), problem: "missing".into() })?;
        if t.shape() != var.shape() {
            return Err(TrainError::Weights { origin: wp.display().to_string(), tensor: name.clone(), problem: format!("shape {:?}, {:?} expected", t.dims(), var.dims()) });
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
            let n = n.strip_prefix("base_model.model.").unwrap_or(&n).replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".");
            (n, t)
        })
        .collect();
    if out.is_empty() && !cfg.modules_to_save.is_empty() {
        return Err(TrainError::Msg(format!("{}: modules_to_save {:?} are not in adapter_model.safetensors", dir.display(), cfg.modules_to_save)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Adds the causal-LM adapter in `dir` to `model` and returns its variables (PEFT names), so it
/// can be used for generation or trained further (`training`: see [`load_lora`]). Adapters
/// with saved modules are refused.
pub fn load_peft_adapter(model: &mut LlamaModel, dir: &Path, training: Option<(f64, &DropoutSeed)>) -> Result<Vec<(String, Var)>> {
    let cfg = read_adapter_config(dir)?;
    if !cfg.modules_to_save.is_empty() {
        return Err(TrainError::Config {
            origin: dir.join("adapter_config.json").display().to_string(),
            message: format!("adapters with saved modules ({}) are not supported for causal LMs", cfg.modules_to_save.join(", ")),
        });
    }
    let (dtype, device) = (model.dtype(), model.device().clone());
    load_lora(model.projections_mut(), dtype, &device, dir, training)
}
