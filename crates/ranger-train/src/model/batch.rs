//! A batch of token sequences for a causal LM, and the attention mask of packed sequences.

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The device construction, run on the CPU, gives the host mask bit for bit (packing,
    /// padding segments, windows, every float dtype).
    #[test]
    fn device_mask_is_the_host_mask() {
        let segments = vec![vec![0, 0, 0, 1, 1, 1, 1, 2], vec![0, 0, 0, 0, 0, 0, 1, 1]];
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for window in [None, Some(1), Some(3), Some(100)] {
                let a = host_causal_mask(&segments, window, dtype, &Device::Cpu).unwrap();
                let b = device_causal_mask(&segments, window, dtype, &Device::Cpu).unwrap();
                assert_eq!(b.dims(), a.dims());
                assert_eq!(b.dtype(), dtype);
                let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
                assert_eq!(
                    a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    "{dtype:?} {window:?}"
                );
            }
        }
    }
}
