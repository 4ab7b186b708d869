//! Loading a GGUF file (llama.cpp's format) of a Llama, Gemma 2 / 3, GPT-2 or Phi-3 model as a
//! trainable Hugging Face model: weights dequantized to f32 with Candle's GGUF reader (or, for
//! QLoRA, the projections kept in their block format), llama.cpp's changes undone (Llama's Q/K
//! row permutation, Gemma's `1 + w` norms), the configuration rebuilt from the metadata (Phi-3's
//! LongRoPE factors from its `rope_factors_*` tensors), the byte-level BPE or SentencePiece
//! tokenizer rebuilt from the metadata, the chat template kept.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{Result, TrainError};
use crate::loaded::LoadedModel;
use crate::model::llama_names::{
    self as names, Names, DOWN, FUSED_DOWN, FUSED_GATE_UP, FUSED_O, FUSED_PROJECTIONS, FUSED_QKV, GATE,
    GPT2_PROJECTIONS, K, O, PROJECTIONS, Q, UP, V,
};
use crate::model::LlamaConfig;
use crate::tokenizer::TextTokenizer;

/// The metadata value `key` of a GGUF header; missing, an error naming the file.
pub(crate) fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a GValue> {
    c.metadata.get(key).ok_or_else(|| TrainError::Config {
        origin: path.display().to_string(),
        message: format!("GGUF metadata `{key}` missing"),
    })
}

/// A numeric metadata value as f64.
pub(crate) fn as_f64(v: &GValue) -> Option<f64> {
    Some(match v {
        GValue::U8(x) => *x as f64,
        GValue::I8(x) => *x as f64,
        GValue::U16(x) => *x as f64,
        GValue::I16(x) => *x as f64,
        GValue::U32(x) => *x as f64,
        GValue::I32(x) => *x as f64,
        GValue::U64(x) => *x as f64,
        GValue::I64(x) => *x as f64,
        GValue::F32(x) => *x as f64,
        GValue::F64(x) => *x,
        _ => return None,
    })
}

