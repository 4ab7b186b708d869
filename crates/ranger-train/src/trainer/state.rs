//! The trainer's progress, saved with every checkpoint as `trainer_state.json` (next to the
//! checksums of the checkpoint's files, under `checksums`).

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

/// Saved with every checkpoint; what resuming needs besides weights and optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Micro-batches consumed (the data position).
    pub micro_step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Best score so far of the metric chosen by `metric_for_best` (lower is better: the
    /// loss, or 1 - accuracy / 1 - macro-F1).
    #[serde(alias = "best_eval_loss")]
    pub best_score: Option<f64>,
    /// Evaluations since the best one.
    pub evals_without_improvement: usize,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Training seconds so far.
    pub train_seconds: f64,
    /// Identifies the data, so a resume on other data is refused.
    pub data_fingerprint: String,
    /// The options of the run.
    pub config: TrainConfig,
}
