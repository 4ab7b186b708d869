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
    #[error("{origin}: unsupported architecture {model_type:?} (supported: llama, mistral, qwen2, qwen3; for classification also bert, roberta, xlm-roberta, camembert, distilbert)")]
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
    /// `candle_nn::AdamW` keeps its moments private, so they cannot be set from a checkpoint.
    #[error("AdamW state cannot be restored")]
    AdamwStateNotRestorable,
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