/// Undoes llama.cpp's rotary permutation of a Q or K projection (`[heads * d, cols]`):
/// llama.cpp interleaves the two rotary halves of each head; Hugging Face keeps them apart.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, rows / heads / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// The inverse of [`unpermute_qk`] (what llama.cpp's converter does), for tests.
pub fn permute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// [`unpermute_qk`] on a quantized `[heads * d, cols]` weight: its rows (whole blocks each)
/// moved as they are, so the values stay exactly the file's.
pub fn unpermute_qk_quantized(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let format = q.dtype();
    let row_bytes = cols / format.block_size() * format.type_size();
    let half = rows / heads / 2;
    let data = q.data()?;
    // Backed by u32s: every block type's alignment (at most 4) holds for the bytes.
    let mut buf = vec![0u32; (rows * row_bytes).div_ceil(4)];
    // SAFETY: the u32 buffer holds at least rows * row_bytes bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), rows * row_bytes) };
    for (new, dst) in bytes.chunks_mut(row_bytes.max(1)).enumerate() {
        // New row (head h, rotary half j, i) is the file's row (h, i, j).
        let (h, rest) = (new / (2 * half), new % (2 * half));
        let (j, i) = (rest / half, rest % half);
        let old = h * 2 * half + i * 2 + j;
        dst.copy_from_slice(&data[old * row_bytes..(old + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&*bytes), &Device::Cpu, format)?;
    QTensor::new(storage, (rows, cols))
}

/// The GGUF architectures read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum GgufArch {
    Llama,
    Gpt2,
    Phi3,
    Gemma2,
    Gemma3,
}

impl GgufArch {
    /// The architecture of a `general.architecture` value, if it is one read here.
    pub(crate) fn from_name(arch: &str) -> Option<GgufArch> {
        Some(match arch {
            "llama" => GgufArch::Llama,
            "gpt2" => GgufArch::Gpt2,
            "phi3" => GgufArch::Phi3,
            "gemma2" => GgufArch::Gemma2,
            "gemma3" => GgufArch::Gemma3,
            _ => return None,
        })
    }
}

/// The Hugging Face name of a llama.cpp tensor name of `arch`.
pub(crate) fn hf_name(arch: GgufArch, gguf: &str) -> Option<String> {
    match arch {
        GgufArch::Llama => llama_hf_name(gguf),
        GgufArch::Gpt2 | GgufArch::Phi3 => fused_hf_name(arch, gguf),
        GgufArch::Gemma2 | GgufArch::Gemma3 => gemma_hf_name(gguf),
    }
}

/// Gemma's tensor names: Llama's, plus the norms around attention and the MLP and Gemma 3's
/// q/k norms (llama.cpp's `ffn_norm` is Gemma's norm before the MLP).
fn gemma_hf_name(gguf: &str) -> Option<String> {
    let rest = gguf.strip_prefix("blk.");
    let Some((layer, name)) = rest.and_then(|r| r.split_once('.')) else {
        return llama_hf_name(gguf);
    };
    let hf = match name {
        "attn_q_norm.weight" => names::Q_NORM,
        "attn_k_norm.weight" => names::K_NORM,
        "post_attention_norm.weight" => names::POST_NORM,
        "ffn_norm.weight" => names::PRE_FF_NORM,
        "post_ffw_norm.weight" => names::POST_FF_NORM,
        _ => return llama_hf_name(gguf),
    };
    Some(format!("{}.{hf}", names::layer_prefix(layer.parse().ok()?)))
}

/// GPT-2's and Phi-3's tensor names: one fused QKV (`attn_qkv`) and one up (`ffn_up`: GPT-2's
/// `c_fc`, Phi-3's fused gate and up) projection per layer; GPT-2's norms and projections have
/// biases, its positions a table.
fn fused_hf_name(arch: GgufArch, gguf: &str) -> Option<String> {
    let n = if arch == GgufArch::Gpt2 { Names::GPT2 } else { Names::LLAMA };
    let projs: &[&str] = if arch == GgufArch::Gpt2 { &GPT2_PROJECTIONS } else { &FUSED_PROJECTIONS };
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let with = |weight_name: &str| -> String {
        if suffix == "weight" {
            weight_name.to_string()
        } else {
            names::bias_of(weight_name)
        }
    };
    let fixed = match stem {
        "token_embd" => Some(with(n.embed)),
        "position_embd" => n.positions.map(with),
        "output_norm" => Some(with(n.final_norm)),
        "output" => Some(with(names::LM_HEAD)),
        _ => None,
    };
    if fixed.is_some() {
        return fixed;
    }
    let (layer, name) = stem.strip_prefix("blk.")?.split_once('.')?;
    let proj = |j: usize| with(&format!("{}.weight", projs[j]));
    let hf = match name {
        "attn_norm" => with(n.input_norm),
        "attn_qkv" => proj(FUSED_QKV),
        "attn_output" => proj(FUSED_O),
        "ffn_norm" => with(n.post_norm),
        "ffn_up" => proj(FUSED_GATE_UP),
        "ffn_down" => proj(FUSED_DOWN),
        _ => return None,
    };
    Some(format!("{}.{hf}", n.layer(layer.parse().ok()?)))
}

/// The Hugging Face name of a llama.cpp Llama tensor name (`blk.{i}.attn_q.weight`, …).
fn llama_hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some(names::EMBED),
        "output_norm.weight" => Some(names::FINAL_NORM),
        "output.weight" => Some(names::LM_HEAD),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let proj = |j: usize| format!("{}.weight", PROJECTIONS[j]);
    let hf = match name {
        "attn_norm.weight" => names::INPUT_NORM.to_string(),
        "attn_q.weight" => proj(Q),
        "attn_k.weight" => proj(K),
        "attn_v.weight" => proj(V),
        "attn_output.weight" => proj(O),
        "ffn_norm.weight" => names::POST_NORM.to_string(),
        "ffn_gate.weight" => proj(GATE),
        "ffn_up.weight" => proj(UP),
        "ffn_down.weight" => proj(DOWN),
        _ => return None,
    };
    Some(format!("{}.{hf}", names::layer_prefix(layer.parse().ok()?)))
}

/// A GGUF file opened and its header read: the file (for the tensors), the header and its
/// `general.architecture`.
pub(crate) fn read_header(path: &Path) -> Result<(std::fs::File, Content, String)> {
    let mut file = std::fs::File::open(path).map_err(TrainError::io(path))?;
    let content = Content::read(&mut file).map_err(|e| TrainError::Format {
        path: path.to_path_buf(),
        message: format!("not a readable GGUF file: {e}"),
    })?;
    let arch = meta(&content, "general.architecture", path)?.to_string()?.clone();
    Ok((file, content, arch))
}

