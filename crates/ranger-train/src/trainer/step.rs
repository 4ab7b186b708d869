//! One optimizer step: gradients accumulated over the micro-batches, the NaN policy, the
//! missing-gradient check, clipping and the update; and the learning-rate schedule.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_ranger::{check_grads, scale_grads_to_norm};

use super::records::SkipRecord;
use super::Trainer;
use crate::config::NanPolicy;
use crate::error::{Result, TrainError};
use crate::kernels::grad_sink::GradSink;
use crate::model::lora::mix_seed;

/// Key biases get an exactly zero gradient (softmax is shift-invariant per query), so the
/// missing-gradient check exempts them.
fn is_key_bias(name: &str) -> bool {
    name.ends_with("k_proj.bias") || name.ends_with("attention.self.key.bias") || name.ends_with("attention.k_lin.bias")
}

/// What one optimizer step did.
pub(super) struct StepOutcome {
    /// Mean loss of the step's micro-batches.
    pub(super) loss: f64,
    /// Gradient norm before clipping (NaN when the batch was skipped).
    pub(super) grad_norm: f64,
    /// Non-padding tokens of the step.
    pub(super) tokens: usize,
    /// Set when the update was skipped.
    pub(super) skipped: Option<SkipRecord>,
}

impl Trainer {
    /// One optimizer step at learning rate `lr` on the next micro-batches. A non-finite loss
    /// stops the run (`on_nan = stop`, a [`TrainError::NonFiniteLoss`]) or skips the batch; the
    /// first step that has a finite loss checks every trainable tensor got a gradient when
    /// `check_gradients` is set (and clears it).
    pub(super) fn optimizer_step(&mut self, lr: f64, check_gradients: &mut bool) -> Result<StepOutcome> {
        self.optimizer.set_lr(lr);
        let (mut grads, losses, targets, tokens) = self.step_gradients(self.state.micro_step)?;
        let vars: Vec<Var> = self.session.vars.iter().map(|(_, v)| v.clone()).collect();
        // The step's one device→host read: grad norm, finite verdicts and the loss together.
        let check = check_grads(&grads, &vars, &losses)?;
        let loss = check.extras.iter().sum::<f64>() / targets as f64;
        let step = self.state.step + 1;
        if !loss.is_finite() {
            return match self.session.cfg.on_nan {
                NanPolicy::Stop => Err(TrainError::NonFiniteLoss { step, loss }),
                // The batch is skipped, but the step is bookkept like any other.
                NanPolicy::Skip => Ok(StepOutcome {
                    loss,
                    grad_norm: f64::NAN,
                    tokens,
                    skipped: Some(SkipRecord::NonFiniteLoss { step, loss }),
                }),
            };
        }
        if *check_gradients {
            self.check_gradients(&grads)?;
            *check_gradients = false;
        }
        let max_norm = self.session.cfg.max_grad_norm;
        if max_norm > 0.0 {
            scale_grads_to_norm(&mut grads, &vars, max_norm, check.norm)?;
        }
        let report = self.optimizer.step(&grads, &check)?;
        let skipped =
            report.skipped().then(|| SkipRecord::NonFiniteGradient { step, tensors: report.non_finite.clone() });
        Ok(StepOutcome { loss, grad_norm: check.norm, tokens, skipped })
    }

    /// Gradients of one optimizer step (accumulated over micro-batches, normalised by the
    /// number of target tokens of the whole step), each micro-batch's loss sum (still on the
    /// device: it is read with the gradient check), the target count and the token count.
    fn step_gradients(&self, micro_start: usize) -> Result<(GradStore, Vec<Tensor>, usize, usize)> {
        let accum = self.session.cfg.grad_accumulation_steps;
        let task = &self.session.task;
        let batches: Vec<_> = (micro_start..micro_start + accum)
            .map(|i| task.train_batch(i, self.session.tokenizer.pad_id))
            .collect::<Result<_>>()?;
        let targets: usize = batches.iter().map(|b| b.n_targets()).sum::<usize>().max(1);
        let tokens: usize = batches.iter().map(|b| b.n_tokens()).sum();
        let mut acc = GradStore::default();
        // Weight gradients of the fused CPU ops, accumulated in place over the micro-batches.
        let sink = GradSink::new();
        let mut loss_sums = Vec::with_capacity(batches.len());
        for (i, batch) in batches.iter().enumerate() {
            // LoRA dropout masks depend on the run's seed and the micro-batch index only, so a
            // resumed run draws the same ones.
            self.session.dropout_seed.set(Some(mix_seed(self.session.cfg.seed, (micro_start + i) as u64)));
            let sum = {
                let _active = sink.activate();
                task.loss_sum(batch)
            };
            self.session.dropout_seed.set(None);
            let sum = sum?;
            let grads = (&sum / targets as f64)?.backward()?;
            loss_sums.push(sum.detach());
            for (_, var) in &self.session.vars {
                if let Some(g) = grads.get(var) {
                    let g = match acc.get(var) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    acc.insert(var, g);
                }
            }
        }
        sink.merge_into(&mut acc)?;
        Ok((acc, loss_sums, targets, tokens))
    }

    /// Aborts when a trainable tensor got no gradient or an all-zero one (the symptom of an op
    /// without a backward pass). Key-projection biases are exempt from the zero test: softmax
    /// is shift-invariant per query, so their true gradient is zero.
    pub fn check_gradients(&self, grads: &GradStore) -> Result<()> {
        let mut bad = Vec::new();
        for (name, var) in &self.session.vars {
            match grads.get(var) {
                None => bad.push(format!("{name} (no gradient)")),
                // LoRA's A matrices get a zero gradient while B is still zero (its start value).
                Some(g) if !is_key_bias(name) && !name.ends_with("lora_A.weight") => {
                    let s = g.abs()?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
                    if s == 0.0 {
                        bad.push(format!("{name} (all zero)"));
                    }
                }
                _ => {}
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(TrainError::MissingGradients(bad))
        }
    }
}
