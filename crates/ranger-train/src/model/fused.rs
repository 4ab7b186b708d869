//! Fused CPU kernels that *do* define a backward pass, used where the op-by-op version keeps
//! many large intermediates alive for backprop: attention softmax (only the output is kept)
//! and the LM cross-entropy (no `[tokens, vocab]` log-probabilities are kept at all).
//! Other devices use the op-by-op versions in [`super::ops`]; the tests check both agree.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::grad_sink::{Buffer, GradSink, SinkFloat};

pub(super) fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused op: input not contiguous"),
    }
}

/// Softmax over the last dimension; backward `y * (g - sum(g * y))` from the saved output.
pub struct SoftmaxLastDim;

fn softmax_rows<T: num::Float>(x: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| {
        let max = r.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for (o, &v) in o.iter_mut().zip(r) {
            *o = (v - max).exp();
            sum = sum + *o;
        }
        let inv = T::one() / sum;
        o.iter_mut().for_each(|v| *v = *v * inv);
    });
    out
}

pub(super) mod num {
    /// The float operations the kernels need.
    pub trait Float:
        Copy
        + Send
        + Sync
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
        + PartialOrd
    {
        fn zero() -> Self;
        fn one() -> Self;
        fn neg_infinity() -> Self;
        fn max(self, o: Self) -> Self;
        fn exp(self) -> Self;
        fn ln(self) -> Self;
        fn sqrt(self) -> Self;
        fn from_usize(n: usize) -> Self;
        fn from_f64(x: f64) -> Self;
        /// `exp` of every element, in place (vectorised for f32).
        fn exp_in_place(xs: &mut [Self]);
    }
    macro_rules! float {
        ($t:ty, $exp_in_place:expr) => {
            impl Float for $t {
                fn exp_in_place(xs: &mut [Self]) {
                    $exp_in_place(xs)
                }
                fn zero() -> Self {
                    0.0
                }
                fn one() -> Self {
                    1.0
                }
                fn neg_infinity() -> Self {
                    <$t>::NEG_INFINITY
                }
                fn max(self, o: Self) -> Self {
                    <$t>::max(self, o)
                }
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn ln(self) -> Self {
                    <$t>::ln(self)
                }
                fn sqrt(self) -> Self {
                    <$t>::sqrt(self)
                }
                fn from_usize(n: usize) -> Self {
                    n as $t
                }
                fn from_f64(x: f64) -> Self {
                    x as $t
                }
            }
        };
    }
    float!(f32, super::super::fast_exp::exp_in_place_f32);
    float!(f64, |xs: &mut [f64]| xs.iter_mut().for_each(|x| *x = x.exp()));
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ranger-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = *l.shape().dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(softmax_rows(contiguous(v, l)?, n)),
            CpuStorage::F64(v) => CpuStorage::F64(softmax_rows(contiguous(v, l)?, n)),
            _ => candle_core::bail!("ranger-softmax-last-dim: f32/f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

/// `softmax(scores + mask)` over the last dimension, with `scores: [b, h, s, t]` and the
/// additive `mask: [b, 1, s, t]` broadcast over heads: the masked scores are never stored.
pub struct MaskedSoftmax;

fn masked_softmax_rows<T: num::Float>(x: &[T], mask: &[T], heads: usize, s: usize, t: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(r, (o, row))| {
        let (b, i) = (r / (heads * s), r % s);
        let m = &mask[(b * s + i) * t..(b * s + i + 1) * t];
        let max = row.iter().zip(m).fold(T::neg_infinity(), |acc, (&v, &mv)| acc.max(v + mv));
        let mut sum = T::zero();
        for ((o, &v), &mv) in o.iter_mut().zip(row).zip(m) {
            *o = (v + mv - max).exp();
            sum = sum + *o;
        }
        let inv = T::one() / sum;
        o.iter_mut().for_each(|v| *v = *v * inv);
    });
    out
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "ranger-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, s, t) = l1.shape().dims4()?;
        if l2.shape().dims() != [b, 1, s, t] {
            candle_core::bail!("ranger-masked-softmax: mask shape {:?} for scores {:?}", l2.shape(), l1.shape());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(m)) => {
                CpuStorage::F32(masked_softmax_rows(contiguous(x, l1)?, contiguous(m, l2)?, h, s, t))
            }
            (CpuStorage::F64(x), CpuStorage::F64(m)) => {
                CpuStorage::F64(masked_softmax_rows(contiguous(x, l1)?, contiguous(m, l2)?, h, s, t))
            }
            _ => candle_core::bail!("ranger-masked-softmax: f32/f64 scores and mask of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok((Some(res.mul(&grad_res.broadcast_sub(&dot)?)?), None))
    }
}

/// RMSNorm `x / sqrt(mean(x²) + eps) * w` over the last dimension (f32/f64). Backprop needs only
/// its input (kept anyway), not the op-by-op version's intermediates.
pub struct RmsNorm {
    /// Epsilon.
    pub eps: f64,
}

fn rms_rows<T: num::Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| {
        let ms = r.iter().fold(T::zero(), |s, &v| s + v * v) / T::from_usize(n);
        let inv = T::one() / (ms + eps).sqrt();
        for ((o, &v), &wv) in o.iter_mut().zip(r).zip(w) {
            *o = v * inv * wv;
        }
    });
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ranger-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(rms_rows(contiguous(x, l1)?, contiguous(w, l2)?, self.eps as f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(rms_rows(contiguous(x, l1)?, contiguous(w, l2)?, self.eps))
            }
            _ => candle_core::bail!("ranger-rms-norm: f32/f64 input and weight of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, stacked as [dx (all of x) | dw]; the parts are views.
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        Ok((
            Some(both.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(both.narrow(0, n, w.elem_count())?.reshape(w.shape())?),
        ))
    }
}

/// The gradients of [`RmsNorm`]: with `r = 1 / sqrt(mean(x²) + eps)` and `n = x r` per row,
/// `dx = r (g w - n mean(g w n))` and `dw = sum over rows of g n`, flattened as `[dx | dw]`.
struct RmsNormGrad {
    eps: f64,
}

fn rms_grad_rows<T: num::Float>(x: &[T], w: &[T], g: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    let mut out = vec![T::zero(); x.len() + h];
    let (dx, dw) = out.split_at_mut(x.len());
    // Rows in chunks: each chunk writes its rows of dx and returns its share of dw.
    const ROWS: usize = 64;
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut(ROWS * h)
        .zip(x.par_chunks(ROWS * h).zip(g.par_chunks(ROWS * h)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::zero(); h];
            for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                let ms = x.iter().fold(T::zero(), |s, &v| s + v * v) / T::from_usize(h);
                let r = T::one() / (ms + eps).sqrt();
                let mut dot = T::zero();
                for j in 0..h {
                    let n = x[j] * r;
                    dot = dot + g[j] * w[j] * n;
                    dw[j] = dw[j] + g[j] * n;
                }
                let mean = dot / T::from_usize(h);
                for j in 0..h {
                    dx[j] = r * (g[j] * w[j] - x[j] * r * mean);
                }
            }
            dw
        })
        .collect();
    for p in partial {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a = *a + b);
    }
    out
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "ranger-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => CpuStorage::F32(rms_grad_rows(
                contiguous(x, l1)?,
                contiguous(w, l2)?,
                contiguous(g, l3)?,
                self.eps as f32,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => {
                CpuStorage::F64(rms_grad_rows(contiguous(x, l1)?, contiguous(w, l2)?, contiguous(g, l3)?, self.eps))
            }
            _ => candle_core::bail!("ranger-rms-norm-grad: f32/f64 of one dtype"),
        };
        Ok((out, Shape::from(l1.shape().elem_count() + l2.shape().elem_count())))
    }
}

