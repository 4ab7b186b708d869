//! Session setup: loads the model, tokenizer and data of a run, checks the options that
//! concern them, and builds the trainable variables (whole weights, or LoRA adapters and saved
//! modules on a frozen base).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor, Var};
use serde_json::Value;

use crate::build::{Built, LoraTraining, ModelBuilder, Tuning};
use crate::classify::{encode_records, labels_from_records, read_records, Columns};
use crate::config::{parse_device, BestMetric, TaskKind, TrainConfig};
use crate::data::{load_file, split_validation, to_sequences, DataOptions, Loader};
use crate::error::{Result, TrainError};
use crate::model::classifier::labels_from_config;
use crate::model::llama_names::LM_HEAD;
use crate::model::{BackboneConfig, DropoutSeed, LlamaConfig, LoraConfig, ModelConfig};
use crate::source::{self, HubOptions, LoadOptions, LoadedModel};
use crate::task::Task;
use crate::tokenizer::TextTokenizer;

/// Everything a run needs, loaded and ready. Read-only once built: the trainer's optimizer and
/// checkpoints hold on to these variables and options.
pub struct Session {
    pub(super) cfg: TrainConfig,
    pub(super) task: Task,
    pub(super) vars: Vec<(String, Var)>,
    pub(super) tokenizer: TextTokenizer,
    pub(super) generation_config: Option<Value>,
    pub(super) device: Device,
    pub(super) origin: String,
    /// Switches LoRA dropout on (with the micro-batch's seed) for training forward passes.
    pub(super) dropout_seed: DropoutSeed,
}

