//! Ops whose forward value is computed beforehand with tensor ops, on any device, and handed to
//! Candle's autograd by a custom op whose forward returns it and whose backward is ours: how
//! [`super::chunked_attention`] and [`super::chunked_lm_loss`] keep what they keep.

use candle_core::backend::BackendStorage;
use candle_core::{Result, Shape, Storage, Tensor};

/// A copy of `t`'s storage on the backend that `pick` selects, for a custom op's forward; an
/// error naming `op` when `t` is elsewhere.
pub(super) fn storage_copy<S: BackendStorage>(
    op: &str,
    t: &Tensor,
    pick: fn(&Storage) -> Option<&S>,
) -> Result<(S, Shape)> {
    let (s, l) = t.storage_and_layout();
    match pick(&s) {
        Some(s) => Ok((s.try_clone(l)?, t.shape().clone())),
        None => candle_core::bail!("{op}: its value and its inputs are on different devices"),
    }
}

/// The `cpu_fwd`, `cuda_fwd` and `metal_fwd` of a custom op (with one storage/layout pair per
/// input: `$s $l`) that return the tensor `self.$value()?`.
macro_rules! precomputed_forwards {
    ($value:ident; $($s:ident $l:ident),+) => {
        fn cpu_fwd(&self, $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+)
            -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let _ = ($($s, $l),+);
            super::precomputed::storage_copy(self.name(), &self.$value()?, |s| match s {
                candle_core::Storage::Cpu(s) => Some(s),
                _ => None,
            })
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+)
            -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let _ = ($($s, $l),+);
            super::precomputed::storage_copy(self.name(), &self.$value()?, |s| match s {
                candle_core::Storage::Cuda(s) => Some(s),
                _ => None,
            })
        }

        #[cfg(feature = "metal")]
        fn metal_fwd(&self, $($s: &candle_core::MetalStorage, $l: &candle_core::Layout),+)
            -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
            let _ = ($($s, $l),+);
            super::precomputed::storage_copy(self.name(), &self.$value()?, |s| match s {
                candle_core::Storage::Metal(s) => Some(s),
                _ => None,
            })
        }
    };
}

pub(super) use precomputed_forwards;
