//! The trainer on tiny random models: data formats and their errors, masking, packing,
//! bit-exact resume, checkpoints, NaN handling, early stopping, outputs, metrics.jsonl as it is written.

mod common;

use std::path::Path;

use candle_core::backprop::GradStore;
use ranger_train::config::{NanPolicy, OptimizerKernel, OptimizerKind};
use ranger_train::data::{load_file, to_sequences, DataOptions};
use ranger_train::tokenizer::TextTokenizer;
use ranger_train::trainer::records::StepRecord;
use ranger_train::trainer::report::MetricsFile;
use ranger_train::{prepare, TrainConfig, TrainError, Trainer};

use common::quiet;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A temporary folder for test `name` with a tiny model folder plus train/validation JSONL files.
fn setup(name: &str) -> common::TempDir {
    let dir = common::temp_dir(name);
    common::write_tiny_model(&dir.join("model"), &common::tiny_config("llama"), 1);
    let mut train = String::new();
    let words = ["red", "blue", "green"];
    for i in 0..24 {
        let w = words[i % 3];
        match i % 3 {
            0 => train.push_str(&format!("{{\"text\": \"the sky is {w} . the grass is {w} .\"}}\n")),
            1 => train.push_str(&format!("{{\"prompt\": \"what color is the cat ?\", \"completion\": \" the cat is {w} .\"}}\n")),
            _ => train.push_str(&format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"what color is the dog ?\"}}, {{\"role\": \"assistant\", \"content\": \"the dog is {w} .\"}}]}}\n"
            )),
        }
    }
    write(&dir.join("train.jsonl"), &train);
    write(&dir.join("val.jsonl"), "{\"text\": \"the sky is blue . the grass is green .\"}\n{\"prompt\": \"what color is the cat ?\", \"completion\": \" the cat is red .\"}\n");
    dir
}

fn config(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: dir.join("model").display().to_string(),
        data: dir.join("train.jsonl").display().to_string(),
        validation_file: Some(dir.join("val.jsonl").display().to_string()),
        output: dir.join("out").display().to_string(),
        max_seq_length: 32,
        batch_size: 3,
        grad_accumulation_steps: 2,
        learning_rate: Some(3e-2),
        beta2: Some(0.99),
        max_steps: Some(steps),
        warmup_steps: Some(2),
        eval_every: 4,
        device: common::test_device_spec(),
        ..Default::default()
    }
}

fn weights_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.session()
        .vars()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_a_loadable_model() {
    let dir = setup("train");
    let mut t = quiet(config(&dir, 16));
    let before = t.evaluate().unwrap().unwrap().loss;
    let s = t.run().unwrap();
    let after = s.eval_loss.unwrap();
    assert!(after < before * 0.8, "eval loss {before} -> {after}");
    assert_eq!(s.steps, 16);
    assert_eq!(s.weights, "slow");
    let out = s.output.unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).exists(), "{f} missing from the output");
    }
    // Reload the output with the regular loader and check it evaluates to the reported loss.
    let mut cfg2 = config(&dir, 1);
    cfg2.model = out.display().to_string();
    let mut t2 = quiet(cfg2);
    let reloaded = t2.evaluate().unwrap().unwrap().loss;
    assert!((reloaded - after).abs() < 1e-5, "reloaded model eval {reloaded} vs {after}");
    // metrics.jsonl: one record per step, with the documented fields; the loss curve exists.
    let lines = common::read_jsonl(&dir.join("out/metrics.jsonl"));
    assert_eq!(lines.len(), 17, "the baseline evaluation (step 0) and one record per step");
    assert_eq!(lines[0]["step"], 0);
    assert!((lines[0]["eval_loss"].as_f64().unwrap() - before).abs() < 1e-9);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_sec", "peak_rss_bytes"] {
        assert!(lines[1].get(key).is_some(), "metrics record lacks {key}");
    }
    assert!(lines[4]["eval_loss"].is_f64());
    assert!(std::fs::read_to_string(dir.join("out/loss_curve.svg")).unwrap().contains("<polyline"));
    // Only the last save_total_limit (2) checkpoints are kept, and no partial one is left.
    let names: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
    assert_eq!(names.iter().filter(|n| n.starts_with("checkpoint-")).count(), 1, "{names:?}");
}

/// `lora`: None for full fine-tuning, else (DoRA, dropout).
fn resume_exact(optimizer: OptimizerKind, lora: Option<(bool, f64)>) {
    resume_exact_with_state_bits(optimizer, lora, 32);
}

