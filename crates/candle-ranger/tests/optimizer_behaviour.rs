//! Behaviour of the optimizers beyond the PyTorch reference: execution paths agree, resume is
//! bit-exact, state files are checked, groups, absent gradients, non-finite gradients,
//! half precision, the known bugs of other Ranger ports, and randomised robustness.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_ranger::{
    clip_grad_norm, grad_norm, non_finite_grads, Centralization, Error, Lookahead, LookaheadConfig, NonFiniteGrads,
    ParamGroup, ParamsRanger, Ranger, RectifyFallback, UpdatePath,
};

/// A small deterministic generator (xorshift), so tests need no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-300), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn tensor(&mut self, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| scale * self.normal()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }
}

const SHAPES: [&[usize]; 4] = [&[37], &[300, 257], &[64, 3, 5, 5], &[2, 70000]];

fn make_vars(seed: u64, dtype: DType) -> Vec<(String, Var)> {
    let mut rng = Rng(seed);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("w{i}"), Var::from_tensor(&rng.tensor(s, 1.0, dtype)).unwrap()))
        .collect()
}

fn grads_for(vars: &[(String, Var)], rng: &mut Rng) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        let scale = [1e-3, 1.0, 10.0, 0.1][i % 4];
        g.insert(v, rng.tensor(v.dims(), scale, v.dtype()));
    }
    g
}

fn values(vars: &[(String, Var)]) -> Vec<Vec<f64>> {
    vars.iter()
        .map(|(_, v)| v.as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn params(path: UpdatePath) -> ParamsRanger {
    ParamsRanger { lr: 1e-2, weight_decay: 0.05, lookahead_k: 5, update_path: path, ..Default::default() }
}

#[test]
fn fused_and_portable_paths_follow_the_same_trajectory() {
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        for centralization in [Centralization::Rank2Plus, Centralization::Off] {
            let mut runs = Vec::new();
            for path in [UpdatePath::Fused, UpdatePath::Portable] {
                let vars = make_vars(7, dtype);
                let p = ParamsRanger { centralization, ..params(path) };
                let mut opt = Ranger::new_named(vars.clone(), p).unwrap();
                assert_eq!(opt.is_fused("w1"), Some(path == UpdatePath::Fused));
                let mut rng = Rng(99);
                for _ in 0..12 {
                    opt.step(&grads_for(&vars, &mut rng)).unwrap();
                }
                runs.push(values(&vars));
            }
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-5,
                _ => 2e-2, // one half-precision rounding of the parameter can differ
            };
            for (a, b) in runs[0].iter().zip(&runs[1]) {
                let scale = b.iter().map(|x| x.abs()).sum::<f64>() / b.len() as f64;
                let err = a.iter().zip(b).map(|(x, y)| (x - y).abs() / (y.abs() + scale)).fold(0.0, f64::max);
                assert!(err < tol, "{dtype:?} {centralization:?}: fused vs portable rel err {err:e}");
            }
        }
    }
}

