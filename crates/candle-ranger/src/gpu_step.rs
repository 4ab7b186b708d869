//! The fused step on a GPU (`UpdatePath::Fused` on a CUDA or Metal variable): the op both
//! backends share and the scalar arguments both kernels take. The launches are in `cuda_step`
//! (src/cuda/ranger_step.cu) and `metal_step` (src/metal/ranger_step.metal); `gpu_dispatch`
//! makes the op a Candle in-place op that calls them. The
//! optimizer state is the slot's device tensors, updated in place: they belong to the optimizer
//! alone.

use candle_core::Layout;

use crate::portable::DeviceState;
use crate::scalars::{StepScalars, Update};

/// Row length used when not centralizing: rows are just chunks then.
const CHUNK: usize = 1 << 14;
/// Threads per block (CUDA) or threadgroup (Metal); each handles one row.
pub(crate) const BLOCK: usize = 256;

/// The kernels' scalar arguments, laid out as `RangerArgs` in both kernel sources.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RangerArgs {
    pub n: u32,
    pub row_len: u32,
    pub centralize: i32,
    pub has_slow: i32,
    pub has_master: i32,
    pub decay: f32,
    pub l2: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
    pub mode: i32,
    pub step: f32,
    pub alpha: f32,
    pub sync: i32,
}

/// The op applied with `param.inplace_op2(&grad, &op)` on a GPU.
pub(crate) struct GpuStep<'a> {
    pub scalars: StepScalars,
    /// Row length for centralization (`numel / dim0`), or `None` when not centralized.
    pub row_len: Option<usize>,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub state: &'a DeviceState,
}

impl GpuStep<'_> {
    /// The element ranges of the parameter and the gradient (contiguous, of equal size).
    pub(crate) fn ranges(pl: &Layout, gl: &Layout) -> candle_core::Result<((usize, usize), (usize, usize))> {
        match (pl.contiguous_offsets(), gl.contiguous_offsets()) {
            (Some(p), Some(g)) if p.1 - p.0 == g.1 - g.0 => Ok((p, g)),
            _ => candle_core::bail!(
                "candle-ranger-gpu-step: parameter and gradient must be contiguous and equal in size"
            ),
        }
    }

    /// The arguments for `n` elements, and the number of rows (blocks) to launch.
    pub(crate) fn args(&self, n: usize) -> candle_core::Result<(RangerArgs, usize)> {
        let sc = &self.scalars;
        let (mode, step) = match sc.update {
            Update::Rectified { step_size } => (2, step_size),
            Update::Momentum { step_size } => (1, step_size),
            Update::None => (0, 0.0),
        };
        let row_len = self.row_len.unwrap_or(CHUNK).max(1);
        let (Ok(n32), Ok(row32)) = (u32::try_from(n), u32::try_from(row_len)) else {
            candle_core::bail!("candle-ranger-gpu-step: tensors of 2^32 elements or more are not supported")
        };
        let args = RangerArgs {
            n: n32,
            row_len: row32,
            centralize: self.row_len.is_some() as i32,
            has_slow: self.state.slow.is_some() as i32,
            has_master: self.state.master.is_some() as i32,
            decay: sc.decay_factor as f32,
            l2: sc.l2 as f32,
            one_minus_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_minus_b2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
            mode,
            step: step as f32,
            alpha: sc.sync_alpha.unwrap_or(0.0) as f32,
            sync: sc.sync_alpha.is_some() as i32,
        };
        Ok((args, n.div_ceil(row_len)))
    }
}
