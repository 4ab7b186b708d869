//! QLoRA: LoRA and DoRA over a base kept in GGUF blocks. The model over quantized projections
//! computes the same maths as over the dequantized weights (gradients equal to float rounding,
//! fused and op by op, with and without activation checkpointing), its adapter gradients pass
//! a finite-difference check, and `--quantize` on a safetensors base trains, saves, resumes
//! exactly and refuses what it cannot do. The real-model runs (SmolLM2's Q4_1 GGUF: PEFT
//! reload, merge, resume) are in `smollm2_e2e.rs`.

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use ranger_train::config::QuantizeArg;
use ranger_train::kernels::grad_sink::GradSink;
use ranger_train::kernels::quantized::QuantizedWeight;
use ranger_train::kernels::without_fused_kernels;
use ranger_train::model::lora::DropoutSeed;
use ranger_train::model::{Batch, LlamaConfig, LlamaModel, LoraConfig};
use ranger_train::rng::Rng;
use ranger_train::TrainConfig;
use serde_json::json;

/// A tiny model of `arch` (an untied Llama; Gemma 3 and Gemma 2, tied, the latter with its
/// final-logit soft-capping, which takes the quantized head through its dense path) whose
/// projections' input widths (64 and 96) are whole Q4_1 / Q8_0 blocks.
fn config_of(arch: &str) -> LlamaConfig {
    let mut c = common::tiny_config(arch);
    c["hidden_size"] = json!(64);
    c["intermediate_size"] = json!(96);
    c["head_dim"] = json!(16);
    if arch == "gpt2" {
        // GPT-2's own field names: 64 wide, 4 heads of 16, MLP 96.
        c["n_embd"] = json!(64);
        c["n_inner"] = json!(96);
    }
    if arch == "phi3" {
        // Half of a 16-wide head rotates: four LongRoPE factors.
        c["rope_scaling"] =
            json!({"type": "longrope", "short_factor": [1.0, 1.5, 1.2, 2.0], "long_factor": [2.0, 5.0, 3.0, 4.0]});
    }
    LlamaConfig::from_json(c, "test").unwrap()
}

/// The base's weights (f32 on the CPU) with its projections, embedding and LM head quantized
/// (Q4_1 for the attention and the head, Q8_0 for the MLP and the embedding), and the same
/// weights with those dequantized.
fn bases(cfg: &LlamaConfig) -> (HashMap<String, Tensor>, HashMap<String, QTensor>, HashMap<String, Tensor>) {
    let mut weights = ranger_train::model::random_weights(cfg, 11, DType::F32).unwrap();
    let mut quantized = HashMap::new();
    let mut dense = weights.clone();
    for name in weights.keys().cloned().collect::<Vec<_>>() {
        if !ranger_train::loaded::is_quantizable(&name) {
            continue;
        }
        let format =
            if name.contains("self_attn") || name == "lm_head.weight" { GgmlDType::Q4_1 } else { GgmlDType::Q8_0 };
        let q = QTensor::quantize(&weights.remove(&name).unwrap(), format).unwrap();
        dense.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
        quantized.insert(name, q);
    }
    (weights, quantized, dense)
}