fn run_resume(path: UpdatePath, dtype: DType) {
    let n = 8; // crosses the unrectified phase and a Lookahead sync (k = 5) on each side
    let dir = std::env::temp_dir().join(format!("candle-ranger-resume-{}-{path:?}-{dtype:?}", std::process::id()));
    // 2N steps straight.
    let straight_vars = make_vars(3, dtype);
    let mut straight = Ranger::new_named(straight_vars.clone(), params(path)).unwrap();
    let mut rng = Rng(5);
    let all_grads: Vec<GradStore> = (0..2 * n).map(|_| grads_for(&straight_vars, &mut rng)).collect();
    for g in &all_grads {
        straight.step(g).unwrap();
    }
    // N steps, save weights + state, rebuild everything from the files, N more steps.
    let vars = make_vars(3, dtype);
    let mut first = Ranger::new_named(vars.clone(), params(path)).unwrap();
    let regrad = |vars: &[(String, Var)], g: &GradStore| {
        let mut out = GradStore::default();
        for ((_, v), (_, sv)) in vars.iter().zip(&straight_vars) {
            out.insert(v, g.get(sv).unwrap().clone());
        }
        out
    };
    for g in &all_grads[..n] {
        first.step(&regrad(&vars, g)).unwrap();
    }
    first.set_learning_rate(0.0123);
    first.save_state(dir.join("optimizer.safetensors")).unwrap();
    let weights: Vec<(String, Tensor)> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect();
    drop(first);
    let resumed_vars: Vec<(String, Var)> =
        weights.iter().map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap())).collect();
    let mut resumed = Ranger::new_named(resumed_vars.clone(), params(path)).unwrap();
    resumed.load_state(dir.join("optimizer.safetensors")).unwrap();
    assert_eq!(resumed.learning_rate(), 0.0123, "learning rate restored");
    resumed.set_learning_rate(params(path).lr);
    assert_eq!(resumed.var_step("w0"), Some(n as u64));
    for g in &all_grads[n..] {
        resumed.step(&regrad(&resumed_vars, g)).unwrap();
    }
    let (a, b) = (values(&straight_vars), values(&resumed_vars));
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{path:?} {dtype:?}: resume is not bit-exact"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn resume_is_bit_exact() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        run_resume(UpdatePath::Fused, dtype);
        run_resume(UpdatePath::Portable, dtype);
    }
}

#[test]
fn state_file_records_everything_in_f32_for_half_params() {
    let dir = std::env::temp_dir().join(format!("candle-ranger-state-{}", std::process::id()));
    let vars = make_vars(1, DType::BF16);
    let mut opt = Ranger::new_named(vars.clone(), params(UpdatePath::Auto)).unwrap();
    opt.step(&grads_for(&vars, &mut Rng(2))).unwrap();
    let file = dir.join("s.safetensors");
    opt.save_state(&file).unwrap();
    let (tensors, meta) = candle_ranger::state_file::read(&file).unwrap();
    // exp_avg, exp_avg_sq, slow, master (the f32 copy of a bf16 variable) and step.
    assert_eq!(tensors.len(), 5 * vars.len());
    assert_eq!(tensors["w1.exp_avg"].dtype(), DType::F32);
    assert_eq!(tensors["w1.master"].dtype(), DType::F32);
    assert_eq!(tensors["w1.slow"].dtype(), DType::F32);
    assert_eq!(tensors["w1.step"].to_vec1::<i64>().unwrap(), vec![1]);
    assert!(meta["hyperparameters"].contains("lookahead_k=5"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn load_state_rejects_mismatches_and_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("candle-ranger-mismatch-{}", std::process::id()));
    let file = dir.join("s.safetensors");
    let vars = make_vars(1, DType::F32);
    let mut opt = Ranger::new_named(vars.clone(), params(UpdatePath::Auto)).unwrap();
    opt.step(&grads_for(&vars, &mut Rng(2))).unwrap();
    opt.save_state(&file).unwrap();

    // Same names, one different shape.
    let mut other = make_vars(1, DType::F32);
    other[1].1 = Var::zeros((300, 256), DType::F32, &Device::Cpu).unwrap();
    let mut fresh = Ranger::new_named(other, params(UpdatePath::Auto)).unwrap();
    let err = fresh.load_state(&file).unwrap_err();
    assert!(matches!(&err, Error::StateMismatch { tensor, .. } if tensor == "w1.exp_avg"), "{err}");
    assert!(err.to_string().contains("w1.exp_avg") && err.to_string().contains("shape"), "{err}");
    assert_eq!(fresh.var_step("w0"), Some(0), "a failed load leaves the optimizer untouched");

    // A different dtype.
    let mut f64opt = Ranger::new_named(make_vars(1, DType::F64), params(UpdatePath::Auto)).unwrap();
    let err = f64opt.load_state(&file).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");

    // A variable the file doesn't know, and a file with a variable we don't have.
    let mut more = make_vars(1, DType::F32);
    more.push(("extra".into(), Var::zeros(3, DType::F32, &Device::Cpu).unwrap()));
    let err = Ranger::new_named(more, params(UpdatePath::Auto)).unwrap().load_state(&file).unwrap_err().to_string();
    assert!(err.contains("extra.exp_avg") && err.contains("missing"), "{err}");
    let err = Ranger::new_named(make_vars(1, DType::F32)[..3].to_vec(), params(UpdatePath::Auto))
        .unwrap()
        .load_state(&file)
        .unwrap_err()
        .to_string();
    assert!(err.contains("w3."), "{err}");

    // Without Lookahead the file's slow weights are unexpected.
    let no_la = ParamsRanger { lookahead_k: 0, ..params(UpdatePath::Auto) };
    let err = Ranger::new_named(make_vars(1, DType::F32), no_la).unwrap().load_state(&file).unwrap_err().to_string();
    assert!(err.contains(".slow"), "{err}");

    // Not a state file at all / missing file: the path is named.
    std::fs::write(dir.join("junk.safetensors"), b"not safetensors").unwrap();
    let err = fresh.load_state(dir.join("junk.safetensors")).unwrap_err().to_string();
    assert!(err.contains("junk.safetensors"), "{err}");
    let err = fresh.load_state(dir.join("absent.safetensors")).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Bug elsewhere: slow weights initialised to zeros scale the weights by alpha at the first sync.
#[test]
fn slow_weights_start_as_a_copy_of_the_weights() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let vars = make_vars(11, DType::F32);
        let before = values(&vars);
        let p = ParamsRanger { lr: 0.0, lookahead_k: 2, ..params(path) };
        let mut opt = Ranger::new_named(vars.clone(), p).unwrap();
        let mut rng = Rng(1);
        for _ in 0..4 {
            opt.step(&grads_for(&vars, &mut rng)).unwrap();
        }
        assert_eq!(values(&vars), before, "{path:?}: with lr = 0 two syncs must leave the weights alone");
    }
}

