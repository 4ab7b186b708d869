//! Activation checkpointing (`--gradient-checkpointing`) changes no gradient: the gradients of
//! every trainable tensor, accumulated over two micro-batches as the trainer accumulates them
//! (weight gradients through a `GradSink`), are bit-identical with and without it, for every
//! decoder architecture and the encoder classifiers, full and LoRA/DoRA with dropout, on the
//! fused CPU kernels and on the op-by-op path (what CUDA and Metal run), in f32 and f64.
//! The trainer-level checks (a whole run, resume with the option toggled) are in `trainer.rs`.

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ranger_train::classify::{collate, LabeledText};
use ranger_train::data::{collate as collate_lm, Sequence};
use ranger_train::kernels::grad_sink::GradSink;
use ranger_train::kernels::without_fused_kernels;
use ranger_train::model::lora::DropoutSeed;
use ranger_train::model::{Batch, LlamaConfig, LlamaModel, LoraConfig, ModelConfig, SequenceClassifier};
use ranger_train::rng::Rng;
use ranger_train::testing::{random_classifier_weights, tiny_encoder_config, TINY_ENCODER_VOCAB};

/// Each trainable tensor's gradient as the bits of its f64 values (f32 widens exactly).
type Bits = Vec<(String, Vec<u64>)>;

