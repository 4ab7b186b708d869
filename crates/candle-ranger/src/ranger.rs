//! The Ranger optimizer: gradient centralization, then RAdam, then Lookahead.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use crate::error::{Error, Result};
use crate::fused::{FusedStep, HostBuf, HostState};
use crate::grad::all_finite;
use crate::groups::{named_vars, ParamGroup};
use crate::params::{NonFiniteGrads, ParamsRanger, UpdatePath};
use crate::portable::{self, DeviceState};
use crate::scalars::StepScalars;
use crate::state_file::{self, StateView, STATE_FORMAT};

/// Optimizer state of one variable, wherever it lives.
#[derive(Debug, Clone)]
enum SlotState {
    /// Host vectors updated by the fused CPU kernel.
    Host(HostState),
    /// Tensors on the variable's device, updated with tensor ops.
    Device(DeviceState),
}

/// One optimized variable.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    var: Var,
    group: usize,
    /// Steps this variable has taken (it only advances when the variable has a gradient).
    step: u64,
    state: SlotState,
}

impl Slot {
    /// The slow weights as they would be now: the stored ones, or (before the first step)
    /// a deep copy of the current weights, in the state dtype, on the state's device.
    fn current_slow(&self) -> Result<Tensor> {
        Ok(match &self.state {
            SlotState::Host(HostState { slow: Some(buf), .. }) => buf.to_tensor(self.var.shape())?,
            SlotState::Device(DeviceState { slow: Some(s), .. }) => s.clone(),
            SlotState::Host(_) => self
                .var
                .as_tensor()
                .detach()
                .to_dtype(state_dtype(self.var.dtype()))?
                .to_device(&candle_core::Device::Cpu)?
                .copy()?,
            SlotState::Device(_) => self.var.as_tensor().detach().to_dtype(state_dtype(self.var.dtype()))?.copy()?,
        })
    }

    /// Takes the slow weights (a deep copy of the weights, never zeros) if not yet taken.
    fn ensure_slow(&mut self) -> Result<()> {
        let missing = match &self.state {
            SlotState::Host(st) => st.slow.is_none(),
            SlotState::Device(st) => st.slow.is_none(),
        };
        if missing {
            let copy = self.current_slow()?;
            match &mut self.state {
                SlotState::Host(st) => st.slow = Some(HostBuf::from_tensor(&copy)?),
                SlotState::Device(st) => st.slow = Some(copy),
            }
        }
        Ok(())
    }
}

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
    swapped_out: Option<Vec<Tensor>>,
}

