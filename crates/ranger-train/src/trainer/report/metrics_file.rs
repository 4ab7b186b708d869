//! `metrics.jsonl`: one JSON line per step (and one for the baseline evaluation), appended as
//! each step ends so that `tail -f` follows the run and a crash keeps every finished step. Each
//! `run` call first rewrites the file (atomically) with the records so far, which after a resume
//! are those up to the resumed step: the file stays one history, without the steps a stopped run
//! did past its checkpoint.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use crate::trainer::observer::TrainObserver;
use crate::trainer::records::{EvalRecord, RunStart, StepRecord};

/// Writes the run's records to a JSONL file.
pub struct MetricsFile {
    path: PathBuf,
    /// Open for appending once the run has started.
    file: Option<File>,
}

impl MetricsFile {
    /// Writes to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// Reads the records of a `metrics.jsonl`; lines that are not records (a line cut short by a
    /// killed process) are left out, and a missing file has none.
    pub fn read(path: &Path) -> Vec<StepRecord> {
        let Ok(text) = std::fs::read_to_string(path) else { return vec![] };
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Appends one record in a single write, so a line is either whole or cut at its end.
    fn append(&mut self, record: &StepRecord) -> Result<()> {
        let Some(file) = &mut self.file else { return Ok(()) };
        file.write_all(line(record).as_bytes()).and_then(|()| file.flush()).map_err(TrainError::io(&self.path))
    }
}

/// A record as its line of the file, newline included.
fn line(record: &StepRecord) -> String {
    // Through `Value`, whose maps are sorted: the keys keep the order the file always had.
    let mut text = serde_json::to_value(record).expect("metrics record").to_string();
    text.push('\n');
    text
}

impl TrainObserver for MetricsFile {
    fn on_start(&mut self, start: &RunStart<'_>) -> Result<()> {
        let text: String = start.history.iter().map(line).collect();
        crate::weights::write_atomic(&self.path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(&self.path).map_err(TrainError::io(&self.path))?;
        self.file = Some(file);
        Ok(())
    }

    fn on_eval(&mut self, eval: &EvalRecord) -> Result<()> {
        // The baseline has no step of its own: its line is written here.
        if eval.before_training {
            self.append(&StepRecord::baseline(eval))?;
        }
        Ok(())
    }

    fn on_step(&mut self, step: &StepRecord) -> Result<()> {
        self.append(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::records::{EvalFigures, TrainFigures};

    /// A record's line without its newline.
    fn line(r: &StepRecord) -> String {
        super::line(r).trim_end().to_string()
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
