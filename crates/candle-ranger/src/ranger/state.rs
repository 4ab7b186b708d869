//! The state of [`Ranger`] as data ([`OptimizerState`]) and as a file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};

use super::slot::SlotState;
use super::Ranger;
use crate::error::{Error, Result};
use crate::fused::{HostBuf, HostState};
use crate::packed_tensor::PackedTensor;
use crate::portable::DeviceState;
use crate::portable_packed::PackedState;
use crate::state::{state_dtype, OptimizerState};
use crate::state_codec::{Code, Q8Buf, BLOCK};
use crate::state_file::StateView;

/// One variable's state read from an [`OptimizerState`], checked, not yet swapped in.
enum Loaded {
    /// Moments, slow weights, master copy and step count as tensors.
    Tensors(Tensor, Tensor, Option<Tensor>, Option<Tensor>, u64),
    /// 8-bit host state, already built, and the step count.
    Host(HostState, u64),
}

/// Packed host buffers (as read from a state file) as tensors on `device`.
fn to_device_packed(state: HostState, shape: &Shape, device: &Device) -> Result<PackedState> {
    let convert = |buf: HostBuf| -> Result<PackedTensor> {
        Ok(match buf {
            HostBuf::Q8(q) => {
                let (n, nb) = (q.len(), q.scales.len());
                PackedTensor::Q8 {
                    code: q.code,
                    bytes: Tensor::from_vec(q.bytes, n, device)?,
                    scales: Tensor::from_vec(q.scales, nb, device)?,
                }
            }
            HostBuf::B16(bits) => {
                let values: Vec<half::bf16> = bits.into_iter().map(half::bf16::from_bits).collect();
                PackedTensor::B16(Tensor::from_vec(values, shape, device)?)
            }
            other => return Err(Error::InvalidConfig(format!("packed state expected, got {:?} values", other.len()))),
        })
    };
    let master = state.master.map(|m| m.to_tensor(shape)?.to_device(device)).transpose()?;
    Ok(PackedState { m: convert(state.m)?, v: convert(state.v)?, delta: state.slow.map(convert).transpose()?, master })
}