/// The vocabulary of a GGUF header (`tokenizer.ggml.tokens`), in id order.
fn token_list(content: &Content, path: &Path) -> Result<Vec<String>> {
    Ok(meta(content, "tokenizer.ggml.tokens", path)?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?)
}

/// The tokenizer of a GGUF file alone, rebuilt from its metadata (a file with weights, or one
/// of llama.cpp's vocabulary-only `ggml-vocab-*.gguf` files).
pub fn load_gguf_tokenizer(path: &Path) -> Result<TextTokenizer> {
    let (_, content, arch) = read_header(path)?;
    build_tokenizer(&content, &token_list(&content, path)?, path, &arch)
}

/// Reads a GGUF file of a Llama, Gemma 2 / 3, GPT-2 or Phi-3 model, every weight dequantized to
/// f32.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    load_gguf_with(path, false)
}

/// Reads a GGUF file of a Llama, Gemma 2 / 3, GPT-2 or Phi-3 model; with `keep_quantized` the
/// projections, the embedding and the LM head stored in a block format stay in it
/// ([`LoadedModel::quantized`]), the rest is dequantized to f32.
pub fn load_gguf_with(path: &Path, keep_quantized: bool) -> Result<LoadedModel> {
    let (mut file, content, arch) = read_header(path)?;
    let kind = GgufArch::from_name(&arch).ok_or_else(|| TrainError::UnsupportedArchitecture {
        origin: path.display().to_string(),
        model_type: format!("gguf:{arch}"),
    })?;
    let num = |k: &str| -> Result<f64> {
        as_f64(meta(&content, &format!("{arch}.{k}"), path)?).ok_or_else(|| TrainError::Config {
            origin: path.display().to_string(),
            message: format!("{arch}.{k} is not a number"),
        })
    };
    let tokens = token_list(&content, path)?;
    let heads = num("attention.head_count")? as usize;
    if heads == 0 {
        return Err(TrainError::Config {
            origin: path.display().to_string(),
            message: "llama.attention.head_count is 0".into(),
        });
    }
    // Llama 3.1-style rope scaling is stored as metadata and a `rope_freqs` tensor in GGUF;
    // refuse rather than train with the wrong rotary frequencies.
    if kind == GgufArch::Llama && content.metadata.keys().any(|k| k.starts_with("llama.rope.scaling"))
        || content.tensor_infos.contains_key("rope_freqs.weight")
    {
        return Err(TrainError::Config {
            origin: path.display().to_string(),
            message: "GGUF rope scaling (llama.rope.scaling.*, rope_freqs.weight) is not supported; use the Hugging Face checkpoint".into(),
        });
    }
    let kv_heads = num("attention.head_count_kv").unwrap_or(heads as f64) as usize;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(TrainError::Config {
            origin: path.display().to_string(),
            message: format!("llama.attention.head_count_kv {kv_heads} does not divide head_count {heads}"),
        });
    }
    let hidden = num("embedding_length")? as usize;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let token_id = |k: &str| content.metadata.get(k).and_then(as_f64).map(|v| v as u32);
    let (bos, eos, pad) = (
        token_id("tokenizer.ggml.bos_token_id"),
        token_id("tokenizer.ggml.eos_token_id"),
        token_id("tokenizer.ggml.padding_token_id"),
    );
    let source = path.display().to_string();
    let ids = (bos, eos, pad);
    let raw = match kind {
        GgufArch::Gpt2 => gpt2_config(&num, tokens.len(), tied, ids)?,
        GgufArch::Phi3 => phi3_config(&content, &mut file, &num, tokens.len(), tied, ids, &source)?,
        GgufArch::Gemma2 | GgufArch::Gemma3 => gemma_config(kind, &content, &num, tokens.len(), tied, ids, &source)?,
        GgufArch::Llama => json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length")? as usize,
        "num_hidden_layers": num("block_count")? as usize,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden / heads,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
        "rope_theta": num("rope.freq_base").unwrap_or(10_000.0),
        "vocab_size": tokens.len(),
        "max_position_embeddings": num("context_length").unwrap_or(2048.0) as usize,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": null,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        }),
    };
    let config = LlamaConfig::from_json(raw, &source)?;
    let mut weights = HashMap::new();
    let mut quantized = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(kind, name) else { continue };
        let q = content.tensor(&mut file, name, &Device::Cpu).map_err(|e| TrainError::Weights {
            origin: source.clone(),
            tensor: name.clone(),
            problem: e.to_string(),
        })?;
        let llama = kind == GgufArch::Llama;
        if keep_quantized && crate::loaded::is_quantizable(&hf) && q.dtype() != GgmlDType::F32 {
            let q = if llama && name.ends_with("attn_q.weight") {
                unpermute_qk_quantized(&q, heads)?
            } else if llama && name.ends_with("attn_k.weight") {
                unpermute_qk_quantized(&q, kv_heads)?
            } else {
                q
            };
            quantized.insert(hf, q);
            continue;
        }
        let mut t = q.dequantize(&Device::Cpu)?;
        if matches!(kind, GgufArch::Gemma2 | GgufArch::Gemma3) && name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's norms as the scale `1 + w`; transformers keeps `w`.
            t = (t - 1.0)?;
        }
        if llama && name.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, heads)?;
        } else if llama && name.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, kv_heads)?;
        }
        weights.insert(hf, t);
    }
    let tokenizer = build_tokenizer(&content, &tokens, path, &arch)?;
    let generation_config = Some(json!({ "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad }));
    Ok(LoadedModel {
        config: crate::model::ModelConfig::Decoder(config),
        weights,
        quantized,
        tokenizer,
        generation_config,
        origin: source,
    })
}

/// The special-token ids of a GGUF file: BOS, EOS, padding.
type SpecialIds = (Option<u32>, Option<u32>, Option<u32>);

/// GPT-2's `config.json` from the `gpt2.*` metadata (`num` reads one).
fn gpt2_config(
    num: &dyn Fn(&str) -> Result<f64>,
    vocab: usize,
    tied: bool,
    (bos, eos, pad): SpecialIds,
) -> Result<Value> {
    Ok(json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": num("embedding_length")? as usize,
        "n_layer": num("block_count")? as usize,
        "n_head": num("attention.head_count")? as usize,
        "n_inner": num("feed_forward_length")? as usize,
        "n_positions": num("context_length").unwrap_or(1024.0) as usize,
        "n_ctx": num("context_length").unwrap_or(1024.0) as usize,
        "vocab_size": vocab,
        "layer_norm_epsilon": num("attention.layer_norm_epsilon")?,
        "activation_function": "gelu_new",
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }))
}

