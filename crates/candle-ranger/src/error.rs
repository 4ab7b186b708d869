//! The crate's error type.

use std::path::PathBuf;

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

    /// A state file does not fit this optimizer: a tensor is missing, unexpected, or has the
    /// wrong shape or dtype.
    #[error("{}: tensor `{tensor}`: {problem}", .path.display())]
    StateMismatch {
        /// The file involved.
        path: PathBuf,
        /// The tensor name in the file.
        tensor: String,
        /// What does not match.
        problem: String,
    },
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
}