/// Bug elsewhere: pytorch_optimizer's default fallback steps uphill during the first 5 steps.
#[test]
fn first_steps_go_downhill() {
    for fallback in [RectifyFallback::Sgd, RectifyFallback::Skip] {
        let w = Var::new(&[3.0f32, -2.0, 1.5], &Device::Cpu).unwrap();
        let p = ParamsRanger { lr: 0.05, fallback, lookahead_k: 0, ..Default::default() };
        let mut opt = Ranger::new(vec![w.clone()], p).unwrap();
        let loss = |w: &Var| w.as_tensor().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let mut last = loss(&w);
        for t in 1..=10 {
            opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
            let now = loss(&w);
            if fallback == RectifyFallback::Skip && t < 6 {
                assert_eq!(now, last, "skip fallback must not move at t={t}");
            } else {
                assert!(now < last, "{fallback:?}: loss went up at step {t}: {last} -> {now}");
            }
            last = now;
        }
    }
}

#[test]
fn absent_gradients_keep_state_and_step_count() {
    let vars = make_vars(4, DType::F32);
    let mut opt = Ranger::new_named(vars.clone(), params(UpdatePath::Auto)).unwrap();
    let mut rng = Rng(8);
    opt.step(&grads_for(&vars, &mut rng)).unwrap();
    let frozen_before = values(&vars)[2].clone();
    let mut partial = grads_for(&vars, &mut rng);
    partial.remove(vars[2].1.as_tensor());
    for _ in 0..7 {
        opt.step(&partial).unwrap();
    }
    assert_eq!(opt.var_step("w0"), Some(8));
    assert_eq!(opt.var_step("w2"), Some(1));
    assert_eq!(values(&vars)[2], frozen_before, "a variable without gradient is not touched, not even by a sync");
}

