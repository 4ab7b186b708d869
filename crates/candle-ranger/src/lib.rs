//! # candle-ranger
//!
//! The Ranger optimizer for [Candle](https://github.com/huggingface/candle): RAdam (rectified
//! Adam, arXiv 1908.03265) for the fast weights, Lookahead (arXiv 1907.08610) for slow weights,
//! and gradient centralization. Exact (matches `torch.optim.RAdam` + Lookahead step for step),
//! fast (a fused, multithreaded, in-place CPU kernel), and resumable (the whole state, slow
//! weights included, saves to one safetensors file).
//!
//! ## The algorithm
//!
//! For each variable with a gradient, with its own step count `t` starting at 1:
//!
//! ```text
//! g  = grad
//! if centralize(rank(g)):  g -= mean(g over all dims but 0)
//! if L2 decay:             g += wd * p
//! if decoupled decay:      p *= 1 - lr * wd
//! m  = m + (1 - b1) (g - m);   v = b2 v + (1 - b2) g²
//! rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
//! if rho_t > threshold:  p -= lr r_t sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
//! else "sgd" fallback:   p -= lr m / (1 - b1^t)          ("skip" fallback: no update)
//! if t % k == 0:         slow += alpha (p - slow);  p = slow
//! ```
//!
//! The step scalars are computed in f64; the step size can never be negative. Slow weights
//! start as a copy of the weights taken at each variable's first step, never zeros. Optimizer
//! state is f64 for f64 variables and f32 otherwise (so bf16/f16 variables don't lose small
//! updates).
//!
//! ## Example
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{linear, Optimizer, VarBuilder, VarMap};
//! use candle_ranger::{ParamGroup, ParamsRanger, Ranger, Schedule, Decay, named_vars};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let mut varmap = VarMap::new();
//! let model = linear(4, 1, VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("lin"))?;
//! // Candle's CPU random numbers cannot be seeded: fixed weights and inputs make the run the same every time.
//! varmap.set_one("lin.weight", Tensor::zeros((1, 4), DType::F32, &dev)?)?;
//! varmap.set_one("lin.bias", Tensor::zeros(1, DType::F32, &dev)?)?;
//!
//! // Decay matrices, not biases; Ranger 2020 defaults otherwise.
//! let params = ParamsRanger { lr: 1e-2, weight_decay: 1e-2, ..Default::default() };
//! let mut opt = Ranger::with_groups(ParamGroup::split_decay(named_vars(&varmap)), params)?;
//! let schedule = Schedule { base_lr: 1e-1, min_lr: 1e-3, warmup_steps: 10, total_steps: 300, decay: Decay::Cosine };
//!
//! let x = (Tensor::arange(0f32, 256., &dev)?.sqr()? * 0.1)?.sin()?.reshape((64, 4))?;
//! let y = x.matmul(&Tensor::new(&[[1f32], [-1.], [2.], [-2.]], &dev)?)?;
//! let initial = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
//! for step in 0..300 {
//!     schedule.apply(&mut opt, step);
//!     let loss = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?;
//!     opt.backward_step(&loss)?;
//! }
//!
//! // Evaluate on the slow weights, save everything needed to resume.
//! let eval_loss = opt.with_slow_weights(|| -> candle_core::Result<f32> {
//!     model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?.to_scalar::<f32>()
//! })??;
//! assert!(eval_loss < initial / 2.0);
//! let dir = std::env::temp_dir().join(format!("candle-ranger-doc-{}", std::process::id()));
//! opt.save_state(dir.join("optimizer.safetensors"))?;
//! opt.load_state(dir.join("optimizer.safetensors"))?;
//! # std::fs::remove_dir_all(dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Modules
//!
//! - [`Ranger`], [`RAdam`] and [`AdamW`] implement [`candle_nn::Optimizer`] (all three fused on
//!   the CPU, with f32 state and master copies for half-precision variables, and resumable);
//! - [`Lookahead`] wraps any Candle optimizer (e.g. `Lookahead<candle_nn::AdamW>`), sharing
//!   its slow-weight sync and swap with [`Ranger`];
//! - [`OptimizerState`] is the state of [`Ranger`], [`RAdam`] and [`AdamW`] as named tensors
//!   (`state_tensors` / `load_state_tensors`), with `save_state` / `load_state` writing it as
//!   one safetensors file;
//! - [`clip_grad_norm`], [`grad_norm`] and [`non_finite_grads`] work on any `GradStore`;
//!   [`check_grads`] gives the norm, the non-finite verdicts and the loss in one device→host
//!   read, which [`scale_grads_to_norm`] and [`Ranger::step_checked`] use instead of reading again;
//! - [`Schedule`] gives learning-rate schedules for any optimizer.

#![warn(missing_docs)]

// The crate README's example is compiled as a doctest too.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod adamw;
#[cfg(feature = "cuda")]
mod cuda_step;
mod device_support;
mod engine;
mod error;
mod fused;
mod fused_packed;
#[cfg(any(feature = "cuda", feature = "metal"))]
mod gpu_dispatch;
#[cfg(any(feature = "cuda", feature = "metal"))]
mod gpu_step;
mod grad;
mod grad_check;
mod groups;
mod lookahead;
mod lookahead_core;
#[cfg(feature = "metal")]
mod metal_step;
mod packed_tensor;
mod params;
mod portable;
mod portable_packed;
mod radam;
mod ranger;
pub mod scalars;
mod schedule;
mod state;
mod state_codec;
pub mod state_file;

pub use adamw::{AdamW, AdamWOptions};
pub use error::{Error, Result};
pub use grad::{clip_grad_norm, grad_norm, non_finite_grads, scale_grads_to_norm, to_host_f64};
pub use grad_check::{check_grads, GradCheck};
pub use groups::{named_vars, ParamGroup};
pub use lookahead::{Lookahead, LookaheadConfig};
pub use params::{Centralization, NonFiniteGrads, ParamsRanger, RectifyFallback, StatePrecision, UpdatePath};
pub use radam::{ParamsRAdam, RAdam};
pub use ranger::{Ranger, StepReport};
pub use schedule::{Decay, Schedule};
pub use state::OptimizerState;
pub use state_file::StateView;
