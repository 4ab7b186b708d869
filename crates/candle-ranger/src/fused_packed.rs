//! The fused CPU update over packed state ([`crate::StatePrecision::Int8`] and
//! [`crate::StatePrecision::Bf16`]): each parallel chunk decodes its part of m, v (and the
//! Lookahead delta) into f32 scratch, runs the same per-element kernel as the f32 state, and
//! encodes them again, in one pass over memory.
//!
//! The slow weights are not stored themselves: a slow weight equals its fast weight right after
//! each sync, so the state keeps the delta `u = fast - slow` (zero after a sync, the sum of
//! the steps since), which is small and loses nothing of the weight when rounded.
//! At a sync, `slow = fast - u`.

use std::ops::Range;

use rayon::prelude::*;

use crate::fused::{
    adopt_outside_changes, round_into, Elem, Extra, FusedStep, HostBuf, HostState, Kernel, StateElem, CHUNK,
};
use crate::state_codec::{
    decode_into, encode16, encode_into, encode_moments16, encode_moments_q8, from_bf16_bits, Code, Q8Buf, BLOCK,
};

/// Separate the stochastic rounding streams of the moments (which share one) and the delta
/// (far apart, so that no two elements' indices meet).
const SEED_M: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_U: u64 = 0x1656_67b1_9e37_79f9;

/// One parallel chunk of a packed buffer.
trait Packed: Send {
    /// The values of elements `r` (from a block boundary) as f32, appended to `out`.
    fn decode_range(&self, r: Range<usize>, out: &mut Vec<f32>);
    /// Stores `values`, rounded stochastically from stream `seed` (`first`: the index of the
    /// chunk's first element in the whole buffer).
    fn encode(&mut self, values: &[f32], seed: u64, first: u64);
    /// Stores the moments `m` into `self` and `v` into `v_buf` in one pass, one hash per element.
    fn encode_moments(&mut self, m: &[f32], v_buf: &mut Self, v: &[f32], seed: u64, first: u64);
    /// Sets every value to 0.
    fn clear(&mut self);
}

/// A chunk of an 8-bit buffer: whole blocks, with their scales.
struct Q8Chunk<'a> {
    code: Code,
    bytes: &'a mut [u8],
    scales: &'a mut [f32],
}

impl Packed for Q8Chunk<'_> {
    #[inline(always)]
    fn decode_range(&self, r: Range<usize>, out: &mut Vec<f32>) {
        decode_into(self.code, &self.bytes[r.clone()], &self.scales[r.start / BLOCK..], out)
    }

    #[inline(always)]
    fn encode(&mut self, values: &[f32], seed: u64, first: u64) {
        encode_into(self.code, values, self.bytes, self.scales, seed, first)
    }

    #[inline(always)]
    fn encode_moments(&mut self, m: &[f32], v_buf: &mut Self, v: &[f32], seed: u64, first: u64) {
        encode_moments_q8(m, self.bytes, self.scales, v, v_buf.bytes, v_buf.scales, seed, first)
    }

    fn clear(&mut self) {
        self.bytes.fill(0);
        self.scales.fill(0.0);
    }
}

/// A chunk of a bf16 buffer (the values' bits).
struct B16Chunk<'a>(&'a mut [u16]);

impl Packed for B16Chunk<'_> {
    #[inline(always)]
    fn decode_range(&self, r: Range<usize>, out: &mut Vec<f32>) {
        out.extend(self.0[r].iter().map(|&b| from_bf16_bits(b)))
    }

    #[inline(always)]
    fn encode(&mut self, values: &[f32], seed: u64, first: u64) {
        encode16(values, self.0, seed, first)
    }

    #[inline(always)]
    fn encode_moments(&mut self, m: &[f32], v_buf: &mut Self, v: &[f32], seed: u64, first: u64) {
        encode_moments16(m, self.0, v, v_buf.0, seed, first)
    }

    fn clear(&mut self) {
        self.0.fill(0);
    }
}

/// `chunk`-sized pieces of an 8-bit buffer (`chunk` a multiple of [`BLOCK`]).
fn q8_chunks(q: &mut Q8Buf, chunk: usize) -> Vec<Q8Chunk<'_>> {
    let code = q.code;
    q.bytes
        .chunks_mut(chunk)
        .zip(q.scales.chunks_mut(chunk / BLOCK))
        .map(|(bytes, scales)| Q8Chunk { code, bytes, scales })
        .collect()
}

/// `chunk`-sized pieces of a bf16 buffer.
fn b16_chunks(b: &mut [u16], chunk: usize) -> Vec<B16Chunk<'_>> {
    b.chunks_mut(chunk).map(B16Chunk).collect()
}

/// `a * b / gcd(a, b)`.
fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// One variable's packed state, split into parallel chunks.
struct Chunks<C> {
    m: Vec<C>,
    v: Vec<C>,
    /// `fast - slow`, when Lookahead is on.
    delta: Option<Vec<C>>,
}

