//! Reading and writing safetensors files of optimizer state, atomically: the file layer under
//! [`crate::OptimizerState`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};

/// Value of the `format` metadata key of state files written by this crate.
pub const STATE_FORMAT: &str = "candle-ranger-state/1";

/// A tensor of optimizer state: a Candle tensor, or a host buffer borrowed without a copy (so
/// saving the optimizer state of a large model does not double its memory).
#[derive(Debug, Clone)]
pub enum StateView<'a> {
    /// A Candle tensor (copied to bytes one tensor at a time while writing).
    Tensor(Tensor),
    /// Borrowed f32 values with a shape.
    F32(&'a [f32], Vec<usize>),
    /// Borrowed f64 values with a shape.
    F64(&'a [f64], Vec<usize>),
}

impl StateView<'_> {
    /// The shape.
    pub fn dims(&self) -> &[usize] {
        match self {
            StateView::Tensor(t) => t.dims(),
            StateView::F32(_, s) | StateView::F64(_, s) => s,
        }
    }

    /// The Candle dtype.
    pub fn dtype(&self) -> DType {
        match self {
            StateView::Tensor(t) => t.dtype(),
            StateView::F32(..) => DType::F32,
            StateView::F64(..) => DType::F64,
        }
    }

    /// A Candle tensor of the values (a copy of a borrowed buffer, on the CPU).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            StateView::Tensor(t) => Ok(t.clone()),
            StateView::F32(x, s) => Tensor::from_slice(x, s.as_slice(), &Device::Cpu),
            StateView::F64(x, s) => Tensor::from_slice(x, s.as_slice(), &Device::Cpu),
        }
    }
}

/// Plain floats: no padding, every bit pattern valid, so they can be viewed as bytes.
trait PlainFloat: Copy {}
impl PlainFloat for f32 {}
impl PlainFloat for f64 {}

fn le_bytes<T: PlainFloat, const N: usize>(xs: &[T], to_le: fn(T) -> [u8; N]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: plain-old-data floats viewed as bytes, in the file's (little-endian) order.
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) })
    } else {
        Cow::Owned(xs.iter().flat_map(|&x| to_le(x)).collect())
    }
}

impl View for &StateView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            StateView::Tensor(t) => View::dtype(t),
            StateView::F32(..) => Dtype::F32,
            StateView::F64(..) => Dtype::F64,
        }
    }
    fn shape(&self) -> &[usize] {
        self.dims()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            // Candle converts tensors to bytes by copying anyway.
            StateView::Tensor(t) => Cow::Owned(View::data(t).into_owned()),
            StateView::F32(x, _) => le_bytes(x, f32::to_le_bytes),
            StateView::F64(x, _) => le_bytes(x, f64::to_le_bytes),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            StateView::Tensor(t) => View::data_len(t),
            StateView::F32(x, _) => x.len() * 4,
            StateView::F64(x, _) => x.len() * 8,
        }
    }
}

/// Writes `tensors` and `metadata` to `path`, streaming tensor by tensor into a temporary file
/// that is synced and then renamed into place, so a crash never leaves a half-written file
/// where a good one was. The file gets the permissions `std::fs::File::create` gives (0666
/// less the umask on Unix).
pub fn write_atomic(path: &Path, tensors: &[(String, StateView<'_>)], metadata: HashMap<String, String>) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = tmp_path(path);
    let views: Vec<(&str, &StateView<'_>)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    // safetensors writes through a temporary file of its own, created 0600, and renames it
    // over `tmp`: the permissions of a plain `File::create` are taken first and put back after.
    let result = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .map_err(io)
        .and_then(|created| {
            // An I/O error stays one (a full disk is told apart from a malformed state).
            safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| match e {
                safetensors::SafeTensorError::IoError(source) => io(source),
                e => Error::StateFormat { path: path.to_path_buf(), message: format!("cannot write: {e}") },
            })?;
            std::fs::set_permissions(&tmp, created.permissions()).map_err(io)
        })
        .and_then(|()| {
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
            sync_parent(path);
            Ok(())
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A temporary name next to `path`, unique per process and per call.
pub fn tmp_path(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    path.with_file_name(name)
}

/// Makes a rename durable (best effort: not every platform can sync a folder).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Reads every tensor (onto the CPU) and the metadata of a safetensors file.
pub fn read(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    use candle_core::safetensors::Load;
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let bad = |message: String| Error::StateFormat { path: path.to_path_buf(), message };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view.load(&Device::Cpu).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, t);
    }
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}
