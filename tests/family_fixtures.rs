//! The newer decoder families against transformers itself: tiny random models that transformers
//! saved, a PEFT LoRA adapter on every projection, and a sequence classifier of each family
//! (tests/fixtures/families/<family>, written by tools/make_family_fixtures.py) load into
//! ranger-tune and give the logits and class probabilities transformers + PEFT computed, to
//! 1e-4; merging the adapter gives the same logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ranger_train::model::{causal_mask, BackboneConfig, ClassifierBatch, LlamaConfig, LlamaModel, SequenceClassifier};
use serde_json::Value;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families").join(family)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The folder's weights as the model holds them (GPT-2's Conv1D weights transposed).
fn weights(dir: &Path) -> HashMap<String, Tensor> {
    let config = read_json(&dir.join("config.json"));
    let stored = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    stored.into_iter().map(|(n, t)| ranger_train::model::hf_layout::from_disk(&config, n, t).unwrap()).collect()
}

fn base_model(family: &str) -> LlamaModel {
    let dir = fixture(family).join("base");
    let config = LlamaConfig::from_json(read_json(&dir.join("config.json")), family).unwrap();
    LlamaModel::new(config, &weights(&dir)).unwrap()
}

fn input_ids(reference: &Value) -> Tensor {
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    Tensor::new(ids, &Device::Cpu).unwrap()
}

fn logits(model: &LlamaModel, reference: &Value) -> Vec<f32> {
    model.forward_ids(&input_ids(reference)).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(ours: &[f32], theirs: &Value, what: &str) -> f32 {
    let theirs: Vec<f32> = serde_json::from_value(theirs.clone()).unwrap();
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("{what}: max |difference| from transformers {worst:.2e}");
    assert!(worst < 1e-4, "{what}: differs from transformers by {worst}");
    worst
}

/// The base model, the adapter, the merged adapter and the classifier of `family`.
fn check_family(family: &str) {
    let reference = read_json(&fixture(family).join("reference.json"));
    let base = base_model(family);
    let plain = logits(&base, &reference);
    assert_close(&plain, &reference["base"], &format!("{family} base logits"));
    if !reference["base_short"].is_null() {
        let short = base.forward_ids(&input_ids(&reference).narrow(1, 0, 4).unwrap()).unwrap();
        let short: Vec<f32> = short.flatten_all().unwrap().to_vec1().unwrap();
        assert_close(&short, &reference["base_short"], &format!("{family} base logits, first 4 tokens"));
    }

    let mut model = base_model(family);
    ranger_train::peft::load_peft_adapter(&mut model, &fixture(family).join("lora"), None).unwrap();
    let ours = logits(&model, &reference);
    assert!(ours.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "{family}: the adapter changed nothing");
    assert_close(&ours, &reference["lora"], &format!("{family} + PEFT LoRA logits"));
    let merged: HashMap<String, Tensor> = model.merged_weights().unwrap().into_iter().collect();
    let merged = LlamaModel::new(model.config.clone(), &merged).unwrap();
    assert_close(&logits(&merged, &reference), &reference["lora"], &format!("{family} merged LoRA logits"));

    // The sequence classifier: last-token pooling (no padding here) and the `score` head.
    let dir = fixture(family).join("classifier");
    let config = LlamaConfig::from_json(read_json(&dir.join("config.json")), family).unwrap();
    let window = config.sliding_window;
    let classifier = SequenceClassifier::new(BackboneConfig::Decoder(config), 3, &weights(&dir)).unwrap();
    let ids = input_ids(&reference);
    let (b, s) = ids.dims2().unwrap();
    let positions = Tensor::arange(0u32, s as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((b, 1)).unwrap();
    let mask = causal_mask(&vec![vec![1u32; s]; b], window, DType::F32, &Device::Cpu).unwrap();
    let last: Vec<u32> = (0..b).map(|r| (r * s + s - 1) as u32).collect();
    let batch = ClassifierBatch {
        input_ids: ids,
        token_type_ids: None,
        positions,
        mask,
        last_index: Tensor::new(last, &Device::Cpu).unwrap(),
        labels: Tensor::zeros(b, DType::U32, &Device::Cpu).unwrap(),
        n_examples: b,
        n_tokens: b * s,
    };
    let logits = classifier.forward(&batch).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
    assert_close(
        &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &reference["classifier_logits"],
        &format!("{family} classifier logits"),
    );
    assert_close(
        &probs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &reference["classifier_probs"],
        &format!("{family} classifier probabilities"),
    );
}

/// SmolLM3: the Llama stack with rotary embeddings off on the layers `no_rope_layers` names
/// (here the second of four), tied embeddings.
#[test]
fn smollm3_matches_transformers() {
    check_family("smollm3");
}

/// The NoPE layer matters: with rotary embeddings on every layer the logits move away from
/// transformers', so the test above cannot pass by accident.
#[test]
fn smollm3_nope_layer_is_honoured() {
    let reference = read_json(&fixture("smollm3").join("reference.json"));
    let mut raw = read_json(&fixture("smollm3").join("base/config.json"));
    raw["no_rope_layers"] = serde_json::json!([1, 1, 1, 1]);
    let config = LlamaConfig::from_json(raw, "smollm3, rope everywhere").unwrap();
    let model = LlamaModel::new(config, &weights(&fixture("smollm3").join("base"))).unwrap();
    let theirs: Vec<f32> = serde_json::from_value(reference["base"].clone()).unwrap();
    let worst = logits(&model, &reference).iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst > 1e-2, "rotary on the NoPE layer changed the logits by only {worst}");
}

/// Gemma 3 (`gemma3_text`): `(1 + w)` norms around attention and the MLP, q/k norms, scaled
/// embeddings, GeGLU, `query_pre_attn_scalar`, sliding and global layers with their own rotary
/// bases (linear scaling on the global ones), tied embeddings.
#[test]
fn gemma3_matches_transformers() {
    check_family("gemma3");
}

/// The sliding window and the local rotary base matter: widening the window to the whole
/// sequence, or giving the sliding layers the global base, moves the logits away from
/// transformers'.
#[test]
fn gemma3_sliding_layers_are_honoured() {
    let reference = read_json(&fixture("gemma3").join("reference.json"));
    let theirs: Vec<f32> = serde_json::from_value(reference["base"].clone()).unwrap();
    for (what, key, value) in [
        ("a window of 64", "sliding_window", serde_json::json!(64)),
        (
            "the global base on every layer",
            "rope_parameters",
            serde_json::json!({"full_attention": {"factor": 2.0, "rope_theta": 1000000.0, "rope_type": "linear"},
                               "sliding_attention": {"rope_theta": 1000000.0, "rope_type": "default"}}),
        ),
    ] {
        let mut raw = read_json(&fixture("gemma3").join("base/config.json"));
        raw[key] = value;
        let config = LlamaConfig::from_json(raw, what).unwrap();
        let model = LlamaModel::new(config, &weights(&fixture("gemma3").join("base"))).unwrap();
        let worst = logits(&model, &reference).iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst > 1e-3, "{what}: the logits moved by only {worst}");
    }
}

