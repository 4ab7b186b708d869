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
        check::<DTypeArg>(&["f32", "bf16", "f16"]);
    }
}
