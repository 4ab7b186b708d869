//! `ranger-tune`: fine-tune Hugging Face causal LMs and text classifiers with the Ranger
//! optimizer.
//!
//! A thin command-line layer over the `ranger-train` crate.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ranger_train::config::{
    parse_device, BestMetric, DTypeArg, EvalWeights, NanPolicy, OptimizerKind, ScheduleKind, TaskKind,
};
use ranger_train::generate::{generate, stop_ids, GenerateOptions};
use ranger_train::source::{self, HubOptions};
use ranger_train::{TrainConfig, Trainer};

// Candle allocates a buffer per op; mimalloc reuses them instead of mapping fresh pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ranger-tune",
    version,
    about = "Fine-tune Hugging Face causal LMs and text classifiers with the Ranger optimizer (CPU, CUDA, Metal)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a causal LM or a text classifier (full or LoRA).
    Train(Box<TrainArgs>),
    /// Classify the texts of a JSONL/CSV file with a trained classifier (JSONL out).
    Predict(PredictArgs),
    /// Sample text from a base or fine-tuned model.
    Generate(GenerateArgs),
    /// Write a GGUF (Llama architecture) model out as a Hugging Face folder.
    Convert(ConvertArgs),
    /// Merge a PEFT LoRA adapter (causal LM or classifier) into its base model and write a full
    /// Hugging Face folder.
    Merge(MergeArgs),
}

