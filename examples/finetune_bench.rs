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
//! Ranger, and QLoRA (the same over the GGUF file's Q4_1 blocks). `--checkpointing` runs full,
//! LoRA and QLoRA Ranger with and without
//! `--gradient-checkpointing`, alternately, at the shape given, and each once more at
//! 16 tokens x 1: that run's peak is the memory that does not grow with the batch (weights,
//! gradients, optimizer state), and each row's peak less it estimates its activation memory;
//! and full Ranger with 8-bit state (`--optimizer-state-bits 8`) with and without it.
//! `--llama-1b` does the same for a Llama-3.2-1B-shaped model with random weights (written once
//! under the temp folder, 4.3 GB): LoRA + checkpointing, QLoRA (the base quantized to q4_k as
//! it is read) + checkpointing, and full with 8-bit state + checkpointing, each beside its
//! 16 x 1 run. `--llama-3b` runs QLoRA (q4_k) + checkpointing on a Llama-3.2-3B-shaped model
//! (2.97 B parameters, random bf16 weights written once, 5.9 GB) beside its 16 x 1 run.
//! `--llama-8b` does the same on a Llama-3.1-8B-shaped model (7.8 B parameters, SmolLM2's
//! vocabulary) written once as a Q4_K GGUF file of random weights (4.4 GB).
//! `--gemma3-270m` trains a Gemma-3-270M-shaped model (`gemma3_text`: hidden 640, 18 layers, 4
//! heads over 1 key/value head of 256, MLP 2048, a 262,144-token tied vocabulary, sliding
//! windows of 512 on five layers in six; random weights over SmolLM2's tokenizer, written once)
//! fully, with LoRA and with QLoRA (q4_k on load), beside SmolLM2 fully, alternately, at the
//! shape given.
//! `--phi3-135m` trains SmolLM2-135M's shape in Phi-3's layout (`phi3`: fused `qkv_proj` and
//! `gate_up_proj`, 3/4 of each head rotated as in Phi-4-mini; random weights, written once)
//! fully and with LoRA, each beside SmolLM2 itself, alternately: the same parameters, so the
//! rows show what the fused layout costs.
//! `--gpt2-124m` does the same for a GPT-2-small-shaped model (`gpt2`: 768 wide, 12 layers of 12
//! heads, MLP 3072, 1,024 learned positions, SmolLM2's 49,152-token tokenizer, tied; 124 M
//! parameters, random weights).
//! `--only qlora,lora` keeps those configurations alone.

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
    /// `ranger`, `adamw`, `lora` (Ranger, over the f32 base) or `qlora` (over the GGUF file's
    /// blocks; the 1B model's safetensors base quantized to q4_k on load).
    name: String,
    seq: usize,
    batch: usize,
    checkpointing: bool,
    /// `--optimizer-state-bits`.
    state_bits: u8,
    /// `smollm2`, or `llama-1b`, `llama-3b`, `llama-8b`, `gemma3-270m`, `phi3-135m`, `gpt2-124m`
    /// (random weights).
    model: String,
}

impl Run {
    fn new(name: &str, (seq, batch): (usize, usize), checkpointing: bool, state_bits: u8, model: &str) -> Self {
        Self { name: name.into(), seq, batch, checkpointing, state_bits, model: model.into() }
    }
}

/// A Llama-3.2-1B-shaped configuration (hidden 2048, 16 layers, 32 heads over 8 key/value
/// heads, MLP 8192, tied embeddings) over SmolLM2's tokenizer (vocabulary 49,152): 1.07 B
/// parameters; or Llama-3.2-3B-shaped (hidden 3072, 28 layers, 24 heads over 8, head 128):
/// 2.97 B. Memory and speed do not depend on the weights' values.
fn llama_config(smollm2: &serde_json::Value, model: &str) -> serde_json::Value {
    let mut c = smollm2.clone();
    let dims = match model {
        "llama-3b" => [3072, 8192, 28, 24, 8, 128],
        _ => [2048, 8192, 16, 32, 8, 64],
    };
    for (k, v) in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ]
    .into_iter()
    .zip(dims)
    {
        c[k] = serde_json::json!(v);
    }
    c["tie_word_embeddings"] = serde_json::json!(true);
    c
}

