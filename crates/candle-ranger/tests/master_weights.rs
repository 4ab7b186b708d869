//! The f32 master copy of half-precision variables (`ParamsRanger::master_weights`): small
//! updates accumulate, the copy follows an f32 run bit for bit on both update paths, it is
//! saved with the state, and turning it off gives the old rounding behaviour.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use candle_ranger::{ParamsRanger, Ranger, UpdatePath};

mod common;

fn params(path: UpdatePath, master: bool) -> ParamsRanger {
    ParamsRanger {
        lr: 1e-2,
        weight_decay: 0.05,
        lookahead_k: 5,
        update_path: path,
        master_weights: master,
        ..Default::default()
    }
}

/// Deterministic bf16-representable values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| half::bf16::from_f32(((i as u64 * 2654435761 + seed * 97) % 4096) as f32 / 1024.0 - 2.0).to_f32())
        .collect()
}

fn master_of(opt: &Ranger, name: &str) -> Vec<f32> {
    let state = opt.state_tensors().unwrap();
    let (_, t) = state.tensors.iter().find(|(n, _)| n == &format!("{name}.master")).expect("a master copy");
    t.to_tensor().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// An update below half a bf16 ulp (lr 1e-3 on a weight of 1.0, whose ulp is 2^-7) is lost at
/// every step without the master copy, and accumulates with it.
#[test]
fn small_updates_accumulate_in_the_master_copy() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let run = |master: bool| {
            let w = Var::from_tensor(&Tensor::ones(8, DType::BF16, &Device::Cpu).unwrap()).unwrap();
            let p = ParamsRanger {
                lr: 1e-3,
                lookahead_k: 0,
                update_path: path,
                master_weights: master,
                ..Default::default()
            };
            let mut opt = Ranger::new_named(vec![("w".into(), w.clone())], p).unwrap();
            let mut g = GradStore::default();
            g.insert(&w, Tensor::ones(8, DType::BF16, &Device::Cpu).unwrap());
            for _ in 0..30 {
                opt.step(&g).unwrap();
            }
            w.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0]
        };
        assert_eq!(run(false), 1.0, "{path:?}: without a master copy each update rounds away");
        let moved = run(true);
        assert!(moved < 1.0, "{path:?}: with a master copy the weight moves ({moved})");
    }
}

/// With the same bf16-representable start and gradients, the master copy of a bf16 variable is
/// bit for bit the f32 variable of an f32 run (same kernel, same state dtype), through
/// rectification and Lookahead syncs; the bf16 variable is its rounding.
#[test]
fn master_copy_is_the_f32_run() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let shape = (24, 33);
        let start = Tensor::from_vec(values(24 * 33, 1), shape, &Device::Cpu).unwrap();
        let half = Var::from_tensor(&start.to_dtype(DType::BF16).unwrap()).unwrap();
        let full = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut oh = Ranger::new_named(vec![("w".into(), half.clone())], params(path, true)).unwrap();
        let mut of = Ranger::new_named(vec![("w".into(), full.clone())], params(path, true)).unwrap();
        for step in 0..12u64 {
            let g = Tensor::from_vec(values(24 * 33, step + 7), shape, &Device::Cpu).unwrap();
            let (mut gh, mut gf) = (GradStore::default(), GradStore::default());
            gh.insert(&half, g.to_dtype(DType::BF16).unwrap());
            gf.insert(&full, g);
            oh.step(&gh).unwrap();
            of.step(&gf).unwrap();
            let f32_run = full.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let master = master_of(&oh, "w");
            assert!(
                master.iter().zip(&f32_run).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path:?} step {step}: master copy differs from the f32 run"
            );
            let rounded: Vec<f32> = master.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            let var = half.as_tensor().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(var, rounded, "{path:?} step {step}: the variable is the master copy rounded");
        }
    }
}

