//! Checkpoints: `checkpoint-<step>` folders written atomically and rotated, the best model
//! kept in `best/`, and the exact resume from a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::checkpoint_list::{find_checkpoint, list_checkpoints, previous_checkpoint, remove_checkpoint};
use super::checksums::{self, checksum_folder, verify};
use super::report::MetricsFile;
use super::state::TrainerState;
use super::Trainer;
use crate::error::{Result, TrainError};
use crate::folder_write::write_folder;
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
        let bad_state =
            |e: serde_json::Error| TrainError::Config { origin: sp.display().to_string(), message: e.to_string() };
        let mut json: serde_json::Value = serde_json::from_str(&text).map_err(bad_state)?;
        let sums = json.as_object_mut().and_then(|o| o.remove(checksums::KEY));
        let mut saved: TrainerState = serde_json::from_value(json).map_err(bad_state)?;
        saved.config.fill_legacy_defaults();
        let mismatches: Vec<String> =
            self.session.cfg.resume_mismatches(&saved.config).iter().map(ToString::to_string).collect();
        if !mismatches.is_empty() {
            return Err(TrainError::ResumeOptionsDiffer { checkpoint: dir, mismatches });
        }
        if saved.data_fingerprint != self.state.data_fingerprint {
            return Err(TrainError::ResumeDataDiffers { checkpoint: dir });
        }
        match sums {
            Some(sums) => {
                let sums = serde_json::from_value(sums).map_err(bad_state)?;
                verify(&dir, &sums, previous_checkpoint(&dir, saved.step))?;
            }
            None if self.verbose => {
                eprintln!(
                    "note: {} records no checksums (an older checkpoint): its files are not verified",
                    sp.display()
                );
            }
            None => {}
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
            // Written by an earlier version, whose AdamW (candle-nn's) could not save its state.
            if self.verbose {
                eprintln!("warning: this AdamW checkpoint has no optimizer state (an older version); moments restart from zero");
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
        write_folder(&dir, self.weight_bytes(), |tmp| {
            self.write_model(tmp)?;
            let results = BestResults { evaluation: eval, step: self.state.step, weights: self.weights_label() };
            write_json(&tmp.join("eval_results.json"), &serde_json::to_value(results).expect("evaluation"))
        })?;
        Ok(dir)
    }

    /// Writes `checkpoint-<step>` atomically (built under a temporary name, then renamed; a
    /// failed write leaves nothing behind), with the checksum of each of its files in its
    /// `trainer_state.json`, and prunes old ones.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let final_dir = self.checkpoint_dir();
        let state = self.optimizer.state_tensors()?;
        let state_bytes: u64 = state
            .tensors
            .iter()
            .map(|(_, t)| (t.dims().iter().product::<usize>() * t.dtype().size_in_bytes()) as u64)
            .sum();
        write_folder(&final_dir, self.weight_bytes() + state_bytes, |tmp| {
            let fast: Vec<(String, Tensor)> =
                self.session.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            crate::weights::save_safetensors_dir(tmp, &fast, usize::MAX)?;
            state.save(tmp.join("optimizer.safetensors"))?;
            let mut json = serde_json::to_value(&self.state).expect("state");
            json[checksums::KEY] = serde_json::to_value(checksum_folder(tmp)?).expect("checksums");
            write_json(&tmp.join("trainer_state.json"), &json)
        })?;
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
