//! One model builder for every command: a loaded checkpoint's weights become a ready causal LM
//! or sequence classifier in a dtype on a device, frozen or trainable, with a LoRA adapter
//! (new, or read from a PEFT folder) where asked. `train`, `predict`, `generate`, `merge` and
//! `convert` all build their models here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Result, TrainError};
use crate::kernels::quantized::QuantizedWeight;
use crate::model::classifier::complete_classifier_weights;
use crate::model::{attach_lora, BackboneConfig, DropoutSeed, LlamaConfig, LlamaModel, LoraConfig, SequenceClassifier};
use crate::peft;
use crate::weights::{take_weights, to_vars};

/// What becomes trainable in a built model.
#[derive(Debug, Clone, Copy)]
pub enum Tuning<'a> {
    /// Every weight frozen, no adapter: inference, merging, converting.
    Frozen,
    /// Frozen, with the PEFT LoRA adapter in this folder applied for inference (no dropout;
    /// its saved modules, such as a classifier head, replace the model's).
    WithAdapter(&'a Path),
    /// Every weight a trainable variable: a full fine-tune.
    Full,
    /// LoRA training over a frozen base (see [`LoraTraining`]).
    Lora(LoraTraining<'a>),
}

/// A LoRA training run's adapters.
#[derive(Debug, Clone, Copy)]
pub struct LoraTraining<'a> {
    /// Rank, alpha, targets, dropout, DoRA, rsLoRA of new adapters; the dropout also applies to
    /// adapters read from `adapter`.
    pub lora: &'a LoraConfig,
    /// The seed of new adapters' initialisation.
    pub seed: u64,
    /// Modules trained whole besides the adapters (PEFT's `modules_to_save`); with `adapter`,
    /// the adapter's own list is used instead and this must be empty.
    pub modules_to_save: &'a [String],
    /// Go on training the PEFT adapter in this folder instead of new adapters.
    pub adapter: Option<&'a Path>,
    /// The switch that drives LoRA dropout (set per micro-batch by the trainer).
    pub dropout_seed: &'a DropoutSeed,
}

/// A built model with its trainable variables by name (Hugging Face names for a full
/// fine-tune, PEFT names `base_model.model.…` for LoRA runs; empty when frozen).
pub struct Built<M> {
    /// The model.
    pub model: M,
    /// The trainable variables.
    pub vars: Vec<(String, Var)>,
}

/// Builds models in one dtype on one device with one [`Tuning`].
#[derive(Debug, Clone, Copy)]
pub struct ModelBuilder<'a> {
    /// The dtype of the weights (the adapters' too).
    pub dtype: DType,
    /// Where the weights go.
    pub device: &'a Device,
    /// What becomes trainable.
    pub tuning: Tuning<'a>,
}

impl<'a> ModelBuilder<'a> {
    /// A builder of frozen models (no adapter).
    pub fn frozen(dtype: DType, device: &'a Device) -> Self {
        Self { dtype, device, tuning: Tuning::Frozen }
    }

