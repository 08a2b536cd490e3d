//! Rotary position embeddings, in Hugging Face's "rotate half" layout, with the
//! Llama 3 and linear frequency rescalings.

use crate::config::{Config, RopeScaling};
use crate::Result;
use candle_core::{Device, Tensor, D};

/// Cosine and sine tables for positions `0..max_positions`, shape `[positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
}

impl Rope {
    /// Builds the tables the way transformers does: inverse frequencies and angles in
    /// f32, so that positions agree with the reference to the last few ulps.
    pub fn new(cfg: &Config, max_positions: usize, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(cfg);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Bytes the tables hold.
    pub fn bytes(&self) -> usize {
        2 * self.cos.elem_count() * self.cos.dtype().size_in_bytes()
    }

    /// The tables' rows for `positions` (u32), each `[tokens, head_dim / 2]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}

/// Rotates `x` of shape `[tokens, heads, head_dim]` by per-token tables `[tokens, head_dim / 2]`.
pub(crate) fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, head_dim) = x.dims3()?;
    let half = head_dim / 2;
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?;
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let lo = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let hi = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[lo, hi], D::Minus1)?)
}

/// `1 / theta^(2i / head_dim)`, rescaled as the config asks.
fn inverse_frequencies(cfg: &Config) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let plain = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32));
    match &cfg.rope_scaling {
        None => plain.collect(),
        Some(RopeScaling::Linear { factor }) => plain.map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old_len = *original_max_position_embeddings as f32;
            let low_wavelen = old_len / low;
            let high_wavelen = old_len / high;
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
