//! Activation checkpointing: a layer run as one Candle op that keeps only its input.
//!
//! The forward pass runs the layer, keeps its output and drops everything else (the graph the
//! layer built, and with it every activation). The backward pass runs the layer again on the
//! kept input, this time keeping the graph, and backpropagates the output's gradient through
//! it: the input's gradient goes back to Candle, the trainable weights' gradients to the
//! active [`GradSink`] (a Candle op can only return gradients of its inputs, and the layer's
//! weights are not the op's input). So the backward pass holds one layer's activations at a
//! time instead of every layer's, for one more forward pass of each layer.
//!
//! The second run is the same code on the same values: on one device its activations, and
//! so every gradient, are the ones a run without checkpointing computes, bit for bit (the
//! models' tests check it). Code inside a layer that draws random numbers must draw the same
//! ones both times (LoRA dropout does: see `DropoutSeed::replay`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor, Var};

use super::grad_sink::GradSink;

/// A layer's forward pass, `x -> y`, over weights it holds. It runs twice per training step
/// (forward, then again in backward), so it must compute the same values each time.
pub type LayerFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `layer(x)`, keeping only `x` for the backward pass (see the module documentation).
/// `weights` are the tensors the layer uses; those that are variables get their gradients in
/// the [`GradSink`] active on this thread. A forward pass run under an active sink is a
/// training forward pass (the trainer's); any other (evaluation, inference), or one with
/// nothing to train (no variable among `weights`, `x` computed from none), is `layer(x)`.
pub fn checkpoint(x: &Tensor, weights: &[Tensor], layer: LayerFn) -> Result<Tensor> {
    let trainable: Vec<Tensor> = weights.iter().filter(|w| w.is_variable()).cloned().collect();
    let sink = match GradSink::current() {
        Some(sink) if x.track_op() || !trainable.is_empty() => sink,
        _ => return layer(x),
    };
    // The graph of this run is dropped with its result's op: only the values are kept.
    let mut out = layer(&x.detach())?.detach();
    if !out.is_contiguous() || out.layout().start_offset() != 0 {
        out = out.force_contiguous()?.detach();
    }
    let input_needs_grad = x.track_op();
    let op = Checkpoint { out: Mutex::new(Some(out)), layer, weights: trainable, input_needs_grad, sink };
    if input_needs_grad {
        x.apply_op1(op)
    } else {
        // Candle records an op only over an input that needs a gradient: a copy of `x` as a
        // variable gets the op recorded (the backward pass still computes no input gradient).
        Var::from_tensor(x)?.as_tensor().apply_op1(op)
    }
}

/// The op of [`checkpoint`]: its forward pass hands over the output computed beforehand, its
/// backward pass recomputes the layer.
struct Checkpoint {
    /// The layer's output, taken (copied into the op's result) by the forward pass.
    out: Mutex<Option<Tensor>>,
    layer: LayerFn,
    /// The layer's trainable weights.
    weights: Vec<Tensor>,
    /// Whether the input needs a gradient (false for the first layer of a LoRA model: its
    /// input comes from the frozen embedding).
    input_needs_grad: bool,
    sink: GradSink,
}

impl Checkpoint {
    const NAME: &'static str = "ranger-checkpoint";

    /// The output's storage, copied (a Candle op returns storage it owns). `checkpoint` made the
    /// output contiguous from offset 0, and a copied CPU storage is the whole buffer, so the
    /// result's layout (contiguous, offset 0) addresses exactly the output.
    fn take_out(&self) -> Result<(Storage, Shape)> {
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(out) = out else { candle_core::bail!("{}: forward pass run twice", Self::NAME) };
        let (storage, layout) = out.storage_and_layout();
        Ok((storage.try_clone(layout)?, out.shape().clone()))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.take_out()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: the layer's output is not on the input's device", Self::NAME),
        }
    }

    fn cuda_fwd(&self, _x: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.take_out()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: the layer's output is not on the input's device", Self::NAME),
        }
    }

    fn metal_fwd(&self, _x: &MetalStorage, _layout: &Layout) -> Result<(MetalStorage, Shape)> {
        match self.take_out()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: the layer's output is not on the input's device", Self::NAME),
        }
    }

    // x: the layer's input, g: the gradient of its output (same shape as the output).
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let input = match self.input_needs_grad {
            true => Var::from_tensor(&x.detach())?.as_tensor().clone(),
            false => x.detach(),
        };
        let y = {
            // Fused ops built now write their weights' gradients into the sink themselves.
            let _active = self.sink.activate();
            (self.layer)(&input)?
        };
        // d(sum(y * g))/dy = g exactly (1 * g), so this backward starts from g.
        let mut grads = (y * g.detach())?.sum_all()?.backward()?;
        for w in &self.weights {
            if let Some(gw) = grads.remove(w) {
                self.sink.add_tensor(w, gw)?;
            }
        }
        Ok(grads.remove(&input))
    }
}
