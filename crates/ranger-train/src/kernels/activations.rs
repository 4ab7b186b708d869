//! Activations: exact GELU, tanh GELU, SwiGLU and GeGLU (tanh GELU), fused on the CPU with
//! one-pass backward kernels, and SiLU (Candle's op).

use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{Fused, FusedOp1, FusedOp2, FusedOp3, Input, Out};
use super::dtype::compute_dtype;
use super::float::Float;
use super::path::fused_ok;

/// Exact GELU (`hidden_act: gelu`): fused on CPU (one-pass backward), Candle's op elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Fused(GeluErf))
    } else {
        x.gelu_erf()
    }
}

/// SiLU, `x * sigmoid(x)`: Candle's unary op, which has a backward pass (checked by the
/// gradient tests) and keeps a single intermediate.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// SwiGLU `silu(gate) * up`: the fused CPU kernel (keeping no intermediate for backprop) on CPU,
/// [`swiglu_ops`] elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) && gate.dtype() == up.dtype() && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, Fused(SwiGlu));
    }
    swiglu_ops(gate, up)
}

/// [`swiglu`] from tensor ops.
pub fn swiglu_ops(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu(gate)? * up
}

/// Exact GELU `x Φ(x) = x (1 + erf(x / √2)) / 2` (f32/f64). Candle's own backward builds about
/// ten full-size temporaries; this one computes `g (Φ(x) + x φ(x))` in one pass from the input.
pub struct GeluErf;

// x: [n] -> out: [n]
fn gelu<T: Float>(x: &[T]) -> Vec<T> {
    let half = T::from_f64(0.5);
    x.par_iter().map(|&v| half * v * (T::one() + (v * T::FRAC_1_SQRT_2).erf())).collect()
}

// x: [n], g: [n] -> dx: [n]
fn gelu_grad<T: Float>(x: &[T], g: &[T]) -> Vec<T> {
    let half = T::from_f64(0.5);
    let neg_half = T::from_f64(-0.5);
    let inv_sqrt_2pi = half * T::FRAC_2_SQRT_PI * T::FRAC_1_SQRT_2;
    x.par_iter()
        .zip(g.par_iter())
        .map(|(&v, &gv)| {
            gv * (half * (T::one() + (v * T::FRAC_1_SQRT_2).erf()) + v * inv_sqrt_2pi * (neg_half * v * v).exp())
        })
        .collect()
}

impl FusedOp1 for GeluErf {
    const NAME: &'static str = "ranger-gelu-erf";

    fn cpu<T: Float>(&self, x: Input<'_>) -> Out<T> {
        Ok((gelu(x.floats()?), x.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &Fused(GeluErfGrad))?))
    }
}

/// The gradient of [`GeluErf`]: `g (Φ(x) + x φ(x))`.
struct GeluErfGrad;

impl FusedOp2 for GeluErfGrad {
    const NAME: &'static str = "ranger-gelu-erf-grad";

