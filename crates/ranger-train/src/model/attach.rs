//! Adding LoRA / DoRA adapters to a model's projections, initialised as PEFT does.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::linear::Proj;
use super::lora::{peft_magnitude_name, peft_name, target_matches, DropoutSeed, LoraAdapter, LoraConfig, LoraDropout};
use crate::kernels::compute_dtype;
use crate::rng::Rng;

/// Adds adapters of rank `cfg.rank` to the projections in `projs` (module path, projection)
/// that `cfg.targets` selects and returns them as trainable variables with their PEFT names
/// (A: uniform in ±1/sqrt(in), as PEFT's Kaiming init; B: zeros; DoRA's magnitude: the row
/// norms of W, so training starts from the base model). Dropout, when `cfg.dropout > 0`, is
/// driven by `dropout_seed`. A target that selects no projection is an error naming it.
pub fn attach_lora(
    projs: Vec<(String, &mut Proj)>,
    cfg: &LoraConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
    dropout_seed: &DropoutSeed,
) -> Result<Vec<(String, Var)>> {
    if let Some(t) = cfg.targets.iter().find(|t| !projs.iter().any(|(m, _)| target_matches(t, m))) {
        let mut names: Vec<&str> = projs.iter().filter_map(|(m, _)| m.rsplit('.').next()).collect();
        names.sort();
        names.dedup();
        candle_core::bail!(
            "LoRA target {t:?} matches no projection of this model (its projections: {})",
            names.join(", ")
        );
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        candle_core::bail!("LoRA dropout must be in [0, 1), got {}", cfg.dropout);
    }
    let mut rng = Rng::new(seed);
    let mut vars = Vec::new();
    for (stream, (module, proj)) in
        projs.into_iter().filter(|(m, _)| cfg.targets.iter().any(|t| target_matches(t, m))).enumerate()
    {
        let (out, inp) = proj.weight.dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * inp).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), device)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out, cfg.rank), dtype, device)?;
        let magnitude = if cfg.use_dora {
            let w = proj.weight.dense()?.to_dtype(compute_dtype(dtype))?;
            Some(Var::from_tensor(&w.sqr()?.sum(1)?.sqrt()?.to_dtype(dtype)?)?)
        } else {
            None
        };
        let dropout = (cfg.dropout > 0.0).then(|| LoraDropout {
            p: cfg.dropout,
            stream: stream as u64,
            seed: dropout_seed.clone(),
        });
        proj.lora = Some(LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.scale(),
            magnitude: magnitude.as_ref().map(|m| m.as_tensor().clone()),
            dropout,
        });
        vars.push((peft_name(&module, 'A'), a));
        vars.push((peft_name(&module, 'B'), b));
        if let Some(m) = magnitude {
            vars.push((peft_magnitude_name(&module), m));
        }
    }
    Ok(vars)
}
