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

use crate::classify::{encode_records, labels_from_records, read_records, Columns};
use crate::config::{parse_device, BestMetric, EvalWeights, NanPolicy, ScheduleKind, TaskKind, TrainConfig};
use crate::data::{load_file, split_validation, to_sequences, DataOptions, Loader};
use crate::error::{Result, TrainError};
use crate::kernels::grad_sink::GradSink;
use crate::model::classifier::{complete_classifier_weights, labels_from_config};
use crate::model::{
    attach_lora,
    lora::{mix_seed, DropoutSeed},
};
use crate::model::{BackboneConfig, LlamaConfig, LlamaModel, LoraConfig, ModelConfig, SequenceClassifier};
use crate::optim::TrainOptimizer;
use crate::output::{default_generation_config, save_hf_folder, write_json};
use crate::source::{self, HubOptions, LoadedModel};
use crate::task::{Evaluation, Task};
use crate::tokenizer::TextTokenizer;
use crate::weights::take_weights;

/// Everything a run needs, loaded and ready.
pub struct Session {
    /// The options.
    pub cfg: TrainConfig,
    /// The model and data.
    pub task: Task,
    /// Trainable variables by Hugging Face name (PEFT names for LoRA adapters and heads).
    pub vars: Vec<(String, Var)>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// `generation_config.json` of the source.
    pub generation_config: Option<Value>,
    /// The device.
    pub device: Device,
    /// Where the model came from.
    pub origin: String,
    /// Switches LoRA dropout on (with the micro-batch's seed) for training forward passes.
    pub dropout_seed: DropoutSeed,
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
    pub stopped: String,
}

/// Prepares a run: loads the model, tokenizer and data.
pub fn prepare(cfg: TrainConfig) -> Result<Session> {
    let device = parse_device(&cfg.device)?;
    let loaded = source::load(&cfg.model, &HubOptions { revision: cfg.revision.clone() })?;
    prepare_with_model(cfg, loaded, device)
}

/// Like [`prepare`] with the model already loaded.
pub fn prepare_with_model(mut cfg: TrainConfig, loaded: LoadedModel, device: Device) -> Result<Session> {
    if cfg.batch_size == 0 || cfg.grad_accumulation_steps == 0 || cfg.max_seq_length < 2 {
        return Err(TrainError::Msg("batch_size and grad_accumulation_steps must be >= 1, max_seq_length >= 2".into()));
    }
    if cfg.lora {
        if !(0.0..1.0).contains(&cfg.lora_dropout) {
            return Err(TrainError::Msg(format!("lora_dropout must be in [0, 1), got {}", cfg.lora_dropout)));
        }
        if cfg.lora_rank == 0 {
            return Err(TrainError::Msg("lora_rank must be >= 1".into()));
        }
        if cfg.lora_targets.is_empty() {
            cfg.lora_targets = loaded.config.backbone().default_lora_targets();
        }
        if cfg.lora_adapter.is_some() && !cfg.modules_to_save.is_empty() {
            return Err(TrainError::Msg(
                "modules_to_save comes from the adapter when going on from one (--lora-adapter); it cannot be changed"
                    .into(),
            ));
        }
    } else if !cfg.modules_to_save.is_empty() {
        return Err(TrainError::Msg(
            "modules_to_save needs LoRA (--lora): in a full fine-tune every module is trained".into(),
        ));
    }
    if cfg.task == TaskKind::CausalLm && cfg.metric_for_best != BestMetric::Loss {
        return Err(TrainError::Msg("metric_for_best accuracy / f1 needs --task classify".into()));
    }
    let LoadedModel { config, weights, tokenizer, generation_config, origin } = loaded;
    let dropout_seed = DropoutSeed::default();
    let (task, vars) = match cfg.task {
        TaskKind::CausalLm => prepare_causal_lm(
            &cfg,
            config.decoder(&origin)?.clone(),
            weights,
            &tokenizer,
            &device,
            &origin,
            &dropout_seed,
        )?,
        TaskKind::Classify => {
            prepare_classifier(&mut cfg, &config, weights, &tokenizer, &device, &origin, &dropout_seed)?
        }
    };
    Ok(Session { cfg, task, vars, tokenizer, generation_config, device, origin, dropout_seed })
}

