//! A model read into memory, whatever its source (a Hugging Face folder, the Hub, a GGUF file):
//! what the loaders give and the model builders take.

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::Result;
use crate::model::llama_names::{all_projections, Names, EMBED, LM_HEAD};
use crate::model::{LlamaConfig, ModelConfig};
use crate::tokenizer::TextTokenizer;

/// A model read into memory (weights on the CPU, in their stored dtype).
pub struct LoadedModel {
    /// The configuration.
    pub config: ModelConfig,
    /// Weights by Hugging Face name.
    pub weights: HashMap<String, Tensor>,
    /// Decoder weights kept in a GGUF block format (QLoRA's base: the projections, the
    /// embedding and the LM head; [`is_quantizable`]), by Hugging Face name; not in `weights`.
    /// Empty unless the loader was asked to keep them ([`crate::source::LoadOptions`]) or
    /// [`LoadedModel::quantize_base`] made them.
    pub quantized: HashMap<String, QTensor>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// `generation_config.json`, if the source had one.
    pub generation_config: Option<Value>,
    /// Human-readable origin, used in messages.
    pub origin: String,
}

/// The format llama.cpp falls back to for a row width that is not a whole number of
/// 256-value k-quant super-blocks (`llama-quant.cpp`).
pub(crate) fn fallback(format: GgmlDType) -> GgmlDType {
    match format {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::Q8_0,
    }
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

    /// Moves every quantized weight back into `weights`, dequantized to f32.
    pub fn dequantize_all(&mut self) -> Result<()> {
        for (name, q) in self.quantized.drain() {
            self.weights.insert(name, q.dequantize(&Device::Cpu)?);
        }
        Ok(())
    }

    /// Moves the quantized weights `which` selects back into `weights`, dequantized to f32.
    pub fn dequantize_where(&mut self, which: impl Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self.quantized.keys().filter(|n| which(n)).cloned().collect();
        for name in names {
            let q = self.quantized.remove(&name).expect("listed above");
            self.weights.insert(name, q.dequantize(&Device::Cpu)?);
        }
        Ok(())
    }

    /// Quantizes the decoder's weights that QLoRA keeps quantized ([`is_quantizable`]) still in
    /// `weights` to `format` ([`quantize_base_weight`]), moving them to `quantized`.
    pub fn quantize_base(&mut self, format: GgmlDType) -> Result<()> {
        self.decoder()?;
        let names: Vec<String> = self.weights.keys().filter(|n| is_quantizable(n)).cloned().collect();
        for name in names {
            if let Some(q) = quantize_base_weight(&name, &self.weights[&name], format)? {
                self.weights.remove(&name);
                self.quantized.insert(name, q);
            }
        }
        Ok(())
    }
}

/// Whether QLoRA keeps the decoder weight `name` quantized: an attention or feed-forward
/// projection, the embedding or the LM head (frozen matrices; not the norms).
pub fn is_quantizable(name: &str) -> bool {
    name == EMBED
        || name == Names::GPT2.embed
        || name == LM_HEAD
        || all_projections().any(|p| name.strip_suffix(".weight").is_some_and(|n| n.ends_with(&format!(".{p}"))))
}

/// `w` quantized to `format` when QLoRA keeps `name` quantized ([`is_quantizable`]);
/// a row width that is not a whole number of blocks falls back as llama.cpp does (q4_k to
/// q5_0, q5_k to q5_1, q6_k to q8_0, else q8_0), and a width that fits none is left alone
/// (`None`), as is any other tensor.
pub fn quantize_base_weight(name: &str, w: &Tensor, format: GgmlDType) -> Result<Option<QTensor>> {
    if !is_quantizable(name) || w.rank() != 2 {
        return Ok(None);
    }
    let cols = w.dims()[1];
    let Some(fmt) = [format, fallback(format)].into_iter().find(|f| cols.is_multiple_of(f.block_size())) else {
        return Ok(None);
    };
    Ok(Some(QTensor::quantize(&w.to_dtype(candle_core::DType::F32)?, fmt)?))
}
