//! The Ranger optimizer: gradient centralization, then RAdam, then Lookahead.

mod slot;
mod slow_weights;
mod state;

use std::cell::RefCell;
use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use crate::device_support::check_var_device;
use crate::error::{Error, Result};
use crate::fused::FusedStep;
use crate::grad::all_finite;
use crate::grad_check::GradCheck;
use crate::groups::{named_vars, ParamGroup};
use crate::lookahead_core::SlowSwap;
use crate::params::{NonFiniteGrads, ParamsRanger};
use crate::portable;
use crate::scalars::StepScalars;
use slot::{Slot, SlotState};

/// Per-group settings.
#[derive(Debug, Clone, Copy)]
struct GroupSettings {
    lr_scale: f64,
    weight_decay: Option<f64>,
}

/// What one call to [`Ranger::step_with_report`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// Number of variables updated.
    pub updated: usize,
    /// Names of the variables whose gradient held NaN/Inf. When non-empty (and the policy is
    /// [`NonFiniteGrads::Skip`]) the whole step was skipped.
    pub non_finite: Vec<String>,
}

impl StepReport {
    /// Whether the step was skipped because of non-finite gradients.
    pub fn skipped(&self) -> bool {
        !self.non_finite.is_empty()
    }
}

/// The Ranger optimizer (RAdam + Lookahead + gradient centralization) over Candle [`Var`]s.
///
/// Numerically it matches `torch.optim.RAdam` followed by Lookahead, with gradient
/// centralization applied to the gradient first (see the crate docs for the exact algorithm).
/// On CPU it runs a fused, multithreaded, in-place kernel; on other devices tensor ops.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// use candle_ranger::{ParamsRanger, Ranger};
///
/// let w = Var::new(&[[1f32, -2.], [3., 0.5]], &Device::Cpu)?;
/// let mut opt = Ranger::new(vec![w.clone()], ParamsRanger { lr: 0.1, ..Default::default() })?;
/// for _ in 0..20 {
///     let loss = w.as_tensor().sqr()?.sum_all()?;
///     opt.backward_step(&loss)?;
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
pub struct Ranger {
    params: ParamsRanger,
    groups: Vec<GroupSettings>,
    slots: Vec<Slot>,
    skipped_steps: u64,
    /// The fast weights put aside while the slow weights are swapped in.
    swap: SlowSwap,
    /// Adam's update instead of RAdam's ([`crate::AdamW`]).
    adam: bool,
}

impl Ranger {
    /// Builds the optimizer over named variables (names key the saved state).
    pub fn new_named(vars: Vec<(String, Var)>, params: ParamsRanger) -> Result<Self> {
        Self::with_groups(vec![ParamGroup::new(vars)], params)
    }

    /// Builds the optimizer over all the variables of a `VarMap`, named as in the map.
    pub fn from_varmap(varmap: &VarMap, params: ParamsRanger) -> Result<Self> {
        Self::new_named(named_vars(varmap), params)
    }

    /// Builds the optimizer over parameter groups.
    pub fn with_groups(groups: Vec<ParamGroup>, params: ParamsRanger) -> Result<Self> {
        params.validate()?;
        let mut seen = HashSet::new();
        let mut seen_ids = HashSet::new();
        let mut slots = Vec::new();
        let mut settings = Vec::new();
        for (gi, group) in groups.into_iter().enumerate() {
            if !(group.lr_scale.is_finite() && group.lr_scale >= 0.0) {
                return Err(Error::InvalidConfig(format!("group {gi}: lr_scale must be finite and >= 0")));
            }
            if let Some(wd) = group.weight_decay {
                if !(wd.is_finite() && wd >= 0.0) {
                    return Err(Error::InvalidConfig(format!("group {gi}: weight_decay must be finite and >= 0")));
                }
            }
            settings.push(GroupSettings { lr_scale: group.lr_scale, weight_decay: group.weight_decay });
            for (name, var) in group.vars {
                // Like candle-nn's optimizers, integer variables are not optimized.
                if !var.dtype().is_float() {
                    continue;
                }
                check_var_device(&name, var.dtype(), var.device().location())?;
                if !seen.insert(name.clone()) {
                    return Err(Error::DuplicateName(name));
                }
                if !seen_ids.insert(var.id()) {
                    return Err(Error::InvalidConfig(format!(
                        "variable `{name}` is already in the optimizer under another name"
                    )));
                }
                let state = SlotState::new(&var, &params)?;
                slots.push(Slot { name, var, group: gi, step: 0, state });
            }
        }
        Ok(Self { params, groups: settings, slots, skipped_steps: 0, swap: SlowSwap::default(), adam: false })
    }

    /// The engine of [`crate::AdamW`]: Adam's update (no rectification) on the same kernels.
    pub(crate) fn adam(groups: Vec<ParamGroup>, params: ParamsRanger) -> Result<Self> {
        Ok(Self { adam: true, ..Self::with_groups(groups, params)? })
    }

    /// The hyperparameters (with the current learning rate).
    pub fn params(&self) -> &ParamsRanger {
        &self.params
    }

