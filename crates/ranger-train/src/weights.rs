//! Weights in Hugging Face safetensors form: loading (single file or sharded), checking
//! against the model's expected names and shapes, and atomic saving (sharded above a size).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_ranger::state_file::{sync_parent, tmp_path};
use candle_ranger::StateView;

use crate::error::{Result, TrainError};

/// The largest safetensors shard written by default (5 GB, `transformers`' default
/// `max_shard_size`): larger checkpoints are split into shards listed by an index.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// The safetensors files of the checkpoint in `dir`: `model.safetensors`, or the shards listed
/// by `model.safetensors.index.json`.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(TrainError::io(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Config { origin: index.display().to_string(), message: e.to_string() })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| TrainError::Config {
            origin: index.display().to_string(),
            message: "no weight_map".into(),
        })?;
        let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        names.sort();
        names.dedup();
        Ok(names.into_iter().map(|n| dir.join(n)).collect())
    } else if dir.join("model.safetensors").exists() {
        Ok(vec![dir.join("model.safetensors")])
    } else if dir.join("pytorch_model.bin").exists() {
        Err(TrainError::Format {
            path: dir.to_path_buf(),
            message: "only pytorch_model.bin found; convert it to safetensors first (transformers: save_pretrained(safe_serialization=True))".into(),
        })
    } else {
        Err(TrainError::Format {
            path: dir.to_path_buf(),
            message: "no model.safetensors or model.safetensors.index.json".into(),
        })
    }
}

/// Reads every tensor of the safetensors checkpoint in `dir` (`model.safetensors`, or the shards
/// listed by `model.safetensors.index.json`) onto the CPU.
pub fn load_safetensors_dir(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in checkpoint_files(dir)? {
        let tensors = candle_core::safetensors::load(&f, &Device::Cpu)
            .map_err(|e| TrainError::Format { path: f.clone(), message: e.to_string() })?;
        out.extend(tensors);
    }
    Ok(out)
}

/// Reads the checkpoint in `dir` one tensor at a time (a plain file read each, no memory map,
/// so a tensor's bytes are gone once `each` has dropped it), handing each to `each` with its
/// name: what `each` converts as it goes (quantizing, for QLoRA) never exists whole in memory
/// in its stored dtype.
pub fn stream_safetensors_dir(dir: &Path, mut each: impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    for f in checkpoint_files(dir)? {
        let bad = |message: String| TrainError::Format { path: f.clone(), message };
        let mut file = std::fs::File::open(&f).map_err(TrainError::io(&f))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(TrainError::io(&f))?;
        let header_len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| bad("header too large".into()))?;
        if header_len > 100_000_000 {
            return Err(bad(format!("header of {header_len} bytes")));
        }
        let mut header = vec![0u8; header_len];
        file.read_exact(&mut header).map_err(TrainError::io(&f))?;
        let meta: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
        let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> = meta.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets.0);
        for (name, info) in infos {
            let (start, end) = info.data_offsets;
            let dtype = candle_core::DType::try_from(info.dtype).map_err(|e| bad(format!("{name}: {e}")))?;
            file.seek(SeekFrom::Start((8 + header_len + start) as u64)).map_err(TrainError::io(&f))?;
            let mut bytes = vec![0u8; end - start];
            file.read_exact(&mut bytes).map_err(|e| bad(format!("{name}: {e}")))?;
            each(name, Tensor::from_raw_buffer(&bytes, dtype, &info.shape, &Device::Cpu)?)?;
        }
    }
    Ok(())
}

/// Takes the tensors named by `shapes` out of `weights`, checked and converted to `dtype` on
/// `device`, in the order of `shapes`; a missing tensor or a shape mismatch is an error naming
/// the tensor and `origin`.
pub fn take_weights(
    shapes: Vec<(String, Vec<usize>)>,
    mut weights: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    origin: &str,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, shape) in shapes {
        let t = weights.remove(&name).ok_or_else(|| TrainError::Weights {
            origin: origin.to_string(),
            tensor: name.clone(),
            problem: "missing".into(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(TrainError::Weights {
                origin: origin.to_string(),
                tensor: name,
                problem: format!("shape {:?} in the checkpoint, {:?} expected from config.json", t.dims(), shape),
            });
        }
        out.push((name, t.to_dtype(dtype)?.to_device(device)?));
    }
    Ok(out)
}

/// Named tensors as trainable variables (each a new variable holding the tensor).
pub fn to_vars(tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Var)>> {
    tensors.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect()
}

/// Random tensors for `shapes` (tests and tiny experiments): normal(0, 0.1) matrices, norm
/// weights (named `…norm.weight` / `…LayerNorm.weight`, GPT-2's `ln_*.weight`) around 1, small
/// biases. Deterministic for a seed.
pub fn random_tensors(shapes: Vec<(String, Vec<usize>)>, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let lower = name.to_lowercase();
        let gpt2_norm = ["ln_1.weight", "ln_2.weight", "ln_f.weight"].iter().any(|s| lower.ends_with(s));
        let data: Vec<f32> = if lower.ends_with("norm.weight") || gpt2_norm {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal() as f32).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| 0.05 * rng.normal() as f32).collect()
        } else {
            (0..n).map(|_| 0.02 * rng.normal() as f32 * 5.0).collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?);
    }
    Ok(out)
}