    fn cpu<T: Float>(&self, x: Input<'_>, g: Input<'_>) -> Out<T> {
        Ok((gelu_grad(x.floats()?, g.floats()?), x.shape().clone()))
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

// gate: [n], up: [n] -> out: [n]
fn swiglu_fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
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

// gate: [n], up: [n], g: [n] -> [d_gate: n | d_up: n]
fn swiglu_bwd<T: Float>(gate: &[T], up: &[T], g: &[T]) -> Vec<T> {
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

impl FusedOp2 for SwiGlu {
    const NAME: &'static str = "ranger-swiglu";

    fn cpu<T: Float>(&self, gate: Input<'_>, up: Input<'_>) -> Out<T> {
        if gate.shape() != up.shape() {
            candle_core::bail!("ranger-swiglu: gate {:?} and up {:?} differ", gate.dims(), up.dims());
        }
        Ok((swiglu_fwd(gate.floats()?, up.floats()?), gate.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, stacked as [2, ...]; the halves are views.
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &Fused(SwiGluGrad))?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The gradients of [`SwiGlu`], stacked: `g * up * silu'(gate)` then `g * silu(gate)`, with
/// `silu'(x) = σ(x) (1 + x (1 - σ(x)))`.
struct SwiGluGrad;

impl FusedOp3 for SwiGluGrad {
    const NAME: &'static str = "ranger-swiglu-grad";

    fn cpu<T: Float>(&self, gate: Input<'_>, up: Input<'_>, g: Input<'_>) -> Out<T> {
        let mut dims = vec![2];
        dims.extend_from_slice(gate.dims());
        Ok((swiglu_bwd(gate.floats()?, up.floats()?, g.floats()?), Shape::from(dims)))
    }
}

/// The tanh GELU (`gelu_new`: GPT-2's MLP), fused on the CPU (keeping only its input for
/// backprop), from exact elementary ops elsewhere ([`gelu_tanh_ops`]).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Fused(GeluTanh))
    } else {
        gelu_tanh_ops(x)
    }
}

/// [`gelu_tanh`] from tensor ops: `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, computed in f32
/// for half precision and rounded once (the gate of [`geglu_ops`]).
pub fn gelu_tanh_ops(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(compute_dtype(dt))?;
    let inner = ((&x + (x.sqr()? * &x)?.affine(GELU_C, 0.0)?)? * GELU_K)?;
    (&x * 0.5)?.mul(&(inner.tanh()? + 1.0)?)?.to_dtype(dt)
}

/// The tanh GELU `x σ(2y)`, `y = √(2/π) (x + 0.044715 x³)` (f32/f64); backward
/// `g (σ + x σ (1 - σ) 2y')` in one pass from the input.
pub struct GeluTanh;

impl FusedOp1 for GeluTanh {
    const NAME: &'static str = "ranger-gelu-tanh";

    fn cpu<T: Float>(&self, x: Input<'_>) -> Out<T> {
        Ok((gelu_tanh_fwd(x.floats()?), x.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &Fused(GeluTanhGrad))?))
    }
}

// x: [n] -> out: [n]
fn gelu_tanh_fwd<T: Float>(x: &[T]) -> Vec<T> {
    let (k2, c) = (T::from_f64(-2.0 * GELU_K), T::from_f64(GELU_C));
    let mut out: Vec<T> = x.iter().map(|&x| k2 * (x + c * x * x * x)).collect();
    out.par_chunks_mut(SWIGLU_CHUNK).zip(x.par_chunks(SWIGLU_CHUNK)).for_each(|(o, x)| {
        // o = exp(-2y), then x σ(2y) = x / (1 + exp(-2y)).
        T::exp_in_place(o);
        for (o, &x) in o.iter_mut().zip(x) {
            *o = x / (T::one() + *o);
        }
    });
    out
}

// x: [n], g: [n] -> dx: [n]
fn gelu_tanh_bwd<T: Float>(x: &[T], g: &[T]) -> Vec<T> {
    let (k2, c, c3) = (T::from_f64(-2.0 * GELU_K), T::from_f64(GELU_C), T::from_f64(3.0 * GELU_C));
    let two_k = T::from_f64(2.0 * GELU_K);
    let mut out: Vec<T> = x.iter().map(|&x| k2 * (x + c * x * x * x)).collect();
    out.par_chunks_mut(SWIGLU_CHUNK).zip(x.par_chunks(SWIGLU_CHUNK).zip(g.par_chunks(SWIGLU_CHUNK))).for_each(
        |(d, (x, g))| {
            T::exp_in_place(d);
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let sig = T::one() / (T::one() + *d);
                *d = g * (sig + x * sig * (T::one() - sig) * two_k * (T::one() + c3 * x * x));
            }
        },
    );
    out
}

/// The gradient of [`GeluTanh`].
struct GeluTanhGrad;

impl FusedOp2 for GeluTanhGrad {
    const NAME: &'static str = "ranger-gelu-tanh-grad";

    fn cpu<T: Float>(&self, x: Input<'_>, g: Input<'_>) -> Out<T> {
        Ok((gelu_tanh_bwd(x.floats()?, g.floats()?), x.shape().clone()))
    }
}

/// GeGLU `gelu_tanh(gate) * up` (Gemma's MLP gate, `gelu_pytorch_tanh`): the fused CPU kernel
/// on CPU (keeping no intermediate for backprop), [`geglu_ops`] elsewhere.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) && gate.dtype() == up.dtype() && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, Fused(GeGlu));
    }
    geglu_ops(gate, up)
}