fn lora_config(cfg: &TrainConfig) -> LoraConfig {
    LoraConfig {
        rank: cfg.lora_rank,
        alpha: cfg.lora_alpha,
        targets: cfg.lora_targets.clone(),
        dropout: cfg.lora_dropout,
        use_dora: cfg.dora,
        use_rslora: cfg.rslora,
    }
}

fn prepare_causal_lm(
    cfg: &TrainConfig,
    config: LlamaConfig,
    weights: HashMap<String, Tensor>,
    tokenizer: &TextTokenizer,
    device: &Device,
    origin: &str,
    dropout_seed: &DropoutSeed,
) -> Result<(Task, Vec<(String, Var)>)> {
    let tensors = take_weights(config.weight_shapes(), weights, cfg.dtype.dtype(), device, origin)?;
    let (model, vars) = if cfg.lora {
        // Frozen base: plain tensors, so no gradient is ever computed or stored for them.
        let mut model = LlamaModel::new(config, &tensors.into_iter().collect())?;
        let vars = match &cfg.lora_adapter {
            Some(dir) => {
                crate::peft::load_peft_adapter(&mut model, Path::new(dir), Some((cfg.lora_dropout, dropout_seed)))?
            }
            None => {
                let mut vars = crate::peft::train_modules(&mut model, &cfg.modules_to_save)?;
                vars.extend(model.add_lora(&lora_config(cfg), cfg.seed, dropout_seed)?);
                vars
            }
        };
        (model, vars)
    } else {
        let vars = tensors.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect::<Result<Vec<_>>>()?;
        (LlamaModel::from_vars(config, &vars)?, vars)
    };
    let opts = DataOptions { max_seq_len: cfg.max_seq_length, pack: cfg.pack, mask_prompt: cfg.mask_prompt };
    let train_data = load_file(Path::new(&cfg.data), tokenizer, &opts)?;
    let (train_examples, val_examples) = match &cfg.validation_file {
        Some(v) => {
            (train_data.examples, load_file(Path::new(v), tokenizer, &DataOptions { pack: false, ..opts })?.examples)
        }
        None if cfg.val_split > 0.0 => split_validation(train_data.examples, cfg.val_split, cfg.seed),
        None => (train_data.examples, vec![]),
    };
    if train_examples.is_empty() {
        return Err(TrainError::EmptyDataset(format!(
            "{}: no training example left after the validation split",
            cfg.data
        )));
    }
    let train = Loader::new(to_sequences(&train_examples, &opts), cfg.batch_size, cfg.seed);
    let val = to_sequences(&val_examples, &DataOptions { pack: false, ..opts });
    Ok((Task::CausalLm { model, train, val }, vars))
}

