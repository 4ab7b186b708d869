//! [`TrainConfig`]: every option of a training run, written once. Each field is at the same
//! time a `ranger-tune train` flag (its doc comment is the help text, its `#[arg]` the
//! default), a key of the TOML file given with `--config`, and what the trainer reads.

use std::sync::OnceLock;

use clap::{ArgAction, Args};
use serde::{Deserialize, Serialize};

use super::kinds::{
    BestMetric, DTypeArg, EvalWeights, NanPolicy, OptimizerKernel, OptimizerKind, QuantizeArg, ScheduleKind, TaskKind,
};

// Sections of `ranger-tune train --help`.
const DATA: &str = "Model and data";
const CLASSIFY: &str = "Classification (--task classify)";
const OPTIMIZER: &str = "Optimizer";
const SCHEDULE: &str = "Learning-rate schedule";
const TRAINING: &str = "Training";
const EVALUATION: &str = "Evaluation";
const OUTPUT: &str = "Output and checkpoints";
const DEVICE: &str = "Device";
const LORA: &str = "LoRA";

/// All options of `ranger-tune train`. Every option can be given as a flag (`--max-seq-length`)
/// or as a key of the TOML file given with `--config` (`max_seq_length`); flags win over the
/// file, and the file over the defaults (see [`TrainConfig::from_matches_and_toml`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What is trained: next-token prediction (causal-lm) or sequence classification (classify).
    #[arg(long, value_enum, default_value_t, help_heading = DATA)]
    pub task: TaskKind,
    /// Hub repository id, local model folder, or .gguf file.
    #[arg(long, default_value = "", hide_default_value = true, help_heading = DATA)]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, help_heading = DATA)]
    pub revision: Option<String>,
    /// Training data. causal-lm: .jsonl (`text`, `prompt`+`completion`, or `messages` per line)
    /// or plain text. classify: .jsonl, .csv or .tsv with a text and a label column.
    #[arg(long, default_value = "", hide_default_value = true, help_heading = DATA)]
    pub data: String,
    /// Validation data (same formats).
    #[arg(long, help_heading = DATA)]
    pub validation_file: Option<String>,
    /// Hold out this fraction of the training examples for validation (when no file is given).
    #[arg(long, default_value_t = 0.0, help_heading = DATA)]
    pub val_split: f64,
    /// Longest sequence in tokens; longer examples are truncated.
    #[arg(long, default_value_t = 512, help_heading = DATA)]
    pub max_seq_length: usize,
    /// Pack short examples into full sequences (no attention across examples).
    #[arg(long, help_heading = DATA)]
    pub pack: bool,
    /// Train only on completions / assistant turns; --no-mask-prompt also trains on prompts and
    /// the other turns.
    #[arg(long = "no-mask-prompt", action = ArgAction::SetFalse, help_heading = DATA)]
    pub mask_prompt: bool,
    /// A Jinja chat template file that renders `messages` data instead of the model's own (for
    /// a model without one, such as a base model's GGUF file). The output's tokenizer files
    /// carry it, so the trained model chats with it.
    #[arg(long, value_name = "FILE", help_heading = DATA)]
    pub chat_template: Option<String>,

    /// The column (CSV header or JSON key) holding the text.
    #[arg(long, default_value = "text", help_heading = CLASSIFY)]
    pub text_column: String,
    /// The column holding the second text of a pair (e.g. NLI hypotheses), if any.
    #[arg(long, help_heading = CLASSIFY)]
    pub text_pair_column: Option<String>,
    /// The column holding the label.
    #[arg(long, default_value = "label", help_heading = CLASSIFY)]
    pub label_column: String,
    /// Comma-separated label names in id order (default: the checkpoint's id2label when it
    /// already is a classifier, else the training labels sorted, integers numerically).
    #[arg(long, value_delimiter = ',', help_heading = CLASSIFY)]
    pub labels: Option<Vec<String>>,

    /// The optimizer.
    #[arg(long, value_enum, default_value_t, help_heading = OPTIMIZER)]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (default, from the recipe study in README "Choosing settings": ranger
    /// 5e-4 full, 7e-3 LoRA, 3e-3 LoRA classifiers at 100 steps, raised by 100/steps (at most 4x)
    /// for shorter runs and, for causal LMs, lowered by sqrt(100/steps) (at least 0.25x) for
    /// longer ones; adamw 2e-4 full, 2e-3 LoRA; radam half of ranger's; printed at start).
    #[arg(long, help_heading = OPTIMIZER)]
    pub learning_rate: Option<f64>,
    /// Weight decay, not applied to biases and norm weights.
    #[arg(long, default_value_t = 0.0, help_heading = OPTIMIZER)]
    pub weight_decay: f64,
    /// Adam beta1 (default 0.9 for every optimizer; the published Ranger's is 0.95).
    #[arg(long, help_heading = OPTIMIZER)]
    pub beta1: Option<f64>,
    /// Adam beta2 (default: adamw 0.999; ranger/radam from the run length, so that RAdam's warmup
    /// of ~2/(1-beta2) steps is a quarter of the run, between 0.9 and 0.999; printed at start).
    #[arg(long, help_heading = OPTIMIZER)]
    pub beta2: Option<f64>,
    /// Adam epsilon (default 1e-8 for every optimizer; the published Ranger uses 1e-5, which damps
    /// the small, clipped gradients of a fine-tune: README "Choosing settings").
    #[arg(long, help_heading = OPTIMIZER)]
    pub eps: Option<f64>,
    /// Lookahead sync period k; 0 disables Lookahead.
    #[arg(long, default_value_t = 6, help_heading = OPTIMIZER)]
    pub lookahead_k: usize,
    /// Lookahead alpha.
    #[arg(long, default_value_t = 0.5, help_heading = OPTIMIZER)]
    pub lookahead_alpha: f64,
    /// Gradient centralization (ranger); --no-centralize turns it off.
    #[arg(long = "no-centralize", action = ArgAction::SetFalse, help_heading = OPTIMIZER)]
    pub centralize: bool,
    /// An f32 master copy of bf16/f16 weights (every optimizer; 4 more bytes per parameter), so
    /// updates below half a bf16 ulp accumulate; --no-master-weights turns it off.
    #[arg(long = "no-master-weights", action = ArgAction::SetFalse, help_heading = OPTIMIZER)]
    pub master_weights: bool,
    /// Bits per value of the optimizer state (moments, and Ranger's slow weights): 32; 16 (bf16,
    /// 6 bytes per parameter instead of 12 for Ranger); or 8 (blockwise 8-bit, about 3). Both
    /// round stochastically; the fused step on a CPU, tensor ops on CUDA and Metal.
    #[arg(long, default_value_t = 32, value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["8", "16", "32"]), |s: String| s.parse::<u8>().expect("a listed value")), help_heading = OPTIMIZER)]
    pub optimizer_state_bits: u8,
    /// The optimizer step's implementation: `auto` (the fused kernel on the CPU and on CUDA,
    /// tensor ops on Metal), `fused` (on Metal too, where it has not been run on a Mac yet) or
    /// `tensor-ops`. The same update either way; may change on resume. On a GPU, 8- and 16-bit
    /// state always takes tensor ops.
    #[arg(long, value_enum, default_value_t, help_heading = OPTIMIZER)]
    pub optimizer_kernel: OptimizerKernel,
    /// Clip the global gradient norm to this; 0 disables.
    #[arg(long, default_value_t = 1.0, help_heading = OPTIMIZER)]
    pub max_grad_norm: f64,

    /// The schedule after warmup.
    #[arg(long, value_enum, default_value_t, help_heading = SCHEDULE)]
    pub lr_scheduler: ScheduleKind,
    /// Warmup steps (wins over --warmup-ratio).
    #[arg(long, help_heading = SCHEDULE)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of all steps.
    #[arg(long, default_value_t = 0.0, help_heading = SCHEDULE)]
    pub warmup_ratio: f64,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.0, help_heading = SCHEDULE)]
    pub min_lr_ratio: f64,
    /// Flat fraction of flat-cosine.
    #[arg(long, default_value_t = 0.7, help_heading = SCHEDULE)]
    pub flat_fraction: f64,

    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4, help_heading = TRAINING)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, help_heading = TRAINING)]
    pub grad_accumulation_steps: usize,
    /// Activation checkpointing: each layer keeps only its input during the forward pass and
    /// is recomputed in the backward pass. Much less activation memory for about a third more
    /// compute; the gradients, and so the run, are the same bit for bit.
    #[arg(long, help_heading = TRAINING)]
    pub gradient_checkpointing: bool,
    /// Epochs (ignored when --max-steps is set).
    #[arg(long, default_value_t = 1, help_heading = TRAINING)]
    pub epochs: usize,
    /// Optimizer steps (wins over --epochs).
    #[arg(long, help_heading = TRAINING)]
    pub max_steps: Option<usize>,
    /// Seed of shuffling and the validation split.
    #[arg(long, default_value_t = 42, help_heading = TRAINING)]
    pub seed: u64,
    /// On a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the batch.
    #[arg(long, value_enum, default_value_t, help_heading = TRAINING)]
    pub on_nan: NanPolicy,
    /// Log every N steps.
    #[arg(long, default_value_t = 1, help_heading = TRAINING)]
    pub log_every: usize,

    /// Evaluate every N steps; 0: at the end only.
    #[arg(long, default_value_t = 0, help_heading = EVALUATION)]
    pub eval_every: usize,
    /// Validation batches per evaluation (default: all).
    #[arg(long, help_heading = EVALUATION)]
    pub eval_batches: Option<usize>,
    /// The evaluation figure that picks the best model (kept in best/ for classifiers) and
    /// drives early stopping.
    #[arg(long, value_enum, default_value_t, help_heading = EVALUATION)]
    pub metric_for_best: BestMetric,
    /// Stop after this many evaluations without improvement.
    #[arg(long, help_heading = EVALUATION)]
    pub early_stopping_patience: Option<usize>,
    /// Evaluate and save the Lookahead slow weights or the fast ones.
    #[arg(long, value_enum, default_value_t, help_heading = EVALUATION)]
    pub eval_weights: EvalWeights,

    /// Output folder (checkpoints, metrics.jsonl, loss_curve.svg, model/).
    #[arg(short, long, default_value = "ranger-output", help_heading = OUTPUT)]
    pub output: String,
    /// Save a checkpoint every N steps; 0: only at the end and on Ctrl-C.
    #[arg(long, default_value_t = 0, help_heading = OUTPUT)]
    pub save_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2, help_heading = OUTPUT)]
    pub save_total_limit: usize,
    /// Shard the saved model above this many bytes.
    #[arg(long, default_value_t = crate::weights::DEFAULT_MAX_SHARD_BYTES, help_heading = OUTPUT)]
    pub max_shard_size: usize,
    /// Resume exactly from a checkpoint folder (or the output folder's latest checkpoint).
    #[arg(long, help_heading = OUTPUT)]
    pub resume: Option<String>,

    /// auto | cpu | cuda | cuda:N | metal.
    #[arg(long, default_value = "auto", help_heading = DEVICE)]
    pub device: String,
    /// Parameter dtype; the optimizer state stays f32.
    #[arg(long, value_enum, default_value_t, help_heading = DEVICE)]
    pub dtype: DTypeArg,

    /// Train LoRA adapters (base weights frozen); the output is a PEFT adapter folder.
    #[arg(long, help_heading = LORA)]
    pub lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8, help_heading = LORA)]
    pub lora_rank: usize,
    /// LoRA alpha; adapters are scaled by alpha / rank.
    #[arg(long, default_value_t = 16.0, help_heading = LORA)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training, as PEFT's lora_dropout (never in
    /// evaluation; masks are seeded per micro-batch and adapter, so resume stays exact).
    #[arg(long, default_value_t = 0.0, help_heading = LORA)]
    pub lora_dropout: f64,
    /// DoRA (arXiv 2402.09353): weight-decomposed LoRA with a trainable magnitude per output row,
    /// saved as PEFT's use_dora (the flag implies --lora).
    #[arg(long, help_heading = LORA)]
    pub dora: bool,
    /// rsLoRA (arXiv 2312.03732): scale adapters by alpha / sqrt(rank) instead of alpha / rank,
    /// saved as PEFT's use_rslora (the flag implies --lora).
    #[arg(long, help_heading = LORA)]
    pub rslora: bool,
    /// Comma-separated projections that get adapters, by name or path suffix as PEFT matches them
    /// (default: every attention and feed-forward projection of the model).
    #[arg(long, value_delimiter = ',', help_heading = LORA)]
    pub lora_targets: Vec<String>,
    /// Comma-separated modules trained whole next to the adapters and saved with them, as PEFT's
    /// modules_to_save (a module path suffix: embed_tokens, lm_head, norm, ...); with tied
    /// embeddings, embed_tokens and lm_head are one matrix, saved tied (ensure_weight_tying).
    /// A classifier's head is always trained.
    #[arg(long, value_delimiter = ',', help_heading = LORA)]
    pub modules_to_save: Vec<String>,
    /// Go on training this PEFT LoRA adapter instead of a fresh one (the flag implies --lora;
    /// its rank, alpha, targets, DoRA and rsLoRA settings win; lora_dropout is the run's).
    #[arg(long, help_heading = LORA)]
    pub lora_adapter: Option<String>,
    /// With --lora on a quantized GGUF file, dequantize the base to the run's dtype instead of
    /// training over it in its block format (QLoRA, the default: the projections stay
    /// quantized in memory and are dequantized a chunk of rows at a time).
    #[arg(long, help_heading = LORA)]
    pub dequantize: bool,
    /// QLoRA from a safetensors base: quantize its attention and feed-forward projections to
    /// this GGUF block format on load (a projection whose input width is not a whole number of
    /// blocks falls back as llama.cpp does: q4_k to q5_0, q5_k to q5_1, q6_k to q8_0, and any
    /// other to q8_0 or, failing that, stays unquantized). Needs --lora and --task causal-lm.
    #[arg(long, value_enum, help_heading = LORA)]
    pub quantize: Option<QuantizeArg>,
}

impl Default for TrainConfig {
    /// The defaults of the flags: what an empty command line gives.
    fn default() -> Self {
        static DEFAULTS: OnceLock<TrainConfig> = OnceLock::new();
        DEFAULTS
            .get_or_init(|| {
                let matches = Self::command().try_get_matches_from(["train"]).expect("every option has a default");
                <Self as clap::FromArgMatches>::from_arg_matches(&matches).expect("the defaults parse")
            })
            .clone()
    }
}

impl TrainConfig {
    /// The options alone as a command, as `ranger-tune train` has them.
    pub(crate) fn command() -> clap::Command {
        Self::augment_args(clap::Command::new("train"))
    }
}