/// The model over quantized projections and over their dequantized values, in `dtype`, with
/// the same LoRA (or DoRA) adapters, B made non-zero; the adapters' variables of each.
#[allow(clippy::type_complexity)]
fn models(
    arch: &str,
    dtype: DType,
    dora: bool,
    dropout: f64,
    seed: &DropoutSeed,
) -> ((LlamaModel, Vec<(String, Var)>), (LlamaModel, Vec<(String, Var)>)) {
    let cfg = config_of(arch);
    let (rest, quantized, dense) = bases(&cfg);
    let cast = |m: &HashMap<String, Tensor>| -> HashMap<String, Tensor> {
        m.iter().map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap())).collect()
    };
    let blocks: HashMap<String, QuantizedWeight> =
        quantized.into_iter().map(|(n, q)| (n, QuantizedWeight::new(q, dtype, &Device::Cpu).unwrap())).collect();
    let targets = cfg.lora_targets();
    let lora = LoraConfig { rank: 3, alpha: 6.0, dropout, use_dora: dora, targets, ..Default::default() };
    let with_adapters = |mut model: LlamaModel| {
        let vars = model.add_lora(&lora, 9, seed).unwrap();
        let mut rng = Rng::new(5);
        for (_, v) in vars.iter().filter(|(n, _)| n.ends_with("lora_B.weight")) {
            let data: Vec<f64> = (0..v.elem_count()).map(|_| 0.1 * rng.normal()).collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
        }
        (model, vars)
    };
    let q = LlamaModel::with_quantized(cfg.clone(), &cast(&rest), &blocks).unwrap();
    let expected = cfg.num_hidden_layers * cfg.projections().len() + 1 + usize::from(!cfg.tie_word_embeddings);
    assert_eq!(
        q.quantized_weights().iter().map(|(_, n, _)| n).sum::<usize>(),
        expected,
        "projections, embedding, head"
    );
    let d = LlamaModel::new(cfg, &cast(&dense)).unwrap();
    (with_adapters(q), with_adapters(d))
}

