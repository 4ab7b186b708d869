//! Writing a merged model back to a GGUF file that llama.cpp reads (`ranger-tune merge --gguf`):
//! the base GGUF's metadata (tokenizer and chat template included) and tensor names are kept,
//! each weight is the merged one with llama.cpp's changes redone (Llama's Q/K row permutation,
//! Gemma's `1 + w` norms; the inverses of what [`crate::gguf`] undoes on reading), and the
//! matrices are quantized as llama.cpp's `llama-quantize` chooses: every 2-D weight in the
//! requested block format (a row width that is not a whole number of blocks falls back as it
//! does: k-quants to the 32-value formats, then f16), norms, biases and position tables in f32.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Result, TrainError};
use crate::gguf::{as_f64, hf_name, meta, permute_qk, read_header, GgufArch};
use crate::loaded::fallback;
use crate::weights::write_atomic_with;

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufExported {
    /// Tensors written, by block format (`"Q4K"`, `"F32"`, …), in the file's order of first use.
    pub formats: Vec<(String, usize)>,
    /// Tensors copied unchanged from the base file (no merged weight of theirs: Phi-3's rotary
    /// factors, say).
    pub copied: usize,
    /// The file's size in bytes.
    pub bytes: u64,
}

/// llama.cpp's `general.file_type` of a file whose matrices are `format` (`llama_ftype`).
fn llama_file_type(format: GgmlDType) -> Option<u32> {
    Some(match format {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        _ => return None,
    })
}

/// Checks that `source` is a GGUF file of an architecture [`export_gguf`] writes, before the
/// (slow) merge: the error names the file.
pub fn check_gguf_source(source: &Path) -> Result<()> {
    let (_, _, arch) = read_header(source)?;
    GgufArch::from_name(&arch).map(|_| ()).ok_or_else(|| TrainError::UnsupportedArchitecture {
        origin: source.display().to_string(),
        model_type: format!("gguf:{arch}"),
    })
}

/// Whether llama.cpp's `llama-quantize` quantizes the tensor `name` of `rank` dimensions: 2-D
/// weights but the norms and the position table.
fn quantized_by_llama_cpp(name: &str, rank: usize) -> bool {
    rank >= 2 && name.ends_with(".weight") && !name.contains("_norm") && name != "position_embd.weight"
}

/// Writes `out`, a GGUF file of the model in the GGUF file `source` with the weights `merged`
/// (by the names [`crate::gguf::load_gguf`] gives them, f32) and its matrices in `format`
/// (`chat_template`, when given, replaces the file's). Tensors of `source` without a merged
/// weight are copied unchanged. The file is written under a temporary name and renamed into
/// place, so an older `out` survives a failed write.
pub fn export_gguf(
    source: &Path,
    merged: &HashMap<String, Tensor>,
    format: GgmlDType,
    chat_template: Option<&str>,
    out: &Path,
) -> Result<GgufExported> {
    let (mut file, content, arch) = read_header(source)?;
    let origin = source.display().to_string();
    let kind = GgufArch::from_name(&arch).ok_or_else(|| TrainError::UnsupportedArchitecture {
        origin: origin.clone(),
        model_type: format!("gguf:{arch}"),
    })?;
    let count = |key: &str| meta(&content, &format!("{arch}.{key}"), source).ok().and_then(as_f64);
    let heads = count("attention.head_count").unwrap_or(0.0) as usize;
    let kv_heads = count("attention.head_count_kv").map_or(heads, |k| k as usize);
    // The file's tensor order (by offset), which llama.cpp's tools keep too.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut copied = 0;
    for name in names {
        let weight = hf_name(kind, name).and_then(|hf| merged.get(&hf));
        let Some(w) = weight else {
            tensors.push((name.clone(), content.tensor(&mut file, name, &Device::Cpu)?));
            copied += 1;
            continue;
        };
        let stored = content.tensor_infos[name].shape.dims().to_vec();
        let problem = |p: String| TrainError::Weights { origin: origin.clone(), tensor: name.clone(), problem: p };
        if w.dims() != stored.as_slice() {
            return Err(problem(format!("merged weight is {:?}, the base file's {:?}", w.dims(), stored)));
        }
        let mut w = w.to_dtype(candle_core::DType::F32)?.to_device(&Device::Cpu)?;
        if matches!(kind, GgufArch::Gemma2 | GgufArch::Gemma3) && name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's norms as the scale `1 + w`.
            w = (w + 1.0)?;
        }
        if kind == GgufArch::Llama && name.ends_with("attn_q.weight") {
            w = permute_qk(&w, heads)?;
        } else if kind == GgufArch::Llama && name.ends_with("attn_k.weight") {
            w = permute_qk(&w, kv_heads)?;
        }
        let cols = *stored.last().unwrap_or(&1);
        let target = if quantized_by_llama_cpp(name, stored.len()) {
            // llama.cpp's fallbacks, then f16 for a width no block fits.
            [format, fallback(format)]
                .into_iter()
                .find(|f| cols.is_multiple_of(f.block_size()))
                .unwrap_or(GgmlDType::F16)
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&w.contiguous()?, target).map_err(|e| problem(e.to_string()))?;
        tensors.push((name.clone(), q));
    }
    // The metadata as it was, but for what this file changes. The writer aligns tensors to 32
    // bytes and says nothing about it, so the base's alignment (if it set one) is dropped.
    let mut metadata: Vec<(String, GValue)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "general.alignment" | "general.file_type" | "tokenizer.chat_template"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(ft) = llama_file_type(format) {
        metadata.push(("general.file_type".into(), GValue::U32(ft)));
    }
    if !matches!(format, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        metadata.retain(|(k, _)| k != "general.quantization_version");
        metadata.push(("general.quantization_version".into(), GValue::U32(2)));
    }
    let template = chat_template
        .map(str::to_string)
        .or_else(|| content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned()));
    if let Some(t) = template {
        metadata.push(("tokenizer.chat_template".into(), GValue::String(t)));
    }
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    write_gguf(out, &metadata, &tensors)?;
    let mut formats: Vec<(String, usize)> = Vec::new();
    for (_, t) in &tensors {
        let f = format!("{:?}", t.dtype());
        match formats.iter_mut().find(|(g, _)| *g == f) {
            Some((_, n)) => *n += 1,
            None => formats.push((f, 1)),
        }
    }
    let bytes = std::fs::metadata(out).map_err(TrainError::io(out))?.len();
    Ok(GgufExported { formats, copied, bytes })
}

/// Candle's GGUF writer into a temporary file next to `out`, then renamed into place.
fn write_gguf(out: &Path, metadata: &[(String, GValue)], tensors: &[(String, QTensor)]) -> Result<()> {
    let meta: Vec<(&str, &GValue)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let needed: u64 = tensors.iter().map(|(_, t)| t.storage_size_in_bytes() as u64).sum();
    write_atomic_with(out, needed, |w| gguf_file::write(w, &meta, &ts).map_err(std::io::Error::other))
}
