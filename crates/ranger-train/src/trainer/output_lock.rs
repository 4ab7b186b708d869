//! One run per output folder: `OUTPUT/.ranger-tune.lock` names the run using it (pid, host, start
//! time) and is locked with the OS's advisory lock while the run lasts. The OS drops the lock when
//! the process dies, however it dies, so a lock file whose lock nobody holds is stale: it is taken
//! over (with a note), while a held one makes a second run fail at once, naming the holder.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The lock file's name inside the output folder.
pub const LOCK_FILE: &str = ".ranger-tune.lock";

/// What the lock file says about the run holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Its process id.
    pub pid: u32,
    /// The machine it runs on.
    pub host: String,
    /// When it took the lock (UTC, RFC 3339).
    pub since: String,
}

impl LockHolder {
    /// This process, now.
    fn this_process() -> Self {
        Self { pid: std::process::id(), host: hostname(), since: utc_now() }
    }

    /// `pid N on host H since T`.
    pub fn describe(&self) -> String {
        format!("pid {} on host {} since {}", self.pid, self.host, self.since)
    }
}

/// The lock on an output folder, held until dropped (the lock file is then removed).
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    taken_over: Option<LockHolder>,
}

impl OutputLock {
    /// Locks the output folder `dir` (created if needed) for this process. Fails with
    /// [`TrainError::OutputLocked`], naming the holder, when another run holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        let path = dir.join(LOCK_FILE);
        loop {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(TrainError::io(&path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = read_holder(&mut file).map_or_else(
                        || "a process that has not written its name into the lock file yet".to_string(),
                        |h| h.describe(),
                    );
                    return Err(TrainError::OutputLocked { dir: dir.to_path_buf(), lock_file: path, holder });
                }
                Err(TryLockError::Error(e)) => return Err(TrainError::io(&path)(e)),
            }
            // A holder that ends removes the file: if that happened between our open and our
            // lock, we locked a file nobody else can see; start over on the path's current one.
            if !is_at(&file, &path) {
                continue;
            }
            // A file with a holder in it whose lock we could take: that holder died.
            let taken_over = read_holder(&mut file);
            // Rewritten in place, not atomically: a rename would put a new, unlocked file there.
            let text = serde_json::to_string(&LockHolder::this_process()).expect("a lock holder serializes");
            let write = |f: &mut File| -> std::io::Result<()> {
                f.set_len(0)?;
                f.rewind()?;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            };
            write(&mut file).map_err(TrainError::io(&path))?;
            return Ok(Self { file, path, dir: dir.to_path_buf(), taken_over });
        }
    }

    /// The locked output folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run whose stale lock this one took over (it died without removing its lock file).
    pub fn taken_over(&self) -> Option<&LockHolder> {
        self.taken_over.as_ref()
    }

    /// A note for the user when a stale lock was taken over.
    pub fn stale_note(&self) -> Option<String> {
        self.taken_over.as_ref().map(|h| {
            format!(
                "note: {}: took over the stale lock of a run that ended without releasing it ({})",
                self.path.display(),
                h.describe()
            )
        })
    }
}

impl Drop for OutputLock {
    /// Removes the lock file while still holding the lock (closing the file then releases it).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// The holder the lock file names, if it names one.
fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether `file` is still the file at `path` (not removed or replaced since it was opened).
#[cfg(unix)]
fn is_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Elsewhere an open file cannot be removed, so it is still there.
#[cfg(not(unix))]
fn is_at(_file: &File, _path: &Path) -> bool {
    true
}

/// The machine's name (Linux's, else the usual variables), or `unknown`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    rfc3339(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// Seconds since 1970 as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ranger-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A second lock on a held folder fails naming the holder; after release it can be taken,
    /// and the lock file is gone.
    #[test]
    fn a_held_lock_refuses_a_second_one_until_released() {
        let d = scratch("held");
        let first = OutputLock::acquire(&d).unwrap();
        assert!(first.taken_over().is_none());
        let err = OutputLock::acquire(&d).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TrainError::OutputLocked { .. }), "{text}");
        assert!(text.contains(&format!("pid {} on host {}", std::process::id(), hostname())), "{text}");
        drop(first);
        assert!(!d.join(LOCK_FILE).exists(), "released locks leave no file");
        let again = OutputLock::acquire(&d).unwrap();
        assert!(again.taken_over().is_none());
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A lock file nobody holds a lock on is taken over, and says whose it was.
    #[test]
    fn a_stale_lock_file_is_taken_over() {
        let d = scratch("stale");
        std::fs::create_dir_all(&d).unwrap();
        let dead = LockHolder { pid: 4_000_000, host: "gone".into(), since: "2020-01-01T00:00:00Z".into() };
        std::fs::write(d.join(LOCK_FILE), serde_json::to_string(&dead).unwrap()).unwrap();
        let lock = OutputLock::acquire(&d).unwrap();
        assert_eq!(lock.taken_over(), Some(&dead));
        assert!(lock.stale_note().unwrap().contains("pid 4000000 on host gone"));
        let now: LockHolder = serde_json::from_str(&std::fs::read_to_string(d.join(LOCK_FILE)).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        drop(lock);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn times_are_civil_utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_215_500), "2026-12-02T12:45:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
