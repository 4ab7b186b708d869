//! What a run did ([`RunSummary`]) and why it ended ([`StopReason`]).

use std::fmt;
use std::path::PathBuf;

use serde::{Serialize, Serializer};

use crate::task::Evaluation;

/// Why a run ended. Written (and serialized) as the words `ranger-tune` has always shown:
/// `completed`, `interrupted`, `early stopping: no eval improvement in N evaluations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Every step was done.
    Completed,
    /// The stop flag was set (`ranger-tune` sets it on SIGINT, SIGTERM and SIGHUP): the last step
    /// was checkpointed, no model written.
    Interrupted,
    /// `early_stopping_patience` evaluations in a row did not improve on the best.
    EarlyStopped {
        /// Evaluations since the best one.
        evaluations: usize,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Completed => f.write_str("completed"),
            Self::Interrupted => f.write_str("interrupted"),
            Self::EarlyStopped { evaluations } => {
                write!(f, "early stopping: no eval improvement in {evaluations} evaluations")
            }
        }
    }
}

impl Serialize for StopReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl PartialEq<str> for StopReason {
    // The text is built for the comparison: the early-stop reason carries a count.
    #[allow(clippy::cmp_owned)]
    fn eq(&self, other: &str) -> bool {
        self.to_string() == other
    }
}

impl PartialEq<&str> for StopReason {
    fn eq(&self, other: &&str) -> bool {
        self == *other
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Optimizer steps done.
    pub steps: usize,
    /// Tokens trained on.
    pub tokens: u64,
    /// Wall time of this invocation in seconds.
    pub wall_seconds: f64,
    /// Final evaluation loss, if there was validation data.
    pub eval_loss: Option<f64>,
    /// `exp(eval_loss)` (causal LMs).
    pub eval_perplexity: Option<f64>,
    /// Final evaluation accuracy (classification).
    pub eval_accuracy: Option<f64>,
    /// Final evaluation macro-F1 (classification).
    pub eval_macro_f1: Option<f64>,
    /// The best model kept during training (classification with validation data).
    pub best_model: Option<PathBuf>,
    /// Its evaluation.
    pub best_evaluation: Option<Evaluation>,
    /// Training loss of the last step.
    pub last_train_loss: Option<f64>,
    /// Where the model was written (None when interrupted).
    pub output: Option<PathBuf>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// `slow` or `fast`: the weights used for evaluation and the saved model.
    pub weights: &'static str,
    /// Why the run ended.
    pub stopped: StopReason,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_serialize_to_the_words_shown_before() {
        let json = |r: StopReason| serde_json::to_string(&r).unwrap();
        assert_eq!(json(StopReason::Completed), "\"completed\"");
        assert_eq!(json(StopReason::Interrupted), "\"interrupted\"");
        assert_eq!(
            json(StopReason::EarlyStopped { evaluations: 3 }),
            "\"early stopping: no eval improvement in 3 evaluations\""
        );
        assert_eq!(StopReason::Interrupted, "interrupted");
    }
}
