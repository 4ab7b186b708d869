//! The choices among fixed values in [`TrainConfig`](super::TrainConfig). Each enum is both a
//! flag's value set and a TOML value (same kebab-case names), and its `#[default]` is the
//! option's default.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// RAdam + Lookahead + gradient centralization.
    #[default]
    Ranger,
    /// Plain RAdam (torch semantics).
    Radam,
    /// AdamW (`torch.optim.AdamW`'s update; fused on the CPU, f32 state, resumable).
    Adamw,
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Cosine to `min_lr_ratio * lr`.
    #[default]
    Cosine,
    /// Linear to `min_lr_ratio * lr`.
    Linear,
    /// Constant.
    Constant,
    /// Flat for `flat_fraction` of the steps, then cosine.
    FlatCosine,
}

/// What a NaN/Inf training loss does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NanPolicy {
    /// Stop with an error, keeping the last good checkpoint.
    #[default]
    Stop,
    /// Skip the batch and go on.
    Skip,
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Next-token prediction (a causal LM).
    #[default]
    CausalLm,
    /// Sequence classification (BERT, RoBERTa, DistilBERT, or a Llama-family model pooled at
    /// its last token).
    Classify,
}

/// The evaluation figure that decides the best model and early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BestMetric {
    /// Evaluation loss (lower is better).
    #[default]
    Loss,
    /// Accuracy (classification).
    Accuracy,
    /// Macro-F1 (classification).
    F1,
}

/// Which weights evaluation and the saved model use when the optimizer has Lookahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EvalWeights {
    /// The Lookahead slow weights (recommended by the paper).
    #[default]
    Slow,
    /// The fast weights.
    Fast,
}

/// Which implementation runs the optimizer step (`--optimizer-kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKernel {
    /// The fused kernel on the CPU and on CUDA, tensor ops on Metal.
    #[default]
    Auto,
    /// The fused kernel: on the CPU, on CUDA, and on Metal (not yet run on a Mac); one kernel
    /// per tensor, f32 state only on a GPU.
    Fused,
    /// Candle tensor ops, on every device.
    TensorOps,
}

impl OptimizerKernel {
    /// As candle-ranger's update path.
    pub fn update_path(self) -> candle_ranger::UpdatePath {
        match self {
            Self::Auto => candle_ranger::UpdatePath::Auto,
            Self::Fused => candle_ranger::UpdatePath::Fused,
            Self::TensorOps => candle_ranger::UpdatePath::Portable,
        }
    }
}

/// Training dtype of the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DTypeArg {
    /// f32.
    #[default]
    F32,
    /// bf16 (optimizer state stays f32).
    Bf16,
    /// f16 (optimizer state stays f32).
    F16,
}

impl DTypeArg {
    /// As a Candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

/// A GGUF block format a safetensors base is quantized to on load (`--quantize`, QLoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
pub enum QuantizeArg {
    /// 4.5 bits per weight: 32-value blocks with an f16 scale.
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    /// 4.5 bits per weight: 256-value super-blocks with 6-bit sub-block scales and minimums.
    #[value(name = "q4_k")]
    #[serde(rename = "q4_k")]
    Q4K,
    /// 5.5 bits per weight (k-quant).
    #[value(name = "q5_k")]
    #[serde(rename = "q5_k")]
    Q5K,
    /// 6.6 bits per weight (k-quant).
    #[value(name = "q6_k")]
    #[serde(rename = "q6_k")]
    Q6K,
    /// 8.5 bits per weight: 32-value blocks with an f16 scale.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl QuantizeArg {
    /// As Candle's GGUF block format.
    pub fn format(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

/// The block format of the matrices of a GGUF file written by `merge --gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GgufTypeArg {
    /// f32 (no quantization).
    #[value(name = "f32")]
    F32,
    /// f16.
    #[value(name = "f16")]
    F16,
    /// 8.5 bits per weight: 32-value blocks with an f16 scale.
    #[value(name = "q8_0")]
    Q8_0,
    /// 6.6 bits per weight (k-quant).
    #[value(name = "q6_k")]
    Q6K,
    /// 5.5 bits per weight (k-quant).
    #[value(name = "q5_k")]
    Q5K,
    /// 4.5 bits per weight: 256-value super-blocks (k-quant).
    #[value(name = "q4_k")]
    Q4K,
    /// 4.5 bits per weight: 32-value blocks with an f16 scale.
    #[value(name = "q4_0")]
    Q4_0,
}

impl GgufTypeArg {
    /// As Candle's GGUF block format.
    pub fn format(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// The name on the command line (`q4_k`), as in a file name.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q6K => "q6_k",
            Self::Q5K => "q5_k",
            Self::Q4K => "q4_k",
            Self::Q4_0 => "q4_0",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags and TOML files spell every value the same way, as they always have.
    #[test]
    fn flag_and_toml_names_agree() {
        fn check<T: ValueEnum + Serialize>(names: &[&str]) {
            let flag: Vec<String> =
                T::value_variants().iter().map(|v| v.to_possible_value().unwrap().get_name().to_string()).collect();
            let toml: Vec<String> =
                T::value_variants().iter().map(|v| serde_json::to_value(v).unwrap().as_str().unwrap().into()).collect();
            assert_eq!(flag, names);
            assert_eq!(toml, names);
        }
        check::<OptimizerKind>(&["ranger", "radam", "adamw"]);
        check::<ScheduleKind>(&["cosine", "linear", "constant", "flat-cosine"]);
        check::<NanPolicy>(&["stop", "skip"]);
        check::<TaskKind>(&["causal-lm", "classify"]);
        check::<BestMetric>(&["loss", "accuracy", "f1"]);
        check::<EvalWeights>(&["slow", "fast"]);
        check::<OptimizerKernel>(&["auto", "fused", "tensor-ops"]);
        check::<DTypeArg>(&["f32", "bf16", "f16"]);
        check::<QuantizeArg>(&["q4_0", "q4_k", "q5_k", "q6_k", "q8_0"]);
    }
}
