//! The fused CPU ops as Candle ops, in one place: each kernel implements [`FusedOp1`],
//! [`FusedOp2`] or [`FusedOp3`] (its forward pass generic over the float type, its backward
//! pass), and [`Fused`] turns it into a Candle `CustomOp`, doing the dtype dispatch (on the
//! first input, once per call), the reading of the inputs and the wrapping of the output.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::dtype::{float_dispatch, slice, u32_slice};
use super::float::Float;

/// A fused CPU kernel of this module ([`super::norms::RmsNorm`], [`super::attention::FusedAttention`],
/// ...) as a Candle op: `x.apply_op2(&w, Fused(RmsNorm { eps }))`.
pub struct Fused<K>(pub K);

/// One input of a fused op on the CPU, read as the kernel needs it; errors name the op.
#[derive(Clone, Copy)]
pub(crate) struct Input<'a> {
    op: &'static str,
    storage: &'a CpuStorage,
    layout: &'a Layout,
}

impl<'a> Input<'a> {
    /// Its contiguous elements as floats of the op's type `T`.
    pub(crate) fn floats<T: Float>(self) -> Result<&'a [T]> {
        slice(self.op, self.storage, self.layout)
    }

    /// Its contiguous elements as token ids (u32), each below `vocab` or equal to `ignored`;
    /// `what` ("token", "target") names them in errors.
    pub(crate) fn ids(self, what: &str, vocab: usize, ignored: Option<u32>) -> Result<&'a [u32]> {
        let ids = u32_slice(self.op, what, self.storage, self.layout)?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab && Some(i) != ignored) {
            candle_core::bail!("{}: {what} id {bad} is outside the vocabulary of {vocab}", self.op);
        }
        Ok(ids)
    }

    /// Its layout.
    pub(crate) fn layout(self) -> &'a Layout {
        self.layout
    }

    /// Its shape.
    pub(crate) fn shape(self) -> &'a Shape {
        self.layout.shape()
    }

    /// Its dimensions.
    pub(crate) fn dims(self) -> &'a [usize] {
        self.layout.dims()
    }
}

/// The output of a forward kernel: values of the op's float type and their shape.
pub(crate) type Out<T> = Result<(Vec<T>, Shape)>;

/// A fused CPU op over one tensor.
pub(crate) trait FusedOp1 {
    /// The op's name, which its errors carry.
    const NAME: &'static str;
    /// The forward pass with `T` the first input's float type.
    fn cpu<T: Float>(&self, x: Input<'_>) -> Out<T>;
    /// The backward pass, as [`CustomOp1::bwd`]; none by default (ops applied without one).
    fn bwd(&self, _x: &Tensor, _res: &Tensor, _g: &Tensor) -> Result<Option<Tensor>> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A fused CPU op over two tensors (see [`FusedOp1`]).
pub(crate) trait FusedOp2 {
    /// The op's name, which its errors carry.
    const NAME: &'static str;
    /// The forward pass with `T` the first input's float type.
    fn cpu<T: Float>(&self, a: Input<'_>, b: Input<'_>) -> Out<T>;
    /// The backward pass, as [`CustomOp2::bwd`]; none by default.
    fn bwd(&self, _a: &Tensor, _b: &Tensor, _res: &Tensor, _g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// The gradients of a three-input op.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A fused CPU op over three tensors (see [`FusedOp1`]).
pub(crate) trait FusedOp3 {
    /// The op's name, which its errors carry.
    const NAME: &'static str;
    /// The forward pass with `T` the first input's float type.
    fn cpu<T: Float>(&self, a: Input<'_>, b: Input<'_>, c: Input<'_>) -> Out<T>;
    /// The backward pass, as [`CustomOp3::bwd`]; none by default.
    fn bwd(&self, _a: &Tensor, _b: &Tensor, _c: &Tensor, _res: &Tensor, _g: &Tensor) -> Result<Grads3> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A kernel's output as CPU storage (no copy).
fn storage<T: Float>(out: Out<T>) -> Result<(CpuStorage, Shape)> {
    let (values, shape) = out?;
    Ok((T::to_cpu_storage_owned(values), shape))
}

impl<K: FusedOp1> CustomOp1 for Fused<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Input { op: K::NAME, storage: s, layout: l };
        float_dispatch!(K::NAME, s.dtype(), |T| storage(self.0.cpu::<T>(x)))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.0.bwd(x, res, g)
    }
}

impl<K: FusedOp2> CustomOp2 for Fused<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = Input { op: K::NAME, storage: s1, layout: l1 };
        let b = Input { op: K::NAME, storage: s2, layout: l2 };
        float_dispatch!(K::NAME, s1.dtype(), |T| storage(self.0.cpu::<T>(a, b)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.0.bwd(a, b, res, g)
    }
}

impl<K: FusedOp3> CustomOp3 for Fused<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = Input { op: K::NAME, storage: s1, layout: l1 };
        let b = Input { op: K::NAME, storage: s2, layout: l2 };
        let c = Input { op: K::NAME, storage: s3, layout: l3 };
        float_dispatch!(K::NAME, s1.dtype(), |T| storage(self.0.cpu::<T>(a, b, c)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, res: &Tensor, g: &Tensor) -> Result<Grads3> {
        self.0.bwd(a, b, c, res, g)
    }
}