impl Ranger {
    /// The optimizer state (moments, slow weights, per-variable step counts, learning rate,
    /// skipped steps) as named tensors on the CPU; see [`OptimizerState`] for the names. Host
    /// state is borrowed, not copied.
    pub fn state_tensors(&self) -> Result<OptimizerState<'_>> {
        // An 8-bit buffer is two entries: `<name>.q8` (u8, one per value) and `<name>.q8_scales`;
        // a bf16 buffer is a bf16 tensor.
        fn push<'a>(
            out: &mut Vec<(String, StateView<'a>)>,
            name: String,
            buf: &'a HostBuf,
            shape: &Shape,
        ) -> Result<()> {
            match buf {
                HostBuf::F32(v) => out.push((name, StateView::F32(v.as_slice(), shape.dims().to_vec()))),
                HostBuf::F64(v) => out.push((name, StateView::F64(v.as_slice(), shape.dims().to_vec()))),
                HostBuf::Q8(q) => {
                    out.push((
                        format!("{name}.q8"),
                        StateView::Tensor(Tensor::from_slice(&q.bytes, q.len(), &Device::Cpu)?),
                    ));
                    out.push((format!("{name}.q8_scales"), StateView::F32(q.scales.as_slice(), vec![q.scales.len()])));
                }
                HostBuf::B16(b) => {
                    let values: Vec<half::bf16> = b.iter().map(|&b| half::bf16::from_bits(b)).collect();
                    out.push((name, StateView::Tensor(Tensor::from_vec(values, shape, &Device::Cpu)?)));
                }
            }
            Ok(())
        }
        let cpu = Device::Cpu;
        let lookahead = self.params.lookahead_k > 0;
        let mut tensors: Vec<(String, StateView<'_>)> = Vec::new();
        for slot in &self.slots {
            let shape = slot.var.shape();
            let name = &slot.name;
            match &slot.state {
                SlotState::Host(st) => {
                    push(&mut tensors, format!("{name}.exp_avg"), &st.m, shape)?;
                    push(&mut tensors, format!("{name}.exp_avg_sq"), &st.v, shape)?;
                    match &st.slow {
                        // Packed state keeps the slow weights as their difference from the fast ones.
                        Some(d) if d.is_packed() => push(&mut tensors, format!("{name}.slow_delta"), d, shape)?,
                        Some(s) => push(&mut tensors, format!("{name}.slow"), s, shape)?,
                        // Before the first step: a zero difference.
                        None if lookahead && st.m.is_packed() => match &st.m {
                            HostBuf::Q8(_) => {
                                let zeros = Tensor::zeros(slot.var.elem_count(), DType::U8, &cpu)?;
                                let scales = Tensor::zeros(slot.var.elem_count().div_ceil(BLOCK), DType::F32, &cpu)?;
                                tensors.push((format!("{name}.slow_delta.q8"), StateView::Tensor(zeros)));
                                tensors.push((format!("{name}.slow_delta.q8_scales"), StateView::Tensor(scales)));
                            }
                            _ => tensors.push((
                                format!("{name}.slow_delta"),
                                StateView::Tensor(Tensor::zeros(shape, DType::BF16, &cpu)?),
                            )),
                        },
                        None if lookahead => {
                            tensors.push((format!("{name}.slow"), StateView::Tensor(slot.current_slow()?)))
                        }
                        None => {}
                    }
                    if let Some(master) = &st.master {
                        push(&mut tensors, format!("{name}.master"), master, shape)?;
                    }
                }
                SlotState::Packed(st) => {
                    // The same entries as packed host state, so a state file moves between paths.
                    let mut push_packed = |name: String, buf: &PackedTensor| -> Result<()> {
                        match buf {
                            PackedTensor::Q8 { bytes, scales, .. } => {
                                tensors.push((format!("{name}.q8"), StateView::Tensor(bytes.to_device(&cpu)?)));
                                tensors.push((format!("{name}.q8_scales"), StateView::Tensor(scales.to_device(&cpu)?)));
                            }
                            PackedTensor::B16(t) => tensors.push((name, StateView::Tensor(t.to_device(&cpu)?))),
                        }
                        Ok(())
                    };
                    push_packed(format!("{name}.exp_avg"), &st.m)?;
                    push_packed(format!("{name}.exp_avg_sq"), &st.v)?;
                    if lookahead {
                        // Before the first step: a zero difference.
                        match &st.delta {
                            Some(d) => push_packed(format!("{name}.slow_delta"), d)?,
                            None => push_packed(format!("{name}.slow_delta"), &st.m.zeros_like()?)?,
                        }
                    }
                    if let Some(master) = &st.master {
                        tensors.push((format!("{name}.master"), StateView::Tensor(master.to_device(&cpu)?)));
                    }
                }
                SlotState::Device(st) => {
                    tensors.push((format!("{name}.exp_avg"), StateView::Tensor(st.m.to_device(&cpu)?)));
                    tensors.push((format!("{name}.exp_avg_sq"), StateView::Tensor(st.v.to_device(&cpu)?)));
                    if lookahead {
                        tensors
                            .push((format!("{name}.slow"), StateView::Tensor(slot.current_slow()?.to_device(&cpu)?)));
                    }
                    if let Some(master) = &st.master {
                        tensors.push((format!("{name}.master"), StateView::Tensor(master.to_device(&cpu)?)));
                    }
                }
            }
            tensors.push((format!("{name}.step"), StateView::Tensor(Tensor::new(&[slot.step as i64], &cpu)?)));
        }
        Ok(OptimizerState {
            tensors,
            lr: Some(self.params.lr),
            skipped_steps: self.skipped_steps,
            hyperparameters: if self.adam {
                format!("{};update=adamw", self.params.to_metadata_string())
            } else {
                self.params.to_metadata_string()
            },
        })
    }

