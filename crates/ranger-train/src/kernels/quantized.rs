//! Frozen weights kept in a GGUF block format (QLoRA's base): `x W^T` and the input gradient
//! `g W` dequantize a chunk of W's rows at a time, so the f32 weight never exists whole.
//!
//! Candle's quantized matmul is not used on the CPU: it quantizes the activations to 8 bits
//! before its integer dot products, so its output differs from the dequantized weight's by
//! far more than rounding, and it has no backward pass. Here the products are the ordinary
//! f32 (f64) gemm of the dequantized rows, which is the same maths as training over the
//! dequantized base. On CUDA, Metal and in half precision the op dequantizes the whole
//! projection with Candle's kernels (one projection at a time, freed after the product).

use std::ops::Range;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0,
    BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::dtype::{float_dispatch, storage_slice};
use super::float::Float;
use super::frozen_matmul::FrozenMatmul;
use super::gemm::gemm_strided;
use super::path::fused_ok;

/// Dequantized weight elements per chunk (8 MiB of f32): large enough for an efficient gemm,
/// small next to any model.
const CHUNK_ELEMS: usize = 1 << 21;

/// A frozen `[out, in]` weight in a GGUF block format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K …
/// Q6_K, or F16/BF16/F32), on one device, computing in one dtype (the model's).
#[derive(Clone)]
pub struct QuantizedWeight {
    q: Arc<QTensor>,
    rows: usize,
    cols: usize,
    dtype: DType,
    /// Dequantized elements per chunk ([`CHUNK_ELEMS`]; smaller in tests).
    chunk_elems: usize,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedWeight[{}, {}; {:?} -> {:?}]", self.rows, self.cols, self.q.dtype(), self.dtype)
    }
}

