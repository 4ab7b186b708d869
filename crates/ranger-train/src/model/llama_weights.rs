//! A Llama-family checkpoint's weights taken for a model: checked against the configuration and
//! converted, or random ones for tests.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use crate::error::Result;
use crate::weights::{random_tensors, take_weights};

/// Converts loaded weights to `dtype` on `device` in the model's order, checking that every
/// tensor the model needs is there with the right shape. Unknown extra tensors are ignored
/// (e.g. a redundant `lm_head.weight` of a tied checkpoint).
pub fn into_tensors(
    config: &LlamaConfig,
    weights: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    origin: &str,
) -> Result<Vec<(String, Tensor)>> {
    take_weights(config.weight_shapes(), weights, dtype, device, origin)
}

/// Random weights for a configuration, as [`random_tensors`] makes them; Gemma's norm weights
/// (stored as offsets from 1) are shifted to lie around 0 as its checkpoints' do, so every norm
/// scales by about 1.
pub fn random_weights(config: &LlamaConfig, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut weights = random_tensors(config.weight_shapes(), seed, dtype)?;
    if config.norm_offset {
        for (name, t) in weights.iter_mut() {
            if name.ends_with("norm.weight") {
                *t = (&*t - 1.0)?;
            }
        }
    }
    Ok(weights)
}
