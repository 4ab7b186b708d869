//! The LM head and its cross-entropy for a head kept in GGUF blocks (QLoRA's tied embedding or
//! frozen `lm_head`), on the CPU: the head is dequantized a chunk of vocabulary rows at a time,
//! so neither the f32 head nor the `[tokens, vocab]` logits ever exist whole.
//!
//! The vocabulary is the outer loop (each chunk of W is dequantized once per pass), so the
//! softmax is taken online: the first pass keeps each row's running maximum and sum of
//! exponentials (and its target's logit), the second recomputes each chunk's logits and adds
//! `(softmax - onehot) W_c` into the hidden rows' gradient. One more `[tokens, vocab]` product
//! than [`super::lm_head::LinearCrossEntropy`], for a head that stays quantized. The head is
//! frozen: it gets no gradient.

use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{FusedOp2, Input, Out};
use super::float::{wide_sum, Float};
use super::gemm::gemm_strided;
use super::lm_head::IGNORE_TARGET;
use super::quantized::QuantizedWeight;

/// `sum over rows of NLL(target | hidden W^T)` for `hidden: [n, h]` (f32/f64), a quantized
/// `W: [vocab, h]` held by the op and `targets: [n]` (u32, [`IGNORE_TARGET`] for rows
/// without one); with `grads`, the hidden rows' gradient is computed in the forward pass and
/// handed to backprop.
pub struct QuantizedLinearCrossEntropy {
    /// The head.
    pub weight: QuantizedWeight,
    /// Compute the hidden rows' gradient (training).
    pub grads: bool,
    saved: std::sync::Mutex<Option<Tensor>>,
}

impl QuantizedLinearCrossEntropy {
    /// The op over `weight`; `grads`: training (backward follows).
    pub fn new(weight: QuantizedWeight, grads: bool) -> Self {
        Self { weight, grads, saved: std::sync::Mutex::new(None) }
    }
}

/// Per row: the running maximum and sum of `exp(logit - max)`, and the target's logit.
#[derive(Clone, Copy)]
struct RowState<T> {
    max: T,
    sum: T,
    target: T,
}

// x: [n, C], W: [V, C] (quantized, chunks of rows [Vc, C]), t: [n] -> loss, dx: [n, C]
fn linear_ce<T: Float>(x: &[T], w: &QuantizedWeight, t: &[u32], h: usize, grads: bool) -> Result<(T, Vec<T>)> {
    let n = t.len();
    let mut state = vec![RowState { max: T::neg_infinity(), sum: T::zero(), target: T::zero() }; n];
    let mut logits: Vec<T> = Vec::new();
    // logits [n, c] = x W_c^T for the chunk of rows `rows`.
    let product = |logits: &mut Vec<T>, c: usize, wc: &[T]| {
        logits.clear();
        logits.resize(n * c, T::zero());
        // SAFETY: logits is [n, c]; x is [n, h]; wc is [c, h], read transposed.
        unsafe {
            gemm_strided(
                (n, c, h),
                logits.as_mut_ptr(),
                c,
                false,
                (x.as_ptr(), h, 1),
                (wc.as_ptr(), 1, h),
                T::one(),
                true,
            )
        };
    };
    w.for_each_chunk::<T>(|rows, wc| {
        product(&mut logits, rows.len(), wc);
        // In place: each row becomes exp(logit - running max) (the vectorised exp).
        logits.par_chunks_mut(rows.len()).zip(state.par_iter_mut()).zip(t.par_iter()).for_each(|((l, st), &tg)| {
            if tg == IGNORE_TARGET {
                return;
            }
            if rows.contains(&(tg as usize)) {
                st.target = l[tg as usize - rows.start];
            }
            let m = l.iter().fold(st.max, |m, &x| m.max(x));
            let rescaled = if st.sum == T::zero() { T::zero() } else { st.sum * (st.max - m).exp() };
            l.iter_mut().for_each(|x| *x -= m);
            T::exp_in_place(l);
            st.sum = rescaled + wide_sum(l);
            st.max = m;
        });
    })?;
    let total = state
        .iter()
        .zip(t)
        .filter(|(_, &tg)| tg != IGNORE_TARGET)
        .fold(T::zero(), |a, (st, _)| a + st.max + st.sum.ln() - st.target);
    if !grads {
        return Ok((total, vec![]));
    }
    let lse: Vec<T> = state.iter().map(|st| st.max + st.sum.ln()).collect();
    let mut grad_x = vec![T::zero(); n * h];
    w.for_each_chunk::<T>(|rows, wc| {
        let c = rows.len();
        product(&mut logits, c, wc);
        // Each row becomes softmax - onehot (zero for an ignored row), its logits' gradient.
        logits.par_chunks_mut(c).zip(lse.par_iter()).zip(t.par_iter()).for_each(|((l, &lse), &tg)| {
            if tg == IGNORE_TARGET {
                l.iter_mut().for_each(|x| *x = T::zero());
                return;
            }
            l.iter_mut().for_each(|x| *x -= lse);
            T::exp_in_place(l);
            if rows.contains(&(tg as usize)) {
                l[tg as usize - rows.start] -= T::one();
            }
        });
        // SAFETY: grad_x is [n, h] (accumulated); logits is [n, c]; wc is [c, h].
        unsafe {
            gemm_strided(
                (n, h, c),
                grad_x.as_mut_ptr(),
                h,
                true,
                (logits.as_ptr(), c, 1),
                (wc.as_ptr(), h, 1),
                T::one(),
                true,
            )
        };
    })?;
    Ok((total, grad_x))
}