/// The folder of the random `llama-1b` (f32 weights), `llama-3b` (bf16 weights, 5.9 GB),
/// `gemma3-270m`, `phi3-135m` or `gpt2-124m` (f32) model, written once: SmolLM2's tokenizer and
/// configuration, reshaped (or replaced by Gemma 3's, or relabelled Phi-3), with random weights.
fn random_folder(gguf: &str, dir: &Path, model: &str) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let folder = dir.join(model);
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
    let config = match model {
        "gemma3-270m" => gemma3_config(&smollm2),
        "phi3-135m" => phi3_config(&smollm2),
        "gpt2-124m" => gpt2_config(&smollm2),
        _ => llama_config(&smollm2, model),
    };
    let cfg = ranger_train::model::LlamaConfig::from_json(config.clone(), model)?;
    let dtype = if model == "llama-3b" { candle_core::DType::BF16 } else { candle_core::DType::F32 };
    let mut weights: Vec<_> = ranger_train::model::random_weights(&cfg, 1, dtype)?.into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    // GPT-2 stores its Conv1D weights transposed.
    let weights = ranger_train::model::hf_layout::to_disk(&config, &weights)?;
    ranger_train::weights::save_safetensors_dir(&folder, &weights, ranger_train::weights::DEFAULT_MAX_SHARD_BYTES)?;
    std::fs::write(folder.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(folder.join("done"), "")?;
    Ok(folder)
}

/// A GPT-2-small-shaped configuration over SmolLM2's tokenizer (see the module documentation).
fn gpt2_config(smollm2: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_inner": null, "n_positions": 1024, "vocab_size": 49152, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "tie_word_embeddings": true,
        "bos_token_id": smollm2["bos_token_id"], "eos_token_id": smollm2["eos_token_id"],
        "pad_token_id": smollm2["pad_token_id"],
    })
}

/// SmolLM2-135M's configuration in Phi-3's layout (see the module documentation).
fn phi3_config(smollm2: &serde_json::Value) -> serde_json::Value {
    let mut c = smollm2.clone();
    c["architectures"] = serde_json::json!(["Phi3ForCausalLM"]);
    c["model_type"] = serde_json::json!("phi3");
    c["partial_rotary_factor"] = serde_json::json!(0.75);
    c
}

/// A Gemma-3-270M-shaped `gemma3_text` configuration (see the module documentation): 268 M
/// parameters, 168 M of them in the tied embedding.
fn gemma3_config(smollm2: &serde_json::Value) -> serde_json::Value {
    let layer_types: Vec<&str> =
        (0..18).map(|l| if (l + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect();
    serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
        "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "vocab_size": 262144,
        "max_position_embeddings": 32768, "sliding_window": 512, "layer_types": layer_types,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
        "bos_token_id": smollm2["bos_token_id"], "eos_token_id": smollm2["eos_token_id"],
        "pad_token_id": smollm2["pad_token_id"],
    })
}