#[test]
fn parameter_groups_scale_lr_and_decay() {
    let a = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let b = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let c = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let p = ParamsRanger { lr: 0.1, weight_decay: 0.5, lookahead_k: 0, ..Default::default() };
    let groups = vec![
        ParamGroup::new(vec![("a".into(), a.clone())]),
        ParamGroup::new(vec![("b".into(), b.clone())]).with_lr_scale(0.0),
        ParamGroup::new(vec![("c".into(), c.clone())]).with_weight_decay(0.0),
    ];
    let mut opt = Ranger::with_groups(groups, p).unwrap();
    let mut g = GradStore::default();
    for v in [&a, &b, &c] {
        g.insert(v, Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
    }
    opt.step(&g).unwrap();
    // Zero gradient: only decoupled decay moves the weights, by 1 - lr * wd = 0.95.
    assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), vec![0.95, 1.9]);
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0], "lr_scale 0 freezes");
    assert_eq!(c.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0], "wd 0 in the group");

    let split = ParamGroup::split_decay(vec![
        ("w".into(), Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()),
        ("bias".into(), a),
    ]);
    assert_eq!(split[0].vars[0].0, "w");
    assert_eq!(split[1].vars[0].0, "bias");
    let dup = vec![("x".into(), b.clone()), ("x".into(), c.clone())];
    assert!(matches!(Ranger::new_named(dup, p), Err(Error::DuplicateName(n)) if n == "x"));
}

#[test]
fn non_finite_gradients_are_skipped_or_rejected() {
    for (policy, path) in [
        (NonFiniteGrads::Skip, UpdatePath::Fused),
        (NonFiniteGrads::Skip, UpdatePath::Portable),
        (NonFiniteGrads::Error, UpdatePath::Fused),
        (NonFiniteGrads::Error, UpdatePath::Portable),
    ] {
        let vars = make_vars(9, DType::F32);
        let p = ParamsRanger { non_finite: policy, ..params(path) };
        let mut opt = Ranger::new_named(vars.clone(), p).unwrap();
        let mut rng = Rng(3);
        opt.step(&grads_for(&vars, &mut rng)).unwrap();
        let before = values(&vars);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut g = grads_for(&vars, &mut rng);
            let mut data = vec![0.5f32; 300 * 257];
            data[12345] = bad;
            g.insert(&vars[1].1, Tensor::from_vec(data, (300, 257), &Device::Cpu).unwrap());
            let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            assert_eq!(non_finite_grads(&g, &all).unwrap(), vec![1]);
            match policy {
                NonFiniteGrads::Skip => {
                    let report = opt.step_with_report(&g).unwrap();
                    assert!(report.skipped());
                    assert_eq!(report.non_finite, vec!["w1".to_string()]);
                }
                NonFiniteGrads::Error => {
                    let err = opt.step_with_report(&g).unwrap_err();
                    assert!(matches!(&err, Error::NonFiniteGradient { vars } if vars == &["w1".to_string()]), "{err}");
                }
            }
            assert_eq!(values(&vars), before, "{policy:?} {path:?}: nothing changes on a bad step");
            assert_eq!(opt.var_step("w0"), Some(1));
        }
        if policy == NonFiniteGrads::Skip {
            assert_eq!(opt.skipped_steps(), 3);
        }
    }
}