fn prepare_classifier(
    cfg: &mut TrainConfig,
    config: &ModelConfig,
    weights: HashMap<String, Tensor>,
    tokenizer: &TextTokenizer,
    device: &Device,
    origin: &str,
    dropout_seed: &DropoutSeed,
) -> Result<(Task, Vec<(String, Var)>)> {
    let backbone = config.backbone();
    if let BackboneConfig::Encoder(e) = &backbone {
        // Texts are truncated to what the position table allows (512 for BERT-base-like models).
        cfg.max_seq_length = cfg.max_seq_length.min(e.max_tokens());
    }
    let cols = Columns {
        text: cfg.text_column.clone(),
        text_pair: cfg.text_pair_column.clone(),
        label: Some(cfg.label_column.clone()),
    };
    let data_path = PathBuf::from(&cfg.data);
    let train_records = read_records(&data_path, &cols)?;
    let (train_records, val_records, val_path) = match &cfg.validation_file {
        Some(v) => (train_records, read_records(Path::new(v), &cols)?, PathBuf::from(v)),
        None if cfg.val_split > 0.0 => {
            let (t, v) = split_validation(train_records, cfg.val_split, cfg.seed);
            (t, v, data_path.clone())
        }
        None => (train_records, vec![], data_path.clone()),
    };
    // A checkpoint that already is a classifier keeps its label order; otherwise the labels are
    // given, or read from the training data.
    let has_head =
        ["classifier.weight", "score.weight", "classifier.out_proj.weight"].iter().any(|n| weights.contains_key(*n));
    let labels = match (&cfg.labels, labels_from_config(config.raw()).filter(|_| has_head)) {
        (Some(l), _) => l.clone(),
        (None, Some(l)) => l,
        (None, None) => labels_from_records(&train_records),
    };
    if labels.len() < 2 {
        return Err(TrainError::EmptyDataset(format!(
            "{}: classification needs at least 2 labels, found {labels:?}",
            cfg.data
        )));
    }
    cfg.labels = Some(labels.clone());
    let mut weights = complete_classifier_weights(&backbone, labels.len(), weights, Some(cfg.seed), origin)?;
    let head_names: Vec<String> = backbone.head_shapes(labels.len()).into_iter().map(|(n, _)| n).collect();
    // Modules trained whole besides the head: the user's, or those the adapter saved.
    let mut modules = cfg.modules_to_save.clone();
    if let Some(dir) = cfg.lora_adapter.as_ref().filter(|_| cfg.lora) {
        // The adapter's trained head (and other saved modules) replace the checkpoint's.
        for (name, t) in crate::peft::load_saved_modules(Path::new(dir))? {
            weights.insert(name, t);
        }
        modules = crate::peft::read_adapter_config(Path::new(dir))?.modules_to_save;
    }
    let shapes = backbone.weight_shapes(labels.len());
    // Only the user's entries must match: PEFT lists both `classifier` and `score` in every
    // SEQ_CLS adapter, and ignores the one a model lacks.
    if let Some(m) = cfg
        .modules_to_save
        .iter()
        .find(|m| !shapes.iter().any(|(n, _)| crate::peft::saves_module(std::slice::from_ref(m), n)))
    {
        return Err(TrainError::Msg(format!("modules_to_save entry {m:?} matches no module of this model")));
    }
    let tensors = take_weights(shapes, weights, cfg.dtype.dtype(), device, origin)?;
    let (model, vars) = if cfg.lora {
        // Frozen base; the head and the adapters are trained (PEFT's modules_to_save).
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let mut vars = Vec::new();
        for (name, t) in tensors {
            if head_names.contains(&name) || crate::peft::saves_module(&modules, &name) {
                let v = Var::from_tensor(&t)?;
                map.insert(name.clone(), v.as_tensor().clone());
                vars.push((format!("base_model.model.{name}"), v));
            } else {
                map.insert(name, t);
            }
        }
        let mut model = SequenceClassifier::new(backbone, labels.len(), &map)?;
        let (dtype, dev) = (model.dtype(), model.device().clone());
        let adapters = match &cfg.lora_adapter {
            Some(dir) => crate::peft::load_lora(
                model.projections_mut(),
                dtype,
                &dev,
                Path::new(dir),
                Some((cfg.lora_dropout, dropout_seed)),
            )?,
            None => attach_lora(model.projections_mut(), &lora_config(cfg), cfg.seed, dtype, &dev, dropout_seed)?,
        };
        vars.extend(adapters);
        (model, vars)
    } else {
        let vars = tensors.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect::<Result<Vec<_>>>()?;
        let map: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        (SequenceClassifier::new(backbone, labels.len(), &map)?, vars)
    };
    let max_len = cfg.max_seq_length;
    let train = encode_records(&train_records, tokenizer, &labels, max_len, &data_path)?;
    let val = encode_records(&val_records, tokenizer, &labels, max_len, &val_path)?;
    Ok((Task::Classify { model, train: Loader::new(train, cfg.batch_size, cfg.seed), val, labels }, vars))
}