/// Writes `tensors` as Hugging Face safetensors into `dir`: `model.safetensors`, or shards of at
/// most `max_shard_bytes` named `model-00001-of-0000N.safetensors` plus
/// `model.safetensors.index.json`. Each file is written to a temporary name and renamed.
pub fn save_safetensors_dir(dir: &Path, tensors: &[(String, Tensor)], max_shard_bytes: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let total: usize = cpu.iter().map(|(_, t)| size(t)).sum();
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![vec![]];
    let mut current = 0;
    for entry in &cpu {
        if current > 0 && current + size(&entry.1) > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        current += size(&entry.1);
        shards.last_mut().unwrap().push(entry);
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if shards.len() == 1 {
        // The index goes first: loaders prefer it, so a stale one must never outlive the switch.
        let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
        write_safetensors(&dir.join("model.safetensors"), &shards[0], meta)?;
        return Ok(());
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write_safetensors(&dir.join(&file), shard, meta.clone())?;
        for (name, _) in shard.iter().map(|e| (&e.0, &e.1)) {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_atomic(&dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap().as_bytes())?;
    let _ = std::fs::remove_file(dir.join("model.safetensors"));
    Ok(())
}

/// Writes `tensors` (moved to the CPU) as one safetensors file, atomically.
pub fn save_safetensors_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let refs: Vec<&(String, Tensor)> = cpu.iter().collect();
    write_safetensors(path, &refs, HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Streams tensors into a temporary file (one tensor's bytes in memory at a time), syncs it and
/// renames it into place; on failure the temporary file is removed and the error says how many
/// bytes the file needed.
fn write_safetensors(path: &Path, tensors: &[&(String, Tensor)], meta: HashMap<String, String>) -> Result<()> {
    // The tensors' bytes and a header of their names and shapes (an estimate of its JSON).
    let needed: u64 =
        tensors.iter().map(|(n, t)| (t.elem_count() * t.dtype().size_in_bytes() + n.len() + 64) as u64).sum();
    let failed =
        |source| TrainError::WriteFailed { target: path.to_path_buf(), file: path.to_path_buf(), needed, source };
    // The optimizer crate's writer: same temporary file, permissions, sync and rename.
    let views: Vec<(String, StateView<'_>)> =
        tensors.iter().map(|(n, t)| (n.clone(), StateView::Tensor((*t).clone()))).collect();
    candle_ranger::state_file::write_atomic(path, &views, meta).map_err(|e| match e {
        candle_ranger::Error::Io { source, .. } => failed(source),
        e => TrainError::Format { path: path.to_path_buf(), message: e.to_string() },
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder, then renames it; on
/// failure the temporary file is removed and the error says how many bytes were needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomic_with(path, bytes.len() as u64, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes into the (buffered, seekable) temporary file;
/// `needed` is the byte count a failure reports.
pub fn write_atomic_with(
    path: &Path,
    needed: u64,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_parent(path);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|source| TrainError::WriteFailed {
        target: path.to_path_buf(),
        file: path.to_path_buf(),
        needed,
        source,
    })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Every file of a saved model folder (safetensors shards, their index, JSON written
    /// atomically) gets the mode a plain `File::create` gives, not a temporary file's 0600.
    #[test]
    fn saved_files_have_the_usual_mode() {
        let dir = std::env::temp_dir().join(format!("ranger-train-modes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let usual = std::fs::File::create(dir.join("plain")).unwrap().metadata().unwrap().permissions().mode();
        std::fs::remove_file(dir.join("plain")).unwrap();
        let t = |n: &str| (n.to_string(), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
        let tensors = vec![t("a.weight"), t("b.weight"), t("c.weight")];
        save_safetensors_dir(&dir.join("sharded"), &tensors, 100).unwrap();
        save_safetensors_dir(&dir.join("single"), &tensors, DEFAULT_MAX_SHARD_BYTES).unwrap();
        save_safetensors_file(&dir.join("single").join("adapter_model.safetensors"), &tensors).unwrap();
        write_atomic(&dir.join("single").join("config.json"), b"{}").unwrap();
        let mut seen = 0;
        for sub in ["sharded", "single"] {
            for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
                let entry = entry.unwrap();
                let mode = entry.metadata().unwrap().permissions().mode();
                assert_eq!(mode & 0o777, usual & 0o777, "{}", entry.path().display());
                seen += 1;
            }
        }
        assert_eq!(seen, 7, "3 shards + index, model + adapter + config");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
