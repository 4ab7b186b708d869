//! Training data: JSONL (`text`, `prompt` + `completion`, or chat `messages`) and plain text,
//! tokenized with loss masks, truncated, optionally packed, shuffled per epoch with a seed, and
//! collated into [`Batch`]es.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::model::{causal_mask, Batch};
use crate::rng::Rng;
use crate::tokenizer::{Message, TextTokenizer};

/// How examples become sequences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DataOptions {
    /// Longest sequence in tokens; longer examples are truncated.
    pub max_seq_len: usize,
    /// Pack several short examples into each sequence (they never attend to each other).
    pub pack: bool,
    /// Train only on completions / assistant turns for prompt-completion and chat data.
    pub mask_prompt: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self { max_seq_len: 512, pack: false, mask_prompt: true }
    }
}

/// One tokenized example: ids and which of them are prediction targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `true` where the token is trained on.
    pub target: Vec<bool>,
}

/// A model input row: one example, or several packed ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Target flags.
    pub target: Vec<bool>,
    /// Example index within the row (packed examples don't attend across segments).
    pub segment: Vec<u32>,
    /// Position of each token within its example.
    pub position: Vec<u32>,
}

/// What loading a file gave.
#[derive(Debug, Clone)]
pub struct LoadedData {
    /// The examples that kept at least one target token.
    pub examples: Vec<Example>,
    /// Examples dropped because nothing trainable was left after truncation.
    pub dropped: usize,
    /// Examples truncated to `max_seq_len`.
    pub truncated: usize,
}

fn data_err(path: &Path, line: usize, message: impl Into<String>) -> TrainError {
    TrainError::Data { path: path.to_path_buf(), line, message: message.into() }
}

/// Tokenizes one JSONL record; the error is a message for the caller to place (file, line).
pub fn encode_record(record: &Value, tok: &TextTokenizer, mask_prompt: bool) -> std::result::Result<Example, String> {
    let obj = record.as_object().ok_or("expected a JSON object")?;
    let eos = tok.eos_id;
    let with_eos = |mut ids: Vec<u32>, mut target: Vec<bool>| {
        if let Some(e) = eos {
            if ids.last() != Some(&e) {
                ids.push(e);
                target.push(true);
            }
        }
        Example { ids, target }
    };
    if let Some(text) = obj.get("text") {
        let text = text.as_str().ok_or("`text` must be a string")?;
        let (ids, _) = tok.encode(text, true).map_err(|e| e.to_string())?;
        let n = ids.len();
        return Ok(with_eos(ids, vec![true; n]));
    }
    if let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) {
        let (p, c) =
            (p.as_str().ok_or("`prompt` must be a string")?, c.as_str().ok_or("`completion` must be a string")?);
        let full = format!("{p}{c}");
        let (ids, offsets) = tok.encode(&full, true).map_err(|e| e.to_string())?;
        // A token is part of the completion when it ends after the prompt does.
        let target = offsets.iter().map(|&(_, end)| !mask_prompt || end > p.len()).collect();
        return Ok(with_eos(ids, target));
    }
    if let Some(m) = obj.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| format!("`messages`: {e}"))?;
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        let full = tok.apply_chat_template(&messages, false).map_err(|e| e.to_string())?;
        let (ids, offsets) = tok.encode(&full, false).map_err(|e| e.to_string())?;
        if !mask_prompt {
            let n = ids.len();
            return Ok(Example { ids, target: vec![true; n] });
        }
        // Byte spans of the assistant turns: what rendering turn i adds to the prompt that
        // precedes it, as far as the whole conversation renders the same. A template may close
        // the last turn differently (Phi-3.5 ends a conversation with its eos token): that ending
        // is the turn's only where the turn is the last. The tokens trained on lie wholly
        // inside a span (one that runs past it, such as the next turn's `<|user|>` whose `<|`
        // the two renderings share, is the prompt's).
        let mut spans = Vec::new();
        for (i, msg) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let before = tok.apply_chat_template(&messages[..i], true).map_err(|e| e.to_string())?;
            let upto = tok.apply_chat_template(&messages[..=i], false).map_err(|e| e.to_string())?;
            let end = common_prefix_len(&full, &upto);
            if !full.starts_with(&before) || end < before.len() {
                return Err(format!(
                    "the chat template does not render turn {i} ({}) as a prefix of the conversation, so assistant tokens cannot be located; use --no-mask-prompt",
                    msg.role
                ));
            }
            spans.push((before.len(), end));
        }
        let target = offsets
            .iter()
            .map(|&(start, end)| end > start && spans.iter().any(|&(a, b)| start >= a && end <= b))
            .collect();
        return Ok(Example { ids, target });
    }
    Err("expected `text`, `prompt` + `completion`, or `messages`".into())
}

/// Length in bytes of the longest common prefix of `a` and `b` (whole characters).
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

fn finish(examples: Vec<Example>, max_seq_len: usize) -> LoadedData {
    let (mut kept, mut dropped, mut truncated) = (Vec::new(), 0, 0);
    for mut ex in examples {
        if ex.ids.len() > max_seq_len {
            ex.ids.truncate(max_seq_len);
            ex.target.truncate(max_seq_len);
            truncated += 1;
        }
        // The first token of a sequence is never predicted.
        if ex.target.iter().skip(1).any(|&t| t) {
            kept.push(ex);
        } else {
            dropped += 1;
        }
    }
    LoadedData { examples: kept, dropped, truncated }
}

