//! A model read into memory, whatever its source (a Hugging Face folder, the Hub, a GGUF file):
//! what the loaders give and the model builders take.

use std::collections::HashMap;

use candle_core::Tensor;
use serde_json::Value;

use crate::error::Result;
use crate::model::{LlamaConfig, ModelConfig};
use crate::tokenizer::TextTokenizer;

/// A model read into memory (weights on the CPU, in their stored dtype).
pub struct LoadedModel {
    /// The configuration.
    pub config: ModelConfig,
    /// Weights by Hugging Face name.
    pub weights: HashMap<String, Tensor>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// `generation_config.json`, if the source had one.
    pub generation_config: Option<Value>,
    /// Human-readable origin, used in messages.
    pub origin: String,
}

impl LoadedModel {
    /// The decoder configuration (an encoder is an error naming the model).
    pub fn decoder(&self) -> Result<&LlamaConfig> {
        self.config.decoder(&self.origin)
    }

    /// `generation_config.json` for a causal LM: the source's, or one with the special-token
    /// ids of `config.json` when it had none.
    pub fn generation_config_or_default(&self) -> Value {
        self.generation_config.clone().unwrap_or_else(|| crate::output::default_generation_config(self.config.raw()))
    }
}
