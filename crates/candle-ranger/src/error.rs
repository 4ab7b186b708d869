//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in `candle-ranger`.
///
/// The [`candle_nn::Optimizer`] trait methods return `candle_core::Result`; there these errors are
/// wrapped with [`candle_core::Error::wrap`], so their message is preserved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error raised by Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A hyperparameter is out of its valid range.
    #[error("invalid optimizer configuration: {0}")]
    InvalidConfig(String),

    /// A variable's dtype is one its device cannot compute in (f64 on Metal).
    #[error("variable `{name}` is {} on {device}, which has no {} operations: use f32, bf16 or f16", .dtype.as_str(), .dtype.as_str())]
    UnsupportedDtype {
        /// The variable's name.
        name: String,
        /// Its dtype.
        dtype: candle_core::DType,
        /// Its device.
        device: String,
    },

    /// Two variables were given the same name (names key the saved state).
    #[error("duplicate variable name `{0}`: every variable needs a unique name")]
    DuplicateName(String),

    /// Some gradients contain NaN or infinity and [`crate::NonFiniteGrads::Error`] is in force.
    #[error("non-finite gradient (NaN or infinity) in {}", .vars.join(", "))]
    NonFiniteGradient {
        /// Names of the variables whose gradient is not finite.
        vars: Vec<String>,
    },

    /// Reading or writing a state file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A state file is not a valid safetensors file, or not one written by this crate.
    #[error("{}: {message}", .path.display())]
    StateFormat {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Optimizer state (a file, or tensors given to `load_state_tensors`) does not fit this
    /// optimizer: a tensor is missing, unexpected, or has the wrong shape or dtype.
    #[error("{}tensor `{tensor}`: {problem}", file_prefix(.path))]
    StateMismatch {
        /// The file involved; `None` for state given as tensors.
        path: Option<PathBuf>,
        /// The tensor's name in the state.
        tensor: String,
        /// What does not match.
        problem: String,
    },

    /// A gradient's shape differs from its variable's.
    #[error("gradient of `{var}` has shape {grad:?}, the variable {expected:?}")]
    GradientShape {
        /// The variable's name.
        var: String,
        /// The gradient's shape.
        grad: Vec<usize>,
        /// The variable's shape.
        expected: Vec<usize>,
    },

    /// A [`crate::Lookahead`] setting is out of range.
    #[error("lookahead: k must be >= 1 and alpha in [0, 1], got k = {k}, alpha = {alpha}")]
    InvalidLookahead {
        /// The sync period.
        k: usize,
        /// The interpolation factor.
        alpha: f64,
    },

    /// A call that needs the fast weights was made while the slow weights are swapped in.
    #[error("{call} called while the slow weights are swapped in; call swap_back_fast_weights first")]
    SlowWeightsSwappedIn {
        /// The method called (`step`, `sync`, ...).
        call: &'static str,
    },
}

/// `"<path>: "` for errors about a file, nothing for state given as tensors.
fn file_prefix(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Converts into a Candle error (for the [`candle_nn::Optimizer`] trait methods).
    pub fn into_candle(self) -> candle_core::Error {
        match self {
            Error::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }

    /// Names `path` in a [`Error::StateMismatch`] that names no file yet (state loaded from a
    /// file through `load_state_tensors`); other errors are returned as they are.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Error::StateMismatch { path: None, tensor, problem } => {
                Error::StateMismatch { path: Some(path.to_path_buf()), tensor, problem }
            }
            other => other,
        }
    }
}
