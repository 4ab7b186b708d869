//! The fused step on Metal ([`UpdatePath::Fused`](crate::UpdatePath::Fused) on a Metal variable,
//! with the `metal` feature): src/metal/ranger_step.metal, compiled by the Metal device at run
//! time (once per device and dtype), launched as the `metal_fwd` of an in-place op on the
//! parameter; one threadgroup per row. The optimizer state is the slot's device tensors,
//! updated in place: they belong to the optimizer alone.
//!
//! Opt-in: this kernel has not been run on a Mac by this project (the glue is type-checked for
//! `aarch64-apple-darwin`; the shader compiles on the device at first use, and a failure is an
//! error naming it), so `Auto` keeps the tensor-op path on Metal (`RANGER_TEST_DEVICE=metal
//! cargo test -p candle-ranger --features metal` checks it against the PyTorch reference).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, MetalDevice, MetalStorage, Storage};
use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;

use crate::portable::DeviceState;
use crate::scalars::{StepScalars, Update};

const MSL: &str = include_str!("metal/ranger_step.metal");
const BLOCK: usize = 256;
/// Row length used when not centralizing: rows are just chunks then.
const CHUNK: usize = 1 << 14;

/// The kernel's arguments, laid out as `RangerArgs` in the shader.
#[repr(C)]
struct RangerArgs {
    n: u32,
    row_len: u32,
    centralize: i32,
    has_slow: i32,
    has_master: i32,
    decay: f32,
    l2: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
    mode: i32,
    step: f32,
    alpha: f32,
    sync: i32,
}

/// The op applied with `param.inplace_op2(&grad, &op)` on Metal.
pub(crate) struct MetalStep<'a> {
    pub scalars: StepScalars,
    /// Row length for centralization (`numel / dim0`), or `None` when not centralized.
    pub row_len: Option<usize>,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub state: &'a DeviceState,
}

/// The compiled pipeline of kernel `name` on `device`, compiled on first use.
fn pipeline(device: &MetalDevice, name: &'static str) -> candle_core::Result<ComputePipeline> {
    static CACHE: OnceLock<Mutex<HashMap<(String, &'static str), ComputePipeline>>> = OnceLock::new();
    let key = (format!("{:?}", device.id()), name);
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let err = |what: &str, e: candle_metal_kernels::MetalKernelError| {
        candle_core::Error::Msg(format!("candle-ranger-metal-step: {what} {name}: {e}"))
    };
    let library = device.metal_device().new_library_with_source(MSL, None).map_err(|e| err("compiling", e))?;
    let function = library.get_function(name, None).map_err(|e| err("loading", e))?;
    let p =
        device.metal_device().new_compute_pipeline_state_with_function(&function).map_err(|e| err("building", e))?;
    cache.insert(key, p.clone());
    Ok(p)
}

impl InplaceOp2 for MetalStep<'_> {
    fn name(&self) -> &'static str {
        "candle-ranger-metal-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("candle-ranger-metal-step on a CPU tensor (the CPU has its own fused kernel)")
    }

    fn metal_fwd(&self, p: &mut MetalStorage, pl: &Layout, g: &MetalStorage, gl: &Layout) -> candle_core::Result<()> {
        let name = match p.dtype() {
            DType::F32 => "ranger_step_f32",
            DType::F16 => "ranger_step_f16",
            DType::BF16 => "ranger_step_bf16",
            dt => candle_core::bail!("candle-ranger-metal-step: no kernel for {dt:?} parameters"),
        };
        let ((p0, p1), (g0, _)) = match (pl.contiguous_offsets(), gl.contiguous_offsets()) {
            (Some(a), Some(b)) if b.1 - b.0 == a.1 - a.0 => (a, b),
            _ => candle_core::bail!(
                "candle-ranger-metal-step: parameter and gradient must be contiguous and equal in size"
            ),
        };
        let n = p1 - p0;
        let elem = p.dtype().size_in_bytes();
        let st = self.state;
        // Guards on the state tensors' storages, held until the kernel is encoded.
        let (m_s, m_l) = st.m.storage_and_layout();
        let (v_s, v_l) = st.v.storage_and_layout();
        let slow = st.slow.as_ref().map(|t| t.storage_and_layout());
        let master = st.master.as_ref().map(|t| t.storage_and_layout());
        // A state tensor's buffer and byte offset (f32, contiguous, n elements, on Metal).
        let buf = |s: &Storage,
                   l: &Layout,
                   what: &str|
         -> candle_core::Result<(candle_metal_kernels::metal::Buffer, usize)> {
            match (s, l.contiguous_offsets()) {
                (Storage::Metal(m), Some((a, b))) if b - a == n && m.dtype() == DType::F32 => {
                    Ok((m.buffer().clone(), a * 4))
                }
                _ => candle_core::bail!(
                    "candle-ranger-metal-step: {what} is not a contiguous f32 Metal tensor of the parameter's size"
                ),
            }
        };
        let m = buf(&m_s, m_l, "first moment")?;
        let v = buf(&v_s, v_l, "second moment")?;
        let slow_b = match &slow {
            Some((s, l)) => Some(buf(s, l, "slow weights")?),
            None => None,
        };
        let master_b = match &master {
            Some((s, l)) => Some(buf(s, l, "master copy")?),
            None => None,
        };

        let sc = &self.scalars;
        let (mode, step) = match sc.update {
            Update::Rectified { step_size } => (2, step_size),
            Update::Momentum { step_size } => (1, step_size),
            Update::None => (0, 0.0),
        };
        let row_len = self.row_len.unwrap_or(CHUNK).max(1);
        let rows = n.div_ceil(row_len);
        let (Ok(n32), Ok(row32)) = (u32::try_from(n), u32::try_from(row_len)) else {
            candle_core::bail!("candle-ranger-metal-step: tensors of 2^32 elements or more are not supported")
        };
        let args = RangerArgs {
            n: n32,
            row_len: row32,
            centralize: self.row_len.is_some() as i32,
            has_slow: slow_b.is_some() as i32,
            has_master: master_b.is_some() as i32,
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
        let (s_buf, s_off) = slow_b.as_ref().map_or((&m.0, m.1), |(b, o)| (b, *o));
        let (ms_buf, ms_off) = master_b.as_ref().map_or((&m.0, m.1), |(b, o)| (b, *o));
        encoder.set_output_buffer(4, Some(s_buf), s_off);
        encoder.set_output_buffer(5, Some(ms_buf), ms_off);
        encoder.set_bytes(6, &args);
        let groups = MTLSize { width: rows, height: 1, depth: 1 };
        let threads = MTLSize { width: BLOCK, height: 1, depth: 1 };
        encoder.dispatch_thread_groups(groups, threads);
        Ok(())
    }
}
