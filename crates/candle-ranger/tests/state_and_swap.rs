//! Optimizer state as data (`state_tensors` / `load_state_tensors`), the permissions of state
//! files, the slow-weight swap under a panic, and the typed errors of `Lookahead`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_ranger::{Error, Lookahead, LookaheadConfig, OptimizerState, ParamsRanger, Ranger, StateView, UpdatePath};

/// Deterministic values (no random generator needed): `sin(i^2 / 10) * scale`.
fn tensor(shape: &[usize], offset: usize, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> =
        (0..n).map(|i| (((i + offset) as f64).powi(2) * 0.1).sin() * scale).map(|x| x as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn vars(offset: usize) -> Vec<(String, Var)> {
    [&[33usize][..], &[40, 50], &[3, 4, 5, 6]]
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("w{i}"), Var::from_tensor(&tensor(s, offset + 1000 * i, 1.0)).unwrap()))
        .collect()
}

fn grads(vars: &[(String, Var)], step: usize) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        g.insert(v, tensor(v.dims(), 7919 * step + 13 * i, 0.1));
    }
    g
}

fn values(vars: &[(String, Var)]) -> Vec<Vec<u32>> {
    vars.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).map(bits).collect()
}

fn bits(xs: Vec<f32>) -> Vec<u32> {
    xs.into_iter().map(f32::to_bits).collect()
}

fn params(path: UpdatePath) -> ParamsRanger {
    ParamsRanger { lr: 1e-2, weight_decay: 0.05, lookahead_k: 5, update_path: path, ..Default::default() }
}

/// State handed over as tensors (no file) resumes bit-exactly, on both execution paths.
#[test]
fn state_tensors_resume_bit_exactly() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let straight_vars = vars(0);
        let mut straight = Ranger::new_named(straight_vars.clone(), params(path)).unwrap();
        for s in 0..16 {
            straight.step(&grads(&straight_vars, s)).unwrap();
        }
        let first_vars = vars(0);
        let mut first = Ranger::new_named(first_vars.clone(), params(path)).unwrap();
        for s in 0..8 {
            first.step(&grads(&first_vars, s)).unwrap();
        }
        first.set_learning_rate(0.0123);
        let state = first.state_tensors().unwrap();
        assert_eq!(state.tensors.len(), 4 * first_vars.len());
        assert_eq!(state.tensors[0].0, "w0.exp_avg");
        assert_eq!(state.lr, Some(0.0123));
        let resumed_vars: Vec<(String, Var)> = first_vars
            .iter()
            .map(|(k, v)| (k.clone(), Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()))
            .collect();
        let mut resumed = Ranger::new_named(resumed_vars.clone(), params(path)).unwrap();
        resumed.load_state_tensors(&state).unwrap();
        assert_eq!(resumed.learning_rate(), 0.0123);
        assert_eq!(resumed.var_step("w2"), Some(8));
        resumed.set_learning_rate(params(path).lr);
        for s in 8..16 {
            resumed.step(&grads(&resumed_vars, s)).unwrap();
        }
        assert_eq!(values(&straight_vars), values(&resumed_vars), "{path:?}: resume from tensors is not bit-exact");
    }
}

