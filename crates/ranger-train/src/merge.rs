//! Merging a PEFT LoRA adapter into its base model: a full Hugging Face folder out, and for a
//! GGUF base optionally a GGUF file (re-quantized) that llama.cpp reads.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::build::{ModelBuilder, Tuning};
use crate::error::{Result, TrainError};
use crate::gguf_export::{check_gguf_source, export_gguf, GgufExported};
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

/// A GGUF file [`merge_adapter_with_gguf`] writes beside the merged folder.
#[derive(Debug, Clone, Copy)]
pub struct GgufExport<'a> {
    /// The base model's GGUF file: its metadata (tokenizer included) and tensor names are kept.
    pub source: &'a Path,
    /// The block format of the matrices (norms and biases stay f32).
    pub format: GgmlDType,
    /// The file to write.
    pub path: &'a Path,
}

/// Merges the PEFT LoRA adapter in `adapter` (causal LM, or a classifier's, told apart by the
/// labels file ranger-tune writes next to it) into `base` and writes the merged model to
/// `output` as a Hugging Face folder with `dtype` weights. The merge is computed in f32.
pub fn merge_adapter(base: LoadedModel, adapter: &Path, output: &Path, dtype: DType) -> Result<Merged> {
    merge_adapter_with_gguf(base, adapter, output, dtype, None).map(|(merged, _)| merged)
}

/// [`merge_adapter`], and with `gguf` a GGUF file of the merged causal LM too (its matrices
/// quantized from the f32 merge; [`crate::gguf_export`]). The GGUF source and the adapter's
/// kind are checked before the merge starts.
pub fn merge_adapter_with_gguf(
    base: LoadedModel,
    adapter: &Path,
    output: &Path,
    dtype: DType,
    gguf: Option<GgufExport<'_>>,
) -> Result<(Merged, Option<GgufExported>)> {
    let cpu = Device::Cpu;
    let cast = |w: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        w.into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect()
    };
    let classifier = adapter.join(ADAPTER_CLASSIFIER_CONFIG).exists();
    if let Some(g) = &gguf {
        if classifier {
            return Err(TrainError::Config {
                origin: adapter.display().to_string(),
                message: "a GGUF file can hold a causal LM only (llama.cpp has no sequence classifier): merge a classifier adapter without --gguf".into(),
            });
        }
        check_gguf_source(g.source)?;
    }
    if classifier {
        let clf = load_classifier(base, Some(adapter), DType::F32, &cpu)?;
        let weights = cast(clf.model.merged_weights()?)?;
        let json = clf.model.config.classifier_json(&clf.labels, clf.tokenizer.pad_id, dtype);
        save_hf_folder(output, &json, &weights, &clf.tokenizer, None, DEFAULT_MAX_SHARD_BYTES)?;
        return Ok((Merged::Classifier, None));
    }
    let config = base.decoder()?.clone();
    let gen = base.generation_config_or_default();
    let builder = ModelBuilder { dtype: DType::F32, device: &cpu, tuning: Tuning::WithAdapter(adapter) };
    let LoadedModel { weights, quantized, tokenizer, origin, .. } = base;
    // A quantized base is dequantized projection by projection as the adapter merges into it.
    let model = builder.causal_lm_quantized(config, weights, quantized, &origin)?.model;
    let merged = model.merged_weights()?;
    let exported = match gguf {
        Some(g) => {
            let by_name = merged.iter().cloned().collect();
            Some(export_gguf(g.source, &by_name, g.format, tokenizer.chat_template.as_deref(), g.path)?)
        }
        None => None,
    };
    let weights = cast(merged)?;
    save_hf_folder(output, &model.config.raw, &weights, &tokenizer, Some(&gen), DEFAULT_MAX_SHARD_BYTES)?;
    Ok((Merged::CausalLm, exported))
}
