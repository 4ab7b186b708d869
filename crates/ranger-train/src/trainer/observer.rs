//! How the training loop reports: every event goes to a list of [`TrainObserver`]s. The progress
//! bar and console lines, `metrics.jsonl` and the loss curve are observers (see
//! [`super::report`]); a library user adds their own with `Trainer::add_observer`.

use super::records::{CheckpointRecord, EvalRecord, LoopEnd, RunStart, SkipRecord, StepRecord};
use super::RunSummary;
use crate::error::Result;

/// Receives the events of a run, in this order: [`on_start`](Self::on_start) once per `run`
/// call; per step [`on_skip`](Self::on_skip) (when its update was skipped),
/// [`on_eval`](Self::on_eval) (when it evaluated), [`on_step`](Self::on_step) and
/// [`on_checkpoint`](Self::on_checkpoint) (before a checkpoint is written); then
/// [`on_loop_end`](Self::on_loop_end) and, unless the run failed, [`on_end`](Self::on_end) once
/// the model is written. Every method does nothing by default; an error stops the run.
pub trait TrainObserver: Send {
    /// A `run` call starts (or goes on after a resume or an earlier `run` call).
    fn on_start(&mut self, _start: &RunStart<'_>) -> Result<()> {
        Ok(())
    }

    /// An evaluation ran (also the baseline, before the first step of a fresh run).
    fn on_eval(&mut self, _eval: &EvalRecord) -> Result<()> {
        Ok(())
    }

    /// A step's update was skipped (non-finite loss or gradients).
    fn on_skip(&mut self, _skip: &SkipRecord) -> Result<()> {
        Ok(())
    }

    /// A step is done: its line of `metrics.jsonl`.
    fn on_step(&mut self, _step: &StepRecord) -> Result<()> {
        Ok(())
    }

    /// A checkpoint is about to be written.
    fn on_checkpoint(&mut self, _checkpoint: &CheckpointRecord<'_>) -> Result<()> {
        Ok(())
    }

    /// The training loop ended (or stops on an error), before the final model is written.
    fn on_loop_end(&mut self, _end: &LoopEnd<'_>) -> Result<()> {
        Ok(())
    }

    /// The run is over and its model written.
    fn on_end(&mut self, _summary: &RunSummary) -> Result<()> {
        Ok(())
    }
}

/// The observers of one `run` call: the built-in ones, then the user's.
pub(super) struct Observers(pub(super) Vec<Box<dyn TrainObserver>>);

impl Observers {
    /// Calls `f` on every observer in turn; the first error stops it.
    pub(super) fn each(&mut self, mut f: impl FnMut(&mut dyn TrainObserver) -> Result<()>) -> Result<()> {
        self.0.iter_mut().try_for_each(|o| f(o.as_mut()))
    }
}