    /// A causal LM from a checkpoint's `weights` (by Hugging Face name; `origin` names the
    /// checkpoint in errors): every tensor the configuration needs must be there with its
    /// shape; extra ones are ignored.
    pub fn causal_lm(
        &self,
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<Built<LlamaModel>> {
        self.causal_lm_quantized(config, weights, HashMap::new(), origin)
    }

    /// [`ModelBuilder::causal_lm`] with some projection weights in a GGUF block format
    /// (`quantized`, by Hugging Face name): they stay quantized on the device, frozen, and are
    /// dequantized a chunk of rows at a time as the products need them (QLoRA). A full
    /// fine-tune cannot train them: it is an error naming the first one.
    pub fn causal_lm_quantized(
        &self,
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        mut quantized: HashMap<String, QTensor>,
        origin: &str,
    ) -> Result<Built<LlamaModel>> {
        let (shapes, quantized_shapes): (Vec<_>, Vec<_>) =
            config.weight_shapes().into_iter().partition(|(n, _)| !quantized.contains_key(n));
        let mut frozen_blocks = HashMap::new();
        for (name, shape) in quantized_shapes {
            let q = quantized.remove(&name).expect("partitioned on it");
            let problem = if matches!(self.tuning, Tuning::Full) {
                Some("is quantized: a full fine-tune needs the dequantized weights (dequantize on load)".to_string())
            } else if q.shape().dims() != shape.as_slice() {
                Some(format!("shape {:?} in the checkpoint, {:?} expected from the config", q.shape().dims(), shape))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(TrainError::Weights { origin: origin.to_string(), tensor: name, problem });
            }
            frozen_blocks.insert(name, QuantizedWeight::new(q, self.dtype, self.device)?);
        }
        let tensors = take_weights(shapes, weights, self.dtype, self.device, origin)?;
        if let Tuning::Full = self.tuning {
            let vars = to_vars(tensors)?;
            return Ok(Built { model: LlamaModel::from_vars(config, &vars)?, vars });
        }
        // Frozen base: plain tensors, so no gradient is ever computed or stored for them.
        let mut model = LlamaModel::with_quantized(config, &tensors.into_iter().collect(), &frozen_blocks)?;
        let vars = match self.tuning {
            Tuning::Frozen | Tuning::Full => vec![],
            Tuning::WithAdapter(dir) => peft::load_peft_adapter(&mut model, dir, None)?,
            Tuning::Lora(t) => match t.adapter {
                Some(dir) => peft::load_peft_adapter(&mut model, dir, Some((t.lora.dropout, t.dropout_seed)))?,
                None => {
                    let mut vars = peft::train_modules(&mut model, t.modules_to_save)?;
                    vars.extend(model.add_lora(t.lora, t.seed, t.dropout_seed)?);
                    vars
                }
            },
        };
        Ok(Built { model, vars })
    }

    /// A sequence classifier with `num_labels` classes from a checkpoint's `weights`: a
    /// classifier checkpoint, a bare encoder or a causal LM. A missing head is initialised with
    /// `init_seed`, or without one is an error naming the tensor. With an adapter (to apply or
    /// to train further) its saved modules, such as the trained head, replace the checkpoint's.
    /// In LoRA training the head and the `modules_to_save` are trained whole.
    pub fn classifier(
        &self,
        backbone: BackboneConfig,
        num_labels: usize,
        mut weights: HashMap<String, Tensor>,
        init_seed: Option<u64>,
        origin: &str,
    ) -> Result<Built<SequenceClassifier>> {
        let adapter = match self.tuning {
            Tuning::WithAdapter(dir) => Some(dir),
            Tuning::Lora(t) => t.adapter,
            Tuning::Frozen | Tuning::Full => None,
        };
        // Modules trained whole besides the head: the run's, or those the adapter saved.
        let mut modules = match self.tuning {
            Tuning::Lora(t) => t.modules_to_save.to_vec(),
            _ => vec![],
        };
        if let Some(dir) = adapter {
            for (name, t) in peft::load_saved_modules(dir)? {
                weights.insert(name, t);
            }
            modules = peft::read_adapter_config(dir)?.modules_to_save;
        }
        let weights = complete_classifier_weights(&backbone, num_labels, weights, init_seed, origin)?;
        let shapes = backbone.weight_shapes(num_labels);
        if let Tuning::Lora(t) = self.tuning {
            // Only the run's entries must match: PEFT lists both `classifier` and `score` in
            // every SEQ_CLS adapter, and ignores the one a model lacks.
            let unmatched = |m: &&String| !shapes.iter().any(|(n, _)| peft::saves_module(std::slice::from_ref(*m), n));
            if let Some(m) = t.modules_to_save.iter().find(unmatched) {
                return Err(TrainError::UnknownModule { entry: m.clone() });
            }
        }
        let head_names: Vec<String> = backbone.head_shapes(num_labels).into_iter().map(|(n, _)| n).collect();
        let tensors = take_weights(shapes, weights, self.dtype, self.device, origin)?;
        let (map, mut vars) = match self.tuning {
            Tuning::Frozen | Tuning::WithAdapter(_) => (tensors.into_iter().collect(), vec![]),
            Tuning::Full => {
                let vars = to_vars(tensors)?;
                (vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(), vars)
            }
            Tuning::Lora(_) => {
                // Frozen base; the head and the saved modules are trained (PEFT's modules_to_save).
                let mut map: HashMap<String, Tensor> = HashMap::new();
                let mut vars = Vec::new();
                for (name, t) in tensors {
                    if head_names.contains(&name) || peft::saves_module(&modules, &name) {
                        let v = Var::from_tensor(&t)?;
                        map.insert(name.clone(), v.as_tensor().clone());
                        vars.push((format!("base_model.model.{name}"), v));
                    } else {
                        map.insert(name, t);
                    }
                }
                (map, vars)
            }
        };
        let mut model = SequenceClassifier::new(backbone, num_labels, &map)?;
        let (dtype, dev) = (model.dtype(), model.device().clone());
        match self.tuning {
            Tuning::Frozen | Tuning::Full => {}
            Tuning::WithAdapter(dir) => {
                peft::load_lora(model.projections_mut(), dtype, &dev, dir, None)?;
            }
            Tuning::Lora(t) => vars.extend(match t.adapter {
                Some(dir) => {
                    peft::load_lora(model.projections_mut(), dtype, &dev, dir, Some((t.lora.dropout, t.dropout_seed)))?
                }
                None => attach_lora(model.projections_mut(), t.lora, t.seed, dtype, &dev, t.dropout_seed)?,
            }),
        }
        Ok(Built { model, vars })
    }
}
