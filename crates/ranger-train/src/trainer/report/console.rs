//! The console: a progress bar on a terminal, with evaluations and skipped steps printed above
//! it; plain lines on stderr (every `log_every` steps) when stderr is no terminal.

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::Result;
use crate::task::Evaluation;
use crate::trainer::observer::TrainObserver;
use crate::trainer::records::{EvalRecord, LoopEnd, RunStart, SkipRecord, StepRecord};

/// Reports progress on stderr; silent unless `verbose`.
pub struct Console {
    bar: ProgressBar,
    verbose: bool,
    /// Verbose without a bar (stderr is no terminal): plain lines instead.
    plain: bool,
    log_every: usize,
    total_steps: usize,
}

impl Console {
    /// A console for a run of `total_steps`, with a plain line every `log_every` steps when
    /// there is no bar.
    pub fn new(verbose: bool, total_steps: usize, log_every: usize) -> Self {
        let bar = if verbose { ProgressBar::new(total_steps as u64) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("template"),
        );
        let plain = verbose && bar.is_hidden();
        Self { bar, verbose, plain, log_every, total_steps }
    }

    /// A message above the bar, or straight to stderr when there is no bar.
    fn say(&self, msg: String) {
        if self.plain {
            eprintln!("{msg}");
        } else if self.verbose {
            self.bar.println(msg);
        }
    }
}

impl TrainObserver for Console {
    fn on_start(&mut self, start: &RunStart<'_>) -> Result<()> {
        self.bar.set_position(start.step as u64);
        Ok(())
    }

    fn on_eval(&mut self, eval: &EvalRecord) -> Result<()> {
        if eval.before_training {
            self.say(format!("step {}: {} (before training)", eval.step, describe(&eval.evaluation)));
        } else {
            self.say(format!("step {}: {} ({} weights)", eval.step, describe(&eval.evaluation), eval.weights));
        }
        Ok(())
    }

    fn on_skip(&mut self, skip: &SkipRecord) -> Result<()> {
        match skip {
            SkipRecord::NonFiniteLoss { step, loss } => {
                self.say(format!("step {step}: non-finite loss {loss}, batch skipped"))
            }
            SkipRecord::NonFiniteGradient { step, tensors } => {
                self.say(format!("step {step}: non-finite gradient in {}, step skipped", tensors.join(", ")))
            }
        }
        Ok(())
    }

    fn on_step(&mut self, record: &StepRecord) -> Result<()> {
        let Some(t) = &record.train else { return Ok(()) };
        let (step, loss, lr, tps) = (record.step, t.loss, t.lr, t.tokens_per_sec);
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        if self.plain && (step.is_multiple_of(self.log_every.max(1)) || step == self.total_steps) {
            eprintln!(
                "step {step}/{}: loss {loss:.4} lr {lr:.3e} grad_norm {:.3} {tps:.0} tok/s",
                self.total_steps, t.grad_norm
            );
        }
        Ok(())
    }

    fn on_loop_end(&mut self, end: &LoopEnd<'_>) -> Result<()> {
        if end.outcome.is_err() {
            return Ok(());
        }
        self.bar.finish_and_clear();
        let (unsynced, k) = (end.unsynced_steps, end.lookahead_k);
        if unsynced > 0 && self.verbose {
            eprintln!(
                "note: the last {unsynced} steps are not yet in the slow weights (Lookahead syncs every {k} steps); \
                 the evaluation and the saved model use the slow weights. A step count that is a multiple of {k}, \
                 or --eval-weights fast, includes them."
            );
        }
        Ok(())
    }
}

/// One line about an evaluation.
pub fn describe(eval: &Evaluation) -> String {
    match &eval.classes {
        None => format!("eval loss {:.4}, perplexity {:.2}", eval.loss, eval.loss.exp()),
        Some(c) => format!(
            "eval loss {:.4}, accuracy {:.4}, macro-F1 {:.4} on {} examples",
            eval.loss, c.accuracy, c.macro_f1, c.examples
        ),
    }
}
