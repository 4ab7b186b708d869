//! Learning-rate schedules, usable with any Candle optimizer.
//!
//! A [`Schedule`] maps the 0-based index of an optimizer step to the learning rate that step
//! uses. Warmup is linear and never starts at 0 (no step is wasted at lr = 0), and the decaying
//! shapes reach `min_lr` exactly on the last step when there are steps left after warmup (and,
//! for flat-then-cosine, a flat fraction below 1); [`Schedule::lr_at`] gives the formulas.

use candle_nn::Optimizer;

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    /// Stay at the base learning rate.
    Constant,
    /// Linear from the base rate down to `min_lr` at the last step.
    Linear,
    /// Cosine from the base rate down to `min_lr` at the last step.
    Cosine,
    /// Flat at the base rate for `flat_fraction` of the steps after warmup, then cosine down
    /// to `min_lr` (the fastai / Ranger "flat then anneal" schedule).
    FlatThenCosine {
        /// Fraction of the post-warmup steps kept flat, in [0, 1].
        flat_fraction: f64,
    },
}

/// A learning-rate schedule: linear warmup, then a [`Decay`].
///
/// ```
/// use candle_ranger::{Decay, Schedule};
/// let s = Schedule { base_lr: 1e-3, min_lr: 0.0, warmup_steps: 10, total_steps: 110, decay: Decay::Cosine };
/// assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);   // warmup reaches the base rate on its last step
/// assert!(s.lr_at(0) > 0.0);                     // and never wastes a step at lr = 0
/// assert!((s.lr_at(109) - 0.0).abs() < 1e-12);   // the last step uses min_lr
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Learning rate of the last step for the decaying shapes.
    pub min_lr: f64,
    /// Number of warmup steps (0 for none).
    pub warmup_steps: usize,
    /// Total number of optimizer steps, warmup included.
    pub total_steps: usize,
    /// Shape after warmup.
    pub decay: Decay,
}

impl Schedule {
    /// A constant learning rate.
    pub fn constant(lr: f64) -> Self {
        Self { base_lr: lr, min_lr: lr, warmup_steps: 0, total_steps: 0, decay: Decay::Constant }
    }

    /// The learning rate of step `step` (0-based).
    ///
    /// - warmup (`step < warmup_steps`): `base * (step + 1) / warmup_steps`;
    /// - after it, with `progress = (step - warmup) / (total - warmup - 1)` clamped to [0, 1]
    ///   (so the last step has progress 1):
    ///   linear `base + (min - base) * progress`, cosine
    ///   `min + (base - min) * (1 + cos(pi * progress)) / 2`; flat-then-cosine is flat until
    ///   `progress <= flat_fraction`, then cosine over the rest.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).saturating_sub(1);
        let progress = if span == 0 { 1.0 } else { ((step - self.warmup_steps) as f64 / span as f64).min(1.0) };
        let cosine =
            |x: f64| self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos());
        match self.decay {
            Decay::Constant => self.base_lr,
            Decay::Linear => self.base_lr + (self.min_lr - self.base_lr) * progress,
            Decay::Cosine => cosine(progress),
            Decay::FlatThenCosine { flat_fraction } => {
                let f = flat_fraction.clamp(0.0, 1.0);
                if progress <= f || f >= 1.0 {
                    self.base_lr
                } else {
                    cosine((progress - f) / (1.0 - f))
                }
            }
        }
    }

    /// Sets `opt`'s learning rate for step `step` (0-based) and returns it.
    pub fn apply<O: Optimizer>(&self, opt: &mut O, step: usize) -> f64 {
        let lr = self.lr_at(step);
        opt.set_learning_rate(lr);
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> Schedule {
        Schedule { base_lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 14, decay }
    }

    #[test]
    fn warmup_is_linear_and_reaches_base() {
        let s = sched(Decay::Constant);
        let w: Vec<f64> = (0..5).map(|i| s.lr_at(i)).collect();
        assert_eq!(w, vec![0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn decays_end_at_min_on_the_last_step() {
        for d in [Decay::Linear, Decay::Cosine, Decay::FlatThenCosine { flat_fraction: 0.5 }] {
            let s = sched(d);
            assert!((s.lr_at(4) - 1.0).abs() < 1e-12, "{d:?} starts at base");
            assert!((s.lr_at(13) - 0.1).abs() < 1e-12, "{d:?} ends at min");
            assert!((s.lr_at(100) - 0.1).abs() < 1e-12, "{d:?} stays at min");
            let lrs: Vec<f64> = (4..14).map(|i| s.lr_at(i)).collect();
            assert!(lrs.windows(2).all(|w| w[1] <= w[0] + 1e-15), "{d:?} is monotone: {lrs:?}");
        }
        let s = sched(Decay::Linear);
        assert!((s.lr_at(8) - (1.0 - 0.9 * 4.0 / 9.0)).abs() < 1e-12);
        let c = sched(Decay::Cosine);
        // Halfway through the decay the cosine is at the midpoint.
        let mid = Schedule { total_steps: 13, ..c };
        assert!((mid.lr_at(8) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn flat_then_cosine_is_flat_first() {
        let s = Schedule {
            base_lr: 1.0,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 101,
            decay: Decay::FlatThenCosine { flat_fraction: 0.7 },
        };
        assert_eq!(s.lr_at(70), 1.0);
        assert!(s.lr_at(71) < 1.0);
        assert!((s.lr_at(85) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr_at(100), 0.0);
    }
}
