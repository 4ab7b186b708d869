//! Fused causal self-attention for the CPU (f32/f64) with a backward pass:
//! `softmax(scale q k^T + mask) v`, grouped-query heads read in place (no repeated k/v), and
//! for backprop only the per-row log-sum-exp kept besides the inputs — the op-by-op version
//! keeps the scaled queries, repeated keys and values, the scores, the probabilities and a
//! transposed copy of the output (about 28 MB per SmolLM2 layer at 4 x 256 tokens). Backward
//! recomputes the probabilities from q, k and the log-sum-exp, as FlashAttention does.

use candle_core::{Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{Fused, FusedOp3, Grads3, Input, Out};
use super::dtype::storage_slice;
use super::float::Float;
use super::gemm::gemm_strided;

/// Repeats key/value heads for grouped-query attention (the op-by-op path):
/// `[b, kv, s, d] -> [b, kv * n_rep, s, d]` with each kv head repeated `n_rep` times
/// consecutively (as `repeat_kv` in transformers).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, s, d))?.reshape((b, kv * n_rep, s, d))
}

/// The attention op over token rows: `q: [b * sq, hq * d]`, `k`, `v: [b * sk, hk * d]` (hq a
/// multiple of hk) — the projections' own layout, so no head transposes are copied and no
/// reshape enters the graph — the additive `mask: [b or 1, 1, sq, sk]` and the scale; output
/// `[b * sq, hq * d]`, the layout the output projection takes.
pub struct FusedAttention {
    mask: Tensor,
    scale: f64,
    softcap: Option<f64>,
    head_dim: usize,
    saved_lse: std::sync::Mutex<Option<Tensor>>,
}

impl FusedAttention {
    /// An attention op with heads of `head_dim` under `mask` (CPU, the dtype of q), scores
    /// scaled by `scale`.
    pub fn new(mask: Tensor, scale: f64, head_dim: usize) -> Self {
        Self { mask, scale, softcap: None, head_dim, saved_lse: std::sync::Mutex::new(None) }
    }

    /// Gemma 2's attention-logit soft-capping: the scaled scores `s` become
    /// `cap * tanh(s / cap)` before the mask.
    pub fn with_softcap(mut self, cap: Option<f64>) -> Self {
        self.softcap = cap;
        self
    }
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hk: usize,
    sq: usize,
    sk: usize,
    d: usize,
    mask_batch: bool,
    /// Soft-capping of the scaled scores, if any.
    softcap: Option<f64>,
}

impl Dims {
    fn of(q: &Layout, k: &Layout, v: &Layout, mask: &[usize], d: usize) -> Result<Self> {
        let (q_rows, q_cols) = q.shape().dims2()?;
        let (k_rows, k_cols) = k.shape().dims2()?;
        let bad = || {
            candle_core::Error::msg(format!(
                "fused attention: q {:?}, k {:?}, v {:?}, mask {mask:?}, head_dim {d}",
                q.dims(),
                k.dims(),
                v.dims()
            ))
        };
        let &[mask_b, 1, sq, sk] = mask else { return Err(bad()) };
        if d == 0
            || sq == 0
            || sk == 0
            || q_rows % sq != 0
            || q_cols % d != 0
            || k_cols % d != 0
            || v.dims() != k.dims()
        {
            return Err(bad());
        }
        let (b, hq, hk) = (q_rows / sq, q_cols / d, k_cols / d);
        if k_rows != b * sk || hk == 0 || hq % hk != 0 || (mask_b != b && mask_b != 1) {
            return Err(bad());
        }
        Ok(Self { b, hq, hk, sq, sk, d, mask_batch: mask_b == b && b > 1, softcap: None })
    }

    fn mask<'a, T>(&self, mask: &'a [T], bi: usize) -> &'a [T] {
        let n = self.sq * self.sk;
        let at = if self.mask_batch { bi * n } else { 0 };
        &mask[at..at + n]
    }
}

/// Query rows per block. Each block computes scores only over the keys one of its rows can
/// see: under a causal mask that is about half of them, as in FlashAttention's causal tiling.
const QUERY_BLOCK: usize = 32;

