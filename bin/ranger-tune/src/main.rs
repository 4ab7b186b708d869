//! `ranger-tune`: fine-tune Hugging Face causal LMs and text classifiers with the Ranger
//! optimizer.
//!
//! A thin command-line layer over the `ranger-train` crate.

mod resume_command;
mod stop;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ranger_train::build::{ModelBuilder, Tuning};
use ranger_train::config::{parse_device, DTypeArg, GgufTypeArg};
use ranger_train::convert::gguf_to_hf;
use ranger_train::data::DataOptions;
use ranger_train::generate::{generate, stop_ids, GenerateOptions};
use ranger_train::held_out::file_loss;
use ranger_train::merge::{merge_adapter_with_gguf, GgufExport, Merged};
use ranger_train::source::{self, HubOptions, LoadedModel};
use ranger_train::trainer::OutputLock;
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
    ///
    /// --model is the classifier (a ranger-tune output's model/ or best/ folder, any Hugging
    /// Face *ForSequenceClassification folder or Hub id), or with --adapter its base model.
    Predict(PredictArgs),
    /// Sample text from a base or fine-tuned model.
    Generate(GenerateArgs),
    /// Score a causal LM (optionally with a LoRA adapter) on a data file: mean loss per target
    /// token and perplexity, reading the file as `train` reads its data.
    ///
    /// The same number `train` reports as its eval loss for the same file and options; use it to
    /// compare models, or to check what a fine-tune did to text it never trained on. Classifiers
    /// are scored by `predict --label-column`.
    Eval(EvalArgs),
    /// Write a GGUF (Llama architecture) model out as a Hugging Face folder.
    Convert(ConvertArgs),
    /// Merge a PEFT LoRA adapter (causal LM or classifier) into its base model and write a full
    /// Hugging Face folder.
    Merge(MergeArgs),
}

/// Every option can also be set in a TOML file given with --config (same names, snake_case);
/// flags given on the command line win over the file.
#[derive(Args)]
struct TrainArgs {
    /// TOML file with any of the options below.
    #[arg(short, long = "config", value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Print the final summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: TrainConfig,
}

impl TrainArgs {
    /// Defaults, then the TOML file, then the flags given in `matches` (this subcommand's).
    fn into_config(self, matches: &ArgMatches) -> Result<TrainConfig> {
        let text = match &self.config_file {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(TrainConfig::from_matches_and_toml(matches, self.config_file.as_deref().zip(text.as_deref()))?)
    }
}

/// `--model` and `--revision`: where generate, predict and merge read a model from.
#[derive(Args)]
struct ModelArg {
    /// Hub repository id, model folder (e.g. a ranger-tune output's model/), or .gguf file.
    #[arg(long)]
    model: String,
    /// Hub revision (branch, tag or commit) when --model is a Hub id.
    #[arg(long)]
    revision: Option<String>,
    /// A Jinja chat template file to use instead of the model's own (for a model without one,
    /// such as a base model's GGUF file); a folder this command writes carries it. Without it,
    /// such a model takes the template of the --adapter folder, if that has one.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
}

impl ModelArg {
    /// The model, with `--chat-template`'s template if given, else, for a model without one,
    /// the template of `adapter`'s folder (a run trained with `--chat-template` saves it there).
    fn load_with_adapter(&self, adapter: Option<&Path>) -> Result<LoadedModel> {
        let mut loaded = self.load()?;
        if let (None, Some(dir)) = (&loaded.tokenizer.chat_template, adapter) {
            if let Some(template) = ranger_train::tokenizer::read_chat_template(dir)? {
                loaded.tokenizer = loaded.tokenizer.with_chat_template(template);
            }
        }
        Ok(loaded)
    }

