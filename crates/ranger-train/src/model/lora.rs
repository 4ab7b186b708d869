//! LoRA (arXiv 2106.09685) and DoRA (arXiv 2402.09353): low-rank adapters on the projections of
//! any model, with PEFT's names, initialisation, scaling, dropout and DoRA semantics, so
//! adapters move between ranger-tune and `peft` unchanged.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::compute_dtype;
use crate::kernels::linear::linear;
use crate::kernels::lora_linear::lora_linear;
use crate::kernels::weight::Weight;
use crate::rng::Rng;

/// The seed of the training micro-batch being run, shared by every adapter of a model. LoRA
/// dropout draws its masks from it (per micro-batch and adapter, so a resumed run draws the
/// same masks) and is off while it is unset: evaluation and inference never drop anything.
#[derive(Debug, Clone, Default)]
pub struct DropoutSeed(Arc<Mutex<SeedState>>);

/// The seed, and whether a GPU's generator has been seeded with it yet.
#[derive(Debug, Default)]
struct SeedState {
    seed: Option<u64>,
    device_seeded: bool,
}

impl DropoutSeed {
    /// Sets the seed of the next forward passes (`None`: dropout off).
    pub fn set(&self, seed: Option<u64>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = SeedState { seed, device_seeded: false };
    }

    /// The current seed.
    pub fn get(&self) -> Option<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).seed
    }

    /// Seeds `device`'s generator with the current seed, once per [`DropoutSeed::set`]: the
    /// masks of a forward pass are then that generator's draws in order (the adapters always run
    /// in the same order), and rebuilding the generator per mask is avoided.
    fn seed_device_once(&self, device: &Device) -> Result<()> {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(seed), false) = (st.seed, st.device_seeded) {
            device.set_seed(seed)?;
            st.device_seeded = true;
        }
        Ok(())
    }

    /// Runs `f` with the seed set to `seed`, as when a checkpointed layer is recomputed in the
    /// backward pass (the trainer has cleared the seed by then), then restores the state. On a
    /// GPU the device's generator is first seeded from `seed` and `scope` (the layer's index),
    /// so the layer draws the same masks in its forward pass and when it is recomputed; on the
    /// CPU the masks depend on the seed and the adapter only, as without checkpointing.
    pub fn replay<R>(
        &self,
        seed: Option<u64>,
        scope: u64,
        device: &Device,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(&mut *lock(), SeedState { seed, device_seeded: false });
        let result = (|| {
            if let (Some(seed), false) = (seed, device.is_cpu()) {
                device.set_seed(mix_seed(seed, scope))?;
                lock().device_seeded = true;
            }
            f()
        })();
        *lock() = previous;
        result
    }
}

/// SplitMix64's output function: a well-mixed 64-bit hash of `a` and `b`.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    Rng::new(a ^ Rng::new(b).next_u64()).next_u64()
}

/// Dropout on an adapter's input (PEFT's `lora_dropout`), active while its [`DropoutSeed`] is set.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    /// Probability of zeroing an input element.
    pub p: f64,
    /// Which adapter this is (its masks are drawn from their own stream).
    pub stream: u64,
    /// The shared training switch.
    pub seed: DropoutSeed,
}

impl LoraDropout {
    /// The mask for a `[rows, cols]` input in the current micro-batch (`None` when off): 0 with
    /// probability p, else `1 / (1 - p)`. On the CPU it is drawn from our own generator, seeded
    /// by the micro-batch and the adapter; on a GPU it is drawn there, from the device's
    /// generator seeded once per micro-batch, so no `[rows, cols]` mask crosses the bus. Either
    /// way a resumed run draws the same masks (on the same kind of device: GPU masks are not the
    /// CPU's).
    pub fn mask(&self, rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let Some(seed) = self.seed.get() else { return Ok(None) };
        if !device.is_cpu() {
            self.seed.seed_device_once(device)?;
            let kept = Tensor::rand(0f32, 1f32, (rows, cols), device)?.ge(self.p as f32)?;
            return Ok(Some((kept.to_dtype(dtype)? * (1.0 / (1.0 - self.p)))?));
        }
        let mut rng = Rng::new(mix_seed(seed, self.stream));
        // Two 32-bit draws per 64 random bits; keep when the draw is below (1 - p) * 2^32.
        let threshold = ((1.0 - self.p) * 4_294_967_296.0) as u64;
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let n = rows * cols;
        let mut values = Vec::with_capacity(n + 1);
        while values.len() < n {
            let bits = rng.next_u64();
            for half in [bits & 0xFFFF_FFFF, bits >> 32] {
                values.push(if half < threshold { keep } else { 0.0 });
            }
        }
        values.truncate(n);
        Ok(Some(Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype)?))
    }
}

