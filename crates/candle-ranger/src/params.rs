//! Hyperparameters of [`crate::Ranger`] and the small enums that select its behaviour.

use crate::error::{Error, Result};

/// Which gradients are centralized (their mean over all dimensions but the first is subtracted)
/// before the update, as in "Gradient Centralization" (Yong et al., 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Centralization {
    /// No centralization.
    Off,
    /// Every tensor of rank > 1 (linear and convolution weights); vectors such as biases and
    /// norm weights are left alone. The Ranger 2020 default.
    #[default]
    Rank2Plus,
    /// Convolution weights only (rank > 3).
    ConvOnly,
}

impl Centralization {
    /// Whether a gradient of this rank is centralized.
    pub fn applies_to_rank(self, rank: usize) -> bool {
        match self {
            Centralization::Off => false,
            Centralization::Rank2Plus => rank > 1,
            Centralization::ConvOnly => rank > 3,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Centralization::Off => "off",
            Centralization::Rank2Plus => "rank>1",
            Centralization::ConvOnly => "rank>3",
        }
    }
}

/// What RAdam does while the variance of the adaptive learning rate is intractable
/// (rho_t <= `rectify_threshold`, the first 5 steps with beta2 = 0.999).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RectifyFallback {
    /// Momentum SGD with bias correction: `p -= lr * m / (1 - beta1^t)`.
    /// This is `torch.optim.RAdam` and `degenerated_to_sgd=True` elsewhere.
    #[default]
    Sgd,
    /// No parameter update; moments and the step count still advance.
    Skip,
}

impl RectifyFallback {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RectifyFallback::Sgd => "sgd",
            RectifyFallback::Skip => "skip",
        }
    }
}

/// What a step does when a gradient holds NaN or infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFiniteGrads {
    /// Skip the whole step: no parameter, moment or step count changes. The step is reported by
    /// [`crate::Ranger::step_with_report`] and counted by [`crate::Ranger::skipped_steps`].
    #[default]
    Skip,
    /// Fail the step with [`crate::Error::NonFiniteGradient`], changing nothing.
    Error,
}

/// How the update is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdatePath {
    /// The fused in-place kernel for CPU variables and for f32/bf16/f16 CUDA variables (in a
    /// build with the `cuda` feature), tensor ops elsewhere (Metal, whose kernel has not run on
    /// a Mac yet, and f64 CUDA variables).
    #[default]
    Auto,
    /// The fused in-place kernel: on the CPU, on CUDA, and on Metal (opt-in there: compiled but
    /// not yet run on a Mac by this project) in a build with that feature; building the
    /// optimizer fails for other variables.
    Fused,
    /// Candle tensor ops on every device.
    Portable,
}

/// How the optimizer state (m, v and the Lookahead slow weights) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatePrecision {
    /// f32 (f64 for f64 variables): 12 bytes per parameter with Lookahead.
    #[default]
    F32,
    /// bf16, rounded stochastically (6 bytes per parameter with Lookahead); the slow weights
    /// are kept as their difference from the fast ones. f32, bf16 and f16 variables: the fused
    /// CPU step, or tensor ops on the variable's device (CUDA, Metal, `UpdatePath::Portable`).
    Bf16,
    /// One byte per value in blocks of 256 with an f32 scale, rounded stochastically (about
    /// 3.05 bytes per parameter with Lookahead); the slow weights are kept as their difference
    /// from the fast ones. f32, bf16 and f16 variables: the fused CPU step, or tensor ops on
    /// the variable's device (CUDA, Metal, `UpdatePath::Portable`).
    Int8,
}

impl StatePrecision {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StatePrecision::F32 => "f32",
            StatePrecision::Bf16 => "bf16",
            StatePrecision::Int8 => "int8",
        }
    }
}