fn resume_exact_with_state_bits(optimizer: OptimizerKind, lora: Option<(bool, f64)>, bits: u8) {
    let dir = setup(&format!("resume-{optimizer:?}-{lora:?}-{bits}"));
    let n = 7; // crosses a Lookahead sync (k = 6) and the epoch boundary (24 examples / 6 per step = 4 steps)
    let mut cfg = common::with_lora(config(&dir, 2 * n), lora);
    cfg.optimizer = optimizer;
    cfg.optimizer_state_bits = bits;
    // Each interrupted `run` call does one step and writes a checkpoint.
    let (straight, stopped_at, mut resumed) = common::straight_and_resumed(&cfg, &dir, n, |s| {
        assert_eq!(s.stopped, "interrupted");
        assert!(s.output.is_none(), "an interrupted run writes no final model");
    });
    assert_eq!(stopped_at, n);
    assert_eq!(resumed.state().step, n);
    let s = resumed.run().unwrap();
    assert_eq!(s.steps, 2 * n);
    assert_eq!(
        weights_bits(&straight),
        weights_bits(&resumed),
        "{optimizer:?}: resumed weights differ from the straight run"
    );
    let a = std::fs::read_to_string(dir.join("straight/metrics.jsonl")).unwrap();
    let b = std::fs::read_to_string(dir.join("resumed/metrics.jsonl")).unwrap();
    assert_eq!(a.lines().count(), 2 * n + 1);
    let losses = |t: &str| {
        t.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().map(f64::to_bits))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&a), losses(&b), "per-step losses differ after resume");
}

#[test]
fn resume_is_bit_exact_with_ranger() {
    resume_exact(OptimizerKind::Ranger, None);
}

/// AdamW's moments are saved and restored too (candle-ranger's AdamW).
#[test]
fn resume_is_bit_exact_with_adamw() {
    resume_exact(OptimizerKind::Adamw, None);
}

#[test]
fn resume_is_bit_exact_with_lora() {
    resume_exact(OptimizerKind::Ranger, Some((false, 0.0)));
}

/// Dropout masks are drawn again identically after a resume (seeded per micro-batch).
#[test]
fn resume_is_bit_exact_with_dora_and_lora_dropout() {
    resume_exact(OptimizerKind::Ranger, Some((true, 0.2)));
}

/// 8-bit and bf16 state: bytes, scales and rounding streams are saved and restored (CPU only).
#[test]
fn resume_is_bit_exact_with_8_and_16_bit_ranger_state() {
    if common::test_device_spec() == "cpu" {
        resume_exact_with_state_bits(OptimizerKind::Ranger, None, 8);
        resume_exact_with_state_bits(OptimizerKind::Adamw, Some((false, 0.0)), 8);
        resume_exact_with_state_bits(OptimizerKind::Ranger, Some((true, 0.2)), 16);
    }
}