/// A low-rank adapter `x A^T B^T * scale` added to a projection (LoRA), optionally
/// weight-decomposed (DoRA).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`, random at the start.
    pub a: Tensor,
    /// `[out, r]`, zero at the start (so training starts from the base model).
    pub b: Tensor,
    /// `lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// DoRA's `[out]` magnitude vector `m`: the projection becomes
    /// `m * (W + scale B A) / ||W + scale B A||` with the row norm treated as a constant in
    /// backprop (DoRA section 4.3, as PEFT does).
    pub magnitude: Option<Tensor>,
    /// Dropout on the adapter's input while training.
    pub dropout: Option<LoraDropout>,
}

impl LoraAdapter {
    /// `scale * B A`, `[out, in]`, in the compute dtype.
    fn delta(&self) -> Result<Tensor> {
        let cdt = compute_dtype(self.a.dtype());
        self.b.to_dtype(cdt)?.matmul(&self.a.to_dtype(cdt)?)? * self.scale
    }

    /// DoRA's per-row factor `m / ||W + scale B A||` (`[out]`, gradient to `m` only; a
    /// quantized W is dequantized whole for it, one projection at a time).
    fn dora_factor(&self, weight: &Weight, magnitude: &Tensor) -> Result<Tensor> {
        let weight = weight.dense()?;
        let cdt = compute_dtype(weight.dtype());
        let norm = (weight.to_dtype(cdt)? + self.delta()?.detach())?.sqr()?.sum(1)?.sqrt()?.detach();
        magnitude.broadcast_div(&norm.to_dtype(magnitude.dtype())?)
    }

    /// The projection `x W^T` with the adapter applied (without bias), for its input `x`
    /// (`[tokens, in]`) and the base weight. In training with dropout the adapter (and DoRA's
    /// rescaling of the base path) sees the dropped-out input, exactly as PEFT. Plain LoRA on
    /// the CPU is one op ([`lora_linear`]) that keeps no output-sized intermediate for backward.
    pub fn project(&self, x: &Tensor, weight: &Weight) -> Result<Tensor> {
        let (rows, cols) = x.dims2()?;
        let mask = match &self.dropout {
            Some(d) => d.mask(rows, cols, x.dtype(), x.device())?,
            None => None,
        };
        if self.magnitude.is_none() {
            if let Some(y) = lora_linear(x, weight, (&self.a, &self.b, self.scale), mask.as_ref())? {
                return Ok(y);
            }
        }
        self.apply(x, weight, weight.forward(x)?, mask)
    }

    /// [`Self::project`] op by op, given `base = x W^T` and the dropout mask.
    fn apply(&self, x: &Tensor, weight: &Weight, base: Tensor, mask: Option<Tensor>) -> Result<Tensor> {
        let dropped = mask.map(|m| x.mul(&m)).transpose()?;
        let xa = dropped.as_ref().unwrap_or(x);
        // Scale the rank-r intermediate, not the full-width output: one large tensor fewer
        // kept for backprop.
        let low = linear(&(linear(xa, &self.a)? * self.scale)?, &self.b)?;
        let Some(m) = &self.magnitude else { return base + low };
        let g = self.dora_factor(weight, m)?;
        match &dropped {
            None => (base + low)?.broadcast_mul(&g),
            // PEFT: base + (g - 1) * (x_d W^T) + g * scale * x_d A^T B^T.
            Some(xd) => {
                let base_d = weight.forward(xd)?;
                (base + base_d.broadcast_mul(&(&g - 1.0)?)?)? + low.broadcast_mul(&g)?
            }
        }
    }

    /// `W` with the adapter merged in: `W + scale B A`, or for DoRA
    /// `m * (W + scale B A) / ||W + scale B A||` (computed in f32 or f64).
    pub fn merge(&self, weight: &Tensor) -> Result<Tensor> {
        let cdt = compute_dtype(weight.dtype());
        let merged = (weight.to_dtype(cdt)? + self.delta()?)?;
        let merged = match &self.magnitude {
            None => merged,
            Some(m) => {
                let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                merged.broadcast_mul(&m.to_dtype(cdt)?.unsqueeze(1)?.broadcast_div(&norm)?)?
            }
        };
        merged.to_dtype(weight.dtype())
    }
}

/// Which projections get LoRA adapters, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`; the adapter output is scaled by `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Module names that get adapters (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`).
    pub targets: Vec<String>,
    /// Dropout probability on the adapters' input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// DoRA: weight-decomposed adapters with a trainable magnitude per output row.
    pub use_dora: bool,
    /// rsLoRA (arXiv 2312.03732): scale by `alpha / sqrt(r)`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: super::llama_names::projection_targets(&super::llama_names::PROJECTIONS),
            dropout: 0.0,
            use_dora: false,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The PEFT name of a LoRA matrix: `base_model.model.<module>.lora_A.weight` / `lora_B`.
pub fn peft_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// The PEFT name of a DoRA magnitude vector: `base_model.model.<module>.lora_magnitude_vector`.
pub fn peft_magnitude_name(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// Whether a PEFT `target_modules` entry selects `module`: the full path, or its last
/// dot-separated components (`q_proj` and `self_attn.q_proj` both select
/// `model.layers.0.self_attn.q_proj`), as PEFT matches them.
pub fn target_matches(target: &str, module: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}
