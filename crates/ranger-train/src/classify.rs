//! Text classification data and metrics: CSV / JSONL files with a text column, an optional
//! text-pair column and a label column; label names mapped to ids; tokenized examples collated
//! into [`ClassifierBatch`]es; accuracy, macro-F1 and per-class counts.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::model::batch::padding_mask;
use crate::model::causal_mask;
use crate::model::classifier::ClassifierBatch;
use crate::tokenizer::TextTokenizer;

/// Which columns (CSV header names or JSONL keys) hold what.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    /// The text.
    pub text: String,
    /// The second text of a pair (e.g. a hypothesis), if any.
    pub text_pair: Option<String>,
    /// The label; `None` when reading texts to classify.
    pub label: Option<String>,
}

/// One row of a classification file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line number (of the record's first line in a CSV file).
    pub line: usize,
    /// The text.
    pub text: String,
    /// The second text, when a pair column is used.
    pub pair: Option<String>,
    /// The label as written (numbers and booleans as their JSON text).
    pub label: Option<String>,
}

fn data_err(path: &Path, line: usize, message: impl Into<String>) -> TrainError {
    TrainError::Data { path: path.to_path_buf(), line, message: message.into() }
}

fn is_csv(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("csv" | "tsv"))
}

/// Reads a `.csv` / `.tsv` file (header row first) or a JSONL file (any other extension). A
/// missing column or a malformed line fails with the file name and line number.
pub fn read_records(path: &Path, cols: &Columns) -> Result<Vec<Record>> {
    let records = if is_csv(path) { read_csv(path, cols)? } else { read_jsonl(path, cols)? };
    if records.is_empty() {
        return Err(TrainError::EmptyDataset(format!("{}: no records", path.display())));
    }
    Ok(records)
}

fn read_csv(path: &Path, cols: &Columns) -> Result<Vec<Record>> {
    let delimiter = if path.extension().is_some_and(|e| e == "tsv") { b'\t' } else { b',' };
    let mut reader =
        csv::ReaderBuilder::new().delimiter(delimiter).from_path(path).map_err(|e| data_err(path, 1, e.to_string()))?;
    let headers = reader.headers().map_err(|e| data_err(path, 1, e.to_string()))?.clone();
    let index = |name: &str| -> Result<usize> {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            data_err(
                path,
                1,
                format!(
                    "no column {name:?} in the header (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let text_i = index(&cols.text)?;
    let pair_i = cols.text_pair.as_deref().map(index).transpose()?;
    let label_i = cols.label.as_deref().map(index).transpose()?;
    let mut out = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| data_err(path, e.position().map_or(0, |p| p.line() as usize), e.to_string()))?;
        let line = row.position().map_or(0, |p| p.line() as usize);
        let field = |i: usize| {
            row.get(i)
                .map(String::from)
                .ok_or_else(|| data_err(path, line, format!("the row has {} fields", row.len())))
        };
        out.push(Record {
            line,
            text: field(text_i)?,
            pair: pair_i.map(field).transpose()?,
            label: label_i.map(field).transpose()?,
        });
    }
    Ok(out)
}

fn read_jsonl(path: &Path, cols: &Columns) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(raw).map_err(|e| data_err(path, line, format!("invalid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| data_err(path, line, "expected a JSON object"))?;
        let string = |key: &str| -> Result<String> {
            match obj.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(data_err(path, line, format!("`{key}` must be a string"))),
                None => Err(data_err(path, line, format!("no `{key}` field"))),
            }
        };
        let label = match &cols.label {
            None => None,
            Some(key) => Some(match obj.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                Some(_) => {
                    return Err(data_err(path, line, format!("`{key}` must be a string, a number or a boolean")))
                }
                None => return Err(data_err(path, line, format!("no `{key}` field"))),
            }),
        };
        out.push(Record {
            line,
            text: string(&cols.text)?,
            pair: cols.text_pair.as_deref().map(string).transpose()?,
            label,
        });
    }
    Ok(out)
}

/// The label names in id order, derived from training records: integers in numeric order (so
/// labels 0..n-1 keep their values as ids), anything else sorted as text.
pub fn labels_from_records(records: &[Record]) -> Vec<String> {
    let mut names: Vec<String> = records.iter().filter_map(|r| r.label.clone()).collect();
    names.sort();
    names.dedup();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().expect("checked"));
    }
    names
}

/// One tokenized, labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledText {
    /// Token ids (special tokens included, truncated).
    pub ids: Vec<u32>,
    /// Token types (1 for the second text of a pair).
    pub type_ids: Vec<u32>,
    /// Label id (0 when unlabelled).
    pub label: u32,
}