/// Mask values at or below this block a key. The skip is exact: such a key's probability is
/// `exp(-1e8 or less)`, which is zero in f32 and f64, whenever its row sees any key at all.
const BLOCKED: f64 = -1e8;

/// For each mask batch and query block, the key columns `[lo, hi)` the block's rows can see;
/// a row that sees no key at all gets every column, as the full softmax would give it.
fn key_ranges<T: Float>(mask: &[T], dm: &Dims) -> Vec<(usize, usize)> {
    let blocked = T::from_f64(BLOCKED);
    let n_masks = if dm.mask_batch { dm.b } else { 1 };
    let mut out = Vec::new();
    for mi in 0..n_masks {
        let m = &mask[mi * dm.sq * dm.sk..][..dm.sq * dm.sk];
        for r0 in (0..dm.sq).step_by(QUERY_BLOCK) {
            let (mut lo, mut hi) = (dm.sk, 0);
            for row in m[r0 * dm.sk..dm.sq.min(r0 + QUERY_BLOCK) * dm.sk].chunks(dm.sk) {
                match (row.iter().position(|&x| x > blocked), row.iter().rposition(|&x| x > blocked)) {
                    (Some(first), Some(last)) => (lo, hi) = (lo.min(first), hi.max(last + 1)),
                    _ => (lo, hi) = (0, dm.sk),
                }
            }
            out.push((lo, hi));
        }
    }
    out
}

/// The probabilities of `rows` queries of one head over the keys `[c0, c0 + kw)`, in place in
/// `p: [rows, kw]`, from the queries `q` (rows `hq * d` apart), the keys `k` (from key c0, rows
/// `hk * d` apart) and the mask rows `mask` (from key c0, rows `sk` apart): fills `lse` (one
/// per query) in the forward pass, reuses the saved one in the backward pass. With
/// soft-capping, `tanh` (when given, `[rows, kw]`) receives the capped scores' tanh for the
/// backward pass.
#[allow(clippy::too_many_arguments)]
fn probabilities<T: Float>(
    p: &mut [T],
    (rows, kw): (usize, usize),
    q: &[T],
    k: &[T],
    mask: &[T],
    dm: &Dims,
    scale: T,
    lse: LseMode<'_, T>,
    tanh: Option<&mut [T]>,
) {
    // SAFETY: p is [rows, kw]; q is [rows, d] with row stride hq * d; k is [kw, d] with row
    // stride hk * d, read transposed.
    unsafe {
        gemm_strided(
            (rows, kw, dm.d),
            p.as_mut_ptr(),
            kw,
            false,
            (q.as_ptr(), dm.hq * dm.d, 1),
            (k.as_ptr(), 1, dm.hk * dm.d),
            scale,
            false,
        )
    };
    if let Some(cap) = dm.softcap {
        // s -> cap tanh(s / cap), keeping the tanh when the backward pass asks for it.
        let (cap, inv) = (T::from_f64(cap), T::from_f64(1.0 / cap));
        match tanh {
            Some(t) => p.iter_mut().zip(t.iter_mut()).for_each(|(x, t)| {
                *t = (*x * inv).tanh();
                *x = cap * *t;
            }),
            None => p.iter_mut().for_each(|x| *x = cap * (*x * inv).tanh()),
        }
    }
    let mask_rows = mask.chunks(dm.sk).map(|m| &m[..kw]);
    match lse {
        LseMode::Compute(out) => {
            for ((row, m), l) in p.chunks_mut(kw).zip(mask_rows).zip(out.iter_mut()) {
                let mut max = T::neg_infinity();
                for (x, &m) in row.iter_mut().zip(m) {
                    *x += m;
                    max = max.max(*x);
                }
                row.iter_mut().for_each(|x| *x -= max);
                T::exp_in_place(row);
                let sum = row.iter().fold(T::zero(), |s, &x| s + x);
                let inv = T::one() / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                *l = max + sum.ln();
            }
        }
        LseMode::Use(saved) => {
            for ((row, m), &l) in p.chunks_mut(kw).zip(mask_rows).zip(saved) {
                for (x, &m) in row.iter_mut().zip(m) {
                    *x = *x + m - l;
                }
                T::exp_in_place(row);
            }
        }
    }
}

