//! The trainer: a [`Session`] (model, data, options; see [`prepare`]) trained by a [`Trainer`],
//! whose loop reports through [`TrainObserver`]s. One module per part: session setup, the step
//! (accumulation, clipping, NaN policy), evaluation, checkpoints with exact resume, the model
//! written at the end, and the reports ([`report`]: progress, `metrics.jsonl`, loss curve).

mod checkpoint;
mod checkpoint_list;
mod checksums;
mod evaluate;
mod export;
pub mod observer;
pub mod output_lock;
pub mod records;
pub mod report;
mod schedule;
mod session;
mod state;
mod step;
mod summary;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use checkpoint_list::find_checkpoint;
pub use checksums::FileChecksum;
pub use observer::TrainObserver;
pub use output_lock::{LockHolder, OutputLock};
pub use records::{
    peak_rss_bytes, CheckpointRecord, EvalFigures, EvalRecord, LoopEnd, RunStart, SkipRecord, StepRecord, TrainFigures,
};
pub use schedule::schedule_for;
pub use session::{prepare, prepare_with_model, Session};
pub use state::TrainerState;
pub use summary::{RunSummary, StopReason};

use crate::error::{Result, TrainError};
use crate::optim::TrainOptimizer;
use observer::Observers;
use report::{Console, LossCurve, MetricsFile};

/// Runs one training job.
pub struct Trainer {
    session: Session,
    optimizer: TrainOptimizer,
    state: TrainerState,
    stop: Arc<AtomicBool>,
    verbose: bool,
    output: PathBuf,
    /// The records of the run so far: the lines of `metrics.jsonl`.
    history: Vec<StepRecord>,
    /// The user's observers, called after the built-in ones.
    observers: Vec<Box<dyn TrainObserver>>,
    /// A lock on the output folder taken before the trainer was built, for `run` to keep.
    output_lock: Option<OutputLock>,
    /// What the options left unset were set to, and why (said when the run starts).
    chosen_defaults: Vec<String>,
}

impl Trainer {
    /// Builds the trainer; resumes when `cfg.resume` is set.
    pub fn new(mut session: Session) -> Result<Self> {
        // Whole epochs of micro-batches, grouped into optimizer steps (the last may span an
        // epoch boundary, never more than one step's worth).
        let micro_batches = session.task.batches_per_epoch() * session.cfg.epochs.max(1);
        let total_steps =
            session.cfg.max_steps.unwrap_or(micro_batches.div_ceil(session.cfg.grad_accumulation_steps)).max(1);
        let chosen_defaults = session.cfg.fill_run_defaults(total_steps);
        let cfg = session.cfg.clone();
        let optimizer = TrainOptimizer::new(&cfg, session.vars.clone())?;
        let state = TrainerState {
            step: 0,
            micro_step: 0,
            total_steps,
            best_score: None,
            evals_without_improvement: 0,
            tokens_seen: 0,
            train_seconds: 0.0,
            data_fingerprint: session.task.fingerprint(),
            config: cfg.clone(),
        };
        let output = PathBuf::from(&cfg.output);
        let mut t = Self {
            session,
            optimizer,
            state,
            stop: Arc::new(AtomicBool::new(false)),
            verbose: true,
            output,
            history: vec![],
            observers: vec![],
            output_lock: None,
            chosen_defaults,
        };
        if let Some(r) = cfg.resume.clone() {
            t.resume_from(Path::new(&r))?;
        }
        Ok(t)
    }

    /// The loaded session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Progress and counters.
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &TrainOptimizer {
        &self.optimizer
    }

    /// The records of the run so far (the lines of `metrics.jsonl`).
    pub fn history(&self) -> &[StepRecord] {
        &self.history
    }

    /// Where the run writes its checkpoints, metrics and model.
    pub fn output_dir(&self) -> &Path {
        &self.output
    }

    /// A flag that, once set (e.g. by a Ctrl-C handler), makes the run checkpoint and stop
    /// after the current step.
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Whether the run shows a progress bar / log lines on stderr (the default).
    pub fn verbose(&self) -> bool {
        self.verbose
    }

    /// Shows (or hides) the progress bar and log lines on stderr.
    pub fn set_verbose(&mut self, verbose: bool) {
        self.verbose = verbose;
    }

