//! The Lookahead core shared by [`crate::Ranger`] and [`crate::Lookahead`]: when a variable
//! syncs, the sync formula (per element for the fused kernel, as tensor ops everywhere else),
//! where slow weights start, and the slow-weight swap.

use std::ops::{Add, Mul, Sub};

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::state::state_dtype;

/// Whether step `t` (1-based) of a variable ends with a sync, for sync period `k` (0: never).
pub(crate) fn is_sync_step(k: usize, t: u64) -> bool {
    k > 0 && t.is_multiple_of(k as u64)
}

/// The sync of one element, `slow + alpha (fast - slow)`: the new slow weight, which is also
/// the new fast weight. The fused kernel calls this in its inner loop.
#[inline(always)]
pub(crate) fn interpolate<S: Copy + Add<Output = S> + Sub<Output = S> + Mul<Output = S>>(
    slow: S,
    fast: S,
    alpha: S,
) -> S {
    slow + alpha * (fast - slow)
}

/// The sync of a whole tensor, `slow + (fast - slow) alpha`, as Candle tensor ops (`slow` and
/// `fast` have the same dtype and device).
pub(crate) fn interpolate_tensor(slow: &Tensor, fast: &Tensor, alpha: f64) -> candle_core::Result<Tensor> {
    slow + ((fast - slow)? * alpha)?
}

/// The slow weights of a variable before its first step: a deep copy of its weights (never
/// zeros) in the state dtype, on the variable's device.
pub(crate) fn initial_slow(var: &Var) -> candle_core::Result<Tensor> {
    var.as_tensor().detach().to_dtype(state_dtype(var.dtype()))?.copy()
}

/// Syncs `var`, whose fast weights are `fast` (the variable itself, or its master copy), with
/// its slow weights `slow` (on any device, in the state dtype): returns the new slow weights and
/// sets the variable to them.
pub(crate) fn sync_var(var: &Var, fast: &Tensor, slow: &Tensor, alpha: f64) -> candle_core::Result<Tensor> {
    let fast = fast.to_dtype(slow.dtype())?.to_device(slow.device())?;
    let new = interpolate_tensor(slow, &fast, alpha)?;
    var.set(&new.to_device(var.device())?.to_dtype(var.dtype())?)?;
    Ok(new)
}

/// The fast weights put aside while the slow weights are in the variables.
#[derive(Debug, Default)]
pub(crate) struct SlowSwap {
    fast: Option<Vec<(Var, Tensor)>>,
}

impl SlowSwap {
    /// Whether the slow weights are in the variables.
    pub(crate) fn is_swapped(&self) -> bool {
        self.fast.is_some()
    }

    /// Fails with [`Error::SlowWeightsSwappedIn`] while the slow weights are in: `call` (a step,
    /// a sync) needs the fast weights.
    pub(crate) fn ensure_fast(&self, call: &'static str) -> Result<()> {
        if self.is_swapped() {
            return Err(Error::SlowWeightsSwappedIn { call });
        }
        Ok(())
    }

    /// Puts `slow` (each variable's slow weights, in its dtype and on its device) into the
    /// variables, keeping copies of the fast weights. Does nothing when already swapped; on an
    /// error the variables swapped so far are restored.
    pub(crate) fn swap_in(&mut self, slow: impl IntoIterator<Item = (Var, Tensor)>) -> Result<()> {
        if self.is_swapped() {
            return Ok(());
        }
        let mut aside = Vec::new();
        for (var, s) in slow {
            let swapped = var.as_tensor().detach().copy().and_then(|fast| {
                var.set(&s)?;
                Ok(fast)
            });
            match swapped {
                Ok(fast) => aside.push((var, fast)),
                Err(e) => {
                    self.fast = Some(aside);
                    let _ = self.swap_back();
                    return Err(e.into());
                }
            }
        }
        self.fast = Some(aside);
        Ok(())
    }

    /// Restores the fast weights (nothing to do when they are in).
    pub(crate) fn swap_back(&mut self) -> Result<()> {
        if let Some(fast) = self.fast.take() {
            for (var, f) in fast {
                var.set(&f)?;
            }
        }
        Ok(())
    }

    /// Runs `f`, then restores the fast weights, also when `f` panics.
    pub(crate) fn restore_after<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        /// Swaps back in `Drop`, which runs during unwinding too.
        struct Restore<'a>(&'a mut SlowSwap);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                // Only reached with the weights still swapped when `f` panicked; the panic is
                // what the caller sees, so a failure to restore cannot be reported.
                let _ = self.0.swap_back();
            }
        }
        let guard = Restore(self);
        let r = f();
        guard.0.swap_back()?;
        Ok(r)
    }
}