/// `--optimizer-kernel tensor-ops` computes the fused kernel's update op by op: the same run to
/// float rounding (each weight within 1e-3 after 8 steps of up to lr 3e-2 each), and a checkpoint
/// written with one kernel resumes with the other (the option may change on resume).
#[test]
fn optimizer_kernels_agree_and_may_change_on_resume() {
    let dir = setup("optimizer-kernel");
    let n = 4;
    let cfg = config(&dir, 2 * n);
    // The fused run straight through, and the same run interrupted after n steps.
    let (fused, stopped_at, _) = common::straight_and_resumed(&cfg, &dir, n, |_| {});
    assert_eq!(stopped_at, n);
    let ops_cfg = TrainConfig { optimizer_kernel: OptimizerKernel::TensorOps, ..cfg.clone() };
    let mut ops = quiet(TrainConfig { output: dir.join("ops").display().to_string(), ..ops_cfg.clone() });
    ops.run().unwrap();
    // The interrupted fused run, resumed with tensor ops.
    let mut mixed = quiet(TrainConfig { resume: Some(dir.join("resumed").display().to_string()), ..ops_cfg.clone() });
    assert_eq!(mixed.state().step, n);
    assert_eq!(mixed.run().unwrap().steps, 2 * n);
    let weights = |t: &Trainer| -> Vec<(String, Vec<f32>)> {
        t.session()
            .vars()
            .iter()
            .map(|(name, v)| (name.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    };
    let reference = weights(&fused);
    for (what, other) in [("tensor ops", weights(&ops)), ("fused, resumed with tensor ops", weights(&mixed))] {
        let mut largest = 0f32;
        for ((name, a), (_, b)) in reference.iter().zip(&other) {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-3, "{what}: {name} differs from the fused run by {diff}");
            largest = largest.max(diff);
        }
        eprintln!("{what}: largest weight difference from the fused run {largest:e}");
        // Not bit for bit: the fused kernels (CPU, CUDA) centralize with an f64 mean, the tensor ops with
        // Candle's f32 one. So a run that ignored the option would show no difference at all.
        assert!(largest > 0.0, "{what}: bit-identical to the fused run: was the option applied?");
    }
}

#[test]
fn resume_is_bit_exact_with_radam() {
    resume_exact(OptimizerKind::Radam, None);
}

/// `--gradient-checkpointing` changes memory and time only: a run with it gives the weights and
/// per-step losses of the run without it, bit for bit, and a checkpoint written with it resumes
/// exactly without it (the option may change on resume, for a run that ran out of memory).
fn checkpointing_changes_nothing(lora: Option<(bool, f64)>) {
    let dir = setup(&format!("checkpointing-{lora:?}"));
    let n = 4;
    let plain_cfg = common::with_lora(config(&dir, 2 * n), lora);
    let mut plain = quiet(TrainConfig { output: dir.join("plain").display().to_string(), ..plain_cfg.clone() });
    plain.run().unwrap();
    let cfg = TrainConfig { gradient_checkpointing: true, ..plain_cfg };
    let (straight, stopped_at, _) = common::straight_and_resumed(&cfg, &dir, n, |_| {});
    assert_eq!(stopped_at, n);
    assert_eq!(weights_bits(&plain), weights_bits(&straight), "{lora:?}: weights differ with checkpointing");
    let losses = |run: &str| {
        common::read_jsonl(&dir.join(run).join("metrics.jsonl"))
            .iter()
            .filter_map(|l| l["loss"].as_f64().map(f64::to_bits))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses("plain"), losses("straight"), "{lora:?}: per-step losses differ with checkpointing");
    let mut resumed = quiet(TrainConfig {
        gradient_checkpointing: false,
        output: dir.join("resumed").display().to_string(),
        resume: Some(dir.join("resumed").display().to_string()),
        ..cfg
    });
    assert_eq!(resumed.state().step, n);
    resumed.run().unwrap();
    assert_eq!(weights_bits(&plain), weights_bits(&resumed), "{lora:?}: resumed without checkpointing");
    assert_eq!(losses("plain"), losses("resumed"));
}

#[test]
fn gradient_checkpointing_gives_the_same_run_and_resumes_either_way() {
    checkpointing_changes_nothing(None);
}

#[test]
fn gradient_checkpointing_with_dora_and_lora_dropout_gives_the_same_run() {
    checkpointing_changes_nothing(Some((true, 0.2)));
}

#[test]
fn resume_refuses_other_data_or_options() {
    let dir = setup("resume-refuse");
    quiet(config(&dir, 2)).run().unwrap();
    let mut other = config(&dir, 4);
    other.batch_size = 2;
    other.resume = Some(dir.join("out").display().to_string());
    let err = Trainer::new(prepare(other).unwrap()).err().unwrap().to_string();
    assert!(err.contains("different options"), "{err}");
}

/// `--chat-template`: a model without a template (as a base model's GGUF file) refuses `messages`
/// data and names the option; given a template file it trains, and the saved model carries the
/// template; a missing file is named.
#[test]
fn a_chat_template_file_renders_messages_for_a_model_without_one() {
    let dir = setup("chat-template");
    let template = ranger_train::testing::take_chat_template(&dir.join("model"));
    let err = prepare(config(&dir, 2)).err().expect("messages data needs a template").to_string();
    assert!(err.contains("train.jsonl:3") && err.contains("--chat-template"), "{err}");

    let file = dir.join("chat.jinja");
    let mut cfg = config(&dir, 2);
    cfg.chat_template = Some(file.display().to_string());
    let err = prepare(cfg.clone()).err().expect("a missing template file").to_string();
    assert!(err.contains("chat.jinja"), "{err}");
    write(&file, template.as_str().unwrap());
    let s = quiet(cfg).run().unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.output.unwrap().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["chat_template"], template, "the saved model carries the template it trained with");
}