/// Rotary embedding `x * cos + rotate_half(x) * sin` (f32/f64), keeping only its output for
/// backprop: `x: [b, h, s, d]` with `cos`, `sin: [b, 1, s, d]`, or with `rows` token rows
/// `x: [n, h * d]` (the projections' layout, no transpose needed) with `cos`, `sin: [n, d]`.
pub struct Rotary {
    /// Whether `x` is token rows `[n, heads * head_dim]` with `cos`/`sin: [n, head_dim]`, rather
    /// than `[b, heads, s, head_dim]` with `cos`/`sin: [b, 1, s, head_dim]`.
    pub rows: bool,
}

/// The gradient of [`Rotary`] (the transposed rotation), one pass over the output gradient.
struct RotaryGrad {
    rows: bool,
}

impl Rotary {
    #[allow(clippy::too_many_arguments)]
    fn run(
        rows: bool,
        transpose: bool,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, s, d, cs) = if rows {
            let (n, cols) = l1.shape().dims2()?;
            let d = l2.dims().last().copied().unwrap_or(0);
            if d == 0 || cols % d != 0 {
                candle_core::bail!("ranger-rotary: cos/sin shape {:?} for x {:?}", l2.shape(), l1.shape());
            }
            (cols / d, n, d, vec![n, d])
        } else {
            let (b, h, s, d) = l1.shape().dims4()?;
            (h, s, d, vec![b, 1, s, d])
        };
        if l2.shape().dims() != cs || l3.shape().dims() != cs {
            candle_core::bail!("ranger-rotary: cos/sin shape {:?} for x {:?}", l2.shape(), l1.shape());
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(sn)) => CpuStorage::F32(rotary_rows(
                contiguous(x, l1)?,
                contiguous(c, l2)?,
                contiguous(sn, l3)?,
                h,
                s,
                d,
                rows,
                transpose,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(sn)) => CpuStorage::F64(rotary_rows(
                contiguous(x, l1)?,
                contiguous(c, l2)?,
                contiguous(sn, l3)?,
                h,
                s,
                d,
                rows,
                transpose,
            )),
            _ => candle_core::bail!("ranger-rotary: f32/f64 tensors of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp3 for RotaryGrad {
    fn name(&self) -> &'static str {
        "ranger-rotary-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Rotary::run(self.rows, true, s1, l1, s2, l2, s3, l3)
    }
}

/// `x * cos + rotate_half(x) * sin` per head row or, with `transpose` (the backward pass),
/// `x * cos + rotate_half^T(x * sin)`, where `rotate_half^T(u) = [u2, -u1]`.
#[allow(clippy::too_many_arguments)]
fn rotary_rows<T: num::Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    h: usize,
    s: usize,
    d: usize,
    rows: bool,
    transpose: bool,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(r, (o, row))| {
        // Head-row r's position (b * s + i).
        let pos = if rows { r / h } else { r / (h * s) * s + r % s };
        let (c, sn) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
        for j in 0..d {
            let rot = match (j < half, transpose) {
                (true, false) => T::zero() - row[j + half] * sn[j],
                (false, false) => row[j - half] * sn[j],
                (true, true) => row[j + half] * sn[j + half],
                (false, true) => T::zero() - row[j - half] * sn[j - half],
            };
            o[j] = row[j] * c[j] + rot;
        }
    });
    out
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "ranger-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::run(self.rows, false, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(g.contiguous()?.apply_op3_no_bwd(
                &cos.contiguous()?,
                &sin.contiguous()?,
                &RotaryGrad { rows: self.rows },
            )?),
            None,
            None,
        ))
    }
}