/// A Llama-3.1-8B-shaped GGUF file (hidden 4096, 32 layers, 32 heads over 8 key/value heads,
/// MLP 14336, untied head) over SmolLM2's tokenizer (vocabulary 49,152): 7.8 B parameters,
/// random weights quantized to Q4_K (norms f32), 4.4 GB, written once. Each tensor is drawn and
/// quantized in turn, so the f32 model never exists.
fn llama_8b_gguf(gguf: &str, dir: &Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let path = dir.join("llama-8b.gguf");
    if path.exists() {
        return Ok(path);
    }
    let mut file = std::fs::File::open(gguf)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut meta = content.metadata.clone();
    for (k, v) in [
        ("llama.embedding_length", 4096u32),
        ("llama.feed_forward_length", 14336),
        ("llama.block_count", 32),
        ("llama.attention.head_count", 32),
        ("llama.attention.head_count_kv", 8),
        ("llama.rope.dimension_count", 128),
    ] {
        meta.insert(k.to_string(), Value::U32(v));
    }
    let (h, ff, kv, vocab) = (4096usize, 14336usize, 1024usize, 49152usize);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, h]),
        ("output_norm.weight".into(), vec![h]),
        ("output.weight".into(), vec![vocab, h]),
    ];
    for l in 0..32 {
        for (n, shape) in [
            ("attn_norm", vec![h]),
            ("ffn_norm", vec![h]),
            ("attn_q", vec![h, h]),
            ("attn_k", vec![kv, h]),
            ("attn_v", vec![kv, h]),
            ("attn_output", vec![h, h]),
            ("ffn_gate", vec![ff, h]),
            ("ffn_up", vec![ff, h]),
            ("ffn_down", vec![h, ff]),
        ] {
            shapes.push((format!("blk.{l}.{n}.weight"), shape));
        }
    }
    let mut tensors = Vec::new();
    for (i, (name, shape)) in shapes.into_iter().enumerate() {
        let norm = shape.len() == 1;
        let t = ranger_train::weights::random_tensors(vec![(name.clone(), shape)], i as u64, candle_core::DType::F32)?;
        let t = t.into_values().next().ok_or("no tensor")?;
        let t = if norm { (t.ones_like()? + 0.0)? } else { t };
        tensors.push((name, QTensor::quantize(&t, if norm { GgmlDType::F32 } else { GgmlDType::Q4K })?));
    }
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let tmp = dir.join("llama-8b.gguf.tmp");
    gguf_file::write(&mut std::io::BufWriter::new(std::fs::File::create(&tmp)?), &meta, &refs)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
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
            "llama-1b" | "llama-3b" | "gemma3-270m" | "phi3-135m" | "gpt2-124m" => {
                random_folder(&gguf, &dir, &run.model)?.display().to_string()
            }
            "llama-8b" => llama_8b_gguf(&gguf, &dir)?.display().to_string(),
            _ => gguf,
        };
        return child(&model, &dir, steps, &run);
    }
    let shape = (flag("--seq").unwrap_or(256), flag("--batch").unwrap_or(4));
    let mut runs = Vec::new();
    if args.iter().any(|a| a == "--checkpointing") {
        for name in ["ranger", "lora", "qlora"] {
            runs.push(Run::new(name, (16, 1), false, 32, "smollm2"));
        }
        for checkpointing in [false, true] {
            for name in ["ranger", "lora", "qlora"] {
                runs.push(Run::new(name, shape, checkpointing, 32, "smollm2"));
            }
            runs.push(Run::new("ranger", shape, checkpointing, 8, "smollm2"));
        }
    } else if args.iter().any(|a| a == "--llama-1b") {
        for name in ["lora", "qlora"] {
            runs.push(Run::new(name, (16, 1), false, 32, "llama-1b"));
            runs.push(Run::new(name, shape, true, 32, "llama-1b"));
        }
        runs.push(Run::new("ranger", (16, 1), false, 8, "llama-1b"));
        runs.push(Run::new("ranger", shape, true, 8, "llama-1b"));
    } else if args.iter().any(|a| a == "--llama-8b") {
        runs.push(Run::new("qlora", (16, 1), false, 32, "llama-8b"));
        runs.push(Run::new("qlora", shape, true, 32, "llama-8b"));
    } else if args.iter().any(|a| a == "--gemma3-270m") {
        for _ in 0..2 {
            runs.push(Run::new("ranger", shape, false, 32, "gemma3-270m"));
            runs.push(Run::new("ranger", shape, false, 32, "smollm2"));
            runs.push(Run::new("lora", shape, false, 32, "gemma3-270m"));
            runs.push(Run::new("qlora", shape, false, 32, "gemma3-270m"));
        }
    } else if let Some(model) =
        ["phi3-135m", "gpt2-124m"].into_iter().find(|m| args.iter().any(|a| *a == format!("--{m}")))
    {
        for _ in 0..2 {
            for name in ["ranger", "lora"] {
                runs.push(Run::new(name, shape, false, 32, model));
                runs.push(Run::new(name, shape, false, 32, "smollm2"));
            }
        }
    } else if args.iter().any(|a| a == "--llama-3b") {
        runs.push(Run::new("qlora", (16, 1), false, 32, "llama-3b"));
        runs.push(Run::new("qlora", shape, true, 32, "llama-3b"));
    } else {
        for name in ["ranger", "adamw", "lora", "qlora"] {
            runs.push(Run::new(name, shape, false, 32, "smollm2"));
        }
    }
    // `--only qlora,lora`: those configurations alone.
    if let Some(only) = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)) {
        let names: Vec<&str> = only.split(',').collect();
        runs.retain(|r| names.contains(&r.name.as_str()));
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
    let lora = run.name == "lora" || run.name == "qlora";
    let qlora = run.name == "qlora";
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
        dequantize: lora && !qlora,
        quantize: (qlora && run.model != "smollm2").then_some(ranger_train::config::QuantizeArg::Q4K),
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
        if qlora {
            ", QLoRA r=8"
        } else if lora {
            ", LoRA r=8"
        } else {
            ", full"
        },
        if run.state_bits == 8 { ", 8-bit state" } else { "" },
        if run.checkpointing { ", gradient checkpointing" } else { "" },
        match run.model.as_str() {
            "llama-1b" => "Llama-1B-shaped (random)",
            "llama-3b" => "Llama-3B-shaped (random, bf16 on disk)",
            "llama-8b" => "Llama-8B-shaped (random, Q4_K GGUF)",
            "gemma3-270m" => "Gemma-3-270M-shaped (random)",
            "phi3-135m" => "SmolLM2-135M-shaped Phi-3 (random)",
            "gpt2-124m" => "GPT-2-124M-shaped (random)",
            _ => "SmolLM2-135M",
        },
        run.seq,
        run.batch,
        peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
    );
    let _ = std::fs::remove_dir_all(dir.join("out"));
    Ok(())
}
