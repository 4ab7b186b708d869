//! The LM head and its cross-entropy in one op, on the CPU: the `[tokens, vocab]` logits are
//! never materialised, and in training the gradients are computed while each chunk of logits
//! is at hand.

use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{FusedOp3, Grads3, Input, Out};
use super::float::{wide_sum, Float};
use super::gemm::gemm_strided;
use super::grad_sink::{Buffer, GradSink};

/// Target id of a row that is not a prediction target (prompt, padding) in
/// [`LinearCrossEntropy`].
pub const IGNORE_TARGET: u32 = u32::MAX;

/// The LM head and its cross-entropy in one op: `sum over rows of NLL(target | hidden W^T)` for
/// `hidden: [n, h]`, `weight: [vocab, h]` (f32/f64) and `targets: [n]` (u32,
/// [`IGNORE_TARGET`] for rows without a target). The `[n, vocab]` logits are never
/// materialised: rows go through in chunks, and in training (`grads`) each chunk's gradients —
/// `(softmax - onehot) W` for the hidden rows and `(softmax - onehot)^T hidden` summed into the
/// weight's — are computed while its logits are at hand, so backprop only scales them by the
/// incoming gradient. The same matmuls as logits + loss + backprop, without the logits, their
/// gradient, and Candle's zero-filled accumulator for it (together about 3x `n * vocab` floats).
pub struct LinearCrossEntropy {
    grads: bool,
    weight_grad: bool,
    softcap: Option<f64>,
    chunk_rows: Option<usize>,
    sink: Option<GradSink>,
    saved: std::sync::Mutex<Option<(Tensor, Option<Buffer>)>>,
}

impl LinearCrossEntropy {
    /// `grads`: compute the gradients during the forward pass (training); `weight_grad`: also
    /// the weight's (false for a frozen head, as in LoRA), handed to the active
    /// [`GradSink`] if there is one.
    pub fn new(grads: bool, weight_grad: bool) -> Self {
        let weight_grad = grads && weight_grad;
        let sink = if weight_grad { GradSink::current() } else { None };
        Self { grads, weight_grad, softcap: None, chunk_rows: None, sink, saved: std::sync::Mutex::new(None) }
    }

    /// Gemma 2's final-logit soft-capping: the logits `z` become `cap * tanh(z / cap)`.
    pub fn with_softcap(mut self, cap: Option<f64>) -> Self {
        self.softcap = cap;
        self
    }

    /// Rows of logits computed at a time (default: about 32M floats' worth).
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = Some(rows.max(1));
        self
    }
}

/// Rows of logits per chunk: about 32M floats (128 MB in f32) at a time. Every chunk adds its
/// part into the whole `[vocab, h]` weight gradient, so fewer, larger chunks pass over that
/// buffer fewer times (SmolLM2 at 1,024 tokens: 2 chunks instead of 7).
fn chunk_rows(vocab: usize) -> usize {
    (32 << 20) / vocab.max(1)
}