/// A checkpoint whose tensor bytes were damaged on disk (one flipped byte past the header, which
/// safetensors itself does not notice) is refused, naming the file and the checkpoint before it;
/// that one resumes, and so does one without checksums (written before they were recorded).
#[test]
fn resume_refuses_a_damaged_checkpoint_and_names_the_previous_one() {
    let dir = setup("damaged");
    let cfg = config(&dir, 4);
    let mut t = quiet(cfg.clone());
    for _ in 0..2 {
        common::interrupted_run(&mut t);
    }
    drop(t);
    let file = dir.join("out/checkpoint-2/model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = data_start + (bytes.len() - data_start) / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    assert!(candle_core::safetensors::load(&file, &candle_core::Device::Cpu).is_ok(), "still a readable file");
    let mut resume = cfg.clone();
    resume.resume = Some(dir.join("out").display().to_string());
    let err = Trainer::new(prepare(resume.clone()).unwrap()).err().expect("a damaged checkpoint is refused");
    let text = err.to_string();
    assert!(matches!(err, TrainError::CheckpointDamaged { .. }), "{text}");
    assert!(text.contains("checkpoint-2/model.safetensors: damaged (CRC-32 "), "{text}");
    assert!(text.contains(&format!("--resume {}", dir.join("out/checkpoint-1").display())), "{text}");
    resume.resume = Some(dir.join("out/checkpoint-1").display().to_string());
    assert_eq!(quiet(resume.clone()).state().step, 1);
    let state_file = dir.join("out/checkpoint-1/trainer_state.json");
    let mut state = common::read_json(&state_file);
    let sums = state.as_object_mut().unwrap().remove("checksums").unwrap();
    assert_eq!(
        sums["model.safetensors"]["bytes"],
        std::fs::metadata(dir.join("out/checkpoint-1/model.safetensors")).unwrap().len()
    );
    assert!(sums["optimizer.safetensors"]["crc32"].as_str().is_some_and(|c| c.len() == 8), "{sums}");
    write(&state_file, &state.to_string());
    assert_eq!(quiet(resume).state().step, 1);
}

#[test]
fn malformed_lines_name_file_and_line() {
    let dir = setup("malformed");
    let tok = TextTokenizer::from_dir(&dir.join("model")).unwrap();
    let cases = [
        ("{\"text\": \"the cat\"}\n{\"text\": \"the dog\"\n", 2, "invalid JSON"),
        ("{\"text\": \"the cat\"}\n\n{\"prompt\": \"a\"}\n", 3, "expected `text`"),
        ("{\"text\": 5}\n", 1, "must be a string"),
        ("[1, 2]\n", 1, "JSON object"),
        ("{\"messages\": [{\"role\": \"user\"}]}\n", 1, "messages"),
    ];
    for (text, line, what) in cases {
        let p = dir.join("bad.jsonl");
        write(&p, text);
        let err = load_file(&p, &tok, &DataOptions::default()).unwrap_err();
        assert!(matches!(&err, TrainError::Data { line: l, .. } if *l == line), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("bad.jsonl:{line}:")) && msg.contains(what), "{msg}");
    }
    let p = dir.join("empty.jsonl");
    write(&p, "\n\n");
    let err = load_file(&p, &tok, &DataOptions::default()).unwrap_err().to_string();
    assert!(err.contains("no trainable example"), "{err}");
    // Everything truncated away: a prompt longer than the limit leaves no completion token.
    write(&p, "{\"prompt\": \"the cat sat on the mat the cat sat on the mat\", \"completion\": \" red\"}\n");
    let err = load_file(&p, &tok, &DataOptions { max_seq_len: 4, ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("max_seq_length=4"), "{err}");
}

#[test]
fn prompt_and_chat_masking_train_only_on_answers() {
    let dir = setup("masking");
    let tok = TextTokenizer::from_dir(&dir.join("model")).unwrap();
    let p = dir.join("m.jsonl");
    write(&p, "{\"prompt\": \"what color is the cat ?\", \"completion\": \" red .\"}\n{\"messages\": [{\"role\": \"system\", \"content\": \"hello\"}, {\"role\": \"user\", \"content\": \"what color ?\"}, {\"role\": \"assistant\", \"content\": \"blue\"}, {\"role\": \"user\", \"content\": \"sky ?\"}, {\"role\": \"assistant\", \"content\": \"green .\"}]}\n");
    let data = load_file(&p, &tok, &DataOptions::default()).unwrap();
    let trained = |i: usize| -> String {
        let ex = &data.examples[i];
        let ids: Vec<u32> = ex.ids.iter().zip(&ex.target).filter(|(_, &t)| t).map(|(&id, _)| id).collect();
        tok.decode(&ids, false).unwrap()
    };
    assert_eq!(trained(0), "red . <eos>");
    // Assistant turns (content, end token), not the role header, system or user turns.
    assert_eq!(trained(1), "blue <eos> green . <eos>");
    let all = load_file(&p, &tok, &DataOptions { mask_prompt: false, ..Default::default() }).unwrap();
    assert!(all.examples[0].target.iter().all(|&t| t));
}

#[test]
fn packing_fills_sequences_without_crossing_examples() {
    let dir = setup("packing");
    let tok = TextTokenizer::from_dir(&dir.join("model")).unwrap();
    let data =
        load_file(&dir.join("train.jsonl"), &tok, &DataOptions { max_seq_len: 32, pack: true, mask_prompt: true })
            .unwrap();
    let packed = to_sequences(&data.examples, &DataOptions { max_seq_len: 32, pack: true, mask_prompt: true });
    let single = to_sequences(&data.examples, &DataOptions { max_seq_len: 32, pack: false, mask_prompt: true });
    assert_eq!(single.len(), 24);
    assert!(packed.len() <= 12, "{} packed sequences", packed.len());
    for s in &packed {
        assert!(s.ids.len() <= 32);
        for i in 1..s.ids.len() {
            if s.segment[i] != s.segment[i - 1] {
                assert_eq!(s.position[i], 0);
                assert!(!s.target[i], "the first token of a packed example is not predicted from the previous one");
            }
        }
    }
    let total: usize = packed.iter().map(|s| s.ids.len()).sum();
    assert_eq!(total, data.examples.iter().map(|e| e.ids.len()).sum::<usize>());
    // And a packed run trains.
    let mut cfg = config(&dir, 3);
    cfg.pack = true;
    quiet(cfg).run().unwrap();
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = setup("nan");
    let mut cfg = config(&dir, 4);
    cfg.save_every = 1;
    // Two good steps (each `run` with the stop flag set does one step and checkpoints).
    let mut t = quiet(cfg.clone());
    for _ in 0..2 {
        common::interrupted_run(&mut t);
    }
    drop(t);
    let ckpt = dir.join("out/checkpoint-2/model.safetensors");
    let good = std::fs::read(&ckpt).unwrap();
    // Go on from the checkpoint with poisoned weights: the loss is NaN at once.
    let mut cfg2 = cfg.clone();
    cfg2.resume = Some(dir.join("out").display().to_string());
    let mut t = quiet(cfg2.clone());
    assert_eq!(t.state().step, 2);
    let emb = &t.session().vars()[0].1;
    emb.set(&emb.as_tensor().affine(0.0, f64::NAN).unwrap()).unwrap();
    let err = t.run().unwrap_err();
    assert!(matches!(err, TrainError::NonFiniteLoss { step: 3, .. }), "{err}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), good, "the last good checkpoint is untouched");
    assert!(!dir.join("out/checkpoint-3").exists());
    // With --on-nan skip the run goes on (every batch is skipped here) and finishes.
    let mut cfg4 = cfg2;
    cfg4.on_nan = NanPolicy::Skip;
    cfg4.save_every = 0;
    cfg4.output = dir.join("skip").display().to_string();
    cfg4.resume = None;
    let mut t = quiet(cfg4);
    let emb = &t.session().vars()[0].1;
    emb.set(&emb.as_tensor().affine(0.0, f64::NAN).unwrap()).unwrap();
    let s = t.run().unwrap();
    assert_eq!(s.steps, 4, "every batch is skipped, the run still completes its bookkeeping");
    assert!(s.checkpoint.unwrap().ends_with("checkpoint-4"));
    let metrics = std::fs::read_to_string(dir.join("skip/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"skipped\":true")).count(), 4);
}

#[test]
fn resuming_an_earlier_checkpoint_keeps_the_new_one() {
    let dir = setup("prune");
    let mut cfg = config(&dir, 6);
    cfg.save_every = 2;
    cfg.save_total_limit = 1;
    let mut t = quiet(cfg.clone());
    t.run().unwrap();
    assert!(dir.join("out/checkpoint-6").exists() && !dir.join("out/checkpoint-2").exists());
    // Keep a copy of step 2 by re-running 2 steps elsewhere, then resume from it into `out`.
    let mut early = cfg.clone();
    early.output = dir.join("early").display().to_string();
    let mut e = quiet(early);
    for _ in 0..2 {
        common::interrupted_run(&mut e);
    }
    std::fs::rename(dir.join("early/checkpoint-2"), dir.join("out/checkpoint-2")).unwrap();
    let mut r = cfg.clone();
    r.resume = Some(dir.join("out/checkpoint-2").display().to_string());
    let mut rt = quiet(r);
    let s = common::interrupted_run(&mut rt);
    let written = s.checkpoint.unwrap();
    assert!(written.ends_with("checkpoint-3") && written.exists(), "the checkpoint just written was pruned");
    assert!(dir.join("out/checkpoint-6").exists(), "a later checkpoint of another run is not ours to delete");
}

#[test]
fn missing_gradients_are_named() {
    let dir = setup("missing-grad");
    let t = quiet(config(&dir, 1));
    let err = t.check_gradients(&GradStore::default()).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj.weight (no gradient)"), "{err}");
}

#[test]
fn early_stopping_ends_the_run() {
    let dir = setup("early");
    let mut cfg = config(&dir, 40);
    cfg.eval_every = 1;
    cfg.learning_rate = Some(0.0); // nothing improves after the first evaluation
    cfg.early_stopping_patience = Some(2);
    let s = quiet(cfg).run().unwrap();
    assert_eq!(s.steps, 2, "the baseline evaluation counts as the best so far: {}", s.stopped);
    assert!(s.stopped.to_string().starts_with("early stopping"), "{}", s.stopped);
    assert!(s.output.is_some());
}

#[test]
fn half_precision_and_adamw_runs_train() {
    let dir = setup("bf16");
    let mut cfg = config(&dir, 4);
    cfg.dtype = ranger_train::config::DTypeArg::Bf16;
    let s = quiet(cfg).run().unwrap();
    assert!(s.eval_loss.unwrap().is_finite());
    let mut cfg = config(&dir, 4);
    cfg.optimizer = OptimizerKind::Adamw;
    cfg.output = dir.join("adamw").display().to_string();
    let s = quiet(cfg).run().unwrap();
    assert_eq!(s.weights, "fast");
}

#[test]
fn val_split_holds_out_examples() {
    let dir = setup("split");
    let mut cfg = config(&dir, 1);
    cfg.validation_file = None;
    cfg.val_split = 0.25;
    let t = quiet(cfg);
    assert_eq!(t.session().task().n_val(), 6);
    assert_eq!(t.session().task().n_train(), 18);
}

#[test]
fn large_outputs_are_sharded_and_reload() {
    let dir = setup("shards");
    let mut cfg = config(&dir, 2);
    cfg.max_shard_size = 20_000; // bytes: the tiny model then needs several shards
    let mut t = quiet(cfg);
    let s = t.run().unwrap();
    let out = s.output.unwrap();
    assert!(!out.join("model.safetensors").exists());
    let index = common::read_json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), t.session().vars().len());
    let files: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 2, "{files:?}");
    assert!(files.iter().all(|f| f.starts_with("model-000") && f.contains("-of-000") && out.join(f).exists()));
    let total: u64 = t.session().vars().iter().map(|(_, v)| (v.elem_count() * 4) as u64).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), total);
    let mut cfg2 = config(&dir, 1);
    cfg2.model = out.display().to_string();
    let reloaded = quiet(cfg2).evaluate().unwrap().unwrap().loss;
    assert!((reloaded - s.eval_loss.unwrap()).abs() < 1e-5);
}