impl FusedStep<'_> {
    /// [`FusedStep::apply`] over packed moments (state type f32).
    pub(crate) fn apply_packed<P: Elem<f32>>(
        &self,
        p: &mut [P],
        g: &[P],
        st: &mut HostState,
    ) -> candle_core::Result<()> {
        let HostState { m, v, slow, master } = st;
        let n = p.len();
        let sizes_match = [Some(&*m), Some(&*v), slow.as_ref()].into_iter().flatten().all(|b| b.len() == n);
        if !sizes_match || g.len() != n {
            candle_core::bail!("fused ranger step: state/gradient size does not match the parameter");
        }
        // Chunks hold whole rows (each row's mean is taken where it is used) and whole blocks.
        let unit = lcm(self.row_len.unwrap_or(1).max(1), BLOCK);
        let chunk = unit * (CHUNK / unit).max(1);
        let wrong = || candle_core::Error::msg("fused ranger step: packed optimizer state of mixed kinds");
        let master = match master.as_mut() {
            None => None,
            Some(buf) => {
                let m = f32::buf(buf)
                    .ok_or_else(|| candle_core::Error::msg("fused ranger step: f32 master copy expected"))?;
                adopt_outside_changes(p, m);
                Some(m)
            }
        };
        match (m, v, slow.as_mut()) {
            (HostBuf::Q8(m), HostBuf::Q8(v), d) => {
                let delta = match d {
                    Some(HostBuf::Q8(d)) => Some(q8_chunks(d, chunk)),
                    Some(_) => return Err(wrong()),
                    None => None,
                };
                let c = Chunks { m: q8_chunks(m, chunk), v: q8_chunks(v, chunk), delta };
                self.run_on(p, g, master, c, chunk);
            }
            (HostBuf::B16(m), HostBuf::B16(v), d) => {
                let delta = match d {
                    Some(HostBuf::B16(d)) => Some(b16_chunks(d, chunk)),
                    Some(_) => return Err(wrong()),
                    None => None,
                };
                let c = Chunks { m: b16_chunks(m, chunk), v: b16_chunks(v, chunk), delta };
                self.run_on(p, g, master, c, chunk);
            }
            _ => return Err(wrong()),
        }
        Ok(())
    }

    /// The update of the variable `p`, or of its master copy which `p` then takes the rounding of.
    fn run_on<P: Elem<f32>, C: Packed>(
        &self,
        p: &mut [P],
        g: &[P],
        master: Option<&mut [f32]>,
        c: Chunks<C>,
        chunk: usize,
    ) {
        match master {
            None => self.run_packed(p, g, c, chunk),
            Some(master) => {
                self.run_packed::<f32, P, C>(master, g, c, chunk);
                round_into(p, master);
            }
        }
    }

    /// The update of `p` from `g` over packed state split in `chunk`-sized pieces.
    fn run_packed<P: Elem<f32>, G: Elem<f32>, C: Packed>(&self, p: &mut [P], g: &[G], c: Chunks<C>, chunk: usize) {
        let row_len = self.row_len;
        let k = Kernel::<f32>::new(self);
        let sync = self.scalars.sync_alpha.is_some();
        let seed = self.seed;
        let Chunks { m, v, delta } = c;
        let deltas: Vec<Option<C>> = match delta {
            Some(d) => d.into_iter().map(Some).collect(),
            None => (0..m.len()).map(|_| None).collect(),
        };
        let isa = Isa::detected();
        p.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .zip(m.into_par_iter())
            .zip(v.into_par_iter())
            .zip(deltas.into_par_iter())
            .enumerate()
            // Scratch is made once per rayon task and reused by its chunks: a fresh 128 KiB
            // buffer per chunk is an mmap and a page-fault storm on glibc.
            .for_each_init(Scratch::default, |scratch, (ci, ((((p, g), m), v), delta))| {
                let part = Part { first: (ci * chunk) as u64, m, v, delta };
                // The same code compiled for wider vectors; no FMA, so the arithmetic rounds as
                // the baseline build's (`every_instruction_set_gives_the_same_step` checks).
                #[cfg(target_arch = "x86_64")]
                match isa {
                    // SAFETY: `Isa::detected` found these AVX-512 extensions on this CPU.
                    Isa::Avx512 => return unsafe { step_part_avx512(&k, p, g, part, scratch, row_len, sync, seed) },
                    // SAFETY: `Isa::detected` found AVX2 on this CPU.
                    Isa::Avx2 => return unsafe { step_part_avx2(&k, p, g, part, scratch, row_len, sync, seed) },
                    Isa::Baseline => {}
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = isa;
                step_part(&k, p, g, part, scratch, row_len, sync, seed)
            });
    }
}

/// The instruction set the chunk step is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Baseline,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

