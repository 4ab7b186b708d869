//! The launch of the fused step on CUDA (src/cuda/ranger_step.cu, compiled to PTX by build.rs):
//! one block per row; see [`crate::gpu_step`]. What `Auto` runs for f32/bf16/f16 CUDA
//! variables; `RANGER_TEST_DEVICE=cuda cargo test -p candle-ranger --features cuda --test
//! ranger_reference` checks it against PyTorch on a GPU (tools/gpu_checks.sh).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Storage};

use crate::gpu_step::{GpuStep, RangerArgs, BLOCK};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ranger_step.ptx"));

// SAFETY: `RangerArgs` is `repr(C)` plain data, passed by value as the kernel's last argument.
unsafe impl DeviceRepr for RangerArgs {}

/// The f32 elements of a state tensor's storage `s` (contiguous, `n` of them, on the GPU).
fn state_view<'a>(s: &'a Storage, l: &Layout, n: usize, what: &str) -> candle_core::Result<CudaView<'a, f32>> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cuda(c), Some((a, b))) if b - a == n => Ok(c.as_cuda_slice::<f32>()?.slice(a..b)),
        _ => {
            candle_core::bail!("candle-ranger-gpu-step: {what} is not a contiguous CUDA tensor of the parameter's size")
        }
    }
}

/// Runs the kernel for `op` on the parameter `p` with gradient `g`.
pub(crate) fn launch(
    op: &GpuStep<'_>,
    p: &mut CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> candle_core::Result<()> {
    match p.dtype() {
        DType::F32 => launch_typed::<f32>("ranger_step_f32", op, p, pl, g, gl),
        DType::F16 => launch_typed::<half::f16>("ranger_step_f16", op, p, pl, g, gl),
        DType::BF16 => launch_typed::<half::bf16>("ranger_step_bf16", op, p, pl, g, gl),
        dt => candle_core::bail!("candle-ranger-gpu-step: no kernel for {dt:?} parameters"),
    }
}

fn launch_typed<T: CudaDType + DeviceRepr>(
    name: &str,
    op: &GpuStep<'_>,
    p: &mut CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> candle_core::Result<()> {
    let ((p0, p1), (g0, g1)) = GpuStep::ranges(pl, gl)?;
    let n = p1 - p0;
    let (args, rows) = op.args(n)?;
    let func = p.device.get_or_load_custom_func(name, "candle_ranger_step", PTX)?;
    let st = op.state;
    // Guards on the state tensors' storages, held until the launch. The kernel writes through
    // these views: Candle runs a device's work on one stream, so the writes are ordered.
    let (m_s, m_l) = st.m.storage_and_layout();
    let (v_s, v_l) = st.v.storage_and_layout();
    let slow = st.slow.as_ref().map(|t| t.storage_and_layout());
    let master = st.master.as_ref().map(|t| t.storage_and_layout());
    let m = state_view(&m_s, m_l, n, "first moment")?;
    let v = state_view(&v_s, v_l, n, "second moment")?;
    let slow_v = slow.as_ref().map(|(s, l)| state_view(s, l, n, "slow weights")).transpose()?;
    let master_v = master.as_ref().map(|(s, l)| state_view(s, l, n, "master copy")).transpose()?;
    let g_v = g.as_cuda_slice::<T>()?.slice(g0..g1);
    let mut p_v = p.as_cuda_slice_mut::<T>()?.slice_mut(p0..p1);

    let mut b = func.builder();
    b.arg(&mut p_v);
    b.arg(&g_v);
    b.arg(&m);
    b.arg(&v);
    // Unused buffers are passed as the first moment's, which the kernel does not touch then.
    b.arg(slow_v.as_ref().unwrap_or(&m));
    b.arg(master_v.as_ref().unwrap_or(&m));
    b.arg(&args);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the kernel's signature is the argument list above; every buffer holds `n`
    // elements of the type the kernel reads (checked above), and the grid covers `n`.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
