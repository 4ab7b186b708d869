//! The fused CPU update: one multithreaded pass over parameter, gradient, moments (and slow
//! weights on sync steps), in place, with no tensor allocation.
//!
//! Candle lets a custom op write only to its destination tensor, so the optimizer state lives
//! in plain host vectors owned by the optimizer and borrowed by the op for the duration of the
//! call. The parameter is the op's destination, the gradient its source.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::lookahead_core::interpolate;
use crate::scalars::{StepScalars, Update};
use crate::state_codec::Q8Buf;

/// The kernel's state type (f32 or f64): Candle's element type (arithmetic, `from_f64`,
/// `to_f64`) with a square root.
pub(crate) trait Real: WithDType {
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// A parameter element type and the state type it computes in.
pub(crate) trait Elem<S: Real>: Copy + Send + Sync + PartialEq {
    fn load(self) -> S;
    fn store(x: S) -> Self;
}

impl Elem<f32> for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(x: f32) -> Self {
        x
    }
}
impl Elem<f64> for f64 {
    fn load(self) -> f64 {
        self
    }
    fn store(x: f64) -> Self {
        x
    }
}
impl Elem<f32> for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Elem<f32> for f16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Host-side optimizer state of one variable: f64 for f64 parameters, f32 otherwise, or packed
/// ([`crate::StatePrecision`]: bf16 bits or 8-bit; f32 and half-precision parameters).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostBuf {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Q8(Q8Buf),
    B16(Vec<u16>),
}

impl HostBuf {
    pub(crate) fn to_tensor(&self, shape: &candle_core::Shape) -> candle_core::Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        match self {
            HostBuf::F32(v) => Tensor::from_slice(v, shape, &cpu),
            HostBuf::F64(v) => Tensor::from_slice(v, shape, &cpu),
            HostBuf::Q8(q) => Tensor::from_vec(q.to_f32(), shape, &cpu),
            HostBuf::B16(b) => Tensor::from_vec(crate::state_codec::decode16(b), shape, &cpu),
        }
    }

    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        match self {
            HostBuf::F32(v) => v.len(),
            HostBuf::F64(v) => v.len(),
            HostBuf::Q8(q) => q.len(),
            HostBuf::B16(b) => b.len(),
        }
    }

    /// Whether it is packed (bf16 or 8-bit).
    pub(crate) fn is_packed(&self) -> bool {
        matches!(self, HostBuf::Q8(_) | HostBuf::B16(_))
    }

    /// A packed buffer of the same kind and length, all zeros (a signed code for 8-bit).
    pub(crate) fn packed_zeros_like(&self) -> Option<HostBuf> {
        match self {
            HostBuf::Q8(q) => Some(HostBuf::Q8(Q8Buf::zeros(crate::state_codec::Code::Signed, q.len()))),
            HostBuf::B16(b) => Some(HostBuf::B16(vec![0; b.len()])),
            _ => None,
        }
    }

    pub(crate) fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let t = t.flatten_all()?;
        match t.dtype() {
            candle_core::DType::F64 => Ok(HostBuf::F64(t.to_vec1()?)),
            _ => Ok(HostBuf::F32(t.to_dtype(candle_core::DType::F32)?.to_vec1()?)),
        }
    }
}

/// The fused state of one variable, borrowed by [`FusedStep`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostState {
    pub m: HostBuf,
    pub v: HostBuf,
    pub slow: Option<HostBuf>,
    /// The f32 master copy of a half-precision variable (see `ParamsRanger::master_weights`):
    /// the update applies to it, and the variable gets its rounding.
    pub master: Option<HostBuf>,
}

/// The state element types, taken out of a [`HostBuf`].
pub(crate) trait StateElem: Real + Elem<Self> {
    fn buf(b: &mut HostBuf) -> Option<&mut [Self]>;
}

impl StateElem for f32 {
    fn buf(b: &mut HostBuf) -> Option<&mut [f32]> {
        match b {
            HostBuf::F32(v) => Some(v),
            HostBuf::F64(_) | HostBuf::Q8(_) | HostBuf::B16(_) => None,
        }
    }
}

impl StateElem for f64 {
    fn buf(b: &mut HostBuf) -> Option<&mut [f64]> {
        match b {
            HostBuf::F64(v) => Some(v),
            HostBuf::F32(_) | HostBuf::Q8(_) | HostBuf::B16(_) => None,
        }
    }
}

