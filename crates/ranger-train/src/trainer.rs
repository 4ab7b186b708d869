//! The training loop: gradient accumulation, clipping, schedules, evaluation, checkpoints with
//! exact resume, early stopping, NaN handling, Ctrl-C, metrics and the final model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_ranger::{clip_grad_norm, grad_norm, Decay, Schedule};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{parse_device, EvalWeights, NanPolicy, ScheduleKind, TrainConfig};
use crate::data::{collate, load_file, split_validation, to_sequences, DataOptions, Loader, Sequence};
use crate::error::{Result, TrainError};
use crate::model::{causal_lm_loss_sum, ops::compute_dtype, LlamaModel, LoraConfig};
use crate::optim::TrainOptimizer;
use crate::output::{save_hf_folder, write_json};
use crate::source::{self, HubOptions, LoadedModel};
use crate::tokenizer::TextTokenizer;
use crate::weights::{into_tensors, into_vars};

/// Everything a run needs, loaded and ready.
pub struct Session {
    /// The options.
    pub cfg: TrainConfig,
    /// The model.
    pub model: LlamaModel,
    /// Trainable variables by Hugging Face name.
    pub vars: Vec<(String, Var)>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// `generation_config.json` of the source.
    pub generation_config: Option<Value>,
    /// Training batches.
    pub train: Loader,
    /// Validation sequences.
    pub val: Vec<Sequence>,
    /// The device.
    pub device: Device,
    /// Where the model came from.
    pub origin: String,
}

/// Saved with every checkpoint; what resuming needs besides weights and optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Micro-batches consumed (the data position).
    pub micro_step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Best evaluation loss so far.
    pub best_eval_loss: Option<f64>,
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
    /// `exp(eval_loss)`.
    pub eval_perplexity: Option<f64>,
    /// Training loss of the last step.
    pub last_train_loss: Option<f64>,
    /// Where the model was written (None when interrupted).
    pub output: Option<PathBuf>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// `slow` or `fast`: the weights used for evaluation and the saved model.
    pub weights: &'static str,
    /// Why the run ended.
    pub stopped: String,
}

/// Prepares a run: loads the model, tokenizer and data.
pub fn prepare(cfg: TrainConfig) -> Result<Session> {
    let device = parse_device(&cfg.device)?;
    let loaded = source::load(&cfg.model, &HubOptions { revision: cfg.revision.clone() })?;
    prepare_with_model(cfg, loaded, device)
}

/// Like [`prepare`] with the model already loaded.
pub fn prepare_with_model(cfg: TrainConfig, loaded: LoadedModel, device: Device) -> Result<Session> {
    if cfg.batch_size == 0 || cfg.grad_accumulation_steps == 0 || cfg.max_seq_length < 2 {
        return Err(TrainError::Msg("batch_size and grad_accumulation_steps must be >= 1, max_seq_length >= 2".into()));
    }
    let LoadedModel { config, weights, tokenizer, generation_config, origin } = loaded;
    let missing = |n: String| TrainError::Weights { origin: origin.clone(), tensor: n, problem: "missing".into() };
    let (model, vars) = if cfg.lora {
        if cfg.lora_dropout != 0.0 {
            return Err(TrainError::Msg("lora_dropout > 0 is not supported yet (it would make resume inexact); use 0".into()));
        }
        if cfg.lora_rank == 0 {
            return Err(TrainError::Msg("lora_rank must be >= 1".into()));
        }
        let known = LoraConfig::default().targets;
        if let Some(bad) = cfg.lora_targets.iter().find(|t| !known.contains(t)) {
            return Err(TrainError::Msg(format!("unknown LoRA target {bad:?} (known: {})", known.join(", "))));
        }
        // Frozen base: plain tensors, so no gradient is ever computed or stored for them.
        let base: HashMap<String, Tensor> = into_tensors(&config, weights, cfg.dtype.dtype(), &device, &origin)?.into_iter().collect();
        let mut model = LlamaModel::new(config, &base).map_err(missing)?;
        let vars = match &cfg.lora_adapter {
            Some(dir) => crate::peft::load_peft_adapter(&mut model, Path::new(dir))?,
            None => model.add_lora(&LoraConfig { rank: cfg.lora_rank, alpha: cfg.lora_alpha, targets: cfg.lora_targets.clone() }, cfg.seed)?,
        };
        (model, vars)
    } else {
        let vars = into_vars(&config, weights, cfg.dtype.dtype(), &device, &origin)?;
        (LlamaModel::from_vars(config, &vars).map_err(missing)?, vars)
    };
    let opts = DataOptions { max_seq_len: cfg.max_seq_length, pack: cfg.pack, mask_prompt: cfg.mask_prompt };
    let train_data = load_file(Path::new(&cfg.data), &tokenizer, &opts)?;
    let (train_examples, val_examples) = match &cfg.validation_file {
        Some(v) => (train_data.examples, load_file(Path::new(v), &tokenizer, &DataOptions { pack: false, ..opts })?.examples),
        None if cfg.val_split > 0.0 => split_validation(train_data.examples, cfg.val_split, cfg.seed),
        None => (train_data.examples, vec![]),
    };
    if train_examples.is_empty() {
        return Err(TrainError::EmptyDataset(format!("{}: no training example left after the validation split", cfg.data)));
    }
    let train = Loader::new(to_sequences(&train_examples, &opts), cfg.batch_size, cfg.seed);
    let val = to_sequences(&val_examples, &DataOptions { pack: false, ..opts });
    Ok(Session { cfg, model, vars, tokenizer, generation_config, train, val, device, origin })
}

