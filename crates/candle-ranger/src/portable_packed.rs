//! The portable update over packed state ([`crate::StatePrecision::Int8`] and
//! [`crate::StatePrecision::Bf16`] on CUDA, Metal, or the CPU's portable path): decode m, v
//! and the Lookahead delta ([`PackedTensor`]), run the same tensor-op update as f32 state
//! ([`crate::portable::step`]), encode again. As in the fused step, the slow weights are kept
//! as the delta `u = fast - slow` (zero after a sync).

use candle_core::{DType, Tensor, Var};

use crate::packed_tensor::PackedTensor;
use crate::portable::{self, DeviceState};
use crate::scalars::StepScalars;
use crate::state_codec::Code;

/// Separate the rounding streams of the three buffers.
const STREAM_M: u64 = 1;
const STREAM_V: u64 = 2;
const STREAM_U: u64 = 3;

/// Packed optimizer state of one variable, as tensors on the variable's device.
#[derive(Debug, Clone)]
pub(crate) struct PackedState {
    pub m: PackedTensor,
    pub v: PackedTensor,
    /// `fast - slow`, once Lookahead has taken the slow weights.
    pub delta: Option<PackedTensor>,
    /// The f32 master copy of a half-precision variable.
    pub master: Option<Tensor>,
}

/// The weights the update works on: the master copy, or the variable in f32.
fn fast_weights(master: Option<&Tensor>, var: &Var) -> candle_core::Result<Tensor> {
    match master {
        Some(m) => Ok(m.clone()),
        None => var.as_tensor().detach().to_dtype(DType::F32),
    }
}

/// One step for one variable (see [`crate::portable::step`]); `seed` is the variable's
/// rounding seed for this step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step(
    var: &Var,
    grad: &Tensor,
    st: &mut PackedState,
    sc: &StepScalars,
    centralize: bool,
    beta1: f64,
    beta2: f64,
    eps: f64,
    seed: u64,
) -> candle_core::Result<()> {
    let shape = var.shape();
    // A copy: the step overwrites the variable's storage in place (`Var::set`).
    let before = fast_weights(st.master.as_ref(), var)?.copy()?;
    let u = st.delta.as_ref().map(|d| d.decode(shape)).transpose()?;
    let sync = sc.sync_alpha.is_some();
    let mut plain = DeviceState {
        m: st.m.decode(shape)?,
        v: st.v.decode(shape)?,
        // The slow weights only matter at a sync: slow = fast - u.
        slow: match (&u, sync) {
            (Some(u), true) => Some((&before - u)?),
            _ => None,
        },
        master: st.master.clone(),
        fused: false,
    };
    portable::step(var, grad, &mut plain, sc, centralize, beta1, beta2, eps)?;
    let new_delta = match (&st.delta, u) {
        (Some(d), _) if sync => Some(d.zeros_like()?),
        (Some(d), Some(u)) => {
            // u += fast_after - fast_before (the difference first: u is small, fast is not).
            let after = fast_weights(plain.master.as_ref(), var)?;
            Some(d.encode_like(&(u + (after - &before)?)?, Code::Signed, seed ^ STREAM_U)?)
        }
        _ => None,
    };
    st.m = st.m.encode_like(&plain.m, Code::Signed, seed ^ STREAM_M)?;
    st.v = st.v.encode_like(&plain.v, Code::Positive, seed ^ STREAM_V)?;
    st.delta = new_delta;
    st.master = plain.master;
    Ok(())
}
