//! Evaluation on the validation set, on the weights `eval_weights` chooses, and the ranking of
//! evaluations that early stopping and the best model go by.

use super::Trainer;
use crate::config::{BestMetric, EvalWeights};
use crate::error::Result;
use crate::task::Evaluation;

impl Trainer {
    /// Evaluates the validation set (or `eval_batches` of it) on the weights chosen by
    /// `eval_weights`; `None` without validation data.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let bs = self.session.cfg.batch_size;
        let limit = self.session.cfg.eval_batches.unwrap_or(usize::MAX);
        let (task, pad) = (&self.session.task, self.session.tokenizer.pad_id);
        let run = || task.evaluate(bs, limit, pad);
        if self.session.cfg.eval_weights == EvalWeights::Slow && self.optimizer.has_lookahead() {
            self.optimizer.with_slow_weights(run)?
        } else {
            run()
        }
    }

    /// The score `metric_for_best` ranks evaluations by (lower is better).
    fn score(&self, eval: &Evaluation) -> f64 {
        let classes = eval.classes.as_ref();
        match self.session.cfg.metric_for_best {
            BestMetric::Loss => eval.loss,
            BestMetric::Accuracy => 1.0 - classes.map_or(0.0, |c| c.accuracy),
            BestMetric::F1 => 1.0 - classes.map_or(0.0, |c| c.macro_f1),
        }
    }

    /// Evaluates, and keeps count of the evaluations since the best one; a classifier's best
    /// model so far is kept in `best/`.
    pub(super) fn evaluate_and_rank(&mut self) -> Result<Option<Evaluation>> {
        let Some(eval) = self.evaluate()? else { return Ok(None) };
        let score = self.score(&eval);
        if score.is_finite() && self.state.best_score.is_none_or(|b| score < b) {
            self.state.best_score = Some(score);
            self.state.evals_without_improvement = 0;
            if self.session.task.classifier().is_some() {
                self.save_best(&eval)?;
            }
        } else {
            self.state.evals_without_improvement += 1;
        }
        Ok(Some(eval))
    }

    /// The baseline evaluation before the first step. A causal LM's counts for early stopping;
    /// a classifier's fresh head is no model worth keeping as the best.
    pub(super) fn evaluate_baseline(&mut self) -> Result<Option<Evaluation>> {
        let Some(eval) = self.evaluate()? else { return Ok(None) };
        if self.session.task.causal_lm().is_some() {
            self.state.best_score = Some(self.score(&eval)).filter(|s| s.is_finite());
        }
        Ok(Some(eval))
    }

    /// `slow` or `fast`: the weights evaluated and saved as the model.
    pub(super) fn weights_label(&self) -> &'static str {
        if self.session.cfg.eval_weights == EvalWeights::Slow && self.optimizer.has_lookahead() {
            "slow"
        } else {
            "fast"
        }
    }
}
