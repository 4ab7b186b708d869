//! The optimizers the trainer can use, behind one small interface.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::Var;
use candle_nn::{Optimizer, ParamsAdamW};
use candle_ranger::{
    AdamW, AdamWOptions, Centralization, GradCheck, OptimizerState, ParamGroup, ParamsRAdam, ParamsRanger, RAdam,
    Ranger, StatePrecision, StepReport,
};

use crate::config::{default_beta1, default_eps, OptimizerKind, TrainConfig, MAX_AUTO_BETA2};
use crate::error::{Result, TrainError};

/// A configured optimizer over named variables.
pub enum TrainOptimizer {
    /// Ranger.
    Ranger(Ranger),
    /// RAdam.
    RAdam(RAdam),
    /// AdamW (candle-ranger's: fused, f32 state, resumable).
    AdamW(AdamW),
}

impl TrainOptimizer {
    /// Builds the optimizer of `cfg` over `vars`, with no weight decay on vectors (biases,
    /// norm weights). A learning rate or β2 left unset takes its default for a run of unknown
    /// length (β2 0.999): the trainer fills them in for its run first
    /// ([`TrainConfig::fill_run_defaults`]).
    pub fn new(cfg: &TrainConfig, vars: Vec<(String, Var)>) -> Result<Self> {
        let (lr, beta2) = (cfg.lr(), cfg.beta2.unwrap_or(MAX_AUTO_BETA2));
        let beta1 = cfg.beta1.unwrap_or(default_beta1(cfg.optimizer, cfg.task));
        let eps = cfg.eps.unwrap_or(default_eps(cfg.optimizer));
        let groups = ParamGroup::split_decay(vars.clone());
        let state_precision = match cfg.optimizer_state_bits {
            8 => StatePrecision::Int8,
            16 => StatePrecision::Bf16,
            _ => StatePrecision::F32,
        };
        let update_path = cfg.optimizer_kernel.update_path();
        Ok(match cfg.optimizer {
            OptimizerKind::Ranger => TrainOptimizer::Ranger(Ranger::with_groups(
                groups,
                ParamsRanger {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay: cfg.weight_decay,
                    lookahead_k: cfg.lookahead_k,
                    lookahead_alpha: cfg.lookahead_alpha,
                    centralization: if cfg.centralize { Centralization::Rank2Plus } else { Centralization::Off },
                    master_weights: cfg.master_weights,
                    state_precision,
                    update_path,
                    ..Default::default()
                },
            )?),
            OptimizerKind::Radam => TrainOptimizer::RAdam(RAdam::with_groups(
                groups,
                ParamsRAdam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay: cfg.weight_decay,
                    decoupled_weight_decay: true,
                    master_weights: cfg.master_weights,
                    state_precision,
                    update_path,
                    ..Default::default()
                },
            )?),
            OptimizerKind::Adamw => TrainOptimizer::AdamW(AdamW::with_options(
                groups,
                ParamsAdamW { lr, beta1, beta2, eps, weight_decay: cfg.weight_decay },
                AdamWOptions { master_weights: cfg.master_weights, state_precision, update_path, ..Default::default() },
            )?),
        })
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Ranger(o) => o.set_learning_rate(lr),
            Self::RAdam(o) => o.set_learning_rate(lr),
            Self::AdamW(o) => o.set_learning_rate(lr),
        }
    }

    /// One step; a step with non-finite gradients is skipped and reported. The finite
    /// verdicts come from `check` (the step's one device→host read), made on these gradients
    /// over the same variables, in the trainer's order.
    pub fn step(&mut self, grads: &GradStore, check: &GradCheck) -> Result<StepReport> {
        Ok(match self {
            Self::Ranger(o) => o.step_checked(grads, check)?,
            Self::RAdam(o) => o.step_checked(grads, check)?,
            Self::AdamW(o) => o.step_checked(grads, check)?,
        })
    }

    /// Whether the optimizer keeps Lookahead slow weights.
    pub fn has_lookahead(&self) -> bool {
        matches!(self, Self::Ranger(o) if o.params().lookahead_k > 0)
    }

    /// Runs `f` on the slow weights when there are any, else on the current weights.
    pub fn with_slow_weights<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        match self {
            Self::Ranger(o) => Ok(o.with_slow_weights(f)?),
            _ => Ok(f()),
        }
    }

    /// The optimizer state as named tensors.
    pub fn state_tensors(&self) -> Result<OptimizerState<'_>> {
        Ok(match self {
            Self::Ranger(o) => o.state_tensors()?,
            Self::RAdam(o) => o.state_tensors()?,
            Self::AdamW(o) => o.state_tensors()?,
        })
    }

    /// Loads state taken by [`TrainOptimizer::state_tensors`]; every name, shape and dtype is
    /// checked and a mismatch changes nothing.
    pub fn load_state_tensors(&mut self, state: &OptimizerState<'_>) -> Result<()> {
        match self {
            Self::Ranger(o) => Ok(o.load_state_tensors(state)?),
            Self::RAdam(o) => Ok(o.load_state_tensors(state)?),
            Self::AdamW(o) => Ok(o.load_state_tensors(state)?),
        }
    }

    /// Saves the optimizer state.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        Ok(self.state_tensors()?.save(path)?)
    }

    /// Loads the optimizer state written by [`TrainOptimizer::save_state`].
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let state = OptimizerState::load(path)?;
        // A mismatch found while loading the tensors names the file too.
        self.load_state_tensors(&state).map_err(|e| match e {
            TrainError::Optimizer(e) => TrainError::Optimizer(e.in_file(path)),
            other => other,
        })
    }

    /// The slow weights by name (Ranger with Lookahead), else `None`.
    pub fn slow_weights(&self) -> Result<Option<Vec<(String, candle_core::Tensor)>>> {
        match self {
            Self::Ranger(o) if o.params().lookahead_k > 0 => Ok(Some(o.slow_weights()?)),
            _ => Ok(None),
        }
    }
}
