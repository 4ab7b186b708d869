//! [`GpuStep`] as a Candle in-place op: its `cuda_fwd` and `metal_fwd` call the launches of
//! `cuda_step` and `metal_step` (kept apart from `gpu_step`, which both launches use).

use candle_core::{CpuStorage, InplaceOp2, Layout};

use crate::gpu_step::GpuStep;

impl InplaceOp2 for GpuStep<'_> {
    fn name(&self) -> &'static str {
        "candle-ranger-gpu-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("candle-ranger-gpu-step on a CPU tensor (the CPU has its own fused kernel)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda_step::launch(self, p, pl, g, gl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        p: &mut candle_core::MetalStorage,
        pl: &Layout,
        g: &candle_core::MetalStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        crate::metal_step::launch(self, p, pl, g, gl)
    }
}
