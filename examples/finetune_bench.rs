//! Fine-tuning throughput and memory of SmolLM2-135M on CPU, f32, to set beside
//! `tools/bench_pytorch.py` (PyTorch + transformers, same model, data and shape):
//!
//!     cargo run --release --example finetune_bench [-- STEPS]
//!     cargo run --release --example finetune_bench -- 3 --seq 1024 --batch 4 --checkpointing
//!
//! Fetches the model with tools/fetch_test_assets.sh and trains on a synthetic text, each
//! configuration in its own process so each peak is its own, and prints tokens/s (mean over the
//! steps after the first) and the peak resident memory. The first form (sequence 256 x batch
//! 4) runs full fine-tuning with Ranger, with AdamW, and LoRA (r = 8, all projections) with
//! Ranger. `--checkpointing` runs full and LoRA Ranger with and without
//! `--gradient-checkpointing`, alternately, at the shape given, and each once more at
//! 16 tokens x 1: that run's peak is the memory that does not grow with the batch (weights,
//! gradients, optimizer state), and each row's peak less it estimates its activation memory;
//! and full Ranger with 8-bit state (`--optimizer-state-bits 8`) with and without it.
//! `--llama-1b` does the same for a Llama-3.2-1B-shaped model with random weights (written once
//! under the temp folder, 4.3 GB): LoRA + checkpointing and full with 8-bit state +
//! checkpointing, each beside its 16 x 1 run.

use std::path::Path;

use ranger_train::config::OptimizerKind;
use ranger_train::trainer::peak_rss_bytes;
use ranger_train::{prepare, TrainConfig, Trainer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Deterministic filler text: 60 paragraphs of common words.
fn synthetic_text() -> String {
    let words = "the of and to in is was for on that with as by at from his her it an were which are this also be or has had first one their its after new who they have two been other but all when there more into years time".split(' ').collect::<Vec<_>>();
    let mut state = 1u64;
    let mut paras = Vec::new();
    for _ in 0..60 {
        let p: Vec<&str> = (0..220)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                words[(state >> 33) as usize % words.len()]
            })
            .collect();
        paras.push(p.join(" ") + ".");
    }
    paras.join("\n\n")
}

/// One configuration, as the parent process passes it to a child.
struct Run {
    /// `ranger`, `adamw` or `lora` (Ranger).
    name: String,
    seq: usize,
    batch: usize,
    checkpointing: bool,
    /// `--optimizer-state-bits`.
    state_bits: u8,
    /// `smollm2`, or `llama-1b` (random weights).
    model: String,
}

impl Run {
    fn new(name: &str, (seq, batch): (usize, usize), checkpointing: bool, state_bits: u8, model: &str) -> Self {
        Self { name: name.into(), seq, batch, checkpointing, state_bits, model: model.into() }
    }
}

/// A Llama-3.2-1B-shaped configuration (hidden 2048, 16 layers, 32 heads over 8 key/value
/// heads, MLP 8192, tied embeddings) over SmolLM2's tokenizer (vocabulary 49,152): 1.07 B
/// parameters. Memory and speed do not depend on the weights' values.
fn llama_1b_config(smollm2: &serde_json::Value) -> serde_json::Value {
    let mut c = smollm2.clone();
    for (k, v) in [
        ("hidden_size", 2048),
        ("intermediate_size", 8192),
        ("num_hidden_layers", 16),
        ("num_attention_heads", 32),
        ("num_key_value_heads", 8),
        ("head_dim", 64),
    ] {
        c[k] = serde_json::json!(v);
    }
    c["tie_word_embeddings"] = serde_json::json!(true);
    c
}

