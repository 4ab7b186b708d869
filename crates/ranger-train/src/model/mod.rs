//! Trainable models: the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3, SmolLM3) as causal
//! LMs or classifiers, and BERT-family encoders (BERT, MiniLM, RoBERTa, DistilBERT) as
//! classifiers. Each idea has its own file; this one only declares and re-exports them.

pub mod any_config;
pub mod attach;
pub mod batch;
pub mod bert;
pub mod classifier;
pub mod config;
pub mod hf_layout;
pub mod linear;
pub mod llama;
pub mod llama_names;
pub mod llama_weights;
pub mod lora;
pub mod loss;

pub use any_config::ModelConfig;
pub use attach::attach_lora;
pub use batch::{causal_mask, Batch};
pub use bert::{Encoder, EncoderConfig, EncoderFamily};
pub use classifier::{BackboneConfig, ClassifierBatch, MaskKind, SequenceClassifier};
pub use config::{Activation, Architecture, LlamaConfig, RopeScaling};
pub use linear::Proj;
pub use llama::{mean_loss, KvCache, LlamaModel};
pub use llama_weights::{into_tensors, random_weights};
pub use lora::{peft_magnitude_name, peft_name, DropoutSeed, LoraAdapter, LoraConfig};
pub use loss::causal_lm_loss_sum;
