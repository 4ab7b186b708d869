//! Packed optimizer state (`StatePrecision::Int8` and `Bf16`): it trains like the f32 state,
//! takes about 3 (8-bit) or 6 (bf16) bytes per parameter, resumes bit for bit through a state
//! file, keeps the slow weights right through Lookahead syncs, and is refused for f64
//! variables; on the fused CPU step and on the portable (tensor-op) path that CUDA and Metal
//! use, whose state files are interchangeable.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_ranger::{ParamsRanger, Ranger, StatePrecision, UpdatePath};

/// Deterministic values: `sin(i^2 / 10) * scale`.
fn tensor(shape: &[usize], offset: usize, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> =
        (0..n).map(|i| (((i + offset) as f64).powi(2) * 0.1).sin() * scale).map(|x| x as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn params(precision: StatePrecision) -> ParamsRanger {
    ParamsRanger { lr: 1e-2, beta2: 0.99, lookahead_k: 5, state_precision: precision, ..Default::default() }
}

/// The two update paths: the fused CPU step (`Auto` on the CPU) and tensor ops.
const PATHS: [UpdatePath; 2] = [UpdatePath::Auto, UpdatePath::Portable];

fn params_on(precision: StatePrecision, path: UpdatePath) -> ParamsRanger {
    ParamsRanger { update_path: path, ..params(precision) }
}

/// A least-squares problem `|X W - Y|^2` over a [48, 300] weight (rows not a multiple of the
/// 256-value block, so blocks straddle rows) and a [7] bias, and its gradients.
struct Problem {
    x: Tensor,
    y: Tensor,
}

impl Problem {
    fn new() -> Self {
        Self { x: tensor(&[64, 48], 1, 1.0), y: tensor(&[64, 300], 2, 1.0) }
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("w".into(), Var::from_tensor(&tensor(&[48, 300], 3, 0.1)).unwrap()),
            ("b".into(), Var::from_tensor(&tensor(&[7], 4, 0.1)).unwrap()),
        ]
    }

    fn loss(&self, vars: &[(String, Var)]) -> Tensor {
        let fit = (self.x.matmul(vars[0].1.as_tensor()).unwrap() - &self.y).unwrap().sqr().unwrap().mean_all().unwrap();
        (fit + vars[1].1.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap()
    }

    fn grads(&self, vars: &[(String, Var)]) -> GradStore {
        self.loss(vars).backward().unwrap()
    }
}

/// Every variable's slow weights, as values.
fn slow_values(o: &Ranger) -> Vec<Vec<f32>> {
    o.slow_weights().unwrap().into_iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

/// Over 300 steps the 8-bit state follows the f32 state: the loss curves stay within a few
/// percent and end at the same place, and the weights stay close.
#[test]
fn packed_state_trains_like_f32_state() {
    let problem = Problem::new();
    let run = |precision, path| {
        let vars = problem.vars();
        let mut opt = Ranger::new_named(vars.clone(), params_on(precision, path)).unwrap();
        let mut losses = Vec::new();
        for _ in 0..300 {
            losses.push(scalar(&problem.loss(&vars)));
            opt.step_with_report(&problem.grads(&vars)).unwrap();
        }
        losses.push(scalar(&problem.loss(&vars)));
        (losses, vars[0].1.as_tensor().clone())
    };
    let (f32_losses, f32_w) = run(StatePrecision::F32, UpdatePath::Auto);
    assert!(f32_losses[300] < 0.5 * f32_losses[0], "the problem trains: {} -> {}", f32_losses[0], f32_losses[300]);
    // (precision, loss tolerance at each step, weight tolerance as a share of the largest move):
    // 8-bit measured 6.5 % of the move.
    for path in PATHS {
        for (precision, loss_tol, weight_tol) in [(StatePrecision::Int8, 0.03, 0.1), (StatePrecision::Bf16, 0.01, 0.03)]
        {
            let (losses, w) = run(precision, path);
            for (step, (a, b)) in f32_losses.iter().zip(&losses).enumerate() {
                assert!(
                    (a - b).abs() <= loss_tol * a,
                    "{precision:?} {path:?}, step {step}: loss {b}, {a} with f32 state"
                );
            }
            let diff = scalar(&(&f32_w - &w).unwrap().abs().unwrap().max_all().unwrap());
            let moved = scalar(&(&f32_w - tensor(&[48, 300], 3, 0.1)).unwrap().abs().unwrap().max_all().unwrap());
            assert!(diff < weight_tol * moved, "{precision:?} {path:?}: weights differ by {diff}, moved by {moved}");
        }
    }
}

/// m, v and the slow-weight delta take one byte (8-bit, plus a scale per 256) or two (bf16)
/// per value.
#[test]
fn packed_state_takes_3_or_6_bytes_per_parameter() {
    let problem = Problem::new();
    for (precision, most, names) in [
        (
            StatePrecision::Int8,
            3.1,
            &["w.exp_avg.q8", "w.exp_avg.q8_scales", "w.exp_avg_sq.q8", "w.slow_delta.q8", "w.slow_delta.q8_scales"][..],
        ),
        (StatePrecision::Bf16, 6.0, &["w.exp_avg", "w.exp_avg_sq", "w.slow_delta"][..]),
    ] {
        for path in PATHS {
            let vars = problem.vars();
            let mut opt = Ranger::new_named(vars.clone(), params_on(precision, path)).unwrap();
            opt.step_with_report(&problem.grads(&vars)).unwrap();
            let state = opt.state_tensors().unwrap();
            let bytes: usize = state
                .tensors
                .iter()
                .filter(|(n, _)| !n.ends_with(".step"))
                .map(|(_, t)| t.dims().iter().product::<usize>() * t.dtype().size_in_bytes())
                .sum();
            let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            let per_param = bytes as f64 / params as f64;
            assert!(per_param <= most, "{precision:?}: {per_param} bytes per parameter");
            let saved: Vec<&str> = state.tensors.iter().map(|(n, _)| n.as_str()).collect();
            for n in names {
                assert!(saved.contains(n), "{precision:?} {path:?}: {n} missing from {saved:?}");
            }
        }
    }
}

/// 2N steps straight == N steps, save to a file, load into a fresh optimizer, N steps: the
/// bytes, scales and rounding streams all carry over, across Lookahead syncs.
#[test]
fn packed_state_resumes_bit_exactly_through_a_file() {
    for precision in [StatePrecision::Int8, StatePrecision::Bf16] {
        for path in PATHS {
            resume_through_a_file(precision, path);
        }
    }
}

fn resume_through_a_file(precision: StatePrecision, path: UpdatePath) {
    let problem = Problem::new();
    let params = |precision| params_on(precision, path);
    let dir = std::env::temp_dir().join(format!("packed-state-{precision:?}-{path:?}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bits = |vars: &[(String, Var)]| -> Vec<Vec<u32>> {
        vars.iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(|xs| xs.into_iter().map(f32::to_bits).collect())
            .collect()
    };
    let straight_vars = problem.vars();
    let mut straight = Ranger::new_named(straight_vars.clone(), params(precision)).unwrap();
    for _ in 0..14 {
        straight.step_with_report(&problem.grads(&straight_vars)).unwrap();
    }
    let first_vars = problem.vars();
    let mut first = Ranger::new_named(first_vars.clone(), params(precision)).unwrap();
    for _ in 0..7 {
        first.step_with_report(&problem.grads(&first_vars)).unwrap();
    }
    first.save_state(dir.join("state.safetensors")).unwrap();
    let resumed_vars = problem.vars();
    for ((_, a), (_, b)) in resumed_vars.iter().zip(&first_vars) {
        a.set(b.as_tensor()).unwrap();
    }
    drop(first);
    let mut resumed = Ranger::new_named(resumed_vars.clone(), params(precision)).unwrap();
    resumed.load_state(dir.join("state.safetensors")).unwrap();
    for _ in 0..7 {
        resumed.step_with_report(&problem.grads(&resumed_vars)).unwrap();
    }
    assert_eq!(bits(&straight_vars), bits(&resumed_vars));
    assert_eq!(slow_values(&straight), slow_values(&resumed));
    // A state saved with f32 moments does not load into 8-bit state, and says which tensor.
    let mut f32_opt = Ranger::new_named(problem.vars(), params(StatePrecision::F32)).unwrap();
    f32_opt.step_with_report(&problem.grads(&problem.vars())).unwrap();
    f32_opt.save_state(dir.join("f32.safetensors")).unwrap();
    let err = resumed.load_state(dir.join("f32.safetensors")).unwrap_err().to_string();
    assert!(err.contains("w.exp_avg"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The slow weights packed state implies (fast - delta) are the ones Lookahead syncs to:
/// right after a sync step the variable equals them, and a forced sync leaves them equal too.
#[test]
fn packed_slow_weights_match_the_fast_ones_after_a_sync() {
    for precision in [StatePrecision::Int8, StatePrecision::Bf16] {
        for path in PATHS {
            slow_equals_fast_after_a_sync(precision, path);
        }
    }
}

fn slow_equals_fast_after_a_sync(precision: StatePrecision, path: UpdatePath) {
    let problem = Problem::new();
    let vars = problem.vars();
    let mut opt = Ranger::new_named(vars.clone(), params_on(precision, path)).unwrap();
    let max_diff = |opt: &Ranger| {
        opt.slow_weights()
            .unwrap()
            .iter()
            .zip(&vars)
            .map(|((_, s), (_, v))| scalar(&(s - v.as_tensor()).unwrap().abs().unwrap().max_all().unwrap()))
            .fold(0f32, f32::max)
    };
    for step in 1..=12 {
        opt.step_with_report(&problem.grads(&vars)).unwrap();
        if step % 5 == 0 {
            assert_eq!(max_diff(&opt), 0.0, "step {step}: a sync step leaves slow == fast");
        } else {
            assert!(max_diff(&opt) > 0.0, "step {step}: the fast weights have moved away");
        }
    }
    opt.sync_lookahead().unwrap();
    assert_eq!(max_diff(&opt), 0.0);
}

/// f64 variables are refused packed state when the optimizer is built, on either path.
#[test]
fn packed_state_is_refused_for_f64_variables() {
    for path in PATHS {
        let f64_var = Var::from_tensor(&tensor(&[4, 4], 0, 1.0).to_dtype(DType::F64).unwrap()).unwrap();
        let err = Ranger::new_named(vec![("x".into(), f64_var.clone())], params_on(StatePrecision::Int8, path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("8-bit optimizer state") && err.contains("F64"), "{err}");
        let err = Ranger::new_named(vec![("x".into(), f64_var)], params_on(StatePrecision::Bf16, path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bf16 optimizer state") && err.contains("F64"), "{err}");
    }
}

/// A state file written on one path loads on the other: the same entries, the same values
/// (the moments and slow weights decode alike), and training goes on from there.
#[test]
fn packed_state_files_move_between_the_fused_and_portable_paths() {
    let problem = Problem::new();
    let dir = std::env::temp_dir().join(format!("packed-state-cross-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for precision in [StatePrecision::Int8, StatePrecision::Bf16] {
        for (from, to) in [(UpdatePath::Auto, UpdatePath::Portable), (UpdatePath::Portable, UpdatePath::Auto)] {
            let vars = problem.vars();
            let mut a = Ranger::new_named(vars.clone(), params_on(precision, from)).unwrap();
            for _ in 0..7 {
                a.step_with_report(&problem.grads(&vars)).unwrap();
            }
            let file = dir.join(format!("{precision:?}-{from:?}.safetensors"));
            a.save_state(&file).unwrap();
            let mut b = Ranger::new_named(vars.clone(), params_on(precision, to)).unwrap();
            b.load_state(&file).unwrap();
            assert_eq!(b.is_fused("w"), Some(to == UpdatePath::Auto));
            assert_eq!(slow_values(&a), slow_values(&b), "{precision:?} {from:?} -> {to:?}: slow weights");
            // The moments: both optimizers take the same next step up to rounding.
            let wa = problem.vars();
            for ((_, x), (_, y)) in wa.iter().zip(&vars) {
                x.set(y.as_tensor()).unwrap();
            }
            let mut a2 = Ranger::new_named(wa.clone(), params_on(precision, from)).unwrap();
            a2.load_state(&file).unwrap();
            a2.step_with_report(&problem.grads(&wa)).unwrap();
            b.step_with_report(&problem.grads(&vars)).unwrap();
            let d = scalar(&(wa[0].1.as_tensor() - vars[0].1.as_tensor()).unwrap().abs().unwrap().max_all().unwrap());
            assert!(d < 1e-4, "{precision:?} {from:?} -> {to:?}: the next steps differ by {d}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// bf16 variables train over an f32 master copy with 8-bit moments, as with f32 moments.
#[test]
fn packed_state_with_a_bf16_variable_and_its_master_copy() {
    let run = |precision, path| {
        let w = Var::from_tensor(&tensor(&[16, 300], 5, 1.0).to_dtype(DType::BF16).unwrap()).unwrap();
        let mut opt = Ranger::new_named(vec![("w".into(), w.clone())], params_on(precision, path)).unwrap();
        let loss = || w.as_tensor().to_dtype(DType::F32).unwrap().sqr().unwrap().sum_all().unwrap();
        let start = scalar(&loss());
        for _ in 0..40 {
            opt.step_with_report(&loss().backward().unwrap()).unwrap();
        }
        let names: Vec<String> = opt.state_tensors().unwrap().tensors.iter().map(|(n, _)| n.clone()).collect();
        assert!(names.contains(&"w.master".to_string()), "{names:?}");
        (start, scalar(&loss()))
    };
    let (start, f32_end) = run(StatePrecision::F32, UpdatePath::Auto);
    assert!(f32_end < 0.9 * start, "the problem trains: {start} -> {f32_end}");
    for precision in [StatePrecision::Int8, StatePrecision::Bf16] {
        for path in PATHS {
            let (_, end) = run(precision, path);
            assert!(
                (end - f32_end).abs() < 0.03 * (start - f32_end),
                "{precision:?} {path:?} {end}, f32 {f32_end} (from {start})"
            );
        }
    }
}
