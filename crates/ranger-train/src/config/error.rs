//! Why the options of a run could not be put together.

use std::path::PathBuf;

/// Why the options of a run could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file is not TOML, has an unknown key or a value of the wrong type (the
    /// source names the key and the line).
    #[error("{}: invalid config", .path.display())]
    Toml {
        /// The file.
        path: PathBuf,
        /// What the TOML reader found.
        source: toml::de::Error,
    },
    /// The argument matches were not made by [`TrainConfig`](super::TrainConfig)'s flags.
    #[error("command line: {0}")]
    Flags(#[from] clap::Error),
    /// A flag's value that a TOML file could not hold either (an integer above 2^63 - 1).
    #[error("command line: {0}")]
    Unrepresentable(#[from] toml::ser::Error),
    /// Neither a flag nor the file names the model.
    #[error("--model is required (a Hub id, a model folder or a .gguf file)")]
    MissingModel,
    /// Neither a flag nor the file names the training data.
    #[error("--data is required")]
    MissingData,
}
