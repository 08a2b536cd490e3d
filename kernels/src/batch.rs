//! A micro-batch: several sequences, each at its own position, travelling together.
//!
//! Their tokens are stacked into one `[tokens, hidden]` matrix so that every
//! projection is one matrix product for the whole batch; only attention, which
//! needs each sequence's own cache, runs per sequence.

use crate::rope::Rope;
use crate::{Config, Error, Result};
use candle_core::{Device, Tensor};

/// One sequence's share of a micro-batch: `len` tokens starting at position `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqSpan {
    pub pos: usize,
    pub len: usize,
}

/// What every layer needs to know about a micro-batch, computed once per batch.
#[derive(Debug)]
pub struct MicroBatch {
    spans: Vec<SeqSpan>,
    tokens: usize,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Per sequence, an additive causal mask `[group * len, pos + len]` for prefills
    /// on devices that attend with general matrix products.
    pub(crate) masks: Vec<Option<Tensor>>,
}

impl MicroBatch {
    /// Prepares rotary tables and causal masks for `spans`.
    pub fn new(cfg: &Config, rope: &Rope, spans: &[SeqSpan], device: &Device) -> Result<Self> {
        if spans.is_empty() || spans.iter().any(|s| s.len == 0) {
            return Err(Error::Input(
                "a micro-batch needs at least one token per sequence".into(),
            ));
        }
        let mut positions = Vec::new();
        let mut masks = Vec::with_capacity(spans.len());
        for s in spans {
            let end = s
                .pos
                .checked_add(s.len)
                .filter(|&e| e <= rope.max_positions());
            let Some(end) = end else {
                return Err(Error::Input(format!(
                    "positions {}+{} go beyond the {} positions prepared",
                    s.pos,
                    s.len,
                    rope.max_positions()
                )));
            };
            positions.extend((s.pos..end).map(|p| p as u32));
            // The CPU's exact attention kernel masks by position itself.
            masks.push(if s.len > 1 && !device.is_cpu() {
                Some(causal_mask(cfg.kv_group(), s, device)?)
            } else {
                None
            });
        }
        let tokens = positions.len();
        let positions = Tensor::from_vec(positions, tokens, device)?;
        let (cos, sin) = rope.tables(&positions)?;
        Ok(Self {
            spans: spans.to_vec(),
            tokens,
            cos,
            sin,
            masks,
        })
    }

    pub fn spans(&self) -> &[SeqSpan] {
        &self.spans
    }

    /// Total tokens: the rows of the batch's hidden-state matrix.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Row of each sequence's last token, the only rows the LM head needs.
    pub fn last_rows(&self) -> Vec<u32> {
        let mut row = 0;
        self.spans
            .iter()
            .map(|s| {
                row += s.len;
                (row - 1) as u32
            })
            .collect()
    }
}

/// Rows are the query heads of one KV group, each with `len` queries; query `i`
/// sees keys `0..=pos + i`.
pub(crate) fn causal_mask(group: usize, s: &SeqSpan, device: &Device) -> Result<Tensor> {
    let keys = s.pos + s.len;
    let mut mask = Vec::with_capacity(group * s.len * keys);
    for _ in 0..group {
        for i in 0..s.len {
            let visible = s.pos + i + 1;
            mask.extend((0..keys).map(|j| {
                if j < visible {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Tensor::from_vec(mask, (group * s.len, keys), device)?)
}