/// The dtype optimizer state is kept in for a parameter dtype.
fn state_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
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
                if !seen.insert(name.clone()) {
                    return Err(Error::DuplicateName(name));
                }
                if !seen_ids.insert(var.id()) {
                    return Err(Error::InvalidConfig(format!(
                        "variable `{name}` is already in the optimizer under another name"
                    )));
                }
                let state = Self::init_state(&var, &params)?;
                slots.push(Slot { name, var, group: gi, step: 0, state });
            }
        }
        Ok(Self { params, groups: settings, slots, skipped_steps: 0, swapped_out: None })
    }

    fn init_state(var: &Var, params: &ParamsRanger) -> Result<SlotState> {
        let sdt = state_dtype(var.dtype());
        let fused = match params.update_path {
            UpdatePath::Auto => var.device().is_cpu(),
            UpdatePath::Fused => {
                if !var.device().is_cpu() {
                    return Err(Error::InvalidConfig(format!(
                        "UpdatePath::Fused needs CPU variables, got one on {:?}",
                        var.device().location()
                    )));
                }
                true
            }
            UpdatePath::Portable => false,
        };
        // Slow weights are taken at the variable's first step (see `Slot::ensure_slow`), so
        // weights loaded after the optimizer was built are the ones Lookahead starts from.
        if fused {
            let n = var.elem_count();
            let zeros = || if sdt == DType::F64 { HostBuf::F64(vec![0.0; n]) } else { HostBuf::F32(vec![0.0; n]) };
            Ok(SlotState::Host(HostState { m: zeros(), v: zeros(), slow: None }))
        } else {
            let zeros = Tensor::zeros(var.shape(), sdt, var.device())?;
            Ok(SlotState::Device(DeviceState { m: zeros.clone(), v: zeros.copy()?, slow: None }))
        }
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
        if self.swapped_out.is_some() {
            return Err(Error::InvalidConfig(
                "step called while the slow weights are swapped in; call swap_back_fast_weights first".into(),
            ));
        }
        // `set_learning_rate` cannot fail, so a bad learning rate is caught here.
        self.params.validate()?;
        let mut work: Vec<(usize, Tensor)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(g) = grads.get(&slot.var) {
                if g.shape() != slot.var.shape() {
                    return Err(Error::Candle(candle_core::Error::msg(format!(
                        "gradient of `{}` has shape {:?}, the variable {:?}",
                        slot.name,
                        g.shape(),
                        slot.var.shape()
                    ))));
                }
                work.push((i, g.clone()));
            }
        }
        // Check all gradients before touching anything, so a bad step changes nothing.
        let mut non_finite = Vec::new();
        for (i, g) in &work {
            if !all_finite(g)? {
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
            let group = self.groups[slot.group];
            let lr = p.lr * group.lr_scale;
            let wd = group.weight_decay.unwrap_or(p.weight_decay);
            let sc = StepScalars::new(&p, lr, wd, slot.step + 1);
            let centralize = p.centralization.applies_to_rank(slot.var.rank());
            match &mut slot.state {
                SlotState::Host(st) => {
                    let mut grad = grad.to_dtype(slot.var.dtype())?;
                    if !grad.is_contiguous() {
                        grad = grad.contiguous()?;
                    }
                    let dims = slot.var.dims();
                    let row_len =
                        (centralize && !dims.is_empty() && dims[0] > 0).then(|| slot.var.elem_count() / dims[0]);
                    let op = FusedStep {
                        scalars: sc,
                        row_len,
                        eps: p.eps,
                        beta1: p.beta1,
                        beta2: p.beta2,
                        state: RefCell::new(st),
                    };
                    slot.var.as_tensor().inplace_op2(&grad, &op)?;
                }
                SlotState::Device(st) => portable::step(&slot.var, grad, st, &sc, centralize, p.beta1, p.beta2, p.eps)?,
            }
            slot.step += 1;
        }
        Ok(StepReport { updated: work.len(), non_finite })
    }

    /// Forces a Lookahead sync of every variable now (`slow += alpha * (fast - slow)`,
    /// `fast = slow`), leaving step counts alone. Does nothing without Lookahead.
    pub fn sync_lookahead(&mut self) -> Result<()> {
        if self.swapped_out.is_some() {
            return Err(Error::InvalidConfig("sync_lookahead called while the slow weights are swapped in".into()));
        }
        let alpha = self.params.lookahead_alpha;
        for slot in &mut self.slots {
            if self.params.lookahead_k > 0 {
                slot.ensure_slow()?;
            }
            let sdt = state_dtype(slot.var.dtype());
            let fast = slot.var.as_tensor().detach().to_dtype(sdt)?;
            let slow = match &mut slot.state {
                SlotState::Host(st) => match st.slow.as_mut() {
                    None => continue,
                    Some(buf) => {
                        let s = buf.to_tensor(slot.var.shape())?;
                        let new = (&s + ((fast.to_device(&candle_core::Device::Cpu)? - &s)? * alpha)?)?;
                        *buf = HostBuf::from_tensor(&new)?;
                        new
                    }
                },
                SlotState::Device(st) => match st.slow.as_mut() {
                    None => continue,
                    Some(s) => {
                        *s = (&*s + ((&fast - &*s)? * alpha)?)?;
                        s.clone()
                    }
                },
            };
            slot.var.set(&slow.to_device(slot.var.device())?.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// The slow (Lookahead) weights, in each variable's dtype and device, by name. Without
    /// Lookahead these are the current weights.
    pub fn slow_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots
            .iter()
            .map(|slot| {
                let t = slot.current_slow()?;
                Ok((slot.name.clone(), t.to_device(slot.var.device())?.to_dtype(slot.var.dtype())?))
            })
            .collect()
    }

    /// Puts the slow weights into the variables (keeping the fast ones aside), e.g. to
    /// evaluate or save the model on the slow weights as the Lookahead paper recommends.
    /// Steps fail until [`Ranger::swap_back_fast_weights`] is called.
    pub fn swap_in_slow_weights(&mut self) -> Result<()> {
        if self.swapped_out.is_some() {
            return Ok(());
        }
        let slow = self.slow_weights()?;
        let mut fast = Vec::with_capacity(slow.len());
        for (slot, (_, s)) in self.slots.iter().zip(slow) {
            fast.push(slot.var.as_tensor().detach().copy()?);
            slot.var.set(&s)?;
        }
        self.swapped_out = Some(fast);
        Ok(())
    }

    /// Restores the fast weights put aside by [`Ranger::swap_in_slow_weights`].
    pub fn swap_back_fast_weights(&mut self) -> Result<()> {
        if let Some(fast) = self.swapped_out.take() {
            for (slot, f) in self.slots.iter().zip(fast) {
                slot.var.set(&f)?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the slow weights swapped in, then restores the fast weights.
    pub fn with_slow_weights<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        self.swap_in_slow_weights()?;
        let r = f();
        self.swap_back_fast_weights()?;
        Ok(r)
    }

    /// Saves the optimizer state (moments, slow weights, per-variable step counts) to one
    /// safetensors file, atomically. Tensors are named `<var>.exp_avg`, `<var>.exp_avg_sq`,
    /// `<var>.slow` and `<var>.step`; hyperparameters go in the metadata.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        fn view<'a>(buf: &'a HostBuf, shape: &candle_core::Shape) -> StateView<'a> {
            match buf {
                HostBuf::F32(v) => StateView::F32(v.as_slice(), shape.dims().to_vec()),
                HostBuf::F64(v) => StateView::F64(v.as_slice(), shape.dims().to_vec()),
            }
        }
        let cpu = candle_core::Device::Cpu;
        let lookahead = self.params.lookahead_k > 0;
        let mut tensors: Vec<(String, StateView<'_>)> = Vec::new();
        for slot in &self.slots {
            let shape = slot.var.shape();
            let name = &slot.name;
            match &slot.state {
                // Host state is written straight from its buffers, without a copy.
                SlotState::Host(st) => {
                    tensors.push((format!("{name}.exp_avg"), view(&st.m, shape)));
                    tensors.push((format!("{name}.exp_avg_sq"), view(&st.v, shape)));
                    match &st.slow {
                        Some(s) => tensors.push((format!("{name}.slow"), view(s, shape))),
                        None if lookahead => {
                            tensors.push((format!("{name}.slow"), StateView::Tensor(slot.current_slow()?)))
                        }
                        None => {}
                    }
                }
                SlotState::Device(st) => {
                    tensors.push((format!("{name}.exp_avg"), StateView::Tensor(st.m.to_device(&cpu)?)));
                    tensors.push((format!("{name}.exp_avg_sq"), StateView::Tensor(st.v.to_device(&cpu)?)));
                    if lookahead {
                        tensors
                            .push((format!("{name}.slow"), StateView::Tensor(slot.current_slow()?.to_device(&cpu)?)));
                    }
                }
            }
            tensors.push((format!("{name}.step"), StateView::Tensor(Tensor::new(&[slot.step as i64], &cpu)?)));
        }
        let metadata = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("optimizer".to_string(), "Ranger".to_string()),
            ("hyperparameters".to_string(), self.params.to_metadata_string()),
            ("lr".to_string(), format!("{:e}", self.params.lr)),
            ("skipped_steps".to_string(), self.skipped_steps.to_string()),
        ]);
        state_file::write_atomic(path.as_ref(), &tensors, metadata)
    }

    /// Loads state saved by [`Ranger::save_state`] into this optimizer (built over the same
    /// variable names), restoring moments, slow weights, step counts and the learning rate.
    /// Names, shapes and dtypes are checked first; on any mismatch nothing is changed and the
    /// error names the offending tensor.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let (mut tensors, meta) = state_file::read(path)?;
        let format_err = |message: String| Error::StateFormat { path: path.to_path_buf(), message };
        if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(format_err(format!("not a candle-ranger state file (format {:?})", meta.get("format"))));
        }
        let mismatch = |tensor: &str, problem: String| Error::StateMismatch {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            problem,
        };
        let mut take = |name: String, shape: &candle_core::Shape, dtype: DType| -> Result<Tensor> {
            let t = tensors.remove(&name).ok_or_else(|| mismatch(&name, "missing from the file".into()))?;
            if t.shape() != shape {
                return Err(mismatch(&name, format!("shape {:?} in the file, {:?} expected", t.dims(), shape.dims())));
            }
            if t.dtype() != dtype {
                return Err(mismatch(&name, format!("dtype {:?} in the file, {:?} expected", t.dtype(), dtype)));
            }
            Ok(t)
        };
        // Validate everything first, then commit: a bad file changes nothing.
        let mut loaded = Vec::with_capacity(self.slots.len());
        let lookahead = self.params.lookahead_k > 0;
        for slot in &self.slots {
            let sdt = state_dtype(slot.var.dtype());
            let shape = slot.var.shape();
            let m = take(format!("{}.exp_avg", slot.name), shape, sdt)?;
            let v = take(format!("{}.exp_avg_sq", slot.name), shape, sdt)?;
            let slow = if lookahead { Some(take(format!("{}.slow", slot.name), shape, sdt)?) } else { None };
            let step_name = format!("{}.step", slot.name);
            let step = take(step_name.clone(), &candle_core::Shape::from(1), DType::I64)?.to_vec1::<i64>()?[0];
            let step = u64::try_from(step).map_err(|_| mismatch(&step_name, format!("negative step count {step}")))?;
            loaded.push((m, v, slow, step));
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(mismatch(
                extra,
                "not a variable of this optimizer (was the state saved for another model or with Lookahead?)".into(),
            ));
        }
        let lr = match meta.get("lr") {
            Some(s) => Some(s.parse::<f64>().map_err(|_| format_err(format!("bad lr metadata {s:?}")))?),
            None => None,
        };
        let skipped = meta.get("skipped_steps").and_then(|s| s.parse().ok()).unwrap_or(0);
        // Build every new state first (fallible: copies, device transfers), then swap them in.
        let mut states = Vec::with_capacity(loaded.len());
        for (slot, (m, v, slow, step)) in self.slots.iter().zip(loaded) {
            let state = match slot.state {
                SlotState::Host(_) => SlotState::Host(HostState {
                    m: HostBuf::from_tensor(&m)?,
                    v: HostBuf::from_tensor(&v)?,
                    slow: slow.as_ref().map(HostBuf::from_tensor).transpose()?,
                }),
                SlotState::Device(_) => {
                    let dev = slot.var.device();
                    SlotState::Device(DeviceState {
                        m: m.to_device(dev)?,
                        v: v.to_device(dev)?,
                        slow: slow.map(|s| s.to_device(dev)).transpose()?,
                    })
                }
            };
            states.push((state, step));
        }
        for (slot, (state, step)) in self.slots.iter_mut().zip(states) {
            slot.state = state;
            slot.step = step;
        }
        if let Some(lr) = lr {
            self.params.lr = lr;
        }
        self.skipped_steps = skipped;
        Ok(())
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