/// [`geglu`] from tensor ops: `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` from elementary
/// ops, whose backward passes are exact (Candle's own `gelu` backward uses constants rounded to
/// six digits), computed in f32 for half precision and rounded once, as PyTorch's GELU does.
pub fn geglu_ops(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gelu_tanh_ops(gate)? * up
}

/// GeGLU with the tanh GELU, `0.5 x (1 + tanh(y)) * up` with `y = √(2/π) (x + 0.044715 x³)`,
/// computed as `x σ(2y) * up` (the same function; σ through the vectorised `exp`, and no
/// `inf / inf` for large |y|).
pub struct GeGlu;

/// `√(2/π)` and the cubic coefficient of the tanh GELU.
const GELU_K: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

// gate: [n], up: [n] -> out: [n]
fn geglu_fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let (k2, c) = (T::from_f64(-2.0 * GELU_K), T::from_f64(GELU_C));
    let mut out: Vec<T> = g.iter().map(|&x| k2 * (x + c * x * x * x)).collect();
    out.par_chunks_mut(SWIGLU_CHUNK).zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK))).for_each(
        |(o, (g, u))| {
            // o = exp(-2y), then x σ(2y) u = x / (1 + exp(-2y)) * u.
            T::exp_in_place(o);
            for ((o, &x), &u) in o.iter_mut().zip(g).zip(u) {
                *o = x / (T::one() + *o) * u;
            }
        },
    );
    out
}

// gate: [n], up: [n], g: [n] -> [d_gate: n | d_up: n]
fn geglu_bwd<T: Float>(gate: &[T], up: &[T], g: &[T]) -> Vec<T> {
    let n = gate.len();
    let (k2, c, c3) = (T::from_f64(-2.0 * GELU_K), T::from_f64(GELU_C), T::from_f64(3.0 * GELU_C));
    let two_k = T::from_f64(2.0 * GELU_K);
    let mut out = vec![T::zero(); 2 * n];
    let (d_gate, d_up) = out.split_at_mut(n);
    let inputs = gate.par_chunks(SWIGLU_CHUNK).zip(up.par_chunks(SWIGLU_CHUNK)).zip(g.par_chunks(SWIGLU_CHUNK));
    d_gate.par_chunks_mut(SWIGLU_CHUNK).zip(d_up.par_chunks_mut(SWIGLU_CHUNK)).zip(inputs).for_each(
        |((dg, du), ((x, u), g))| {
            // dg holds exp(-2y) first.
            dg.iter_mut().zip(x).for_each(|(d, &x)| *d = k2 * (x + c * x * x * x));
            T::exp_in_place(dg);
            for ((((dg, du), &x), &u), &g) in dg.iter_mut().zip(du.iter_mut()).zip(x).zip(u).zip(g) {
                // d/dx [x σ(2y)] = σ + x σ (1 - σ) 2 y', y' = √(2/π) (1 + 3c x²).
                let sig = T::one() / (T::one() + *dg);
                let dy2 = two_k * (T::one() + c3 * x * x);
                *dg = g * u * (sig + x * sig * (T::one() - sig) * dy2);
                *du = g * x * sig;
            }
        },
    );
    out
}

impl FusedOp2 for GeGlu {
    const NAME: &'static str = "ranger-geglu";

    fn cpu<T: Float>(&self, gate: Input<'_>, up: Input<'_>) -> Out<T> {
        if gate.shape() != up.shape() {
            candle_core::bail!("ranger-geglu: gate {:?} and up {:?} differ", gate.dims(), up.dims());
        }
        Ok((geglu_fwd(gate.floats()?, up.floats()?), gate.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &Fused(GeGluGrad))?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The gradients of [`GeGlu`], stacked: `g * up * gelu_tanh'(gate)` then `g * gelu_tanh(gate)`.
struct GeGluGrad;

impl FusedOp3 for GeGluGrad {
    const NAME: &'static str = "ranger-geglu-grad";

    fn cpu<T: Float>(&self, gate: Input<'_>, up: Input<'_>, g: Input<'_>) -> Out<T> {
        let mut dims = vec![2];
        dims.extend_from_slice(gate.dims());
        Ok((geglu_bwd(gate.floats()?, up.floats()?, g.floats()?), Shape::from(dims)))
    }
}