/// Per-row negative log-likelihood `logsumexp(x) - x[target]` of `logits: [n, vocab]`
/// (f32/f64) and `targets: [n]` (u32); backward `(softmax(x) - onehot) * grad` in one pass.
pub struct CrossEntropyRows;

fn ce_rows<T: num::Float>(x: &[T], t: &[u32], v: usize) -> Vec<T> {
    x.par_chunks(v)
        .zip(t.par_iter())
        .map(|(r, &t)| {
            let max = r.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
            let sum = r.iter().fold(T::zero(), |s, &x| s + (x - max).exp());
            max + sum.ln() - r[(t as usize).min(v - 1)]
        })
        .collect()
}

fn ce_grad_rows<T: num::Float>(x: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(v).zip(x.par_chunks(v)).zip(t.par_iter().zip(g.par_iter())).for_each(|((o, r), (&t, &g))| {
        let max = r.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
        let mut sum = T::zero();
        for (o, &x) in o.iter_mut().zip(r) {
            *o = (x - max).exp();
            sum = sum + *o;
        }
        let scale = g / sum;
        o.iter_mut().for_each(|v| *v = *v * scale);
        let ti = (t as usize).min(v - 1);
        o[ti] = o[ti] - g;
    });
    out
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "ranger-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = match s2 {
            CpuStorage::U32(t) => contiguous(t, l2)?,
            _ => candle_core::bail!("ranger-cross-entropy: targets must be u32"),
        };
        if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("ranger-cross-entropy: target id {bad} is outside the vocabulary of {v}");
        }
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_rows(contiguous(x, l1)?, t, v)),
            CpuStorage::F64(x) => CpuStorage::F64(ce_rows(contiguous(x, l1)?, t, v)),
            _ => candle_core::bail!("ranger-cross-entropy: f32/f64 logits only"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = logits.apply_op3_no_bwd(targets, &grad_res.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(grad), None))
    }
}