/// The op applied with `param.inplace_op2(&grad, &op)`.
pub(crate) struct FusedStep<'a> {
    pub scalars: StepScalars,
    /// Row length for centralization (`numel / dim0`), or `None` when not centralized.
    pub row_len: Option<usize>,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Seed of the stochastic rounding of 8-bit state (per variable and step).
    pub seed: u64,
    pub state: RefCell<&'a mut HostState>,
}

/// Target elements per parallel task: big enough to amortize scheduling, small enough to
/// keep both cores busy on mid-sized tensors.
pub(crate) const CHUNK: usize = 1 << 15;

impl FusedStep<'_> {
    /// The update of `p` (the variable, or its master copy) from `g`, both of `p.len()` elements.
    fn run<P: Elem<S>, G: Elem<S>, S: Real>(
        &self,
        p: &mut [P],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        slow: Option<&mut [S]>,
    ) {
        let n = p.len();
        let row_len = self.row_len;
        let row = row_len.unwrap_or(1).max(1);
        // Chunks hold whole rows so that each row's mean is computed where it is used.
        let chunk = if row_len.is_some() { row * (CHUNK / row).max(1) } else { CHUNK };
        let k = Kernel::<S>::new(self);
        if n <= chunk {
            k.chunk(p, g, m, v, Extra::slow(slow), row_len);
            return;
        }
        let mut slow_chunks: Vec<Option<&mut [S]>> = match slow {
            Some(s) => s.chunks_mut(chunk).map(Some).collect(),
            None => (0..n.div_ceil(chunk)).map(|_| None).collect(),
        };
        p.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .zip(m.par_chunks_mut(chunk))
            .zip(v.par_chunks_mut(chunk))
            .zip(slow_chunks.par_iter_mut())
            .for_each(|((((p, g), m), v), s)| k.chunk(p, g, m, v, Extra::slow(s.take()), row_len));
    }
}

/// What a chunk's step does besides the update of m, v and the weights.
pub(crate) enum Extra<'a, S> {
    /// Nothing.
    None,
    /// The Lookahead slow weights: on a sync step, interpolated towards the fast weights,
    /// which then take their value; untouched otherwise.
    Slow(&'a mut [S]),
    /// The packed state's Lookahead delta `fast - slow`: each weight's change is added to it.
    Delta(&'a mut [S]),
}

impl<'a, S> Extra<'a, S> {
    /// [`Extra::Slow`] when there are slow weights.
    pub(crate) fn slow(s: Option<&'a mut [S]>) -> Self {
        s.map_or(Extra::None, Extra::Slow)
    }

    /// The same for the values `start..end`.
    #[inline(always)]
    fn range(&mut self, start: usize, end: usize) -> Extra<'_, S> {
        match self {
            Extra::None => Extra::None,
            Extra::Slow(s) => Extra::Slow(&mut s[start..end]),
            Extra::Delta(u) => Extra::Delta(&mut u[start..end]),
        }
    }
}

/// How the parameter moves, as a const generic so each variant's loop is branch-free.
const NO_MOVE: u8 = 0;
const MOMENTUM: u8 = 1;
const RECTIFIED: u8 = 2;

/// The step scalars converted to the state type once per call.
///
/// Weight decay is applied unconditionally with neutral values when off (`g + 0*p`,
/// `p * 1`): that is exact, and it keeps the inner loop free of branches so it vectorizes.
pub(crate) struct Kernel<S> {
    decay: S,
    l2: S,
    one_minus_b1: S,
    b2: S,
    one_minus_b2: S,
    eps: S,
    mode: u8,
    step: S,
    alpha: S,
    sync: bool,
}

impl<S: Real> Kernel<S> {
    pub(crate) fn new(op: &FusedStep<'_>) -> Self {
        let sc = &op.scalars;
        let (mode, step) = match sc.update {
            Update::Rectified { step_size } => (RECTIFIED, step_size),
            Update::Momentum { step_size } => (MOMENTUM, step_size),
            Update::None => (NO_MOVE, 0.0),
        };
        Self {
            decay: S::from_f64(sc.decay_factor),
            l2: S::from_f64(sc.l2),
            one_minus_b1: S::from_f64(1.0 - op.beta1),
            b2: S::from_f64(op.beta2),
            one_minus_b2: S::from_f64(1.0 - op.beta2),
            eps: S::from_f64(op.eps),
            mode,
            step: S::from_f64(step),
            alpha: S::from_f64(sc.sync_alpha.unwrap_or(0.0)),
            sync: sc.sync_alpha.is_some(),
        }
    }

