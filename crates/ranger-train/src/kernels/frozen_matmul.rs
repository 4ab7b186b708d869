//! `x W^T` for a frozen weight on any device (CUDA, Metal, and the CPU in half precision): the
//! forward pass is the backend's own matmul, the backward pass computes the input's gradient
//! only. Candle's matmul backward computes, and keeps in the gradient store, a gradient for
//! both operands even when the weight is a plain tensor: for a LoRA run that is a weight-sized
//! buffer per projection and a third of the projection's backward work, spent on gradients
//! nobody reads. (The fused CPU path for f32/f64 is `linear::FrozenLinear`.)

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// The op, holding the weight `[out, in]` (contiguous).
pub(super) struct FrozenMatmul {
    pub(super) weight: Tensor,
}

/// `y = x W^T` with the backend's matmul; `x: [n, in]`, `w: [out, in]` (read transposed, which
/// every backend's gemm takes) -> `y: [n, out]`.
fn fwd<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (n, inp) = xl.shape().dims2()?;
    let (out, inp2) = wl.shape().dims2()?;
    if inp != inp2 {
        candle_core::bail!("ranger-frozen-matmul: input {:?} for weight {:?}", xl.dims(), wl.dims());
    }
    Ok((x.matmul(w, (1, n, out, inp), xl, &wl.transpose(0, 1)?)?, Shape::from((n, out))))
}

/// Runs [`fwd`] with the weight's storage, which must be on the input's backend.
macro_rules! with_weight {
    ($self:ident, $variant:ident, $x:ident, $xl:ident) => {{
        let (ws, wl) = $self.weight.storage_and_layout();
        match &*ws {
            Storage::$variant(w) => fwd($x, $xl, w, wl),
            _ => candle_core::bail!("ranger-frozen-matmul: input and weight on different devices"),
        }
    }};
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "ranger-frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        with_weight!(self, Cpu, x, xl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        with_weight!(self, Cuda, x, xl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, x: &candle_core::MetalStorage, xl: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        with_weight!(self, Metal, x, xl)
    }

    // g: [n, out], w: [out, in] -> dx: [n, in]
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.matmul(&self.weight)?))
    }
}

/// `x W^T` for a frozen `w: [out, in]` and `x: [n, in]` on any device, without a weight gradient.
pub(super) fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul { weight: w.contiguous()? })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// Same values and input gradient as Candle's matmul, in every float dtype, and no gradient
    /// for the weight.
    #[test]
    fn frozen_matmul_is_matmul_without_the_weight_gradient() {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let xv: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
            let wv: Vec<f32> = (0..20).map(|i| (i as f32 * 0.91).cos()).collect();
            let x = Var::from_tensor(&Tensor::from_vec(xv, (3, 5), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
            let w = Tensor::from_vec(wv, (4, 5), &dev).unwrap().to_dtype(dt).unwrap();
            let plain = x.matmul(&w.t().unwrap()).unwrap();
            let frozen = super::frozen_matmul(&x, &w).unwrap();
            let v = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(v(&plain), v(&frozen), "{dt:?} forward");
            let (gp, gf) = (plain.sqr().unwrap().sum_all().unwrap().backward().unwrap(), {
                frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap()
            });
            assert_eq!(v(gp.get(&x).unwrap()), v(gf.get(&x).unwrap()), "{dt:?} input gradient");
            // Candle's matmul keeps one more gradient: the weight's (under the id of `w.t()`).
            assert_eq!(gp.get_ids().count(), gf.get_ids().count() + 1, "{dt:?}: no weight gradient");
            assert!(gf.get(&w).is_none());
        }
    }
}
