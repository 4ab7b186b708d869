//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors` (written by
//! ranger-tune or by `peft` itself) onto a model.

use std::path::Path;

use candle_core::{Device, Var};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::model::{LlamaModel, LoraConfig};

/// Adds the adapter in `dir` to `model` and returns its variables (PEFT names), so it can be
/// used for generation or trained further. Only plain LoRA (no DoRA, rsLoRA, rank or alpha
/// patterns, no bias or saved modules) is accepted; anything else is refused by name.
pub fn load_peft_adapter(model: &mut LlamaModel, dir: &Path) -> Result<Vec<(String, Var)>> {
    let cp = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cp).map_err(TrainError::io(&cp))?;
    let c: Value = serde_json::from_str(&text).map_err(|e| TrainError::Config { origin: cp.display().to_string(), message: e.to_string() })?;
    let bad = |m: String| TrainError::Config { origin: cp.display().to_string(), message: m };
    if c["peft_type"] != "LORA" {
        return Err(bad(format!("peft_type {} is not LORA", c["peft_type"])));
    }
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out"] {
        if c[flag] == true {
            return Err(bad(format!("{flag} adapters are not supported")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if c[key].as_object().is_some_and(|o| !o.is_empty()) {
            return Err(bad(format!("{key} is not supported")));
        }
    }
    if c["bias"].as_str().is_some_and(|b| b != "none") || c["modules_to_save"].as_array().is_some_and(|m| !m.is_empty()) {
        return Err(bad("adapters with trained biases or saved modules are not supported".into()));
    }
    let rank = c["r"].as_u64().ok_or_else(|| bad("r missing".into()))? as usize;
    let alpha = c["lora_alpha"].as_f64().ok_or_else(|| bad("lora_alpha missing".into()))?;
    let targets: Vec<String> = match &c["target_modules"] {
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        Value::String(s) => vec![s.clone()],
        _ => return Err(bad("target_modules missing".into())),
    };
    let vars = model.add_lora(&LoraConfig { rank, alpha, targets }, 0)?;
    let wp = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&wp, &Device::Cpu).map_err(|e| TrainError::Msg(format!("{}: {e}", wp.display())))?;
    for (name, var) in &vars {
        // PEFT may save names with or without the adapter name ("default").
        let t = tensors
            .get(name)
            .or_else(|| tensors.get(&name.replace(".weight", ".default.weight")))
            .ok_or_else(|| TrainError::Weights { origin: wp.display().to_string(), tensor: name.clone(), problem: "missing".into() })?;
        if t.shape() != var.shape() {
            return Err(TrainError::Weights { origin: wp.display().to_string(), tensor: name.clone(), problem: format!("shape {:?}, {:?} expected", t.dims(), var.dims()) });
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(vars)
}