impl FusedOp2 for QuantizedLinearCrossEntropy {
    const NAME: &'static str = "ranger-quantized-linear-cross-entropy";

    fn cpu<T: Float>(&self, x: Input<'_>, t: Input<'_>) -> Out<T> {
        let (n, h) = x.shape().dims2()?;
        let (v, h2) = self.weight.dims2();
        if h != h2 || t.shape().dims1()? != n {
            candle_core::bail!("{}: hidden {:?}, head [{v}, {h2}], targets {:?}", Self::NAME, x.dims(), t.dims());
        }
        let t = t.ids("target", v, Some(IGNORE_TARGET))?;
        let (loss, gx) = linear_ce(x.floats()?, &self.weight, t, h, self.grads)?;
        if self.grads {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Tensor::from_vec(gx, (n, h), &candle_core::Device::Cpu)?);
        }
        Ok((vec![loss], Shape::from(())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _t: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(gx) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("{}: run without gradients (or backpropagated twice)", Self::NAME);
        };
        let g = grad_res.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok((Some(if g == 1.0 { gx } else { (gx * g)? }), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Tensor, Var};

    use super::QuantizedLinearCrossEntropy;
    use crate::kernels::lm_head::{LinearCrossEntropy, IGNORE_TARGET};
    use crate::kernels::quantized::QuantizedWeight;
    use crate::kernels::Fused;

    /// The loss and the hidden rows' gradient equal those of the dense fused op over the
    /// dequantized head (f32 and f64, ignored rows, the vocabulary in several chunks, targets
    /// in each), in training and in evaluation.
    #[test]
    fn quantized_head_loss_matches_the_dense_one() {
        let dev = Device::Cpu;
        let (n, h, v) = (11, 64, 50);
        for dt in [DType::F32, DType::F64] {
            let w = Tensor::randn(0f32, 1.0, (v, h), &dev).unwrap();
            let q = QuantizedWeight::quantize(&w, GgmlDType::Q8_0).unwrap().with_dtype(dt).with_chunk_elems(7 * h);
            let dense = q.dequantize().unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
            let mut targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
            targets[3] = IGNORE_TARGET;
            let t = Tensor::new(targets.as_slice(), &dev).unwrap();
            let value = |l: &Tensor| l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            for grads in [true, false] {
                let lq = x.apply_op2(&t, Fused(QuantizedLinearCrossEntropy::new(q.clone(), grads))).unwrap();
                let ld = x.apply_op3(&dense, &t, Fused(LinearCrossEntropy::new(grads, false))).unwrap();
                let tol = if dt == DType::F32 { 1e-4 } else { 1e-10 };
                assert!((value(&lq) - value(&ld)).abs() <= tol * value(&ld).abs(), "{dt:?} loss");
                if grads {
                    let (gq, gd) = ((lq * 0.5).unwrap().backward().unwrap(), (ld * 0.5).unwrap().backward().unwrap());
                    let diff = (gq.get(&x).unwrap() - gd.get(&x).unwrap()).unwrap().abs().unwrap();
                    let diff = value(
                        &diff.max_keepdim(0).unwrap().max_keepdim(1).unwrap().squeeze(0).unwrap().squeeze(0).unwrap(),
                    );
                    assert!(diff <= tol, "{dt:?} gradient differs by {diff}");
                }
            }
        }
    }
}
