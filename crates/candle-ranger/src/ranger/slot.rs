//! One variable of [`super::Ranger`] and its optimizer state, wherever that lives.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::fused::{HostBuf, HostState};
use crate::lookahead_core::{initial_slow, sync_var};
use crate::packed_tensor::PackedTensor;
use crate::params::{ParamsRanger, StatePrecision, UpdatePath};
use crate::portable::DeviceState;
use crate::portable_packed::PackedState;
use crate::state::state_dtype;
use crate::state_codec::{Code, Q8Buf};

/// Optimizer state of one variable, wherever it lives.
#[derive(Debug, Clone)]
pub(super) enum SlotState {
    /// Host vectors updated by the fused CPU kernel.
    Host(HostState),
    /// Tensors on the variable's device, updated with tensor ops.
    Device(DeviceState),
    /// Packed (8-bit or bf16) tensors on the variable's device, updated with tensor ops.
    Packed(PackedState),
}

impl SlotState {
    /// Zero moments and no slow weights yet, on the host (fused kernel) or the variable's
    /// device (tensor ops) as `params.update_path` says.
    pub(super) fn new(var: &Var, params: &ParamsRanger) -> Result<Self> {
        let sdt = state_dtype(var.dtype());
        let gpu_dtype = matches!(var.dtype(), DType::F32 | DType::BF16 | DType::F16);
        let fused = match params.update_path {
            // The CUDA kernel is checked against PyTorch on a GPU (`ranger_reference`); the
            // Metal one has not run on a Mac yet, so Metal keeps tensor ops.
            UpdatePath::Auto => {
                var.device().is_cpu() || (cfg!(feature = "cuda") && var.device().is_cuda() && gpu_dtype)
            }
            UpdatePath::Fused => {
                let has_kernel = var.device().is_cpu()
                    || (cfg!(feature = "cuda") && var.device().is_cuda() && gpu_dtype)
                    || (cfg!(feature = "metal") && var.device().is_metal() && gpu_dtype);
                if !has_kernel {
                    return Err(Error::InvalidConfig(format!(
                        "UpdatePath::Fused needs CPU variables (or f32/bf16/f16 CUDA/Metal ones in a build with that feature), got a {:?} one on {:?}",
                        var.dtype(),
                        var.device().location()
                    )));
                }
                true
            }
            UpdatePath::Portable => false,
        };
        // Slow weights are taken at the variable's first step (see `Slot::ensure_slow`), so
        // weights loaded after the optimizer was built are the ones Lookahead starts from.
        if params.state_precision != StatePrecision::F32 {
            if !matches!(var.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                return Err(Error::InvalidConfig(format!(
                    "{} optimizer state is for f32/bf16/f16 variables; got a {:?} one",
                    if params.state_precision == StatePrecision::Bf16 { "bf16" } else { "8-bit" },
                    var.dtype()
                )));
            }
            let n = var.elem_count();
            let bf16 = params.state_precision == StatePrecision::Bf16;
            if fused && var.device().is_cpu() {
                let (m, v) = if bf16 {
                    (HostBuf::B16(vec![0; n]), HostBuf::B16(vec![0; n]))
                } else {
                    (HostBuf::Q8(Q8Buf::zeros(Code::Signed, n)), HostBuf::Q8(Q8Buf::zeros(Code::Positive, n)))
                };
                return Ok(SlotState::Host(HostState { m, v, slow: None, master: None }));
            }
            // Elsewhere (CUDA, Metal, the portable path): packed tensors and tensor ops; the
            // fused GPU kernels keep f32 state only.
            let zeros = |code| PackedTensor::zeros((!bf16).then_some(code), var.shape(), var.device());
            let (m, v) = (zeros(Code::Signed)?, zeros(Code::Positive)?);
            return Ok(SlotState::Packed(PackedState { m, v, delta: None, master: None }));
        }
        if fused && var.device().is_cpu() {
            let n = var.elem_count();
            let zeros = || if sdt == DType::F64 { HostBuf::F64(vec![0.0; n]) } else { HostBuf::F32(vec![0.0; n]) };
            Ok(SlotState::Host(HostState { m: zeros(), v: zeros(), slow: None, master: None }))
        } else {
            let zeros = Tensor::zeros(var.shape(), sdt, var.device())?;
            Ok(SlotState::Device(DeviceState { m: zeros.copy()?, v: zeros.copy()?, slow: None, master: None, fused }))
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
            // Packed state keeps `fast - slow`.
            SlotState::Host(HostState { slow: Some(delta), .. }) if delta.is_packed() => {
                (self.fast_weights()? - delta.to_tensor(self.var.shape())?)?
            }
            SlotState::Host(HostState { slow: Some(buf), .. }) => buf.to_tensor(self.var.shape())?,
            // A copy: the fused GPU kernels update the slow weights in place.
            SlotState::Device(DeviceState { slow: Some(s), .. }) => s.copy()?,
            SlotState::Packed(PackedState { delta: Some(d), .. }) => {
                (self.fast_weights()? - d.decode(self.var.shape())?)?
            }
            SlotState::Host(_) => initial_slow(&self.var)?.to_device(&Device::Cpu)?,
            SlotState::Device(_) | SlotState::Packed(_) => initial_slow(&self.var)?,
        })
    }

    /// Takes the slow weights (a deep copy of the weights, never zeros) if not yet taken.
    pub(super) fn ensure_slow(&mut self) -> Result<()> {
        let missing = match &mut self.state {
            SlotState::Host(st) => st.slow.is_none(),
            SlotState::Device(st) => st.slow.is_none(),
            SlotState::Packed(st) => {
                if st.delta.is_none() {
                    // Slow == fast now: a zero difference.
                    st.delta = Some(st.m.zeros_like()?);
                }
                return Ok(());
            }
        };
        if let SlotState::Host(st @ HostState { slow: None, .. }) = &mut self.state {
            if let Some(zeros) = st.m.packed_zeros_like() {
                // Slow == fast now: a zero difference.
                st.slow = Some(zeros);
                return Ok(());
            }
        }
        if missing {
            let copy = self.current_slow()?;
            match &mut self.state {
                SlotState::Host(st) => st.slow = Some(HostBuf::from_tensor(&copy)?),
                SlotState::Device(st) => st.slow = Some(copy),
                SlotState::Packed(_) => {}
            }
        }
        Ok(())
    }

    /// Whether this variable keeps an f32 master copy under `params`: half-precision variables,
    /// unless master weights are off.
    pub(super) fn wants_master(&self, params: &ParamsRanger) -> bool {
        params.master_weights && matches!(self.var.dtype(), DType::BF16 | DType::F16)
    }

    /// The master copy (f32, on the state's device), taken from the variable if not yet taken.
    pub(super) fn ensure_master(&mut self) -> Result<()> {
        match &mut self.state {
            SlotState::Host(st) if st.master.is_none() => {
                st.master = Some(HostBuf::from_tensor(&self.var.as_tensor().to_device(&Device::Cpu)?)?)
            }
            SlotState::Device(st) if st.master.is_none() => {
                st.master = Some(self.var.as_tensor().detach().to_dtype(DType::F32)?.copy()?)
            }
            SlotState::Packed(st) if st.master.is_none() => {
                st.master = Some(self.var.as_tensor().detach().to_dtype(DType::F32)?.copy()?)
            }
            _ => {}
        }
        Ok(())
    }

    /// The weights the update works on: the master copy when there is one, else the variable
    /// (in the state dtype, on the variable's device).
    pub(super) fn fast_weights(&self) -> Result<Tensor> {
        Ok(match &self.state {
            SlotState::Host(HostState { master: Some(buf), .. }) => buf.to_tensor(self.var.shape())?,
            SlotState::Device(DeviceState { master: Some(t), .. }) => t.clone(),
            SlotState::Packed(PackedState { master: Some(t), .. }) => t.clone(),
            _ => self.var.as_tensor().detach().to_dtype(state_dtype(self.var.dtype()))?,
        })
    }

    /// A Lookahead sync now, outside the step (the fused kernel syncs inside its own pass):
    /// nothing happens before the slow weights are taken.
    pub(super) fn sync(&mut self, alpha: f64) -> Result<()> {
        let fast = self.fast_weights()?;
        if let SlotState::Host(HostState { slow: Some(d), .. }) = &self.state {
            if d.is_packed() {
                let new = sync_var(&self.var, &fast, &self.current_slow()?, alpha)?;
                if let SlotState::Host(HostState { slow: Some(delta), master, .. }) = &mut self.state {
                    *delta = delta.packed_zeros_like().expect("a packed buffer");
                    if let Some(m) = master {
                        *m = HostBuf::from_tensor(&new)?;
                    }
                }
                return Ok(());
            }
        }
        if let SlotState::Packed(PackedState { delta: Some(_), .. }) = &self.state {
            let new = sync_var(&self.var, &fast, &self.current_slow()?, alpha)?;
            if let SlotState::Packed(PackedState { delta: Some(delta), master, .. }) = &mut self.state {
                *delta = delta.zeros_like()?;
                if let Some(m) = master {
                    *m = new;
                }
            }
            return Ok(());
        }
        match &mut self.state {
            SlotState::Host(HostState { slow: Some(buf), master, .. }) => {
                let new = sync_var(&self.var, &fast, &buf.to_tensor(self.var.shape())?, alpha)?;
                *buf = HostBuf::from_tensor(&new)?;
                if let Some(m) = master {
                    *m = HostBuf::from_tensor(&new)?;
                }
            }
            SlotState::Device(DeviceState { slow: Some(s), master, .. }) => {
                *s = sync_var(&self.var, &fast, s, alpha)?;
                if let Some(m) = master {
                    *m = s.copy()?;
                }
            }
            SlotState::Host(_) | SlotState::Device(_) | SlotState::Packed(_) => {}
        }
        Ok(())
    }
}