enum LseMode<'a, T> {
    Compute(&'a mut [T]),
    Use(&'a [T]),
}

/// Forward: output `[b * sq, hq * d]` and the log-sum-exp `[b, hq, sq]`.
// q: [b * sq, hq * d], k, v: [b * sk, hk * d], mask: [b or 1, 1, sq, sk] -> out: [b * sq, hq * d], lse: [b, hq, sq]
fn forward<T: Float>(q: &[T], k: &[T], v: &[T], mask: &[T], dm: Dims, scale: f64) -> (Vec<T>, Vec<T>) {
    let Dims { b, hq, hk, sq, sk, d, .. } = dm;
    let rep = hq / hk;
    let scale = T::from_f64(scale);
    let ranges = key_ranges(mask, &dm);
    let blocks = sq.div_ceil(QUERY_BLOCK);
    let mut out = vec![T::zero(); b * sq * hq * d];
    let mut lse = vec![T::zero(); b * hq * sq];
    // One task per (batch, query head); each writes its own columns of the output rows, so
    // the output goes through a raw pointer.
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(sq).enumerate().for_each_init(
        || vec![T::zero(); QUERY_BLOCK * sk],
        |p, (bh, lse)| {
            let (bi, h) = (bh / hq, bh % hq);
            let g = h / rep;
            let mask = dm.mask(mask, bi);
            let mi = if dm.mask_batch { bi } else { 0 };
            for (blk, &(c0, c1)) in ranges[mi * blocks..(mi + 1) * blocks].iter().enumerate() {
                let (r0, rows, kw) = (blk * QUERY_BLOCK, QUERY_BLOCK.min(sq - blk * QUERY_BLOCK), c1 - c0);
                let qh = &q[((bi * sq + r0) * hq + h) * d..];
                let kh = &k[((bi * sk + c0) * hk + g) * d..];
                let vh = &v[((bi * sk + c0) * hk + g) * d..];
                let p = &mut p[..rows * kw];
                probabilities(
                    p,
                    (rows, kw),
                    qh,
                    kh,
                    &mask[r0 * sk + c0..],
                    &dm,
                    scale,
                    LseMode::Compute(&mut lse[r0..r0 + rows]),
                    None,
                );
                let dst = out_ptr;
                // SAFETY: rows r0.. of batch bi, columns h * d .. (h + 1) * d: disjoint per
                // task; v is [kw, d] from key c0 with row stride hk * d.
                unsafe {
                    gemm_strided(
                        (rows, d, kw),
                        dst.0.add((bi * sq + r0) * hq * d + h * d),
                        hq * d,
                        false,
                        (p.as_ptr(), kw, 1),
                        (vh.as_ptr(), hk * d, 1),
                        T::one(),
                        false,
                    )
                };
            }
        },
    );
    (out, lse)
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only to write disjoint regions from rayon tasks.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

/// Backward: `[dq | dk | dv]` flattened (each in its input's layout), from the output gradient
/// `go: [b * sq, hq * d]`.
// q, go: [b * sq, hq * d], k, v: [b * sk, hk * d], lse: [b, hq, sq] -> [dq: as q | dk: as k | dv: as v]
#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(q: &[T], k: &[T], v: &[T], mask: &[T], lse: &[T], go: &[T], dm: Dims, scale: f64) -> Vec<T> {
    let Dims { b, hq, hk, sq, sk, d, .. } = dm;
    let rep = hq / hk;
    let scale = T::from_f64(scale);
    let (nq, nk) = (b * sq * hq * d, b * sk * hk * d);
    let mut grads = vec![T::zero(); nq + 2 * nk];
    let ranges = key_ranges(mask, &dm);
    let blocks = sq.div_ceil(QUERY_BLOCK);
    let base = SendPtr(grads.as_mut_ptr());
    // One task per (batch, key/value head): it owns that head's columns of dk and dv and the
    // columns of dq of its query heads, so tasks write disjoint elements.
    (0..b * hk).into_par_iter().for_each_init(
        || (vec![T::zero(); QUERY_BLOCK * sk], vec![T::zero(); QUERY_BLOCK * sk]),
        |(p, dp), bg| {
            let mut t = if dm.softcap.is_some() { vec![T::zero(); QUERY_BLOCK * sk] } else { Vec::new() };
            let (bi, g) = (bg / hk, bg % hk);
            let mask = dm.mask(mask, bi);
            let mi = if dm.mask_batch { bi } else { 0 };
            let grads = base;
            for r in 0..rep {
                let h = g * rep + r;
                for (blk, &(c0, c1)) in ranges[mi * blocks..(mi + 1) * blocks].iter().enumerate() {
                    let (r0, rows, kw) = (blk * QUERY_BLOCK, QUERY_BLOCK.min(sq - blk * QUERY_BLOCK), c1 - c0);
                    let kh = &k[((bi * sk + c0) * hk + g) * d..];
                    let vh = &v[((bi * sk + c0) * hk + g) * d..];
                    let qh = &q[((bi * sq + r0) * hq + h) * d..];
                    let lh = &lse[(bi * hq + h) * sq + r0..][..rows];
                    let goh = &go[(bi * sq + r0) * hq * d + h * d..];
                    let (p, dp) = (&mut p[..rows * kw], &mut dp[..rows * kw]);
                    // With soft-capping, the capped scores' tanh, for the chain rule through the cap.
                    let tanh = if dm.softcap.is_some() { Some(&mut t[..rows * kw]) } else { None };
                    let mask = &mask[r0 * sk + c0..];
                    probabilities(p, (rows, kw), qh, kh, mask, &dm, scale, LseMode::Use(lh), tanh);
                    // SAFETY (all four products): offsets inside the [dq | dk | dv] buffer,
                    // written only by this task (see above); rows of q, dq and the output
                    // gradient are hq * d apart, rows of k, v, dk, dv hk * d apart.
                    unsafe {
                        let dk = grads.0.add(nq + ((bi * sk + c0) * hk + g) * d);
                        let dv = grads.0.add(nq + nk + ((bi * sk + c0) * hk + g) * d);
                        // dv += p^T go
                        add_key_grad(dv, p, goh, (rows, kw), &dm, T::one());
                        // dp = go v^T
                        gemm_strided(
                            (rows, kw, d),
                            dp.as_mut_ptr(),
                            kw,
                            false,
                            (goh.as_ptr(), hq * d, 1),
                            (vh.as_ptr(), 1, hk * d),
                            T::one(),
                            false,
                        );
                        // ds = p * (dp - rowsum(p * dp)), in place in dp.
                        for (pr, dr) in p.chunks(kw).zip(dp.chunks_mut(kw)) {
                            let dot = pr.iter().zip(dr.iter()).fold(T::zero(), |s, (&a, &b)| s + a * b);
                            for (&a, x) in pr.iter().zip(dr.iter_mut()) {
                                *x = a * (*x - dot);
                            }
                        }
                        // Through the cap: d(cap tanh(s / cap)) / ds = 1 - tanh².
                        if dm.softcap.is_some() {
                            for (x, &t) in dp.iter_mut().zip(t.iter()) {
                                *x *= T::one() - t * t;
                            }
                        }
                        // dq = scale ds k
                        let dq = grads.0.add(((bi * sq + r0) * hq + h) * d);
                        gemm_strided(
                            (rows, d, kw),
                            dq,
                            hq * d,
                            false,
                            (dp.as_ptr(), kw, 1),
                            (kh.as_ptr(), hk * d, 1),
                            scale,
                            false,
                        );
                        // dk += scale ds^T q
                        add_key_grad(dk, dp, qh, (rows, kw), &dm, scale);
                    }
                }
            }
        },
    );
    grads
}

/// `dst += beta a^T b` for a block of keys' gradient (dk or dv, `[kw, d]` with rows `hk * d`
/// apart) from `a: [rows, kw]` (contiguous) and `b: [rows, d]` (query-side rows, `hq * d` apart).
///
/// # Safety
/// `dst` must be valid for reads and writes of `[kw, d]` at row stride `hk * d`, `b` for reads
/// of `[rows, d]` at row stride `hq * d`, and no other thread may access those elements of `dst`.
unsafe fn add_key_grad<T: Float>(dst: *mut T, a: &[T], b: &[T], (rows, kw): (usize, usize), dm: &Dims, beta: T) {
    let (d, hq, hk) = (dm.d, dm.hq, dm.hk);
    // SAFETY: forwarded from the caller; a holds rows * kw elements, read transposed.
    unsafe { gemm_strided((kw, d, rows), dst, hk * d, true, (a.as_ptr(), 1, kw), (b.as_ptr(), hq * d, 1), beta, false) }
}

impl FusedOp3 for FusedAttention {
    const NAME: &'static str = "ranger-fused-attention";

    fn cpu<T: Float>(&self, q: Input<'_>, k: Input<'_>, v: Input<'_>) -> Out<T> {
        let dm = Dims {
            softcap: self.softcap,
            ..Dims::of(q.layout(), k.layout(), v.layout(), self.mask.dims(), self.head_dim)?
        };
        let mask = self.mask.contiguous()?;
        let (ms, ml) = mask.storage_and_layout();
        let mask = storage_slice(Self::NAME, &ms, ml)?;
        let (out, lse) = forward(q.floats()?, k.floats()?, v.floats()?, mask, dm, self.scale);
        let lse = Tensor::from_vec(lse, (dm.b, dm.hq, dm.sq), &candle_core::Device::Cpu)?;
        *self.saved_lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, Shape::from((dm.b * dm.sq, dm.hq * dm.d))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let Some(lse) = self.saved_lse.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("fused attention: backward before forward");
        };
        let op = FusedAttentionGrad {
            mask: self.mask.clone(),
            lse,
            scale: self.scale,
            softcap: self.softcap,
            head_dim: self.head_dim,
        };
        let all = q.apply_op3_no_bwd(k, v, &Fused(GradInputs { op, grad: grad.contiguous()? }))?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(all.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// What the gradient kernel needs besides q, k and v.
struct FusedAttentionGrad {
    mask: Tensor,
    lse: Tensor,
    scale: f64,
    softcap: Option<f64>,
    head_dim: usize,
}

/// The gradient of [`FusedAttention`] as an op over (q, k, v), with the output gradient held.
struct GradInputs {
    op: FusedAttentionGrad,
    grad: Tensor,
}

impl FusedOp3 for GradInputs {
    const NAME: &'static str = "ranger-fused-attention-grad";

    fn cpu<T: Float>(&self, q: Input<'_>, k: Input<'_>, v: Input<'_>) -> Out<T> {
        const OP: &str = GradInputs::NAME;
        let dm = Dims {
            softcap: self.op.softcap,
            ..Dims::of(q.layout(), k.layout(), v.layout(), self.op.mask.dims(), self.op.head_dim)?
        };
        let mask = self.op.mask.contiguous()?;
        let (ms, ml) = mask.storage_and_layout();
        let (ls, ll) = self.op.lse.storage_and_layout();
        let (gs, gl) = self.grad.storage_and_layout();
        let (m, l, g) = (storage_slice(OP, &ms, ml)?, storage_slice(OP, &ls, ll)?, storage_slice(OP, &gs, gl)?);
        let grads = backward(q.floats()?, k.floats()?, v.floats()?, m, l, g, dm, self.op.scale);
        Ok((grads, Shape::from(q.shape().elem_count() + 2 * k.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::randn;
    use candle_core::{Device, Var};

    /// The op-by-op attention (heads first): repeated k/v heads, scores, softmax.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64, cap: Option<f64>) -> Tensor {
        let heads_first = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
        let (q, k, v) = (heads_first(q), heads_first(k), heads_first(v));
        let rep = q.dim(1).unwrap() / k.dim(1).unwrap();
        let k = repeat_kv(&k, rep).unwrap();
        let v = repeat_kv(&v, rep).unwrap();
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(cap) = cap {
            scores = ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap();
        }
        let scores = scores.broadcast_add(mask).unwrap();
        let probs = super::super::softmax::softmax_last_dim_ops(&scores).unwrap();
        let (b, h, s, d) = q.dims4().unwrap();
        probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, s, h * d)).unwrap()
    }

    /// Under a causal mask each query block computes only the keys up to its last row.
    #[test]
    fn causal_blocks_skip_the_keys_they_cannot_see() {
        let m: Vec<f32> = (0..70 * 70).map(|i| if i % 70 > i / 70 { -1e9 } else { 0.0 }).collect();
        let dm = Dims { b: 1, hq: 1, hk: 1, sq: 70, sk: 70, d: 4, mask_batch: false, softcap: None };
        assert_eq!(key_ranges(&m, &dm), vec![(0, 32), (0, 64), (0, 70)]);
    }

    /// Values and all three gradients against the op-by-op version, with grouped heads: a
    /// per-batch mask; a broadcast one with more keys than queries (generation with a cache);
    /// over several query blocks, causal with packed examples in one row and a row whose
    /// queries see no key at all in the other; and with plain causal masks.
    #[test]
    fn fused_attention_matches_the_op_by_op_version() {
        let dev = Device::Cpu;
        let causal = |mask_b: usize, sq: usize, sk: usize| -> Vec<f64> {
            (0..mask_b * sq * sk).map(|i| if (i % sk) > (i / sk) % sq + sk - sq { -1e9 } else { 0.0 }).collect()
        };
        // Batch row 0: examples of 30 and 40 tokens packed; row 1: causal.
        let packed: Vec<f64> = (0..2 * 70 * 70)
            .map(|i| {
                let (bi, r, c) = (i / 4900, i % 4900 / 70, i % 70);
                let visible = c <= r && (bi == 1 || (c < 30) == (r < 30));
                if visible {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        // Causal, except that queries 33..36 see nothing: their softmax is then over the raw
        // scores on every key, computed as score - 1e9, where f64 keeps only about 1e-7 of the
        // score, so both versions agree only that far on those rows.
        let unseeing: Vec<f64> =
            (0..40 * 40).map(|i| if i % 40 <= i / 40 && !(33..36).contains(&(i / 40)) { 0.0 } else { -1e9 }).collect();
        let cases = [
            (2, 5, 5, 2, causal(2, 5, 5), 1e-12),
            (2, 3, 7, 1, causal(1, 3, 7), 1e-12),
            (2, 70, 70, 2, packed, 1e-12),
            (1, 40, 75, 1, causal(1, 40, 75), 1e-12),
            (1, 40, 40, 1, unseeing, 1e-6),
        ];
        let mut rng = crate::rng::Rng::new(11);
        // Each case plain, and with Gemma 2's soft-capping at 1.5 (scores of order 2 here, so
        // the cap bends them).
        let cases: Vec<_> = cases.into_iter().flat_map(|c| [(c.clone(), None), (c, Some(1.5))]).collect();
        for ((b, sq, sk, mask_b, m, tol), cap) in cases {
            let q = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (b, sq, 6, 4))).unwrap();
            let k = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (b, sk, 2, 4))).unwrap();
            let v = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (b, sk, 2, 4))).unwrap();
            let mask = Tensor::from_vec(m, (mask_b, 1, sq, sk), &dev).unwrap();
            let w = randn(&mut rng, 0f64, 1.0, (b, sq, 24));
            let rows = |t: &Var| t.as_tensor().flatten(0, 1).unwrap().flatten(1, 2).unwrap();
            let fused = rows(&q)
                .apply_op3(&rows(&k), &rows(&v), Fused(FusedAttention::new(mask.clone(), 0.5, 4).with_softcap(cap)))
                .unwrap()
                .reshape((b, sq, 24))
                .unwrap();
            let plain = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.5, cap);
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff(&fused, &plain) < tol);
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let d = diff(gf.get(var).unwrap(), gp.get(var).unwrap());
                assert!(d < tol, "{name}: {d} (b {b}, sq {sq}, sk {sk}, cap {cap:?})");
            }
        }
    }
}
