//! LoRA dropout, DoRA and rsLoRA: PEFT's semantics, true gradients (finite differences; for
//! DoRA with the row norm held constant, as the DoRA paper and PEFT prescribe), dropout only
//! while training and drawn reproducibly.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use ranger_train::data::{collate, Sequence};
use ranger_train::model::attach_lora;
use ranger_train::model::lora::LoraDropout;
use ranger_train::model::{causal_lm_loss_sum, DropoutSeed, LlamaConfig, LlamaModel, LoraConfig, Proj};
use ranger_train::rng::Rng;

fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| scale * rng.normal()).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

fn lora_config(dropout: f64, use_dora: bool, use_rslora: bool) -> LoraConfig {
    LoraConfig { rank: 3, alpha: 4.0, targets: vec!["q_proj".into()], dropout, use_dora, use_rslora }
}

/// One DoRA projection against PEFT's formula written out here:
/// `x W^T + b + (g - 1) (x_d W^T) + g s (x_d A^T B^T)` with `g = m / ||W + s B A||` per output
/// row and `x_d` the dropped-out input; then every gradient (A, B, m and the input) against
/// finite differences of that formula with the norm frozen.
#[test]
fn dora_projection_follows_peft_and_gets_its_gradients() {
    let dev = Device::Cpu;
    let (out, inp, t) = (5, 7, 6);
    for (dropout, rslora) in [(0.0, false), (0.3, false), (0.3, true)] {
        let w = random(&[out, inp], 1, 0.5);
        let bias = random(&[out], 2, 0.1);
        let mut proj = Proj::dense(w.clone(), Some(bias.clone()));
        let cfg = lora_config(dropout, true, rslora);
        let seed = DropoutSeed::default();
        let vars = attach_lora(vec![("layer.q_proj".into(), &mut proj)], &cfg, 1, DType::F64, &dev, &seed).unwrap();
        assert_eq!(
            vars.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            [
                "base_model.model.layer.q_proj.lora_A.weight",
                "base_model.model.layer.q_proj.lora_B.weight",
                "base_model.model.layer.q_proj.lora_magnitude_vector"
            ]
        );
        let x = Var::from_tensor(&random(&[t, inp], 3, 1.0)).unwrap();
        let base = x.as_tensor().matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        // At the start (B = 0, m = ||W||) DoRA is the base projection, in training too.
        seed.set(Some(9));
        assert!(max_diff(&proj.forward(x.as_tensor()).unwrap(), &base) < 1e-12);
        seed.set(None);
        assert!(max_diff(&proj.forward(x.as_tensor()).unwrap(), &base) < 1e-12);
        // Move every adapter tensor away from its start.
        let (a, b, m) = (&vars[0].1, &vars[1].1, &vars[2].1);
        b.set(&random(&[out, 3], 4, 0.3)).unwrap();
        a.set(&(a.as_tensor() + random(&[3, inp], 5, 0.2)).unwrap()).unwrap();
        m.set(&(m.as_tensor() * (random(&[out], 6, 0.2) + 1.0).unwrap()).unwrap()).unwrap();
        let s = if rslora { 4.0 / 3f64.sqrt() } else { 4.0 / 3.0 };
        assert_eq!(proj.lora.as_ref().unwrap().scale, s);

        seed.set(Some(11));
        let mask =
            proj.lora.as_ref().unwrap().dropout.as_ref().map(|d| d.mask(t, inp, DType::F64, &dev).unwrap().unwrap());
        assert_eq!(mask.is_some(), dropout > 0.0);
        let frozen_norm = (&w + (b.as_tensor().matmul(a.as_tensor()).unwrap() * s).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap();
        let reference = || -> Tensor {
            let x = x.as_tensor();
            let xd = match &mask {
                Some(mask) => (x * mask).unwrap(),
                None => x.clone(),
            };
            let g = m.as_tensor().broadcast_div(&frozen_norm).unwrap();
            let base = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            let base_d = xd.matmul(&w.t().unwrap()).unwrap().broadcast_mul(&(&g - 1.0).unwrap()).unwrap();
            let low = (xd.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&b.as_tensor().t().unwrap()).unwrap()
                * s)
                .unwrap()
                .broadcast_mul(&g)
                .unwrap();
            ((base + base_d).unwrap() + low).unwrap()
        };
        let ours = proj.forward(x.as_tensor()).unwrap();
        assert!(max_diff(&ours, &reference()) < 1e-12, "dropout {dropout}: forward differs from PEFT's formula");
        let r = random(&[t, out], 7, 1.0);
        let grads = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("A", a), ("B", b), ("magnitude", m), ("input", &x)] {
            let g = common::gradient(&grads, var, name);
            for i in 0..g.len() {
                common::check_gradient_element(var, &g, i, &format!("dropout {dropout}, {name}"), || {
                    (reference() * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
                });
            }
        }
        // Out of training (no seed), the adapter is exactly its merged weight.
        seed.set(None);
        let merged =
            x.as_tensor().matmul(&proj.merged_weight().unwrap().t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        assert!(max_diff(&proj.forward(x.as_tensor()).unwrap(), &merged) < 1e-12, "merged DoRA weight differs");
    }
}

/// Masks: the right rate and scale, the same for the same (micro-batch seed, adapter), different
/// otherwise, none without a seed.
#[test]
fn dropout_masks_are_reproducible_and_only_in_training() {
    let seed = DropoutSeed::default();
    let d = LoraDropout { p: 0.25, stream: 3, seed: seed.clone() };
    assert!(d.mask(4, 5, DType::F32, &Device::Cpu).unwrap().is_none(), "no mask without a seed");
    seed.set(Some(17));
    let m = d.mask(200, 300, DType::F32, &Device::Cpu).unwrap().unwrap();
    let values = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
    assert!((dropped - 0.25).abs() < 0.01, "dropped fraction {dropped}");
    assert!(values.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
    assert_eq!(
        values,
        d.mask(200, 300, DType::F32, &Device::Cpu).unwrap().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let other_stream = LoraDropout { stream: 4, ..d.clone() };
    assert_ne!(
        values,
        other_stream
            .mask(200, 300, DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    seed.set(Some(18));
    assert_ne!(
        values,
        d.mask(200, 300, DType::F32, &Device::Cpu).unwrap().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

fn test_batch() -> ranger_train::model::Batch {
    let mut rng = Rng::new(3);
    let mut ids = |n: usize| (0..n).map(|_| rng.below(common::TINY_VOCAB) as u32).collect::<Vec<_>>();
    let a = Sequence { ids: ids(9), target: vec![true; 9], segment: vec![0; 9], position: (0..9).collect() };
    let b = Sequence { ids: ids(6), target: vec![true; 6], segment: vec![0; 6], position: (0..6).collect() };
    collate(&[&a, &b], 2, None, DType::F64, &Device::Cpu).unwrap()
}

/// A whole model with dropout (and DoRA) adapters on every projection, in training mode: every
/// LoRA matrix (plain LoRA) and every DoRA magnitude gets its true gradient; evaluation is
/// deterministic and drops nothing.
#[test]
fn model_with_dropout_and_dora_adapters_gets_true_gradients() {
    for use_dora in [false, true] {
        let cfg = LlamaConfig::from_json(common::tiny_config("qwen2"), "test").unwrap();
        let base = ranger_train::model::random_weights(&cfg, 4, DType::F64).unwrap();
        let mut model = LlamaModel::new(cfg, &base).unwrap();
        let plain_logits = model.forward(&test_batch()).unwrap();
        let seed = DropoutSeed::default();
        let lora = LoraConfig { rank: 3, alpha: 6.0, dropout: 0.3, use_dora, ..Default::default() };
        let vars = model.add_lora(&lora, 9, &seed).unwrap();
        assert_eq!(vars.len(), 2 * 7 * if use_dora { 3 } else { 2 });
        let mut rng = Rng::new(5);
        for (name, v) in &vars {
            if name.ends_with("lora_B.weight") {
                v.set(&random(v.dims(), rng.next_u64(), 0.1)).unwrap();
            }
        }
        let batch = test_batch();
        let loss = || causal_lm_loss_sum(&model.forward(&batch).unwrap(), &batch).unwrap();
        // Evaluation: no dropout, the same logits every time.
        let eval = model.forward(&batch).unwrap();
        assert_eq!(max_diff(&eval, &model.forward(&batch).unwrap()), 0.0);
        assert!(max_diff(&eval, &plain_logits) > 0.0, "B is non-zero, so the adapters change the logits");
        // Training: the masks change the output, reproducibly for one seed.
        seed.set(Some(21));
        let train = model.forward(&batch).unwrap();
        assert!(max_diff(&train, &eval) > 1e-6, "dropout changed nothing");
        assert_eq!(max_diff(&train, &model.forward(&batch).unwrap()), 0.0, "same seed, same masks");
        let grads = loss().backward().unwrap();
        for (name, var) in &vars {
            let g = common::gradient(&grads, var, name);
            assert!(g.iter().any(|&v| v != 0.0), "{name}: zero gradient");
            // DoRA's A and B gradients treat the row norm as a constant (checked above on one
            // projection); the magnitudes' and plain LoRA's are exact derivatives of the loss.
            if !use_dora || name.ends_with("lora_magnitude_vector") {
                let i = rng.below(g.len());
                common::check_gradient_element(var, &g, i, name, || loss().to_scalar::<f64>().unwrap());
            }
        }
        seed.set(None);
        assert_eq!(max_diff(&eval, &model.forward(&batch).unwrap()), 0.0, "evaluation after training forward passes");
    }
}
