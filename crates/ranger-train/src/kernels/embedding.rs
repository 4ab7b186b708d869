//! Embedding lookup whose backward adds the gathered rows' gradients straight into a
//! [`GradSink`], with no table-sized zero-filled buffer.

use candle_core::{DType, Result, Shape, Tensor};

use super::cpu_op::{Fused, FusedOp2, Input, Out};
use super::dtype::{float_dispatch, storage_slice, storage_u32_slice};
use super::float::Float;
use super::grad_sink::GradSink;
use super::path::fused_ok;

/// Rows `table[ids]` of an embedding table (`ids: [n]` u32): with a [`GradSink`] active and a
/// trainable f32/f64 table on the CPU, through an op that adds the table's gradient into the
/// sink; `index_select` otherwise.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if let Some(sink) = GradSink::current() {
        if fused_ok(table)
            && table.is_variable()
            && table.is_contiguous()
            && ids.dtype() == DType::U32
            && ids.device().is_cpu()
        {
            return table.apply_op2(ids, Fused(Embedding { sink }));
        }
    }
    table.index_select(ids, 0)
}

/// Embedding lookup `table[ids]` (`table: [vocab, h]`, `ids: [n]` u32) whose backward adds the
/// gathered rows' gradients straight into a [`GradSink`]'s buffer for the table: Candle's
/// `index_select` backward fills a table-sized buffer with zeros and then copies it once more
/// to add the rows in.
pub struct Embedding {
    /// Where the table's gradient goes.
    pub sink: GradSink,
}

// table: [V, C], ids: [n] -> out: [n, C]
fn gather<T: Copy>(table: &[T], ids: &[u32], h: usize) -> Vec<T> {
    ids.iter().flat_map(|&i| &table[i as usize * h..(i as usize + 1) * h]).copied().collect()
}

// ids: [n], g: [n, C] -> d_table: [V, C] (+)= rows of g at ids
fn scatter<T: Float>(sink: &GradSink, table: &Tensor, ids: &[u32], g: &[T], h: usize) -> Result<()> {
    sink.write::<T>(table, |dt| {
        for (&i, row) in ids.iter().zip(g.chunks(h)) {
            dt[i as usize * h..(i as usize + 1) * h].iter_mut().zip(row).for_each(|(d, &r)| *d += r);
        }
    })
}

impl FusedOp2 for Embedding {
    const NAME: &'static str = "ranger-embedding";

    fn cpu<T: Float>(&self, table: Input<'_>, ids: Input<'_>) -> Out<T> {
        let (vocab, h) = table.shape().dims2()?;
        let ids = ids.ids("token", vocab, None)?;
        Ok((gather(table.floats()?, ids, h), Shape::from((ids.len(), h))))
    }

    fn bwd(&self, table: &Tensor, ids: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = Self::NAME;
        let h = table.dim(1)?;
        let (ids, g) = (ids.contiguous()?, g.contiguous()?);
        let (is, il) = ids.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let ids = storage_u32_slice(op, "token", &is, il)?;
        float_dispatch!(op, g.dtype(), |T| scatter::<T>(&self.sink, table, ids, storage_slice(op, &gs, gl)?, h))?;
        Ok((None, None))
    }
}
