//! The fused CPU update over packed state ([`crate::StatePrecision::Int8`] and
//! [`crate::StatePrecision::Bf16`]): each parallel chunk walks its blocks of [`BLOCK`] values;
//! a block's m, v (and the Lookahead delta) are decoded into f32 on the stack, stepped by the
//! same per-element kernel as the f32 state and encoded again while they are in the L1 cache,
//! in one pass over memory.
//!
//! The slow weights are not stored themselves: a slow weight equals its fast weight right after
//! each sync, so the state keeps the delta `u = fast - slow` (zero after a sync, the sum of
//! the steps since), which is small and loses nothing of the weight when rounded.
//! At a sync, `slow = fast - u`.

use std::ops::Range;

use rayon::prelude::*;

use crate::fused::{
    adopt_outside_changes, round_into, row_sum, Elem, Extra, FusedStep, HostBuf, HostState, Kernel, StateElem, CHUNK,
};
use crate::state_codec::{decode_block, encode_state16, encode_state_q8, from_bf16_bits, Code, Q8Buf, Q8Out, BLOCK};

/// Separates the stochastic rounding stream of the state (one hash per element for m, v and
/// the delta) from other uses of the step's seed.
const SEED_STATE: u64 = 0x9e37_79b9_7f4a_7c15;

/// One parallel chunk of a packed buffer. `b` is one block of it (from a block boundary, at
/// most [`BLOCK`] elements); `first` is the index of the chunk's first element in the whole
/// buffer (the stochastic rounding's stream position).
trait Packed: Send + Sized {
    /// The values of block `b` as f32, into `out` (of `b.len()` values).
    fn decode(&self, b: Range<usize>, out: &mut [f32]);
    /// Stores block `b` of the moments `m` and `v` and, between Lookahead syncs, of the delta
    /// `u`, rounded stochastically from stream `seed` in one pass, one hash per element.
    fn encode_state(
        b: Range<usize>,
        m: (&mut Self, &[f32]),
        v: (&mut Self, &[f32]),
        u: Option<(&mut Self, &[f32])>,
        seed: u64,
        first: u64,
    );
    /// Sets every value to 0.
    fn clear(&mut self);
}

/// A chunk of an 8-bit buffer: whole blocks, with their scales.
struct Q8Chunk<'a> {
    code: Code,
    bytes: &'a mut [u8],
    scales: &'a mut [f32],
}

impl Q8Chunk<'_> {
    /// Block `b` of this chunk, to be written.
    #[inline(always)]
    fn block(&mut self, b: Range<usize>) -> Q8Out<'_> {
        let scale = b.start / BLOCK..b.start / BLOCK + 1;
        Q8Out { bytes: &mut self.bytes[b], scales: &mut self.scales[scale] }
    }
}