/// The master copy is saved and loaded: a run stopped, saved and resumed continues bit for bit
/// (the variable alone, rounded to bf16, could not give that), and a state saved with master
/// weights off has no master tensors.
#[test]
fn master_copy_is_saved_and_restored() {
    let dir = std::env::temp_dir().join(format!("candle-ranger-master-{}", std::process::id()));
    let file = dir.join("state.safetensors");
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let start = Tensor::from_vec(values(64, 3), 64, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let grad =
            |step: u64| Tensor::from_vec(values(64, step), 64, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let run = |steps: std::ops::Range<u64>, w: &Var, opt: &mut Ranger| {
            for s in steps {
                let mut g = GradStore::default();
                g.insert(w, grad(s));
                opt.step(&g).unwrap();
            }
        };
        let w = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut straight = Ranger::new_named(vec![("w".into(), w.clone())], params(path, true)).unwrap();
        run(0..9, &w, &mut straight);

        let w2 = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut first = Ranger::new_named(vec![("w".into(), w2.clone())], params(path, true)).unwrap();
        run(0..4, &w2, &mut first);
        first.save_state(&file).unwrap();
        let saved_weights = w2.as_tensor().copy().unwrap();
        let w3 = Var::from_tensor(&saved_weights).unwrap();
        let mut resumed = Ranger::new_named(vec![("w".into(), w3.clone())], params(path, true)).unwrap();
        resumed.load_state(&file).unwrap();
        run(4..9, &w3, &mut resumed);
        assert_eq!(master_of(&straight, "w"), master_of(&resumed, "w"), "{path:?}");
        let bits = |v: &Var| v.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&w), bits(&w3), "{path:?}");

        let w4 = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut off = Ranger::new_named(vec![("w".into(), w4.clone())], params(path, false)).unwrap();
        run(0..2, &w4, &mut off);
        assert!(off.state_tensors().unwrap().tensors.iter().all(|(n, _)| !n.ends_with(".master")));
        // A state with master copies loads into an optimizer without them (the copies dropped).
        off.load_state(&file).unwrap();
        assert!(off.state_tensors().unwrap().tensors.iter().all(|(n, _)| !n.ends_with(".master")));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A variable set from outside after its first step (what a `Lookahead<O>` wrapper's sync or a
/// user's `Var::set` does) is adopted by the master copy at the next step: with a zero learning
/// rate the step leaves that value as it is, on both update paths.
#[test]
fn an_external_change_is_adopted() {
    for path in [UpdatePath::Fused, UpdatePath::Portable] {
        let w = Var::from_tensor(
            &Tensor::from_vec(values(32, 4), 32, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap(),
        )
        .unwrap();
        let p = ParamsRanger { lookahead_k: 0, update_path: path, ..Default::default() };
        let mut opt = Ranger::new_named(vec![("w".into(), w.clone())], p).unwrap();
        let mut g = GradStore::default();
        g.insert(&w, Tensor::from_vec(values(32, 5), 32, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
        opt.step(&g).unwrap();
        let outside = Tensor::from_vec(values(32, 6), 32, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        w.set(&outside).unwrap();
        opt.set_learning_rate(0.0);
        opt.step(&g).unwrap();
        let v = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(w.as_tensor()), v(&outside), "{path:?}: the variable keeps the value set from outside");
        assert_eq!(master_of(&opt, "w"), v(&outside), "{path:?}: the master copy took it");
    }
}

/// bf16 with master copies on `RANGER_TEST_DEVICE` (tensor ops, and the fused kernel on CUDA and
/// Metal) against the fused CPU kernel, through rectification and Lookahead syncs: the master
/// copies agree to f32 rounding, the variables to bf16 rounding. On the CPU this checks the
/// tensor-op path's master copies against the fused kernel's.
#[test]
fn master_copy_on_the_test_device_matches_the_cpu() {
    let dev = common::test_device();
    let mut paths = vec![UpdatePath::Auto, UpdatePath::Portable];
    if dev.is_cuda() || dev.is_metal() {
        paths.push(UpdatePath::Fused);
    }
    for path in paths {
        let shape = (24, 33);
        let start = Tensor::from_vec(values(24 * 33, 8), shape, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let cpu = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let on_dev = Var::from_tensor(&start.to_device(&dev).unwrap().copy().unwrap()).unwrap();
        let mut oc = Ranger::new_named(vec![("w".into(), cpu.clone())], params(UpdatePath::Fused, true)).unwrap();
        let mut od = Ranger::new_named(vec![("w".into(), on_dev.clone())], params(path, true)).unwrap();
        for step in 0..12u64 {
            let g = Tensor::from_vec(values(24 * 33, step + 30), shape, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let (mut gc, mut gd) = (GradStore::default(), GradStore::default());
            gc.insert(&cpu, g.clone());
            gd.insert(&on_dev, g.to_device(&dev).unwrap());
            oc.step(&gc).unwrap();
            od.step(&gd).unwrap();
        }
        let (mc, md) = (master_of(&oc, "w"), master_of(&od, "w"));
        let scale = mc.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let worst = mc.iter().zip(&md).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        assert!(worst < 1e-5, "{path:?}: master copies differ by {worst:e} of the largest");
        let v = |t: &Var| {
            t.as_tensor()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let worst = v(&cpu).iter().zip(&v(&on_dev)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        assert!(worst < 1e-2, "{path:?}: variables differ by {worst:e} of the largest");
    }
}