impl Session {
    /// The options (as completed by the setup: LoRA targets, labels, sequence length).
    pub fn cfg(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The model and data.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// Trainable variables by Hugging Face name (PEFT names for LoRA adapters and heads).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// `generation_config.json` of the source.
    pub fn generation_config(&self) -> Option<&Value> {
        self.generation_config.as_ref()
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Where the model came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// Prepares a run: loads the model, tokenizer and data.
pub fn prepare(cfg: TrainConfig) -> Result<Session> {
    let device = parse_device(&cfg.device)?;
    // QLoRA by default: a LoRA run keeps a GGUF file's quantized projections as they are.
    let keep_quantized = cfg.lora && !cfg.dequantize && cfg.task == TaskKind::CausalLm;
    let hub = HubOptions { revision: cfg.revision.clone() };
    // --quantize quantizes the projections as they are read (checked in prepare_with_model).
    let quantize = cfg.quantize.filter(|_| keep_quantized).map(|q| q.format());
    let loaded = source::load_with(&cfg.model, &hub, LoadOptions { keep_quantized, quantize })?;
    prepare_with_model(cfg, loaded, device)
}

/// Like [`prepare`] with the model already loaded. Quantized projections in `loaded` stay
/// quantized in a LoRA run of a causal LM (QLoRA) unless `dequantize` is set; any other run
/// dequantizes them. `quantize` quantizes the dense projections first.
pub fn prepare_with_model(mut cfg: TrainConfig, mut loaded: LoadedModel, device: Device) -> Result<Session> {
    if cfg.batch_size == 0 || cfg.grad_accumulation_steps == 0 || cfg.max_seq_length < 2 {
        let option = if cfg.batch_size == 0 {
            "batch_size"
        } else if cfg.grad_accumulation_steps == 0 {
            "grad_accumulation_steps"
        } else {
            "max_seq_length"
        };
        return Err(invalid(option, "batch_size and grad_accumulation_steps must be >= 1, max_seq_length >= 2"));
    }
    if cfg.lora {
        if !(0.0..1.0).contains(&cfg.lora_dropout) {
            return Err(invalid("lora_dropout", format!("lora_dropout must be in [0, 1), got {}", cfg.lora_dropout)));
        }
        if cfg.lora_rank == 0 {
            return Err(invalid("lora_rank", "lora_rank must be >= 1"));
        }
        if cfg.lora_targets.is_empty() {
            cfg.lora_targets = loaded.config.backbone().default_lora_targets();
        }
        if cfg.lora_adapter.is_some() && !cfg.modules_to_save.is_empty() {
            return Err(invalid(
                "modules_to_save",
                "modules_to_save comes from the adapter when going on from one (--lora-adapter); it cannot be changed",
            ));
        }
    } else if !cfg.modules_to_save.is_empty() {
        return Err(invalid(
            "modules_to_save",
            "modules_to_save needs LoRA (--lora): in a full fine-tune every module is trained",
        ));
    }
    if !matches!(cfg.optimizer_state_bits, 8 | 16 | 32) {
        return Err(invalid(
            "optimizer_state_bits",
            format!("optimizer_state_bits must be 8, 16 or 32, got {}", cfg.optimizer_state_bits),
        ));
    }
    if cfg.task == TaskKind::CausalLm && cfg.metric_for_best != BestMetric::Loss {
        return Err(invalid("metric_for_best", "metric_for_best accuracy / f1 needs --task classify"));
    }
    let qlora = cfg.lora && cfg.task == TaskKind::CausalLm;
    if let Some(q) = cfg.quantize {
        if !qlora || cfg.dequantize {
            return Err(invalid(
                "quantize",
                "quantize makes a QLoRA base: it needs --lora and --task causal-lm, and not --dequantize",
            ));
        }
        loaded.quantize_base(q.format())?;
    }
    if !qlora || cfg.dequantize {
        loaded.dequantize_all()?;
    }
    if !loaded.quantized.is_empty() {
        // Modules trained whole next to the adapters (the run's, or those of the adapter it
        // goes on from) are trained dense; with tied embeddings `lm_head` is the embedding.
        let modules = match &cfg.lora_adapter {
            Some(dir) => crate::peft::read_adapter_config(Path::new(dir))?.modules_to_save,
            None => cfg.modules_to_save.clone(),
        };
        let decoder = loaded.decoder()?;
        let (tied, embed) = (decoder.tie_word_embeddings, decoder.names.embed);
        loaded.dequantize_where(|name| {
            crate::peft::saves_module(&modules, name)
                || (tied && name == embed && crate::peft::saves_module(&modules, LM_HEAD))
        })?;
    }
    let LoadedModel { config, weights, quantized, tokenizer, generation_config, origin } = loaded;
    let tokenizer = match &cfg.chat_template {
        Some(path) => tokenizer.with_chat_template_file(Path::new(path))?,
        None => tokenizer,
    };
    let dropout_seed = DropoutSeed::default();
    let inputs = TaskInputs {
        weights,
        quantized,
        tokenizer: &tokenizer,
        device: &device,
        origin: &origin,
        dropout_seed: &dropout_seed,
    };
    let (task, vars) = match cfg.task {
        TaskKind::CausalLm => prepare_causal_lm(&cfg, config.decoder(&origin)?.clone(), inputs)?,
        TaskKind::Classify => prepare_classifier(&mut cfg, &config, inputs)?,
    };
    Ok(Session { cfg, task, vars, tokenizer, generation_config, device, origin, dropout_seed })
}

/// The run's model builder: every weight trainable, or LoRA adapters (new, or the run's
/// `lora_adapter`) over a frozen base.
fn builder<'a>(
    cfg: &'a TrainConfig,
    lora: &'a LoraConfig,
    device: &'a Device,
    dropout_seed: &'a DropoutSeed,
) -> ModelBuilder<'a> {
    let tuning = if cfg.lora {
        Tuning::Lora(LoraTraining {
            lora,
            seed: cfg.seed,
            modules_to_save: &cfg.modules_to_save,
            adapter: cfg.lora_adapter.as_deref().map(Path::new),
            dropout_seed,
        })
    } else {
        Tuning::Full
    };
    ModelBuilder { dtype: cfg.dtype.dtype(), device, tuning }
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

/// What a task's setup takes from the loaded model and the run, besides the options and the
/// model configuration.
struct TaskInputs<'a> {
    weights: HashMap<String, Tensor>,
    /// Projections kept in a GGUF block format (causal-LM LoRA runs only).
    quantized: HashMap<String, QTensor>,
    tokenizer: &'a TextTokenizer,
    device: &'a Device,
    origin: &'a str,
    dropout_seed: &'a DropoutSeed,
}

fn prepare_causal_lm(cfg: &TrainConfig, config: LlamaConfig, inputs: TaskInputs) -> Result<(Task, Vec<(String, Var)>)> {
    let TaskInputs { weights, quantized, tokenizer, device, origin, dropout_seed } = inputs;
    // Learned positions (GPT-2) end at the table: sequences are cut to it.
    let max_seq_len = match config.names.positions {
        Some(_) => cfg.max_seq_length.min(config.max_position_embeddings),
        None => cfg.max_seq_length,
    };
    let lora = lora_config(cfg);
    let Built { mut model, vars } =
        builder(cfg, &lora, device, dropout_seed).causal_lm_quantized(config, weights, quantized, origin)?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    let opts = DataOptions { max_seq_len, pack: cfg.pack, mask_prompt: cfg.mask_prompt };
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
    inputs: TaskInputs,
) -> Result<(Task, Vec<(String, Var)>)> {
    let TaskInputs { weights, tokenizer, device, origin, dropout_seed, .. } = inputs;
    let backbone = config.backbone();
    match &backbone {
        // Texts are truncated to what the position table allows (512 for BERT-base-like models).
        BackboneConfig::Encoder(e) => cfg.max_seq_length = cfg.max_seq_length.min(e.max_tokens()),
        BackboneConfig::Decoder(d) if d.names.positions.is_some() => {
            cfg.max_seq_length = cfg.max_seq_length.min(d.max_position_embeddings)
        }
        BackboneConfig::Decoder(_) => {}
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
    let lora = lora_config(cfg);
    let Built { mut model, vars } = builder(cfg, &lora, device, dropout_seed).classifier(
        backbone,
        labels.len(),
        weights,
        Some(cfg.seed),
        origin,
    )?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    let max_len = cfg.max_seq_length;
    let train = encode_records(&train_records, tokenizer, &labels, max_len, &data_path)?;
    let val = encode_records(&val_records, tokenizer, &labels, max_len, &val_path)?;
    Ok((Task::Classify { model, train: Loader::new(train, cfg.batch_size, cfg.seed), val, labels }, vars))
}

/// The error for an option the run cannot use.
fn invalid(option: &'static str, message: impl Into<String>) -> TrainError {
    TrainError::InvalidOption { option, message: message.into() }
}
