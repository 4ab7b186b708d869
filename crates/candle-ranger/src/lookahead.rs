//! Lookahead (Zhang et al., 2019) around any Candle optimizer.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::Optimizer;

use crate::error::{Error, Result};
use crate::lookahead_core::{initial_slow, is_sync_step, sync_var, SlowSwap};

/// Configuration of [`Lookahead`]: the inner optimizer's config, the sync period `k` and the
/// interpolation factor `alpha`.
#[derive(Debug, Clone)]
pub struct LookaheadConfig<C> {
    /// The inner optimizer's configuration.
    pub inner: C,
    /// Sync every `k` steps of each variable (k >= 1).
    pub k: usize,
    /// Slow weights move `alpha` of the way to the fast ones at each sync (0..=1).
    pub alpha: f64,
}

impl<C> LookaheadConfig<C> {
    /// The paper's defaults, k = 5 and alpha = 0.5.
    pub fn new(inner: C) -> Self {
        Self { inner, k: 5, alpha: 0.5 }
    }
}

/// Wraps any [`Optimizer`] (e.g. `Lookahead<candle_nn::AdamW>`): the inner optimizer moves
/// the fast weights; every `k` steps of a variable its slow weights move `alpha` of the way
/// toward the fast ones and the fast weights are reset to them.
///
/// Slow weights are a copy of each variable's weights taken just before its first step (f32 for
/// half-precision variables). A variable's steps are counted when the `GradStore` has its
/// gradient. A step whose gradients hold NaN/Inf is skipped whole (nothing changes, nothing is
/// counted), as [`crate::Ranger`] does by default.
#[derive(Debug)]
pub struct Lookahead<O> {
    inner: O,
    vars: Vec<Var>,
    /// `None` until the variable's first step.
    slow: Vec<Option<Tensor>>,
    steps: Vec<u64>,
    k: usize,
    alpha: f64,
    swap: SlowSwap,
}

impl<O: Optimizer> Lookahead<O> {
    /// Wraps an existing optimizer over `vars`; fails with [`Error::InvalidLookahead`] unless
    /// `k >= 1` and `alpha` is in [0, 1].
    pub fn wrap(inner: O, vars: Vec<Var>, k: usize, alpha: f64) -> Result<Self> {
        if k == 0 || !(0.0..=1.0).contains(&alpha) {
            return Err(Error::InvalidLookahead { k, alpha });
        }
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let slow = vec![None; vars.len()];
        let steps = vec![0; vars.len()];
        Ok(Self { inner, vars, slow, steps, k, alpha, swap: SlowSwap::default() })
    }

    /// The inner optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// The inner optimizer, mutably.
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }

    /// Steps taken by each variable, in order.
    pub fn steps(&self) -> &[u64] {
        &self.steps
    }

    /// The slow weights of variable `i` (a copy of the current weights before its first step).
    fn slow_of(&self, i: usize) -> candle_core::Result<Tensor> {
        match &self.slow[i] {
            Some(s) => Ok(s.clone()),
            None => initial_slow(&self.vars[i]),
        }
    }

    fn sync_one(&mut self, i: usize) -> candle_core::Result<()> {
        let old = self.slow_of(i)?;
        self.slow[i] = Some(sync_var(&self.vars[i], self.vars[i].as_tensor(), &old, self.alpha)?);
        Ok(())
    }

    /// Syncs every variable now, whatever its step count.
    pub fn sync(&mut self) -> Result<()> {
        self.swap.ensure_fast("sync")?;
        Ok((0..self.vars.len()).try_for_each(|i| self.sync_one(i))?)
    }

    /// The slow weights, in each variable's dtype.
    pub fn slow_weights(&self) -> Result<Vec<Tensor>> {
        Ok((0..self.vars.len())
            .map(|i| self.slow_of(i)?.to_dtype(self.vars[i].dtype()))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Puts the slow weights into the variables, keeping the fast ones aside. Steps and syncs
    /// fail until [`Lookahead::swap_back_fast_weights`] is called.
    pub fn swap_in_slow_weights(&mut self) -> Result<()> {
        if self.swap.is_swapped() {
            return Ok(());
        }
        let slow = self.slow_weights()?;
        self.swap.swap_in(self.vars.iter().cloned().zip(slow))
    }

    /// Restores the fast weights.
    pub fn swap_back_fast_weights(&mut self) -> Result<()> {
        self.swap.swap_back()
    }

    /// Runs `f` with the slow weights swapped in, then restores the fast weights (also when `f`
    /// panics).
    pub fn with_slow_weights<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        self.swap_in_slow_weights()?;
        self.swap.restore_after(f)
    }

    fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        self.swap.ensure_fast("step")?;
        if !crate::grad::non_finite_grads(grads, &self.vars)?.is_empty() {
            return Ok(());
        }
        // Slow weights are taken before a variable's first update.
        for i in 0..self.vars.len() {
            if self.slow[i].is_none() && grads.get(&self.vars[i]).is_some() {
                self.slow[i] = Some(self.slow_of(i)?);
            }
        }
        self.inner.step(grads)?;
        for i in 0..self.vars.len() {
            if grads.get(&self.vars[i]).is_some() {
                self.steps[i] += 1;
                if is_sync_step(self.k, self.steps[i]) {
                    self.sync_one(i)?;
                }
            }
        }
        Ok(())
    }
}

impl<O: Optimizer> Optimizer for Lookahead<O> {
    type Config = LookaheadConfig<O::Config>;

    fn new(vars: Vec<Var>, config: Self::Config) -> candle_core::Result<Self> {
        let inner = O::new(vars.clone(), config.inner)?;
        Self::wrap(inner, vars, config.k, config.alpha).map_err(Error::into_candle)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.try_step(grads).map_err(Error::into_candle)
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr)
    }
}
