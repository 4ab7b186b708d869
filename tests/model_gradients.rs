//! Every weight of every supported architecture gets its true gradient (finite-difference
//! check in f64 on tiny random configs, with packing and padding in the batch), and the
//! forward pass agrees with candle-transformers' inference implementations.

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use ranger_train::data::{collate, Sequence};
use ranger_train::kernels::grad_sink::GradSink;
use ranger_train::model::{causal_lm_loss_sum, Batch, LlamaConfig, LlamaModel};
use ranger_train::rng::Rng;
use serde_json::{json, Value};

fn build(config: &Value, dtype: DType, seed: u64) -> (LlamaConfig, Vec<(String, Var)>, LlamaModel) {
    let cfg = LlamaConfig::from_json(config.clone(), "test").unwrap();
    let weights = ranger_train::model::random_weights(&cfg, seed, DType::F64).unwrap();
    let vars = ranger_train::weights::to_vars(
        ranger_train::model::into_tensors(&cfg, weights, dtype, &Device::Cpu, "test").unwrap(),
    )
    .unwrap();
    let model = LlamaModel::from_vars(cfg.clone(), &vars).unwrap();
    (cfg, vars, model)
}

fn loss(model: &LlamaModel, batch: &Batch) -> Tensor {
    causal_lm_loss_sum(&model.forward(batch).unwrap(), batch).unwrap()
}

/// Compares the analytic gradient `g[i]` of `var` with a central finite difference.
fn check_element(model: &LlamaModel, batch: &Batch, var: &Var, g: &[f64], i: usize, what: &str) {
    common::check_gradient_element(var, g, i, what, || loss(model, batch).to_scalar::<f64>().unwrap());
}

fn gradient_check(config: Value) {
    let name = config["model_type"].as_str().unwrap().to_string();
    let (_, vars, model) = build(&config, DType::F64, 11);
    let batch = common::test_batch(common::TINY_VOCAB, DType::F64);
    let grads = loss(&model, &batch).backward().unwrap();
    let mut rng = Rng::new(17);
    for (wname, var) in &vars {
        let g = common::gradient(&grads, var, &format!("{name}: {wname}"));
        // The key bias has a true gradient of zero (softmax is shift-invariant per query).
        if !wname.ends_with("k_proj.bias") {
            assert!(g.iter().any(|x| *x != 0.0), "{name}: {wname} has an all-zero gradient");
        }
        for _ in 0..4 {
            check_element(&model, &batch, var, &g, rng.below(g.len()), &format!("{name}: {wname}"));
        }
    }
}

#[test]
fn llama_untied_gqa_gradients() {
    gradient_check(common::tiny_config("llama"));
}

#[test]
fn llama_tied_llama3_rope_scaling_gradients() {
    let mut c = common::tiny_config("llama");
    c["tie_word_embeddings"] = json!(true);
    c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    gradient_check(c);
}

#[test]
fn mistral_gradients() {
    gradient_check(common::tiny_config("mistral"));
}

#[test]
fn qwen2_bias_gradients() {
    gradient_check(common::tiny_config("qwen2"));
}

#[test]
fn gemma2_softcap_gradients() {
    gradient_check(common::tiny_config("gemma2"));
}

#[test]
fn gemma3_gradients() {
    gradient_check(common::tiny_config("gemma3_text"));
}

/// GPT-2: learned positions, LayerNorm with biases, fused `c_attn`, plain tanh-GELU MLP, biases
/// on every projection, tied head.
#[test]
fn gpt2_gradients() {
    gradient_check(common::tiny_config("gpt2"));
}

/// Phi-3: fused projections, partial rotary embeddings, LongRoPE; the test batch reaches past
/// the tiny config's pretraining context (4 tokens), so the long factors are used.
#[test]
fn phi3_long_rope_gradients() {
    gradient_check(common::tiny_config("phi3"));
}

/// Phi-3 within its pretraining context: the short factors.
#[test]
fn phi3_short_rope_gradients() {
    let mut c = common::tiny_config("phi3");
    c["original_max_position_embeddings"] = json!(16);
    gradient_check(c);
}

