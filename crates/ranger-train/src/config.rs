//! Every option of a training run. Deserialised from a TOML file and/or built from CLI flags.

use serde::{Deserialize, Serialize};

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// RAdam + Lookahead + gradient centralization.
    #[default]
    Ranger,
    /// Plain RAdam (torch semantics).
    Radam,
    /// `candle_nn::AdamW` (its moments cannot be saved: resume restarts them).
    Adamw,
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Cosine to `min_lr_ratio * lr`.
    #[default]
    Cosine,
    /// Linear to `min_lr_ratio * lr`.
    Linear,
    /// Constant.
    Constant,
    /// Flat for `flat_fraction` of the steps, then cosine.
    FlatCosine,
}

/// What a NaN/Inf training loss does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop with an error, keeping the last good checkpoint.
    #[default]
    Stop,
    /// Skip the batch and go on.
    Skip,
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Next-token prediction (a causal LM).
    #[default]
    CausalLm,
    /// Sequence classification (an encoder or a decoder with a classification head).
    Classify,
}

/// The evaluation figure that decides the best model and early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BestMetric {
    /// Evaluation loss (lower is better).
    #[default]
    Loss,
    /// Accuracy (classification).
    Accuracy,
    /// Macro-F1 (classification).
    F1,
}

/// Which weights evaluation and the saved model use when the optimizer has Lookahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EvalWeights {
    /// The Lookahead slow weights (recommended by the paper).
    #[default]
    Slow,
    /// The fast weights.
    Fast,
}

/// Training dtype of the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    /// f32.
    #[default]
    F32,
    /// bf16 (optimizer state stays f32).
    Bf16,
    /// f16 (optimizer state stays f32).
    F16,
}

