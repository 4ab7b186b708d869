//! Full fine-tuning throughput and memory of SmolLM2-135M on CPU, f32, sequence 256, batch 4,
//! to set beside `tools/bench_pytorch.py` (PyTorch + transformers, same model, data and shape):
//!
//!     cargo run --release --example finetune_bench [-- STEPS]
//!
//! Fetches the model with tools/fetch_test_assets.sh, trains on a synthetic text — full
//! fine-tuning with Ranger, with AdamW, and LoRA (r = 8, all projections) with Ranger — each in
//! its own process so each peak is its own, and prints tokens/s (mean over the steps after the
//! first) and the peak resident memory.

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ranger_train::alloc::tune_mimalloc(); // as ranger-tune does
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash").arg(root.join("tools/fetch_test_assets.sh")).output()?;
    let gguf = String::from_utf8(out.stdout)?.lines().last().ok_or("fetch failed")?.trim().to_string();
    let dir = std::env::temp_dir().join("ranger-finetune-bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("data.txt"), synthetic_text())?;
    let only = std::env::args().nth(2);
    if only.is_none() {
        for name in ["ranger", "adamw", "lora"] {
            let status =
                std::process::Command::new(std::env::current_exe()?).arg(steps.to_string()).arg(name).status()?;
            if !status.success() {
                return Err(format!("benchmark of {name} failed").into());
            }
        }
        return Ok(());
    }
    let optimizer = if only.as_deref() == Some("adamw") { OptimizerKind::Adamw } else { OptimizerKind::Ranger };
    let lora = only.as_deref() == Some("lora");
    {
        let cfg = TrainConfig {
            model: gguf.clone(),
            data: dir.join("data.txt").display().to_string(),
            output: dir.join("out").display().to_string(),
            max_seq_length: 256,
            batch_size: 4,
            max_steps: Some(steps),
            learning_rate: Some(1e-4),
            optimizer,
            lora,
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
            "ranger-tune ({optimizer:?}{}): SmolLM2-135M f32, seq 256 x batch 4, {steps} steps: {mean:.1} tokens/s (steps 2..{steps}), peak RSS {:.2} GiB",
            if lora { ", LoRA r=8" } else { ", full" },
            peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
        );
        let _ = std::fs::remove_dir_all(dir.join("out"));
    }
    Ok(())
}