    // Inlined into its callers, so a caller compiled for AVX2 (the packed-state step) runs the
    // arithmetic in AVX2 too.
    #[inline(always)]
    pub(crate) fn chunk<P: Elem<S>, G: Elem<S>>(
        &self,
        p: &mut [P],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        mut extra: Extra<'_, S>,
        row_len: Option<usize>,
    ) {
        match row_len {
            None => self.span(p, g, m, v, extra, S::from_f64(0.0)),
            Some(row) => {
                let mut start = 0;
                while start < p.len() {
                    let end = start + row;
                    let mean = row_sum(&g[start..end]) / row as f64;
                    let s = extra.range(start, end);
                    self.span(
                        &mut p[start..end],
                        &g[start..end],
                        &mut m[start..end],
                        &mut v[start..end],
                        s,
                        S::from_f64(mean),
                    );
                    start = end;
                }
            }
        }
    }

    /// The step of elements that all lie in one row (of gradient mean `mean`; 0 when not
    /// centralized): [`Kernel::chunk`] for a caller that walks its rows itself.
    #[inline(always)]
    pub(crate) fn segment<P: Elem<S>, G: Elem<S>>(
        &self,
        p: &mut [P],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        extra: Extra<'_, S>,
        mean: f64,
    ) {
        self.span(p, g, m, v, extra, S::from_f64(mean))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn span<P: Elem<S>, G: Elem<S>>(
        &self,
        p: &mut [P],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        extra: Extra<'_, S>,
        mean: S,
    ) {
        match (self.mode, extra) {
            (RECTIFIED, Extra::Slow(s)) if self.sync => self.lanes_sync::<P, G, RECTIFIED>(p, g, m, v, s, mean),
            (MOMENTUM, Extra::Slow(s)) if self.sync => self.lanes_sync::<P, G, MOMENTUM>(p, g, m, v, s, mean),
            (_, Extra::Slow(s)) if self.sync => self.lanes_sync::<P, G, NO_MOVE>(p, g, m, v, s, mean),
            (RECTIFIED, Extra::Delta(u)) => self.lanes_delta::<P, G, RECTIFIED>(p, g, m, v, u, mean),
            (MOMENTUM, Extra::Delta(u)) => self.lanes_delta::<P, G, MOMENTUM>(p, g, m, v, u, mean),
            (_, Extra::Delta(u)) => self.lanes_delta::<P, G, NO_MOVE>(p, g, m, v, u, mean),
            (RECTIFIED, _) => self.lanes::<P, G, RECTIFIED>(p, g, m, v, mean),
            (MOMENTUM, _) => self.lanes::<P, G, MOMENTUM>(p, g, m, v, mean),
            (_, _) => self.lanes::<P, G, NO_MOVE>(p, g, m, v, mean),
        }
    }

    /// The RAdam update of one element; returns the new parameter value (before any sync).
    #[inline(always)]
    fn element<const MODE: u8>(&self, p: S, g: S, m: &mut S, v: &mut S, mean: S) -> S {
        let g = g - mean;
        let g = g + self.l2 * p;
        let p = p * self.decay;
        // Same formulas and order as torch: m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(g, g, 1 - b2).
        let mi = *m + self.one_minus_b1 * (g - *m);
        let vi = *v * self.b2 + self.one_minus_b2 * g * g;
        *m = mi;
        *v = vi;
        match MODE {
            RECTIFIED => p - self.step * (mi / (vi.sqrt() + self.eps)),
            MOMENTUM => p - self.step * mi,
            _ => p,
        }
    }

    #[inline(always)]
    fn lanes<P: Elem<S>, G: Elem<S>, const MODE: u8>(&self, p: &mut [P], g: &[G], m: &mut [S], v: &mut [S], mean: S) {
        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p = P::store(self.element::<MODE>(p.load(), g.load(), m, v, mean));
        }
    }

