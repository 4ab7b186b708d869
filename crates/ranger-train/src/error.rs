//! Errors of the training engine. Each names the file, line or tensor involved.

use std::path::PathBuf;

/// Everything that can go wrong while loading, training or saving.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the optimizer crate.
    #[error(transparent)]
    Optimizer(#[from] candle_ranger::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A malformed `config.json` (or equivalent).
    #[error("{origin}: {message}")]
    Config {
        /// Where the configuration came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A `model_type` we cannot train.
    #[error("{origin}: unsupported architecture {model_type:?} (supported: llama, mistral, qwen2, qwen3, smollm3; for classification also bert, roberta, xlm-roberta, camembert, distilbert)")]
    UnsupportedArchitecture {
        /// Where the configuration came from.
        origin: String,
        /// The model type found.
        model_type: String,
    },
    /// A weight file lacks a tensor, or has one of the wrong shape.
    #[error("{origin}: tensor `{tensor}`: {problem}")]
    Weights {
        /// The weight file or folder.
        origin: String,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// A data file has a malformed line.
    #[error("{}:{line}: {message}", .path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The dataset is empty once tokenized and truncated.
    #[error("{0}")]
    EmptyDataset(String),
    /// Tokenizer problems.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template problems.
    #[error("chat template: {0}")]
    Template(String),
    /// The loss became NaN or infinite.
    #[error("non-finite loss ({loss}) at step {step}; the last good checkpoint was kept")]
    NonFiniteLoss {
        /// The optimizer step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// Some trainable tensors got no gradient.
    #[error("these trainable tensors received no (or an all-zero) gradient, so they would never learn: {}", .0.join(", "))]
    MissingGradients(Vec<String>),
    /// A file that is not what it should be (an unreadable GGUF or safetensors file, a model
    /// folder without weights).
    #[error("{}: {message}", .path.display())]
    Format {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A model given on the command line or in the configuration that cannot be found or used.
    #[error("{spec}: {problem}")]
    ModelSpec {
        /// The model as given: a path or a Hub id.
        spec: String,
        /// What is wrong.
        problem: String,
    },
    /// The Hugging Face Hub (or a mirror) could not provide a repository's files.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    /// A model was built over weights that lack one of its tensors.
    #[error("tensor `{tensor}` missing from the weights the model is built over")]
    MissingTensor {
        /// The tensor's Hugging Face name.
        tensor: String,
    },
    /// A `modules_to_save` entry that selects no module of the model.
    #[error("modules_to_save entry {entry:?} matches no module of this model")]
    UnknownModule {
        /// The entry.
        entry: String,
    },
    /// Generation was asked to continue an empty prompt.
    #[error("the prompt is empty (no tokens to continue)")]
    EmptyPrompt,
    /// A batch was handed to the task of the other kind (a causal-LM batch to a classifier or
    /// the reverse): a bug in the caller.
    #[error("batch of the other task")]
    BatchOfOtherTask,
    /// An option has a value the run cannot use.
    #[error("{message}")]
    InvalidOption {
        /// The option (its `TrainConfig` field name).
        option: &'static str,
        /// What is wrong, naming the option.
        message: String,
    },
    /// No checkpoint to resume from.
    #[error("{}: no checkpoint (trainer_state.json) found", .path.display())]
    NoCheckpoint {
        /// The folder searched.
        path: PathBuf,
    },
    /// The checkpoint was made with options that may not change on a resume.
    #[error("{}: the checkpoint was made with different options: {}", .checkpoint.display(),
        .mismatches.join("; "))]
    ResumeOptionsDiffer {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// Each option that differs, with both values (`ResumeMismatch`'s text).
        mismatches: Vec<String>,
    },
    /// The training data is not the data the checkpoint was trained on.
    #[error("{}: the training data differs from the checkpoint's", .checkpoint.display())]
    ResumeDataDiffers {
        /// The checkpoint.
        checkpoint: PathBuf,
    },
    /// A checkpoint's weight file could not be read.
    #[error("{}: {source}", .path.display())]
    CheckpointWeights {
        /// The weight file.
        path: PathBuf,
        /// Candle's error.
        source: candle_core::Error,
    },
    /// Writing an output failed: a file, or a whole folder (a checkpoint, `model/`, `adapter/`,
    /// `best/`) built under a temporary name. Its partial files were removed and what was there
    /// before (the earlier checkpoints, a previous `best/`) is kept.
    #[error("{}: cannot write it (it needs about {}): {}: {source}; its partial files were removed{}",
        .target.display(), human_bytes(.needed), .file.display(),
        way_out(.target, .source))]
    WriteFailed {
        /// What was being written: the file, or the folder.
        target: PathBuf,
        /// The file whose write failed.
        file: PathBuf,
        /// The bytes the whole write needed (its files' sizes summed).
        needed: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another run is using the output folder (its lock file is locked).
    #[error("{}: another run is using this output folder ({holder}; lock file {}); wait for it to end, \
        or write to another --output", .dir.display(), .lock_file.display())]
    OutputLocked {
        /// The output folder.
        dir: PathBuf,
        /// Its lock file.
        lock_file: PathBuf,
        /// Who holds it: `pid N on host H since T`, as its lock file says.
        holder: String,
    },
    /// A file of a checkpoint does not match the checksum recorded when it was written.
    #[error("{}: damaged ({problem}), so this checkpoint cannot be resumed; {}", .file.display(),
        go_back(.previous))]
    CheckpointDamaged {
        /// The damaged file.
        file: PathBuf,
        /// How it differs: its size or its CRC-32 against the recorded ones.
        problem: String,
        /// The latest checkpoint before it in the same folder, if any.
        previous: Option<PathBuf>,
    },
    /// A checkpoint lacks the optimizer state, so the run cannot resume exactly.
    #[error("{}: optimizer.safetensors is missing, so the run cannot resume exactly", .checkpoint.display())]
    MissingOptimizerState {
        /// The checkpoint.
        checkpoint: PathBuf,
    },
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}

/// `1.2 MB (1234567 bytes)`: decimal units, as disk tools report free space.
fn human_bytes(n: &u64) -> String {
    let n = *n;
    let units = ["bytes", "kB", "MB", "GB", "TB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1000.0 && unit + 1 < units.len() {
        x /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{x:.1} {} ({n} bytes)", units[unit])
    }
}

/// What to do after a failed write: for a full disk (or quota, or file size limit) the ways to
/// make room; a checkpoint's failure also keeps the earlier checkpoints.
fn way_out(target: &std::path::Path, source: &std::io::Error) -> String {
    use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
    let checkpoint = target.file_name().is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"));
    let kept = if checkpoint { " and the earlier checkpoints are kept" } else { "" };
    match source.kind() {
        StorageFull | QuotaExceeded | FileTooLarge if checkpoint => format!(
            "{kept}. Free some space, keep fewer checkpoints (--save-total-limit), or write to another --output"
        ),
        StorageFull | QuotaExceeded | FileTooLarge => format!("{kept}. Free some space, or write to another --output"),
        _ => format!("{kept}. Check that the folder is writable, or write to another --output"),
    }
}

/// Where to resume from instead of a damaged checkpoint.
fn go_back(previous: &Option<PathBuf>) -> String {
    match previous {
        Some(p) => format!("resume from the previous one instead: --resume {}", p.display()),
        None => "there is no earlier checkpoint next to it".to_string(),
    }
}
