//! One variable of [`super::Ranger`] and its optimizer state, wherever that lives.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::fused::{HostBuf, HostState};
use crate::lookahead_core::{initial_slow, sync_var};
use crate::params::{ParamsRanger, UpdatePath};
use crate::portable::DeviceState;
use crate::state::state_dtype;

/// Optimizer state of one variable, wherever it lives.
#[derive(Debug, Clone)]
pub(super) enum SlotState {
    /// Host vectors updated by the fused CPU kernel.
    Host(HostState),
    /// Tensors on the variable's device, updated with tensor ops.
    Device(DeviceState),
}

impl SlotState {
    /// Zero moments and no slow weights yet, on the host (fused kernel) or the variable's
    /// device (tensor ops) as `params.update_path` says.
    pub(super) fn new(var: &Var, params: &ParamsRanger) -> Result<Self> {
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
}

/// One optimized variable.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) name: String,
    pub(super) var: Var,
    pub(super) group: usize,
    /// Steps this variable has taken (it only advances when the variable has a gradient).
    pub(super) step: u64,
    pub(super) state: SlotState,
}

impl Slot {
    /// The slow weights as they would be now: the stored ones, or (before the first step)
    /// a deep copy of the current weights, in the state dtype, on the state's device.
    pub(super) fn current_slow(&self) -> Result<Tensor> {
        Ok(match &self.state {
            SlotState::Host(HostState { slow: Some(buf), .. }) => buf.to_tensor(self.var.shape())?,
            SlotState::Device(DeviceState { slow: Some(s), .. }) => s.clone(),
            SlotState::Host(_) => initial_slow(&self.var)?.to_device(&Device::Cpu)?,
            SlotState::Device(_) => initial_slow(&self.var)?,
        })
    }

    /// Takes the slow weights (a deep copy of the weights, never zeros) if not yet taken.
    pub(super) fn ensure_slow(&mut self) -> Result<()> {
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

    /// A Lookahead sync now, outside the step (the fused kernel syncs inside its own pass):
    /// nothing happens before the slow weights are taken.
    pub(super) fn sync(&mut self, alpha: f64) -> Result<()> {
        match &mut self.state {
            SlotState::Host(HostState { slow: Some(buf), .. }) => {
                let new = sync_var(&self.var, &buf.to_tensor(self.var.shape())?, alpha)?;
                *buf = HostBuf::from_tensor(&new)?;
            }
            SlotState::Device(DeviceState { slow: Some(s), .. }) => *s = sync_var(&self.var, s, alpha)?,
            SlotState::Host(_) | SlotState::Device(_) => {}
        }
        Ok(())
    }
}