    /// [`Kernel::lanes`], adding each weight's change (as stored) to `u`, in the same pass.
    #[inline(always)]
    fn lanes_delta<P: Elem<S>, G: Elem<S>, const MODE: u8>(
        &self,
        p: &mut [P],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        u: &mut [S],
        mean: S,
    ) {
        for ((((p, g), m), v), u) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).zip(u.iter_mut()) {
            let before = p.load();
            *p = P::store(self.element::<MODE>(before, g.load(), m, v, mean));
            // The difference first: u is small, the weight is not.
            *u += p.load() - before;
        }
    }

    #[inline(always)]
    fn lanes_sync<P: Elem<S>, G: Elem<S>, const MODE: u8>(
        &self,
        p: &mut [P],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        s: &mut [S],
        mean: S,
    ) {
        for ((((p, g), m), v), s) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).zip(s.iter_mut()) {
            let fast = self.element::<MODE>(p.load(), g.load(), m, v, mean);
            *s = interpolate(*s, fast, self.alpha);
            *p = P::store(*s);
        }
    }
}

/// Sum of a row in f64 with eight independent accumulators: a single running sum is a chain
/// of dependent adds that runs several times slower than memory.
#[inline]
pub(crate) fn row_sum<S: Real, P: Elem<S>>(xs: &[P]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x.load().to_f64();
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|x| x.load().to_f64()).sum();
    acc.iter().sum::<f64>() + tail
}

fn slice<'a, T>(data: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused ranger step: tensor is not contiguous"),
    }
}

fn slice_mut<'a, T>(data: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("fused ranger step: parameter is not contiguous"),
    }
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "candle-ranger-fused-step"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let mut guard = self.state.borrow_mut();
        let st: &mut HostState = &mut guard;
        if st.m.is_packed() {
            return match (s1, s2) {
                (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                    self.apply_packed::<f32>(slice_mut(p, l1)?, slice(g, l2)?, st)
                }
                (CpuStorage::BF16(p), CpuStorage::BF16(g)) => {
                    self.apply_packed::<bf16>(slice_mut(p, l1)?, slice(g, l2)?, st)
                }
                (CpuStorage::F16(p), CpuStorage::F16(g)) => {
                    self.apply_packed::<f16>(slice_mut(p, l1)?, slice(g, l2)?, st)
                }
                (p, _) => candle_core::bail!("fused ranger step: packed state for a {:?} parameter", p.dtype()),
            };
        }
        match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => self.apply::<f32, f32>(slice_mut(p, l1)?, slice(g, l2)?, st),
            (CpuStorage::F64(p), CpuStorage::F64(g)) => self.apply::<f64, f64>(slice_mut(p, l1)?, slice(g, l2)?, st),
            (CpuStorage::BF16(p), CpuStorage::BF16(g)) => self.apply::<bf16, f32>(slice_mut(p, l1)?, slice(g, l2)?, st),
            (CpuStorage::F16(p), CpuStorage::F16(g)) => self.apply::<f16, f32>(slice_mut(p, l1)?, slice(g, l2)?, st),
            (p, g) => candle_core::bail!(
                "fused ranger step: unsupported parameter/gradient dtypes {:?}/{:?}",
                p.dtype(),
                g.dtype()
            ),
        }
    }
}

impl FusedStep<'_> {
    /// The step on the variable's elements `p`, or on its master copy, which `p` then takes the
    /// rounding of (a second, cheap pass).
    fn apply<P: Elem<S>, S: StateElem>(&self, p: &mut [P], g: &[P], st: &mut HostState) -> candle_core::Result<()> {
        let HostState { m, v, slow, master } = st;
        let wrong = || candle_core::Error::msg("fused ranger step: optimizer state has the wrong dtype");
        let (m, v) = (S::buf(m).ok_or_else(wrong)?, S::buf(v).ok_or_else(wrong)?);
        let slow = match slow.as_mut() {
            Some(s) => Some(S::buf(s).ok_or_else(wrong)?),
            None => None,
        };
        if m.len() != p.len() || v.len() != p.len() || g.len() != p.len() {
            candle_core::bail!("fused ranger step: state/gradient size does not match the parameter");
        }
        match master.as_mut() {
            None => self.run(p, g, m, v, slow),
            Some(master) => {
                let master = S::buf(master).ok_or_else(wrong)?;
                if master.len() != p.len() {
                    candle_core::bail!("fused ranger step: master copy size does not match the parameter");
                }
                adopt_outside_changes(p, master);
                self.run::<S, P, S>(master, g, m, v, slow);
                round_into(p, master);
            }
        }
        Ok(())
    }
}