/// The adapters' gradients of one training micro-batch as the trainer computes them (forward
/// under an active sink with the dropout seed set), as f64 values by name.
fn gradients(model: &LlamaModel, vars: &[(String, Var)], seed: &DropoutSeed, batch: &Batch) -> Vec<(String, Vec<f64>)> {
    let sink = GradSink::new();
    seed.set(Some(77));
    let loss = {
        let _on = sink.activate();
        model.loss_sum(batch, true).unwrap()
    };
    seed.set(None);
    let mut grads: GradStore = loss.backward().unwrap();
    sink.merge_into(&mut grads).unwrap();
    vars.iter()
        .map(|(n, v)| {
            let g = grads.get(v).unwrap_or_else(|| panic!("{n} has no gradient"));
            (n.clone(), g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

/// Over quantized projections every adapter gradient equals the one over the dequantized base
/// to float rounding (relative to each tensor's largest): f32 and f64, LoRA and DoRA with
/// dropout, fused kernels and the op-by-op path, with and without activation checkpointing;
/// for Llama, Gemma 3, Gemma 2, Phi-3 (fused projections) and GPT-2.
#[test]
fn qlora_gradients_equal_those_over_the_dequantized_base() {
    for arch in ["llama", "gemma3_text", "gemma2", "phi3", "gpt2"] {
        for (dtype, tolerance) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
            for (dora, dropout) in [(false, 0.0), (false, 0.2), (true, 0.2)] {
                let seed = DropoutSeed::default();
                let ((mut q, qvars), (mut d, dvars)) = models(arch, dtype, dora, dropout, &seed);
                let batch = common::test_batch(common::TINY_VOCAB, dtype);
                for checkpointing in [false, true] {
                    q.set_gradient_checkpointing(checkpointing);
                    d.set_gradient_checkpointing(checkpointing);
                    for fused in [true, false] {
                        let what = format!(
                            "{arch} {dtype:?} dora {dora} dropout {dropout} ckpt {checkpointing} fused {fused}"
                        );
                        let run = || (gradients(&q, &qvars, &seed, &batch), gradients(&d, &dvars, &seed, &batch));
                        let (gq, gd) = if fused { run() } else { without_fused_kernels(run) };
                        for ((name, a), (_, b)) in gq.iter().zip(&gd) {
                            let top = b.iter().fold(0f64, |m, x| m.max(x.abs()));
                            assert!(top > 0.0, "{what}: {name} has an all-zero gradient");
                            let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                            assert!(diff <= tolerance * top, "{what}: {name} differs by {diff} (largest {top})");
                        }
                    }
                }
            }
        }
    }
}

/// The LoRA adapters over quantized projections get their true gradients: a central finite
/// difference in f64 through the quantized forward pass. (DoRA's are not the true gradient by
/// design, its row norm being a constant in backprop; the test above compares them.)
#[test]
fn qlora_adapter_gradients_pass_a_finite_difference_check() {
    let seed = DropoutSeed::default();
    let ((model, vars), _) = models("llama", DType::F64, false, 0.0, &seed);
    let batch = common::test_batch(common::TINY_VOCAB, DType::F64);
    let loss = || model.loss_sum(&batch, false).unwrap();
    let grads = model.loss_sum(&batch, true).unwrap().backward().unwrap();
    let mut rng = Rng::new(17);
    for (name, var) in &vars {
        let g = common::gradient(&grads, var, name);
        for _ in 0..2 {
            common::check_gradient_element(var, &g, rng.below(g.len()), name, || loss().to_scalar::<f64>().unwrap());
        }
    }
}

/// A tiny model folder whose projections take `--quantize`, and JSONL data.
fn setup(name: &str) -> common::TempDir {
    let dir = common::temp_dir(name);
    let mut c = common::tiny_config("llama");
    c["hidden_size"] = json!(64);
    c["intermediate_size"] = json!(80);
    c["head_dim"] = json!(16);
    common::write_tiny_model(&dir.join("model"), &c, 1);
    let lines: Vec<String> = (0..16)
        .map(|i| json!({"prompt": "what color is the cat ?", "completion": format!(" the cat is {} .", ["red", "blue"][i % 2])}).to_string())
        .collect();
    std::fs::write(dir.join("train.jsonl"), lines.join("\n")).unwrap();
    dir
}

fn run_config(dir: &std::path::Path, out: &str, steps: usize) -> TrainConfig {
    TrainConfig {
        model: dir.join("model").display().to_string(),
        data: dir.join("train.jsonl").display().to_string(),
        output: dir.join(out).display().to_string(),
        max_seq_length: 32,
        batch_size: 4,
        learning_rate: Some(3e-2),
        beta2: Some(0.99),
        max_steps: Some(steps),
        lora: true,
        quantize: Some(QuantizeArg::Q4K),
        device: common::test_device_spec(),
        ..Default::default()
    }
}

/// `--quantize q4_k` on a safetensors base: widths that are not whole 256-value super-blocks
/// fall back as llama.cpp does (q5_0 for the 64-wide projections, embedding and head; the
/// 80-wide input of down_proj fits no 32-value block and stays f32), the loss falls, a resume
/// is exact, a module trained whole is dequantized for it; without LoRA it is refused by name.
#[test]
fn quantize_on_load_trains_and_resumes_exactly() {
    let dir = setup("qlora-quantize");
    let mut t = common::quiet(run_config(&dir, "run", 6));
    let quantized = t.session().task().causal_lm().unwrap().quantized_weights();
    assert_eq!(quantized.len(), 1, "{quantized:?}");
    assert_eq!((quantized[0].0, quantized[0].1), (GgmlDType::Q5_0, 14));
    let s = t.run().unwrap();
    let losses: Vec<f64> =
        common::read_jsonl(&dir.join("run/metrics.jsonl")).iter().filter_map(|m| m["loss"].as_f64()).collect();
    assert!(losses.last().unwrap() < &losses[0], "training loss {losses:?}");
    assert!(s.output.unwrap().join("adapter_model.safetensors").exists());

    let (straight, _, mut resumed) = common::straight_and_resumed(&run_config(&dir, "x", 3), &dir, 1, |_| {});
    resumed.run().unwrap();
    for ((n, a), (_, b)) in straight.session().vars().iter().zip(resumed.session().vars()) {
        let bits = |v: &Var| -> Vec<u32> {
            v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(a), bits(b), "{n} differs after resume");
    }

    let mut saving = run_config(&dir, "saved", 1);
    saving.modules_to_save = vec!["embed_tokens".into()];
    let mut t = common::quiet(saving);
    assert_eq!(t.session().task().causal_lm().unwrap().quantized_weights()[0].1, 13, "the embedding is trained dense");
    assert!(t.session().vars().iter().any(|(n, _)| n == "base_model.model.model.embed_tokens.weight"));
    t.run().unwrap();

    let mut full = run_config(&dir, "full", 1);
    full.lora = false;
    let err = ranger_train::prepare(full).err().expect("--quantize without --lora is refused");
    assert!(err.to_string().contains("quantize"), "{err}");
}
