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
/// and, with a sliding window, `i - j < window`.
pub fn causal_mask(segments: &[Vec<u32>], window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = segments.len();
    let s = segments.first().map_or(0, Vec::len);
    let mut m = vec![0f32; b * s * s];
    for (bi, seg) in segments.iter().enumerate() {
        for i in 0..s {
            for j in 0..s {
                let visible = j <= i && seg[i] == seg[j] && window.is_none_or(|w| i - j < w);
                if !visible {
                    // Large and finite, so that no row can turn into NaN in any dtype.
                    m[(bi * s + i) * s + j] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, s), device)?.to_dtype(dtype)
}
