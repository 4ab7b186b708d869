//! The checkpoints of an output folder (`checkpoint-N/`, each complete once its
//! `trainer_state.json` is written), and which one a `--resume` means.

use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// Finds the checkpoint to resume from: `path` itself, or the latest `checkpoint-N` inside it.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("trainer_state.json").exists() {
        return Ok(path.to_path_buf());
    }
    list_checkpoints(path)?.pop().map(|(_, p)| p).ok_or_else(|| TrainError::NoCheckpoint { path: path.to_path_buf() })
}

/// The latest checkpoint next to `checkpoint` (in the same folder) from before `step`, its own.
pub(super) fn previous_checkpoint(checkpoint: &Path, step: usize) -> Option<PathBuf> {
    let parent = checkpoint.parent()?;
    list_checkpoints(parent).ok()?.into_iter().rev().find(|(n, _)| *n < step).map(|(_, p)| p)
}

/// The complete checkpoints in `dir`, by step.
pub(super) fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(out) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join("trainer_state.json").exists() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes a checkpoint, its `trainer_state.json` first: from then on it no longer counts as one,
/// so a process killed halfway leaves a folder that no resume picks.
pub(super) fn remove_checkpoint(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("trainer_state.json"));
    let _ = std::fs::remove_dir_all(dir);
}
