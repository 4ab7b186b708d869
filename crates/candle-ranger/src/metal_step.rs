//! The launch of the fused step on Metal (src/metal/ranger_step.metal, compiled by the device
//! at first use, once per device and dtype): one threadgroup per row; see [`crate::gpu_step`].
//! Opt-in (`UpdatePath::Fused`): not yet run on a Mac by this project (CI type-checks this code
//! for `aarch64-apple-darwin`; a shader that fails to compile is an error naming it), so `Auto`
//! keeps the tensor-op path on Metal (`RANGER_TEST_DEVICE=metal cargo test -p candle-ranger
//! --features metal` checks it).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Storage};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;

use crate::gpu_step::{GpuStep, BLOCK};

const MSL: &str = include_str!("metal/ranger_step.metal");

/// The compiled pipeline of kernel `name` on `device`, compiled on first use.
fn pipeline(device: &MetalDevice, name: &'static str) -> candle_core::Result<ComputePipeline> {
    static CACHE: OnceLock<Mutex<HashMap<(String, &'static str), ComputePipeline>>> = OnceLock::new();
    let key = (format!("{:?}", device.id()), name);
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let err = |what: &str, e: candle_metal_kernels::MetalKernelError| {
        candle_core::Error::Msg(format!("candle-ranger-gpu-step: {what} {name}: {e}"))
    };
    let library = device.metal_device().new_library_with_source(MSL, None).map_err(|e| err("compiling", e))?;
    let function = library.get_function(name, None).map_err(|e| err("loading", e))?;
    let p =
        device.metal_device().new_compute_pipeline_state_with_function(&function).map_err(|e| err("building", e))?;
    cache.insert(key, p.clone());
    Ok(p)
}

/// A state tensor's buffer and byte offset (f32, contiguous, `n` elements, on Metal).
fn state_buffer(s: &Storage, l: &Layout, n: usize, what: &str) -> candle_core::Result<(Buffer, usize)> {
    match (s, l.contiguous_offsets()) {
        (Storage::Metal(m), Some((a, b))) if b - a == n && m.dtype() == DType::F32 => Ok((m.buffer().clone(), a * 4)),
        _ => candle_core::bail!(
            "candle-ranger-gpu-step: {what} is not a contiguous f32 Metal tensor of the parameter's size"
        ),
    }
}

/// Encodes the kernel for `op` on the parameter `p` with gradient `g`.
pub(crate) fn launch(
    op: &GpuStep<'_>,
    p: &mut MetalStorage,
    pl: &Layout,
    g: &MetalStorage,
    gl: &Layout,
) -> candle_core::Result<()> {
    let name = match p.dtype() {
        DType::F32 => "ranger_step_f32",
        DType::F16 => "ranger_step_f16",
        DType::BF16 => "ranger_step_bf16",
        dt => candle_core::bail!("candle-ranger-gpu-step: no kernel for {dt:?} parameters"),
    };
    let ((p0, p1), (g0, _)) = GpuStep::ranges(pl, gl)?;
    let n = p1 - p0;
    let (args, rows) = op.args(n)?;
    let elem = p.dtype().size_in_bytes();
    let st = op.state;
    let (m_s, m_l) = st.m.storage_and_layout();
    let (v_s, v_l) = st.v.storage_and_layout();
    let m = state_buffer(&m_s, m_l, n, "first moment")?;
    let v = state_buffer(&v_s, v_l, n, "second moment")?;
    let slow = st.slow.as_ref().map(|t| t.storage_and_layout());
    let master = st.master.as_ref().map(|t| t.storage_and_layout());
    let slow_b = slow.as_ref().map(|(s, l)| state_buffer(s, l, n, "slow weights")).transpose()?;
    let master_b = master.as_ref().map(|(s, l)| state_buffer(s, l, n, "master copy")).transpose()?;

    let device = p.device().clone();
    let pipeline = pipeline(&device, name)?;
    let guard = device.command_encoder()?;
    let encoder: &ComputeCommandEncoder = guard.as_ref();
    encoder.set_compute_pipeline_state(&pipeline);
    encoder.set_output_buffer(0, Some(p.buffer()), p0 * elem);
    encoder.set_input_buffer(1, Some(g.buffer()), g0 * elem);
    encoder.set_output_buffer(2, Some(&m.0), m.1);
    encoder.set_output_buffer(3, Some(&v.0), v.1);
    // Unused buffers are bound to the first moment's, which the kernel does not touch then.
    let (s_buf, s_off) = slow_b.as_ref().unwrap_or(&m);
    let (ms_buf, ms_off) = master_b.as_ref().unwrap_or(&m);
    encoder.set_output_buffer(4, Some(s_buf), *s_off);
    encoder.set_output_buffer(5, Some(ms_buf), *ms_off);
    encoder.set_bytes(6, &args);
    let groups = MTLSize { width: rows, height: 1, depth: 1 };
    let threads = MTLSize { width: BLOCK, height: 1, depth: 1 };
    encoder.dispatch_thread_groups(groups, threads);
    Ok(())
}