    /// Hands over a lock on the output folder taken before the session was prepared (so a
    /// second run into the folder fails before loading its model); `run` keeps it to its end.
    /// Without one, `run` locks the folder itself.
    pub fn keep_output_lock(&mut self, lock: OutputLock) {
        self.output_lock = Some(lock);
    }

    /// Adds an observer of the run's events, called after the built-in ones.
    pub fn add_observer(&mut self, observer: Box<dyn TrainObserver>) {
        self.observers.push(observer);
    }

    /// Runs `f` on the session with the weights evaluated and saved as the model: the slow
    /// weights when there are any, else the current ones.
    pub fn with_slow_weights<R>(&mut self, f: impl FnOnce(&Session) -> R) -> Result<R> {
        let session = &self.session;
        self.optimizer.with_slow_weights(|| f(session))
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.session.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Runs to the end (or until stopped), writes the model and returns the summary. The output
    /// folder is locked while it runs (see [`OutputLock`]).
    pub fn run(&mut self) -> Result<RunSummary> {
        let started = Instant::now();
        let _lock = self.lock_output()?;
        if self.verbose {
            for note in &self.chosen_defaults {
                eprintln!("{note}");
            }
        }
        let builtin: Vec<Box<dyn TrainObserver>> = vec![
            Box::new(Console::new(self.verbose, self.state.total_steps, self.session.cfg.log_every)),
            Box::new(MetricsFile::new(self.output.join("metrics.jsonl"))),
            Box::new(LossCurve::new(self.output.join("loss_curve.svg"))),
        ];
        let n = builtin.len();
        let mut observers = Observers(builtin.into_iter().chain(self.observers.drain(..)).collect());
        let result = self.run_loop(&mut observers, started);
        self.observers = observers.0.split_off(n);
        result
    }

    /// The lock on the output folder: the one handed over, else a new one. Holding it, the run
    /// removes what a run that died mid-write left there.
    fn lock_output(&mut self) -> Result<OutputLock> {
        let lock = match self.output_lock.take() {
            Some(lock) if lock.dir() == self.output => lock,
            _ => OutputLock::acquire(&self.output)?,
        };
        let removed = crate::folder_write::remove_leftovers(&self.output);
        if self.verbose {
            if let Some(note) = lock.stale_note() {
                eprintln!("{note}");
            }
            for path in removed {
                eprintln!("note: removed {}, left by an interrupted write", path.display());
            }
        }
        Ok(lock)
    }

    fn run_loop(&mut self, obs: &mut Observers, started: Instant) -> Result<RunSummary> {
        let cfg = self.session.cfg.clone();
        let schedule = schedule_for(&cfg, self.state.total_steps);
        let start = RunStart { step: self.state.step, total_steps: self.state.total_steps, history: &self.history };
        obs.each(|o| o.on_start(&start))?;
        let (mut last_loss, mut last_checkpoint, mut stopped) = (None, None, StopReason::Completed);
        // The missing-gradient check runs on the first step of a fresh run that has a finite loss.
        let mut check_gradients = self.state.step == 0;
        if self.state.step == 0 {
            // The baseline, so the metrics show what training changed.
            if let Some(eval) = self.evaluate_baseline()? {
                let record =
                    EvalRecord { step: 0, evaluation: eval, weights: self.weights_label(), before_training: true };
                self.history.push(StepRecord::baseline(&record));
                obs.each(|o| o.on_eval(&record))?;
            }
        }
        while self.state.step < self.state.total_steps {
            let step_start = Instant::now();
            let lr = schedule.lr_at(self.state.step);
            let done = match self.optimizer_step(lr, &mut check_gradients) {
                Err(e @ TrainError::NonFiniteLoss { .. }) => return self.stop_on_error(obs, e),
                r => r?,
            };
            if let Some(skip) = &done.skipped {
                obs.each(|o| o.on_skip(skip))?;
            }
            let secs = step_start.elapsed().as_secs_f64();
            self.state.step += 1;
            self.state.micro_step += cfg.grad_accumulation_steps;
            self.state.tokens_seen += done.tokens as u64;
            self.state.train_seconds += secs;
            if done.loss.is_finite() {
                last_loss = Some(done.loss);
            }
            let step = self.state.step;
            let train = TrainFigures {
                loss: done.loss,
                lr,
                grad_norm: done.grad_norm,
                tokens: done.tokens,
                skipped: !done.loss.is_finite(),
                tokens_per_sec: done.tokens as f64 / secs.max(1e-9),
                peak_rss_bytes: peak_rss_bytes(),
                epoch: self.state.micro_step as f64 / self.session.task.batches_per_epoch() as f64,
            };
            let is_last = step == self.state.total_steps;
            let mut eval = None;
            if (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || is_last {
                if let Some(e) = self.evaluate_and_rank()? {
                    eval = Some(EvalFigures::of(&e));
                    let record =
                        EvalRecord { step, evaluation: e, weights: self.weights_label(), before_training: false };
                    obs.each(|o| o.on_eval(&record))?;
                }
            }
            let record = StepRecord { step, train: Some(train), eval };
            obs.each(|o| o.on_step(&record))?;
            self.history.push(record);
            let patience_hit = cfg.early_stopping_patience.is_some_and(|p| self.state.evals_without_improvement >= p);
            let interrupted = self.stop.load(Ordering::SeqCst);
            if (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every)) || interrupted || patience_hit || is_last {
                let record = CheckpointRecord { step, dir: self.checkpoint_dir(), history: &self.history };
                obs.each(|o| o.on_checkpoint(&record))?;
                last_checkpoint = Some(self.save_checkpoint()?);
            }
            if interrupted {
                stopped = StopReason::Interrupted;
                break;
            }
            if patience_hit {
                stopped = StopReason::EarlyStopped { evaluations: self.state.evals_without_improvement };
                break;
            }
        }
        self.finish(obs, started, stopped, last_loss, last_checkpoint)
    }

    /// Ends the loop on an error: the observers still write what they keep.
    fn stop_on_error(&mut self, obs: &mut Observers, error: TrainError) -> Result<RunSummary> {
        let end = LoopEnd {
            step: self.state.step,
            outcome: Err(&error),
            history: &self.history,
            unsynced_steps: 0,
            lookahead_k: self.session.cfg.lookahead_k,
        };
        obs.each(|o| o.on_loop_end(&end))?;
        Err(error)
    }

    /// Writes the model (unless interrupted) and sums the run up.
    fn finish(
        &mut self,
        obs: &mut Observers,
        started: Instant,
        stopped: StopReason,
        last_train_loss: Option<f64>,
        checkpoint: Option<PathBuf>,
    ) -> Result<RunSummary> {
        let k = self.session.cfg.lookahead_k;
        let unsynced_steps = if self.weights_label() == "slow" && k > 0 { self.state.step % k } else { 0 };
        let end = LoopEnd {
            step: self.state.step,
            outcome: Ok(&stopped),
            history: &self.history,
            unsynced_steps,
            lookahead_k: k,
        };
        obs.each(|o| o.on_loop_end(&end))?;
        // The latest finite figure of each kind (JSON has no NaN: the others were never read).
        let last_eval = |figure: fn(&EvalFigures) -> Option<f64>| {
            self.history.iter().rev().find_map(|r| r.eval.as_ref().and_then(figure).filter(|x| x.is_finite()))
        };
        let eval_loss = last_eval(|e| Some(e.eval_loss));
        let (eval_accuracy, eval_macro_f1) = (last_eval(|e| e.eval_accuracy), last_eval(|e| e.eval_macro_f1));
        let output = if stopped == StopReason::Interrupted {
            None
        } else {
            let dir = self.output.join(if self.session.cfg.lora { "adapter" } else { "model" });
            crate::folder_write::write_folder(&dir, self.weight_bytes(), |tmp| self.write_model(tmp))?;
            Some(dir)
        };
        let (best_model, best_evaluation) = self.best_model();
        let summary = RunSummary {
            trainable_parameters: self.trainable_parameters(),
            steps: self.state.step,
            tokens: self.state.tokens_seen,
            wall_seconds: started.elapsed().as_secs_f64(),
            eval_loss,
            eval_perplexity: if self.session.task.causal_lm().is_some() { eval_loss.map(f64::exp) } else { None },
            eval_accuracy,
            eval_macro_f1,
            best_model,
            best_evaluation,
            last_train_loss,
            output,
            checkpoint,
            weights: self.weights_label(),
            stopped,
        };
        obs.each(|o| o.on_end(&summary))?;
        Ok(summary)
    }
}