/// Hyperparameters of [`crate::Ranger`]. `Default` gives the Ranger 2020 defaults.
///
/// The Adam part uses `candle_nn::ParamsAdamW`'s names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamsRanger {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Decay of the first moment (default 0.95).
    pub beta1: f64,
    /// Decay of the second moment (default 0.999).
    pub beta2: f64,
    /// Added to `sqrt(v)` in the denominator (default 1e-5).
    pub eps: f64,
    /// Weight decay coefficient (default 0).
    pub weight_decay: f64,
    /// `true`: decoupled decay, `p *= 1 - lr * wd` (AdamW style, default);
    /// `false`: L2 decay added to the gradient, `g += wd * p`.
    pub decoupled_weight_decay: bool,
    /// Lookahead sync period k in steps (default 6); 0 disables Lookahead (plain RAdam).
    pub lookahead_k: usize,
    /// Lookahead interpolation factor alpha in [0, 1] (default 0.5).
    pub lookahead_alpha: f64,
    /// The rectified update is used when rho_t exceeds this (default 5, as `torch.optim.RAdam`).
    pub rectify_threshold: f64,
    /// Gradient centralization (default: tensors of rank > 1).
    pub centralization: Centralization,
    /// Update used before rectification starts (default: SGD with momentum).
    pub fallback: RectifyFallback,
    /// Handling of NaN/Inf gradients (default: skip the step).
    pub non_finite: NonFiniteGrads,
    /// Fused CPU kernel or tensor ops (default: chosen per device).
    pub update_path: UpdatePath,
    /// Keep an f32 master copy of each bf16/f16 variable (default `true`): the update applies
    /// to the copy and the variable holds its rounding, so updates smaller than half a unit in
    /// the last place of the half-precision value accumulate instead of being lost (fine-tuning
    /// learning rates are in that range). Costs 4 bytes per half-precision parameter, on the
    /// variable's device, beside the 8 (12 with Lookahead) of the moments and slow weights; saved
    /// with the state. No effect on f32/f64 variables. A variable changed from outside the
    /// optimizer (a `Lookahead<O>` sync, `Var::set`) is adopted at the next step wherever it is
    /// no longer the rounding of the master copy.
    pub master_weights: bool,
    /// How the state is stored (see [`StatePrecision`]).
    pub state_precision: StatePrecision,
}

impl Default for ParamsRanger {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.95,
            beta2: 0.999,
            eps: 1e-5,
            weight_decay: 0.0,
            decoupled_weight_decay: true,
            lookahead_k: 6,
            lookahead_alpha: 0.5,
            rectify_threshold: 5.0,
            centralization: Centralization::Rank2Plus,
            fallback: RectifyFallback::Sgd,
            non_finite: NonFiniteGrads::Skip,
            update_path: UpdatePath::Auto,
            master_weights: true,
            state_precision: StatePrecision::F32,
        }
    }
}

impl ParamsRanger {
    /// Checks every value is in its valid range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("lr must be finite and >= 0, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps must be finite and >= 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay must be finite and >= 0, got {}", self.weight_decay));
        }
        if !(0.0..=1.0).contains(&self.lookahead_alpha) {
            return bad(format!("lookahead_alpha must be in [0, 1], got {}", self.lookahead_alpha));
        }
        if !self.rectify_threshold.is_finite() {
            return bad(format!("rectify_threshold must be finite, got {}", self.rectify_threshold));
        }
        Ok(())
    }

    /// A one-line `key=value` rendering, stored in saved state as metadata.
    pub fn to_metadata_string(&self) -> String {
        format!(
            "lr={};beta1={};beta2={};eps={};weight_decay={};decoupled_weight_decay={};lookahead_k={};lookahead_alpha={};rectify_threshold={};centralization={};fallback={};master_weights={}{}",
            self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.decoupled_weight_decay,
            self.lookahead_k, self.lookahead_alpha, self.rectify_threshold, self.centralization.as_str(),
            self.fallback.as_str(), self.master_weights,
            // Absent for f32 state, so the metadata of files written before stays the same.
            match self.state_precision {
                StatePrecision::F32 => String::new(),
                p => format!(";state_precision={}", p.as_str()),
            }
        )
    }
}
