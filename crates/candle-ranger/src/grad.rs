//! Gradient utilities that work with any Candle optimizer: global-norm clipping and
//! non-finite detection over a `GradStore`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::fused::{cpu_all_finite, cpu_sum_squares};
use crate::portable;

/// A one-element tensor's value on the host, as f64, without an f64 op on the device (Metal has
/// none): f32, bf16 and f16 are read as f32 and widened on the host, which gives the same value
/// as a cast to f64 would; an f64 tensor (CPU, CUDA) is read as it is.
pub fn to_host_f64(t: &candle_core::Tensor) -> candle_core::Result<f64> {
    let t = t.flatten_all()?.get(0)?;
    match t.dtype() {
        DType::F64 => t.to_scalar::<f64>(),
        _ => Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64),
    }
}

/// Whether every element of `t` is finite: read in place on CPU, with tensor ops elsewhere.
pub(crate) fn all_finite(t: &candle_core::Tensor) -> candle_core::Result<bool> {
    if t.device().is_cpu() {
        cpu_all_finite(t)
    } else {
        portable::all_finite(t)
    }
}

/// The global L2 norm of the gradients of `vars` (variables without a gradient count as 0),
/// accumulated in f64. NaN or infinity when some gradient is not finite.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var) {
            total += if g.device().is_cpu() && g.dtype().is_float() {
                cpu_sum_squares(g)?
            } else {
                let dt = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
                to_host_f64(&g.to_dtype(dt)?.sqr()?.sum_all()?)?
            };
        }
    }
    Ok(total.sqrt())
}

/// Scales the gradients of `vars` in `grads` so that their global L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_` does (`coef = max_norm / (norm + 1e-6)`,
/// applied only when below 1). Returns the norm before clipping. A non-finite norm leaves the
/// gradients untouched (an optimizer with [`crate::NonFiniteGrads`] will then skip or fail).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> candle_core::Result<f64> {
    let norm = grad_norm(grads, vars)?;
    scale_grads_to_norm(grads, vars, max_norm, norm)?;
    Ok(norm)
}

/// Scales the gradients of `vars` so that their global L2 norm, known to be `norm` (from
/// [`crate::check_grads`]), is at most `max_norm`, as `torch.nn.utils.clip_grad_norm_` does
/// (`coef = max_norm / (norm + 1e-6)`, applied only when below 1). A non-finite `norm` leaves
/// the gradients untouched. Reads nothing back from the device.
pub fn scale_grads_to_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64, norm: f64) -> candle_core::Result<()> {
    if !norm.is_finite() {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var) {
                // Out of place: a gradient tensor may share storage with another tensor.
                let scaled = (g * coef)?;
                grads.insert(var, scaled);
            }
        }
    }
    Ok(())
}

/// The indices (into `vars`) of variables whose gradient holds NaN or infinity.
pub fn non_finite_grads(grads: &GradStore, vars: &[Var]) -> candle_core::Result<Vec<usize>> {
    let mut bad = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        if let Some(g) = grads.get(var) {
            if !all_finite(g)? {
                bad.push(i);
            }
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The in-place CPU sum of squares (over several parallel chunks, and in each float dtype)
    /// against the sum written out in f64.
    #[test]
    fn grad_norm_reads_every_element_once() {
        let values: Vec<f64> = (0..100_003).map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0).collect();
        for dt in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let t = Tensor::new(values.as_slice(), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let expected: f64 =
                t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap().iter().map(|x| x * x).sum::<f64>().sqrt();
            let var = Var::from_tensor(&t).unwrap();
            let mut grads = GradStore::default();
            grads.insert(&var, t.clone());
            let norm = grad_norm(&grads, &[var]).unwrap();
            assert!((norm - expected).abs() < 1e-9 * expected, "{dt:?}: {norm} vs {expected}");
        }
    }

    /// Read as f32 and widened on the host, a scalar has the value a cast to f64 gives, in
    /// every float dtype (and for a one-element vector as for a rank-0 tensor).
    #[test]
    fn to_host_f64_equals_the_f64_cast() {
        for v in [0.1f64, -3.5e-7, 12345.678, f64::INFINITY, 1.0 / 3.0] {
            for dt in [DType::F64, DType::F32, DType::BF16, DType::F16] {
                let t = Tensor::new(v, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
                let cast = t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                assert_eq!(to_host_f64(&t).unwrap().to_bits(), cast.to_bits(), "{v} {dt:?}");
                assert_eq!(to_host_f64(&t.unsqueeze(0).unwrap()).unwrap().to_bits(), cast.to_bits());
            }
        }
    }
}