    /// Number of steps skipped because of non-finite gradients.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Names of the optimized variables, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// The variables, in order.
    pub fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    /// Steps taken by the variable called `name`.
    pub fn var_step(&self, name: &str) -> Option<u64> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.step)
    }

    /// Whether the fused CPU kernel updates the variable called `name`.
    pub fn is_fused(&self, name: &str) -> Option<bool> {
        self.slots.iter().find(|s| s.name == name).map(|s| matches!(s.state, SlotState::Host(_)))
    }

    /// One optimizer step, telling what it did. [`Optimizer::step`] calls this.
    pub fn step_with_report(&mut self, grads: &GradStore) -> Result<StepReport> {
        self.step_inner(grads, None)
    }

    /// [`Ranger::step_with_report`] taking the finite verdicts of a [`GradCheck`] (from
    /// [`crate::check_grads`] on these gradients) instead of reading every gradient again: on a
    /// GPU that saves a device→host read per tensor. A gradient the check did not cover is
    /// checked here as usual. Clipping after the check does not change its verdicts.
    pub fn step_checked(&mut self, grads: &GradStore, check: &GradCheck) -> Result<StepReport> {
        self.step_inner(grads, Some(check))
    }

    fn step_inner(&mut self, grads: &GradStore, check: Option<&GradCheck>) -> Result<StepReport> {
        self.swap.ensure_fast("step")?;
        // `set_learning_rate` cannot fail, so a bad learning rate is caught here.
        self.params.validate()?;
        let mut work: Vec<(usize, Tensor)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(g) = grads.get(&slot.var) {
                if g.shape() != slot.var.shape() {
                    return Err(Error::GradientShape {
                        var: slot.name.clone(),
                        grad: g.dims().to_vec(),
                        expected: slot.var.dims().to_vec(),
                    });
                }
                work.push((i, g.clone()));
            }
        }
        // Check all gradients before touching anything, so a bad step changes nothing.
        let mut non_finite = Vec::new();
        for (i, g) in &work {
            let finite = match check.and_then(|c| c.is_finite(&self.slots[*i].var)) {
                Some(verdict) => verdict,
                None => all_finite(g)?,
            };
            if !finite {
                non_finite.push(self.slots[*i].name.clone());
            }
        }
        if !non_finite.is_empty() {
            return match self.params.non_finite {
                NonFiniteGrads::Error => Err(Error::NonFiniteGradient { vars: non_finite }),
                NonFiniteGrads::Skip => {
                    self.skipped_steps += 1;
                    Ok(StepReport { updated: 0, non_finite })
                }
            };
        }
        let p = self.params;
        for (i, grad) in &work {
            let slot = &mut self.slots[*i];
            if p.lookahead_k > 0 {
                slot.ensure_slow()?;
            }
            if slot.wants_master(&p) {
                slot.ensure_master()?;
            }
            let group = self.groups[slot.group];
            let lr = p.lr * group.lr_scale;
            let wd = group.weight_decay.unwrap_or(p.weight_decay);
            let sc = if self.adam {
                StepScalars::adam(&p, lr, wd, slot.step + 1)
            } else {
                StepScalars::new(&p, lr, wd, slot.step + 1)
            };
            let centralize = p.centralization.applies_to_rank(slot.var.rank());
            // The fused kernels take a contiguous gradient of the variable's dtype, and the row
            // length to centralize over (`numel / dim0`), if any.
            let fused_input = || -> Result<(Tensor, Option<usize>)> {
                let grad = grad.to_dtype(slot.var.dtype())?.contiguous()?;
                let dims = slot.var.dims();
                let row_len = (centralize && !dims.is_empty() && dims[0] > 0).then(|| slot.var.elem_count() / dims[0]);
                Ok((grad, row_len))
            };
            match &mut slot.state {
                SlotState::Host(st) => {
                    let (grad, row_len) = fused_input()?;
                    let state = RefCell::new(st);
                    // The stochastic rounding of 8-bit state: per variable and step, so a resumed
                    // run rounds as the uninterrupted one.
                    let seed = crate::state_codec::stream_seed(*i as u64, slot.step + 1);
                    let op =
                        FusedStep { scalars: sc, row_len, eps: sc.eps, beta1: p.beta1, beta2: p.beta2, seed, state };
                    slot.var.as_tensor().inplace_op2(&grad, &op)?;
                }
                // The fused CUDA kernel (`Auto` or `Fused`) or Metal kernel (`Fused` only).
                #[cfg(any(feature = "cuda", feature = "metal"))]
                SlotState::Device(st) if st.fused => {
                    let (grad, row_len) = fused_input()?;
                    let op = crate::gpu_step::GpuStep {
                        scalars: sc,
                        row_len,
                        eps: sc.eps,
                        beta1: p.beta1,
                        beta2: p.beta2,
                        state: st,
                    };
                    slot.var.as_tensor().inplace_op2(&grad, &op)?;
                }
                SlotState::Device(st) => {
                    portable::step(&slot.var, grad, st, &sc, centralize, p.beta1, p.beta2, sc.eps)?
                }
                SlotState::Packed(st) => {
                    // Per variable and step, as on the host (the streams differ: see `packed_tensor`).
                    let seed = crate::state_codec::stream_seed(*i as u64, slot.step + 1);
                    crate::portable_packed::step(&slot.var, grad, st, &sc, centralize, p.beta1, p.beta2, sc.eps, seed)?
                }
            }
            slot.step += 1;
        }
        Ok(StepReport { updated: work.len(), non_finite })
    }
}

impl Optimizer for Ranger {
    type Config = ParamsRanger;

    /// Builds the optimizer; variables are named `param.0`, `param.1`, … in the saved state.
    fn new(vars: Vec<Var>, config: ParamsRanger) -> candle_core::Result<Self> {
        let named = vars.into_iter().enumerate().map(|(i, v)| (format!("param.{i}"), v)).collect();
        Self::new_named(named, config).map_err(Error::into_candle)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_with_report(grads).map(|_| ()).map_err(Error::into_candle)
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}
