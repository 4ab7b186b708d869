//! AdamW (Loshchilov & Hutter, 2019), numerically `torch.optim.AdamW`, on Ranger's kernels:
//! fused on the CPU, f32 state for half-precision variables with an f32 master copy, state
//! saved and restored exactly. `candle_nn::AdamW` keeps its moments in the variable's dtype and
//! private (no resume); this one takes the same [`ParamsAdamW`].

use candle_core::Var;
use candle_nn::{Optimizer, ParamsAdamW};

use crate::engine::{engine_methods, engine_optimizer_methods};
use crate::error::{Error, Result};
use crate::groups::ParamGroup;
use crate::params::{Centralization, NonFiniteGrads, ParamsRanger, StatePrecision, UpdatePath};
use crate::ranger::Ranger;

/// AdamW with decoupled weight decay: `p *= 1 - lr wd`, then the Adam step with bias
/// correction. [`candle_nn::ParamsAdamW`]'s defaults are torch's (lr 1e-3, betas (0.9, 0.999),
/// eps 1e-8, weight decay 0.01).
#[derive(Debug)]
pub struct AdamW {
    inner: Ranger,
}

/// What [`AdamW`] takes beyond [`ParamsAdamW`]; `Default` is what [`Ranger`] defaults to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdamWOptions {
    /// An f32 master copy of bf16/f16 variables (see [`ParamsRanger::master_weights`]).
    pub master_weights: bool,
    /// Fused kernel or tensor ops (see [`UpdatePath`]).
    pub update_path: UpdatePath,
    /// Handling of NaN/Inf gradients.
    pub non_finite: NonFiniteGrads,
    /// How the moments are stored (see [`StatePrecision`]).
    pub state_precision: StatePrecision,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        let d = ParamsRanger::default();
        Self {
            master_weights: d.master_weights,
            update_path: d.update_path,
            non_finite: d.non_finite,
            state_precision: d.state_precision,
        }
    }
}

fn engine_params(p: &ParamsAdamW, o: AdamWOptions) -> ParamsRanger {
    ParamsRanger {
        master_weights: o.master_weights,
        update_path: o.update_path,
        non_finite: o.non_finite,
        state_precision: o.state_precision,
        lr: p.lr,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: p.eps,
        weight_decay: p.weight_decay,
        decoupled_weight_decay: true,
        lookahead_k: 0,
        centralization: Centralization::Off,
        ..Default::default()
    }
}

impl AdamW {
    /// Builds the optimizer over named variables (names key the saved state).
    pub fn new_named(vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        Self::with_groups(vec![ParamGroup::new(vars)], params)
    }

    /// Builds the optimizer over parameter groups (a group's `weight_decay` and `lr_scale`
    /// override the defaults, as for [`Ranger`]).
    pub fn with_groups(groups: Vec<ParamGroup>, params: ParamsAdamW) -> Result<Self> {
        Self::with_options(groups, params, AdamWOptions::default())
    }

    /// [`AdamW::with_groups`] with the options of [`AdamWOptions`].
    pub fn with_options(groups: Vec<ParamGroup>, params: ParamsAdamW, options: AdamWOptions) -> Result<Self> {
        Ok(Self { inner: Ranger::adam(groups, engine_params(&params, options))? })
    }
}

engine_methods!(AdamW);

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    /// Builds the optimizer; variables are named `param.0`, `param.1`, … in the saved state.
    fn new(vars: Vec<Var>, config: ParamsAdamW) -> candle_core::Result<Self> {
        let named = vars.into_iter().enumerate().map(|(i, v)| (format!("param.{i}"), v)).collect();
        Self::new_named(named, config).map_err(Error::into_candle)
    }

    engine_optimizer_methods!();
}
