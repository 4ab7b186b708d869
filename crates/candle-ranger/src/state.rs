//! Optimizer state as data ([`OptimizerState`]), and as a file on top of it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::state_file::{self, StateView, STATE_FORMAT};

/// The dtype optimizer state (moments, slow weights) is kept in for a parameter dtype: f64 for
/// f64 parameters, f32 otherwise (so bf16/f16 parameters don't lose small updates).
pub(crate) fn state_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The whole state of a [`crate::Ranger`] or [`crate::RAdam`]: named tensors and a few
/// scalars. [`crate::Ranger::state_tensors`] gives it, [`crate::Ranger::load_state_tensors`]
/// takes it back; [`OptimizerState::save`] and [`OptimizerState::load`] write and read it as
/// one safetensors file.
///
/// Tensors are named `<var>.exp_avg`, `<var>.exp_avg_sq`, `<var>.slow` (with Lookahead),
/// `<var>.master` (the f32 master copy of a bf16/f16 variable, once it has stepped) and
/// `<var>.step` (an i64 of shape `[1]`), variable by variable. Host state is borrowed, not
/// copied (so saving the state of a large model does not double its memory):
/// [`StateView::to_tensor`] makes a Candle tensor of an entry.
#[derive(Debug)]
pub struct OptimizerState<'a> {
    /// The named tensors, on the CPU.
    pub tensors: Vec<(String, StateView<'a>)>,
    /// The learning rate; `None` (a file without one) leaves the optimizer's own when loading.
    pub lr: Option<f64>,
    /// Steps skipped because of non-finite gradients.
    pub skipped_steps: u64,
    /// The hyperparameters as `key=value;…` (informational: loading does not check them).
    pub hyperparameters: String,
}

impl OptimizerState<'_> {
    /// Writes the state to one safetensors file, atomically; the scalars go in its metadata.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut metadata = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("optimizer".to_string(), "Ranger".to_string()),
            ("hyperparameters".to_string(), self.hyperparameters.clone()),
            ("skipped_steps".to_string(), self.skipped_steps.to_string()),
        ]);
        if let Some(lr) = self.lr {
            metadata.insert("lr".to_string(), format!("{lr:e}"));
        }
        state_file::write_atomic(path.as_ref(), &self.tensors, metadata)
    }

    /// Reads a state file written by [`OptimizerState::save`] (or `save_state`), checking only
    /// that it is one; the optimizer checks that it fits when it loads it.
    pub fn load(path: impl AsRef<Path>) -> Result<OptimizerState<'static>> {
        let path = path.as_ref();
        let (tensors, meta) = state_file::read(path)?;
        let format_err = |message: String| Error::StateFormat { path: path.to_path_buf(), message };
        if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(format_err(format!("not a candle-ranger state file (format {:?})", meta.get("format"))));
        }
        let lr = match meta.get("lr") {
            Some(s) => Some(s.parse::<f64>().map_err(|_| format_err(format!("bad lr metadata {s:?}")))?),
            None => None,
        };
        let mut tensors: Vec<(String, StateView<'static>)> =
            tensors.into_iter().map(|(k, t)| (k, StateView::Tensor(t))).collect();
        // Files hold no order; sorted names make the result (and mismatch reports) stable.
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(OptimizerState {
            tensors,
            lr,
            skipped_steps: meta.get("skipped_steps").and_then(|s| s.parse().ok()).unwrap_or(0),
            hyperparameters: meta.get("hyperparameters").cloned().unwrap_or_default(),
        })
    }
}
