//! Where a model comes from: a local Hugging Face folder, the Hub (via hf-hub), or a GGUF file.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, TrainError};
pub use crate::loaded::LoadedModel;
use crate::model::ModelConfig;
use crate::tokenizer::TextTokenizer;

/// Hub options (`--revision`; the token and cache come from HF_TOKEN / HF_HOME / HF_HUB_CACHE).
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
    let cfg_path = dir.join("config.json");
    let config = ModelConfig::from_json(read_json(&cfg_path)?, &cfg_path.display().to_string())?;
    let weights = crate::weights::load_safetensors_dir(dir)?;
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let gen = dir.join("generation_config.json");
    let generation_config = if gen.exists() { Some(read_json(&gen)?) } else { None };
    Ok(LoadedModel { config, weights, tokenizer, generation_config, origin: dir.display().to_string() })
}

/// Downloads (or finds in the cache) the files of a Hub repository and returns its folder.
/// Honours HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE=1 (cache only).
pub fn fetch_from_hub(repo_id: &str, opts: &HubOptions) -> Result<PathBuf> {
    use hf_hub::{Repo, RepoType};
    let revision = opts.revision.clone().unwrap_or_else(|| "main".to_string());
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone());
    // HF_HUB_CACHE names the cache folder itself; HF_HOME its parent (hf-hub reads only HF_HOME).
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        None => hf_hub::Cache::from_env(),
    };
    let offline = std::env::var("HF_HUB_OFFLINE").map(|v| v == "1" || v.eq_ignore_ascii_case("true")).unwrap_or(false);
    let wanted =
        ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"];
    let hub_err = |message: String| TrainError::Hub { repo: format!("{repo_id}@{revision}"), message };
    if offline {
        let cached = cache.repo(repo.clone());
        let cfg =
            cached.get("config.json").ok_or_else(|| hub_err("not in the local cache and HF_HUB_OFFLINE=1".into()))?;
        return Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(true);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| hub_err(e.to_string()))?;
    let api = api.repo(repo);
    let mut dir = None;
    for f in wanted {
        match api.get(f) {
            Ok(p) => dir = p.parent().map(Path::to_path_buf),
            Err(e) if f == "config.json" || f == "tokenizer.json" => return Err(hub_err(format!("{f}: {e}"))),
            Err(_) => {}
        }
    }
    match api.get("model.safetensors.index.json") {
        Ok(index) => {
            let v = read_json(&index)?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect())
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                api.get(&f).map_err(|e| hub_err(format!("{f}: {e}")))?;
            }
        }
        Err(_) => {
            api.get("model.safetensors").map_err(|e| hub_err(format!("model.safetensors: {e}")))?;
        }
    }
    dir.ok_or_else(|| hub_err("no files".into()))
}

fn spec_err(spec: &str, problem: &str) -> TrainError {
    TrainError::ModelSpec { spec: spec.to_string(), problem: problem.to_string() }
}

/// Loads `spec`: a `.gguf` file, a local folder, or a Hub repository id.
pub fn load(spec: &str, hub: &HubOptions) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.extension().is_some_and(|e| e == "gguf") {
        if !path.exists() {
            return Err(spec_err(spec, "GGUF file not found"));
        }
        return crate::gguf::load_gguf(path);
    }
    if path.is_dir() {
        return load_dir(path);
    }
    if path.exists() {
        return Err(spec_err(spec, "expected a model folder, a .gguf file or a Hub repository id"));
    }
    if spec.starts_with('.') || spec.starts_with('/') || spec.matches('/').count() > 1 {
        return Err(spec_err(spec, "no such file or folder"));
    }
    let dir = fetch_from_hub(spec, hub)?;
    let mut m = load_dir(&dir)?;
    m.origin = spec.to_string();
    Ok(m)
}
