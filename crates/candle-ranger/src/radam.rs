//! Plain RAdam with `torch.optim.RAdam`'s defaults: [`Ranger`] without Lookahead and without
//! gradient centralization.

use candle_core::Var;
use candle_nn::Optimizer;

use crate::engine::{engine_methods, engine_optimizer_methods};
use crate::error::Result;
use crate::groups::ParamGroup;
use crate::params::{Centralization, NonFiniteGrads, ParamsRanger, RectifyFallback, StatePrecision, UpdatePath};
use crate::ranger::Ranger;

/// Hyperparameters of [`RAdam`]; `Default` is `torch.optim.RAdam`'s: lr 1e-3, betas
/// (0.9, 0.999), eps 1e-8, no weight decay (L2 when set, decoupled if asked).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamsRAdam {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to `sqrt(v)` in the denominator.
    pub eps: f64,
    /// Weight decay coefficient.
    pub weight_decay: f64,
    /// Decoupled (`p *= 1 - lr*wd`) rather than L2 (`g += wd*p`) weight decay.
    pub decoupled_weight_decay: bool,
    /// Handling of NaN/Inf gradients.
    pub non_finite: NonFiniteGrads,
    /// Fused CPU kernel or tensor ops.
    pub update_path: UpdatePath,
    /// An f32 master copy of bf16/f16 variables (see [`ParamsRanger::master_weights`]).
    pub master_weights: bool,
    /// How the moments are stored (see [`StatePrecision`]).
    pub state_precision: StatePrecision,
}

impl Default for ParamsRAdam {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            non_finite: NonFiniteGrads::Skip,
            update_path: UpdatePath::Auto,
            master_weights: true,
            state_precision: StatePrecision::F32,
        }
    }
}

impl From<ParamsRAdam> for ParamsRanger {
    fn from(p: ParamsRAdam) -> Self {
        ParamsRanger {
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            decoupled_weight_decay: p.decoupled_weight_decay,
            lookahead_k: 0,
            lookahead_alpha: 0.5,
            rectify_threshold: 5.0,
            centralization: Centralization::Off,
            fallback: RectifyFallback::Sgd,
            non_finite: p.non_finite,
            update_path: p.update_path,
            master_weights: p.master_weights,
            state_precision: p.state_precision,
        }
    }
}

/// Rectified Adam (Liu et al., 2019), numerically `torch.optim.RAdam`.
#[derive(Debug)]
pub struct RAdam {
    inner: Ranger,
}

impl RAdam {
    /// Builds the optimizer over named variables.
    pub fn new_named(vars: Vec<(String, Var)>, params: ParamsRAdam) -> Result<Self> {
        Ok(Self { inner: Ranger::new_named(vars, params.into())? })
    }

    /// Builds the optimizer over parameter groups.
    pub fn with_groups(groups: Vec<ParamGroup>, params: ParamsRAdam) -> Result<Self> {
        Ok(Self { inner: Ranger::with_groups(groups, params.into())? })
    }

    /// The underlying engine (a [`Ranger`] with Lookahead and centralization off).
    pub fn as_ranger(&self) -> &Ranger {
        &self.inner
    }
}

engine_methods!(RAdam);

impl Optimizer for RAdam {
    type Config = ParamsRAdam;

    fn new(vars: Vec<Var>, config: ParamsRAdam) -> candle_core::Result<Self> {
        Ok(Self { inner: Ranger::new(vars, config.into())? })
    }

    engine_optimizer_methods!();
}