#[test]
fn lora_trains_adapters_only_and_writes_a_peft_adapter() {
    lora_round_trip("lora", false, false, 0.0);
}

#[test]
fn dora_rslora_with_dropout_trains_and_writes_a_peft_adapter() {
    lora_round_trip("dora", true, true, 0.1);
}

fn lora_round_trip(name: &str, dora: bool, rslora: bool, dropout: f64) {
    let dir = setup(name);
    let mut cfg = config(&dir, 24);
    cfg.learning_rate = Some(0.1); // adapters start at zero and want a larger rate
    cfg.lora = true;
    cfg.lora_rank = 4;
    cfg.dora = dora;
    cfg.rslora = rslora;
    cfg.lora_dropout = dropout;
    cfg.lora_targets = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
    let mut t = quiet(cfg);
    // Only the adapters are trainable: 2 layers x 3 targets x (A + B (+ DoRA's magnitude)).
    let per_module = if dora { 3 } else { 2 };
    assert_eq!(t.session().vars().len(), 6 * per_module);
    let magnitudes = if dora { 32 + 16 + 32 } else { 0 };
    let expected: usize = (0..2).map(|_| 4 * 32 + 32 * 4 + 4 * 32 + 16 * 4 + 4 * 48 + 32 * 4 + magnitudes).sum();
    assert_eq!(t.trainable_parameters(), expected);
    let before = t.evaluate().unwrap().unwrap().loss;
    let s = t.run().unwrap();
    assert!(s.eval_loss.unwrap() < before * 0.9, "eval {before} -> {:?}", s.eval_loss);
    let out = s.output.unwrap();
    assert!(out.ends_with("adapter"));
    let cfg_json = common::read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["lora_alpha"], 16.0);
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert_eq!(cfg_json["use_dora"], dora);
    assert_eq!(cfg_json["use_rslora"], rslora);
    assert_eq!(cfg_json["lora_dropout"], dropout);
    let tensors =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 6 * per_module);
    if dora {
        assert_eq!(tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"].dims(), &[16]);
    }
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, 32]);
    assert_eq!(b.dims(), &[32, 4]);
    assert!(b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "B moved away from zero");
    // Round trip: base + the saved adapter gives exactly the evaluated model's logits.
    let (base_config, base) = common::decoder_base(ranger_train::source::load_dir(&dir.join("model")).unwrap());
    let mut reloaded = ranger_train::model::LlamaModel::new(base_config, &base).unwrap();
    let adapter_vars = ranger_train::peft::load_peft_adapter(&mut reloaded, &out, None).unwrap();
    assert_eq!(adapter_vars.len(), 6 * per_module);
    let ids = candle_core::Tensor::new(&[[5u32, 9, 12, 7, 20]], &candle_core::Device::Cpu).unwrap();
    let ours = reloaded.forward_ids(&ids).unwrap();
    let trained = t
        .with_slow_weights(|s| {
            let m = s.task().causal_lm().unwrap();
            m.forward_ids(&ids.to_device(m.device()).unwrap()).unwrap()
        })
        .unwrap();
    common::assert_same_outputs(&ours, &trained, "adapter round trip changed the model");
    // Merging gives the same model as base + adapter.
    let m = common::merged(&reloaded).forward_ids(&ids).unwrap();
    let d = common::max_abs_diff(&m, &reloaded.forward_ids(&ids).unwrap());
    assert!(d < 1e-5, "merged model differs by {d}");
    // Training goes on from a saved adapter: it starts where the adapter left off.
    let mut more = config(&dir, 2);
    more.lora = true;
    more.lora_adapter = Some(out.display().to_string());
    more.output = dir.join("more").display().to_string();
    let mut t2 = quiet(more);
    assert_eq!(t2.session().vars().len(), 6 * per_module);
    let start = t2.evaluate().unwrap().unwrap().loss;
    assert!((start - s.eval_loss.unwrap()).abs() < 1e-5, "{start} vs {:?}", s.eval_loss);
    t2.run().unwrap();
    // The adapter keeps its configuration; the dropout recorded is this run's (0 by default).
    let copied = common::read_json(&dir.join("more/adapter/adapter_config.json"));
    let mut expected_cfg = cfg_json.clone();
    expected_cfg["lora_dropout"] = serde_json::json!(0.0);
    assert_eq!(copied, expected_cfg);
    // An unknown target is refused by name.
    let mut bad = config(&dir, 1);
    bad.lora = true;
    bad.lora_targets = vec!["qproj".into()];
    let err = prepare(bad).err().unwrap().to_string();
    assert!(err.contains("qproj"), "{err}");
}

