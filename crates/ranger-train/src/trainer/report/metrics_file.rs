//! `metrics.jsonl`: one JSON line per step (and one for the baseline evaluation), rewritten
//! whole before each checkpoint and when the loop ends, so it is never behind a checkpoint.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::trainer::observer::TrainObserver;
use crate::trainer::records::{CheckpointRecord, LoopEnd, StepRecord};

/// Writes the run's records to a JSONL file.
pub struct MetricsFile {
    path: PathBuf,
}

impl MetricsFile {
    /// Writes to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Reads the records of a `metrics.jsonl`; lines that are not records are left out, and a
    /// missing file has none.
    pub fn read(path: &Path) -> Vec<StepRecord> {
        let Ok(text) = std::fs::read_to_string(path) else { return vec![] };
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn write(&self, records: &[StepRecord]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            // Through `Value`, whose maps are sorted: the keys keep the order the file always had.
            text.push_str(&serde_json::to_value(r).expect("metrics record").to_string());
            text.push('\n');
        }
        crate::weights::write_atomic(&self.path, text.as_bytes())
    }
}

impl TrainObserver for MetricsFile {
    fn on_checkpoint(&mut self, checkpoint: &CheckpointRecord<'_>) -> Result<()> {
        self.write(checkpoint.history)
    }

    fn on_loop_end(&mut self, end: &LoopEnd<'_>) -> Result<()> {
        self.write(end.history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::records::{EvalFigures, TrainFigures};

    fn line(r: &StepRecord) -> String {
        serde_json::to_value(r).unwrap().to_string()
    }

    #[test]
    fn lines_keep_their_keys_order_and_nulls_and_read_back_unchanged() {
        let train = TrainFigures {
            loss: f64::NAN,
            lr: 0.001,
            grad_norm: f64::NAN,
            tokens: 12,
            skipped: true,
            tokens_per_sec: 1.5,
            peak_rss_bytes: None,
            epoch: 0.5,
        };
        let eval = EvalFigures {
            eval_loss: 2.0,
            eval_perplexity: Some(f64::INFINITY),
            eval_accuracy: None,
            eval_macro_f1: None,
            eval_per_class: None,
        };
        let step = StepRecord { step: 3, train: Some(train), eval: Some(eval) };
        let expected = concat!(
            r#"{"epoch":0.5,"eval_loss":2.0,"eval_perplexity":null,"grad_norm":null,"loss":null,"lr":0.001,"#,
            r#""peak_rss_bytes":null,"skipped":true,"step":3,"tokens":12,"tokens_per_sec":1.5}"#
        );
        assert_eq!(line(&step), expected);
        let baseline = StepRecord { step: 0, train: None, eval: step.eval.clone() };
        assert_eq!(line(&baseline), r#"{"eval_loss":2.0,"eval_perplexity":null,"step":0}"#);
        for l in [expected.to_string(), line(&baseline)] {
            let back: StepRecord = serde_json::from_str(&l).unwrap();
            assert_eq!(line(&back), l);
        }
    }
}