#[test]
fn load_state_tensors_checks_everything_and_changes_nothing() {
    let v = vars(0);
    let mut opt = Ranger::new_named(v.clone(), params(UpdatePath::Auto)).unwrap();
    opt.step(&grads(&v, 0)).unwrap();
    let good = opt.state_tensors().unwrap();
    let owned: Vec<(String, StateView<'static>)> =
        good.tensors.iter().map(|(k, t)| (k.clone(), StateView::Tensor(t.to_tensor().unwrap()))).collect();
    let with = |tensors: Vec<(String, StateView<'static>)>| OptimizerState {
        tensors,
        lr: Some(0.5),
        skipped_steps: 3,
        hyperparameters: String::new(),
    };
    let mut fresh = Ranger::new_named(vars(1), params(UpdatePath::Auto)).unwrap();

    let mut wrong_shape = owned.clone();
    wrong_shape[4].1 = StateView::Tensor(Tensor::zeros((40, 49), DType::F32, &Device::Cpu).unwrap());
    let err = fresh.load_state_tensors(&with(wrong_shape)).unwrap_err();
    assert!(matches!(&err, Error::StateMismatch { path: None, tensor, .. } if tensor == "w1.exp_avg"), "{err}");
    assert!(err.to_string().starts_with("tensor `w1.exp_avg`: shape"), "{err}");

    let mut wrong_dtype = owned.clone();
    wrong_dtype[1].1 = StateView::Tensor(Tensor::zeros(33, DType::F64, &Device::Cpu).unwrap());
    let err = fresh.load_state_tensors(&with(wrong_dtype)).unwrap_err().to_string();
    assert!(err.contains("w0.exp_avg_sq") && err.contains("dtype"), "{err}");

    let err = fresh.load_state_tensors(&with(owned[1..].to_vec())).unwrap_err().to_string();
    assert!(err.contains("w0.exp_avg") && err.contains("missing"), "{err}");

    let mut extra = owned.clone();
    extra.push(("w9.exp_avg".into(), StateView::Tensor(Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap())));
    let err = fresh.load_state_tensors(&with(extra)).unwrap_err().to_string();
    assert!(err.contains("w9.exp_avg"), "{err}");

    let mut twice = owned.clone();
    twice.push(owned[0].clone());
    assert!(fresh.load_state_tensors(&with(twice)).is_err());

    assert_eq!(fresh.var_step("w0"), Some(0), "a failed load leaves the optimizer untouched");
    assert_eq!(fresh.learning_rate(), params(UpdatePath::Auto).lr);
    fresh.load_state_tensors(&with(owned)).unwrap();
    assert_eq!((fresh.var_step("w0"), fresh.learning_rate(), fresh.skipped_steps()), (Some(1), 0.5, 3));
}

/// State files get the permissions of any file the process creates (not a temporary file's 0600).
#[cfg(unix)]
#[test]
fn state_files_get_the_usual_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("candle-ranger-mode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plain = dir.join("plain");
    std::fs::File::create(&plain).unwrap();
    let expected = std::fs::metadata(&plain).unwrap().permissions().mode();
    let v = vars(0);
    let mut opt = Ranger::new_named(v.clone(), params(UpdatePath::Auto)).unwrap();
    opt.step(&grads(&v, 0)).unwrap();
    let file = dir.join("optimizer.safetensors");
    opt.save_state(&file).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode(), expected);
    // Overwriting keeps them too.
    opt.save_state(&file).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode(), expected);
    let _ = std::fs::remove_dir_all(dir);
}

/// A panic inside `with_slow_weights` still puts the fast weights back.
#[test]
fn slow_weights_are_swapped_back_on_panic() {
    let v = vars(0);
    let mut opt = Ranger::new_named(v.clone(), params(UpdatePath::Auto)).unwrap();
    for s in 0..7 {
        opt.step(&grads(&v, s)).unwrap();
    }
    let fast = values(&v);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = opt.with_slow_weights(|| panic!("evaluation failed"));
    }));
    assert!(caught.is_err());
    assert_eq!(values(&v), fast, "fast weights restored after the panic");
    opt.step(&grads(&v, 7)).unwrap();

    let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let config = LookaheadConfig { inner: ParamsAdamW { lr: 0.1, ..Default::default() }, k: 2, alpha: 0.5 };
    let mut la = Lookahead::<AdamW>::new(vec![w.clone()], config).unwrap();
    for _ in 0..3 {
        la.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
    }
    let fast = w.as_tensor().to_vec1::<f32>().unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = la.with_slow_weights(|| panic!("evaluation failed"));
    }));
    assert!(caught.is_err());
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), fast);
}

#[test]
fn lookahead_errors_are_typed() {
    let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let inner = || AdamW::new(vec![w.clone()], ParamsAdamW::default()).unwrap();
    assert!(matches!(Lookahead::wrap(inner(), vec![w.clone()], 0, 0.5), Err(Error::InvalidLookahead { k: 0, .. })));
    assert!(matches!(Lookahead::wrap(inner(), vec![w.clone()], 5, 1.5), Err(Error::InvalidLookahead { .. })));
    let mut la = Lookahead::wrap(inner(), vec![w.clone()], 5, 0.5).unwrap();
    la.swap_in_slow_weights().unwrap();
    assert!(matches!(la.sync(), Err(Error::SlowWeightsSwappedIn { call: "sync" })));
    let mut g = GradStore::default();
    g.insert(&w, Tensor::new(&[0.1f32, 0.1], &Device::Cpu).unwrap());
    let err = la.step(&g).unwrap_err().to_string();
    assert!(err.contains("step called while the slow weights are swapped in"), "{err}");
    la.swap_back_fast_weights().unwrap();
    la.step(&g).unwrap();
}
