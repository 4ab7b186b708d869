//! What ranger-tune writes for each new family is what transformers and PEFT load.
//!
//! - **Layout (asserted here):** a full fine-tune's model folder holds exactly the tensors (names,
//!   shapes, dtypes) of the folder transformers saved for the family (tests/fixtures/families, by
//!   tools/make_family_fixtures.py), with its `model_type` and architecture; a LoRA run's adapter
//!   exactly the tensors of the adapter PEFT saved with the same rank and targets (GPT-2:
//!   `fan_in_fan_out`). So `from_pretrained` finds every key it expects and no other.
//! - **Values (checked by transformers itself):** every family is also trained as a causal LM
//!   (full, LoRA, and the LoRA merged) and as a sequence classifier (full, LoRA, merged; ModernBERT
//!   as a classifier only), 12 steps each, and from its GGUF fixture where llama.cpp has the
//!   architecture (`convert`'s folder, a full fine-tune, LoRA); each result's logits on fixed ids
//!   are computed here as `generate`, `eval` and `predict` load the folders. With
//!   `RANGER_INTEROP_DIR` set, the folders and those logits (`interop.json`) are kept under it,
//!   one folder per family, and `tools/check_family_interop.py` (run by `.ci/run`) loads each
//!   with transformers' `AutoModelFor…` and PEFT and compares.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use ranger_train::build::{ModelBuilder, Tuning};
use ranger_train::classify::{collate, LabeledText};
use ranger_train::config::TaskKind;
use ranger_train::merge::{merge_adapter, merge_adapter_with_gguf, GgufExport};
use ranger_train::predict::load_classifier;
use ranger_train::source::{load, HubOptions};
use ranger_train::testing::{tiny_encoder_config, write_tiny_encoder};
use ranger_train::TrainConfig;
use serde_json::{json, Value};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families").join(family)
}

/// Name -> (shape, dtype) of every tensor of a safetensors file.
fn layout(path: &Path) -> BTreeMap<String, (Vec<usize>, String)> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    tensors.into_iter().map(|(n, t)| (n, (t.dims().to_vec(), format!("{:?}", t.dtype())))).collect()
}

/// Fixed ids over the tiny vocabularies (every tiny tokenizer and GGUF fixture has at least 36
/// tokens), the same length in every row, so no padding is involved.
const IDS: [[u32; 8]; 2] = [[5, 9, 12, 7, 20, 6, 14, 8], [30, 4, 11, 11, 25, 17, 9, 33]];

