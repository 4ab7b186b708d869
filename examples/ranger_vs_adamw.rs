//! Trains the same small MLP on a synthetic task (two interleaved spirals) with Ranger and with
//! `candle_nn::AdamW` from the same initial weights, and prints both loss curves.
//!
//!     cargo run --release --example ranger_vs_adamw

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, loss, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_ranger::{named_vars, Decay, ParamGroup, ParamsRanger, Ranger, Schedule};

const STEPS: usize = 600;
const FEATURES: usize = 32;
const REPORT_EVERY: usize = 50;

/// Two spirals, labels 0/1, as 32 fixed random Fourier features of the 2-D points.
fn spirals(n: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % 2;
        let r = (i / 2) as f32 / (n / 2) as f32 * 4.0 + 0.2;
        let angle = r * 2.5 + class as f32 * std::f32::consts::PI;
        xs.extend([r * angle.cos() / 4.0, r * angle.sin() / 4.0]);
        ys.push(class as u32);
    }
    let points = Tensor::from_vec(xs, (n, 2), dev)?;
    // Deterministic projection directions and phases (a fixed, seeded pattern).
    let proj: Vec<f32> = (0..2 * FEATURES).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 12.0).collect();
    let phase: Vec<f32> = (0..FEATURES).map(|i| (i * 104_729 % 1000) as f32 / 1000.0 * std::f32::consts::TAU).collect();
    let proj = Tensor::from_vec(proj, (2, FEATURES), dev)?;
    let phase = Tensor::from_vec(phase, FEATURES, dev)?;
    let features = points.matmul(&proj)?.broadcast_add(&phase)?.cos()?;
    Ok((features, Tensor::from_vec(ys, n, dev)?))
}

struct Mlp {
    layers: Vec<candle_nn::Linear>,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Self> {
        let dims = [FEATURES, 64, 64, 2];
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(w[0], w[1], vb.pp(format!("l{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.tanh()?;
            }
        }
        Ok(h)
    }
}

/// A model with weights copied from `init`, so both optimizers start from the same point.
fn model_from(init: &VarMap, dev: &Device) -> Result<(VarMap, Mlp)> {
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let src = init.data().lock().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(src[name].as_tensor())?;
    }
    drop(src);
    Ok((varmap, model))
}

fn train<O: Optimizer>(model: &Mlp, opt: &mut O, schedule: &Schedule, x: &Tensor, y: &Tensor) -> Result<Vec<f32>> {
    let mut curve = Vec::new();
    for step in 0..STEPS {
        schedule.apply(opt, step);
        let loss = loss::cross_entropy(&model.forward(x)?, y)?;
        opt.backward_step(&loss)?;
        if (step + 1) % REPORT_EVERY == 0 {
            curve.push(loss.to_scalar::<f32>()?);
        }
    }
    Ok(curve)
}

fn accuracy(model: &Mlp, x: &Tensor, y: &Tensor) -> Result<f32> {
    let pred = model.forward(x)?.argmax(D::Minus1)?;
    pred.eq(y)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (x, y) = spirals(1000, &dev)?;
    let init = VarMap::new();
    Mlp::new(VarBuilder::from_varmap(&init, DType::F32, &dev))?;
    let schedule = Schedule {
        base_lr: 1e-2,
        min_lr: 1e-4,
        warmup_steps: 0,
        total_steps: STEPS,
        decay: Decay::FlatThenCosine { flat_fraction: 0.7 },
    };

    let (ranger_vars, ranger_model) = model_from(&init, &dev)?;
    let params = ParamsRanger { lr: 1e-2, weight_decay: 1e-4, ..Default::default() };
    let mut ranger =
        Ranger::with_groups(ParamGroup::split_decay(named_vars(&ranger_vars)), params).map_err(|e| e.into_candle())?;
    let ranger_curve = train(&ranger_model, &mut ranger, &schedule, &x, &y)?;
    // Evaluate on the slow weights, as the Lookahead paper recommends.
    let ranger_acc = ranger.with_slow_weights(|| accuracy(&ranger_model, &x, &y)).map_err(|e| e.into_candle())??;

    let (adamw_vars, adamw_model) = model_from(&init, &dev)?;
    let mut adamw =
        AdamW::new(adamw_vars.all_vars(), ParamsAdamW { lr: 1e-2, weight_decay: 1e-4, ..Default::default() })?;
    let adamw_curve = train(&adamw_model, &mut adamw, &schedule, &x, &y)?;
    let adamw_acc = accuracy(&adamw_model, &x, &y)?;

    println!("training loss (two spirals, 1000 points, 32 Fourier features, MLP 32-64-64-2, flat-then-cosine lr 1e-2)");
    println!("{:>6} {:>10} {:>10}", "step", "Ranger", "AdamW");
    for (i, (r, a)) in ranger_curve.iter().zip(&adamw_curve).enumerate() {
        println!("{:>6} {:>10.4} {:>10.4}", (i + 1) * REPORT_EVERY, r, a);
    }
    println!("accuracy: Ranger (slow weights) {:.1}%, AdamW {:.1}%", ranger_acc * 100.0, adamw_acc * 100.0);
    Ok(())
}
