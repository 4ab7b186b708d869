//! Which options a `--resume` may change. Every other option must equal the checkpoint's for
//! the resumed run to be the run that was interrupted, so the check is derived from the
//! serialized config: a new field is checked unless it is declared here.

use std::fmt;

use serde_json::{Map, Value};

use super::TrainConfig;

/// Options that may differ between a checkpoint and the run resuming from it: where things go,
/// how often the run reports, evaluates and saves, the device and the optimizer kernel (the same
/// update, computed elsewhere or otherwise), and activation checkpointing (it trades memory for
/// time; the gradients are the same bit for bit). Each is a field name.
pub const MAY_CHANGE_ON_RESUME: &[&str] = &[
    "revision",
    "output",
    "eval_every",
    "eval_batches",
    "save_every",
    "save_total_limit",
    "early_stopping_patience",
    "log_every",
    "device",
    "optimizer_kernel",
    "on_nan",
    "eval_weights",
    "max_shard_size",
    "resume",
    "gradient_checkpointing",
];

/// An option whose value in a checkpoint differs from the resuming run's.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeMismatch {
    /// The option (field and TOML key).
    pub option: String,
    /// Its value in the checkpoint.
    pub saved: Value,
    /// Its value now.
    pub now: Value,
}

impl fmt::Display for ResumeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {} in the checkpoint but {} now", self.option, self.saved, self.now)
    }
}

impl TrainConfig {
    /// The options a resume must keep, as a JSON object: the serialized config less
    /// [`MAY_CHANGE_ON_RESUME`].
    pub fn resume_key(&self) -> Value {
        let Value::Object(mut key) = serde_json::to_value(self).expect("a TrainConfig serializes") else {
            unreachable!("a struct serializes as an object")
        };
        for option in MAY_CHANGE_ON_RESUME {
            key.remove(*option);
        }
        Value::Object(key)
    }

    /// Each option a resume must keep whose value differs between `saved` (the checkpoint's
    /// config) and `self` (the resuming run's), in field-name order; empty when the resume may
    /// go on.
    pub fn resume_mismatches(&self, saved: &TrainConfig) -> Vec<ResumeMismatch> {
        let (Value::Object(now), Value::Object(saved)) = (self.resume_key(), saved.resume_key()) else {
            unreachable!("resume keys are objects")
        };
        let value = |map: &Map<String, Value>, k: &str| map.get(k).cloned().unwrap_or(Value::Null);
        let mut options: Vec<&String> = now.keys().chain(saved.keys()).collect();
        options.sort();
        options.dedup();
        options
            .into_iter()
            .filter_map(|option| {
                let (was, is) = (value(&saved, option), value(&now, option));
                (was != is).then(|| ResumeMismatch { option: option.clone(), saved: was, now: is })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        BestMetric, DTypeArg, EvalWeights, NanPolicy, OptimizerKernel, OptimizerKind, QuantizeArg, ScheduleKind,
        TaskKind,
    };

    /// Every field with a value other than its default. Written without `..`, so that a new
    /// field must be added here and is then covered by the test below.
    fn all_changed() -> TrainConfig {
        TrainConfig {
            task: TaskKind::Classify,
            model: "other-model".into(),
            revision: Some("v2".into()),
            data: "other.jsonl".into(),
            validation_file: Some("val.jsonl".into()),
            val_split: 0.25,
            max_seq_length: 64,
            pack: true,
            mask_prompt: false,
            chat_template: Some("chat.jinja".into()),
            text_column: "sentence".into(),
            text_pair_column: Some("hypothesis".into()),
            label_column: "y".into(),
            labels: Some(vec!["a".into(), "b".into()]),
            optimizer: OptimizerKind::Adamw,
            learning_rate: Some(0.1),
            weight_decay: 0.01,
            beta1: Some(0.8),
            beta2: Some(0.99),
            eps: Some(1e-6),
            lookahead_k: 5,
            lookahead_alpha: 0.6,
            centralize: false,
            master_weights: false,
            max_grad_norm: 2.0,
            lr_scheduler: ScheduleKind::FlatCosine,
            warmup_steps: Some(3),
            warmup_ratio: 0.1,
            min_lr_ratio: 0.1,
            flat_fraction: 0.5,
            batch_size: 2,
            grad_accumulation_steps: 3,
            gradient_checkpointing: true,
            optimizer_state_bits: 8,
            optimizer_kernel: OptimizerKernel::TensorOps,
            epochs: 2,
            max_steps: Some(10),
            seed: 7,
            on_nan: NanPolicy::Skip,
            log_every: 5,
            eval_every: 4,
            eval_batches: Some(2),
            metric_for_best: BestMetric::F1,
            early_stopping_patience: Some(3),
            eval_weights: EvalWeights::Fast,
            output: "elsewhere".into(),
            save_every: 10,
            save_total_limit: 5,
            max_shard_size: 1000,
            resume: Some("elsewhere/checkpoint-4".into()),
            device: "cpu".into(),
            dtype: DTypeArg::Bf16,
            lora: true,
            lora_rank: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            dora: true,
            rslora: true,
            lora_targets: vec!["q_proj".into()],
            modules_to_save: vec!["lm_head".into()],
            lora_adapter: Some("adapter".into()),
            dequantize: true,
            quantize: Some(QuantizeArg::Q8_0),
        }
    }

    fn fields() -> Map<String, Value> {
        match serde_json::to_value(TrainConfig::default()).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_option_that_may_change_is_a_field() {
        let fields = fields();
        for option in MAY_CHANGE_ON_RESUME {
            assert!(fields.contains_key(*option), "{option} is not an option of TrainConfig");
        }
    }

    #[test]
    fn each_other_option_is_checked_and_the_declared_ones_are_not() {
        let base = TrainConfig::default();
        let (Value::Object(base_json), Value::Object(changed)) =
            (serde_json::to_value(&base).unwrap(), serde_json::to_value(all_changed()).unwrap())
        else {
            unreachable!()
        };
        for (option, value) in &changed {
            assert_ne!(&base_json[option], value, "all_changed() must change {option}");
            let mut json = base_json.clone();
            json.insert(option.clone(), value.clone());
            let now: TrainConfig = serde_json::from_value(Value::Object(json)).unwrap();
            let found = now.resume_mismatches(&base);
            if MAY_CHANGE_ON_RESUME.contains(&option.as_str()) {
                assert!(found.is_empty(), "{option} may change on resume, yet {found:?}");
            } else {
                assert_eq!(found.len(), 1, "changing {option} gave {found:?}");
                assert_eq!((&found[0].option, &found[0].saved, &found[0].now), (option, &base_json[option], value));
            }
        }
        assert_eq!(base.resume_mismatches(&base), []);
    }

    #[test]
    fn a_mismatch_names_the_option_and_both_values() {
        let saved = TrainConfig { learning_rate: Some(0.01), ..TrainConfig::default() };
        let now = TrainConfig { learning_rate: Some(0.02), lora: true, output: "x".into(), ..TrainConfig::default() };
        let found: Vec<String> = now.resume_mismatches(&saved).iter().map(|m| m.to_string()).collect();
        assert_eq!(
            found,
            ["learning_rate is 0.01 in the checkpoint but 0.02 now", "lora is false in the checkpoint but true now"]
        );
    }
}