/// Key biases get an exactly zero gradient (softmax is shift-invariant per query), so the
/// missing-gradient check exempts them.
fn is_key_bias(name: &str) -> bool {
    name.ends_with("k_proj.bias") || name.ends_with("attention.self.key.bias") || name.ends_with("attention.k_lin.bias")
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
    Schedule {
        base_lr: cfg.learning_rate,
        min_lr: cfg.learning_rate * cfg.min_lr_ratio,
        warmup_steps: warmup,
        total_steps: total,
        decay,
    }
}

/// Options that must not change across a resume.
fn resume_key(cfg: &TrainConfig) -> Value {
    // Two literals: one would exceed serde_json's macro recursion limit.
    let mut key = json!({
        "model": cfg.model, "data": cfg.data, "max_seq_length": cfg.max_seq_length, "pack": cfg.pack,
        "mask_prompt": cfg.mask_prompt, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size,
        "grad_accumulation_steps": cfg.grad_accumulation_steps, "seed": cfg.seed, "dtype": cfg.dtype,
        "learning_rate": cfg.learning_rate, "lookahead_k": cfg.lookahead_k, "val_split": cfg.val_split,
        "lookahead_alpha": cfg.lookahead_alpha, "centralize": cfg.centralize, "beta1": cfg.beta1, "beta2": cfg.beta2,
        "eps": cfg.eps, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "lr_scheduler": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps, "warmup_ratio": cfg.warmup_ratio, "min_lr_ratio": cfg.min_lr_ratio,
        "flat_fraction": cfg.flat_fraction, "max_steps": cfg.max_steps, "epochs": cfg.epochs,
        "validation_file": cfg.validation_file, "task": cfg.task, "text_column": cfg.text_column,
        "text_pair_column": cfg.text_pair_column, "label_column": cfg.label_column, "labels": cfg.labels,
        "metric_for_best": cfg.metric_for_best,
    });
    key["lora"] = json!({
        "lora": cfg.lora, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets,
        "dropout": cfg.lora_dropout, "dora": cfg.dora, "rslora": cfg.rslora, "adapter": cfg.lora_adapter,
        "modules_to_save": cfg.modules_to_save,
    });
    key
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
        let micro_batches = session.task.batches_per_epoch() * cfg.epochs.max(1);
        let total_steps = cfg.max_steps.unwrap_or(micro_batches.div_ceil(cfg.grad_accumulation_steps)).max(1);
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
            metrics: vec![],
        };
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
        let saved: TrainerState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Config { origin: sp.display().to_string(), message: e.to_string() })?;
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
        let tensors = candle_core::safetensors::load(&mp, &Device::Cpu)
            .map_err(|e| TrainError::Msg(format!("{}: {e}", mp.display())))?;
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
            return Err(TrainError::Msg(format!(
                "{}: optimizer.safetensors is missing, so the run cannot resume exactly",
                dir.display()
            )));
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

    /// Writes the model the run produces into `dir`: a Hugging Face folder, or a PEFT adapter
    /// for LoRA runs (a classifier's head saved with it).
    pub fn write_model(&self, dir: &Path) -> Result<()> {
        let cfg = &self.session.cfg;
        let weights = self.model_weights()?;
        let tok = &self.session.tokenizer;
        match &self.session.task {
            Task::CausalLm { model, .. } if cfg.lora => {
                let mut weights = weights;
                let tie = crate::peft::trains_tied_embeddings(model, &self.session.vars);
                if tie {
                    // PEFT with ensure_weight_tying saves the shared matrix under both names.
                    let embed = weights
                        .iter()
                        .find(|(n, _)| n == "base_model.model.model.embed_tokens.weight")
                        .map(|(_, t)| t.clone());
                    weights.extend(embed.map(|t| ("base_model.model.lm_head.weight".to_string(), t)));
                }
                crate::output::save_peft_adapter(dir, cfg, "CAUSAL_LM", &cfg.modules_to_save, tie, &weights, tok)
            }
            Task::Classify { model, labels, .. } if cfg.lora => {
                let mut modules = model.config.head_modules();
                modules
                    .extend(cfg.modules_to_save.iter().filter(|m| !modules.contains(m)).cloned().collect::<Vec<_>>());
                crate::output::save_peft_adapter(dir, cfg, "SEQ_CLS", &modules, false, &weights, tok)?;
                // PEFT adapters carry no config.json: the labels go next to the adapter.
                let json = model.config.classifier_json(labels, tok.pad_id, model.dtype());
                write_json(&dir.join(crate::predict::ADAPTER_CLASSIFIER_CONFIG), &json)
            }
            Task::CausalLm { model, .. } => {
                let gen = self
                    .session
                    .generation_config
                    .clone()
                    .unwrap_or_else(|| default_generation_config(&model.config.raw));
                save_hf_folder(dir, &model.config.raw, &weights, tok, Some(&gen), cfg.max_shard_size)
            }
            Task::Classify { model, labels, .. } => {
                let dtype = weights.first().map_or(DType::F32, |(_, t)| t.dtype());
                let json = model.config.classifier_json(labels, tok.pad_id, dtype);
                save_hf_folder(dir, &json, &weights, tok, None, cfg.max_shard_size)
            }
        }
    }

    /// Keeps the best model so far in `best/` (classification runs with validation data):
    /// written under a temporary name, then swapped in, so a crash leaves a complete one.
    fn save_best(&self, eval: &Evaluation) -> Result<PathBuf> {
        let dir = self.output.join("best");
        let tmp = self.output.join(format!(".best.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        self.write_model(&tmp)?;
        let mut results = serde_json::to_value(eval).expect("evaluation");
        results["step"] = json!(self.state.step);
        results["weights"] = json!(self.weights_label());
        write_json(&tmp.join("eval_results.json"), &results)?;
        let old = self.output.join(format!(".best.old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(TrainError::io(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(TrainError::io(&dir))?;
        let _ = std::fs::remove_dir_all(&old);
        candle_ranger::state_file::sync_parent(&dir);
        Ok(dir)
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
        let fast: Vec<(String, Tensor)> =
            self.session.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
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
        let ours: Vec<(usize, PathBuf)> =
            list_checkpoints(&self.output)?.into_iter().filter(|(n, _)| *n <= self.state.step).collect();
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
        let task = &self.session.task;
        let batches: Vec<_> = (micro_start..micro_start + accum)
            .map(|i| task.train_batch(i, self.session.tokenizer.pad_id))
            .collect::<Result<_>>()?;
        let targets: usize = batches.iter().map(|b| b.n_targets()).sum::<usize>().max(1);
        let tokens: usize = batches.iter().map(|b| b.n_tokens()).sum();
        let mut acc = GradStore::default();
        // Weight gradients of the fused CPU ops, accumulated in place over the micro-batches.
        let sink = GradSink::new();
        let mut loss_sum = 0f64;
        for (i, batch) in batches.iter().enumerate() {
            // LoRA dropout masks depend on the run's seed and the micro-batch index only, so a
            // resumed run draws the same ones.
            self.session.dropout_seed.set(Some(mix_seed(self.session.cfg.seed, (micro_start + i) as u64)));
            let sum = {
                let _active = sink.activate();
                task.loss_sum(batch)
            };
            self.session.dropout_seed.set(None);
            let sum = sum?;
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
        sink.merge_into(&mut acc)?;
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
                Some(g) if !is_key_bias(name) && !name.ends_with("lora_A.weight") => {
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
        let bar = if self.verbose {
            indicatif::ProgressBar::new(self.state.total_steps as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
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
                let mut record = json!({ "step": 0 });
                eval_fields(&eval, &mut record);
                self.metrics.push(record);
                // A causal LM's baseline counts for early stopping; a classifier's fresh head
                // is no model worth keeping as the best.
                if self.session.task.causal_lm().is_some() {
                    self.state.best_score = Some(self.score(&eval)).filter(|s| s.is_finite());
                }
                say(format!("step 0: {} (before training)", describe(&eval)));
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
                    NanPolicy::Skip => {
                        say(format!("step {}: non-finite loss {loss}, batch skipped", self.state.step + 1))
                    }
                }
            } else {
                if !gradients_checked {
                    self.check_gradients(&grads)?;
                    gradients_checked = true;
                }
                let vars: Vec<Var> = self.session.vars.iter().map(|(_, v)| v.clone()).collect();
                gnorm = if cfg.max_grad_norm > 0.0 {
                    clip_grad_norm(&mut grads, &vars, cfg.max_grad_norm)?
                } else {
                    grad_norm(&grads, &vars)?
                };
                let report = self.optimizer.step(&grads)?;
                if report.skipped() {
                    say(format!(
                        "step {}: non-finite gradient in {}, step skipped",
                        self.state.step + 1,
                        report.non_finite.join(", ")
                    ));
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
                "epoch": self.state.micro_step as f64 / self.session.task.batches_per_epoch() as f64,
            });
            let is_last = self.state.step == self.state.total_steps;
            if (cfg.eval_every > 0 && self.state.step.is_multiple_of(cfg.eval_every)) || is_last {
                if let Some(eval) = self.evaluate()? {
                    eval_fields(&eval, &mut record);
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
                    say(format!("step {}: {} ({} weights)", self.state.step, describe(&eval), self.weights_label()));
                }
            }
            self.metrics.push(record);
            bar.set_position(self.state.step as u64);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            if plain_log && (self.state.step.is_multiple_of(cfg.log_every.max(1)) || is_last) {
                eprintln!(
                    "step {}/{}: loss {loss:.4} lr {lr:.3e} grad_norm {gnorm:.3} {tps:.0} tok/s",
                    self.state.step, self.state.total_steps
                );
            }
            let patience_hit = cfg.early_stopping_patience.is_some_and(|p| self.state.evals_without_improvement >= p);
            let interrupted = self.stop.load(Ordering::SeqCst);
            if (cfg.save_every > 0 && self.state.step.is_multiple_of(cfg.save_every))
                || interrupted
                || patience_hit
                || is_last
            {
                self.write_metrics()?;
                last_checkpoint = Some(self.save_checkpoint()?);
            }
            if interrupted {
                stopped = "interrupted".into();
                break;
            }
            if patience_hit {
                stopped = format!(
                    "early stopping: no eval improvement in {} evaluations",
                    self.state.evals_without_improvement
                );
                break;
            }
        }
        bar.finish_and_clear();
        self.write_metrics()?;
        crate::metrics::write_loss_svg(&self.output.join("loss_curve.svg"), &self.metrics)?;
        let last_eval = |key: &str| self.metrics.iter().rev().find_map(|m| m[key].as_f64());
        let (eval_loss, eval_accuracy, eval_macro_f1) =
            (last_eval("eval_loss"), last_eval("eval_accuracy"), last_eval("eval_macro_f1"));
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
            let dir = self.output.join(if cfg.lora { "adapter" } else { "model" });
            self.write_model(&dir)?;
            Some(dir)
        };
        let best_dir = self.output.join("best");
        let best_evaluation: Option<Evaluation> = std::fs::read_to_string(best_dir.join("eval_results.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let best_model = (self.session.task.classifier().is_some() && best_evaluation.is_some()).then_some(best_dir);
        Ok(RunSummary {
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
            last_train_loss: last_loss,
            output,
            checkpoint: last_checkpoint,
            weights: self.weights_label(),
            stopped,
        })
    }
}

/// Adds an evaluation's figures to a metrics record.
fn eval_fields(eval: &Evaluation, record: &mut Value) {
    record["eval_loss"] = json!(eval.loss);
    match &eval.classes {
        None => record["eval_perplexity"] = json!(eval.loss.exp()),
        Some(c) => {
            record["eval_accuracy"] = json!(c.accuracy);
            record["eval_macro_f1"] = json!(c.macro_f1);
            record["eval_per_class"] = json!(c.per_class);
        }
    }
}

/// One line about an evaluation.
fn describe(eval: &Evaluation) -> String {
    match &eval.classes {
        None => format!("eval loss {:.4}, perplexity {:.2}", eval.loss, eval.loss.exp()),
        Some(c) => format!(
            "eval loss {:.4}, accuracy {:.4}, macro-F1 {:.4} on {} examples",
            eval.loss, c.accuracy, c.macro_f1, c.examples
        ),
    }
}
