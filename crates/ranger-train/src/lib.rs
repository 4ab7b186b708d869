//! # ranger-train
//!
//! The training engine behind `ranger-tune`: trainable Llama-family causal LMs and BERT-family
//! / Llama-family sequence classifiers (fused CPU kernels and differentiable ops, gradient-checked),
//! LoRA in PEFT's format, Hugging Face / GGUF loading, JSONL / CSV data with chat templates and
//! packing, a trainer with exact resume, and Hugging Face-format output.

#![warn(missing_docs)]

#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod build;
pub mod classify;
pub mod config;
pub mod convert;
pub mod data;
pub mod error;
pub mod folder_write;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod held_out;
pub mod hub;
pub mod kernels;
pub mod loaded;
pub mod merge;
pub mod model;
pub mod optim;
pub mod output;
pub mod peft;
pub mod predict;
pub mod rng;
pub mod source;
pub mod task;
pub mod testing;
pub mod tokenizer;
pub mod trainer;
pub mod weights;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use trainer::{prepare, RunSummary, StopReason, TrainObserver, Trainer};
