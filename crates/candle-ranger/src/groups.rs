//! Parameter groups: sets of variables sharing a learning-rate multiplier and weight decay.

use candle_core::Var;
use candle_nn::VarMap;

/// A set of named variables with their own learning-rate multiplier and weight decay.
///
/// ```
/// # use candle_core::{Device, DType, Var};
/// # use candle_ranger::ParamGroup;
/// let w = Var::zeros((4, 3), DType::F32, &Device::Cpu)?;
/// let b = Var::zeros(4, DType::F32, &Device::Cpu)?;
/// // The usual "no decay on biases and norm weights" split:
/// let groups = ParamGroup::split_decay(vec![("w".into(), w), ("b".into(), b)]);
/// assert_eq!(groups[1].weight_decay, Some(0.0));
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// The variables, each with the unique name that keys its saved state.
    pub vars: Vec<(String, Var)>,
    /// Multiplier of the optimizer's learning rate for this group (default 1).
    pub lr_scale: f64,
    /// Weight decay of this group; `None` uses the optimizer's.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group with the optimizer's learning rate and weight decay.
    pub fn new(vars: Vec<(String, Var)>) -> Self {
        Self { vars, lr_scale: 1.0, weight_decay: None }
    }

    /// Sets the learning-rate multiplier.
    pub fn with_lr_scale(mut self, lr_scale: f64) -> Self {
        self.lr_scale = lr_scale;
        self
    }

    /// Sets the group's weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }

    /// Splits variables into `[decayed, not decayed]`: tensors of rank >= 2 (matrices,
    /// convolution kernels, embeddings) get the optimizer's weight decay, vectors and scalars
    /// (biases, norm weights) get none, as the Hugging Face Trainer does by default.
    pub fn split_decay(vars: Vec<(String, Var)>) -> Vec<ParamGroup> {
        let (decay, no_decay): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(_, v)| v.rank() >= 2);
        vec![ParamGroup::new(decay), ParamGroup::new(no_decay).with_weight_decay(0.0)]
    }
}

/// The variables of a `VarMap` with their names, sorted by name (a stable order for state files).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}