/// PEFT's `modules_to_save` for causal LMs: the named modules (a path suffix, as PEFT matches
/// them) train whole, are saved under PEFT's names, and reload and merge to the trained model.
/// With tied embeddings, `embed_tokens` stays one matrix, saved tied (`ensure_weight_tying`).
#[test]
fn modules_to_save_train_whole_and_round_trip() {
    use candle_core::{Device, Tensor};
    for tied in [false, true] {
        let dir = setup(&format!("modules-to-save-{tied}"));
        let mut model_cfg = common::tiny_config("llama");
        model_cfg["tie_word_embeddings"] = serde_json::json!(tied);
        common::write_tiny_model(&dir.join("model"), &model_cfg, 1);
        let mut cfg = config(&dir, 6);
        cfg.lora = true;
        cfg.lora_rank = 4;
        cfg.modules_to_save = if tied { vec!["embed_tokens".into()] } else { vec!["lm_head".into(), "norm".into()] };
        let mut t = quiet(cfg.clone());
        let whole = |t: &Trainer| -> Vec<String> {
            let mut n: Vec<String> =
                t.session().vars().iter().map(|(n, _)| n.clone()).filter(|n| !n.contains(".lora_")).collect();
            n.sort();
            n
        };
        let mut expected: Vec<String> = if tied {
            vec!["model.embed_tokens.weight".into()]
        } else {
            // "norm" selects every module whose path ends with it, as in PEFT.
            let mut v = vec!["lm_head.weight".to_string(), "model.norm.weight".into()];
            for l in 0..2 {
                v.push(format!("model.layers.{l}.input_layernorm.weight"));
                v.push(format!("model.layers.{l}.post_attention_layernorm.weight"));
            }
            v
        };
        expected = expected.iter().map(|n| format!("base_model.model.{n}")).collect();
        expected.sort();
        assert_eq!(whole(&t), expected);
        let before: Vec<Tensor> = t
            .session()
            .vars()
            .iter()
            .filter(|(n, _)| !n.contains(".lora_"))
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let s = t.run().unwrap();
        let out = s.output.clone().unwrap();
        let moved = t.session().vars().iter().filter(|(n, _)| !n.contains(".lora_")).zip(&before).all(|((_, v), b)| {
            (v.as_tensor() - b).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
        });
        assert!(moved, "every saved module was trained");
        let ac = common::read_json(&out.join("adapter_config.json"));
        assert_eq!(ac["modules_to_save"], serde_json::json!(cfg.modules_to_save));
        assert_eq!(ac["ensure_weight_tying"] == true, tied);
        let tensors = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        for n in &expected {
            assert!(tensors.contains_key(n), "{n} not saved");
        }
        if tied {
            // PEFT saves a tied matrix under both names.
            let d = common::max_abs_diff(
                &tensors["base_model.model.lm_head.weight"],
                &tensors["base_model.model.model.embed_tokens.weight"],
            );
            assert_eq!(d, 0.0);
        }
        // Base + adapter (LoRA and saved modules) is the trained model, unmerged and merged.
        let (base_config, base) = common::decoder_base(ranger_train::source::load_dir(&dir.join("model")).unwrap());
        let mut reloaded = ranger_train::model::LlamaModel::new(base_config, &base).unwrap();
        ranger_train::peft::load_peft_adapter(&mut reloaded, &out, None).unwrap();
        let ids = Tensor::new(&[[5u32, 9, 12, 7, 20]], &Device::Cpu).unwrap();
        let ours = reloaded.forward_ids(&ids).unwrap();
        let trained = t
            .with_slow_weights(|s| {
                let m = s.task().causal_lm().unwrap();
                m.forward_ids(&ids.to_device(m.device()).unwrap()).unwrap()
            })
            .unwrap();
        common::assert_same_outputs(&ours, &trained, &format!("tied {tied}: reloaded adapter differs"));
        let m = common::merged(&reloaded).forward_ids(&ids).unwrap();
        assert!(common::max_abs_diff(&m, &ours) < 1e-5, "merged model differs");
        // Going on from the adapter trains the saved modules again.
        let mut more = config(&dir, 1);
        more.lora = true;
        more.lora_adapter = Some(out.display().to_string());
        more.output = dir.join("more").display().to_string();
        assert_eq!(whole(&quiet(more)), expected);
        if tied {
            // An adapter that trains the embeddings and the head of a tied model apart is refused.
            let mut ac = ac.clone();
            ac["ensure_weight_tying"] = serde_json::json!(false);
            std::fs::write(out.join("adapter_config.json"), ac.to_string()).unwrap();
            let mut t2 = tensors.clone();
            let head = (&t2["base_model.model.lm_head.weight"] + 1.0).unwrap();
            t2.insert("base_model.model.lm_head.weight".into(), head);
            candle_core::safetensors::save(&t2, out.join("adapter_model.safetensors")).unwrap();
            let mut m = ranger_train::model::LlamaModel::new(reloaded.config.clone(), &base).unwrap();
            let err = ranger_train::peft::load_peft_adapter(&mut m, &out, None).err().unwrap().to_string();
            assert!(err.contains("tied"), "{err}");
        }
    }
    // An entry that selects nothing, or modules_to_save without LoRA, is refused.
    let dir = setup("modules-to-save-bad");
    let mut bad = config(&dir, 1);
    bad.lora = true;
    bad.modules_to_save = vec!["classifier".into()];
    let err = prepare(bad.clone()).err().unwrap().to_string();
    assert!(err.contains("\"classifier\""), "{err}");
    bad.lora = false;
    assert!(prepare(bad).err().unwrap().to_string().contains("needs LoRA"));
}