    /// Loads state taken by [`Ranger::state_tensors`] (or read by [`OptimizerState::load`])
    /// into this optimizer, built over the same variable names: moments, slow weights, step
    /// counts, the learning rate and the skipped-step count. Every name, shape and dtype is
    /// checked first; on any mismatch nothing is changed and the [`Error::StateMismatch`]
    /// names the offending tensor.
    pub fn load_state_tensors(&mut self, state: &OptimizerState<'_>) -> Result<()> {
        let mismatch =
            |tensor: &str, problem: String| Error::StateMismatch { path: None, tensor: tensor.to_string(), problem };
        let mut tensors: HashMap<&str, &StateView<'_>> = HashMap::with_capacity(state.tensors.len());
        for (name, t) in &state.tensors {
            if tensors.insert(name, t).is_some() {
                return Err(mismatch(name, "appears twice".into()));
            }
        }
        // `None` when an optional tensor is absent.
        let mut take_opt = |name: String, shape: &Shape, dtype: DType, required: bool| -> Result<Option<Tensor>> {
            let t = match tensors.remove(name.as_str()) {
                Some(t) => t,
                None if required => return Err(mismatch(&name, "missing from the state".into())),
                None => return Ok(None),
            };
            if t.dims() != shape.dims() {
                return Err(mismatch(&name, format!("shape {:?} in the state, {:?} expected", t.dims(), shape.dims())));
            }
            if t.dtype() != dtype {
                return Err(mismatch(&name, format!("dtype {:?} in the state, {:?} expected", t.dtype(), dtype)));
            }
            Ok(Some(t.to_tensor()?))
        };
        // A required tensor is there or `take_opt` failed.
        let present = |t: Option<Tensor>| t.expect("take_opt returns required tensors or an error");
        // Validate everything first, then commit: a bad state changes nothing.
        let mut loaded = Vec::with_capacity(self.slots.len());
        let lookahead = self.params.lookahead_k > 0;
        for slot in &self.slots {
            let sdt = state_dtype(slot.var.dtype());
            let shape = slot.var.shape();
            let packed_kind = match &slot.state {
                SlotState::Host(HostState { m, .. }) if m.is_packed() => Some(matches!(m, HostBuf::B16(_))),
                SlotState::Packed(st) => Some(matches!(st.m, PackedTensor::B16(_))),
                _ => None,
            };
            if let Some(bf16) = packed_kind {
                {
                    let n = slot.var.elem_count();
                    // 8-bit: each buffer's bytes and scales; bf16: a bf16 tensor.
                    let mut read = |name: String, code: Code| -> Result<HostBuf> {
                        if bf16 {
                            let t = present(take_opt(name, shape, DType::BF16, true)?);
                            let bits = t.flatten_all()?.to_vec1::<half::bf16>()?.iter().map(|b| b.to_bits()).collect();
                            return Ok(HostBuf::B16(bits));
                        }
                        let bytes = present(take_opt(format!("{name}.q8"), &Shape::from(n), DType::U8, true)?);
                        let nb = Shape::from(n.div_ceil(BLOCK));
                        let scales = present(take_opt(format!("{name}.q8_scales"), &nb, DType::F32, true)?);
                        Ok(HostBuf::Q8(Q8Buf { code, bytes: bytes.to_vec1::<u8>()?, scales: scales.to_vec1::<f32>()? }))
                    };
                    let m = read(format!("{}.exp_avg", slot.name), Code::Signed)?;
                    let v = read(format!("{}.exp_avg_sq", slot.name), Code::Positive)?;
                    let delta =
                        if lookahead { Some(read(format!("{}.slow_delta", slot.name), Code::Signed)?) } else { None };
                    let master = take_opt(format!("{}.master", slot.name), shape, sdt, false)?
                        .filter(|_| slot.wants_master(&self.params));
                    let step_name = format!("{}.step", slot.name);
                    let step =
                        present(take_opt(step_name.clone(), &Shape::from(1), DType::I64, true)?).to_vec1::<i64>()?[0];
                    let step =
                        u64::try_from(step).map_err(|_| mismatch(&step_name, format!("negative step count {step}")))?;
                    let state =
                        HostState { m, v, slow: delta, master: master.as_ref().map(HostBuf::from_tensor).transpose()? };
                    loaded.push(Loaded::Host(state, step));
                    continue;
                }
            }
            let m = present(take_opt(format!("{}.exp_avg", slot.name), shape, sdt, true)?);
            let v = present(take_opt(format!("{}.exp_avg_sq", slot.name), shape, sdt, true)?);
            let slow = if lookahead { take_opt(format!("{}.slow", slot.name), shape, sdt, true)? } else { None };
            // A master copy is taken at a variable's first step: a state saved before it has none.
            let master_name = format!("{}.master", slot.name);
            // Present without master weights here: dropped (the variable is the weights then).
            let master = take_opt(master_name, shape, sdt, false)?.filter(|_| slot.wants_master(&self.params));
            let step_name = format!("{}.step", slot.name);
            let step = present(take_opt(step_name.clone(), &Shape::from(1), DType::I64, true)?).to_vec1::<i64>()?[0];
            let step = u64::try_from(step).map_err(|_| mismatch(&step_name, format!("negative step count {step}")))?;
            loaded.push(Loaded::Tensors(m, v, slow, master, step));
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(mismatch(
                extra,
                "not a variable of this optimizer (was the state saved for another model or with Lookahead?)".into(),
            ));
        }
        // Build every new state first (fallible: copies, device transfers), then swap them in.
        let mut states = Vec::with_capacity(loaded.len());
        for (slot, loaded) in self.slots.iter().zip(loaded) {
            let (m, v, slow, master, step) = match loaded {
                Loaded::Host(state, step) if matches!(slot.state, SlotState::Packed(_)) => {
                    states
                        .push((SlotState::Packed(to_device_packed(state, slot.var.shape(), slot.var.device())?), step));
                    continue;
                }
                Loaded::Host(state, step) => {
                    states.push((SlotState::Host(state), step));
                    continue;
                }
                Loaded::Tensors(m, v, slow, master, step) => (m, v, slow, master, step),
            };
            let state = match slot.state {
                SlotState::Host(_) => SlotState::Host(HostState {
                    m: HostBuf::from_tensor(&m)?,
                    v: HostBuf::from_tensor(&v)?,
                    slow: slow.as_ref().map(HostBuf::from_tensor).transpose()?,
                    master: master.as_ref().map(HostBuf::from_tensor).transpose()?,
                }),
                SlotState::Packed(_) => unreachable!("packed state is read as packed"),
                SlotState::Device(ref old) => {
                    let dev = slot.var.device();
                    // Fresh copies: the fused CUDA kernel updates the state in place.
                    SlotState::Device(DeviceState {
                        fused: old.fused,
                        m: m.to_device(dev)?.copy()?,
                        v: v.to_device(dev)?.copy()?,
                        slow: slow.map(|s| s.to_device(dev)?.copy()).transpose()?,
                        master: master.map(|s| s.to_device(dev)?.copy()).transpose()?,
                    })
                }
            };
            states.push((state, step));
        }
        for (slot, (state, step)) in self.slots.iter_mut().zip(states) {
            slot.state = state;
            slot.step = step;
        }
        if let Some(lr) = state.lr {
            self.params.lr = lr;
        }
        self.skipped_steps = state.skipped_steps;
        Ok(())
    }

    /// Saves the optimizer state ([`Ranger::state_tensors`]) to one safetensors file,
    /// atomically; hyperparameters, learning rate and skipped steps go in its metadata.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        self.state_tensors()?.save(path)
    }

    /// Loads a file written by [`Ranger::save_state`] (see [`Ranger::load_state_tensors`]: a
    /// file that does not fit changes nothing, and the error names the file and the tensor).
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let state = OptimizerState::load(path)?;
        self.load_state_tensors(&state).map_err(|e| e.in_file(path))
    }
}