/// Gemma 2: Gemma 3's layout without q/k norms and with one rotary base, plus attention-logit
/// and final-logit soft-capping (at 2 and 3 in the fixture, so both bend the values).
#[test]
fn gemma2_matches_transformers() {
    check_family("gemma2");
}

/// Without either soft-cap, the logits move away from transformers': both caps are applied.
#[test]
fn gemma2_softcaps_are_honoured() {
    let reference = read_json(&fixture("gemma2").join("reference.json"));
    let theirs: Vec<f32> = serde_json::from_value(reference["base"].clone()).unwrap();
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        let mut raw = read_json(&fixture("gemma2").join("base/config.json"));
        raw[key] = serde_json::json!(null);
        let config = LlamaConfig::from_json(raw, key).unwrap();
        let model = LlamaModel::new(config, &weights(&fixture("gemma2").join("base"))).unwrap();
        let worst = logits(&model, &reference).iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst > 1e-2, "without {key}: the logits moved by only {worst}");
    }
}

/// Phi-3: fused `qkv_proj` and `gate_up_proj` (the adapter targets the fused names, as PEFT
/// does), LongRoPE whose pretraining context (6) the 8-token inputs pass, so they take the long
/// factors while their first 4 tokens take the short ones, a 5-token sliding window, untied.
#[test]
fn phi3_matches_transformers() {
    check_family("phi3");
}

/// Phi-4-mini's shape: Phi-3 with 3/4 of each head rotated (partial rotary embeddings) and tied
/// embeddings.
#[test]
fn phi4mini_matches_transformers() {
    check_family("phi4mini");
}

/// LongRoPE's long factors, its attention factor and the sliding window matter: a pretraining
/// context long enough for the inputs (short factors and, with the ratio of the lengths 1, no
/// attention factor) or a window of 64 move the logits away from transformers'.
#[test]
fn phi3_long_rope_and_window_are_honoured() {
    let reference = read_json(&fixture("phi3").join("reference.json"));
    let theirs: Vec<f32> = serde_json::from_value(reference["base"].clone()).unwrap();
    for (what, key, value) in [
        ("a pretraining context of 64", "original_max_position_embeddings", serde_json::json!(64)),
        ("a window of 64", "sliding_window", serde_json::json!(64)),
    ] {
        let mut raw = read_json(&fixture("phi3").join("base/config.json"));
        raw[key] = value.clone();
        if key == "original_max_position_embeddings" {
            raw["rope_parameters"][key] = value;
        }
        let config = LlamaConfig::from_json(raw, what).unwrap();
        let model = LlamaModel::new(config, &weights(&fixture("phi3").join("base"))).unwrap();
        let worst = logits(&model, &reference).iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst > 1e-3, "{what}: the logits moved by only {worst}");
    }
}