impl QuantizedWeight {
    /// Wraps a rank-2 quantized tensor, moved to `device` if it is elsewhere, computing in
    /// `dtype` (f32, f64, bf16 or f16).
    pub fn new(q: QTensor, dtype: DType, device: &Device) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        if !dtype.is_float() {
            candle_core::bail!("a quantized weight computes in a float dtype, not {dtype:?}");
        }
        let q = if q.device().same_device(device) {
            q
        } else {
            let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
            QTensor::new(storage, (rows, cols))?
        };
        Ok(Self { q: Arc::new(q), rows, cols, dtype, chunk_elems: CHUNK_ELEMS })
    }

    /// Quantizes a `[out, in]` weight to `format` (its rows must be whole blocks: `in` a
    /// multiple of the block size); the weight computes in `w`'s dtype on `w`'s device.
    pub fn quantize(w: &Tensor, format: GgmlDType) -> Result<Self> {
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, format)?;
        Self::new(q, w.dtype(), w.device())
    }

    /// The same blocks computing in `dtype`.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self { dtype, ..self.clone() }
    }

    /// The same with `elems` dequantized values per chunk (tests: many chunks on tiny weights).
    #[cfg(test)]
    pub(crate) fn with_chunk_elems(&self, elems: usize) -> Self {
        Self { chunk_elems: elems, ..self.clone() }
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The block format.
    pub fn format(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// The dtype it computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Its device.
    pub fn device(&self) -> Device {
        self.q.device()
    }

    /// The bytes its blocks take.
    pub fn size_in_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The quantized tensor.
    pub fn qtensor(&self) -> &QTensor {
        &self.q
    }

    /// The whole weight dequantized, `[out, in]` in its dtype on its device (a temporary: for
    /// merging, DoRA's row norms and the device path).
    pub fn dequantize(&self) -> Result<Tensor> {
        self.q.dequantize(&self.q.device())?.to_dtype(self.dtype)
    }

    /// The rows `ids` (`[n]` u32) as an `[n, in]` tensor in its dtype: an embedding lookup
    /// (Candle's, one row dequantized at a time; no gradient, the table being frozen).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        self.q.embedding(ids)?.to_dtype(self.dtype)
    }

    /// Rows `rows` dequantized into `out` (`[rows.len(), in]` f32), in parallel; CPU only.
    fn rows_f32(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        let format = self.q.dtype();
        let row_bytes = self.cols / format.block_size() * format.type_size();
        let data = self.q.data()?;
        let data = &data[rows.start * row_bytes..rows.end * row_bytes];
        let decode = decoder(format);
        // Whole rows per task: a row is whole blocks, so each slice starts at a block.
        let per_task = (1 << 14) / self.cols.max(1) + 1;
        out.par_chunks_mut(per_task * self.cols)
            .zip(data.par_chunks(per_task * row_bytes))
            .try_for_each(|(o, d)| decode(d, o))
    }

    /// The rows of each chunk: `CHUNK_ELEMS` elements, at least one row.
    fn chunks(&self) -> impl Iterator<Item = Range<usize>> {
        let step = (self.chunk_elems / self.cols.max(1)).max(1);
        let rows = self.rows;
        (0..rows).step_by(step).map(move |r| r..(r + step).min(rows))
    }

    /// Runs `f` on each chunk of rows dequantized to `T` (`[chunk, in]`), in order.
    pub(crate) fn for_each_chunk<T: Float>(&self, mut f: impl FnMut(Range<usize>, &[T])) -> Result<()> {
        let mut buf = vec![0f32; self.chunk_elems.max(self.cols).min(self.rows * self.cols)];
        let mut conv: Vec<T> = Vec::new();
        for rows in self.chunks() {
            let b = &mut buf[..rows.len() * self.cols];
            self.rows_f32(rows.clone(), b)?;
            if T::DTYPE == DType::F32 {
                // SAFETY: T is f32.
                f(rows, unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<T>(), b.len()) });
            } else {
                conv.clear();
                conv.extend(b.iter().map(|&v| T::from_f64(v as f64)));
                f(rows, &conv);
            }
        }
        Ok(())
    }

    /// `x W^T` on the CPU, W dequantized a chunk of rows at a time.
    // x: [n, in], W: [out, in] -> y: [n, out]
    pub(crate) fn xwt<T: Float>(&self, x: &[T], n: usize) -> Result<Vec<T>> {
        let (out, inp) = (self.rows, self.cols);
        if x.len() != n * inp {
            candle_core::bail!("ranger-quantized-linear: {} input values for {n} rows of {inp}", x.len());
        }
        if inp == 0 || n == 0 {
            return Ok(vec![T::zero(); n * out]);
        }
        let mut y: Vec<T> = Vec::with_capacity(n * out);
        self.for_each_chunk::<T>(|rows, w| {
            // SAFETY: y has room for [n, out]; this writes its columns `rows` (row stride out)
            // from x [n, in] and the chunk [rows, in] read transposed; the chunks cover every
            // column once.
            unsafe {
                gemm_strided(
                    (n, rows.len(), inp),
                    y.as_mut_ptr().add(rows.start),
                    out,
                    false,
                    (x.as_ptr(), inp, 1),
                    (w.as_ptr(), 1, inp),
                    T::one(),
                    true,
                )
            }
        })?;
        // SAFETY: every element was written above (n, out, in > 0).
        unsafe { y.set_len(n * out) };
        Ok(y)
    }

    /// `g W` on the CPU (the input's gradient), W dequantized a chunk of rows at a time.
    // g: [n, out], W: [out, in] -> dx: [n, in]
    pub(crate) fn gw<T: Float>(&self, g: &[T], n: usize) -> Result<Vec<T>> {
        let (out, inp) = (self.rows, self.cols);
        if g.len() != n * out {
            candle_core::bail!("ranger-quantized-linear: {} gradient values for {n} rows of {out}", g.len());
        }
        if out == 0 || n == 0 {
            return Ok(vec![T::zero(); n * inp]);
        }
        let mut dx: Vec<T> = Vec::with_capacity(n * inp);
        self.for_each_chunk::<T>(|rows, w| {
            // SAFETY: dx has room for [n, in]; the first chunk writes all of it, the others
            // add to it; g's columns `rows` are read at row stride out; the chunk is [rows, in].
            unsafe {
                gemm_strided(
                    (n, inp, rows.len()),
                    dx.as_mut_ptr(),
                    inp,
                    rows.start > 0,
                    (g.as_ptr().add(rows.start), out, 1),
                    (w.as_ptr(), inp, 1),
                    T::one(),
                    true,
                )
            }
        })?;
        // SAFETY: the first chunk wrote every element (n, out, in > 0).
        unsafe { dx.set_len(n * inp) };
        Ok(dx)
    }

    /// The input's gradient `g W` (`g: [n, out]` -> `[n, in]`) as a new tensor outside the
    /// graph: chunk by chunk on the CPU in f32/f64, through the whole dequantized weight
    /// otherwise.
    pub(crate) fn grad_input(&self, g: &Tensor) -> Result<Tensor> {
        const OP: &str = "ranger-quantized-linear";
        let g = g.detach().contiguous()?;
        if !fused_ok(&g) {
            return g.matmul(&self.dequantize()?);
        }
        let n = g.dims2()?.0;
        let (s, l) = g.storage_and_layout();
        float_dispatch!(OP, g.dtype(), |T| {
            let dx = self.gw::<T>(storage_slice(OP, &s, l)?, n)?;
            Tensor::from_vec(dx, (n, self.cols), &Device::Cpu)
        })
    }
}

