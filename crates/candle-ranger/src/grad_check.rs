//! The step's one device→host read: the global gradient norm, which gradients hold NaN or
//! infinity, and any scalars the caller wants with them (the loss for logging), read back in a
//! single transfer per device.
//!
//! Every device→host read waits for the device's queue to drain, so reading a norm and a
//! finite flag per tensor (two reads per tensor, hundreds per step) stalls a GPU hundreds of
//! times a step. Here each gradient contributes two device scalars (its sum of squares and the
//! sum of `g - g`, which is 0 exactly when every element is finite and NaN otherwise), and all of
//! them are stacked and read once. CPU tensors are read in place on the host (no copy), with the
//! same kernels as [`crate::grad_norm`], so CPU results are unchanged to the bit.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var};

use crate::fused::{cpu_all_finite, cpu_sum_squares};

/// What one read of the gradients tells: see [`check_grads`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GradCheck {
    /// The global L2 norm of the gradients; NaN or infinity when one is not finite (or, on a
    /// device, when the f32 sum of squares overflows, beyond a norm of about 1.8e19).
    pub norm: f64,
    /// The values of the `extras` passed to [`check_grads`], in order, widened to f64 on the
    /// host (an f32 scalar reads exactly as a cast to f64 would).
    pub extras: Vec<f64>,
    /// Variables whose gradient was checked.
    checked: HashSet<TensorId>,
    /// Indices (into the `vars` passed to [`check_grads`]) of gradients holding NaN/Inf.
    non_finite: Vec<usize>,
    /// Their variables' ids.
    non_finite_ids: HashSet<TensorId>,
}

impl GradCheck {
    /// Indices (into the variables given to [`check_grads`]) of the gradients that hold NaN or
    /// infinity.
    pub fn non_finite(&self) -> &[usize] {
        &self.non_finite
    }

    /// Whether every checked gradient is finite.
    pub fn all_finite(&self) -> bool {
        self.non_finite.is_empty()
    }

    /// The verdict on `var`'s gradient: `Some(true)` finite, `Some(false)` not, `None` when it
    /// was not checked (then an optimizer checks it itself).
    pub fn is_finite(&self, var: &Var) -> Option<bool> {
        self.checked.contains(&var.id()).then(|| !self.non_finite_ids.contains(&var.id()))
    }
}

/// Reads the global L2 norm of the gradients of `vars` (a variable without a gradient counts as
/// 0), which of them hold NaN/Inf, and the one-element tensors `extras`, with one device→host
/// transfer per device involved (CPU tensors are read in place).
///
/// Clip with [`crate::scale_grads_to_norm`] and step with [`crate::Ranger::step_checked`] to use
/// this read instead of making new ones. Norms are accumulated in f64 on the host over per-tensor
/// sums of squares (computed in f64 on the CPU, in f32 on a device, or f64 for f64 gradients).
pub fn check_grads(grads: &GradStore, vars: &[Var], extras: &[Tensor]) -> candle_core::Result<GradCheck> {
    check(grads, vars, extras, true)
}

/// [`check_grads`]; `cpu_in_place: false` sends CPU tensors through the device branch (tests).
fn check(grads: &GradStore, vars: &[Var], extras: &[Tensor], cpu_in_place: bool) -> candle_core::Result<GradCheck> {
    // Each device value to read, tagged with what it is.
    enum Slot {
        SumSq,
        Finite(usize),
        Extra(usize),
    }
    let mut pending: Vec<(Device, Vec<(Slot, Tensor)>)> = Vec::new();
    let mut push = |dev: &Device, slot: Slot, t: Tensor| match pending.iter_mut().find(|(d, _)| d.same_device(dev)) {
        Some((_, v)) => v.push((slot, t)),
        None => pending.push((dev.clone(), vec![(slot, t)])),
    };

    let mut check = GradCheck { extras: vec![0.0; extras.len()], ..Default::default() };
    let mut sum_sq = 0f64;
    let mut non_finite = vec![false; vars.len()];
    for (i, var) in vars.iter().enumerate() {
        let Some(g) = grads.get(var) else { continue };
        check.checked.insert(var.id());
        if cpu_in_place && g.device().is_cpu() && g.dtype().is_float() {
            sum_sq += cpu_sum_squares(g)?;
            non_finite[i] = !cpu_all_finite(g)?;
        } else {
            let dt = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            let g = g.to_dtype(dt)?;
            push(g.device(), Slot::SumSq, g.sqr()?.sum_all()?);
            #[allow(clippy::eq_op)] // x - x is 0 exactly when x is finite: that is the test
            push(g.device(), Slot::Finite(i), (&g - &g)?.sum_all()?);
        }
    }
    for (i, t) in extras.iter().enumerate() {
        let t = t.flatten_all()?.get(0)?;
        if cpu_in_place && t.device().is_cpu() {
            check.extras[i] = crate::to_host_f64(&t)?;
        } else {
            let dev = t.device().clone();
            push(&dev, Slot::Extra(i), t);
        }
    }

    for (_, values) in pending {
        // One dtype for the stack: f64 only when something is f64 (never on Metal, which has
        // none); widening f32 to f64 is exact.
        let dt = if values.iter().any(|(_, t)| t.dtype() == DType::F64) { DType::F64 } else { DType::F32 };
        let stacked = values.iter().map(|(_, t)| t.to_dtype(dt)).collect::<candle_core::Result<Vec<_>>>()?;
        let host: Vec<f64> = match dt {
            DType::F64 => Tensor::stack(&stacked, 0)?.to_vec1::<f64>()?,
            _ => Tensor::stack(&stacked, 0)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect(),
        };
        for ((slot, _), x) in values.iter().zip(host) {
            match *slot {
                Slot::SumSq => sum_sq += x,
                Slot::Finite(i) => non_finite[i] |= x != 0.0,
                Slot::Extra(i) => check.extras[i] = x,
            }
        }
    }

    check.norm = sum_sq.sqrt();
    for (i, bad) in non_finite.into_iter().enumerate() {
        if bad {
            check.non_finite.push(i);
            check.non_finite_ids.insert(vars[i].id());
        }
    }
    Ok(check)
}