/// The gradients of one optimizer step of two micro-batches, as the trainer computes them: the
/// forward pass under an active sink with the dropout seed of the micro-batch set, the seed
/// cleared before backward, the loss scaled by the step's target count, Candle's gradients
/// summed and the sink's merged in.
fn step_gradients(vars: &[(String, Var)], dropout: &DropoutSeed, loss: impl Fn(usize) -> Tensor) -> Bits {
    let sink = GradSink::new();
    let mut acc = GradStore::default();
    for micro in 0..2 {
        dropout.set(Some(1000 + micro as u64));
        let l = {
            let _active = sink.activate();
            loss(micro)
        };
        dropout.set(None);
        let grads = (l / 7.0).unwrap().backward().unwrap();
        for (_, var) in vars {
            if let Some(g) = grads.get(var) {
                let sum = acc.get(var).map(|prev| (prev + g).unwrap()).unwrap_or_else(|| g.clone());
                acc.insert(var, sum);
            }
        }
    }
    sink.merge_into(&mut acc).unwrap();
    vars.iter()
        .map(|(name, var)| {
            let g = acc.get(var).unwrap_or_else(|| panic!("{name} has no gradient"));
            let values = g.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
            (
                name.clone(),
                values.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

/// Asserts both runs gave every tensor the same gradient, bit for bit, and that the gradients
/// are not all zero (which would make the comparison empty).
fn assert_same(what: &str, plain: &Bits, checkpointed: &Bits) {
    assert_eq!(plain.len(), checkpointed.len());
    for ((name, a), (_, b)) in plain.iter().zip(checkpointed) {
        let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 0, "{what}: {name}: {differing} of {} gradient values differ", a.len());
    }
    assert!(plain.iter().any(|(_, g)| g.iter().any(|&x| f64::from_bits(x) != 0.0)), "{what}: all gradients are 0");
}

/// On `RANGER_TEST_DEVICE` (the CPU when unset; CUDA or Metal run the op-by-op path): full and
/// LoRA with dropout, f32 and bf16, the same gradients with and without checkpointing, bit for
/// bit on the CPU, to 1e-6 of each tensor's largest gradient on a GPU (whose kernels may sum in
/// another order from one call to the next).
#[test]
fn checkpointing_on_the_test_device() {
    let device = common::test_device();
    let dtypes: &[DType] = if device.is_cpu() { &[DType::F32, DType::BF16] } else { &[DType::F32] };
    for &dtype in dtypes {
        for lora in [None, Some((false, 0.3))] {
            let dropout = DropoutSeed::default();
            let (vars, mut model) = decoder_on("qwen3", dtype, lora, &dropout, &device);
            let batches = lm_batches_on(common::TINY_VOCAB, dtype, &device);
            let mut run = |on: bool| {
                model.set_gradient_checkpointing(on);
                step_gradients(&vars, &dropout, |i| model.loss_sum(&batches[i], true).unwrap())
            };
            let (plain, checkpointed) = (run(false), run(true));
            let what = format!("{device:?} {dtype:?} {lora:?}");
            if device.is_cpu() {
                assert_same(&what, &plain, &checkpointed);
                continue;
            }
            for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
                let (a, b): (Vec<f64>, Vec<f64>) =
                    (a.iter().map(|x| f64::from_bits(*x)).collect(), b.iter().map(|x| f64::from_bits(*x)).collect());
                let top = a.iter().fold(0f64, |m, x| m.max(x.abs()));
                let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(diff <= 1e-6 * top.max(1e-30), "{what}: {name} differs by {diff} (largest {top})");
            }
        }
    }
}

/// Two different training batches with packing and padding.
fn lm_batches(vocab: usize, dtype: DType) -> [Batch; 2] {
    lm_batches_on(vocab, dtype, &Device::Cpu)
}

fn lm_batches_on(vocab: usize, dtype: DType, device: &Device) -> [Batch; 2] {
    let mut rng = Rng::new(3);
    let mut ids = |n: usize| (0..n).map(|_| rng.below(vocab) as u32).collect::<Vec<_>>();
    let packed = Sequence {
        ids: ids(9),
        target: vec![false, false, true, true, true, false, false, true, true],
        segment: vec![0, 0, 0, 0, 0, 1, 1, 1, 1],
        position: vec![0, 1, 2, 3, 4, 0, 1, 2, 3],
    };
    let short = Sequence { ids: ids(6), target: vec![true; 6], segment: vec![0; 6], position: (0..6).collect() };
    let long = Sequence { ids: ids(8), target: vec![true; 8], segment: vec![0; 8], position: (0..8).collect() };
    [
        collate_lm(&[&packed, &short], 2, None, dtype, device).unwrap(),
        collate_lm(&[&long, &short], 2, None, dtype, device).unwrap(),
    ]
}

/// A tiny decoder of `arch`: every weight trainable, or a frozen base with LoRA (DoRA and
/// dropout when asked) on every projection, its B matrices made non-zero.
fn decoder(
    arch: &str,
    dtype: DType,
    lora: Option<(bool, f64)>,
    dropout: &DropoutSeed,
) -> (Vec<(String, Var)>, LlamaModel) {
    decoder_on(arch, dtype, lora, dropout, &Device::Cpu)
}

/// [`decoder`] on `device`.
fn decoder_on(
    arch: &str,
    dtype: DType,
    lora: Option<(bool, f64)>,
    dropout: &DropoutSeed,
    device: &Device,
) -> (Vec<(String, Var)>, LlamaModel) {
    let cfg = LlamaConfig::from_json(common::tiny_config(arch), "test").unwrap();
    let weights = ranger_train::model::random_weights(&cfg, 11, DType::F64).unwrap();
    let tensors = ranger_train::model::into_tensors(&cfg, weights, dtype, device, "test").unwrap();
    let targets = cfg.lora_targets();
    let Some((dora, p)) = lora else {
        let vars = ranger_train::weights::to_vars(tensors).unwrap();
        return (vars.clone(), LlamaModel::from_vars(cfg, &vars).unwrap());
    };
    let mut model = LlamaModel::new(cfg, &tensors.into_iter().collect()).unwrap();
    let lora = LoraConfig { rank: 3, alpha: 6.0, dropout: p, use_dora: dora, targets, ..Default::default() };
    let vars = model.add_lora(&lora, 9, dropout).unwrap();
    let mut rng = Rng::new(5);
    for (_, v) in vars.iter().filter(|(n, _)| n.ends_with("lora_B.weight")) {
        let data: Vec<f32> = (0..v.elem_count()).map(|_| (0.1 * rng.normal()) as f32).collect();
        v.set(&Tensor::from_vec(data, v.shape(), device).unwrap().to_dtype(dtype).unwrap()).unwrap();
    }
    (vars, model)
}

fn check_decoder(arch: &str, dtype: DType, lora: Option<(bool, f64)>) {
    let what = format!("{arch} {dtype:?} {lora:?}");
    let dropout = DropoutSeed::default();
    let (vars, mut model) = decoder(arch, dtype, lora, &dropout);
    let batches = lm_batches(common::TINY_VOCAB, dtype);
    for fused in [true, false] {
        let mut run = |on: bool| {
            model.set_gradient_checkpointing(on);
            let grads = || step_gradients(&vars, &dropout, |i| model.loss_sum(&batches[i], true).unwrap());
            if fused {
                grads()
            } else {
                without_fused_kernels(grads)
            }
        };
        let (plain, checkpointed) = (run(false), run(true));
        assert_same(&format!("{what} fused kernels {fused}"), &plain, &checkpointed);
    }
}

#[test]
fn decoders_get_the_same_gradients_with_checkpointing() {
    for arch in ["llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text", "gemma2", "phi3", "gpt2"] {
        check_decoder(arch, DType::F32, None);
    }
    check_decoder("llama", DType::F64, None);
}

/// Dropout draws the same masks when a layer is recomputed in the backward pass (the trainer
/// has cleared the seed by then), and DoRA's rescaling is recomputed the same.
#[test]
fn lora_dora_and_dropout_get_the_same_gradients_with_checkpointing() {
    check_decoder("qwen2", DType::F32, Some((false, 0.0)));
    check_decoder("llama", DType::F32, Some((false, 0.3)));
    check_decoder("qwen3", DType::F32, Some((true, 0.3)));
    check_decoder("phi3", DType::F32, Some((true, 0.3)));
    check_decoder("gpt2", DType::F32, Some((false, 0.3)));
}

fn classifier(config: &serde_json::Value, dtype: DType) -> (Vec<(String, Var)>, SequenceClassifier) {
    let backbone = ModelConfig::from_json(config.clone(), "test").unwrap().backbone();
    let weights = random_classifier_weights(&backbone, 3, 11, dtype).unwrap();
    let vars: Vec<(String, Var)> = backbone
        .weight_shapes(3)
        .into_iter()
        .map(|(n, _)| (n.clone(), Var::from_tensor(&weights[&n]).unwrap()))
        .collect();
    let map: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    (vars, SequenceClassifier::new(backbone, 3, &map).unwrap())
}

#[test]
fn classifiers_get_the_same_gradients_with_checkpointing() {
    let configs = [
        ("bert", tiny_encoder_config("bert"), TINY_ENCODER_VOCAB),
        ("distilbert", tiny_encoder_config("distilbert"), TINY_ENCODER_VOCAB),
        ("llama", common::tiny_config("llama"), common::TINY_VOCAB),
        ("modernbert", common::tiny_config("modernbert"), common::TINY_VOCAB),
    ];
    for (name, config, vocab) in configs {
        let (vars, mut model) = classifier(&config, DType::F32);
        let examples = common::labeled_examples(vocab);
        let refs: Vec<&LabeledText> = examples.iter().collect();
        let batches = [&refs[..], &refs[1..]]
            .map(|rows| collate(rows, 0, model.mask_kind(), model.mask_dtype(), &Device::Cpu).unwrap());
        for fused in [true, false] {
            let mut run = |on: bool| {
                model.set_gradient_checkpointing(on);
                let dropout = DropoutSeed::default();
                let grads = || {
                    step_gradients(&vars, &dropout, |i| {
                        model.loss_sum(&model.forward(&batches[i]).unwrap(), &batches[i].labels).unwrap()
                    })
                };
                if fused {
                    grads()
                } else {
                    without_fused_kernels(grads)
                }
            };
            let (plain, checkpointed) = (run(false), run(true));
            assert_same(&format!("{name} classifier, fused kernels {fused}"), &plain, &checkpointed);
        }
    }
}

/// What checkpointing saves, seen in the graph: a training forward pass (under a sink) keeps
/// one node per layer instead of every op's, with the same loss; without a sink (evaluation,
/// inference) layers run as usual.
#[test]
fn checkpointed_layers_keep_one_node_each() {
    let dropout = DropoutSeed::default();
    let (_, mut model) = decoder("llama", DType::F32, None, &dropout);
    let batch = &lm_batches(common::TINY_VOCAB, DType::F32)[0];
    let mut graph = |on: bool| {
        model.set_gradient_checkpointing(on);
        let sink = GradSink::new();
        let _active = sink.activate();
        let loss = model.loss_sum(batch, true).unwrap();
        (loss.to_scalar::<f32>().unwrap(), loss.sorted_nodes().len())
    };
    let ((plain_loss, plain_nodes), (loss, nodes)) = (graph(false), graph(true));
    assert_eq!(plain_loss.to_bits(), loss.to_bits());
    let layers = model.config.num_hidden_layers;
    assert!(plain_nodes > 10 * layers, "{plain_nodes} nodes without checkpointing");
    // Embedding, one node per layer (and the first layer's input), final norm, loss, weights.
    assert!(nodes < plain_nodes / 3, "{nodes} nodes with checkpointing, {plain_nodes} without");
    let eval = |on: bool, model: &mut LlamaModel| {
        model.set_gradient_checkpointing(on);
        let loss = model.loss_sum(batch, false).unwrap();
        (loss.to_scalar::<f32>().unwrap().to_bits(), loss.sorted_nodes().len())
    };
    assert_eq!(eval(true, &mut model), eval(false, &mut model), "evaluation without a sink runs as usual");
}
