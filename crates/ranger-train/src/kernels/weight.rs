//! A projection's weight as the models hold it: a tensor, or frozen GGUF blocks (QLoRA).

use candle_core::{Result, Tensor};

use super::linear::linear;
use super::quantized::{quantized_linear, QuantizedWeight};

/// A projection's `[out, in]` weight: a tensor (a trainable variable, or frozen), or frozen in
/// a GGUF block format (QLoRA's base).
#[derive(Debug, Clone)]
pub enum Weight {
    /// A tensor.
    Dense(Tensor),
    /// Quantized blocks, dequantized a chunk at a time as the products need them.
    Quantized(QuantizedWeight),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Quantized(q) => Ok(q.dims2()),
        }
    }

    /// The tensor, or the quantized weight dequantized whole (a new tensor).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quantized(q) => q.dequantize(),
        }
    }

    /// The dtype it computes in.
    pub fn dtype(&self) -> candle_core::DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Quantized(q) => q.dtype(),
        }
    }

    /// Its device.
    pub fn device(&self) -> candle_core::Device {
        match self {
            Weight::Dense(t) => t.device().clone(),
            Weight::Quantized(q) => q.device(),
        }
    }

    /// The tensor of a dense weight.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quantized(_) => None,
        }
    }

    /// `x W^T` (see [`linear`] and [`quantized_linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => linear(x, w),
            Weight::Quantized(q) => quantized_linear(x, q),
        }
    }
}
