//! `candle_ranger::AdamW` against `candle_nn::AdamW` (which follows `torch.optim.AdamW`'s
//! formulas) on both update paths; f32 state and master copies for bf16 variables; exact resume.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use candle_ranger::{AdamW, AdamWOptions, ParamGroup, UpdatePath};

fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    (0..n).map(|i| scale * (((i as u64 * 2654435761 + seed * 97) % 4096) as f64 / 1024.0 - 2.0)).collect()
}

fn tensor(shape: (usize, usize), seed: u64, scale: f64, dt: DType) -> Tensor {
    Tensor::from_vec(values(shape.0 * shape.1, seed, scale), shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

fn params() -> ParamsAdamW {
    ParamsAdamW { lr: 1e-2, weight_decay: 0.05, ..Default::default() }
}

fn adamw(vars: Vec<(String, Var)>, path: UpdatePath) -> AdamW {
    let options = AdamWOptions { update_path: path, ..Default::default() };
    AdamW::with_options(vec![ParamGroup::new(vars)], params(), options).unwrap()
}

/// 40 steps in f64 (rows of different signs and scales, a gradient scale that changes): the
/// same trajectory as candle-nn's AdamW to 1e-12 relative, on the fused and the tensor-op path.
#[test]
fn matches_candle_nn_adamw() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let start = tensor((13, 17), 1, 1.0, DType::F64);
        let ours = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let theirs = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut a = adamw(vec![("w".into(), ours.clone())], path);
        let mut b = candle_nn::AdamW::new(vec![theirs.clone()], params()).unwrap();
        for step in 0..40u64 {
            let g = tensor((13, 17), step + 5, 10f64.powi(step as i32 % 3 - 1), DType::F64);
            let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
            ga.insert(&ours, g.clone());
            gb.insert(&theirs, g);
            a.step(&ga).unwrap();
            b.step(&gb).unwrap();
            let (x, y) = (ours.as_tensor().flatten_all().unwrap(), theirs.as_tensor().flatten_all().unwrap());
            let (x, y) = (x.to_vec1::<f64>().unwrap(), y.to_vec1::<f64>().unwrap());
            let err = x.iter().zip(&y).map(|(p, q)| (p - q).abs() / q.abs().max(1e-3)).fold(0f64, f64::max);
            assert!(err < 1e-12, "{path:?} step {}: relative difference {err:e}", step + 1);
        }
    }
}

/// bf16 variables keep f32 moments and an f32 master copy, which is the f32 run bit for bit.
#[test]
fn half_precision_state_is_f32() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let start = tensor((8, 9), 2, 1.0, DType::BF16).to_dtype(DType::F32).unwrap();
        let half = Var::from_tensor(&start.to_dtype(DType::BF16).unwrap()).unwrap();
        let full = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut oh = adamw(vec![("w".into(), half.clone())], path);
        let mut of = adamw(vec![("w".into(), full.clone())], path);
        for step in 0..6u64 {
            let g = tensor((8, 9), step + 9, 1.0, DType::BF16);
            let (mut gh, mut gf) = (GradStore::default(), GradStore::default());
            gh.insert(&half, g.clone());
            gf.insert(&full, g.to_dtype(DType::F32).unwrap());
            oh.step(&gh).unwrap();
            of.step(&gf).unwrap();
        }
        let state = oh.state_tensors().unwrap();
        let get = |n: &str| state.tensors.iter().find(|(k, _)| k == n).unwrap().1.to_tensor().unwrap();
        assert_eq!(get("w.exp_avg").dtype(), DType::F32);
        assert_eq!(get("w.exp_avg_sq").dtype(), DType::F32);
        let master = get("w.master").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f32_run = full.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(master, f32_run, "{path:?}");
    }
}

/// Saved after 5 steps and resumed, a run continues bit for bit.
#[test]
fn resume_is_bit_exact() {
    let dir = std::env::temp_dir().join(format!("candle-ranger-adamw-{}", std::process::id()));
    let file = dir.join("state.safetensors");
    let start = tensor((6, 7), 3, 1.0, DType::F32);
    let grad = |s: u64| tensor((6, 7), s + 20, 1.0, DType::F32);
    let run = |w: &Var, opt: &mut AdamW, steps: std::ops::Range<u64>| {
        for s in steps {
            let mut g = GradStore::default();
            g.insert(w, grad(s));
            opt.step(&g).unwrap();
        }
    };
    let w1 = Var::from_tensor(&start.copy().unwrap()).unwrap();
    let mut straight = adamw(vec![("w".into(), w1.clone())], UpdatePath::Auto);
    run(&w1, &mut straight, 0..10);
    let w2 = Var::from_tensor(&start.copy().unwrap()).unwrap();
    let mut first = adamw(vec![("w".into(), w2.clone())], UpdatePath::Auto);
    run(&w2, &mut first, 0..5);
    first.save_state(&file).unwrap();
    let w3 = Var::from_tensor(&w2.as_tensor().copy().unwrap()).unwrap();
    let mut resumed = adamw(vec![("w".into(), w3.clone())], UpdatePath::Auto);
    resumed.load_state(&file).unwrap();
    run(&w3, &mut resumed, 5..10);
    let bits = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(bits(&w1), bits(&w3));
    let _ = std::fs::remove_dir_all(dir);
}
