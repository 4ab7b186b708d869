//! A batch of token sequences for a causal LM, and the attention masks: packed causal
//! sequences (decoders) and right-padded ones (encoders).

use candle_core::{DType, Device, Result, Tensor};

/// One batch of token sequences, with what the model and the loss need to know about them.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, s]` u32 token ids.
    pub input_ids: Tensor,
    /// `[b, s]` u32 position of each token within its own example (restarts when packed).
    pub positions: Tensor,
    /// `[b, 1, s, s]` additive attention mask (0 or a large negative value), in the compute dtype.
    pub mask: Tensor,
    /// `[b, s]` f32: 1 where the token is a prediction target, 0 elsewhere (prompt, padding).
    pub loss_mask: Tensor,
    /// Number of target tokens (the sum of `loss_mask` after the shift).
    pub n_targets: usize,
    /// Number of non-padding tokens.
    pub n_tokens: usize,
}

/// Additive attention mask `[b, 1, s, s]`: token `i` sees token `j` when `j <= i`, both belong
/// to the same segment (packed examples never attend to each other; padding is its own segment)
/// and, with a sliding window, `i - j < window`. Masked entries hold -1e9: large and finite, so
/// that no row can turn into NaN in any dtype.
///
/// On the CPU it is written element by element; on a GPU it is built there from the `[b, s]`
/// segment ids, so only those cross the bus, not the `b * s * s` mask.
pub fn causal_mask(segments: &[Vec<u32>], window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    if device.is_cpu() {
        host_causal_mask(segments, window, dtype, device)
    } else {
        device_causal_mask(segments, window, dtype, device)
    }
}

fn host_causal_mask(segments: &[Vec<u32>], window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = segments.len();
    let s = segments.first().map_or(0, Vec::len);
    let mut m = vec![0f32; b * s * s];
    for (bi, seg) in segments.iter().enumerate() {
        for i in 0..s {
            for j in 0..s {
                let visible = j <= i && seg[i] == seg[j] && window.is_none_or(|w| i - j < w);
                if !visible {
                    m[(bi * s + i) * s + j] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, s), device)?.to_dtype(dtype)
}

/// [`causal_mask`] with tensor ops on `device` (comparisons and `where_cond`, which Candle has
/// on every backend); positions are compared in f32, exact below 2^24 tokens.
fn device_causal_mask(segments: &[Vec<u32>], window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = segments.len();
    let s = segments.first().map_or(0, Vec::len);
    let flat: Vec<u32> = segments.concat();
    let seg = Tensor::from_vec(flat, (b, 1, s), device)?;
    let same = seg.unsqueeze(3)?.broadcast_eq(&seg.unsqueeze(2)?)?; // [b, 1, s, s]
    let i = Tensor::arange(0f32, s as f32, device)?.reshape((s, 1))?;
    let j = Tensor::arange(0f32, s as f32, device)?.reshape((1, s))?;
    let mut visible = j.broadcast_le(&i)?.broadcast_mul(&same)?; // u8, [b, 1, s, s]
    if let Some(w) = window {
        // i - j < w  <=>  i < j + w
        let in_window = i.broadcast_lt(&(j + w as f64)?)?;
        visible = visible.broadcast_mul(&in_window)?;
    }
    let zeros = Tensor::zeros((b, 1, s, s), dtype, device)?;
    let masked = Tensor::full(-1e9f32, (b, 1, s, s), device)?.to_dtype(dtype)?;
    visible.where_cond(&zeros, &masked)
}

/// Additive self-attention mask `[b, 1, s, s]` of right-padded sequences of `lengths` padded
/// to `s`: every token sees every non-padding token of its own sequence. On a GPU it is built
/// there from the lengths, so only those cross the bus.
pub fn padding_mask(lengths: &[usize], s: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    if device.is_cpu() {
        host_padding_mask(lengths, s, dtype, device)
    } else {
        device_padding_mask(lengths, s, dtype, device)
    }
}

fn host_padding_mask(lengths: &[usize], s: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; lengths.len() * s * s];
    for (bi, &len) in lengths.iter().enumerate() {
        for i in 0..s {
            for j in len..s {
                m[(bi * s + i) * s + j] = -1e9;
            }
        }
    }
    Tensor::from_vec(m, (lengths.len(), 1, s, s), device)?.to_dtype(dtype)
}

/// [`padding_mask`] with tensor ops on `device`: key `j` is visible when `j < length`.
fn device_padding_mask(lengths: &[usize], s: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = lengths.len();
    let len: Vec<f32> = lengths.iter().map(|&l| l as f32).collect();
    let len = Tensor::from_vec(len, (b, 1, 1, 1), device)?;
    let j = Tensor::arange(0f32, s as f32, device)?.reshape((1, 1, 1, s))?;
    let visible = j.broadcast_lt(&len)?.broadcast_as((b, 1, s, s))?.contiguous()?;
    let zeros = Tensor::zeros((b, 1, s, s), dtype, device)?;
    let masked = Tensor::full(-1e9f32, (b, 1, s, s), device)?.to_dtype(dtype)?;
    visible.where_cond(&zeros, &masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device constructions, run on the CPU, give the host masks bit for bit (causal: packing,
    /// padding segments, windows; padding: rows of several lengths; every float dtype).
    #[test]
    fn device_masks_are_the_host_masks() {
        let same = |a: Tensor, b: Tensor, what: String| {
            assert_eq!((b.dims(), b.dtype()), (a.dims(), a.dtype()), "{what}");
            let v = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(v(&a), v(&b), "{what}");
        };
        let segments = vec![vec![0, 0, 0, 1, 1, 1, 1, 2], vec![0, 0, 0, 0, 0, 0, 1, 1]];
        let cpu = &Device::Cpu;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for window in [None, Some(1), Some(3), Some(100)] {
                let (a, b) = (
                    host_causal_mask(&segments, window, dtype, cpu),
                    device_causal_mask(&segments, window, dtype, cpu),
                );
                same(a.unwrap(), b.unwrap(), format!("causal {dtype:?} {window:?}"));
            }
            let (a, b) = (host_padding_mask(&[5, 2, 7], 7, dtype, cpu), device_padding_mask(&[5, 2, 7], 7, dtype, cpu));
            same(a.unwrap(), b.unwrap(), format!("padding {dtype:?}"));
        }
    }
}
