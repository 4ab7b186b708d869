//! Step-by-step comparison with PyTorch: `torch.optim.RAdam` + gradient centralization +
//! Lookahead, cross-checked against `pytorch_optimizer.Ranger` (see tools/ranger_reference.py,
//! which wrote crates/candle-ranger/tests/fixtures/ranger_reference.safetensors).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::Optimizer;
use candle_ranger::{
    Centralization, Lookahead, LookaheadConfig, ParamsRAdam, ParamsRanger, RAdam, Ranger, RectifyFallback, UpdatePath,
};

mod common;
use common::test_device;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ranger_reference.safetensors");
const TENSORS_PER_CASE: usize = 3;

struct Case {
    name: String,
    hp: serde_json::Value,
    dtype: DType,
    steps: usize,
    grads: Vec<Tensor>,
    params: Vec<Tensor>,
}

fn cases() -> Vec<Case> {
    let (tensors, meta) = candle_ranger::state_file::read(FIXTURE.as_ref()).expect("fixture file");
    let mut out: Vec<Case> = meta
        .iter()
        .map(|(name, json)| {
            let hp: serde_json::Value = serde_json::from_str(json).unwrap();
            let dtype = if hp["dtype"] == "f64" { DType::F64 } else { DType::F32 };
            let get = |i: usize, what: &str| tensors[&format!("{name}/{i}/{what}")].clone();
            Case {
                name: name.clone(),
                steps: hp["steps"].as_u64().unwrap() as usize,
                grads: (0..TENSORS_PER_CASE).map(|i| get(i, "grads")).collect(),
                params: (0..TENSORS_PER_CASE).map(|i| get(i, "params")).collect(),
                hp,
                dtype,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(out.len(), 16, "fixture cases");
    out
}

/// The fixture's cases whose name starts with `prefix`.
fn cases_named(prefix: &str) -> impl Iterator<Item = Case> + '_ {
    cases().into_iter().filter(move |c| c.name.starts_with(prefix))
}

fn ranger_params(hp: &serde_json::Value, path: UpdatePath) -> ParamsRanger {
    ParamsRanger {
        lookahead_k: hp["lookahead_k"].as_u64().unwrap() as usize,
        lookahead_alpha: hp["lookahead_alpha"].as_f64().unwrap(),
        centralization: match hp["centralization"].as_str().unwrap() {
            "off" => Centralization::Off,
            "rank>1" => Centralization::Rank2Plus,
            "rank>3" => Centralization::ConvOnly,
            other => panic!("{other}"),
        },
        fallback: match hp["fallback"].as_str().unwrap() {
            "sgd" => RectifyFallback::Sgd,
            _ => RectifyFallback::Skip,
        },
        update_path: path,
        // The Adam part (lr, betas, eps, weight decay; threshold 5) is RAdam's.
        ..radam_params(hp).into()
    }
}

/// Largest `|a - b| / (|b| + mean|b|)` over the tensor: relative, but not blown up by the
/// elements that cross zero.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    // Read back first: Metal has no f64.
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = b.iter().map(|x| x.abs()).sum::<f64>() / b.len() as f64;
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (y.abs() + scale)).fold(0.0, f64::max)
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-10
    } else {
        1e-5
    }
}

/// Runs `opt` over a case and checks every step against the reference trajectory.
fn check<O: Optimizer>(case: &Case, vars: &[Var], opt: &mut O, label: &str) -> f64 {
    let mut worst = 0f64;
    for t in 0..case.steps {
        let mut grads = GradStore::default();
        for (var, g) in vars.iter().zip(&case.grads) {
            grads.insert(var, g.i(t).unwrap().to_device(var.device()).unwrap());
        }
        opt.step(&grads).unwrap();
        for (i, var) in vars.iter().enumerate() {
            let expected = case.params[i].i(t + 1).unwrap();
            let err = rel_err(var.as_tensor(), &expected);
            assert!(
                err <= tolerance(case.dtype),
                "{label} {}: tensor {i} diverges from PyTorch at step {} (rel err {err:e})",
                case.name,
                t + 1
            );
            worst = worst.max(err);
        }
    }
    worst
}

fn fresh_vars(case: &Case) -> Vec<Var> {
    case.params.iter().map(|p| Var::from_tensor(&p.i(0).unwrap().copy().unwrap()).unwrap()).collect()
}