/// Gemma 2's or 3's `config.json` from the `gemma2.*` / `gemma3.*` metadata, with what llama.cpp
/// assumes rather than stores: the layer pattern (Gemma 3: five sliding layers then a global
/// one; Gemma 2: alternating, sliding first), the local rotary base (Gemma 3's
/// `rope.freq_base_swa`, else 10,000), and `query_pre_attn_scalar` (the head width, except for
/// the 27B models: hidden / heads, told apart by their layer count as llama.cpp does).
fn gemma_config(
    kind: GgufArch,
    content: &Content,
    num: &dyn Fn(&str) -> Result<f64>,
    vocab: usize,
    tied: bool,
    (bos, eos, pad): SpecialIds,
    source: &str,
) -> Result<Value> {
    let bad = |m: String| TrainError::Config { origin: source.to_string(), message: m };
    let hidden = num("embedding_length")? as usize;
    let heads = num("attention.head_count")? as usize;
    let layers = num("block_count")? as usize;
    let head_dim = num("attention.key_length").map(|d| d as usize).unwrap_or(hidden / heads);
    let gemma3 = kind == GgufArch::Gemma3;
    let big = layers == if gemma3 { 62 } else { 46 };
    let scalar = if big { hidden / heads } else { head_dim };
    let theta = num("rope.freq_base").unwrap_or(if gemma3 { 1_000_000.0 } else { 10_000.0 });
    let arch = if gemma3 { "gemma3" } else { "gemma2" };
    let scaling = content.metadata.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
    let global = match scaling.as_deref() {
        None | Some("none") => json!({"rope_type": "default", "rope_theta": theta}),
        Some("linear") if gemma3 => {
            json!({"rope_type": "linear", "rope_theta": theta, "factor": num("rope.scaling.factor")?})
        }
        Some(other) => return Err(bad(format!("GGUF rope scaling {other:?} is not supported for {arch}"))),
    };
    let mut c = json!({
        "architectures": [if gemma3 { "Gemma3ForCausalLM" } else { "Gemma2ForCausalLM" }],
        "model_type": if gemma3 { "gemma3_text" } else { "gemma2" },
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length")? as usize,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": num("attention.head_count_kv").unwrap_or(heads as f64) as usize,
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
        "max_position_embeddings": num("context_length")? as usize,
        "sliding_window": num("attention.sliding_window")? as usize,
        "hidden_activation": "gelu_pytorch_tanh",
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    });
    if gemma3 {
        let local = num("rope.freq_base_swa").unwrap_or(10_000.0);
        c["layer_types"] = json!((0..layers)
            .map(|l| if (l + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" })
            .collect::<Vec<_>>());
        c["rope_parameters"] =
            json!({"full_attention": global, "sliding_attention": {"rope_type": "default", "rope_theta": local}});
    } else {
        c["rope_theta"] = json!(theta);
        c["attn_logit_softcapping"] = json!(num("attn_logit_softcapping").ok());
        c["final_logit_softcapping"] = json!(num("final_logit_softcapping").ok());
    }
    Ok(c)
}

/// Phi-3's `config.json` from the `phi3.*` metadata and, for LongRoPE, the
/// `rope_factors_long/short` tensors; `rope.dimension_count` gives the rotated share of a head
/// and a `sliding_window` of 0 (Phi-4) none.
fn phi3_config(
    content: &Content,
    file: &mut std::fs::File,
    num: &dyn Fn(&str) -> Result<f64>,
    vocab: usize,
    tied: bool,
    (bos, eos, pad): SpecialIds,
    source: &str,
) -> Result<Value> {
    let hidden = num("embedding_length")? as usize;
    let heads = num("attention.head_count")? as usize;
    let head_dim = hidden / heads;
    let rope_dims = num("rope.dimension_count").map(|d| d as usize).unwrap_or(head_dim);
    let context = num("context_length")? as usize;
    let original = num("rope.scaling.original_context_length").map(|n| n as usize).unwrap_or(context);
    let mut factors = |name: &str| -> Result<Option<Vec<f32>>> {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = content.tensor(file, name, &Device::Cpu).map_err(|e| TrainError::Weights {
            origin: source.to_string(),
            tensor: name.to_string(),
            problem: e.to_string(),
        })?;
        Ok(Some(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?))
    };
    let rope_scaling = match (factors("rope_factors_short.weight")?, factors("rope_factors_long.weight")?) {
        (Some(short), Some(long)) => {
            let mut s = json!({"type": "longrope", "short_factor": short, "long_factor": long});
            if let Ok(a) = num("rope.scaling.attn_factor") {
                s["attention_factor"] = json!(a);
            }
            s
        }
        _ => Value::Null,
    };
    let window = num("attention.sliding_window").map(|w| w as usize).ok().filter(|&w| w > 0);
    Ok(json!({
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length")? as usize,
        "num_hidden_layers": num("block_count")? as usize,
        "num_attention_heads": heads,
        "num_key_value_heads": num("attention.head_count_kv").unwrap_or(heads as f64) as usize,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
        "rope_theta": num("rope.freq_base").unwrap_or(10_000.0),
        "partial_rotary_factor": rope_dims as f64 / head_dim as f64,
        "max_position_embeddings": context,
        "original_max_position_embeddings": original,
        "rope_scaling": rope_scaling,
        "sliding_window": window,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer split of a `tokenizer.ggml.pre` value, as transformers' GGUF tokenizer
/// conversion has them (transformers 5.25, `gguf_tokenizer_mapping.py`): a vocabulary whose
/// merges were learned on these pieces (Llama 3's digits in groups of up to three, Qwen's one
/// by one) must be split the same way; any other value keeps the plain byte-level split.
fn pre_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The normalizer, pre-tokenizer, decoder and BPE model of a SentencePiece (`llama`) GGUF
/// tokenizer: Gemma's as transformers 5.25 rebuilds it (`GemmaTokenizer`: spaces replaced by
/// "▁", nothing added; merges ordered by the tokens' places in the file, as Gemma's scores do
/// not follow its merges), and every other one as the original Llama 2 and Phi-3 tokenizers
/// work ("▁" prepended and spaces replaced by a normalizer, no pre-tokenizer: their `legacy`
/// form). transformers rebuilds Llama's with a `Metaspace` pre-tokenizer instead, which gives
/// other ids than the original Llama 2 tokenizer for 15 of llama.cpp's 46 test texts (ours: none,
/// `tests/gguf_vocab.rs`). Byte fallback; merges recovered from the vocabulary
/// ([`sentencepiece_merges`]), since the files list none.
fn sentencepiece_parts(
    arch: &str,
    tokens: &[String],
    scores: &[f64],
    vocab: serde_json::Map<String, Value>,
) -> (Value, Value, Value, Value) {
    let gemma = arch.starts_with("gemma");
    // Priority of each token as a merge result: its score, or for Gemma its place (earlier first).
    let priority: Vec<f64> = if gemma { (0..tokens.len()).map(|i| -(i as f64)).collect() } else { scores.to_vec() };
    let merges = sentencepiece_merges(tokens, &priority);
    let space = "\u{2581}";
    let replace = json!({"type": "Replace", "pattern": {"String": space}, "content": " "});
    let mut decoder = vec![replace, json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    let (normalizer, pre_tokenizer) = if gemma {
        (
            json!({"type": "Replace", "pattern": {"String": " "}, "content": space}),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
        )
    } else {
        let prepend_and_replace = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": space},
            {"type": "Replace", "pattern": {"String": " "}, "content": space},
        ]});
        (prepend_and_replace, Value::Null)
    };
    if !gemma {
        decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": if gemma { json!("<unk>") } else { Value::Null },
        "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
        "ignore_merges": false, "vocab": vocab, "merges": merges,
    });
    (normalizer, pre_tokenizer, json!({"type": "Sequence", "decoders": decoder}), model)
}

/// The BPE merges a SentencePiece vocabulary implies, as transformers' `generate_merges` makes
/// them: every split of every token into two tokens of the vocabulary, ordered by the merged
/// token's `priority` (highest first), then the longer left and right pieces first, ties in
/// vocabulary order.
fn sentencepiece_merges(tokens: &[String], priority: &[f64]) -> Vec<[String; 2]> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // Python dict order: a repeated token keeps its first place and its last value.
    let mut first: Vec<usize> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        match seen.get(t.as_str()) {
            Some(&slot) => first[slot] = i,
            None => {
                seen.insert(t, first.len());
                first.push(i);
            }
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &i in &first {
        let merged = tokens[i].as_str();
        let mut local: Vec<(&str, &str, f64)> = merged
            .char_indices()
            .skip(1)
            .map(|(at, _)| merged.split_at(at))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, priority[i]))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    // A stable sort, highest key first, as Python's `sorted(..., reverse=True)`.
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.partial_cmp(&ka.0).unwrap_or(std::cmp::Ordering::Equal).then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| [l.to_string(), r.to_string()]).collect()
}

/// Rebuilds a Hugging Face `tokenizer.json` (byte-level BPE, the `gpt2` GGUF tokenizer model)
/// and a `tokenizer_config.json` from the GGUF metadata.
fn build_tokenizer(c: &Content, tokens: &[String], path: &Path, arch: &str) -> Result<TextTokenizer> {
    let model = meta(c, "tokenizer.ggml.model", path)?.to_string()?.clone();
    if model != "gpt2" && model != "llama" {
        return Err(TrainError::Tokenizer(format!(
            "{}: GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\", SentencePiece \"llama\")",
            path.display()
        )));
    }
    let types: Vec<i64> = c
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| as_f64(x).unwrap_or(1.0) as i64).collect())
        .unwrap_or_default();
    let sentencepiece = model == "llama";
    // Gemma's files spell tokens of several spaces with real spaces; its vocabulary has "▁▁".
    let respelled: Vec<String>;
    let tokens = if sentencepiece && arch.starts_with("gemma") {
        respelled =
            tokens
                .iter()
                .map(|t| {
                    if t.contains(' ') && t.trim().is_empty() {
                        "\u{2581}".repeat(t.chars().count())
                    } else {
                        t.clone()
                    }
                })
                .collect();
        &respelled[..]
    } else {
        tokens
    };
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are added tokens, matched before BPE.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .take(tokens.len())
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": t == 4 && !sentencepiece, "special": t == 3}))
        .collect();
    // As transformers' own GGUF conversion does: the byte-level split, or the one
    // `tokenizer.ggml.pre` names ([`pre_split`]), and a BOS token added by the post-processor
    // only when `tokenizer.ggml.add_bos_token` says so.
    let add_bos = matches!(c.metadata.get("tokenizer.ggml.add_bos_token"), Some(GValue::Bool(true)));
    let bos = c
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(as_f64)
        .map(|i| i as usize)
        .filter(|&i| i < tokens.len());
    let a = json!({"Sequence": {"id": "A", "type_id": 0}});
    let b = json!({"Sequence": {"id": "B", "type_id": 1}});
    let post_processor = match (add_bos, bos) {
        (true, Some(id)) => {
            let t = &tokens[id];
            let bos_piece = json!({"SpecialToken": {"id": t, "type_id": 0}});
            json!({"type": "TemplateProcessing", "single": [bos_piece, a], "pair": [bos_piece, a, bos_piece, b],
                   "special_tokens": {t: {"id": t, "ids": [id], "tokens": [t]}}})
        }
        _ => json!({"type": "TemplateProcessing", "single": [a], "pair": [a, b], "special_tokens": {}}),
    };
    let pre = c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    // Llama 3's tokenizer takes a piece that is itself in the vocabulary whole, before any merge.
    let ignore_merges = matches!(pre.as_str(), "llama3" | "llama-v3" | "llama-bpe");
    let byte_level = match pre_split(&pre) {
        Some(split) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let tj = if sentencepiece {
        let scores: Vec<f64> = match c.metadata.get("tokenizer.ggml.scores") {
            Some(v) => v.to_vec()?.iter().map(|x| as_f64(x).unwrap_or(0.0)).collect(),
            None => vec![0.0; tokens.len()],
        };
        let (normalizer, pre_tokenizer, decoder, model) = sentencepiece_parts(arch, tokens, &scores, vocab);
        json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": decoder, "model": model,
        })
    } else {
        let merges: Vec<String> = meta(c, "tokenizer.ggml.merges", path)?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
        })
    };
    let inner = Tokenizer::from_bytes(serde_json::to_vec(&tj).expect("json")).map_err(|e| {
        TrainError::Tokenizer(format!("{}: cannot build the tokenizer from GGUF metadata: {e}", path.display()))
    })?;
    let tok_text = |k: &str| c.metadata.get(k).and_then(as_f64).and_then(|i| tokens.get(i as usize)).cloned();
    let chat_template = c.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let mut cfg = serde_json::Map::new();
    // SentencePiece: the tokenizer.json as built, which a named class might rebuild its own way.
    let class = if sentencepiece { "PreTrainedTokenizerFast" } else { "GPT2Tokenizer" };
    cfg.insert("tokenizer_class".into(), json!(class));
    cfg.insert(
        "model_max_length".into(),
        json!(c.metadata.get(&format!("{arch}.context_length")).and_then(as_f64).unwrap_or(2048.0) as usize),
    );
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    cfg.insert("add_prefix_space".into(), json!(false));
    for (key, meta_key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(t) = tok_text(meta_key) {
            cfg.insert(key.into(), json!(t));
        }
    }
    if let Some(t) = &chat_template {
        cfg.insert("chat_template".into(), json!(t));
    }
    Ok(TextTokenizer::new(inner, Value::Object(cfg), chat_template))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    /// A byte-level vocabulary whose merges join "12345" whole, under `tokenizer.ggml.pre`.
    fn digits(pre: &str) -> TextTokenizer {
        let tokens: Vec<String> = ["1", "2", "3", "4", "5", "12", "123", "45", "12345"].map(String::from).to_vec();
        let strings = |v: &[&str]| GValue::Array(v.iter().map(|s| GValue::String(s.to_string())).collect());
        let metadata = HashMap::from([
            ("tokenizer.ggml.model".to_string(), GValue::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), GValue::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), GValue::Array(tokens.iter().cloned().map(GValue::String).collect())),
            ("tokenizer.ggml.merges".to_string(), strings(&["1 2", "12 3", "4 5", "123 45"])),
        ]);
        let c =
            Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 };
        build_tokenizer(&c, &tokens, Path::new("test.gguf"), "llama").unwrap()
    }

    /// Llama 3's pre-tokenizer splits digits in groups of up to three before the merges apply,
    /// GPT-2's keeps the run whole: "12345" is "123" + "45" under `llama-bpe`, one token under
    /// `gpt-2`, as transformers' GGUF tokenizers give.
    #[test]
    fn the_pre_tokenizer_follows_tokenizer_ggml_pre() {
        assert_eq!(digits("llama-bpe").encode("12345", false).unwrap().0, vec![6, 7]);
        assert_eq!(digits("gpt-2").encode("12345", false).unwrap().0, vec![8]);
        // Qwen: one digit at a time.
        assert_eq!(digits("qwen2").encode("12345", false).unwrap().0, vec![0, 1, 2, 3, 4]);
    }
}