/// The gradient of [`CrossEntropyRows`].
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "ranger-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let t = match s2 {
            CpuStorage::U32(t) => contiguous(t, l2)?,
            _ => candle_core::bail!("ranger-cross-entropy-grad: targets must be u32"),
        };
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(ce_grad_rows(contiguous(x, l1)?, t, contiguous(g, l3)?, v))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(ce_grad_rows(contiguous(x, l1)?, t, contiguous(g, l3)?, v))
            }
            _ => candle_core::bail!("ranger-cross-entropy-grad: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// LayerNorm `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (f32/f64), as
/// BERT-family encoders use it. Like [`RmsNorm`], backprop needs only the input.
pub struct LayerNorm {
    /// Epsilon.
    pub eps: f64,
}

fn layer_norm_rows<T: num::Float>(x: &[T], w: &[T], b: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| {
        let mean = r.iter().fold(T::zero(), |s, &v| s + v) / T::from_usize(n);
        let var = r.iter().fold(T::zero(), |s, &v| s + (v - mean) * (v - mean)) / T::from_usize(n);
        let inv = T::one() / (var + eps).sqrt();
        for (((o, &v), &wv), &bv) in o.iter_mut().zip(r).zip(w).zip(b) {
            *o = (v - mean) * inv * wv + bv;
        }
    });
    out
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ranger-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(layer_norm_rows(
                contiguous(x, l1)?,
                contiguous(w, l2)?,
                contiguous(b, l3)?,
                self.eps as f32,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(layer_norm_rows(contiguous(x, l1)?, contiguous(w, l2)?, contiguous(b, l3)?, self.eps))
            }
            _ => candle_core::bail!("ranger-layer-norm: f32/f64 input, weight and bias of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // n = (x - mean) r, y = n w + b:  dw = sum(g n),  db = sum(g),
        // dx = r (g w - mean(g w) - n mean(g w n)).
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let n = xc.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(w)?;
        let dot = (&gw * &n)?.mean_keepdim(D::Minus1)?;
        let dx = gw.broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?.sub(&n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        let rows = x.elem_count() / w.elem_count();
        let dw = (g * &n)?.reshape((rows, ()))?.sum(0)?.reshape(w.shape())?;
        let db = g.reshape((rows, ()))?.sum(0)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Exact GELU `x Φ(x) = x (1 + erf(x / √2)) / 2` (f32/f64). Candle's own backward builds about
/// ten full-size temporaries; this one computes `g (Φ(x) + x φ(x))` in one pass from the input.
pub struct GeluErf;

fn gelu_rows<T: Copy + Send + Sync>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    x.par_iter().map(|&v| f(v)).collect()
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "ranger-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::cpu::erf::{erf_f32, erf_f64};
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(gelu_rows(contiguous(x, l)?, |v| {
                0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2))
            })),
            CpuStorage::F64(x) => CpuStorage::F64(gelu_rows(contiguous(x, l)?, |v| {
                0.5 * v * (1.0 + erf_f64(v * std::f64::consts::FRAC_1_SQRT_2))
            })),
            _ => candle_core::bail!("ranger-gelu-erf: f32/f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfGrad)?))
    }
}

/// The gradient of [`GeluErf`]: `g (Φ(x) + x φ(x))`.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "ranger-gelu-erf-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::cpu::erf::{erf_f32, erf_f64};
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
                let (x, g) = (contiguous(x, l1)?, contiguous(g, l2)?);
                CpuStorage::F32(
                    x.par_iter()
                        .zip(g.par_iter())
                        .map(|(&v, &gv)| {
                            gv * (0.5 * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2))
                                + v * inv_sqrt_2pi * (-0.5 * v * v).exp())
                        })
                        .collect(),
                )
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
                let (x, g) = (contiguous(x, l1)?, contiguous(g, l2)?);
                CpuStorage::F64(
                    x.par_iter()
                        .zip(g.par_iter())
                        .map(|(&v, &gv)| {
                            gv * (0.5 * (1.0 + erf_f64(v * std::f64::consts::FRAC_1_SQRT_2))
                                + v * inv_sqrt_2pi * (-0.5 * v * v).exp())
                        })
                        .collect(),
                )
            }
            _ => candle_core::bail!("ranger-gelu-erf-grad: f32/f64 of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// SwiGLU `silu(gate) * up` (f32/f64), the Llama MLP's gate. The op-by-op version keeps
/// `silu(gate)` alive for backprop and builds several more temporaries in Candle's silu
/// backward; this one keeps only its inputs (alive anyway as projection outputs) and computes
/// both gradients in one pass.
pub struct SwiGlu;

/// Elements per task in the SwiGLU kernels (the exponentials go through the vectorised
/// `exp_in_place` a chunk at a time).
const SWIGLU_CHUNK: usize = 4096;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ranger-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: num::Float + Send + Sync>(g: &[T], u: &[T]) -> Vec<T> {
            let mut out: Vec<T> = g.iter().map(|&x| T::zero() - x).collect();
            out.par_chunks_mut(SWIGLU_CHUNK).zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK))).for_each(
                |(o, (g, u))| {
                    // o = exp(-g), then silu(g) * u = g / (1 + exp(-g)) * u.
                    T::exp_in_place(o);
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g / (T::one() + *o) * u;
                    }
                },
            );
            out
        }
        if l1.shape() != l2.shape() {
            candle_core::bail!("ranger-swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(run(contiguous(g, l1)?, contiguous(u, l2)?)),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(run(contiguous(g, l1)?, contiguous(u, l2)?)),
            _ => candle_core::bail!("ranger-swiglu: f32/f64 of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, stacked as [2, ...]; the halves are views.
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The gradients of [`SwiGlu`], stacked: `g * up * silu'(gate)` then `g * silu(gate)`, with
/// `silu'(x) = σ(x) (1 + x (1 - σ(x)))`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "ranger-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: num::Float + Send + Sync>(gate: &[T], up: &[T], g: &[T]) -> Vec<T> {
            let n = gate.len();
            let mut out = vec![T::zero(); 2 * n];
            let (d_gate, d_up) = out.split_at_mut(n);
            let inputs = gate.par_chunks(SWIGLU_CHUNK).zip(up.par_chunks(SWIGLU_CHUNK)).zip(g.par_chunks(SWIGLU_CHUNK));
            d_gate.par_chunks_mut(SWIGLU_CHUNK).zip(d_up.par_chunks_mut(SWIGLU_CHUNK)).zip(inputs).for_each(
                |((dg, du), ((x, u), g))| {
                    // dg holds exp(-x) first.
                    dg.iter_mut().zip(x).for_each(|(d, &x)| *d = T::zero() - x);
                    T::exp_in_place(dg);
                    for ((((dg, du), &x), &u), &g) in dg.iter_mut().zip(du.iter_mut()).zip(x).zip(u).zip(g) {
                        let sig = T::one() / (T::one() + *dg);
                        *dg = g * u * sig * (T::one() + x * (T::one() - sig));
                        *du = g * x * sig;
                    }
                },
            );
            out
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                CpuStorage::F32(run(contiguous(a, l1)?, contiguous(b, l2)?, contiguous(c, l3)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                CpuStorage::F64(run(contiguous(a, l1)?, contiguous(b, l2)?, contiguous(c, l3)?))
            }
            _ => candle_core::bail!("ranger-swiglu-grad: f32/f64 of one dtype"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

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
        Self { grads, weight_grad, chunk_rows: None, sink, saved: std::sync::Mutex::new(None) }
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

/// `dst[m, n] = beta * lhs[m, k] rhs[k, n]`, plus the old `dst` when `accumulate`, with explicit
/// row and column strides (in elements); over rayon's threads when `parallel`.
///
/// # Safety
/// The pointers must address matrices of the given shapes and strides.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided<T: 'static + num::Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
    beta: T,
    parallel: bool,
) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// A new `[m, n]` matrix `beta * lhs rhs` (operands as in [`gemm_strided`]), written by the
/// product alone: no zero-fill first.
///
/// # Safety
/// The pointers must address matrices of the given shapes and strides.
pub(super) unsafe fn gemm_new<T: 'static + num::Float>(
    (m, n, k): (usize, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: T,
    parallel: bool,
) -> Vec<T> {
    if k == 0 {
        return vec![T::zero(); m * n];
    }
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: dst has room for [m, n]; without `accumulate` gemm writes every element of dst
    // and reads none, so all m * n are set afterwards.
    unsafe {
        gemm_strided((m, n, k), dst.as_mut_ptr(), n, false, lhs, rhs, beta, parallel);
        dst.set_len(m * n);
    }
    dst
}

/// `a b` for 2-D CPU f32/f64 tensors of one dtype, as a new tensor outside the graph (for
/// backward passes), computed without zero-filling the result first.
fn matmul_detached(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 {
        candle_core::bail!("matmul: {:?} x {:?}", a.dims(), b.dims());
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let dev = candle_core::Device::Cpu;
    match (&*sa, &*sb) {
        // SAFETY: a is [m, k] and b is [k, n], both contiguous.
        (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(y))) => {
            let (x, y) = (contiguous(x, la)?, contiguous(y, lb)?);
            Tensor::from_vec(
                unsafe { gemm_new((m, n, k), (x.as_ptr(), k, 1), (y.as_ptr(), n, 1), 1f32, true) },
                (m, n),
                &dev,
            )
        }
        (Storage::Cpu(CpuStorage::F64(x)), Storage::Cpu(CpuStorage::F64(y))) => {
            let (x, y) = (contiguous(x, la)?, contiguous(y, lb)?);
            Tensor::from_vec(
                unsafe { gemm_new((m, n, k), (x.as_ptr(), k, 1), (y.as_ptr(), n, 1), 1f64, true) },
                (m, n),
                &dev,
            )
        }
        _ => candle_core::bail!("matmul: CPU f32/f64 operands of one dtype"),
    }
}

/// The loss sum and, with `grads`, the hidden rows' gradient `[n, h]` and (with `weight_grad`)
/// the weight's `[vocab, h]`.
#[allow(clippy::too_many_arguments)]
fn linear_ce<T: 'static + num::Float>(
    x: &[T],
    w: &[T],
    t: &[u32],
    h: usize,
    v: usize,
    rows: usize,
    grads: bool,
    weight_grad: bool,
) -> (T, Vec<T>, Vec<T>) {
    let n = t.len();
    let rows = rows.clamp(1, n.max(1));
    let mut logits = vec![T::zero(); rows * v];
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
                r.iter_mut().for_each(|x| *x = *x - max);
                T::exp_in_place(r);
                let sum = r.iter().fold(T::zero(), |s, &x| s + x);
                if grads {
                    let inv = T::one() / sum;
                    r.iter_mut().for_each(|x| *x = *x * inv);
                    r[t as usize] = r[t as usize] - T::one();
                }
                sum.ln() - target
            })
            .collect();
        total = nll.into_iter().fold(total, |a, b| a + b);
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

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "ranger-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = l1.shape().dims2()?;
        let (v, h2) = l2.shape().dims2()?;
        if h != h2 || l3.shape().dims1()? != n {
            candle_core::bail!(
                "ranger-linear-cross-entropy: hidden {:?}, weight {:?}, targets {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let t = match s3 {
            CpuStorage::U32(t) => contiguous(t, l3)?,
            _ => candle_core::bail!("ranger-linear-cross-entropy: targets must be u32"),
        };
        if let Some(bad) = t.iter().find(|&&t| t != IGNORE_TARGET && t as usize >= v) {
            candle_core::bail!("ranger-linear-cross-entropy: target id {bad} is outside the vocabulary of {v}");
        }
        let dev = candle_core::Device::Cpu;
        let rows = self.chunk_rows.unwrap_or_else(|| chunk_rows(v));
        let (out, saved) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (loss, gx, gw) =
                    linear_ce(contiguous(x, l1)?, contiguous(w, l2)?, t, h, v, rows, self.grads, self.weight_grad);
                let saved = self.grads.then(|| -> Result<_> {
                    Ok((Tensor::from_vec(gx, (n, h), &dev)?, self.weight_grad.then_some(Buffer::F32(gw))))
                });
                (CpuStorage::F32(vec![loss]), saved.transpose()?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (loss, gx, gw) =
                    linear_ce(contiguous(x, l1)?, contiguous(w, l2)?, t, h, v, rows, self.grads, self.weight_grad);
                let saved = self.grads.then(|| -> Result<_> {
                    Ok((Tensor::from_vec(gx, (n, h), &dev)?, self.weight_grad.then_some(Buffer::F64(gw))))
                });
                (CpuStorage::F64(vec![loss]), saved.transpose()?)
            }
            _ => candle_core::bail!("ranger-linear-cross-entropy: f32/f64 of one dtype"),
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _t: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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

/// `x W^T` on the CPU (f32/f64, `x: [n, in]`, `W: [out, in]`): the forward pass of [`Linear`]
/// and [`FrozenLinear`].
fn linear_fwd(op: &str, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    fn run<T: 'static + num::Float>(x: &[T], w: &[T], n: usize, out: usize, inp: usize) -> Vec<T> {
        // SAFETY: y is [n, out]; x is [n, in]; w is [out, in], read transposed.
        unsafe { gemm_new((n, out, inp), (x.as_ptr(), inp, 1), (w.as_ptr(), 1, inp), T::one(), true) }
    }
    let (n, inp) = l1.shape().dims2()?;
    let (out, inp2) = l2.shape().dims2()?;
    if inp != inp2 {
        candle_core::bail!("{op}: input {:?} for weight {:?}", l1.dims(), l2.dims());
    }
    let y = match (s1, s2) {
        (CpuStorage::F32(x), CpuStorage::F32(w)) => {
            CpuStorage::F32(run(contiguous(x, l1)?, contiguous(w, l2)?, n, out, inp))
        }
        (CpuStorage::F64(x), CpuStorage::F64(w)) => {
            CpuStorage::F64(run(contiguous(x, l1)?, contiguous(w, l2)?, n, out, inp))
        }
        _ => candle_core::bail!("{op}: f32/f64 of one dtype"),
    };
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

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "ranger-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.weight.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cpu(w) => linear_fwd(self.name(), s, l, w, wl),
            _ => candle_core::bail!("ranger-frozen-linear: the weight is not on the CPU"),
        }
    }

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

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "ranger-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        linear_fwd(self.name(), s1, l1, s2, l2)
    }

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
fn weight_grad_into(sink: &GradSink, w: &Tensor, g: &Tensor, x: &Tensor) -> Result<()> {
    fn run<T: SinkFloat>(
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
    match (&*gs, &*xs) {
        (Storage::Cpu(CpuStorage::F32(g)), Storage::Cpu(CpuStorage::F32(x))) => {
            run(sink, w, contiguous(g, gl)?, contiguous(x, xl)?, (n, out, inp))
        }
        (Storage::Cpu(CpuStorage::F64(g)), Storage::Cpu(CpuStorage::F64(x))) => {
            run(sink, w, contiguous(g, gl)?, contiguous(x, xl)?, (n, out, inp))
        }
        _ => candle_core::bail!("ranger-linear: CPU f32/f64 gradient and input of one dtype"),
    }
}

/// Embedding lookup `table[ids]` (`table: [vocab, h]`, `ids: [n]` u32) whose backward adds the
/// gathered rows' gradients straight into a [`GradSink`]'s buffer for the table: Candle's
/// `index_select` backward fills a table-sized buffer with zeros and then copies it once more
/// to add the rows in.
pub struct Embedding {
    /// Where the table's gradient goes.
    pub sink: GradSink,
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "ranger-embedding"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn gather<T: Copy>(table: &[T], ids: &[u32], h: usize) -> Vec<T> {
            ids.iter().flat_map(|&i| &table[i as usize * h..(i as usize + 1) * h]).copied().collect()
        }
        let (vocab, h) = l1.shape().dims2()?;
        let ids = match s2 {
            CpuStorage::U32(ids) => contiguous(ids, l2)?,
            _ => candle_core::bail!("ranger-embedding: ids must be u32"),
        };
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("ranger-embedding: token id {bad} is outside the vocabulary of {vocab}");
        }
        let out = match s1 {
            CpuStorage::F32(t) => CpuStorage::F32(gather(contiguous(t, l1)?, ids, h)),
            CpuStorage::F64(t) => CpuStorage::F64(gather(contiguous(t, l1)?, ids, h)),
            _ => candle_core::bail!("ranger-embedding: f32/f64 table"),
        };
        Ok((out, Shape::from((ids.len(), h))))
    }

    fn bwd(&self, table: &Tensor, ids: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn scatter<T: SinkFloat>(sink: &GradSink, table: &Tensor, ids: &[u32], g: &[T], h: usize) -> Result<()> {
            sink.write::<T>(table, |dt| {
                for (&i, row) in ids.iter().zip(g.chunks(h)) {
                    dt[i as usize * h..(i as usize + 1) * h].iter_mut().zip(row).for_each(|(d, &r)| *d = *d + r);
                }
            })
        }
        let h = table.dim(1)?;
        let (ids, g) = (ids.contiguous()?, g.contiguous()?);
        let (is, il) = ids.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        match (&*is, &*gs) {
            (Storage::Cpu(CpuStorage::U32(i)), Storage::Cpu(CpuStorage::F32(g))) => {
                scatter(&self.sink, table, contiguous(i, il)?, contiguous(g, gl)?, h)?
            }
            (Storage::Cpu(CpuStorage::U32(i)), Storage::Cpu(CpuStorage::F64(g))) => {
                scatter(&self.sink, table, contiguous(i, il)?, contiguous(g, gl)?, h)?
            }
            _ => candle_core::bail!("ranger-embedding: CPU u32 ids and f32/f64 gradient"),
        }
        Ok((None, None))
    }
}