fn fingerprint(seqs: &[Sequence]) -> String {
    // FNV-1a over every token id: cheap, and any change to the data shows.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in seqs {
        for &t in s.ids.iter().chain(std::iter::once(&u32::MAX)) {
            for b in t.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    format!("{}-seq-{h:016x}", seqs.len())
}

/// Peak resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The schedule of a run of `total` steps.
pub fn schedule_for(cfg: &TrainConfig, total: usize) -> Schedule {
    let warmup = cfg.warmup_steps.unwrap_or((cfg.warmup_ratio * total as f64).round() as usize);
    let decay = match cfg.lr_scheduler {
        ScheduleKind::Cosine => Decay::Cosine,
        ScheduleKind::Linear => Decay::Linear,
        ScheduleKind::Constant => Decay::Constant,
        ScheduleKind::FlatCosine => Decay::FlatThenCosine { flat_fraction: cfg.flat_fraction },
    };
    Schedule { base_lr: cfg.learning_rate, min_lr: cfg.learning_rate * cfg.min_lr_ratio, warmup_steps: warmup, total_steps: total, decay }
}

/// Options that must not change across a resume.
fn resume_key(cfg: &TrainConfig) -> Value {
    json!({
        "model": cfg.model, "data": cfg.data, "max_seq_length": cfg.max_seq_length, "pack": cfg.pack,
        "mask_prompt": cfg.mask_prompt, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size,
        "grad_accumulation_steps": cfg.grad_accumulation_steps, "seed": cfg.seed, "dtype": cfg.dtype,
        "learning_rate": cfg.learning_rate, "lookahead_k": cfg.lookahead_k, "val_split": cfg.val_split,
        "lookahead_alpha": cfg.lookahead_alpha, "centralize": cfg.centralize, "beta1": cfg.beta1, "beta2": cfg.beta2,
        "eps": cfg.eps, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "lr_scheduler": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps, "warmup_ratio": cfg.warmup_ratio, "min_lr_ratio": cfg.min_lr_ratio,
        "flat_fraction": cfg.flat_fraction, "max_steps": cfg.max_steps, "epochs": cfg.epochs,
        "validation_file": cfg.validation_file, "lora": cfg.lora, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
        "lora_targets": cfg.lora_targets, "lora_adapter": cfg.lora_adapter,
    })
}

/// Finds the checkpoint to resume from: `path` itself, or the latest `checkpoint-N` inside it.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("trainer_state.json").exists() {
        return Ok(path.to_path_buf());
    }
    list_checkpoints(path)?
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| TrainError::Msg(format!("{}: no checkpoint (trainer_state.json) found", path.display())))
}

fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(out) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join("trainer_state.json").exists() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Runs one training job.
pub struct Trainer {
    /// The loaded session.
    pub session: Session,
    /// The optimizer.
    pub optimizer: TrainOptimizer,
    /// Progress and counters.
    pub state: TrainerState,
    /// Set (e.g. by a Ctrl-C handler) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Show a progress bar / log lines on stderr.
    pub verbose: bool,
    output: PathBuf,
    metrics: Vec<Value>,
}

impl Trainer {
    /// Builds the trainer; resumes when `cfg.resume` is set.
    pub fn new(session: Session) -> Result<Self> {
        let cfg = session.cfg.clone();
        // Whole epochs of micro-batches, grouped into optimizer steps (the last may span an
        // epoch boundary, never more than one step's worth).
        let micro_batches = session.train.batches_per_epoch() * cfg.epochs.max(1);
        let total_steps = cfg.max_steps.unwrap_or(micro_batches.div_ceil(cfg.grad_accumulation_steps)).max(1);
        let optimizer = TrainOptimizer::new(&cfg, session.vars.clone())?;
        let state = TrainerState {
            step: 0,
            micro_step: 0,
            total_steps,
            best_eval_loss: None,
            evals_without_improvement: 0,
            tokens_seen: 0,
            train_seconds: 0.0,
            data_fingerprint: fingerprint(&session.train.sequences),
            config: cfg.clone(),
        };
        let output = PathBuf::from(&cfg.output);
        let mut t = Self { session, optimizer, state, stop: Arc::new(AtomicBool::new(false)), verbose: true, output, metrics: vec![] };
        if let Some(r) = cfg.resume.clone() {
            t.resume_from(Path::new(&r))?;
        }
        Ok(t)
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.session.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn resume_from(&mut self, path: &Path) -> Result<()> {
        let dir = find_checkpoint(path)?;
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(TrainError::io(&sp))?;
        let saved: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Config { origin: sp.display().to_string(), message: e.to_string() })?;
        if resume_key(&saved.config) != resume_key(&self.session.cfg) {
            return Err(TrainError::Msg(format!(
                "{}: the checkpoint was made with different options: saved {} vs now {}",
                dir.display(),
                resume_key(&saved.config),
                resume_key(&self.session.cfg)
            )));
        }
        if saved.data_fingerprint != self.state.data_fingerprint {
            return Err(TrainError::Msg(format!("{}: the training data differs from the checkpoint's", dir.display())));
        }
        // Weights: every variable must be in the checkpoint with its shape and dtype.
        let mp = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&mp, &Device::Cpu).map_err(|e| TrainError::Msg(format!("{}: {e}", mp.display())))?;
        for (name, var) in &self.session.vars {
            let t = tensors.get(name).ok_or_else(|| TrainError::Weights { origin: mp.display().to_string(), tensor: name.clone(), problem: "missing".into() })?;
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(TrainError::Weights {
                    origin: mp.display().to_string(),
                    tensor: name.clone(),
                    problem: format!("{:?} {:?} in the checkpoint, {:?} {:?} expected", t.dims(), t.dtype(), var.dims(), var.dtype()),
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
            return Err(TrainError::Msg(format!("{}: optimizer.safetensors is missing, so the run cannot resume exactly", dir.display())));
        }
        let total = self.state.total_steps;
        self.state = saved;
        self.state.total_steps = total;
        self.state.config = self.session.cfg.clone();
        // Keep the metrics of the steps before the checkpoint only.
        let mp = self.output.join("metrics.jsonl");
        if let Ok(text) = std::fs::read_to_string(&mp) {
            self.metrics = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["step"].as_u64().is_some_and(|s| s as usize <= self.state.step))
                .collect();
        }
        if self.verbose {
            eprintln!("resumed from {} at step {}", dir.display(), self.state.step);
        }
        Ok(())
    }

    fn mask_dtype(&self) -> DType {
        compute_dtype(self.session.model.dtype())
    }

