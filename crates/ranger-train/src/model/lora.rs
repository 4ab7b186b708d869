//! LoRA (arXiv 2106.09685): low-rank adapters on the projections of any model, with PEFT's
//! names and initialisation, so adapters move between ranger-tune and `peft` unchanged.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::llama::Proj;

/// A low-rank adapter `x A^T B^T * scale` added to a projection (LoRA, arXiv 2106.09685).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`, random at the start.
    pub a: Tensor,
    /// `[out, r]`, zero at the start (so training starts from the base model).
    pub b: Tensor,
    /// `lora_alpha / r`.
    pub scale: f64,
}

/// Which projections get LoRA adapters, with what rank and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`; the adapter output is scaled by `alpha / r`.
    pub alpha: f64,
    /// Module names that get adapters (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        Self { rank: 8, alpha: 16.0, targets: targets.iter().map(|s| s.to_string()).collect() }
    }
}

/// The PEFT name of a LoRA matrix: `base_model.model.<module>.lora_A.weight` / `lora_B`.
pub fn peft_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Whether a PEFT `target_modules` entry selects `module`: the full path, or its last
/// dot-separated components (`q_proj` and `self_attn.q_proj` both select
/// `model.layers.0.self_attn.q_proj`), as PEFT matches them.
pub fn target_matches(target: &str, module: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

/// Adds adapters of rank `cfg.rank` to the projections in `projs` (module path, projection)
/// that `cfg.targets` selects and returns them as trainable variables with their PEFT names
/// (A: uniform in ±1/sqrt(in), as PEFT's Kaiming init; B: zeros). A target that selects no
/// projection is an error naming it.
pub fn attach_lora(projs: Vec<(String, &mut Proj)>, cfg: &LoraConfig, seed: u64, dtype: DType, device: &Device) -> Result<Vec<(String, Var)>> {
    if let Some(t) = cfg.targets.iter().find(|t| !projs.iter().any(|(m, _)| target_matches(t, m))) {
        let mut names: Vec<&str> = projs.iter().filter_map(|(m, _)| m.rsplit('.').next()).collect();
        names.sort();
        names.dedup();
        candle_core::bail!("LoRA target {t:?} matches no projection of this model (its projections: {})", names.join(", "));
    }
    let mut rng = crate::rng::Rng::new(seed);
    let mut vars = Vec::new();
    for (module, proj) in projs {
        if !cfg.targets.iter().any(|t| target_matches(t, &module)) {
            continue;
        }
        let (out, inp) = proj.weight.dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * inp).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), device)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out, cfg.rank), dtype, device)?;
        proj.lora = Some(LoraAdapter { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: cfg.alpha / cfg.rank as f64 });
        vars.push((peft_name(&module, 'A'), a));
        vars.push((peft_name(&module, 'B'), b));
    }
    Ok(vars)
}
