//! The device-generic update written with Candle tensor ops: what CUDA and Metal variables
//! use, and the CPU cross-check of the fused kernel. Same formulas, same order.

use candle_core::{DType, Tensor, Var};

use crate::lookahead_core::interpolate_tensor;
use crate::scalars::{StepScalars, Update};

/// Optimizer state of one variable as tensors on the variable's device (f64 for f64
/// parameters, f32 otherwise).
#[derive(Debug, Clone)]
pub(crate) struct DeviceState {
    pub m: Tensor,
    pub v: Tensor,
    pub slow: Option<Tensor>,
    /// The f32 master copy of a half-precision variable (see `ParamsRanger::master_weights`).
    pub master: Option<Tensor>,
    /// Updated in place by the fused CUDA kernel (`UpdatePath::Fused` on CUDA) rather than
    /// replaced by tensor ops.
    pub fused: bool,
}

/// One step for one variable; `centralize` says whether the gradient is centralized.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step(
    var: &Var,
    grad: &Tensor,
    st: &mut DeviceState,
    sc: &StepScalars,
    centralize: bool,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> candle_core::Result<()> {
    let sdt = st.m.dtype();
    let mut g = grad.to_dtype(sdt)?;
    if centralize {
        let dims: Vec<usize> = (1..g.rank()).collect();
        g = g.broadcast_sub(&g.mean_keepdim(dims)?)?;
    }
    let mut p = match &st.master {
        // A variable changed from outside (a `Lookahead<O>` sync, a user's `set`) is adopted
        // where it is no longer the master copy's rounding.
        Some(master) => {
            let current = var.as_tensor().detach().to_dtype(sdt)?;
            let rounded = master.to_dtype(var.dtype())?.to_dtype(sdt)?;
            rounded.ne(&current)?.where_cond(&current, master)?
        }
        None => var.as_tensor().detach().to_dtype(sdt)?,
    };
    if sc.l2 != 0.0 {
        g = (&g + (&p * sc.l2)?)?;
    }
    if sc.decay_factor != 1.0 {
        p = (&p * sc.decay_factor)?;
    }
    let m = (&st.m + ((&g - &st.m)? * (1.0 - beta1))?)?;
    let v = ((&st.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let mut changed = sc.decay_factor != 1.0;
    p = match sc.update {
        Update::Rectified { step_size } => (&p - ((&m / (v.sqrt()? + eps)?)? * step_size)?)?,
        Update::Momentum { step_size } => (&p - (&m * step_size)?)?,
        Update::None => p,
    };
    changed |= !matches!(sc.update, Update::None);
    if let (Some(alpha), Some(slow)) = (sc.sync_alpha, st.slow.as_mut()) {
        *slow = interpolate_tensor(slow, &p, alpha)?;
        p = slow.clone();
        changed = true;
    }
    st.m = m;
    st.v = v;
    // When nothing moved, `p` may still share the variable's storage, which `Var::set` rejects.
    if changed {
        var.set(&p.to_dtype(var.dtype())?)?;
        if st.master.is_some() {
            st.master = Some(p);
        }
    }
    Ok(())
}

/// Whether every element of `t` is finite: `t - t` is 0 for finite values and NaN otherwise,
/// and its sum is exactly 0 only when all are (no overflow, whatever the magnitudes).
pub(crate) fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    #[allow(clippy::eq_op)] // x - x is 0 exactly when x is finite: that is the test
    let d = (t - t)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(d == 0.0)
}
