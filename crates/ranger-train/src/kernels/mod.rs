//! Kernels: the bottom layer, below the models. One module per op, each with
//!
//! - the function models call (`rms_norm`, `linear`, ...), which takes the fused CPU kernel for
//!   contiguous CPU f32/f64 tensors and the portable op-by-op version (named `*_ops` where it is
//!   ours) on CUDA, Metal, in half precision, or under [`without_fused_kernels`];
//! - the fused CPU op (a `FusedOp1/2/3`, which [`Fused`] makes a Candle `CustomOp`): a forward
//!   kernel and a backward pass that keeps fewer intermediates alive than the op-by-op version,
//!   with the tensors' shapes in a comment over each kernel.
//!
//! Candle's own fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rotary_emb` kernels have
//! no backward pass: a model using them trains with missing or wrong gradients and no error.
//! The portable versions here are written with tensor ops that all have one, and compute in f32
//! (or f64) whatever the model dtype, as the Hugging Face implementations do; the tests check
//! that both paths agree.
//!
//! Shared pieces: `cpu_op` (the one Candle op impl per arity and its dtype dispatch), `float`
//! (the element types), `dtype` (typed slices of a storage), `gemm`
//! (matrix products), `exp` (vectorised `exp`), [`grad_sink`] (weight gradients accumulated
//! in place) and `path` (which path an op takes).

pub mod activations;
pub mod attention;
pub mod chunked_attention;
pub mod chunked_lm_loss;
mod cpu_op;
pub mod cross_entropy;
mod dtype;
pub mod embedding;
mod exp;
pub(crate) mod float;
mod frozen_matmul;
mod gemm;
pub mod grad_sink;
pub mod linear;
pub mod lm_head;
pub mod norms;
mod path;
pub mod rotary;
pub mod softmax;
#[cfg(test)]
mod tests;

pub use cpu_op::Fused;
pub use dtype::compute_dtype;
pub(crate) use path::fused_ok;
pub use path::without_fused_kernels;