#[test]
fn smollm3_nope_layer_gradients() {
    gradient_check(common::tiny_config("smollm3"));
}

#[test]
fn qwen3_qk_norm_gradients() {
    gradient_check(common::tiny_config("qwen3"));
}

/// Packed examples must not see each other: the second example's logits are the same as
/// when it is alone in its row.
#[test]
fn packed_examples_do_not_attend_to_each_other() {
    let (_, _, model) = build(&common::tiny_config("llama"), DType::F64, 5);
    let packed = Sequence {
        ids: vec![5, 6, 7, 8, 9, 10, 11],
        target: vec![true; 7],
        segment: vec![0, 0, 0, 1, 1, 1, 1],
        position: vec![0, 1, 2, 0, 1, 2, 3],
    };
    let alone =
        Sequence { ids: vec![8, 9, 10, 11], target: vec![true; 4], segment: vec![0; 4], position: vec![0, 1, 2, 3] };
    let a =
        model.forward(&collate(&[&packed], 2, None, DType::F64, &Device::Cpu).unwrap()).unwrap().i((0, 3..7)).unwrap();
    let b =
        model.forward(&collate(&[&alone], 2, None, DType::F64, &Device::Cpu).unwrap()).unwrap().i((0, 0..4)).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff < 1e-10, "{diff}");
}

/// Our forward pass and candle-transformers' inference models give the same last-position
/// logits on the same weights.
fn compare_with_candle(model_type: &str) {
    compare_config_with_candle(model_type, common::tiny_config(model_type));
}

fn compare_config_with_candle(model_type: &str, config: Value) {
    let (cfg, vars, ours) = build(&config, DType::F32, 23);
    let tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let ids = Tensor::new(&[[4u32, 9, 12, 7, 20, 3, 15, 8]], &Device::Cpu).unwrap();
    let theirs: Tensor = match model_type {
        "llama" => {
            use candle_transformers::models::llama;
            let c: llama::LlamaConfig = serde_json::from_value(config.clone()).unwrap();
            let c = c.into_config(false);
            let mut cache = llama::Cache::new(false, DType::F32, &c, &Device::Cpu).unwrap();
            llama::Llama::load(vb, &c).unwrap().forward(&ids, 0, &mut cache).unwrap()
        }
        "mistral" => {
            use candle_transformers::models::mistral;
            let c: mistral::Config = serde_json::from_value(config.clone()).unwrap();
            mistral::Model::new(&c, vb).unwrap().forward(&ids, 0).unwrap()
        }
        "qwen2" => {
            use candle_transformers::models::qwen2;
            let c: qwen2::Config = serde_json::from_value(config.clone()).unwrap();
            qwen2::ModelForCausalLM::new(&c, vb).unwrap().forward(&ids, 0).unwrap()
        }
        "qwen3" => {
            use candle_transformers::models::qwen3;
            let c: qwen3::Config = serde_json::from_value(config.clone()).unwrap();
            qwen3::ModelForCausalLM::new(&c, vb).unwrap().forward(&ids, 0).unwrap()
        }
        _ => unreachable!(),
    };
    let theirs = theirs.flatten_all().unwrap();
    let ours_all = ours.forward_ids(&ids).unwrap();
    let last = ours_all.i((0, ids.dim(1).unwrap() - 1)).unwrap();
    assert_eq!(last.dims(), &[cfg.vocab_size]);
    let diff = (last - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{model_type}: logits differ from candle-transformers by {diff} (scale {scale})"
    );
    // The cached generation path agrees with the full forward pass.
    let mut cache = ranger_train::model::KvCache::default();
    let first = ours.forward_cached(&ids.narrow(1, 0, 5).unwrap(), &mut cache).unwrap();
    let rest = ours.forward_cached(&ids.narrow(1, 5, 3).unwrap(), &mut cache).unwrap();
    let cached = Tensor::cat(&[&first, &rest], 1).unwrap();
    let d2 = (cached - ours_all).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d2 < 1e-4, "{model_type}: kv-cache path differs by {d2}");
}

