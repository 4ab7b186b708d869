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
//! On CUDA, Metal and in half precision the models use only the `*_ops` versions and three
//! device-generic ops of ours that run Candle's own kernels: `frozen_matmul` (a frozen
//! weight gets no gradient), [`chunked_attention`] and [`chunked_lm_loss`] (scores and logits
//! never whole, gradients recomputed or computed per chunk).
//!
//! ## Ops on the device path, and where Candle 0.11.1 implements them
//!
//! Read from the sources of candle-core, candle-kernels and candle-metal-kernels 0.11.1 (not
//! run on a GPU by this project). "all" = f32, bf16 and f16 on both CUDA and Metal.
//!
//! | op (forward and the ops its backward uses) | CUDA | Metal |
//! |---|---|---|
//! | matmul, operands row-major or exactly transposed (`x.matmul(&w.t())`); backward the same | all (cuBLAS) | all |
//! | add, sub, mul, div (broadcast), maximum | all | all |
//! | exp, log, sqrt, sqr, neg, silu, gelu_erf (+ erf), tanh, sin, cos | all | all |
//! | affine (`x * a + b`, scalar ops) | all (the scalar rounded to bf16/f16) | all (computed in f32) |
//! | sum_keepdim, sum_all, mean, max_keepdim | all (bf16 sums in f32) | all (sums in the dtype) |
//! | eq, ne, lt, le (float or u32 inputs) -> u8; where_cond (u8 condition; float or u32 values) | all | all |
//! | to_dtype f32 <-> bf16 / f16, u8 -> float | all | all |
//! | index_select (embedding; backward index_add), gather (classifier loss; backward scatter_add) | all, contiguous source and ids | all, contiguous source and ids |
//! | cat, stack, contiguous copy, narrow, transpose, reshape, broadcast_as; arange, zeros, full | all | all |
//! | to_vec1 (the step's one read) | all | all |
//!
//! Limits that shape the code: Metal has no f64 at all (f64 variables are refused there, and
//! scalars come back as f32); CUDA bf16 kernels need sm_80+ (Ampere); Metal bf16 needs macOS 14
//! (Metal 3.1); matmul operands must be row-major or exactly transposed (the `[CLS]` row is made
//! contiguous); Metal `recip` needs a contiguous input (we divide instead).
//! `tools/device_path_audit.py` checks that the training step reads back from the device once
//! and uses no f64 on a device.
//!
//! Shared pieces: `cpu_op` (the one Candle op impl per arity and its dtype dispatch), `float`
//! (the element types), `dtype` (typed slices of a storage), `gemm`
//! (matrix products), `exp` (vectorised `exp`), [`grad_sink`] (weight gradients accumulated
//! in place), `path` (which path an op takes), [`checkpoint`] (a layer recomputed in
//! backward instead of keeping its activations, on any device) and [`quantized`] (frozen
//! weights kept in GGUF blocks, dequantized a chunk of rows at a time: QLoRA's base).

pub mod activations;
pub mod attention;
pub mod checkpoint;
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
pub mod lora_linear;
pub mod norms;
mod path;
mod precomputed;
pub mod quantized;
pub mod quantized_lm_head;
pub mod rotary;
pub mod softmax;
#[cfg(test)]
mod tests;
pub mod weight;

pub use cpu_op::Fused;
pub use dtype::compute_dtype;
pub(crate) use path::fused_ok;
pub use path::without_fused_kernels;
