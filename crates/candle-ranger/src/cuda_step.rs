//! The fused step on CUDA ([`UpdatePath::Fused`](crate::UpdatePath::Fused) on a CUDA variable,
//! with the `cuda` feature): src/cuda/ranger_step.cu, compiled to PTX by build.rs, launched as
//! the `cuda_fwd` of an in-place op on the parameter. One kernel per tensor; one block per row
//! (centralization reduces the row in the block first). The optimizer state is the slot's
//! device tensors, updated in place: they belong to the optimizer alone.
//!
//! Opt-in: this kernel has been compiled in CI but not yet run on a GPU here, so `Auto` keeps
//! the tensor-op path on CUDA until it has been checked there (`RANGER_TEST_DEVICE=cuda cargo
//! test -p candle-ranger --features cuda` compares it with the PyTorch reference).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Storage};

use crate::portable::DeviceState;
use crate::scalars::{StepScalars, Update};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ranger_step.ptx"));
const BLOCK: u32 = 256;
/// Row length used when not centralizing: rows are just chunks then.
const CHUNK: usize = 1 << 14;

/// The op applied with `param.inplace_op2(&grad, &op)` on CUDA.
pub(crate) struct CudaStep<'a> {
    pub scalars: StepScalars,
    /// Row length for centralization (`numel / dim0`), or `None` when not centralized.
    pub row_len: Option<usize>,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub state: &'a DeviceState,
}

/// The f32 elements of a state tensor's storage `s` (contiguous, `n` of them, on the GPU).
fn state_view<'a>(s: &'a Storage, l: &Layout, n: usize, what: &str) -> candle_core::Result<CudaView<'a, f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg(format!("candle-ranger-cuda-step: {what} not contiguous")))?;
    if b - a != n {
        candle_core::bail!("candle-ranger-cuda-step: {what} size does not match the parameter");
    }
    match s {
        Storage::Cuda(c) => Ok(c.as_cuda_slice::<f32>()?.slice(a..b)),
        _ => candle_core::bail!("candle-ranger-cuda-step: {what} is not on the GPU"),
    }
}

impl InplaceOp2 for CudaStep<'_> {
    fn name(&self) -> &'static str {
        "candle-ranger-cuda-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("candle-ranger-cuda-step on a CPU tensor (the CPU has its own fused kernel)")
    }

    fn cuda_fwd(&self, p: &mut CudaStorage, pl: &Layout, g: &CudaStorage, gl: &Layout) -> candle_core::Result<()> {
        match p.dtype() {
            DType::F32 => self.launch::<f32>("ranger_step_f32", p, pl, g, gl),
            DType::F16 => self.launch::<half::f16>("ranger_step_f16", p, pl, g, gl),
            DType::BF16 => self.launch::<half::bf16>("ranger_step_bf16", p, pl, g, gl),
            dt => candle_core::bail!("candle-ranger-cuda-step: no kernel for {dt:?} parameters"),
        }
    }
}

impl CudaStep<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        name: &str,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let ((p0, p1), (g0, g1)) = match (pl.contiguous_offsets(), gl.contiguous_offsets()) {
            (Some(a), Some(b)) => (a, b),
            _ => candle_core::bail!("candle-ranger-cuda-step: parameter and gradient must be contiguous"),
        };
        let n = p1 - p0;
        if g1 - g0 != n {
            candle_core::bail!("candle-ranger-cuda-step: gradient size does not match the parameter");
        }
        let dev = p.device.clone();
        let func = dev.get_or_load_custom_func(name, "candle_ranger_step", PTX)?;
        let st = self.state;
        // Guards on the state tensors' storages, held until the launch.
        let (m_s, m_l) = st.m.storage_and_layout();
        let (v_s, v_l) = st.v.storage_and_layout();
        let slow = st.slow.as_ref().map(|t| t.storage_and_layout());
        let master = st.master.as_ref().map(|t| t.storage_and_layout());
        let view = |s, l, what| state_view(s, l, n, what);
        let m = view(&m_s, m_l, "first moment")?;
        let v = view(&v_s, v_l, "second moment")?;
        let slow_v = match &slow {
            Some((s, l)) => Some(view(s, l, "slow weights")?),
            None => None,
        };
        let master_v = match &master {
            Some((s, l)) => Some(view(s, l, "master copy")?),
            None => None,
        };
        let g_v = g.as_cuda_slice::<T>()?.slice(g0..g1);
        let mut p_v = p.as_cuda_slice_mut::<T>()?.slice_mut(p0..p1);

        let sc = &self.scalars;
        let (mode, step) = match sc.update {
            Update::Rectified { step_size } => (2i32, step_size),
            Update::Momentum { step_size } => (1i32, step_size),
            Update::None => (0i32, 0.0),
        };
        let centralize = self.row_len.is_some() as i32;
        let row_len = self.row_len.unwrap_or(CHUNK).max(1);
        let rows = n.div_ceil(row_len);
        let (has_slow, has_master) = (slow_v.is_some() as i32, master_v.is_some() as i32);
        // Unused buffers are passed as the first moment's, which the kernel does not touch then.
        let slow_arg = slow_v.as_ref().unwrap_or(&m);
        let master_arg = master_v.as_ref().unwrap_or(&m);
        let f = |x: f64| x as f32;
        let (decay, l2, omb1, b2, omb2, eps) =
            (f(sc.decay_factor), f(sc.l2), f(1.0 - self.beta1), f(self.beta2), f(1.0 - self.beta2), f(self.eps));
        let (stepf, alpha, sync) = (f(step), f(sc.sync_alpha.unwrap_or(0.0)), sc.sync_alpha.is_some() as i32);

        let mut b = func.builder();
        b.arg(&n);
        b.arg(&row_len);
        b.arg(&centralize);
        b.arg(&mut p_v);
        b.arg(&g_v);
        b.arg(&m);
        b.arg(&v);
        b.arg(slow_arg);
        b.arg(&has_slow);
        b.arg(master_arg);
        b.arg(&has_master);
        b.arg(&decay);
        b.arg(&l2);
        b.arg(&omb1);
        b.arg(&b2);
        b.arg(&omb2);
        b.arg(&eps);
        b.arg(&mode);
        b.arg(&stepf);
        b.arg(&alpha);
        b.arg(&sync);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel's signature is the argument list above; every buffer holds `n`
        // elements of the type the kernel reads (checked above), and the grid covers `n`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
