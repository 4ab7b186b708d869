//! Merging a PEFT LoRA adapter into its base model: a full Hugging Face folder out.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::build::{ModelBuilder, Tuning};
use crate::error::Result;
use crate::loaded::LoadedModel;
use crate::output::save_hf_folder;
use crate::predict::{load_classifier, ADAPTER_CLASSIFIER_CONFIG};
use crate::weights::DEFAULT_MAX_SHARD_BYTES;

/// What [`merge_adapter`] merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// A causal-LM adapter.
    CausalLm,
    /// A classifier's adapter (its head and labels came with it).
    Classifier,
}

/// Merges the PEFT LoRA adapter in `adapter` (causal LM, or a classifier's, told apart by the
/// labels file ranger-tune writes next to it) into `base` and writes the merged model to
/// `output` as a Hugging Face folder with `dtype` weights. The merge is computed in f32.
pub fn merge_adapter(base: LoadedModel, adapter: &Path, output: &Path, dtype: DType) -> Result<Merged> {
    let cpu = Device::Cpu;
    let cast = |w: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        w.into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect()
    };
    if adapter.join(ADAPTER_CLASSIFIER_CONFIG).exists() {
        let clf = load_classifier(base, Some(adapter), DType::F32, &cpu)?;
        let weights = cast(clf.model.merged_weights()?)?;
        let json = clf.model.config.classifier_json(&clf.labels, clf.tokenizer.pad_id, dtype);
        save_hf_folder(output, &json, &weights, &clf.tokenizer, None, DEFAULT_MAX_SHARD_BYTES)?;
        return Ok(Merged::Classifier);
    }
    let config = base.decoder()?.clone();
    let gen = base.generation_config_or_default();
    let builder = ModelBuilder { dtype: DType::F32, device: &cpu, tuning: Tuning::WithAdapter(adapter) };
    let LoadedModel { weights, quantized, tokenizer, origin, .. } = base;
    // A quantized base is dequantized projection by projection as the adapter merges into it.
    let model = builder.causal_lm_quantized(config, weights, quantized, &origin)?.model;
    let weights = cast(model.merged_weights()?)?;
    save_hf_folder(output, &model.config.raw, &weights, &tokenizer, Some(&gen), DEFAULT_MAX_SHARD_BYTES)?;
    Ok(Merged::CausalLm)
}