/// Checks, as each step ends, that `metrics.jsonl` already holds that step's line after one line
/// per earlier step; fails the run (as a crash would) at step `crash_at`.
struct MetricsWatch {
    path: std::path::PathBuf,
    crash_at: Option<usize>,
}

impl ranger_train::TrainObserver for MetricsWatch {
    fn on_step(&mut self, step: &StepRecord) -> ranger_train::Result<()> {
        let steps: Vec<usize> = MetricsFile::read(&self.path).iter().map(|r| r.step).collect();
        assert_eq!(steps, (0..=step.step).collect::<Vec<_>>(), "metrics.jsonl as step {} ends", step.step);
        if self.crash_at == Some(step.step) {
            return Err(TrainError::io(&self.path)(std::io::Error::other("a crash, for the test")));
        }
        Ok(())
    }
}

/// The lines of a `metrics.jsonl` without the figures that measure the machine.
fn reproducible_lines(path: &Path) -> Vec<String> {
    MetricsFile::read(path).iter().map(|r| serde_json::to_string(&r.without_timings()).unwrap()).collect()
}

#[test]
fn metrics_stream_as_steps_end_and_a_resume_keeps_one_history() {
    let dir = setup("metrics-stream");
    let mut cfg = config(&dir, 12);
    cfg.save_every = 4;
    cfg.output = dir.join("straight").display().to_string();
    quiet(cfg.clone()).run().unwrap();
    // A run that fails at step 6: its metrics hold steps 0..=6, its latest checkpoint is step 4.
    cfg.output = dir.join("out").display().to_string();
    let metrics = dir.join("out/metrics.jsonl");
    let mut t = quiet(cfg.clone());
    t.add_observer(Box::new(MetricsWatch { path: metrics.clone(), crash_at: Some(6) }));
    assert!(t.run().is_err());
    drop(t);
    assert_eq!(MetricsFile::read(&metrics).last().unwrap().step, 6);
    // Resumed from step 4, steps 5 and 6 are dropped from the file before step 5 is done again
    // (the watch sees 0..=5 as step 5 ends).
    cfg.resume = Some(dir.join("out").display().to_string());
    let mut t = quiet(cfg);
    assert_eq!(t.state().step, 4);
    t.add_observer(Box::new(MetricsWatch { path: metrics.clone(), crash_at: None }));
    t.run().unwrap();
    let lines = reproducible_lines(&metrics);
    assert_eq!(lines.len(), 13, "{lines:#?}");
    assert_eq!(lines, reproducible_lines(&dir.join("straight/metrics.jsonl")), "one history, the straight run's");
}