/// Randomised: shapes, hyperparameters and gradient scales (zeros, tiny, huge) never turn
/// finite parameters into NaN or infinity.
#[test]
fn random_configurations_stay_finite() {
    let mut rng = Rng(0x5eed);
    for trial in 0..120 {
        let rank = 1 + (rng.next() * 4.0) as usize;
        let shape: Vec<usize> = (0..rank).map(|_| 1 + (rng.next() * 9.0) as usize).collect();
        let dtype = [DType::F32, DType::F64, DType::BF16, DType::F16][trial % 4];
        let path = if trial % 3 == 0 { UpdatePath::Portable } else { UpdatePath::Fused };
        let p = ParamsRanger {
            lr: 10f64.powf(-5.0 + 4.0 * rng.next()),
            beta1: rng.next() * 0.99,
            beta2: 0.9 + rng.next() * 0.0999,
            eps: 10f64.powf(-12.0 + 8.0 * rng.next()),
            weight_decay: rng.next() * 0.2,
            decoupled_weight_decay: rng.next() < 0.5,
            lookahead_k: (rng.next() * 8.0) as usize,
            lookahead_alpha: rng.next(),
            rectify_threshold: 3.0 + rng.next() * 5.0,
            centralization: [Centralization::Off, Centralization::Rank2Plus, Centralization::ConvOnly][trial % 3],
            fallback: if rng.next() < 0.5 { RectifyFallback::Sgd } else { RectifyFallback::Skip },
            update_path: path,
            ..Default::default()
        };
        let var = Var::from_tensor(&rng.tensor(&shape, 1.0, dtype)).unwrap();
        let mut opt = Ranger::new(vec![var.clone()], p).unwrap();
        for s in 0..25 {
            // Half precision cannot hold 1e30: f16 saturates to infinity (a skipped step), so
            // the huge scale is only used where it is representable.
            let huge = if dtype == DType::F16 { 6e4 } else { 1e30 };
            let scale = [0.0, 1e-30, 1e-8, 1.0, 1e4, huge][(s + trial) % 6];
            let mut g = GradStore::default();
            g.insert(&var, rng.tensor(&shape, scale, dtype));
            opt.step(&g).unwrap();
            let vals: Vec<f64> =
                var.as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                vals.iter().all(|x| x.is_finite()),
                "trial {trial} step {s}: {p:?} {dtype:?} {shape:?} gave {vals:?}"
            );
        }
    }
}

#[test]
fn optimizer_trait_methods_work() {
    let w = Var::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
    let mut opt = Ranger::from_slice(&[&w], ParamsRanger::default()).unwrap();
    assert_eq!(opt.learning_rate(), 1e-3);
    opt.set_learning_rate(0.1);
    assert_eq!(opt.learning_rate(), 0.1);
    opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
    assert_eq!(opt.var_step("param.0"), Some(1));
    let mut empty = Ranger::empty(ParamsRanger::default()).unwrap();
    empty.step(&GradStore::default()).unwrap();
    let bad = ParamsRanger { beta2: 1.0, ..Default::default() };
    let err = Ranger::new(vec![w.clone()], bad).unwrap_err().to_string();
    assert!(err.contains("beta2"), "{err}");
    opt.set_learning_rate(-1.0);
    assert!(opt.backward_step(&w.as_tensor().sum_all().unwrap()).is_err(), "negative lr is rejected at step time");
}

