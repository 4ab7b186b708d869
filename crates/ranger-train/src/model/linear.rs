//! The linear projection every model is made of: `x W^T + b`, with an optional LoRA adapter.

use candle_core::{Module, Result, Tensor};

use super::lora::LoraAdapter;
use crate::kernels::weight::Weight;

/// A linear projection `x W^T + b` (weights trainable [`candle_core::Var`]s, frozen tensors, or
/// frozen quantized blocks), with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Proj {
    /// `[out, in]` weight.
    pub weight: Weight,
    /// Optional `[out]` bias.
    pub bias: Option<Tensor>,
    /// Optional low-rank adapter.
    pub lora: Option<LoraAdapter>,
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One [tokens, in] x [in, out] product: a batched `broadcast_matmul` would compute the
        // weight gradient as one product per batch row plus a reduction over a [b, in, out]
        // temporary.
        if x.rank() == 2 {
            return self.forward_rows(x);
        }
        let dims = x.dims();
        let inp = *dims.last().unwrap_or(&1);
        let y = self.forward_rows(&x.reshape(((), inp))?)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = y.dim(1)?;
        y.reshape(out_dims)
    }
}

impl Proj {
    /// The projection of token rows `x: [n, in]` to `[n, out]`.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.lora {
            Some(l) => l.project(x, &self.weight)?,
            None => self.weight.forward(x)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// A projection over a weight tensor, without an adapter.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::Dense(weight), bias, lora: None }
    }

    /// Every tensor it computes with: weight (unless quantized), bias, and the adapter's
    /// matrices and magnitude.
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = self.weight.as_dense().into_iter().cloned().collect();
        out.extend(self.bias.iter().cloned());
        if let Some(l) = &self.lora {
            out.extend([l.a.clone(), l.b.clone()]);
            out.extend(l.magnitude.iter().cloned());
        }
        out
    }

    /// The weight with the LoRA/DoRA adapter merged in (see [`LoraAdapter::merge`]); a
    /// quantized weight is dequantized.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => self.weight.dense(),
            Some(l) => l.merge(&self.weight.dense()?),
        }
    }
}
