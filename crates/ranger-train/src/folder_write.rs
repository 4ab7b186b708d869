//! Writing a whole output folder (a checkpoint, `model/`, `adapter/`, `best/`) atomically: it is
//! built under a temporary name next to its place and swapped in once complete. A failed write
//! removes its partial files, so a full disk is not left fuller, and says how much space the
//! write needed.

use std::path::{Path, PathBuf};

use candle_ranger::state_file::sync_parent;

use crate::error::{Result, TrainError};

/// Builds the folder `target` with `build` (given the temporary folder to fill) and swaps it in,
/// replacing an older one. `needed` is the caller's estimate of the bytes the folder takes; the
/// error of a failed write reports it, or what was measured when that is more.
pub fn write_folder(target: &Path, needed: u64, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(target, "partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp)
        .map_err(TrainError::io(&tmp))
        .and_then(|()| build(&tmp))
        .and_then(|()| swap_in(&tmp, target));
    result.map_err(|e| {
        let written = folder_bytes(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        as_write_failure(e, target, needed, written)
    })
}

/// The error of a failed folder write, about the folder: an I/O error (from a file written
/// atomically, or a plain one) becomes [`TrainError::WriteFailed`] with the bytes the whole
/// folder needed; other errors are kept.
fn as_write_failure(e: TrainError, target: &Path, estimate: u64, written: u64) -> TrainError {
    let (file, file_needed, source) = match e {
        TrainError::WriteFailed { file, needed, source, .. } => (file, needed, source),
        TrainError::Io { path, source } | TrainError::Optimizer(candle_ranger::Error::Io { path, source }) => {
            (path, 0, source)
        }
        other => return other,
    };
    TrainError::WriteFailed { target: target.to_path_buf(), file, needed: estimate.max(written + file_needed), source }
}

/// `dir/.name.<what>-<pid>`: a hidden name next to `target`, this process's own.
fn sibling(target: &Path, what: &str) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

/// Renames `tmp` to `target`; an existing `target` is moved aside first and removed once the new
/// one is in place (put back if the rename fails), so there is always a complete one.
fn swap_in(tmp: &Path, target: &Path) -> Result<()> {
    let old = sibling(target, "old");
    let had_old = target.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(target, &old).map_err(TrainError::io(target))?;
    }
    if let Err(e) = std::fs::rename(tmp, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        return Err(TrainError::io(target)(e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    sync_parent(target);
    Ok(())
}

/// The bytes of the files in `dir` (and below).
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => folder_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Removes what writes of an earlier process left in `dir` when it died mid-write: partial and
/// set-aside folders (`.name.partial-<pid>`, `.name.old-<pid>`) and temporary files
/// (`name.tmp.<pid>.<n>`). Only safe while holding the folder's lock (no other run writes there).
/// Returns what was removed.
pub fn remove_leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut removed = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let folder = name.starts_with('.')
            && name.rsplit_once(".partial-").or_else(|| name.rsplit_once(".old-")).is_some_and(|(_, pid)| digits(pid));
        let temp_file = name
            .rsplit_once(".tmp.")
            .and_then(|(_, rest)| rest.split_once('.'))
            .is_some_and(|(pid, n)| digits(pid) && digits(n));
        let path = e.path();
        let gone = if folder && path.is_dir() {
            std::fs::remove_dir_all(&path).is_ok()
        } else if temp_file && path.is_file() {
            std::fs::remove_file(&path).is_ok()
        } else {
            false
        };
        if gone {
            removed.push(path);
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ranger-folder-write-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A failing build leaves no partial folder, keeps the folder it would have replaced, and
    /// reports the bytes: what was written plus the failing file's, or the estimate if larger.
    /// A build that succeeds replaces the folder whole.
    #[test]
    fn a_failed_build_removes_its_partial_folder_and_keeps_the_old_one() {
        let d = scratch("fail");
        let target = d.join("checkpoint-2");
        write_folder(&target, 0, |tmp| crate::weights::write_atomic(&tmp.join("a"), b"old")).unwrap();
        let err = write_folder(&target, 10, |tmp| {
            crate::weights::write_atomic(&tmp.join("a"), &[0; 100])?;
            Err(TrainError::WriteFailed {
                target: tmp.join("b"),
                file: tmp.join("b"),
                needed: 50,
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            })
        })
        .unwrap_err();
        let TrainError::WriteFailed { target: t, needed, .. } = &err else { panic!("{err}") };
        assert_eq!((t, *needed), (&target, 150));
        let text = err.to_string();
        assert!(text.contains("--save-total-limit") && text.contains("150 bytes"), "{text}");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("checkpoint-2")], "only the old folder is left");
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"old");
        write_folder(&target, 0, |tmp| crate::weights::write_atomic(&tmp.join("b"), b"new")).unwrap();
        assert!(!target.join("a").exists() && target.join("b").exists(), "no file of the old folder survives");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Leftovers of a dead writer go; ordinary files and folders stay.
    #[test]
    fn leftovers_are_removed_and_nothing_else() {
        let d = scratch("leftovers");
        for dir in [".checkpoint-4.partial-123", ".best.old-9", "checkpoint-2", ".partial-x"] {
            std::fs::create_dir_all(d.join(dir)).unwrap();
        }
        for file in ["metrics.jsonl.tmp.123.0", "metrics.jsonl", "notes.tmp.txt"] {
            std::fs::write(d.join(file), b"").unwrap();
        }
        let removed = remove_leftovers(&d);
        let names: Vec<_> = removed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, [".best.old-9", ".checkpoint-4.partial-123", "metrics.jsonl.tmp.123.0"]);
        let mut left: Vec<_> =
            std::fs::read_dir(&d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [".partial-x", "checkpoint-2", "metrics.jsonl", "notes.tmp.txt"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