fn ids_tensor() -> Tensor {
    Tensor::new(&IDS, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> (Vec<usize>, Vec<f32>) {
    (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1().unwrap())
}

/// Our logits for [`IDS`] from the causal LM in `model` (with the PEFT adapter in `adapter`),
/// built as `generate` and `eval` build it.
fn causal_logits(model: &Path, adapter: Option<&Path>) -> (Vec<usize>, Vec<f32>) {
    let loaded = load(model.to_str().unwrap(), &HubOptions::default()).unwrap();
    let config = loaded.decoder().unwrap().clone();
    let builder = ModelBuilder {
        dtype: DType::F32,
        device: &Device::Cpu,
        tuning: adapter.map_or(Tuning::Frozen, Tuning::WithAdapter),
    };
    let built = builder.causal_lm(config, loaded.weights, &loaded.origin).unwrap();
    flat(&built.model.forward_ids(&ids_tensor()).unwrap())
}

/// Our class logits for [`IDS`] from the classifier in `model` (or base + adapter), loaded as
/// `predict` loads it.
fn classifier_logits(model: &Path, adapter: Option<&Path>) -> (Vec<usize>, Vec<f32>) {
    let loaded = load(model.to_str().unwrap(), &HubOptions::default()).unwrap();
    let clf = load_classifier(loaded, adapter, DType::F32, &Device::Cpu).unwrap();
    let texts: Vec<LabeledText> =
        IDS.iter().map(|row| LabeledText { ids: row.to_vec(), type_ids: vec![0; row.len()], label: 0 }).collect();
    let refs: Vec<&LabeledText> = texts.iter().collect();
    let batch = collate(&refs, clf.tokenizer.pad_id, clf.model.mask_kind(), DType::F32, &Device::Cpu).unwrap();
    flat(&clf.model.forward(&batch).unwrap())
}

/// One result for tools/check_family_interop.py: folders relative to the family's folder.
fn case(
    what: &str,
    task: &str,
    model: &str,
    adapter: Option<&str>,
    base: Option<&str>,
    out: (Vec<usize>, Vec<f32>),
) -> Value {
    json!({"what": what, "task": task, "model": model, "adapter": adapter, "base": base,
           "input_ids": IDS, "shape": out.0, "logits": out.1})
}

/// A folder holding the fixture folder `src`'s config.json and model.safetensors, with a
/// tiny word-level tokenizer (encoder-style for ModernBERT).
fn model_folder(src: &Path, dst: &Path, encoder: bool) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let vocab = read_json(&dst.join("config.json"))["vocab_size"].as_u64().unwrap() as usize;
    let (tokenizer, tokenizer_config, needed) = if encoder {
        (
            ranger_train::testing::tiny_encoder_tokenizer_json(),
            json!({"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}),
            ranger_train::testing::TINY_ENCODER_VOCAB,
        )
    } else {
        (common::tiny_tokenizer_json(), json!({"eos_token": "<eos>", "pad_token": "<pad>"}), common::TINY_VOCAB)
    };
    assert!(needed <= vocab, "{}: vocabulary {vocab} < {needed}", src.display());
    std::fs::write(dst.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dst.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

/// Keeps `dir` (a family's folders and `interop.json`) under `RANGER_INTEROP_DIR`, if set.
fn export(dir: &Path, family: &str, cases: Vec<Value>) {
    std::fs::write(
        dir.join("interop.json"),
        serde_json::to_string(&json!({"family": family, "cases": cases})).unwrap(),
    )
    .unwrap();
    if let Some(root) = std::env::var_os("RANGER_INTEROP_DIR") {
        let to = Path::new(&root).join(family);
        let _ = std::fs::remove_dir_all(&to);
        copy_dir(dir, &to);
        eprintln!("{family}: kept for tools/check_family_interop.py in {}", to.display());
    }
}

/// The run `cfg` describes (12 steps), full or LoRA, written under `out`: its output folder.
fn train(cfg: &TrainConfig, out: &Path, lora: bool) -> PathBuf {
    let cfg = TrainConfig { output: out.display().to_string(), lora, ..cfg.clone() };
    common::quiet(cfg).run().unwrap().output.unwrap()
}

/// Three-label classification records over the tiny vocabulary.
fn classify_data(path: &Path) {
    let lines: Vec<String> = common::WORDS
        .chunks(4)
        .enumerate()
        .map(|(i, w)| json!({"text": w.join(" "), "label": format!("LABEL_{}", i % 3)}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// The classifier runs of a family from `base` (full, LoRA, merged), with our logits.
fn classifier_cases(dir: &Path, base: &str) -> (Vec<Value>, PathBuf) {
    classify_data(&dir.join("classify.jsonl"));
    let cfg = TrainConfig {
        task: TaskKind::Classify,
        model: dir.join(base).display().to_string(),
        data: dir.join("classify.jsonl").display().to_string(),
        max_seq_length: 16,
        batch_size: 4,
        max_steps: Some(12),
        learning_rate: Some(2e-2),
        lora_rank: 4,
        ..Default::default()
    };
    let full = train(&cfg, &dir.join("cls_full"), false);
    let adapter = train(&cfg, &dir.join("cls_lora"), true);
    merge_adapter(
        load(dir.join(base).to_str().unwrap(), &HubOptions::default()).unwrap(),
        &adapter,
        &dir.join("cls_merged"),
        DType::F32,
    )
    .unwrap();
    let rel = |p: &Path| p.strip_prefix(dir).unwrap().display().to_string();
    let lora_out = classifier_logits(&dir.join(base), Some(&adapter));
    let merged_out = classifier_logits(&dir.join("cls_merged"), None);
    assert_close(&merged_out.1, &lora_out.1, "merged classifier against base + adapter");
    let cases = vec![
        case("classifier, full fine-tune", "classify", &rel(&full), None, None, classifier_logits(&full, None)),
        case("classifier, LoRA (PEFT)", "classify", base, Some(&rel(&adapter)), Some(base), lora_out),
        case("classifier, LoRA merged", "classify", "cls_merged", None, None, merged_out),
    ];
    (cases, full)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: {worst}");
}

/// The causal-LM runs of the model in `dir/base` on `dir/data.jsonl` (full, LoRA with
/// `lora_targets` at rank 4 (empty: the default targets), merged), with our logits; and the
/// full run's model folder and the adapter's folder.
fn causal_cases(dir: &Path, lora_targets: Vec<String>) -> (Vec<Value>, PathBuf, PathBuf) {
    let cfg = TrainConfig {
        model: dir.join("base").display().to_string(),
        data: dir.join("data.jsonl").display().to_string(),
        max_seq_length: 16,
        batch_size: 2,
        max_steps: Some(12),
        lora_rank: 4,
        lora_targets,
        ..Default::default()
    };
    let full = train(&cfg, &dir.join("full"), false);
    let adapter = train(&cfg, &dir.join("lora"), true);
    let base = load(dir.join("base").to_str().unwrap(), &HubOptions::default()).unwrap();
    merge_adapter(base, &adapter, &dir.join("merged"), DType::F32).unwrap();
    let rel = |p: &Path| p.strip_prefix(dir).unwrap().display().to_string();
    let base_out = causal_logits(&dir.join("base"), None);
    let lora_out = causal_logits(&dir.join("base"), Some(&adapter));
    // Training moved the adapter off zero (PEFT's B starts at 0), so the check sees its values.
    let moved = lora_out.1.iter().zip(&base_out.1).any(|(a, b)| (a - b).abs() > 1e-4);
    assert!(moved, "{}: the adapter changed nothing", dir.display());
    let merged_out = causal_logits(&dir.join("merged"), None);
    assert_close(&merged_out.1, &lora_out.1, "merged causal LM against base + adapter");
    let cases = vec![
        case("causal LM, full fine-tune", "causal", &rel(&full), None, None, causal_logits(&full, None)),
        case("causal LM, LoRA (PEFT)", "causal", "base", Some(&rel(&adapter)), Some("base"), lora_out),
        case("causal LM, LoRA merged", "causal", "merged", None, None, merged_out),
    ];
    (cases, full, adapter)
}

fn text_data(path: &Path) {
    let lines: Vec<String> = common::WORDS.chunks(5).map(|w| json!({"text": w.join(" ")}).to_string()).collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn every_decoder_family_writes_what_transformers_and_peft_load() {
    for family in ["gemma2", "gemma3", "phi3", "phi4mini", "smollm3", "gpt2"] {
        let fixture = fixture(family);
        let dir = common::temp_dir(&format!("layout-{family}"));
        // The fixture's model with the tiny word-level tokenizer (its 40-token vocabulary holds it).
        model_folder(&fixture.join("base"), &dir.join("base"), false);
        text_data(&dir.join("data.jsonl"));
        let adapter_config = read_json(&fixture.join("lora/adapter_config.json"));
        assert_eq!(adapter_config["r"], 4, "{family}: the fixture adapter's rank");
        let targets = serde_json::from_value(adapter_config["target_modules"].clone()).unwrap();
        let (mut cases, full, adapter) = causal_cases(&dir, targets);

        assert_eq!(
            layout(&full.join("model.safetensors")),
            layout(&fixture.join("base/model.safetensors")),
            "{family}: the model folder's tensors"
        );
        let (ours, theirs) = (read_json(&full.join("config.json")), read_json(&fixture.join("base/config.json")));
        for key in ["model_type", "architectures"] {
            assert_eq!(ours[key], theirs[key], "{family}: config.json {key}");
        }
        assert_eq!(
            layout(&adapter.join("adapter_model.safetensors")),
            layout(&fixture.join("lora/adapter_model.safetensors")),
            "{family}: the adapter's tensors"
        );
        let ours = read_json(&adapter.join("adapter_config.json"));
        for key in ["peft_type", "task_type", "r", "fan_in_fan_out"] {
            assert_eq!(ours[key], adapter_config[key], "{family}: adapter_config.json {key}");
        }
        eprintln!("{family}: model folder and adapter in transformers' and PEFT's layout");

        cases.extend(classifier_cases(&dir, "base").0);
        export(&dir, family, cases);
    }
}

/// The families from before (Llama as causal LM and classifier, BERT as classifier), from the
/// tiny random folders the other tests use, so the same check covers them.
#[test]
fn llama_and_bert_write_what_transformers_and_peft_load() {
    let dir = common::temp_dir("layout-llama");
    common::write_tiny_model(&dir.join("base"), &common::tiny_config("llama"), 3);
    text_data(&dir.join("data.jsonl"));
    let (mut cases, ..) = causal_cases(&dir, vec![]);
    cases.extend(classifier_cases(&dir, "base").0);
    export(&dir, "llama", cases);

    let dir = common::temp_dir("layout-bert");
    write_tiny_encoder(&dir.join("base"), &tiny_encoder_config("bert"), 3).unwrap();
    export(&dir, "bert", classifier_cases(&dir, "base").0);
}

/// From GGUF files (tests/fixtures/gguf, written by llama.cpp's converter from tiny
/// transformers models): `convert`'s folder, whose config.json ranger-tune builds from the GGUF
/// metadata, must load in transformers with the logits ranger-tune computes from the GGUF itself;
/// so must a full fine-tune of the GGUF, and its LoRA adapter in PEFT over the converted folder.
#[test]
fn gguf_sources_write_what_transformers_and_peft_load() {
    for family in ["gemma2", "gemma3", "phi3", "phi4mini", "gpt2", "llama"] {
        let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(format!("{family}.gguf"));
        let dir = common::temp_dir(&format!("gguf-{family}"));
        ranger_train::convert::gguf_to_hf(&gguf, &dir.join("base"), DType::F32).unwrap();
        text_data(&dir.join("data.jsonl"));
        let cfg = TrainConfig {
            model: gguf.display().to_string(),
            data: dir.join("data.jsonl").display().to_string(),
            max_seq_length: 16,
            batch_size: 2,
            max_steps: Some(12),
            lora_rank: 4,
            ..Default::default()
        };
        let full = train(&cfg, &dir.join("full"), false);
        let adapter = train(&cfg, &dir.join("lora"), true);
        let rel = |p: &Path| p.strip_prefix(&*dir).unwrap().display().to_string();
        let from_gguf = causal_logits(&gguf, None);
        assert_close(&causal_logits(&dir.join("base"), None).1, &from_gguf.1, &format!("{family}: converted folder"));
        let lora_out = causal_logits(&gguf, Some(&adapter));
        let moved = lora_out.1.iter().zip(&from_gguf.1).any(|(a, b)| (a - b).abs() > 1e-4);
        assert!(moved, "{family} GGUF: the adapter changed nothing");
        let merged_gguf = check_gguf_export(family, &gguf, &adapter, &dir, &lora_out.1);
        check_gguf_base_round_trip(family, &gguf, &dir);
        let mut cases = vec![
            case("GGUF, convert's folder", "causal", "base", None, None, from_gguf),
            case("GGUF, full fine-tune", "causal", &rel(&full), None, None, causal_logits(&full, None)),
            case(
                "GGUF, LoRA (PEFT over convert's folder)",
                "causal",
                "base",
                Some(&rel(&adapter)),
                Some("base"),
                lora_out.clone(),
            ),
        ];
        // transformers reads the GGUF file `merge --gguf f32` wrote (with `gguf_file`). Only
        // Llama's: transformers 5.25 misreads llama.cpp's own files of the other tiny fixtures
        // (their logits differ from the models they were converted from by 0.03 to 4; GPT-2's
        // fails to load), so it cannot judge ours there; `check_gguf_base_round_trip` does.
        if family == "llama" {
            cases.push(case("GGUF, LoRA merged into a GGUF file", "causal", &rel(&merged_gguf), None, None, lora_out));
        }
        export(&dir, &format!("gguf-{family}"), cases);
    }
}

/// `merge --gguf`: the LoRA adapter trained on the GGUF file `gguf`, merged and written back
/// to GGUF. In f32, reading the file gives base + adapter's logits `want` (so llama.cpp's
/// permutations and norm offsets are redone as they were undone); in Q8_0 every matrix is
/// quantized (norms and biases f32) and each weight is within Q8_0's rounding of the merged
/// one; the metadata (tokenizer included) is the base's. Returns the f32 file.
fn check_gguf_export(family: &str, gguf: &Path, adapter: &Path, dir: &Path, want: &[f32]) -> PathBuf {
    let mut merged: Option<HashMap<String, Tensor>> = None;
    for format in [GgmlDType::F32, GgmlDType::Q8_0] {
        let out = dir.join(format!("merged-{format:?}.gguf"));
        let base = load(gguf.to_str().unwrap(), &HubOptions::default()).unwrap();
        let export = GgufExport { source: gguf, format, path: &out };
        let (_, written) =
            merge_adapter_with_gguf(base, adapter, &dir.join("merged-folder"), DType::F32, Some(export)).unwrap();
        let written = written.unwrap();
        let reread = ranger_train::gguf::load_gguf(&out).unwrap();
        let read_meta = |p: &Path| {
            let mut f = std::fs::File::open(p).unwrap();
            candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()
        };
        let (ours, theirs) = (read_meta(&out), read_meta(gguf));
        for (k, v) in &theirs.metadata {
            if !matches!(k.as_str(), "general.file_type" | "general.alignment" | "general.quantization_version") {
                assert_eq!(format!("{:?}", ours.metadata.get(k)), format!("{:?}", Some(v)), "{family}: metadata {k}");
            }
        }
        let mut names: Vec<&String> = ours.tensor_infos.keys().collect();
        names.sort();
        let mut base_names: Vec<&String> = theirs.tensor_infos.keys().collect();
        base_names.sort();
        assert_eq!(names, base_names, "{family}: the base file's tensors, by the same names");
        match format {
            GgmlDType::F32 => {
                let (_, logits) = causal_logits(&out, None);
                assert_close(&logits, want, &format!("{family}: merged GGUF (f32) against base + adapter"));
                let folder = load(dir.join("merged-folder").to_str().unwrap(), &HubOptions::default()).unwrap();
                merged = Some(folder.weights);
            }
            _ => {
                let merged = merged.as_ref().unwrap();
                let mut quantized = 0;
                for (name, info) in &ours.tensor_infos {
                    // Matrices in Q8_0, or f16 where a row is not whole 32-value blocks (as
                    // llama.cpp falls back); norms, biases and positions f32.
                    let matrix = info.shape.rank() == 2 && !name.contains("_norm") && name != "position_embd.weight";
                    let fits = info.shape.dims()[info.shape.rank() - 1] % 32 == 0;
                    let want = match (matrix, fits) {
                        (true, true) => GgmlDType::Q8_0,
                        (true, false) => GgmlDType::F16,
                        (false, _) => GgmlDType::F32,
                    };
                    assert_eq!(info.ggml_dtype, want, "{family}: {name}");
                    quantized += (want == GgmlDType::Q8_0) as usize;
                }
                assert!(quantized > 0 && written.formats.iter().any(|(f, n)| f == "Q8_0" && *n == quantized));
                for (hf, w) in &reread.weights {
                    let m = &merged[hf];
                    let (w, m) = (w.to_vec2_or_flat(), m.to_vec2_or_flat());
                    for (rw, rm) in w.iter().zip(&m) {
                        // Q8_0: 32-value blocks scaled to their largest magnitude / 127 (an f16
                        // step: 2^-11 relative, times up to 127 codes), rounded to nearest: at
                        // most 0.5 + 0.07 of a step off, and a step is at most the row's largest
                        // / 127 (f16 and f32 tensors: closer; Gemma's norm offset rounds).
                        let largest = rm.iter().fold(0f32, |a, x| a.max(x.abs()));
                        let bound = largest / 127.0 * 0.57 + 1e-6 * (1.0 + largest);
                        let worst = rw.iter().zip(rm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                        assert!(worst <= bound, "{family}: {hf} off by {worst} (bound {bound})");
                    }
                }
            }
        }
        eprintln!(
            "{family}: merge --gguf {format:?}: {:?}, {} copied, {} bytes",
            written.formats, written.copied, written.bytes
        );
    }
    dir.join("merged-F32.gguf")
}

/// The base weights as read from the GGUF fixture `gguf` (which llama.cpp's converter wrote),
/// written back by the GGUF export, give the fixture's own tensors: llama.cpp's layout
/// (Llama's Q/K permutation, Gemma's `1 + w` norms, GPT-2's and Phi-3's fused projections) is
/// redone exactly as its converter did it, checked without going through our reader.
fn check_gguf_base_round_trip(family: &str, gguf: &Path, dir: &Path) {
    let base = ranger_train::gguf::load_gguf(gguf).unwrap();
    let out = dir.join("base-again.gguf");
    ranger_train::gguf_export::export_gguf(gguf, &base.weights, GgmlDType::F32, None, &out).unwrap();
    let read = |p: &Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
        let tensors: HashMap<String, Vec<Vec<f32>>> = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    c.tensor(&mut f, n, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap().to_vec2_or_flat(),
                )
            })
            .collect();
        tensors
    };
    let (ours, theirs) = (read(&out), read(gguf));
    assert_eq!(ours.len(), theirs.len(), "{family}");
    for (name, want) in &theirs {
        let got = &ours[name];
        let worst = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Exact but for Gemma's norms, which went through `w - 1` and `+ 1` in f32.
        assert!(worst <= 2e-7, "{family}: {name} written back off by {worst}");
    }
}

/// A tensor's rows (a vector: one row).
trait Rows {
    fn to_vec2_or_flat(&self) -> Vec<Vec<f32>>;
}

impl Rows for Tensor {
    fn to_vec2_or_flat(&self) -> Vec<Vec<f32>> {
        let t = self.to_dtype(DType::F32).unwrap();
        match t.rank() {
            2 => t.to_vec2().unwrap(),
            _ => vec![t.flatten_all().unwrap().to_vec1().unwrap()],
        }
    }
}

/// ModernBERT, a classifier only: trained from the fixture's classifier (`cls` pooling).
#[test]
fn modernbert_writes_what_transformers_and_peft_load() {
    let dir = common::temp_dir("layout-modernbert");
    model_folder(&fixture("modernbert").join("cls"), &dir.join("base"), true);
    let (cases, full) = classifier_cases(&dir, "base");
    let config = read_json(&full.join("config.json"));
    assert_eq!(config["architectures"], json!(["ModernBertForSequenceClassification"]));
    assert_eq!(
        layout(&full.join("model.safetensors")),
        layout(&fixture("modernbert").join("cls/model.safetensors")),
        "modernbert: the classifier folder's tensors"
    );
    export(&dir, "modernbert", cases);
}