impl DTypeArg {
    /// As a Candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

/// All options of `ranger-tune train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What is trained: a causal LM or a sequence classifier.
    pub task: TaskKind,
    /// Hub id, model folder or `.gguf` file.
    pub model: String,
    /// Hub revision.
    pub revision: Option<String>,
    /// Training data: `.jsonl` or text for causal LMs; `.jsonl`, `.csv` or `.tsv` for classification.
    pub data: String,
    /// Classification: the column (CSV header or JSON key) holding the text.
    pub text_column: String,
    /// Classification: the column holding the second text of a pair, if any.
    pub text_pair_column: Option<String>,
    /// Classification: the column holding the label.
    pub label_column: String,
    /// Classification: label names in id order (default: the checkpoint's `id2label` when it
    /// already is a classifier, else the training labels, integers in numeric order).
    pub labels: Option<Vec<String>>,
    /// The evaluation figure that picks the best model (`best/`) and drives early stopping.
    pub metric_for_best: BestMetric,
    /// Validation data.
    pub validation_file: Option<String>,
    /// Fraction of the training examples held out for validation when no file is given.
    pub val_split: f64,
    /// Output folder.
    pub output: String,
    /// Longest sequence in tokens.
    pub max_seq_length: usize,
    /// Pack short examples together.
    pub pack: bool,
    /// Train only on completions / assistant turns.
    pub mask_prompt: bool,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Weight decay (not applied to biases and norm weights).
    pub weight_decay: f64,
    /// Adam beta1 (default: 0.95 for ranger, 0.9 otherwise).
    pub beta1: Option<f64>,
    /// Adam beta2.
    pub beta2: f64,
    /// Adam epsilon (default: 1e-5 for ranger, 1e-8 otherwise).
    pub eps: Option<f64>,
    /// Lookahead k.
    pub lookahead_k: usize,
    /// Lookahead alpha.
    pub lookahead_alpha: f64,
    /// Gradient centralization (ranger).
    pub centralize: bool,
    /// Schedule after warmup.
    pub lr_scheduler: ScheduleKind,
    /// Warmup steps (wins over the ratio).
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the steps.
    pub warmup_ratio: f64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Flat part of flat-cosine.
    pub flat_fraction: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accumulation_steps: usize,
    /// Global-norm clipping (0 disables).
    pub max_grad_norm: f64,
    /// Epochs (ignored when max_steps is set).
    pub epochs: usize,
    /// Optimizer steps to run.
    pub max_steps: Option<usize>,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation (all when unset).
    pub eval_batches: Option<usize>,
    /// Checkpoint every N steps (0: never, except at the end and on Ctrl-C).
    pub save_every: usize,
    /// Checkpoints kept.
    pub save_total_limit: usize,
    /// Stop after this many evaluations without improvement.
    pub early_stopping_patience: Option<usize>,
    /// Log every N steps.
    pub log_every: usize,
    /// Seed of shuffling and splits.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    /// Parameter dtype.
    pub dtype: DTypeArg,
    /// NaN/Inf loss handling.
    pub on_nan: NanPolicy,
    /// Weights used for evaluation and the final model.
    pub eval_weights: EvalWeights,
    /// Shard the saved model above this many bytes.
    pub max_shard_size: usize,
    /// Checkpoint to resume from.
    pub resume: Option<String>,
    /// Train LoRA adapters instead of the full model (base weights frozen).
    pub lora: bool,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (adapter output scaled by alpha / rank).
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training (PEFT's `lora_dropout`; evaluation never
    /// drops). Masks are seeded per micro-batch and adapter, so resume stays exact.
    pub lora_dropout: f64,
    /// DoRA (arXiv 2402.09353): weight-decomposed adapters with a trainable magnitude per output
    /// row (PEFT's `use_dora`).
    pub dora: bool,
    /// rsLoRA (arXiv 2312.03732): scale adapters by alpha / sqrt(rank) (PEFT's `use_rslora`).
    pub rslora: bool,
    /// Projections that get adapters, by module name or path suffix as PEFT matches them
    /// (empty: every attention and feed-forward projection of the model).
    pub lora_targets: Vec<String>,
    /// Modules trained whole next to the adapters and saved with them (PEFT's `modules_to_save`:
    /// a module path suffix such as `embed_tokens`, `lm_head` or `norm`). A classifier's head is
    /// always trained.
    pub modules_to_save: Vec<String>,
    /// Start from this PEFT LoRA adapter instead of a fresh one (its rank, alpha, targets, DoRA
    /// and rsLoRA settings win; `lora_dropout` is the run's).
    pub lora_adapter: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            task: TaskKind::CausalLm,
            model: String::new(),
            revision: None,
            data: String::new(),
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            labels: None,
            metric_for_best: BestMetric::Loss,
            validation_file: None,
            val_split: 0.0,
            output: "ranger-output".into(),
            max_seq_length: 512,
            pack: false,
            mask_prompt: true,
            optimizer: OptimizerKind::Ranger,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            beta1: None,
            beta2: 0.999,
            eps: None,
            lookahead_k: 6,
            lookahead_alpha: 0.5,
            centralize: true,
            lr_scheduler: ScheduleKind::Cosine,
            warmup_steps: None,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            flat_fraction: 0.7,
            batch_size: 4,
            grad_accumulation_steps: 1,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            eval_every: 0,
            eval_batches: None,
            save_every: 0,
            save_total_limit: 2,
            early_stopping_patience: None,
            log_every: 1,
            seed: 42,
            device: "auto".into(),
            dtype: DTypeArg::F32,
            on_nan: NanPolicy::Stop,
            eval_weights: EvalWeights::Slow,
            max_shard_size: 5_000_000_000,
            resume: None,
            lora: false,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            dora: false,
            rslora: false,
            lora_targets: Vec::new(),
            modules_to_save: Vec::new(),
            lora_adapter: None,
        }
    }
}

/// Parses `auto|cpu|cuda[:N]|metal`.
pub fn parse_device(spec: &str) -> candle_core::Result<candle_core::Device> {
    use candle_core::Device;
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "metal" => Device::new_metal(0),
        "cuda" => Device::new_cuda(0),
        s if s.starts_with("cuda:") => {
            let n = s[5..].parse::<usize>().map_err(|_| candle_core::Error::msg(format!("bad device {s:?}")))?;
            Device::new_cuda(n)
        }
        s => Err(candle_core::Error::msg(format!("unknown device {s:?} (auto, cpu, cuda, cuda:N, metal)"))),
    }
}