#[test]
fn ranger_matches_pytorch_on_both_paths() {
    for case in cases() {
        for path in [UpdatePath::Fused, UpdatePath::Portable] {
            let vars = fresh_vars(&case);
            assert_eq!(vars[0].dtype(), case.dtype);
            let mut opt = Ranger::new(vars.clone(), ranger_params(&case.hp, path)).unwrap();
            let worst = check(&case, &vars, &mut opt, &format!("{path:?}"));
            eprintln!("{:28} {:?}: max rel err {worst:.2e}", case.name, path);
        }
    }
}

/// Every case on the test device, with the update path it takes there by default (the tensor
/// ops on CUDA and Metal, the fused kernel on the CPU), the tensor-op path, and on CUDA the fused
/// CUDA kernel; f64 cases are skipped on Metal, which has no f64 (and on the CUDA kernel, which
/// is f32/bf16/f16).
#[test]
fn ranger_matches_pytorch_on_the_test_device() {
    let dev = test_device();
    for case in cases() {
        if case.dtype == DType::F64 && dev.is_metal() {
            continue;
        }
        // On CUDA `Auto` is the fused kernel (f32/bf16/f16); `Fused` names it, `Portable` the ops.
        let paths: &[UpdatePath] = if dev.is_cuda() {
            &[UpdatePath::Auto, UpdatePath::Portable, UpdatePath::Fused]
        } else {
            &[UpdatePath::Auto, UpdatePath::Portable]
        };
        for &path in paths {
            if path == UpdatePath::Fused && case.dtype == DType::F64 {
                continue; // the CUDA kernel is f32/bf16/f16
            }
            let vars: Vec<Var> = case
                .params
                .iter()
                .map(|p| Var::from_tensor(&p.i(0).unwrap().to_device(&dev).unwrap()).unwrap())
                .collect();
            let mut opt = Ranger::new(vars.clone(), ranger_params(&case.hp, path)).unwrap();
            check(&case, &vars, &mut opt, &format!("{:?} {path:?}", dev.location()));
        }
    }
}

/// The RAdam part of a case's hyperparameters.
fn radam_params(hp: &serde_json::Value) -> ParamsRAdam {
    ParamsRAdam {
        lr: hp["lr"].as_f64().unwrap(),
        beta1: hp["beta1"].as_f64().unwrap(),
        beta2: hp["beta2"].as_f64().unwrap(),
        eps: hp["eps"].as_f64().unwrap(),
        weight_decay: hp["weight_decay"].as_f64().unwrap(),
        decoupled_weight_decay: hp["decoupled_weight_decay"].as_bool().unwrap(),
        ..Default::default()
    }
}

#[test]
fn radam_matches_torch_radam() {
    for case in cases_named("radam_") {
        let vars = fresh_vars(&case);
        let params = radam_params(&case.hp);
        if case.name.starts_with("radam_torch_defaults") {
            assert_eq!(params, ParamsRAdam::default(), "ParamsRAdam::default() is torch's");
        }
        let mut opt = RAdam::new(vars.clone(), params).unwrap();
        check(&case, &vars, &mut opt, "RAdam");
    }
}

/// The generic wrapper around our RAdam reproduces the no-centralization Ranger case.
#[test]
fn generic_lookahead_around_radam_matches_pytorch() {
    for case in cases_named("l2_wd_no_gc_k4") {
        let vars = fresh_vars(&case);
        let inner = radam_params(&case.hp);
        assert!(!inner.decoupled_weight_decay);
        let config = LookaheadConfig { inner, k: 4, alpha: case.hp["lookahead_alpha"].as_f64().unwrap() };
        let mut opt = Lookahead::<RAdam>::new(vars.clone(), config).unwrap();
        check(&case, &vars, &mut opt, "Lookahead<RAdam>");
    }
}

/// The fixture itself is what the tests think it is (guards against a stale or edited file).
#[test]
fn fixture_covers_the_required_ground() {
    let cases = cases();
    let by_name: HashMap<_, _> = cases.iter().map(|c| (c.name.as_str(), c)).collect();
    assert!(cases.iter().all(|c| c.steps >= 60));
    assert!(by_name.contains_key("ranger_default_f32") && by_name.contains_key("ranger_default_f64"));
    let ranks: Vec<usize> = by_name["ranger_default_f64"].params.iter().map(|p| p.rank() - 1).collect();
    assert_eq!(ranks, vec![1, 2, 4]);
}