/// The loss sum and, with `grads`, the hidden rows' gradient `[n, h]` and (with `weight_grad`)
/// the weight's `[vocab, h]`.
#[allow(clippy::too_many_arguments)]
// x: [n, C], w: [V, C], t: [n] -> loss, dx: [n, C], dw: [V, C] (logits [rows, V] a chunk at a time)
fn linear_ce<T: Float>(
    x: &[T],
    w: &[T],
    t: &[u32],
    h: usize,
    v: usize,
    rows: usize,
    grads: bool,
    weight_grad: bool,
    softcap: Option<f64>,
) -> (T, Vec<T>, Vec<T>) {
    let n = t.len();
    let rows = rows.clamp(1, n.max(1));
    let mut logits = vec![T::zero(); rows * v];
    // With soft-capping in training: each logit's tanh(z / cap), for the chain rule.
    let mut tanh = if softcap.is_some() && grads { vec![T::zero(); rows * v] } else { vec![] };
    let mut grad_x = if grads { vec![T::zero(); n * h] } else { vec![] };
    let mut grad_w = if weight_grad { vec![T::zero(); v * h] } else { vec![] };
    let mut total = T::zero();
    for start in (0..n).step_by(rows) {
        let c = rows.min(n - start);
        let xs = &x[start * h..(start + c) * h];
        let ts = &t[start..start + c];
        if ts.iter().all(|&t| t == IGNORE_TARGET) {
            continue;
        }
        let l = &mut logits[..c * v];
        // SAFETY: l is [c, v], xs is [c, h] row-major, w is [v, h] row-major read as W^T [h, v].
        unsafe {
            gemm_strided((c, v, h), l.as_mut_ptr(), v, false, (xs.as_ptr(), h, 1), (w.as_ptr(), 1, h), T::one(), true)
        };
        if let Some(cap) = softcap {
            // z -> cap tanh(z / cap), keeping the tanh in training.
            let (cap, inv) = (T::from_f64(cap), T::from_f64(1.0 / cap));
            if grads {
                l.par_chunks_mut(v).zip(tanh[..c * v].par_chunks_mut(v)).for_each(|(r, th)| {
                    r.iter_mut().zip(th.iter_mut()).for_each(|(x, t)| {
                        *t = (*x * inv).tanh();
                        *x = cap * *t;
                    })
                });
            } else {
                l.par_chunks_mut(v).for_each(|r| r.iter_mut().for_each(|x| *x = cap * (*x * inv).tanh()));
            }
        }
        // Per row: the NLL, then (in training) the row becomes softmax - onehot, its gradient.
        let nll: Vec<T> = l
            .par_chunks_mut(v)
            .zip(ts.par_iter())
            .map(|(r, &t)| {
                if t == IGNORE_TARGET {
                    if grads {
                        r.iter_mut().for_each(|x| *x = T::zero());
                    }
                    return T::zero();
                }
                let max = r.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                let target = r[t as usize] - max;
                // In place: the row becomes exp(x - max), then (in training) the softmax minus
                // the one-hot target, its gradient.
                r.iter_mut().for_each(|x| *x -= max);
                T::exp_in_place(r);
                let sum = wide_sum(r);
                if grads {
                    let inv = T::one() / sum;
                    r.iter_mut().for_each(|x| *x *= inv);
                    r[t as usize] -= T::one();
                }
                sum.ln() - target
            })
            .collect();
        total = nll.into_iter().fold(total, |a, b| a + b);
        if grads && softcap.is_some() {
            // Through the cap: d(cap tanh(z / cap)) / dz = 1 - tanh².
            l.par_chunks_mut(v)
                .zip(tanh[..c * v].par_chunks(v))
                .for_each(|(r, th)| r.iter_mut().zip(th).for_each(|(x, &t)| *x *= T::one() - t * t));
        }
        if grads {
            let gx = &mut grad_x[start * h..(start + c) * h];
            // SAFETY: gx is [c, h]; l is [c, v]; w is [v, h].
            unsafe {
                gemm_strided(
                    (c, h, v),
                    gx.as_mut_ptr(),
                    h,
                    false,
                    (l.as_ptr(), v, 1),
                    (w.as_ptr(), h, 1),
                    T::one(),
                    true,
                )
            };
            if weight_grad {
                // SAFETY: grad_w is [v, h]; l read as l^T [v, c]; xs is [c, h].
                unsafe {
                    gemm_strided(
                        (v, h, c),
                        grad_w.as_mut_ptr(),
                        h,
                        true,
                        (l.as_ptr(), 1, v),
                        (xs.as_ptr(), h, 1),
                        T::one(),
                        true,
                    )
                };
            }
        }
    }
    (total, grad_x, grad_w)
}

impl FusedOp3 for LinearCrossEntropy {
    const NAME: &'static str = "ranger-linear-cross-entropy";

    fn cpu<T: Float>(&self, x: Input<'_>, w: Input<'_>, t: Input<'_>) -> Out<T> {
        let (n, h) = x.shape().dims2()?;
        let (v, h2) = w.shape().dims2()?;
        if h != h2 || t.shape().dims1()? != n {
            candle_core::bail!(
                "ranger-linear-cross-entropy: hidden {:?}, weight {:?}, targets {:?}",
                x.dims(),
                w.dims(),
                t.dims()
            );
        }
        let t = t.ids("target", v, Some(IGNORE_TARGET))?;
        let rows = self.chunk_rows.unwrap_or_else(|| chunk_rows(v));
        let (loss, gx, gw) =
            linear_ce(x.floats()?, w.floats()?, t, h, v, rows, self.grads, self.weight_grad, self.softcap);
        let saved = if self.grads {
            let gx = Tensor::from_vec(gx, (n, h), &candle_core::Device::Cpu)?;
            Some((gx, self.weight_grad.then(|| Buffer::new(gw)).transpose()?))
        } else {
            None
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((vec![loss], Shape::from(())))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _t: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Grads3> {
        let Some((gx, gw)) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("ranger-linear-cross-entropy: run without gradients (or backpropagated twice)");
        };
        let g = grad_res.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let scale = |t: Tensor| -> Result<Tensor> {
            if g == 1.0 {
                Ok(t)
            } else {
                t * g
            }
        };
        let gw = match (gw, &self.sink) {
            // Only a variable's gradient may bypass Candle: for any other tensor Candle itself
            // needs it to go on backpropagating.
            (Some(gw), Some(sink)) if w.is_variable() => {
                sink.add_buffer(w, gw, g)?;
                None
            }
            (gw, _) => gw.map(|gw| scale(gw.into_tensor(w.shape())?)).transpose()?,
        };
        Ok((Some(scale(gx)?), gw, None))
    }
}
