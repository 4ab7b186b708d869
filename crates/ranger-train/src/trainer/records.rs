//! Typed records of a run, as the trainer hands them to its observers: one [`StepRecord`] per
//! line of `metrics.jsonl`, the evaluations, skipped steps, checkpoints and the end of the loop.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::StopReason;
use crate::classify::ClassCounts;
use crate::error::TrainError;
use crate::task::Evaluation;

/// One line of `metrics.jsonl`: a step's training figures and, when it evaluated, the
/// evaluation's. The baseline evaluation before training is a line of step 0 without training
/// figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps done (0 for the baseline evaluation).
    pub step: usize,
    /// What the step trained on and how (absent from the baseline).
    #[serde(flatten)]
    pub train: Option<TrainFigures>,
    /// The evaluation at this step, if one ran.
    #[serde(flatten)]
    pub eval: Option<EvalFigures>,
}

impl StepRecord {
    /// The line of the baseline evaluation `eval` (before training): its step, no training figures.
    pub fn baseline(eval: &EvalRecord) -> Self {
        Self { step: eval.step, train: None, eval: Some(EvalFigures::of(&eval.evaluation)) }
    }

    /// The record without the figures that measure the machine (tokens per second, peak
    /// memory): what two runs of the same training, straight or resumed, agree on bit for bit.
    pub fn without_timings(&self) -> Self {
        let mut r = self.clone();
        if let Some(t) = &mut r.train {
            t.tokens_per_sec = 0.0;
            t.peak_rss_bytes = None;
        }
        r
    }
}

/// The training figures of one optimizer step. Non-finite values are written as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainFigures {
    /// Mean loss per target token (or example) over the step's micro-batches.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Learning rate of the step.
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Gradient norm before clipping (NaN when the batch was skipped).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Non-padding tokens of the step.
    pub tokens: usize,
    /// The batch was skipped (non-finite loss with `on_nan = skip`).
    pub skipped: bool,
    /// Training throughput of the step.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_sec: f64,
    /// Peak resident memory of the process so far (Linux).
    pub peak_rss_bytes: Option<u64>,
    /// Epochs done (micro-batches consumed over micro-batches per epoch).
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch: f64,
}

/// The figures of an evaluation, as `metrics.jsonl` has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalFigures {
    /// Mean evaluation loss.
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_loss: f64,
    /// `exp(eval_loss)` (causal LMs).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_nan_if_null")]
    pub eval_perplexity: Option<f64>,
    /// Accuracy (classification).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_nan_if_null")]
    pub eval_accuracy: Option<f64>,
    /// Macro-F1 (classification).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_nan_if_null")]
    pub eval_macro_f1: Option<f64>,
    /// Per-class counts (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_per_class: Option<Vec<ClassCounts>>,
}

impl EvalFigures {
    /// The figures of `eval`.
    pub fn of(eval: &Evaluation) -> Self {
        let classes = eval.classes.as_ref();
        Self {
            eval_loss: eval.loss,
            eval_perplexity: classes.is_none().then(|| eval.loss.exp()),
            eval_accuracy: classes.map(|c| c.accuracy),
            eval_macro_f1: classes.map(|c| c.macro_f1),
            eval_per_class: classes.map(|c| c.per_class.clone()),
        }
    }
}

/// An evaluation during the run.
#[derive(Debug, Clone)]
pub struct EvalRecord {
    /// Optimizer steps done when it ran.
    pub step: usize,
    /// The result.
    pub evaluation: Evaluation,
    /// `slow` or `fast`: the weights evaluated.
    pub weights: &'static str,
    /// The baseline evaluation, before the first step of a fresh run.
    pub before_training: bool,
}

/// A step whose update was not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum SkipRecord {
    /// The loss was not finite (`on_nan = skip`): the batch was skipped.
    NonFiniteLoss {
        /// The step (1-based).
        step: usize,
        /// The loss.
        loss: f64,
    },
    /// The optimizer found non-finite gradients and skipped its update.
    NonFiniteGradient {
        /// The step (1-based).
        step: usize,
        /// The tensors concerned.
        tensors: Vec<String>,
    },
}

/// The start of a `run` call.
#[derive(Debug, Clone)]
pub struct RunStart<'a> {
    /// Steps already done (after a resume, or an earlier `run` call).
    pub step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// The records of the steps done so far.
    pub history: &'a [StepRecord],
}

/// A checkpoint about to be written: observers write what they keep first, so no file of
/// theirs is ever behind a checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointRecord<'a> {
    /// The step it holds.
    pub step: usize,
    /// Where it goes (`checkpoint-<step>`).
    pub dir: PathBuf,
    /// The records of the run up to this step.
    pub history: &'a [StepRecord],
}

/// The end of the training loop, before the final model is written.
#[derive(Debug)]
pub struct LoopEnd<'a> {
    /// Steps done.
    pub step: usize,
    /// Why the loop ended, or the error it stops with (a non-finite loss with `on_nan = stop`).
    pub outcome: std::result::Result<&'a StopReason, &'a TrainError>,
    /// The records of the run.
    pub history: &'a [StepRecord],
    /// Steps not yet in Lookahead's slow weights when those are evaluated and saved (else 0).
    pub unsynced_steps: usize,
    /// Lookahead's sync interval.
    pub lookahead_k: usize,
}

/// Peak resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// JSON has no NaN: serde_json writes non-finite floats as `null`, read back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`nan_if_null`] for a figure that may be absent: a `null` one is present (and NaN).
fn some_nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    nan_if_null(d).map(Some)
}
