//! Weight gradients accumulated in place, outside Candle's gradient store.
//!
//! Candle's backprop adds every gradient it receives into a fresh zero-filled buffer
//! (`GradStore::or_insert`, then `add`): for a weight that is an allocation and two more passes
//! over a weight-sized buffer, and the trainer pays one more add per micro-batch when it
//! accumulates gradients. While a [`GradSink`] is active, the fused CPU ops built in that time
//! (trainable linear layers, the fused LM head + loss, the embedding lookup) hand their weight
//! gradients to it instead: the matmul writes them straight into one buffer per weight, and
//! later micro-batches accumulate into that buffer in place. [`GradSink::merge_into`] then
//! moves them into a `GradStore`, adding where Candle holds a gradient of the same weight too.
//! Without an active sink the ops return every gradient to Candle as usual.
//!
//! Activation checkpointing ([`super::checkpoint`]) hands the sink whole gradient tensors of
//! any device and dtype ([`GradSink::add_tensor`]): a Candle op can return gradients of its
//! inputs only, and a checkpointed layer's weights are not its inputs.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Device, Result, Tensor, TensorId};

use super::float::Float;

/// One weight's gradient values, row-major; or a gradient tensor of another device or dtype.
pub(crate) enum Buffer {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Tensor(Tensor),
}

impl Buffer {
    /// `v` as a buffer (no copy).
    pub(crate) fn new<T: Float>(v: Vec<T>) -> Result<Self> {
        match T::to_cpu_storage_owned(v) {
            CpuStorage::F32(v) => Ok(Buffer::F32(v)),
            CpuStorage::F64(v) => Ok(Buffer::F64(v)),
            s => candle_core::bail!("gradient sink: {:?} gradients (f32/f64 only)", s.dtype()),
        }
    }

    /// The values, if they are of type `T`.
    fn values_mut<T: Float>(&mut self) -> Option<&mut Vec<T>> {
        let values: &mut dyn Any = match self {
            Buffer::F32(v) => v,
            Buffer::F64(v) => v,
            Buffer::Tensor(_) => return None,
        };
        values.downcast_mut()
    }

    /// The values as a CPU tensor of `shape` (no copy).
    pub(crate) fn into_tensor(self, shape: &candle_core::Shape) -> Result<Tensor> {
        match self {
            Buffer::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            Buffer::F64(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            Buffer::Tensor(t) => t.reshape(shape),
        }
    }
}

/// A weight and its accumulated gradient.
struct Slot {
    weight: Tensor,
    grad: Buffer,
}

/// Gradients of weights, written in place by the backward passes of the fused CPU ops that
/// were built while the sink was active (see the module documentation). Cloning shares it.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, Slot>>>);

thread_local! {
    static ACTIVE: RefCell<Option<GradSink>> = const { RefCell::new(None) };
}

/// Keeps a sink active on this thread until dropped (see [`GradSink::activate`]). Not `Send`:
/// it must be dropped on the thread that activated it.
pub struct ActiveSink {
    previous: Option<GradSink>,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for ActiveSink {
    fn drop(&mut self) {
        let previous = self.previous.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradSink({} weights)", self.lock().len())
    }
}

impl GradSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes this the sink of the ops built on this thread until the guard is dropped: run the
    /// training forward pass under it. The ops keep the sink, so their backward passes write
    /// to it whenever they run.
    pub fn activate(&self) -> ActiveSink {
        let previous = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        ActiveSink { previous, _this_thread: std::marker::PhantomData }
    }

