//! Linear layers `x W^T` on the CPU whose backward keeps no activation alive: a trainable
//! weight's gradient computed from detached inputs (or written into a [`GradSink`]), and no
//! gradient at all for a frozen weight.

use candle_core::{Layout, Result, Shape, Tensor};

use super::cpu_op::{Fused, FusedOp1, FusedOp2, Input, Out};
use super::dtype::{float_dispatch, storage_slice};
use super::float::Float;
use super::gemm::{gemm_new, gemm_strided, matmul_detached};
use super::grad_sink::GradSink;
use super::path::fused_ok;

/// `x W^T` for `x: [n, in]` and `W: [out, in]`. On CPU (f32/f64, contiguous) through ops whose
/// backward keeps no activation alive; a frozen (non-variable) weight gets no gradient on any
/// device (`frozen_matmul`: the backend's matmul, input gradient only); Candle's matmul otherwise.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && w.dtype() == x.dtype() && x.is_contiguous() && w.is_contiguous() && w.device().is_cpu() {
        if w.is_variable() {
            return x.apply_op2(w, Fused(Linear { sink: GradSink::current() }));
        }
        if !w.track_op() {
            return x.apply_op1(Fused(FrozenLinear { weight: w.clone() }));
        }
    }
    // Frozen: neither a variable nor computed from one.
    if !w.track_op() {
        return super::frozen_matmul::frozen_matmul(x, w);
    }
    x.matmul(&w.t()?)
}

/// `x W^T` on the CPU: the forward pass of [`Linear`] and [`FrozenLinear`].
// x: [n, in], w: [out, in] -> y: [n, out]
fn linear_fwd<T: Float>(op: &str, (x, xl): (&[T], &Layout), (w, wl): (&[T], &Layout)) -> Out<T> {
    let (n, inp) = xl.shape().dims2()?;
    let (out, inp2) = wl.shape().dims2()?;
    if inp != inp2 {
        candle_core::bail!("{op}: input {:?} for weight {:?}", xl.dims(), wl.dims());
    }
    // SAFETY: y is [n, out]; x is [n, in]; w is [out, in], read transposed.
    let y = unsafe { gemm_new((n, out, inp), (x.as_ptr(), inp, 1), (w.as_ptr(), 1, inp), T::one(), true) };
    Ok((y, Shape::from((n, out))))
}

/// `x W^T` for a frozen weight (f32/f64, `x: [n, in]`, `W: [out, in]` held by the op). Candle's
/// matmul backward computes and keeps a gradient for both operands even when the weight is a
/// plain tensor, so a LoRA run would spend a third of its projection backprop, and a
/// weight-sized buffer per projection, on gradients nobody uses; this op's backward computes
/// only the input's, `g W`.
pub struct FrozenLinear {
    /// `[out, in]`, contiguous.
    pub weight: Tensor,
}

impl FusedOp1 for FrozenLinear {
    const NAME: &'static str = "ranger-frozen-linear";

    fn cpu<T: Float>(&self, x: Input<'_>) -> Out<T> {
        let w = self.weight.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        linear_fwd(Self::NAME, (x.floats()?, x.layout()), (storage_slice(Self::NAME, &ws, wl)?, wl))
    }

    // g: [n, out], w: [out, in] -> dx: [n, in]
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(matmul_detached(g, &self.weight)?))
    }
}

/// `x W^T` for a trainable `W` (f32/f64, `x: [n, in]`, `W: [out, in]`). Candle's matmul backward
/// records its products, so a weight's gradient would keep the layer's input alive until the
/// optimizer step, and with it most activations through the whole backward pass; this op
/// computes both gradients from detached inputs, so gradients reference nothing.
/// With a [`GradSink`], the weight's gradient goes there, accumulated in place by the matmul.
pub struct Linear {
    /// Where the weight's gradient goes (to Candle's gradient store without one).
    pub sink: Option<GradSink>,
}

impl FusedOp2 for Linear {
    const NAME: &'static str = "ranger-linear";

    fn cpu<T: Float>(&self, x: Input<'_>, w: Input<'_>) -> Out<T> {
        linear_fwd(Self::NAME, (x.floats()?, x.layout()), (w.floats()?, w.layout()))
    }

    // x: [n, in], w: [out, in], g: [n, out] -> dx: [n, in], dw: [out, in]
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xd, wd, g) = (x.detach(), w.detach(), g.detach());
        let dx = matmul_detached(&g, &wd)?;
        match &self.sink {
            None => Ok((Some(dx), Some(g.t()?.matmul(&xd)?))),
            Some(sink) => {
                weight_grad_into(sink, w, &g, &xd)?;
                Ok((Some(dx), None))
            }
        }
    }
}

/// `dW (+)= g^T x` into `sink`'s buffer for `w: [out, in]`, with `g: [n, out]`, `x: [n, in]`.
pub(crate) fn weight_grad_into(sink: &GradSink, w: &Tensor, g: &Tensor, x: &Tensor) -> Result<()> {
    const OP: &str = "ranger-linear";
    fn run<T: Float>(
        sink: &GradSink,
        w: &Tensor,
        g: &[T],
        x: &[T],
        (n, out, inp): (usize, usize, usize),
    ) -> Result<()> {
        // SAFETY: dw is [out, in]; g read transposed as [out, n]; x is [n, in]. Without
        // `accumulate` gemm sets every element of dw (n > 0).
        unsafe {
            sink.write_product::<T>(w, |dw, _, accumulate| {
                gemm_strided(
                    (out, inp, n),
                    dw,
                    inp,
                    accumulate,
                    (g.as_ptr(), 1, out),
                    (x.as_ptr(), inp, 1),
                    T::one(),
                    true,
                )
            })
        }
    }
    let (n, out) = g.dims2()?;
    let (n2, inp) = x.dims2()?;
    if n != n2 || w.dims() != [out, inp] {
        candle_core::bail!("ranger-linear: gradient {:?} and input {:?} for weight {:?}", g.dims(), x.dims(), w.dims());
    }
    if n == 0 {
        // No rows: a zero gradient (gemm would not write a product over k = 0).
        return match w.dtype() {
            candle_core::DType::F64 => sink.write::<f64>(w, |_| {}),
            _ => sink.write::<f32>(w, |_| {}),
        };
    }
    let (g, x) = (g.contiguous()?, x.contiguous()?);
    let (gs, gl) = g.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    float_dispatch!(OP, g.dtype(), |T| {
        run::<T>(sink, w, storage_slice(OP, &gs, gl)?, storage_slice(OP, &xs, xl)?, (n, out, inp))
    })
}
