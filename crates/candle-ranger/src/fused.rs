//! The fused CPU update: one multithreaded pass over parameter, gradient, moments (and slow
//! weights on sync steps), in place, with no tensor allocation.
//!
//! Candle lets a custom op write only to its destination tensor, so the optimizer state lives
//! in plain host vectors owned by the optimizer and borrowed by the op for the duration of the
//! call. The parameter is the op's destination, the gradient its source.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::scalars::{StepScalars, Update};

/// Arithmetic the kernel needs from its state type (f32 or f64).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// A parameter element type and the state type it computes in.
pub(crate) trait Elem<S: Real>: Copy + Send + Sync {
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

/// Host-side optimizer state of one variable: f64 for f64 parameters, f32 otherwise.
#[derive(Debug, Clone)]
pub(crate) enum HostBuf {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl HostBuf {
    pub(crate) fn to_tensor(&self, shape: &candle_core::Shape) -> candle_core::Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        match self {
            HostBuf::F32(v) => Tensor::from_slice(v, shape, &cpu),
            HostBuf::F64(v) => Tensor::from_slice(v, shape, &cpu),
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
#[derive(Debug, Clone)]
pub(crate) struct HostState {
    pub m: HostBuf,
    pub v: HostBuf,
    pub slow: Option<HostBuf>,
}

/// The op applied with `param.inplace_op2(&grad, &op)`.
pub(crate) struct FusedStep<'a> {
    pub scalars: StepScalars,
    /// Row length for centralization (`numel / dim0`), or `None` when not centralized.
    pub row_len: Option<usize>,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub state: RefCell<&'a mut HostState>,
}

/// Target elements per parallel task: big enough to amortize scheduling, small enough to
/// keep both cores busy on mid-sized tensors.
const CHUNK: usize = 1 << 15;

impl FusedStep<'_> {
    fn run<P: Elem<S>, S: Real>(&self, p: &mut [P], g: &[P], m: &mut [S], v: &mut [S], slow: Option<&mut [S]>) {
        let n = p.len();
        let row_len = self.row_len;
        let row = row_len.unwrap_or(1).max(1);
        // Chunks hold whole rows so that each row's mean is computed where it is used.
        let chunk = if row_len.is_some() { row * (CHUNK / row).max(1) } else { CHUNK };
        let k = Kernel::<S>::new(self);
        if n <= chunk {
            k.chunk(p, g, m, v, slow, row_len);
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
            .for_each(|((((p, g), m), v), s)| k.chunk(p, g, m, v, s.take(), row_len));
    }
}

/// The step scalars converted to the state type once per call.
struct Kernel<S> {
    decay: Option<S>,
    l2: Option<S>,
    one_minus_b1: S,
    b2: S,
    one_minus_b2: S,
    eps: S,
    update: Update,
    step: S,
    alpha: Option<S>,
}

impl<S: Real> Kernel<S> {
    fn new(op: &FusedStep<'_>) -> Self {
        let sc = &op.scalars;
        let step = match sc.update {
            Update::Rectified { step_size } | Update::Momentum { step_size } => step_size,
            Update::None => 0.0,
        };
        Self {
            decay: (sc.decay_factor != 1.0).then(|| S::of(sc.decay_factor)),
            l2: (sc.l2 != 0.0).then(|| S::of(sc.l2)),
            one_minus_b1: S::of(1.0 - op.beta1),
            b2: S::of(op.beta2),
            one_minus_b2: S::of(1.0 - op.beta2),
            eps: S::of(op.eps),
            update: sc.update,
            step: S::of(step),
            alpha: sc.sync_alpha.map(S::of),
        }
    }

    fn chunk<P: Elem<S>>(&self, p: &mut [P], g: &[P], m: &mut [S], v: &mut [S], mut slow: Option<&mut [S]>, row_len: Option<usize>) {
        match row_len {
            None => self.span(p, g, m, v, slow, S::of(0.0)),
            Some(row) => {
                let mut start = 0;
                while start < p.len() {
                    let end = start + row;
                    // Mean accumulated in f64 whatever the element type.
                    let mean = g[start..end].iter().map(|x| x.load().f64()).sum::<f64>() / row as f64;
                    let s = slow.as_deref_mut().map(|s| &mut s[start..end]);
                    self.span(&mut p[start..end], &g[start..end], &mut m[start..end], &mut v[start..end], s, S::of(mean));
                    start = end;
                }
            }
        }
    }

