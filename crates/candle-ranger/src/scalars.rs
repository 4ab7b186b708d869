//! The per-step scalars of RAdam, computed in f64 from the step count alone.

use crate::lookahead_core::is_sync_step;
use crate::params::{ParamsRanger, RectifyFallback};

/// How the parameter moves on one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Update {
    /// `p -= step_size * m / (sqrt(v) + eps)`; `step_size = lr * r_t * sqrt(1 - b2^t) / (1 - b1^t)`.
    Rectified {
        /// The step size, always >= 0.
        step_size: f64,
    },
    /// `p -= step_size * m`; `step_size = lr / (1 - b1^t)`.
    Momentum {
        /// The step size, always >= 0.
        step_size: f64,
    },
    /// No parameter update.
    None,
}

/// Everything about one variable's step that does not depend on its elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// The 1-based step count of the variable.
    pub t: u64,
    /// rho_t, the length of the approximated simple moving average.
    pub rho_t: f64,
    /// The parameter update of this step.
    pub update: Update,
    /// Multiplier of the parameter before the update (`1 - lr * wd` for decoupled decay, else 1).
    pub decay_factor: f64,
    /// Coefficient of the L2 term added to the gradient (0 for decoupled decay).
    pub l2: f64,
    /// `Some(alpha)` when this step ends with a Lookahead sync.
    pub sync_alpha: Option<f64>,
    /// The `eps` added to `sqrt(v)` in the denominator: the configured one for RAdam; for Adam
    /// `eps * sqrt(1 - b2^t)`, which makes the rectified form equal to Adam's
    /// `m_hat / (sqrt(v_hat) + eps)`.
    pub eps: f64,
}

/// The maximum length of the approximated SMA, `2 / (1 - beta2) - 1`.
pub fn rho_inf(beta2: f64) -> f64 {
    2.0 / (1.0 - beta2) - 1.0
}

/// rho_t for 1-based step `t`.
pub fn rho_t(beta2: f64, t: u64) -> f64 {
    let b2t = beta2.powi(t.min(i32::MAX as u64) as i32);
    rho_inf(beta2) - 2.0 * t as f64 * b2t / (1.0 - b2t)
}

/// The variance rectification term r_t of the RAdam paper; `None` when it is not a real
/// positive number (rho_t <= 4).
pub fn rectifier(beta2: f64, t: u64) -> Option<f64> {
    let (ri, rt) = (rho_inf(beta2), rho_t(beta2, t));
    if rt <= 4.0 {
        return None;
    }
    let r2 = (rt - 4.0) * (rt - 2.0) * ri / ((ri - 4.0) * (ri - 2.0) * rt);
    (r2 > 0.0 && r2.is_finite()).then(|| r2.sqrt())
}

impl StepScalars {
    /// The scalars of step `t` (1-based) of a variable in a group with learning rate `lr` and
    /// weight decay `weight_decay`.
    pub fn new(p: &ParamsRanger, lr: f64, weight_decay: f64, t: u64) -> Self {
        let ti = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - p.beta1.powi(ti);
        let bc2 = 1.0 - p.beta2.powi(ti);
        let rho = rho_t(p.beta2, t);
        let rect = if rho > p.rectify_threshold { rectifier(p.beta2, t) } else { None };
        let update = match rect {
            Some(r) => Update::Rectified { step_size: lr * r * bc2.sqrt() / bc1 },
            None => match p.fallback {
                RectifyFallback::Sgd => Update::Momentum { step_size: lr / bc1 },
                RectifyFallback::Skip => Update::None,
            },
        };
        // A negative or non-finite step size must never reach the parameters.
        let update = match update {
            Update::Rectified { step_size } | Update::Momentum { step_size }
                if !(step_size.is_finite() && step_size >= 0.0) =>
            {
                Update::None
            }
            u => u,
        };
        let (decay_factor, l2) =
            if p.decoupled_weight_decay { (1.0 - lr * weight_decay, 0.0) } else { (1.0, weight_decay) };
        let sync_alpha = is_sync_step(p.lookahead_k, t).then_some(p.lookahead_alpha);
        Self { t, rho_t: rho, update, decay_factor, l2, sync_alpha, eps: p.eps }
    }

    /// The scalars of step `t` of Adam(W) (`torch.optim.AdamW` when the decay is decoupled):
    /// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, written in the rectified
    /// form the kernels take, `p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t))`
    /// (the same value, rounded differently). No rectification, no fallback.
    pub fn adam(p: &ParamsRanger, lr: f64, weight_decay: f64, t: u64) -> Self {
        let mut sc = Self::new(p, lr, weight_decay, t);
        let ti = t.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(ti), 1.0 - p.beta2.powi(ti));
        let step_size = lr * bc2.sqrt() / bc1;
        sc.update =
            if step_size.is_finite() && step_size >= 0.0 { Update::Rectified { step_size } } else { Update::None };
        sc.eps = p.eps * bc2.sqrt();
        sc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rho_matches_the_research_notes() {
        let expected = [1.0, 2.0, 3.0, 3.9975, 4.996, 5.994];
        for (i, e) in expected.iter().enumerate() {
            let r = rho_t(0.999, i as u64 + 1);
            assert!((r - e).abs() < 5e-3, "t={} rho={r}", i + 1);
        }
        // Rectification starts at t = 6 with r ~ 0.0258.
        let p = ParamsRanger::default();
        for t in 1..=5 {
            assert!(matches!(StepScalars::new(&p, 1e-3, 0.0, t).update, Update::Momentum { .. }));
        }
        let r6 = rectifier(0.999, 6).unwrap();
        assert!((r6 - 0.0258).abs() < 1e-4, "{r6}");
        assert!(matches!(StepScalars::new(&p, 1e-3, 0.0, 6).update, Update::Rectified { .. }));
    }

    #[test]
    fn step_size_is_never_negative() {
        for threshold in [-10.0, 0.0, 2.0, 4.0, 5.0, 100.0] {
            for b2 in [0.0, 0.5, 0.9, 0.99, 0.999, 0.99999] {
                let p = ParamsRanger { rectify_threshold: threshold, beta2: b2, ..Default::default() };
                for t in 1..200 {
                    match StepScalars::new(&p, 1e-3, 0.0, t).update {
                        Update::Rectified { step_size } | Update::Momentum { step_size } => {
                            assert!(step_size >= 0.0 && step_size.is_finite())
                        }
                        Update::None => {}
                    }
                }
            }
        }
    }

    #[test]
    fn lookahead_sync_every_k() {
        let p = ParamsRanger { lookahead_k: 3, ..Default::default() };
        let syncs: Vec<u64> = (1..=9).filter(|&t| StepScalars::new(&p, 1.0, 0.0, t).sync_alpha.is_some()).collect();
        assert_eq!(syncs, vec![3, 6, 9]);
        let off = ParamsRanger { lookahead_k: 0, ..Default::default() };
        assert!((1..=20).all(|t| StepScalars::new(&off, 1.0, 0.0, t).sync_alpha.is_none()));
    }
}
