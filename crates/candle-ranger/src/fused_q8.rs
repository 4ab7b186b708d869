//! The fused CPU update over 8-bit state ([`crate::StatePrecision::Int8`]): each parallel
//! chunk decodes its blocks of m, v (and the Lookahead delta) into f32 scratch, runs the same
//! per-element kernel as the f32 state, and encodes them again, in one pass over memory.
//!
//! The slow weights are not stored themselves: a slow weight equals its fast weight right after
//! each sync, so the state keeps the delta `u = fast - slow` (zero after a sync, the sum of
//! the steps since), which is small and loses nothing of the weight when rounded to 8 bits.
//! At a sync, `slow = fast - u`.

use rayon::prelude::*;

use crate::fused::{adopt_outside_changes, round_into, Elem, FusedStep, HostBuf, HostState, Kernel, StateElem, CHUNK};
use crate::quant8::{decoded, encode_blocks, Code, Q8Buf, BLOCK};

/// Separate the stochastic rounding streams of the three buffers (far apart, so that no two
/// elements' indices meet).
const SEED_M: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_V: u64 = 0xc2b2_ae3d_27d4_eb4f;
const SEED_U: u64 = 0x1656_67b1_9e37_79f9;

/// The 8-bit state of one variable, borrowed for a step.
pub(crate) struct Q8Moments<'a> {
    pub(crate) m: &'a mut Q8Buf,
    pub(crate) v: &'a mut Q8Buf,
    /// `fast - slow`, when Lookahead is on.
    pub(crate) delta: Option<&'a mut Q8Buf>,
}

/// `a * b / gcd(a, b)`.
fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

impl FusedStep<'_> {
    /// The update of `p` from `g` over 8-bit state (see the module documentation).
    pub(crate) fn run_q8<P: Elem<f32>, G: Elem<f32>>(&self, p: &mut [P], g: &[G], st: Q8Moments<'_>) {
        let Q8Moments { m, v, delta } = st;
        let row_len = self.row_len;
        // Chunks hold whole rows (each row's mean is taken where it is used) and whole blocks.
        let unit = lcm(row_len.unwrap_or(1).max(1), BLOCK);
        let chunk = unit * (CHUNK / unit).max(1);
        let k = Kernel::<f32>::new(self);
        let sync = self.scalars.sync_alpha.is_some();
        let seed = self.seed;
        let n = p.len();
        let blocks = chunk / BLOCK;
        let mut deltas: Vec<Option<(&mut [u8], &mut [f32])>> = match delta {
            Some(d) => d.bytes.chunks_mut(chunk).zip(d.scales.chunks_mut(blocks)).map(Some).collect(),
            None => (0..n.div_ceil(chunk)).map(|_| None).collect(),
        };
        p.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .zip(m.bytes.par_chunks_mut(chunk).zip(m.scales.par_chunks_mut(blocks)))
            .zip(v.bytes.par_chunks_mut(chunk).zip(v.scales.par_chunks_mut(blocks)))
            .zip(deltas.par_iter_mut())
            .enumerate()
            .for_each(|(ci, ((((p, g), (mb, ms)), (vb, vs)), d))| {
                let chunk = Chunk { first: (ci * chunk) as u64, m: (mb, ms), v: (vb, vs), delta: d.take() };
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (the same code, compiled for it; no FMA, so the
                    // arithmetic rounds as the baseline build's).
                    return unsafe { step_chunk_avx2(&k, p, g, chunk, row_len, sync, seed) };
                }
                step_chunk(&k, p, g, chunk, row_len, sync, seed)
            });
    }
}

/// One parallel chunk's 8-bit state: bytes and scales of m, v and the delta, and the index of
/// its first element.
struct Chunk<'a> {
    first: u64,
    m: (&'a mut [u8], &'a mut [f32]),
    v: (&'a mut [u8], &'a mut [f32]),
    delta: Option<(&'a mut [u8], &'a mut [f32])>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn step_chunk_avx2<P: Elem<f32>, G: Elem<f32>>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    c: Chunk<'_>,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    step_chunk(k, p, g, c, row_len, sync, seed)
}

/// Decode, the f32 kernel, encode (see the module documentation).
#[inline(always)]
fn step_chunk<P: Elem<f32>, G: Elem<f32>>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    c: Chunk<'_>,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    let Chunk { first, m: (mb, ms), v: (vb, vs), delta } = c;
    let (mut mf, mut vf) = (decoded(Code::Signed, mb, ms), decoded(Code::Positive, vb, vs));
    match delta {
        None => k.chunk(p, g, &mut mf, &mut vf, None, row_len),
        Some((db, ds)) => {
            let mut u = decoded(Code::Signed, db, ds);
            let before: Vec<f32> = p.iter().map(|x| x.load()).collect();
            if sync {
                // slow = fast - u; the kernel syncs, and fast == slow after it.
                let mut slow: Vec<f32> = before.iter().zip(&u).map(|(f, u)| f - u).collect();
                k.chunk(p, g, &mut mf, &mut vf, Some(&mut slow), row_len);
                db.fill(0);
                ds.fill(0.0);
            } else {
                k.chunk(p, g, &mut mf, &mut vf, None, row_len);
                for ((u, b), p) in u.iter_mut().zip(&before).zip(p.iter()) {
                    *u += p.load() - b;
                }
                encode_blocks(Code::Signed, &u, db, ds, seed ^ SEED_U, first);
            }
        }
    }
    encode_blocks(Code::Signed, &mf, mb, ms, seed ^ SEED_M, first);
    encode_blocks(Code::Positive, &vf, vb, vs, seed ^ SEED_V, first);
}

impl FusedStep<'_> {
    /// [`FusedStep::apply`] over 8-bit moments (state type f32).
    pub(crate) fn apply_q8<P: Elem<f32>>(&self, p: &mut [P], g: &[P], st: &mut HostState) -> candle_core::Result<()> {
        let HostState { m, v, slow, master } = st;
        let wrong = || candle_core::Error::msg("fused ranger step: 8-bit optimizer state expected");
        let (HostBuf::Q8(m), HostBuf::Q8(v)) = (m, v) else { return Err(wrong()) };
        let delta = match slow.as_mut() {
            Some(HostBuf::Q8(d)) => Some(d),
            Some(_) => return Err(wrong()),
            None => None,
        };
        if m.len() != p.len()
            || v.len() != p.len()
            || g.len() != p.len()
            || delta.as_ref().is_some_and(|d| d.len() != p.len())
        {
            candle_core::bail!("fused ranger step: state/gradient size does not match the parameter");
        }
        let moments = Q8Moments { m, v, delta };
        match master.as_mut() {
            None => self.run_q8(p, g, moments),
            Some(master) => {
                let master = f32::buf(master)
                    .ok_or_else(|| candle_core::Error::msg("fused ranger step: f32 master copy expected"))?;
                if master.len() != p.len() {
                    candle_core::bail!("fused ranger step: master copy size does not match the parameter");
                }
                adopt_outside_changes(p, master);
                self.run_q8::<f32, P>(master, g, moments);
                round_into(p, master);
            }
        }
        Ok(())
    }
}