/// GPT-2's learned positions end at its table (here 8 of them): sequences are cut to it, so
/// `--max-seq-length` beyond it trains instead of failing on a position past the table, and
/// generating past it is an error naming the limit.
#[test]
fn learned_positions_cut_sequences_to_the_table() {
    let dir = common::temp_dir("gpt2-positions");
    let mut config = common::tiny_config("gpt2");
    config["n_positions"] = serde_json::json!(8);
    common::write_tiny_model(&dir.join("model"), &config, 1);
    let long = "the sky is red . the grass is green . the sky is blue . the grass is red .";
    write(&dir.join("train.jsonl"), &format!("{{\"text\": \"{long}\"}}\n").repeat(6));
    let mut cfg = config_without_validation(&dir, 2);
    cfg.max_seq_length = 32;
    let mut t = quiet(cfg);
    t.run().unwrap();
    let model = ranger_train::model::LlamaModel::new(
        ranger_train::model::LlamaConfig::from_json(config, "gpt2").unwrap(),
        &t.model_weights().unwrap().into_iter().collect(),
    )
    .unwrap();
    let ids = candle_core::Tensor::new(&[[3u32; 9]], &candle_core::Device::Cpu).unwrap();
    let err = model.forward_ids(&ids).unwrap_err().to_string();
    assert!(err.contains("learned positions for 8 tokens"), "{err}");
}

fn config_without_validation(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig { validation_file: None, ..config(dir, steps) }
}
