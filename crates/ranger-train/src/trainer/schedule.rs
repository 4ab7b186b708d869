//! The learning-rate schedule of a run, from its options.

use candle_ranger::{Decay, Schedule};

use crate::config::{ScheduleKind, TrainConfig};

/// The schedule of a run of `total` steps.
pub fn schedule_for(cfg: &TrainConfig, total: usize) -> Schedule {
    let warmup = cfg.warmup_steps.unwrap_or((cfg.warmup_ratio * total as f64).round() as usize);
    let decay = match cfg.lr_scheduler {
        ScheduleKind::Cosine => Decay::Cosine,
        ScheduleKind::Linear => Decay::Linear,
        ScheduleKind::Constant => Decay::Constant,
        ScheduleKind::FlatCosine => Decay::FlatThenCosine { flat_fraction: cfg.flat_fraction },
    };
    Schedule { base_lr: cfg.lr(), min_lr: cfg.lr() * cfg.min_lr_ratio, warmup_steps: warmup, total_steps: total, decay }
}
