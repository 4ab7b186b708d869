//! The model a run produces: a Hugging Face folder, or a PEFT adapter for LoRA runs, of the
//! slow or the fast weights.

use std::path::Path;

use candle_core::{DType, Tensor};

use super::Trainer;
use crate::error::Result;
use crate::output::{default_generation_config, save_hf_folder, write_json};
use crate::task::Task;

impl Trainer {
    /// Writes the model the run produces into `dir`: a Hugging Face folder, or a PEFT adapter
    /// for LoRA runs (a classifier's head saved with it).
    pub fn write_model(&self, dir: &Path) -> Result<()> {
        let cfg = &self.session.cfg;
        let weights = self.model_weights()?;
        let tok = &self.session.tokenizer;
        match &self.session.task {
            Task::CausalLm { model, .. } if cfg.lora => {
                let mut weights = weights;
                let tie = crate::peft::trains_tied_embeddings(model, &self.session.vars);
                if tie {
                    // PEFT with ensure_weight_tying saves the shared matrix under both names.
                    let name = format!("base_model.model.{}", model.config.names.embed);
                    let embed = weights.iter().find(|(n, _)| *n == name).map(|(_, t)| t.clone());
                    weights.extend(embed.map(|t| ("base_model.model.lm_head.weight".to_string(), t)));
                }
                let conv1d = model.config.gpt2_layout;
                crate::output::save_peft_adapter(
                    dir,
                    cfg,
                    "CAUSAL_LM",
                    &cfg.modules_to_save,
                    tie,
                    conv1d,
                    &weights,
                    tok,
                )
            }
            Task::Classify { model, labels, .. } if cfg.lora => {
                let mut modules = model.config.head_modules();
                modules
                    .extend(cfg.modules_to_save.iter().filter(|m| !modules.contains(m)).cloned().collect::<Vec<_>>());
                let conv1d = matches!(&model.config, crate::model::BackboneConfig::Decoder(c) if c.gpt2_layout);
                crate::output::save_peft_adapter(dir, cfg, "SEQ_CLS", &modules, false, conv1d, &weights, tok)?;
                // PEFT adapters carry no config.json: the labels go next to the adapter.
                let json = model.config.classifier_json(labels, tok.pad_id, model.dtype());
                write_json(&dir.join(crate::predict::ADAPTER_CLASSIFIER_CONFIG), &json)
            }
            Task::CausalLm { model, .. } => {
                let gen = self
                    .session
                    .generation_config
                    .clone()
                    .unwrap_or_else(|| default_generation_config(&model.config.raw));
                save_hf_folder(dir, &model.config.raw, &weights, tok, Some(&gen), cfg.max_shard_size)
            }
            Task::Classify { model, labels, .. } => {
                let dtype = weights.first().map_or(DType::F32, |(_, t)| t.dtype());
                let json = model.config.classifier_json(labels, tok.pad_id, dtype);
                save_hf_folder(dir, &json, &weights, tok, None, cfg.max_shard_size)
            }
        }
    }

    /// The bytes of the trainable weights: about what the model written takes, and what the
    /// weights of each checkpoint take.
    pub(super) fn weight_bytes(&self) -> u64 {
        self.session.vars.iter().map(|(_, v)| (v.elem_count() * v.dtype().size_in_bytes()) as u64).sum()
    }

    /// The weights to save as the model (slow or fast, see `eval_weights`).
    pub fn model_weights(&self) -> Result<Vec<(String, Tensor)>> {
        if self.weights_label() == "slow" {
            if let Some(w) = self.optimizer.slow_weights()? {
                return Ok(w);
            }
        }
        self.session.vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?))).collect()
    }
}