/// The device branch of [`check_grads`] run on CPU tensors, so tests can compare it with the
/// in-place host branch.
#[cfg(test)]
pub(crate) fn check_grads_as_device(
    grads: &GradStore,
    vars: &[Var],
    extras: &[Tensor],
) -> candle_core::Result<GradCheck> {
    check(grads, vars, extras, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(values: &[(&Var, Tensor)]) -> GradStore {
        let mut g = GradStore::default();
        for (v, t) in values {
            g.insert(v, t.clone());
        }
        g
    }

    /// The stacked read agrees with the per-tensor reads and with the host path: norm, the
    /// non-finite verdicts (NaN, +Inf, -Inf, and a finite tensor whose square overflows f32 is
    /// still finite), extras, and variables without a gradient.
    #[test]
    fn one_read_tells_norm_finiteness_and_extras() {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let vars: Vec<Var> = (0..5).map(|_| Var::zeros(4, dt, &dev).unwrap()).collect();
            let t = |xs: [f64; 4]| Tensor::new(&xs, &dev).unwrap().to_dtype(dt).unwrap();
            let grads = store(&[
                (&vars[0], t([1.0, -2.0, 0.5, 0.0])),
                (&vars[1], t([f64::NAN, 1.0, 0.0, 0.0])),
                (&vars[2], t([3.0, 0.0, 0.0, 0.0])),
                (&vars[4], t([0.0, f64::NEG_INFINITY, 0.0, 0.0])),
            ]);
            let extras = [Tensor::new(2.5f32, &dev).unwrap(), Tensor::new(&[-1.0f64], &dev).unwrap()];
            let host = check_grads(&grads, &vars, &extras).unwrap();
            let device = check_grads_as_device(&grads, &vars, &extras).unwrap();
            assert_eq!(host.non_finite(), &[1, 4], "{dt:?}");
            assert_eq!(device.non_finite(), host.non_finite(), "{dt:?}");
            assert_eq!(host.extras, vec![2.5, -1.0]);
            assert_eq!(device.extras, host.extras);
            assert_eq!(host.is_finite(&vars[0]), Some(true));
            assert_eq!(host.is_finite(&vars[1]), Some(false));
            assert_eq!(host.is_finite(&vars[3]), None, "no gradient: not checked");
            assert!(host.norm.is_nan() && device.norm.is_nan());

            let finite = store(&[(&vars[0], t([1.0, -2.0, 0.5, 0.0])), (&vars[2], t([3.0, 0.0, 0.0, 0.0]))]);
            let (a, b) =
                (check_grads(&finite, &vars, &[]).unwrap(), check_grads_as_device(&finite, &vars, &[]).unwrap());
            let expected = (1.0f64 + 4.0 + 0.25 + 9.0).sqrt();
            assert!((a.norm - expected).abs() < 1e-12 && (b.norm - expected).abs() < 1e-6, "{dt:?}");
            assert!(a.all_finite() && b.all_finite());
            assert_eq!(a.norm.to_bits(), crate::grad_norm(&finite, &vars).unwrap().to_bits());
        }
        // Large but finite: the square overflows f32, the finite test does not.
        let v = Var::zeros(2, DType::F32, &dev).unwrap();
        let big = store(&[(&v, Tensor::new(&[3e30f32, 1.0], &dev).unwrap())]);
        assert!(check_grads_as_device(&big, std::slice::from_ref(&v), &[]).unwrap().all_finite());
        assert!(check_grads(&big, std::slice::from_ref(&v), &[]).unwrap().all_finite());
    }

    /// Clipping with a known norm is clipping with a computed one.
    #[test]
    fn scaling_to_a_known_norm_is_clipping() {
        let dev = Device::Cpu;
        let v = Var::zeros(2, DType::F32, &dev).unwrap();
        let vars = [v.clone()];
        let mut a = store(&[(&v, Tensor::new(&[3f32, 4.0], &dev).unwrap())]);
        let mut b = store(&[(&v, Tensor::new(&[3f32, 4.0], &dev).unwrap())]);
        let norm = check_grads(&a, &vars, &[]).unwrap().norm;
        crate::scale_grads_to_norm(&mut a, &vars, 1.0, norm).unwrap();
        crate::clip_grad_norm(&mut b, &vars, 1.0).unwrap();
        assert_eq!(a.get(&v).unwrap().to_vec1::<f32>().unwrap(), b.get(&v).unwrap().to_vec1::<f32>().unwrap());
    }
}