    /// Mean loss over the validation set (or `eval_batches` of it), on the weights chosen by
    /// `eval_weights`.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        if self.session.val.is_empty() {
            return Ok(None);
        }
        let bs = self.session.cfg.batch_size;
        let limit = self.session.cfg.eval_batches.unwrap_or(usize::MAX);
        let (pad, mdt) = (self.session.tokenizer.pad_id, self.mask_dtype());
        let (model, val, device) = (&self.session.model, &self.session.val, &self.session.device);
        let run = || -> Result<f64> {
            let (mut sum, mut n) = (0f64, 0usize);
            for chunk in val.chunks(bs).take(limit) {
                let refs: Vec<&Sequence> = chunk.iter().collect();
                let batch = collate(&refs, pad, model.config.sliding_window, mdt, device)?;
                let logits = model.forward(&batch)?;
                sum += causal_lm_loss_sum(&logits, &batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                n += batch.n_targets;
            }
            Ok(sum / n.max(1) as f64)
        };
        let loss = if self.session.cfg.eval_weights == EvalWeights::Slow && self.optimizer.has_lookahead() {
            self.optimizer.with_slow_weights(run)??
        } else {
            run()?
        };
        Ok(Some(loss))
    }

    fn weights_label(&self) -> &'static str {
        if self.session.cfg.eval_weights == EvalWeights::Slow && self.optimizer.has_lookahead() {
            "slow"
        } else {
            "fast"
        }
    }

    /// The weights to save as the model (slow or fast, see `eval_weights`).
    pub fn model_weights(&self) -> Result<Vec<(String, Tensor)>> {
        if self.weights_label() == "slow" {
            if let Some(w) = self.optimizer.slow_weights()? {
                return Ok(w);
            }
        }
        self.session.vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?))).collect()
    }

    /// Writes `checkpoint-<step>` atomically (built under a temporary name, then renamed) and
    /// prunes old ones.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let final_dir = self.output.join(format!("checkpoint-{}", self.state.step));
        let tmp = self.output.join(format!(".checkpoint-{}.partial-{}", self.state.step, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
        let fast: Vec<(String, Tensor)> = self.session.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        crate::weights::save_safetensors_dir(&tmp, &fast, usize::MAX)?;
        self.optimizer.save_state(&tmp.join("optimizer.safetensors"))?;
        write_json(&tmp.join("trainer_state.json"), &serde_json::to_value(&self.state).expect("state"))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(TrainError::io(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&final_dir))?;
        candle_ranger::state_file::sync_parent(&final_dir);
        // Rotate among this run's checkpoints up to now; later-numbered ones (left by a run that
        // was resumed from an earlier checkpoint) are not ours to delete, and the new one stays.
        let ours: Vec<(usize, PathBuf)> = list_checkpoints(&self.output)?.into_iter().filter(|(n, _)| *n <= self.state.step).collect();
        let keep = self.session.cfg.save_total_limit.max(1);
        for (_, p) in ours.iter().take(ours.len().saturating_sub(keep)) {
            if *p != final_dir {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(final_dir)
    }

    fn write_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for m in &self.metrics {
            text.push_str(&m.to_string());
            text.push('\n');
        }
        crate::weights::write_atomic(&self.output.join("metrics.jsonl"), text.as_bytes())
    }

    /// Gradients of one optimizer step (accumulated over micro-batches, normalised by the
    /// number of target tokens of the whole step), the mean loss and the token count.
    fn step_gradients(&self, micro_start: usize) -> Result<(GradStore, f64, usize)> {
        let accum = self.session.cfg.grad_accumulation_steps;
        let (pad, mdt, device) = (self.session.tokenizer.pad_id, self.mask_dtype(), &self.session.device);
        let batches: Vec<_> = (micro_start..micro_start + accum)
            .map(|i| collate(&self.session.train.batch(i), pad, self.session.model.config.sliding_window, mdt, device))
            .collect::<Result<_>>()?;
        let targets: usize = batches.iter().map(|b| b.n_targets).sum::<usize>().max(1);
        let tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let mut acc = GradStore::default();
        let mut loss_sum = 0f64;
        for batch in &batches {
            let logits = self.session.model.forward(batch)?;
            let sum = causal_lm_loss_sum(&logits, batch)?;
            loss_sum += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let grads = (sum / targets as f64)?.backward()?;
            for (_, var) in &self.session.vars {
                if let Some(g) = grads.get(var) {
                    let g = match acc.get(var) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    acc.insert(var, g);
                }
            }
        }
        Ok((acc, loss_sum / targets as f64, tokens))
    }

    /// Aborts when a trainable tensor got no gradient or an all-zero one (the symptom of an op
    /// without a backward pass). Key-projection biases are exempt from the zero test: softmax
    /// is shift-invariant per query, so their true gradient is zero.
    pub fn check_gradients(&self, grads: &GradStore) -> Result<()> {
        let mut bad = Vec::new();
        for (name, var) in &self.session.vars {
            match grads.get(var) {
                None => bad.push(format!("{name} (no gradient)")),
                // LoRA's A matrices get a zero gradient while B is still zero (its start value).
                Some(g) if !name.ends_with("k_proj.bias") && !name.ends_with("lora_A.weight") => {
                    let s = g.abs()?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
                    if s == 0.0 {
                        bad.push(format!("{name} (all zero)"));
                    }
                }
                _ => {}
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(TrainError::MissingGradients(bad))
        }
    }

    /// Runs to the end (or until stopped), writes the model and returns the summary.
    pub fn run(&mut self) -> Result<RunSummary> {
        let started = Instant::now();
        std::fs::create_dir_all(&self.output).map_err(TrainError::io(&self.output))?;
        let cfg = self.session.cfg.clone();
        let schedule = schedule_for(&cfg, self.state.total_steps);
        let bar = if self.verbose { indicatif::ProgressBar::new(self.state.total_steps as u64) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("template"),
        );
        bar.set_position(self.state.step as u64);
        let plain_log = self.verbose && bar.is_hidden();
        // Messages go above the bar, or straight to stderr when there is no bar (not a TTY).
        let verbose = self.verbose;
        let say = |msg: String| {
            if plain_log {
                eprintln!("{msg}");
            } else if verbose {
                bar.println(msg);
            }
        };
        let mut last_loss = None;
        let mut last_checkpoint = None;
        let mut stopped = "completed".to_string();
        let first_step = self.state.step;
        // The missing-gradient check runs on the first step of a fresh run that has a finite loss.
        let mut gradients_checked = first_step > 0;
        if first_step == 0 {
            // The baseline, so the metrics show what training changed.
            if let Some(eval) = self.evaluate()? {
                self.metrics.push(json!({ "step": 0, "eval_loss": eval, "eval_perplexity": eval.exp() }));
                self.state.best_eval_loss = eval.is_finite().then_some(eval);
                say(format!("step 0: eval loss {eval:.4}, perplexity {:.2} (before training)", eval.exp()));
            }
        }
        while self.state.step < self.state.total_steps {
            let step_start = Instant::now();
            let lr = schedule.lr_at(self.state.step);
            self.optimizer.set_lr(lr);
            let (mut grads, loss, tokens) = self.step_gradients(self.state.micro_step)?;
            let mut gnorm = f64::NAN;
            if !loss.is_finite() {
                match cfg.on_nan {
                    NanPolicy::Stop => {
                        self.write_metrics()?;
                        return Err(TrainError::NonFiniteLoss { step: self.state.step + 1, loss });
                    }
                    // The batch is skipped, but the step is bookkept like any other below.
                    NanPolicy::Skip => say(format!("step {}: non-finite loss {loss}, batch skipped", self.state.step + 1)),
                }
            } else {
                if !gradients_checked {
                    self.check_gradients(&grads)?;
                    gradients_checked = true;
                }
                let vars: Vec<Var> = self.session.vars.iter().map(|(_, v)| v.clone()).collect();
                gnorm = if cfg.max_grad_norm > 0.0 { clip_grad_norm(&mut grads, &vars, cfg.max_grad_norm)? } else { grad_norm(&grads, &vars)? };
                let report = self.optimizer.step(&grads)?;
                if report.skipped() {
                    say(format!("step {}: non-finite gradient in {}, step skipped", self.state.step + 1, report.non_finite.join(", ")));
                }
            }
            drop(grads);
            let secs = step_start.elapsed().as_secs_f64();
            self.state.step += 1;
            self.state.micro_step += cfg.grad_accumulation_steps;
            self.state.tokens_seen += tokens as u64;
            self.state.train_seconds += secs;
            if loss.is_finite() {
                last_loss = Some(loss);
            }
            let tps = tokens as f64 / secs.max(1e-9);
            let mut record = json!({
                "step": self.state.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": tokens, "skipped": !loss.is_finite(),
                "tokens_per_sec": tps, "peak_rss_bytes": peak_rss_bytes(),
                "epoch": self.state.micro_step as f64 / self.session.train.batches_per_epoch() as f64,
            });
            let is_last = self.state.step == self.state.total_steps;
            if (cfg.eval_every > 0 && self.state.step % cfg.eval_every == 0) || is_last {
                if let Some(eval) = self.evaluate()? {
                    record["eval_loss"] = json!(eval);
                    record["eval_perplexity"] = json!(eval.exp());
                    if eval.is_finite() && self.state.best_eval_loss.is_none_or(|b| eval < b) {
                        self.state.best_eval_loss = Some(eval);
                        self.state.evals_without_improvement = 0;
                    } else {
                        self.state.evals_without_improvement += 1;
                    }
                    say(format!("step {}: eval loss {eval:.4}, perplexity {:.2} ({} weights)", self.state.step, eval.exp(), self.weights_label()));
                }
            }
            self.metrics.push(record);
            bar.set_position(self.state.step as u64);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            if plain_log && (self.state.step % cfg.log_every.max(1) == 0 || is_last) {
                eprintln!("step {}/{}: loss {loss:.4} lr {lr:.3e} grad_norm {gnorm:.3} {tps:.0} tok/s", self.state.step, self.state.total_steps);
            }
            let patience_hit = cfg.early_stopping_patience.is_some_and(|p| self.state.evals_without_improvement >= p);
            let interrupted = self.stop.load(Ordering::SeqCst);
            if (cfg.save_every > 0 && self.state.step % cfg.save_every == 0) || interrupted || patience_hit || is_last {
                self.write_metrics()?;
                last_checkpoint = Some(self.save_checkpoint()?);
            }
            if interrupted {
                stopped = "interrupted".into();
                break;
            }
            if patience_hit {
                stopped = format!("early stopping: no eval improvement in {} evaluations", self.state.evals_without_improvement);
                break;
            }
        }
        bar.finish_and_clear();
        self.write_metrics()?;
        crate::metrics::write_loss_svg(&self.output.join("loss_curve.svg"), &self.metrics)?;
        let eval_loss = self.metrics.iter().rev().find_map(|m| m["eval_loss"].as_f64());
        let k = cfg.lookahead_k;
        let unsynced = if self.weights_label() == "slow" && k > 0 { self.state.step % k } else { 0 };
        if unsynced > 0 && self.verbose {
            eprintln!(
                "note: the last {unsynced} steps are not yet in the slow weights (Lookahead syncs every {k} steps); \
                 the evaluation and the saved model use the slow weights. A step count that is a multiple of {k}, \
                 or --eval-weights fast, includes them."
            );
        }
        let output = if stopped == "interrupted" {
            None
        } else {
            let weights = self.model_weights()?;
            if cfg.lora {
                let dir = self.output.join("adapter");
                crate::output::save_peft_adapter(&dir, &cfg, &weights, &self.session.tokenizer)?;
                Some(dir)
            } else {
                let dir = self.output.join("model");
                save_hf_folder(&dir, &self.session.model.config, &weights, &self.session.tokenizer, self.session.generation_config.as_ref(), cfg.max_shard_size)?;
                Some(dir)
            }
        };
        Ok(RunSummary {
            trainable_parameters: self.trainable_parameters(),
            steps: self.state.step,
            tokens: self.state.tokens_seen,
            wall_seconds: started.elapsed().as_secs_f64(),
            eval_loss,
            eval_perplexity: eval_loss.map(f64::exp),
            last_train_loss: last_loss,
            output,
            checkpoint: last_checkpoint,
            weights: self.weights_label(),
            stopped,
        })
    }
}