    fn load(&self) -> Result<LoadedModel> {
        let mut loaded = source::load(&self.model, &HubOptions { revision: self.revision.clone() })?;
        if let Some(path) = &self.chat_template {
            loaded.tokenizer = loaded.tokenizer.with_chat_template_file(path)?;
        }
        Ok(loaded)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
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
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A PEFT LoRA adapter folder to apply to the model (e.g. a ranger-tune output's adapter/).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The data: .jsonl records (text, prompt/completion or chat messages) or plain text.
    #[arg(long)]
    data: PathBuf,
    /// Longest sequence in tokens; longer examples are truncated (as in training).
    #[arg(long, default_value_t = 512)]
    max_seq_length: usize,
    /// Score prompts and every chat turn too, not only completions and assistant turns.
    #[arg(long = "no-mask-prompt", action = clap::ArgAction::SetFalse)]
    mask_prompt: bool,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// auto | cpu | cuda | cuda:N | metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight dtype for the forward pass.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArg,
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
    #[command(flatten)]
    model: ModelArg,
    /// The PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (Hugging Face format).
    #[arg(short, long)]
    output: PathBuf,
    /// f32 | bf16 | f16 weights in the output.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Also write the merged model as a GGUF file that llama.cpp reads, its matrices in this
    /// format (norms and biases f32), quantized from the f32 merge; --model must be a .gguf
    /// file (its metadata, tokenizer and tensor names are kept). Causal LMs only.
    #[arg(long, value_enum, value_name = "FORMAT")]
    gguf: Option<GgufTypeArg>,
    /// Where --gguf writes [default: <OUTPUT>/model-<FORMAT>.gguf].
    #[arg(long, value_name = "FILE", requires = "gguf")]
    gguf_path: Option<PathBuf>,
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
    dtype: DTypeArg,
}

/// Trains; a run stopped by a signal exits with [`stop::EXIT_STOPPED`] after saying how to resume.
fn train(args: TrainArgs, matches: &ArgMatches) -> Result<ExitCode> {
    let json = args.json;
    let cfg = args.into_config(matches)?;
    // A folder another run is using is refused here, before the model loads (a new folder is
    // locked when the run starts).
    let output = std::path::Path::new(&cfg.output);
    let lock = if output.is_dir() { Some(OutputLock::acquire(output)?) } else { None };
    let session = ranger_train::prepare(cfg)?;
    let mut trainer = Trainer::new(session)?;
    if let Some(lock) = lock {
        trainer.keep_output_lock(lock);
    }
    stop::on_signals_set(trainer.stop_handle())?;
    eprintln!(
        "training {} ({} trainable parameters) on {} {} for {} steps",
        trainer.session().origin(),
        trainer.trainable_parameters(),
        trainer.session().task().n_train(),
        if trainer.session().task().classifier().is_some() { "examples" } else { "sequences" },
        trainer.state().total_steps
    );
    if let Some(model) = trainer.session().task().causal_lm() {
        let quantized = model.quantized_weights();
        if !quantized.is_empty() {
            let parts: Vec<String> = quantized.iter().map(|(f, n, _)| format!("{n} {f:?}")).collect();
            let mib = quantized.iter().map(|(_, _, b)| b).sum::<usize>() as f64 / (1 << 20) as f64;
            eprintln!("QLoRA: base weights kept quantized ({}; {mib:.1} MiB)", parts.join(", "));
        }
    }
    let s = trainer.run()?;
    let stopped = s.stopped == ranger_train::StopReason::Interrupted;
    let code = if stopped { ExitCode::from(stop::EXIT_STOPPED) } else { ExitCode::SUCCESS };
    // Last, on stderr (stdout may be the JSON summary): how to go on from the checkpoint.
    let resume_hint = || {
        if let (true, Some(c)) = (stopped, &s.checkpoint) {
            eprintln!(
                "stopped at step {} of {}: checkpoint {} and metrics written. To pick the run up again:\n  {}",
                s.steps,
                trainer.state().total_steps,
                c.display(),
                resume_command::resume_command(std::env::args_os(), c)
            );
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        resume_hint();
        return Ok(code);
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
    resume_hint();
    Ok(code)
}

/// The causal LM of `loaded` (with the PEFT adapter in `adapter`, if any), frozen, in `dtype` on
/// `device`, and its tokenizer: what generate and eval run.
fn frozen_causal_lm(
    loaded: LoadedModel,
    adapter: Option<&std::path::Path>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<(ranger_train::model::LlamaModel, ranger_train::tokenizer::TextTokenizer)> {
    let config = loaded.decoder()?.clone();
    let tuning = adapter.map_or(Tuning::Frozen, Tuning::WithAdapter);
    let builder = ModelBuilder { dtype, device, tuning };
    let LoadedModel { weights, tokenizer, origin, .. } = loaded;
    Ok((builder.causal_lm(config, weights, &origin)?.model, tokenizer))
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let loaded = a.model.load_with_adapter(a.adapter.as_deref())?;
    let stop = stop_ids(&loaded.tokenizer, loaded.generation_config.as_ref());
    let (model, tokenizer) = frozen_causal_lm(loaded, a.adapter.as_deref(), candle_core::DType::F32, &device)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        chat: a.chat,
    };
    use std::io::Write;
    generate(&model, &tokenizer, &a.prompt, &stop, &opts, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let loaded = a.model.load_with_adapter(a.adapter.as_deref())?;
    loaded.decoder().with_context(|| "eval scores causal LMs; score a classifier with `predict --label-column`")?;
    let (model, tokenizer) = frozen_causal_lm(loaded, a.adapter.as_deref(), a.dtype.dtype(), &device)?;
    let opts = DataOptions { max_seq_len: a.max_seq_length, pack: false, mask_prompt: a.mask_prompt };
    let r = file_loss(&model, &tokenizer, &a.data, &opts, a.batch_size)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let what = match &a.adapter {
        Some(d) => format!("{} + adapter {}", a.model.model, d.display()),
        None => a.model.model.clone(),
    };
    println!("{what} on {}", a.data.display());
    println!("  loss        {:.4} (mean per target token)", r.loss);
    println!("  perplexity  {:.3}", r.perplexity);
    println!("  scored      {} target tokens in {} examples", r.target_tokens, r.examples);
    if r.truncated + r.dropped > 0 {
        println!(
            "  note        {} examples cut to --max-seq-length {}, {} dropped (nothing left to score)",
            r.truncated, a.max_seq_length, r.dropped
        );
    }
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    let source = PathBuf::from(&a.model.model);
    let gguf_path =
        a.gguf.map(|f| a.gguf_path.clone().unwrap_or_else(|| a.output.join(format!("model-{}.gguf", f.name()))));
    if a.gguf.is_some() && !(source.is_file() && source.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))) {
        bail!(
            "--gguf needs the base as a .gguf file (--model {}): its metadata, tokenizer and tensor names are kept; \
             for another base, convert the merged folder with llama.cpp's convert_hf_to_gguf.py",
            a.model.model
        );
    }
    if let Some(parent) = gguf_path.as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let export =
        a.gguf.zip(gguf_path.as_deref()).map(|(f, path)| GgufExport { source: &source, format: f.format(), path });
    let base = a.model.load_with_adapter(Some(&a.adapter))?;
    let (merged, exported) = merge_adapter_with_gguf(base, &a.adapter, &a.output, a.dtype.dtype(), export)?;
    let what = match merged {
        Merged::Classifier => "classifier",
        Merged::CausalLm => "base",
    };
    println!("wrote {} ({what} {} + adapter {}, merged)", a.output.display(), a.model.model, a.adapter.display());
    if let (Some(e), Some(path)) = (exported, gguf_path) {
        let formats: Vec<String> = e.formats.iter().map(|(f, n)| format!("{n} {f}")).collect();
        let copied = if e.copied > 0 { format!(", {} copied from the base", e.copied) } else { String::new() };
        println!(
            "wrote {} (GGUF, {:.1} MiB: {}{copied})",
            path.display(),
            e.bytes as f64 / (1 << 20) as f64,
            formats.join(", ")
        );
    }
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let n = gguf_to_hf(&a.model, &a.output, a.dtype.dtype())?;
    println!("wrote {} (Hugging Face format, {n} tensors)", a.output.display());
    Ok(())
}

fn main() -> Result<ExitCode> {
    ranger_train::alloc::tune_mimalloc();
    let matches = Cli::command().get_matches();
    match Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()).command {
        // The train options' sources (flag or default) decide what wins over the TOML file.
        Command::Train(a) => return train(*a, matches.subcommand_matches("train").expect("the train subcommand")),
        Command::Generate(a) => run_generate(a),
        Command::Eval(a) => run_eval(a),
        Command::Convert(a) => convert(a),
        Command::Merge(a) => merge(a),
        Command::Predict(a) => predict(a),
    }?;
    Ok(ExitCode::SUCCESS)
}

fn predict(a: PredictArgs) -> Result<()> {
    use std::io::Write;
    let device = parse_device(&a.device)?;
    let loaded = a.model.load()?;
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