/// Loads a `.jsonl` / `.json` file (one record per line) or a plain-text file (anything else:
/// tokenized whole and cut into `max_seq_len` blocks, like `run_clm.py`).
pub fn load_file(path: &Path, tok: &TextTokenizer, opts: &DataOptions) -> Result<LoadedData> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let examples = if ext == "jsonl" || ext == "json" {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).map_err(|e| data_err(path, i + 1, format!("invalid JSON: {e}")))?;
            out.push(encode_record(&v, tok, opts.mask_prompt).map_err(|e| data_err(path, i + 1, e))?);
        }
        out
    } else {
        let (mut ids, _) = tok.encode(&text, true)?;
        if let Some(e) = tok.eos_id {
            ids.push(e);
        }
        ids.chunks(opts.max_seq_len).map(|c| Example { ids: c.to_vec(), target: vec![true; c.len()] }).collect()
    };
    let data = finish(examples, opts.max_seq_len);
    if data.examples.is_empty() {
        return Err(TrainError::EmptyDataset(format!(
            "{}: no trainable example ({} dropped: empty, or nothing left to train on after truncation to max_seq_length={})",
            path.display(),
            data.dropped,
            opts.max_seq_len
        )));
    }
    Ok(data)
}

/// Splits off a seeded random `fraction` of `examples` as validation data.
pub fn split_validation<T>(mut examples: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut rng = Rng::new(seed ^ 0x5EED_5A11);
    rng.shuffle(&mut examples);
    // At least one validation example when asked for, and always at least one for training.
    let wanted = ((examples.len() as f64 * fraction).round() as usize).max(usize::from(fraction > 0.0));
    let n_val = wanted.min(examples.len().saturating_sub(1));
    let val = examples.split_off(examples.len() - n_val);
    (examples, val)
}

/// Turns examples into sequences: one each, or packed greedily in order up to `max_seq_len`.
pub fn to_sequences(examples: &[Example], opts: &DataOptions) -> Vec<Sequence> {
    let mut out: Vec<Sequence> = Vec::new();
    let mut cur = Sequence { ids: vec![], target: vec![], segment: vec![], position: vec![] };
    let mut seg = 0u32;
    for ex in examples {
        if !opts.pack || cur.ids.len() + ex.ids.len() > opts.max_seq_len {
            if !cur.ids.is_empty() {
                out.push(std::mem::replace(
                    &mut cur,
                    Sequence { ids: vec![], target: vec![], segment: vec![], position: vec![] },
                ));
            }
            seg = 0;
        }
        cur.ids.extend(&ex.ids);
        // The first token of a packed example is not predicted from the previous example.
        cur.target.extend(ex.target.iter().enumerate().map(|(i, &t)| t && i > 0));
        cur.segment.extend(std::iter::repeat_n(seg, ex.ids.len()));
        cur.position.extend(0..ex.ids.len() as u32);
        seg += 1;
    }
    if !cur.ids.is_empty() {
        out.push(cur);
    }
    out
}

/// Collates sequences into a [`Batch`], right-padding to the longest with `pad_id`; `window` is
/// the model's sliding attention window, if any.
pub fn collate(
    seqs: &[&Sequence],
    pad_id: u32,
    window: Option<usize>,
    mask_dtype: DType,
    device: &Device,
) -> Result<Batch> {
    let len = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1).max(2);
    let b = seqs.len();
    let (mut ids, mut pos, mut lm, mut segs) =
        (Vec::with_capacity(b * len), Vec::with_capacity(b * len), Vec::with_capacity(b * len), Vec::new());
    let (mut n_targets, mut n_tokens) = (0, 0);
    for s in seqs {
        let pad = len - s.ids.len();
        ids.extend(&s.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        pos.extend(&s.position);
        pos.extend(std::iter::repeat_n(0, pad));
        lm.extend(s.target.iter().map(|&t| if t { 1f32 } else { 0.0 }));
        lm.extend(std::iter::repeat_n(0f32, pad));
        let mut seg = s.segment.clone();
        seg.extend(std::iter::repeat_n(u32::MAX, pad));
        segs.push(seg);
        n_targets += s.target.iter().skip(1).filter(|&&t| t).count();
        n_tokens += s.ids.len();
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, len), device)?,
        positions: Tensor::from_vec(pos, (b, len), device)?,
        mask: causal_mask(&segs, window, mask_dtype, device)?,
        loss_mask: Tensor::from_vec(lm, (b, len), device)?,
        n_targets,
        n_tokens,
    })
}

/// The order sequences are visited in: a fresh seeded permutation each epoch, so any position
/// in the run is a pure function of (seed, micro-batch index) and resuming needs no replay.
#[derive(Debug)]
pub struct Loader<T = Sequence> {
    /// All training rows (sequences, or labelled examples for classification).
    pub sequences: Vec<T>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Shuffle seed.
    pub seed: u64,
    /// The permutation of the epoch last asked for (computed once per epoch, not per batch).
    order: std::sync::Mutex<Option<(usize, Vec<usize>)>>,
}

impl<T> Loader<T> {
    /// A loader over `sequences`.
    pub fn new(sequences: Vec<T>, batch_size: usize, seed: u64) -> Self {
        Self { sequences, batch_size, seed, order: std::sync::Mutex::new(None) }
    }

    /// Micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.sequences.len().div_ceil(self.batch_size)
    }

    /// The sequences of micro-batch `index` (counted from the start of training).
    pub fn batch(&self, index: usize) -> Vec<&T> {
        let per = self.batches_per_epoch();
        let (epoch, i) = (index / per, index % per);
        let mut cache = self.order.lock().expect("loader lock poisoned");
        if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.sequences.len()).collect();
            Rng::new(self.seed.wrapping_add(epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)).shuffle(&mut order);
            *cache = Some((epoch, order));
        }
        let order = &cache.as_ref().expect("just filled").1;
        order[i * self.batch_size..((i + 1) * self.batch_size).min(order.len())]
            .iter()
            .map(|&j| &self.sequences[j])
            .collect()
    }
}