    #[inline(always)]
    fn span<P: Elem<S>>(&self, p: &mut [P], g: &[P], m: &mut [S], v: &mut [S], slow: Option<&mut [S]>, mean: S) {
        let rectified = matches!(self.update, Update::Rectified { .. });
        let moves = !matches!(self.update, Update::None);
        let mut slow = slow;
        for i in 0..p.len() {
            let mut pi = p[i].load();
            let mut gi = g[i].load() - mean;
            if let Some(wd) = self.l2 {
                gi = gi + wd * pi;
            }
            if let Some(d) = self.decay {
                pi = pi * d;
            }
            // Same formulas and order as torch: m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(g, g, 1 - b2).
            let mi = m[i] + self.one_minus_b1 * (gi - m[i]);
            let vi = v[i] * self.b2 + self.one_minus_b2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            if moves {
                if rectified {
                    pi = pi - self.step * (mi / (vi.sqrt() + self.eps));
                } else {
                    pi = pi - self.step * mi;
                }
            }
            if let (Some(a), Some(s)) = (self.alpha, slow.as_deref_mut()) {
                let si = s[i] + a * (pi - s[i]);
                s[i] = si;
                pi = si;
            }
            p[i] = P::store(pi);
        }
    }
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
        macro_rules! go {
            ($p:expr, $g:expr, $buf:ident) => {{
                let p = slice_mut($p, l1)?;
                let g = slice($g, l2)?;
                match (&mut st.m, &mut st.v, st.slow.as_mut()) {
                    (HostBuf::$buf(m), HostBuf::$buf(v), slow) => {
                        let slow = match slow {
                            Some(HostBuf::$buf(s)) => Some(s.as_mut_slice()),
                            None => None,
                            Some(_) => candle_core::bail!("fused ranger step: slow weights have the wrong dtype"),
                        };
                        if m.len() != p.len() || g.len() != p.len() {
                            candle_core::bail!("fused ranger step: state/gradient size does not match the parameter");
                        }
                        self.run(p, g, m, v, slow)
                    }
                    _ => candle_core::bail!("fused ranger step: moments have the wrong dtype"),
                }
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => go!(p, g, F32),
            (CpuStorage::F64(p), CpuStorage::F64(g)) => go!(p, g, F64),
            (CpuStorage::BF16(p), CpuStorage::BF16(g)) => go!(p, g, F32),
            (CpuStorage::F16(p), CpuStorage::F16(g)) => go!(p, g, F32),
            (p, g) => candle_core::bail!(
                "fused ranger step: unsupported parameter/gradient dtypes {:?}/{:?}",
                p.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }
}

/// Whether every element of a CPU tensor is finite, read in place (no copy, no allocation
/// for contiguous tensors).
pub(crate) fn cpu_all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let cpu = match &*storage {
        candle_core::Storage::Cpu(c) => c,
        _ => candle_core::bail!("cpu_all_finite on a non-cpu tensor"),
    };
    fn all<T: Sync + Copy>(xs: &[T], f: fn(T) -> bool) -> bool {
        if xs.len() < CHUNK {
            xs.iter().all(|&x| f(x))
        } else {
            xs.par_chunks(CHUNK).all(|c| c.iter().all(|&x| f(x)))
        }
    }
    Ok(match cpu {
        CpuStorage::F32(d) => all(slice(d, layout)?, f32::is_finite),
        CpuStorage::F64(d) => all(slice(d, layout)?, f64::is_finite),
        CpuStorage::BF16(d) => all(slice(d, layout)?, |x: bf16| x.is_finite()),
        CpuStorage::F16(d) => all(slice(d, layout)?, |x: f16| x.is_finite()),
        _ => true,
    })
}