#[test]
fn slow_weights_swap_in_and_back() {
    let vars = make_vars(21, DType::F32);
    let mut opt = Ranger::new_named(vars.clone(), params(UpdatePath::Auto)).unwrap();
    let mut rng = Rng(4);
    for _ in 0..7 {
        opt.step(&grads_for(&vars, &mut rng)).unwrap();
    }
    let fast = values(&vars);
    let slow: Vec<Vec<f64>> = opt
        .slow_weights()
        .unwrap()
        .iter()
        .map(|(_, t)| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_ne!(fast, slow, "two steps after the sync at 5 the fast weights have moved");
    let seen = opt.with_slow_weights(|| values(&vars)).unwrap();
    assert_eq!(seen, slow);
    assert_eq!(values(&vars), fast, "fast weights restored");
    opt.swap_in_slow_weights().unwrap();
    assert!(opt.step(&grads_for(&vars, &mut rng)).is_err(), "no step while swapped");
    opt.swap_back_fast_weights().unwrap();
    // A forced sync sets fast = slow + alpha (fast - slow).
    opt.sync_lookahead().unwrap();
    let after = values(&vars);
    let expect = slow[0][0] + 0.5 * (fast[0][0] - slow[0][0]);
    assert!((after[0][0] - expect).abs() < 1e-6);
}

#[test]
fn generic_lookahead_wraps_adamw() {
    let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let config = LookaheadConfig { inner: ParamsAdamW { lr: 0.1, ..Default::default() }, k: 3, alpha: 0.5 };
    let mut opt = Lookahead::<AdamW>::new(vec![w.clone()], config).unwrap();
    let start = w.as_tensor().to_vec2::<f32>().unwrap();
    for _ in 0..2 {
        opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
    }
    let fast2 = w.as_tensor().to_vec2::<f32>().unwrap();
    opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
    assert_eq!(opt.steps(), &[3]);
    // After the sync, fast == slow, and slow is halfway between the start and the fast weights.
    let slow = opt.slow_weights().unwrap()[0].to_vec2::<f32>().unwrap();
    assert_eq!(w.as_tensor().to_vec2::<f32>().unwrap(), slow);
    assert!(slow[0][0] < start[0][0] && slow[0][0] > fast2[0][0] - 1.0);
    let inside = opt.with_slow_weights(|| w.as_tensor().to_vec2::<f32>().unwrap()).unwrap();
    assert_eq!(inside, slow);
    opt.set_learning_rate(0.01);
    assert_eq!(opt.learning_rate(), 0.01);
}

#[test]
fn gradient_clipping_matches_torch_semantics() {
    let a = Var::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
    let b = Var::new(&[[0.0f32, 4.0]], &Device::Cpu).unwrap();
    let mut g = GradStore::default();
    g.insert(&a, Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap());
    g.insert(&b, Tensor::new(&[[0.0f32, 4.0]], &Device::Cpu).unwrap());
    let vars = [a.clone(), b.clone()];
    assert!((grad_norm(&g, &vars).unwrap() - 5.0).abs() < 1e-9);
    let norm = clip_grad_norm(&mut g, &vars, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    assert!((grad_norm(&g, &vars).unwrap() - 1.0).abs() < 1e-5);
    let before = g.get(&a).unwrap().to_vec1::<f32>().unwrap();
    clip_grad_norm(&mut g, &vars, 10.0).unwrap();
    assert_eq!(g.get(&a).unwrap().to_vec1::<f32>().unwrap(), before, "below the limit nothing changes");
}

/// The usual Candle order — build the model, build the optimizer, then load the weights — must
/// give Lookahead the loaded weights as its starting slow weights, not the random init.
#[test]
fn slow_weights_are_taken_at_the_first_step_not_at_construction() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let vars = make_vars(12, DType::F32);
        let p = ParamsRanger { lr: 0.0, lookahead_k: 2, ..params(path) };
        let mut opt = Ranger::new_named(vars.clone(), p).unwrap();
        let loaded = make_vars(13, DType::F32);
        for ((_, v), (_, l)) in vars.iter().zip(&loaded) {
            v.set(l.as_tensor()).unwrap();
        }
        let expected = values(&vars);
        let mut rng = Rng(1);
        for _ in 0..2 {
            opt.step(&grads_for(&vars, &mut rng)).unwrap();
        }
        assert_eq!(values(&vars), expected, "{path:?}: the sync pulled the weights toward the pre-load init");
    }
    let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let config =
        LookaheadConfig { inner: ParamsAdamW { lr: 0.0, weight_decay: 0.0, ..Default::default() }, k: 1, alpha: 0.5 };
    let mut la = Lookahead::<AdamW>::new(vec![w.clone()], config).unwrap();
    w.set(&Tensor::new(&[5.0f32, 6.0], &Device::Cpu).unwrap()).unwrap();
    let mut g = GradStore::default();
    g.insert(&w, Tensor::new(&[0.1f32, 0.1], &Device::Cpu).unwrap());
    la.step(&g).unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![5.0, 6.0]);
    // A non-finite gradient skips the whole Lookahead step.
    g.insert(&w, Tensor::new(&[f32::NAN, 0.1], &Device::Cpu).unwrap());
    la.step(&g).unwrap();
    assert_eq!(la.steps(), &[1]);
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![5.0, 6.0]);
}

#[test]
fn the_same_variable_cannot_be_added_twice() {
    let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let err = Ranger::new_named(vec![("a".into(), w.clone()), ("b".into(), w)], ParamsRanger::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another name"), "{err}");
}
