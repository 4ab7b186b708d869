//! Adapters trained elsewhere: PEFT's own adapters (plain LoRA with dropout, DoRA + rsLoRA, LoRA
//! with modules_to_save) on a tiny Llama saved by transformers 5 load into ranger-tune and give
//! the logits transformers + PEFT computed (tests/fixtures/peft_tiny, written by
//! tools/make_peft_fixture.py), and load as trainable variables for further training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ranger_train::model::{DropoutSeed, LlamaConfig, LlamaModel};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_tiny")
}

fn base_model() -> LlamaModel {
    let dir = fixture().join("base");
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = LlamaConfig::from_json(raw, "peft_tiny/base").unwrap();
    let weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    LlamaModel::new(config, &weights).unwrap()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap()
}

fn logits(model: &LlamaModel, reference: &Value) -> Vec<f32> {
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    model.forward_ids(&ids).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(ours: &[f32], theirs: &Value, what: &str) {
    let theirs: Vec<f32> = serde_json::from_value(theirs.clone()).unwrap();
    assert_eq!(ours.len(), theirs.len());
    let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("{what}: max |logit difference| {worst:.2e}");
    assert!(worst < 1e-4, "{what}: logits differ from transformers + PEFT by {worst}");
}

#[test]
fn peft_adapters_give_pefts_logits() {
    let reference = reference();
    let base = base_model();
    let plain = logits(&base, &reference);
    assert_close(&plain, &reference["base"], "base model (transformers 5 config with rope_parameters)");
    for variant in ["lora", "dora_rslora", "saved_modules"] {
        let mut model = base_model();
        ranger_train::peft::load_peft_adapter(&mut model, &fixture().join(variant), None).unwrap();
        let ours = logits(&model, &reference);
        assert!(ours.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "{variant}: the adapter changed nothing");
        assert_close(&ours, &reference[variant], variant);
        // Merging gives the same model.
        let merged: HashMap<String, Tensor> = model.merged_weights().unwrap().into_iter().collect();
        let merged = LlamaModel::new(model.config.clone(), &merged).unwrap();
        assert_close(&logits(&merged, &reference), &reference[variant], &format!("{variant} merged"));
    }
}

#[test]
fn peft_adapters_load_for_further_training() {
    // (variant, trainable tensors): LoRA on 3 projections x 2 layers x (A, B); DoRA on all 7 x 2
    // x (A, B, magnitude); LoRA on o_proj x 2 x (A, B) + lm_head + the final and 4 layer norms.
    for (variant, count) in [("lora", 12), ("dora_rslora", 42), ("saved_modules", 10)] {
        let mut model = base_model();
        let seed = DropoutSeed::default();
        let vars =
            ranger_train::peft::load_peft_adapter(&mut model, &fixture().join(variant), Some((0.1, &seed))).unwrap();
        assert_eq!(vars.len(), count, "{variant}");
        let ids = Tensor::new(&[[3u32, 7, 1, 12, 5]], &Device::Cpu).unwrap();
        seed.set(Some(1));
        let grads = model
            .forward_ids(&ids)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in &vars {
            let g = grads.get(var).unwrap_or_else(|| panic!("{variant}: {name} has no gradient"));
            assert!(
                g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
                "{variant}: {name} has a zero gradient"
            );
        }
    }
}
