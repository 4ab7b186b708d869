//! Sampling text from a model (temperature, top-p), with the chat template when asked.

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde_json::Value;

use crate::error::Result;
use crate::model::{KvCache, LlamaModel};
use crate::tokenizer::{Message, TextTokenizer};

/// Sampling options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Temperature; 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling threshold (1 disables).
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Wrap the prompt as a user turn with the chat template.
    pub chat: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 128, temperature: 0.7, top_p: 0.9, seed: 42, chat: false }
    }
}

/// End-of-sequence ids: the tokenizer's EOS and `generation_config.json`'s `eos_token_id`(s).
pub fn stop_ids(tok: &TextTokenizer, generation_config: Option<&Value>) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eos_id.into_iter().collect();
    match generation_config.and_then(|g| g.get("eos_token_id")) {
        Some(Value::Number(n)) => ids.extend(n.as_u64().map(|v| v as u32)),
        Some(Value::Array(a)) => ids.extend(a.iter().filter_map(|v| v.as_u64().map(|v| v as u32))),
        _ => {}
    }
    ids.sort();
    ids.dedup();
    ids
}

/// The special token that closes an assistant turn in the chat template (Gemma's
/// `<end_of_turn>`, ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`): the first token after the
/// reply when a one-exchange conversation is rendered, if that token is a special one. A chat
/// reply stops there even where the model's EOS is another token (a base model's GGUF file
/// given a template with `--chat-template`).
pub fn turn_end_id(tok: &TextTokenizer) -> Option<u32> {
    const REPLY: &str = "Glimmerholm";
    let messages = [
        Message { role: "user".into(), content: "Where?".into() },
        Message { role: "assistant".into(), content: REPLY.into() },
    ];
    let text = tok.apply_chat_template(&messages, false).ok()?;
    let after = &text[text.rfind(REPLY)? + REPLY.len()..];
    let first = *tok.encode(after, false).ok()?.0.first()?;
    tok.inner.get_added_tokens_decoder().get(&first).filter(|t| t.special).map(|_| first)
}

/// Generates a continuation of `prompt`; returns the new text only. `on_token` sees each piece
/// of text as it is produced. A chat reply (`opts.chat`) also stops at [`turn_end_id`].
pub fn generate(
    model: &LlamaModel,
    tok: &TextTokenizer,
    prompt: &str,
    stop: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&str),
) -> Result<String> {
    let text = if opts.chat {
        tok.apply_chat_template(&[Message { role: "user".into(), content: prompt.into() }], true)?
    } else {
        prompt.to_string()
    };
    let (ids, _) = tok.encode(&text, !opts.chat)?;
    if ids.is_empty() {
        return Err(crate::TrainError::EmptyPrompt);
    }
    let mut stop = stop.to_vec();
    if opts.chat {
        stop.extend(turn_end_id(tok));
    }
    let sampling = if opts.temperature <= 0.0 {
        Sampling::ArgMax
    } else if opts.top_p < 1.0 {
        Sampling::TopP { p: opts.top_p, temperature: opts.temperature }
    } else {
        Sampling::All { temperature: opts.temperature }
    };
    let mut sampler = LogitsProcessor::from_sampling(opts.seed, sampling);
    let mut cache = KvCache::default();
    let mut input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0;
    for _ in 0..opts.max_tokens {
        let logits = model.forward_cached(&input, &mut cache)?;
        let last = logits.squeeze(0)?.get(input.dim(1)? - 1)?.to_dtype(DType::F32)?;
        let next = sampler.sample(&last)?;
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        let decoded = tok.decode(&out, true)?;
        if decoded.len() > printed && decoded.is_char_boundary(printed) {
            on_token(&decoded[printed..]);
            printed = decoded.len();
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    tok.decode(&out, true)
}