/// The folder of the random 1B model (written once: SmolLM2's tokenizer and configuration,
/// reshaped, with random f32 weights).
fn llama_1b_folder(gguf: &str, dir: &Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let folder = dir.join("llama-1b");
    if folder.join("done").exists() {
        return Ok(folder);
    }
    let _ = std::fs::remove_dir_all(&folder);
    ranger_train::convert::gguf_to_hf(Path::new(gguf), &folder, candle_core::DType::F32)?;
    for entry in std::fs::read_dir(&folder)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") || path.ends_with("model.safetensors.index.json") {
            std::fs::remove_file(path)?;
        }
    }
    let smollm2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json"))?)?;
    let config = llama_1b_config(&smollm2);
    let cfg = ranger_train::model::LlamaConfig::from_json(config.clone(), "llama-1b")?;
    let mut weights: Vec<_> =
        ranger_train::model::random_weights(&cfg, 1, candle_core::DType::F32)?.into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    ranger_train::weights::save_safetensors_dir(&folder, &weights, ranger_train::weights::DEFAULT_MAX_SHARD_BYTES)?;
    std::fs::write(folder.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(folder.join("done"), "")?;
    Ok(folder)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ranger_train::alloc::tune_mimalloc(); // as ranger-tune does
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse::<usize>().ok());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash").arg(root.join("tools/fetch_test_assets.sh")).output()?;
    let gguf = String::from_utf8(out.stdout)?.lines().last().ok_or("fetch failed")?.trim().to_string();
    let dir = std::env::temp_dir().join("ranger-finetune-bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("data.txt"), synthetic_text())?;
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let run = Run {
            name: args[i + 1].clone(),
            seq: args[i + 2].parse()?,
            batch: args[i + 3].parse()?,
            checkpointing: args[i + 4] == "1",
            state_bits: args[i + 5].parse()?,
            model: args[i + 6].clone(),
        };
        let model = match run.model.as_str() {
            "llama-1b" => llama_1b_folder(&gguf, &dir)?.display().to_string(),
            _ => gguf,
        };
        return child(&model, &dir, steps, &run);
    }
    let shape = (flag("--seq").unwrap_or(256), flag("--batch").unwrap_or(4));
    let mut runs = Vec::new();
    if args.iter().any(|a| a == "--checkpointing") {
        for name in ["ranger", "lora"] {
            runs.push(Run::new(name, (16, 1), false, 32, "smollm2"));
        }
        for checkpointing in [false, true] {
            for name in ["ranger", "lora"] {
                runs.push(Run::new(name, shape, checkpointing, 32, "smollm2"));
            }
            runs.push(Run::new("ranger", shape, checkpointing, 8, "smollm2"));
        }
    } else if args.iter().any(|a| a == "--llama-1b") {
        runs.push(Run::new("lora", (16, 1), false, 32, "llama-1b"));
        runs.push(Run::new("lora", shape, true, 32, "llama-1b"));
        runs.push(Run::new("ranger", (16, 1), false, 8, "llama-1b"));
        runs.push(Run::new("ranger", shape, true, 8, "llama-1b"));
    } else {
        for name in ["ranger", "adamw", "lora"] {
            runs.push(Run::new(name, shape, false, 32, "smollm2"));
        }
    }
    for r in &runs {
        let status = std::process::Command::new(std::env::current_exe()?)
            .arg(steps.to_string())
            .args([
                "--child",
                &r.name,
                &r.seq.to_string(),
                &r.batch.to_string(),
                if r.checkpointing { "1" } else { "0" },
                &r.state_bits.to_string(),
                &r.model,
            ])
            .status()?;
        if !status.success() {
            return Err(format!("benchmark of {} failed", r.name).into());
        }
    }
    Ok(())
}

/// Trains one configuration and prints its figures.
fn child(model: &str, dir: &Path, steps: usize, run: &Run) -> Result<(), Box<dyn std::error::Error>> {
    let optimizer = if run.name == "adamw" { OptimizerKind::Adamw } else { OptimizerKind::Ranger };
    let lora = run.name == "lora";
    let cfg = TrainConfig {
        model: model.to_string(),
        data: dir.join("data.txt").display().to_string(),
        output: dir.join("out").display().to_string(),
        max_seq_length: run.seq,
        batch_size: run.batch,
        max_steps: Some(steps),
        learning_rate: Some(1e-4),
        optimizer,
        lora,
        gradient_checkpointing: run.checkpointing,
        optimizer_state_bits: run.state_bits,
        // Whole sequences of the length asked for (the paragraphs are about 280 tokens long).
        pack: run.seq > 256,
        device: "cpu".into(),
        ..Default::default()
    };
    let mut trainer = Trainer::new(prepare(cfg)?)?;
    eprintln!("peak RSS after loading: {:.2} GiB", peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64);
    trainer.set_verbose(false);
    trainer.run()?;
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl"))?;
    let tps: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["tokens_per_sec"].as_f64())
        .collect();
    let mean = tps[1..].iter().sum::<f64>() / (tps.len() - 1).max(1) as f64;
    let step_peaks: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["peak_rss_bytes"].as_f64())
        .map(|b| b / (1u64 << 30) as f64)
        .collect();
    eprintln!("peak RSS after each step (GiB): {step_peaks:.2?}");
    eprintln!("tokens/s of each step: {tps:.1?}");
    println!(
        "ranger-tune ({optimizer:?}{}{}{}): {} f32, seq {} x batch {}, {steps} steps: {mean:.1} tokens/s (steps 2..{steps}), peak RSS {:.2} GiB",
        if lora { ", LoRA r=8" } else { ", full" },
        if run.state_bits == 8 { ", 8-bit state" } else { "" },
        if run.checkpointing { ", gradient checkpointing" } else { "" },
        if run.model == "llama-1b" { "Llama-1B-shaped (random)" } else { "SmolLM2-135M" },
        run.seq,
        run.batch,
        peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
    );
    let _ = std::fs::remove_dir_all(dir.join("out"));
    Ok(())
}
