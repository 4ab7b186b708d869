//! Lookahead (Zhang et al., 2019) around any Candle optimizer.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::Optimizer;

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
    swapped_out: Option<Vec<Tensor>>,
}

fn slow_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl<O: Optimizer> Lookahead<O> {
    /// Wraps an existing optimizer over `vars`.
    pub fn wrap(inner: O, vars: Vec<Var>, k: usize, alpha: f64) -> candle_core::Result<Self> {
        if k == 0 {
            candle_core::bail!("lookahead: k must be >= 1");
        }
        if !(0.0..=1.0).contains(&alpha) {
            candle_core::bail!("lookahead: alpha must be in [0, 1], got {alpha}");
        }
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let slow = vec![None; vars.len()];
        let steps = vec![0; vars.len()];
        Ok(Self { inner, vars, slow, steps, k, alpha, swapped_out: None })
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
            None => self.vars[i].as_tensor().detach().to_dtype(slow_dtype(self.vars[i].dtype()))?.copy(),
        }
    }

    fn sync_one(&mut self, i: usize) -> candle_core::Result<()> {
        let old = self.slow_of(i)?;
        let var = &self.vars[i];
        let fast = var.as_tensor().detach().to_dtype(old.dtype())?;
        let slow = (&old + ((fast - &old)? * self.alpha)?)?;
        var.set(&slow.to_dtype(var.dtype())?)?;
        self.slow[i] = Some(slow);
        Ok(())
    }

    /// Syncs every variable now, whatever its step count.
    pub fn sync(&mut self) -> candle_core::Result<()> {
        if self.swapped_out.is_some() {
            candle_core::bail!("lookahead: sync called while the slow weights are swapped in");
        }
        (0..self.vars.len()).try_for_each(|i| self.sync_one(i))
    }

    /// The slow weights, in each variable's dtype.
    pub fn slow_weights(&self) -> candle_core::Result<Vec<Tensor>> {
        (0..self.vars.len()).map(|i| self.slow_of(i)?.to_dtype(self.vars[i].dtype())).collect()
    }

    /// Puts the slow weights into the variables, keeping the fast ones aside.
    pub fn swap_in_slow_weights(&mut self) -> candle_core::Result<()> {
        if self.swapped_out.is_some() {
            return Ok(());
        }
        let mut fast = Vec::with_capacity(self.vars.len());
        for (v, s) in self.vars.iter().zip(self.slow_weights()?) {
            fast.push(v.as_tensor().detach().copy()?);
            v.set(&s)?;
        }
        self.swapped_out = Some(fast);
        Ok(())
    }

    /// Restores the fast weights.
    pub fn swap_back_fast_weights(&mut self) -> candle_core::Result<()> {
        if let Some(fast) = self.swapped_out.take() {
            for (v, f) in self.vars.iter().zip(fast) {
                v.set(&f)?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the slow weights swapped in, then restores the fast weights.
    pub fn with_slow_weights<R>(&mut self, f: impl FnOnce() -> R) -> candle_core::Result<R> {
        self.swap_in_slow_weights()?;
        let r = f();
        self.swap_back_fast_weights()?;
        Ok(r)
    }
}

impl<O: Optimizer> Optimizer for Lookahead<O> {
    type Config = LookaheadConfig<O::Config>;

    fn new(vars: Vec<Var>, config: Self::Config) -> candle_core::Result<Self> {
        let inner = O::new(vars.clone(), config.inner)?;
        Self::wrap(inner, vars, config.k, config.alpha)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        if self.swapped_out.is_some() {
            candle_core::bail!("lookahead: step called while the slow weights are swapped in");
        }
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
                if self.steps[i].is_multiple_of(self.k as u64) {
                    self.sync_one(i)?;
                }
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr)
    }
}