#[cfg(test)]
thread_local! {
    /// Tests: the instruction set to use instead of the best one found.
    static FORCE_ISA: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

impl Isa {
    /// The widest this CPU runs.
    fn detected() -> Isa {
        #[cfg(test)]
        if let Some(isa) = FORCE_ISA.with(|f| f.get()) {
            return isa;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                return Isa::Avx512;
            }
            if has!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }
}

/// f32 working copies of one chunk's state.
#[derive(Default)]
struct Scratch {
    m: Vec<f32>,
    v: Vec<f32>,
    /// The Lookahead delta, then (at a sync) the slow weights.
    u: Vec<f32>,
}

/// One parallel chunk's packed state and the index of its first element.
struct Part<C> {
    first: u64,
    m: C,
    v: C,
    delta: Option<C>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_part_avx512<P: Elem<f32>, G: Elem<f32>, C: Packed>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    part: Part<C>,
    scratch: &mut Scratch,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    step_part(k, p, g, part, scratch, row_len, sync, seed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_part_avx2<P: Elem<f32>, G: Elem<f32>, C: Packed>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    part: Part<C>,
    scratch: &mut Scratch,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    step_part(k, p, g, part, scratch, row_len, sync, seed)
}

/// Decode, the f32 kernel, encode (see the module documentation).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_part<P: Elem<f32>, G: Elem<f32>, C: Packed>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    part: Part<C>,
    scratch: &mut Scratch,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    let Part { first, mut m, mut v, delta } = part;
    let Scratch { m: mf, v: vf, u } = scratch;
    for buf in [&mut *mf, &mut *vf, &mut *u] {
        buf.clear();
    }
    // Decoding is arithmetic; the kernel after it reads the weights and gradients from memory.
    // Fetching each block's weights and gradients while its state decodes overlaps the two,
    // instead of the kernel waiting on memory with nothing to compute.
    for start in (0..p.len()).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(p.len());
        prefetch(&p[r.clone()]);
        m.decode_range(r.clone(), mf);
        prefetch(&g[r.clone()]);
        v.decode_range(r.clone(), vf);
        if let Some(d) = &delta {
            d.decode_range(r, u);
        }
    }
    match delta {
        None => k.chunk(p, g, mf, vf, Extra::None, row_len),
        Some(mut d) => {
            if sync {
                // slow = fast - u; the kernel syncs, and fast == slow after it.
                u.iter_mut().zip(p.iter()).for_each(|(u, f)| *u = f.load() - *u);
                k.chunk(p, g, mf, vf, Extra::Slow(u), row_len);
                d.clear();
            } else {
                // u += fast_after - fast_before, in the kernel's pass.
                k.chunk(p, g, mf, vf, Extra::Delta(u), row_len);
                d.encode(u, seed ^ SEED_U, first);
            }
        }
    }
    m.encode_moments(mf, &mut v, vf, seed ^ SEED_M, first);
}

/// Asks the CPU to fetch `xs` into its caches (a hint: nothing waits for it).
#[inline(always)]
fn prefetch<T>(xs: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = xs.as_ptr() as *const i8;
        for offset in (0..std::mem::size_of_val(xs)).step_by(64) {
            // SAFETY: the address is inside `xs`; a prefetch reads nothing the program sees.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xs;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamsRanger;
    use crate::scalars::StepScalars;
    use std::cell::RefCell;

    /// Six steps (the sixth a Lookahead sync) of a 3 x 1000 variable, centralized, with the
    /// given instruction set: the weights and the state's bytes.
    fn six_steps(isa: Isa, q8: bool) -> (Vec<f32>, HostState) {
        FORCE_ISA.with(|f| f.set(Some(isa)));
        let n = 3000;
        let mut p: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-2).collect();
        let zeros = |code| if q8 { HostBuf::Q8(Q8Buf::zeros(code, n)) } else { HostBuf::B16(vec![0; n]) };
        let mut st = HostState {
            m: zeros(Code::Signed),
            v: zeros(Code::Positive),
            slow: Some(zeros(Code::Signed)),
            master: None,
        };
        let params = ParamsRanger::default();
        for t in 1..=6u64 {
            let g: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.7 + t as f32).sin()) * 1e-2).collect();
            let scalars = StepScalars::new(&params, 1e-2, 0.0, t);
            let step = FusedStep {
                scalars,
                row_len: Some(1000),
                eps: scalars.eps,
                beta1: params.beta1,
                beta2: params.beta2,
                seed: crate::state_codec::stream_seed(0, t),
                state: RefCell::new(&mut st),
            };
            let mut state = step.state.borrow_mut();
            step.apply_packed(&mut p, &g, &mut state).unwrap();
        }
        FORCE_ISA.with(|f| f.set(None));
        (p, st)
    }

    #[test]
    fn every_instruction_set_gives_the_same_step() {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut, clippy::useless_vec))]
        let mut isas = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                isas.push(Isa::Avx2);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                isas.push(Isa::Avx512);
            }
        }
        for q8 in [true, false] {
            let (p0, st0) = six_steps(Isa::Baseline, q8);
            assert!(p0.iter().all(|x| x.is_finite()));
            for &isa in &isas[1..] {
                let (p, st) = six_steps(isa, q8);
                assert_eq!(p, p0, "{isa:?} weights (8-bit: {q8})");
                assert!(st == st0, "{isa:?} state (8-bit: {q8})");
            }
        }
    }
}