/// Decodes whole blocks of `B` from `bytes` into `out`.
fn decode_blocks<B: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()) {
        candle_core::bail!("ranger-quantized-linear: misaligned {:?} blocks", B::DTYPE);
    }
    // SAFETY: the bytes are whole, aligned blocks of `B` (checked above), which hold plain
    // numbers: any bit pattern is a value.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) };
    B::to_float(blocks, out);
    Ok(())
}

/// The block decoder of a format.
fn decoder(format: GgmlDType) -> fn(&[u8], &mut [f32]) -> Result<()> {
    match format {
        GgmlDType::F32 => decode_blocks::<f32>,
        GgmlDType::F16 => decode_blocks::<f16>,
        GgmlDType::BF16 => decode_blocks::<bf16>,
        GgmlDType::Q4_0 => decode_blocks::<BlockQ4_0>,
        GgmlDType::Q4_1 => decode_blocks::<BlockQ4_1>,
        GgmlDType::Q5_0 => decode_blocks::<BlockQ5_0>,
        GgmlDType::Q5_1 => decode_blocks::<BlockQ5_1>,
        GgmlDType::Q8_0 => decode_blocks::<BlockQ8_0>,
        GgmlDType::Q8_1 => decode_blocks::<BlockQ8_1>,
        GgmlDType::Q2K => decode_blocks::<BlockQ2K>,
        GgmlDType::Q3K => decode_blocks::<BlockQ3K>,
        GgmlDType::Q4K => decode_blocks::<BlockQ4K>,
        GgmlDType::Q5K => decode_blocks::<BlockQ5K>,
        GgmlDType::Q6K => decode_blocks::<BlockQ6K>,
        GgmlDType::Q8K => decode_blocks::<BlockQ8K>,
    }
}

/// `x W^T` for a quantized `W: [out, in]` and `x: [n, in]` on any device, with the input's
/// gradient only (the weight is frozen).
pub fn quantized_linear(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuantizedLinear { weight: w.clone() })
}

/// The op of [`quantized_linear`].
struct QuantizedLinear {
    weight: QuantizedWeight,
}