/// A variable changed from outside (a `Lookahead<O>` sync, a user's `set`) is adopted by its
/// master copy where it is no longer the master copy's rounding.
pub(crate) fn adopt_outside_changes<P: Elem<S>, S: Real>(p: &[P], master: &mut [S]) {
    p.par_chunks(CHUNK).zip(master.par_chunks_mut(CHUNK)).for_each(|(p, m)| {
        for (&p, m) in p.iter().zip(m) {
            if P::store(*m) != p {
                *m = p.load();
            }
        }
    });
}

/// The variable takes the rounding of its master copy.
pub(crate) fn round_into<P: Elem<S>, S: Real>(p: &mut [P], master: &[S]) {
    p.par_chunks_mut(CHUNK).zip(master.par_chunks(CHUNK)).for_each(|(p, m)| {
        for (p, &m) in p.iter_mut().zip(m) {
            *p = P::store(m);
        }
    });
}

/// The sum of squares of a CPU tensor's elements, accumulated in f64 and read in place (no
/// squared copy is allocated).
pub(crate) fn cpu_sum_squares(t: &Tensor) -> candle_core::Result<f64> {
    fn sum<T: Sync + Copy, F: Fn(T) -> f64 + Sync>(xs: &[T], to_f64: F) -> f64 {
        // Eight independent accumulators, so the adds pipeline and vectorize.
        let block = |c: &[T]| {
            let mut acc = [0f64; 8];
            let mut lanes = c.chunks_exact(8);
            for l in &mut lanes {
                for (a, &x) in acc.iter_mut().zip(l) {
                    let x = to_f64(x);
                    *a += x * x;
                }
            }
            let tail = lanes.remainder().iter().fold(0f64, |s, &x| s + to_f64(x) * to_f64(x));
            acc.iter().sum::<f64>() + tail
        };
        // Partial sums in chunk order, added in that order: the same result on every run
        // (a parallel reduction tree would depend on scheduling).
        let parts: Vec<f64> =
            if xs.len() < CHUNK { vec![block(xs)] } else { xs.par_chunks(CHUNK).map(block).collect() };
        parts.iter().sum()
    }
    with_cpu_storage(t, "cpu_sum_squares", |cpu, layout| {
        Ok(match cpu {
            CpuStorage::F32(d) => sum(slice(d, layout)?, |x: f32| x as f64),
            CpuStorage::F64(d) => sum(slice(d, layout)?, |x: f64| x),
            CpuStorage::BF16(d) => sum(slice(d, layout)?, |x: bf16| x.to_f64()),
            CpuStorage::F16(d) => sum(slice(d, layout)?, |x: f16| x.to_f64()),
            _ => candle_core::bail!("cpu_sum_squares of a {:?} tensor", cpu.dtype()),
        })
    })
}

/// Whether every element of a CPU tensor is finite, read in place (no copy, no allocation
/// for contiguous tensors).
pub(crate) fn cpu_all_finite(t: &Tensor) -> candle_core::Result<bool> {
    // Branch-free per block (so it vectorizes), early exit between blocks.
    fn all<T: Sync + Copy, F: Fn(T) -> bool + Sync>(xs: &[T], finite: F) -> bool {
        let block = |c: &[T]| c.iter().fold(true, |ok, &x| ok & finite(x));
        if xs.len() < CHUNK {
            xs.chunks(1024).all(block)
        } else {
            xs.par_chunks(CHUNK).all(|c| c.chunks(1024).all(block))
        }
    }
    with_cpu_storage(t, "cpu_all_finite", |cpu, layout| {
        Ok(match cpu {
            // A value is non-finite exactly when its exponent bits are all ones.
            CpuStorage::F32(d) => all(slice(d, layout)?, |x: f32| x.to_bits() & 0x7f80_0000 != 0x7f80_0000),
            CpuStorage::F64(d) => {
                all(slice(d, layout)?, |x: f64| x.to_bits() & 0x7ff0_0000_0000_0000 != 0x7ff0_0000_0000_0000)
            }
            CpuStorage::BF16(d) => all(slice(d, layout)?, |x: bf16| x.to_bits() & 0x7f80 != 0x7f80),
            CpuStorage::F16(d) => all(slice(d, layout)?, |x: f16| x.to_bits() & 0x7c00 != 0x7c00),
            _ => true,
        })
    })
}

/// Runs `f` on the CPU storage of `t` (made contiguous first) and its layout, read in place;
/// a tensor on another device is an error naming `op`.
fn with_cpu_storage<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(c) => f(c, layout),
        _ => candle_core::bail!("{op} on a non-cpu tensor"),
    }
}