    /// The sink active on this thread, if any.
    pub(crate) fn current() -> Option<GradSink> {
        ACTIVE.with(|a| a.borrow().clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TensorId, Slot>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether no gradient has been written.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Runs `add` on `weight`'s gradient buffer, zero-filled on first use.
    pub(crate) fn write<T: Float>(&self, weight: &Tensor, add: impl FnOnce(&mut [T])) -> Result<()> {
        // SAFETY: the buffer is zero-filled before `add` sees it the first time.
        unsafe { self.write_raw::<T>(weight, true, |ptr, len, _| add(std::slice::from_raw_parts_mut(ptr, len))) }
    }

    /// Runs `write` on `weight`'s gradient buffer (pointer and length), telling it whether the
    /// buffer holds gradients to accumulate onto. The first time the buffer is left
    /// uninitialised: `write` must then set every element without reading any (a product
    /// written by gemm without `accumulate`), sparing a zero-fill of the whole weight.
    ///
    /// # Safety
    /// `write` must set every element when told there is nothing to accumulate onto.
    pub(crate) unsafe fn write_product<T: Float>(
        &self,
        weight: &Tensor,
        write: impl FnOnce(*mut T, usize, bool),
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.write_raw::<T>(weight, false, write) }
    }

    /// # Safety
    /// Unless `zeroed`, `write` must set every element of a new buffer (told `false`).
    unsafe fn write_raw<T: Float>(
        &self,
        weight: &Tensor,
        zeroed: bool,
        write: impl FnOnce(*mut T, usize, bool),
    ) -> Result<()> {
        let mut slots = self.lock();
        let n = weight.elem_count();
        if let Some(slot) = slots.get_mut(&weight.id()) {
            let Some(buf) = slot.grad.values_mut::<T>() else {
                candle_core::bail!(
                    "gradient sink: {:?} gradient of a weight first written in another dtype or on another device",
                    weight.dtype()
                );
            };
            write(buf.as_mut_ptr(), buf.len(), true);
            return Ok(());
        }
        let buf = if zeroed {
            let mut buf = vec![T::zero(); n];
            write(buf.as_mut_ptr(), n, true);
            buf
        } else {
            let mut buf = Vec::with_capacity(n);
            write(buf.as_mut_ptr(), n, false);
            // SAFETY: `write` set all n elements (the caller's contract).
            unsafe { buf.set_len(n) };
            buf
        };
        slots.insert(weight.id(), Slot { weight: weight.clone(), grad: Buffer::new(buf)? });
        Ok(())
    }

    /// Adds `scale * grad` (a gradient computed whole, of `weight`'s shape) to `weight`'s
    /// buffer; the first time, `grad` becomes the buffer, scaled in place.
    pub(crate) fn add_owned<T: Float>(&self, weight: &Tensor, mut grad: Vec<T>, scale: T) -> Result<()> {
        if grad.len() != weight.elem_count() {
            candle_core::bail!(
                "gradient sink: {} gradient values for a weight of shape {:?}",
                grad.len(),
                weight.dims()
            );
        }
        let mut slots = self.lock();
        match slots.get_mut(&weight.id()) {
            None => {
                if scale != T::one() {
                    grad.iter_mut().for_each(|g| *g *= scale);
                }
                slots.insert(weight.id(), Slot { weight: weight.clone(), grad: Buffer::new(grad)? });
            }
            Some(slot) => {
                let Some(buf) = slot.grad.values_mut::<T>() else {
                    candle_core::bail!(
                        "gradient sink: {:?} gradient of a weight first written in another dtype or on another device",
                        weight.dtype()
                    );
                };
                buf.iter_mut().zip(&grad).for_each(|(b, &g)| *b += g * scale);
            }
        }
        Ok(())
    }

    /// [`Self::add_owned`] for either element type.
    pub(crate) fn add_buffer(&self, weight: &Tensor, grad: Buffer, scale: f64) -> Result<()> {
        match grad {
            Buffer::F32(v) => self.add_owned(weight, v, scale as f32),
            Buffer::F64(v) => self.add_owned(weight, v, scale),
            Buffer::Tensor(t) => self.add_tensor(weight, (t * scale)?),
        }
    }

    /// Adds a gradient tensor of `weight` (any device and dtype, `weight`'s shape). A CPU
    /// f32/f64 gradient joins the in-place buffers (`b += g`, the sum Candle's own store would
    /// form); any other is kept as a tensor and summed with tensor ops.
    pub fn add_tensor(&self, weight: &Tensor, grad: Tensor) -> Result<()> {
        if grad.dims() != weight.dims() {
            candle_core::bail!(
                "gradient sink: gradient of shape {:?} for a weight of shape {:?}",
                grad.dims(),
                weight.dims()
            );
        }
        if grad.device().is_cpu() && grad.dtype() == weight.dtype() {
            match grad.dtype() {
                candle_core::DType::F32 => return self.add_owned(weight, grad.flatten_all()?.to_vec1::<f32>()?, 1.0),
                candle_core::DType::F64 => return self.add_owned(weight, grad.flatten_all()?.to_vec1::<f64>()?, 1.0),
                _ => {}
            }
        }
        let grad = grad.detach();
        let mut slots = self.lock();
        match slots.get_mut(&weight.id()) {
            None => {
                slots.insert(weight.id(), Slot { weight: weight.clone(), grad: Buffer::Tensor(grad) });
            }
            Some(Slot { grad: Buffer::Tensor(sum), .. }) => *sum = (&*sum + grad)?,
            Some(_) => candle_core::bail!(
                "gradient sink: {:?} gradient tensor of a weight whose earlier gradients were CPU buffers",
                weight.dtype()
            ),
        }
        Ok(())
    }

    /// Moves every gradient into `grads` (adding it to any gradient of the same weight already
    /// there) and leaves the sink empty.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let slots = std::mem::take(&mut *self.lock());
        for (_, Slot { weight, grad }) in slots {
            let g = grad.into_tensor(weight.shape())?;
            let g = match grads.get(&weight) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&weight, g);
        }
        Ok(())
    }
}