/// GPT-2: learned positions, LayerNorms with biases, fused `c_attn`, the plain tanh-GELU MLP, the
/// `Conv1D` weights stored transposed (read through `hf_layout`), tied head; the adapter on
/// `c_attn`, `c_proj` and `c_fc` with PEFT's `fan_in_fan_out`.
#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

/// GPT-2 written back: the merged model saved as a folder stores the `Conv1D` weights as
/// transformers does (`[in, out]`), so the fixture's own files and ours agree tensor by tensor.
#[test]
fn gpt2_folder_round_trips_in_transformers_layout() {
    let dir = fixture("gpt2").join("base");
    let raw = read_json(&dir.join("config.json"));
    let model = base_model("gpt2");
    let ours = ranger_train::model::hf_layout::to_disk(&raw, &model.merged_weights().unwrap()).unwrap();
    let stored = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ours.len(), stored.len());
    for (name, t) in ours {
        let s = &stored[&name];
        assert_eq!(t.dims(), s.dims(), "{name}");
        let d = (t - s).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
}

/// ModernBERT (`ModernBertForSequenceClassification`), `cls` and `mean` pooling, on a batch
/// whose second row is padded after 5 tokens: the classifier collates it as training does
/// (padding mask, local layers narrowed to 2 tokens either side) and gives transformers'
/// logits and probabilities.
#[test]
fn modernbert_classifier_matches_transformers() {
    use ranger_train::classify::{collate, LabeledText};
    let reference = read_json(&fixture("modernbert").join("reference.json"));
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let lengths: Vec<usize> = serde_json::from_value(reference["lengths"].clone()).unwrap();
    let texts: Vec<LabeledText> = ids
        .iter()
        .zip(&lengths)
        .map(|(row, &len)| LabeledText { ids: row[..len].to_vec(), type_ids: vec![0; len], label: 0 })
        .collect();
    for pooling in ["cls", "mean"] {
        let dir = fixture("modernbert").join(pooling);
        let config = LlamaConfig::from_json(read_json(&dir.join("config.json")), pooling).unwrap();
        let classifier = SequenceClassifier::new(BackboneConfig::Decoder(config), 3, &weights(&dir)).unwrap();
        let refs: Vec<&LabeledText> = texts.iter().collect();
        let batch = collate(&refs, 0, classifier.mask_kind(), DType::F32, &Device::Cpu).unwrap();
        let logits = classifier.forward(&batch).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let what = format!("modernbert ({pooling} pooling)");
        assert_close(
            &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &reference[format!("{pooling}_logits")],
            &format!("{what} classifier logits"),
        );
        assert_close(
            &probs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &reference[format!("{pooling}_probs")],
            &format!("{what} classifier probabilities"),
        );
    }
}

/// ModernBERT's local window and its local rotary base matter: a window spanning the sequence,
/// or the global base on the local layers, moves the logits away from transformers'.
#[test]
fn modernbert_local_layers_are_honoured() {
    use ranger_train::classify::{collate, LabeledText};
    let reference = read_json(&fixture("modernbert").join("reference.json"));
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let text = LabeledText { ids: ids[0].clone(), type_ids: vec![0; 8], label: 0 };
    // Mean pooling: every position counts, not only the first one's few neighbours.
    let theirs: Vec<f32> = serde_json::from_value(reference["mean_logits"].clone()).unwrap();
    let dir = fixture("modernbert").join("mean");
    // Over 2 positions either side the two bases' angles differ by at most 0.1 rad, so the
    // local base moves these logits far less than the window (still 1,000x the 1e-7 match).
    for (what, key, value, least) in [
        ("a window of 64", "local_attention", serde_json::json!(64), 1e-3),
        (
            "the global base everywhere",
            "rope_parameters",
            serde_json::json!({"full_attention": {"rope_theta": 160000.0, "rope_type": "default"},
                               "sliding_attention": {"rope_theta": 160000.0, "rope_type": "default"}}),
            1e-4,
        ),
    ] {
        let mut raw = read_json(&dir.join("config.json"));
        raw[key] = value;
        let config = LlamaConfig::from_json(raw, what).unwrap();
        let classifier = SequenceClassifier::new(BackboneConfig::Decoder(config), 3, &weights(&dir)).unwrap();
        let batch = collate(&[&text], 0, classifier.mask_kind(), DType::F32, &Device::Cpu).unwrap();
        let ours: Vec<f32> = classifier.forward(&batch).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let worst = ours.iter().zip(&theirs[..3]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst > least, "{what}: the logits moved by only {worst}");
    }
}