impl Packed for Q8Chunk<'_> {
    #[inline(always)]
    fn decode(&self, b: Range<usize>, out: &mut [f32]) {
        decode_block(self.code, &self.bytes[b.clone()], self.scales[b.start / BLOCK], out)
    }

    #[inline(always)]
    fn encode_state(
        b: Range<usize>,
        (m, mf): (&mut Self, &[f32]),
        (v, vf): (&mut Self, &[f32]),
        u: Option<(&mut Self, &[f32])>,
        seed: u64,
        first: u64,
    ) {
        let u = u.map(|(u, uf)| (uf, u.block(b.clone())));
        encode_state_q8((mf, m.block(b.clone())), (vf, v.block(b.clone())), u, seed, first + b.start as u64)
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
    fn decode(&self, b: Range<usize>, out: &mut [f32]) {
        out.iter_mut().zip(&self.0[b]).for_each(|(o, &bits)| *o = from_bf16_bits(bits))
    }

    #[inline(always)]
    fn encode_state(
        b: Range<usize>,
        (m, mf): (&mut Self, &[f32]),
        (v, vf): (&mut Self, &[f32]),
        u: Option<(&mut Self, &[f32])>,
        seed: u64,
        first: u64,
    ) {
        let u = u.map(|(u, uf)| (uf, &mut u.0[b.clone()]));
        encode_state16((mf, &mut m.0[b.clone()]), (vf, &mut v.0[b.clone()]), u, seed, first + b.start as u64)
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
            .for_each(|(ci, ((((p, g), m), v), delta))| {
                let part = Part { first: (ci * chunk) as u64, m, v, delta };
                // The same code compiled for wider vectors; no FMA, so the arithmetic rounds as
                // the baseline build's (`every_instruction_set_gives_the_same_step` checks).
                #[cfg(target_arch = "x86_64")]
                match isa {
                    // SAFETY: `Isa::detected` found these AVX-512 extensions on this CPU.
                    Isa::Avx512 => return unsafe { step_part_avx512(&k, p, g, part, row_len, sync, seed) },
                    // SAFETY: `Isa::detected` found AVX2 on this CPU.
                    Isa::Avx2 => return unsafe { step_part_avx2(&k, p, g, part, row_len, sync, seed) },
                    Isa::Baseline => {}
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = isa;
                step_part(&k, p, g, part, row_len, sync, seed)
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
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    step_part(k, p, g, part, row_len, sync, seed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_part_avx2<P: Elem<f32>, G: Elem<f32>, C: Packed>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    part: Part<C>,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    step_part(k, p, g, part, row_len, sync, seed)
}

/// Decode, the f32 kernel, encode, block by block (see the module documentation).
#[inline(always)]
fn step_part<P: Elem<f32>, G: Elem<f32>, C: Packed>(
    k: &Kernel<f32>,
    p: &mut [P],
    g: &[G],
    part: Part<C>,
    row_len: Option<usize>,
    sync: bool,
    seed: u64,
) {
    let Part { first, mut m, mut v, mut delta } = part;
    let n = p.len();
    // Each row's gradient mean (the chunk holds whole rows); reading the gradients here also
    // brings them into the cache for the pass below.
    let means: Vec<f64> = match row_len {
        Some(row) => g.chunks(row.max(1)).map(|r| row_sum::<f32, G>(r) / row as f64).collect(),
        None => Vec::new(),
    };
    // The block's f32 working values: m, v and the Lookahead delta (at a sync, the slow weights).
    let (mut mb, mut vb, mut ub) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    for start in (0..n).step_by(BLOCK) {
        let b = start..(start + BLOCK).min(n);
        let len = b.len();
        // The weights of the next block: they come from memory while this one computes.
        prefetch(p.get(b.end..(b.end + BLOCK).min(n)).unwrap_or(&[]));
        let (mf, vf, uf) = (&mut mb[..len], &mut vb[..len], &mut ub[..len]);
        m.decode(b.clone(), mf);
        v.decode(b.clone(), vf);
        let (pb, gb) = (&mut p[b.clone()], &g[b.clone()]);
        if let Some(d) = &delta {
            d.decode(b.clone(), uf);
            if sync {
                // slow = fast - u; the kernel syncs, and fast == slow after it.
                uf.iter_mut().zip(pb.iter()).for_each(|(u, f)| *u = f.load() - *u);
            }
        }
        // The block's pieces in each row (a block may straddle rows, and a row blocks).
        let mut s = 0;
        while s < len {
            let (e, mean) = match row_len {
                Some(row) => {
                    let r = (start + s) / row;
                    (((r + 1) * row - start).min(len), means[r])
                }
                None => (len, 0.0),
            };
            let extra = match delta {
                None => Extra::None,
                // u += fast_after - fast_before, in the kernel's pass.
                Some(_) if !sync => Extra::Delta(&mut uf[s..e]),
                Some(_) => Extra::Slow(&mut uf[s..e]),
            };
            k.segment(&mut pb[s..e], &gb[s..e], &mut mf[s..e], &mut vf[s..e], extra, mean);
            s = e;
        }
        // At a sync the delta is cleared below (fast == slow), not encoded.
        let u = delta.as_mut().filter(|_| !sync).map(|d| (d, &uf[..]));
        C::encode_state(b, (&mut m, mf), (&mut v, vf), u, seed ^ SEED_STATE, first);
    }
    if let (Some(d), true) = (&mut delta, sync) {
        d.clear();
    }
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
    use crate::state_codec::decode16;
    use std::cell::RefCell;

    /// How [`six_steps`] steps.
    #[derive(Clone, Copy)]
    enum How {
        /// The fused step, with the given instruction set.
        Fused(Isa),
        /// [`reference_step`].
        Reference,
    }

    /// Six steps (the sixth a Lookahead sync) of an `n`-element variable, centralized over
    /// rows of `row_len` when given: the weights and the state's bytes.
    fn six_steps(how: How, q8: bool, n: usize, row_len: Option<usize>) -> (Vec<f32>, HostState) {
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
                row_len,
                eps: scalars.eps,
                beta1: params.beta1,
                beta2: params.beta2,
                seed: crate::state_codec::stream_seed(0, t),
                state: RefCell::new(&mut st),
            };
            let mut state = step.state.borrow_mut();
            match how {
                How::Fused(isa) => {
                    FORCE_ISA.with(|f| f.set(Some(isa)));
                    step.apply_packed(&mut p, &g, &mut state).unwrap();
                    FORCE_ISA.with(|f| f.set(None));
                }
                How::Reference => reference_step(&step, &mut p, &g, &mut state),
            }
        }
        (p, st)
    }

    /// The packed step as its definition reads: decode the whole variable's state, run the f32
    /// kernel over it, encode it all again. The fused step walks chunks and blocks in parallel
    /// and must give the same bits.
    fn reference_step(step: &FusedStep<'_>, p: &mut [f32], g: &[f32], st: &mut HostState) {
        let k = Kernel::<f32>::new(step);
        let decode = |b: &HostBuf| match b {
            HostBuf::Q8(q) => q.to_f32(),
            HostBuf::B16(b) => decode16(b),
            _ => unreachable!("packed state"),
        };
        let (mut m, mut v) = (decode(&st.m), decode(&st.v));
        let slow = st.slow.as_mut().unwrap();
        let mut u = decode(slow);
        let sync = step.scalars.sync_alpha.is_some();
        if sync {
            u.iter_mut().zip(p.iter()).for_each(|(u, f)| *u = f - *u);
            k.chunk(p, g, &mut m, &mut v, Extra::Slow(&mut u), step.row_len);
        } else {
            k.chunk(p, g, &mut m, &mut v, Extra::Delta(&mut u), step.row_len);
        }
        let seed = step.seed ^ SEED_STATE;
        match (&mut st.m, &mut st.v, slow) {
            (HostBuf::Q8(qm), HostBuf::Q8(qv), HostBuf::Q8(qu)) => {
                let delta = (!sync).then(|| (&u[..], qu.out()));
                encode_state_q8((&m, qm.out()), (&v, qv.out()), delta, seed, 0);
                if sync {
                    *qu = Q8Buf::zeros(qu.code, qu.len());
                }
            }
            (HostBuf::B16(bm), HostBuf::B16(bv), HostBuf::B16(bu)) => {
                if sync {
                    encode_state16((&m, bm), (&v, bv), None, seed, 0);
                    bu.fill(0);
                } else {
                    encode_state16((&m, bm), (&v, bv), Some((&u, bu)), seed, 0);
                }
            }
            _ => unreachable!("packed state of one kind"),
        }
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
            let (p0, st0) = six_steps(How::Fused(Isa::Baseline), q8, 3000, Some(1000));
            assert!(p0.iter().all(|x| x.is_finite()));
            for &isa in &isas[1..] {
                let (p, st) = six_steps(How::Fused(isa), q8, 3000, Some(1000));
                assert_eq!(p, p0, "{isa:?} weights (8-bit: {q8})");
                assert!(st == st0, "{isa:?} state (8-bit: {q8})");
            }
        }
    }

    #[test]
    fn the_block_walk_gives_the_whole_variable_step() {
        // Several parallel chunks (of 32 rows); rows of 1000 straddle the 256-value blocks; a
        // short last block without centralization.
        for (n, row_len) in [(70_000, Some(1000)), (70_001, None), (3000, Some(3000))] {
            for q8 in [true, false] {
                let (p0, st0) = six_steps(How::Reference, q8, n, row_len);
                let (p, st) = six_steps(How::Fused(Isa::detected()), q8, n, row_len);
                assert_eq!(p, p0, "weights ({n}, rows {row_len:?}, 8-bit: {q8})");
                assert!(st == st0, "state ({n}, rows {row_len:?}, 8-bit: {q8})");
                assert!(p0.iter().all(|x| x.is_finite()) && p0.iter().any(|&x| x != 0.0));
            }
        }
    }
}
