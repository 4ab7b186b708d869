//! The size and CRC-32 of each file of a checkpoint, recorded in its `trainer_state.json` and
//! checked on resume, so a checkpoint damaged on disk is refused instead of training on garbage.
//!
//! CRC-32 rather than SHA-256: the aim is to catch accidental damage (a flipped bit, a truncated
//! copy), not tampering. CRC-32 catches every burst of up to 32 flipped bits and misses random
//! damage once in 4 billion, and it runs at memory speed (`crc32fast` uses the CPU's carry-less
//! multiply), while SHA-256 without CPU support would add seconds per gigabyte to every save and
//! every resume of a large model.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The key of `trainer_state.json` that holds the checksums.
pub(super) const KEY: &str = "checksums";

/// A file's size and CRC-32 (IEEE, as zip and gzip compute it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChecksum {
    /// Its size in bytes.
    pub bytes: u64,
    /// Its CRC-32, 8 lowercase hex digits.
    pub crc32: String,
}

impl FileChecksum {
    /// Reads `path` through once, in blocks.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let bytes = hasher.total_len();
        Ok(Self { bytes, crc32: format!("{:08x}", hasher.finalize()) })
    }
}

/// The checksums of the files of the checkpoint folder `dir`, by file name (its
/// `trainer_state.json`, which will hold them, aside).
pub(super) fn checksum_folder(dir: &Path) -> Result<BTreeMap<String, FileChecksum>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(TrainError::io(dir))? {
        let entry = entry.map_err(TrainError::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "trainer_state.json" && entry.file_type().map_err(TrainError::io(entry.path()))?.is_file() {
            out.insert(name, FileChecksum::of(&entry.path()).map_err(TrainError::io(entry.path()))?);
        }
    }
    Ok(out)
}

/// Checks each file of `checkpoint` against `expected`; the first that differs (or is missing)
/// is an error naming it and `previous`, the checkpoint to go back to.
pub(super) fn verify(
    checkpoint: &Path,
    expected: &BTreeMap<String, FileChecksum>,
    previous: Option<PathBuf>,
) -> Result<()> {
    for (name, want) in expected {
        let path = checkpoint.join(name);
        let problem = match FileChecksum::of(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing".to_string(),
            Err(e) => return Err(TrainError::io(path)(e)),
            Ok(got) if got.bytes != want.bytes => format!("{} bytes, {} when it was written", got.bytes, want.bytes),
            Ok(got) if got.crc32 != want.crc32 => {
                format!("CRC-32 {}, {} when it was written", got.crc32, want.crc32)
            }
            Ok(_) => continue,
        };
        return Err(TrainError::CheckpointDamaged { file: path, problem, previous });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32 of a known string (zlib's `crc32(b"123456789") == 0xcbf43926`), read in blocks.
    #[test]
    fn crc32_is_the_standard_one() {
        let d = std::env::temp_dir().join(format!("ranger-crc-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"123456789").unwrap();
        assert_eq!(FileChecksum::of(&d.join("f")).unwrap(), FileChecksum { bytes: 9, crc32: "cbf43926".into() });
        std::fs::remove_dir_all(&d).unwrap();
    }
}