/// Tokenizes records with the tokenizer's own special tokens and truncation to `max_len`
/// tokens (pairs truncated longest-first, as `transformers` does), mapping labels to ids by
/// `labels`; an unknown label fails with the file and line.
pub fn encode_records(
    records: &[Record],
    tok: &TextTokenizer,
    labels: &[String],
    max_len: usize,
    path: &Path,
) -> Result<Vec<LabeledText>> {
    let mut inner = tok.inner.clone();
    inner
        .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(256) {
        let inputs: Vec<tokenizers::EncodeInput> = chunk
            .iter()
            .map(|r| match &r.pair {
                Some(p) => (r.text.as_str(), p.as_str()).into(),
                None => r.text.as_str().into(),
            })
            .collect();
        let encodings = inner.encode_batch(inputs, true).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        for (r, enc) in chunk.iter().zip(encodings) {
            let label = match &r.label {
                None => 0,
                Some(l) => labels.iter().position(|n| n == l).ok_or_else(|| {
                    data_err(
                        path,
                        r.line,
                        format!("label {l:?} is not one of the model's labels ({})", labels.join(", ")),
                    )
                })? as u32,
            };
            if enc.get_ids().is_empty() {
                return Err(data_err(path, r.line, "the text encodes to no tokens"));
            }
            out.push(LabeledText { ids: enc.get_ids().to_vec(), type_ids: enc.get_type_ids().to_vec(), label });
        }
    }
    Ok(out)
}

/// Collates examples into a right-padded [`ClassifierBatch`] with the attention mask `kind`
/// ([`crate::model::SequenceClassifier::mask_kind`]).
pub fn collate(
    examples: &[&LabeledText],
    pad_id: u32,
    kind: crate::model::MaskKind,
    mask_dtype: DType,
    device: &Device,
) -> Result<ClassifierBatch> {
    let b = examples.len();
    let s = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let (mut ids, mut types, mut pos, mut last, mut labels) = (
        Vec::with_capacity(b * s),
        Vec::with_capacity(b * s),
        Vec::with_capacity(b * s),
        Vec::with_capacity(b),
        Vec::with_capacity(b),
    );
    for (row, e) in examples.iter().enumerate() {
        let pad = s - e.ids.len();
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        types.extend(&e.type_ids);
        types.extend(std::iter::repeat_n(0, pad));
        pos.extend(0..s as u32);
        last.push((row * s + e.ids.len() - 1) as u32);
        labels.push(e.label);
    }
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mask = match kind {
        crate::model::MaskKind::Causal { window } => {
            let segs: Vec<Vec<u32>> =
                lengths.iter().map(|&l| (0..s).map(|i| if i < l { 0 } else { u32::MAX }).collect()).collect();
            causal_mask(&segs, window, mask_dtype, device)?
        }
        crate::model::MaskKind::Padding => padding_mask(&lengths, s, mask_dtype, device)?,
    };
    Ok(ClassifierBatch {
        input_ids: Tensor::from_vec(ids, (b, s), device)?,
        token_type_ids: Some(Tensor::from_vec(types, (b, s), device)?),
        positions: Tensor::from_vec(pos, (b, s), device)?,
        mask,
        last_index: Tensor::from_vec(last, b, device)?,
        labels: Tensor::from_vec(labels, b, device)?,
        n_examples: b,
        n_tokens: lengths.iter().sum(),
    })
}

/// Counts of one class on an evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassCounts {
    /// The label.
    pub label: String,
    /// Examples of this class.
    pub support: usize,
    /// Examples predicted as this class.
    pub predicted: usize,
    /// Examples of this class predicted correctly.
    pub correct: usize,
    /// correct / predicted (0 when nothing was predicted).
    pub precision: f64,
    /// correct / support (0 when there is no example).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub f1: f64,
}

/// Classification metrics of an evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Examples evaluated.
    pub examples: usize,
    /// Fraction predicted correctly.
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 over the classes that occur (in the gold labels or
    /// the predictions), as scikit-learn's `f1_score(average="macro")`.
    pub macro_f1: f64,
    /// Per-class counts, in label-id order.
    pub per_class: Vec<ClassCounts>,
}

impl ClassMetrics {
    /// Metrics of `predicted` against `gold` label ids.
    pub fn compute(predicted: &[u32], gold: &[u32], labels: &[String]) -> Self {
        let n = labels.len();
        let (mut support, mut pred, mut correct) = (vec![0usize; n], vec![0usize; n], vec![0usize; n]);
        for (&p, &g) in predicted.iter().zip(gold) {
            support[g as usize] += 1;
            pred[p as usize] += 1;
            if p == g {
                correct[g as usize] += 1;
            }
        }
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_class: Vec<ClassCounts> = (0..n)
            .map(|i| {
                let (p, r) = (ratio(correct[i], pred[i]), ratio(correct[i], support[i]));
                let f1 = if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) };
                ClassCounts {
                    label: labels[i].clone(),
                    support: support[i],
                    predicted: pred[i],
                    correct: correct[i],
                    precision: p,
                    recall: r,
                    f1,
                }
            })
            .collect();
        let present: Vec<&ClassCounts> = per_class.iter().filter(|c| c.support + c.predicted > 0).collect();
        let macro_f1 =
            if present.is_empty() { 0.0 } else { present.iter().map(|c| c.f1).sum::<f64>() / present.len() as f64 };
        Self { examples: gold.len(), accuracy: ratio(correct.iter().sum(), gold.len()), macro_f1, per_class }
    }
}

/// Index of the largest value of each row of `logits: [b, n]`, and the softmax of each row.
pub fn argmax_and_probs(logits: &Tensor) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    let mut preds = Vec::with_capacity(rows.len());
    let mut probs = Vec::with_capacity(rows.len());
    for r in rows {
        let max = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = r.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let best = r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b });
        preds.push(best as u32);
        probs.push(e.into_iter().map(|x| x / sum).collect());
    }
    Ok((preds, probs))
}
