//! A LoRA projection `x W^T + scale (x_d A^T) B^T` on the CPU as one op (`x_d`: the input after
//! LoRA dropout, `x` without it; W frozen).
//!
//! Written as tensor ops (`base + low`), Candle's graph keeps both `[n, out]` summands alive
//! until backward, although an addition's backward needs neither: two output-sized buffers per
//! adapted projection, which at sequence 1024 x batch 4 gave a LoRA run of SmolLM2-135M twice
//! the activation memory of full fine-tuning. This op keeps only its inputs (the layer input,
//! already kept, and the small A and B) and recomputes the rank-r intermediate in backward.

use candle_core::{Result, Shape, Tensor};

use super::cpu_op::{Fused, FusedOp3, Grads3, Input, Out};
use super::dtype::storage_slice;
use super::float::Float;
use super::gemm::{gemm_new, gemm_strided, matmul_detached};
use super::grad_sink::GradSink;
use super::linear::weight_grad_into;
use super::path::fused_ok;
use super::weight::Weight;

/// `x W^T + scale (x_d A^T) B^T` for `x: [n, in]`, a frozen `W: [out, in]` (a tensor, or
/// quantized), `A: [r, in]`, `B: [out, r]` and `x_d = x * mask` (`mask: [n, in]`, LoRA
/// dropout) or `x`; `None` when the fused op does not apply (not CPU f32/f64, not contiguous,
/// or a trainable W), for the caller to compute it op by op.
pub fn lora_linear(
    x: &Tensor,
    w: &Weight,
    (a, b, scale): (&Tensor, &Tensor, f64),
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let plain = |t: &Tensor| t.dtype() == x.dtype() && t.is_contiguous() && t.device().is_cpu();
    let base_ok = match w {
        Weight::Dense(w) => plain(w) && !w.track_op(),
        Weight::Quantized(q) => q.device().is_cpu() && q.dtype() == x.dtype(),
    };
    let applies = fused_ok(x)
        && x.is_contiguous()
        && base_ok
        && [a, b].into_iter().chain(mask).all(plain)
        && mask.is_none_or(|m| m.dims() == x.dims());
    if !applies {
        return Ok(None);
    }
    let op = LoraLinear { weight: w.clone(), scale, mask: mask.cloned(), sink: GradSink::current() };
    x.apply_op3(a, b, Fused(op)).map(Some)
}

/// The op of [`lora_linear`].
struct LoraLinear {
    /// `[out, in]`, frozen (contiguous when dense).
    weight: Weight,
    scale: f64,
    /// `[n, in]` dropout mask (0 or `1 / (1 - p)`).
    mask: Option<Tensor>,
    /// Where A's and B's gradients go (to Candle's gradient store without one).
    sink: Option<GradSink>,
}

impl LoraLinear {
    /// `x * mask`, or `x`.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => x.mul(m),
            None => Ok(x.clone()),
        }
    }
}

impl FusedOp3 for LoraLinear {
    const NAME: &'static str = "ranger-lora-linear";

    // x: [n, in], a: [r, in], b: [out, r] -> y: [n, out]
    fn cpu<T: Float>(&self, x: Input<'_>, a: Input<'_>, b: Input<'_>) -> Out<T> {
        let (n, inp) = x.shape().dims2()?;
        let (r, inp_a) = a.shape().dims2()?;
        let (out, r_b) = b.shape().dims2()?;
        let (out_w, inp_w) = self.weight.dims2()?;
        if (inp_a, r_b, out_w, inp_w) != (inp, r, out, inp) {
            candle_core::bail!(
                "{}: input {:?}, A {:?}, B {:?} for weight [{out_w}, {inp_w}]",
                Self::NAME,
                x.dims(),
                a.dims(),
                b.dims(),
            );
        }
        let (xs, a_s, bs) = (x.floats::<T>()?, a.floats::<T>()?, b.floats::<T>()?);
        let dropped: Option<Vec<T>> = match &self.mask {
            None => None,
            Some(m) => {
                let (ms, ml) = m.storage_and_layout();
                let ms = storage_slice::<T>(Self::NAME, &ms, ml)?;
                Some(xs.iter().zip(ms).map(|(&x, &m)| x * m).collect())
            }
        };
        let xd = dropped.as_deref().unwrap_or(xs);
        // y is [n, out] = x [n, in] W^T (W read transposed).
        let mut y = match &self.weight {
            Weight::Dense(w) => {
                let (ws, wl) = w.storage_and_layout();
                let ws = storage_slice::<T>(Self::NAME, &ws, wl)?;
                // SAFETY: x is [n, in], W is [out, in] (contiguous).
                unsafe { gemm_new((n, out, inp), (xs.as_ptr(), inp, 1), (ws.as_ptr(), 1, inp), T::one(), true) }
            }
            Weight::Quantized(q) => q.xwt(xs, n)?,
        };
        // SAFETY: t is [n, r] = scale x_d A^T; then y += t B^T (B read transposed), y fully
        // written by the base product above.
        unsafe {
            let t = gemm_new((n, r, inp), (xd.as_ptr(), inp, 1), (a_s.as_ptr(), 1, inp), T::from_f64(self.scale), true);
            if r > 0 {
                gemm_strided(
                    (n, out, r),
                    y.as_mut_ptr(),
                    out,
                    true,
                    (t.as_ptr(), r, 1),
                    (bs.as_ptr(), 1, r),
                    T::one(),
                    true,
                );
            }
        }
        Ok((y, Shape::from((n, out))))
    }

    // x: [n, in], a: [r, in], b: [out, r], g: [n, out]
    //   t = scale x_d A^T [n, r]; gb = scale g B [n, r]
    //   dB = g^T t [out, r]; dA = gb^T x_d [r, in]; dx = g W + (gb A) * mask [n, in]
    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Grads3> {
        let (a_var, b_var, x_tracked) = (a, b, x.track_op());
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), g.detach());
        let xd = self.dropped(&x)?;
        let t = (matmul_detached(&xd, &a.t()?)? * self.scale)?;
        let gb = (matmul_detached(&g, &b)? * self.scale)?;
        // An input computed from nothing trainable (the first layer's, under a frozen embedding)
        // needs no gradient: its `[n, out] x [out, in]` product is skipped.
        let dx = match x_tracked {
            true => {
                let base = match &self.weight {
                    Weight::Dense(w) => matmul_detached(&g, w)?,
                    Weight::Quantized(q) => q.grad_input(&g)?,
                };
                Some((base + self.dropped(&matmul_detached(&gb, &a)?)?)?)
            }
            false => None,
        };
        // An adapter applied without training it (its matrices frozen) gets no gradient.
        let (mut da, mut db) = (None, None);
        match &self.sink {
            Some(sink) => {
                if b_var.is_variable() {
                    weight_grad_into(sink, b_var, &g, &t)?;
                }
                if a_var.is_variable() {
                    weight_grad_into(sink, a_var, &gb, &xd)?;
                }
            }
            None => {
                if a_var.track_op() {
                    da = Some(gb.t()?.matmul(&xd)?);
                }
                if b_var.track_op() {
                    db = Some(g.t()?.matmul(&t)?);
                }
            }
        }
        Ok((dx, da, db))
    }
}
