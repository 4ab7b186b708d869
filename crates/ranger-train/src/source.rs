//! Where a model comes from: a local Hugging Face folder, the Hub (via hf-hub), or a GGUF file.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::hub::HubEnv;
pub use crate::loaded::LoadedModel;
use crate::model::ModelConfig;
use crate::tokenizer::TextTokenizer;

/// Hub options (`--revision`; the endpoint, cache and token come from the environment: [`HubEnv`]).
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Branch, tag or commit.
    pub revision: Option<String>,
}

/// Reads a JSON file; a parse error names the file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::Config { origin: path.display().to_string(), message: e.to_string() })
}

/// Loads a Hugging Face model folder: `config.json`, safetensors weights, tokenizer files.
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    load_dir_with(dir, LoadOptions::default())
}

/// [`load_dir`] with [`LoadOptions`]: with `quantize`, the QLoRA base's weights are quantized as each
/// is read, so the whole base never exists in its stored dtype.
pub fn load_dir_with(dir: &Path, options: LoadOptions) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let config = ModelConfig::from_json(read_json(&cfg_path)?, &cfg_path.display().to_string())?;
    let mut weights = std::collections::HashMap::new();
    let mut quantized = std::collections::HashMap::new();
    let raw = config.raw().clone();
    match options.quantize {
        None => {
            for (name, t) in crate::weights::load_safetensors_dir(dir)? {
                let (name, t) = crate::model::hf_layout::from_disk(&raw, name, t)?;
                weights.insert(name, t);
            }
        }
        Some(format) => crate::weights::stream_safetensors_dir(dir, |name, t| {
            let (name, t) = crate::model::hf_layout::from_disk(&raw, name, t)?;
            match crate::loaded::quantize_base_weight(&name, &t, format)? {
                Some(q) => {
                    quantized.insert(name, q);
                }
                None => {
                    weights.insert(name, t);
                }
            }
            Ok(())
        })?,
    }
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let gen = dir.join("generation_config.json");
    let generation_config = if gen.exists() { Some(read_json(&gen)?) } else { None };
    let origin = dir.display().to_string();
    Ok(LoadedModel { config, weights, quantized, tokenizer, generation_config, origin })
}

/// Downloads (or finds in the cache) the files of a Hub repository and returns its folder, with
/// the settings of the environment ([`HubEnv::from_env`]: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE,
/// HF_TOKEN, HF_HUB_OFFLINE).
pub fn fetch_from_hub(repo_id: &str, opts: &HubOptions) -> Result<PathBuf> {
    let revision = opts.revision.as_deref().unwrap_or("main");
    Ok(crate::hub::fetch(repo_id, revision, &HubEnv::from_env())?)
}

fn spec_err(spec: &str, problem: &str) -> TrainError {
    TrainError::ModelSpec { spec: spec.to_string(), problem: problem.to_string() }
}

/// How a model is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Keep a GGUF file's quantized projections, embedding and LM head in their block format
    /// ([`LoadedModel::quantized`], for QLoRA) instead of dequantizing them.
    pub keep_quantized: bool,
    /// Quantize a safetensors checkpoint's projections, embedding and LM head to this block
    /// format as they are read ([`crate::loaded::quantize_base_weight`], for QLoRA).
    pub quantize: Option<candle_core::quantized::GgmlDType>,
}

/// Loads `spec`: a `.gguf` file, a local folder, or a Hub repository id, every weight
/// dequantized.
pub fn load(spec: &str, hub: &HubOptions) -> Result<LoadedModel> {
    load_with(spec, hub, LoadOptions::default())
}

/// [`load`] with [`LoadOptions`].
pub fn load_with(spec: &str, hub: &HubOptions, options: LoadOptions) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.extension().is_some_and(|e| e == "gguf") {
        if !path.exists() {
            return Err(spec_err(spec, "GGUF file not found"));
        }
        return crate::gguf::load_gguf_with(path, options.keep_quantized);
    }
    if path.is_dir() {
        return load_dir_with(path, options);
    }
    if path.exists() {
        return Err(spec_err(spec, "expected a model folder, a .gguf file or a Hub repository id"));
    }
    if spec.starts_with('.') || spec.starts_with('/') || spec.matches('/').count() > 1 {
        return Err(spec_err(spec, "no such file or folder"));
    }
    let dir = fetch_from_hub(spec, hub)?;
    let mut m = load_dir_with(&dir, options)?;
    m.origin = spec.to_string();
    Ok(m)
}
