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
