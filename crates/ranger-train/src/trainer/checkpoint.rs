//! Checkpoints: `checkpoint-<step>` folders written atomically and rotated, the best model
//! kept in `best/`, and the exact resume from a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::checkpoint_list::{find_checkpoint, list_checkpoints, remove_checkpoint};
use super::report::MetricsFile;
use super::state::TrainerState;
use super::Trainer;
use crate::error::{Result, TrainError};
use crate::optim::TrainOptimizer;
use crate::output::write_json;
use crate::task::Evaluation;

impl Trainer {
    /// Restores the weights, optimizer state, counters and metrics of the checkpoint at `path`
    /// (or the latest in it), after checking it was made with the same options and data.
    pub(super) fn resume_from(&mut self, path: &Path) -> Result<()> {
        let dir = find_checkpoint(path)?;
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(TrainError::io(&sp))?;
        let saved: TrainerState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Config { origin: sp.display().to_string(), message: e.to_string() })?;
        let mismatches: Vec<String> =
            self.session.cfg.resume_mismatches(&saved.config).iter().map(ToString::to_string).collect();
        if !mismatches.is_empty() {
            return Err(TrainError::ResumeOptionsDiffer { checkpoint: dir, mismatches });
        }
        if saved.data_fingerprint != self.state.data_fingerprint {
            return Err(TrainError::ResumeDataDiffers { checkpoint: dir });
        }
        // Weights: every variable must be in the checkpoint with its shape and dtype.
        let mp = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&mp, &Device::Cpu)
            .map_err(|source| TrainError::CheckpointWeights { path: mp.clone(), source })?;
        for (name, var) in &self.session.vars {
            let t = tensors.get(name).ok_or_else(|| TrainError::Weights {
                origin: mp.display().to_string(),
                tensor: name.clone(),
                problem: "missing".into(),
            })?;
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(TrainError::Weights {
                    origin: mp.display().to_string(),
                    tensor: name.clone(),
                    problem: format!(
                        "{:?} {:?} in the checkpoint, {:?} {:?} expected",
                        t.dims(),
                        t.dtype(),
                        var.dims(),
                        var.dtype()
                    ),
                });
            }
        }
        for (name, var) in &self.session.vars {
            var.set(&tensors[name].to_device(var.device())?)?;
        }
        let op = dir.join("optimizer.safetensors");
        if op.exists() {
            self.optimizer.load_state(&op)?;
        } else if matches!(self.optimizer, TrainOptimizer::AdamW(..)) {
            if self.verbose {
                eprintln!("warning: AdamW's state cannot be saved; its moments restart from zero");
            }
        } else {
            return Err(TrainError::MissingOptimizerState { checkpoint: dir });
        }
        let total = self.state.total_steps;
        self.state = saved;
        self.state.total_steps = total;
        self.state.config = self.session.cfg.clone();
        // Keep the metrics of the steps before the checkpoint only.
        let step = self.state.step;
        self.history = MetricsFile::read(&self.output.join("metrics.jsonl"));
        self.history.retain(|r| r.step <= step);
        if self.verbose {
            eprintln!("resumed from {} at step {}", dir.display(), self.state.step);
        }
        Ok(())
    }

    /// Keeps the best model so far in `best/` (classification runs with validation data):
    /// written under a temporary name, then swapped in, so a crash leaves a complete one.
    pub(super) fn save_best(&self, eval: &Evaluation) -> Result<PathBuf> {
        let dir = self.output.join("best");
        let tmp = self.output.join(format!(".best.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        self.write_model(&tmp)?;
        let results = BestResults { evaluation: eval, step: self.state.step, weights: self.weights_label() };
        write_json(&tmp.join("eval_results.json"), &serde_json::to_value(results).expect("evaluation"))?;
        let old = self.output.join(format!(".best.old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(TrainError::io(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(TrainError::io(&dir))?;
        let _ = std::fs::remove_dir_all(&old);
        candle_ranger::state_file::sync_parent(&dir);
        Ok(dir)
    }

    /// Writes `checkpoint-<step>` atomically (built under a temporary name, then renamed) and
    /// prunes old ones.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let final_dir = self.checkpoint_dir();
        let tmp = self.output.join(format!(".checkpoint-{}.partial-{}", self.state.step, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
        let fast: Vec<(String, Tensor)> =
            self.session.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        crate::weights::save_safetensors_dir(&tmp, &fast, usize::MAX)?;
        self.optimizer.save_state(&tmp.join("optimizer.safetensors"))?;
        write_json(&tmp.join("trainer_state.json"), &serde_json::to_value(&self.state).expect("state"))?;
        // A checkpoint of this step already there (a run resumed from an earlier one) is moved
        // aside, not deleted in place: a process killed meanwhile (a second Ctrl-C) leaves no
        // half-deleted folder that still looks complete to a resume.
        let old = self.output.join(format!(".checkpoint-{}.old-{}", self.state.step, std::process::id()));
        if final_dir.exists() {
            std::fs::rename(&final_dir, &old).map_err(TrainError::io(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&final_dir))?;
        candle_ranger::state_file::sync_parent(&final_dir);
        let _ = std::fs::remove_dir_all(&old);
        // Rotate among this run's checkpoints up to now; later-numbered ones (left by a run that
        // was resumed from an earlier checkpoint) are not ours to delete, and the new one stays.
        let ours: Vec<(usize, PathBuf)> =
            list_checkpoints(&self.output)?.into_iter().filter(|(n, _)| *n <= self.state.step).collect();
        let keep = self.session.cfg.save_total_limit.max(1);
        for (_, p) in ours.iter().take(ours.len().saturating_sub(keep)) {
            if *p != final_dir {
                remove_checkpoint(p);
            }
        }
        Ok(final_dir)
    }

    /// Where the checkpoint of the current step goes.
    pub(super) fn checkpoint_dir(&self) -> PathBuf {
        self.output.join(format!("checkpoint-{}", self.state.step))
    }

    /// The best model kept in `best/` and its evaluation (classification runs that evaluated).
    pub(super) fn best_model(&self) -> (Option<PathBuf>, Option<Evaluation>) {
        let dir = self.output.join("best");
        let evaluation: Option<Evaluation> =
            std::fs::read_to_string(dir.join("eval_results.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
        let dir = (self.session.task.classifier().is_some() && evaluation.is_some()).then_some(dir);
        (dir, evaluation)
    }
}

/// `best/eval_results.json`: the evaluation, the step and the weights evaluated.
#[derive(Serialize)]
struct BestResults<'a> {
    #[serde(flatten)]
    evaluation: &'a Evaluation,
    step: usize,
    weights: &'static str,
}