/// Every option can also be set in a TOML file given with --config (same names, snake_case);
/// flags given on the command line win over the file.
#[derive(Args, Default)]
struct TrainArgs {
    /// TOML file with any of the options below.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// causal-lm | classify: next-token prediction, or sequence classification (BERT, RoBERTa,
    /// DistilBERT, or a Llama-family model pooled at its last token) [default: causal-lm].
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// Hub repository id, local model folder, or .gguf file.
    #[arg(long)]
    model: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// Training data. causal-lm: .jsonl (`text`, `prompt`+`completion`, or `messages` per line)
    /// or plain text. classify: .jsonl, .csv or .tsv with a text and a label column.
    #[arg(long)]
    data: Option<String>,
    /// classify: the text column (CSV header or JSON key) [default: text].
    #[arg(long)]
    text_column: Option<String>,
    /// classify: the column of the second text of a pair (e.g. NLI hypotheses).
    #[arg(long)]
    text_pair_column: Option<String>,
    /// classify: the label column [default: label].
    #[arg(long)]
    label_column: Option<String>,
    /// classify: comma-separated label names in id order [default: the checkpoint's id2label if
    /// it is a classifier, else the training labels sorted (integers numerically)].
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// loss | accuracy | f1: the evaluation figure that picks the best model (kept in best/ for
    /// classifiers) and drives early stopping [default: loss].
    #[arg(long, value_enum)]
    metric_for_best: Option<MetricArg>,
    /// Validation data (same formats).
    #[arg(long)]
    validation_file: Option<String>,
    /// Hold out this fraction of the training examples for validation (when no file is given).
    #[arg(long)]
    val_split: Option<f64>,
    /// Output folder (checkpoints, metrics.jsonl, loss_curve.svg, model/).
    #[arg(short, long)]
    output: Option<String>,
    /// Longest sequence in tokens; longer examples are truncated [default: 512].
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// Pack short examples into full sequences (no attention across examples).
    #[arg(long)]
    pack: bool,
    /// Also train on prompts / non-assistant turns.
    #[arg(long)]
    no_mask_prompt: bool,
    /// ranger | radam | adamw [default: ranger].
    #[arg(long, value_enum)]
    optimizer: Option<OptArg>,
    /// Peak learning rate [default: 5e-5].
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Weight decay, not applied to biases and norm weights [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Adam beta1 [default: 0.95 for ranger, 0.9 otherwise].
    #[arg(long)]
    beta1: Option<f64>,
    /// Adam beta2 [default: 0.999].
    #[arg(long)]
    beta2: Option<f64>,
    /// Adam epsilon [default: 1e-5 for ranger, 1e-8 otherwise].
    #[arg(long)]
    eps: Option<f64>,
    /// Lookahead sync period k; 0 disables Lookahead [default: 6].
    #[arg(long)]
    lookahead_k: Option<usize>,
    /// Lookahead alpha [default: 0.5].
    #[arg(long)]
    lookahead_alpha: Option<f64>,
    /// Turn gradient centralization off (ranger).
    #[arg(long)]
    no_centralize: bool,
    /// cosine | linear | constant | flat-cosine [default: cosine].
    #[arg(long, value_enum)]
    lr_scheduler: Option<SchedArg>,
    /// Warmup steps (wins over --warmup-ratio).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Warmup as a fraction of all steps [default: 0].
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Final learning rate as a fraction of the peak [default: 0].
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    /// Flat fraction of flat-cosine [default: 0.7].
    #[arg(long)]
    flat_fraction: Option<f64>,
    /// Sequences per micro-batch [default: 4].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    grad_accumulation_steps: Option<usize>,
    /// Clip the global gradient norm to this; 0 disables [default: 1].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Epochs [default: 1].
    #[arg(long)]
    epochs: Option<usize>,
    /// Optimizer steps (wins over --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Evaluate every N steps; 0: at the end only [default: 0].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Validation batches per evaluation [default: all].
    #[arg(long)]
    eval_batches: Option<usize>,
    /// Save a checkpoint every N steps; 0: at the end only [default: 0].
    #[arg(long)]
    save_every: Option<usize>,
    /// Checkpoints kept [default: 2].
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Stop after this many evaluations without improvement.
    #[arg(long)]
    early_stopping_patience: Option<usize>,
    /// Log every N steps [default: 1].
    #[arg(long)]
    log_every: Option<usize>,
    /// Seed of shuffling and the validation split [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// auto | cpu | cuda | cuda:N | metal [default: auto].
    #[arg(long)]
    device: Option<String>,
    /// f32 | bf16 | f16 parameters; optimizer state stays f32 [default: f32].
    #[arg(long, value_enum)]
    dtype: Option<DtypeCli>,
    /// On a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the batch [default: stop].
    #[arg(long, value_enum)]
    on_nan: Option<NanArg>,
    /// Evaluate and save the Lookahead slow weights or the fast ones [default: slow].
    #[arg(long, value_enum)]
    eval_weights: Option<WeightsArg>,
    /// Shard the saved model above this many bytes [default: 5000000000].
    #[arg(long)]
    max_shard_size: Option<usize>,
    /// Resume exactly from a checkpoint folder (or the output folder's latest checkpoint).
    #[arg(long)]
    resume: Option<String>,
    /// Train LoRA adapters (base weights frozen); the output is a PEFT adapter folder.
    #[arg(long)]
    lora: bool,
    /// LoRA rank [default: 8].
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha; adapters are scaled by alpha / rank [default: 16].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the adapters' input while training, as PEFT's lora_dropout (never in
    /// evaluation; masks are seeded per micro-batch, so resume stays exact) [default: 0].
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// DoRA: weight-decomposed LoRA with a trainable magnitude per output row, saved as PEFT's
    /// use_dora (implies --lora).
    #[arg(long)]
    dora: bool,
    /// rsLoRA: scale adapters by alpha / sqrt(rank) instead of alpha / rank, saved as PEFT's
    /// use_rslora (implies --lora).
    #[arg(long)]
    rslora: bool,
    /// Comma-separated projections that get adapters, by name or path suffix as PEFT matches them
    /// [default: every attention and MLP projection of the model].
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Comma-separated modules trained whole next to the adapters and saved with them, as PEFT's
    /// modules_to_save (a module path suffix: embed_tokens, lm_head, norm, ...); with tied
    /// embeddings, embed_tokens and lm_head are one matrix, saved tied (ensure_weight_tying).
    /// A classifier's head is always trained.
    #[arg(long, value_delimiter = ',')]
    modules_to_save: Option<Vec<String>>,
    /// Go on training this PEFT LoRA adapter (implies --lora; its rank, alpha, targets, DoRA and
    /// rsLoRA settings win).
    #[arg(long)]
    lora_adapter: Option<String>,
    /// Print the final summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TaskArg {
    CausalLm,
    Classify,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum MetricArg {
    Loss,
    Accuracy,
    F1,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum OptArg {
    Ranger,
    Radam,
    Adamw,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum SchedArg {
    Cosine,
    Linear,
    Constant,
    FlatCosine,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeCli {
    F32,
    Bf16,
    F16,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum NanArg {
    Stop,
    Skip,
}
#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightsArg {
    Slow,
    Fast,
}

impl TrainArgs {
    /// Defaults, then the TOML file, then the flags.
    fn into_config(self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<TrainConfig>(&text).with_context(|| format!("{}: invalid config", p.display()))?
            }
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            model,
            data,
            output,
            max_seq_length,
            learning_rate,
            weight_decay,
            beta2,
            lookahead_k,
            lookahead_alpha,
            warmup_ratio,
            min_lr_ratio,
            flat_fraction,
            batch_size,
            grad_accumulation_steps,
            max_grad_norm,
            epochs,
            eval_every,
            save_every,
            save_total_limit,
            log_every,
            seed,
            device,
            max_shard_size,
            val_split,
            lora_rank,
            lora_alpha,
            lora_dropout,
            lora_targets,
            modules_to_save,
            text_column,
            label_column
        );
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        set_opt!(
            revision,
            validation_file,
            beta1,
            eps,
            warmup_steps,
            max_steps,
            eval_batches,
            early_stopping_patience,
            resume,
            text_pair_column,
            labels
        );
        if let Some(t) = self.task {
            c.task = match t {
                TaskArg::CausalLm => TaskKind::CausalLm,
                TaskArg::Classify => TaskKind::Classify,
            };
        }
        if let Some(m) = self.metric_for_best {
            c.metric_for_best = match m {
                MetricArg::Loss => BestMetric::Loss,
                MetricArg::Accuracy => BestMetric::Accuracy,
                MetricArg::F1 => BestMetric::F1,
            };
        }
        if self.pack {
            c.pack = true;
        }
        if self.lora_adapter.is_some() {
            c.lora_adapter = self.lora_adapter.clone();
            c.lora = true;
        }
        if self.lora {
            c.lora = true;
        }
        if self.dora {
            c.dora = true;
            c.lora = true;
        }
        if self.rslora {
            c.rslora = true;
            c.lora = true;
        }
        if self.no_mask_prompt {
            c.mask_prompt = false;
        }
        if self.no_centralize {
            c.centralize = false;
        }
        if let Some(o) = self.optimizer {
            c.optimizer = match o {
                OptArg::Ranger => OptimizerKind::Ranger,
                OptArg::Radam => OptimizerKind::Radam,
                OptArg::Adamw => OptimizerKind::Adamw,
            };
        }
        if let Some(s) = self.lr_scheduler {
            c.lr_scheduler = match s {
                SchedArg::Cosine => ScheduleKind::Cosine,
                SchedArg::Linear => ScheduleKind::Linear,
                SchedArg::Constant => ScheduleKind::Constant,
                SchedArg::FlatCosine => ScheduleKind::FlatCosine,
            };
        }
        if let Some(d) = self.dtype {
            c.dtype = match d {
                DtypeCli::F32 => DTypeArg::F32,
                DtypeCli::Bf16 => DTypeArg::Bf16,
                DtypeCli::F16 => DTypeArg::F16,
            };
        }
        if let Some(n) = self.on_nan {
            c.on_nan = match n {
                NanArg::Stop => NanPolicy::Stop,
                NanArg::Skip => NanPolicy::Skip,
            };
        }
        if let Some(w) = self.eval_weights {
            c.eval_weights = match w {
                WeightsArg::Slow => EvalWeights::Slow,
                WeightsArg::Fast => EvalWeights::Fast,
            };
        }
        if c.model.is_empty() {
            bail!("--model is required (a Hub id, a model folder or a .gguf file)");
        }
        if c.data.is_empty() {
            bail!("--data is required");
        }
        Ok(c)
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Hub repository id, model folder (e.g. a ranger-tune output's model/), or .gguf file.
    #[arg(long)]
    model: String,
    /// Hub revision.
    #[arg(long)]
    revision: Option<String>,
    /// A PEFT LoRA adapter folder to apply to the model (e.g. a ranger-tune output's adapter/).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// auto | cpu | cuda | cuda:N | metal.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct PredictArgs {
    /// A classifier: a ranger-tune output's model/ or best/ folder, any Hugging Face
    /// *ForSequenceClassification folder or Hub id, or with --adapter the base model.
    #[arg(long)]
    model: String,
    /// Hub revision.
    #[arg(long)]
    revision: Option<String>,
    /// A PEFT LoRA classifier adapter (a ranger-tune output's adapter/) applied to --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Texts to classify: .jsonl, .csv or .tsv.
    #[arg(long)]
    data: PathBuf,
    /// The text column.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// The column of the second text of a pair.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// A label column: when given, accuracy, macro-F1 and per-class counts are printed.
    #[arg(long)]
    label_column: Option<String>,
    /// Where the predictions go (JSONL: line, label, label_id, scores); stdout when absent.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Longest input in tokens (capped at what the model allows).
    #[arg(long, default_value_t = 512)]
    max_seq_length: usize,
    /// Texts per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// auto | cpu | cuda | cuda:N | metal.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct MergeArgs {
    /// The base model: Hub id, folder or .gguf file.
    #[arg(long)]
    model: String,
    /// Hub revision of the base model.
    #[arg(long)]
    revision: Option<String>,
    /// The PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (Hugging Face format).
    #[arg(short, long)]
    output: PathBuf,
    /// f32 | bf16 | f16 weights in the output.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeCli,
}

#[derive(Args)]
struct ConvertArgs {
    /// The .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Output folder (Hugging Face format).
    #[arg(short, long)]
    output: PathBuf,
    /// f32 | bf16 | f16 weights in the output.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeCli,
}

fn train(args: TrainArgs) -> Result<()> {
    let json = args.json;
    let cfg = args.into_config()?;
    let session = ranger_train::prepare(cfg)?;
    let mut trainer = Trainer::new(session)?;
    let stop = trainer.stop_handle();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to abort)");
    })
    .context("installing the Ctrl-C handler")?;
    eprintln!(
        "training {} ({} trainable parameters) on {} {} for {} steps",
        trainer.session().origin(),
        trainer.trainable_parameters(),
        trainer.session().task().n_train(),
        if trainer.session().task().classifier().is_some() { "examples" } else { "sequences" },
        trainer.state().total_steps
    );
    let s = trainer.run()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    use ranger_train::StopReason;
    match s.stopped {
        StopReason::Completed => println!("training complete"),
        StopReason::Interrupted | StopReason::EarlyStopped { .. } => println!("{}", s.stopped),
    }
    println!("  trainable parameters  {}", s.trainable_parameters);
    println!("  steps                 {}", s.steps);
    println!("  tokens                {}", s.tokens);
    println!("  wall time             {:.1} s", s.wall_seconds);
    if let Some(l) = s.last_train_loss {
        println!("  last training loss    {l:.4}");
    }
    match (s.eval_loss, s.eval_perplexity, s.eval_accuracy) {
        (Some(l), Some(p), _) => println!("  eval loss             {l:.4} (perplexity {p:.2}, {} weights)", s.weights),
        (Some(l), None, Some(a)) => {
            println!("  eval loss             {l:.4} ({} weights)", s.weights);
            println!("  eval accuracy         {a:.4} (macro-F1 {:.4})", s.eval_macro_f1.unwrap_or(f64::NAN));
        }
        _ => println!("  eval loss             - (no validation data)"),
    }
    if let (Some(dir), Some(e)) = (&s.best_model, &s.best_evaluation) {
        let acc = e.classes.as_ref().map_or(f64::NAN, |c| c.accuracy);
        println!("  best model            {} (eval loss {:.4}, accuracy {acc:.4})", dir.display(), e.loss);
    }
    if let Some(c) = &s.checkpoint {
        println!("  last checkpoint       {} (resume with --resume {})", c.display(), c.display());
    }
    match &s.output {
        Some(o) => println!(
            "  {} ({} weights)  {}",
            if o.ends_with("adapter") { "LoRA adapter" } else { "model" },
            s.weights,
            o.display()
        ),
        None => println!("  model                 not written (interrupted); resume to finish"),
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let loaded = source::load(&a.model, &HubOptions { revision: a.revision.clone() })?;
    let dtype = candle_core::DType::F32;
    let config = loaded.decoder()?.clone();
    let vars = ranger_train::weights::into_vars(&config, loaded.weights, dtype, &device, &loaded.origin)?;
    let mut model =
        ranger_train::model::LlamaModel::from_vars(config, &vars).map_err(|n| anyhow::anyhow!("missing tensor {n}"))?;
    if let Some(dir) = &a.adapter {
        ranger_train::peft::load_peft_adapter(&mut model, dir, None)?;
    }
    let stop = stop_ids(&loaded.tokenizer, loaded.generation_config.as_ref());
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        chat: a.chat,
    };
    use std::io::Write;
    generate(&model, &loaded.tokenizer, &a.prompt, &stop, &opts, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    Ok(())
}

fn dtype_of(d: DtypeCli) -> candle_core::DType {
    match d {
        DtypeCli::F32 => candle_core::DType::F32,
        DtypeCli::Bf16 => candle_core::DType::BF16,
        DtypeCli::F16 => candle_core::DType::F16,
    }
}

fn merge(a: MergeArgs) -> Result<()> {
    let loaded = source::load(&a.model, &HubOptions { revision: a.revision.clone() })?;
    let cpu = candle_core::Device::Cpu;
    let dtype = dtype_of(a.dtype);
    let cast = |w: Vec<(String, candle_core::Tensor)>| {
        w.into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect::<Result<Vec<_>>>()
    };
    if a.adapter.join(ranger_train::predict::ADAPTER_CLASSIFIER_CONFIG).exists() {
        // A classifier's adapter: its head and labels come with it.
        let clf = ranger_train::predict::load_classifier(loaded, Some(&a.adapter), candle_core::DType::F32, &cpu)?;
        let weights = cast(clf.model.merged_weights()?)?;
        let json = clf.model.config.classifier_json(&clf.labels, clf.tokenizer.pad_id, dtype);
        ranger_train::output::save_hf_folder(&a.output, &json, &weights, &clf.tokenizer, None, 5_000_000_000)?;
        println!("wrote {} (classifier {} + adapter {}, merged)", a.output.display(), a.model, a.adapter.display());
        return Ok(());
    }
    let config = loaded.decoder()?.clone();
    let base =
        ranger_train::weights::into_tensors(&config, loaded.weights, candle_core::DType::F32, &cpu, &loaded.origin)?;
    let mut model = ranger_train::model::LlamaModel::new(config.clone(), &base.into_iter().collect())
        .map_err(|n| anyhow::anyhow!("missing tensor {n}"))?;
    ranger_train::peft::load_peft_adapter(&mut model, &a.adapter, None)?;
    let weights = cast(model.merged_weights()?)?;
    let gen = loaded
        .generation_config
        .clone()
        .unwrap_or_else(|| ranger_train::output::default_generation_config(&config.raw));
    ranger_train::output::save_hf_folder(
        &a.output,
        &config.raw,
        &weights,
        &loaded.tokenizer,
        Some(&gen),
        5_000_000_000,
    )?;
    println!("wrote {} (base {} + adapter {}, merged)", a.output.display(), a.model, a.adapter.display());
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    if a.model.extension().is_none_or(|e| e != "gguf") {
        bail!("{}: convert expects a .gguf file", a.model.display());
    }
    let loaded = ranger_train::gguf::load_gguf(&a.model)?;
    let config = loaded.decoder()?.clone();
    let dtype = dtype_of(a.dtype);
    let mut weights: Vec<(String, candle_core::Tensor)> = Vec::new();
    for (name, _) in config.weight_shapes() {
        let t = loaded.weights.get(&name).with_context(|| format!("{}: tensor {name} missing", a.model.display()))?;
        weights.push((name, t.to_dtype(dtype)?));
    }
    let gen = loaded
        .generation_config
        .clone()
        .unwrap_or_else(|| ranger_train::output::default_generation_config(&config.raw));
    ranger_train::output::save_hf_folder(
        &a.output,
        &config.raw,
        &weights,
        &loaded.tokenizer,
        Some(&gen),
        5_000_000_000,
    )?;
    println!("wrote {} (Hugging Face format, {} tensors)", a.output.display(), weights.len());
    Ok(())
}

fn main() -> Result<()> {
    ranger_train::alloc::tune_mimalloc();
    match Cli::parse().command {
        Command::Train(a) => train(*a),
        Command::Generate(a) => run_generate(a),
        Command::Convert(a) => convert(a),
        Command::Merge(a) => merge(a),
        Command::Predict(a) => predict(a),
    }
}

fn predict(a: PredictArgs) -> Result<()> {
    use std::io::Write;
    let device = parse_device(&a.device)?;
    let loaded = source::load(&a.model, &HubOptions { revision: a.revision.clone() })?;
    let clf = ranger_train::predict::load_classifier(loaded, a.adapter.as_deref(), candle_core::DType::F32, &device)?;
    let cols = ranger_train::classify::Columns {
        text: a.text_column.clone(),
        text_pair: a.text_pair_column.clone(),
        label: a.label_column.clone(),
    };
    let records = ranger_train::classify::read_records(&a.data, &cols)?;
    let preds = clf.predict(&records, a.max_seq_length, a.batch_size, &a.data)?;
    let mut text = String::new();
    for (r, p) in records.iter().zip(&preds) {
        let mut v = serde_json::json!({ "line": r.line, "label": p.label, "label_id": p.label_id, "scores": p.scores });
        if let Some(gold) = &r.label {
            v["gold"] = serde_json::json!(gold);
        }
        text.push_str(&v.to_string());
        text.push('\n');
    }
    match &a.output {
        Some(path) => {
            ranger_train::weights::write_atomic(path, text.as_bytes())?;
            eprintln!("wrote {} predictions to {}", preds.len(), path.display());
        }
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    if a.label_column.is_some() {
        let gold: Vec<u32> = records
            .iter()
            .map(|r| {
                let l = r.label.as_deref().unwrap_or_default();
                clf.labels.iter().position(|n| n == l).map(|i| i as u32).with_context(|| {
                    format!(
                        "{}:{}: label {l:?} is not one of the model's labels ({})",
                        a.data.display(),
                        r.line,
                        clf.labels.join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?;
        let predicted: Vec<u32> = preds.iter().map(|p| p.label_id).collect();
        let m = ranger_train::classify::ClassMetrics::compute(&predicted, &gold, &clf.labels);
        eprintln!("accuracy {:.4}  macro-F1 {:.4}  on {} examples", m.accuracy, m.macro_f1, m.examples);
        for c in &m.per_class {
            eprintln!(
                "  {:<20} support {:>6}  predicted {:>6}  correct {:>6}  precision {:.4}  recall {:.4}  f1 {:.4}",
                c.label, c.support, c.predicted, c.correct, c.precision, c.recall, c.f1
            );
        }
    }
    Ok(())
}
