//! Converting a GGUF model (Llama architecture) to a Hugging Face folder.

use std::path::Path;

use candle_core::{DType, Device};

use crate::build::ModelBuilder;
use crate::error::{Result, TrainError};
use crate::loaded::LoadedModel;
use crate::output::save_hf_folder;
use crate::weights::DEFAULT_MAX_SHARD_BYTES;

/// Reads the GGUF file `gguf` (weights dequantized) and writes it to `output` as a Hugging Face
/// folder with `dtype` weights; returns the number of tensors written.
pub fn gguf_to_hf(gguf: &Path, output: &Path, dtype: DType) -> Result<usize> {
    if gguf.extension().is_none_or(|e| e != "gguf") {
        return Err(TrainError::ModelSpec {
            spec: gguf.display().to_string(),
            problem: "convert expects a .gguf file".into(),
        });
    }
    let loaded = crate::gguf::load_gguf(gguf)?;
    let config = loaded.decoder()?.clone();
    let gen = loaded.generation_config_or_default();
    let LoadedModel { weights, tokenizer, origin, .. } = loaded;
    let model = ModelBuilder::frozen(dtype, &Device::Cpu).causal_lm(config, weights, &origin)?.model;
    let weights = model.merged_weights()?;
    save_hf_folder(output, &model.config.raw, &weights, &tokenizer, Some(&gen), DEFAULT_MAX_SHARD_BYTES)?;
    Ok(weights.len())
}