impl QuantizedLinear {
    /// The backend's matmul over the whole dequantized weight (devices, half precision).
    fn dense(&self) -> Result<FrozenMatmul> {
        Ok(FrozenMatmul { weight: self.weight.dequantize()? })
    }
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "ranger-quantized-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, inp) = xl.shape().dims2()?;
        let (out, inp2) = self.weight.dims2();
        if inp != inp2 {
            candle_core::bail!("{}: input {:?} for weight [{out}, {inp2}]", self.name(), xl.dims());
        }
        if x.dtype() != self.weight.dtype {
            candle_core::bail!("{}: {:?} input for a {:?} weight", self.name(), x.dtype(), self.weight.dtype);
        }
        let Some((a, b)) = xl.contiguous_offsets() else { candle_core::bail!("{}: input not contiguous", self.name()) };
        let shape = Shape::from((n, out));
        match x {
            CpuStorage::F32(v) => Ok((CpuStorage::F32(self.weight.xwt(&v[a..b], n)?), shape)),
            CpuStorage::F64(v) => Ok((CpuStorage::F64(self.weight.xwt(&v[a..b], n)?), shape)),
            _ => self.dense()?.cpu_fwd(x, xl),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.dense()?.cuda_fwd(x, xl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, x: &candle_core::MetalStorage, xl: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        self.dense()?.metal_fwd(x, xl)
    }

    // g: [n, out], W: [out, in] -> dx: [n, in]
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.weight.grad_input(g).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Tensor, Var};

    use super::{quantized_linear, QuantizedWeight};
    use crate::kernels::linear::linear;

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// Every block format Candle reads: the product and the input gradient equal those of the
    /// dequantized weight to f32 rounding, in f32 and f64, fused and portable, and the rows
    /// split over several chunks.
    #[test]
    fn quantized_linear_is_linear_over_the_dequantized_weight() {
        let dev = Device::Cpu;
        let formats = [
            (GgmlDType::Q4_0, 64),
            (GgmlDType::Q4_1, 64),
            (GgmlDType::Q5_0, 64),
            (GgmlDType::Q5_1, 64),
            (GgmlDType::Q8_0, 64),
            (GgmlDType::Q2K, 256),
            (GgmlDType::Q3K, 256),
            (GgmlDType::Q4K, 256),
            (GgmlDType::Q5K, 256),
            (GgmlDType::Q6K, 256),
            (GgmlDType::F16, 48),
        ];
        for (format, inp) in formats {
            let out = 40;
            let w = Tensor::randn(0f32, 0.5, (out, inp), &dev).unwrap();
            let qw = QuantizedWeight::quantize(&w, format).unwrap();
            let dense = qw.dequantize().unwrap();
            let mean_err = (&dense - &w).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(mean_err < 0.2, "{format:?} dequantizes near the weight ({mean_err})");
            for dt in [DType::F32, DType::F64, DType::BF16] {
                // 5 rows per chunk: 8 chunks.
                let qw = QuantizedWeight { chunk_elems: 5 * inp, ..qw.with_dtype(dt) };
                let dense = dense.to_dtype(dt).unwrap();
                let x =
                    Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, inp), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
                let tol = if dt == DType::BF16 { 0.05 } else { 1e-4 };
                for unfused in [false, true] {
                    let run = || {
                        let yq = quantized_linear(&x, &qw).unwrap();
                        let yd = linear(&x, &dense).unwrap();
                        let gq = yq.sin().unwrap().sum_all().unwrap().backward().unwrap();
                        let gd = yd.sin().unwrap().sum_all().unwrap().backward().unwrap();
                        let scale = values(&yd).iter().fold(1.0f64, |m, v| m.max(v.abs()));
                        assert!(max_diff(&yq, &yd) <= tol * scale, "{format:?} {dt:?} forward");
                        let (a, b) = (gq.get(&x).unwrap(), gd.get(&x).unwrap());
                        assert!(max_diff(a, b) <= tol * scale, "{format:?} {dt:?} input gradient");
                    };
                    if unfused {
                        crate::kernels::without_fused_kernels(run);
                    } else {
                        run();
                    }
                }
            }
        }
    }
}