#[test]
fn llama_matches_candle_transformers() {
    compare_with_candle("llama");
}

/// Llama 3.1-style rope scaling and tied embeddings, as candle-transformers implements them.
#[test]
fn llama3_rope_scaling_tied_matches_candle_transformers() {
    let mut c = common::tiny_config("llama");
    c["tie_word_embeddings"] = json!(true);
    c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    compare_config_with_candle("llama", c);
}

#[test]
fn mistral_matches_candle_transformers() {
    compare_with_candle("mistral");
}

#[test]
fn qwen2_matches_candle_transformers() {
    compare_with_candle("qwen2");
}

#[test]
fn qwen3_matches_candle_transformers() {
    compare_with_candle("qwen3");
}

/// LoRA adapters get their true gradients too (B made non-zero so A's gradient is not trivially 0).
#[test]
fn lora_adapter_gradients() {
    let config = common::tiny_config("qwen2");
    let cfg = LlamaConfig::from_json(config, "test").unwrap();
    let base = ranger_train::model::random_weights(&cfg, 4, DType::F64).unwrap();
    let mut model = LlamaModel::new(cfg, &base).unwrap();
    let lora = ranger_train::model::LoraConfig { rank: 3, alpha: 6.0, ..Default::default() };
    let vars = model.add_lora(&lora, 9, &Default::default()).unwrap();
    assert_eq!(vars.len(), 2 * 7 * 2);
    let mut rng = Rng::new(5);
    for (name, v) in &vars {
        if name.ends_with("lora_B.weight") {
            let data: Vec<f64> = (0..v.elem_count()).map(|_| 0.1 * rng.normal()).collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let batch = common::test_batch(common::TINY_VOCAB, DType::F64);
    let grads = loss(&model, &batch).backward().unwrap();
    for (name, var) in &vars {
        let g = common::gradient(&grads, var, name);
        check_element(&model, &batch, var, &g, rng.below(g.len()), name);
    }
    // The frozen base has no gradient at all: it is not a variable.
    assert!(grads.get(&base["model.layers.0.self_attn.q_proj.weight"]).is_none());
}

/// The fused LM-head loss (logits never materialised, gradients computed in the forward pass)
/// gives the loss and every gradient of the logits path, with a trainable (untied, tied) or a
/// frozen head (LoRA); and so do two micro-batches whose weight gradients are accumulated in
/// a [`GradSink`] (the trainer's path).
#[test]
fn fused_lm_head_loss_matches_the_logits_path() {
    let batch = common::test_batch(common::TINY_VOCAB, DType::F64);
    let compare = |model: &LlamaModel, vars: &[(String, Var)], what: &str| {
        let a = loss(model, &batch);
        let b = model.loss_sum(&batch, true).unwrap();
        let (la, lb) = (a.to_scalar::<f64>().unwrap(), b.to_scalar::<f64>().unwrap());
        assert!((la - lb).abs() < 1e-10 * la.abs(), "{what}: loss {la} vs fused {lb}");
        // Scaled as the trainer scales it, so the incoming gradient is not 1.
        let (ga, gb) = ((a / 7.0).unwrap().backward().unwrap(), (b / 7.0).unwrap().backward().unwrap());
        for (name, var) in vars {
            let (x, y) =
                (ga.get(var).unwrap(), gb.get(var).unwrap_or_else(|| panic!("{what}: {name} has no fused gradient")));
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-10, "{what}: {name} differs by {d}");
        }
        // Two micro-batches with the weight gradients going to a sink (as the trainer runs
        // them): the sum of both passes' gradients, whatever went to the sink and whatever
        // stayed with Candle.
        let sink = GradSink::new();
        let mut acc = GradStore::default();
        for _ in 0..2 {
            let l = {
                let _active = sink.activate();
                model.loss_sum(&batch, true).unwrap()
            };
            let g = (l / 7.0).unwrap().backward().unwrap();
            for (_, var) in vars {
                if let Some(g) = g.get(var) {
                    let sum = acc.get(var).map(|prev| (prev + g).unwrap()).unwrap_or_else(|| g.clone());
                    acc.insert(var, sum);
                }
            }
        }
        assert!(!sink.is_empty(), "{what}: no weight gradient went to the sink");
        sink.merge_into(&mut acc).unwrap();
        assert!(sink.is_empty());
        for (name, var) in vars {
            let (x, y) = (
                ga.get(var).unwrap(),
                acc.get(var).unwrap_or_else(|| panic!("{what}: {name} has no gradient through the sink")),
            );
            let d = ((x * 2.0).unwrap() - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-10, "{what}: {name} differs by {d} through the sink");
        }
        // Evaluation mode gives the same loss and refuses backprop.
        let e = model.loss_sum(&batch, false).unwrap();
        assert!((e.to_scalar::<f64>().unwrap() - la).abs() < 1e-10 * la.abs());
        assert!(e.backward().is_err());
    };
    for arch in ["llama", "qwen2"] {
        let (_, vars, model) = build(&common::tiny_config(arch), DType::F64, 11);
        compare(&model, &vars, arch);
    }
    let cfg = LlamaConfig::from_json(common::tiny_config("qwen2"), "test").unwrap();
    let base = ranger_train::model::random_weights(&cfg, 4, DType::F64).unwrap();
    let mut model = LlamaModel::new(cfg, &base).unwrap();
    let vars = model
        .add_lora(
            &ranger_train::model::LoraConfig { rank: 3, alpha: 6.0, ..Default::default() },
            9,
            &Default::default(),
        )
        .unwrap();
    let mut rng = Rng::new(5);
    for (_, v) in vars.iter().filter(|(n, _)| n.ends_with("lora_B.weight")) {
        let data: Vec<f64> = (0..v.elem_count()).map(|_| 0.1 * rng.normal()).collect();
        v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    compare(&model, &vars, "lora");
}

/// The op-by-op path (what CUDA, Metal and half precision run) and the fused CPU kernels give
/// the same loss, the same gradient for every weight and the same cached-generation logits, for
/// every architecture, with packing and padding in the batch (generation: both rows at once).
#[test]
fn op_by_op_path_matches_the_fused_kernels() {
    use ranger_train::kernels::without_fused_kernels;
    let batch = common::test_batch(common::TINY_VOCAB, DType::F64);
    for arch in ["llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text", "gemma2", "phi3", "gpt2"] {
        let (_, vars, model) = build(&common::tiny_config(arch), DType::F64, 11);
        let run = || {
            let l = model.loss_sum(&batch, true).unwrap();
            let g = l.backward().unwrap();
            // Both rows of the batch generated together: the cache holds a batch of two.
            let ids = &batch.input_ids;
            let mut cache = ranger_train::model::KvCache::default();
            let first = model.forward_cached(&ids.narrow(1, 0, 4).unwrap(), &mut cache).unwrap();
            let next = model.forward_cached(&ids.narrow(1, 4, 2).unwrap(), &mut cache).unwrap();
            (l.to_scalar::<f64>().unwrap(), g, Tensor::cat(&[&first, &next], 1).unwrap())
        };
        let (fused, plain) = (run(), without_fused_kernels(run));
        assert!((fused.0 - plain.0).abs() < 1e-10 * fused.0.abs(), "{arch}: loss {} vs {}", fused.0, plain.0);
        let max_diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(max_diff(&fused.2, &plain.2) < 1e-10, "{arch}: cached logits differ");
        for (name, var) in &vars {
            let (a, b) = (
                fused.1.get(var).unwrap(),
                plain.1.get(var).unwrap_or_else(|| panic!("{arch}: {name} has no op-by-op gradient")),
            );
            let d = max_diff(a, b);
            assert!(d < 1e-10, "{arch}: {name} differs by {d}");
        }
    }
}
