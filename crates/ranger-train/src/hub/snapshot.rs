//! A repository's snapshot in the cache (`refs/<revision>` names the commit, `snapshots/<commit>/`
//! holds its files): whether it holds everything a load needs.

use std::path::{Path, PathBuf};

/// The files named by a sharded checkpoint's `model.safetensors.index.json` (its `weight_map`),
/// sorted and without repeats; `None` if the index cannot be read.
pub(crate) fn shard_names(index: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(index).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut files: Vec<String> =
        v["weight_map"].as_object()?.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Some(files)
}

/// The snapshot folder of `repo` in `cache` when it holds config.json, tokenizer.json and every
/// weight file (a run cut off during a download leaves an incomplete one).
pub(crate) fn complete_snapshot(cache: &hf_hub::Cache, repo: &hf_hub::Repo) -> Option<PathBuf> {
    let config = cache.repo(repo.clone()).get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.exists() { shard_names(&index)? } else { vec!["model.safetensors".to_string()] };
    let complete = weights.iter().map(String::as_str).chain(["tokenizer.json"]).all(|f| dir.join(f).exists());
    complete.then_some(dir)
}
